//! The BERT model: config, parameter table, forward/backward over a `Backend`, checkpoints in and out.

pub mod bert;
pub mod config;
pub mod extend;
pub mod formats;
pub mod hf;
pub mod params;
