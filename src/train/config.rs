//! Every setting of a training run, declared once: one struct is the `train` command's flags (clap: the
//! names, the help, the defaults), the keys of a `--config` file (serde: the same names in snake_case),
//! what a checkpoint records of its run, and the validation. Choices are enums. Flag names follow
//! transformers' TrainingArguments where one exists.

use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use serde::{Deserialize, Serialize};

use crate::backend::choice::{Device, Precision};
use crate::bail;
use crate::data::examples::ExampleConfig;
use crate::data::loader::LoaderConfig;
use crate::error::{Error, IoContext, Result};
use crate::optim::{OptimizerKind, Schedule};

/// Every setting of a run (the defaults are the flags' defaults).
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Shard directories made by `bertcuda prepare`.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Output directory: checkpoints, metrics.jsonl, runs/ (TensorBoard), the final model.
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub output: PathBuf,
    /// A preset (tiny, mini, small, medium, base, large) or a config.json.
    #[arg(long, default_value = "base")]
    pub model_config: String,
    /// A Hugging Face BERT checkpoint to continue pretraining (DAPT/TAPT).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    pub device: Device,
    #[arg(long, value_enum, default_value_t)]
    pub precision: Precision,
    /// Sequences per GPU (or CPU) per micro-batch.
    #[arg(long, default_value_t = 32)]
    pub per_device_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// Decoupled weight decay, not applied to biases and LayerNorm weights.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// AdamW's (and LAMB's) β1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW's (and LAMB's) β2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW's (and LAMB's) ε.
    #[arg(long, default_value_t = 1e-6)]
    pub adam_epsilon: f64,
    /// Linear warmup steps (or --warmup-ratio; default none).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the steps.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    #[arg(long, value_enum, default_value_t)]
    pub lr_scheduler: Schedule,
    /// The power of --lr-scheduler polynomial and poly_warmup (transformers' default 1; NVIDIA's BERT 0.5).
    #[arg(long, default_value_t = 1.0)]
    pub lr_power: f64,
    /// The optimizer (LAMB: --adam-* set its β and ε).
    #[arg(long, value_enum, default_value_t)]
    pub optim: OptimizerKind,
    /// LAMB: the trust ratio for every tensor, biases and LayerNorm weights too (FusedLAMB's use_nvlamb).
    #[arg(long)]
    pub lamb_all_tensors: bool,
    /// Optimizer steps to train (or --num-train-epochs; default 3 epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs to train (fractions allowed).
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Phases run one after the other (NVIDIA's 128 → 512 recipe), each overriding the settings above for
    /// its steps: `[[phases]]` in a --config file. Empty: one phase, the settings above.
    #[arg(skip)]
    pub phases: Vec<PhaseConfig>,
    /// A second phase after --max-steps steps (NVIDIA's 128 → 512 recipe), this many steps; the other
    /// --phase2-* settings change the first phase's for it. More phases: `[[phases]]` in --config.
    #[arg(long)]
    pub phase2_steps: Option<u64>,
    /// Phase 2: tokens per sequence.
    #[arg(long)]
    pub phase2_max_seq_len: Option<usize>,
    /// Phase 2: sequences per device per micro-batch.
    #[arg(long)]
    pub phase2_per_device_batch_size: Option<usize>,
    /// Phase 2: micro-batches per optimizer step.
    #[arg(long)]
    pub phase2_gradient_accumulation_steps: Option<usize>,
    /// Phase 2: peak learning rate (its schedule runs over its own steps).
    #[arg(long)]
    pub phase2_learning_rate: Option<f64>,
    /// Phase 2: warmup steps.
    #[arg(long)]
    pub phase2_warmup_steps: Option<u64>,
    /// Phase 2: warmup as a fraction of its steps.
    #[arg(long)]
    pub phase2_warmup_ratio: Option<f64>,
    /// Global gradient-norm clipping; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Tokens per sequence, special tokens included.
    #[arg(long, default_value_t = 128)]
    pub max_seq_len: usize,
    /// Probability of selecting a token for the MLM loss.
    #[arg(long, default_value_t = 0.15)]
    pub mlm_probability: f64,
    /// Probability of a shorter target length per document.
    #[arg(long, default_value_t = 0.1)]
    pub short_seq_prob: f64,
    /// MLM only: one segment of whole sentences, no next-sentence label or NSP loss.
    #[arg(long)]
    pub no_nsp: bool,
    /// Select whole words (a word and its ## pieces) for masking.
    #[arg(long)]
    pub whole_word_mask: bool,
    /// Cap on predicted tokens per sequence (no cap unless given; NVIDIA: 20 at 128 tokens, 80 at 512).
    #[arg(long)]
    pub max_predictions_per_seq: Option<usize>,
    /// Pad every batch to --max-seq-len instead of its longest sequence.
    #[arg(long)]
    pub pad_to_max: bool,
    /// Seed of the initialisation, the examples, the masks and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Log every this many steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: u64,
    /// Checkpoint every this many steps, and at the end.
    #[arg(long, default_value_t = 500)]
    pub save_steps: u64,
    /// Checkpoints kept; older ones are deleted once a new one is complete.
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// Shard directories to evaluate on during training.
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Evaluate every this many steps.
    #[arg(long, default_value_t = 500)]
    pub eval_steps: u64,
    /// Batches per evaluation.
    #[arg(long, default_value_t = 20)]
    pub eval_batches: usize,
    /// Continue a run: `auto` (the newest checkpoint that verifies; the default with no value) or a
    /// checkpoint directory.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
    pub resume: Option<String>,
    /// Replace a non-empty output directory instead of refusing (it is kept until the new run's first
    /// checkpoint, and put back if the run fails before).
    #[arg(long)]
    pub overwrite_output: bool,
    /// Let a resumed run change its schedule (max steps, epochs, learning rate, warmup).
    #[arg(long)]
    pub allow_config_change: bool,
    /// Non-finite steps in a row that stop an fp32/bf16 run.
    #[arg(long, default_value_t = 10)]
    pub max_nonfinite_steps: u64,
    /// Threads building each batch.
    #[arg(long, default_value_t = 1)]
    pub loader_threads: usize,
    /// Multi-GPU jobs: seconds a rank waits for the others (rendezvous, a collective) before failing.
    #[arg(long, default_value_t = 600)]
    pub dist_timeout_s: u64,
    /// Multi-GPU jobs: gradient bucket size in MB, reduced as backward completes each.
    #[arg(long, default_value_t = 25.0)]
    pub bucket_size_mb: f64,
    /// A progress bar or periodic progress lines on stderr (`--quiet`: none).
    #[arg(long = "quiet", action = clap::ArgAction::SetFalse)]
    pub progress: bool,
    /// Testing: make the gradients of these steps non-finite.
    #[arg(long, hide = true, num_args = 1..)]
    pub debug_nonfinite_steps: Vec<u64>,
    /// Testing: pause this long inside each checkpoint save, before its commit.
    #[arg(long, hide = true, default_value_t = 0)]
    pub debug_pause_in_save_ms: u64,
}

/// One phase of a run: its steps, and the settings it changes (unset: the run's).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    pub optimizer_state: OptimizerState,
}

/// What a phase does with the optimizer's moments at its start (the first phase starts from zero either
/// way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerState {
    /// Keep them and restart the bias-correction count, as NVIDIA's phase 2 does (their
    /// run_pretraining.py loads phase 1's optimizer state and sets its step to 0).
    #[default]
    Keep,
    /// Zero them.
    Reset,
}

/// Any path, the empty one too (the default of `--output`, refused by `validate`).
fn any_path(s: &str) -> std::result::Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

impl Default for TrainConfig {
    /// The flags' defaults (declared once, above).
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let matches = TrainConfig::augment_args(clap::Command::new("train"))
            .try_get_matches_from(["train"])
            .expect("the defaults parse");
        TrainConfig::from_arg_matches(&matches).expect("the defaults parse")
    }
}

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

    /// The settings of `self` (parsed from the command line by `matches`) that the command line gave,
    /// as a JSON object of their keys: the flags layer of [`TrainConfig::resolve`].
    pub fn given(&self, matches: &clap::ArgMatches) -> serde_json::Value {
        let all = serde_json::to_value(self).expect("config serialises");
        let given: serde_json::Map<String, serde_json::Value> = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .filter_map(|id| Some((id.to_string(), all.get(id.as_str())?.clone())))
            .collect();
        given.into()
    }

    /// Defaults, overlaid by a config file's values, overlaid by flags (JSON objects of the keys given).
    pub fn resolve(file: Option<serde_json::Value>, flags: serde_json::Value) -> Result<Self> {
        let mut merged = serde_json::to_value(TrainConfig::default()).expect("config serialises");
        for layer in file.into_iter().chain([flags]) {
            let Some(obj) = layer.as_object() else { bail!("a training config must be a table of settings") };
            for (k, v) in obj {
                if k.contains('-') {
                    bail!(
                        "training config key {k:?}: keys are the flags' names in snake_case: {:?}",
                        k.replace('-', "_")
                    );
                }
                if !v.is_null() {
                    merged[k] = v.clone();
                }
            }
        }
        serde_json::from_value(merged).map_err(|e| Error::Invalid(format!("training config: {e}")))
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.lamb_all_tensors && self.optim != OptimizerKind::Lamb {
            bail!("--lamb-all-tensors applies to --optim lamb");
        }
        if !(self.lr_power > 0.0 && self.lr_power.is_finite()) {
            bail!("--lr-power {} must be positive", self.lr_power);
        }
        if self.lr_scheduler == Schedule::Polynomial && self.learning_rate <= 1e-7 {
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
        Ok(())
    }

    pub(crate) fn examples(&self) -> ExampleConfig {
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
    /// what the phase does with the optimizer's moments. One phase (this config) when the run has none.
    pub fn phase_configs(&self) -> Result<Vec<(TrainConfig, OptimizerState)>> {
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
            (true, None) => return Ok(vec![(self.clone(), OptimizerState::Keep)]),
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
                Ok((c, p.optimizer_state))
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

#[cfg(test)]
mod tests {
    use super::TrainConfig;
    use clap::{Args, FromArgMatches};

    fn parse(args: &[&str]) -> (TrainConfig, serde_json::Value) {
        let m = TrainConfig::augment_args(clap::Command::new("train")).try_get_matches_from(args).unwrap();
        let cfg = TrainConfig::from_arg_matches(&m).unwrap();
        let given = cfg.given(&m);
        (cfg, given)
    }

    #[test]
    fn the_flags_given_are_the_flags_typed_even_at_their_defaults() {
        let (cfg, given) = parse(&["train", "--resume", "--seed", "42", "--quiet", "--data", "a", "b"]);
        assert_eq!(cfg.resume.as_deref(), Some("auto"), "a bare --resume is auto");
        let keys: Vec<&str> = given.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["data", "progress", "resume", "seed"]);
        assert_eq!((given["seed"].as_u64(), given["progress"].as_bool()), (Some(42), Some(false)));
        // Nothing typed, nothing given: the file's values stand.
        assert!(parse(&["train"]).1.as_object().unwrap().is_empty());
    }

    #[test]
    fn a_config_file_with_kebab_case_keys_is_told_the_snake_case_name() {
        let e = TrainConfig::resolve(Some(serde_json::json!({"max-steps": 5})), serde_json::json!({}))
            .unwrap_err();
        assert!(e.to_string().contains("\"max_steps\""), "{e}");
    }
}
