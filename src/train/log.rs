//! What a run tells: the plan printed at its start, and at each logging step one line of metrics.jsonl,
//! TensorBoard scalars (runs/), and a progress line; the throughput since the last logging step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::eval::EvalResult;
use super::setup::Phase;
use crate::backend::choice::name;
use crate::backend::Backend;
use crate::data::examples::Corpus;
use crate::error::{IoContext, Result};
use crate::model::bert::Bert;
use crate::progress::Progress;
use crate::tensorboard::EventWriter;

/// JSON has no NaN: a non-finite number is written as null, and null reads back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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

/// A count for people: 1234, 12.3 M, 59.0 G.
fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.1} G", n / 1e9),
        n if n >= 1e6 => format!("{:.1} M", n / 1e6),
        n => format!("{n:.0}"),
    }
}

/// The plan, printed once by rank 0: the model, the data, every phase, the device, the output.
#[allow(clippy::too_many_arguments)]
pub(super) fn print_plan<B: Backend>(
    be: &B,
    init_note: &str,
    corpus: &Corpus,
    phases: &[Phase],
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
    for (k, ph) in phases.iter().enumerate() {
        let c = &ph.cfg;
        let effective = c.per_device_batch_size * c.gradient_accumulation_steps * world;
        let label = if phases.len() > 1 { format!("phase {}", k + 1) } else { "steps".into() };
        say(format!(
            "  {label:<8} {} steps (warmup {}, {} schedule, peak lr {}, {}), batch {} × accumulation {} × {world} ranks = {effective} sequences of ≤{} tokens per step, {} tokens at most; {} sequences, {} steps per epoch",
            ph.steps,
            ph.warmup,
            name(c.lr_scheduler),
            c.learning_rate,
            name(c.optim),
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

/// Where rank 0 logs (other ranks keep the progress only, disabled) and the throughput window.
pub(super) struct RunLog {
    metrics: Option<(std::fs::File, PathBuf)>,
    tensorboard: Option<EventWriter>,
    pub progress: Progress,
    /// Since the last logging step: its time, and the sequences and real tokens this rank trained on.
    since: Instant,
    pub sequences: usize,
    pub tokens: usize,
}

impl RunLog {
    /// Open metrics.jsonl (appending: a resumed run continues it) and TensorBoard's runs/ in `output` when
    /// `lead`; a progress bar over `total` steps when `progress`.
    pub fn open(output: &Path, lead: bool, total: u64, progress: bool) -> Result<Self> {
        let path = output.join("metrics.jsonl");
        let metrics = match lead {
            true => {
                Some((std::fs::OpenOptions::new().create(true).append(true).open(&path).at(&path)?, path))
            }
            false => None,
        };
        let tensorboard = if lead { Some(EventWriter::create(&output.join("runs"))?) } else { None };
        Ok(RunLog {
            metrics,
            tensorboard,
            progress: Progress::steps("train", total, progress && lead),
            since: Instant::now(),
            sequences: 0,
            tokens: 0,
        })
    }

    /// Seconds since the last logging step.
    pub fn window_seconds(&self) -> f64 {
        self.since.elapsed().as_secs_f64().max(1e-9)
    }

    /// Write a logging step's metrics everywhere and start the next window.
    pub fn write(&mut self, m: &StepMetrics, total: u64) -> Result<()> {
        let line = serde_json::to_string(m).expect("metrics serialise");
        if let Some((f, path)) = self.metrics.as_mut() {
            // One write per line: a kill never leaves half a line for the resumed run to append to.
            f.write_all(format!("{line}\n").as_bytes()).at(&*path)?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.scalars(m.step, &m.scalars())?;
        }
        self.progress
            .set_message(&format!("loss {:.4} lr {:.2e} {:.0} seq/s", m.loss, m.learning_rate, m.seq_per_s));
        self.progress.println(&m.progress_line(total));
        (self.since, self.sequences, self.tokens) = (Instant::now(), 0, 0);
        Ok(())
    }
}
