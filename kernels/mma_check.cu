// A check of the tensor-core wrappers (mma.cuh), one warp: D = A·B + C for one m16n8k16 tile, A (16×16)
// and Bᵀ (8×16) bf16 row-major and C (16×8) fp32 row-major in global memory, staged in shared memory with
// cp.async; the fragments loaded with ldmatrix (via_ldmatrix = 1) or by hand from the documented layout
// (0). D (16×8) fp32 row-major.                                                                         (=)
#include "mma.cuh"

BERTCUDA_KERNEL(mma_tile_check, float* d, const __nv_bfloat16* a, const __nv_bfloat16* bt, const float* c,
                int via_ldmatrix) {
    __shared__ __align__(16) __nv_bfloat16 as[16 * 16];
    __shared__ __align__(16) __nv_bfloat16 bs[8 * 16];
    const int l = threadIdx.x, g = l >> 2, t = l & 3;
    cp_async_16(&as[l * 8], &a[l * 8]);
    if (l < 16) cp_async_16(&bs[l * 8], &bt[l * 8]);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t fa[4], fb[2];
    if (via_ldmatrix) {
        const int i = l >> 3, r = l & 7;
        uint32_t tb[4];
        ldmatrix_x4(fa, &as[((i & 1) * 8 + r) * 16 + (i >> 1) * 8]);
        ldmatrix_x4(tb, &bs[r * 16 + (i & 1) * 8]);
        fb[0] = tb[0];
        fb[1] = tb[1];
    } else {
        const uint32_t* a32 = reinterpret_cast<const uint32_t*>(as);
        const uint32_t* b32 = reinterpret_cast<const uint32_t*>(bs);
        fa[0] = a32[(g * 16 + 2 * t) / 2];
        fa[1] = a32[((g + 8) * 16 + 2 * t) / 2];
        fa[2] = a32[(g * 16 + 2 * t + 8) / 2];
        fa[3] = a32[((g + 8) * 16 + 2 * t + 8) / 2];
        fb[0] = b32[(g * 16 + 2 * t) / 2];
        fb[1] = b32[(g * 16 + 2 * t + 8) / 2];
    }
    const float fc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    float fd[4];
    mma_m16n8k16_bf16(fd, fa, fb, fc);
    d[g * 8 + 2 * t] = fd[0];
    d[g * 8 + 2 * t + 1] = fd[1];
    d[(g + 8) * 8 + 2 * t] = fd[2];
    d[(g + 8) * 8 + 2 * t + 1] = fd[3];
}
