//! `bertcuda prepare`, `bertcuda inspect` and `bertcuda shards verify`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use bertcuda::data::examples::ExampleConfig;
use bertcuda::data::loader::{open_corpus, Cursor, Loader, LoaderConfig};
use bertcuda::data::prepare::{prepare, PrepareConfig, DEFAULT_SHARD_TOKENS};
use bertcuda::data::shards;
use bertcuda::data::text::DEFAULT_MAX_LINE_BYTES;

use super::tokenizer::print_issues;

#[derive(Args)]
pub struct PrepareArgs {
    /// Text files or directories (one sentence per line, a blank line between documents; .gz accepted).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// A Hugging Face model or tokenizer directory, a tokenizer.json, or a vocab.txt.
    #[arg(long)]
    tokenizer: PathBuf,
    /// With a bare vocab.txt: keep case.
    #[arg(long)]
    no_lowercase: bool,
    /// Output shard directory (written atomically).
    #[arg(long)]
    output: PathBuf,
    /// Tokenizer threads (default: every core). The output does not depend on it.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// Lines longer than this many bytes are cut (and counted).
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
    /// Tokens per shard file.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    shard_tokens: u64,
    /// Token id width in the shards: auto (16 bits when the vocabulary fits), 16 or 32.
    #[arg(long, default_value = "auto", value_parser = ["auto", "16", "32"])]
    id_width: String,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// The example and batch settings shared by inspect, train and eval.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Shard directories made by `bertcuda prepare` (several are mixed into one corpus).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Probability of selecting a token for the masked-LM loss.
    #[arg(long, default_value_t = 0.15)]
    pub mlm_probability: f64,
    /// Probability of a shorter target length for a document's examples (Google's short_seq_prob).
    #[arg(long, default_value_t = 0.1)]
    pub short_seq_prob: f64,
    /// MLM only: one segment of whole sentences, no next-sentence label.
    #[arg(long)]
    pub no_nsp: bool,
    /// Select whole words (a word and its ## pieces) for masking.
    #[arg(long)]
    pub whole_word_mask: bool,
    /// Cap on predicted tokens per sequence (a random subset is kept when more are selected).
    #[arg(long)]
    pub max_predictions_per_seq: Option<usize>,
    /// Pad every batch to --max-seq-len instead of its longest sequence.
    #[arg(long)]
    pub pad_to_max: bool,
}

impl DataArgs {
    /// The loader of `inspect` and `eval`: every batch (the last may be short), one rank unless told.
    pub fn loader(&self, seed: u64, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            examples: self.examples(seed),
            batch_size,
            rank: 0,
            world_size: 1,
            pad_to_max: self.pad_to_max,
            drop_last: false,
        }
    }

    fn examples(&self, seed: u64) -> ExampleConfig {
        ExampleConfig {
            max_seq_len: self.max_seq_len,
            short_seq_prob: self.short_seq_prob,
            nsp: !self.no_nsp,
            mlm_probability: self.mlm_probability,
            whole_word_mask: self.whole_word_mask,
            max_predictions_per_seq: self.max_predictions_per_seq,
            seed,
        }
    }
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    num_batches: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// First batch of the epoch to print.
    #[arg(long, default_value_t = 0)]
    start_batch: u64,
    #[arg(long, default_value_t = 0)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Add a human-readable `text` per sequence.
    #[arg(long)]
    decode: bool,
}

#[derive(Subcommand)]
pub enum ShardsCmd {
    /// Check every shard's header, size, checksum and ids, and the tokenizer; names the first bad file.
    #[command(after_help = "Example:\n  bertcuda shards verify shards/")]
    Verify { dir: PathBuf },
}

pub fn prepare_cmd(a: PrepareArgs) -> Result<()> {
    let cfg = PrepareConfig {
        inputs: a.input,
        tokenizer: a.tokenizer,
        no_lowercase: a.no_lowercase,
        output: a.output,
        workers: a.workers,
        overwrite: a.overwrite,
        max_line_bytes: a.max_line_bytes,
        shard_tokens: a.shard_tokens,
        id_bytes: match a.id_width.as_str() {
            "16" => Some(2),
            "32" => Some(4),
            _ => None,
        },
        progress: !a.quiet,
    };
    let s = prepare(&cfg)?;
    let m = &s.manifest;
    eprintln!(
        "prepared {} → {} in {:.1}s ({:.1} MB/s)",
        cfg.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
        s.output.display(),
        s.seconds,
        m.report.bytes as f64 / 1e6 / s.seconds
    );
    eprintln!(
        "  {} files, {:.1} MB, {} lines → {} documents, {} sentences, {} tokens in {} shard(s) of u{} ids",
        m.report.files,
        m.report.bytes as f64 / 1e6,
        m.report.lines,
        m.documents,
        m.sentences,
        m.tokens,
        m.shards.len(),
        m.id_bytes * 8
    );
    print_issues(&m.report);
    Ok(())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let corpus = open_corpus(&a.data.data)?;
    let cfg = LoaderConfig { rank: a.rank, world_size: a.world_size, ..a.data.loader(a.seed, a.batch_size) };
    let cursor = Cursor { epoch: a.epoch, batch: a.start_batch };
    let mut loader = Loader::start(corpus.clone(), cfg, cursor, 1, 2, None)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for _ in 0..a.num_batches {
        let Some(batch) = loader.next_batch() else { break };
        let batch = batch?;
        let rows = |v: &[u32]| serde_json::json!(v.chunks(batch.seq_len.max(1)).collect::<Vec<_>>());
        let mut obj = serde_json::json!({
            "input_ids": rows(&batch.input_ids),
            "token_type_ids": rows(&batch.token_type_ids),
            "attention_mask": batch.attention_mask.chunks(batch.seq_len.max(1)).collect::<Vec<_>>(),
            "labels": batch.labels.chunks(batch.seq_len.max(1)).collect::<Vec<_>>(),
        });
        if let Some(nsp) = &batch.next_sentence_label {
            obj["next_sentence_label"] = serde_json::json!(nsp);
        }
        if a.decode {
            let text = (0..batch.batch_size)
                .map(|i| {
                    let ids = &batch.row(&batch.input_ids, i)[..batch.lengths[i] as usize];
                    corpus.tokenizer.decode(ids, false)
                })
                .collect::<bertcuda::Result<Vec<_>>>()?;
            obj["text"] = serde_json::json!(text);
        }
        serde_json::to_writer(&mut out, &obj)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// `bertcuda shards verify DIR`.
pub fn verify(dir: &std::path::Path) -> Result<()> {
    let m = shards::verify(dir)?;
    println!(
        "{}: OK — {} shards, {} documents, {} sentences, {} tokens",
        dir.display(),
        m.shards.len(),
        m.documents,
        m.sentences,
        m.tokens
    );
    Ok(())
}
