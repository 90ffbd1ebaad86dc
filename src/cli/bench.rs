//! `bertcuda bench`: speed, as ratios against a reference.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use bertcuda::backend::choice::{Device, Precision};

#[derive(Subcommand)]
pub enum BenchCmd {
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
        #[arg(long, value_enum, default_value_t)]
        device: Device,
        #[arg(long, value_enum, default_value_t)]
        precision: Precision,
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

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Allreduce => {
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
        BenchCmd::Kernels => {
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
        BenchCmd::Train { data, preset, device, precision, batch_size, seq, steps, peak_tflops } => {
            let b = bertcuda::bench::bench_train(&data, &preset, device, precision, batch_size, seq, steps)?;
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
            if let Some((t, n)) = b.traffic {
                let per = |x: u64| x as f64 / n as f64;
                println!(
                    "per step (the {n} after the first): {:.1} host synchronisations, {:.1} uploads ({:.1} KB), {:.1} downloads, {:.1} device allocations",
                    per(t.synchronisations),
                    per(t.uploads),
                    per(t.upload_bytes) / 1e3,
                    per(t.downloads),
                    per(t.allocations)
                );
            }
            Ok(())
        }
        BenchCmd::Model { preset, batch_size, seq, steps } => {
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
        BenchCmd::Loader { data, batch_size, seconds } => {
            for b in bertcuda::bench::bench_loader(&data, &[128, 512], batch_size, seconds)? {
                println!(
                    "max_seq_len {:4}: {:9.0} sequences/s on one loader thread (epoch index: {} examples in {:.3}s)",
                    b.max_seq_len, b.seq_per_s, b.epoch_examples, b.index_seconds
                );
            }
            Ok(())
        }
        BenchCmd::Prepare { input, tokenizer, workers, repeats } => {
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
