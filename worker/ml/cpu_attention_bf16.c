/* Bidirectional attention over a key-padding mask for CPUs with AVX512-BF16: bf16 in and out,
   products accumulated in fp32 by vdpbf16ps, an exact fp32 softmax, heads of 32 or 64.

   One task per (batch row, head, block of query rows). The head's keys and values are repacked
   into the pair-interleaved layout vdpbf16ps reads; each group of four query rows gets its
   scores for every key (a few KiB, in L1/L2: the whole score matrix is never written), their
   softmax, then the weighted sum of values. Threads: the OpenMP pool of the process, which is
   torch's own (its libgomp is loaded first and this library takes it by soname).

   Built and loaded at run time by cpu_attention.py, which says why it is here. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROWS 4        /* query rows sharing each key/value load */
#define BLOCK 64      /* query rows per task */
#define MASKED -1e30f

static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.3888889e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3333338e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1666668e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666667e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* A head's keys and values in the pair-interleaved layouts vdpbf16ps and AMX read, zero past
   lk up to width keys: keys as block b of 16, dim pair t, key j -> kp[(b * D/2 + t) * 16 + j];
   values as key pair p, dim d -> vp[p * D + d] = (v[2p][d], v[2p+1][d]). */
static inline __attribute__((always_inline)) void pack_keys_values(
    const uint16_t *k, const uint16_t *v, long lk, long width, long ks, long vs, const int D,
    uint32_t *kp, uint32_t *vp) {
    const int half = D / 2;
    for (long j = 0; j < width; j++)
        for (int t = 0; t < half; t++)
            kp[((j / 16) * half + t) * 16 + j % 16] =
                j < lk ? ((const uint32_t *)(k + j * ks))[t] : 0;
    for (long p = 0; p < width / 2; p++) {
        const uint16_t *a = 2 * p < lk ? v + 2 * p * vs : NULL;
        const uint16_t *b = 2 * p + 1 < lk ? v + (2 * p + 1) * vs : NULL;
        for (int d = 0; d < D; d++)
            vp[p * D + d] = (a ? a[d] : 0) | (uint32_t)(b ? b[d] : 0) << 16;
    }
}

static inline __attribute__((always_inline)) void head_block(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, const uint8_t *keep,
    long lk, long row0, long row1, long qs, long ks, long vs, long os, float scale,
    const int D, uint32_t *kp, uint32_t *vp, float *scores, uint32_t *probs) {
    const long blocks = (lk + 15) / 16, pairs = (lk + 1) / 2, width = blocks * 16;
    const int half = D / 2, chunks = D / 16;
    pack_keys_values(k, v, lk, width, ks, vs, D, kp, vp);
    for (long i0 = row0; i0 < row1; i0 += ROWS) {
        const int rows = i0 + ROWS <= row1 ? ROWS : (int)(row1 - i0);
        const uint32_t *qr[ROWS];
        for (int r = 0; r < ROWS; r++) qr[r] = (const uint32_t *)(q + (i0 + (r < rows ? r : 0)) * qs);
        for (long b = 0; b < blocks; b++) {
            __m512 acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
            for (int t = 0; t < half; t++) {
                __m512bh kz = (__m512bh)_mm512_loadu_si512(kp + (b * half + t) * 16);
                for (int r = 0; r < ROWS; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], kz, (__m512bh)_mm512_set1_epi32(qr[r][t]));
            }
            __mmask16 live = 0;
            for (int j = 0; j < 16; j++) {
                long key = b * 16 + j;
                if (key < lk && (!keep || keep[key])) live |= (__mmask16)(1u << j);
            }
            for (int r = 0; r < ROWS; r++)
                _mm512_storeu_ps(scores + r * width + b * 16,
                                 _mm512_mask_mul_ps(_mm512_set1_ps(MASKED), live, acc[r],
                                                    _mm512_set1_ps(scale)));
        }
        float total[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *s = scores + r * width;
            __m512 m = _mm512_set1_ps(MASKED);
            for (long b = 0; b < blocks; b++) m = _mm512_max_ps(m, _mm512_loadu_ps(s + b * 16));
            __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sum = _mm512_setzero_ps();
            for (long b = 0; b < blocks; b++) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + b * 16), top));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(s + b * 16, e);
            }
            total[r] = _mm512_reduce_add_ps(sum);
            /* probabilities as bf16 pairs (key 2p, key 2p+1); the tail past lk is 0 */
            uint32_t *pr = probs + r * (width / 2);
            for (long b = 0; b < blocks; b++) {
                __m512bh two = _mm512_cvtne2ps_pbh(_mm512_setzero_ps(), _mm512_loadu_ps(s + b * 16));
                _mm256_storeu_si256((__m256i *)(pr + b * 8), _mm512_castsi512_si256((__m512i)two));
            }
        }
        __m512 acc[ROWS][4];
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_setzero_ps();
        for (long p = 0; p < pairs; p++) {
            __m512bh vz[4];
            for (int c = 0; c < chunks; c++) vz[c] = (__m512bh)_mm512_loadu_si512(vp + p * D + c * 16);
            for (int r = 0; r < ROWS; r++) {
                __m512bh w = (__m512bh)_mm512_set1_epi32(probs[r * (width / 2) + p]);
                for (int c = 0; c < chunks; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vz[c], w);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m512 inv = _mm512_set1_ps(1.0f / total[r]);
            uint16_t *o = out + (i0 + r) * os;
            for (int c = 0; c < chunks; c++) {
                __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], inv));
                _mm256_storeu_si256((__m256i *)(o + c * 16), (__m256i)h);
            }
        }
    }
}

/* q, k, v: [batch][head][row][dim] by the given strides (in elements, dim contiguous); out:
   [batch][row][head][dim] contiguous; keep: [batch][lk] (1: attend), or NULL. D: 32 or 64. */
int tuneq_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                         const uint8_t *keep, long batch, long heads, long lq, long lk, long D,
                         const long *qst, const long *kst, const long *vst, float scale) {
    if (D != 32 && D != 64) return 1;
    const long blocks = (lq + BLOCK - 1) / BLOCK, tasks = batch * heads * blocks;
    const long width = (lk + 15) / 16 * 16;
    int failed = 0;
#pragma omp parallel
    {
        uint32_t *kp = malloc(width * D * 2), *vp = malloc(width * D * 2);
        float *scores = malloc(ROWS * width * sizeof(float));
        uint32_t *probs = malloc(ROWS * width * 2);
        if (!kp || !vp || !scores || !probs) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            long b = task / (heads * blocks), h = task / blocks % heads, blk = task % blocks;
            long row0 = blk * BLOCK, row1 = row0 + BLOCK < lq ? row0 + BLOCK : lq;
            const uint16_t *qh = q + b * qst[0] + h * qst[1], *kh = k + b * kst[0] + h * kst[1];
            const uint16_t *vh = v + b * vst[0] + h * vst[1];
            uint16_t *oh = out + (b * lq * heads + h) * D;
            const uint8_t *kb = keep ? keep + b * lk : NULL;
            if (D == 32)
                head_block(qh, kh, vh, oh, kb, lk, row0, row1, qst[2], kst[2], vst[2],
                           heads * D, scale, 32, kp, vp, scores, probs);
            else
                head_block(qh, kh, vh, oh, kb, lk, row0, row1, qst[2], kst[2], vst[2],
                           heads * D, scale, 64, kp, vp, scores, probs);
        }
        free(kp); free(vp); free(scores); free(probs);
    }
    return failed ? 2 : 0;
}

/* The same attention with both products in AMX tiles (Intel Sapphire Rapids and later): one
   task per (batch row, head, 16 query rows); Q·Kᵀ as 16×16 fp32 tiles from the keys in the
   pair-interleaved layout above, the softmax in AVX-512 as before, P·V as 16×16 tiles from the
   values' pair layout. Tiles: 0-3 the output (16 dims each), 4 the probabilities, 5 keys or
   values, 6-7 the query rows (32 dims each). */
typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static inline __attribute__((always_inline)) void head_block_amx(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, const uint8_t *keep,
    long lq, long lk, long qs, long ks, long vs, long os, float scale, const int D,
    uint32_t *kp, uint32_t *vp, float *scores, uint32_t *probs, uint16_t *qt, float *ot) {
    const long width = (lk + 31) / 32 * 32, blocks = width / 16, pairs = width / 2;
    const int half = D / 2, chunks = D / 16;
    pack_keys_values(k, v, lk, width, ks, vs, D, kp, vp);
    __mmask16 live[blocks];
    for (long b = 0; b < blocks; b++) {
        live[b] = 0;
        for (int j = 0; j < 16; j++) {
            long key = b * 16 + j;
            if (key < lk && (!keep || keep[key])) live[b] |= (__mmask16)(1u << j);
        }
    }
    for (long i0 = 0; i0 < lq; i0 += 16) {
        const int rows = i0 + 16 <= lq ? 16 : (int)(lq - i0);
        for (int r = 0; r < 16; r++) {
            if (r < rows) memcpy(qt + r * D, q + (i0 + r) * qs, D * 2);
            else memset(qt + r * D, 0, D * 2);
        }
        _tile_loadd(6, qt, D * 2);
        if (D == 64) _tile_loadd(7, qt + 32, D * 2);
        for (long b = 0; b < blocks; b++) {
            _tile_zero(0);
            _tile_loadd(5, kp + b * half * 16, 64);
            _tile_dpbf16ps(0, 6, 5);
            if (D == 64) {
                _tile_loadd(5, kp + (b * half + 16) * 16, 64);
                _tile_dpbf16ps(0, 7, 5);
            }
            _tile_stored(0, scores + b * 16, width * 4);
        }
        float total[16];
        const __m512 sc = _mm512_set1_ps(scale);
        for (int r = 0; r < 16; r++) {
            /* exp((s - max) * scale) over the live keys, as bf16 pairs; dead keys are 0 */
            const float *s = scores + r * width;
            __m512 m = _mm512_set1_ps(MASKED);
            for (long b = 0; b < blocks; b++)
                m = _mm512_mask_max_ps(m, live[b], m, _mm512_loadu_ps(s + b * 16));
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m) * scale);
            __m512 sum = _mm512_setzero_ps();
            uint32_t *pr = probs + r * pairs;
            for (long b = 0; b < blocks; b += 2) {
                __m512 e0 = _mm512_maskz_mov_ps(
                    live[b], exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + b * 16), sc, top)));
                __m512 e1 = _mm512_maskz_mov_ps(
                    live[b + 1], exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + b * 16 + 16), sc, top)));
                sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                _mm512_storeu_si512(pr + b * 8, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            total[r] = _mm512_reduce_add_ps(sum);
        }
        for (int c = 0; c < chunks; c++) {
            switch (c) {
                case 0: _tile_zero(0); break;
                case 1: _tile_zero(1); break;
                case 2: _tile_zero(2); break;
                default: _tile_zero(3); break;
            }
        }
        for (long p0 = 0; p0 < pairs; p0 += 16) {
            _tile_loadd(4, probs + p0, pairs * 4);
            _tile_loadd(5, vp + p0 * D, D * 4);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(5, vp + p0 * D + 16, D * 4);
            _tile_dpbf16ps(1, 4, 5);
            if (D == 64) {
                _tile_loadd(5, vp + p0 * D + 32, D * 4);
                _tile_dpbf16ps(2, 4, 5);
                _tile_loadd(5, vp + p0 * D + 48, D * 4);
                _tile_dpbf16ps(3, 4, 5);
            }
        }
        _tile_stored(0, ot, D * 4);
        _tile_stored(1, ot + 16, D * 4);
        if (D == 64) {
            _tile_stored(2, ot + 32, D * 4);
            _tile_stored(3, ot + 48, D * 4);
        }
        for (int r = 0; r < rows; r++) {
            __m512 inv = _mm512_set1_ps(1.0f / total[r]);
            uint16_t *o = out + (i0 + r) * os;
            for (int c = 0; c < chunks; c++) {
                __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(ot + r * D + c * 16), inv));
                _mm256_storeu_si256((__m256i *)(o + c * 16), (__m256i)h);
            }
        }
    }
}

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* As tuneq_attention_bf16, on AMX; returns 3 where the kernel refuses the process the tiles. */
int tuneq_attention_bf16_amx(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                             uint16_t *out, const uint8_t *keep, long batch, long heads, long lq,
                             long lk, long D, const long *qst, const long *kst, const long *vst,
                             float scale) {
    if (D != 32 && D != 64) return 1;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return 3;
    const long tasks = batch * heads, width = (lk + 31) / 32 * 32;
    int failed = 0;
#pragma omp parallel
    {
        tile_config config = {0};
        config.palette = 1;
        for (int t = 0; t < 8; t++) {
            config.rows[t] = 16;
            config.colsb[t] = 64;
        }
        _tile_loadconfig(&config);
        uint32_t *kp = malloc(width * D * 2), *vp = malloc(width * D * 2);
        float *scores = malloc(16 * width * sizeof(float)), *ot = malloc(16 * D * sizeof(float));
        uint32_t *probs = malloc(16 * width * 2);
        uint16_t *qt = malloc(16 * D * 2);
        if (!kp || !vp || !scores || !probs || !qt || !ot) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long task = 0; task < tasks; task++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            long b = task / heads, h = task % heads;
            const uint16_t *qh = q + b * qst[0] + h * qst[1], *kh = k + b * kst[0] + h * kst[1];
            const uint16_t *vh = v + b * vst[0] + h * vst[1];
            uint16_t *oh = out + (b * lq * heads + h) * D;
            const uint8_t *kb = keep ? keep + b * lk : NULL;
            if (D == 32)
                head_block_amx(qh, kh, vh, oh, kb, lq, lk, qst[2], kst[2], vst[2], heads * D,
                               scale, 32, kp, vp, scores, probs, qt, ot);
            else
                head_block_amx(qh, kh, vh, oh, kb, lq, lk, qst[2], kst[2], vst[2], heads * D,
                               scale, 64, kp, vp, scores, probs, qt, ot);
        }
        free(kp); free(vp); free(scores); free(probs); free(qt); free(ot);
        _tile_release();
    }
    return failed ? 2 : 0;
}
