/* Bidirectional attention over a key-padding mask for CPUs with AVX512-BF16: bf16 in and out,
   products accumulated in fp32 by vdpbf16ps, an fp32 softmax (its exponential good to 7.5e-5,
   far finer than the bf16 probabilities it makes), heads of 32 or 64.

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
/* AMX entry point: rows of scores (floats) and of probabilities (key pairs) are this much longer
   than they need: at 512 keys a power-of-two stride put 32 rows' lines in 2 of L1's sets */
#define ROW_PAD 16
#define LOG2E 1.44269504088896341f /* scores are taken in base 2: exp(x) = 2^(x log2 e) */

/* 2^t for the softmax: 2^floor(t) times a cubic in t - floor(t) (relative error 7.5e-5 at
   most, 50 times finer than the bf16 rounding of the probabilities that follows; 6 instructions
   where a 23-bit exp took 13); zero where the key is dead. */
static inline __m512 pow2_live(__mmask16 live, __m512 t) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(0.0780237540602684f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606682777404785f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958343982696533f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999250173568726f));
    return _mm512_maskz_scalef_ps(live, p, t);
}

/* One vector from 16: the max (or sum) of v[r]'s lanes lands in lane LANE(r), by a tree of
   shuffles rather than 16 reductions one after another. */
#define LANE(r) ((r) % 4 * 4 + (r) / 4)
#define TREE(name, op)                                                                         \
    static inline __m512 name(__m512 *v) {                                                    \
        __m512 w[8], z[4], u[2];                                                              \
        for (int i = 0; i < 8; i++)                                                           \
            w[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),                     \
                      _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));                    \
        for (int i = 0; i < 4; i++)                                                           \
            z[i] = op(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),                     \
                      _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));                    \
        for (int i = 0; i < 2; i++)                                                           \
            u[i] = op(_mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0x44),                        \
                      _mm512_shuffle_ps(z[2 * i], z[2 * i + 1], 0xEE));                       \
        return op(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));  \
    }
TREE(tree_max, _mm512_max_ps)
TREE(tree_add, _mm512_add_ps)

/* The first n of 16 keys (all for n >= 16, none for n <= 0), as a mask. */
static inline __mmask16 first_keys(long n) {
    return n >= 16 ? 0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
}

/* A head's keys and values in the pair-interleaved layouts vdpbf16ps and AMX read, zero past
   lk up to width keys: keys as block b of 16, dim pair t, key j -> kp[(b * D/2 + t) * 16 + j];
   values as key pair p, dim d -> vp[p * D + d] = (v[2p][d], v[2p+1][d]). */
static inline __attribute__((always_inline)) void pack_keys_values(
    const uint16_t *k, const uint16_t *v, long lk, long width, long ks, long vs, const int D,
    uint32_t *kp, uint32_t *vp) {
    const int half = D / 2;
    /* keys: dim pair t of 16 keys gathered into one register (a 16 × half transpose of
       32-bit pairs per block); keys past lk are 0 */
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)(ks / 2)));
    for (long j0 = 0; j0 < width; j0 += 16) {
        const __mmask16 in = first_keys(lk - j0);
        const uint32_t *base = (const uint32_t *)(k + j0 * ks);
        for (int t = 0; t < half; t++)
            _mm512_storeu_si512(
                kp + ((j0 / 16) * half + t) * 16,
                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, rows, base + t, 4));
    }
    /* values: rows 2p and 2p+1 interleaved by 16-bit element, 32 dims at a time */
    uint16_t order[32];
    for (int i = 0; i < 32; i++) order[i] = (uint16_t)(i / 2 + (i % 2) * 32);
    const __m512i lo = _mm512_loadu_si512(order), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const __m512i zero = _mm512_setzero_si512();
    for (long p = 0; p < width / 2; p++) {
        for (int d = 0; d < D; d += 32) {
            __m512i a = 2 * p < lk ? _mm512_loadu_si512(v + 2 * p * vs + d) : zero;
            __m512i b = 2 * p + 1 < lk ? _mm512_loadu_si512(v + (2 * p + 1) * vs + d) : zero;
            _mm512_storeu_si512(vp + p * D + d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vp + p * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
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
                                                    _mm512_set1_ps(scale * LOG2E)));
        }
        float total[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *s = scores + r * width;
            __m512 m = _mm512_set1_ps(MASKED);
            for (long b = 0; b < blocks; b++) m = _mm512_max_ps(m, _mm512_loadu_ps(s + b * 16));
            __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m)), sum = _mm512_setzero_ps();
            for (long b = 0; b < blocks; b++) {
                __m512 e = pow2_live(0xFFFF, _mm512_sub_ps(_mm512_loadu_ps(s + b * 16), top));
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
   task per (batch row, head), 16 query rows at a time (32 for heads of 32, two blocks sharing
   each key and value tile); Q·Kᵀ as 16×16 fp32 tiles from the keys in the pair-interleaved
   layout above (the query rows loaded from q itself), the softmax in AVX-512 (softmax16), P·V
   as 16×16 tiles from the values' pair layout. Tiles: 0-3 the output (16 dims each, or 2 × 32
   for two blocks), 4 (and 6) the probabilities, 5 (and 7) keys or values, 6-7 the query rows
   (32 dims each, or one block each).

   On the Xeon (2 cores, 12 heads of 32, 15 × 270 tokens) the products and the softmax take
   about equal parts of the time; a 23-bit exp and per-row reductions had made the softmax
   three fifths of it. */
typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Query rows for a tile load: straight from q for a full block of 16, or copied into qt with
   zero rows after the last; *stride is set in elements. */
static inline const uint16_t *query_rows(const uint16_t *q, long qs, int rows, const int D,
                                         uint16_t *qt, long *stride) {
    if (rows == 16) {
        *stride = qs;
        return q;
    }
    for (int r = 0; r < 16; r++) {
        if (r < rows) memcpy(qt + r * D, q + r * qs, D * 2);
        else memset(qt + r * D, 0, D * 2);
    }
    *stride = D;
    return qt;
}

/* The softmax of 16 rows of scores (fp32, row stride ss), in base 2 with the scale sc folded
   in, into probabilities as bf16 key pairs (row stride ps); returns the rows' sums, row r's
   in lane LANE(r). The 16 rows' maxima are taken side by side (16 independent chains) and
   gathered by tree_max, their sums by tree_add: no row waits on its own reduction. */
static inline __attribute__((always_inline)) __m512 softmax16(
    const float *scores, long ss, long blocks, const __mmask16 *live, __m512 sc,
    uint32_t *probs, long ps) {
    __m512 part[16];
    for (int r = 0; r < 16; r++) part[r] = _mm512_set1_ps(MASKED);
    for (long b = 0; b < blocks; b++)
        for (int r = 0; r < 16; r++)
            part[r] = _mm512_mask_max_ps(part[r], live[b], part[r],
                                         _mm512_loadu_ps(scores + r * ss + b * 16));
    const __m512 tops = _mm512_mul_ps(tree_max(part), sc);
    for (int r = 0; r < 16; r++) {
        const __m512 top = _mm512_permutexvar_ps(_mm512_set1_epi32(LANE(r)), tops);
        const float *s = scores + r * ss;
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (long b = 0; b < blocks; b += 2) {
            const __m512 e0 = pow2_live(
                live[b], _mm512_fmsub_ps(_mm512_loadu_ps(s + b * 16), sc, top));
            const __m512 e1 = pow2_live(
                live[b + 1], _mm512_fmsub_ps(_mm512_loadu_ps(s + b * 16 + 16), sc, top));
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
            _mm512_storeu_si512(probs + r * ps + b * 8,
                                (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        part[r] = _mm512_add_ps(s0, s1);
    }
    return tree_add(part);
}

/* rows of output (D dims, row stride os) from fp32 sums (row stride 64) over the rows' totals */
static inline void write_rows(const float *sums, __m512 totals, int rows, const int D,
                              uint16_t *out, long os) {
    float total[16];
    _mm512_storeu_ps(total, totals);
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / total[LANE(r)]);
        for (int c = 0; c < D / 16; c++) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(sums + r * 64 + c * 16), inv);
            _mm256_storeu_si256((__m256i *)(out + r * os + c * 16), (__m256i)_mm512_cvtneps_pbh(o));
        }
    }
}

/* The P·V sums in tiles 0-3, zeroed before and stored after (16 rows of 64 floats) */
static inline void zero_sums(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static inline void store_sums(float *ot) {
    _tile_stored(0, ot, 64 * 4);
    _tile_stored(1, ot + 16, 64 * 4);
    _tile_stored(2, ot + 32, 64 * 4);
    _tile_stored(3, ot + 48, 64 * 4);
}

static inline __attribute__((always_inline)) void head_block_amx(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, const uint8_t *keep,
    long lq, long lk, long qs, long ks, long vs, long os, float scale, const int D,
    uint32_t *kp, uint32_t *vp, float *scores, uint32_t *probs, uint16_t *qt, float *ot) {
    const long width = (lk + 31) / 32 * 32, blocks = width / 16, pairs = width / 2;
    const long ss = width + ROW_PAD, ps = pairs + ROW_PAD; /* row strides (see ROW_PAD) */
    const int half = D / 2;
    pack_keys_values(k, v, lk, width, ks, vs, D, kp, vp);
    __mmask16 live[blocks];
    for (long b = 0; b < blocks; b++) {
        const __mmask16 in = first_keys(lk - b * 16);
        live[b] = keep ? _mm_test_epi8_mask(_mm_maskz_loadu_epi8(in, keep + b * 16),
                                            _mm_set1_epi8(-1))
                       : in;
    }
    const __m512 sc = _mm512_set1_ps(scale * LOG2E);
    float *scores2 = scores + 16 * ss;
    uint32_t *probs2 = probs + 16 * ps;
    long stride;
    const uint16_t *rows_q;
    for (long i0 = 0; i0 < lq;) {
        const int rows = lq - i0 < 16 ? (int)(lq - i0) : 16;
        if (D == 32 && lq - i0 > 16) {
            /* heads of 32: two blocks of 16 query rows share each key and value tile */
            const int rows2 = lq - i0 - 16 < 16 ? (int)(lq - i0 - 16) : 16;
            _tile_loadd(6, q + i0 * qs, qs * 2);
            rows_q = query_rows(q + (i0 + 16) * qs, qs, rows2, 32, qt, &stride);
            _tile_loadd(7, rows_q, stride * 2);
            for (long b = 0; b < blocks; b++) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_loadd(5, kp + b * 16 * 16, 64);
                _tile_dpbf16ps(0, 6, 5);
                _tile_dpbf16ps(1, 7, 5);
                _tile_stored(0, scores + b * 16, ss * 4);
                _tile_stored(1, scores2 + b * 16, ss * 4);
            }
            const __m512 totals = softmax16(scores, ss, blocks, live, sc, probs, ps);
            const __m512 totals2 = softmax16(scores2, ss, blocks, live, sc, probs2, ps);
            zero_sums();
            for (long p0 = 0; p0 < pairs; p0 += 16) {
                _tile_loadd(4, probs + p0, ps * 4);
                _tile_loadd(6, probs2 + p0, ps * 4);
                _tile_loadd(5, vp + p0 * 32, 32 * 4);
                _tile_loadd(7, vp + p0 * 32 + 16, 32 * 4);
                _tile_dpbf16ps(0, 4, 5);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 6, 5);
                _tile_dpbf16ps(3, 6, 7);
            }
            store_sums(ot);
            write_rows(ot, totals, rows, 32, out + i0 * os, os);
            write_rows(ot + 32, totals2, rows2, 32, out + (i0 + 16) * os, os);
            i0 += 32;
            continue;
        }
        rows_q = query_rows(q + i0 * qs, qs, rows, D, qt, &stride);
        _tile_loadd(6, rows_q, stride * 2);
        if (D == 64) _tile_loadd(7, rows_q + 32, stride * 2);
        for (long b = 0; b < blocks; b++) {
            _tile_zero(0);
            _tile_loadd(5, kp + b * half * 16, 64);
            _tile_dpbf16ps(0, 6, 5);
            if (D == 64) {
                _tile_loadd(5, kp + (b * half + 16) * 16, 64);
                _tile_dpbf16ps(0, 7, 5);
            }
            _tile_stored(0, scores + b * 16, ss * 4);
        }
        const __m512 totals = softmax16(scores, ss, blocks, live, sc, probs, ps);
        zero_sums();
        for (long p0 = 0; p0 < pairs; p0 += 16) {
            _tile_loadd(4, probs + p0, ps * 4);
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
        store_sums(ot);
        write_rows(ot, totals, rows, D, out + i0 * os, os);
        i0 += 16;
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
        float *scores = malloc(32 * (width + ROW_PAD) * sizeof(float));
        float *ot = malloc(16 * 64 * sizeof(float));
        uint32_t *probs = malloc(32 * (width / 2 + ROW_PAD) * sizeof(uint32_t));
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
