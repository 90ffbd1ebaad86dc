//! `bertcuda train`: its flags (the run's settings, declared once in `bertcuda::train::TrainConfig`,
//! with the two that only the command line has), the no-argument default run, and `--nproc-per-node`
//! (one process per GPU, supervised).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use bertcuda::data::prepare::{prepare, PrepareConfig};
use bertcuda::train::TrainConfig;

use super::tokenizer::{tokenizer_train, TokenizerTrainArgs};

/// `bertcuda train`'s flags: every setting of a run, and the two only the command line has.
#[derive(Args)]
pub struct TrainArgs {
    /// A TOML or JSON file with the same keys as these flags (snake_case); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start this many ranks on this node (one per GPU) and supervise them, as torchrun does.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    #[command(flatten)]
    pub settings: TrainConfig,
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

/// `matches`: the command line `a` was parsed from (which settings it gave).
pub fn train(a: TrainArgs, matches: &clap::ArgMatches) -> Result<()> {
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
    let flags = a.settings.given(matches);
    let no_args = a.config.is_none() && ["data", "output", "resume"].iter().all(|k| flags.get(k).is_none());
    let file = match &a.config {
        Some(p) => Some(TrainConfig::file_values(p)?),
        None if no_args => Some(default_run_config()?),
        None => None,
    };
    let cfg = TrainConfig::resolve(file, flags)?;
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

/// `bertcuda debug-rendezvous` (testing): meet the other ranks of the job the environment describes and
/// print the id rank 0 shared.
pub fn debug_rendezvous(timeout_ms: u64) -> Result<()> {
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
