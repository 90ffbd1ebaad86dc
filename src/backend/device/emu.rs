//! The emulated device: the CUDA backend run on the CPU (`--device emu`, a test device, slow). Built by
//! build.rs from kernels/emu/ (the kernel sources as they are, compiled for the host on top of
//! kernels/emu/cuda_emu.h, and the runtime that runs them); it needs no nvcc, no driver and no GPU.
//! - memory: host memory, each allocation known with its bounds (runtime.cpp);
//! - launches: every block of the grid, each block's threads as fibers with CUDA's barrier, warp-collective
//!   and atomic semantics; launch limits (threads per block, grid dimensions, dynamic shared memory and
//!   its attribute) and each kernel's parameter list are checked as errors;
//! - matrix products: cuBLAS's `GemmEx` conventions exactly — column-major, transposes, leading
//!   dimensions (checked), operands read as stored (bf16 exactly) and, for the FAST_16BF / FAST_16F
//!   compute types, rounded to bf16 / fp16 first; fp32 accumulation; alpha, beta (C unread when beta is 0);
//!   a bf16 C rounded to nearest even;
//! - streams run in order (every call completes before it returns); the all-reduce uses whatever
//!   communicator it is given (the in-process one, for two emulated devices in one process);
//! - the checker (when the runtime was built by clang, on by default in tests, `BERTCUDA_EMU_CHECK=0|1`
//!   to choose): out-of-bounds and freed-memory accesses, reads of memory never written, and shared- or
//!   global-memory races, each naming the kernel, block, thread and address — an error of the launch.

use std::time::Duration;

use super::{operand_span, Compute, DevPtr, Device, Elem, Epilogue, Gemm, Kernel, KernelArg, Launch, Mem};
use crate::bail;
use crate::dist::Comm;
use crate::error::{Error, Result};

/// The runtime's C interface (kernels/emu/runtime.cpp). Calls that can fail return non-zero and write
/// their message into the buffer they are given. Without the emulator (no C++ compiler at build time)
/// every call fails: `Emu::new` refuses first, so none is reached.
#[cfg(bertcuda_emu)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    extern "C" {
        pub fn bcemu_checker_built() -> c_int;
        pub fn bcemu_init(check: c_int, err: *mut c_char, cap: usize) -> c_int;
        pub fn bcemu_set_check(check: c_int);
        pub fn bcemu_alloc(bytes: u64, zero: c_int) -> u64;
        pub fn bcemu_free(p: u64) -> c_int;
        pub fn bcemu_htod(dst: u64, src: *const c_void, n: u64, err: *mut c_char, cap: usize) -> c_int;
        pub fn bcemu_dtoh(dst: *mut c_void, src: u64, n: u64, err: *mut c_char, cap: usize) -> c_int;
        pub fn bcemu_dtod(dst: u64, src: u64, n: u64, err: *mut c_char, cap: usize) -> c_int;
        pub fn bcemu_memset(dst: u64, v: c_int, n: u64, err: *mut c_char, cap: usize) -> c_int;
        pub fn bcemu_check_region(
            p: u64,
            n: u64,
            write: c_int,
            what: *const c_char,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn bcemu_kernel(name: *const c_char) -> c_int;
        pub fn bcemu_set_max_dynamic_shared(k: c_int, bytes: c_uint) -> c_int;
        pub fn bcemu_launch(
            k: c_int,
            grid: *const c_uint,
            block: *const c_uint,
            smem: c_uint,
            args: *mut *mut c_void,
            sizes: *const c_uint,
            nargs: c_int,
            order: c_int,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn bcemu_f32_to_bf16(x: f32) -> u16;
        pub fn bcemu_f32_to_f16(x: f32) -> u16;
        pub fn bcemu_f16_to_f32(h: u16) -> f32;
    }
}

#[cfg(not(bertcuda_emu))]
#[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    pub unsafe fn bcemu_checker_built() -> c_int {
        0
    }
    pub unsafe fn bcemu_init(_: c_int, _: *mut c_char, _: usize) -> c_int {
        1
    }
    pub unsafe fn bcemu_set_check(_: c_int) {}
    pub unsafe fn bcemu_alloc(_: u64, _: c_int) -> u64 {
        0
    }
    pub unsafe fn bcemu_free(_: u64) -> c_int {
        1
    }
    pub unsafe fn bcemu_htod(_: u64, _: *const c_void, _: u64, _: *mut c_char, _: usize) -> c_int {
        1
    }
    pub unsafe fn bcemu_dtoh(_: *mut c_void, _: u64, _: u64, _: *mut c_char, _: usize) -> c_int {
        1
    }
    pub unsafe fn bcemu_dtod(_: u64, _: u64, _: u64, _: *mut c_char, _: usize) -> c_int {
        1
    }
    pub unsafe fn bcemu_memset(_: u64, _: c_int, _: u64, _: *mut c_char, _: usize) -> c_int {
        1
    }
    pub unsafe fn bcemu_check_region(
        _: u64,
        _: u64,
        _: c_int,
        _: *const c_char,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        1
    }
    pub unsafe fn bcemu_kernel(_: *const c_char) -> c_int {
        -1
    }
    pub unsafe fn bcemu_set_max_dynamic_shared(_: c_int, _: c_uint) -> c_int {
        1
    }
    pub unsafe fn bcemu_launch(
        _: c_int,
        _: *const c_uint,
        _: *const c_uint,
        _: c_uint,
        _: *mut *mut c_void,
        _: *const c_uint,
        _: c_int,
        _: c_int,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        1
    }
    pub unsafe fn bcemu_f32_to_bf16(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }
    pub unsafe fn bcemu_f32_to_f16(x: f32) -> u16 {
        half::f16::from_f32(x).to_bits()
    }
    pub unsafe fn bcemu_f16_to_f32(h: u16) -> f32 {
        half::f16::from_bits(h).to_f32()
    }
}

/// Whether this build has the emulator (build.rs found a C++ compiler).
pub fn built() -> bool {
    cfg!(bertcuda_emu)
}

/// Whether the emulator's checker is compiled in (its kernels built by clang with the instrumentation).
pub fn checker_built() -> bool {
    unsafe { ffi::bcemu_checker_built() != 0 }
}

/// The order blocks of a grid run in: shuffling catches a kernel that assumes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOrder {
    Forward,
    Reverse,
    Shuffled,
}

/// How the emulated device runs.
#[derive(Debug, Clone)]
pub struct EmuOptions {
    /// Run the checker on every launch (when compiled in).
    pub check: bool,
    pub order: BlockOrder,
    /// Run the kernels of this planted bug (kernels/emu/mutants.txt) where it has them.
    pub planted_bug: Option<String>,
}

impl EmuOptions {
    /// The checker on unless BERTCUDA_EMU_CHECK=0; blocks in order unless BERTCUDA_EMU_ORDER says
    /// reverse or shuffled.
    pub fn from_env() -> Self {
        let check = std::env::var("BERTCUDA_EMU_CHECK").map(|v| v != "0").unwrap_or(true);
        let order = match std::env::var("BERTCUDA_EMU_ORDER").as_deref() {
            Ok("reverse") => BlockOrder::Reverse,
            Ok("shuffled") => BlockOrder::Shuffled,
            _ => BlockOrder::Forward,
        };
        EmuOptions { check, order, planted_bug: None }
    }
}

/// bf16 of an f32 as the emulated kernels (and the device's cvt.rn) round it.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    unsafe { ffi::bcemu_f32_to_bf16(x) }
}

/// fp16 of an f32 as the emulated kernels round it.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    unsafe { ffi::bcemu_f32_to_f16(x) }
}

/// The f32 of an fp16 as the emulated kernels widen it.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    unsafe { ffi::bcemu_f16_to_f32(h) }
}

const ERR_CAP: usize = 8192;

/// One call of the runtime that reports a failure in an error buffer: Ok, or its message.
fn checked(call: impl FnOnce(*mut std::ffi::c_char, usize) -> i32) -> Result<()> {
    let mut err = vec![0u8; ERR_CAP];
    if call(err.as_mut_ptr().cast(), ERR_CAP) == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(Error::Invalid(format!("emulated device: {}", String::from_utf8_lossy(&err[..end]))))
}

pub struct Emu {
    opts: EmuOptions,
    used: std::rc::Rc<std::cell::Cell<u64>>,
}

/// An allocation of the emulated device; freed when dropped.
struct EmuAlloc {
    ptr: u64,
    bytes: usize,
    used: std::rc::Rc<std::cell::Cell<u64>>,
}

impl Drop for EmuAlloc {
    fn drop(&mut self) {
        unsafe { ffi::bcemu_free(self.ptr) };
        self.used.set(self.used.get() - self.bytes as u64);
    }
}

impl Emu {
    pub fn new(opts: EmuOptions) -> Result<Self> {
        if !built() {
            bail!(
                "--device emu: this binary was built without the emulated device (no C++ compiler was found \
                 at build time): run scripts/install-emulator-compiler.sh and rebuild"
            );
        }
        checked(|err, cap| unsafe { ffi::bcemu_init(opts.check as i32, err, cap) })?;
        Ok(Emu { opts, used: std::rc::Rc::new(std::cell::Cell::new(0)) })
    }

    /// Whether the checker runs on this device's launches.
    pub fn checking(&self) -> bool {
        self.opts.check && checker_built()
    }

    /// Allow up to `bytes` of dynamic shared memory for kernel `k` (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
    pub fn set_max_dynamic_shared(&self, k: Kernel, bytes: u32) -> Result<()> {
        if unsafe { ffi::bcemu_set_max_dynamic_shared(k.0 as i32, bytes) } != 0 {
            bail!("emulated device: {bytes} bytes of dynamic shared memory exceed the 232448 an sm_90 block may have");
        }
        Ok(())
    }

    /// `region` for each column of a column-major operand (rows × cols, leading dimension ld): what
    /// cuBLAS touches, not the elements between a column's end and the next.
    fn columns(
        &self,
        p: DevPtr,
        (rows, cols, ld): (usize, usize, usize),
        t: Elem,
        write: bool,
        what: &str,
    ) -> Result<()> {
        if ld == rows || cols <= 1 {
            return self.region(p, operand_span(what, rows, cols, ld)? * t.size(), write, what);
        }
        for j in 0..cols {
            self.region(p + (j * ld * t.size()) as u64, rows * t.size(), write, what)?;
        }
        Ok(())
    }

    fn region(&self, p: DevPtr, bytes: usize, write: bool, what: &str) -> Result<()> {
        let what = std::ffi::CString::new(what).expect("no NUL");
        checked(|err, cap| unsafe {
            ffi::bcemu_check_region(p, bytes as u64, write as i32, what.as_ptr(), err, cap)
        })
    }
}

/// The stored operand (`rows × cols`, leading dimension `ld`, starting at `p`) as fp32 values, each
/// rounded as `compute` rounds its operands.
///
/// # Safety
/// `p` must point at a live region of at least `operand_span` elements of type `t` (checked by the caller).
unsafe fn read_operand(p: DevPtr, t: Elem, span: usize, compute: Compute) -> Vec<f32> {
    let raw: Vec<f32> = match t {
        Elem::F32 => std::slice::from_raw_parts(p as *const f32, span).to_vec(),
        Elem::Bf16 => std::slice::from_raw_parts(p as *const u16, span)
            .iter()
            .map(|&b| f32::from_bits((b as u32) << 16))
            .collect(),
    };
    match (compute, t) {
        (Compute::Fast16Bf, Elem::F32) => {
            raw.into_iter().map(|x| f32::from_bits((f32_to_bf16_bits(x) as u32) << 16)).collect()
        }
        (Compute::Fast16F, _) => raw.into_iter().map(|x| f16_bits_to_f32(f32_to_f16_bits(x))).collect(),
        _ => raw,
    }
}

impl Device for Emu {
    fn name(&self) -> String {
        let check = if self.checking() { "checker on" } else { "checker off" };
        format!("emulated device on the CPU, {check}")
    }

    /// An sm_90 device: the precisions and kernels of a Hopper GPU are chosen.
    fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((9, 0))
    }

    fn memory_used(&self) -> Option<u64> {
        Some(self.used.get())
    }

    fn alloc(&self, bytes: usize, zeroed: bool) -> Result<Mem> {
        let ptr = unsafe { ffi::bcemu_alloc(bytes as u64, zeroed as i32) };
        if ptr == 0 {
            return Err(Error::OutOfMemory(format!(
                "emulated device: out of memory allocating {bytes} bytes"
            )));
        }
        self.used.set(self.used.get() + bytes as u64);
        Ok(Mem::new(ptr, bytes, Box::new(EmuAlloc { ptr, bytes, used: self.used.clone() })))
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        checked(|err, cap| unsafe { ffi::bcemu_htod(dst, src.as_ptr().cast(), src.len() as u64, err, cap) })
    }

    fn dtoh(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        checked(|err, cap| unsafe {
            ffi::bcemu_dtoh(dst.as_mut_ptr().cast(), src, dst.len() as u64, err, cap)
        })
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        checked(|err, cap| unsafe { ffi::bcemu_dtod(dst, src, bytes as u64, err, cap) })
    }

    fn memset_zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        checked(|err, cap| unsafe { ffi::bcemu_memset(dst, 0, bytes as u64, err, cap) })
    }

    /// The kernel of that name, or the planted bug's copy of it when the options name one that has it.
    fn kernel(&self, name: &str) -> Result<Kernel> {
        let find = |n: &str| {
            let c = std::ffi::CString::new(n).expect("no NUL in kernel names");
            unsafe { ffi::bcemu_kernel(c.as_ptr()) }
        };
        let planted = self.opts.planted_bug.as_ref().map_or(-1, |b| find(&format!("mutant/{b}/{name}")));
        let id = if planted >= 0 { planted } else { find(name) };
        if id < 0 {
            bail!("kernel {name} is missing from the emulated device's kernels");
        }
        Ok(Kernel(id as u32))
    }

    fn launch(&self, k: Kernel, l: Launch, args: &[&dyn KernelArg]) -> Result<()> {
        let mut ptrs: Vec<*mut std::ffi::c_void> =
            args.iter().map(|a| a.bytes().as_ptr() as *mut std::ffi::c_void).collect();
        let sizes: Vec<u32> = args.iter().map(|a| a.bytes().len() as u32).collect();
        let grid = [l.grid.0, l.grid.1, l.grid.2];
        let block = [l.block.0, l.block.1, l.block.2];
        let order = match self.opts.order {
            BlockOrder::Forward => 0,
            BlockOrder::Reverse => 1,
            BlockOrder::Shuffled => 2,
        };
        unsafe { ffi::bcemu_set_check(self.opts.check as i32) };
        // SAFETY: the runtime copies each argument (checked against the kernel's parameter sizes) before
        // running the kernel.
        checked(|err, cap| unsafe {
            ffi::bcemu_launch(
                k.0 as i32,
                grid.as_ptr(),
                block.as_ptr(),
                l.shared,
                ptrs.as_mut_ptr(),
                sizes.as_ptr(),
                ptrs.len() as i32,
                order,
                err,
                cap,
            )
        })
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        let (ar, ac) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        let sa = operand_span("A", ar, ac, g.lda)?;
        let sb = operand_span("B", br, bc, g.ldb)?;
        let sc = operand_span("C", g.m, g.n, g.ldc)?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let read_c = g.beta != 0.0;
        if g.k > 0 {
            self.columns(g.a, (ar, ac, g.lda), g.a_type, false, "matrix product operand A")?;
            self.columns(g.b, (br, bc, g.ldb), g.b_type, false, "matrix product operand B")?;
        }
        // C is read only when beta is not 0 (then it must have been written).
        self.columns(g.c, (g.m, g.n, g.ldc), g.c_type, !read_c, "matrix product output C")?;
        // SAFETY: each region was checked to lie inside one live allocation.
        let (a, b) = unsafe {
            if g.k > 0 {
                (read_operand(g.a, g.a_type, sa, g.compute), read_operand(g.b, g.b_type, sb, g.compute))
            } else {
                (vec![0.0; 1], vec![0.0; 1])
            }
        };
        let mut c =
            if read_c { unsafe { read_operand(g.c, g.c_type, sc, Compute::F32) } } else { vec![0f32; sc] };
        // op(A)(i, p): A(i, p) at i + p·lda, or A(p, i) at p + i·lda when transposed.
        let (a_rs, a_cs) = if g.trans_a { (g.lda as isize, 1) } else { (1, g.lda as isize) };
        let (b_rs, b_cs) = if g.trans_b { (g.ldb as isize, 1) } else { (1, g.ldb as isize) };
        if g.k > 0 {
            // SAFETY: the strides stay inside the spans computed above for these shapes.
            unsafe {
                gemm::gemm(
                    g.m,
                    g.n,
                    g.k,
                    c.as_mut_ptr(),
                    g.ldc as isize,
                    1,
                    read_c,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                )
            };
        } else if read_c {
            for j in 0..g.n {
                for i in 0..g.m {
                    c[i + j * g.ldc] *= g.beta;
                }
            }
        }
        match g.epilogue {
            Epilogue::None => {}
            Epilogue::Bias { bias, elem } => {
                self.region(bias, g.m * elem.size(), false, "matrix product bias")?;
                // SAFETY: the region was checked to lie inside one live allocation.
                let b = unsafe { read_operand(bias, elem, g.m, Compute::F32) };
                for j in 0..g.n {
                    for (x, &bi) in c[j * g.ldc..j * g.ldc + g.m].iter_mut().zip(&b) {
                        *x += bi;
                    }
                }
            }
            Epilogue::BiasGradB { grad } => {
                self.region(grad, 4 * g.n, true, "matrix product bias gradient")?;
                // Σ_p op(B)(p, j), p in order, of B as stored (not rounded to the compute type).
                let b = if g.k > 0 { unsafe { read_operand(g.b, g.b_type, sb, Compute::F32) } } else { b };
                let sums: Vec<f32> = (0..g.n)
                    .map(|j| {
                        (0..g.k).map(|p| b[(p as isize * b_rs + j as isize * b_cs) as usize]).sum::<f32>()
                    })
                    .collect();
                self.htod(grad, bytemuck::cast_slice(&sums))?;
            }
        }
        // Only the m × n elements are written back (the rest of each leading dimension is untouched).
        for j in 0..g.n {
            let col = &c[j * g.ldc..j * g.ldc + g.m];
            let at = g.c + (j * g.ldc * g.c_type.size()) as u64;
            match g.c_type {
                Elem::F32 => self.htod(at, bytemuck::cast_slice(col))?,
                Elem::Bf16 => {
                    let v: Vec<u16> = col.iter().map(|&x| f32_to_bf16_bits(x)).collect();
                    self.htod(at, bytemuck::cast_slice(&v))?
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self, _timeout: Option<Duration>) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum(&self, ptr: DevPtr, len: usize, comm: &dyn Comm) -> Result<()> {
        super::all_reduce_on_host(self, ptr, len, comm)
    }

    fn all_reduce_wait(&self) -> Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
