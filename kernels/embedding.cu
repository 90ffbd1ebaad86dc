// Embeddings: word + position + token type.
//   embeddings_fwd: out[r] = word[ids[r]] + position[r mod T] + token_type[types[r]]                    (=)
//   embeddings_bwd (one table): table[key_k] += Σ_{r in group k} dout[r], groups in a CSR built on the host
//     (rows sorted by key, in row order within a key): one block per key, so no two threads add to one row
//     and the order of additions is fixed — deterministic, no atomics.                                 (+=)
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

// The table is a parameter gradient: fp32 whatever the activations' type.
template <typename T>
__device__ void embedding_scatter_impl(float* table, const T* dout, const int* keys, const int* offsets,
                                       const int* rows, int groups, int h) {
    const int k = blockIdx.x;
    if (k >= groups) return;
    float* dst = table + (long)keys[k] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float s = 0.f;
        for (int i = offsets[k]; i < offsets[k + 1]; i++) s += to_f32(dout[(long)rows[i] * h + j]);
        dst[j] += s;
    }
}

#define EMBEDDING(T, N)                                                                                       \
    BERTCUDA_KERNEL(embeddings_fwd_##N, T* out, const int* ids, const int* types, const T* word,    \
                                                  const T* position, const T* token_type, int rows, int seq,  \
                                                  int h) {                                                    \
        embeddings_fwd_impl(out, ids, types, word, position, token_type, rows, seq, h);                      \
    }                                                                                                         \
    BERTCUDA_KERNEL(embeddings_bwd_##N, float* table, const T* dout, const int* keys, const int* offsets, \
                                                  const int* rows, int groups, int h) {                       \
        embedding_scatter_impl(table, dout, keys, offsets, rows, groups, h);                                 \
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
