//! The CUDA backend: the hand-written kernels of `kernels/` and cuBLAS's matrix products, on a device
//! (`device::Device`): a real GPU through the driver, or the emulated device that runs the same kernel
//! sources on the CPU (`--device emu`, checked in CI). Everything the backend does to a device goes through
//! that trait, so every launch — argument lists, grids, offsets — is the same code on both.
//!
//! This file holds the backend itself: its buffers and memory (`impl Memory for Cuda`), the kernel table
//! loaded at start-up, and the helpers every launcher shares (pointer and overlap checks, launches,
//! scratch, the reductions' second stage). The launchers of each op family are in `src/ops/<family>.rs`,
//! next to the family's CPU reference; its kernels are in `kernels/<family>.cu`.
//!
//! Memory: each `alloc` is one device allocation; ops take raw device pointers (base + offset), like
//! llm.c, and the same output/input overlap checks as the CPU backend. All work is queued in order; the
//! host waits only when it reads something back. `--precision fp32` computes in fp32 (cuBLAS without
//! TF32): it is held to the CPU reference. `bf16` stores activations in bf16 (see `set_precision`).

use std::cell::{Cell, RefCell};

use super::device::driver::Driver;
pub use super::device::driver::{kernels_built, probe, NcclComm};
use super::device::emu::{Emu, EmuOptions};
use super::device::{Compute, Counted, Device, Kernel, KernelArg, Launch, Mem, Traffic};

use crate::backend::{philox, AllocationMark, Buf, Dropout, Ints, Kind, Memory};
use crate::bail;
use crate::error::{Error, Result};

/// Dropout arguments of the kernels (common.cuh's DropoutArgs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DropoutArgs {
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
    pub(crate) fn of(d: Option<Dropout>) -> Self {
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

/// The storage type of a float buffer on the device (values cross the `Backend` trait as f32 either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageType {
    F32,
    Bf16,
}

impl StorageType {
    pub(crate) fn size(self) -> usize {
        match self {
            StorageType::F32 => 4,
            StorageType::Bf16 => 2,
        }
    }
}

/// One kernel per storage type of the activations: the instantiations of one kernel template.
pub(crate) struct KernelPerStorage {
    f32: Kernel,
    bf16: Kernel,
}

impl KernelPerStorage {
    pub(crate) fn of(&self, dt: StorageType) -> Kernel {
        match dt {
            StorageType::F32 => self.f32,
            StorageType::Bf16 => self.bf16,
        }
    }
}

/// Every kernel, loaded once; a missing one fails at start-up, named.
pub(crate) struct Kernels {
    pub(crate) add: KernelPerStorage,
    pub(crate) add_bias: KernelPerStorage,
    pub(crate) bias_grad_partial: KernelPerStorage,
    pub(crate) sum_partials: Kernel,
    pub(crate) fill: KernelPerStorage,
    pub(crate) gelu_fwd: KernelPerStorage,
    pub(crate) gelu_bwd: KernelPerStorage,
    pub(crate) tanh_fwd: KernelPerStorage,
    pub(crate) tanh_bwd: KernelPerStorage,
    pub(crate) dropout: KernelPerStorage,
    pub(crate) layernorm_fwd: KernelPerStorage,
    pub(crate) layernorm_bwd: KernelPerStorage,
    pub(crate) layernorm_param_partial: KernelPerStorage,
    pub(crate) embeddings_fwd: KernelPerStorage,
    pub(crate) embedding_sort_init: Kernel,
    pub(crate) embedding_sort_stage: Kernel,
    pub(crate) embedding_key_runs: KernelPerStorage,
    pub(crate) embedding_position_bwd: KernelPerStorage,
    pub(crate) embedding_type_partial: KernelPerStorage,
    pub(crate) gather_rows: KernelPerStorage,
    pub(crate) scatter_add_rows: KernelPerStorage,
    pub(crate) cross_entropy: KernelPerStorage,
    pub(crate) argmax_rows: KernelPerStorage,
    pub(crate) sum_squares_partial: KernelPerStorage,
    pub(crate) sum_squares_final: Kernel,
    pub(crate) step_control: Kernel,
    pub(crate) adamw: Kernel,
    pub(crate) lamb_moments: Kernel,
    pub(crate) lamb_norms: Kernel,
    pub(crate) lamb_apply: Kernel,
    pub(crate) attention_bwd_d: KernelPerStorage,
    pub(crate) residual_layernorm: KernelPerStorage,
    pub(crate) residual_layernorm_bwd: KernelPerStorage,
    pub(crate) bias_gelu: KernelPerStorage,
    pub(crate) gelu_bias_bwd: KernelPerStorage,
    pub(crate) embeddings_layernorm: KernelPerStorage,
    /// Per head size.
    pub(crate) attention: Vec<AttentionKernels>,
}

/// The attention kernels of one head size.
pub(crate) struct AttentionKernels {
    pub hs: usize,
    pub fwd: KernelPerStorage,
    pub bwd_dkdv: KernelPerStorage,
    pub bwd_dq: KernelPerStorage,
    /// The bf16 forward on tensor cores (head sizes 32, 64 and 128).
    pub fwd_tensor_core: Option<Kernel>,
    /// The bf16 backward on tensor cores, dk/dv and dq (head sizes 32 and 64).
    pub bwd_tensor_core: Option<(Kernel, Kernel)>,
}

impl Kernels {
    fn load(dev: &dyn Device) -> Result<Self> {
        let f = |name: &str| dev.kernel(name);
        let t = |base: &str| -> Result<KernelPerStorage> {
            Ok(KernelPerStorage { f32: f(&format!("{base}_f32"))?, bf16: f(&format!("{base}_bf16"))? })
        };
        let mut attention = Vec::new();
        for hs in [16usize, 32, 64, 128] {
            let typed = |op: &str| -> Result<KernelPerStorage> {
                Ok(KernelPerStorage {
                    f32: f(&format!("{op}_f32_hs{hs}"))?,
                    bf16: f(&format!("{op}_bf16_hs{hs}"))?,
                })
            };
            attention.push(AttentionKernels {
                hs,
                fwd: typed("attention_fwd")?,
                bwd_dkdv: typed("attention_bwd_dkdv")?,
                bwd_dq: typed("attention_bwd_dq")?,
                fwd_tensor_core: (hs >= 32)
                    .then(|| f(&format!("attention_fwd_tc_bf16_hs{hs}")))
                    .transpose()?,
                bwd_tensor_core: (hs == 32 || hs == 64)
                    .then(|| -> Result<(Kernel, Kernel)> {
                        Ok((
                            f(&format!("attention_bwd_dkdv_tc_bf16_hs{hs}"))?,
                            f(&format!("attention_bwd_dq_tc_bf16_hs{hs}"))?,
                        ))
                    })
                    .transpose()?,
            });
        }
        Ok(Kernels {
            add: t("add")?,
            add_bias: t("add_bias")?,
            bias_grad_partial: t("bias_grad_partial")?,
            sum_partials: f("sum_partials_f32")?,
            fill: t("fill")?,
            gelu_fwd: t("gelu_fwd")?,
            gelu_bwd: t("gelu_bwd")?,
            tanh_fwd: t("tanh_fwd")?,
            tanh_bwd: t("tanh_bwd")?,
            dropout: t("dropout")?,
            layernorm_fwd: t("layernorm_fwd")?,
            layernorm_bwd: t("layernorm_bwd")?,
            layernorm_param_partial: t("layernorm_param_partial_bwd")?,
            embeddings_fwd: t("embeddings_fwd")?,
            embedding_sort_init: f("embedding_sort_init")?,
            embedding_sort_stage: f("embedding_sort_stage")?,
            embedding_key_runs: t("embedding_key_runs")?,
            embedding_position_bwd: t("embedding_position_bwd")?,
            embedding_type_partial: t("embedding_type_partial")?,
            gather_rows: t("gather_rows")?,
            scatter_add_rows: t("scatter_add_rows")?,
            cross_entropy: t("cross_entropy")?,
            argmax_rows: t("argmax_rows")?,
            sum_squares_partial: t("sum_squares_partial")?,
            sum_squares_final: f("sum_squares_final_f32")?,
            step_control: f("step_control_f32")?,
            adamw: f("adamw_f32")?,
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
/// products and kernels read (written on upload and by the optimizer's last pass).
pub(crate) struct Floats {
    mem: Mem,
    len: usize,
    dt: StorageType,
    shadow: Option<Mem>,
}

pub(crate) struct IntsBuf {
    mem: Mem,
    len: usize,
    /// What was last uploaded: the host checks token ids and row lists against it.
    pub(crate) host: Vec<i32>,
}

/// A grow-only device buffer for reduction partials and the embedding gradient's sort: allocated on first
/// use, then reused, so steady-state steps allocate nothing.
#[derive(Default)]
pub(crate) struct Scratch(Option<Mem>);

impl Scratch {
    /// Its device pointer, grown (never shrunk) to at least `bytes`.
    pub(crate) fn at_least(&mut self, dev: &dyn Device, bytes: usize) -> Result<u64> {
        if self.0.as_ref().is_none_or(|m| m.bytes < bytes) {
            self.0 = Some(dev.alloc(bytes, false)?);
        }
        Ok(self.0.as_ref().expect("allocated").ptr)
    }
}

pub struct Cuda {
    pub(crate) dev: Counted,
    pub(crate) k: Kernels,
    pub(crate) floats: RefCell<Vec<Floats>>,
    pub(crate) ints: RefCell<Vec<IntsBuf>>,
    pub(crate) partials: RefCell<Scratch>,
    /// The embedding gradient's sorted (token id, row) items.
    pub(crate) sort_items: RefCell<Scratch>,
    name: String,
    sync_timeout: Cell<Option<std::time::Duration>>,
    /// cuBLAS compute type of every matrix product: fp32 storage, and fp32 (CUBLAS_COMPUTE_32F), bf16 or
    /// fp16 tensor-core operands (..._FAST_16BF / _16F) with fp32 accumulation.
    pub(crate) gemm: Cell<(Compute, &'static str)>,
    /// Storage of activations: bf16 under --precision bf16, else fp32.
    pub(crate) act_dt: Cell<StorageType>,
}

/// The launch geometry the kernels assume (kernels/launch.cuh, as Rust constants made by build.rs).
#[allow(dead_code)] // every constant of the header, used here or not
pub mod launch {
    include!(concat!(env!("OUT_DIR"), "/launch.rs"));
}
use launch::THREADS;

pub(crate) fn grid_for(n: usize) -> u32 {
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
            dev: Counted::new(dev),
            k,
            floats: RefCell::new(Vec::new()),
            ints: RefCell::new(Vec::new()),
            partials: RefCell::new(Scratch::default()),
            sort_items: RefCell::new(Scratch::default()),
            name,
            sync_timeout: Cell::new(None),
            gemm: Cell::new((Compute::F32, "fp32")),
            act_dt: Cell::new(StorageType::F32),
        })
    }

    /// Bound every wait: in a multi-GPU job a dead peer leaves collectives unfinished forever.
    pub fn set_sync_timeout(&self, t: Option<std::time::Duration>) {
        self.sync_timeout.set(t);
    }

    /// The device under this backend.
    pub fn device(&self) -> &dyn Device {
        &self.dev
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
    pub(crate) fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        threads: u32,
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        self.dev.launch(k, Launch::new(grid, threads), args)
    }

    /// Bounds and overlap checks, then the device pointers: each buffer's own storage.
    pub(crate) fn ptrs<const O: usize, const I: usize>(
        &self,
        outs: [Buf; O],
        ins: [Buf; I],
    ) -> Result<([u64; O], [u64; I])> {
        self.ptrs_as(StorageType::F32, outs, ins)
    }

    /// As `ptrs`, for an op whose activations are stored as `dt`: parameters are read from their bf16 copy
    /// when `dt` is bf16 (statistics and gradients keep their fp32 storage).
    pub(crate) fn ptrs_as<const O: usize, const I: usize>(
        &self,
        dt: StorageType,
        outs: [Buf; O],
        ins: [Buf; I],
    ) -> Result<([u64; O], [u64; I])> {
        let floats = self.floats.borrow();
        let ptr = |b: &Buf| -> Result<u64> {
            match floats.get(b.id as usize) {
                Some(f) if b.off + b.len <= f.len => Ok(match (&f.shadow, dt) {
                    (Some(sh), StorageType::Bf16) => sh.ptr + 2 * b.off as u64,
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
    pub(crate) fn need_f32(&self, what: &str, bufs: &[Buf]) -> Result<()> {
        for b in bufs {
            if self.storage(*b)? != StorageType::F32 {
                bail!("internal: {what} must be an fp32 buffer (a statistic, loss or gradient)");
            }
        }
        Ok(())
    }

    /// Float outputs written next to activations (gradients, statistics): fp32 and not a parameter, whose
    /// bf16 copy `ptrs_as` would hand out under bf16.
    pub(crate) fn need_f32_out(&self, what: &str, bufs: &[Buf]) -> Result<()> {
        self.need_f32(what, bufs)?;
        let floats = self.floats.borrow();
        if bufs.iter().any(|b| floats.get(b.id as usize).is_some_and(|f| f.shadow.is_some())) {
            bail!("internal: {what} must not be a parameter buffer");
        }
        Ok(())
    }

    /// The storage type that all of `bufs` share (a kernel is instantiated for one).
    pub(crate) fn storage_of_all(&self, what: &str, bufs: &[Buf]) -> Result<StorageType> {
        let dt = self.storage(bufs[0])?;
        for b in &bufs[1..] {
            if self.storage(*b)? != dt {
                bail!("internal: {what}: the activation buffers are stored in different types");
            }
        }
        Ok(dt)
    }

    /// The storage type of a buffer.
    pub(crate) fn storage(&self, b: Buf) -> Result<StorageType> {
        match self.floats.borrow().get(b.id as usize) {
            Some(f) => Ok(f.dt),
            None => bail!("internal: no buffer {}", b.id),
        }
    }

    pub(crate) fn iptr(&self, i: Ints) -> Result<u64> {
        let ints = self.ints.borrow();
        match ints.get(i.id as usize) {
            Some(b) if i.off + i.len <= b.len => Ok(b.mem.ptr + 4 * i.off as u64),
            _ => bail!("internal: int region {i:?} out of bounds"),
        }
    }

    pub(crate) fn host_ints(&self, i: Ints) -> Result<Vec<i32>> {
        let ints = self.ints.borrow();
        match ints.get(i.id as usize) {
            Some(b) if i.off + i.len <= b.host.len() => Ok(b.host[i.off..i.off + i.len].to_vec()),
            _ => bail!("internal: int region {i:?} was not uploaded"),
        }
    }

    /// The host copy of the first `m` row indices of `rows`, each checked to be below `n`.
    pub(crate) fn rows_below(&self, rows: Ints, m: usize, n: usize) -> Result<Vec<i32>> {
        let host = self.host_ints(rows.prefix(m))?;
        if let Some(&bad) = host.iter().find(|&&r| r < 0 || r as usize >= n) {
            bail!("row {bad} outside the {n} rows");
        }
        Ok(host)
    }

    /// A device buffer of at least `n` floats for reduction partials.
    pub(crate) fn partials(&self, n: usize) -> Result<u64> {
        self.partials.borrow_mut().at_least(&self.dev, 4 * n)
    }

    pub(crate) fn need(what: &str, got: usize, want: usize) -> Result<()> {
        if got < want {
            bail!("internal: {what} holds {got} elements, {want} needed");
        }
        Ok(())
    }

    /// acc[c] += Σ_k partial[k·stride + c] for c < cols.
    pub(crate) fn sum_partials(
        &self,
        acc: u64,
        partial: u64,
        chunks: usize,
        cols: usize,
        stride: usize,
    ) -> Result<()> {
        let (chunks, cols, stride) = (chunks as i32, cols as i32, stride as i32);
        self.launch(
            self.k.sum_partials,
            (grid_for(cols as usize), 1, 1),
            THREADS,
            &[&acc, &partial, &chunks, &cols, &stride],
        )?;
        Ok(())
    }

    /// An elementwise kernel: its pointers, then n, then an optional scalar.
    pub(crate) fn elementwise<S: KernelArg>(
        &self,
        f: Kernel,
        ptrs: &[u64],
        n: usize,
        extra: Option<&S>,
    ) -> Result<()> {
        let n = n as i64;
        let mut args: Vec<&dyn KernelArg> = ptrs.iter().map(|p| p as &dyn KernelArg).collect();
        args.push(&n);
        if let Some(e) = extra {
            args.push(e);
        }
        self.launch(f, (grid_for(n as usize), 1, 1), THREADS, &args)
    }
}

impl Memory for Cuda {
    fn describe(&self) -> String {
        let storage =
            if self.act_dt.get() == StorageType::Bf16 { "bf16 activations" } else { "fp32 storage" };
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
        let act = if chosen == "bf16" { StorageType::Bf16 } else { StorageType::F32 };
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

    fn traffic(&self) -> Option<Traffic> {
        Some(self.dev.traffic())
    }

    fn alloc(&self, len: usize) -> Result<Buf> {
        self.alloc_kind(len, Kind::Stat)
    }

    fn alloc_kind(&self, len: usize, kind: Kind) -> Result<Buf> {
        let act = self.act_dt.get();
        let dt = if kind == Kind::Activation { act } else { StorageType::F32 };
        let mem = self.dev.alloc(dt.size() * len, true)?;
        let shadow = if kind == Kind::Param && act == StorageType::Bf16 {
            Some(self.dev.alloc(2 * len, true)?)
        } else {
            None
        };
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
            StorageType::F32 => self.dev.htod(p, bytemuck::cast_slice(src))?,
            StorageType::Bf16 => self.dev.htod(p, bytemuck::cast_slice(&bf16(src)))?,
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
        let dt = self.storage(src)?;
        let ([], [p]) = self.ptrs([], [src])?;
        match dt {
            StorageType::F32 => {
                let mut out = vec![0f32; src.len];
                self.dev.dtoh(bytemuck::cast_slice_mut(&mut out), p)?;
                Ok(out)
            }
            StorageType::Bf16 => {
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
        let dt = self.storage(dst)?;
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
        let dt = self.storage(src)?;
        if self.storage(dst)? != dt {
            bail!("internal: copy between buffers of different storage types");
        }
        let ([d], [s]) = self.ptrs([dst], [src])?;
        self.dev.dtod(d, s, dt.size() * src.len)
    }

    fn all_reduce_sum(&self, buf: Buf, comm: &dyn crate::dist::Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        if self.storage(buf)? != StorageType::F32 {
            bail!("internal: gradients are summed in fp32");
        }
        let ([p], []) = self.ptrs([buf], [])?;
        self.dev.all_reduce_sum(p, buf.len, comm)
    }

    fn all_reduce_wait(&self) -> Result<()> {
        self.dev.all_reduce_wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use crate::ops::optim::{AdamWArgs, ControlArgs, LambArgs};
        assert_eq!(std::mem::size_of::<ControlArgs>(), 24);
        assert_eq!(std::mem::size_of::<AdamWArgs>(), 16);
        assert_eq!(std::mem::size_of::<LambArgs>(), 28);
    }
}
