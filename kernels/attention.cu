// Multi-head self-attention, flash-style: no T×T matrix in global memory.
//   attention_fwd:  out[b, i, head] = Σ_j drop(p_ij) v_j, p_i = softmax_j(q_i·k_j / √d) over the keys j
//                   whose mask is 1 (all keys when a sequence has none); lse[b, head, i] saved      (=)
//   attention_bwd_d:    D_i = Σ_d dout_i · out_i (the softmax backward's row term)                  (=)
//   attention_bwd_dkdv: dk_j = Σ_i dS_ij q_i / √d, dv_j = Σ_i drop(p_ij) dout_i — one thread per key   (=)
//   attention_bwd_dq:   dq_i = Σ_j dS_ij k_j / √d — one thread per query                           (=)
//   with dP_ij = keep_ij/(1−p) · dout_i·v_j and dS_ij = p_ij (dP_ij − D_i), p_ij recomputed from lse.
// qkv (B·T, 3H): the query, key and value thirds; head h owns columns h·HS..(h+1)·HS of each third.
// Dropout of p_ij draws Philox at element ((b·NH + h)·T + i)·T + j, as the CPU backend.
// Blocks: one (batch, head) per blockIdx.x and 64 rows per blockIdx.y, one row per thread; key/query
// tiles of 32 rows staged in shared memory.
#include "common.cuh"

constexpr int ROWS = ATTENTION_ROWS;
constexpr int TILE = ATTENTION_TILE;

__device__ __forceinline__ int any_key(const int* mask, int b, int t) {
    int a = 0;
    for (int j = 0; j < t; j++) a |= mask[b * t + j] != 0;
    return a;
}

// Stage keys and values [k0, k0 + TILE) of sequence b, head h in shared memory as fp32, with whether each
// is attended (in range, and unmasked unless the sequence has no unmasked key). The caller synchronises.
template <typename T, int HS>
__device__ __forceinline__ void stage_kv_tile(float (*ks)[HS], float (*vs)[HS], int* ms, const T* qkv,
                                              const int* mask, int b, int t, int h, int hid, int k0, int anyk) {
    const long c3 = 3L * hid;
    for (int idx = threadIdx.x; idx < TILE * HS; idx += blockDim.x) {
        const int jj = idx / HS, x = idx % HS, j = k0 + jj;
        if (j < t) {
            const T* base = qkv + (long)(b * t + j) * c3 + h * HS;
            ks[jj][x] = to_f32(base[hid + x]);
            vs[jj][x] = to_f32(base[2 * hid + x]);
        }
    }
    for (int jj = threadIdx.x; jj < TILE; jj += blockDim.x) {
        const int j = k0 + jj;
        ms[jj] = j < t && (!anyk || mask[b * t + j] != 0);
    }
}

template <typename T, int HS>
__device__ void attention_fwd_impl(T* out, float* lse, const T* qkv, const int* mask, int t, int nh, float scale,
                                   DropoutArgs d) {
    __shared__ float ks[TILE][HS], vs[TILE][HS];
    __shared__ int ms[TILE];
    __shared__ int anyk;
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, i = blockIdx.y * ROWS + threadIdx.x;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    if (threadIdx.x == 0) anyk = any_key(mask, b, t);
    __syncthreads();
    const bool active = i < t;
    float q[HS], acc[HS];
    const T* qrow = qkv + (long)(b * t + (active ? i : 0)) * c3 + h * HS;
#pragma unroll
    for (int x = 0; x < HS; x++) q[x] = to_f32(qrow[x]), acc[x] = 0.f;
    float mrun = -INFINITY, l = 0.f;
    for (int k0 = 0; k0 < t; k0 += TILE) {
        stage_kv_tile<T, HS>(ks, vs, ms, qkv, mask, b, t, h, hid, k0, anyk);
        __syncthreads();
        if (active) {
            const int kn = min(TILE, t - k0);
            for (int jj = 0; jj < kn; jj++) {
                if (!ms[jj]) continue;
                float s = 0.f;
#pragma unroll
                for (int x = 0; x < HS; x++) s += q[x] * ks[jj][x];
                s *= scale;
                if (s > mrun) {
                    const float corr = expf(mrun - s);
                    l *= corr;
#pragma unroll
                    for (int x = 0; x < HS; x++) acc[x] *= corr;
                    mrun = s;
                }
                const float p = expf(s - mrun);
                l += p;
                const float f = dropout_factor(d, ((unsigned long long)bh * t + i) * t + k0 + jj);
                if (f != 0.f) {
#pragma unroll
                    for (int x = 0; x < HS; x++) acc[x] += p * f * vs[jj][x];
                }
            }
        }
        __syncthreads();
    }
    if (active) {
        T* o = out + (long)(b * t + i) * hid + h * HS;
        const float inv = 1.f / l;
#pragma unroll
        for (int x = 0; x < HS; x++) o[x] = from_f32<T>(acc[x] * inv);
        lse[(long)bh * t + i] = mrun + logf(l);
    }
}

template <typename T>
__device__ void attention_bwd_d_impl(float* dd, const T* dout, const T* out, int rows, int nh, int hs) {
    // over (b, i, head): dd[(b·T + i)·NH + h]
    for (long r = blockIdx.x * (long)blockDim.x + threadIdx.x; r < (long)rows * nh; r += (long)gridDim.x * blockDim.x) {
        const long bi = r / nh;
        const int h = r % nh;
        const T *g = dout + bi * nh * hs + h * hs, *o = out + bi * nh * hs + h * hs;
        float s = 0.f;
        for (int x = 0; x < hs; x++) s += to_f32(g[x]) * to_f32(o[x]);
        dd[r] = s;
    }
}

template <typename T, int HS>
__device__ void attention_bwd_dkdv_impl(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dd,
                                        const int* mask, int t, int nh, float scale, DropoutArgs d) {
    __shared__ float qs[TILE][HS], gs[TILE][HS], ls[TILE], ds_[TILE];
    __shared__ int anyk;
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, j = blockIdx.y * ROWS + threadIdx.x;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    if (threadIdx.x == 0) anyk = any_key(mask, b, t);
    __syncthreads();
    const bool active = j < t && (!anyk || mask[b * t + j] != 0);
    float k[HS], v[HS], dk[HS], dv[HS];
    const T* krow = qkv + (long)(b * t + (j < t ? j : 0)) * c3 + h * HS;
#pragma unroll
    for (int x = 0; x < HS; x++) k[x] = to_f32(krow[hid + x]), v[x] = to_f32(krow[2 * hid + x]), dk[x] = 0.f, dv[x] = 0.f;
    for (int q0 = 0; q0 < t; q0 += TILE) {
        for (int idx = threadIdx.x; idx < TILE * HS; idx += blockDim.x) {
            const int ii = idx / HS, x = idx % HS, i = q0 + ii;
            if (i < t) {
                qs[ii][x] = to_f32(qkv[(long)(b * t + i) * c3 + h * HS + x]);
                gs[ii][x] = to_f32(dout[(long)(b * t + i) * hid + h * HS + x]);
            }
        }
        for (int ii = threadIdx.x; ii < TILE; ii += blockDim.x) {
            const int i = q0 + ii;
            if (i < t) {
                ls[ii] = lse[(long)bh * t + i];
                ds_[ii] = dd[(long)(b * t + i) * nh + h];
            }
        }
        __syncthreads();
        if (active) {
            const int qn = min(TILE, t - q0);
            for (int ii = 0; ii < qn; ii++) {
                const int i = q0 + ii;
                float s = 0.f, gv = 0.f;
#pragma unroll
                for (int x = 0; x < HS; x++) s += qs[ii][x] * k[x], gv += gs[ii][x] * v[x];
                s *= scale;
                const float p = expf(s - ls[ii]);
                const float f = dropout_factor(d, ((unsigned long long)bh * t + i) * t + j);
                const float dsv = p * (gv * f - ds_[ii]) * scale;
#pragma unroll
                for (int x = 0; x < HS; x++) dv[x] += p * f * gs[ii][x], dk[x] += dsv * qs[ii][x];
            }
        }
        __syncthreads();
    }
    if (j < t) {
        T* dst = dqkv + (long)(b * t + j) * c3 + h * HS;
#pragma unroll
        for (int x = 0; x < HS; x++) dst[hid + x] = from_f32<T>(dk[x]), dst[2 * hid + x] = from_f32<T>(dv[x]);
    }
}

template <typename T, int HS>
__device__ void attention_bwd_dq_impl(T* dqkv, const T* dout, const T* qkv, const float* lse, const float* dd,
                                      const int* mask, int t, int nh, float scale, DropoutArgs d) {
    __shared__ float ks[TILE][HS], vs[TILE][HS];
    __shared__ int ms[TILE];
    __shared__ int anyk;
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, i = blockIdx.y * ROWS + threadIdx.x;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    if (threadIdx.x == 0) anyk = any_key(mask, b, t);
    __syncthreads();
    const bool active = i < t;
    const int ic = active ? i : 0;
    float q[HS], g[HS], dq[HS];
#pragma unroll
    for (int x = 0; x < HS; x++) {
        q[x] = to_f32(qkv[(long)(b * t + ic) * c3 + h * HS + x]);
        g[x] = to_f32(dout[(long)(b * t + ic) * hid + h * HS + x]);
        dq[x] = 0.f;
    }
    const float li = active ? lse[(long)bh * t + i] : 0.f, di = active ? dd[(long)(b * t + i) * nh + h] : 0.f;
    for (int k0 = 0; k0 < t; k0 += TILE) {
        stage_kv_tile<T, HS>(ks, vs, ms, qkv, mask, b, t, h, hid, k0, anyk);
        __syncthreads();
        if (active) {
            const int kn = min(TILE, t - k0);
            for (int jj = 0; jj < kn; jj++) {
                if (!ms[jj]) continue;
                float s = 0.f, gv = 0.f;
#pragma unroll
                for (int x = 0; x < HS; x++) s += q[x] * ks[jj][x], gv += g[x] * vs[jj][x];
                s *= scale;
                const float p = expf(s - li);
                const float f = dropout_factor(d, ((unsigned long long)bh * t + i) * t + k0 + jj);
                const float dsv = p * (gv * f - di) * scale;
#pragma unroll
                for (int x = 0; x < HS; x++) dq[x] += dsv * ks[jj][x];
            }
        }
        __syncthreads();
    }
    if (active) {
        T* dst = dqkv + (long)(b * t + i) * c3 + h * HS;
#pragma unroll
        for (int x = 0; x < HS; x++) dst[x] = from_f32<T>(dq[x]);
    }
}

#define ATTENTION_HS(T, N, HS)                                                                                  \
    BERTCUDA_KERNEL(attention_fwd_##N##_hs##HS, T* out, float* lse, const T* qkv, const int* mask,     \
                                                           int t, int nh, float scale, DropoutArgs d) {          \
        attention_fwd_impl<T, HS>(out, lse, qkv, mask, t, nh, scale, d);                                        \
    }                                                                                                           \
    BERTCUDA_KERNEL(attention_bwd_dkdv_##N##_hs##HS, T* dqkv, const T* dout, const T* qkv,             \
                                                                const float* lse, const float* dd,               \
                                                                const int* mask, int t, int nh, float scale,     \
                                                                DropoutArgs d) {                                 \
        attention_bwd_dkdv_impl<T, HS>(dqkv, dout, qkv, lse, dd, mask, t, nh, scale, d);                        \
    }                                                                                                           \
    BERTCUDA_KERNEL(attention_bwd_dq_##N##_hs##HS, T* dqkv, const T* dout, const T* qkv,               \
                                                              const float* lse, const float* dd, const int* mask, \
                                                              int t, int nh, float scale, DropoutArgs d) {       \
        attention_bwd_dq_impl<T, HS>(dqkv, dout, qkv, lse, dd, mask, t, nh, scale, d);                          \
    }

#define ATTENTION(T, N)                                                                                        \
    ATTENTION_HS(T, N, 16)                                                                                     \
    ATTENTION_HS(T, N, 32)                                                                                     \
    ATTENTION_HS(T, N, 64)                                                                                     \
    ATTENTION_HS(T, N, 128)                                                                                    \
    BERTCUDA_KERNEL(attention_bwd_d_##N, float* dd, const T* dout, const T* out, int rows, int nh,    \
                                                   int hs) {                                                   \
        attention_bwd_d_impl(dd, dout, out, rows, nh, hs);                                                     \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(ATTENTION)
