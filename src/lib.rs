//! bertcuda: BERT pretraining (masked LM + next-sentence prediction) with hand-written CUDA kernels and a
//! Rust host. The layers, from the bottom: `data` (tokenizer, shards, examples, loader), `model`,
//! `optim`, `train`; the binary in `main.rs` only parses arguments and prints.

pub mod bench;
pub mod data;
pub mod error;
pub mod fsutil;
pub mod progress;

pub use error::{Error, Result};
