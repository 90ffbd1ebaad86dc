// Launch geometry: what the kernels assume about how they are launched, in one place for both sides.
// The kernels include this header; build.rs turns each `constexpr int NAME = VALUE;` line into a Rust
// constant (`crate::backend::cuda::launch::NAME`, read by the launchers in src/ops/<family>.rs), so a
// kernel and its launcher cannot disagree.
#pragma once

// Threads per block of the 1-D kernels.
constexpr int THREADS = 256;
// Row-per-warp kernels (LayerNorm and the fused LayerNorms): rows per block of THREADS threads.
constexpr int WARP_ROWS = 8;
// Two-stage reductions over rows (LayerNorm weight gradients, bias gradients, GELU + bias backward):
// rows per block of the first stage.
constexpr int PARTIAL_ROWS = 64;
// Attention: query (or key) rows per block, one per thread; key (or query) rows per shared-memory tile.
constexpr int ATTENTION_ROWS = 64;
constexpr int ATTENTION_TILE = 32;
// Attention on tensor cores (bf16): threads per block (a warp per 16 of the ATTENTION_ROWS queries) and
// keys per shared-memory tile.
constexpr int ATTENTION_TC_THREADS = 128;
constexpr int ATTENTION_TC_KEYS = 64;
// Sum of squares (optim.cu): the first stage's blocks take about SUM_SQUARES_CHUNK elements each, at most
// SUM_SQUARES_BLOCKS blocks, whose partials the final stage adds in order on one thread.
constexpr int SUM_SQUARES_CHUNK = 16384;
constexpr int SUM_SQUARES_BLOCKS = 1024;
// AdamW and LAMB: parameter elements per chunk (one block of THREADS threads each; no chunk crosses a
// tensor's end).
constexpr int OPTIMIZER_CHUNK = 8192;
// The step control (optim.cu's step_control, backend::StepControl): its float slots, then a record of
// CONTROL_RECORD floats per step since the host last read them, at most CONTROL_HISTORY steps; its int
// slots, then per recorded step whether it applied. SCHEDULE_ROW numbers per update in the schedule.
constexpr int CONTROL_SQUARES = 0;
constexpr int CONTROL_MLM = 1;
constexpr int CONTROL_NSP = 2;
constexpr int CONTROL_SCALE = 3;
constexpr int CONTROL_INV_SCALE = 4;
constexpr int CONTROL_CLIP = 5;
constexpr int CONTROL_DIVISOR = 6;
constexpr int CONTROL_FLOATS = 8;
constexpr int CONTROL_RECORD = 3;
constexpr int CONTROL_APPLIED = 0;
constexpr int CONTROL_ROW = 1;
constexpr int CONTROL_UPDATES = 2;
constexpr int CONTROL_GOOD_STEPS = 3;
constexpr int CONTROL_INTS = 4;
constexpr int CONTROL_HISTORY = 1024;
constexpr int SCHEDULE_ROW = 3;

static_assert(WARP_ROWS * 32 == THREADS, "a row-per-warp block of THREADS threads holds WARP_ROWS rows");
