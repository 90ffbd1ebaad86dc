//! The optimizer side of a step, exactly as torch and transformers do it: AdamW (torch semantics, decoupled
//! decay, no decay for biases and LayerNorm weights), LAMB as NVIDIA's FusedLAMB (their BERT's optimizer),
//! the learning-rate schedules of transformers (`get_linear_schedule_with_warmup`, cosine, constant,
//! polynomial), global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`, and the dynamic loss
//! scaler of torch's GradScaler / apex amp.

use serde::{Deserialize, Serialize};

use crate::backend::cuda::launch::{
    CONTROL_FLOATS, CONTROL_GOOD_STEPS, CONTROL_HISTORY, CONTROL_INTS, CONTROL_MLM, CONTROL_RECORD,
    CONTROL_SCALE, CONTROL_SQUARES, CONTROL_UPDATES,
};
use crate::backend::{AdamWConsts, Backend, Buf, ControlStep, Kind, LambConsts, StepControl, TensorChunks};
use crate::bail;
use crate::error::Result;
use crate::model::params::ParamInfo;

/// `--lr-scheduler`: the learning rate's shape over a run (or a phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup from 0, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// The same rate throughout (no warmup).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then (1 − progress)^power from the peak down to 1e-7 (transformers'
    /// `get_polynomial_decay_schedule_with_warmup`; NVIDIA's BERT uses power 0.5).
    Polynomial,
    /// NVIDIA's `PolyWarmUpScheduler` as their BERT steps it: update k (from 0) at progress
    /// p = (k + 1)/total, the rate p/warmup_fraction during warmup, then (1 − p)^power — the decay counted
    /// from step 0, not from the warmup's end.
    PolyWarmup,
}

/// `--optim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// torch's AdamW.
    #[default]
    #[value(name = "adamw")]
    #[serde(rename = "adamw")]
    AdamW,
    /// NVIDIA's FusedLAMB: per-tensor trust ratios, the gradient clipped by its global norm inside the
    /// update.
    #[value(name = "lamb")]
    #[serde(rename = "lamb")]
    Lamb,
}

/// The polynomial schedule's shape: the power, and the end as a fraction of the peak rate
/// (transformers: lr_end 1e-7 over the peak).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Polynomial {
    pub power: f64,
    pub end_fraction: f64,
    /// poly_warmup: the warmup as a fraction of the steps, as given (`--warmup-ratio`); else
    /// warmup steps / total.
    pub warmup_fraction: Option<f64>,
}

impl Polynomial {
    /// transformers' defaults (power 1, lr_end 1e-7) for a peak rate.
    pub fn for_peak(power: f64, peak: f64) -> Self {
        Polynomial { power, end_fraction: if peak > 0.0 { 1e-7 / peak } else { 0.0 }, warmup_fraction: None }
    }
}

/// The multiplier of the base learning rate for the update made at optimizer step `step` (0-based: the
/// first update uses step 0), as transformers' schedule lambdas (the polynomial one with power 1 and an
/// end of 0; `lr_multiplier` takes its shape).
pub fn lr_lambda(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    lr_multiplier(
        schedule,
        step,
        warmup,
        total,
        Polynomial { power: 1.0, end_fraction: 0.0, warmup_fraction: None },
    )
}

/// `lr_lambda` with the polynomial schedule's shape.
pub fn lr_multiplier(schedule: Schedule, step: u64, warmup: u64, total: u64, poly: Polynomial) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if schedule == Schedule::PolyWarmup {
        let progress = (s + 1.0) / t.max(1.0);
        let warmup_fraction = poly.warmup_fraction.unwrap_or(w / t.max(1.0));
        return if progress < warmup_fraction {
            progress / warmup_fraction
        } else {
            (1.0 - progress).max(0.0).powf(poly.power)
        };
    }
    if schedule != Schedule::Constant && step < warmup {
        return s / w.max(1.0);
    }
    match schedule {
        Schedule::PolyWarmup => unreachable!("handled above"),
        Schedule::Polynomial if step > total => poly.end_fraction,
        Schedule::Polynomial => {
            let remaining = 1.0 - (s - w) / (t - w);
            (1.0 - poly.end_fraction) * remaining.powf(poly.power) + poly.end_fraction
        }
        Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
        Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        Schedule::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
    }
}

/// `clip_grad_norm_`'s factor: max_norm / (norm + 1e-6), at most 1.
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// Dynamic loss scaling (fp16): start at `init`, halve and skip the step on a non-finite gradient, double
/// after `growth_interval` finite steps in a row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: u64,
    /// Finite steps since the last change.
    pub good_steps: u64,
    pub enabled: bool,
}

impl LossScaler {
    pub fn new(enabled: bool) -> Self {
        LossScaler {
            scale: if enabled { 65536.0 } else { 1.0 },
            growth_interval: 2000,
            good_steps: 0,
            enabled,
        }
    }

    /// Record a step's outcome; returns whether the optimizer step happens.
    pub fn update(&mut self, finite: bool) -> bool {
        if !self.enabled {
            return finite;
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps == self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
        finite
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW's state on the backend: the two moments over the flat parameter buffer and its tensors' decay
/// flags.
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Buf,
    pub v: Buf,
    chunks: TensorChunks,
}

impl AdamW {
    /// `tensors` tile the flat buffer in order (the parameter table's); each says whether it decays.
    pub fn new(be: &(impl Backend + ?Sized), config: AdamWConfig, tensors: &[ParamInfo]) -> Result<Self> {
        let (m, v, chunks) = moments_and_chunks(be, tensors)?;
        Ok(AdamW { config, m, v, chunks })
    }

    /// The schedule row of the update with learning rate `lr` after `updates` updates (t = updates + 1):
    /// 1 − lr·wd, lr/(1 − β1ᵗ), √(1 − β2ᵗ), from the f32 numbers in f64 as torch's single-tensor AdamW.
    pub fn schedule_row(&self, lr: f64, updates: u64) -> [f64; 3] {
        let c = self.config;
        let f = |x: f64| x as f32 as f64;
        let (lr, b1, b2, wd) = (f(lr), f(c.beta1), f(c.beta2), f(c.weight_decay));
        let t = (updates + 1) as i32;
        [1.0 - lr * wd, lr / (1.0 - b1.powi(t)), (1.0 - b2.powi(t)).sqrt()]
    }

    fn update(
        &self,
        be: &(impl Backend + ?Sized),
        params: Buf,
        grads: Buf,
        control: &StepControl,
    ) -> Result<()> {
        let c = self.config;
        let h = AdamWConsts { beta1: c.beta1 as f32, beta2: c.beta2 as f32, eps: c.eps as f32 };
        be.adamw(params, grads, self.m, self.v, &self.chunks, control, &h)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LambConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The trust ratio for every tensor, the no-decay group too (FusedLAMB's use_nvlamb).
    pub all_tensors: bool,
}

/// LAMB's state on the backend: the two moments and the tensor layout of the trust ratios.
pub struct Lamb {
    pub config: LambConfig,
    pub m: Buf,
    pub v: Buf,
    chunks: TensorChunks,
}

impl Lamb {
    /// `tensors` tile the flat buffer in order: the parameter table's, as transformers names them (query,
    /// key and value apart).
    pub fn new(be: &(impl Backend + ?Sized), config: LambConfig, tensors: &[ParamInfo]) -> Result<Self> {
        let (m, v, chunks) = moments_and_chunks(be, tensors)?;
        Ok(Lamb { config, m, v, chunks })
    }

    /// The schedule row of the update with learning rate `lr` after `updates` updates: lr, 1 − β1ᵗ,
    /// 1 − β2ᵗ (from the f32 numbers, in f64).
    pub fn schedule_row(&self, lr: f64, updates: u64) -> [f64; 3] {
        let c = self.config;
        let f = |x: f64| x as f32 as f64;
        let t = (updates + 1) as i32;
        [f(lr), 1.0 - f(c.beta1).powi(t), 1.0 - f(c.beta2).powi(t)]
    }

    fn update(
        &self,
        be: &(impl Backend + ?Sized),
        params: Buf,
        grads: Buf,
        control: &StepControl,
    ) -> Result<()> {
        let c = self.config;
        let h = LambConsts {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            all_tensors: c.all_tensors,
        };
        be.lamb(params, grads, self.m, self.v, &self.chunks, control, &h)
    }
}

/// An optimizer's two moments over the flat buffer that `tensors` tile, and their chunk table.
fn moments_and_chunks(
    be: &(impl Backend + ?Sized),
    tensors: &[ParamInfo],
) -> Result<(Buf, Buf, TensorChunks)> {
    let chunks = TensorChunks::new(be, tensors)?;
    let n: usize = tensors.iter().map(|p| p.len).sum();
    Ok((be.alloc_kind(n, Kind::Stat)?, be.alloc_kind(n, Kind::Stat)?, chunks))
}

impl TensorChunks {
    /// The chunk table of `tensors` (which tile the flat buffer in order), uploaded, and its scratch.
    pub fn new(be: &(impl Backend + ?Sized), tensors: &[ParamInfo]) -> Result<Self> {
        let total: usize = tensors.iter().map(|p| p.len).sum();
        if total > i32::MAX as usize {
            bail!("the optimizers index parameters with 32-bit offsets: {total} parameters is too many");
        }
        let chunk = crate::backend::cuda::launch::OPTIMIZER_CHUNK as usize;
        let (mut chunks, mut ranges) = (Vec::new(), Vec::new());
        for (t, p) in tensors.iter().enumerate() {
            let first = chunks.len() / 4;
            for start in (p.offset..p.offset + p.len).step_by(chunk) {
                let len = chunk.min(p.offset + p.len - start);
                chunks.extend([start as i32, len as i32, t as i32, p.decay as i32]);
            }
            ranges.extend([first as i32, (chunks.len() / 4 - first) as i32]);
        }
        let n_chunks = chunks.len() / 4;
        let table = be.alloc_ints(chunks.len() + ranges.len())?;
        be.upload_ints(table, &[chunks, ranges].concat())?;
        Ok(TensorChunks {
            table,
            chunks: n_chunks,
            tensors: tensors.len(),
            partials: be.alloc_kind(2 * n_chunks, Kind::Stat)?,
            norms: be.alloc_kind(2 * tensors.len(), Kind::Stat)?,
        })
    }
}

/// One step as the step control recorded it: the gradients' Σg² (scaled), the loss sums, whether the
/// update applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    pub squares: f64,
    pub mlm_sum: f64,
    pub nsp_sum: f64,
    pub applied: bool,
}

/// The step control's counters as the device holds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlCounters {
    /// Updates applied since the phase began.
    pub updates: u64,
    pub scale: f64,
    pub good_steps: u64,
}

impl StepControl {
    /// The control's buffers on `be` (no schedule yet: `set_schedule`).
    pub fn new(be: &(impl Backend + ?Sized)) -> Result<Self> {
        let floats = (CONTROL_FLOATS + CONTROL_RECORD * CONTROL_HISTORY) as usize;
        let ints = (CONTROL_INTS + CONTROL_HISTORY) as usize;
        let stats = be.alloc_kind(floats, Kind::Stat)?;
        let schedule = be.alloc_kind(0, Kind::Stat)?;
        Ok(StepControl { stats, counters: be.alloc_ints(ints)?, schedule })
    }

    /// Steps one read can cover: the records kept.
    pub const HISTORY: usize = CONTROL_HISTORY as usize;

    /// The schedule: `rows` (SCHEDULE_ROW numbers per update) in a buffer of its own.
    pub fn set_schedule(&mut self, be: &(impl Backend + ?Sized), rows: &[f64]) -> Result<()> {
        self.schedule = be.alloc_kind(rows.len(), Kind::Stat)?;
        be.upload_f64(self.schedule, rows)
    }

    /// Count from `c` (a phase's start, or a checkpoint's state), the loss sums at zero.
    pub fn start(&self, be: &(impl Backend + ?Sized), c: &ControlCounters) -> Result<()> {
        let slot = |k: u32| k as usize;
        be.upload(self.stats.at(slot(CONTROL_MLM), 2), &[0.0, 0.0])?;
        be.upload_f64(self.stats.at(slot(CONTROL_SCALE), 1), &[c.scale])?;
        be.upload_ints(self.counters.at(slot(CONTROL_UPDATES), 1), &[c.updates as i32])?;
        be.upload_ints(self.counters.at(slot(CONTROL_GOOD_STEPS), 1), &[c.good_steps as i32])
    }

    /// Where a step's forward and backward passes add their MLM and NSP loss sums.
    pub fn loss_sums(&self) -> Buf {
        self.stats.at(CONTROL_MLM as usize, 2)
    }

    /// The loss scale the next step's backward pass multiplies by (fp16), as the control keeps it.
    pub fn loss_scale(&self) -> Buf {
        self.stats.at(CONTROL_SCALE as usize, 1)
    }

    /// Where `sum_squares` writes the gradients' Σg².
    pub fn squares(&self) -> Buf {
        self.stats.at(CONTROL_SQUARES as usize, 1)
    }

    /// The records of the first `n` steps since the last read, and the counters now: two copies back.
    pub fn read(&self, be: &(impl Backend + ?Sized), n: usize) -> Result<(Vec<StepRecord>, ControlCounters)> {
        let (f0, i0, w) = (CONTROL_FLOATS as usize, CONTROL_INTS as usize, CONTROL_RECORD as usize);
        let stats = be.download_f64(self.stats.prefix(f0 + w * n))?;
        let ints = be.download_ints(self.counters.prefix(i0 + n))?;
        let records = (0..n)
            .map(|k| {
                let r = &stats[f0 + w * k..][..w];
                StepRecord { squares: r[0], mlm_sum: r[1], nsp_sum: r[2], applied: ints[i0 + k] != 0 }
            })
            .collect();
        let counters = ControlCounters {
            updates: ints[CONTROL_UPDATES as usize] as u64,
            scale: stats[CONTROL_SCALE as usize],
            good_steps: ints[CONTROL_GOOD_STEPS as usize] as u64,
        };
        Ok((records, counters))
    }
}

/// The run's optimizer.
pub enum Optimizer {
    AdamW(AdamW),
    Lamb(Lamb),
}

impl Optimizer {
    /// The two moments (torch's exp_avg and exp_avg_sq for AdamW; LAMB's, in the same layout).
    pub fn moments(&self) -> (Buf, Buf) {
        match self {
            Optimizer::AdamW(a) => (a.m, a.v),
            Optimizer::Lamb(l) => (l.m, l.v),
        }
    }

    /// The schedule rows of updates 0, 1, … at the learning rates `lrs`, for `StepControl::set_schedule`.
    pub fn schedule_rows(&self, lrs: impl Iterator<Item = f64>) -> Vec<f64> {
        lrs.enumerate()
            .flat_map(|(k, lr)| match self {
                Optimizer::AdamW(a) => a.schedule_row(lr, k as u64),
                Optimizer::Lamb(l) => l.schedule_row(lr, k as u64),
            })
            .collect()
    }

    /// One step, decided and applied on the backend: Σg² of `grads`, the step control's decisions
    /// (finite or skipped, unscaling and clipping as `clip_grad_norm_` for AdamW or inside LAMB's
    /// division, the loss scaler, the step's record), then the update.
    pub fn step(
        &self,
        be: &(impl Backend + ?Sized),
        params: Buf,
        grads: Buf,
        control: &StepControl,
        h: &ControlStep,
    ) -> Result<()> {
        be.sum_squares(control.squares(), grads)?;
        be.step_control(control, h)?;
        match self {
            Optimizer::AdamW(a) => a.update(be, params, grads, control),
            Optimizer::Lamb(l) => l.update(be, params, grads, control),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_warms_up_from_zero_and_decays_to_zero() {
        assert_eq!(lr_lambda(Schedule::Linear, 0, 10, 100), 0.0);
        assert_eq!(lr_lambda(Schedule::Linear, 5, 10, 100), 0.5);
        assert_eq!(lr_lambda(Schedule::Linear, 10, 10, 100), 1.0);
        assert_eq!(lr_lambda(Schedule::Linear, 55, 10, 100), 0.5);
        assert_eq!(lr_lambda(Schedule::Linear, 100, 10, 100), 0.0);
        assert_eq!(lr_lambda(Schedule::Constant, 0, 10, 100), 1.0);
        assert_eq!(lr_lambda(Schedule::ConstantWithWarmup, 2, 10, 100), 0.2);
        assert!((lr_lambda(Schedule::Cosine, 55, 10, 100) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn scaler_halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut off = LossScaler::new(false);
        assert!(!off.update(false));
        assert_eq!(off.scale, 1.0);
    }
}
