//! `bertcuda train`: the pretraining run.
//!
//! - [`config`]: every setting, declared once (flags, config files, checkpoints, validation);
//! - [`setup`]: what a run starts from, before any device work (checks, resume point, output, data,
//!   the model's starting weights, the phases);
//! - [`trainer`]: the loop — a `Trainer` whose `step` is one optimizer step as named calls;
//! - [`log`]: the plan, metrics.jsonl, TensorBoard, progress; [`eval`]: evaluation.
//!
//! One step: `gradient_accumulation_steps` micro-batches, each forward + backward with its dropout masks
//! keyed by the micro-step counter, the gradients' denominators the whole step's predicted tokens and
//! sequences (so accumulation equals one larger batch); then the non-finite check, unscaling (fp16),
//! global-norm clipping, one optimizer update at the schedule's rate.

pub mod config;
pub mod eval;
pub mod log;
mod setup;
mod trainer;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use config::{OptimizerState, PhaseConfig, TrainConfig};
pub use eval::{evaluate, EvalResult};
pub use log::StepMetrics;

use crate::backend::choice::{on_backend, Device};
use crate::bail;
use crate::dist::{Comm, InProcess, Single};
use crate::error::{Error, Result};
use setup::Setup;
use trainer::run;

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
    /// On a device: its host traffic over the steps after this run's first (logging and checkpoint steps
    /// among them), and how many steps that was.
    pub traffic: Option<(crate::backend::device::Traffic, u64)>,
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

/// Run training to the end (or a stop signal), one process.
pub fn train(cfg: TrainConfig, stop: Arc<AtomicBool>) -> Result<TrainSummary> {
    let setup = Setup::new(cfg, true)?;
    on_backend!(setup.cfg.device.open()?, be => run(be, setup, stop, &Single))
}

/// Data-parallel training with `world` ranks as threads of this process, summing gradients through an
/// in-process communicator: what NCCL does across GPUs, here for tests and for checking that W ranks
/// equal one rank with W× the batch. Each rank runs on the CPU backend, or with `--device emu` on an
/// emulated device of its own (the CUDA backend's multi-GPU path: gradient buckets reduced as the
/// backward pass completes them).
pub fn train_in_process(cfg: TrainConfig, world: usize, stop: Arc<AtomicBool>) -> Result<Vec<TrainSummary>> {
    let setup = Setup::new(cfg, true)?;
    // Each rank its own device: an emulated one with `--device emu`, else the CPU.
    let device = if setup.cfg.device == Device::Emu { Device::Emu } else { Device::Cpu };
    let comms = InProcess::group(world, Duration::from_secs(setup.cfg.dist_timeout_s.max(1)));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (setup, stop) = (setup.clone(), stop.clone());
                s.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                        || on_backend!(device.open()?, be => run(be, setup, stop, &comm)),
                    ))
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
    if cfg.device == Device::Cpu {
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
    let setup = Setup::new(cfg, info.rank == 0)?;
    run(&be, setup, stop, &comm).map_err(|e| Error::Invalid(format!("{who}: {e}")))
}
