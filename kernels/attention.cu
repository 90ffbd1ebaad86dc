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
#include "mma.cuh"

constexpr int ROWS = ATTENTION_ROWS;
constexpr int TILE = ATTENTION_TILE;

// Whether key j of sequence b takes part: in the sequence, and unmasked — every key when the sequence
// has no unmasked one (`anyk` false).
__device__ __forceinline__ bool key_attended(const int* mask, int b, int t, int j, bool anyk) {
    return j < t && (!anyk || mask[b * t + j] != 0);
}

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
        ms[jj] = key_attended(mask, b, t, j, anyk);
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
    const bool active = key_attended(mask, b, t, j, anyk);
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

// ---- On tensor cores: bf16 ---------------------------------------------------------------------------------
// The same math and contract as the kernels above — the mask, the dropout draws, the saved log-sum-exp —
// with the products on bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation), as FlashAttention-2
// computes them. A block of ATTENTION_TC_THREADS threads owns ATTENTION_ROWS rows (queries, or keys in
// dk/dv), 16 per warp, whose A fragments are loaded once; the other side comes in tiles of
// ATTENTION_TC_KEYS rows staged in shared memory (rows past the sequence as zeros), row-major where
// ldmatrix gives B fragments from rows and transposed (Vᵀ, Kᵀ, Qᵀ, dOᵀ) where the product runs over the
// tile's rows. A product's accumulator fragments become the next product's A fragments in registers
// (rounded to bf16, as the products' inputs are). Element e of an accumulator n-tile is row g + 8·(e / 2),
// column 8·nt + 2·tq + e % 2 (g = lane / 4, tq = lane % 4): a row's reductions are over its quad of lanes.
// Shared-memory rows are padded by 8 elements so the eight row addresses of an ldmatrix fall in different
// banks. Tiles past a sequence's last attended key are skipped.
//   attention_fwd_tc   (head sizes 32, 64, 128): per key tile, S = Q·Kᵀ, the online softmax, O += P·V.
//   attention_bwd_dq_tc   (32, 64): per key tile, S, P from the log-sum-exp, dP = dO·Vᵀ, dS, dQ += dS·K.
//   attention_bwd_dkdv_tc (32, 64): per query tile, Sᵀ = K·Qᵀ, Pᵀ, dPᵀ = V·dOᵀ, dV += Pᵀ·dO, dK += dSᵀ·Q.
// Head size 128's backward runs on the CUDA-core kernels (its tiles would not fit 48 KB of shared memory).

constexpr int TC_KEYS = ATTENTION_TC_KEYS;
constexpr int TC_LD = TC_KEYS + 8;  // a row of a transposed tile
static_assert(ATTENTION_TC_THREADS / 32 * 16 == ATTENTION_ROWS, "a warp holds 16 of a block's rows");
static_assert(ATTENTION_ROWS == TC_KEYS, "row blocks and tiles are the same size");

// One more than the sequence's last unmasked key (0 when none is), every thread of the block.
__device__ __forceinline__ int attended_end(const int* mask, int b, int t, float* red) {
    float last = 0.f;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        if (mask[b * t + j] != 0) last = fmaxf(last, (float)(j + 1));
    return (int)block_max(last, red);
}

// Whether each key of the tile at k0 is attended: in the sequence, and unmasked (all are when none is).
__device__ __forceinline__ void stage_attended(int* attended, const int* mask, int b, int t, int k0, bool anyk) {
    for (int jj = threadIdx.x; jj < TC_KEYS; jj += blockDim.x) {
        const int j = k0 + jj;
        attended[jj] = key_attended(mask, b, t, j, anyk);
    }
}

// Rows [r0, r0 + TC_KEYS) of HS bf16 each (row r at src + r·stride) into `dst`, rows `ld` apart; rows at or
// past t as zeros. The caller synchronises.
template <int HS>
__device__ __forceinline__ void stage_rows(__nv_bfloat16* dst, int ld, const __nv_bfloat16* src, long stride,
                                           int r0, int t) {
    for (int idx = threadIdx.x; idx < TC_KEYS * HS / 2; idx += blockDim.x) {
        const int r = idx / (HS / 2), x = 2 * (idx % (HS / 2));
        const uint32_t v = r0 + r < t ? *reinterpret_cast<const uint32_t*>(src + (r0 + r) * stride + x) : 0u;
        *reinterpret_cast<uint32_t*>(&dst[r * ld + x]) = v;
    }
}

// The same rows transposed: dst[x·TC_LD + r] = row r0 + r, element x.
template <int HS>
__device__ __forceinline__ void stage_cols(__nv_bfloat16* dst, const __nv_bfloat16* src, long stride, int r0, int t) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int idx = threadIdx.x; idx < TC_KEYS * HS / 2; idx += blockDim.x) {
        const int r = idx / (HS / 2), x = 2 * (idx % (HS / 2));
        const uint32_t v = r0 + r < t ? *reinterpret_cast<const uint32_t*>(src + (r0 + r) * stride + x) : 0u;
        d[x * TC_LD + r] = (uint16_t)v;
        d[(x + 1) * TC_LD + r] = (uint16_t)(v >> 16);
    }
}

// The A fragments of rows [r, r + 16) of a staged tile, K columns (mma k-steps of 16).
template <int K>
__device__ __forceinline__ void load_a(uint32_t a[K / 16][4], const __nv_bfloat16* tile, int ld, int r) {
    const int lane = threadIdx.x & 31, mi = lane >> 3, mr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) ldmatrix_x4(a[kk], &tile[(r + (mi & 1) * 8 + mr) * ld + kk * 16 + (mi >> 1) * 8]);
}

// acc (16 × 8·NT) += A (16 × K) · Bᵀ, B's NT·8 rows of K elements a staged tile (row n: column n of the
// product).
template <int K, int NT>
__device__ __forceinline__ void mma_rows(float acc[NT][4], const uint32_t a[K / 16][4], const __nv_bfloat16* tile,
                                         int ld) {
    static_assert(K % 32 == 0, "two k-steps per ldmatrix");
    const int lane = threadIdx.x & 31, mi = lane >> 3, mr = lane & 7;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int kk = 0; kk < K / 16; kk += 2) {
            uint32_t bf[4];
            ldmatrix_x4(bf, &tile[(nt * 8 + mr) * ld + kk * 16 + mi * 8]);
            const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
            mma_m16n8k16_bf16(acc[nt], a[kk], b0, acc[nt]);
            mma_m16n8k16_bf16(acc[nt], a[kk + 1], b1, acc[nt]);
        }
}

template <int NT>
__device__ __forceinline__ void zero(float acc[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
}

// An accumulator (16 × 8·NT) as the A fragments of the next product (k-step kk: n-tiles 2kk and 2kk + 1).
template <int NT>
__device__ __forceinline__ void as_a(uint32_t a[NT / 2][4], const float c[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        a[nt / 2][(nt & 1) * 2] = pack_bf16x2(c[nt][0], c[nt][1]);
        a[nt / 2][(nt & 1) * 2 + 1] = pack_bf16x2(c[nt][2], c[nt][3]);
    }
}

// An accumulator written to rows `row` and `row` + 8 (when below t) of a bf16 matrix with row stride `stride`.
template <int NT>
__device__ __forceinline__ void store_rows(__nv_bfloat16* dst, long stride, int row, int t, const float c[NT][4],
                                           const float factor[2]) {
    const int tq = threadIdx.x & 3;
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
        if (row + 8 * r2 >= t) continue;
        __nv_bfloat16* d = dst + (row + 8 * r2) * stride + 2 * tq;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
            *reinterpret_cast<uint32_t*>(d + nt * 8) = pack_bf16x2(c[nt][2 * r2] * factor[r2], c[nt][2 * r2 + 1] * factor[r2]);
    }
}

template <int HS>
__device__ void attention_fwd_tc_impl(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, const int* mask,
                                      int t, int nh, float scale, DropoutArgs d) {
    constexpr int KS = HS + 8;
    constexpr int NK = TC_KEYS / 8;
    __shared__ __align__(16) __nv_bfloat16 kq[TC_KEYS * KS];  // the query tile, then each key tile
    __shared__ __align__(16) __nv_bfloat16 vt[HS * TC_LD];
    __shared__ int attended[TC_KEYS];
    __shared__ float red[32];
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, q0 = blockIdx.y * ATTENTION_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    const __nv_bfloat16* seq = qkv + (long)b * t * c3 + h * HS;
    const int last = attended_end(mask, b, t, red);
    const bool anyk = last > 0;
    const int kend = anyk ? last : t;

    stage_rows<HS>(kq, KS, seq, c3, q0, t);
    __syncthreads();
    uint32_t qf[HS / 16][4];
    load_a<HS>(qf, kq, KS, warp * 16);
    float o[HS / 8][4];
    zero<HS / 8>(o);
    // Rows g and g + 8 of the warp's 16: the running maximum and this lane's part of the sum of exps.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row = q0 + warp * 16 + g;
    for (int k0 = 0; k0 < kend; k0 += TC_KEYS) {
        __syncthreads();  // every warp is done with the previous tile (or the query tile)
        stage_rows<HS>(kq, KS, seq + hid, c3, k0, t);
        stage_cols<HS>(vt, seq + 2 * hid, c3, k0, t);
        stage_attended(attended, mask, b, t, k0, anyk);
        __syncthreads();
        float s[NK][4];
        zero<NK>(s);
        mma_rows<HS, NK>(s, qf, kq, KS);
        // The online softmax.
        float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NK; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float v = attended[nt * 8 + 2 * tq + (e & 1)] ? s[nt][e] * scale : -INFINITY;
                s[nt][e] = v;
                mt[e >> 1] = fmaxf(mt[e >> 1], v);
            }
        float corr[2];
#pragma unroll
        for (int r2 = 0; r2 < 2; r2++) {
            mt[r2] = fmaxf(mt[r2], __shfl_xor_sync(0xffffffffu, mt[r2], 1));
            mt[r2] = fmaxf(mt[r2], __shfl_xor_sync(0xffffffffu, mt[r2], 2));
            const float mn = fmaxf(m[r2], mt[r2]);
            corr[r2] = mn == -INFINITY ? 1.f : expf(m[r2] - mn);
            m[r2] = mn;
            l[r2] *= corr[r2];
        }
#pragma unroll
        for (int nd = 0; nd < HS / 8; nd++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[nd][e] *= corr[e >> 1];
        // P: the sum counts it undropped; P·V takes it dropped.
#pragma unroll
        for (int nt = 0; nt < NK; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r2 = e >> 1;
                const float p = m[r2] == -INFINITY ? 0.f : expf(s[nt][e] - m[r2]);
                l[r2] += p;
                const unsigned long long i = row + 8 * r2, j = k0 + nt * 8 + 2 * tq + (e & 1);
                s[nt][e] = p * dropout_factor(d, ((unsigned long long)bh * t + i) * t + j);
            }
        uint32_t pf[NK / 2][4];
        as_a<NK>(pf, s);
        mma_rows<TC_KEYS, HS / 8>(o, pf, vt, TC_LD);
    }
    float inv[2];
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
        l[r2] += __shfl_xor_sync(0xffffffffu, l[r2], 1);
        l[r2] += __shfl_xor_sync(0xffffffffu, l[r2], 2);
        inv[r2] = 1.f / l[r2];
        const int i = row + 8 * r2;
        if (i < t && tq == 0) lse[(long)bh * t + i] = m[r2] + logf(l[r2]);
    }
    store_rows<HS / 8>(out + (long)b * t * hid + h * HS, hid, row, t, o, inv);
}

template <int HS>
__device__ void attention_bwd_dq_tc_impl(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                         const float* lse, const float* dd, const int* mask, int t, int nh,
                                         float scale, DropoutArgs d) {
    constexpr int KS = HS + 8;
    constexpr int NK = TC_KEYS / 8;
    __shared__ __align__(16) __nv_bfloat16 ks[TC_KEYS * KS];  // the query tile, then each key tile
    __shared__ __align__(16) __nv_bfloat16 vs[TC_KEYS * KS];  // the dout tile, then each value tile
    __shared__ __align__(16) __nv_bfloat16 kt[HS * TC_LD];
    __shared__ int attended[TC_KEYS];
    __shared__ float red[32];
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, q0 = blockIdx.y * ATTENTION_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    const __nv_bfloat16* seq = qkv + (long)b * t * c3 + h * HS;
    const int last = attended_end(mask, b, t, red);
    const bool anyk = last > 0;
    const int kend = anyk ? last : t;
    const int row = q0 + warp * 16 + g;
    float li[2], di[2];
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
        const int i = min(row + 8 * r2, t - 1);
        li[r2] = lse[(long)bh * t + i];
        di[r2] = dd[(long)(b * t + i) * nh + h];
    }

    stage_rows<HS>(ks, KS, seq, c3, q0, t);
    stage_rows<HS>(vs, KS, dout + (long)b * t * hid + h * HS, hid, q0, t);
    __syncthreads();
    uint32_t qf[HS / 16][4], gf[HS / 16][4];
    load_a<HS>(qf, ks, KS, warp * 16);
    load_a<HS>(gf, vs, KS, warp * 16);
    float dq[HS / 8][4];
    zero<HS / 8>(dq);
    for (int k0 = 0; k0 < kend; k0 += TC_KEYS) {
        __syncthreads();  // every warp is done with the previous tile (or the query and dout tiles)
        stage_rows<HS>(ks, KS, seq + hid, c3, k0, t);
        stage_rows<HS>(vs, KS, seq + 2 * hid, c3, k0, t);
        stage_cols<HS>(kt, seq + hid, c3, k0, t);
        stage_attended(attended, mask, b, t, k0, anyk);
        __syncthreads();
        float s[NK][4], dp[NK][4];
        zero<NK>(s);
        zero<NK>(dp);
        mma_rows<HS, NK>(s, qf, ks, KS);
        mma_rows<HS, NK>(dp, gf, vs, KS);
        // dS = P ∘ (dP ∘ keep − D) / √d, P recomputed from the log-sum-exp.
#pragma unroll
        for (int nt = 0; nt < NK; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r2 = e >> 1, jj = nt * 8 + 2 * tq + (e & 1);
                const float p = attended[jj] ? expf(s[nt][e] * scale - li[r2]) : 0.f;
                const unsigned long long i = row + 8 * r2, j = k0 + jj;
                const float f = dropout_factor(d, ((unsigned long long)bh * t + i) * t + j);
                s[nt][e] = p * (dp[nt][e] * f - di[r2]) * scale;
            }
        uint32_t sf[NK / 2][4];
        as_a<NK>(sf, s);
        mma_rows<TC_KEYS, HS / 8>(dq, sf, kt, TC_LD);
    }
    const float one[2] = {1.f, 1.f};
    store_rows<HS / 8>(dqkv + (long)b * t * c3 + h * HS, c3, row, t, dq, one);
}

template <int HS>
__device__ void attention_bwd_dkdv_tc_impl(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                                           const float* lse, const float* dd, const int* mask, int t, int nh,
                                           float scale, DropoutArgs d) {
    constexpr int KS = HS + 8;
    constexpr int NQ = TC_KEYS / 8;  // n-tiles of a query tile
    __shared__ __align__(16) __nv_bfloat16 qs[TC_KEYS * KS];  // the key tile, then each query tile
    __shared__ __align__(16) __nv_bfloat16 gs[TC_KEYS * KS];  // the value tile, then each dout tile
    __shared__ __align__(16) __nv_bfloat16 qt[HS * TC_LD];
    __shared__ __align__(16) __nv_bfloat16 gt[HS * TC_LD];
    __shared__ float ls[TC_KEYS], ds[TC_KEYS];
    __shared__ float red[32];
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, k0 = blockIdx.y * ATTENTION_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    const __nv_bfloat16* seq = qkv + (long)b * t * c3 + h * HS;
    const __nv_bfloat16* gseq = dout + (long)b * t * hid + h * HS;
    const int last = attended_end(mask, b, t, red);
    const bool anyk = last > 0;
    // This lane's keys (rows g and g + 8 of its warp): attended or not.
    const int key = k0 + warp * 16 + g;
    bool att[2];
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
        const int j = key + 8 * r2;
        att[r2] = key_attended(mask, b, t, j, anyk);
    }
    float dk[HS / 8][4], dv[HS / 8][4];
    zero<HS / 8>(dk);
    zero<HS / 8>(dv);
    // A block wholly past the last attended key has no gradient: zeros, as the CUDA-core kernel writes.
    if (!anyk || k0 < last) {
        stage_rows<HS>(qs, KS, seq + hid, c3, k0, t);
        stage_rows<HS>(gs, KS, seq + 2 * hid, c3, k0, t);
        __syncthreads();
        uint32_t kf[HS / 16][4], vf[HS / 16][4];
        load_a<HS>(kf, qs, KS, warp * 16);
        load_a<HS>(vf, gs, KS, warp * 16);
        for (int q0 = 0; q0 < t; q0 += TC_KEYS) {
            __syncthreads();  // every warp is done with the previous tile (or the key and value tiles)
            stage_rows<HS>(qs, KS, seq, c3, q0, t);
            stage_rows<HS>(gs, KS, gseq, hid, q0, t);
            stage_cols<HS>(qt, seq, c3, q0, t);
            stage_cols<HS>(gt, gseq, hid, q0, t);
            for (int ii = threadIdx.x; ii < TC_KEYS; ii += blockDim.x) {
                const int i = q0 + ii;
                ls[ii] = i < t ? lse[(long)bh * t + i] : INFINITY;  // past the sequence: P = 0
                ds[ii] = i < t ? dd[(long)(b * t + i) * nh + h] : 0.f;
            }
            __syncthreads();
            float st[NQ][4], dpt[NQ][4];
            zero<NQ>(st);
            zero<NQ>(dpt);
            mma_rows<HS, NQ>(st, kf, qs, KS);   // Sᵀ = K·Qᵀ: keys × queries
            mma_rows<HS, NQ>(dpt, vf, gs, KS);  // dPᵀ = V·dOᵀ
            // Pᵀ ∘ keep and dSᵀ, packed as A fragments as they are made (k-step kk: n-tiles 2kk, 2kk + 1).
            uint32_t pf[NQ / 2][4], sf[NQ / 2][4];
#pragma unroll
            for (int nt = 0; nt < NQ; nt++) {
                float pk[4], dsv[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r2 = e >> 1, ii = nt * 8 + 2 * tq + (e & 1);
                    const float p = att[r2] ? expf(st[nt][e] * scale - ls[ii]) : 0.f;
                    const unsigned long long i = q0 + ii, j = key + 8 * r2;
                    const float f = dropout_factor(d, ((unsigned long long)bh * t + i) * t + j);
                    pk[e] = p * f;
                    dsv[e] = p * (dpt[nt][e] * f - ds[ii]) * scale;
                }
                pf[nt / 2][(nt & 1) * 2] = pack_bf16x2(pk[0], pk[1]);
                pf[nt / 2][(nt & 1) * 2 + 1] = pack_bf16x2(pk[2], pk[3]);
                sf[nt / 2][(nt & 1) * 2] = pack_bf16x2(dsv[0], dsv[1]);
                sf[nt / 2][(nt & 1) * 2 + 1] = pack_bf16x2(dsv[2], dsv[3]);
            }
            mma_rows<TC_KEYS, HS / 8>(dv, pf, gt, TC_LD);  // dV += (Pᵀ ∘ keep)·dO
            mma_rows<TC_KEYS, HS / 8>(dk, sf, qt, TC_LD);  // dK += dSᵀ·Q
        }
    }
    const float one[2] = {1.f, 1.f};
    store_rows<HS / 8>(dqkv + (long)b * t * c3 + hid + h * HS, c3, key, t, dk, one);
    store_rows<HS / 8>(dqkv + (long)b * t * c3 + 2 * hid + h * HS, c3, key, t, dv, one);
}

#define ATTENTION_FWD_TC(HS)                                                                                 \
    BERTCUDA_KERNEL(attention_fwd_tc_bf16_hs##HS, __nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv,   \
                    const int* mask, int t, int nh, float scale, DropoutArgs d) {                            \
        attention_fwd_tc_impl<HS>(out, lse, qkv, mask, t, nh, scale, d);                                     \
    }
#define ATTENTION_BWD_TC(HS)                                                                                 \
    BERTCUDA_KERNEL(attention_bwd_dq_tc_bf16_hs##HS, __nv_bfloat16* dqkv, const __nv_bfloat16* dout,          \
                    const __nv_bfloat16* qkv, const float* lse, const float* dd, const int* mask, int t,     \
                    int nh, float scale, DropoutArgs d) {                                                    \
        attention_bwd_dq_tc_impl<HS>(dqkv, dout, qkv, lse, dd, mask, t, nh, scale, d);                       \
    }                                                                                                        \
    BERTCUDA_KERNEL(attention_bwd_dkdv_tc_bf16_hs##HS, __nv_bfloat16* dqkv, const __nv_bfloat16* dout,        \
                    const __nv_bfloat16* qkv, const float* lse, const float* dd, const int* mask, int t,     \
                    int nh, float scale, DropoutArgs d) {                                                    \
        attention_bwd_dkdv_tc_impl<HS>(dqkv, dout, qkv, lse, dd, mask, t, nh, scale, d);                     \
    }
ATTENTION_FWD_TC(32)
ATTENTION_FWD_TC(64)
ATTENTION_FWD_TC(128)
ATTENTION_BWD_TC(32)
ATTENTION_BWD_TC(64)
