// Every kernel of bertcuda.cu, compiled for the host on top of cuda_emu.h, each registered by name with
// the runtime (runtime.cpp). With clang this file is built with -fsanitize=thread: each load and store
// calls the checker's hooks.
#include "cuda_emu.h"

#include "../bertcuda.cu"

// Dynamic shared memory (the most an sm_90 block may opt in to), in the shared section like every
// __shared__ variable.
namespace {
__shared__ unsigned char bcemu_dynamic_smem[232448];
}
void* bcemu::dynamic_shared() { return bcemu_dynamic_smem; }

// Referenced by the runtime, so a link that uses the runtime keeps this object and its registrations.
extern "C" void bcemu_kernels_anchor() {}
