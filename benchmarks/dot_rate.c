/* The CPU kernel's dot products by themselves: bytes of weights a second, one thread from cache and every thread
 * from RAM. Separates the kernel's arithmetic (the cache-resident rate: what one core can consume) from the
 * memory system (the RAM rate), which benchmarks/decode_gemv.py measures together.
 *
 *   cc -O3 -fopenmp benchmarks/dot_rate.c -o /tmp/dot_rate -lm && /tmp/dot_rate THREADS INPUTS ISA PREFETCH MIB
 *   (defaults: every thread, 2048 inputs a row, the best instruction set (2: AVX-512, 1: AVX2), 4096 bytes ahead,
 *   256 MiB of weights a thread from RAM)
 *
 * Each line: {"dot": ..., "set": "cache"|"ram", "threads": ..., "GBps": ...}. The weights are random bytes; the
 * dots walk the rows as the kernel's proj_rows does (4-bit: tiles of four consecutive rows). */
#include "../src/hybridmoe/experts/moe_cpu.c"

#include <omp.h>
#include <stdio.h>

static double seconds(void) { return now_ns() * 1e-9; }

/* One pass over nrows rows of `in` inputs at w (row stride rb bytes), as proj_rows walks them; returns a checksum. */
static float pass(int kind, const uint8_t *w, const uint16_t *sc, int64_t nrows, int64_t in, int64_t group,
                  const QAct *qa, const float *xf, const uint16_t *xb, const int8_t *lut2) {
    float sum = 0.f;
    if (kind <= W_I8) {
        static const size_t elem[3] = {4, 2, 1};
        for (int64_t r = 0; r < nrows; r++) sum += dots[kind](w + (size_t)r * in * elem[kind], xb, xf, in);
        return sum;
    }
    const int64_t rb = in / 2, sb = in / group;
    for (int64_t r = 0; r < nrows; r += 4) {
        const uint8_t *wp[4];
        const uint16_t *sp[4];
        float o[4];
        for (int k = 0; k < 4; k++) wp[k] = w + (r + k) * rb, sp[k] = sc + (r + k) * sb;
        dotq_rows(wp, sp, qa, in, group, kind == W_P4 ? NULL : lut2, o); /* kind W_P4 + 1: MXFP4 */
        sum += o[0] + o[1] + o[2] + o[3];
    }
    return sum;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : omp_get_max_threads();
    const int64_t in = argc > 2 ? atoll(argv[2]) : 2048;
    const int isa = hm_set_isa(argc > 3 ? atoi(argv[3]) : 2);
    hm_set_prefetch(argc > 4 ? atoll(argv[4]) : 4096);
    const size_t ram_bytes = (size_t)(argc > 5 ? atoll(argv[5]) : 256) << 20;
    const char *names[5] = {"f32", "bf16", "int8", "int4g64", "mxfp4g32"};
    const size_t elem_bytes2[5] = {8, 4, 2, 1, 1}; /* twice the bytes of a weight */
    float *xf = malloc(in * sizeof(float));
    uint16_t *xb = malloc(in * 2);
    int8_t *q = malloc(in), *qm = malloc(in);
    int32_t *negc = malloc(in / 8 * sizeof(int32_t) + 64), *negcm = malloc(in / 8 * sizeof(int32_t) + 64);
    float qs[4096], qsum[4096], qsm[4096], qsumm[4096];
    for (int64_t i = 0; i < in; i++) xf[i] = (float)((i * 7919) % 255) / 255.f - 0.5f, xb[i] = f32_to_bf16(xf[i]);
    quant_act(xf, in, 64, q, qs, qsum, q_wide_for(64), QOFF_INT4, negc);   /* int4 in groups of 64 */
    quant_act(xf, in, 32, qm, qsm, qsumm, q_wide_for(32), QOFF_TABLE, negcm); /* MXFP4: groups of 32 */
    const int8_t lut2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
    for (int set = 0; set < 2; set++) {
        const int nt = set == 0 ? 1 : threads;
        const size_t per_thread = set == 0 ? (size_t)256 << 10 : ram_bytes; /* bytes of weights */
        for (int kind = 0; kind < 5; kind++) {
            const int64_t group = kind == 4 ? 32 : 64;
            const int64_t rowbytes = in * elem_bytes2[kind] / 2, nrows = (int64_t)(per_thread / rowbytes) & ~3;
            QAct qa = kind == 4 ? (QAct){qm, qsm, qsumm, negcm, q_wide_for(32)} : (QAct){q, qs, qsum, negc, q_wide_for(64)};
            double best = 1e30;
            float check = 0.f;
            for (int rep = 0; rep < 3; rep++) {
                double t = 0.;
#pragma omp parallel num_threads(nt) reduction(+ : check) reduction(max : t)
                {
                    uint8_t *w = aligned_alloc(4096, (size_t)nrows * rowbytes);
                    uint16_t *sc = malloc((size_t)nrows * (in / group) * 2 + 64);
                    for (size_t b = 0; b < (size_t)nrows * rowbytes; b++) w[b] = (uint8_t)(b * 131 + 7);
                    for (int64_t k = 0; k < nrows * (in / group); k++) sc[k] = 0x3c00; /* bf16 0.0078 */
                    if (kind < 3) /* finite weights for the float kinds: small bf16/fp32 values */
                        for (size_t b = 0; b < (size_t)nrows * rowbytes; b += elem_bytes2[kind] / 2)
                            if (kind == 1) ((uint16_t *)w)[b / 2] = 0x3c00 + (b & 0xff);
                            else if (kind == 0) ((float *)w)[b / 4] = 0.01f;
                    const int passes = set == 0 ? 400 : 3;
                    check += pass(kind, w, sc, nrows, in, group, &qa, xf, xb, lut2); /* warm */
#pragma omp barrier
                    const double t0 = seconds();
                    for (int p = 0; p < passes; p++) check += pass(kind, w, sc, nrows, in, group, &qa, xf, xb, lut2);
                    const double dt = (seconds() - t0) / passes;
#pragma omp barrier
                    t = dt;
                    free(w), free(sc);
                }
                if (t < best) best = t;
            }
            const double bytes = (double)nrows * rowbytes * nt + (kind >= 3 ? (double)nrows * (in / group) * 2 * nt : 0);
            printf("{\"bench\": \"dot_rate\", \"dot\": \"%s\", \"isa\": %d, \"set\": \"%s\", \"threads\": %d, "
                   "\"inputs\": %lld, \"prefetch\": %lld, \"GBps\": %.2f, \"check\": %g}\n",
                   names[kind], isa, set == 0 ? "cache" : "ram", nt, (long long)in, (long long)prefetch_bytes, bytes / best / 1e9, check);
            fflush(stdout);
        }
    }
    return 0;
}
