//! The BERT model: config, parameter table, forward/backward over a `Backend`, Hugging Face checkpoints.

pub mod bert;
pub mod config;
pub mod hf;
pub mod params;
