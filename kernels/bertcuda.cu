// The one translation unit build.rs compiles: every kernel family, so the binary embeds one fatbin and
// the CUDA backend loads one module.
#include "adamw.cu"
#include "attention.cu"
#include "cross_entropy.cu"
#include "elementwise.cu"
#include "embedding.cu"
#include "fused.cu"
#include "layernorm.cu"
#include "rows.cu"
#include "mma_check.cu"
