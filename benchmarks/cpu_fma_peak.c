/* One core's FP32 FMA peak, measured: `python benchmarks/cpu_peak.py` compiles and runs this.
 * Each kernel keeps 16 independent accumulator chains (more than FMA latency x issue width on current x86 cores),
 * so the loop is bound by FMA throughput alone; 2 FLOP per lane per FMA. */
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define CHAINS 16
#define RUN(VEC, SET1, FMA, ADD, STORE, LANES)                                                          \
    do {                                                                                            \
        VEC acc[CHAINS];                                                                            \
        const VEC a = SET1(0.999999f), b = SET1(1e-7f);                                             \
        for (int c = 0; c < CHAINS; ++c) acc[c] = SET1((float)c);                                   \
        const double t0 = now();                                                                    \
        for (long i = 0; i < iters; ++i)                                                            \
            for (int c = 0; c < CHAINS; ++c) acc[c] = FMA(acc[c], a, b);                            \
        const double dt = now() - t0;                                                               \
        VEC s = acc[0];                                                                             \
        for (int c = 1; c < CHAINS; ++c) s = ADD(s, acc[c]);                                        \
        float out[LANES];                                                                           \
        STORE(out, s);                                                                              \
        sink += out[0];                                                                             \
        return 2.0 * LANES * CHAINS * (double)iters / dt / 1e9;                                     \
    } while (0)

static volatile float sink;

__attribute__((target("avx512f"))) static double peak_avx512(long iters) {
    RUN(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps, 16);
}

__attribute__((target("avx2,fma"))) static double peak_avx2(long iters) {
    RUN(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps, 8);
}

int main(int argc, char** argv) {
    const long iters = 20000000;
    const int reps = 5;
    __builtin_cpu_init();
    const int has512 = __builtin_cpu_supports("avx512f"), has2 = __builtin_cpu_supports("avx2") &&
                                                             __builtin_cpu_supports("fma");
    for (int isa = 0; isa < 2; ++isa) {
        if ((isa == 0 && !has512) || (isa == 1 && !has2)) continue;
        double best = 0;
        for (int r = 0; r < reps; ++r) {
            const double g = isa == 0 ? peak_avx512(iters) : peak_avx2(iters);
            if (g > best) best = g;
        }
        printf("%s %.1f\n", isa == 0 ? "avx512" : "avx2", best);
    }
    (void)argc;
    (void)argv;
    return 0;
}
