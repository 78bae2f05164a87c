/* The routed experts of one MoE layer for a few tokens, on the CPU, in two parallel regions.
 *
 * hybridmoe's decode runs a layer's selected experts next to their weights in RAM. With torch that is one oneDNN
 * call per expert and projection (12 calls a layer for top-6), each its own parallel region over a 3-6 MB matrix;
 * the weight reads then run at about half the memory bandwidth. Here the whole layer is two OpenMP regions:
 *
 *   region 1  every (expert, block of intermediate rows j): gate_j and up_j for each token routed to the expert,
 *             h_j = silu(gate_j) * up_j                                    reads W_gu of the selected experts once
 *   region 2  every block of output rows i: out[t, i] = sum over token t's slots of w * (W_d[e, i] . h)
 *                                                                           reads W_d of the selected experts once
 *
 * and each thread walks a contiguous run of weight rows (one sequential stream for the hardware prefetcher).
 *
 * Numerics follow hybridmoe's torch CPU path (hybridmoe.experts.expert_math.LoopMath) rounding point for rounding point: inputs of
 * a bf16 GEMM are rounded to bf16 (round to nearest even), GEMMs accumulate in fp32 and their bf16 outputs are
 * rounded to bf16, everything else (LoRA, activation, the weighted sum over top-k) is fp32. int8 weights are
 * per-row symmetric (w = q * scale, bf16 scales), applied to bf16-rounded activations, as torch._weight_int8pack_mm.
 * 4-bit weights (int4, MXFP4; hybridmoe/experts/packed.py) are codes c with a 16-entry value table and a bf16 scale
 * per group of inputs: y = sum over groups of scale_g * sum_i VALUES[c_i] * x_i, x bf16-rounded, output rounded to
 * bf16 (the torch path: the exact fp32 weights against bf16-rounded x). Only the summation order differs.
 *
 * Two gates: SiLU-GLU (most models) and gpt-oss's clamped SwiGLU on interleaved gate/up rows, with or without biases.
 *
 * Weights: fp32, bf16, int8 or 4-bit, in transformers' fused layout: gate_up [E, 2I, H] (rows [0, I) gate, [I, 2I)
 * up; gpt-oss: interleaved), down [E, H, I]; 4-bit rows are in/2 bytes, byte j = element 2j (low nibble) and 2j+1 (high nibble). Expert LoRA (optional, fp32): A_gu [E, r, H], B_gu [E, 2I, r], A_d [E, r, I], B_d [E, H, r].
 *
 * Built by hybridmoe.experts.cpu_kernel with the system C compiler; the OpenMP symbols are left undefined and bind
 * to the OpenMP runtime torch has already loaded, so the two share one thread pool. The dot products come in two
 * instruction sets, chosen at run time (hm_set_isa): AVX-512 with BF16 (Intel Cooper Lake / Sapphire Rapids and
 * later, AMD Zen 4 and later) and AVX2 + FMA (any x86-64 CPU of the last decade); the 4-bit integer dots use AVX-512
 * VNNI wherever the CPU has it (hm_set_isa).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hm_common.h"

int omp_get_num_threads(void); /* the OpenMP runtime's (torch's, bound at load time: see the module docstring) */

#define TGT512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define TGT256 __attribute__((target("avx2,fma")))

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_P4 = 3 };
enum { MAX_ITEM_ROWS = 128 }; /* the most weight rows a work item may take (hm_set_item_rows) */

/* ---- dot products: one weight row against one activation vector, fp32 accumulation -------------------------
 * Each takes the activations both as bf16 (xb) and as fp32 (xf, bf16-rounded when the weights are bf16 or int8),
 * and uses the form its instructions want. Two instruction sets: AVX-512 with BF16 (dpbf16 straight on bf16
 * pairs), and AVX2 + FMA (bf16 weights widened to fp32 by a shift). A bf16 x bf16 product is exact in fp32, so both
 * compute the same sums up to order. */

typedef float (*dot_fn)(const void *w, const uint16_t *xb, const float *xf, int64_t n);

/* Software prefetch of the weight stream, this many bytes ahead of the loads (0: off; hm_set_prefetch). It runs on
 * into the next rows, which a work item reads next: rows are contiguous. */
static int64_t prefetch_bytes = 0;

void hm_set_prefetch(int64_t bytes) { prefetch_bytes = bytes > 0 ? bytes : 0; }

/* Prefetch the `span` bytes at p + prefetch_bytes (span: what one loop iteration consumes).
 * TILE_PREFETCH: the 4-bit dots read four consecutive rows at once (proj_rows hands them over in order; a tail
 * repeats its last row), n/2 bytes each, at the same offset in each. Their prefetch walks the tile's 4 x n/2 bytes as
 * one linear stream at the rate the four rows are read together (2 bytes per input: w[0] + 2b at input b), so every
 * line is fetched once, prefetch_bytes ahead, and the next tile is reached before it starts. (A prefetch per row at
 * its own offset + prefetch_bytes lands in a later row of the same tile and leaves the next tile's first lines cold:
 * S11-a measured the 4-bit kernel at 48 GB/s that way, against 101 for bf16, whose one-row dots stream linearly.) */
#define PREFETCH(p, span)                                                                        \
    do {                                                                                         \
        if (prefetch_bytes)                                                                      \
            for (int o_ = 0; o_ < (span); o_ += 64)                                              \
                _mm_prefetch((const char *)(p) + prefetch_bytes + o_, _MM_HINT_T0);               \
    } while (0)

TGT512 static float dot_bf16_512(const void *wv, const uint16_t *x, const float *xf, int64_t n) {
    (void)xf;
    const uint16_t *w = wv;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        PREFETCH(w + i, 128);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(w + i + 32),
                                (__m512bh)_mm512_loadu_si512(x + i + 32));
    }
    for (; i < n; i += 32) {
        __mmask32 m = n - i >= 32 ? 0xffffffffu : (__mmask32)((1u << (n - i)) - 1);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i),
                                (__m512bh)_mm512_maskz_loadu_epi16(m, x + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

TGT512 static float dot_i8_512(const void *wv, const uint16_t *xb, const float *x, int64_t n) {
    (void)xb;
    const int8_t *w = wv;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        PREFETCH(w + i, 32);
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i + 16))));
        acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + i)));
        acc0 = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

TGT512 static float dot_f32_512(const void *wv, const uint16_t *xb, const float *x, int64_t n) {
    (void)xb;
    const float *w = wv;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        PREFETCH(w + i, 128);
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

TGT256 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

TGT256 static inline __m256 widen_bf16(__m128i v) { /* 8 bf16 -> 8 fp32 (exact) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

TGT256 static float dot_bf16_256(const void *wv, const uint16_t *xb, const float *x, int64_t n) {
    (void)xb;
    const uint16_t *w = wv;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        PREFETCH(w + i, 32);
        acc0 = _mm256_fmadd_ps(widen_bf16(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(widen_bf16(_mm_loadu_si128((const __m128i *)(w + i + 8))), _mm256_loadu_ps(x + i + 8),
                               acc1);
    }
    float tail = 0.f;
    for (; i < n; i++) tail += bf16_to_f32(w[i]) * x[i];
    return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
}

TGT256 static float dot_i8_256(const void *wv, const uint16_t *xb, const float *x, int64_t n) {
    (void)xb;
    const int8_t *w = wv;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        PREFETCH(w + i, 16);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i))));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + 8))));
        acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i + 8), acc1);
    }
    float tail = 0.f;
    for (; i < n; i++) tail += (float)w[i] * x[i];
    return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
}

TGT256 static float dot_f32_256(const void *wv, const uint16_t *xb, const float *x, int64_t n) {
    (void)xb;
    const float *w = wv;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        PREFETCH(w + i, 64);
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
    }
    float tail = 0.f;
    for (; i < n; i++) tail += w[i] * x[i];
    return hsum256(_mm256_add_ps(acc0, acc1)) + tail;
}


/* ---- 4-bit rows: codes against activations permuted per block of 32 ------------------------------------------
 * A 32-input block is 16 bytes; byte j holds inputs 2j (low nibble) and 2j+1 (high). The activations come permuted
 * the same way once per vector (permute_p4: the block's 16 even inputs, then its 16 odd ones), so the low nibbles
 * of 16 consecutive bytes meet 16 consecutive activations. Values: int4 (table NULL) c - 8; else table[c] (MXFP4).
 * Per group: sum of values * x in fp32, then times the group's bf16 scale. */


static inline int64_t p4_pos(int64_t i) { /* where input i sits in the permuted activations */
    const int64_t r = i & 31;
    return (i & ~(int64_t)31) + ((r & 1) ? 16 + (r >> 1) : (r >> 1));
}

static void permute_p4(const float *x, float *xp, int64_t n) {
    for (int64_t i = 0; i < n; i++) xp[p4_pos(i)] = x[i];
}

TGT256 static inline __m256 lut16_256(__m256i idx, __m256 tlo, __m256 thi) { /* table[idx], idx in [0, 16) */
    __m256 a = _mm256_permutevar8x32_ps(tlo, idx), b = _mm256_permutevar8x32_ps(thi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 picks the half */
}

/* Four rows at once (given as row pointers; a tail repeats its last row): the activations are loaded once for the
 * four, and the four rows' accumulators are independent dependency chains, which a single row (a few hundred bytes at
 * these widths) cannot fill. out[r] = the row's dot product, scales applied. */
typedef void (*dot4x4_fn)(const uint8_t *const *w, const uint16_t *const *scale, const float *xp, int64_t n,
                          int64_t group, const float *table, float *out);

TGT512 static void dot_p4x4_512(const uint8_t *const *w, const uint16_t *const *scale, const float *xp, int64_t n,
                                int64_t group, const float *table, float *out) {
    const __m512i low = _mm512_set1_epi32(15);
    const __m512 eight = _mm512_set1_ps(8.f);
    const __m512 tab = table ? _mm512_loadu_ps(table) : _mm512_setzero_ps();
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g0 = 0; g0 < n; g0 += group) {
        __m512 s0[4], s1[4];
        for (int r = 0; r < 4; r++) s0[r] = s1[r] = _mm512_setzero_ps();
        for (int64_t b = g0; b < g0 + group; b += 32) {
            const __m512 x0 = _mm512_loadu_ps(xp + b), x1 = _mm512_loadu_ps(xp + b + 16);
            PREFETCH(w[0] + 2 * b, 64); /* the tile, linearly (see TILE_PREFETCH) */
            for (int r = 0; r < 4; r++) {
                const uint8_t *wr = w[r] + b / 2;
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)wr));
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_srli_epi32(v, 4);
                __m512 flo, fhi;
                if (table) {
                    flo = _mm512_permutexvar_ps(lo, tab);
                    fhi = _mm512_permutexvar_ps(hi, tab);
                } else {
                    flo = _mm512_sub_ps(_mm512_cvtepi32_ps(lo), eight);
                    fhi = _mm512_sub_ps(_mm512_cvtepi32_ps(hi), eight);
                }
                s0[r] = _mm512_fmadd_ps(flo, x0, s0[r]);
                s1[r] = _mm512_fmadd_ps(fhi, x1, s1[r]);
            }
        }
        for (int r = 0; r < 4; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(s0[r], s1[r]),
                                     _mm512_set1_ps(bf16_to_f32(scale[r][g0 / group])), acc[r]);
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

TGT256 static void dot_p4x4_256(const uint8_t *const *w, const uint16_t *const *scale, const float *xp, int64_t n,
                                int64_t group, const float *table, float *out) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256 eight = _mm256_set1_ps(8.f);
    const __m256 tlo = table ? _mm256_loadu_ps(table) : _mm256_setzero_ps();
    const __m256 thi = table ? _mm256_loadu_ps(table + 8) : _mm256_setzero_ps();
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g0 = 0; g0 < n; g0 += group) {
        __m256 s0[4], s1[4];
        for (int r = 0; r < 4; r++) s0[r] = s1[r] = _mm256_setzero_ps();
        for (int64_t b = g0; b < g0 + group; b += 32) {
            PREFETCH(w[0] + 2 * b, 64); /* the tile, linearly (see TILE_PREFETCH) */
            for (int h = 0; h < 2; h++) { /* bytes [8h, 8h + 8) of the block: inputs 16h .. 16h + 15 */
                const __m256 x0 = _mm256_loadu_ps(xp + b + 8 * h), x1 = _mm256_loadu_ps(xp + b + 16 + 8 * h);
                for (int r = 0; r < 4; r++) {
                    const uint8_t *wr = w[r] + b / 2 + 8 * h;
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)wr));
                    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi32(v, 4);
                    __m256 flo, fhi;
                    if (table) {
                        flo = lut16_256(lo, tlo, thi);
                        fhi = lut16_256(hi, tlo, thi);
                    } else {
                        flo = _mm256_sub_ps(_mm256_cvtepi32_ps(lo), eight);
                        fhi = _mm256_sub_ps(_mm256_cvtepi32_ps(hi), eight);
                    }
                    s0[r] = _mm256_fmadd_ps(flo, x0, s0[r]);
                    s1[r] = _mm256_fmadd_ps(fhi, x1, s1[r]);
                }
            }
        }
        for (int r = 0; r < 4; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(s0[r], s1[r]),
                                     _mm256_set1_ps(bf16_to_f32(scale[r][g0 / group])), acc[r]);
    }
    for (int r = 0; r < 4; r++) out[r] = hsum256(acc[r]);
}

/* ---- int4 rows against int8 activations (llama.cpp's Q4_0 x Q8_0): integer dot products ----------------------
 * For int4 weights whose group is a multiple of 64, the activations are quantized once per vector to int8 with one
 * fp32 scale per weight group (quant_act: s = amax / 127, q = round(x / s)), stored in the order the dot reads
 * (q_pos), and each group's sum of c * q is an exact int32 from AVX2 integer multiply-adds (maddubs + madd), which
 * the nibbles feed directly (no conversion to floats). AVX2 on every CPU; where AVX-512 VNNI is present, the whole
 * 128-input steps go through dot_qv4x4_512 instead (an activation layout of its own, below; a first VNNI version that
 * kept this layout spent three lane shuffles a row-step and was 3-7% slower than AVX2, S11-b/c). With
 * w = (c - 8) * sw and x ~ q * sx:  row . x = sum_g sw_g sx_g (sum c q - 8 sum q). The torch path quantizes its
 * activations the same way (ExpertWeights.linear), so the two agree to fp32 summation order. Four rows at a time,
 * given as row pointers (a tail repeats its last row). */

typedef struct {
    const int8_t *q;    /* [n] activations, int8, in the dots' order (q_pos) */
    const float *s;     /* [n / group] their scales */
    const float *sum;   /* [n / group] sum of q over each group (exact in fp32) */
    const int32_t *negc; /* wide: [n / 8] per 128 inputs, each VNNI lane's -offset * sum of its 8 activations */
    int wide;           /* laid out for the AVX-512 VNNI dots (q_wide_for): whole 128s wide, the rest as AVX2 */
} QAct;

/* The AVX-512 VNNI dots are in use (hm_set_isa) and take this group: 32, 64 or a multiple of 128, so that each
 * 128-input step's lanes fall in whole groups. */
static int q_vnni = 0;

static inline int q_wide_for(int64_t group) { return q_vnni && (group == 32 || group == 64 || group % 128 == 0); }

/* The VNNI dots' offsets: a code c (int4) enters unsigned, value c - 8; a table's doubled value v (|v| <= 63) enters
 * as v + 64 in [1, 127]. */
enum { QOFF_INT4 = 8, QOFF_TABLE = 64 };


/* Where input i of n sits in int8 activations laid out for the integer dots: per 64 inputs, [evens of block 0 |
 * evens of block 1 | odds of block 0 | odds of block 1], so the low and the high nibbles of 32 bytes of codes (lane
 * 0: block 0, lane 1: block 1) meet their activations as they are, with no shuffle; a last block of 32 as p4_pos. */
static inline int64_t q_pos(int64_t i, int64_t n, int wide) {
    if (wide) { /* per whole 128: [evens of blocks 0-3 | odds of blocks 0-3] (dot_qv4x4_512) */
        const int64_t base = i & ~(int64_t)127, r = i & 127;
        if (base + 128 <= n) return base + (r & 1) * 64 + (r >> 5) * 16 + ((r & 31) >> 1);
    }
    const int64_t base = i & ~(int64_t)63, r = i & 63;
    if (base + 64 > n) return p4_pos(i);
    return base + (r & 1) * 32 + (r >> 5) * 16 + ((r & 31) >> 1);
}

/* Eight at a time with AVX2 (every CPU the kernel runs on), as torch's quantize_activations: amax over the group,
 * s = amax / 127, q = round-to-even of x / s (an IEEE division; cvtps rounds to nearest even) clamped to
 * [-127, 127]; q = 0 for a group of zeros (s = 0); a group with a NaN gets s = NaN (torch's amax propagates it), so
 * the outputs that read it are NaN, as in torch. group: a multiple of 8. */
TGT256 static void quant_act(const float *x, int64_t n, int64_t group, int8_t *q, float *s, float *sum, int wide,
                             int32_t off, int32_t *negc) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    for (int64_t g0 = 0; g0 < n; g0 += group) {
        __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int64_t i = g0; i < g0 + group; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            m = _mm256_max_ps(_mm256_and_ps(v, absmask), m);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        h = _mm_max_ps(_mm_movehl_ps(h, h), h);
        h = _mm_max_ss(_mm_shuffle_ps(h, h, 1), h);
        /* a NaN input makes the group's scale NaN (torch's amax propagates it): the dot products then give NaN */
        const float sc = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(h) / 127.f;
        const __m256 vs = _mm256_set1_ps(sc);
        __m256i tot = _mm256_setzero_si256();
        for (int64_t i = g0; i < g0 + group; i += 8) {
            __m256i v = sc > 0.f ? _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), vs)) : _mm256_setzero_si256();
            v = _mm256_max_epi32(_mm256_min_epi32(v, lim), nlim);
            tot = _mm256_add_epi32(tot, v);
            /* inputs i .. i + 7 lie in one block of 32: its evens go to 4 consecutive places from q_pos(i), its odds
             * from q_pos(i + 1) (in every layout), as two 4-byte stores: [v0 v2 v4 v6], [v1 v3 v5 v7] */
            const __m256i b8 = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, 4, 12, -1, -1, -1,
                                                                         -1, -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, 4,
                                                                         12, -1, -1, -1, -1, -1, -1));
            /* lane 0: [v0 v2 .. | v1 v3 ..], lane 1: [v4 v6 .. | v5 v7 ..] (each int32's low byte) */
            const uint32_t lo0 = (uint32_t)_mm256_extract_epi16(b8, 0), hi0 = (uint32_t)_mm256_extract_epi16(b8, 4);
            const uint32_t lo1 = (uint32_t)_mm256_extract_epi16(b8, 8), hi1 = (uint32_t)_mm256_extract_epi16(b8, 12);
            const uint32_t ev = (lo0 & 0xffff) | (lo1 << 16), od = (hi0 & 0xffff) | (hi1 << 16);
            memcpy(q + q_pos(i, n, wide), &ev, 4);
            memcpy(q + q_pos(i + 1, n, wide), &od, 4);
        }
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, tot);
        s[g0 / group] = sc;
        sum[g0 / group] = (float)(t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7]);
    }
    for (int64_t b = 0; wide && b + 128 <= n; b += 128) /* lane l of a step multiplies q[4l, 4l+4) and q[64+4l, ..) */
        for (int l = 0; l < 16; l++) {
            int32_t t = 0;
            for (int k = 0; k < 4; k++) t += q[b + 4 * l + k] + q[b + 64 + 4 * l + k];
            negc[b / 8 + l] = -off * t;
        }
}

/* The four rows' int32 sums folded into one vector, exactly: lane r (r < 4) = row r's lanes 0-3 summed, lane 4 + r =
 * its lanes 4-7 (two rounds of hadd). One conversion and one fmadd then scale all four rows: the per-group epilogue
 * per row (a conversion, a broadcast, an fmadd each) was as much work as the group's dot products at group 64. */
TGT256 static inline __m256i fold4(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    return _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
}

/* The four rows' bf16 scales of group g as fp32 [s0, s1, s2, s3] (exact). */
TGT256 static inline __m128 scales4(const uint16_t *const *scale, int64_t g) {
    const __m128i v = _mm_set_epi32(scale[3][g], scale[2][g], scale[1][g], scale[0][g]);
    return _mm_castsi128_ps(_mm_slli_epi32(v, 16));
}

/* Row r's total: lanes r and 4 + r of acc. */
TGT256 static inline void unfold4(__m256 acc, float *out) {
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
}

/* One 64-input step of four 4-bit rows from input b: two 32-input blocks, 32 bytes of codes per row in one load; the
 * activations in q_pos's order: the low nibbles (evens of both blocks) and the high ones (odds) each against 32
 * activations as loaded. m[r]: row r's 8 int32 partial sums, lanes 0-3 block 0 and 4-7 block 1, of u * q, where u
 * is the code itself (int4; lut NULL) or lut[code], an unsigned table (dot_q4tx4_256). Every u <= 32, so the two
 * pair sums fit int16 (4 x 32 x 127) before the widening madd. */
TGT256 static inline void q4x4_step(const uint8_t *const *w, const int8_t *q, int64_t b, const __m256i *lut,
                                    __m256i m[4]) {
    const __m256i low256 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    PREFETCH(w[0] + 2 * b, 128); /* the tile, linearly (see TILE_PREFETCH) */
    const __m256i xe = _mm256_loadu_si256((const __m256i *)(q + b));      /* evens of blocks 0, 1 */
    const __m256i xo = _mm256_loadu_si256((const __m256i *)(q + b + 32)); /* odds */
    for (int r = 0; r < 4; r++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(w[r] + b / 2));
        __m256i lo = _mm256_and_si256(c, low256), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low256);
        if (lut) lo = _mm256_shuffle_epi8(*lut, lo), hi = _mm256_shuffle_epi8(*lut, hi);
        m[r] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo)), ones);
    }
}

/* Group g's four sums s[r] scaled into acc (folded: lanes r and 4 + r are row r's) by sw_r * sx, and f_r * sum(q)
 * into corr (the codes' offset of 8 comes off at the end). */
TGT256 static inline void q4x4_scale(const uint16_t *const *scale, const QAct *a, int64_t g, const __m256i s[4],
                                     __m256 *acc, __m128 *corr) {
    const __m128 f = _mm_mul_ps(scales4(scale, g), _mm_set1_ps(a->s[g])); /* [4] sw_r * sx */
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(fold4(s[0], s[1], s[2], s[3])), _mm256_set_m128(f, f), *acc);
    *corr = _mm_fmadd_ps(f, _mm_set1_ps(a->sum[g]), *corr);
}

/* Group 64 (the default): one step is one group, so the loop is flat, as the table dots' is: each step's sums scaled
 * at once, no accumulators carried across steps (~15-20% faster than the loop nested per group below, and than one
 * flat loop that scales when a group ends: dot_rate on the 2-core EPYC). */
TGT256 static void dot_q4x4_256_g64(const uint8_t *const *w, const uint16_t *const *scale, const QAct *a, int64_t n,
                                    float *out) {
    __m256 acc = _mm256_setzero_ps();
    __m128 corr = _mm_setzero_ps();
    for (int64_t b = 0; b < n; b += 64) {
        __m256i m[4];
        q4x4_step(w, a->q, b, NULL, m);
        q4x4_scale(scale, a, b / 64, m, &acc, &corr);
    }
    unfold4(acc, out);
    for (int r = 0; r < 4; r++) out[r] -= 8.f * corr[r];
}

TGT256 static void dot_q4x4_256(const uint8_t *const *w, const uint16_t *const *scale, const QAct *a, int64_t n,
                                int64_t group, float *out) {
    if (group == 64) {
        dot_q4x4_256_g64(w, scale, a, n, out);
        return;
    }
    __m256 acc = _mm256_setzero_ps();
    __m128 corr = _mm_setzero_ps();
    for (int64_t g0 = 0; g0 < n; g0 += group) { /* group is a multiple of 64 */
        __m256i isum[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
        for (int64_t b = g0; b < g0 + group; b += 64) {
            __m256i m[4];
            q4x4_step(w, a->q, b, NULL, m);
            for (int r = 0; r < 4; r++) isum[r] = _mm256_add_epi32(isum[r], m[r]);
        }
        q4x4_scale(scale, a, g0 / group, isum, &acc, &corr);
    }
    unfold4(acc, out);
    for (int r = 0; r < 4; r++) out[r] -= 8.f * corr[r];
}

/* ---- 4-bit rows of a table whose doubled values are small integers (MXFP4) against int8 activations ----------
 * llama.cpp's MXFP4 x Q8_0: an e2m1 value times 2 is an integer in [-12, 12], so one byte shuffle (pshufb) of a
 * 16-entry int8 table (lut2[c] = 2 * table[c], built and checked by hm_moe_forward) turns 16 codes into 16 int8
 * weights. The activations are int8 per weight group (quant_act, as for int4), and each group's sum of lut2[c] * q
 * is an exact int32 (maddubs on the table offset to unsigned, see QOFF_TABLE256; madd widens).
 * row . x = sum_g (scale_g / 2) sx_g sum(w2 q), scale_g / 2 exact (a power of two for MXFP4). Two 32-input blocks a
 * step (32 bytes of codes per row), four rows at once; a group of 32 scales each block by itself. AVX2 (with AVX-512
 * VNNI, only for what is left after dot_qv4x4_512's whole 128-input steps). */

/* The AVX2 table dot's offset: a doubled value v (MXFP4: |v| <= 12; hm_moe_forward refuses a table beyond 16) enters
 * maddubs unsigned as v + 16, so one maddubs multiplies 32 codes' values by 32 activations (llama.cpp's sign trick
 * took two sign instructions more a maddubs), and 16 x the block's activation sum comes off exactly in int32 before
 * the conversion: the same integers as sum(v q). The low and high nibbles' pair sums added stay within int16
 * (4 x 32 x 127 = 16256). */
enum { QOFF_TABLE256 = 16 };

/* [16 sum(q) of group g0 in lanes 0-3 | of g1 in lanes 4-7, or 0 there when g1 == g0] (folded lanes r and 4 + r are
 * row r's blocks 0 and 1, scaled by the same f when one group holds both: the correction may sit in either lane). */
TGT256 static inline __m256i table_offsets(const QAct *a, int64_t g0, int64_t g1) {
    const __m128i s0 = _mm_set1_epi32(QOFF_TABLE256 * (int32_t)a->sum[g0]);
    const __m128i s1 = g1 == g0 ? _mm_setzero_si128() : _mm_set1_epi32(QOFF_TABLE256 * (int32_t)a->sum[g1]);
    return _mm256_set_m128i(s1, s0);
}

TGT256 static void dot_q4tx4_256(const uint8_t *const *w, const uint16_t *const *scale, const QAct *a, int64_t n,
                                 int64_t group, const int8_t *lut2, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lut = _mm256_add_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut2)),
                                        _mm256_set1_epi8(QOFF_TABLE256)); /* both lanes, unsigned */
    __m256 acc = _mm256_setzero_ps(); /* folded (fold4): lanes r and 4 + r are row r's */
    int64_t b = 0;
    for (; b + 64 <= n; b += 64) { /* inputs [b, b + 64): blocks b (lane 0 of the codes) and b + 32 (lane 1) */
        __m256i m[4];
        q4x4_step(w, a->q, b, &lut, m); /* sums of (v + 16) q */
        /* folded: lanes 0-3 the rows' block-0 sums (group g0), 4-7 their block-1 sums (g1); f = sw / 2 * sx */
        const int64_t g0 = b / group, g1 = (b + 32) / group;
        const __m256i v = _mm256_sub_epi32(fold4(m[0], m[1], m[2], m[3]), table_offsets(a, g0, g1)); /* sum(v q) */
        const __m128 f0 = _mm_mul_ps(scales4(scale, g0), _mm_set1_ps(0.5f * a->s[g0]));
        const __m128 f1 = g1 == g0 ? f0 : _mm_mul_ps(scales4(scale, g1), _mm_set1_ps(0.5f * a->s[g1]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set_m128(f1, f0), acc);
    }
    if (b < n) { /* a last block of 32 (n = 64k + 32, e.g. gpt-oss's 2880) */
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(a->q + b));
        const __m128i lut1 = _mm256_castsi256_si128(lut), low1 = _mm_set1_epi8(15);
        __m256i m[4];
        for (int r = 0; r < 4; r++) {
            const __m128i c = _mm_loadu_si128((const __m128i *)(w[r] + b / 2));
            const __m128i lo = _mm_shuffle_epi8(lut1, _mm_and_si128(c, low1));
            const __m128i hi = _mm_shuffle_epi8(lut1, _mm_and_si128(_mm_srli_epi16(c, 4), low1));
            m[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), x0), ones);
        }
        /* lanes 0-3 hold the evens' sums, 4-7 the odds' (one block): the offsets taken off lane by lane, so each
         * folded lane is exactly the sum(v q) of its half */
        const __m256i o = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(QOFF_TABLE256), x0), ones);
        const __m256i v = _mm256_sub_epi32(fold4(m[0], m[1], m[2], m[3]), fold4(o, o, o, o));
        const int64_t g0 = b / group;
        const __m128 f = _mm_mul_ps(scales4(scale, g0), _mm_set1_ps(0.5f * a->s[g0]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set_m128(f, f), acc);
    }
    unfold4(acc, out);
}

/* ---- 4-bit rows against int8 activations with AVX-512 VNNI: 128 inputs a step ---------------------------------
 * vpdpbusd multiplies 64 unsigned bytes by 64 signed ones and adds each lane's four products into its int32. The
 * codes go in unsigned as they are (int4: c, value c - 8; a table: lutu[c] = 2 * table[c] + 64 from one byte shuffle)
 * against int8 activations laid out per 128 inputs as [evens of blocks 0-3 | odds of blocks 0-3] (q_pos, wide), so
 * the low nibbles of 64 bytes of codes meet the first 64 activations and the high nibbles the next 64, with no
 * shuffle. Lane l (of 16) then holds block l / 4's share, and the offset (8 or 64) comes off exactly in int32: each
 * lane's sum starts at -offset * (the sum of the 8 activations it multiplies) (QAct.negc, from quant_act). Each lane
 * is scaled by its block's group (the row's bf16 scale placed by one vpermw, the activations' by one vpermps) and
 * summed in fp32. Per 64 bytes of codes a row: 6 integer instructions and 4 for the scales (the AVX2 dots: ~30).
 * Returns how many inputs it took (whole 128s); the rest, in the AVX2 dots' layout, is theirs. */
#define TGT512Q __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

/* Which group of a 128-input step each VNNI lane's block is in, k(l) = 32 (l / 4) / group, for the groups the dots
 * take (q_wide_for): [0] group 32, [1] 64, [2] a multiple of 128 (always 0). qv_lidx for the activations' fp32
 * scales (vpermps), qv_widx for the rows' bf16 scales (vpermw: word k(l) into the high half of lane l). Filled once
 * by hm_set_isa, not per four-row tile. */
static int32_t qv_lidx[3][16];
static int16_t qv_widx[3][32];

static void qv_tables(void) {
    static const int64_t groups[3] = {32, 64, 128};
    for (int c = 0; c < 3; c++)
        for (int l = 0; l < 16; l++) {
            qv_lidx[c][l] = (int32_t)(32 * (l >> 2) / groups[c]);
            qv_widx[c][2 * l] = 0, qv_widx[c][2 * l + 1] = (int16_t)qv_lidx[c][l];
        }
}

TGT512Q static int64_t dot_qv4x4_512(const uint8_t *const *w, const uint16_t *const *scale, const QAct *a, int64_t n,
                                     int64_t group, const int8_t *lut2, float *out) {
    const int gc = group == 32 ? 0 : group == 64 ? 1 : 2; /* qv_tables' row */
    const __m512i wperm = _mm512_loadu_si512(qv_widx[gc]), lperm = _mm512_loadu_si512(qv_lidx[gc]);
    const __mmask16 gmask = (__mmask16)((1u << (group >= 128 ? 1 : 128 / group)) - 1); /* the step's groups */
    const __m512i low = _mm512_set1_epi8(15);
    __m512i lut = _mm512_setzero_si512();
    if (lut2) {
        int8_t lutu[16];
        for (int c = 0; c < 16; c++) lutu[c] = (int8_t)(lut2[c] + QOFF_TABLE);
        lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lutu));
    }
    const __m512 half = _mm512_set1_ps(lut2 ? 0.5f : 1.f); /* a table's values enter doubled */
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t b = 0;
    for (; b + 128 <= n; b += 128) {
        PREFETCH(w[0] + 2 * b, 256); /* the tile, linearly (see TILE_PREFETCH) */
        const int64_t g0 = b / group;
        const __m512i xe = _mm512_loadu_si512(a->q + b), xo = _mm512_loadu_si512(a->q + b + 64);
        const __m512i c0 = _mm512_loadu_si512(a->negc + b / 8);
        const __m512 sx = _mm512_mul_ps(_mm512_permutexvar_ps(lperm, _mm512_maskz_loadu_ps(gmask, a->s + g0)), half);
        for (int r = 0; r < 4; r++) {
            const __m512i c = _mm512_loadu_si512(w[r] + b / 2);
            __m512i lo = _mm512_and_si512(c, low), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
            if (lut2) lo = _mm512_shuffle_epi8(lut, lo), hi = _mm512_shuffle_epi8(lut, hi);
            const __m512i isum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c0, lo, xe), hi, xo);
            const __m512i sw = _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, wperm,
                                                             _mm512_castsi128_si512(_mm_maskz_loadu_epi16(gmask, scale[r] + g0)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_castsi512_ps(sw), sx), acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
    return b;
}

/* The 4-bit integer dots: the VNNI one over the whole 128s where the activations are laid out for it, the AVX2 ones
 * (dot_q4x4_256 for int4, dot_q4tx4_256 for a table) over the rest. */
static void dotq_rows(const uint8_t *const *w, const uint16_t *const *scale, const QAct *a, int64_t n, int64_t group,
                      const int8_t *lut2, float *out) {
    int64_t b = 0;
    if (a->wide) {
        b = dot_qv4x4_512(w, scale, a, n, group, lut2, out);
        if (b == n) return;
    } else {
        out[0] = out[1] = out[2] = out[3] = 0.f;
    }
    const uint8_t *wr[4];
    const uint16_t *sr[4];
    for (int r = 0; r < 4; r++) wr[r] = w[r] + b / 2, sr[r] = scale[r] + b / group;
    const QAct rest = {a->q + b, a->s + b / group, a->sum + b / group, NULL, 0};
    float o[4];
    if (lut2)
        dot_q4tx4_256(wr, sr, &rest, n - b, group, lut2, o);
    else
        dot_q4x4_256(wr, sr, &rest, n - b, group, o);
    for (int r = 0; r < 4; r++) out[r] += o[r];
}

/* The dot products of the instruction set in use, indexed by W_F32 / W_BF16 / W_I8. */
static const dot_fn DOTS_512[3] = {dot_f32_512, dot_bf16_512, dot_i8_512};
static const dot_fn DOTS_256[3] = {dot_f32_256, dot_bf16_256, dot_i8_256};
static const dot_fn *dots = NULL;
static dot4x4_fn dot4x4 = NULL;

/* The best instruction set this CPU has: 2 = AVX-512 with BF16, 1 = AVX2 + FMA, 0 = neither (the kernel can't run).
 * hm_set_isa(level) picks a lower one (tests run both); returns the level in use. */
int hm_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bf16"))
        return 2;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

int hm_set_isa(int level) {
    int best = hm_isa();
    if (level > best) level = best;
    dots = level == 2 ? DOTS_512 : level == 1 ? DOTS_256 : NULL;
    dot4x4 = level == 2 ? dot_p4x4_512 : level == 1 ? dot_p4x4_256 : NULL;
    /* The int8-activation dots (dotq_rows) take AVX-512 VNNI with the AVX-512 set, and also on a CPU whose best is
     * AVX2 for want of BF16 alone (Ice Lake, Cascade Lake servers: the 4-bit dots need no BF16); a lower level asked
     * of a CPU that has more (the tests) is kept pure. */
    qv_tables();
    q_vnni = (level == 2 || level == best) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
    return level;
}

int hm_isa_in_use(void) { return dots == DOTS_512 ? 2 : dots == DOTS_256 ? 1 : 0; }

int hm_q_vnni(void) { return q_vnni; } /* the 4-bit integer dots use AVX-512 VNNI (else AVX2) */

/* ---- one projection: its weights, the activations in the form its dot product takes, and its LoRA ----------- */

typedef struct {
    int dtype;               /* W_F32, W_BF16, W_I8, W_P4 */
    const void *w;           /* [E, out, in] (4-bit: [E, out, in/2] bytes) */
    const uint16_t *scale;   /* int8: bf16 [E, out]; 4-bit: bf16 [E, out, in/group] (e8m0: uint8, same shape) */
    const float *table;      /* 4-bit: the 16 values of the codes, NULL for int4 (c - 8) */
    int64_t group;           /* 4-bit: inputs per scale */
    int qact;                /* int8 activations, integer dots (dotq_rows): int4 in groups of 64k, MXFP4 */
    const int8_t *lut2;      /* qact with a table: 2 * table as int8 (hm_moe_forward checks it is exact) */
    int64_t out, in;
    const float *lora_a;     /* [E, r, in] or NULL */
    const float *lora_b;     /* [E, out, r] */
    int64_t r;
    float lora_scale;
    int e8m0;                /* 4-bit: scales are MXFP4's e8m0 exponents, uint8 [E, out, in/group] (proj_rows) */
} Proj;

/* The most scales a 4-bit row with e8m0 scales may have (its input dim / group): proj_rows widens them on the stack. */
enum { MAX_E8M0_GROUPS = 1024 };

/* n e8m0 exponents -> the bf16 bits of 2^(e - 127): e << 7, and e = 0 the subnormal 2^-127 (0x0040); 255 -> inf
 * (mxfp4_scales' values). A loop gcc vectorizes. */
static inline void e8m0_to_bf16(const uint8_t *e, int64_t n, uint16_t *out) {
    for (int64_t g = 0; g < n; g++) out[g] = e[g] ? (uint16_t)(e[g] << 7) : (uint16_t)0x0040;
}

/* The rest of one output after its base dot product y: int8 scale, torch's rounding of a bf16 GEMM's output, LoRA.
 * xa: this slot's A·x (r values, from the unrounded fp32 row). */
static inline float finish_row(const Proj *p, int64_t idx, float y, const float *xa) {
    if (p->dtype == W_I8) y *= bf16_to_f32(p->scale[idx]);
    if (p->dtype != W_F32) y = bf16_to_f32(f32_to_bf16(y)); /* torch's bf16 GEMM output */
    if (p->lora_a) {
        const float *b = p->lora_b + idx * p->r;
        float d = 0.f;
        for (int64_t q = 0; q < p->r; q++) d += b[q] * xa[q];
        y += p->lora_scale * d;
    }
    return y;
}

/* Prefetch the scales of the four rows from `row` (not past `last`): the tile after the current one. The codes'
 * prefetch (TILE_PREFETCH) streams the codes only; a tile's scales are another array, and the e8m0 ones are read
 * all at once when the tile starts (widened to bf16), so uncached they stall it for a DRAM latency. */
/* The bytes of one 4-bit row's scales: in / group of them, e8m0 one byte each, bf16 two. */
static inline int64_t scale_row_bytes(const Proj *p) { return p->in / p->group * (p->e8m0 ? 1 : 2); }

static inline void prefetch_scales(const Proj *p, int64_t row, int64_t last, int64_t sbytes) {
    if (!prefetch_bytes || row >= last) return;
    const int64_t rows = last - row < 4 ? last - row : 4;
    const char *s = (const char *)p->scale + row * sbytes;
    for (int64_t o = 0; o < rows * sbytes; o += 64) _mm_prefetch(s + o, _MM_HINT_T0);
}

/* Outputs [row0, row0 + n) of a projection for one slot (base GEMM rounded as torch rounds its output, + LoRA) into
 * y[0 .. n). xf: the input row in fp32 (bf16-rounded unless the weights are fp32; 4-bit: also permuted, see
 * permute_p4); xb: the same row in bf16; xa: this slot's A·x. 4-bit rows go four at a time (dot4x4). */
static void proj_rows(const Proj *p, int64_t e, int64_t row0, int64_t n, const float *xf, const uint16_t *xb,
                      const QAct *qa, const float *xa, float *y) {
    static const size_t elem[3] = {4, 2, 1};
    const int64_t idx0 = e * p->out + row0;
    int64_t k = 0;
    if (p->dtype == W_P4) { /* four rows at a time (a tail repeats its last row): integer or fp32 dots */
        const int64_t wstride = p->in / 2, sstride = p->in / p->group;
        const int64_t sbytes = scale_row_bytes(p), last = (e + 1) * p->out;
        uint16_t wide[p->e8m0 ? 4 : 1][p->e8m0 ? sstride : 1]; /* e8m0: the four rows' scales as bf16 */
        for (; k < n; k += 4) {
            prefetch_scales(p, idx0 + k + 4, last, sbytes);
            const uint8_t *w[4];
            const uint16_t *sc[4];
            float o[4];
            for (int r = 0; r < 4; r++) {
                const int64_t row = idx0 + (k + r < n ? k + r : n - 1);
                w[r] = (const uint8_t *)p->w + (size_t)row * wstride;
                if (p->e8m0) { /* one byte a scale in RAM; the dots take bf16 (from L1) */
                    e8m0_to_bf16((const uint8_t *)p->scale + row * sstride, sstride, wide[r]);
                    sc[r] = wide[r];
                } else {
                    sc[r] = p->scale + row * sstride;
                }
            }
            if (p->qact)
                dotq_rows(w, sc, qa, p->in, p->group, p->table ? p->lut2 : NULL, o);
            else
                dot4x4(w, sc, xf, p->in, p->group, p->table, o);
            for (int r = 0; r < 4 && k + r < n; r++) y[k + r] = o[r];
        }
    } else {
        for (; k < n; k++)
            y[k] = dots[p->dtype]((const char *)p->w + (size_t)(idx0 + k) * p->in * elem[p->dtype], xb, xf, p->in);
    }
    for (k = 0; k < n; k++) y[k] = finish_row(p, idx0 + k, y[k], xa);
}

/* xa[q] = A[e, q] . x for q < r (the LoRA's down-projection of one slot's input). */
static void lora_in(const Proj *p, int64_t e, const float *x, float *xa) {
    for (int64_t q = 0; q < p->r; q++) xa[q] = dots[W_F32](p->lora_a + (e * p->r + q) * p->in, NULL, x, p->in);
}

/* ---- the layer ------------------------------------------------------------------------------------------------ */

/* How a region's work items are shared (hm_set_chunk): chunk > 0: dynamic, that many items a chunk; 0: static (each
 * thread one contiguous run); < 0 (the default): guided, chunks from 1/threads of what is left down to one item. Not
 * static, so that a core briefly busy with something else (the CUDA driver, the Python thread's other work) delays
 * only its own chunk, not the barrier; guided, so that each thread first reads one long contiguous run (its software
 * prefetch runs on into rows it will read itself) and the balance comes from the small chunks at the end (S13-c:
 * 4-bit at gpt-oss's dims 96-103 -> 121-124 GB/s against dynamic chunks of 2 x 16 rows). */
static int sched_chunk = -1;

void hm_set_chunk(int chunk) { sched_chunk = chunk > 0 ? chunk : chunk < 0 ? -1 : 0; }

/* Weight rows of one work item (a multiple of 4 in [4, MAX_ITEM_ROWS]; hm_set_item_rows): a region's items are
 * (expert, block of rows) in region 1 and blocks of output rows over every expert in region 2, so this sets both
 * how long each contiguous read runs and how finely the work is balanced. */
static int64_t item_rows = 8;

void hm_set_item_rows(int rows) {
    rows = rows < 4 ? 4 : rows > MAX_ITEM_ROWS ? MAX_ITEM_ROWS : rows;
    item_rows = rows & ~3;
}

/* for (item = 0; item < n; item++) body, shared by the region's threads as sched_chunk says (no barrier after). */
#define FOR_ITEMS(chunk, n, body)                                                                   \
    do {                                                                                           \
        if ((chunk) > 0) {                                                                         \
            _Pragma("omp for schedule(dynamic, chunk) nowait") for (int64_t item = 0; item < (n); item++) body; \
        } else if ((chunk) == 0) {                                                                 \
            _Pragma("omp for schedule(static) nowait") for (int64_t item = 0; item < (n); item++) body;         \
        } else {                                                                                   \
            _Pragma("omp for schedule(guided) nowait") for (int64_t item = 0; item < (n); item++) body;         \
        }                                                                                          \
    } while (0)

/* Where the calls' time goes (hm_stats; benchmarks/decode_gemv.py prints it): wall time before the regions (sorting,
 * buffers, the input's conversions), in region 1 and in region 2, and the threads' summed time in each region's work
 * items (so busy / (threads x region) is how much of the region the threads spent working, the rest being the fork,
 * the barriers and imbalance). Atomic adds: calls may come from several Python threads. */
enum { ST_CALLS, ST_PREP, ST_R1, ST_R2, ST_BUSY1, ST_BUSY2, ST_THREADS, ST_N };
static int64_t stats[ST_N];

static inline void stat_add(int k, int64_t v) { __atomic_fetch_add(&stats[k], v, __ATOMIC_RELAXED); }

/* Copies the counters (ST_N int64: calls, then nanoseconds: prep, region 1, region 2, busy 1, busy 2, then the
 * summed thread counts) into out; reset != 0 zeroes them after. */
void hm_stats(int64_t *out, int reset) {
    for (int k = 0; k < ST_N; k++) out[k] = reset ? __atomic_exchange_n(&stats[k], 0, __ATOMIC_RELAXED)
                                                  : __atomic_load_n(&stats[k], __ATOMIC_RELAXED);
}

/* The host's read bandwidth as this library's threads see it (benchmarks/decode_gemv.py's limit): every byte of
 * p[0, n) read once, n / nthreads contiguous bytes a thread, 32-byte AVX2 loads folded by xor (returned, so the
 * reads are not optimized away). A STREAM-style read: linear, hardware prefetch only. */
TGT256 uint64_t hm_read(const uint8_t *p, int64_t n, int nthreads) {
    uint64_t acc = 0;
    const int64_t blocks = n / 128;
#pragma omp parallel for schedule(static) reduction(^ : acc) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i *v = (const __m256i *)(p + b * 128);
        const __m256i x = _mm256_xor_si256(_mm256_xor_si256(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                           _mm256_xor_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        acc ^= (uint64_t)_mm256_extract_epi64(x, 0) ^ (uint64_t)_mm256_extract_epi64(x, 3);
    }
    return acc;
}

/* Everything the two regions share: the projections, the sorted slots and the per-slot buffers. */
enum { ACT_SILU_GLU = 0, ACT_GPTOSS = 1 };

typedef struct {
    Proj gu, dn;
    int act;                  /* ACT_SILU_GLU: rows [0, I) gate, [I, 2I) up, h = silu(g) * u;
                                 ACT_GPTOSS: rows 2j gate, 2j+1 up, g = min(g, limit), u = clamp(u, -limit, limit),
                                 h = (u + 1) * g * sigmoid(alpha * g)  (gpt-oss's clamped SwiGLU) */
    float alpha, limit;
    const float *b_gu, *b_d;  /* fp32 biases [E, 2I], [E, H], or NULL */
    int64_t K, H, I;
    const int64_t *ids, *order, *gexp, *gstart; /* order [S]: slots sorted by expert; group g = [gstart[g], gstart[g+1]) */
    const float *topw, *xf;                      /* [T, K], [T, H] */
    const uint16_t *xb;                          /* [T, H] */
    float *hf, *hr, *xa, *ha, *out;              /* [S, I], [S, I], [S, r_gu], [S, r_d], [T, H] */
    uint16_t *hb;                                /* [S, I] */
    int8_t *xq, *hq;                             /* int8 activations (Proj.qact): [T, H], [S, I] */
    float *xqs, *hqs;                            /* their scales [T, H / group], [S, I / group] */
    float *xqsum, *hqsum;                        /* their per-group sums, same shapes */
    int32_t *xqc, *hqc;                          /* wide layout: their VNNI lanes' offsets [T, H / 8], [S, I / 8] */
    int qwide;                                   /* q_wide_for(group): the activations' layout (q_pos) */
} Layer;

/* Region 1, one work item: rows [j0, j0 + rows) of gate and up for every slot of group g, and h there. */
static void gate_up_item(const Layer *L, int64_t g, int64_t j0, int64_t rows) {
    const int64_t j1 = j0 + rows < L->I ? j0 + rows : L->I, e = L->gexp[g], I = L->I;
    for (int64_t p = L->gstart[g]; p < L->gstart[g + 1]; p++) {
        const int64_t t = L->order[p] / L->K;
        const float *xf = L->xf + t * L->H, *xa = L->xa + p * L->gu.r;
        const uint16_t *xb = L->xb + t * L->H;
        const int64_t gs = L->gu.qact ? L->H / L->gu.group : 0;
        const int64_t on = L->gu.qact != 0;
        const QAct qa = {L->xq + t * L->H * on, L->xqs + t * gs, L->xqsum + t * gs, L->xqc + t * (L->H / 8) * on,
                         L->qwide};
        float gbuf[2 * MAX_ITEM_ROWS], ubuf[MAX_ITEM_ROWS];
        const int64_t n = j1 - j0;
        if (L->act == ACT_GPTOSS) { /* rows 2j (gate) and 2j+1 (up): one run of 2n rows */
            proj_rows(&L->gu, e, 2 * j0, 2 * n, xf, xb, &qa, xa, gbuf);
        } else {
            proj_rows(&L->gu, e, j0, n, xf, xb, &qa, xa, gbuf);
            proj_rows(&L->gu, e, I + j0, n, xf, xb, &qa, xa, ubuf);
        }
        for (int64_t j = j0; j < j1; j++) {
            const int64_t rg = L->act == ACT_GPTOSS ? 2 * j : j, ru = L->act == ACT_GPTOSS ? 2 * j + 1 : I + j;
            float gv = L->act == ACT_GPTOSS ? gbuf[2 * (j - j0)] : gbuf[j - j0];
            float uv = L->act == ACT_GPTOSS ? gbuf[2 * (j - j0) + 1] : ubuf[j - j0];
            float h;
            if (L->b_gu) {
                gv += L->b_gu[e * 2 * I + rg];
                uv += L->b_gu[e * 2 * I + ru];
            }
            if (L->act == ACT_GPTOSS) {
                gv = gv < L->limit ? gv : L->limit;
                uv = uv < -L->limit ? -L->limit : (uv > L->limit ? L->limit : uv);
                h = (uv + 1.f) * (gv / (1.f + expf(-L->alpha * gv)));
            } else {
                h = gv / (1.f + expf(-gv)) * uv; /* silu(gate) * up, fp32 */
            }
            L->hf[p * I + j] = h;
            L->hb[p * I + j] = f32_to_bf16(h);
            if (L->hr != L->hf) L->hr[p * I + (L->dn.dtype == W_P4 ? p4_pos(j) : j)] = bf16_to_f32(L->hb[p * I + j]);
        }
    }
}

/* Region 2 reads the same rows of one expert after another: the codes' prefetch runs on into the expert's later
 * rows, not the next expert's, so each expert's first tile would start cold. Before an expert's rows, the next
 * expert's first tile: its first prefetch_bytes of codes and its scales. */
static void prefetch_next_expert(const Proj *p, int64_t e, int64_t row) {
    if (!prefetch_bytes) return;
    const char *w = (const char *)p->w + (size_t)(e * p->out + row) * (p->in / 2);
    for (int64_t o = 0; o < prefetch_bytes; o += 64) _mm_prefetch(w + o, _MM_HINT_T0);
    prefetch_scales(p, e * p->out + row, (e + 1) * p->out, scale_row_bytes(p));
}

/* Region 2, one work item: output rows [i0, i0 + rows) of every token, summed over its slots. */
static void down_item(const Layer *L, int64_t ngroups, int64_t T, int64_t i0, int64_t rows) {
    const int64_t i1 = i0 + rows < L->H ? i0 + rows : L->H, H = L->H, I = L->I;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = i0; i < i1; i++) L->out[t * H + i] = 0.f;
    for (int64_t g = 0; g < ngroups; g++) {
        const int64_t e = L->gexp[g];
        for (int64_t p = L->gstart[g]; p < L->gstart[g + 1]; p++) {
            const int64_t s = L->order[p];
            float *o = L->out + (s / L->K) * H;
            float ybuf[MAX_ITEM_ROWS];
            const int64_t gs = L->dn.qact ? I / L->dn.group : 0;
            const int64_t on = L->dn.qact != 0;
            const QAct qa = {L->hq + p * I * on, L->hqs + p * gs, L->hqsum + p * gs, L->hqc + p * (I / 8) * on,
                             L->qwide};
            if (L->dn.dtype == W_P4 && g + 1 < ngroups && p + 1 == L->gstart[g + 1])
                prefetch_next_expert(&L->dn, L->gexp[g + 1], i0);
            proj_rows(&L->dn, e, i0, i1 - i0, L->hr + p * I, L->hb + p * I, &qa, L->ha + p * L->dn.r, ybuf);
            for (int64_t i = i0; i < i1; i++) {
                float y = ybuf[i - i0];
                if (L->b_d) y += L->b_d[e * H + i];
                o[i] += L->topw[s] * y;
            }
        }
    }
}

/* The per-call buffers (the sorted slots, the input's conversions, h, the int8 activations) come from one arena per
 * calling thread, grown to the largest call so far and never shrunk (freed when the thread exits): a decode step's
 * calls allocate nothing and touch no new page. Each call had malloc'ed and freed ~20 buffers (S17-e on the Xeon: the
 * time before the regions 1-5 µs shorter a call with the arena). */
typedef struct {
    uint8_t *base;
    size_t size, used;
} Arena;

static pthread_key_t arena_key;
static pthread_once_t arena_once = PTHREAD_ONCE_INIT;

static void arena_free(void *p) {
    Arena *a = p;
    free(a->base);
    free(a);
}

static void arena_key_make(void) { pthread_key_create(&arena_key, arena_free); }

/* Bytes an arena_take of n bytes uses: 64-byte aligned, at least one line (a size may be 0). */
static inline size_t arena_bytes(size_t n) { return (n + 64) & ~(size_t)63; }

/* This thread's arena with room for `need` bytes (from arena_bytes), emptied; NULL if memory ran out. */
static Arena *arena_get(size_t need) {
    pthread_once(&arena_once, arena_key_make);
    Arena *a = pthread_getspecific(arena_key);
    if (!a) {
        if (!(a = calloc(1, sizeof *a))) return NULL;
        if (pthread_setspecific(arena_key, a)) {
            free(a);
            return NULL;
        }
    }
    if (a->size < need) {
        free(a->base);
        const size_t size = (need + need / 4 + 4095) & ~(size_t)4095; /* room to grow a little */
        a->base = aligned_alloc(64, size);
        a->size = a->base ? size : 0;
        if (!a->base) return NULL;
    }
    a->used = 0;
    return a;
}

static inline void *arena_take(Arena *a, size_t n) {
    void *p = a->base + a->used;
    a->used += arena_bytes(n);
    return p;
}

/* out[t] = sum_k topw[t, k] * Expert_{ids[t, k]}(x[t]) for t < T; returns 0, 1 if an expert id is out of range,
 * 2 if memory ran out, 3 if hm_set_isa found no instruction set, 4 if a 4-bit group does not fit. x [T, H] fp32,
 * ids [T, K] int64, topw [T, K] fp32, out [T, H] fp32; table and group: 4-bit weights only; qact: against int8
 * activations (int4: 4 if its group is not a multiple of 64; a table: 4 if twice its values are not
 * integers of at most 16, QOFF_TABLE256); act, alpha, limit: the expert's gate (Layer.act); bias_gu / bias_d: fp32 biases or
 * NULL, added after the GEMM's rounding (as torch); e8m0: the 4-bit scales s_gu / s_d are MXFP4's e8m0 exponents,
 * one byte each (a table's format only; 4 if a row has more than MAX_E8M0_GROUPS of them). */
int hm_moe_forward(int64_t T, int64_t K, int64_t E, int64_t H, int64_t I, const float *x, const int64_t *ids,
                   const float *topw, int dtype, const void *w_gu, const uint16_t *s_gu, const void *w_d,
                   const uint16_t *s_d, const float *table, int64_t group, int qact, int act, float alpha, float limit,
                   const float *bias_gu, const float *bias_d, int64_t r_gu, const float *a_gu, const float *b_gu, float sc_gu,
                   int64_t r_d, const float *a_d, const float *b_d, float sc_d, float *out, int nthreads,
                   int e8m0) {
    const int64_t S = T * K, t_enter = now_ns();
    if (!dots) return 3;
    if (dtype == W_P4 && (group <= 0 || group % 32 || H % group || I % group)) return 4;
    if (e8m0 && (dtype != W_P4 || !table || H / group > MAX_E8M0_GROUPS || I / group > MAX_E8M0_GROUPS)) return 4;
    /* int8 activations: int4 in groups of a multiple of 64, or a table whose doubled values are exact int8 (MXFP4) */
    int8_t lut2[16] = {0};
    if (qact && (dtype != W_P4 || (!table && group % 64))) return 4;
    for (int c = 0; qact && table && c < 16; c++) {
        const float v = 2.f * table[c];
        if (v != nearbyintf(v) || fabsf(v) > QOFF_TABLE256) return 4; /* the AVX2 dot's offset (VNNI's: 63) */
        lut2[c] = (int8_t)v;
    }
    for (int64_t s = 0; s < S; s++)
        if (ids[s] < 0 || ids[s] >= E) return 1;

    /* The buffers, from this thread's arena (sizes may be 0: K = 0 is a decode step whose experts all run on the GPU).
     * int8 activations (qact: the caller's choice, PackedFormat.int8_activations; see dotq_rows), else none. */
    const int64_t nq = qact ? 1 : 0, gq = qact ? group : 1;
    const size_t f4 = sizeof(float), i8 = sizeof(int64_t);
    const size_t sizes[] = {
        ((size_t)E + 1) * i8, (size_t)S * i8, (size_t)S * i8, ((size_t)S + 1) * i8, /* count order gexp gstart */
        (size_t)(T * H) * f4, (size_t)(T * H) * 2,                                  /* xf [T, H], xb [T, H] bf16 */
        (size_t)(S * I) * f4, (size_t)(S * I) * 2, (size_t)(S * I) * f4,            /* hf, hb, hr [S, I] */
        (size_t)(S * r_gu) * f4, (size_t)(S * r_d) * f4,                            /* xa [S, r_gu], ha [S, r_d] */
        (size_t)(nq * T * H), (size_t)(nq * S * I),                                 /* xq, hq (int8) */
        (size_t)(nq * T * H / gq) * f4, (size_t)(nq * T * H / gq) * f4,             /* xqs, xqsum */
        (size_t)(nq * S * I / gq) * f4, (size_t)(nq * S * I / gq) * f4,             /* hqs, hqsum */
        (size_t)(nq * T * H / 8) * 4, (size_t)(nq * S * I / 8) * 4,                 /* xqc, hqc */
        (size_t)H * f4,                                                             /* row: permute_p4's copy */
    };
    size_t need = 0;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) need += arena_bytes(sizes[k]);
    Arena *ar = arena_get(need);
    if (!ar) return 2;
    int64_t *count = arena_take(ar, sizes[0]), *order = arena_take(ar, sizes[1]);
    int64_t *gexp = arena_take(ar, sizes[2]), *gstart = arena_take(ar, sizes[3]);
    float *xf = arena_take(ar, sizes[4]);        /* [T, H] base input (fp32 / bf16-rounded) */
    uint16_t *xb = arena_take(ar, sizes[5]);     /* [T, H] bf16 base input */
    float *hf = arena_take(ar, sizes[6]);        /* [S, I] h per sorted slot, fp32 */
    uint16_t *hb = arena_take(ar, sizes[7]);     /* [S, I] h in bf16 */
    float *hr = arena_take(ar, sizes[8]);        /* [S, I] h bf16-rounded (fp32 weights: hf itself) */
    if (dtype == W_F32) hr = hf;
    float *xa = arena_take(ar, sizes[9]), *ha = arena_take(ar, sizes[10]);
    int8_t *xq = arena_take(ar, sizes[11]), *hq = arena_take(ar, sizes[12]);
    float *xqs = arena_take(ar, sizes[13]), *xqsum = arena_take(ar, sizes[14]);
    float *hqs = arena_take(ar, sizes[15]), *hqsum = arena_take(ar, sizes[16]);
    int32_t *xqc = arena_take(ar, sizes[17]), *hqc = arena_take(ar, sizes[18]);
    float *row = arena_take(ar, sizes[19]);
    const int qwide = qact && q_wide_for(group);
    const int32_t qoff = table ? QOFF_TABLE : QOFF_INT4;
    memset(count, 0, sizes[0]);

    /* Slots (t, k) sorted by expert: a counting sort, stable (slots of one expert in (t, k) order). */
    for (int64_t s = 0; s < S; s++) count[ids[s] + 1]++;
    int64_t ngroups = 0;
    for (int64_t e = 0; e < E; e++) {
        if (count[e + 1]) {
            gexp[ngroups] = e;
            gstart[ngroups++] = count[e];
        }
        count[e + 1] += count[e];
    }
    gstart[ngroups] = S;
    for (int64_t s = 0; s < S; s++) order[count[ids[s]]++] = s;

    for (int64_t v = 0; v < T * H; v++) {
        xb[v] = f32_to_bf16(x[v]);
        xf[v] = dtype == W_F32 ? x[v] : bf16_to_f32(xb[v]);
    }
    if (qact) /* from the unrounded input: the torch path quantizes the fp32 x it is given */
        for (int64_t t = 0; t < T; t++)
            quant_act(x + t * H, H, group, xq + t * H, xqs + t * (H / group), xqsum + t * (H / group), qwide, qoff,
                      xqc + t * (H / 8));
    else if (dtype == W_P4) /* the 4-bit rows want their activations permuted per block of 32 (permute_p4) */
        for (int64_t t = 0; t < T; t++) {
            memcpy(row, xf + t * H, (size_t)H * sizeof(float));
            permute_p4(row, xf + t * H, H);
        }
    const Layer L = {{dtype, w_gu, s_gu, table, group, qact, lut2, 2 * I, H, r_gu ? a_gu : NULL, b_gu, r_gu, sc_gu,
                      e8m0},
                     {dtype, w_d, s_d, table, group, qact, lut2, H, I, r_d ? a_d : NULL, b_d, r_d, sc_d, e8m0},
                     act, alpha, limit, bias_gu, bias_d,
                     K, H, I, ids, order, gexp, gstart, topw, xf, xb, hf, hr, xa, ha, out, hb,
                     xq, hq, xqs, hqs, xqsum, hqsum, xqc, hqc, qwide};
    const int64_t rows = item_rows, jblocks = (I + rows - 1) / rows, iblocks = (H + rows - 1) / rows;
    const int chunk = sched_chunk;

    const int64_t t_r1 = now_ns();
    /* Region 1: the LoRA inputs of gate_up (from the unrounded x), then gate/up/h for every (group, block of j). */
#pragma omp parallel num_threads(nthreads)
    {
        if (r_gu) {
#pragma omp for schedule(static)
            for (int64_t p = 0; p < S; p++) lora_in(&L.gu, ids[order[p]], x + (order[p] / K) * H, xa + p * r_gu);
        }
        const int64_t t0 = now_ns();
        FOR_ITEMS(chunk, ngroups * jblocks, gate_up_item(&L, item / jblocks, (item % jblocks) * rows, rows));
        stat_add(ST_BUSY1, now_ns() - t0);
#pragma omp master
        stat_add(ST_THREADS, omp_get_num_threads());
    }
    const int64_t t_r2 = now_ns();
    /* Region 2: the LoRA inputs of down, then every block of output rows i over all groups. */
#pragma omp parallel num_threads(nthreads)
    {
        if (r_d) {
#pragma omp for schedule(static)
            for (int64_t p = 0; p < S; p++) lora_in(&L.dn, ids[order[p]], hf + p * I, ha + p * r_d);
        }
        if (qact) { /* h of every slot to int8, from its fp32 value (as the torch path) */
#pragma omp for schedule(static)
            for (int64_t p = 0; p < S; p++)
                quant_act(hf + p * I, I, group, hq + p * I, hqs + p * (I / group), hqsum + p * (I / group), qwide,
                          qoff, hqc + p * (I / 8));
        }
        const int64_t t0 = now_ns();
        FOR_ITEMS(chunk, iblocks, down_item(&L, ngroups, T, item * rows, rows));
        stat_add(ST_BUSY2, now_ns() - t0);
    }
    const int64_t t_end = now_ns();
    stat_add(ST_CALLS, 1);
    stat_add(ST_PREP, t_r1 - t_enter);
    stat_add(ST_R1, t_r2 - t_r1);
    stat_add(ST_R2, t_end - t_r2);
    return 0;
}

/* hm_moe_forward with its arguments in two arrays: graph decode calls the kernel on the same buffers at every token,
   and two ctypes arguments cost the host a few microseconds less than 31 (cpu_kernel.prepared). a: T K E H I x ids
   topw dtype w_gu s_gu w_d s_d table group qact act bias_gu bias_d r_gu a_gu b_gu r_d a_d b_d out nthreads e8m0
   (pointers as integers); f: alpha limit sc_gu sc_d. */
int hm_moe_forward_packed(const int64_t *a, const float *f) {
#define PTR(i, type) ((type)(intptr_t)a[i])
    return hm_moe_forward(a[0], a[1], a[2], a[3], a[4], PTR(5, const float *), PTR(6, const int64_t *),
                          PTR(7, const float *), (int)a[8], PTR(9, const void *), PTR(10, const uint16_t *),
                          PTR(11, const void *), PTR(12, const uint16_t *), PTR(13, const float *), a[14], (int)a[15],
                          (int)a[16], f[0], f[1], PTR(17, const float *), PTR(18, const float *), a[19],
                          PTR(20, const float *), PTR(21, const float *), f[2], a[22], PTR(23, const float *),
                          PTR(24, const float *), f[3], PTR(25, float *), (int)a[26], (int)a[27]);
#undef PTR
}
