// softmax(q kᵀ · scale) v on an x86 CPU: sdlite's CPU attention kernel. In fp32 with AVX-512 or
// with AVX2 and FMA, and in bf16 with AVX512-BF16.
//
// Built and loaded by sdlite/cpu_kernels.py (which says why it exists), once per instruction set:
// compiled with AVX-512 flags this file is the 512-bit kernel (fp32, and bf16 where the compiler
// targets AVX512-BF16), otherwise the 256-bit AVX2 one (fp32). Plain C++ with Intel's intrinsics,
// no PyTorch headers. The arithmetic is that of PyTorch's own attention kernels:
//
//   s = q kᵀ                          summed in fp32 (for bf16: exact products of bf16 numbers)
//   e = exp(scale·(s - max_row s))    fp32 (as a power of 2); for bf16 then rounded to bf16
//   o = (e v) / Σ_row e               e v summed in fp32, divided in fp32, rounded to bf16 once
//
// One task is one sample, one head and a block of MB queries: its scores (MB x N fp32) and
// probabilities stay in the core's L2 cache, never in memory. Both products are the same loop for
// both types: broadcast 32 bits of one row (one fp32 number, or a pair of bf16 numbers), load a
// vector of the other operand (LANES fp32 numbers, or LANES pairs), multiply-add into LANES fp32
// sums (FMA, or `vdpbf16ps`, which adds both products of each pair). So the keys and values of each
// head are first re-laid out ("packed") once per call, in words of W elements (W = 1 for fp32, 2
// for bf16) along the summed dimension:
//
//   kp[j][n][t] = k[n][W j + t]    (words of head channels; n padded to a multiple of KEY_TILE keys)
//   vp[j][c][t] = v[W j + t][c]    (words of keys; c padded to a multiple of LANES channels)
//
// and the queries (copied into a zero-padded block) and probabilities are read a word at a time.
// Padding is zeros; padded keys get the score -inf, so exp gives them 0.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;  // the bit pattern of a bfloat16

// ---- The vectors: the few operations the kernel needs, on 512-bit or 256-bit registers ----------
//
// A register tile of sums is MR query rows x NV vectors. It must fit the register file with the NV
// vectors loaded and the one word broadcast: 8 x 3 + 3 + 1 = 28 of AVX-512's 32 registers, 6 x 2 +
// 2 + 1 = 15 of AVX2's 16. The products with v use up to VMAX vectors of channels per tile.
#if defined(__AVX512F__)
typedef __m512 vec;      // LANES fp32 numbers
typedef __m512i words;   // LANES 32-bit words
typedef __mmask16 lanes; // a set of lanes
enum { LANES = 16, MR = 8, NV = 3, VMAX = 3 };

static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec x) { _mm512_storeu_ps(p, x); }
static inline words wload(const void *p) { return _mm512_loadu_si512(p); }
static inline words wset(int32_t w) { return _mm512_set1_epi32(w); }
static inline vec as_floats(words w) { return _mm512_castsi512_ps(w); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }  // b where either is NaN
static inline vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
static inline vec round_to_int(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec times_2_to(vec p, vec n) { return _mm512_scalef_ps(p, n); }  // p 2^n, n an integer
static inline float reduce_max(vec x) { return _mm512_reduce_max_ps(x); }
static inline float reduce_add(vec x) { return _mm512_reduce_add_ps(x); }
// Lanes [0, left), left clamped to [0, LANES].
static inline lanes first_lanes(int64_t left) {
    return left >= 16 ? (lanes)0xFFFF : left <= 0 ? (lanes)0 : (lanes)((1u << left) - 1);
}
static inline vec where(lanes m, vec yes, vec no) { return _mm512_mask_blend_ps(m, no, yes); }
static inline void store_lanes(float *p, lanes m, vec x) { _mm512_mask_storeu_ps(p, m, x); }
#if defined(__AVX512BF16__)
#define SDLITE_BF16 1
// acc + a · b for LANES pairs of bf16 numbers: both products of each pair, summed in fp32.
static inline vec madd(vec acc, words a, words b, const bf16 *) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
// Stores lanes m of x at p rounded to bf16 (to nearest, ties to even).
static inline void store_lanes(bf16 *p, lanes m, vec x) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x)); }
#endif

#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
typedef __m256i words;
typedef __m256i lanes;  // all ones in the lanes of the set, zeros elsewhere
enum { LANES = 8, MR = 6, NV = 2, VMAX = 2 };

static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec x) { _mm256_storeu_ps(p, x); }
static inline words wload(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline words wset(int32_t w) { return _mm256_set1_epi32(w); }
static inline vec as_floats(words w) { return _mm256_castsi256_ps(w); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }  // b where either is NaN
static inline vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec round_to_int(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^n for integers n in [-126, 0] (all pow2_nonpositive asks): 2^n built from its exponent bits.
// A NaN n gives some power of two, and p is NaN then too.
static inline vec times_2_to(vec p, vec n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
static inline float reduce_max(vec x) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline float reduce_add(vec x) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline lanes first_lanes(int64_t left) {
    const int32_t n = left >= 8 ? 8 : left <= 0 ? 0 : (int32_t)left;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec where(lanes m, vec yes, vec no) { return _mm256_blendv_ps(no, yes, _mm256_castsi256_ps(m)); }
static inline void store_lanes(float *p, lanes m, vec x) { _mm256_maskstore_ps(p, m, x); }

#else
#error "sdlite's attention kernel is built with -mavx512f ... or -mavx2 -mfma (see sdlite/cpu_kernels.py)"
#endif

enum { KEY_TILE = LANES * NV };  // keys per register tile of scores

// acc + a · b lane by lane, one product per lane (fp32).
static inline vec madd(vec acc, words a, words b, const float *) { return fmadd(as_floats(a), as_floats(b), acc); }

// ---- The kernel ---------------------------------------------------------------------------------

// 2^t for t <= 0: t = n + f with n an integer and |f| <= 1/2, 2^t = 2^n p(f), where p is the
// polynomial with p(0) = 1 closest to 2^f in relative error on [-1/2, 1/2] (fitted as a linear
// program on 4001 points; tests/test_cpu_kernels.py checks the bounds): degree 5 for fp32, relative
// error 2.3e-7 in fp32 arithmetic; degree 4 for bf16, 2.9e-6, 1/700 of the rounding to bf16 that
// follows. Below -125.5, 2^t < 2^-125 counts as 0 against the row's largest term, which is 1 (and
// the result is never subnormal). A NaN stays NaN (max returns its second operand then).
static const float POW2_FP32[] = {0x1.5a1bb6p-10f, 0x1.3d0762p-7f, 0x1.c6bde6p-5f, 0x1.ebf956p-3f, 0x1.62e41cp-1f, 1.0f};
static const float POW2_BF16[] = {0x1.3a007ap-7f, 0x1.c9fd1ep-5f, 0x1.ec0382p-3f, 0x1.62e12ap-1f, 1.0f};  // highest degree first

template <int K>
static inline vec power_of_2(vec t, const float (&coefficients)[K]) {
    t = vmax(vset(-125.5f), t);
    const vec n = round_to_int(t), f = vsub(t, n);  // exact
    vec p = vset(coefficients[0]);
    for (int i = 1; i < K; i++) p = fmadd(p, f, vset(coefficients[i]));
    return times_2_to(p, n);
}

// power_of_2 with the polynomial of the probabilities' type (that of the pointer: where they go).
static inline vec pow2_nonpositive(vec t, const float *) { return power_of_2(t, POW2_FP32); }
static inline vec pow2_nonpositive(vec t, const bf16 *) { return power_of_2(t, POW2_BF16); }

// The 32 bits at p (two bf16 numbers, or one float), repeated in all lanes.
template <typename T>
static inline words word_everywhere(const T *p) {
    int32_t w;
    memcpy(&w, p, 4);
    return wset(w);
}

// s[r][n0 + i] = q[r] · k[n0 + i] for MR rows and KEY_TILE keys; lanes not in `valid` get -inf.
// Keeps each row's running maximum in rowmax[r] (a vector; reduced later).
template <typename T>
static inline void score_tile(const T *q, int64_t q_stride, const T *kp, int64_t n_pad, int64_t dw,
                              int64_t n0, float *s, int64_t s_stride, const lanes *valid, vec *rowmax) {
    constexpr int W = 4 / sizeof(T);
    vec acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = vset(0.0f);
    for (int64_t j = 0; j < dw; j++) {
        words kv[NV];
        for (int c = 0; c < NV; c++) kv[c] = wload(kp + (j * n_pad + n0 + LANES * c) * W);
        for (int r = 0; r < MR; r++) {
            const words qv = word_everywhere(q + r * q_stride + W * j);
            for (int c = 0; c < NV; c++) acc[r][c] = madd(acc[r][c], qv, kv[c], q);
        }
    }
    const vec minus_inf = vset(-INFINITY);
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) {
            const vec v = where(valid[c], acc[r][c], minus_inf);
            vstore(s + r * s_stride + n0 + LANES * c, v);
            rowmax[r] = vmax(rowmax[r], v);
        }
}

// o[r][c0 + i] = Σ_n e[r][n] v[n][c0 + i] for MR rows and LANES·V channels (n over the words j < nw).
template <int V, typename T>
static inline void value_tile(const T *e, int64_t e_stride, const T *vp, int64_t d_pad, int64_t nw,
                              int64_t c0, float *o, int64_t o_stride) {
    constexpr int W = 4 / sizeof(T);
    vec acc[MR][V];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) acc[r][c] = vset(0.0f);
    for (int64_t j = 0; j < nw; j++) {
        words vv[V];
        for (int c = 0; c < V; c++) vv[c] = wload(vp + (j * d_pad + c0 + LANES * c) * W);
        for (int r = 0; r < MR; r++) {
            const words ev = word_everywhere(e + r * e_stride + W * j);
            for (int c = 0; c < V; c++) acc[r][c] = madd(acc[r][c], ev, vv[c], e);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) vstore(o + r * o_stride + c0 + LANES * c, acc[r][c]);
}

// kp[j][n] = word j of key n (channels W j .. W j + W - 1), for n < n_pad (keys past N are zeros):
// a transpose of the keys' words, 16 keys at a time, so that each row of kp is written a cache line
// at a time from keys that stay in L1 (rows of kp are n_pad words apart: writing a key's words one
// after the other would touch as many lines, which at 1024 keys all fall in one set of the cache).
// The odd channel of an odd d gets a zero partner.
template <typename T>
static void pack_keys(const T *k, int64_t key_stride, int64_t N, int64_t d, int64_t n_pad, T *kp) {
    constexpr int W = 4 / sizeof(T);
    const int64_t whole = d / W, dw = (d + W - 1) / W;  // words of W channels; words with the odd one
    uint32_t *out = (uint32_t *)kp;
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
        for (int64_t j = 0; j < whole; j++)
            for (int64_t n = n0; n < n1; n++) memcpy(out + j * n_pad + n, k + n * key_stride + W * j, 4);
        if (whole < dw)  // bf16 with d odd: channel d - 1, then a zero
            for (int64_t n = n0; n < n1; n++) {
                const T last[2] = {k[n * key_stride + d - 1], 0};
                memcpy(out + whole * n_pad + n, last, 4);
            }
    }
    for (int64_t j = 0; j < dw; j++) memset(out + j * n_pad + N, 0, (n_pad - N) * 4);
}

// vp[j][c][t] = v[W j + t][c] for c < d_pad (channels past d and keys past N are zeros): for bf16,
// two keys' channels interleaved into words; for fp32 a copy of each key, padded.
static void pack_values(const float *v, int64_t key_stride, int64_t N, int64_t d, int64_t d_pad, float *vp) {
    for (int64_t n = 0; n < N; n++) {
        memcpy(vp + n * d_pad, v + n * key_stride, d * sizeof(float));
        memset(vp + n * d_pad + d, 0, (d_pad - d) * sizeof(float));
    }
}

#if defined(SDLITE_BF16)
static void pack_values(const bf16 *v, int64_t key_stride, int64_t N, int64_t d, int64_t d_pad, bf16 *vp) {
    const __m256i zeros = _mm256_setzero_si256();
    for (int64_t j = 0; j < (N + 1) / 2; j++) {
        const bf16 *first = v + 2 * j * key_stride, *second = first + key_stride;
        const bool pair = 2 * j + 1 < N;
        for (int64_t c = 0; c < d_pad; c += LANES) {  // LANES channels of both keys -> LANES words
            const lanes m = first_lanes(d - c);
            const __m256i a = _mm256_maskz_loadu_epi16(m, first + c);
            const __m256i e = pair ? _mm256_maskz_loadu_epi16(m, second + c) : zeros;
            const __m512i w = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(e), 16));
            _mm512_storeu_si512(vp + 2 * (j * d_pad + c), w);
        }
    }
}
#endif

#if defined(__AVX512F__)
// value_tile for the last channels of a head whose last vector of channels is at most half used
// (d mod LANES in 1 .. LANES/2: SD1's 40-wide heads at the UNet's largest maps, which a full vector
// would compute 48 wide): V whole vectors of channels per row, then the next LANES/2 channels of two
// rows at once, row r in the lower half of a vector and row r + 1 in the upper. The same sums in the
// same order as value_tile's.
template <int V, typename T>
static inline void value_tile_halves(const T *e, int64_t e_stride, const T *vp, int64_t d_pad, int64_t nw,
                                     int64_t c0, float *o, int64_t o_stride) {
    constexpr int W = 4 / sizeof(T), HALF = LANES / 2;
    vec acc[MR][V > 0 ? V : 1], pair[MR / 2];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) acc[r][c] = vset(0.0f);
    for (int r = 0; r < MR / 2; r++) pair[r] = vset(0.0f);
    for (int64_t j = 0; j < nw; j++) {
        words vv[V > 0 ? V : 1];
        for (int c = 0; c < V; c++) vv[c] = wload(vp + (j * d_pad + c0 + LANES * c) * W);
        // the next HALF channels' words, in both halves of a vector
        const words vh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(vp + (j * d_pad + c0 + LANES * V) * W)));
        for (int r = 0; r < MR; r += 2) {
            const words e0 = word_everywhere(e + r * e_stride + W * j), e1 = word_everywhere(e + (r + 1) * e_stride + W * j);
            for (int c = 0; c < V; c++) {
                acc[r][c] = madd(acc[r][c], e0, vv[c], e);
                acc[r + 1][c] = madd(acc[r + 1][c], e1, vv[c], e);
            }
            pair[r / 2] = madd(pair[r / 2], _mm512_mask_blend_epi32(0xFF00, e0, e1), vh, e);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) vstore(o + r * o_stride + c0 + LANES * c, acc[r][c]);
    for (int r = 0; r < MR; r += 2) {  // lanes HALF.. go to row r + 1's channels from c0 + LANES V on
        _mm512_mask_storeu_ps(o + r * o_stride + c0 + LANES * V, 0x00FF, pair[r / 2]);
        _mm512_mask_storeu_ps(o + (r + 1) * o_stride + c0 + LANES * V - HALF, 0xFF00, pair[r / 2]);
    }
}
#endif

// Queries per task, rounded up to whole register tiles.
static inline int64_t block_rows(int64_t MB) { return (MB + MR - 1) / MR * MR; }

// The sizes of the packed and padded layouts for one element type T (W = 2 bf16, 1 float per word).
template <typename T>
struct Layout {
    static constexpr int W = 4 / sizeof(T);
    int64_t dw, n_pad, nw, d_pad;  // words per q/k row; keys padded to KEY_TILE; words per e row; channels padded to LANES
    Layout(int64_t N, int64_t d)
        : dw((d + W - 1) / W), n_pad((N + KEY_TILE - 1) / KEY_TILE * KEY_TILE), nw((N + W - 1) / W),
          d_pad((d + LANES - 1) / LANES * LANES) {}
    int64_t kp_elements() const { return dw * n_pad * W; }
    int64_t pack_elements() const { return kp_elements() + nw * d_pad * W; }
    int64_t scratch_bytes(int64_t MB) const {
        MB = block_rows(MB);
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
    MB = block_rows(MB);
    const int64_t blocks = (L + MB - 1) / MB, scratch_bytes = lay.scratch_bytes(MB);
    const int64_t q_row = W * dw, e_row = W * nw;  // padded row lengths of the q and e blocks

#pragma omp parallel num_threads(threads)
    {
        // 1. Pack each head's keys and values (see the top of this file), writing every element of
        //    the packed layout once, pads included, in vector-friendly loops: this pass is as long
        //    as the arithmetic at a few dozen queries (the UNet's 8x8 maps).
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            T *kp = pack + bh * per_head, *vp = kp + kp_size;
            pack_keys(k + b * k_strides[0] + h * k_strides[1], k_strides[2], N, d, n_pad, kp);
            pack_values(v + b * v_strides[0] + h * v_strides[1], v_strides[2], N, d, d_pad, vp);
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
                vec rowmax[MR];
                for (int r = 0; r < MR; r++) rowmax[r] = vset(-INFINITY);
                for (int64_t n0 = 0; n0 < n_pad; n0 += KEY_TILE) {
                    lanes valid[NV];
                    for (int c = 0; c < NV; c++) valid[c] = first_lanes(N - n0 - LANES * c);
                    score_tile(qb + r0 * q_row, q_row, kp, n_pad, dw, n0, s + r0 * n_pad, n_pad, valid, rowmax);
                }
                // e = exp(scale s - scale max) (rounded to bf16 for bf16), and 1 / Σ e (of the fp32 e)
                for (int r = 0; r < MR; r++) {
                    const float *sr = s + (r0 + r) * n_pad;
                    T *er = e + (r0 + r) * e_row;
                    // e = 2^((s - max) scale log2(e)): exactly 1 at the maximum
                    const vec sc = vset(scale * 1.44269504088896341f), max = vset(reduce_max(rowmax[r])), zero = vset(0.0f);
                    vec sum = zero;
                    for (int64_t n = 0; n < N; n += LANES) {
                        const lanes m = first_lanes(N - n);
                        const vec x = where(m, pow2_nonpositive(vmul(vsub(vload(sr + n), max), sc), er), zero);
                        sum = vadd(sum, x);
                        store_lanes(er + n, m, x);
                    }
                    for (int64_t n = N; n < e_row; n++) er[n] = 0;  // the pad of the last word
                    inv_sum[r0 + r] = 1.0f / reduce_add(sum);
                }
                // o = e v, LANES·VMAX channels at a time, then the rest
                const T *et = e + r0 * e_row;
                float *ot = o + r0 * d_pad;
                int64_t c0 = 0;
#if defined(__AVX512F__)
                if (d % LANES != 0 && d % LANES <= LANES / 2) {  // the last vector at most half used
                    int64_t whole = d_pad / LANES - 1;  // vectors before it; the last tile takes up to VMAX - 1 of them
                    for (; whole > VMAX - 1; whole -= VMAX, c0 += LANES * VMAX) value_tile<VMAX>(et, e_row, vp, d_pad, nw, c0, ot, d_pad);
                    switch (whole) {
                        case 2: value_tile_halves<2>(et, e_row, vp, d_pad, nw, c0, ot, d_pad); break;
                        case 1: value_tile_halves<1>(et, e_row, vp, d_pad, nw, c0, ot, d_pad); break;
                        default: value_tile_halves<0>(et, e_row, vp, d_pad, nw, c0, ot, d_pad);
                    }
                } else
#endif
                {
                    for (; c0 + LANES * VMAX <= d_pad; c0 += LANES * VMAX) value_tile<VMAX>(et, e_row, vp, d_pad, nw, c0, ot, d_pad);
                    switch ((d_pad - c0) / LANES) {
                        case 2: value_tile<2>(et, e_row, vp, d_pad, nw, c0, ot, d_pad); break;
                        case 1: value_tile<1>(et, e_row, vp, d_pad, nw, c0, ot, d_pad); break;
                    }
                }
            }
            // out = o / Σ e (rounded to bf16 for bf16)
            for (int64_t r = 0; r < rows; r++) {
                T *orow = out + b * out_strides[0] + h * out_strides[1] + (l0 + r) * out_strides[2];
                const vec inv = vset(inv_sum[r]);
                for (int64_t c = 0; c < d; c += LANES) store_lanes(orow + c, first_lanes(d - c), vmul(vload(o + r * d_pad + c), inv));
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

// q [B, H, L, d], k and v [B, H, N, d], out [B, H, L, d], all fp32 or all bf16: any strides (in
// elements) with the last dimension contiguous. MB: queries per task (rounded up to a multiple of
// MR). `pack`: B·H·pack_elements elements; `scratch`: threads · scratch_bytes.
void sdlite_attention_fp32(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int threads, float *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, threads, pack, scratch);
}

#if defined(SDLITE_BF16)
void sdlite_attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int threads, bf16 *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, threads, pack, scratch);
}
#endif

}  // extern "C"
