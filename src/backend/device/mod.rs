//! The device under the CUDA backend: the few things `Cuda` asks of a GPU — memory, copies, kernel
//! launches by name, the cuBLAS matrix product, stream order and the gradient all-reduce — behind one
//! narrow trait with two implementations:
//! - [`driver::Driver`]: a real GPU through cudarc (the CUDA driver, cuBLAS, NCCL);
//! - [`emu::Emu`]: the emulated device — the same kernel sources compiled for the host
//!   (kernels/emu/), every block's threads run as fibers with CUDA's barrier and warp semantics, cuBLAS's
//!   product done on the CPU with its exact conventions, and a checker of out-of-bounds accesses,
//!   uninitialised reads and races (`--device emu`).
//!
//! `Cuda` (src/backend/cuda.rs) is written once against this trait, so its launches — argument lists,
//! grids, offsets — are the same code on the GPU and on the emulator.

pub mod driver;
pub mod emu;

use std::time::Duration;

use crate::dist::Comm;
use crate::error::Result;

/// A device address.
pub type DevPtr = u64;

/// A device allocation, freed when dropped.
pub struct Mem {
    pub ptr: DevPtr,
    pub bytes: usize,
    _owner: Box<dyn std::any::Any>,
}

impl Mem {
    pub(crate) fn new(ptr: DevPtr, bytes: usize, owner: Box<dyn std::any::Any>) -> Self {
        Mem { ptr, bytes, _owner: owner }
    }
}

/// A kernel of the module, looked up once by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel(pub u32);

/// Grid and block dimensions and dynamic shared memory bytes, as cuLaunchKernel takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared: u32,
}

impl Launch {
    /// A 1-D block of `threads` over `grid`, no dynamic shared memory.
    pub fn new(grid: (u32, u32, u32), threads: u32) -> Self {
        Launch { grid, block: (threads, 1, 1), shared: 0 }
    }
}

/// A kernel argument: its bytes, as the kernel's parameter holds them.
pub trait KernelArg {
    fn bytes(&self) -> &[u8];
}

macro_rules! pod_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn bytes(&self) -> &[u8] {
                bytemuck::bytes_of(self)
            }
        }
    )*};
}
pod_arg!(u64, i64, i32, u32, f32);

/// Storage types of matrix operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    Bf16,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::Bf16 => 2,
        }
    }
}

/// cuBLAS compute types: fp32, or fp32 accumulation of operands rounded to bf16 / fp16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compute {
    F32,
    Fast16Bf,
    Fast16F,
}

/// A product with an epilogue gets operands, output and epilogue vector at addresses, and leading
/// dimensions in bytes, that are multiples of this (the CUDA backend runs the plain product and a kernel
/// of ours otherwise), so the algorithms chosen for it may assume 16-byte vectors.
pub const EPILOGUE_ALIGNMENT: u32 = 16;

/// What a matrix product does besides the product, as cuBLASLt's epilogues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// C(i, j) += bias(i) for every column j, in fp32 before C is rounded to its type
    /// (CUBLASLT_EPILOGUE_BIAS; `bias` has m elements of `elem`).
    Bias {
        bias: DevPtr,
        elem: Elem,
    },
    /// grad(j) = Σ_p op(B)(p, j) over the k rows, written (=) as n fp32 values: the bias gradient of the
    /// product's B operand (CUBLASLT_EPILOGUE_BGRADB).
    BiasGradB {
        grad: DevPtr,
    },
}

/// One matrix product, in cuBLAS's terms: column-major C (m × n, leading dimension ldc) =
/// alpha · op(A) op(B) + beta · C, op(A) m × k, op(B) k × n, then the epilogue; C is not read when beta
/// is 0. Without an epilogue it is a `cublasGemmEx` call; with one, `cublasLtMatmul`.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: DevPtr,
    pub a_type: Elem,
    pub lda: usize,
    pub b: DevPtr,
    pub b_type: Elem,
    pub ldb: usize,
    pub beta: f32,
    pub c: DevPtr,
    pub c_type: Elem,
    pub ldc: usize,
    pub compute: Compute,
    pub epilogue: Epilogue,
}

/// What the CUDA backend needs of a device. All work is queued in order on one compute stream; the host
/// waits only in `dtoh` and `synchronize`.
pub trait Device {
    /// The device's name, as the driver reports it.
    fn name(&self) -> String;
    /// Compute capability (major, minor).
    fn compute_capability(&self) -> Result<(i32, i32)>;
    /// Bytes of device memory in use, when known.
    fn memory_used(&self) -> Option<u64>;
    /// `bytes` of device memory, zeroed or not (then its content is undefined; the emulator's checker
    /// reports a read before a write).
    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<Mem>;
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Copies back after the work queued so far.
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()>;
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()>;
    /// The kernel of that name; an error naming it when the module has none.
    fn kernel(&self, name: &str) -> Result<Kernel>;
    fn launch(&self, k: Kernel, l: Launch, args: &[&dyn KernelArg]) -> Result<()>;
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Wait for all queued work; with a timeout, work that never finishes is an error, not a hang.
    fn synchronize(&self, timeout: Option<Duration>) -> Result<()>;
    /// Sum `len` floats at `ptr` in place over the ranks of `comm`, after the work queued so far; the
    /// compute stream may go on until `all_reduce_wait`.
    fn all_reduce_sum(&self, ptr: DevPtr, len: usize, comm: &dyn Comm) -> Result<()>;
    /// The compute stream waits for every pending all-reduce.
    fn all_reduce_wait(&self) -> Result<()>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// What a device was asked to do that costs the host a wait or a transfer, counted at this interface:
/// the numbers behind "no synchronisation inside a step".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Times the host waited for the device: `synchronize`, and every copy back (`dtoh` waits for the
    /// work queued before it).
    pub synchronisations: u64,
    /// Copies host → device, and their bytes.
    pub uploads: u64,
    pub upload_bytes: u64,
    /// Copies device → host.
    pub downloads: u64,
    /// Device allocations.
    pub allocations: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic {
            synchronisations: self.synchronisations - o.synchronisations,
            uploads: self.uploads - o.uploads,
            upload_bytes: self.upload_bytes - o.upload_bytes,
            downloads: self.downloads - o.downloads,
            allocations: self.allocations - o.allocations,
        }
    }
}

/// A device whose host-side traffic is counted; everything else passes through.
pub struct Counted {
    inner: Box<dyn Device>,
    traffic: std::cell::Cell<Traffic>,
}

impl Counted {
    pub fn new(inner: Box<dyn Device>) -> Self {
        Counted { inner, traffic: Default::default() }
    }

    /// Everything counted so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic.get()
    }

    fn count(&self, f: impl FnOnce(&mut Traffic)) {
        let mut t = self.traffic.get();
        f(&mut t);
        self.traffic.set(t);
    }
}

impl Device for Counted {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn compute_capability(&self) -> Result<(i32, i32)> {
        self.inner.compute_capability()
    }
    fn memory_used(&self) -> Option<u64> {
        self.inner.memory_used()
    }
    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<Mem> {
        self.count(|t| t.allocations += 1);
        self.inner.alloc(bytes, zeroed)
    }
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.count(|t| (t.uploads, t.upload_bytes) = (t.uploads + 1, t.upload_bytes + src.len() as u64));
        self.inner.htod(dst, src)
    }
    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        self.count(|t| (t.downloads, t.synchronisations) = (t.downloads + 1, t.synchronisations + 1));
        self.inner.dtoh(dst, src)
    }
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.inner.dtod(dst, src, bytes)
    }
    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.inner.memset_zero(dst, bytes)
    }
    fn kernel(&self, name: &str) -> Result<Kernel> {
        self.inner.kernel(name)
    }
    fn launch(&self, k: Kernel, l: Launch, args: &[&dyn KernelArg]) -> Result<()> {
        self.inner.launch(k, l, args)
    }
    fn gemm(&self, g: &Gemm) -> Result<()> {
        self.inner.gemm(g)
    }
    fn synchronize(&self, timeout: Option<Duration>) -> Result<()> {
        self.count(|t| t.synchronisations += 1);
        self.inner.synchronize(timeout)
    }
    fn all_reduce_sum(&self, ptr: DevPtr, len: usize, comm: &dyn Comm) -> Result<()> {
        self.inner.all_reduce_sum(ptr, len, comm)
    }
    fn all_reduce_wait(&self) -> Result<()> {
        self.inner.all_reduce_wait()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self.inner.as_any()
    }
}

/// The all-reduce through host memory: `len` floats at `ptr` copied back, summed over `comm`'s ranks, and
/// copied up again (a communicator that is not NCCL, or the emulated device).
pub fn all_reduce_on_host(dev: &dyn Device, ptr: DevPtr, len: usize, comm: &dyn Comm) -> Result<()> {
    let mut h = vec![0f32; len];
    dev.dtoh(bytemuck::cast_slice_mut(&mut h), ptr)?;
    comm.all_reduce_sum(&mut h)?;
    dev.htod(ptr, bytemuck::cast_slice(&h))
}

/// Bounds of a column-major operand: elements from its start that `rows × cols` with leading dimension
/// `ld` spans; an error, as cuBLAS's CUBLAS_STATUS_INVALID_VALUE, when ld < rows.
pub fn operand_span(what: &str, rows: usize, cols: usize, ld: usize) -> Result<usize> {
    if ld < rows.max(1) {
        crate::bail!("matrix product: leading dimension {ld} of {what} is below its {rows} rows");
    }
    Ok(if rows == 0 || cols == 0 { 0 } else { (cols - 1) * ld + rows })
}
