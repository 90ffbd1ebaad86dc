//! bertcuda: BERT pretraining (masked LM + next-sentence prediction) with hand-written CUDA kernels and a
//! Rust host. The layers, from the bottom: `backend` (memory and devices), `ops` (the op families, each
//! with its CPU reference and CUDA launcher), `data` (tokenizer, shards, examples, loader), `model`,
//! `optim`, `train`; the binary (`main.rs`, the commands and their dispatch; `cli/`, each command's flags
//! and output) calls them. docs/ARCHITECTURE.md describes the whole.

// Ops take their shapes as arguments, and numeric loops index several arrays by one position.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod fsutil;
pub mod infer;
pub mod model;
pub mod ops;
pub mod optim;
pub mod progress;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};

// The test machinery of src/ops/testing.rs names the crate `bertcuda`, as tests/gpu.rs (which shares it)
// must.
#[cfg(test)]
extern crate self as bertcuda;
