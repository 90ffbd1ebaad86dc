// The one translation unit build.rs compiles: every kernel family, so the binary embeds one fatbin and
// the CUDA backend loads one module. Each family's launchers and CPU reference are in src/ops/<family>.rs.
#include "activation.cu"
#include "attention.cu"
#include "embedding.cu"
#include "linear.cu"
#include "loss.cu"
#include "norm.cu"
#include "optim.cu"
#include "tensor.cu"
#include "mma_check.cu"
