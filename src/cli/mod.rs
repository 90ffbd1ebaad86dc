//! Each command's flags (clap) and human output; the work itself is in the library.

pub mod bench;
pub mod data;
pub mod model;
pub mod tokenizer;
pub mod train;
