// softmax(q kᵀ · scale) v for bf16 q, k, v on a CPU with AVX512-BF16: sdlite's CPU attention kernel.
//
// Built and loaded by sdlite/cpu_kernels.py (which says why it exists); plain C++ with Intel's
// intrinsics, no PyTorch headers. The arithmetic is that of PyTorch's own bf16 attention kernels:
//
//   s = q kᵀ                products of bf16 numbers summed in fp32 (exact products, fp32 sums)
//   e = exp(scale·(s - max_row s))   fp32, then rounded to bf16
//   o = (e v) / Σ_row e     e v summed in fp32, divided in fp32, rounded to bf16 once
//
// One task is one sample, one head and a block of MB queries: its scores (MB x N fp32) and
// probabilities stay in the core's L2 cache, never in memory, and both products run on
// `vdpbf16ps`, which multiplies pairs of bf16 numbers and adds them into fp32 sums. That
// instruction wants its two operands as pairs along the summed dimension, so the keys and values
// of each head are first re-laid out ("packed") once per call:
//
//   kp[j][n][t] = k[n][2j + t]    (pairs of head channels; n padded to a multiple of 48 keys)
//   vp[j][c][t] = v[2j + t][c]    (pairs of keys; c padded to a multiple of 16 channels)
//
// and the queries and probabilities are read as pairs in place (rows padded to even length).
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

// Two adjacent bf16 numbers, repeated in all 16 lanes (the row operand of vdpbf16ps).
static inline __m512bh pair_everywhere(const bf16 *p) {
    int32_t pair;
    memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
}

// Lanes [0, left) of a 16-lane vector, left clamped to [0, 16].
static inline __mmask16 first_lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

// s[r][n0 + i] = q[r] · k[n0 + i] for MR rows and 16·NV keys; lanes not in `valid` get -inf.
// Keeps each row's running maximum in rowmax[r] (a vector; reduced later).
static inline void score_tile(const bf16 *q, int64_t q_stride, const bf16 *kp, int64_t n_pad, int64_t d2,
                              int64_t n0, float *s, int64_t s_stride, const __mmask16 *valid, __m512 *rowmax) {
    __m512 acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < d2; j++) {
        __m512bh kv[NV];
        for (int c = 0; c < NV; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kp + (j * n_pad + n0 + 16 * c) * 2);
        for (int r = 0; r < MR; r++) {
            const __m512bh qv = pair_everywhere(q + r * q_stride + 2 * j);
            for (int c = 0; c < NV; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
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

// o[r][c0 + i] = Σ_n e[r][n] v[n][c0 + i] for MR rows and 16·W channels (n over pairs j < n2).
template <int W>
static inline void value_tile(const bf16 *e, int64_t e_stride, const bf16 *vp, int64_t d_pad, int64_t n2,
                              int64_t c0, float *o, int64_t o_stride) {
    __m512 acc[MR][W];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < W; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n2; j++) {
        __m512bh vv[W];
        for (int c = 0; c < W; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + (j * d_pad + c0 + 16 * c) * 2);
        for (int r = 0; r < MR; r++) {
            const __m512bh ev = pair_everywhere(e + r * e_stride + 2 * j);
            for (int c = 0; c < W; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ev, vv[c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < W; c++) _mm512_storeu_ps(o + r * o_stride + c0 + 16 * c, acc[r][c]);
}

extern "C" {

// Bytes of `pack` per sample and head, and of `scratch` per thread, for these sizes.
int64_t sdlite_attention_bf16_pack_elements(int64_t N, int64_t d) {
    const int64_t d2 = (d + 1) / 2, n_pad = (N + 47) / 48 * 48, n2 = (N + 1) / 2, d_pad = (d + 15) / 16 * 16;
    return d2 * n_pad * 2 + n2 * d_pad * 2;
}

int64_t sdlite_attention_bf16_scratch_bytes(int64_t N, int64_t d, int64_t MB) {
    const int64_t d2 = (d + 1) / 2, n_pad = (N + 47) / 48 * 48, n2 = (N + 1) / 2, d_pad = (d + 15) / 16 * 16;
    const int64_t bytes = MB * n_pad * 4 + MB * 2 * n2 * 2 + MB * d_pad * 4 + MB * 2 * d2 * 2 + MB * 4;
    return (bytes + 63) / 64 * 64;
}

// q [B, H, L, d], k and v [B, H, N, d], out [B, H, L, d]: bf16, any strides (in elements) with the
// last dimension contiguous. MB (a multiple of MR): queries per task. `pack`: B·H·pack_elements
// bf16; `scratch`: threads · scratch_bytes.
void sdlite_attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t B, int64_t H,
                           int64_t L, int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int threads, bf16 *pack, char *scratch) {
    const int64_t d2 = (d + 1) / 2, n_pad = (N + 47) / 48 * 48, n2 = (N + 1) / 2, d_pad = (d + 15) / 16 * 16;
    const int64_t kp_size = d2 * n_pad * 2, per_head = sdlite_attention_bf16_pack_elements(N, d);
    const int64_t blocks = (L + MB - 1) / MB, scratch_bytes = sdlite_attention_bf16_scratch_bytes(N, d, MB);
    const int64_t q_row = 2 * d2, e_row = 2 * n2;  // padded row lengths of the q and e blocks

#pragma omp parallel num_threads(threads)
    {
        // 1. Pack each head's keys and values (see the top of this file).
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            bf16 *kp = pack + bh * per_head, *vp = kp + kp_size;
            const bf16 *kk = k + b * k_strides[0] + h * k_strides[1];
            const bf16 *vv = v + b * v_strides[0] + h * v_strides[1];
            memset(kp, 0, per_head * sizeof(bf16));  // the pads
            for (int64_t j = 0; j < d2; j++) {  // kp row j: the pair (2j, 2j + 1) of every key's channels
                const int64_t pair = 2 * j + 1 < d ? 2 : 1;
                for (int64_t n = 0; n < N; n++) memcpy(kp + (j * n_pad + n) * 2, kk + n * k_strides[2] + 2 * j, pair * sizeof(bf16));
            }
            for (int64_t j = 0; j < n2; j++) {  // vp row j: keys 2j and 2j + 1, interleaved channel by channel
                const bf16 *even = vv + 2 * j * v_strides[2], *odd = even + v_strides[2];
                bf16 *row = vp + j * d_pad * 2;
                for (int64_t c = 0; c < d; c++) row[2 * c] = even[c];
                if (2 * j + 1 < N)
                    for (int64_t c = 0; c < d; c++) row[2 * c + 1] = odd[c];
            }
        }

        // 2. One block of MB queries of one head per task; its buffers are this thread's.
        char *mine = scratch + omp_get_thread_num() * scratch_bytes;
        float *s = (float *)mine;                 // [MB][n_pad] scores
        bf16 *e = (bf16 *)(s + MB * n_pad);       // [MB][e_row] exp(scale (s - max)), bf16
        float *o = (float *)(e + MB * e_row);     // [MB][d_pad] e v
        bf16 *qb = (bf16 *)(o + MB * d_pad);      // [MB][q_row] the block's queries
        float *inv_sum = (float *)(qb + MB * q_row);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H * blocks; task++) {
            const int64_t bh = task / blocks, l0 = (task % blocks) * MB, b = bh / H, h = bh % H;
            const int64_t rows = L - l0 < MB ? L - l0 : MB, tiled = (rows + MR - 1) / MR * MR;
            const bf16 *kp = pack + bh * per_head, *vp = kp + kp_size;
            const bf16 *qq = q + b * q_strides[0] + h * q_strides[1] + l0 * q_strides[2];
            memset(qb, 0, tiled * q_row * sizeof(bf16));
            for (int64_t r = 0; r < rows; r++) memcpy(qb + r * q_row, qq + r * q_strides[2], d * sizeof(bf16));

            for (int64_t r0 = 0; r0 < tiled; r0 += MR) {
                // scores and their row maxima
                __m512 rowmax[MR];
                for (int r = 0; r < MR; r++) rowmax[r] = _mm512_set1_ps(-INFINITY);
                for (int64_t n0 = 0; n0 < n_pad; n0 += 16 * NV) {
                    __mmask16 valid[NV];
                    for (int c = 0; c < NV; c++) valid[c] = first_lanes(N - n0 - 16 * c);
                    score_tile(qb + r0 * q_row, q_row, kp, n_pad, d2, n0, s + r0 * n_pad, n_pad, valid, rowmax);
                }
                // e = exp(scale s - scale max), rounded to bf16, and 1 / Σ e (of the fp32 e)
                for (int r = 0; r < MR; r++) {
                    const float *sr = s + (r0 + r) * n_pad;
                    bf16 *er = e + (r0 + r) * e_row;
                    const __m512 sc = _mm512_set1_ps(scale);
                    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(rowmax[r]) * scale);
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t n = 0; n < N; n += 16) {
                        const __mmask16 m = first_lanes(N - n);
                        const __m512 x = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(sr + n), sc, shift)));
                        sum = _mm512_add_ps(sum, x);
                        _mm256_mask_storeu_epi16(er + n, m, (__m256i)_mm512_cvtneps_pbh(x));
                    }
                    if (N % 2) er[N] = 0;  // the pad of the last pair
                    inv_sum[r0 + r] = 1.0f / _mm512_reduce_add_ps(sum);
                }
                // o = e v, 48 channels at a time, then 32 or 16
                int64_t c0 = 0;
                for (; c0 + 48 <= d_pad; c0 += 48) value_tile<3>(e + r0 * e_row, e_row, vp, d_pad, n2, c0, o + r0 * d_pad, d_pad);
                if (d_pad - c0 == 32) value_tile<2>(e + r0 * e_row, e_row, vp, d_pad, n2, c0, o + r0 * d_pad, d_pad);
                if (d_pad - c0 == 16) value_tile<1>(e + r0 * e_row, e_row, vp, d_pad, n2, c0, o + r0 * d_pad, d_pad);
            }
            // out = o / Σ e, rounded to bf16
            for (int64_t r = 0; r < rows; r++) {
                bf16 *orow = out + b * out_strides[0] + h * out_strides[1] + (l0 + r) * out_strides[2];
                const __m512 inv = _mm512_set1_ps(inv_sum[r]);
                for (int64_t c = 0; c < d; c += 16) {
                    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o + r * d_pad + c), inv);
                    _mm256_mask_storeu_epi16(orow + c, first_lanes(d - c), (__m256i)_mm512_cvtneps_pbh(x));
                }
            }
        }
    }
}

}  // extern "C"
