/* bf16 GEMMs on Intel AMX tiles, for the CPU share of a streamed prefill (hybridmoe.experts.amx).
 *
 * One call computes, for each of G groups (one an expert), y[t, m] = sum_k W_g[m, k] * x_g[t, k] for the group's
 * few dozen to few hundred tokens t and every row m of its projection W_g (bf16 [M, K], as stored: transformers'
 * [out, in] rows, no repacked copy of the experts). The activations (bf16, or fp32 rounded here; gathered from the
 * caller's rows) are the B operand, packed once a call in AMX's pair layout, tile by tile (hm_amx_pack):
 *
 *     xp_g[tt, ks, r, t, j] = x_g[16 tt + t, 32 ks + 2r + j]    token tile tt, k-step ks (32 inputs), r < 16, t < 16
 *
 * so that each B tile is 1 KiB of contiguous bytes whose row r holds 16 tokens' inputs 2r and 2r + 1 (tokens padded
 * to 16 with zeros). A 32-row block of W against 32 tokens is 2 A tiles, 2 B tiles and 4 fp32 accumulator tiles
 * (tmm0-1: A, tmm2-3: B, tmm4-7: C), K walked 32 inputs a step. The work items are every group's 32-row blocks,
 * handed out one at a time: a block's rows are first copied into tile order in the thread's scratch (each row read
 * once, front to back; loading A tiles straight from the rows, 16 lines 2K+ bytes apart a tile, ran at ~1.4 TFLOP/s
 * on the GPU host's Xeon), then every token pair walks the copy (from L2). The accumulators go to y through a 4 KiB
 * buffer, transposed ([m, t] tiles to y's [t, m] rows). One call for all of a layer's CPU experts (16 at V2-Lite's
 * default share): 3.6 TFLOP/s at ~96 tokens an expert, against ~2 for one call an expert or oneDNN (BENCHMARKS.md,
 * session 14).
 *
 * Numerics: bf16 inputs, products accumulated in fp32 (TDPBF16PS), y fp32 or rounded to bf16 (to nearest even) as
 * oneDNN's bf16 linear rounds its output. Only the summation order differs.
 *
 * hm_amx_gemm(..., emulate=1) runs the same blocking with the tile instructions written in C, so that the packing,
 * the blocking and the transposed writes are tested on CPUs without AMX (the development machines); the real tiles
 * are tested on the GPU host's Xeon. Linux lends a process AMX's tile state only on request (arch_prctl
 * ARCH_REQ_XCOMP_PERM): hm_amx_ok() asks once.
 *
 * Built by hybridmoe.experts.cpu_kernel's builder with the system C compiler (GCC >= 11 knows AMX); like moe_cpu.c
 * it binds to the OpenMP runtime torch has loaded.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hm_common.h"

#define TGTAMX __attribute__((target("amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Where the calls' time went (hm_amx_stats): calls, the activations' packing, the GEMM region's wall time, and the
 * threads' summed time copying W's rows, in tiles and writing y. For benchmarks/amx_gemm.py. */
enum { S_CALLS, S_PACK_X, S_REGION, S_ROWS, S_TILES, S_WRITE, S_N };
static int64_t stats[S_N];

static inline void stat_add(int k, int64_t v) { __atomic_fetch_add(&stats[k], v, __ATOMIC_RELAXED); }

void hm_amx_stats(int64_t *out, int reset) {
    for (int k = 0; k < S_N; k++) out[k] = __atomic_exchange_n(&stats[k], reset ? 0 : stats[k], __ATOMIC_RELAXED);
}

/* 1 if this CPU has AMX-TILE and AMX-BF16 and the kernel lent this process the tile state; asked once. */
static int amx_state = -1;
int hm_amx_ok(void) {
    if (amx_state < 0) {
        unsigned a = 0, b = 0, c = 0, d = 0;
        int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1); /* AMX-BF16, AMX-TILE */
        amx_state = cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return amx_state;
}

/* The packed activations of G groups of rows (one an expert). Group g's rows are rows off[g] .. off[g] + cnt[g] - 1
 * of the sorted order, row i of which is row idx[i] of x (idx NULL: row i); x [*, K] is bf16, or fp32 (x_f32: rounded
 * to bf16 to nearest even here), row stride ldx. They go, in the header's tile order ([np_g/16, K/32, 16, 16, 2],
 * np_g = cnt[g] rounded up to 16, padding tokens zero), to xp + xpo[g] (elements). One B tile a work item: 16 tokens'
 * 32 inputs in, a 1 KiB tile out. tiles0 [G + 1]: the groups' first token tile in a running count (filled here). */
void hm_amx_pack(const void *x, int x_f32, int64_t ldx, int64_t K, const int64_t *idx, const int64_t *off,
                 const int64_t *cnt, int64_t G, uint16_t *xp, const int64_t *xpo, int64_t *tiles0, int threads) {
    const int64_t t_enter = now_ns(), ks_n = K / 32;
    tiles0[0] = 0;
    for (int64_t g = 0; g < G; g++) tiles0[g + 1] = tiles0[g] + (cnt[g] + 15) / 16;
    const int64_t items = tiles0[G] * ks_n;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < items; i++) {
        const int64_t tile = i / ks_n, ks = i % ks_n;
        int64_t g = 0;
        while (tiles0[g + 1] <= tile) g++; /* G is a layer's experts: a short scan */
        const int64_t tt = tile - tiles0[g];
        uint32_t run[16][16]; /* [token][pair] */
        for (int64_t t = 0; t < 16; t++) {
            if (16 * tt + t >= cnt[g]) {
                memset(run[t], 0, 64);
                continue;
            }
            const int64_t sorted = off[g] + 16 * tt + t, row = idx ? idx[sorted] : sorted;
            if (x_f32) {
                const float *src = (const float *)x + row * ldx + 32 * ks;
                uint16_t *dst = (uint16_t *)run[t];
                for (int c = 0; c < 32; c++) dst[c] = f32_to_bf16(src[c]);
            } else {
                memcpy(run[t], (const uint16_t *)x + row * ldx + 32 * ks, 64);
            }
        }
        uint32_t *dst = (uint32_t *)(xp + xpo[g]) + (tt * ks_n + ks) * 256; /* [pair r][token t] */
        for (int r = 0; r < 16; r++)
            for (int t = 0; t < 16; t++) dst[r * 16 + t] = run[t][r];
    }
    stat_add(S_PACK_X, now_ns() - t_enter);
}

/* What hm_amx_gemm does beyond the tiles (benchmarks/amx_gemm.py --variants compares them in one process):
 *   AMX_PF_TILES  prefetch (to L1) the A and B tiles two k-steps ahead, within the k loop;
 *   AMX_NEXT_ROWS prefetch (to L2) the thread's next block of W's rows while its first token pair runs. */
enum { AMX_PF_TILES = 1, AMX_NEXT_ROWS = 2 };
static int variant = 1; /* amx.VARIANT sets it */
void hm_amx_set_variant(int v) { variant = v; }

/* The tile instructions in C (emulate=1): eight 1 KiB tiles a thread. */
typedef struct {
    _Alignas(64) uint8_t t[8][16][64];
} Tiles;

static void emu_load(Tiles *s, int i, const void *p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy(s->t[i][r], (const char *)p + r * stride, 64);
}
static void emu_store(Tiles *s, int i, void *p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, s->t[i][r], 64);
}
static void emu_dp(Tiles *s, int c, int a, int b) { /* C[m][n] += sum_k A[m][2k:2k+2] . B[k][2n:2n+2] */
    float *C = (float *)s->t[c];
    const uint16_t *A = (const uint16_t *)s->t[a], *B = (const uint16_t *)s->t[b];
    for (int m = 0; m < 16; m++)
        for (int nn = 0; nn < 16; nn++) {
            float acc = C[m * 16 + nn];
            for (int k = 0; k < 16; k++)
                acc += bf16_to_f32(A[m * 32 + 2 * k]) * bf16_to_f32(B[k * 32 + 2 * nn]) +
                       bf16_to_f32(A[m * 32 + 2 * k + 1]) * bf16_to_f32(B[k * 32 + 2 * nn + 1]);
            C[m * 16 + nn] = acc;
        }
}

/* A 32-row block of W (16 rows when rows == 16) copied into tile order: ap[(k/32) * 1024 + i * 512 + r * 32 + c] =
 * W[m0 + 16i + r, k + c], so that every A tile is 1 KiB of contiguous bytes. Each row is read once, front to back
 * (one sequential stream from RAM), and the tiles then load from L2 for every token pair. Tiles of a missing half
 * (rows == 16) are not written and not read. */
static void pack_rows(const uint16_t *w, int64_t ldw, int64_t K, int64_t m0, int rows, uint16_t *ap) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *src = w + (m0 + r) * ldw;
        uint16_t *dst = ap + (r / 16) * 512 + (r % 16) * 32;
        for (int64_t k = 0; k < K; k += 32) memcpy(dst + k * 32, src + k, 64); /* (k/32) * 1024 = k * 32 */
    }
}

/* The packed block (pack_rows) against token tiles t0/16 and t0/16 + 1 (only t0/16 when cols == 16), K in steps of
 * 32; accumulators to buf [4][16][16] fp32 (tile 2i + j: rows 16i, tokens 16j). The same body for the tiles and
 * their emulation (tile numbers must be literals). A tail's missing half repeats the other (its results are not
 * written out). `next` (or NULL): the thread's next block of W (rows of stride ldw, nrows of them), of which each
 * k-step here prefetches its 64 bytes of every row into L2, so that that block's pack_rows reads from L2. */
#define BLOCK_BODY(ZERO, LOAD, DP, STORE)                                                                        \
    const int64_t a1 = rows == 32 ? 512 : 0, ks_n = K / 32;                                                     \
    const uint16_t *b0 = xp + (t0 / 16) * ks_n * 512, *b1 = cols == 32 ? b0 + ks_n * 512 : b0;                  \
    const int pf_tiles = variant & AMX_PF_TILES;                                                                \
    ZERO(4); ZERO(5); ZERO(6); ZERO(7);                                                                         \
    for (int64_t k = 0; k < K; k += 32) {                                                                       \
        const uint16_t *a = ap + k * 32, *bk0 = b0 + k * 16, *bk1 = b1 + k * 16; /* 1 KiB a tile */             \
        if (next)                                                                                               \
            for (int r = 0; r < nrows; r++) _mm_prefetch((const char *)(next + r * ldw + k), _MM_HINT_T1);      \
        if (pf_tiles && k + 64 < K)                                                                             \
            for (int l = 0; l < 1024; l += 64) {                                                                \
                _mm_prefetch((const char *)(a + 2048) + l, _MM_HINT_T0);                                        \
                _mm_prefetch((const char *)(a + 2048 + a1) + l, _MM_HINT_T0);                                   \
                _mm_prefetch((const char *)(bk0 + 1024) + l, _MM_HINT_T0);                                      \
                _mm_prefetch((const char *)(bk1 + 1024) + l, _MM_HINT_T0);                                      \
            }                                                                                                   \
        LOAD(0, a, 64); LOAD(1, a + a1, 64); LOAD(2, bk0, 64); LOAD(3, bk1, 64);                                \
        DP(4, 0, 2); DP(5, 0, 3); DP(6, 1, 2); DP(7, 1, 3);                                                     \
    }                                                                                                           \
    STORE(4, buf, 64); STORE(5, buf + 256, 64); STORE(6, buf + 512, 64); STORE(7, buf + 768, 64);

#define AMX_ZERO(i) _tile_zero(i)
#define AMX_LOAD(i, p, s) _tile_loadd(i, p, s)
#define AMX_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define AMX_STORE(i, p, s) _tile_stored(i, p, s)
#define EMU_ZERO(i) memset(s->t[i], 0, 1024)
#define EMU_LOAD(i, p, s_) emu_load(s, i, p, s_)
#define EMU_DP(c, a, b) emu_dp(s, c, a, b)
#define EMU_STORE(i, p, s_) emu_store(s, i, p, s_)

TGTAMX static void block_amx(const uint16_t *ap, int rows, int64_t K, const uint16_t *xp, int64_t np, int64_t t0,
                             int cols, float *buf, const uint16_t *next, int64_t ldw, int nrows) {
    BLOCK_BODY(AMX_ZERO, AMX_LOAD, AMX_DP, AMX_STORE)
}

static void block_emu(Tiles *s, const uint16_t *ap, int rows, int64_t K, const uint16_t *xp, int64_t np, int64_t t0,
                      int cols, float *buf, const uint16_t *next, int64_t ldw, int nrows) {
    BLOCK_BODY(EMU_ZERO, EMU_LOAD, EMU_DP, EMU_STORE)
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig; /* the 64-byte operand of LDTILECFG */

TGTAMX static void amx_begin(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
}

TGTAMX static void amx_end(void) { _tile_release(); }

/* Per-thread scratch, kept between calls (OpenMP's threads live as long as the process): the packed A block, the
 * accumulators' buffer, the emulated tiles. */
static __thread uint16_t *scratch_ap;
static __thread int64_t scratch_k;
static __thread float *scratch_buf;
static __thread Tiles *scratch_tiles;

static int scratch(int64_t K, int emulate) {
    if (scratch_k < K) {
        free(scratch_ap);
        scratch_ap = aligned_alloc(64, (size_t)K * 64); /* 32 rows x K bf16 */
        scratch_k = scratch_ap ? K : 0;
    }
    if (!scratch_buf) scratch_buf = aligned_alloc(64, 4 * 256 * sizeof(float));
    if (emulate && !scratch_tiles) scratch_tiles = aligned_alloc(64, sizeof(Tiles));
    return scratch_ap && scratch_buf && (scratch_tiles || !emulate);
}

/* G groups' GEMMs in one parallel region: for group g, y[off[g] + t, m] = sum_k W_g[m, k] x_g[t, k] for t < cnt[g],
 * m < M, where W_g = w + wo[g] (elements; bf16 [M, K], row stride ldw) and x_g is packed at xp + xpo[g]
 * (hm_amx_pack); y (row stride ldy) fp32, or bf16 (rounded to nearest even) when y_bf16. The work items are every
 * group's 32-row blocks. Returns 0; 1 if AMX is not usable here (hm_amx_ok; emulate needs no AMX), 2 if the shapes
 * do not tile (M % 16, K % 32), 3 if memory ran out. */
int hm_amx_gemm(const uint16_t *w, const int64_t *wo, int64_t ldw, int64_t M, int64_t K, const uint16_t *xp,
                const int64_t *xpo, const int64_t *off, const int64_t *cnt, int64_t G, void *y, int64_t ldy,
                int y_bf16, int emulate, int threads) {
    if (M % 16 || K % 32) return 2;
    if (!emulate && !hm_amx_ok()) return 1;
    const int64_t blocks = (M + 31) / 32, items = blocks * G, t_enter = now_ns();
    int64_t counter = 0;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int64_t t_rows = 0, t_tiles = 0, t_write = 0;
        const int ok = scratch(K, emulate);
        if (!ok) __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        if (ok && !emulate) amx_begin();
        uint16_t *ap = scratch_ap;
        float *buf = scratch_buf;
        /* Items handed out one at a time (dynamic), each thread taking its next one before it starts the current,
         * so that it knows which rows to prefetch (AMX_NEXT_ROWS). */
        int64_t it = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
        while (ok && it < items) {
            const int64_t nit = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
            const int64_t g = it / blocks, m0 = it % blocks * 32, n = cnt[g], np = (n + 15) / 16 * 16;
            const int rows = M - m0 >= 32 ? 32 : 16;
            const uint16_t *wg = w + wo[g], *xg = xp + xpo[g];
            const uint16_t *next = NULL;
            int nrows = 0;
            if (nit < items && (variant & AMX_NEXT_ROWS)) {
                const int64_t nm0 = nit % blocks * 32;
                next = w + wo[nit / blocks] + nm0 * ldw;
                nrows = M - nm0 >= 32 ? 32 : 16;
            }
            int64_t t = now_ns();
            pack_rows(wg, ldw, K, m0, rows, ap);
            t_rows += now_ns() - t;
            for (int64_t t0 = 0; t0 < np; t0 += 32) {
                const int cols = np - t0 >= 32 ? 32 : 16;
                const uint16_t *pf = t0 ? NULL : next;
                t = now_ns();
                if (emulate)
                    block_emu(scratch_tiles, ap, rows, K, xg, np, t0, cols, buf, pf, ldw, nrows);
                else
                    block_amx(ap, rows, K, xg, np, t0, cols, buf, pf, ldw, nrows);
                t_tiles += now_ns() - t;
                t = now_ns();
                for (int i = 0; i < rows / 16; i++) /* tile (i, j): W rows m0 + 16i.., tokens t0 + 16j.. */
                    for (int j = 0; j < cols / 16; j++)
                        for (int c = 0; c < 16 && t0 + 16 * j + c < n; c++) {
                            const float *src = buf + (2 * i + j) * 256 + c;
                            const int64_t at = (off[g] + t0 + 16 * j + c) * ldy + m0 + 16 * i;
                            if (y_bf16)
                                for (int r = 0; r < 16; r++) ((uint16_t *)y)[at + r] = f32_to_bf16(src[r * 16]);
                            else
                                for (int r = 0; r < 16; r++) ((float *)y)[at + r] = src[r * 16];
                        }
                t_write += now_ns() - t;
            }
            it = nit;
        }
        if (ok && !emulate) amx_end();
        stat_add(S_ROWS, t_rows);
        stat_add(S_TILES, t_tiles);
        stat_add(S_WRITE, t_write);
    }
    stat_add(S_REGION, now_ns() - t_enter);
    stat_add(S_CALLS, 1);
    return failed ? 3 : 0;
}

/* The split's last step, for the rows the grouped GEMMs computed (plain C, no tiles): out [T, H] fp32, row t = the sum
 * over the slots i routed to token t, in slot order, of w[i] * y[i, :], zero for tokens with none. Bitwise torch's
 * y *= w[:, None]; out.zero_(); out.index_add_(0, tok, y) (each product rounded, then 0 + p + p' + ... in slot
 * order; no contraction into fused multiply-adds), but parallel: by_tok [S] orders the slots by token, stably, and
 * starts [T + 1] is each token's first entry in it, so each thread writes whole rows of its own. */
__attribute__((optimize("fp-contract=off"))) void hm_scatter_rows(float *out, int64_t T, int64_t H, const float *y,
                                                                  const int64_t *by_tok, const int64_t *starts,
                                                                  const float *w, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * H;
        const int64_t a = starts[t], b = starts[t + 1];
        if (a == b) {
            memset(o, 0, (size_t)H * sizeof(float));
            continue;
        }
        const float w0 = w[by_tok[a]], *y0 = y + by_tok[a] * H;
        for (int64_t c = 0; c < H; c++) {
            const float p = y0[c] * w0;
            o[c] = 0.f + p; /* as index_add_ into zeros: -0 becomes +0 */
        }
        for (int64_t i = a + 1; i < b; i++) {
            const float wi = w[by_tok[i]], *yi = y + by_tok[i] * H;
            for (int64_t c = 0; c < H; c++) {
                const float p = yi[c] * wi;
                o[c] += p;
            }
        }
    }
}
