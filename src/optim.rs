//! The optimizer side of a step, exactly as torch and transformers do it: AdamW (torch semantics, decoupled
//! decay, no decay for biases and LayerNorm weights), LAMB as NVIDIA's FusedLAMB (their BERT's optimizer),
//! the learning-rate schedules of transformers (`get_linear_schedule_with_warmup`, cosine, constant,
//! polynomial), global gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`, and the dynamic loss
//! scaler of torch's GradScaler / apex amp.

use serde::{Deserialize, Serialize};

use crate::backend::{AdamWStep, Backend, Buf, Ints, Kind, LambLayout, LambStep};
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

/// AdamW's state on the backend: the two moments over the flat parameter buffer and the decay mask.
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Buf,
    pub v: Buf,
    decay: Ints,
    /// Updates made so far (t of the bias correction is this + 1 for the next update).
    pub steps: u64,
}

impl AdamW {
    pub fn new(be: &impl Backend, config: AdamWConfig, decay_mask: &[u8]) -> Result<Self> {
        let n = decay_mask.len();
        let decay = be.alloc_ints(n)?;
        be.upload_ints(decay, &decay_mask.iter().map(|&d| d as i32).collect::<Vec<_>>())?;
        Ok(AdamW {
            config,
            m: be.alloc_kind(n, Kind::Stat)?,
            v: be.alloc_kind(n, Kind::Stat)?,
            decay,
            steps: 0,
        })
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, be: &impl Backend, params: Buf, grads: Buf, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let h = AdamWStep {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            step: self.steps,
        };
        be.adamw(params, grads, self.m, self.v, self.decay, &h)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LambConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm clipping of the gradient before the moments (0: none).
    pub max_grad_norm: f64,
    /// The trust ratio for every tensor, the no-decay group too (FusedLAMB's use_nvlamb).
    pub all_tensors: bool,
}

/// LAMB's state on the backend: the two moments and the tensor layout of the trust ratios.
pub struct Lamb {
    pub config: LambConfig,
    pub m: Buf,
    pub v: Buf,
    layout: LambLayout,
    /// Updates made so far.
    pub steps: u64,
}

impl Lamb {
    /// `tensors` tile the flat buffer in order: the parameter table's, as transformers names them (query,
    /// key and value apart).
    pub fn new(be: &(impl Backend + ?Sized), config: LambConfig, tensors: &[ParamInfo]) -> Result<Self> {
        let layout = LambLayout::new(be, tensors)?;
        let n: usize = tensors.iter().map(|p| p.len).sum();
        Ok(Lamb {
            config,
            m: be.alloc_kind(n, Kind::Stat)?,
            v: be.alloc_kind(n, Kind::Stat)?,
            layout,
            steps: 0,
        })
    }

    /// One update with learning rate `lr`, of gradients scaled by `loss_scale` whose true global norm is
    /// `grad_norm`: the clipping and the unscaling are one division inside the update.
    pub fn step(
        &mut self,
        be: &(impl Backend + ?Sized),
        params: Buf,
        grads: Buf,
        lr: f64,
        grad_norm: f64,
        loss_scale: f64,
    ) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let clip = if c.max_grad_norm > 0.0 && grad_norm > c.max_grad_norm {
            grad_norm / c.max_grad_norm
        } else {
            1.0
        };
        let h = LambStep {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            step: self.steps,
            grad_divisor: (clip * loss_scale) as f32,
            all_tensors: c.all_tensors,
        };
        be.lamb(params, grads, self.m, self.v, &self.layout, &h)
    }
}

impl LambLayout {
    /// The chunk table of `tensors` (which tile the flat buffer in order), uploaded, and its scratch.
    pub fn new(be: &(impl Backend + ?Sized), tensors: &[ParamInfo]) -> Result<Self> {
        let total: usize = tensors.iter().map(|p| p.len).sum();
        if total > i32::MAX as usize {
            bail!("LAMB indexes parameters with 32-bit offsets: {total} parameters is too many");
        }
        let chunk = crate::backend::cuda::launch::LAMB_CHUNK as usize;
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
        Ok(LambLayout {
            table,
            chunks: n_chunks,
            tensors: tensors.len(),
            partials: be.alloc_kind(2 * n_chunks, Kind::Stat)?,
            norms: be.alloc_kind(2 * tensors.len(), Kind::Stat)?,
        })
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

    pub fn steps_mut(&mut self) -> &mut u64 {
        match self {
            Optimizer::AdamW(a) => &mut a.steps,
            Optimizer::Lamb(l) => &mut l.steps,
        }
    }

    /// One update. AdamW clips as `clip_grad_norm_` after unscaling; LAMB divides inside its update.
    pub fn step(
        &mut self,
        be: &impl Backend,
        params: Buf,
        grads: Buf,
        lr: f64,
        grad_norm: f64,
        loss_scale: f64,
        max_grad_norm: f64,
    ) -> Result<()> {
        match self {
            Optimizer::AdamW(a) => {
                if loss_scale != 1.0 {
                    be.scale(grads, (1.0 / loss_scale) as f32)?;
                }
                if max_grad_norm > 0.0 {
                    let c = clip_coefficient(grad_norm, max_grad_norm);
                    if c < 1.0 {
                        be.scale(grads, c as f32)?;
                    }
                }
                a.step(be, params, grads, lr)
            }
            Optimizer::Lamb(l) => l.step(be, params, grads, lr, grad_norm, loss_scale),
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
