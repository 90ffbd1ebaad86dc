//! The `bertcuda` command line: argument parsing and human output only; the work is in the library.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use bertcuda::data::examples::ExampleConfig;
use bertcuda::data::loader::{open_corpus, Cursor, Loader, LoaderConfig};
use bertcuda::data::prepare::{prepare, PrepareConfig, DEFAULT_SHARD_TOKENS};
use bertcuda::data::shards;
use bertcuda::data::text::{clean_line, list_input_files, CorpusReader, DEFAULT_MAX_LINE_BYTES};
use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
use bertcuda::fsutil::AtomicDir;
use bertcuda::infer::{BatchFile, LoadedModel, Pooling};

#[derive(Parser)]
#[command(
    name = "bertcuda",
    version,
    about = "BERT pretraining (MLM + NSP): tokenizer → token shards → training → evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a WordPiece vocabulary.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Print the token ids of texts, one JSON object per line.
    #[command(after_help = "Examples:\n  bertcuda tokenize --tokenizer tok/ \"Hello world.\"\n  \
        printf 'First segment.\\tSecond segment.\\n' | bertcuda tokenize --tokenizer tok/ --pair\n\n\
        Output: {\"input_ids\": [...], \"token_type_ids\": [...]} per input, special tokens included.")]
    Tokenize(TokenizeArgs),
    /// Tokenize a text corpus into memory-mapped token shards.
    #[command(
        after_help = "Example:\n  bertcuda prepare --input corpus/ --tokenizer tok/ --output shards/\n\n\
        Input: one sentence per line, a blank line between documents; files, directories (walked in sorted\n\
        order) and .gz files."
    )]
    Prepare(PrepareArgs),
    /// Print the batches the model sees, one JSON object per batch.
    #[command(after_help = "Example:\n  bertcuda inspect --data shards/ --batch-size 2 --decode\n\n\
        Output: one line per batch with input_ids, token_type_ids, attention_mask, labels (-100 where not\n\
        predicted) and next_sentence_label (absent with --no-nsp), each a list per sequence; --decode adds text.")]
    Inspect(InspectArgs),
    /// Pretrain BERT (MLM + NSP); with no arguments, a tiny model on the sample corpus.
    #[command(
        after_help = "Examples:\n  bertcuda train                      # the tiny preset on the shipped sample corpus\n  \
        bertcuda train --data shards/ --output out/ --model-config base --max-steps 100000\n  \
        bertcuda train --data shards/ --output out/ --init-from path/to/bert-base-uncased   # continued pretraining\n  \
        bertcuda train --data shards/ --output out/ --resume auto\n\n\
        A --config FILE (TOML or JSON) may hold the same keys as the flags (snake_case); flags win."
    )]
    Train(Box<TrainArgs>),
    /// Evaluate a model: MLM loss, accuracy and perplexity, NSP loss and accuracy.
    #[command(after_help = "Example:\n  bertcuda eval --model out/ --data shards/ --json")]
    Eval(EvalArgs),
    /// Run a model on a batch given as JSON: losses, and with --dump its outputs (and gradients).
    #[command(
        after_help = "Example:\n  bertcuda forward --model out/ --batch batch.json --dump out.safetensors --grads\n\n\
        batch.json: {\"input_ids\": [[...]], \"token_type_ids\": [[...]], \"attention_mask\": [[...]],\n\
        \"labels\": [[...]] (optional, -100 where not predicted), \"next_sentence_label\": [...] (optional)}.\n\
        Prints {\"loss\", \"mlm_loss\", \"nsp_loss\"} (null when its labels are absent; loss = the sum of the others)."
    )]
    Forward(ForwardArgs),
    /// The most likely tokens for each [MASK] in a text.
    #[command(after_help = "Example:\n  bertcuda fill-mask --model out/ \"Rust is a [MASK] language.\"\n\n\
        Prints one JSON object per [MASK]: its position and the top-k tokens with their probabilities.")]
    FillMask(FillMaskArgs),
    /// One embedding vector per text, one JSON array per line.
    #[command(
        after_help = "Example:\n  bertcuda embed --model out/ --pooling mean \"First text.\" \"Second text.\""
    )]
    Embed(EmbedArgs),
    /// Write any checkpoint bertcuda reads as a transformers directory (model.safetensors, config.json, tokenizer).
    #[command(
        after_help = "Examples:\n  bertcuda convert uncased_L-12_H-768_A-12/ bert-base-uncased/     # Google's TF checkpoint\n  \
        bertcuda convert biobert/pytorch_model.bin biobert-st/\n  \
        bertcuda convert nvidia-run/ckpt_8601.pt bert-nvidia/                  # NVIDIA DeepLearningExamples\n\n\
        SRC: a model directory or one checkpoint file. Reads model.safetensors, pytorch_model.bin (torch's zip and\n\
        legacy formats, sharded too), Google's TF checkpoints and NVIDIA's .pt without running anything the files\n\
        contain; prints what was loaded, initialised, ignored and skipped."
    )]
    Convert(ConvertArgs),
    /// Check shard directories.
    #[command(subcommand)]
    Shards(ShardsCmd),
    /// Testing: meet the other ranks of the job the environment describes, print the shared id.
    #[command(hide = true)]
    DebugRendezvous {
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Measure speed against a reference.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a BERT WordPiece vocabulary and write a Hugging Face tokenizer directory.
    #[command(
        after_help = "Example:\n  bertcuda tokenizer train --input corpus.txt --vocab-size 30522 --output tok/\n\n\
        Writes vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json;\n\
        transformers' AutoTokenizer.from_pretrained(\"tok/\") loads them."
    )]
    Train(TokenizerTrainArgs),
    /// Add a domain corpus's frequent whole words to a tokenizer's vocabulary (every existing id unchanged).
    #[command(
        after_help = "Example:\n  bertcuda tokenizer extend --tokenizer bert-base-uncased/ --input pubmed/ --add 2000 --output tok-bio/\n\n\
        Finds the words of the corpus that the tokenizer splits into several pieces, appends up to --add of the\n\
        most frequent (seen --min-frequency times at least) to its vocabulary, writes a transformers tokenizer\n\
        directory and prints one JSON line per added word: {\"token\", \"id\", \"count\", \"pieces\"}.\n\
        Then: bertcuda prepare --tokenizer tok-bio/ ...; bertcuda train --init-from bert-base-uncased/ ...\n\
        (the new rows of the embeddings start as the mean of the word's old pieces)."
    )]
    Extend(TokenizerExtendArgs),
}

#[derive(Args)]
struct TokenizerExtendArgs {
    /// The tokenizer to extend: a model or tokenizer directory, a tokenizer.json or a vocab.txt.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The domain corpus: text files or directories (one sentence per line; .gz accepted).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Words to add at most.
    #[arg(long)]
    add: usize,
    /// Add only words seen at least this often.
    #[arg(long, default_value_t = 10)]
    min_frequency: u64,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// With a bare vocab.txt: keep case.
    #[arg(long)]
    no_lowercase: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct TokenizerTrainArgs {
    /// Text files or directories (one sentence per line; .gz accepted).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Vocabulary size, the five special tokens included.
    #[arg(long, default_value_t = 30522)]
    vocab_size: usize,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// Keep case (a cased tokenizer); the default lower-cases and strips accents like bert-base-uncased.
    #[arg(long)]
    no_lowercase: bool,
    /// Drop word pieces seen fewer times than this.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    /// A Hugging Face model or tokenizer directory, a tokenizer.json, or a vocab.txt.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Each input is a pair: segment A, a TAB, segment B.
    #[arg(long)]
    pair: bool,
    /// With a bare vocab.txt: keep case.
    #[arg(long)]
    no_lowercase: bool,
    /// Texts; standard-input lines when none are given.
    text: Vec<String>,
}

#[derive(Args)]
struct PrepareArgs {
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
struct DataArgs {
    /// Shard directories made by `bertcuda prepare` (several are mixed into one corpus).
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
    /// Probability of selecting a token for the masked-LM loss.
    #[arg(long, default_value_t = 0.15)]
    mlm_probability: f64,
    /// Probability of a shorter target length for a document's examples (Google's short_seq_prob).
    #[arg(long, default_value_t = 0.1)]
    short_seq_prob: f64,
    /// MLM only: one segment of whole sentences, no next-sentence label.
    #[arg(long)]
    no_nsp: bool,
    /// Select whole words (a word and its ## pieces) for masking.
    #[arg(long)]
    whole_word_mask: bool,
    /// Cap on predicted tokens per sequence (a random subset is kept when more are selected).
    #[arg(long)]
    max_predictions_per_seq: Option<usize>,
    /// Pad every batch to --max-seq-len instead of its longest sequence.
    #[arg(long)]
    pad_to_max: bool,
}

impl DataArgs {
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
struct InspectArgs {
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

fn is_false(b: &bool) -> bool {
    !*b
}

/// Flags of `train`; every one optional so a config file can supply it (flags win).
#[derive(Args, serde::Serialize)]
struct TrainArgs {
    /// A TOML or JSON file with the same keys as these flags (snake_case).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Start this many ranks on this node (one per GPU) and supervise them, as torchrun does.
    #[arg(long)]
    #[serde(skip)]
    nproc_per_node: Option<usize>,
    /// Shard directories made by `bertcuda prepare`.
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    data: Vec<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, runs/ (TensorBoard), the final model.
    #[arg(long)]
    output: Option<PathBuf>,
    /// A preset (tiny, mini, small, medium, base, large) or a config.json.
    #[arg(long)]
    model_config: Option<String>,
    /// A Hugging Face BERT checkpoint to continue pretraining (DAPT/TAPT).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// auto (a GPU when there is one), cpu, cuda, or emu (the CUDA backend on the emulated device: a test device, slow).
    #[arg(long)]
    device: Option<String>,
    /// fp32, bf16 or fp16 (dynamic loss scaling).
    #[arg(long)]
    precision: Option<String>,
    /// Sequences per GPU (or CPU) per micro-batch (32).
    #[arg(long)]
    per_device_batch_size: Option<usize>,
    /// Micro-batches per optimizer step (1).
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate (1e-4).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// AdamW decoupled weight decay, not applied to biases and LayerNorm weights (0.01).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW β1 (0.9).
    #[arg(long)]
    adam_beta1: Option<f64>,
    /// AdamW β2 (0.999).
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// AdamW ε (1e-6).
    #[arg(long)]
    adam_epsilon: Option<f64>,
    /// Linear warmup steps (or --warmup-ratio; default none).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Warmup as a fraction of the steps.
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// linear, cosine, constant, constant_with_warmup or polynomial.
    #[arg(long)]
    lr_scheduler: Option<String>,
    /// The power of --lr-scheduler polynomial (1.0; NVIDIA's BERT uses 0.5).
    #[arg(long)]
    lr_power: Option<f64>,
    /// adamw (torch's AdamW) or lamb (NVIDIA's FusedLAMB: per-tensor trust ratios, the gradient clipped
    /// by its global norm inside the update; --adam-* set its β and ε).
    #[arg(long)]
    optim: Option<String>,
    /// LAMB: the trust ratio for every tensor, biases and LayerNorm weights too (FusedLAMB's use_nvlamb).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    lamb_all_tensors: bool,
    /// Optimizer steps to train (or --num-train-epochs; default 3 epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Epochs to train (fractions allowed).
    #[arg(long)]
    num_train_epochs: Option<f64>,
    /// A second phase after --max-steps steps (NVIDIA's 128 → 512 recipe), this many steps; the other
    /// --phase2-* settings change the first phase's for it. More phases: `[[phases]]` in --config.
    #[arg(long)]
    phase2_steps: Option<u64>,
    /// Phase 2: tokens per sequence.
    #[arg(long)]
    phase2_max_seq_len: Option<usize>,
    /// Phase 2: sequences per device per micro-batch.
    #[arg(long)]
    phase2_per_device_batch_size: Option<usize>,
    /// Phase 2: micro-batches per optimizer step.
    #[arg(long)]
    phase2_gradient_accumulation_steps: Option<usize>,
    /// Phase 2: peak learning rate (its schedule runs over its own steps).
    #[arg(long)]
    phase2_learning_rate: Option<f64>,
    /// Phase 2: warmup steps.
    #[arg(long)]
    phase2_warmup_steps: Option<u64>,
    /// Phase 2: warmup as a fraction of its steps.
    #[arg(long)]
    phase2_warmup_ratio: Option<f64>,
    /// Global gradient-norm clipping; 0 turns it off (1.0).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Tokens per sequence, special tokens included (128).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// Probability of selecting a token for the MLM loss (0.15).
    #[arg(long)]
    mlm_probability: Option<f64>,
    /// Probability of a shorter target length per document (0.1).
    #[arg(long)]
    short_seq_prob: Option<f64>,
    /// MLM only: one segment of whole sentences, no next-sentence label or NSP loss.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    no_nsp: bool,
    /// Select whole words (a word and its ## pieces) for masking.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    whole_word_mask: bool,
    /// Cap on predicted tokens per sequence (no cap unless given).
    #[arg(long)]
    max_predictions_per_seq: Option<usize>,
    /// Pad every batch to --max-seq-len instead of its longest sequence.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pad_to_max: bool,
    /// Seed of the initialisation, the examples, the masks and dropout (42).
    #[arg(long)]
    seed: Option<u64>,
    /// Log every this many steps (10).
    #[arg(long)]
    logging_steps: Option<u64>,
    /// Checkpoint every this many steps (500), and at the end.
    #[arg(long)]
    save_steps: Option<u64>,
    /// Checkpoints kept (at least 2); older ones are deleted once a new one is complete.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Shard directories to evaluate on during training.
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    eval_data: Vec<PathBuf>,
    /// Evaluate every this many steps (500).
    #[arg(long)]
    eval_steps: Option<u64>,
    /// Batches per evaluation (20).
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Continue a run: `auto` (the newest checkpoint that verifies; the default with no value) or a
    /// checkpoint directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
    resume: Option<String>,
    /// Replace a non-empty output directory instead of refusing.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    overwrite_output: bool,
    /// Let a resumed run change its schedule (max steps, epochs, learning rate, warmup).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    allow_config_change: bool,
    /// Non-finite steps in a row that stop an fp32/bf16 run.
    #[arg(long)]
    max_nonfinite_steps: Option<u64>,
    /// Threads building each batch (1).
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Multi-GPU jobs: seconds a rank waits for the others (rendezvous, a collective) before failing.
    #[arg(long)]
    dist_timeout_s: Option<u64>,
    /// Multi-GPU jobs: gradient bucket size in MB (25), reduced as backward completes each.
    #[arg(long)]
    bucket_size_mb: Option<f64>,
    /// No progress bar or periodic progress lines.
    #[arg(long)]
    #[serde(skip)]
    quiet: bool,
    /// Testing: make the gradients of these steps non-finite.
    #[arg(long, hide = true, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    debug_nonfinite_steps: Vec<u64>,
    /// Testing: pause inside each checkpoint save, before its commit.
    #[arg(long, hide = true)]
    debug_pause_in_save_ms: Option<u64>,
}

#[derive(Args)]
struct EvalArgs {
    /// A model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// auto (a GPU when there is one), cpu, cuda, or emu (the CUDA backend on the emulated device: a test device, slow).
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "emu", "auto"])]
    device: String,
    #[command(flatten)]
    data: DataArgs,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Batches evaluated at most (the first ones of epoch 0).
    #[arg(long, default_value_t = 100)]
    max_batches: usize,
    /// Seed of the pairs and masks: the same seed gives two models the same predictions to make.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForwardArgs {
    /// A model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The batch, as JSON.
    #[arg(long)]
    batch: PathBuf,
    /// cpu (the reference), cuda, emu (the CUDA backend on the emulated device: a test device, slow) or auto.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda", "emu", "auto"])]
    device: String,
    /// Write last_hidden_state, pooler_output, prediction_logits and seq_relationship_logits (f32) here.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// With --dump: also the loss's gradient of every parameter, as grad.<name>.
    #[arg(long, requires = "dump")]
    grads: bool,
}

#[derive(Args)]
struct FillMaskArgs {
    /// A model directory with an MLM head and its tokenizer (ours or a Hugging Face one).
    #[arg(long)]
    model: PathBuf,
    /// auto (a GPU when there is one), cpu, cuda, or emu (the CUDA backend on the emulated device: a test device, slow).
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "emu", "auto"])]
    device: String,
    /// Predictions printed per [MASK].
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// The text, with one or more [MASK] tokens.
    text: String,
}

#[derive(Args)]
struct EmbedArgs {
    #[arg(long)]
    model: PathBuf,
    /// auto (a GPU when there is one), cpu, cuda, or emu (the CUDA backend on the emulated device: a test device, slow).
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "emu", "auto"])]
    device: String,
    /// pooler: BertPooler's output; cls: the [CLS] hidden state; mean: the mean over the text's tokens.
    #[arg(long, default_value = "pooler", value_parser = ["pooler", "cls", "mean"])]
    pooling: String,
    #[arg(required = true)]
    text: Vec<String>,
}

#[derive(Args)]
struct ConvertArgs {
    /// The checkpoint: a model directory, or one of its files.
    src: PathBuf,
    /// The transformers directory to write (must not exist, unless --overwrite).
    dst: PathBuf,
    #[arg(long)]
    overwrite: bool,
    /// Keep case: the checkpoint's vocab.txt is cased (when no tokenizer_config.json or folder name says).
    #[arg(long)]
    no_lowercase: bool,
}

#[derive(Subcommand)]
enum ShardsCmd {
    /// Check every shard's header, size, checksum and ids, and the tokenizer; names the first bad file.
    #[command(after_help = "Example:\n  bertcuda shards verify shards/")]
    Verify { dir: PathBuf },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// NCCL all-reduce bus bandwidth across the ranks of a job, like nccl-tests (needs GPUs).
    #[command(after_help = "Example:\n  torchrun --nproc-per-node 8 $(which bertcuda) bench allreduce\n  \
        (or RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set by any launcher)")]
    Allreduce,
    /// Each CUDA kernel on BERT-base shapes: time, GB/s or TFLOP/s, fraction of the measured copy bandwidth.
    #[command(after_help = "Example:\n  bertcuda bench kernels")]
    Kernels,
    /// Whole training steps (loader and optimizer included) next to the model's own forward + backward.
    #[command(
        after_help = "Example:\n  bertcuda bench train --data .cache/default-run/shards --preset tiny"
    )]
    Train {
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// auto, cpu, cuda or emu.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value = "auto")]
        precision: String,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, visible_alias = "seq-len", default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 30)]
        steps: u64,
        /// The device's peak TFLOP/s for MFU (e.g. 989 for an H100 SXM's dense bf16); none: no MFU.
        #[arg(long)]
        peak_tflops: Option<f64>,
    },
    /// Forward + backward steps per second of the CPU backend (compare: benches/torch_cpu.py).
    #[command(after_help = "Example:\n  bertcuda bench model --preset mini --batch-size 8 --seq 128")]
    Model {
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// Sequences per second of one loader thread at max_seq_len 128 and 512.
    #[command(after_help = "Example:\n  bertcuda bench loader --data shards/")]
    Loader {
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<PathBuf>,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// Seconds per sequence length.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// prepare's MB/s of text next to the tokenizer's own encode_batch on the same text and threads.
    #[command(after_help = "Example:\n  bertcuda bench prepare --input data/sample --tokenizer tok/")]
    Prepare {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long)]
        tokenizer: PathBuf,
        /// Threads for both (default: every core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Runs of each; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenizer(TokenizerCmd::Train(a)) => tokenizer_train(a),
        Command::Tokenizer(TokenizerCmd::Extend(a)) => tokenizer_extend(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Prepare(a) => prepare_cmd(a),
        Command::DebugRendezvous { timeout_ms } => {
            let info = bertcuda::dist::RankInfo::from_env(|k| std::env::var(k).ok())?
                .context("no RANK/WORLD_SIZE (or SLURM) variables in the environment")?;
            let id = (info.rank == 0).then(|| {
                let mut id = [0u8; bertcuda::dist::ID_BYTES];
                let seed = std::process::id() as u64
                    ^ std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos() as u64;
                let mut r = bertcuda::data::rng::KeyedRng::new(9, &[seed]);
                id.iter_mut().for_each(|b| *b = r.next_u64() as u8);
                id
            });
            let id = bertcuda::dist::rendezvous(&info, id, std::time::Duration::from_millis(timeout_ms))?;
            println!(
                "rank {} of {}: {}",
                info.rank,
                info.world,
                id.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            Ok(())
        }
        Command::Inspect(a) => inspect(a),
        Command::Train(a) => train(*a),
        Command::Eval(a) => eval(a),
        Command::Forward(a) => forward(a),
        Command::FillMask(a) => fill_mask(a),
        Command::Embed(a) => embed(a),
        Command::Convert(a) => {
            let opts = LoadOptions { no_lowercase: a.no_lowercase };
            let report = bertcuda::model::hf::convert(&a.src, &a.dst, a.overwrite, opts)?;
            eprintln!("{}", report.summary());
            println!("wrote {}", a.dst.display());
            Ok(())
        }
        Command::Shards(ShardsCmd::Verify { dir }) => {
            let m = shards::verify(&dir)?;
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
        Command::Bench(BenchCmd::Allreduce) => {
            let info = bertcuda::dist::RankInfo::from_env(|k| std::env::var(k).ok())?
                .context("bench allreduce runs under a launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")?;
            let rows = bertcuda::bench::bench_allreduce(&info)?;
            if info.rank == 0 {
                println!(
                    "{:>12} {:>10} {:>12} {:>12}   ({} ranks)",
                    "bytes", "ms", "algbw GB/s", "busbw GB/s", info.world
                );
                for (b, ms, alg, bus) in rows {
                    println!("{b:>12} {ms:>10.3} {alg:>12.1} {bus:>12.1}");
                }
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Kernels) => {
            let (device, rows) = bertcuda::bench::bench_kernels()?;
            println!("{device}");
            println!("{:<44} {:>10} {:>12} {:>10}", "kernel", "ms", "rate", "of ceiling");
            for r in rows {
                let frac =
                    if r.fraction.is_nan() { "-".to_string() } else { format!("{:.0}%", 100.0 * r.fraction) };
                println!("{:<44} {:>10.4} {:>7.1} {:<7} {:>7}", r.name, r.ms, r.rate, r.unit, frac);
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Train {
            data,
            preset,
            device,
            precision,
            batch_size,
            seq,
            steps,
            peak_tflops,
        }) => {
            let b =
                bertcuda::bench::bench_train(&data, &preset, &device, &precision, batch_size, seq, steps)?;
            println!("{} {preset}, batch {}×{seq}, {} steps", b.device, b.batch, b.steps);
            println!(
                "train loop: {:.1} sequences/s, {:.0} tokens/s; forward+backward alone: {:.1} sequences/s; the loop adds {:.1}%",
                b.train_seq_per_s,
                b.train_tokens_per_s,
                b.model_seq_per_s,
                100.0 * (b.model_seq_per_s / b.train_seq_per_s - 1.0)
            );
            let mfu = peak_tflops.map_or(String::new(), |p| {
                format!(", MFU {:.1}% of {p} TFLOP/s", 100.0 * b.model_tflops / p)
            });
            println!("model FLOPs: {:.3} TFLOP/s{mfu}", b.model_tflops);
            if let Some(m) = b.memory_bytes {
                println!("device memory in use: {:.2} GB", m as f64 / 1e9);
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Model { preset, batch_size, seq, steps }) => {
            let b = bertcuda::bench::bench_model(&preset, batch_size, seq, steps)?;
            println!(
                "bertcuda cpu {} ({:.1} M parameters, activations {:.0} MB) batch {}×{}: {:.2} steps/s ({:.1} sequences/s) on {} threads",
                b.preset,
                b.params as f64 / 1e6,
                b.activation_bytes as f64 / 1e6,
                b.batch,
                b.seq,
                b.steps_per_s,
                b.steps_per_s * b.batch as f64,
                b.threads
            );
            Ok(())
        }
        Command::Bench(BenchCmd::Loader { data, batch_size, seconds }) => {
            for b in bertcuda::bench::bench_loader(&data, &[128, 512], batch_size, seconds)? {
                println!(
                    "max_seq_len {:4}: {:9.0} sequences/s on one loader thread (epoch index: {} examples in {:.3}s)",
                    b.max_seq_len, b.seq_per_s, b.epoch_examples, b.index_seconds
                );
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Prepare { input, tokenizer, workers, repeats }) => {
            let workers = if workers == 0 { num_cpus() } else { workers };
            let b = bertcuda::bench::bench_prepare(&input, &tokenizer, workers, repeats)?;
            println!("text: {:.1} MB, {} threads", b.text_mb, b.workers);
            println!("tokenizer encode_batch      : {:8.2} MB/s", b.encode_batch_mb_s);
            println!("tokenizer encode_batch_fast : {:8.2} MB/s", b.encode_batch_fast_mb_s);
            println!(
                "bertcuda prepare            : {:8.2} MB/s  ({:.2}x encode_batch, {:.2}x encode_batch_fast)",
                b.prepare_mb_s,
                b.prepare_mb_s / b.encode_batch_mb_s,
                b.prepare_mb_s / b.encode_batch_fast_mb_s
            );
            Ok(())
        }
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The sentences of a corpus as one stream; a read error ends it and is left in `failure`, to report after.
fn sentences<'a>(
    reader: &'a mut CorpusReader,
    failure: &'a mut Option<bertcuda::Error>,
) -> impl Iterator<Item = String> + 'a {
    std::iter::from_fn(move || loop {
        if failure.is_some() {
            return None;
        }
        match reader.next_document() {
            Ok(Some(doc)) => return Some(doc),
            Ok(None) => return None,
            Err(e) => *failure = Some(e),
        }
    })
    .flatten()
}

fn tokenizer_extend(a: TokenizerExtendArgs) -> Result<()> {
    if a.add == 0 {
        anyhow::bail!("--add 0 adds nothing; give the number of words to add");
    }
    let tok = BertTokenizer::load(&a.tokenizer, LoadOptions { no_lowercase: a.no_lowercase })?;
    let files = list_input_files(&a.input)?;
    let out = AtomicDir::create(&a.output, a.overwrite)?;
    let mut reader = CorpusReader::new(files, DEFAULT_MAX_LINE_BYTES);
    let mut failure = None;
    let words = tok.frequent_split_words(sentences(&mut reader, &mut failure), a.add, a.min_frequency);
    if let Some(e) = failure {
        return Err(e.into());
    }
    let words = words?;
    let extended = tok.extended(&words.iter().map(|w| w.word.clone()).collect::<Vec<_>>())?;
    extended.save_hf(out.path())?;
    let dir = out.commit()?;
    for (k, w) in words.iter().enumerate() {
        let line = serde_json::json!({"token": w.word, "id": tok.vocab_size + k, "count": w.count, "pieces": w.pieces});
        println!("{line}");
    }
    eprintln!(
        "added {} words (of --add {}, seen ≥{} times) to the {} tokens of {} → {} ({} tokens)",
        words.len(),
        a.add,
        a.min_frequency,
        tok.vocab_size,
        a.tokenizer.display(),
        dir.display(),
        extended.vocab_size
    );
    Ok(())
}

fn tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let files = list_input_files(&a.input)?;
    let out = AtomicDir::create(&a.output, a.overwrite)?;
    let mut reader = CorpusReader::new(files, DEFAULT_MAX_LINE_BYTES);
    let mut failure = None;
    let tok = BertTokenizer::train(
        sentences(&mut reader, &mut failure),
        a.vocab_size,
        a.min_frequency,
        !a.no_lowercase,
    );
    if let Some(e) = failure {
        return Err(e.into());
    }
    let tok = tok?;
    tok.save_hf(out.path())?;
    let dir = out.commit()?;
    let r = &reader.report;
    eprintln!(
        "trained a {} WordPiece vocabulary of {} tokens on {} lines ({:.1} MB) → {}",
        if tok.do_lower_case { "lower-cased" } else { "cased" },
        tok.vocab_size,
        r.lines,
        r.bytes as f64 / 1e6,
        dir.display()
    );
    print_issues(r);
    Ok(())
}

fn print_issues(r: &bertcuda::data::text::InputReport) {
    for (what, n) in r.issues() {
        if n > 0 {
            eprintln!("  {what}: {n}");
        }
    }
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = BertTokenizer::load(&a.tokenizer, LoadOptions { no_lowercase: a.no_lowercase })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut one = |text: &str, where_: &dyn Fn() -> String| -> Result<()> {
        let (ids, types) = if a.pair {
            let Some((first, second)) = text.split_once('\t') else {
                bail!("{}: --pair needs a TAB between segment A and segment B", where_());
            };
            tok.encode_with_specials(first, Some(second))?
        } else {
            tok.encode_with_specials(text, None)?
        };
        serde_json::to_writer(&mut out, &serde_json::json!({"input_ids": ids, "token_type_ids": types}))?;
        out.write_all(b"\n")?;
        Ok(())
    };
    if !a.text.is_empty() {
        for (i, t) in a.text.iter().enumerate() {
            one(t, &|| format!("argument {}", i + 1))?;
        }
    } else {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        let mut buf = Vec::new();
        let mut n = 0usize;
        loop {
            buf.clear();
            if lock.read_until(b'\n', &mut buf).context("reading standard input")? == 0 {
                break;
            }
            n += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let text = match std::str::from_utf8(&buf) {
                Ok(s) => s.to_string(),
                Err(_) => {
                    // Keep the TAB of a pair; remove only the invalid bytes.
                    eprintln!("warning: standard input line {n}: invalid UTF-8 removed");
                    let parts: Vec<String> = buf.split(|&b| b == b'\t').map(|p| clean_line(p).0).collect();
                    parts.join("\t")
                }
            };
            one(&text, &|| format!("standard input line {n}"))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn prepare_cmd(a: PrepareArgs) -> Result<()> {
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

fn inspect(a: InspectArgs) -> Result<()> {
    let corpus = open_corpus(&a.data.data)?;
    let cfg = LoaderConfig {
        examples: a.data.examples(a.seed),
        batch_size: a.batch_size,
        rank: a.rank,
        world_size: a.world_size,
        pad_to_max: a.data.pad_to_max,
        drop_last: false,
    };
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

fn load_model(dir: &std::path::Path) -> Result<LoadedModel> {
    let m = LoadedModel::load(dir)?;
    eprintln!("{}", m.report.summary());
    Ok(m)
}

fn forward(a: ForwardArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let fb = BatchFile::read(&a.batch)?.flatten(&a.batch)?;
    let r = bertcuda::infer::forward(&a.device, &model, &fb, a.dump.is_some(), a.grads)?;
    if let Some(path) = &a.dump {
        bertcuda::infer::write_safetensors(path, &r.tensors)?;
    }
    println!("{}", bertcuda::infer::losses_json(&r.losses));
    Ok(())
}

fn fill_mask(a: FillMaskArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = bertcuda::infer::model_tokenizer(&a.model)?;
    for (pos, preds) in bertcuda::infer::fill_mask(&a.device, &model, &tok, &a.text, a.top_k)? {
        println!("{}", serde_json::json!({"position": pos, "predictions": preds}));
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = bertcuda::infer::model_tokenizer(&a.model)?;
    let pooling = match a.pooling.as_str() {
        "cls" => Pooling::Cls,
        "mean" => Pooling::Mean,
        _ => Pooling::Pooler,
    };
    for v in bertcuda::infer::embed(&a.device, &model, &tok, &a.text, pooling)? {
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

/// The main job of `bertcuda train` with no arguments: the tiny preset on the sample corpus shipped in the
/// repository; its tokenizer and shards are made on the first run into .cache/default-run.
fn default_run_config() -> Result<serde_json::Value> {
    let root = [std::env::current_dir()?, PathBuf::from(env!("CARGO_MANIFEST_DIR"))]
        .into_iter()
        .find(|d| d.join("data/sample/rust-book.txt").is_file())
        .context("the sample corpus data/sample/rust-book.txt is not here; run from the bertcuda repository or pass --data")?;
    let cache = root.join(".cache/default-run");
    let (tok, shards) = (cache.join("tokenizer"), cache.join("shards"));
    let sample = root.join("data/sample");
    if !tok.join("tokenizer.json").is_file() {
        eprintln!(
            "default run: training a WordPiece vocabulary on {} into {}",
            sample.display(),
            tok.display()
        );
        tokenizer_train(TokenizerTrainArgs {
            input: vec![sample.clone()],
            vocab_size: 8000,
            output: tok.clone(),
            no_lowercase: false,
            min_frequency: 2,
            overwrite: true,
        })?;
    }
    if bertcuda::data::shards::read_manifest(&shards).is_err() {
        eprintln!("default run: preparing shards into {}", shards.display());
        prepare(&PrepareConfig { overwrite: true, ..PrepareConfig::new(vec![sample], tok, shards.clone()) })?;
    }
    let output = root.join("runs/tiny-sample");
    eprintln!(
        "default run: tiny BERT on the sample corpus → {} (the output is replaced each run)",
        output.display()
    );
    Ok(serde_json::json!({
        "data": [shards],
        "output": output,
        "model_config": "tiny",
        "per_device_batch_size": 32,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.1,
        "max_steps": 600,
        "logging_steps": 20,
        "save_steps": 200,
        "overwrite_output": true,
    }))
}

fn train(a: TrainArgs) -> Result<()> {
    if let Some(n) = a.nproc_per_node {
        if n == 0 {
            bail!("--nproc-per-node must be at least 1");
        }
        // Re-run this command once per rank, without the flag, under torchrun's variables.
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        if let Some(i) = args.iter().position(|x| x == "--nproc-per-node") {
            args.drain(i..(i + 2).min(args.len()));
        } else if let Some(i) = args.iter().position(|x| x.starts_with("--nproc-per-node=")) {
            args.remove(i);
        }
        let exe = std::env::current_exe().context("cannot find this executable to start the ranks")?;
        let port = match std::env::var("MASTER_PORT").ok().and_then(|p| p.parse().ok()) {
            Some(p) => p,
            None => bertcuda::dist::free_port()?,
        };
        return Ok(bertcuda::dist::supervise(&exe, &args, n, port)?);
    }
    let info = bertcuda::dist::RankInfo::from_env(|k| std::env::var(k).ok())?.filter(|i| i.world > 1);
    let no_args = a.config.is_none() && a.data.is_empty() && a.output.is_none() && a.resume.is_none();
    let file = match &a.config {
        Some(p) => Some(bertcuda::train::TrainConfig::file_values(p)?),
        None if no_args => Some(default_run_config()?),
        None => None,
    };
    let mut flags = serde_json::to_value(&a)?;
    if a.quiet {
        flags["progress"] = false.into();
    }
    let cfg = bertcuda::train::TrainConfig::resolve(file, flags)?;
    let stop = bertcuda::train::install_signal_handlers()?;
    let summary = match info {
        Some(info) => bertcuda::train::train_distributed(cfg, stop, info)?,
        None => bertcuda::train::train(cfg, stop)?,
    };
    if let (Some(first), Some(last)) = (summary.losses.first(), summary.losses.last()) {
        eprintln!("loss: {first:.4} at the first step of this run, {last:.4} at step {}", summary.steps);
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let model = LoadedModel::load(&a.model)?;
    if model.lacks("cls.seq_relationship") && model.lacks("cls.predictions") {
        bail!(
            "{}: the checkpoint has neither an MLM nor an NSP head (a bare BertModel), so there is nothing to \
             evaluate; continue pretraining it first: bertcuda train --init-from {0} ...",
            a.model.display()
        );
    }
    let corpus = open_corpus(&a.data.data)?;
    if let Ok(t) = BertTokenizer::load(&a.model, LoadOptions::default()) {
        corpus.sets[0].check_tokenizer(&t)?;
    }
    let cfg = LoaderConfig {
        examples: a.data.examples(a.seed),
        batch_size: a.batch_size,
        rank: 0,
        world_size: 1,
        pad_to_max: a.data.pad_to_max,
        drop_last: false,
    };
    cfg.validate()?;
    let mut r = bertcuda::infer::evaluate(&a.device, &model, &corpus, &cfg, a.max_batches)?;
    if model.lacks("cls.seq_relationship") {
        eprintln!("{}: no NSP head in the checkpoint; NSP results omitted", a.model.display());
        (r.nsp_loss, r.nsp_accuracy) = (None, None);
    }
    if model.lacks("cls.predictions") {
        eprintln!("{}: no MLM head in the checkpoint; MLM results omitted", a.model.display());
        (r.mlm_loss, r.mlm_accuracy, r.perplexity) = (None, None, None);
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!("sequences      {}", r.sequences);
        println!("mlm_loss       {}", f(r.mlm_loss));
        println!("mlm_accuracy   {}", f(r.mlm_accuracy));
        println!("perplexity     {}", f(r.perplexity));
        println!("nsp_loss       {}", f(r.nsp_loss));
        println!("nsp_accuracy   {}", f(r.nsp_accuracy));
    }
    Ok(())
}
