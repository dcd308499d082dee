// softmax(q kᵀ · scale) v on an x86 CPU with AVX-512, in fp32, or in bf16 with AVX512-BF16: sdlite's
// CPU attention kernel.
//
// Built and loaded by sdlite/cpu_kernels.py (which says why it exists); plain C++ with Intel's
// intrinsics, no PyTorch headers. The arithmetic is that of PyTorch's own attention kernels:
//
//   s = q kᵀ                          summed in fp32 (for bf16: exact products of bf16 numbers)
//   e = exp(scale·(s - max_row s))    fp32; for bf16 then rounded to bf16
//   o = (e v) / Σ_row e               e v summed in fp32, divided in fp32, rounded to bf16 once
//
// One task is one sample, one head and a block of MB queries: its scores (MB x N fp32) and
// probabilities stay in the core's L2 cache, never in memory. Both products are the same loop for
// both types: broadcast 32 bits of one row (one fp32 number, or a pair of bf16 numbers), load 64
// bytes of the other operand (16 fp32 lanes, or 16 pairs), multiply-add into 16 fp32 sums (FMA,
// or `vdpbf16ps`, which adds both products of each pair). So the keys and values of each head are
// first re-laid out ("packed") once per call, in words of W elements (W = 1 for fp32, 2 for bf16)
// along the summed dimension:
//
//   kp[j][n][t] = k[n][W j + t]    (words of head channels; n padded to a multiple of 48 keys)
//   vp[j][c][t] = v[W j + t][c]    (words of keys; c padded to a multiple of 16 channels)
//
// and the queries (copied into a zero-padded block) and probabilities are read a word at a time.
// Padding is zeros; padded keys get the score -inf, so exp gives them 0.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;  // the bit pattern of a bfloat16

enum { MR = 8 };   // query rows per register tile
enum { NV = 3 };   // 16-wide fp32 vectors per register tile of scores: 48 keys (8 x 3 = 24 sums)

// e^x for x <= 0, to ~1e-7 relative: x = n ln2 + r with |r| <= ln2/2, e^x = 2^n e^r, e^r by its
// Taylor series to degree 6 (error r^7/7! <= 1.2e-7). Below -87, e^x < 2^-125 counts as 0 against
// the row's largest term, which is 1. A NaN stays NaN (max returns its second operand then).
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln2, with ln2 split in two so that n·ln2_hi is exact (Cody and Waite)
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  // p · 2^n
}

// The 32 bits at p (two bf16 numbers, or one float), repeated in all 16 lanes.
template <typename T>
static inline __m512i word_everywhere(const T *p) {
    int32_t w;
    memcpy(&w, p, 4);
    return _mm512_set1_epi32(w);
}

// acc + a · b lane by lane: for bf16, a pair of products per lane (vdpbf16ps); for fp32, one (FMA).
static inline __m512 madd(__m512 acc, __m512i a, __m512i b, const bf16 *) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
static inline __m512 madd(__m512 acc, __m512i a, __m512i b, const float *) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
}

// Lanes [0, left) of a 16-lane vector, left clamped to [0, 16].
static inline __mmask16 first_lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// s[r][n0 + i] = q[r] · k[n0 + i] for MR rows and 16·NV keys; lanes not in `valid` get -inf.
// Keeps each row's running maximum in rowmax[r] (a vector; reduced later).
template <typename T>
static inline void score_tile(const T *q, int64_t q_stride, const T *kp, int64_t n_pad, int64_t dw,
                              int64_t n0, float *s, int64_t s_stride, const __mmask16 *valid, __m512 *rowmax) {
    __m512 acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < dw; j++) {
        constexpr int W = 4 / sizeof(T);
        __m512i kv[NV];
        for (int c = 0; c < NV; c++) kv[c] = _mm512_loadu_si512(kp + (j * n_pad + n0 + 16 * c) * W);
        for (int r = 0; r < MR; r++) {
            const __m512i qv = word_everywhere(q + r * q_stride + W * j);
            for (int c = 0; c < NV; c++) acc[r][c] = madd(acc[r][c], qv, kv[c], q);
        }
    }
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) {
            const __m512 v = _mm512_mask_blend_ps(valid[c], minus_inf, acc[r][c]);
            _mm512_storeu_ps(s + r * s_stride + n0 + 16 * c, v);
            rowmax[r] = _mm512_max_ps(rowmax[r], v);
        }
}

// o[r][c0 + i] = Σ_n e[r][n] v[n][c0 + i] for MR rows and 16·V channels (n over the words j < nw).
template <int V, typename T>
static inline void value_tile(const T *e, int64_t e_stride, const T *vp, int64_t d_pad, int64_t nw,
                              int64_t c0, float *o, int64_t o_stride) {
    constexpr int W = 4 / sizeof(T);
    __m512 acc[MR][V];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nw; j++) {
        __m512i vv[V];
        for (int c = 0; c < V; c++) vv[c] = _mm512_loadu_si512(vp + (j * d_pad + c0 + 16 * c) * W);
        for (int r = 0; r < MR; r++) {
            const __m512i ev = word_everywhere(e + r * e_stride + W * j);
            for (int c = 0; c < V; c++) acc[r][c] = madd(acc[r][c], ev, vv[c], e);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) _mm512_storeu_ps(o + r * o_stride + c0 + 16 * c, acc[r][c]);
}

// Stores lanes `m` of x at p, rounded to bf16 (round to nearest even) or as they are.
static inline void store16(bf16 *p, __mmask16 m, __m512 x) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}
static inline void store16(float *p, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(p, m, x); }

// The sizes of the packed and padded layouts for one element type T (W = 2 bf16, 1 float per word).
template <typename T>
struct Layout {
    static constexpr int W = 4 / sizeof(T);
    int64_t dw, n_pad, nw, d_pad;  // words per q/k row; keys padded to 48; words per e row; channels padded to 16
    Layout(int64_t N, int64_t d) : dw((d + W - 1) / W), n_pad((N + 47) / 48 * 48), nw((N + W - 1) / W), d_pad((d + 15) / 16 * 16) {}
    int64_t kp_elements() const { return dw * n_pad * W; }
    int64_t pack_elements() const { return kp_elements() + nw * d_pad * W; }
    int64_t scratch_bytes(int64_t MB) const {
        const int64_t bytes = MB * n_pad * 4 + MB * nw * 4 + MB * d_pad * 4 + MB * dw * 4 + MB * 4;
        return (bytes + 63) / 64 * 64;
    }
};

template <typename T>
static void attention(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t H, int64_t L, int64_t N, int64_t d,
                      const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                      const int64_t *out_strides, float scale, int64_t MB, int threads, T *pack, char *scratch) {
    const Layout<T> lay(N, d);
    constexpr int W = Layout<T>::W;
    const int64_t n_pad = lay.n_pad, d_pad = lay.d_pad, dw = lay.dw, nw = lay.nw;
    const int64_t kp_size = lay.kp_elements(), per_head = lay.pack_elements();
    const int64_t blocks = (L + MB - 1) / MB, scratch_bytes = lay.scratch_bytes(MB);
    const int64_t q_row = W * dw, e_row = W * nw;  // padded row lengths of the q and e blocks

#pragma omp parallel num_threads(threads)
    {
        // 1. Pack each head's keys and values (see the top of this file).
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            T *kp = pack + bh * per_head, *vp = kp + kp_size;
            const T *kk = k + b * k_strides[0] + h * k_strides[1];
            const T *vv = v + b * v_strides[0] + h * v_strides[1];
            memset(kp, 0, per_head * sizeof(T));  // the pads
            for (int64_t j = 0; j < dw; j++) {  // kp row j: channels W j .. W j + W - 1 of every key
                const int64_t width = W * j + W <= d ? W : d - W * j;
                for (int64_t n = 0; n < N; n++) memcpy(kp + (j * n_pad + n) * W, kk + n * k_strides[2] + W * j, width * sizeof(T));
            }
            for (int64_t j = 0; j < nw; j++)  // vp row j: keys W j .. W j + W - 1, interleaved channel by channel
                for (int t = 0; t < W && W * j + t < N; t++) {
                    const T *key = vv + (W * j + t) * v_strides[2];
                    T *row = vp + j * d_pad * W + t;
                    for (int64_t c = 0; c < d; c++) row[W * c] = key[c];
                }
        }

        // 2. One block of MB queries of one head per task; its buffers are this thread's.
        char *mine = scratch + omp_get_thread_num() * scratch_bytes;
        float *s = (float *)mine;                 // [MB][n_pad] scores
        T *e = (T *)(s + MB * n_pad);             // [MB][e_row] exp(scale (s - max)), in T
        float *o = (float *)(e + MB * e_row);     // [MB][d_pad] e v
        T *qb = (T *)(o + MB * d_pad);            // [MB][q_row] the block's queries
        float *inv_sum = (float *)(qb + MB * q_row);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H * blocks; task++) {
            const int64_t bh = task / blocks, l0 = (task % blocks) * MB, b = bh / H, h = bh % H;
            const int64_t rows = L - l0 < MB ? L - l0 : MB, tiled = (rows + MR - 1) / MR * MR;
            const T *kp = pack + bh * per_head, *vp = kp + kp_size;
            const T *qq = q + b * q_strides[0] + h * q_strides[1] + l0 * q_strides[2];
            memset(qb, 0, tiled * q_row * sizeof(T));
            for (int64_t r = 0; r < rows; r++) memcpy(qb + r * q_row, qq + r * q_strides[2], d * sizeof(T));

            for (int64_t r0 = 0; r0 < tiled; r0 += MR) {
                // scores and their row maxima
                __m512 rowmax[MR];
                for (int r = 0; r < MR; r++) rowmax[r] = _mm512_set1_ps(-INFINITY);
                for (int64_t n0 = 0; n0 < n_pad; n0 += 16 * NV) {
                    __mmask16 valid[NV];
                    for (int c = 0; c < NV; c++) valid[c] = first_lanes(N - n0 - 16 * c);
                    score_tile(qb + r0 * q_row, q_row, kp, n_pad, dw, n0, s + r0 * n_pad, n_pad, valid, rowmax);
                }
                // e = exp(scale s - scale max) (rounded to bf16 for bf16), and 1 / Σ e (of the fp32 e)
                for (int r = 0; r < MR; r++) {
                    const float *sr = s + (r0 + r) * n_pad;
                    T *er = e + (r0 + r) * e_row;
                    const __m512 sc = _mm512_set1_ps(scale);
                    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(rowmax[r]) * scale);
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t n = 0; n < N; n += 16) {
                        const __mmask16 m = first_lanes(N - n);
                        const __m512 x = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(sr + n), sc, shift)));
                        sum = _mm512_add_ps(sum, x);
                        store16(er + n, m, x);
                    }
                    for (int64_t n = N; n < e_row; n++) er[n] = 0;  // the pad of the last word
                    inv_sum[r0 + r] = 1.0f / _mm512_reduce_add_ps(sum);
                }
                // o = e v, 48 channels at a time, then 32 or 16
                int64_t c0 = 0;
                for (; c0 + 48 <= d_pad; c0 += 48) value_tile<3>(e + r0 * e_row, e_row, vp, d_pad, nw, c0, o + r0 * d_pad, d_pad);
                if (d_pad - c0 == 32) value_tile<2>(e + r0 * e_row, e_row, vp, d_pad, nw, c0, o + r0 * d_pad, d_pad);
                if (d_pad - c0 == 16) value_tile<1>(e + r0 * e_row, e_row, vp, d_pad, nw, c0, o + r0 * d_pad, d_pad);
            }
            // out = o / Σ e (rounded to bf16 for bf16)
            for (int64_t r = 0; r < rows; r++) {
                T *orow = out + b * out_strides[0] + h * out_strides[1] + (l0 + r) * out_strides[2];
                const __m512 inv = _mm512_set1_ps(inv_sum[r]);
                for (int64_t c = 0; c < d; c += 16) store16(orow + c, first_lanes(d - c), _mm512_mul_ps(_mm512_loadu_ps(o + r * d_pad + c), inv));
            }
        }
    }
}

extern "C" {

// Elements of `pack` per sample and head, and bytes of `scratch` per thread, for these sizes and an
// element of `element_bytes` (2: bf16, 4: fp32).
int64_t sdlite_attention_pack_elements(int64_t N, int64_t d, int element_bytes) {
    return element_bytes == 2 ? Layout<bf16>(N, d).pack_elements() : Layout<float>(N, d).pack_elements();
}

int64_t sdlite_attention_scratch_bytes(int64_t N, int64_t d, int64_t MB, int element_bytes) {
    return element_bytes == 2 ? Layout<bf16>(N, d).scratch_bytes(MB) : Layout<float>(N, d).scratch_bytes(MB);
}

// q [B, H, L, d], k and v [B, H, N, d], out [B, H, L, d], all bf16 or all fp32: any strides (in
// elements) with the last dimension contiguous. MB (a multiple of MR): queries per task. `pack`:
// B·H·pack_elements elements; `scratch`: threads · scratch_bytes.
void sdlite_attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int threads, bf16 *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, threads, pack, scratch);
}

void sdlite_attention_fp32(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int threads, float *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, threads, pack, scratch);
}

}  // extern "C"
