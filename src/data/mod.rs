//! Everything between raw text and the batches the model sees.

pub mod examples;
pub mod loader;
pub mod prepare;
pub mod rng;
pub mod shards;
pub mod text;
pub mod tokenizer;
