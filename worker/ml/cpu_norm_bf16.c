/* A residual add and the LayerNorm after it, in one pass, for bf16 tensors on CPUs with
   AVX512-BF16: out = layer_norm(x + residual) * weight + bias, row by row.

   The sum is rounded to bf16 before it is normalised, as torch's separate add does, so the
   output matches the unfused model's bit for bit on nearly every element; the mean and the
   variance (two passes over the row, held in L1) are fp32. Threads: torch's OpenMP pool, as
   the attention kernel's.

   Built and loaded at run time by cpu_norm.py, which says why it is here. */
#include <immintrin.h>
#include <stdint.h>

#define WIDEST 4096

static inline __m512 widen(const uint16_t *p) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

static inline __m512 to_bf16_and_back(__m512 x) {
    const __m512i bits = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

/* x, residual, out: [rows][width], contiguous; weight, bias: [width]. width: a multiple of 16
   up to WIDEST (else 1, nothing written). */
int tuneq_add_layer_norm_bf16(const uint16_t *x, const uint16_t *residual,
                              const uint16_t *weight, const uint16_t *bias, uint16_t *out,
                              long rows, long width, float eps) {
    if (width % 16 || width > WIDEST || width <= 0) return 1;
#pragma omp parallel for schedule(static)
    for (long i = 0; i < rows; i++) {
        float y[WIDEST] __attribute__((aligned(64)));
        const uint16_t *a = x + i * width, *b = residual + i * width;
        __m512 sum = _mm512_setzero_ps();
        for (long c = 0; c < width; c += 16) {
            const __m512 v = to_bf16_and_back(_mm512_add_ps(widen(a + c), widen(b + c)));
            _mm512_store_ps(y + c, v);
            sum = _mm512_add_ps(sum, v);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / width);
        __m512 squares = _mm512_setzero_ps();
        for (long c = 0; c < width; c += 16) {
            const __m512 d = _mm512_sub_ps(_mm512_load_ps(y + c), mean);
            squares = _mm512_fmadd_ps(d, d, squares);
        }
        const float variance = _mm512_reduce_add_ps(squares) / width;
        const __m512 rstd = _mm512_set1_ps(1.0f / __builtin_sqrtf(variance + eps));
        uint16_t *o = out + i * width;
        for (long c = 0; c < width; c += 16) {
            __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(y + c), mean), rstd);
            n = _mm512_fmadd_ps(n, widen(weight + c), widen(bias + c));
            _mm256_storeu_si256((__m256i *)(o + c), (__m256i)_mm512_cvtneps_pbh(n));
        }
    }
    return 0;
}
