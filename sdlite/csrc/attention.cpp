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
// One task is one sample, one head and a block of MB queries, against the keys a block of NB at a
// time (all N in one block where NB is 0): the block's scores (MB x NB fp32) and probabilities stay
// in the core's L2 cache, never in memory (see attention() for the blocks). Both products are the same loop for
// both types: broadcast 32 bits of one row (one fp32 number, or a pair of bf16 numbers), load a
// vector of the other operand (LANES fp32 numbers, or LANES pairs), multiply-add into LANES fp32
// sums (FMA, or `vdpbf16ps`, which adds both products of each pair). So the keys and values of each
// head are first re-laid out ("packed") once per call, in words of W elements (W = 1 for fp32, 2
// for bf16) along the summed dimension:
//
//   kp[p][j][i][t] = k[KEY_TILE p + i][W j + t]    (panels of KEY_TILE keys, each its words of head
//                                                   channels; keys padded to a whole panel)
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

// All LANES numbers of x at p (for bf16 rounded to it).
static inline void store_all(float *p, vec x) { vstore(p, x); }
#if defined(SDLITE_BF16)
static inline void store_all(bf16 *p, vec x) { store_lanes(p, first_lanes(LANES), x); }
#endif

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

// s[r][i] = q[r] · k[i] for MR rows and the KEY_TILE keys of one panel of kp (contiguous: the loop
// reads it front to back); lanes not in `valid` get -inf.
template <typename T>
static inline void score_tile(const T *q, int64_t q_stride, const T *panel, int64_t dw,
                              float *s, int64_t s_stride, const lanes *valid) {
    constexpr int W = 4 / sizeof(T);
    vec acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = vset(0.0f);
    for (int64_t j = 0; j < dw; j++) {
        words kv[NV];
        for (int c = 0; c < NV; c++) kv[c] = wload(panel + (j * KEY_TILE + LANES * c) * W);
        for (int r = 0; r < MR; r++) {
            const words qv = word_everywhere(q + r * q_stride + W * j);
            for (int c = 0; c < NV; c++) acc[r][c] = madd(acc[r][c], qv, kv[c], q);
        }
    }
    const vec minus_inf = vset(-INFINITY);
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NV; c++) vstore(s + r * s_stride + LANES * c, where(valid[c], acc[r][c], minus_inf));
}

// o[r][c0 + i] += Σ_n e[r][n] v[n][c0 + i] for MR rows and LANES·V channels (n over the words j < nw).
template <int V, typename T>
static inline void value_tile(const T *e, int64_t e_stride, const T *vp, int64_t d_pad, int64_t nw,
                              int64_t c0, float *o, int64_t o_stride) {
    constexpr int W = 4 / sizeof(T);
    vec acc[MR][V];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < V; c++) acc[r][c] = vload(o + r * o_stride + c0 + LANES * c);
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

// kp[p][j][i] = word j of key KEY_TILE p + i (channels W j .. W j + W - 1); keys past N are zeros.
// A transpose of the keys' words, 16 keys at a time (KEY_TILE is 16 or 48), so that each row of a
// panel is written a cache line at a time from keys that stay in L1. Panels, rather than rows of
// all N keys: a register tile of scores then reads its keys from consecutive memory instead of one
// cache line per page (rows of 1024 fp32 keys are 4 KB apart), which the hardware prefetcher follows
// (0.87-0.92x the time per call on a Zen 3's UNet heads, the same numbers). The odd channel of an
// odd d gets a zero partner.
template <typename T>
static void pack_keys(const T *k, int64_t key_stride, int64_t N, int64_t d, T *kp) {
    constexpr int W = 4 / sizeof(T);
    const int64_t whole = d / W, dw = (d + W - 1) / W;  // words of W channels; words with the odd one
    uint32_t *out = (uint32_t *)kp;
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int64_t n1 = n0 + 16 < N ? n0 + 16 : N;
        uint32_t *first = out + (n0 / KEY_TILE) * dw * KEY_TILE + n0 % KEY_TILE;  // word 0 of key n0
        for (int64_t j = 0; j < whole; j++)
            for (int64_t n = n0; n < n1; n++) memcpy(first + j * KEY_TILE + (n - n0), k + n * key_stride + W * j, 4);
        if (whole < dw)  // bf16 with d odd: channel d - 1, then a zero
            for (int64_t n = n0; n < n1; n++) {
                const T last[2] = {k[n * key_stride + d - 1], 0};
                memcpy(first + whole * KEY_TILE + (n - n0), last, 4);
            }
    }
    const int64_t used = N % KEY_TILE;  // keys in the last panel, if it is not full
    if (used)
        for (int64_t j = 0; j < dw; j++)
            memset(out + ((N / KEY_TILE) * dw + j) * KEY_TILE + used, 0, (KEY_TILE - used) * 4);
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
        for (int c = 0; c < V; c++) acc[r][c] = vload(o + r * o_stride + c0 + LANES * c);
    for (int r = 0; r < MR; r += 2)  // row r's next HALF channels in the lower half, row r + 1's in the upper
        pair[r / 2] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(o + r * o_stride + c0 + LANES * V)),
                                         _mm256_loadu_ps(o + (r + 1) * o_stride + c0 + LANES * V), 1);
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

// The sizes of the packed and padded layouts for one element type T (W = 2 bf16, 1 float per word),
// N keys of d channels, in blocks of up to NB keys.
template <typename T>
struct Layout {
    static constexpr int W = 4 / sizeof(T);
    // words per q/k row; keys padded to KEY_TILE; channels padded to LANES; keys per block (a whole
    // number of register tiles, so an even number: whole words of bf16 pairs); words of keys in all
    int64_t dw, n_pad, d_pad, kb, nw;
    Layout(int64_t N, int64_t d, int64_t NB)
        : dw((d + W - 1) / W), n_pad((N + KEY_TILE - 1) / KEY_TILE * KEY_TILE), d_pad((d + LANES - 1) / LANES * LANES),
          kb(NB > 0 && NB < N ? (NB + KEY_TILE - 1) / KEY_TILE * KEY_TILE : n_pad), nw((N + W - 1) / W) {}
    int64_t kp_elements() const { return dw * n_pad * W; }
    int64_t pack_elements() const { return kp_elements() + nw * d_pad * W; }
    int64_t scratch_bytes(int64_t MB) const {
        MB = block_rows(MB);
        const int64_t bytes = MB * kb * 4 + MB * kb * sizeof(T) + MB * d_pad * 4 + MB * dw * 4 + 2 * MB * 4;
        return (bytes + 63) / 64 * 64;
    }
};

// One task: MB queries of one head against all its N keys, a block of kb keys at a time ("online
// softmax", as in flash attention): each block's scores s and probabilities e stay in the core's L1
// and L2 caches with the block's packed keys and values, which all MB queries reuse. Per row, m is
// the largest score so far and l the sum of the e so far; when a block raises m, the earlier sums
// l and o = Σ e v are scaled by 2^((m_old - m_new) scale log2 e) before the block adds its own.
// With one block (kb >= N) this is the plain softmax: nothing is rescaled.
template <typename T>
static void attention(const T *q, const T *k, const T *v, T *out, int64_t B, int64_t H, int64_t L, int64_t N, int64_t d,
                      const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                      const int64_t *out_strides, float scale, int64_t MB, int64_t NB, int threads, T *pack,
                      char *scratch) {
    const Layout<T> lay(N, d, NB);
    constexpr int W = Layout<T>::W;
    const int64_t d_pad = lay.d_pad, dw = lay.dw, kb = lay.kb;
    const int64_t kp_size = lay.kp_elements(), per_head = lay.pack_elements();
    MB = block_rows(MB);
    const int64_t blocks = (L + MB - 1) / MB, scratch_bytes = lay.scratch_bytes(MB);
    const int64_t q_row = W * dw;  // padded row length of the q block
    const float scale_log2e = scale * 1.44269504088896341f;  // e = 2^((s - max) scale log2(e))
    const vec sc = vset(scale_log2e);

#pragma omp parallel num_threads(threads)
    {
        // 1. Pack each head's keys and values (see the top of this file), writing every element of
        //    the packed layout once, pads included, in vector-friendly loops: this pass is as long
        //    as the arithmetic at a few dozen queries (the UNet's 8x8 maps).
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            T *kp = pack + bh * per_head, *vp = kp + kp_size;
            pack_keys(k + b * k_strides[0] + h * k_strides[1], k_strides[2], N, d, kp);
            pack_values(v + b * v_strides[0] + h * v_strides[1], v_strides[2], N, d, d_pad, vp);
        }

        // 2. One block of MB queries of one head per task; its buffers are this thread's.
        char *mine = scratch + omp_get_thread_num() * scratch_bytes;
        float *s = (float *)mine;                 // [MB][kb] scores of a block of keys
        T *e = (T *)(s + MB * kb);                // [MB][kb] exp(scale (s - m)), in T
        float *o = (float *)(e + MB * kb);        // [MB][d_pad] Σ e v
        T *qb = (T *)(o + MB * d_pad);            // [MB][q_row] the block's queries
        float *m = (float *)(qb + MB * q_row);    // [MB] largest score so far
        float *l = m + MB;                        // [MB] Σ e so far
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H * blocks; task++) {
            const int64_t bh = task / blocks, l0 = (task % blocks) * MB, b = bh / H, h = bh % H;
            const int64_t rows = L - l0 < MB ? L - l0 : MB, tiled = (rows + MR - 1) / MR * MR;
            const T *kp = pack + bh * per_head, *vp = kp + kp_size;
            const T *qq = q + b * q_strides[0] + h * q_strides[1] + l0 * q_strides[2];
            memset(qb, 0, tiled * q_row * sizeof(T));
            for (int64_t r = 0; r < rows; r++) memcpy(qb + r * q_row, qq + r * q_strides[2], d * sizeof(T));
            memset(o, 0, tiled * d_pad * sizeof(float));
            for (int64_t r = 0; r < tiled; r++) m[r] = -INFINITY, l[r] = 0.0f;

            for (int64_t nb0 = 0; nb0 < N; nb0 += kb) {
                const int64_t keys = N - nb0 < kb ? N - nb0 : kb;     // in this block
                const int64_t keys_pad = (keys + KEY_TILE - 1) / KEY_TILE * KEY_TILE, nw = (keys + W - 1) / W;
                const T *vb = vp + (nb0 / W) * d_pad * W;           // the block's packed values
                for (int64_t r0 = 0; r0 < tiled; r0 += MR) {
                    // scores (the register tile's sums go straight to memory: a running maximum
                    // there would not leave AVX2 enough registers)
                    for (int64_t n0 = nb0; n0 < nb0 + keys_pad; n0 += KEY_TILE) {
                        lanes valid[NV];
                        for (int c = 0; c < NV; c++) valid[c] = first_lanes(N - n0 - LANES * c);
                        score_tile(qb + r0 * q_row, q_row, kp + (n0 / KEY_TILE) * dw * KEY_TILE * W, dw,
                                   s + r0 * kb + (n0 - nb0), kb, valid);
                    }
                    // e = exp(scale s - scale m) (rounded to bf16 for bf16), l += Σ e (of the fp32 e)
                    for (int r = 0; r < MR; r++) {
                        const float *sr = s + (r0 + r) * kb;
                        T *er = e + (r0 + r) * kb;
                        vec rowmax = vset(-INFINITY);  // over the block's scores, -inf pads included (from L1)
                        for (int64_t n = 0; n < keys_pad; n += LANES) rowmax = vmax(rowmax, vload(sr + n));
                        const float block_max = reduce_max(rowmax), old = m[r0 + r];
                        const float now = old == -INFINITY || block_max > old ? block_max : old;
                        if (old != -INFINITY && now != old) {  // a larger score: rescale what is summed so far
                            const float f = exp2f((old - now) * scale_log2e);
                            l[r0 + r] *= f;
                            float *orow = o + (r0 + r) * d_pad;
                            for (int64_t c = 0; c < d_pad; c += LANES) vstore(orow + c, vmul(vload(orow + c), vset(f)));
                        }
                        m[r0 + r] = now;
                        const vec max = vset(now), zero = vset(0.0f);
                        const auto exp_at = [&](int64_t n) { return pow2_nonpositive(vmul(vsub(vload(sr + n), max), sc), er); };
                        vec sum = zero;
                        int64_t n = 0;
                        // whole vectors, then the tail (AVX2's masked store is microcoded on AMD's cores)
                        for (; n + LANES <= keys; n += LANES) {
                            const vec x = exp_at(n);
                            sum = vadd(sum, x);
                            store_all(er + n, x);
                        }
                        if (n < keys) {
                            const lanes valid = first_lanes(keys - n);
                            const vec x = where(valid, exp_at(n), zero);
                            sum = vadd(sum, x);
                            store_lanes(er + n, valid, x);
                        }
                        for (int64_t n = keys; n < W * nw; n++) er[n] = 0;  // the pad of the last word
                        l[r0 + r] += reduce_add(sum);
                    }
                    // o += e v, LANES·VMAX channels at a time, then the rest
                    const T *et = e + r0 * kb;
                    float *ot = o + r0 * d_pad;
                    int64_t c0 = 0;
#if defined(__AVX512F__)
                    if (d % LANES != 0 && d % LANES <= LANES / 2) {  // the last vector at most half used
                        int64_t whole = d_pad / LANES - 1;  // vectors before it; the last tile takes up to VMAX - 1 of them
                        for (; whole > VMAX - 1; whole -= VMAX, c0 += LANES * VMAX) value_tile<VMAX>(et, kb, vb, d_pad, nw, c0, ot, d_pad);
                        switch (whole) {
                            case 2: value_tile_halves<2>(et, kb, vb, d_pad, nw, c0, ot, d_pad); break;
                            case 1: value_tile_halves<1>(et, kb, vb, d_pad, nw, c0, ot, d_pad); break;
                            default: value_tile_halves<0>(et, kb, vb, d_pad, nw, c0, ot, d_pad);
                        }
                    } else
#endif
                    {
                        for (; c0 + LANES * VMAX <= d_pad; c0 += LANES * VMAX) value_tile<VMAX>(et, kb, vb, d_pad, nw, c0, ot, d_pad);
                        switch ((d_pad - c0) / LANES) {
                            case 2: value_tile<2>(et, kb, vb, d_pad, nw, c0, ot, d_pad); break;
                            case 1: value_tile<1>(et, kb, vb, d_pad, nw, c0, ot, d_pad); break;
                        }
                    }
                }
            }
            // out = o / l (rounded to bf16 for bf16)
            for (int64_t r = 0; r < rows; r++) {
                T *orow = out + b * out_strides[0] + h * out_strides[1] + (l0 + r) * out_strides[2];
                const vec inv = vset(1.0f / l[r]);
                int64_t c = 0;
                for (; c + LANES <= d; c += LANES) store_all(orow + c, vmul(vload(o + r * d_pad + c), inv));
                if (c < d) store_lanes(orow + c, first_lanes(d - c), vmul(vload(o + r * d_pad + c), inv));
            }
        }
    }
}

extern "C" {

// Elements of `pack` per sample and head, and bytes of `scratch` per thread, for these sizes and an
// element of `element_bytes` (2: bf16, 4: fp32).
int64_t sdlite_attention_pack_elements(int64_t N, int64_t d, int element_bytes) {
    return element_bytes == 2 ? Layout<bf16>(N, d, 0).pack_elements() : Layout<float>(N, d, 0).pack_elements();
}

int64_t sdlite_attention_scratch_bytes(int64_t N, int64_t d, int64_t MB, int64_t NB, int element_bytes) {
    return element_bytes == 2 ? Layout<bf16>(N, d, NB).scratch_bytes(MB) : Layout<float>(N, d, NB).scratch_bytes(MB);
}

// q [B, H, L, d], k and v [B, H, N, d], out [B, H, L, d], all fp32 or all bf16: any strides (in
// elements) with the last dimension contiguous. MB: queries per task (rounded up to a multiple of
// MR); NB: keys per block (rounded up to a multiple of KEY_TILE; 0 or >= N: one block). `pack`:
// B·H·pack_elements elements; `scratch`: threads · scratch_bytes.
void sdlite_attention_fp32(const float *q, const float *k, const float *v, float *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int64_t NB, int threads, float *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, NB, threads, pack, scratch);
}

#if defined(SDLITE_BF16)
void sdlite_attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, int64_t B, int64_t H, int64_t L,
                           int64_t N, int64_t d, const int64_t *q_strides, const int64_t *k_strides,
                           const int64_t *v_strides, const int64_t *out_strides, float scale, int64_t MB,
                           int64_t NB, int threads, bf16 *pack, char *scratch) {
    attention(q, k, v, out, B, H, L, N, d, q_strides, k_strides, v_strides, out_strides, scale, MB, NB, threads, pack, scratch);
}
#endif

}  // extern "C"
