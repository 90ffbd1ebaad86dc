//! A real GPU: the CUDA driver (the kernels of `kernels/` in one fatbin built by build.rs), cuBLAS (and
//! cuBLASLt for the products with an epilogue) and NCCL, through cudarc with dynamic loading — a machine
//! without a driver or a GPU gets a clear error from `Driver::new`, never a panic. Work runs on one compute
//! stream of our own (not the legacy default stream); NCCL's reductions on a second stream that waits for
//! the compute which completed their bucket.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
};
use cudarc::nccl::{result as nccl_res, sys as nccl_sys};

use super::{Compute, DevPtr, Device, Elem, Epilogue, Gemm, Kernel, KernelArg, Launch, Mem};
use crate::bail;
use crate::dist::Comm;
use crate::error::{Error, Result};

/// The kernels, compiled by build.rs; empty when nvcc was not found at build time.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// Whether this build carries the CUDA kernels.
pub fn kernels_built() -> bool {
    !FATBIN.is_empty()
}

/// A driver, cuBLAS or NCCL result as this crate's error; out of memory is its own kind.
pub(crate) fn map_driver_error<T, E: std::fmt::Debug>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| {
        let m = format!("CUDA: {e:?}");
        if m.contains("OUT_OF_MEMORY") {
            Error::OutOfMemory(m)
        } else {
            Error::Invalid(m)
        }
    })
}

/// Why the GPU cannot be used, or Ok when `Driver::new(0)` should succeed.
pub fn probe() -> std::result::Result<(), String> {
    if !kernels_built() {
        return Err("this binary was built without CUDA kernels (nvcc was not found at build time): run \
                    scripts/install-cuda-compiler.sh and rebuild"
            .into());
    }
    // SAFETY: only checks whether the library can be opened.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda.so.1 cannot be opened)".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return Err("the NVIDIA driver sees no GPU".into()),
        Err(e) => return Err(format!("the NVIDIA driver reports {e:?}")),
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "cuBLAS (libcublas.so) cannot be opened; put the CUDA libraries on LD_LIBRARY_PATH".into()
        );
    }
    if !unsafe { lt_sys::is_culib_present() } {
        return Err(
            "cuBLASLt (libcublasLt.so) cannot be opened; put the CUDA libraries on LD_LIBRARY_PATH".into()
        );
    }
    Ok(())
}

struct BlasHandle(blas_sys::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle and destroyed once, here.
        unsafe {
            let _ = blas::destroy_handle(self.0);
        }
    }
}

/// What fixes a cuBLASLt plan: the shapes, layouts, types and epilogue of a product (its pointers are
/// set per call; `Cuda` hands cuBLASLt only 16-byte aligned ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    ld: (usize, usize, usize),
    types: (Elem, Elem, Elem),
    compute: Compute,
    /// 1 bias (with its type), 2 the bias gradient of B.
    epilogue: (u8, Elem),
}

/// A product's cuBLASLt descriptors and algorithm, chosen once per shape; destroyed with it.
struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    /// A, B, C (= D).
    layouts: Vec<lt_sys::cublasLtMatrixLayout_t>,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by lt_plan for this plan alone and destroyed once, here.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts.drain(..) {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// cuBLASLt: its handle, one workspace set once, and the plans made so far.
struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: RefCell<std::collections::HashMap<PlanKey, Plan>>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.get_mut().clear();
        // SAFETY: created by Driver::new and destroyed once, here, after every plan of it.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// cuBLASLt's workspace: 32 MiB, as cuBLAS recommends for Hopper.
const LT_WORKSPACE: usize = 32 << 20;

/// The alignment of every pointer a product with an epilogue gets: the plans' algorithms may assume it.
const LT_ALIGNMENT: u32 = super::EPILOGUE_ALIGNMENT;

pub struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// NCCL's gradient reductions run here, each after the compute work that completed its bucket, so they
    /// overlap the rest of the backward pass.
    comm_stream: Arc<CudaStream>,
    comm_pending: Cell<bool>,
    blas: BlasHandle,
    lt: Lt,
    functions: RefCell<Vec<(String, CudaFunction)>>,
    module: Arc<CudaModule>,
}

/// Wait for a stream; with a timeout, an operation that never finishes (a collective whose peer died)
/// becomes an error instead of a hang.
fn wait_stream(stream: &CudaStream, timeout: Option<Duration>) -> Result<()> {
    let Some(timeout) = timeout else { return map_driver_error(stream.synchronize()) };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: a query of a live stream.
        match unsafe { drv_sys::cuStreamQuery(stream.cu_stream()) } {
            drv_sys::CUresult::CUDA_SUCCESS => return Ok(()),
            drv_sys::CUresult::CUDA_ERROR_NOT_READY => {}
            e => bail!("CUDA: {e:?}"),
        }
        if std::time::Instant::now() >= deadline {
            bail!("a GPU operation did not finish within {timeout:?}: another rank of the job died or hangs");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Driver {
    /// Open GPU `ordinal`, load the kernels and create the cuBLAS handle.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe().map_err(|why| Error::Invalid(format!("--device cuda: {why}")))?;
        let n = map_driver_error(CudaContext::device_count())? as usize;
        if ordinal >= n {
            bail!("GPU {ordinal} requested, the driver sees {n}");
        }
        let ctx = map_driver_error(CudaContext::new(ordinal))?;
        // One compute stream: the allocation events cudarc records for multi-stream safety are not needed.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream (which waits for and blocks every other).
        let stream = map_driver_error(ctx.new_stream())?;
        let comm_stream = map_driver_error(ctx.new_stream())?;
        let module = map_driver_error(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec())))
            .map_err(|e| {
                Error::Invalid(format!(
                    "{e}: the kernels do not load on this GPU (built for sm_80, sm_90 and PTX 9.0)"
                ))
            })?;
        let handle = map_driver_error(blas::create_handle())?;
        // SAFETY: the handle is new and the stream lives as long as self.
        unsafe {
            map_driver_error(blas::set_stream(handle, stream.cu_stream() as blas_sys::cudaStream_t))?;
            // fp32 SGEMM, no TF32: held to the CPU reference whatever the library's default.
            map_driver_error(
                blas_sys::cublasSetMathMode(handle, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH).result(),
            )?;
        }
        let workspace = map_driver_error(stream.alloc_zeros::<u8>(LT_WORKSPACE))?;
        let lt = Lt { handle: map_driver_error(lt::create_handle())?, workspace, plans: RefCell::default() };
        Ok(Driver {
            ctx,
            stream,
            comm_stream,
            comm_pending: Cell::new(false),
            blas: BlasHandle(handle),
            lt,
            functions: RefCell::new(Vec::new()),
            module,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Driver {
    /// A product with an epilogue through cuBLASLt: its plan (descriptors, layouts, the heuristic's
    /// algorithm) made on first use of the shape, the epilogue's pointer set, the product queued.
    fn lt_matmul(&self, g: &Gemm) -> Result<()> {
        let (kind, bias_elem) = match g.epilogue {
            Epilogue::None => unreachable!("products without an epilogue go through cublasGemmEx"),
            Epilogue::Bias { elem, .. } => (1, elem),
            Epilogue::BiasGradB { .. } => (2, Elem::F32),
        };
        let key = PlanKey {
            trans: (g.trans_a, g.trans_b),
            mnk: (g.m, g.n, g.k),
            ld: (g.lda, g.ldb, g.ldc),
            types: (g.a_type, g.b_type, g.c_type),
            compute: g.compute,
            epilogue: (kind, bias_elem),
        };
        let mut plans = self.lt.plans.borrow_mut();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.lt_plan(g, &key)?),
        };
        let (attr, ptr) = match g.epilogue {
            Epilogue::Bias { bias, .. } => {
                (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias)
            }
            Epilogue::BiasGradB { grad } => {
                (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, grad)
            }
            Epilogue::None => unreachable!("products without an epilogue go through cublasGemmEx"),
        };
        let (ws, _guard) = self.lt.workspace.device_ptr(&self.stream);
        // SAFETY: the descriptors are this plan's; the caller bounds-checked every operand and the
        // epilogue's vector for these shapes; the workspace lives as long as self; our stream.
        unsafe {
            map_driver_error(lt::set_matmul_desc_attribute(
                plan.desc,
                attr,
                &ptr as *const DevPtr as *const std::ffi::c_void,
                std::mem::size_of::<DevPtr>(),
            ))?;
            map_driver_error(lt::matmul(
                self.lt.handle,
                plan.desc,
                &g.alpha as *const f32 as *const std::ffi::c_void,
                &g.beta as *const f32 as *const std::ffi::c_void,
                g.a as *const std::ffi::c_void,
                plan.layouts[0],
                g.b as *const std::ffi::c_void,
                plan.layouts[1],
                g.c as *const std::ffi::c_void,
                plan.layouts[2],
                g.c as *mut std::ffi::c_void,
                plan.layouts[2],
                &plan.algo,
                ws as *mut std::ffi::c_void,
                LT_WORKSPACE,
                self.stream.cu_stream() as lt_sys::cudaStream_t,
            ))
        }
    }

    /// The descriptors of a product and the algorithm cuBLASLt's heuristic picks for them.
    fn lt_plan(&self, g: &Gemm, key: &PlanKey) -> Result<Plan> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        use lt_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let ty = |e: Elem| if e == Elem::Bf16 { CUDA_R_16BF } else { CUDA_R_32F };
        let compute = match g.compute {
            Compute::F32 => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Compute::Fast16Bf => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Compute::Fast16F => lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16F,
        };
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (ar, ac) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        let epilogue = match key.epilogue.0 {
            1 => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            _ => lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
        };
        let bias_type = ty(key.epilogue.1);
        let desc = map_driver_error(lt::create_matmul_desc(compute, CUDA_R_32F))?;
        // From here the plan destroys what it holds if a later step fails.
        // SAFETY: the algorithm is plain data, filled in by the heuristic below.
        let mut plan = Plan { desc, layouts: Vec::with_capacity(3), algo: unsafe { std::mem::zeroed() } };
        for (t, rows, cols, ld) in
            [(g.a_type, ar, ac, g.lda), (g.b_type, br, bc, g.ldb), (g.c_type, g.m, g.n, g.ldc)]
        {
            plan.layouts.push(map_driver_error(lt::create_matrix_layout(
                ty(t),
                rows as u64,
                cols as u64,
                ld as i64,
            ))?);
        }
        let set = |attr: A, v: *const std::ffi::c_void, size: usize| {
            // SAFETY: desc is live; v points at a value of `size` bytes of the attribute's type.
            map_driver_error(unsafe { lt::set_matmul_desc_attribute(desc, attr, v, size) })
        };
        let (ta, tb) = (op(g.trans_a), op(g.trans_b));
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, &ta as *const _ as *const _, std::mem::size_of_val(&ta))?;
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, &tb as *const _ as *const _, std::mem::size_of_val(&tb))?;
        let e = &epilogue as *const _ as *const _;
        set(A::CUBLASLT_MATMUL_DESC_EPILOGUE, e, std::mem::size_of_val(&epilogue))?;
        let b = &bias_type as *const _ as *const _;
        set(A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, b, std::mem::size_of_val(&bias_type))?;
        let pref = map_driver_error(lt::create_matmul_pref())?;
        let (workspace, alignment) = (LT_WORKSPACE as u64, LT_ALIGNMENT);
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        let prefs = [
            (
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const std::ffi::c_void,
                8,
            ),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alignment as *const u32 as *const _, 4),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alignment as *const u32 as *const _, 4),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alignment as *const u32 as *const _, 4),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alignment as *const u32 as *const _, 4),
        ];
        // SAFETY: every descriptor is live; the preference is destroyed once, after the query.
        let heuristic = unsafe {
            let r = prefs
                .iter()
                .try_for_each(|&(attr, v, size)| lt::set_matmul_pref_attribute(pref, attr, v, size))
                .and_then(|()| {
                    let l = &plan.layouts;
                    lt::get_matmul_algo_heuristic(self.lt.handle, desc, l[0], l[1], l[2], l[2], pref)
                });
            let _ = lt::destroy_matmul_pref(pref);
            r
        };
        plan.algo = map_driver_error(heuristic)
            .map_err(|e| Error::Invalid(format!("{e}: cuBLASLt has no algorithm for the product {key:?}")))?
            .algo;
        Ok(plan)
    }
}

impl Device for Driver {
    fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "CUDA GPU".into())
    }

    fn compute_capability(&self) -> Result<(i32, i32)> {
        use drv_sys::CUdevice_attribute::*;
        let major = map_driver_error(self.ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR))?;
        let minor = map_driver_error(self.ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))?;
        Ok((major, minor))
    }

    fn memory_used(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, total)| (total - free) as u64)
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<Mem> {
        let n = bytes.max(1);
        let mem: CudaSlice<u8> = if zeroed {
            map_driver_error(self.stream.alloc_zeros::<u8>(n))?
        } else {
            unsafe { map_driver_error(self.stream.alloc::<u8>(n))? }
        };
        let ptr = mem.device_ptr(&self.stream).0;
        Ok(Mem::new(ptr, bytes, Box::new(mem)))
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        // SAFETY: the caller checked the region; pageable host memory is staged before the call returns.
        unsafe { map_driver_error(drv::memcpy_htod_async(dst, src, self.stream.cu_stream())) }
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        // SAFETY: the caller checked the region; the stream is synchronised before `dst` is read.
        unsafe { map_driver_error(drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()))? };
        map_driver_error(self.stream.synchronize())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        unsafe { map_driver_error(drv::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())) }
    }

    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        unsafe { map_driver_error(drv::memset_d8_async(dst, 0, bytes, self.stream.cu_stream())) }
    }

    fn kernel(&self, name: &str) -> Result<Kernel> {
        let f = self
            .module
            .load_function(name)
            .map_err(|e| Error::Invalid(format!("CUDA kernel {name} is missing from the module: {e:?}")))?;
        let mut fs = self.functions.borrow_mut();
        fs.push((name.to_string(), f));
        Ok(Kernel(fs.len() as u32 - 1))
    }

    fn launch(&self, k: Kernel, l: Launch, args: &[&dyn KernelArg]) -> Result<()> {
        let fs = self.functions.borrow();
        let (name, f) = &fs[k.0 as usize];
        // cuLaunchKernel reads each parameter through its pointer before returning.
        let mut params: Vec<*mut std::ffi::c_void> =
            args.iter().map(|a| a.bytes().as_ptr() as *mut std::ffi::c_void).collect();
        // SAFETY: the argument list matches the kernel's parameters (the emulator checks the same list
        // against the kernel's signature on every launch in CI); the pointers outlive the call.
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                l.grid,
                l.block,
                l.shared,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| Error::Invalid(format!("CUDA: launching {name}: {e:?}")))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.epilogue != Epilogue::None {
            return self.lt_matmul(g);
        }
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
        use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let ty = |e: Elem| if e == Elem::Bf16 { CUDA_R_16BF } else { CUDA_R_32F };
        let compute = match g.compute {
            Compute::F32 => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Compute::Fast16Bf => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Compute::Fast16F => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16F,
        };
        let op = |t: bool| if t { T } else { N };
        // SAFETY: the caller bounds-checked every operand for these shapes; cuBLAS runs on our stream.
        unsafe {
            map_driver_error(blas::gemm_ex(
                self.blas.0,
                op(g.trans_a),
                op(g.trans_b),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &g.alpha as *const f32 as *const std::ffi::c_void,
                g.a as *const std::ffi::c_void,
                ty(g.a_type),
                g.lda as i32,
                g.b as *const std::ffi::c_void,
                ty(g.b_type),
                g.ldb as i32,
                &g.beta as *const f32 as *const std::ffi::c_void,
                g.c as *mut std::ffi::c_void,
                ty(g.c_type),
                g.ldc as i32,
                compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ))
        }
    }

    fn synchronize(&self, timeout: Option<Duration>) -> Result<()> {
        wait_stream(&self.stream, timeout)
    }

    fn all_reduce_sum(&self, ptr: DevPtr, len: usize, comm: &dyn Comm) -> Result<()> {
        let Some(nccl) = comm.as_any().downcast_ref::<NcclComm>() else {
            return super::all_reduce_on_host(self, ptr, len, comm);
        };
        // The communication stream waits for the compute queued so far (the bucket is complete), then
        // sums in place while the compute stream goes on with the backward pass.
        map_driver_error(self.comm_stream.join(&self.stream))?;
        // SAFETY: in bounds (checked by the caller); no compute kernel touches this region until
        // all_reduce_wait.
        unsafe {
            map_driver_error(nccl_res::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                len,
                nccl_sys::ncclDataType_t::ncclFloat32,
                nccl_sys::ncclRedOp_t::ncclSum,
                nccl.comm,
                self.comm_stream.cu_stream() as nccl_sys::cudaStream_t,
            ))?
        };
        self.comm_pending.set(true);
        Ok(())
    }

    fn all_reduce_wait(&self) -> Result<()> {
        if self.comm_pending.replace(false) {
            map_driver_error(self.stream.join(&self.comm_stream))?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// NCCL across the GPUs of a job, one process per GPU: gradients are summed on the device
/// (`Device::all_reduce_sum`), host numbers through a small device buffer. Dropping it aborts the
/// communicator, so a failing rank never leaves the others waiting in a collective.
pub struct NcclComm {
    comm: nccl_sys::ncclComm_t,
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    scratch: RefCell<Option<(CudaSlice<f64>, u64, usize)>>,
    timeout: Duration,
}

fn nccl_present() -> Result<()> {
    // SAFETY: only checks whether the library can be opened.
    if !unsafe { nccl_sys::is_culib_present() } {
        bail!("NCCL (libnccl.so) cannot be opened; put it on LD_LIBRARY_PATH (a libnccl.so link to libnccl.so.2)");
    }
    Ok(())
}

impl NcclComm {
    /// A new unique id (rank 0 makes it and hands it to the others through `dist::rendezvous`).
    pub fn unique_id() -> Result<[u8; crate::dist::ID_BYTES]> {
        nccl_present()?;
        let id = map_driver_error(nccl_res::get_uniqueid())?;
        let mut out = [0u8; crate::dist::ID_BYTES];
        for (o, c) in out.iter_mut().zip(id.internal.iter()) {
            *o = *c as u8;
        }
        Ok(out)
    }

    /// Join the communicator of `world` ranks as `rank`, on the GPU and compute stream of `dev`.
    pub fn new(
        dev: &Driver,
        rank: usize,
        world: usize,
        id: [u8; crate::dist::ID_BYTES],
        timeout: Duration,
    ) -> Result<Self> {
        nccl_present()?;
        let mut internal = [0 as std::ffi::c_char; crate::dist::ID_BYTES];
        for (i, b) in internal.iter_mut().zip(id) {
            *i = b as std::ffi::c_char;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm is written by ncclCommInitRank before it is read.
        let comm = unsafe {
            map_driver_error(nccl_res::comm_init_rank(
                comm.as_mut_ptr(),
                world as i32,
                nccl_sys::ncclUniqueId { internal },
                rank as i32,
            ))
            .map_err(|e| Error::Invalid(format!("rank {rank}: NCCL init failed: {e}")))?;
            comm.assume_init()
        };
        Ok(NcclComm { comm, rank, world, stream: dev.stream.clone(), scratch: RefCell::new(None), timeout })
    }

    fn sum_f64(&self, data: &mut [f64]) -> Result<()> {
        let n = data.len().max(1);
        let mut s = self.scratch.borrow_mut();
        if s.as_ref().is_none_or(|x| x.2 < n) {
            let mem = map_driver_error(self.stream.alloc_zeros::<f64>(n))?;
            let p = mem.device_ptr(&self.stream).0;
            *s = Some((mem, p, n));
        }
        let p = s.as_ref().expect("allocated").1;
        // SAFETY: p holds at least data.len() f64s; the stream is synchronised before `data` is read.
        unsafe {
            map_driver_error(drv::memcpy_htod_async(p, data, self.stream.cu_stream()))?;
            map_driver_error(nccl_res::all_reduce(
                p as *const std::ffi::c_void,
                p as *mut std::ffi::c_void,
                data.len(),
                nccl_sys::ncclDataType_t::ncclFloat64,
                nccl_sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as nccl_sys::cudaStream_t,
            ))?;
            map_driver_error(drv::memcpy_dtoh_async(data, p, self.stream.cu_stream()))?;
        }
        wait_stream(&self.stream, Some(self.timeout))
            .map_err(|e| Error::Invalid(format!("rank {}: {e}", self.rank)))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised and is released once, here.
        unsafe {
            let _ = nccl_res::comm_abort(self.comm);
        }
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let mut d: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        self.sum_f64(&mut d)?;
        for (o, v) in data.iter_mut().zip(d) {
            *o = v as f32;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
        self.sum_f64(data)
    }
    fn barrier(&self) -> Result<()> {
        self.sum_f64(&mut [0.0])
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
