// The three transforms of a 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering
// F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016), in fp32.
//
// Built and loaded by sdlite/cpu_kernels.py, used by sdlite/ops.py (``winograd_conv3x3``, which says
// when and why). Plain C++ that the compiler vectorizes (every inner loop runs over channels, unit
// stride: maps are channels-last), no PyTorch headers, OpenMP threads over tiles.
//
// Each 2x2 block of the output ("tile" i, j: rows 2i, 2i+1, columns 2j, 2j+1) depends on a 4x4
// patch d of the zero-padded input (rows 2i-1 .. 2i+2, columns 2j-1 .. 2j+2). With
//
//   Bᵀ = [[1, 0,-1, 0],     G = [[ 1,   0,   0 ],     Aᵀ = [[1, 1, 1, 0],
//         [0, 1, 1, 0],          [1/2, 1/2, 1/2],           [0, 1,-1,-1]]
//         [0,-1, 1, 0],          [1/2,-1/2, 1/2],
//         [0, 1, 0,-1]]          [ 0,   0,   1 ]]
//
// the output tile is  Y = Aᵀ [ Σ_c (G g_kc Gᵀ) ⊙ (Bᵀ d_c B) ] A : for each of the 16 positions p of
// the 4x4 "Winograd domain", the sum over input channels c is one matrix product
//
//   M[p] (T x K) = V[p] (T x C) @ U[p]ᵀ (C x K),   U[p][k][c] = (G g_kc Gᵀ)_p,  V[p][t][c] = (Bᵀ d_tc B)_p
//
// which the caller computes (BLAS). This file makes U (weights), V (input) and Y (output, from M,
// plus the bias). Tiles t are numbered t = (b·TH + i)·TW + j over the batch, TH = ⌈H/2⌉ tile rows
// of TW = ⌈W/2⌉; a call transforms the tiles t0 .. t0+count-1 (the caller works in chunks of tiles
// so that V and M stay small), V and M holding only those, at row t - t0.
//
// The transforms are additions and subtractions only (and halvings, for the weights).

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

extern "C" {

// U[p][k][c] = (G g_kc Gᵀ)_p for weights g: [K][C][3][3], contiguous. U: [16][K][C].
void sdlite_winograd_weights_fp32(const float *g, float *u, int64_t K, int64_t C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
            const float *w = g + (k * C + c) * 9;
            float r[4][3];  // G g: rows of the kernel combined
            for (int col = 0; col < 3; ++col) {
                r[0][col] = w[col];
                r[1][col] = 0.5f * (w[col] + w[3 + col] + w[6 + col]);
                r[2][col] = 0.5f * (w[col] - w[3 + col] + w[6 + col]);
                r[3][col] = w[6 + col];
            }
            for (int row = 0; row < 4; ++row) {  // (G g) Gᵀ: then its columns
                float x[4] = {r[row][0], 0.5f * (r[row][0] + r[row][1] + r[row][2]),
                              0.5f * (r[row][0] - r[row][1] + r[row][2]), r[row][2]};
                for (int col = 0; col < 4; ++col) u[((row * 4 + col) * K + k) * C + c] = x[col];
            }
        }
    }
}

// V[p][t - t0][c] = (Bᵀ d_ct B)_p for the tiles t0 .. t0+count-1 of x: [B][H][W][C] (channels-last,
// contiguous). V: [16][count][C].
void sdlite_winograd_input_fp32(const float *x, float *v, int64_t B, int64_t C, int64_t H, int64_t W,
                                int64_t t0, int64_t count, int threads) {
    const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, plane = count * C;
    (void)B;
    std::vector<float> zeros(C, 0.0f);  // the padding: a pixel outside the image
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < count; ++n) {
        const int64_t t = t0 + n, j = t % TW, i = (t / TW) % TH, b = t / (TW * TH);
        const float *d[4][4];  // the tile's 4x4 input pixels (rows 2i-1 .. 2i+2, columns 2j-1 .. 2j+2)
        for (int r = 0; r < 4; ++r) {
            const int64_t y = 2 * i - 1 + r;
            for (int s = 0; s < 4; ++s) {
                const int64_t xc = 2 * j - 1 + s;
                d[r][s] = (y >= 0 && y < H && xc >= 0 && xc < W) ? x + ((b * H + y) * W + xc) * C : zeros.data();
            }
        }
        float *out[16];
        for (int p = 0; p < 16; ++p) out[p] = v + p * plane + n * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            float e[4][4];  // Bᵀ d: the rows combined, per column s
            for (int s = 0; s < 4; ++s) {
                e[0][s] = d[0][s][c] - d[2][s][c];
                e[1][s] = d[1][s][c] + d[2][s][c];
                e[2][s] = d[2][s][c] - d[1][s][c];
                e[3][s] = d[1][s][c] - d[3][s][c];
            }
            for (int r = 0; r < 4; ++r) {  // (Bᵀ d) B: then the columns
                out[4 * r + 0][c] = e[r][0] - e[r][2];
                out[4 * r + 1][c] = e[r][1] + e[r][2];
                out[4 * r + 2][c] = e[r][2] - e[r][1];
                out[4 * r + 3][c] = e[r][1] - e[r][3];
            }
        }
    }
}

// The output tiles t0 .. t0+count-1, Aᵀ M_t A + bias (bias may be null), from M: [16][count][K],
// into y: [B][H][W][LDY] (channels-last; y points at the first of the K channels written, of LDY per
// pixel; a tile's row or column past the image's edge is not written).
void sdlite_winograd_output_fp32(const float *m, const float *bias, float *y, int64_t B, int64_t K, int64_t H,
                                 int64_t W, int64_t LDY, int64_t t0, int64_t count, int threads) {
    const int64_t TH = (H + 1) / 2, TW = (W + 1) / 2, plane = count * K;
    (void)B;
    std::vector<float> zeros(K, 0.0f);
    const float *b0 = bias ? bias : zeros.data();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < count; ++n) {
        const int64_t t = t0 + n, j = t % TW, i = (t / TW) % TH, b = t / (TW * TH);
        const float *mp[16];
        for (int p = 0; p < 16; ++p) mp[p] = m + p * plane + n * K;
        const bool right = 2 * j + 1 < W, below = 2 * i + 1 < H;
        float *y00 = y + ((b * H + 2 * i) * W + 2 * j) * LDY;
        float *y01 = right ? y00 + LDY : nullptr;
        float *y10 = below ? y00 + W * LDY : nullptr;
        float *y11 = right && below ? y10 + LDY : nullptr;
        if (y01 && y10) {
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
                float s0[4], s1[4];  // Aᵀ M: the rows combined
                for (int l = 0; l < 4; ++l) {
                    s0[l] = mp[l][k] + mp[4 + l][k] + mp[8 + l][k];
                    s1[l] = mp[4 + l][k] - mp[8 + l][k] - mp[12 + l][k];
                }
                y00[k] = s0[0] + s0[1] + s0[2] + b0[k];  // (Aᵀ M) A, plus the bias
                y01[k] = s0[1] - s0[2] - s0[3] + b0[k];
                y10[k] = s1[0] + s1[1] + s1[2] + b0[k];
                y11[k] = s1[1] - s1[2] - s1[3] + b0[k];
            }
        } else {  // a tile on the bottom or right edge of an odd-sized map
            // (The row sums are written out in both loops on purpose: moved into a shared inline
            // function, GCC 12 vectorized 2 of this file's 4 loops instead of 4, and a 128-channel
            // conv on 256x256 maps took 1.16x the time.)
            for (int64_t k = 0; k < K; ++k) {
                float s0[4], s1[4];
                for (int l = 0; l < 4; ++l) {
                    s0[l] = mp[l][k] + mp[4 + l][k] + mp[8 + l][k];
                    s1[l] = mp[4 + l][k] - mp[8 + l][k] - mp[12 + l][k];
                }
                y00[k] = s0[0] + s0[1] + s0[2] + b0[k];
                if (y01) y01[k] = s0[1] - s0[2] - s0[3] + b0[k];
                if (y10) y10[k] = s1[0] + s1[1] + s1[2] + b0[k];
                if (y11) y11[k] = s1[1] - s1[2] - s1[3] + b0[k];
            }
        }
    }
}

}  // extern "C"
