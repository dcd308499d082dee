// The three transforms of a 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering
// F(m x m, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), in fp32,
// for output tiles of m = 2 or m = 4 pixels a side.
//
// Built and loaded by sdlite/cpu_kernels.py, used by sdlite/ops.py (``winograd_conv3x3``, which says
// when and why). Plain C++ that the compiler vectorizes (every inner loop runs over channels, unit
// stride: maps are channels-last), no PyTorch headers, OpenMP threads over tiles.
//
// Each m x m block of the output ("tile" i, j: rows m·i .. m·i+m-1, columns m·j .. m·j+m-1) depends
// on an n x n patch d of the zero-padded input, n = m + 2 (rows m·i-1 .. m·i+m, likewise columns).
// With the matrices Bᵀ (n x n), G (n x 3) and Aᵀ (m x n) of struct F2 or F4 below, the output tile is
//
//   Y = Aᵀ [ Σ_c (G g_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A
//
// so for each of the P = n² positions p of the n x n "Winograd domain", the sum over input channels
// c is one matrix product
//
//   M[p] (T x K) = V[p] (T x C) @ U[p]ᵀ (C x K),   U[p][k][c] = (G g_kc Gᵀ)_p,  V[p][t][c] = (Bᵀ d_tc B)_p
//
// which the caller computes (BLAS). This file makes U (weights), V (input) and Y (output, from M,
// plus the bias). Tiles t are numbered t = (b·TH + i)·TW + j over the batch, TH = ⌈H/m⌉ tile rows
// of TW = ⌈W/m⌉; a call transforms the tiles t0 .. t0+count-1 (the caller works in chunks of tiles
// so that V and M stay small), V and M holding only those, at row t - t0.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

// F(2x2, 3x3), from the points 0, 1, -1 and ∞: 16 products per tile of 4 outputs, where the direct
// convolution does 36 (2.25x fewer). Its transforms are additions (and halvings, for the weights).
struct F2 {
    static constexpr int m = 2, n = 4;
    static constexpr float BT[n][n] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
    static constexpr float G[n][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
    static constexpr float AT[m][n] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// F(4x4, 3x3): 36 products per tile of 16 outputs, where the direct convolution does 144 (4x fewer).
// The points are 0, 1, -1, 1/2, -2 and ∞ rather than Lavin & Gray's 0, ±1, ±2, ∞: larger points
// make larger coefficients, and so larger rounding errors in fp32 (Barabasz et al., "Error analysis
// and improving the accuracy of Winograd convolution for deep neural networks", 2020). Simulated in
// fp32 on 640-channel sums, against fp64: largest error 6.0e-6 of the output's scale against 1.3e-5,
// root mean square 3.3e-6 against 5.0e-6. G's thirds and fifteenths are rounded to floats: with the
// weights' transform in double, it took 1.25x the time and the convolutions were no more accurate.
struct F4 {
    static constexpr int m = 4, n = 6;
    static constexpr float BT[n][n] = {
        {1, -1.5f, -2, 1.5f, 1, 0}, {0, -1, 0.5f, 2.5f, 1, 0}, {0, 1, -2.5f, 0.5f, 1, 0},
        {0, -2, -1, 2, 1, 0},       {0, 0.5f, -1, -0.5f, 1, 0}, {0, 1, -1.5f, -2, 1.5f, 1}};
    static constexpr float G[n][3] = {{1, 0, 0},
                                      {1 / 3.f, 1 / 3.f, 1 / 3.f},
                                      {-1 / 3.f, 1 / 3.f, -1 / 3.f},
                                      {-16 / 15.f, -8 / 15.f, -4 / 15.f},
                                      {1 / 15.f, -2 / 15.f, 4 / 15.f},
                                      {0, 0, 1}};
    static constexpr float AT[m][n] = {
        {1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0}, {0, 1, -1, 0.125f, -8, 1}};
};

// y = a x for a constant matrix a, skipping its zeros and taking its ±1 as signs: the loops are
// unrolled, so every test of a's entries is decided at compile time and what is left is the
// arithmetic of its other entries. (Checked with -fopt-info-vec: every channel loop that calls it is
// vectorized; without the unroll pragmas, F(4x4)'s 6x6 loops were not, and its transforms took 6-8x.)
template <int R, int K, int C, typename T, typename S>
inline void product(const S (&a)[R][K], const T (&x)[K][C], T (&y)[R][C]) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 8
        for (int j = 0; j < C; ++j) {
            T s = 0;
            bool first = true;
#pragma GCC unroll 8
            for (int k = 0; k < K; ++k) {
                if (a[i][k] == 0) continue;
                const T term = a[i][k] == 1 ? x[k][j] : a[i][k] == -1 ? -x[k][j] : T(a[i][k]) * x[k][j];
                s = first ? term : s + term;
                first = false;
            }
            y[i][j] = s;
        }
    }
}

template <int R, int K, int C, typename T, typename S>
inline void product_transposed(const T (&x)[R][K], const S (&a)[C][K], T (&y)[R][C]) {  // y = x aᵀ = (a xᵀ)ᵀ
    T xt[K][R], yt[C][R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int k = 0; k < K; ++k) xt[k][i] = x[i][k];
    product(a, xt, yt);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < C; ++j) y[i][j] = yt[j][i];
}

// U[p][k][c] = (G g_kc Gᵀ)_p for weights g: [K][C][3][3], contiguous. U: [n²][K][C].
template <typename F>
void weights(const float *g, float *u, int64_t K, int64_t C, int threads) {
    constexpr int n = F::n;
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> taps(9 * C);  // one output channel's kernel, tap-major: taps[3r + s][c]
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t c = 0; c < C; ++c)
                for (int q = 0; q < 9; ++q) taps[q * C + c] = g[(k * C + c) * 9 + q];
            float *out = u + k * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float w[3][3], gw[n][3], v[n][n];
#pragma GCC unroll 9
                for (int q = 0; q < 9; ++q) w[q / 3][q % 3] = taps[q * C + c];
                product(F::G, w, gw);               // G g: the kernel's rows combined
                product_transposed(gw, F::G, v);    // (G g) Gᵀ: then its columns
#pragma GCC unroll 36
                for (int p = 0; p < n * n; ++p) out[p * K * C + c] = v[p / n][p % n];
            }
        }
    }
}

// V[p][t - t0][c] = (Bᵀ d_ct B)_p for the tiles t0 .. t0+count-1 of x: [B][H][W][C] (channels-last,
// contiguous) upsampled `up` times (1: as it is; 2: nearest x2, each pixel read for a 2x2 block of
// the map the conv sees, which is never written out). V: [n²][count][C].
template <typename F>
void input(const float *x, float *v, int64_t C, int64_t Hx, int64_t Wx, int up, int64_t t0, int64_t count,
           int threads) {
    constexpr int m = F::m, n = F::n;
    const int64_t H = up * Hx, W = up * Wx;  // the convolved map
    const int64_t TH = (H + m - 1) / m, TW = (W + m - 1) / m, plane = count * C;
    std::vector<float> zeros(C, 0.0f);  // the padding: a pixel outside the image
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = t0; t < t0 + count; ++t) {
        const int64_t j = t % TW, i = (t / TW) % TH, b = t / (TW * TH);
        const float *d[n][n];  // the tile's input pixels
        for (int r = 0; r < n; ++r) {
            const int64_t y = m * i - 1 + r;
            for (int s = 0; s < n; ++s) {
                const int64_t xc = m * j - 1 + s;
                d[r][s] = (y >= 0 && y < H && xc >= 0 && xc < W) ? x + ((b * Hx + y / up) * Wx + xc / up) * C
                                                                  : zeros.data();
            }
        }
        float *out = v + (t - t0) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            float dc[n][n], e[n][n], f[n][n];
#pragma GCC unroll 6
            for (int r = 0; r < n; ++r)
#pragma GCC unroll 6
                for (int s = 0; s < n; ++s) dc[r][s] = d[r][s][c];
            product(F::BT, dc, e);             // Bᵀ d: the rows combined
            product_transposed(e, F::BT, f);   // (Bᵀ d) B: then the columns
#pragma GCC unroll 36
            for (int p = 0; p < n * n; ++p) out[p * plane + c] = f[p / n][p % n];
        }
    }
}

// The output tiles t0 .. t0+count-1, Aᵀ M_t A + bias (bias may be null), from M: [n²][count][K],
// into y: [B][H][W][LDY] (channels-last; y points at the first of the K channels written, of LDY per
// pixel). A tile's rows or columns past the image's edge (a map not a multiple of m) are written to
// a scratch row instead, so that every tile takes the same vectorized loop.
template <typename F>
void output(const float *mm, const float *bias, float *y, int64_t K, int64_t H, int64_t W, int64_t LDY, int64_t t0,
            int64_t count, int threads) {
    constexpr int m = F::m, n = F::n;
    const int64_t TH = (H + m - 1) / m, TW = (W + m - 1) / m, plane = count * K;
    std::vector<float> zeros(K, 0.0f);
    const float *b0 = bias ? bias : zeros.data();
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> sink(K);
#pragma omp for schedule(static)
        for (int64_t t = t0; t < t0 + count; ++t) {
            const int64_t j = t % TW, i = (t / TW) % TH, b = t / (TW * TH);
            float *yp[m][m];
            for (int r = 0; r < m; ++r)
                for (int s = 0; s < m; ++s)
                    yp[r][s] = (m * i + r < H && m * j + s < W) ? y + ((b * H + m * i + r) * W + m * j + s) * LDY
                                                                : sink.data();
            const float *in = mm + (t - t0) * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
                float mk[n][n], s[m][n], o[m][m];
#pragma GCC unroll 36
                for (int p = 0; p < n * n; ++p) mk[p / n][p % n] = in[p * plane + k];
                product(F::AT, mk, s);              // Aᵀ M: the rows combined
                product_transposed(s, F::AT, o);    // (Aᵀ M) A: then the columns
#pragma GCC unroll 4
                for (int r = 0; r < m; ++r)
#pragma GCC unroll 4
                    for (int q = 0; q < m; ++q) yp[r][q][k] = o[r][q] + b0[k];
            }
        }
    }
}

}  // namespace

extern "C" {

// m: the output tile's side, 2 or 4 (F(2x2, 3x3) or F(4x4, 3x3)); n = m + 2. Returns 0, or -1 for
// another m. Layouts: see above.
int sdlite_winograd_weights_fp32(int m, const float *g, float *u, int64_t K, int64_t C, int threads) {
    if (m == 2) return weights<F2>(g, u, K, C, threads), 0;
    if (m == 4) return weights<F4>(g, u, K, C, threads), 0;
    return -1;
}

// H, W: x's map; up: 1, or 2 for the conv of x upsampled (nearest x2), whose map is 2H x 2W.
int sdlite_winograd_input_fp32(int m, const float *x, float *v, int64_t C, int64_t H, int64_t W, int up,
                               int64_t t0, int64_t count, int threads) {
    if (up != 1 && up != 2) return -1;
    if (m == 2) return input<F2>(x, v, C, H, W, up, t0, count, threads), 0;
    if (m == 4) return input<F4>(x, v, C, H, W, up, t0, count, threads), 0;
    return -1;
}

int sdlite_winograd_output_fp32(int m, const float *mm, const float *bias, float *y, int64_t K, int64_t H, int64_t W,
                                int64_t LDY, int64_t t0, int64_t count, int threads) {
    if (m == 2) return output<F2>(mm, bias, y, K, H, W, LDY, t0, count, threads), 0;
    if (m == 4) return output<F4>(mm, bias, y, K, H, W, LDY, t0, count, threads), 0;
    return -1;
}

}  // extern "C"
