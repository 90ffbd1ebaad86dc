// The optimizer over the one contiguous parameter buffer, its decisions made on the device (no host
// synchronisation in a step; slots in launch.cuh's CONTROL_*, backend::StepControl):
//   sum_squares_partial_: partial[k] = Σ x² over block k's fixed range (inf/NaN propagate)
//   sum_squares_final_f32: out[0] = Σ_k partial[k], k in order: the squared gradient norm and the
//                            finite check in one pass, deterministic.                                 (=)
//   step_control_f32: one thread: the step applies when Σg² and the loss sums are finite; the record of
//     the step; the multipliers of the gradients (AdamW: 1/scale, then clip_grad_norm_'s
//     min(max / (‖g‖ + 1e-6), 1); LAMB: divided by clipping ratio × scale), the schedule row, the
//     update count, the dynamic loss scaler (halve on a non-finite step, double after growth_interval
//     finite ones); the loss sums zeroed for the next step.                                    (in place)
//   adamw_f32: torch's AdamW on every element of an applied step, fp32 master weights and moments, a block
//     per chunk of OPTIMIZER_CHUNK elements (decay per tensor, from the chunk table), 16-byte accesses:
//     g = g·(1/scale)·clip; p −= lr·wd·p where the tensor decays; m = m + (1−β1)(g − m);
//     v = β2·v + (1−β2)·g²; p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε); with a bf16 copy of the weights
//     (`shadow`, else null), bf16(p) into it in the same pass                                   (in place)
//   lamb_moments_f32 / lamb_norms_f32 / lamb_apply_f32: NVIDIA's FusedLAMB in three deterministic passes
//     over the same chunks (16-byte accesses where a chunk's arrays are aligned), on an applied step:
//     1. per chunk: g' = g / divisor, m, v updated, u = (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) + wd·p,
//        Σp² and Σu² of the chunk;
//     2. per tensor: its chunks' sums in order → ‖p‖², ‖u‖²;
//     3. per chunk: r = ‖p‖/‖u‖ (1 when either is 0, or outside the trusted tensors), p −= lr·r·u, and
//        bf16(p) into the weights' bf16 copy where there is one.                               (in place)
// The chunk table: per chunk [start, len, tensor, decays], then per tensor [first chunk, chunks]. A schedule
// row: AdamW (1 − lr·wd, lr/(1−β1ᵗ), √(1−β2ᵗ)); LAMB (lr, 1−β1ᵗ, 1−β2ᵗ), computed on the host in f64
// and rounded once, as the CPU backend does.
#include "common.cuh"

template <typename T>
__device__ void sum_squares_partial_impl(float* partial, const T* x, long n, long chunk) {
    __shared__ float sh[32];
    const long start = (long)blockIdx.x * chunk, end = min(n, start + chunk);
    float s = 0.f;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_f32(x[i]);
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

BERTCUDA_KERNEL(sum_squares_final_f32, float* out, const float* partial, int k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < k; i++) s += partial[i];
        out[0] = s;
    }
}

struct ControlArgs {
    double max_grad_norm;  // 0: no clipping
    int growth_interval;   // 0: no loss scaler
    int slot;              // the record this step writes
    int rows;              // schedule rows
    int unused;
};

BERTCUDA_KERNEL(step_control_f32, float* stats, int* counters, ControlArgs a) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float squares = stats[CONTROL_SQUARES], mlm = stats[CONTROL_MLM], nsp = stats[CONTROL_NSP];
    const float scale = stats[CONTROL_SCALE];
    const int updates = counters[CONTROL_UPDATES];
    const bool applies = isfinite(squares) && isfinite(mlm) && isfinite(nsp) && updates < a.rows;
    float* record = stats + CONTROL_FLOATS + CONTROL_RECORD * a.slot;
    record[0] = squares;
    record[1] = mlm;
    record[2] = nsp;
    counters[CONTROL_INTS + a.slot] = applies;
    counters[CONTROL_APPLIED] = applies;
    counters[CONTROL_ROW] = updates;
    const double norm = sqrt((double)squares) / (double)scale;
    stats[CONTROL_INV_SCALE] = (float)(1.0 / (double)scale);
    stats[CONTROL_CLIP] = a.max_grad_norm > 0.0 ? (float)fmin(a.max_grad_norm / (norm + 1e-6), 1.0) : 1.f;
    const double ratio = (a.max_grad_norm > 0.0 && norm > a.max_grad_norm) ? norm / a.max_grad_norm : 1.0;
    stats[CONTROL_DIVISOR] = (float)(ratio * (double)scale);
    if (applies) counters[CONTROL_UPDATES] = updates + 1;
    if (a.growth_interval > 0) {
        int good = applies ? counters[CONTROL_GOOD_STEPS] + 1 : 0;
        float next = applies ? scale : scale * 0.5f;
        if (good == a.growth_interval) {
            next = scale * 2.f;
            good = 0;
        }
        stats[CONTROL_SCALE] = next;
        counters[CONTROL_GOOD_STEPS] = good;
    }
    stats[CONTROL_MLM] = 0.f;
    stats[CONTROL_NSP] = 0.f;
}

// The constants of every update; the rest is the schedule row's and the step control's.
struct AdamWArgs {
    float one_minus_beta1, beta2, one_minus_beta2, eps;
};

struct AdamWStep {
    float decay_factor, step_size, bias_correction2_sqrt, inv_scale, clip;
    bool decays;
};

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWStep& s,
                                              const AdamWArgs& a) {
    g = g * s.inv_scale * s.clip;
    if (s.decays) p *= s.decay_factor;
    m = m + (g - m) * a.one_minus_beta1;
    v = v * a.beta2 + g * g * a.one_minus_beta2;
    const float denom = sqrtf(v) / s.bias_correction2_sqrt + a.eps;
    p = p - s.step_size * (m / denom);
}

// A chunk's elements [0, len) over a block's threads: 16-byte vectors of 4 floats where every array of it
// starts aligned (`vec(i)`: elements i … i + 3), the rest element by element (`one(i)`).
template <typename Vec, typename One>
__device__ __forceinline__ void chunk4(int len, bool aligned, Vec vec, One one) {
    int done = 0;
    if (aligned) {
        done = len / 4 * 4;
        for (int i = 4 * threadIdx.x; i < done; i += 4 * blockDim.x) vec(i);
    }
    for (int i = done + threadIdx.x; i < len; i += blockDim.x) one(i);
}

BERTCUDA_KERNEL(adamw_f32, float* params, __nv_bfloat16* shadow, const float* grads, float* m, float* v,
                const int* table, const float* schedule, const float* stats, const int* counters, AdamWArgs a) {
    if (!counters[CONTROL_APPLIED]) return;
    const float* row = schedule + SCHEDULE_ROW * counters[CONTROL_ROW];
    const int* c = table + 4 * blockIdx.x;
    const int start = c[0], len = c[1];
    const AdamWStep s{row[0], row[1], row[2], stats[CONTROL_INV_SCALE], stats[CONTROL_CLIP], c[3] != 0};
    float *pc = params + start, *mc = m + start, *vc = v + start;
    const float* gc = grads + start;
    __nv_bfloat16* sc = shadow ? shadow + start : nullptr;
    chunk4(
        len, aligned16(pc) && aligned16(gc) && aligned16(mc) && aligned16(vc),
        [&](int i) {
            float pv[4], gv[4], mv[4], vv[4];
            load16<float>(pv, pc + i);
            load16<float>(gv, gc + i);
            load16<float>(mv, mc + i);
            load16<float>(vv, vc + i);
#pragma unroll
            for (int k = 0; k < 4; k++) adamw_element(pv[k], gv[k], mv[k], vv[k], s, a);
            store16<float>(pc + i, pv);
            store16<float>(mc + i, mv);
            store16<float>(vc + i, vv);
            if (sc)
#pragma unroll
                for (int k = 0; k < 4; k++) sc[i + k] = __float2bfloat16(pv[k]);
        },
        [&](int i) {
            adamw_element(pc[i], gc[i], mc[i], vc[i], s, a);
            if (sc) sc[i] = __float2bfloat16(pc[i]);
        });
}

struct LambArgs {
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float eps, weight_decay;
    int all_tensors;
};

__device__ __forceinline__ float lamb_update(float m, float v, float p, float wd, const float* row,
                                             const LambArgs& a) {
    return (m / row[1]) / (sqrtf(v / row[2]) + a.eps) + wd * p;
}

BERTCUDA_KERNEL(lamb_moments_f32, const float* params, const float* grads, float* m, float* v, const int* table,
                float* partials, const float* schedule, const float* stats, const int* counters, LambArgs a) {
    __shared__ float sh[32];
    if (!counters[CONTROL_APPLIED]) return;
    const float* row = schedule + SCHEDULE_ROW * counters[CONTROL_ROW];
    const float divisor = stats[CONTROL_DIVISOR];
    const int* c = table + 4 * blockIdx.x;
    const int start = c[0], len = c[1];
    const float wd = c[3] ? a.weight_decay : 0.f;
    const float* pc = params + start;
    const float* gc = grads + start;
    float *mc = m + start, *vc = v + start;
    float wsum = 0.f, usum = 0.f;
    auto moments = [&](float p, float g, float& mi, float& vi) {
        g = g / divisor;
        mi = a.beta1 * mi + a.one_minus_beta1 * g;
        vi = a.beta2 * vi + a.one_minus_beta2 * g * g;
        const float u = lamb_update(mi, vi, p, wd, row, a);
        wsum += p * p;
        usum += u * u;
    };
    chunk4(
        len, aligned16(pc) && aligned16(gc) && aligned16(mc) && aligned16(vc),
        [&](int i) {
            float pv[4], gv[4], mv[4], vv[4];
            load16<float>(pv, pc + i);
            load16<float>(gv, gc + i);
            load16<float>(mv, mc + i);
            load16<float>(vv, vc + i);
#pragma unroll
            for (int k = 0; k < 4; k++) moments(pv[k], gv[k], mv[k], vv[k]);
            store16<float>(mc + i, mv);
            store16<float>(vc + i, vv);
        },
        [&](int i) { moments(pc[i], gc[i], mc[i], vc[i]); });
    wsum = block_sum(wsum, sh);
    usum = block_sum(usum, sh);
    if (threadIdx.x == 0) {
        partials[2 * blockIdx.x] = wsum;
        partials[2 * blockIdx.x + 1] = usum;
    }
}

// One thread per tensor: its chunks' partial sums, in order.
BERTCUDA_KERNEL(lamb_norms_f32, const int* table, int chunks, int tensors, const float* partials, float* norms,
                const int* counters) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tensors || !counters[CONTROL_APPLIED]) return;
    const int first = table[4 * chunks + 2 * t], count = table[4 * chunks + 2 * t + 1];
    float w = 0.f, u = 0.f;
    for (int k = first; k < first + count; k++) {
        w += partials[2 * k];
        u += partials[2 * k + 1];
    }
    norms[2 * t] = w;
    norms[2 * t + 1] = u;
}

BERTCUDA_KERNEL(lamb_apply_f32, float* params, __nv_bfloat16* shadow, const float* m, const float* v,
                const int* table, const float* norms, const float* schedule, const int* counters, LambArgs a) {
    if (!counters[CONTROL_APPLIED]) return;
    const float* row = schedule + SCHEDULE_ROW * counters[CONTROL_ROW];
    const int* c = table + 4 * blockIdx.x;
    const int start = c[0], len = c[1], t = c[2];
    const bool decays = c[3] != 0;
    const float wd = decays ? a.weight_decay : 0.f;
    const float wn = sqrtf(norms[2 * t]), un = sqrtf(norms[2 * t + 1]);
    const bool trusted = a.all_tensors || (decays && a.weight_decay != 0.f);
    const float ratio = (trusted && wn > 0.f && un > 0.f) ? wn / un : 1.f;
    const float step = row[0] * ratio;
    float* pc = params + start;
    const float *mc = m + start, *vc = v + start;
    __nv_bfloat16* sc = shadow ? shadow + start : nullptr;
    chunk4(
        len, aligned16(pc) && aligned16(mc) && aligned16(vc),
        [&](int i) {
            float pv[4], mv[4], vv[4];
            load16<float>(pv, pc + i);
            load16<float>(mv, mc + i);
            load16<float>(vv, vc + i);
#pragma unroll
            for (int k = 0; k < 4; k++) pv[k] -= step * lamb_update(mv[k], vv[k], pv[k], wd, row, a);
            store16<float>(pc + i, pv);
            if (sc)
#pragma unroll
                for (int k = 0; k < 4; k++) sc[i + k] = __float2bfloat16(pv[k]);
        },
        [&](int i) {
            pc[i] -= step * lamb_update(mc[i], vc[i], pc[i], wd, row, a);
            if (sc) sc[i] = __float2bfloat16(pc[i]);
        });
}

#define SUM_SQUARES(T, N)                                                                                   \
    BERTCUDA_KERNEL(sum_squares_partial_##N, float* partial, const T* x, long n, long chunk) { \
        sum_squares_partial_impl(partial, x, n, chunk);                                                     \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(SUM_SQUARES)
