// Embeddings: word + position + token type.
//   embeddings_fwd: out[r] = word[ids[r]] + position[r mod T] + token_type[types[r]]                    (=)
//   embeddings_bwd, on the device and deterministic (no atomics; each sum's order fixed by the rows'):
//     word:     embedding_sort_init + embedding_sort_stage sort the items key·2³² + row (keys = the token
//               ids; a bitonic sort of a power of two of them, the padding all ones), then
//               embedding_key_runs_: one block per sorted position that starts a key's run,
//               table[key] += Σ its rows' dout in row order                                           (+=)
//     position: embedding_position_bwd_: dposition[p] += Σ_b dout[b·T + p], b in order                 (+=)
//     type:     embedding_type_partial_: per block of PARTIAL_ROWS rows, partial[k][type] = Σ its rows of
//               that type; then tensor.cu's sum_partials_f32 adds them in block order                  (=)
//   embeddings_layernorm_fwd: emb = word[ids] + position[r mod T] + token_type[types];
//                             out = LayerNorm(emb); mean, rstd saved; one warp per row              (=)
#include "common.cuh"

template <typename T>
__device__ void embeddings_fwd_impl(T* out, const int* ids, const int* types, const T* word, const T* position,
                                    const T* token_type, int rows, int seq, int h) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const T *we = word + (long)ids[r] * h, *pe = position + (long)(r % seq) * h, *te = token_type + (long)types[r] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        out[(long)r * h + j] = from_f32<T>(to_f32(we[j]) + to_f32(pe[j]) + to_f32(te[j]));
}

BERTCUDA_KERNEL(embedding_sort_init, unsigned long long* items, const int* keys, int n, int n2) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n2; i += gridDim.x * blockDim.x)
        items[i] = i < n ? ((unsigned long long)(unsigned)keys[i] << 32) | (unsigned)i : ~0ull;
}

// One compare-exchange stage (k, j) of the bitonic sort: item i with its partner i ^ j, the pair ascending
// where i & k is 0; the thread of the lower index of a pair does the exchange.
BERTCUDA_KERNEL(embedding_sort_stage, unsigned long long* items, int n2, int k, int j) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n2; i += gridDim.x * blockDim.x) {
        const int l = i ^ j;
        if (l <= i) continue;
        const unsigned long long a = items[i], b = items[l];
        if ((a > b) == ((i & k) == 0)) {
            items[i] = b;
            items[l] = a;
        }
    }
}

// The tables are parameter gradients: fp32 whatever the activations' type.
template <typename T>
__device__ void embedding_key_runs_impl(float* table, const T* dout, const unsigned long long* items, int n, int h) {
    const int s = blockIdx.x;
    if (s >= n) return;
    const unsigned key = (unsigned)(items[s] >> 32);
    if (s > 0 && (unsigned)(items[s - 1] >> 32) == key) return;  // inside a run: its start's block sums it
    int e = s + 1;
    while (e < n && (unsigned)(items[e] >> 32) == key) e++;
    float* dst = table + (long)key * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float acc = 0.f;
        for (int i = s; i < e; i++) acc += to_f32(dout[(long)(unsigned)items[i] * h + j]);
        dst[j] += acc;
    }
}

template <typename T>
__device__ void embedding_position_bwd_impl(float* table, const T* dout, int batch, int seq, int h) {
    const int p = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= h) return;
    float acc = 0.f;
    for (int b = 0; b < batch; b++) acc += to_f32(dout[((long)b * seq + p) * h + j]);
    table[(long)p * h + j] += acc;
}

template <typename T>
__device__ void embedding_type_partial_impl(float* partial, const T* dout, const int* types, int rows, int ntypes,
                                            int h) {
    const int r0 = blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= h) return;
    for (int t = 0; t < ntypes; t++) {
        float acc = 0.f;
        for (int r = r0; r < r1; r++)
            if (types[r] == t) acc += to_f32(dout[(long)r * h + j]);
        partial[((long)blockIdx.x * ntypes + t) * h + j] = acc;
    }
}

#define EMBEDDING(T, N)                                                                                       \
    BERTCUDA_KERNEL(embeddings_fwd_##N, T* out, const int* ids, const int* types, const T* word,            \
                    const T* position, const T* token_type, int rows, int seq, int h) {                       \
        embeddings_fwd_impl(out, ids, types, word, position, token_type, rows, seq, h);                      \
    }                                                                                                         \
    BERTCUDA_KERNEL(embedding_key_runs_##N, float* table, const T* dout, const unsigned long long* items,     \
                    int n, int h) {                                                                           \
        embedding_key_runs_impl(table, dout, items, n, h);                                                    \
    }                                                                                                         \
    BERTCUDA_KERNEL(embedding_position_bwd_##N, float* table, const T* dout, int batch, int seq, int h) {     \
        embedding_position_bwd_impl(table, dout, batch, seq, h);                                              \
    }                                                                                                         \
    BERTCUDA_KERNEL(embedding_type_partial_##N, float* partial, const T* dout, const int* types, int rows,    \
                    int ntypes, int h) {                                                                      \
        embedding_type_partial_impl(partial, dout, types, rows, ntypes, h);                                   \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(EMBEDDING)

template <typename T>
__device__ void embeddings_layernorm_impl(T* emb, T* out, float* mean, float* rstd, const int* ids, const int* types,
                                          const T* word, const T* position, const T* token_type, const T* w,
                                          const T* b, int rows, int seq, int h, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *we = word + (long)ids[row] * h, *pe = position + (long)(row % seq) * h, *te = token_type + (long)types[row] * h;
    const long base = (long)row * h;
    constexpr int V = 16 / sizeof(T);
    if (in_registers<T>(h) && aligned16(emb) && aligned16(out) && aligned16(word) && aligned16(position) &&
        aligned16(token_type) && aligned16(w) && aligned16(b)) {
        float v[row_vectors<T>][V];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < row_vectors<T>; k++) {
            const int j = (lane + 32 * k) * V;
            if (j >= h) continue;
            float wv[V], pv[V], tv[V];
            load16<T>(wv, we + j);
            load16<T>(pv, pe + j);
            load16<T>(tv, te + j);
#pragma unroll
            for (int e = 0; e < V; e++) {
                v[k][e] = to_f32(from_f32<T>(wv[e] + pv[e] + tv[e]));  // as stored: the statistics' input
                s += v[k][e];
            }
            store16<T>(emb + base + j, v[k]);
        }
        layernorm_regs<T, V>(out + base, mean, rstd, v, w, b, row, h, eps, s);
        return;
    }
    float s = 0.f;
    for (int j = lane; j < h; j += 32) {
        const T v = from_f32<T>(to_f32(we[j]) + to_f32(pe[j]) + to_f32(te[j]));
        emb[base + j] = v;
        s += to_f32(v);
    }
    __syncwarp();
    layernorm_row(out + base, mean, rstd, emb + base, w, b, row, h, eps, s);
}

#define FUSED_EMBEDDING(T, N)                                                                                       \
    BERTCUDA_KERNEL(embeddings_layernorm_fwd_##N, T* emb, T* out, float* mean, float* rstd,                         \
                                                            const int* ids, const int* types, const T* word,        \
                                                            const T* position, const T* token_type, const T* w,     \
                                                            const T* b, int rows, int seq, int h, float eps) {      \
        embeddings_layernorm_impl(emb, out, mean, rstd, ids, types, word, position, token_type, w, b, rows, seq, h, \
                                  eps);                                                                             \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED_EMBEDDING)
