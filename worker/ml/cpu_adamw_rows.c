/* AdamW (torch's fused CPU kernel, ADAMW mode, no amsgrad, no maximize) over a matrix by rows,
   where a row flagged not live has a zero gradient and zero moments: its update is its weight
   decay alone, p * (1 - lr * wd), which is what the full update computes for it (the moments
   stay 0; 0 / (sqrt(0) / c + eps) adds -0 to p), read and written in one pass, 8 bytes an
   element instead of the full update's 28.

   Why: the word embeddings are half of MiniLM's parameters, and a fine-tune on 2,000 SST-2
   sentences touches 16 % of the vocabulary's rows in all; torch's fused AdamW reads the
   gradient and both moments of every row every step.

   The live rows' arithmetic is torch's, operation for operation, so that the result is the
   same to the bit where the compiler makes the same choices (built with -ffp-contract=off; the
   one multiply-add that torch's build fuses is written as fmaf): the gradient divided by the
   clip's grad_scale (and stored back), the decay, exp_avg.lerp_(grad, 1 - beta1) in torch's
   two forms, exp_avg_sq * beta2 + (1 - beta2) * grad * grad, and
   p - step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps).

   Built with -fopenmp: torch's libgomp is loaded first and this library takes it by soname. */

#include <math.h>
#include <stdint.h>

void tuneq_adamw_rows(float *param, float *grad, float *exp_avg, float *exp_avg_sq,
                      const uint8_t *live, long rows, long width, float decay, float neg_step_size,
                      float bias_correction2_sqrt, float eps, float lerp_weight, float beta2,
                      float beta2_weight, const float *grad_scale, int threads) {
    /* torch's lerp: exp_avg + w (g - exp_avg) for |w| < 0.5, else g + (w - 1)(g - exp_avg) */
    const int small = fabsf(lerp_weight) < 0.5f;
    const float coeff = small ? lerp_weight : lerp_weight - 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        float *p = param + r * width;
        if (!live[r]) {
            for (long j = 0; j < width; j++) p[j] = p[j] * decay;
            continue;
        }
        float *g = grad + r * width, *m = exp_avg + r * width, *v = exp_avg_sq + r * width;
        if (grad_scale) {
            const float scale = *grad_scale;
            for (long j = 0; j < width; j++) g[j] = g[j] / scale;
        }
        for (long j = 0; j < width; j++) {
            const float gj = g[j], mj = m[j];
            const float pj = p[j] * decay;
            const float m2 = fmaf(coeff, gj - mj, small ? mj : gj);
            const float v2 = fmaf(beta2_weight * gj, gj, v[j] * beta2);
            m[j] = m2;
            v[j] = v2;
            const float denom = sqrtf(v2) / bias_correction2_sqrt + eps;
            p[j] = pj + (neg_step_size * m2) / denom;
        }
    }
}
