// The CUDA execution model on the CPU: what the kernel sources of this folder need from CUDA, for a host
// compiler. kernels/emu/kernels.cpp includes this header and then bertcuda.cu, unmodified; runtime.cpp
// runs the kernels: every block's threads as fibers with their own stacks, `__syncthreads` a barrier of
// the block's live threads, warp shuffles and votes collectives of the lanes their mask names, atomics
// atomic, `__shared__` memory one object per variable (blocks run one at a time). See runtime.cpp and the
// README ("The emulated device").
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <utility>

#define BERTCUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#if BCEMU_CHECKED
// One ELF section holds every __shared__ variable, so the checker knows an address is shared memory.
#define __shared__ static __attribute__((section("bcemu_shared"), aligned(16)))
#else
#define __shared__ static
#endif

// ---- vector types ---------------------------------------------------------------------------------------
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
typedef dim3 uint3;
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- bf16 and fp16 storage: conversions round to nearest even, as cvt.rn on the device; NaN → 0x7fff --
extern "C" uint16_t bcemu_f32_to_bf16(float x);
extern "C" uint16_t bcemu_f32_to_f16(float x);
extern "C" float bcemu_f16_to_f32(uint16_t h);
struct __nv_bfloat16 {
    uint16_t __x;
};
struct __half {
    uint16_t __x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __builtin_bit_cast(float, (uint32_t)h.__x << 16); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16{bcemu_f32_to_bf16(x)}; }
inline float __half2float(__half h) { return bcemu_f16_to_f32(h.__x); }
inline __half __float2half(float x) { return __half{bcemu_f32_to_f16(x)}; }

// ---- the execution model (runtime.cpp) ---------------------------------------------------------------------
namespace bcemu {
struct ThreadView {  // the first member of the runtime's Fiber
    dim3 thread_idx;
};
struct Block {
    dim3 block_idx, block_dim, grid_dim;
};
extern ThreadView* current;
extern Block block;
void syncthreads(const char* file, int line);
// op: 0 idx, 1 up, 2 down, 3 xor, 4 ballot, 5 all, 6 any, 7 syncwarp, 8 gather (value: a Gather*)
uint64_t warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);
unsigned active_mask();
// Every lane of the (full) warp gives `bytes` at `mine`; each receives all 32 lanes' at `all`, in lane order.
struct Gather {
    const void* mine;
    void* all;
    unsigned bytes;
};
void* dynamic_shared();
uint32_t atomic_rmw32(void* p, int op, uint32_t v, uint32_t cmp);
uint64_t atomic_rmw64(void* p, int op, uint64_t v, uint64_t cmp);
void trap(const char* file, int line);

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4- or 8-byte values");
    if constexpr (sizeof(T) == 4) return __builtin_bit_cast(uint32_t, v);
    else return __builtin_bit_cast(uint64_t, v);
}
template <typename T> inline T from_bits(uint64_t b) {
    if constexpr (sizeof(T) == 4) return __builtin_bit_cast(T, (uint32_t)b);
    else return __builtin_bit_cast(T, b);
}
}  // namespace bcemu

#define threadIdx (bcemu::current->thread_idx)
#define blockIdx (bcemu::block.block_idx)
#define blockDim (bcemu::block.block_dim)
#define gridDim (bcemu::block.grid_dim)
#define warpSize 32
#define __syncthreads() bcemu::syncthreads(__FILE__, __LINE__)
#define __trap() bcemu::trap(__FILE__, __LINE__)

#define BCEMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, BCEMU_SITE) {
    return bcemu::from_bits<T>(bcemu::warp_op(0, mask, bcemu::to_bits(v), src, width, file, line));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, BCEMU_SITE) {
    return bcemu::from_bits<T>(bcemu::warp_op(1, mask, bcemu::to_bits(v), (int)delta, width, file, line));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, BCEMU_SITE) {
    return bcemu::from_bits<T>(bcemu::warp_op(2, mask, bcemu::to_bits(v), (int)delta, width, file, line));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, BCEMU_SITE) {
    return bcemu::from_bits<T>(bcemu::warp_op(3, mask, bcemu::to_bits(v), lane_mask, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, BCEMU_SITE) {
    return (unsigned)bcemu::warp_op(4, mask, pred != 0, 0, 32, file, line);
}
inline int __all_sync(unsigned mask, int pred, BCEMU_SITE) {
    return (int)bcemu::warp_op(5, mask, pred != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int pred, BCEMU_SITE) {
    return (int)bcemu::warp_op(6, mask, pred != 0, 0, 32, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, BCEMU_SITE) { bcemu::warp_op(7, mask, 0, 0, 32, file, line); }
inline unsigned __activemask() { return bcemu::active_mask(); }

// ---- atomics (op: 0 add, 1 exch, 2 min, 3 max, 4 cas, 5 and, 6 or, 7 xor; 8 float add, 9 double add) ------
inline int atomicAdd(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 0, (uint32_t)v, 0); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return bcemu::atomic_rmw32(p, 0, v, 0); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return bcemu::atomic_rmw64(p, 0, v, 0);
}
inline float atomicAdd(float* p, float v) {
    return __builtin_bit_cast(float, bcemu::atomic_rmw32(p, 8, __builtin_bit_cast(uint32_t, v), 0));
}
inline double atomicAdd(double* p, double v) {
    return __builtin_bit_cast(double, bcemu::atomic_rmw64(p, 9, __builtin_bit_cast(uint64_t, v), 0));
}
inline int atomicExch(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 1, (uint32_t)v, 0); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return bcemu::atomic_rmw32(p, 1, v, 0); }
inline int atomicMin(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 2, (uint32_t)v, 0); }
inline int atomicMax(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 3, (uint32_t)v, 0); }
inline int atomicCAS(int* p, int cmp, int v) { return (int)bcemu::atomic_rmw32(p, 4, (uint32_t)v, (uint32_t)cmp); }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { return bcemu::atomic_rmw32(p, 4, v, cmp); }
inline int atomicAnd(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 5, (uint32_t)v, 0); }
inline int atomicOr(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 6, (uint32_t)v, 0); }
inline int atomicXor(int* p, int v) { return (int)bcemu::atomic_rmw32(p, 7, (uint32_t)v, 0); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- integer and float intrinsics: the device's results, or within the documented ulps of them -----------
template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) { return a < b ? b : a; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float exp2f_approx(float x) { return exp2f(x); }
inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---- tensor-core fragments (kernels/mma.cuh): gathered from the 32 lanes by the PTX ISA's layouts --------
namespace bcemu {
inline void warp_gather(const void* mine, void* all, unsigned bytes, const char* file, int line) {
    Gather g{mine, all, bytes};
    warp_op(8, 0xffffffffu, (uint64_t)(uintptr_t)&g, 0, 32, file, line);
}
inline int lane_id() {
    const dim3 &t = current->thread_idx, &b = block.block_dim;
    return (int)((t.x + t.y * b.x + t.z * b.x * b.y) & 31);
}
inline float bf16_lo(uint32_t r) { return __builtin_bit_cast(float, r << 16); }
inline float bf16_hi(uint32_t r) { return __builtin_bit_cast(float, r & 0xffff0000u); }
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                              BCEMU_SITE) {
    struct Frag {
        uint32_t a[4], b[2];
    } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    warp_gather(&mine, all, sizeof mine, file, line);
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l >> 2, t = l & 3;
        const Frag& f = all[l];
        A[g][2 * t] = bf16_lo(f.a[0]), A[g][2 * t + 1] = bf16_hi(f.a[0]);
        A[g + 8][2 * t] = bf16_lo(f.a[1]), A[g + 8][2 * t + 1] = bf16_hi(f.a[1]);
        A[g][2 * t + 8] = bf16_lo(f.a[2]), A[g][2 * t + 9] = bf16_hi(f.a[2]);
        A[g + 8][2 * t + 8] = bf16_lo(f.a[3]), A[g + 8][2 * t + 9] = bf16_hi(f.a[3]);
        B[2 * t][g] = bf16_lo(f.b[0]), B[2 * t + 1][g] = bf16_hi(f.b[0]);
        B[2 * t + 8][g] = bf16_lo(f.b[1]), B[2 * t + 9][g] = bf16_hi(f.b[1]);
    }
    const int lane = lane_id(), g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; i++) {
        float s = c[i];
        for (int k = 0; k < 16; k++) s += A[rows[i]][k] * B[k][cols[i]];
        d[i] = s;
    }
}
inline void ldmatrix_x4(uint32_t r[4], const void* row, BCEMU_SITE) {
    const void* rows[32];
    warp_gather(&row, rows, sizeof row, file, line);
    const int lane = lane_id();
    for (int i = 0; i < 4; i++) r[i] = static_cast<const uint32_t*>(rows[8 * i + lane / 4])[lane % 4];
}
}  // namespace bcemu

// The extern "C" kernels: declared, registered by name with the runtime (so a launch finds them and checks
// its argument list against their parameters), then defined.
namespace bcemu {
void register_kernel(const char* name, void* fn, void (*invoke)(void*, void**), int nargs, const unsigned* sizes);
template <typename... A> struct Kernel {
    template <unsigned long... I> static void call(void (*f)(A...), void** a, std::integer_sequence<unsigned long, I...>) {
        f(*static_cast<A*>(a[I])...);
    }
    static void invoke(void* f, void** args) {
        call(reinterpret_cast<void (*)(A...)>(f), args, std::make_integer_sequence<unsigned long, sizeof...(A)>{});
    }
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0};
    Kernel(const char* name, void (*f)(A...)) {
        register_kernel(name, reinterpret_cast<void*>(f), &invoke, (int)sizeof...(A), sizes);
    }
};
}  // namespace bcemu
