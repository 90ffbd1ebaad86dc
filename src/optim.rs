//! The optimizer side of a step, exactly as torch and transformers do it: AdamW (torch semantics, decoupled
//! decay, no decay for biases and LayerNorm weights), the learning-rate schedules of transformers
//! (`get_linear_schedule_with_warmup`, cosine, constant), global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_`, and the dynamic loss scaler of torch's GradScaler / apex amp.

use serde::{Deserialize, Serialize};

use crate::backend::{AdamWStep, Backend, Buf, Ints, Kind};
use crate::bail;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup from 0, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// The same rate throughout (no warmup).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

impl std::str::FromStr for Schedule {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            _ => bail!("--lr-scheduler {s:?}: choose linear, cosine, constant or constant_with_warmup"),
        })
    }
}

/// The multiplier of the base learning rate for the update made at optimizer step `step` (0-based: the
/// first update uses step 0), as transformers' schedule lambdas.
pub fn lr_lambda(schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if schedule != Schedule::Constant && step < warmup {
        return s / w.max(1.0);
    }
    match schedule {
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
