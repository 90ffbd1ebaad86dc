//! `bertcuda train` and `bertcuda eval`: the pretraining loop.
//!
//! One step: `gradient_accumulation_steps` micro-batches, each forward + backward with its dropout masks
//! keyed by the micro-step counter, the gradients' denominators the whole step's predicted tokens and
//! sequences (so accumulation equals one larger batch); then the non-finite check, unscaling (fp16),
//! global-norm clipping, one AdamW update at the schedule's rate. Every choice is a function of the config,
//! the seed and counters that checkpoints keep, so a resumed run continues bit for bit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::cpu::Cpu;
use crate::backend::Backend;
use crate::bail;
use crate::checkpoint::{self, CheckpointData, TrainerState, STATE_VERSION};
use crate::data::examples::{Corpus, ExampleConfig};
use crate::data::loader::{open_corpus, Cursor, EpochPlan, Loader, LoaderConfig};
use crate::dist::{Comm, InProcess, Single};
use crate::error::{Error, IoContext, Result};
use crate::model::bert::{Bert, Inputs, LossNorm, Plan, StepOptions, Train};
use crate::model::config::ModelConfig;
use crate::model::hf::load_pretrained;
use crate::model::params::ParamTable;
use crate::optim::{
    lr_multiplier, AdamW, AdamWConfig, Lamb, LambConfig, LossScaler, Optimizer, Polynomial, Schedule,
};
use crate::progress::Progress;
use crate::tensorboard::EventWriter;

/// Every setting of a run. Flag names follow transformers' TrainingArguments where one exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub data: Vec<PathBuf>,
    pub output: PathBuf,
    /// A preset name (tiny, mini, small, medium, base, large) or a config.json.
    pub model_config: String,
    /// A Hugging Face checkpoint to continue pretraining from.
    pub init_from: Option<PathBuf>,
    pub device: String,
    pub precision: String,
    pub per_device_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    pub lr_scheduler: String,
    /// The power of the polynomial schedule (transformers' default 1; NVIDIA's BERT 0.5).
    pub lr_power: f64,
    /// "adamw" (torch's AdamW) or "lamb" (NVIDIA's FusedLAMB).
    pub optim: String,
    /// LAMB: the trust ratio for every tensor, the no-decay group too (FusedLAMB's use_nvlamb).
    pub lamb_all_tensors: bool,
    pub max_steps: Option<u64>,
    pub num_train_epochs: Option<f64>,
    /// Phases run one after the other (NVIDIA's 128 → 512 recipe): each overrides the settings above for
    /// its steps. Empty: one phase, the settings above.
    pub phases: Vec<PhaseConfig>,
    /// The two-phase case as flags: phase 1 is the settings above (--max-steps its steps), phase 2 these.
    pub phase2_steps: Option<u64>,
    pub phase2_max_seq_len: Option<usize>,
    pub phase2_per_device_batch_size: Option<usize>,
    pub phase2_gradient_accumulation_steps: Option<usize>,
    pub phase2_learning_rate: Option<f64>,
    pub phase2_warmup_steps: Option<u64>,
    pub phase2_warmup_ratio: Option<f64>,
    pub max_grad_norm: f64,
    pub max_seq_len: usize,
    pub mlm_probability: f64,
    pub short_seq_prob: f64,
    pub no_nsp: bool,
    pub whole_word_mask: bool,
    pub max_predictions_per_seq: Option<usize>,
    pub pad_to_max: bool,
    pub seed: u64,
    pub logging_steps: u64,
    pub save_steps: u64,
    pub save_total_limit: usize,
    pub eval_data: Vec<PathBuf>,
    pub eval_steps: u64,
    pub eval_batches: usize,
    /// "auto" (the newest checkpoint that verifies) or a checkpoint directory.
    pub resume: Option<String>,
    pub overwrite_output: bool,
    pub allow_config_change: bool,
    /// Non-finite steps in a row that stop the run (fp32/bf16).
    pub max_nonfinite_steps: u64,
    pub loader_threads: usize,
    /// Multi-GPU jobs: seconds a rank waits for the others (rendezvous, a collective) before it fails.
    pub dist_timeout_s: u64,
    /// Multi-GPU jobs: size of the gradient buckets reduced as the backward pass completes them.
    pub bucket_size_mb: f64,
    /// Progress bar / periodic lines on stderr.
    pub progress: bool,
    /// Testing: make the gradients of these steps non-finite.
    pub debug_nonfinite_steps: Vec<u64>,
    /// Testing: pause this long inside each checkpoint save, before its commit.
    pub debug_pause_in_save_ms: u64,
}

/// One phase of a run: its steps, and the settings it changes (unset: the run's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseConfig {
    pub max_steps: u64,
    pub max_seq_len: Option<usize>,
    pub per_device_batch_size: Option<usize>,
    pub gradient_accumulation_steps: Option<usize>,
    pub learning_rate: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    /// Masked positions per sequence at most (NVIDIA: 20 at 128 tokens, 80 at 512).
    pub max_predictions_per_seq: Option<usize>,
    /// At the phase's start: "keep" the optimizer's moments and restart its bias-correction count, as
    /// NVIDIA's phase 2 does (their run_pretraining.py loads phase 1's optimizer state and sets its step to
    /// 0), or "reset" them to zero. The first phase starts from zero either way.
    pub optimizer_state: String,
}

impl Default for PhaseConfig {
    /// No steps (a phase must give them) and every setting the run's.
    fn default() -> Self {
        PhaseConfig {
            max_steps: 0,
            max_seq_len: None,
            per_device_batch_size: None,
            gradient_accumulation_steps: None,
            learning_rate: None,
            warmup_steps: None,
            warmup_ratio: None,
            max_predictions_per_seq: None,
            optimizer_state: "keep".into(),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: vec![],
            output: PathBuf::new(),
            model_config: "base".into(),
            init_from: None,
            device: "auto".into(),
            precision: "auto".into(),
            per_device_batch_size: 32,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-6,
            warmup_steps: None,
            warmup_ratio: None,
            lr_scheduler: "linear".into(),
            lr_power: 1.0,
            optim: "adamw".into(),
            lamb_all_tensors: false,
            max_steps: None,
            num_train_epochs: None,
            phases: vec![],
            phase2_steps: None,
            phase2_max_seq_len: None,
            phase2_per_device_batch_size: None,
            phase2_gradient_accumulation_steps: None,
            phase2_learning_rate: None,
            phase2_warmup_steps: None,
            phase2_warmup_ratio: None,
            max_grad_norm: 1.0,
            max_seq_len: 128,
            mlm_probability: 0.15,
            short_seq_prob: 0.1,
            no_nsp: false,
            whole_word_mask: false,
            max_predictions_per_seq: None,
            pad_to_max: false,
            seed: 42,
            logging_steps: 10,
            save_steps: 500,
            save_total_limit: 2,
            eval_data: vec![],
            eval_steps: 500,
            eval_batches: 20,
            resume: None,
            overwrite_output: false,
            allow_config_change: false,
            max_nonfinite_steps: 10,
            loader_threads: 1,
            dist_timeout_s: 600,
            bucket_size_mb: 25.0,
            progress: true,
            debug_nonfinite_steps: vec![],
            debug_pause_in_save_ms: 0,
        }
    }
}

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

impl TrainConfig {
    /// Read a TOML or JSON file of the same keys (by extension; TOML otherwise).
    pub fn file_values(path: &Path) -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(path).at(path)?;
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| Error::corrupt(path, format!("not valid JSON: {e}")))
        } else {
            let v: toml::Value =
                toml::from_str(&text).map_err(|e| Error::corrupt(path, format!("not valid TOML: {e}")))?;
            serde_json::to_value(v).map_err(|e| Error::corrupt(path, e.to_string()))
        }
    }

    /// Defaults, overlaid by a config file's values, overlaid by flags (JSON objects of the keys given).
    pub fn resolve(file: Option<serde_json::Value>, flags: serde_json::Value) -> Result<Self> {
        let mut merged = serde_json::to_value(TrainConfig::default()).expect("config serialises");
        for layer in file.into_iter().chain([flags]) {
            let Some(obj) = layer.as_object() else { bail!("a training config must be a table of settings") };
            for (k, v) in obj {
                if !v.is_null() {
                    merged[k.replace('-', "_")] = v.clone();
                }
            }
        }
        serde_json::from_value(merged).map_err(|e| Error::Invalid(format!("training config: {e}")))
    }

    fn validate(&self) -> Result<()> {
        if self.data.is_empty() {
            bail!("no training data: pass --data DIR (a shard directory made by `bertcuda prepare`)");
        }
        if self.output.as_os_str().is_empty() {
            bail!("no output directory: pass --output DIR");
        }
        if self.per_device_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            bail!("--per-device-batch-size and --gradient-accumulation-steps must be at least 1");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!("--learning-rate {} must be positive", self.learning_rate);
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("--adam-beta1 {} and --adam-beta2 {} must be in [0, 1)", self.adam_beta1, self.adam_beta2);
        }
        if self.adam_epsilon <= 0.0 || self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            bail!("--adam-epsilon must be positive, --weight-decay and --max-grad-norm not negative");
        }
        if !["adamw", "lamb"].contains(&self.optim.as_str()) {
            bail!("--optim {:?}: choose adamw or lamb", self.optim);
        }
        if self.lamb_all_tensors && self.optim != "lamb" {
            bail!("--lamb-all-tensors applies to --optim lamb");
        }
        if !(self.lr_power > 0.0 && self.lr_power.is_finite()) {
            bail!("--lr-power {} must be positive", self.lr_power);
        }
        let schedule = self.lr_scheduler.parse::<Schedule>()?;
        if schedule == Schedule::Polynomial && self.learning_rate <= 1e-7 {
            bail!(
                "--lr-scheduler polynomial decays to 1e-7: --learning-rate {} must be above it",
                self.learning_rate
            );
        }
        if !self.phases.is_empty() || self.phase2_steps.is_some() {
            self.phase_configs()?;
        }
        if self.warmup_steps.is_some() && self.warmup_ratio.is_some() {
            bail!("give --warmup-steps or --warmup-ratio, not both");
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                bail!("--warmup-ratio {r} must be in [0, 1]");
            }
        }
        if self.max_steps.is_some() && self.num_train_epochs.is_some() {
            bail!("give --max-steps or --num-train-epochs, not both");
        }
        if self.max_steps == Some(0) || self.num_train_epochs.is_some_and(|e| e <= 0.0) {
            bail!("--max-steps / --num-train-epochs must be positive");
        }
        if self.max_nonfinite_steps == 0 {
            bail!("--max-nonfinite-steps must be at least 1");
        }
        if self.logging_steps == 0 || self.save_steps == 0 || self.eval_steps == 0 {
            bail!("--logging-steps, --save-steps and --eval-steps must be at least 1");
        }
        self.lr_scheduler.parse::<Schedule>()?;
        if !["auto", "cpu", "cuda", "emu"].contains(&self.device.as_str()) {
            bail!("--device {:?}: choose auto, cpu, cuda or emu", self.device);
        }
        if !["auto", "fp32", "bf16", "fp16"].contains(&self.precision.as_str()) {
            bail!("--precision {:?}: choose fp32, bf16 or fp16", self.precision);
        }
        Ok(())
    }

    fn examples(&self) -> ExampleConfig {
        ExampleConfig {
            max_seq_len: self.max_seq_len,
            short_seq_prob: self.short_seq_prob,
            nsp: !self.no_nsp,
            mlm_probability: self.mlm_probability,
            whole_word_mask: self.whole_word_mask,
            max_predictions_per_seq: self.max_predictions_per_seq,
            seed: self.seed,
        }
    }

    /// The settings of each phase: this config with the phase's changes, `max_steps` its steps, and
    /// whether the phase resets the optimizer's moments. One phase (this config) when the run has none.
    pub fn phase_configs(&self) -> Result<Vec<(TrainConfig, bool)>> {
        let flags = self.phase2_max_seq_len.is_some()
            || self.phase2_per_device_batch_size.is_some()
            || self.phase2_gradient_accumulation_steps.is_some()
            || self.phase2_learning_rate.is_some()
            || self.phase2_warmup_steps.is_some()
            || self.phase2_warmup_ratio.is_some();
        let phases: Vec<PhaseConfig> = match (self.phases.is_empty(), self.phase2_steps) {
            (true, None) if flags => {
                bail!("the --phase2-* settings need --phase2-steps (the second phase's steps)")
            }
            (true, None) => return Ok(vec![(self.clone(), false)]),
            (false, Some(_)) => bail!("give phases in --config or --phase2-steps, not both"),
            (false, None) if flags => bail!("give phases in --config or the --phase2-* settings, not both"),
            (false, None) => self.phases.clone(),
            (true, Some(steps)) => {
                let Some(first) = self.max_steps else {
                    bail!("--phase2-steps needs --max-steps, the first phase's steps");
                };
                let one = PhaseConfig { max_steps: first, ..PhaseConfig::default() };
                let two = PhaseConfig {
                    max_steps: steps,
                    max_seq_len: self.phase2_max_seq_len,
                    per_device_batch_size: self.phase2_per_device_batch_size,
                    gradient_accumulation_steps: self.phase2_gradient_accumulation_steps,
                    learning_rate: self.phase2_learning_rate,
                    warmup_steps: self.phase2_warmup_steps,
                    warmup_ratio: self.phase2_warmup_ratio,
                    ..PhaseConfig::default()
                };
                vec![one, two]
            }
        };
        if self.num_train_epochs.is_some() {
            bail!("a run with phases counts steps: give each phase's steps, not --num-train-epochs");
        }
        if !self.phases.is_empty() && self.max_steps.is_some() {
            bail!("a run with [[phases]] takes each phase's max_steps; remove the run's own max_steps");
        }
        phases
            .iter()
            .enumerate()
            .map(|(k, p)| {
                if p.max_steps == 0 {
                    bail!("phase {}: max_steps is 0; a phase needs at least one step", k + 1);
                }
                if !["keep", "reset"].contains(&p.optimizer_state.as_str()) {
                    bail!("phase {}: optimizer_state {:?}: choose keep or reset", k + 1, p.optimizer_state);
                }
                // A phase's warmup replaces the run's (steps or ratio, whichever it gives).
                let (warmup_steps, warmup_ratio) = match (p.warmup_steps, p.warmup_ratio) {
                    (None, None) => (self.warmup_steps, self.warmup_ratio),
                    w => w,
                };
                let c = TrainConfig {
                    max_steps: Some(p.max_steps),
                    max_seq_len: p.max_seq_len.unwrap_or(self.max_seq_len),
                    per_device_batch_size: p.per_device_batch_size.unwrap_or(self.per_device_batch_size),
                    gradient_accumulation_steps: p
                        .gradient_accumulation_steps
                        .unwrap_or(self.gradient_accumulation_steps),
                    learning_rate: p.learning_rate.unwrap_or(self.learning_rate),
                    warmup_steps,
                    warmup_ratio,
                    max_predictions_per_seq: p.max_predictions_per_seq.or(self.max_predictions_per_seq),
                    phases: vec![],
                    phase2_steps: None,
                    phase2_max_seq_len: None,
                    phase2_per_device_batch_size: None,
                    phase2_gradient_accumulation_steps: None,
                    phase2_learning_rate: None,
                    phase2_warmup_steps: None,
                    phase2_warmup_ratio: None,
                    ..self.clone()
                };
                c.validate().map_err(|e| Error::Invalid(format!("phase {}: {e}", k + 1)))?;
                Ok((c, p.optimizer_state == "reset"))
            })
            .collect()
    }

    pub fn loader(&self) -> LoaderConfig {
        LoaderConfig {
            examples: self.examples(),
            batch_size: self.per_device_batch_size,
            rank: 0,
            world_size: 1,
            pad_to_max: self.pad_to_max,
            drop_last: true,
        }
    }
}

/// JSON has no NaN: a non-finite number is written as null, and null reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The loader settings of a run.
pub fn loader_config(cfg: &TrainConfig) -> LoaderConfig {
    cfg.loader()
}

/// Metrics of one logged step (one line of metrics.jsonl). A non-finite loss or gradient norm (a skipped
/// step) is null.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    pub mlm_loss: Option<f64>,
    pub nsp_loss: Option<f64>,
    pub learning_rate: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    pub loss_scale: f64,
    pub skipped_steps: u64,
    pub seq_per_s: f64,
    pub tokens_per_s: f64,
    /// The phase (from 1) of a run with several, and the longest sequence of its last step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub phase: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub longest_sequence: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval: Option<EvalResult>,
}

impl StepMetrics {
    /// The TensorBoard scalars of a logging step.
    pub fn scalars(&self) -> Vec<(&'static str, f32)> {
        let mut out: Vec<(&'static str, f32)> = vec![
            ("train/loss", self.loss as f32),
            ("train/learning_rate", self.learning_rate as f32),
            ("train/grad_norm", self.grad_norm as f32),
            ("train/loss_scale", self.loss_scale as f32),
            ("train/skipped_steps", self.skipped_steps as f32),
            ("train/seq_per_s", self.seq_per_s as f32),
            ("train/tokens_per_s", self.tokens_per_s as f32),
            ("train/epoch", self.epoch as f32),
        ];
        if let Some(p) = self.phase {
            out.push(("train/phase", p as f32));
        }
        out.extend(self.mlm_loss.map(|v| ("train/mlm_loss", v as f32)));
        out.extend(self.nsp_loss.map(|v| ("train/nsp_loss", v as f32)));
        if let Some(e) = &self.eval {
            for (k, v) in [
                ("eval/mlm_loss", e.mlm_loss),
                ("eval/mlm_accuracy", e.mlm_accuracy),
                ("eval/perplexity", e.perplexity),
                ("eval/nsp_loss", e.nsp_loss),
                ("eval/nsp_accuracy", e.nsp_accuracy),
            ] {
                out.extend(v.map(|v| (k, v as f32)));
            }
        }
        out
    }

    /// The line printed for a logging step.
    pub fn progress_line(&self, total: u64) -> String {
        format!(
            "step {:>6}/{total}  loss {:.4}  mlm {}  nsp {}  lr {:.3e}  grad_norm {:.3}  {:.1} seq/s{}",
            self.step,
            self.loss,
            self.mlm_loss.map_or("-".into(), |v| format!("{v:.4}")),
            self.nsp_loss.map_or("-".into(), |v| format!("{v:.4}")),
            self.learning_rate,
            self.grad_norm,
            self.seq_per_s,
            self.eval
                .as_ref()
                .and_then(|e| e.mlm_loss)
                .map_or(String::new(), |v| format!("  eval mlm {v:.4}"))
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub mlm_loss: Option<f64>,
    pub mlm_accuracy: Option<f64>,
    pub perplexity: Option<f64>,
    pub nsp_loss: Option<f64>,
    pub nsp_accuracy: Option<f64>,
    pub sequences: usize,
}

/// What a finished (or stopped) run reports.
#[derive(Debug)]
pub struct TrainSummary {
    pub steps: u64,
    pub last: Option<StepMetrics>,
    pub losses: Vec<f64>,
    pub stopped_by_signal: bool,
    pub output: PathBuf,
    /// Seconds in the step loop (loader, forward, backward, optimizer, logging), saves excluded.
    pub loop_seconds: f64,
}

/// The learning-rate schedule of a run.
#[derive(Debug, Clone, Copy)]
struct ScheduleFor {
    kind: Schedule,
    warmup: u64,
    total: u64,
    base: f64,
    poly: Polynomial,
}

impl ScheduleFor {
    fn lr(&self, update: u64) -> f64 {
        self.base * lr_multiplier(self.kind, update, self.warmup, self.total, self.poly)
    }
}

/// Evaluate `model` on `corpus`: MLM and NSP losses and accuracies over fixed batches (masks from `seed`,
/// epoch 0), at most `max_batches`.
pub fn evaluate<B: Backend>(
    model: &Bert<B>,
    corpus: &Corpus,
    cfg: &LoaderConfig,
    max_batches: usize,
) -> Result<EvalResult> {
    let cfg = LoaderConfig { drop_last: false, rank: 0, world_size: 1, ..cfg.clone() };
    let plan = EpochPlan::new(corpus, &cfg, 0)?;
    let n = (plan.batches(&cfg) as usize).min(max_batches.max(1));
    let (mut mlm_sum, mut mlm_n, mut mlm_ok, mut nsp_sum, mut nsp_n, mut nsp_ok, mut seqs) =
        (0.0, 0usize, 0usize, 0.0, 0usize, 0usize, 0usize);
    let mut labels = Vec::new();
    for k in 0..n {
        let batch = plan.batch(corpus, &cfg, k as u64);
        let inp = Inputs::from_batch(&batch, &mut labels);
        let l = model.step(&inp, StepOptions { accuracy: true, ..StepOptions::eval() })?;
        if let Some(m) = l.mlm {
            mlm_sum += m * l.mlm_tokens as f64;
            mlm_n += l.mlm_tokens;
            mlm_ok += l.mlm_correct;
        }
        if let Some(s) = l.nsp {
            nsp_sum += s * l.sequences as f64;
            nsp_n += l.sequences;
            nsp_ok += l.nsp_correct;
        }
        seqs += batch.batch_size;
    }
    let mean = |s: f64, n: usize| (n > 0).then(|| s / n as f64);
    let mlm_loss = mean(mlm_sum, mlm_n);
    Ok(EvalResult {
        mlm_loss,
        mlm_accuracy: mean(mlm_ok as f64, mlm_n),
        perplexity: mlm_loss.map(f64::exp),
        nsp_loss: mean(nsp_sum, nsp_n),
        nsp_accuracy: mean(nsp_ok as f64, nsp_n),
        sequences: seqs,
    })
}

/// Stop flags set by SIGINT/SIGTERM: the first asks the loop to save and stop; a second exits at once
/// (signal-hook's conditional shutdown), leaving the last good checkpoint as it is.
pub fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for (sig, code) in [(signal_hook::consts::SIGINT, 130), (signal_hook::consts::SIGTERM, 143)] {
        signal_hook::flag::register_conditional_shutdown(sig, code, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
            .map_err(|e| Error::Invalid(format!("cannot install signal handlers: {e}")))?;
    }
    Ok(flag)
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

/// Everything before the first step that does not depend on the device: checks, the output directory,
/// the data, and the model's config and starting weights.
fn prepare_run(cfg: TrainConfig, lead: bool) -> Result<Prepared> {
    cfg.validate()?;
    let resume = resume_point(&cfg)?;
    let mut replaced = None;
    if lead
        && resume.is_none()
        && cfg.output.exists()
        && std::fs::read_dir(&cfg.output).at(&cfg.output)?.next().is_some()
    {
        if cfg.overwrite_output {
            // Moved aside, not deleted: a run that fails before its first checkpoint puts it back.
            replaced =
                Some(Arc::new(std::sync::Mutex::new(Some(crate::fsutil::SetAside::new(&cfg.output)?))));
        } else {
            bail!(
                "{}: the output directory exists and is not empty; pass --resume auto to continue its run, or --overwrite-output to replace it",
                cfg.output.display()
            );
        }
    }
    if lead {
        std::fs::create_dir_all(&cfg.output).at(&cfg.output)?;
        checkpoint::clean_leftovers(&cfg.output)?;
        if let Some((_, state)) = &resume {
            for dir in checkpoint::set_aside_later(&cfg.output, state.global_step)? {
                tracing::warn!(
                    "set aside {}: a later checkpoint than the one this run resumes from",
                    dir.display()
                );
            }
        }
    }

    let corpus = open_corpus(&cfg.data)?;
    let tokenizer = &corpus.tokenizer;
    let fingerprint = tokenizer.fingerprint();

    // The model: from a checkpoint being resumed, from a Hugging Face checkpoint, or new.
    let (config, params, init_note) = if let Some((dir, state)) = &resume {
        check_resume_config(&state.config, &cfg)?;
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
    };
    for (phase, _) in cfg.phase_configs()? {
        if phase.max_seq_len > config.max_position_embeddings {
            bail!(
                "--max-seq-len {} exceeds the model's max_position_embeddings {}",
                phase.max_seq_len,
                config.max_position_embeddings
            );
        }
    }

    Ok(Prepared { cfg, resume, corpus, config, params, init_note, fingerprint, replaced })
}

/// Run training to the end (or a stop signal), one process.
pub fn train(cfg: TrainConfig, stop: Arc<AtomicBool>) -> Result<TrainSummary> {
    let prepared = prepare_run(cfg, true)?;
    match choose_device(&prepared.cfg.device)? {
        Device::Cpu => run(&Cpu::<f32>::new(), prepared, stop, &Single),
        Device::Cuda(be) => run(&*be, prepared, stop, &Single),
    }
}

/// Data-parallel training with `world` ranks as threads of this process, summing gradients through an
/// in-process communicator: what NCCL does across GPUs, here for tests and for checking that W ranks
/// equal one rank with W× the batch. Each rank runs on the CPU backend, or with `--device emu` on an
/// emulated device of its own (the CUDA backend's multi-GPU path: gradient buckets reduced as the
/// backward pass completes them).
pub fn train_in_process(cfg: TrainConfig, world: usize, stop: Arc<AtomicBool>) -> Result<Vec<TrainSummary>> {
    let prepared = prepare_run(cfg, true)?;
    let comms = InProcess::group(world, Duration::from_secs(prepared.cfg.dist_timeout_s.max(1)));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (p, stop) = (prepared.clone(), stop.clone());
                s.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if p.cfg.device == "emu" {
                            let opts = crate::backend::device::emu::EmuOptions::from_env();
                            run(&crate::backend::cuda::Cuda::emulated(opts)?, p, stop, &comm)
                        } else {
                            run(&Cpu::<f32>::new(), p, stop, &comm)
                        }
                    }))
                    .unwrap_or_else(|_| Err(Error::Invalid(format!("rank {} panicked", comm.rank()))));
                    if let Err(e) = &r {
                        comm.fail(&e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| Error::Invalid("a rank thread panicked".into()))?)
            .collect()
    })
}

/// One rank of a multi-GPU job (started by torchrun, srun, mpirun or `--nproc-per-node`): the GPU of its
/// local rank, NCCL's id from rank 0 over the TCP rendezvous, then the same loop as one process, the
/// gradients summed by NCCL on the device. Every wait is bounded by `dist_timeout_s`.
pub fn train_distributed(
    cfg: TrainConfig,
    stop: Arc<AtomicBool>,
    info: crate::dist::RankInfo,
) -> Result<TrainSummary> {
    use crate::backend::cuda::{Cuda, NcclComm};
    let who = format!("rank {} of {}", info.rank, info.world);
    if cfg.device == "cpu" {
        bail!("{who}: multi-process training needs GPUs (NCCL); with --device cpu, train in one process");
    }
    let be = Cuda::new(info.local_rank).map_err(|e| {
        Error::Invalid(format!(
            "{who} (local rank {}): {e}; multi-process training needs one GPU per rank",
            info.local_rank
        ))
    })?;
    let timeout = Duration::from_secs(cfg.dist_timeout_s.max(1));
    let id = if info.rank == 0 { Some(NcclComm::unique_id()?) } else { None };
    let id = crate::dist::rendezvous(&info, id, timeout)?;
    let driver = be.driver().ok_or_else(|| Error::Invalid(format!("{who}: NCCL needs a real GPU")))?;
    let comm = NcclComm::new(driver, info.rank, info.world, id, timeout)?;
    be.set_sync_timeout(Some(timeout));
    let prepared = prepare_run(cfg, info.rank == 0)?;
    run(&be, prepared, stop, &comm).map_err(|e| Error::Invalid(format!("{who}: {e}")))
}

/// What a run starts from, backend-independent.
#[derive(Clone)]
struct Prepared {
    cfg: TrainConfig,
    resume: Option<(PathBuf, TrainerState)>,
    corpus: Arc<Corpus>,
    config: ModelConfig,
    params: Vec<f32>,
    init_note: String,
    fingerprint: String,
    /// The old output `--overwrite-output` replaces, kept until this run's first checkpoint.
    replaced: Option<Arc<std::sync::Mutex<Option<crate::fsutil::SetAside>>>>,
}

pub enum Device {
    Cpu,
    Cuda(Box<crate::backend::cuda::Cuda>),
}

/// `--device`: cpu; cuda (an error naming why when there is no usable GPU); emu (the CUDA backend on the
/// emulated device, a test device); auto — the GPU when there is one, else the CPU, saying why.
pub fn choose_device(device: &str) -> Result<Device> {
    use crate::backend::cuda::{probe, Cuda};
    match device {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(Box::new(Cuda::new(0)?))),
        "emu" => {
            Ok(Device::Cuda(Box::new(Cuda::emulated(crate::backend::device::emu::EmuOptions::from_env())?)))
        }
        _ => match probe().map_err(Error::Invalid).and_then(|_| Cuda::new(0)) {
            Ok(c) => Ok(Device::Cuda(Box::new(c))),
            Err(why) => {
                eprintln!(
                    "no usable GPU ({}); running on the CPU",
                    why.to_string().trim_start_matches("--device cuda: ")
                );
                Ok(Device::Cpu)
            }
        },
    }
}

/// A count for people: 1234, 12.3 M, 59.0 G.
fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.1} G", n / 1e9),
        n if n >= 1e6 => format!("{:.1} M", n / 1e6),
        n => format!("{n:.0}"),
    }
}

/// One phase of a run, resolved against the data: its settings, loader, steps and schedule.
struct PhasePlan {
    cfg: TrainConfig,
    /// Its start zeroes the optimizer's moments.
    reset_optimizer: bool,
    loader: LoaderConfig,
    /// Sequences per epoch and steps per epoch (for the plan).
    epoch_examples: usize,
    steps_per_epoch: u64,
    steps: u64,
    warmup: u64,
    sched: ScheduleFor,
}

impl PhasePlan {
    fn new(cfg: &TrainConfig, reset_optimizer: bool, corpus: &Corpus, comm: &dyn Comm) -> Result<Self> {
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
        let sched = ScheduleFor {
            kind: cfg.lr_scheduler.parse()?,
            warmup,
            total: steps,
            base: cfg.learning_rate,
            poly: Polynomial {
                warmup_fraction: cfg.warmup_steps.is_none().then_some(cfg.warmup_ratio).flatten(),
                ..Polynomial::for_peak(cfg.lr_power, cfg.learning_rate)
            },
        };
        Ok(PhasePlan {
            cfg: cfg.clone(),
            reset_optimizer,
            loader,
            epoch_examples: epoch0.epoch_examples(),
            steps_per_epoch,
            steps,
            warmup,
            sched,
        })
    }
}

/// The model sized for a phase's batches (`cfg`), with `params`.
fn phase_model<'a, B: Backend>(
    cfg: &TrainConfig,
    be: &'a B,
    config: &ModelConfig,
    params: &[f32],
) -> Result<Bert<'a, B>> {
    let model = Bert::new(be, config.clone(), Plan::new(cfg.per_device_batch_size, cfg.max_seq_len))
        .map_err(|e| match e {
            Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                "{m}: lower --per-device-batch-size {} (and raise --gradient-accumulation-steps to keep the \
                 batch) or --max-seq-len {}, or choose a smaller --model-config",
                cfg.per_device_batch_size, cfg.max_seq_len
            )),
            e => e,
        })?;
    model.set_params(params)?;
    Ok(model)
}

/// The run's optimizer (`--optim`), its state on the backend.
fn new_optimizer<B: Backend>(be: &B, cfg: &TrainConfig, table: &ParamTable) -> Result<Optimizer> {
    Ok(if cfg.optim == "lamb" {
        Optimizer::Lamb(Lamb::new(
            be,
            LambConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
                max_grad_norm: cfg.max_grad_norm,
                all_tensors: cfg.lamb_all_tensors,
            },
            &table.params,
        )?)
    } else {
        Optimizer::AdamW(AdamW::new(
            be,
            AdamWConfig {
                lr: cfg.learning_rate,
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            &table.decay_mask(),
        )?)
    })
}

/// Every rank must start from rank 0's point (a rank that resumed elsewhere, or not at all, would silently
/// diverge): compare with rank 0's numbers, and stop together on any difference.
fn check_ranks_agree(state: &TrainerState, comm: &dyn Comm) -> Result<()> {
    if comm.world() > 1 {
        let mine = [
            state.global_step as f64,
            state.updates as f64,
            state.micro_step as f64,
            state.cursor.epoch as f64,
            state.cursor.batch as f64,
        ];
        let mut zero = if comm.rank() == 0 { mine } else { [0.0; 5] };
        comm.all_reduce_sum_f64(&mut zero)?;
        let mut differs = [(zero != mine) as u8 as f64];
        comm.all_reduce_sum_f64(&mut differs)?;
        if differs[0] > 0.0 {
            bail!(
                "rank {}: the ranks do not start from the same point (rank 0 at step {}, this rank at step {}); every rank must see rank 0's checkpoints (a shared --output)",
                comm.rank(),
                zero[0],
                mine[0]
            );
        }
    }
    Ok(())
}

/// The plan, printed once by rank 0: the model, the data, every phase, the device, the output.
#[allow(clippy::too_many_arguments)]
fn print_plan<B: Backend>(
    be: &B,
    init_note: &str,
    corpus: &Corpus,
    plans: &[PhasePlan],
    precision: &str,
    model: &Bert<B>,
    cfg: &TrainConfig,
    world: usize,
) {
    let (config, table) = (&model.config, &model.table);
    let say = |line: String| eprintln!("{line}");
    say(format!("bertcuda train: {init_note}"));
    say(format!(
        "  model    {} layers, hidden {}, {} heads, vocab {}: {:.1} M parameters",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.vocab_size,
        table.total as f64 / 1e6
    ));
    say(format!(
        "  data     {} documents, {} tokens",
        corpus.documents,
        corpus.sets.iter().map(|s| s.manifest.tokens).sum::<u64>()
    ));
    for (k, ph) in plans.iter().enumerate() {
        let c = &ph.cfg;
        let effective = c.per_device_batch_size * c.gradient_accumulation_steps * world;
        let name = if plans.len() > 1 { format!("phase {}", k + 1) } else { "steps".into() };
        say(format!(
            "  {name:<8} {} steps (warmup {}, {} schedule, peak lr {}, {}), batch {} × accumulation {} × {world} ranks = {effective} sequences of ≤{} tokens per step, {} tokens at most; {} sequences, {} steps per epoch",
            ph.steps,
            ph.warmup,
            c.lr_scheduler,
            c.learning_rate,
            c.optim,
            c.per_device_batch_size,
            c.gradient_accumulation_steps,
            c.max_seq_len,
            count((effective * c.max_seq_len) as f64 * ph.steps as f64),
            ph.epoch_examples,
            ph.steps_per_epoch
        ));
    }
    // fp32 weights, gradients and two moments; activations in fp32, or bf16 (with a bf16 weight copy).
    let (act_bytes, copy_bytes) = if precision == "bf16" { (2, 2) } else { (4, 0) };
    let mem = (table.total * (16 + copy_bytes) + model.activation_floats * act_bytes) as f64 / 1e6;
    say(format!(
        "  device   {}, {precision}: about {mem:.0} MB for weights, gradients, optimizer state and activations",
        be.describe()
    ));
    say(format!(
        "  output   {} (checkpoints every {} steps, metrics.jsonl, TensorBoard runs/)",
        cfg.output.display(),
        cfg.save_steps
    ));
}

/// A step whose gradients are not finite: skipped and counted; with fp16 the scaler has halved the scale.
/// The run stops when the scale falls below 1, or after `--max-nonfinite-steps` such steps in a row.
fn count_skipped_step(state: &mut TrainerState, cfg: &TrainConfig) -> Result<()> {
    state.skipped_steps += 1;
    if state.scaler.enabled {
        tracing::warn!(
            "step {}: non-finite gradients; skipped, loss scale now {}",
            state.global_step,
            state.scaler.scale
        );
        if state.scaler.scale < 1.0 {
            bail!(
                "step {}: the fp16 loss scale fell below 1 (the gradients are not finite at any scale); stopping. The last good checkpoint in {} is intact: lower --learning-rate, or train in fp32",
                state.global_step,
                cfg.output.display()
            );
        }
    } else {
        state.consecutive_nonfinite += 1;
        tracing::warn!(
            "step {}: non-finite loss or gradients; step skipped ({} in a row)",
            state.global_step,
            state.consecutive_nonfinite
        );
        if state.consecutive_nonfinite >= cfg.max_nonfinite_steps {
            bail!(
                "step {}: {} non-finite steps in a row (--max-nonfinite-steps {}); stopping. The last good checkpoint in {} is intact: lower --learning-rate or check the data, then --resume auto",
                state.global_step,
                state.consecutive_nonfinite,
                cfg.max_nonfinite_steps,
                cfg.output.display()
            );
        }
    }
    Ok(())
}

fn run<B: Backend>(be: &B, p: Prepared, stop: Arc<AtomicBool>, comm: &dyn Comm) -> Result<TrainSummary> {
    let Prepared { cfg, resume, corpus, config, params, init_note, fingerprint, replaced } = p;
    // The replaced output goes once this run has a checkpoint of its own.
    let checkpoint_written = || -> Result<()> {
        if let Some(aside) = replaced.as_ref().and_then(|r| r.lock().ok()?.take()) {
            aside.commit()?;
        }
        Ok(())
    };
    // The backend settles the precision (fp16 always runs the dynamic loss scaler).
    let precision = be.set_precision(&cfg.precision)?;
    // Rank 0 alone prints, logs and writes checkpoints.
    let lead = comm.rank() == 0;
    let world = comm.world();
    let tokenizer = &corpus.tokenizer;
    let phases = cfg.phase_configs()?;
    let table = ParamTable::new(&config);
    let mut optimizer = new_optimizer(be, &cfg, &table)?;
    let sq_buf = be.alloc_kind(1, crate::backend::Kind::Stat)?;
    // Each phase's model (its activations sized for the phase's batch and length) is allocated after this
    // mark and released at the phase's end.
    let mark = be.allocation_mark();
    let mut state = TrainerState {
        version: STATE_VERSION,
        global_step: 0,
        updates: 0,
        micro_step: 0,
        cursor: Cursor::default(),
        epoch: 0.0,
        scaler: LossScaler::new(precision == "fp16"),
        skipped_steps: 0,
        consecutive_nonfinite: 0,
        phase: 0,
        phase_start_step: 0,
        phase_start_updates: 0,
        world_size: world,
        tokenizer_fingerprint: fingerprint.clone(),
        config: serde_json::to_value(&cfg).expect("config serialises"),
    };
    if let Some((dir, saved)) = &resume {
        let (m, v) = checkpoint::load_optimizer(dir, table.total)?;
        let (bm, bv) = optimizer.moments();
        be.upload(bm, &m)?;
        be.upload(bv, &v)?;
        *optimizer.steps_mut() = saved.updates - saved.phase_start_updates;
        if saved.world_size != world {
            bail!(
                "cannot resume from {}: it was trained with {} ranks and this run has {world}; the loader's order depends on the world size, so resume with {} ranks",
                dir.display(),
                saved.world_size,
                saved.world_size
            );
        }
        state = TrainerState { config: state.config, ..saved.clone() };
        if state.phase >= phases.len() {
            bail!(
                "cannot resume from {}: it is in phase {} and this run has {}",
                dir.display(),
                state.phase + 1,
                phases.len()
            );
        }
    }

    check_ranks_agree(&state, comm)?;

    let eval_corpus = if cfg.eval_data.is_empty() { None } else { Some(open_corpus(&cfg.eval_data)?) };
    if let Some(ec) = &eval_corpus {
        if ec.tokenizer.fingerprint() != fingerprint {
            bail!("--eval-data {} was made with another tokenizer than --data", cfg.eval_data[0].display());
        }
    }

    // The model of the phase the run is in.
    let mut model = phase_model(&phases[state.phase].0, be, &config, &params)?;
    drop(params);
    // Steps, loader and schedule of every phase; the total is theirs together.
    let plans = phases
        .iter()
        .map(|(pc, reset)| PhasePlan::new(pc, *reset, &corpus, comm))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = plans.iter().map(|p| p.steps).sum();

    if lead {
        print_plan(be, &init_note, &corpus, &plans, precision, &model, &cfg, world);
    }

    let mut metrics_file = match lead {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.output.join("metrics.jsonl"))
                .at(cfg.output.join("metrics.jsonl"))?,
        ),
        false => None,
    };
    let mut tb = if lead { Some(EventWriter::create(&cfg.output.join("runs"))?) } else { None };
    let mut progress = Progress::steps("train", total, cfg.progress && lead);
    progress.set(state.global_step);

    let start_loader = |ph: &PhasePlan, cursor: Cursor| {
        Loader::start(corpus.clone(), ph.loader.clone(), cursor, cfg.loader_threads, 4, None)
    };
    let mut loader = start_loader(&plans[state.phase], state.cursor)?;
    let mut summary = TrainSummary {
        steps: state.global_step,
        last: None,
        losses: vec![],
        stopped_by_signal: false,
        output: cfg.output.clone(),
        loop_seconds: 0.0,
    };
    let loop_start = Instant::now();
    let mut save_seconds = 0.0;
    let mut window = (Instant::now(), 0usize, 0usize); // since the last log: time, sequences, tokens
    let mut last_saved = state.global_step;
    let mut labels: Vec<Vec<i32>> = vec![Vec::new(); plans[state.phase].cfg.gradient_accumulation_steps];
    let buckets =
        crate::dist::buckets(&table, ((cfg.bucket_size_mb * (1 << 20) as f64) / 4.0).max(1.0) as usize);
    let phase_end = |phase: usize| plans[..=phase].iter().map(|p| p.steps).sum::<u64>();
    // A checkpoint from this run's phase: inside it (a resume with other phase lengths is refused).
    let phase_start = |phase: usize| plans[..phase].iter().map(|p| p.steps).sum::<u64>();
    if state.phase_start_step != phase_start(state.phase) || state.global_step > phase_end(state.phase) {
        bail!(
            "cannot resume: the checkpoint is at step {} of phase {} (which began at step {}), but this run's phase {} spans steps {}..{}; resume with the phases it was trained with",
            state.global_step,
            state.phase + 1,
            state.phase_start_step,
            state.phase + 1,
            phase_start(state.phase),
            phase_end(state.phase)
        );
    }
    // Rank 0 writes; the others wait at the barrier so no rank runs ahead of a checkpoint.
    let save_now =
        |state: &TrainerState, model: &Bert<B>, optimizer: &Optimizer| -> Result<Option<PathBuf>> {
            if !lead {
                comm.barrier()?;
                return Ok(None);
            }
            let params = be.download(model.params)?;
            let (bm, bv) = optimizer.moments();
            let (m, v) = (be.download(bm)?, be.download(bv)?);
            let pause =
                (cfg.debug_pause_in_save_ms > 0).then(|| Duration::from_millis(cfg.debug_pause_in_save_ms));
            let dir = checkpoint::save(
                &cfg.output,
                &CheckpointData {
                    config: &config,
                    params: &params,
                    exp_avg: &m,
                    exp_avg_sq: &v,
                    tokenizer,
                    state,
                },
                pause,
            )?;
            checkpoint::rotate(&cfg.output, cfg.save_total_limit, state.global_step)?;
            comm.barrier()?;
            Ok(Some(dir))
        };

    while state.global_step < total {
        // The next phase: its model, loader and schedule; the optimizer's moments kept or reset.
        if state.global_step == phase_end(state.phase) {
            // The end of a phase is kept: a failure to start the next (its batches too large, say) loses nothing.
            if state.global_step != last_saved {
                if let Some(dir) = save_now(&state, &model, &optimizer)? {
                    checkpoint_written()?;
                    tracing::info!("saved {} at the end of phase {}", dir.display(), state.phase + 1);
                }
                last_saved = state.global_step;
            }
            let params = be.download(model.params)?;
            drop(model);
            drop(loader);
            be.release_since(mark)?;
            state.phase += 1;
            state.phase_start_step = state.global_step;
            state.phase_start_updates = state.updates;
            state.cursor = Cursor::default();
            let ph = &plans[state.phase];
            *optimizer.steps_mut() = 0;
            if ph.reset_optimizer {
                let (m, v) = optimizer.moments();
                be.fill(m, 0.0)?;
                be.fill(v, 0.0)?;
            }
            model = phase_model(&ph.cfg, be, &config, &params)?;
            loader = start_loader(ph, state.cursor)?;
            labels = vec![Vec::new(); ph.cfg.gradient_accumulation_steps];
            progress.println(&format!(
                "phase {} of {} from step {}: ≤{} tokens, batch {} × accumulation {}, peak lr {}",
                state.phase + 1,
                plans.len(),
                state.global_step,
                ph.cfg.max_seq_len,
                ph.cfg.per_device_batch_size,
                ph.cfg.gradient_accumulation_steps,
                ph.cfg.learning_rate
            ));
        }
        let ph = &plans[state.phase];
        // A stop asked of any rank stops them all, at the same step.
        let mut stop_votes = [stop.load(Ordering::Relaxed) as u8 as f64];
        comm.all_reduce_sum_f64(&mut stop_votes)?;
        if stop_votes[0] > 0.0 {
            summary.stopped_by_signal = true;
            break;
        }
        // Gather the step's micro-batches; the loss denominators count all of them.
        let mut batches = Vec::with_capacity(ph.cfg.gradient_accumulation_steps);
        for _ in 0..ph.cfg.gradient_accumulation_steps {
            match loader.next_batch() {
                Some(b) => batches.push(b?),
                None => bail!("internal: the loader ended"),
            }
        }
        let mut counts = [
            batches.iter().map(|b| b.masked_positions.len()).sum::<usize>() as f64,
            batches.iter().map(|b| b.batch_size).sum::<usize>() as f64,
        ];
        comm.all_reduce_sum_f64(&mut counts)?;
        let norm = LossNorm { mlm_tokens: counts[0] as usize, sequences: counts[1] as usize };
        model.zero_grads()?;
        let (mut mlm_sum, mut nsp_sum, mut any_mlm, mut any_nsp) = (0.0, 0.0, false, false);
        let last_micro = batches.len() - 1;
        for (k, (b, lab)) in batches.iter().zip(labels.iter_mut()).enumerate() {
            let inp = Inputs::from_batch(b, lab);
            let opts = StepOptions {
                train: Some(Train { seed: cfg.seed, step: state.micro_step }),
                backward: true,
                loss_scale: state.scaler.scale as f32,
                norm: Some(norm),
                accuracy: false,
            };
            let l = if world > 1 && k == last_micro {
                // Sum each bucket across the ranks as soon as the backward pass has completed it (no
                // reduction on the earlier micro-batches: their gradients accumulate locally).
                let mut reduced = vec![false; buckets.len()];
                let mut reduce_ready = |layer: Option<usize>| -> Result<()> {
                    for (done, bk) in reduced.iter_mut().zip(&buckets) {
                        let ready = match (layer, bk.ready_after_layer) {
                            (None, _) => true,
                            (Some(l), Some(r)) => r >= l,
                            (Some(_), None) => false,
                        };
                        if ready && !*done {
                            be.all_reduce_sum(model.grads.at(bk.start, bk.len), comm)?;
                            *done = true;
                        }
                    }
                    Ok(())
                };
                model.step_with_hook(&inp, opts, Some(&mut reduce_ready))?
            } else {
                model.step(&inp, opts)?
            };
            state.micro_step += 1;
            if let Some(m) = l.mlm {
                mlm_sum += m * l.mlm_tokens as f64;
                any_mlm = true;
            }
            if let Some(s) = l.nsp {
                nsp_sum += s * l.sequences as f64;
                any_nsp = true;
            }
            window.1 += b.batch_size;
            window.2 += b.lengths.iter().map(|&x| x as usize).sum::<usize>();
        }
        let longest = batches.iter().flat_map(|b| b.lengths.iter()).map(|&l| l as usize).max().unwrap_or(0);
        let last = batches.last().expect("at least one micro-batch").cursor;
        // The next batch; past the epoch's last one the loader moves on to the next epoch by itself
        // (epochs have different sizes, so the trainer does not roll the cursor over).
        state.cursor = Cursor { epoch: last.epoch, batch: last.batch + 1 };
        state.epoch = last.epoch as f64
            + (last.batch + 1) as f64 / batches.last().map_or(1, |b| b.epoch_batches.max(1)) as f64;
        // Sum the ranks' gradients (each already divided by the global counts) and loss sums.
        be.all_reduce_wait()?;
        let mut sums = [mlm_sum, nsp_sum, any_mlm as u8 as f64, any_nsp as u8 as f64];
        comm.all_reduce_sum_f64(&mut sums)?;
        let (mlm_sum, nsp_sum, any_mlm, any_nsp) = (sums[0], sums[1], sums[2] > 0.0, sums[3] > 0.0);
        let mlm = any_mlm.then(|| mlm_sum / norm.mlm_tokens.max(1) as f64);
        let nsp = any_nsp.then(|| nsp_sum / norm.sequences.max(1) as f64);
        let loss = mlm.unwrap_or(0.0) + nsp.unwrap_or(0.0);

        // Gradient norm (of the scaled gradients) and the finite check in one pass.
        if cfg.debug_nonfinite_steps.contains(&state.global_step) {
            be.fill(model.grads.prefix(1), f32::NAN)?;
        }
        be.sum_squares(sq_buf, model.grads)?;
        let sq = be.download_f64(sq_buf)?[0];
        let scale = state.scaler.scale;
        let finite = sq.is_finite() && loss.is_finite();
        let grad_norm = sq.sqrt() / scale;
        let applied = state.scaler.update(finite);
        let lr = ph.sched.lr(state.updates - state.phase_start_updates);
        if applied {
            state.consecutive_nonfinite = 0;
            optimizer.step(be, model.params, model.grads, lr, grad_norm, scale, cfg.max_grad_norm)?;
            state.updates += 1;
        } else {
            count_skipped_step(&mut state, &cfg)?;
        }
        state.global_step += 1;
        summary.losses.push(loss);
        summary.steps = state.global_step;
        progress.set(state.global_step);

        let log_now = state.global_step % cfg.logging_steps == 0 || state.global_step == total;
        let eval_now =
            eval_corpus.is_some() && (state.global_step % cfg.eval_steps == 0 || state.global_step == total);
        if log_now || eval_now {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            // Throughput of the whole job.
            let mut seen = [window.1 as f64, window.2 as f64];
            comm.all_reduce_sum_f64(&mut seen)?;
            (window.1, window.2) = (seen[0] as usize, seen[1] as usize);
            let eval = match &eval_corpus {
                Some(ec) if eval_now && lead => Some(evaluate(
                    &model,
                    ec,
                    &LoaderConfig {
                        examples: ExampleConfig { seed: 0, ..ph.loader.examples.clone() },
                        ..ph.loader.clone()
                    },
                    cfg.eval_batches,
                )?),
                _ => None,
            };
            let m = StepMetrics {
                step: state.global_step,
                epoch: state.epoch,
                loss,
                mlm_loss: mlm,
                nsp_loss: nsp,
                learning_rate: lr,
                grad_norm,
                loss_scale: scale,
                skipped_steps: state.skipped_steps,
                seq_per_s: window.1 as f64 / secs,
                tokens_per_s: window.2 as f64 / secs,
                phase: (plans.len() > 1).then_some(state.phase + 1),
                longest_sequence: (plans.len() > 1).then_some(longest),
                eval,
            };
            let line = serde_json::to_string(&m).expect("metrics serialise");
            if let Some(f) = metrics_file.as_mut() {
                // One write per line: a kill never leaves half a line for the resumed run to append to.
                f.write_all(format!("{line}\n").as_bytes()).at(cfg.output.join("metrics.jsonl"))?;
            }
            if let Some(tb) = tb.as_mut() {
                tb.scalars(state.global_step, &m.scalars())?;
            }
            progress.set_message(&format!("loss {loss:.4} lr {lr:.2e} {:.0} seq/s", m.seq_per_s));
            progress.println(&m.progress_line(total));
            summary.last = Some(m);
            window = (Instant::now(), 0, 0);
        }
        if state.global_step % cfg.save_steps == 0 && state.global_step < total {
            let t = Instant::now();
            if let Some(dir) = save_now(&state, &model, &optimizer)? {
                checkpoint_written()?;
                tracing::info!("saved {}", dir.display());
            }
            save_seconds += t.elapsed().as_secs_f64();
            last_saved = state.global_step;
        }
    }
    summary.loop_seconds = loop_start.elapsed().as_secs_f64() - save_seconds;
    drop(loader);
    progress.finish();
    if state.global_step != last_saved {
        if let Some(dir) = save_now(&state, &model, &optimizer)? {
            checkpoint_written()?;
            eprintln!("saved {}", dir.display());
        }
    }
    if !lead {
        return Ok(summary);
    }
    if summary.stopped_by_signal {
        eprintln!("stopped by a signal at step {}; resume with --resume auto", state.global_step);
    } else {
        // The final model also goes to OUTPUT/ itself, like save_pretrained.
        let params = be.download(model.params)?;
        crate::model::hf::save_pretrained(&cfg.output, &config, &params)?;
        tokenizer.save_hf(&cfg.output)?;
        eprintln!("done: {} steps; the final model is in {}", state.global_step, cfg.output.display());
    }
    Ok(summary)
}
