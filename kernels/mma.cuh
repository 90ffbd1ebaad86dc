// Tensor-core and asynchronous-copy instructions behind small wrappers. On the device each is one PTX
// instruction; on the emulated device (emu/cuda_emu.h) each is a collective of the warp that gathers the
// lanes' fragments by the layouts the PTX ISA documents, computes, and hands each lane its part — so a
// tensor-core kernel is checked in CI like any other (tests/gpu.rs runs the same check on a GPU, which
// holds the emulated layouts to the hardware's).
//
// mma_m16n8k16_bf16: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D (16×8, fp32) = A (16×16, bf16)
// · B (16×8, bf16) + C (16×8, fp32). Lane l, with g = l / 4 and t = l % 4, holds ("Matrix Fragments for
// mma.m16n8k16 with floating point type"; two bf16 per 32-bit register, the lower column in the low half):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]   (and D likewise)
// ldmatrix_x4: ldmatrix.sync.aligned.m8n8.x4.shared.b16, four 8×8 matrices of 16-bit elements from shared
// memory: lanes 8i..8i+7 give the addresses of matrix i's rows (16 bytes each, 16-byte aligned); lane l
// receives r[i] = row l / 4 of matrix i, elements 2(l % 4) and 2(l % 4) + 1.
// cp_async_16 / cp_async_commit / cp_async_wait_all: cp.async.cg.shared.global of 16 bytes, commit_group,
// wait_all. The emulator copies at issue, so a missing wait is visible only on the device.
#pragma once

#include "common.cuh"

#ifdef BERTCUDA_EMU
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    bcemu::mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) { bcemu::ldmatrix_x4(r, row); }
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
    memcpy(shared_dst, global_src, 16);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() {}
#else
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(shared_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(global_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
#endif

// Two fp32 values rounded to bf16 (round to nearest even) in one 32-bit register, `lo` in the low half: the
// layout of an mma operand's register.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat16 l = __float2bfloat16(lo), h = __float2bfloat16(hi);
    uint16_t a, b;
    memcpy(&a, &l, 2);
    memcpy(&b, &h, 2);
    return (uint32_t)a | ((uint32_t)b << 16);
}
