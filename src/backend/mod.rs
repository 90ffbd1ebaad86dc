//! The backends below the ops: the CPU backend (`cpu`), the reference, and the CUDA backend (`cuda`), which
//! runs the hand-written kernels of `kernels/` and cuBLAS on a device (`device`: a GPU, or the emulated
//! device). This module holds what every backend provides below the ops, the `Memory` trait, and
//! `Backend`, the union of `Memory` and the op families of `crate::ops` (one trait per family, each with
//! its CPU reference and CUDA launcher in `src/ops/<family>.rs`): code written against `B: Backend` or
//! `&dyn Backend` sees every op.
//!
//! Memory is the backend's: `alloc` hands out a `Buf` (floats) or `Ints` (i32), a plain (buffer, offset,
//! length) handle like a device pointer, and `Buf::at` takes sub-regions of it. An op names its outputs and
//! inputs; outputs never overlap inputs or each other (checked).
//!
//! The contract of every op, as in llm.c: **parameter gradients accumulate (`+=`), activations and
//! activation gradients are written (`=`)** unless an argument says otherwise (see `crate::ops`).

pub mod choice;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod philox;

use crate::error::Result;
pub use crate::ops::{Activations, Attention, Embedding, Linear, Loss, Norm, Optim, Tensor};

/// A region of a float buffer, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub id: u32,
    pub off: usize,
    pub len: usize,
}

/// A region of an i32 buffer, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ints {
    pub id: u32,
    pub off: usize,
    pub len: usize,
}

impl Buf {
    /// Elements [off, off + len) of this region.
    pub fn at(self, off: usize, len: usize) -> Buf {
        assert!(off + len <= self.len, "region [{off}, {}) outside a buffer of {}", off + len, self.len);
        Buf { id: self.id, off: self.off + off, len }
    }
    /// The first `len` elements.
    pub fn prefix(self, len: usize) -> Buf {
        self.at(0, len)
    }
    pub fn overlaps(&self, o: &Buf) -> bool {
        self.id == o.id && self.off < o.off + o.len && o.off < self.off + self.len
    }
}

/// Elements a row-major (rows, cols) matrix whose rows start `ld` elements apart (ld ≥ cols) spans from
/// its first: what a region must hold for it.
pub fn strided_len(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

impl Ints {
    pub fn at(self, off: usize, len: usize) -> Ints {
        assert!(off + len <= self.len, "region [{off}, {}) outside a buffer of {}", off + len, self.len);
        Ints { id: self.id, off: self.off + off, len }
    }
    pub fn prefix(self, len: usize) -> Ints {
        self.at(0, len)
    }
}

/// What a buffer holds; a backend may store each kind in its own precision (the CUDA backend keeps
/// activations in bf16 under `--precision bf16`; parameters, gradients, optimizer state and statistics stay
/// fp32). Values cross the trait as f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Master weights (fp32); a backend may keep a low-precision copy for its matrix products.
    Param,
    /// Parameter gradients (fp32).
    Grad,
    /// Activations and their gradients.
    Activation,
    /// Statistics, losses, optimizer moments: always fp32.
    Stat,
}

/// What keys a dropout mask: the same key gives the same mask in forward and backward, on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    /// The micro-step (forward/backward pass) counter.
    pub step: u64,
    /// Which dropout site: layer and place in the layer.
    pub site: u64,
}

/// A dropout: drop probability and its key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub key: DropoutKey,
}

/// AdamW's constants; the numbers that change from update to update are rows of the step's schedule
/// (`StepControl::schedule`, made by `optim::AdamW::schedule_row`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// LAMB's constants (NVIDIA's FusedLAMB, adam_w_mode, bias correction, grad averaging); the learning rate
/// and bias corrections are rows of the step's schedule, the gradients' divisor (the loss scale times the
/// clipping ratio) is the step control's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Of the decay group; the no-decay group has 0.
    pub weight_decay: f32,
    /// The trust ratio for every tensor (FusedLAMB's use_nvlamb), not only the decayed ones.
    pub all_tensors: bool,
}

/// Where the tensors of the flat parameter buffer lie, in chunks: each chunk's decay flag (AdamW's decay
/// per tensor) and tensor (LAMB's per-tensor trust ratios). Made once (`TensorChunks::new`), resident on
/// the backend.
#[derive(Debug, Clone, Copy)]
pub struct TensorChunks {
    /// Per chunk `[start, len, tensor, decays]` (chunks of at most `launch::OPTIMIZER_CHUNK` elements,
    /// none across a tensor's end), then per tensor `[first chunk, chunks]`.
    pub table: Ints,
    pub chunks: usize,
    pub tensors: usize,
    /// Scratch: Σw² and Σu² per chunk (2 × chunks, chunk-major).
    pub partials: Buf,
    /// Scratch: ‖w‖² and ‖u‖² per tensor (2 × tensors).
    pub norms: Buf,
}

/// The decisions of an optimizer step, made and kept on the backend so that a step needs no host
/// synchronisation: `Optim::step_control` reads the gradients' Σg² and the step's loss sums, decides
/// whether the update applies (everything finite), the loss scaler's next scale, the gradients'
/// multipliers (unscaling, clipping) and the schedule row, and records the step; the optimizer reads its
/// numbers from here. The host reads the records when it logs or saves (`optim::StepRecord`).
/// Slots: kernels/launch.cuh's `CONTROL_*`.
#[derive(Debug, Clone, Copy)]
pub struct StepControl {
    /// `CONTROL_FLOATS` numbers (Σg², the MLM and NSP loss sums, the loss scale, 1/scale and the clipping
    /// factor AdamW multiplies by, LAMB's divisor), then `CONTROL_RECORD` per step recorded (Σg², the
    /// loss sums), `CONTROL_HISTORY` steps at most.
    pub stats: Buf,
    /// `CONTROL_INTS` numbers (applied, the schedule row, updates this phase, the scaler's good steps),
    /// then per step recorded whether it applied.
    pub counters: Ints,
    /// `SCHEDULE_ROW` numbers per update of the phase; row k is the update after k updates.
    pub schedule: Buf,
}

/// How `Optim::step_control` decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlStep {
    /// Global-norm clipping (0: none).
    pub max_grad_norm: f64,
    /// The dynamic loss scaler's growth interval; 0 when the scaler is off.
    pub growth_interval: u64,
    /// Which record this step writes (steps since the host last read them).
    pub slot: usize,
}

/// The buffers allocated up to a point (`Backend::allocation_mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationMark {
    pub floats: usize,
    pub ints: usize,
}

/// Labels of rows that take no part in a loss.
pub const IGNORE_INDEX: i32 = -100;

/// What every backend provides below the ops: its buffers (their storage, allocation and transfers), its
/// queue of work, its precision, and the sums of buffers across data-parallel ranks.
pub trait Memory {
    /// One line for logs: which device, which precision.
    fn describe(&self) -> String;

    /// Settle `--precision` (auto, fp32, bf16, fp16) for this backend; the name of what it runs. The CPU
    /// computes in fp32: fp16 there runs the loss scaler around fp32 arithmetic, bf16 is refused.
    fn set_precision(&self, requested: &str) -> Result<&'static str> {
        match requested {
            "auto" | "fp32" => Ok("fp32"),
            "fp16" => Ok("fp16"),
            other => crate::bail!("--precision {other}: the CPU backend computes in fp32; use --precision fp32 (or fp16 for the loss scaler), or a GPU"),
        }
    }

    /// Wait for all queued work (timing); the CPU computes synchronously.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Device memory in use, bytes, where the backend knows it.
    fn memory_used(&self) -> Option<u64> {
        None
    }

    /// The host's waits, transfers and device allocations so far, where the backend has a device.
    fn traffic(&self) -> Option<device::Traffic> {
        None
    }

    // ---- memory -------------------------------------------------------------------------------------
    /// A zeroed float buffer.
    fn alloc(&self, len: usize) -> Result<Buf>;
    /// A zeroed buffer for what `kind` says it holds.
    fn alloc_kind(&self, len: usize, kind: Kind) -> Result<Buf> {
        let _ = kind;
        self.alloc(len)
    }
    /// A zeroed i32 buffer.
    fn alloc_ints(&self, len: usize) -> Result<Ints>;
    /// How many float and int buffers exist: a mark for `release_since`.
    fn allocation_mark(&self) -> AllocationMark;
    /// Free every buffer allocated after `mark` (a model rebuilt for another shape: its activations);
    /// their handles must not be used again.
    fn release_since(&self, mark: AllocationMark) -> Result<()>;
    fn upload(&self, dst: Buf, src: &[f32]) -> Result<()>;
    fn upload_f64(&self, dst: Buf, src: &[f64]) -> Result<()>;
    fn download(&self, src: Buf) -> Result<Vec<f32>>;
    fn download_f64(&self, src: Buf) -> Result<Vec<f64>>;
    fn upload_ints(&self, dst: Ints, src: &[i32]) -> Result<()>;
    fn download_ints(&self, src: Ints) -> Result<Vec<i32>>;
    fn fill(&self, dst: Buf, value: f32) -> Result<()>;
    fn copy(&self, dst: Buf, src: Buf) -> Result<()>;

    // ---- data parallelism ------------------------------------------------------------------------------
    /// buf = Σ over the ranks of `comm`, in place. This default goes through host memory; the CUDA
    /// backend sums on the device with NCCL.
    fn all_reduce_sum(&self, buf: Buf, comm: &dyn crate::dist::Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mut h = self.download(buf)?;
        comm.all_reduce_sum(&mut h)?;
        self.upload(buf, &h)
    }

    /// Wait, on the compute side, for every `all_reduce_sum` queued so far (the CUDA backend runs them on
    /// a communication stream, overlapping the backward pass).
    fn all_reduce_wait(&self) -> Result<()> {
        Ok(())
    }
}

/// A backend: memory and every op family. Implemented for every type that has them all.
pub trait Backend:
    Memory + Linear + Norm + Activations + Embedding + Attention + Loss + Optim + Tensor
{
}

impl<B> Backend for B where
    B: Memory + Linear + Norm + Activations + Embedding + Attention + Loss + Optim + Tensor + ?Sized
{
}
