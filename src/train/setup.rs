//! A run's setup, before any device work: the settings checked, the checkpoint it resumes from, the
//! output directory claimed, the data opened, the model's config and starting weights (new, a transformers
//! checkpoint, or the checkpoint resumed), and each phase resolved against the data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::config::{OptimizerState, TrainConfig};
use crate::bail;
use crate::checkpoint::{self, TrainerState};
use crate::data::examples::Corpus;
use crate::data::loader::{open_corpus, EpochPlan, LoaderConfig};
use crate::data::tokenizer::BertTokenizer;
use crate::dist::Comm;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::SetAside;
use crate::model::config::ModelConfig;
use crate::model::hf::load_pretrained;
use crate::model::params::ParamTable;
use crate::optim::{lr_multiplier, Polynomial, Schedule};

/// Settings that may change when a run resumes (`--allow-config-change` for the rest of the schedule).
const RESUMABLE_CHANGES: [&str; 14] = [
    "dist_timeout_s",
    "bucket_size_mb",
    "output",
    "resume",
    "overwrite_output",
    "allow_config_change",
    "progress",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "eval_batches",
    "loader_threads",
    "debug_pause_in_save_ms",
];
/// Settings `--allow-config-change` lets change too.
const SCHEDULE_CHANGES: [&str; 5] =
    ["max_steps", "num_train_epochs", "learning_rate", "warmup_steps", "warmup_ratio"];
/// What a run starts from, backend-independent (each rank of an in-process job gets a clone).
#[derive(Clone)]
pub(super) struct Setup {
    pub cfg: TrainConfig,
    pub resume: Option<(PathBuf, TrainerState)>,
    pub corpus: Arc<Corpus>,
    pub config: ModelConfig,
    pub params: Vec<f32>,
    /// Where the weights came from, for the plan.
    pub init_note: String,
    pub fingerprint: String,
    /// The old output `--overwrite-output` replaces, kept until this run's first checkpoint.
    pub replaced: Option<Arc<Mutex<Option<SetAside>>>>,
}

impl Setup {
    /// Everything before the first step that does not depend on the device. `lead`: this process writes
    /// the output (rank 0).
    pub fn new(cfg: TrainConfig, lead: bool) -> Result<Setup> {
        cfg.validate()?;
        let resume = resume_point(&cfg)?;
        let replaced = if lead { claim_output(&cfg, resume.as_ref().map(|(_, s)| s))? } else { None };
        let corpus = open_corpus(&cfg.data)?;
        let fingerprint = corpus.tokenizer.fingerprint();
        let (config, params, init_note) = starting_model(&cfg, resume.as_ref(), &corpus.tokenizer)?;
        for (phase, _) in cfg.phase_configs()? {
            if phase.max_seq_len > config.max_position_embeddings {
                bail!(
                    "--max-seq-len {} exceeds the model's max_position_embeddings {}",
                    phase.max_seq_len,
                    config.max_position_embeddings
                );
            }
        }
        Ok(Setup { cfg, resume, corpus, config, params, init_note, fingerprint, replaced })
    }
}

/// The output directory made ready: a non-empty one refused, or with `--overwrite-output` moved aside
/// (returned, to delete at the first checkpoint); leftovers of a killed save cleaned; checkpoints later
/// than the one resumed set aside.
fn claim_output(
    cfg: &TrainConfig,
    resume: Option<&TrainerState>,
) -> Result<Option<Arc<Mutex<Option<SetAside>>>>> {
    let mut replaced = None;
    if resume.is_none()
        && cfg.output.exists()
        && std::fs::read_dir(&cfg.output).at(&cfg.output)?.next().is_some()
    {
        if cfg.overwrite_output {
            // Moved aside, not deleted: a run that fails before its first checkpoint puts it back.
            replaced = Some(Arc::new(Mutex::new(Some(SetAside::new(&cfg.output)?))));
        } else {
            bail!(
                "{}: the output directory exists and is not empty; pass --resume auto to continue its run, or --overwrite-output to replace it",
                cfg.output.display()
            );
        }
    }
    std::fs::create_dir_all(&cfg.output).at(&cfg.output)?;
    checkpoint::clean_leftovers(&cfg.output)?;
    if let Some(state) = resume {
        for dir in checkpoint::set_aside_later(&cfg.output, state.global_step)? {
            tracing::warn!(
                "set aside {}: a later checkpoint than the one this run resumes from",
                dir.display()
            );
        }
    }
    Ok(replaced)
}

/// The model's config, its starting weights and a note of where they came from: the checkpoint being
/// resumed, a transformers checkpoint (`--init-from`, its vocabulary extended when the shards' tokenizer
/// extends its own), or new (`--model-config`).
fn starting_model(
    cfg: &TrainConfig,
    resume: Option<&(PathBuf, TrainerState)>,
    tokenizer: &BertTokenizer,
) -> Result<(ModelConfig, Vec<f32>, String)> {
    let fingerprint = tokenizer.fingerprint();
    // The model: from a checkpoint being resumed, from a Hugging Face checkpoint, or new.
    Ok(if let Some((dir, state)) = resume {
        check_resume_config(&state.config, cfg)?;
        if state.tokenizer_fingerprint != fingerprint {
            bail!("cannot resume from {}: it was trained on data with another tokenizer ({}) than {} ({fingerprint})", dir.display(), state.tokenizer_fingerprint, cfg.data[0].display());
        }
        let (c, p, _) = load_pretrained(dir, cfg.seed)?;
        (c, p, format!("resumed from {} at step {}", dir.display(), state.global_step))
    } else if let Some(dir) = &cfg.init_from {
        let (c, p, report) = load_pretrained(dir, cfg.seed)?;
        // A bare vocab.txt says nothing of its casing: the shards' (chosen at `prepare`) decides.
        let opts = crate::data::tokenizer::LoadOptions { no_lowercase: !tokenizer.do_lower_case };
        let model_tokenizer = crate::model::formats::checkpoint_tokenizer(dir, opts)?;
        let mut note = format!("continued pretraining from {}: {}", dir.display(), report.summary());
        let (mut c, mut p) = (c, p);
        match model_tokenizer {
            // Shards made with the checkpoint's tokenizer extended for the domain: the model grows with it.
            Some(t) if crate::model::extend::extends(tokenizer, &t) => {
                let added;
                (c, p, added) = crate::model::extend::extend_vocabulary(&c, &p, &t, tokenizer)?;
                note.push_str(&format!(
                    "\n  vocabulary extended by {added} tokens to {}: their embedding rows (and decoder bias) start \
                     as the mean of the rows of the pieces the checkpoint's tokenizer cuts them into",
                    c.vocab_size
                ));
            }
            Some(t) if t.fingerprint() != fingerprint => bail!(
                "the shards in {} were made with another tokenizer than {}'s ({} vs {}), not one that extends its vocabulary; run `bertcuda prepare --tokenizer {}` on your text first",
                cfg.data[0].display(),
                dir.display(),
                fingerprint,
                t.fingerprint(),
                dir.display()
            ),
            Some(_) => {}
            None if c.vocab_size != tokenizer.vocab_size => bail!(
                "{} has a vocabulary of {} but the shards' tokenizer has {}; prepare the data with the model's tokenizer",
                dir.display(),
                c.vocab_size,
                tokenizer.vocab_size
            ),
            None => tracing::warn!("{} has no tokenizer files; the vocabulary sizes match, assuming the shards' tokenizer is the model's", dir.display()),
        }
        (c, p, note)
    } else {
        let mut c = if Path::new(&cfg.model_config).is_file() || cfg.model_config.ends_with(".json") {
            ModelConfig::load(Path::new(&cfg.model_config))?
        } else {
            ModelConfig::preset(&cfg.model_config, tokenizer.vocab_size)?
        };
        if c.vocab_size != tokenizer.vocab_size {
            bail!(
                "{}: vocab_size {} differs from the shards' tokenizer ({} tokens)",
                cfg.model_config,
                c.vocab_size,
                tokenizer.vocab_size
            );
        }
        c.pad_token_id = tokenizer.special.pad as usize;
        c.validate()?;
        let p = ParamTable::new(&c).init(&c, cfg.seed);
        (c, p, format!("a new {} model", cfg.model_config))
    })
}

/// Which checkpoint to resume from, if any.
fn resume_point(cfg: &TrainConfig) -> Result<Option<(PathBuf, TrainerState)>> {
    match cfg.resume.as_deref() {
        None => Ok(None),
        Some("auto") => {
            let (found, skipped) = checkpoint::find_resume(&cfg.output);
            for s in skipped {
                tracing::warn!("skipping a checkpoint that does not verify: {s}");
            }
            match &found {
                Some((dir, _)) => tracing::info!("resuming from {}", dir.display()),
                None => tracing::info!(
                    "--resume auto: no checkpoint in {}, starting a new run",
                    cfg.output.display()
                ),
            }
            Ok(found)
        }
        Some(dir) => {
            let dir = PathBuf::from(dir);
            let state = checkpoint::verify(&dir)
                .map_err(|e| Error::Invalid(format!("cannot resume from {}: {e}", dir.display())))?;
            Ok(Some((dir, state)))
        }
    }
}

/// Refuse to resume with settings that would change the run (other than where it logs and saves).
fn check_resume_config(saved: &serde_json::Value, cfg: &TrainConfig) -> Result<()> {
    let now = serde_json::to_value(cfg).expect("config serialises");
    let defaults = serde_json::to_value(TrainConfig::default()).expect("config serialises");
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else { return Ok(()) };
    for (k, v) in b {
        if RESUMABLE_CHANGES.contains(&k.as_str())
            || (cfg.allow_config_change && SCHEDULE_CHANGES.contains(&k.as_str()))
        {
            continue;
        }
        // A setting newer than the checkpoint's run had its default value there.
        let old = a.get(k).or_else(|| defaults.get(k)).cloned().unwrap_or(serde_json::Value::Null);
        if &old != v {
            bail!(
                "cannot resume: {k} was {old} in the checkpoint's run and is {v} now; resume with the same settings{}",
                if SCHEDULE_CHANGES.contains(&k.as_str()) { " (or pass --allow-config-change to change the schedule)" } else { "" }
            );
        }
    }
    Ok(())
}

/// One phase of a run, resolved against the data: its settings, loader, steps and schedule.
pub(super) struct Phase {
    pub cfg: TrainConfig,
    /// What its start does with the optimizer's moments.
    pub optimizer_state: OptimizerState,
    pub loader: LoaderConfig,
    /// Sequences per epoch and steps per epoch (for the plan).
    pub epoch_examples: usize,
    pub steps_per_epoch: u64,
    pub steps: u64,
    pub warmup: u64,
    pub schedule: LrSchedule,
}

impl Phase {
    pub fn new(
        cfg: &TrainConfig,
        optimizer_state: OptimizerState,
        corpus: &Corpus,
        comm: &dyn Comm,
    ) -> Result<Self> {
        let loader = LoaderConfig { rank: comm.rank(), world_size: comm.world(), ..cfg.loader() };
        loader.validate()?;
        let epoch0 = EpochPlan::new(corpus, &loader, 0)?;
        let steps_per_epoch = epoch0.batches(&loader) / cfg.gradient_accumulation_steps as u64;
        if steps_per_epoch == 0 {
            bail!(
                "an epoch has {} examples: fewer than one step of {} sequences (batch {} × accumulation {}); lower them or add data",
                epoch0.epoch_examples(),
                cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
                cfg.per_device_batch_size,
                cfg.gradient_accumulation_steps
            );
        }
        let steps = match (cfg.max_steps, cfg.num_train_epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => ((e * steps_per_epoch as f64).ceil() as u64).max(1),
            (None, None) => steps_per_epoch * 3,
        };
        let warmup = cfg
            .warmup_steps
            .unwrap_or_else(|| (cfg.warmup_ratio.unwrap_or(0.0) * steps as f64).ceil() as u64);
        let schedule = LrSchedule {
            kind: cfg.lr_scheduler,
            warmup,
            total: steps,
            base: cfg.learning_rate,
            poly: Polynomial {
                warmup_fraction: cfg.warmup_steps.is_none().then_some(cfg.warmup_ratio).flatten(),
                ..Polynomial::for_peak(cfg.lr_power, cfg.learning_rate)
            },
        };
        Ok(Phase {
            cfg: cfg.clone(),
            optimizer_state,
            loader,
            epoch_examples: epoch0.epoch_examples(),
            steps_per_epoch,
            steps,
            warmup,
            schedule,
        })
    }
}

/// A phase's learning rate at each of its updates.
#[derive(Debug, Clone, Copy)]
pub(super) struct LrSchedule {
    kind: Schedule,
    warmup: u64,
    total: u64,
    base: f64,
    poly: Polynomial,
}

impl LrSchedule {
    /// The rate of the phase's update `update` (from 0).
    pub fn lr(&self, update: u64) -> f64 {
        self.base * lr_multiplier(self.kind, update, self.warmup, self.total, self.poly)
    }
}
