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

// ---- On tensor cores: bf16, head sizes 32, 64 and 128 -------------------------------------------------------
// attention_fwd_tc: the same math and contract as attention_fwd above — the mask, the dropout draws and
// the saved log-sum-exp are the same; fp32 accumulation — as FlashAttention-2 computes it: each of the
// block's ATTENTION_TC_THREADS / 32 warps holds 16 of its ATTENTION_ROWS queries; per tile of
// ATTENTION_TC_KEYS keys, S = Q·Kᵀ (mma.sync m16n8k16 bf16, Q's fragments loaded once, K's by ldmatrix
// from shared memory), the online softmax on S's accumulator fragments (a row's four lanes reduce by
// shuffles), then O += P·V with P's fragments made from S's registers (rounded to bf16, as the products'
// inputs are) and V staged transposed so ldmatrix gives its column fragments. Key tiles past a sequence's
// last attended key are skipped, not computed. Shared-memory rows are padded by 8 elements so the eight
// row addresses of an ldmatrix fall in different banks.

constexpr int TC_KEYS = ATTENTION_TC_KEYS;
static_assert(ATTENTION_TC_THREADS / 32 * 16 == ATTENTION_ROWS, "a warp holds 16 of a block's queries");
static_assert(TC_KEYS % 16 == 0, "keys come in mma k-steps of 16");

// One more than the sequence's last unmasked key (0 when none is), every thread of the block.
__device__ __forceinline__ int attended_end(const int* mask, int b, int t, float* red) {
    float last = 0.f;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        if (mask[b * t + j] != 0) last = fmaxf(last, (float)(j + 1));
    return (int)block_max(last, red);
}

template <int HS>
__device__ void attention_fwd_tc_impl(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, const int* mask,
                                      int t, int nh, float scale, DropoutArgs d) {
    static_assert(HS % 32 == 0, "head sizes are multiples of 32 (two mma k-steps per ldmatrix)");
    constexpr int KS = HS + 8;       // a row of Q or K in shared memory
    constexpr int VS = TC_KEYS + 8;  // a row of Vᵀ
    __shared__ __align__(16) __nv_bfloat16 kq[TC_KEYS * KS];  // the query tile, then each key tile
    __shared__ __align__(16) __nv_bfloat16 vt[HS * VS];
    __shared__ int attended[TC_KEYS];
    __shared__ float red[32];
    static_assert(ATTENTION_ROWS <= TC_KEYS, "the query tile fits the key tile's buffer");
    const int bh = blockIdx.x, b = bh / nh, h = bh % nh, q0 = blockIdx.y * ATTENTION_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int mi = lane >> 3, mr = lane & 7;  // the matrix and row whose address this lane gives ldmatrix
    const int hid = nh * HS;
    const long c3 = 3L * hid;
    const __nv_bfloat16* seq = qkv + (long)b * t * c3 + h * HS;
    const int last = attended_end(mask, b, t, red);
    const bool anyk = last > 0;
    const int kend = anyk ? last : t;

    // Q: staged (rows past the sequence as zeros), then each warp's A fragments into registers.
    for (int idx = threadIdx.x; idx < ATTENTION_ROWS * HS / 2; idx += blockDim.x) {
        const int r = idx / (HS / 2), x = 2 * (idx % (HS / 2)), i = q0 + r;
        const uint32_t v = i < t ? *reinterpret_cast<const uint32_t*>(seq + (long)i * c3 + x) : 0u;
        *reinterpret_cast<uint32_t*>(&kq[r * KS + x]) = v;
    }
    __syncthreads();
    uint32_t qf[HS / 16][4];
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++)
        ldmatrix_x4(qf[kk], &kq[(warp * 16 + (mi & 1) * 8 + mr) * KS + kk * 16 + (mi >> 1) * 8]);

    float o[HS / 8][4];
#pragma unroll
    for (int nd = 0; nd < HS / 8; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    // Rows g and g + 8 of the warp's 16: the running maximum and this lane's part of the sum of exps.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row = q0 + warp * 16 + g;
    for (int k0 = 0; k0 < kend; k0 += TC_KEYS) {
        __syncthreads();  // every warp is done with the previous tile (or the query tile)
        for (int idx = threadIdx.x; idx < TC_KEYS * HS / 2; idx += blockDim.x) {
            const int jj = idx / (HS / 2), x = 2 * (idx % (HS / 2)), j = k0 + jj;
            uint32_t kv = 0u, vv = 0u;
            if (j < t) {
                kv = *reinterpret_cast<const uint32_t*>(seq + (long)j * c3 + hid + x);
                vv = *reinterpret_cast<const uint32_t*>(seq + (long)j * c3 + 2 * hid + x);
            }
            *reinterpret_cast<uint32_t*>(&kq[jj * KS + x]) = kv;
            reinterpret_cast<uint16_t*>(vt)[x * VS + jj] = (uint16_t)vv;
            reinterpret_cast<uint16_t*>(vt)[(x + 1) * VS + jj] = (uint16_t)(vv >> 16);
        }
        for (int jj = threadIdx.x; jj < TC_KEYS; jj += blockDim.x) {
            const int j = k0 + jj;
            attended[jj] = j < t && (!anyk || mask[b * t + j] != 0);
        }
        __syncthreads();

        // S = Q·Kᵀ: 16 queries × TC_KEYS keys, n-tiles of 8 keys.
        float s[TC_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HS / 16; kk += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, &kq[(nt * 8 + mr) * KS + kk * 16 + mi * 8]);
                const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                mma_m16n8k16_bf16(s[nt], qf[kk], b0, s[nt]);
                mma_m16n8k16_bf16(s[nt], qf[kk + 1], b1, s[nt]);
            }
        }
        // The online softmax: element e of an n-tile is row g + 8·(e / 2), key 2·tq + e % 2.
        float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++)
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
        // P (the sum counts it undropped), then dropped, as A fragments of P·V: k-step kk is n-tiles 2kk, 2kk+1.
        uint32_t pf[TC_KEYS / 16][4];
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r2 = e >> 1;
                p[e] = m[r2] == -INFINITY ? 0.f : expf(s[nt][e] - m[r2]);
                l[r2] += p[e];
                const unsigned long long i = row + 8 * r2, j = k0 + nt * 8 + 2 * tq + (e & 1);
                p[e] *= dropout_factor(d, ((unsigned long long)bh * t + i) * t + j);
            }
            pf[nt / 2][(nt & 1) * 2] = pack_bf16x2(p[0], p[1]);
            pf[nt / 2][(nt & 1) * 2 + 1] = pack_bf16x2(p[2], p[3]);
        }
        // O += P·V: n-tiles of 8 head dimensions; V's B fragments from the rows of Vᵀ.
#pragma unroll
        for (int nd = 0; nd < HS / 8; nd++)
#pragma unroll
            for (int kk = 0; kk < TC_KEYS / 16; kk += 2) {
                uint32_t vf[4];
                ldmatrix_x4(vf, &vt[(nd * 8 + mr) * VS + kk * 16 + mi * 8]);
                const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                mma_m16n8k16_bf16(o[nd], pf[kk], b0, o[nd]);
                mma_m16n8k16_bf16(o[nd], pf[kk + 1], b1, o[nd]);
            }
    }
#pragma unroll
    for (int r2 = 0; r2 < 2; r2++) {
        l[r2] += __shfl_xor_sync(0xffffffffu, l[r2], 1);
        l[r2] += __shfl_xor_sync(0xffffffffu, l[r2], 2);
        const int i = row + 8 * r2;
        if (i < t) {
            const float inv = 1.f / l[r2];
            __nv_bfloat16* dst = out + (long)(b * t + i) * hid + h * HS + 2 * tq;
#pragma unroll
            for (int nd = 0; nd < HS / 8; nd++)
                *reinterpret_cast<uint32_t*>(dst + nd * 8) =
                    pack_bf16x2(o[nd][2 * r2] * inv, o[nd][2 * r2 + 1] * inv);
            if (tq == 0) lse[(long)bh * t + i] = m[r2] + logf(l[r2]);
        }
    }
}

#define ATTENTION_TC(HS)                                                                                   \
    BERTCUDA_KERNEL(attention_fwd_tc_bf16_hs##HS, __nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, \
                    const int* mask, int t, int nh, float scale, DropoutArgs d) {                          \
        attention_fwd_tc_impl<HS>(out, lse, qkv, mask, t, nh, scale, d);                                   \
    }
ATTENTION_TC(32)
ATTENTION_TC(64)
ATTENTION_TC(128)
