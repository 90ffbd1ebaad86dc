//! The CUDA backend: the hand-written kernels of `kernels/` and cuBLAS's matrix products, on a device
//! (`device::Device`): a real GPU through the driver, or the emulated device that runs the same kernel
//! sources on the CPU (`--device emu`, checked in CI). Everything this file does to a device goes through
//! that trait, so every launch here — argument lists, grids, offsets — is the same code on both.
//!
//! Memory: each `alloc` is one device allocation; ops take raw device pointers (base + offset), like
//! llm.c, and the same output/input overlap checks as the CPU backend. All work is queued in order; the
//! host waits only when it reads something back. `--precision fp32` computes in fp32 (cuBLAS without
//! TF32): it is held to the CPU reference. `bf16` stores activations in bf16 (see `set_precision`).

use std::cell::{Cell, RefCell};

use super::device::driver::Driver;
pub use super::device::driver::{kernels_built, probe, NcclComm};
use super::device::emu::{Emu, EmuOptions};
use super::device::{Compute, Device, Elem, Gemm, Kernel, KernelArg, Launch, Mem};

use crate::backend::{
    philox, AdamWStep, AllocationMark, Backend, Buf, Dropout, Ints, Kind, LambLayout, LambStep, IGNORE_INDEX,
};
use crate::bail;
use crate::error::{Error, Result};
use crate::model::config::Activation;

/// Dropout arguments of the kernels (common.cuh's DropoutArgs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutArgs {
    key0: u32,
    key1: u32,
    threshold: u32,
    inv_keep: f32,
    enabled: i32,
}
impl KernelArg for DropoutArgs {
    fn bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

impl DropoutArgs {
    fn of(d: Option<Dropout>) -> Self {
        match d {
            None => DropoutArgs::default(),
            Some(d) => {
                let k = philox::key(d.key);
                DropoutArgs {
                    key0: k[0],
                    key1: k[1],
                    threshold: philox::threshold(d.p),
                    inv_keep: (1.0 / (1.0 - d.p as f64)) as f32,
                    enabled: 1,
                }
            }
        }
    }
}

/// adamw.cu's AdamWArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamWArgs {
    decay_factor: f32,
    step_size: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
}
impl KernelArg for AdamWArgs {
    fn bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

/// adamw.cu's LambArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LambArgs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    eps: f32,
    weight_decay: f32,
    grad_divisor: f32,
    lr: f32,
    all_tensors: i32,
}
impl KernelArg for LambArgs {
    fn bytes(&self) -> &[u8] {
        bytemuck::bytes_of(self)
    }
}

/// Storage types of float buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dt {
    F32,
    Bf16,
}

impl Dt {
    fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::Bf16 => 2,
        }
    }
}

/// A kernel in each activation storage type.
struct Typed {
    f32: Kernel,
    bf16: Kernel,
}

impl Typed {
    fn of(&self, dt: Dt) -> Kernel {
        match dt {
            Dt::F32 => self.f32,
            Dt::Bf16 => self.bf16,
        }
    }
}

/// Every kernel, loaded once; a missing one fails at start-up, named.
struct Kernels {
    add: Typed,
    bias_add: Typed,
    bias_grad_partial: Typed,
    sum_partials: Kernel,
    scale: Typed,
    fill: Typed,
    cast_bf16: Kernel,
    gelu_fwd: Typed,
    gelu_bwd: Typed,
    tanh_fwd: Typed,
    tanh_bwd: Typed,
    dropout: Typed,
    layernorm_fwd: Typed,
    layernorm_bwd: Typed,
    layernorm_param_partial: Typed,
    embeddings_fwd: Typed,
    embeddings_bwd: Typed,
    gather_rows: Typed,
    scatter_rows: Typed,
    cross_entropy: Typed,
    argmax: Typed,
    sum_squares_partial: Typed,
    sum_squares_final: Kernel,
    adamw: Kernel,
    lamb_moments: Kernel,
    lamb_norms: Kernel,
    lamb_apply: Kernel,
    attention_bwd_d: Typed,
    residual_layernorm: Typed,
    residual_layernorm_bwd: Typed,
    bias_gelu: Typed,
    gelu_bias_bwd: Typed,
    embeddings_layernorm: Typed,
    /// head size → (forward, dk/dv, dq)
    attention: Vec<(usize, Typed, Typed, Typed)>,
}

impl Kernels {
    fn load(dev: &dyn Device) -> Result<Self> {
        let f = |name: &str| dev.kernel(name);
        let t = |base: &str| -> Result<Typed> {
            Ok(Typed { f32: f(&format!("{base}_f32"))?, bf16: f(&format!("{base}_bf16"))? })
        };
        let mut attention = Vec::new();
        for hs in [16usize, 32, 64, 128] {
            let typed = |op: &str| -> Result<Typed> {
                Ok(Typed { f32: f(&format!("{op}_f32_hs{hs}"))?, bf16: f(&format!("{op}_bf16_hs{hs}"))? })
            };
            attention.push((
                hs,
                typed("attention_fwd")?,
                typed("attention_bwd_dkdv")?,
                typed("attention_bwd_dq")?,
            ));
        }
        Ok(Kernels {
            add: t("add_fwd")?,
            bias_add: t("bias_add_fwd")?,
            bias_grad_partial: t("bias_grad_partial_bwd")?,
            sum_partials: f("sum_partials_bwd_f32")?,
            scale: t("scale_fwd")?,
            fill: t("fill_fwd")?,
            cast_bf16: f("cast_fwd_bf16")?,
            gelu_fwd: t("gelu_fwd")?,
            gelu_bwd: t("gelu_bwd")?,
            tanh_fwd: t("tanh_fwd")?,
            tanh_bwd: t("tanh_bwd")?,
            dropout: t("dropout_fwd")?,
            layernorm_fwd: t("layernorm_fwd")?,
            layernorm_bwd: t("layernorm_bwd")?,
            layernorm_param_partial: t("layernorm_param_partial_bwd")?,
            embeddings_fwd: t("embeddings_fwd")?,
            embeddings_bwd: t("embeddings_bwd")?,
            gather_rows: t("gather_rows_fwd")?,
            scatter_rows: t("scatter_rows_bwd")?,
            cross_entropy: t("cross_entropy_fwd")?,
            argmax: t("argmax_fwd")?,
            sum_squares_partial: t("sum_squares_partial_fwd")?,
            sum_squares_final: f("sum_squares_final_fwd_f32")?,
            adamw: f("adamw_fwd_f32")?,
            lamb_moments: f("lamb_moments_f32")?,
            lamb_norms: f("lamb_norms_f32")?,
            lamb_apply: f("lamb_apply_f32")?,
            attention_bwd_d: t("attention_bwd_d")?,
            residual_layernorm: t("residual_layernorm_fwd")?,
            residual_layernorm_bwd: t("residual_layernorm_bwd")?,
            bias_gelu: t("bias_gelu_fwd")?,
            gelu_bias_bwd: t("gelu_bias_bwd")?,
            embeddings_layernorm: t("embeddings_layernorm_fwd")?,
            attention,
        })
    }
}

/// One float allocation: its bytes, storage type, and for parameters under bf16 a bf16 copy the matrix
/// products and kernels read (refreshed on upload and after every AdamW step).
struct Floats {
    mem: Mem,
    len: usize,
    dt: Dt,
    shadow: Option<Mem>,
}

struct IntsBuf {
    mem: Mem,
    len: usize,
    /// What was last uploaded: the host builds the embedding-gradient groups and checks row lists from it.
    host: Vec<i32>,
}

/// A grow-only device buffer for reduction partials and embedding-gradient groups: allocated on first
/// use, then reused, so steady-state steps allocate nothing.
#[derive(Default)]
struct Scratch(Option<Mem>);

impl Scratch {
    /// Its device pointer, grown (never shrunk) to at least `bytes`.
    fn at_least(&mut self, dev: &dyn Device, bytes: usize) -> Result<u64> {
        if self.0.as_ref().is_none_or(|m| m.bytes < bytes) {
            self.0 = Some(dev.alloc(bytes, false)?);
        }
        Ok(self.0.as_ref().expect("allocated").ptr)
    }
}

pub struct Cuda {
    dev: Box<dyn Device>,
    k: Kernels,
    floats: RefCell<Vec<Floats>>,
    ints: RefCell<Vec<IntsBuf>>,
    partials: RefCell<Scratch>,
    groups: RefCell<Scratch>,
    name: String,
    sync_timeout: Cell<Option<std::time::Duration>>,
    /// cuBLAS compute type of every matrix product: fp32 storage, and fp32 (CUBLAS_COMPUTE_32F), bf16 or
    /// fp16 tensor-core operands (..._FAST_16BF / _16F) with fp32 accumulation.
    gemm: Cell<(Compute, &'static str)>,
    /// Storage of activations: bf16 under --precision bf16, else fp32.
    act_dt: Cell<Dt>,
}

/// The launch geometry the kernels assume (kernels/launch.cuh, as Rust constants made by build.rs).
#[allow(dead_code)] // every constant of the header, used here or not
pub mod launch {
    include!(concat!(env!("OUT_DIR"), "/launch.rs"));
}
use launch::{ATTENTION_ROWS, PARTIAL_ROWS, THREADS, WARP_ROWS};

/// The rows of each key, for the deterministic embedding gradient: (keys ascending, offsets into rows
/// (keys + 1), rows in row order within each key). One block then sums one key's rows in this order.
pub fn row_groups(keys_of_rows: &[i32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..keys_of_rows.len() as i32).collect();
    order.sort_by_key(|&r| (keys_of_rows[r as usize], r));
    let mut keys = Vec::new();
    let mut offsets = Vec::new();
    for (i, &r) in order.iter().enumerate() {
        let k = keys_of_rows[r as usize];
        if keys.last() != Some(&k) {
            keys.push(k);
            offsets.push(i as i32);
        }
    }
    offsets.push(order.len() as i32);
    (keys, offsets, order)
}

fn grid_for(n: usize) -> u32 {
    (n.div_ceil(THREADS as usize)).clamp(1, 65_535) as u32
}

impl Cuda {
    /// Open GPU `ordinal`, load the kernels and create the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::on(Box::new(Driver::new(ordinal)?))
    }

    /// The emulated device (`--device emu`): the kernels run on the CPU, checked as `opts` says.
    pub fn emulated(opts: EmuOptions) -> Result<Self> {
        Self::on(Box::new(Emu::new(opts)?))
    }

    /// The backend on a device: its kernels looked up once (a missing one is an error naming it).
    pub fn on(dev: Box<dyn Device>) -> Result<Self> {
        let k = Kernels::load(dev.as_ref())?;
        let name = dev.name();
        Ok(Cuda {
            dev,
            k,
            floats: RefCell::new(Vec::new()),
            ints: RefCell::new(Vec::new()),
            partials: RefCell::new(Scratch::default()),
            groups: RefCell::new(Scratch::default()),
            name,
            sync_timeout: Cell::new(None),
            gemm: Cell::new((Compute::F32, "fp32")),
            act_dt: Cell::new(Dt::F32),
        })
    }

    /// Bound every wait: in a multi-GPU job a dead peer leaves collectives unfinished forever.
    pub fn set_sync_timeout(&self, t: Option<std::time::Duration>) {
        self.sync_timeout.set(t);
    }

    /// The device under this backend.
    pub fn device(&self) -> &dyn Device {
        self.dev.as_ref()
    }

    /// The real GPU under this backend, when it is one.
    pub fn driver(&self) -> Option<&Driver> {
        self.dev.as_any().downcast_ref::<Driver>()
    }

    /// Whether this backend runs on the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.dev.as_any().is::<Emu>()
    }

    /// Launch `k` over `grid` with 1-D blocks of `threads`.
    fn launch(&self, k: Kernel, grid: (u32, u32, u32), threads: u32, args: &[&dyn KernelArg]) -> Result<()> {
        self.dev.launch(k, Launch::new(grid, threads), args)
    }

    /// Bounds and overlap checks, then the device pointers: each buffer's own storage.
    fn ptrs<const O: usize, const I: usize>(
        &self,
        outs: [Buf; O],
        ins: [Buf; I],
    ) -> Result<([u64; O], [u64; I])> {
        self.ptrs_as(Dt::F32, outs, ins)
    }

    /// As `ptrs`, for an op whose activations are stored as `dt`: parameters are read from their bf16 copy
    /// when `dt` is bf16 (statistics and gradients keep their fp32 storage).
    fn ptrs_as<const O: usize, const I: usize>(
        &self,
        dt: Dt,
        outs: [Buf; O],
        ins: [Buf; I],
    ) -> Result<([u64; O], [u64; I])> {
        let floats = self.floats.borrow();
        let ptr = |b: &Buf| -> Result<u64> {
            match floats.get(b.id as usize) {
                Some(f) if b.off + b.len <= f.len => Ok(match (&f.shadow, dt) {
                    (Some(sh), Dt::Bf16) => sh.ptr + 2 * b.off as u64,
                    _ => f.mem.ptr + (f.dt.size() * b.off) as u64,
                }),
                _ => bail!("internal: buffer region {b:?} out of bounds"),
            }
        };
        for (i, o) in outs.iter().enumerate() {
            if outs[i + 1..].iter().chain(&ins).any(|x| o.overlaps(x)) {
                bail!("internal: output region {o:?} overlaps another argument");
            }
        }
        let mut po = [0u64; O];
        for (p, b) in po.iter_mut().zip(&outs) {
            *p = ptr(b)?;
        }
        let mut pi = [0u64; I];
        for (p, b) in pi.iter_mut().zip(&ins) {
            *p = ptr(b)?;
        }
        Ok((po, pi))
    }

    /// Arguments the kernels take as float* must be stored in fp32 (statistics, losses, gradients).
    fn need_f32(&self, what: &str, bufs: &[Buf]) -> Result<()> {
        for b in bufs {
            if self.dt(*b)? != Dt::F32 {
                bail!("internal: {what} must be an fp32 buffer (a statistic, loss or gradient)");
            }
        }
        Ok(())
    }

    /// Float outputs written next to activations (gradients, statistics): fp32 and not a parameter, whose
    /// bf16 copy `ptrs_as` would hand out under bf16.
    fn need_f32_out(&self, what: &str, bufs: &[Buf]) -> Result<()> {
        self.need_f32(what, bufs)?;
        let floats = self.floats.borrow();
        if bufs.iter().any(|b| floats.get(b.id as usize).is_some_and(|f| f.shadow.is_some())) {
            bail!("internal: {what} must not be a parameter buffer");
        }
        Ok(())
    }

    /// dw, db (c) += the LayerNorm weight gradients of d(out) = `g` at input `x` with statistics `m`, `r`:
    /// per 64-row block partial sums, then the blocks in order (deterministic).
    fn layernorm_param_grads(
        &self,
        dt: Dt,
        dw: u64,
        db: u64,
        [g, x, m, r]: [u64; 4],
        rows: usize,
        c: usize,
    ) -> Result<()> {
        let chunks = rows.div_ceil(PARTIAL_ROWS as usize).max(1);
        let part = self.partials(chunks * 2 * c)?;
        let (rr, cc) = (rows as i32, c as i32);
        self.launch(
            self.k.layernorm_param_partial.of(dt),
            (chunks as u32, 1, 1),
            THREADS,
            &[&part, &g, &x, &m, &r, &rr, &cc],
        )?;
        self.sum_partials(dw, part, chunks, c, 2 * c)?;
        self.sum_partials(db, part + 4 * c as u64, chunks, c, 2 * c)
    }

    /// The storage type that all of `bufs` share (a kernel is instantiated for one).
    fn dt_all(&self, what: &str, bufs: &[Buf]) -> Result<Dt> {
        let dt = self.dt(bufs[0])?;
        for b in &bufs[1..] {
            if self.dt(*b)? != dt {
                bail!("internal: {what}: the activation buffers are stored in different types");
            }
        }
        Ok(dt)
    }

    /// The storage type of a buffer.
    fn dt(&self, b: Buf) -> Result<Dt> {
        match self.floats.borrow().get(b.id as usize) {
            Some(f) => Ok(f.dt),
            None => bail!("internal: no buffer {}", b.id),
        }
    }

    fn iptr(&self, i: Ints) -> Result<u64> {
        let ints = self.ints.borrow();
        match ints.get(i.id as usize) {
            Some(b) if i.off + i.len <= b.len => Ok(b.mem.ptr + 4 * i.off as u64),
            _ => bail!("internal: int region {i:?} out of bounds"),
        }
    }

    fn host_ints(&self, i: Ints) -> Result<Vec<i32>> {
        let ints = self.ints.borrow();
        match ints.get(i.id as usize) {
            Some(b) if i.off + i.len <= b.host.len() => Ok(b.host[i.off..i.off + i.len].to_vec()),
            _ => bail!("internal: int region {i:?} was not uploaded"),
        }
    }

    /// The host copy of the first `m` row indices of `rows`, each checked to be below `n`.
    fn rows_below(&self, rows: Ints, m: usize, n: usize) -> Result<Vec<i32>> {
        let host = self.host_ints(rows.prefix(m))?;
        if let Some(&bad) = host.iter().find(|&&r| r < 0 || r as usize >= n) {
            bail!("row {bad} outside the {n} rows");
        }
        Ok(host)
    }

    /// A device buffer of at least `n` floats for reduction partials.
    /// After an optimizer update: the bf16 copy of the weights (under --precision bf16) that the kernels and
    /// matrix products read follows the new fp32 master weights.
    fn refresh_bf16_copy(&self, params: Buf) -> Result<()> {
        let ([master], []) = self.ptrs([params], [])?;
        let ([shadow], []) = self.ptrs_as(Dt::Bf16, [params], [])?;
        if shadow != master {
            let n = params.len as i64;
            self.launch(self.k.cast_bf16, (grid_for(params.len), 1, 1), THREADS, &[&shadow, &master, &n])?;
        }
        Ok(())
    }

    fn partials(&self, n: usize) -> Result<u64> {
        self.partials.borrow_mut().at_least(self.dev.as_ref(), 4 * n)
    }

    /// Upload i32 data into the grow-only group buffer; its device pointer.
    fn upload_groups(&self, data: &[i32]) -> Result<u64> {
        let p = self.groups.borrow_mut().at_least(self.dev.as_ref(), 4 * data.len().max(1024))?;
        self.dev.htod(p, bytemuck::cast_slice(data))?;
        Ok(p)
    }

    fn need(what: &str, got: usize, want: usize) -> Result<()> {
        if got < want {
            bail!("internal: {what} holds {got} elements, {want} needed");
        }
        Ok(())
    }

    /// acc[c] += Σ_k partial[k·stride + c] for c < cols.
    fn sum_partials(&self, acc: u64, partial: u64, chunks: usize, cols: usize, stride: usize) -> Result<()> {
        let (chunks, cols, stride) = (chunks as i32, cols as i32, stride as i32);
        self.launch(
            self.k.sum_partials,
            (grid_for(cols as usize), 1, 1),
            THREADS,
            &[&acc, &partial, &chunks, &cols, &stride],
        )?;
        Ok(())
    }

    /// table[key] += Σ rows of dout in the key's group; groups built here from the host copy of `keys`.
    fn embedding_scatter(&self, dt: Dt, table: u64, dout: u64, keys_of_rows: &[i32], h: usize) -> Result<()> {
        let (keys, offsets, order) = row_groups(keys_of_rows);
        if keys.is_empty() {
            return Ok(());
        }
        let g = keys.len();
        let mut data = keys;
        data.extend(&offsets);
        data.extend(&order);
        let base = self.upload_groups(&data)?;
        let (kp, op, rp) = (base, base + 4 * g as u64, base + 4 * (2 * g + 1) as u64);
        let (gi, hi) = (g as i32, h as i32);
        self.launch(
            self.k.embeddings_bwd.of(dt),
            (g as u32, 1, 1),
            THREADS,
            &[&table, &dout, &kp, &op, &rp, &gi, &hi],
        )?;
        Ok(())
    }

    /// An elementwise kernel: its pointers, then n, then an optional scalar.
    fn elementwise<S: KernelArg>(&self, f: Kernel, ptrs: &[u64], n: usize, extra: Option<&S>) -> Result<()> {
        let n = n as i64;
        let mut args: Vec<&dyn KernelArg> = ptrs.iter().map(|p| p as &dyn KernelArg).collect();
        args.push(&n);
        if let Some(e) = extra {
            args.push(e);
        }
        self.launch(f, (grid_for(n as usize), 1, 1), THREADS, &args)
    }

    fn attention_kernels(&self, hs: usize) -> Result<&(usize, Typed, Typed, Typed)> {
        self.k.attention.iter().find(|a| a.0 == hs).ok_or_else(|| {
            Error::Invalid(format!(
                "head size {hs} is not supported by the CUDA attention kernels (16, 32, 64 or 128)"
            ))
        })
    }
}

impl Backend for Cuda {
    fn describe(&self) -> String {
        let storage = if self.act_dt.get() == Dt::Bf16 { "bf16 activations" } else { "fp32 storage" };
        format!("cuda ({}, {} matrix products, {storage})", self.name, self.gemm.get().1)
    }

    fn set_precision(&self, requested: &str) -> Result<&'static str> {
        let (major, _) = self.dev.compute_capability()?;
        let chosen = match requested {
            "auto" if major >= 8 => "bf16",
            "auto" | "fp32" => "fp32",
            "bf16" if major < 8 => {
                bail!("--precision bf16 needs compute capability 8.0 or newer; this GPU has {major}.x")
            }
            "bf16" => "bf16",
            "fp16" => "fp16",
            other => bail!("--precision {other}: choose fp32, bf16 or fp16"),
        };
        let compute = match chosen {
            "bf16" => Compute::Fast16Bf,
            "fp16" => Compute::Fast16F,
            _ => Compute::F32,
        };
        let act = if chosen == "bf16" { Dt::Bf16 } else { Dt::F32 };
        if act != self.act_dt.get() && !self.floats.borrow().is_empty() {
            bail!("internal: the activation storage type is chosen before any buffer is allocated");
        }
        self.gemm.set((compute, chosen));
        // bf16: activations stored in bf16 (half the bytes of every memory-bound kernel); parameters,
        // gradients, optimizer state and statistics stay fp32, with a bf16 copy of the parameters. Applies to
        // the buffers allocated from now on: set it before building the model.
        self.act_dt.set(act);
        Ok(chosen)
    }

    /// Wait for all queued work (within the sync timeout, when one is set).
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize(self.sync_timeout.get())
    }

    fn memory_used(&self) -> Option<u64> {
        self.dev.memory_used()
    }

    fn alloc(&self, len: usize) -> Result<Buf> {
        self.alloc_kind(len, Kind::Stat)
    }

    fn alloc_kind(&self, len: usize, kind: Kind) -> Result<Buf> {
        let act = self.act_dt.get();
        let dt = if kind == Kind::Activation { act } else { Dt::F32 };
        let mem = self.dev.alloc(dt.size() * len, true)?;
        let shadow =
            if kind == Kind::Param && act == Dt::Bf16 { Some(self.dev.alloc(2 * len, true)?) } else { None };
        let mut floats = self.floats.borrow_mut();
        floats.push(Floats { mem, len, dt, shadow });
        Ok(Buf { id: floats.len() as u32 - 1, off: 0, len })
    }

    fn alloc_ints(&self, len: usize) -> Result<Ints> {
        let mem = self.dev.alloc(4 * len, true)?;
        let mut ints = self.ints.borrow_mut();
        ints.push(IntsBuf { mem, len, host: vec![0; len] });
        Ok(Ints { id: ints.len() as u32 - 1, off: 0, len })
    }

    fn allocation_mark(&self) -> AllocationMark {
        AllocationMark { floats: self.floats.borrow().len(), ints: self.ints.borrow().len() }
    }

    fn release_since(&self, mark: AllocationMark) -> Result<()> {
        let (mut floats, mut ints) = (self.floats.borrow_mut(), self.ints.borrow_mut());
        if mark.floats > floats.len() || mark.ints > ints.len() {
            bail!("internal: release to a mark past the allocations");
        }
        // Kernels queued on the stream may still read them: wait, then drop (each Mem frees itself).
        self.dev.synchronize(self.sync_timeout.get())?;
        floats.truncate(mark.floats);
        ints.truncate(mark.ints);
        Ok(())
    }

    fn upload(&self, dst: Buf, src: &[f32]) -> Result<()> {
        if src.len() > dst.len {
            bail!("internal: uploading {} values into {}", src.len(), dst.len);
        }
        let (dt, shadow) = {
            let floats = self.floats.borrow();
            let f =
                floats.get(dst.id as usize).ok_or_else(|| Error::Invalid("internal: no buffer".into()))?;
            (f.dt, f.shadow.as_ref().map(|sh| sh.ptr + 2 * dst.off as u64))
        };
        let ([p], []) = self.ptrs([dst], [])?;
        let bf16 = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect::<Vec<u16>>();
        match dt {
            Dt::F32 => self.dev.htod(p, bytemuck::cast_slice(src))?,
            Dt::Bf16 => self.dev.htod(p, bytemuck::cast_slice(&bf16(src)))?,
        }
        if let Some(sp) = shadow {
            self.dev.htod(sp, bytemuck::cast_slice(&bf16(src)))?;
        }
        Ok(())
    }

    fn upload_f64(&self, dst: Buf, src: &[f64]) -> Result<()> {
        self.upload(dst, &src.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }

    fn download(&self, src: Buf) -> Result<Vec<f32>> {
        let dt = self.dt(src)?;
        let ([], [p]) = self.ptrs([], [src])?;
        match dt {
            Dt::F32 => {
                let mut out = vec![0f32; src.len];
                self.dev.dtoh(bytemuck::cast_slice_mut(&mut out), p)?;
                Ok(out)
            }
            Dt::Bf16 => {
                let mut raw = vec![0u16; src.len];
                self.dev.dtoh(bytemuck::cast_slice_mut(&mut raw), p)?;
                Ok(raw.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
        }
    }

    fn download_f64(&self, src: Buf) -> Result<Vec<f64>> {
        Ok(self.download(src)?.into_iter().map(|x| x as f64).collect())
    }

    fn upload_ints(&self, dst: Ints, src: &[i32]) -> Result<()> {
        if src.len() > dst.len {
            bail!("internal: uploading {} ints into {}", src.len(), dst.len);
        }
        let p = self.iptr(dst)?;
        self.dev.htod(p, bytemuck::cast_slice(src))?;
        let mut ints = self.ints.borrow_mut();
        ints[dst.id as usize].host[dst.off..dst.off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download_ints(&self, src: Ints) -> Result<Vec<i32>> {
        let p = self.iptr(src)?;
        let mut out = vec![0i32; src.len];
        self.dev.dtoh(bytemuck::cast_slice_mut(&mut out), p)?;
        Ok(out)
    }

    fn fill(&self, dst: Buf, value: f32) -> Result<()> {
        let dt = self.dt(dst)?;
        let ([p], []) = self.ptrs([dst], [])?;
        if value == 0.0 {
            return self.dev.memset_zero(p, dt.size() * dst.len);
        }
        self.elementwise(self.k.fill.of(dt), &[p], dst.len, Some(&value))
    }

    fn copy(&self, dst: Buf, src: Buf) -> Result<()> {
        if src.len > dst.len {
            bail!("internal: copying {} values into {}", src.len, dst.len);
        }
        let dt = self.dt(src)?;
        if self.dt(dst)? != dt {
            bail!("internal: copy between buffers of different storage types");
        }
        let ([d], [s]) = self.ptrs([dst], [src])?;
        self.dev.dtod(d, s, dt.size() * src.len)
    }

    fn matmul(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        m: usize,
        n: usize,
        k: usize,
        a_t: bool,
        b_t: bool,
        accumulate: bool,
    ) -> Result<()> {
        if c.len < m * n || a.len < m * k || b.len < k * n {
            bail!("internal: matmul regions too small for ({m}, {n}, {k})");
        }
        // Operands in bf16 when any activation involved is (parameters then come from their bf16 copy);
        // the output keeps its own storage (fp32 for parameter gradients).
        let (dc, da, db) = (self.dt(c)?, self.dt(a)?, self.dt(b)?);
        let op_dt = if [dc, da, db].contains(&Dt::Bf16) { Dt::Bf16 } else { Dt::F32 };
        let ([pc], [pa, pb]) = self.ptrs_as(op_dt, [c], [a, b])?;
        let pc = if dc == Dt::F32 { self.ptrs([c], [])?.0[0] } else { pc };
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            if !accumulate {
                self.dev.memset_zero(pc, dc.size() * m * n)?;
            }
            return Ok(());
        }
        // Row-major C (m, n) = op(A) op(B) is column-major Cᵀ (n, m) = op(B)ᵀ op(A)ᵀ: B first.
        let (ldb, lda) = (if b_t { k } else { n }, if a_t { m } else { k });
        let elem = |d: Dt| if d == Dt::Bf16 { Elem::Bf16 } else { Elem::F32 };
        let compute = if op_dt == Dt::Bf16 { Compute::F32 } else { self.gemm.get().0 };
        self.dev.gemm(&Gemm {
            trans_a: b_t,
            trans_b: a_t,
            m: n,
            n: m,
            k,
            alpha: 1.0,
            a: pb,
            a_type: elem(op_dt),
            lda: ldb.max(1),
            b: pa,
            b_type: elem(op_dt),
            ldb: lda.max(1),
            beta: if accumulate { 1.0 } else { 0.0 },
            c: pc,
            c_type: elem(dc),
            ldc: n,
            compute,
        })
    }

    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize) -> Result<()> {
        let dt = self.dt(out)?;
        Self::need("add_bias out", out.len, rows * cols)?;
        Self::need("add_bias bias", bias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let ([po], [pb]) = self.ptrs_as(dt, [out], [bias])?;
        let (r, c) = (rows as i64, cols as i32);
        self.launch(self.k.bias_add.of(dt), (grid_for(rows * cols), 1, 1), THREADS, &[&po, &pb, &r, &c])?;
        Ok(())
    }

    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize) -> Result<()> {
        self.need_f32_out("bias gradient", &[dbias])?;
        let dt = self.dt(dout)?;
        Self::need("bias_grad dout", dout.len, rows * cols)?;
        Self::need("bias_grad dbias", dbias.len, cols)?;
        if cols == 0 {
            return Ok(());
        }
        let ([pd], [pg]) = self.ptrs_as(dt, [dbias], [dout])?;
        let chunks = rows.div_ceil(PARTIAL_ROWS as usize).max(1);
        let part = self.partials(chunks * cols)?;
        let (r, c) = (rows as i64, cols as i32);
        self.launch(
            self.k.bias_grad_partial.of(dt),
            (chunks as u32, cols.div_ceil(THREADS as usize) as u32, 1),
            THREADS,
            &[&part, &pg, &r, &c],
        )?;
        self.sum_partials(pd, part, chunks, cols, cols)
    }

    fn add(&self, out: Buf, a: Buf, b: Buf) -> Result<()> {
        let dt = self.dt(out)?;
        Self::need("add", a.len.min(b.len), out.len)?;
        let ([po], [pa, pb]) = self.ptrs_as(dt, [out], [a, b])?;
        self.elementwise(self.k.add.of(dt), &[po, pa, pb], out.len, None::<&i32>)
    }

    fn sum(&self, out: Buf, inp: Buf) -> Result<()> {
        self.need_f32("sum output", &[out])?;
        let dt = self.dt(inp)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        self.dev.memset_zero(po, 4)?;
        // Σ as the bias gradient of a one-column matrix: blocks of 64 rows, then the blocks in order.
        let chunks = inp.len.div_ceil(PARTIAL_ROWS as usize).max(1);
        let part = self.partials(chunks)?;
        let (r, c) = (inp.len as i64, 1i32);
        self.launch(self.k.bias_grad_partial.of(dt), (chunks as u32, 1, 1), THREADS, &[&part, &pi, &r, &c])?;
        self.sum_partials(po, part, chunks, 1, 1)
    }

    fn embeddings_fwd(
        &self,
        out: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        batch: usize,
        seq: usize,
        h: usize,
    ) -> Result<()> {
        let dt = self.dt(out)?;
        Self::need("embeddings out", out.len, batch * seq * h)?;
        if batch * seq == 0 {
            return Ok(());
        }
        let n = batch * seq;
        if position.len / h < seq {
            bail!("sequence length {seq} exceeds max_position_embeddings {}", position.len / h);
        }
        let (idh, tyh) = (self.host_ints(ids.prefix(n))?, self.host_ints(types.prefix(n))?);
        let nv = (word.len / h) as i32;
        if let Some(bad) = idh.iter().find(|&&i| i < 0 || i >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        let nt = (token_type.len / h) as i32;
        if let Some(bad) = tyh.iter().find(|&&i| i < 0 || i >= nt) {
            bail!("token type {bad} is outside type_vocab_size {nt}");
        }
        let ([po], [pw, pp, pt]) = self.ptrs_as(dt, [out], [word, position, token_type])?;
        let (pi, pty) = (self.iptr(ids)?, self.iptr(types)?);
        let (rows, s, hh) = (n as i32, seq as i32, h as i32);
        self.launch(
            self.k.embeddings_fwd.of(dt),
            (n as u32, 1, 1),
            THREADS,
            &[&po, &pi, &pty, &pw, &pp, &pt, &rows, &s, &hh],
        )?;
        Ok(())
    }

    fn embeddings_bwd(
        &self,
        dword: Buf,
        dposition: Buf,
        dtoken_type: Buf,
        dout: Buf,
        ids: Ints,
        types: Ints,
        batch: usize,
        seq: usize,
        h: usize,
    ) -> Result<()> {
        self.need_f32_out("embedding gradients", &[dword, dposition, dtoken_type])?;
        let dt = self.dt(dout)?;
        let n = batch * seq;
        let ([pw, pp, pt], [pg]) = self.ptrs_as(dt, [dword, dposition, dtoken_type], [dout])?;
        let positions: Vec<i32> = (0..n).map(|r| (r % seq) as i32).collect();
        self.embedding_scatter(dt, pw, pg, &self.host_ints(ids.prefix(n))?, h)?;
        self.embedding_scatter(dt, pp, pg, &positions, h)?;
        self.embedding_scatter(dt, pt, pg, &self.host_ints(types.prefix(n))?, h)
    }

    fn layernorm_fwd(
        &self,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        inp: Buf,
        w: Buf,
        b: Buf,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.need_f32_out("layernorm statistics", &[mean, rstd])?;
        let dt = self.dt_all("layernorm", &[out, inp])?;
        Self::need("layernorm out", out.len.min(inp.len), rows * c)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), rows)?;
        Self::need("layernorm weights", w.len.min(b.len), c)?;
        if rows == 0 {
            return Ok(());
        }
        let ([po, pm, pr], [pi, pw, pb]) = self.ptrs_as(dt, [out, mean, rstd], [inp, w, b])?;
        let (r, cc) = (rows as i32, c as i32);
        self.launch(
            self.k.layernorm_fwd.of(dt),
            (rows.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&po, &pm, &pr, &pi, &pw, &pb, &r, &cc, &eps],
        )?;
        Ok(())
    }

    fn layernorm_bwd(
        &self,
        dinp: Buf,
        dw: Buf,
        db: Buf,
        dout: Buf,
        inp: Buf,
        mean: Buf,
        rstd: Buf,
        w: Buf,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        self.need_f32_out("layernorm statistics and gradients", &[mean, rstd, dw, db])?;
        let dt = self.dt_all("layernorm backward", &[dinp, dout, inp])?;
        Self::need("layernorm dinp", dinp.len.min(dout.len).min(inp.len), rows * c)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), rows)?;
        Self::need("layernorm weights", w.len.min(dw.len).min(db.len), c)?;
        if rows == 0 {
            return Ok(());
        }
        let ([pdi, pdw, pdb], [pg, pi, pm, pr, pw]) =
            self.ptrs_as(dt, [dinp, dw, db], [dout, inp, mean, rstd, w])?;
        let (r, cc) = (rows as i32, c as i32);
        self.launch(
            self.k.layernorm_bwd.of(dt),
            (rows.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&pdi, &pg, &pi, &pm, &pr, &pw, &r, &cc],
        )?;
        self.layernorm_param_grads(dt, pdw, pdb, [pg, pi, pm, pr], rows, c)
    }

    fn residual_layernorm_fwd(
        &self,
        sum: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        residual: Buf,
        branch: Buf,
        w: Buf,
        b: Buf,
        rows: usize,
        c: usize,
        eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        let dt = self.dt_all("residual layernorm", &[sum, out, residual, branch])?;
        self.need_f32_out("layernorm statistics", &[mean, rstd])?;
        Self::need("residual layernorm", sum.len.min(out.len).min(residual.len).min(branch.len), rows * c)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), rows)?;
        Self::need("layernorm weights", w.len.min(b.len), c)?;
        if rows == 0 {
            return Ok(());
        }
        let ([ps, po, pm, pr], [pres, pb, pw, pbias]) =
            self.ptrs_as(dt, [sum, out, mean, rstd], [residual, branch, w, b])?;
        let (r, cc, d) = (rows as i32, c as i32, DropoutArgs::of(dropout));
        self.launch(
            self.k.residual_layernorm.of(dt),
            (rows.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&ps, &po, &pm, &pr, &pres, &pb, &pw, &pbias, &r, &cc, &eps, &d],
        )?;
        Ok(())
    }

    fn residual_layernorm_bwd(
        &self,
        dsum: Buf,
        dw: Buf,
        db: Buf,
        grad: Buf,
        sum: Buf,
        mean: Buf,
        rstd: Buf,
        w: Buf,
        rows: usize,
        c: usize,
        dropout: Dropout,
    ) -> Result<()> {
        let dt = self.dt_all("residual layernorm backward", &[dsum, grad, sum])?;
        self.need_f32_out("layernorm statistics and gradients", &[mean, rstd, dw, db])?;
        Self::need("residual layernorm backward", dsum.len.min(grad.len).min(sum.len), rows * c)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), rows)?;
        Self::need("layernorm weights", w.len.min(dw.len).min(db.len), c)?;
        if rows == 0 {
            return Ok(());
        }
        // `grad` is read by the weight-gradient reduction first, then read and overwritten in place by
        // the fused kernel: it is both an input and an output, so it is not in the overlap check's outputs.
        let ([pds, pdw, pdb], [pg, ps, pm, pr, pw]) =
            self.ptrs_as(dt, [dsum, dw, db], [grad, sum, mean, rstd, w])?;
        self.layernorm_param_grads(dt, pdw, pdb, [pg, ps, pm, pr], rows, c)?;
        let (r, cc) = (rows as i32, c as i32);
        let d = DropoutArgs::of(Some(dropout));
        self.launch(
            self.k.residual_layernorm_bwd.of(dt),
            (rows.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&pds, &pg, &ps, &pm, &pr, &pw, &r, &cc, &d],
        )?;
        Ok(())
    }

    fn bias_gelu_fwd(
        &self,
        pre: Buf,
        out: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        let dt = self.dt_all("bias gelu", &[pre, out])?;
        Self::need("bias gelu", pre.len.min(out.len), rows * cols)?;
        Self::need("bias gelu bias", bias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let ([pp, po], [pb]) = self.ptrs_as(dt, [pre, out], [bias])?;
        let (r, c, approx) = (rows as i64, cols as i32, (act == Activation::GeluTanh) as i32);
        self.launch(
            self.k.bias_gelu.of(dt),
            (grid_for(rows * cols), 1, 1),
            THREADS,
            &[&pp, &po, &pb, &r, &c, &approx],
        )?;
        Ok(())
    }

    fn gelu_bias_bwd(
        &self,
        dpre: Buf,
        dbias: Buf,
        dout: Buf,
        pre: Buf,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        self.need_f32_out("bias gradient", &[dbias])?;
        let dt = self.dt_all("gelu bias backward", &[dpre, dout, pre])?;
        Self::need("gelu bias backward", dpre.len.min(dout.len).min(pre.len), rows * cols)?;
        Self::need("gelu bias backward dbias", dbias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let n = rows * cols;
        let ([pd, pb], [pg, pp]) =
            self.ptrs_as(dt, [dpre.prefix(n), dbias], [dout.prefix(n), pre.prefix(n)])?;
        let chunks = rows.div_ceil(PARTIAL_ROWS as usize);
        let part = self.partials(chunks * cols)?;
        let (r, c, approx) = (rows as i64, cols as i32, (act == Activation::GeluTanh) as i32);
        self.launch(
            self.k.gelu_bias_bwd.of(dt),
            (chunks as u32, cols.div_ceil(THREADS as usize) as u32, 1),
            THREADS,
            &[&pd, &part, &pg, &pp, &r, &c, &approx],
        )?;
        self.sum_partials(pb, part, chunks, cols, cols)
    }

    fn embeddings_layernorm_fwd(
        &self,
        emb: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        w: Buf,
        b: Buf,
        batch: usize,
        seq: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let dt = self.dt_all("embeddings layernorm", &[emb, out])?;
        let n = batch * seq;
        self.need_f32_out("layernorm statistics", &[mean, rstd])?;
        Self::need("embeddings out", emb.len.min(out.len), n * h)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), n)?;
        if n == 0 {
            return Ok(());
        }
        if position.len / h < seq {
            bail!("sequence length {seq} exceeds max_position_embeddings {}", position.len / h);
        }
        let nv = (word.len / h) as i32;
        if let Some(bad) = self.host_ints(ids.prefix(n))?.iter().find(|&&i| i < 0 || i >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        let nt = (token_type.len / h) as i32;
        if let Some(bad) = self.host_ints(types.prefix(n))?.iter().find(|&&i| i < 0 || i >= nt) {
            bail!("token type {bad} is outside type_vocab_size {nt}");
        }
        let ([pe, po, pm, pr], [pw, pp, pt, plw, plb]) =
            self.ptrs_as(dt, [emb, out, mean, rstd], [word, position, token_type, w, b])?;
        let (pi, pty) = (self.iptr(ids)?, self.iptr(types)?);
        let (rows, s, hh) = (n as i32, seq as i32, h as i32);
        self.launch(
            self.k.embeddings_layernorm.of(dt),
            (n.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&pe, &po, &pm, &pr, &pi, &pty, &pw, &pp, &pt, &plw, &plb, &rows, &s, &hh, &eps],
        )?;
        Ok(())
    }

    fn gelu_fwd(&self, out: Buf, inp: Buf, act: Activation) -> Result<()> {
        let dt = self.dt_all("gelu", &[out, inp])?;
        Self::need("elementwise input", inp.len, out.len)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        let approx = (act == Activation::GeluTanh) as i32;
        self.elementwise(self.k.gelu_fwd.of(dt), &[po, pi], out.len, Some(&approx))
    }

    fn gelu_bwd(&self, dinp: Buf, dout: Buf, inp: Buf, act: Activation) -> Result<()> {
        let dt = self.dt_all("gelu backward", &[dinp, dout, inp])?;
        Self::need("elementwise input", dout.len.min(inp.len), dinp.len)?;
        let ([pd], [pg, pi]) = self.ptrs_as(dt, [dinp], [dout, inp])?;
        let approx = (act == Activation::GeluTanh) as i32;
        self.elementwise(self.k.gelu_bwd.of(dt), &[pd, pg, pi], dinp.len, Some(&approx))
    }

    fn tanh_fwd(&self, out: Buf, inp: Buf) -> Result<()> {
        let dt = self.dt_all("tanh", &[out, inp])?;
        Self::need("elementwise input", inp.len, out.len)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        self.elementwise(self.k.tanh_fwd.of(dt), &[po, pi], out.len, None::<&i32>)
    }

    fn tanh_bwd(&self, dinp: Buf, dout: Buf, out: Buf) -> Result<()> {
        let dt = self.dt_all("tanh backward", &[dinp, dout, out])?;
        Self::need("elementwise input", dout.len.min(out.len), dinp.len)?;
        let ([pd], [pg, po]) = self.ptrs_as(dt, [dinp], [dout, out])?;
        self.elementwise(self.k.tanh_bwd.of(dt), &[pd, pg, po], dinp.len, None::<&i32>)
    }

    fn dropout_fwd(&self, out: Buf, inp: Buf, d: Dropout) -> Result<()> {
        let dt = self.dt_all("dropout", &[out, inp])?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        let args = DropoutArgs::of(Some(d));
        self.elementwise(self.k.dropout.of(dt), &[po, pi], out.len.min(inp.len), Some(&args))
    }

    fn dropout_bwd(&self, dinp: Buf, dout: Buf, d: Dropout) -> Result<()> {
        self.dropout_fwd(dinp, dout, d)
    }

    fn attention_state_len(&self, batch: usize, seq: usize, heads: usize) -> usize {
        // log-sum-exp per (batch, head, query), and the backward's row terms D per (batch, query, head)
        2 * batch * heads * seq
    }

    fn attention_fwd(
        &self,
        out: Buf,
        state: Buf,
        qkv: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        hs: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        self.need_f32("attention state", &[state])?;
        let dt = self.dt(qkv)?;
        let (rows, hid) = (batch * seq, heads * hs);
        Self::need("attention state", state.len, self.attention_state_len(batch, seq, heads))?;
        Self::need("attention out", out.len, rows * hid)?;
        Self::need("attention qkv", qkv.len, rows * 3 * hid)?;
        Self::need("attention mask", mask.len, rows)?;
        if rows * heads == 0 {
            return Ok(());
        }
        let f = self.attention_kernels(hs)?.1.of(dt);
        let ([po, pl], [pq]) = self.ptrs_as(dt, [out, state.prefix(batch * heads * seq)], [qkv])?;
        let pm = self.iptr(mask)?;
        let (t, nh, scale, d) =
            (seq as i32, heads as i32, (1.0 / (hs as f64).sqrt()) as f32, DropoutArgs::of(dropout));
        self.launch(
            f,
            ((batch * heads) as u32, seq.div_ceil(ATTENTION_ROWS as usize) as u32, 1),
            ATTENTION_ROWS,
            &[&po, &pl, &pq, &pm, &t, &nh, &scale, &d],
        )?;
        Ok(())
    }

    fn attention_bwd(
        &self,
        dqkv: Buf,
        dout: Buf,
        out: Buf,
        qkv: Buf,
        state: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        hs: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        self.need_f32("attention state", &[state])?;
        let dt = self.dt(qkv)?;
        let rows = batch * seq;
        Self::need("attention state", state.len, self.attention_state_len(batch, seq, heads))?;
        Self::need("attention dqkv", dqkv.len.min(qkv.len), rows * 3 * heads * hs)?;
        Self::need("attention dout", dout.len.min(out.len), rows * heads * hs)?;
        Self::need("attention mask", mask.len, rows)?;
        if rows * heads == 0 {
            return Ok(());
        }
        let kernels = self.attention_kernels(hs)?;
        let (fkv, fq) = (kernels.2.of(dt), kernels.3.of(dt));
        let half = batch * heads * seq;
        let (lse, dd) = (state.prefix(half), state.at(half, half));
        let ([pdd], [pg, po]) = self.ptrs_as(dt, [dd], [dout, out])?;
        let (rows, nh, hsi) = ((batch * seq) as i32, heads as i32, hs as i32);
        self.launch(
            self.k.attention_bwd_d.of(dt),
            (grid_for(half), 1, 1),
            THREADS,
            &[&pdd, &pg, &po, &rows, &nh, &hsi],
        )?;
        let ([pdq], [pg, pq, pl, pd]) = self.ptrs_as(dt, [dqkv], [dout, qkv, lse, dd])?;
        let pm = self.iptr(mask)?;
        let (t, scale, d) = (seq as i32, (1.0 / (hs as f64).sqrt()) as f32, DropoutArgs::of(dropout));
        let grid = ((batch * heads) as u32, seq.div_ceil(ATTENTION_ROWS as usize) as u32, 1);
        for f in [fkv, fq] {
            self.launch(f, grid, ATTENTION_ROWS, &[&pdq, &pg, &pq, &pl, &pd, &pm, &t, &nh, &scale, &d])?;
        }
        Ok(())
    }

    fn all_reduce_sum(&self, buf: Buf, comm: &dyn crate::dist::Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        if self.dt(buf)? != Dt::F32 {
            bail!("internal: gradients are summed in fp32");
        }
        let ([p], []) = self.ptrs([buf], [])?;
        self.dev.all_reduce_sum(p, buf.len, comm)
    }

    fn all_reduce_wait(&self) -> Result<()> {
        self.dev.all_reduce_wait()
    }

    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()> {
        self.need_f32("sum of squares output", &[out])?;
        let dt = self.dt(x)?;
        let ([po], [px]) = self.ptrs_as(dt, [out], [x])?;
        let blocks = x.len.div_ceil(1 << 14).clamp(1, 1024);
        let chunk = x.len.div_ceil(blocks) as i64;
        let part = self.partials(blocks)?;
        let n = x.len as i64;
        self.launch(
            self.k.sum_squares_partial.of(dt),
            (blocks as u32, 1, 1),
            THREADS,
            &[&part, &px, &n, &chunk],
        )?;
        let k = blocks as i32;
        self.launch(self.k.sum_squares_final, (1, 1, 1), 32, &[&po, &part, &k])?;
        Ok(())
    }

    fn scale(&self, x: Buf, factor: f32) -> Result<()> {
        let dt = self.dt(x)?;
        let ([px], []) = self.ptrs_as(dt, [x], [])?;
        self.elementwise(self.k.scale.of(dt), &[px], x.len, Some(&factor))
    }

    fn adamw(&self, params: Buf, grads: Buf, m: Buf, v: Buf, decay: Ints, h: &AdamWStep) -> Result<()> {
        self.need_f32("AdamW buffers", &[params, grads, m, v])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n || decay.len != n {
            bail!("internal: adamw buffers of different lengths");
        }
        let ([pp, pm, pv], [pg]) = self.ptrs([params, m, v], [grads])?;
        let pd = self.iptr(decay)?;
        let (lr, b1, b2, wd) = (h.lr as f64, h.beta1 as f64, h.beta2 as f64, h.weight_decay as f64);
        let args = AdamWArgs {
            decay_factor: (1.0 - lr * wd) as f32,
            step_size: (lr / (1.0 - b1.powi(h.step as i32))) as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bias_correction2_sqrt: (1.0 - b2.powi(h.step as i32)).sqrt() as f32,
            eps: h.eps,
        };
        let nn = n as i64;
        self.launch(self.k.adamw, (grid_for(n), 1, 1), THREADS, &[&pp, &pg, &pm, &pv, &pd, &nn, &args])?;
        self.refresh_bf16_copy(params)
    }

    fn lamb(&self, params: Buf, grads: Buf, m: Buf, v: Buf, layout: &LambLayout, h: &LambStep) -> Result<()> {
        self.need_f32("LAMB buffers", &[params, grads, m, v, layout.partials, layout.norms])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n {
            bail!("internal: lamb buffers of different lengths");
        }
        let ([pp, pm, pv, ppart, pnorm], [pg]) =
            self.ptrs([params, m, v, layout.partials, layout.norms], [grads])?;
        let pt = self.iptr(layout.table)?;
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let args = LambArgs {
            beta1: h.beta1,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: h.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            bias_correction1: (1.0 - b1.powi(h.step as i32)) as f32,
            bias_correction2: (1.0 - b2.powi(h.step as i32)) as f32,
            eps: h.eps,
            weight_decay: h.weight_decay,
            grad_divisor: h.grad_divisor,
            lr: h.lr,
            all_tensors: h.all_tensors as i32,
        };
        let chunks = layout.chunks as u32;
        self.launch(self.k.lamb_moments, (chunks, 1, 1), THREADS, &[&pp, &pg, &pm, &pv, &pt, &ppart, &args])?;
        let (c, t) = (layout.chunks as i32, layout.tensors as i32);
        let blocks = layout.tensors.div_ceil(THREADS as usize) as u32;
        self.launch(self.k.lamb_norms, (blocks, 1, 1), THREADS, &[&pt, &c, &t, &ppart, &pnorm])?;
        self.launch(self.k.lamb_apply, (chunks, 1, 1), THREADS, &[&pp, &pm, &pv, &pt, &pnorm, &args])?;
        self.refresh_bf16_copy(params)
    }

    fn gather_rows(&self, out: Buf, inp: Buf, rows: Ints, m: usize, c: usize) -> Result<()> {
        let dt = self.dt(out)?;
        Self::need("gather out", out.len, m * c)?;
        self.rows_below(rows, m, inp.len / c.max(1))?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        let pr = self.iptr(rows)?;
        let (mm, cc) = (m as i32, c as i32);
        if m == 0 {
            return Ok(());
        }
        self.launch(self.k.gather_rows.of(dt), (m as u32, 1, 1), THREADS, &[&po, &pi, &pr, &mm, &cc])?;
        Ok(())
    }

    fn scatter_add_rows(&self, dinp: Buf, dout: Buf, rows: Ints, m: usize, c: usize) -> Result<()> {
        let dt = self.dt(dinp)?;
        Self::need("scatter dout", dout.len, m * c)?;
        let mut host = self.rows_below(rows, m, dinp.len / c.max(1))?;
        host.sort_unstable();
        if host.windows(2).any(|w| w[0] == w[1]) {
            bail!("internal: scatter_add_rows needs distinct rows on the CUDA backend");
        }
        let ([pd], [pg]) = self.ptrs_as(dt, [dinp], [dout])?;
        let pr = self.iptr(rows)?;
        let (mm, cc) = (m as i32, c as i32);
        if m == 0 {
            return Ok(());
        }
        self.launch(self.k.scatter_rows.of(dt), (m as u32, 1, 1), THREADS, &[&pd, &pg, &pr, &mm, &cc])?;
        Ok(())
    }

    fn cross_entropy(
        &self,
        losses: Buf,
        logits: Buf,
        labels: Ints,
        m: usize,
        v: usize,
        grad_scale: Option<f64>,
    ) -> Result<()> {
        self.need_f32("losses", &[losses])?;
        let dt = self.dt(logits)?;
        Self::need("cross_entropy logits", logits.len, m * v)?;
        Self::need("cross_entropy losses", losses.len, m)?;
        let host = self.host_ints(labels.prefix(m))?;
        if let Some(&bad) = host.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v)) {
            bail!("label {bad} is outside the {v} classes (and not {IGNORE_INDEX})");
        }
        if m == 0 {
            return Ok(());
        }
        let ([pl, pz], []) = self.ptrs_as(dt, [losses, logits], [])?;
        let pb = self.iptr(labels)?;
        let (mm, vv, grad, scale) =
            (m as i32, v as i32, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0) as f32);
        self.launch(
            self.k.cross_entropy.of(dt),
            (m as u32, 1, 1),
            THREADS,
            &[&pl, &pz, &pb, &mm, &vv, &grad, &scale],
        )?;
        Ok(())
    }

    fn argmax_rows(&self, out: Ints, logits: Buf, m: usize, v: usize) -> Result<()> {
        let dt = self.dt(logits)?;
        Self::need("argmax logits", logits.len, m * v)?;
        Self::need("argmax out", out.len, m)?;
        // The device values change; the host copy (for row checks) no longer knows them: mark it invalid.
        self.ints.borrow_mut()[out.id as usize].host[out.off..out.off + m].fill(-1);
        let ([], [pz]) = self.ptrs_as(dt, [], [logits])?;
        let po = self.iptr(out)?;
        let (mm, vv) = (m as i32, v as i32);
        if m == 0 {
            return Ok(());
        }
        self.launch(self.k.argmax.of(dt), (m as u32, 1, 1), THREADS, &[&po, &pz, &mm, &vv])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_list_each_keys_rows_in_row_order() {
        let (keys, offsets, rows) = row_groups(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(keys, [0, 1, 3]);
        assert_eq!(offsets, [0, 1, 3, 6]);
        assert_eq!(rows, [3, 1, 4, 0, 2, 5]);
        let (k, o, r) = row_groups(&[]);
        assert!(k.is_empty() && o == [0] && r.is_empty());
    }

    #[test]
    fn the_cuda_backend_opens_when_the_probe_says_so_and_otherwise_says_why() {
        match probe() {
            Err(why) => {
                let e = Cuda::new(0).err().expect("no usable GPU").to_string();
                assert_eq!(e, format!("--device cuda: {why}"));
            }
            Ok(()) => {
                Cuda::new(0).expect("the probe found a usable GPU");
            }
        }
    }

    #[test]
    fn the_kernel_structs_match_their_c_layouts() {
        assert_eq!(std::mem::size_of::<DropoutArgs>(), 20);
        assert_eq!(std::mem::size_of::<AdamWArgs>(), 28);
    }
}
