//! The `bertcuda` command line: the commands and their dispatch. Each command's flags and output live in
//! src/cli/; the work is in the library.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use cli::bench::BenchCmd;
use cli::data::{InspectArgs, PrepareArgs, ShardsCmd};
use cli::model::{ConvertArgs, EmbedArgs, EvalArgs, FillMaskArgs, ForwardArgs};
use cli::tokenizer::{TokenizeArgs, TokenizerCmd};
use cli::train::TrainArgs;

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

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    match cli.command {
        Command::Tokenizer(TokenizerCmd::Train(a)) => cli::tokenizer::tokenizer_train(a),
        Command::Tokenizer(TokenizerCmd::Extend(a)) => cli::tokenizer::tokenizer_extend(a),
        Command::Tokenize(a) => cli::tokenizer::tokenize(a),
        Command::Prepare(a) => cli::data::prepare_cmd(a),
        Command::Inspect(a) => cli::data::inspect(a),
        Command::Shards(ShardsCmd::Verify { dir }) => cli::data::verify(&dir),
        Command::Train(a) => {
            cli::train::train(*a, matches.subcommand_matches("train").expect("the train command's matches"))
        }
        Command::DebugRendezvous { timeout_ms } => cli::train::debug_rendezvous(timeout_ms),
        Command::Eval(a) => cli::model::eval(a),
        Command::Forward(a) => cli::model::forward(a),
        Command::FillMask(a) => cli::model::fill_mask(a),
        Command::Embed(a) => cli::model::embed(a),
        Command::Convert(a) => cli::model::convert(a),
        Command::Bench(b) => cli::bench::run(b),
    }
}
