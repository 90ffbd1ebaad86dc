//! Everything between raw text and the batches the model sees.

pub mod prepare;
pub mod shards;
pub mod text;
pub mod tokenizer;
