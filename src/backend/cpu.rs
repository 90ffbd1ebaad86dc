//! The CPU backend: the reference every CUDA kernel is held to. Generic over the float type: f32 to run,
//! f64 for gradient checks. Matrix products use the `gemm` crate (pure Rust, SIMD, multi-threaded); the
//! other ops are plain loops over rows, parallel with rayon where rows are independent. Reductions over
//! rows (bias and LayerNorm gradients) sum fixed blocks of rows and then the blocks in order, so results do
//! not depend on the thread count.

use std::cell::{Cell, UnsafeCell};
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use rayon::prelude::*;

use crate::backend::{AllocationMark, Buf, Ints, Memory};
use crate::bail;
use crate::error::{Error, Result};

/// The float types the CPU backend computes in.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    const NAME: &'static str;
}

impl Real for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
    const NAME: &'static str = "fp32";
}

impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    const NAME: &'static str = "fp64";
}

/// Rows per block of a deterministic reduction over rows.
const REDUCE_BLOCK: usize = 64;

pub struct Cpu<T: Real> {
    floats: UnsafeCell<Vec<Box<[T]>>>,
    ints: UnsafeCell<Vec<Box<[i32]>>>,
    /// Bytes allocated so far, and the memory available when the backend was made (Linux): an
    /// allocation past it is an error, not an abort or a kill by the OOM killer later.
    allocated: Cell<u64>,
    available: Option<u64>,
}

impl<T: Real> Default for Cpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Real> Cpu<T> {
    pub fn new() -> Self {
        Cpu {
            floats: UnsafeCell::new(Vec::new()),
            ints: UnsafeCell::new(Vec::new()),
            allocated: Cell::new(0),
            available: crate::fsutil::mem_available(),
        }
    }

    /// Count `bytes` against the available memory.
    fn reserve(&self, bytes: u64) -> Result<()> {
        let total = self.allocated.get() + bytes;
        if let Some(avail) = self.available.filter(|&a| total > a) {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::OutOfMemory(format!(
                "out of memory: {:.1} GiB allocated would exceed the {:.1} GiB of memory available",
                gib(total),
                gib(avail)
            )));
        }
        self.allocated.set(total);
        Ok(())
    }

    pub(crate) fn check(&self, outs: &[Buf], ins: &[Buf]) -> Result<()> {
        // SAFETY: reading the table of buffers; no op is running (the backend is not Sync).
        let floats = unsafe { &*self.floats.get() };
        for b in outs.iter().chain(ins) {
            match floats.get(b.id as usize) {
                Some(buf) if b.off + b.len <= buf.len() => {}
                _ => bail!("internal: buffer region {b:?} out of bounds"),
            }
        }
        for (i, o) in outs.iter().enumerate() {
            if outs[i + 1..].iter().chain(ins).any(|x| o.overlaps(x)) {
                bail!("internal: output region {o:?} overlaps another argument");
            }
        }
        Ok(())
    }

    /// SAFETY: the caller has checked (with `check`) that no mutable view overlaps any other view.
    pub(crate) unsafe fn r(&self, b: Buf) -> &[T] {
        let floats = &*self.floats.get();
        &floats[b.id as usize][b.off..b.off + b.len]
    }

    /// SAFETY: as `r`; the region is not aliased by any other view while this one lives.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn w(&self, b: Buf) -> &mut [T] {
        let floats = &mut *self.floats.get();
        let base = floats[b.id as usize].as_mut_ptr();
        std::slice::from_raw_parts_mut(base.add(b.off), b.len)
    }

    pub(crate) fn ints(&self, i: Ints) -> Result<&[i32]> {
        // SAFETY: i32 buffers are only written by upload_ints, never while an op holds a view.
        let ints = unsafe { &*self.ints.get() };
        match ints.get(i.id as usize) {
            Some(buf) if i.off + i.len <= buf.len() => Ok(&buf[i.off..i.off + i.len]),
            _ => bail!("internal: int region {i:?} out of bounds"),
        }
    }

    /// The i32 region to write (the step control's counters).
    /// SAFETY: no other view of the region lives while this one does.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn ints_mut(&self, i: Ints) -> Result<&mut [i32]> {
        let ints = &mut *self.ints.get();
        match ints.get_mut(i.id as usize) {
            Some(buf) if i.off + i.len <= buf.len() => Ok(&mut buf[i.off..i.off + i.len]),
            _ => bail!("internal: int region {i:?} out of bounds"),
        }
    }

    pub(crate) fn need(&self, what: &str, got: usize, want: usize) -> Result<()> {
        if got < want {
            bail!("internal: {what} holds {got} elements, {want} needed");
        }
        Ok(())
    }
}

/// Sum `f(block of rows) -> partial (c)` over blocks of REDUCE_BLOCK rows, in block order, into `acc`.
pub(crate) fn reduce_rows<T: Real>(
    rows: usize,
    c: usize,
    acc: &mut [T],
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let blocks = rows.div_ceil(REDUCE_BLOCK);
    let partials: Vec<Vec<T>> = (0..blocks)
        .into_par_iter()
        .map(|k| {
            let mut p = vec![T::default(); c];
            f(k * REDUCE_BLOCK..((k + 1) * REDUCE_BLOCK).min(rows), &mut p);
            p
        })
        .collect();
    for p in partials {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

impl<T: Real> Memory for Cpu<T> {
    fn describe(&self) -> String {
        format!("cpu ({}, {} threads)", T::NAME, rayon::current_num_threads())
    }

    fn alloc(&self, len: usize) -> Result<Buf> {
        self.reserve((len * std::mem::size_of::<T>()) as u64)?;
        // SAFETY: no view is alive across calls; pushing moves only the Box pointers, not the data.
        let floats = unsafe { &mut *self.floats.get() };
        floats.push(vec![T::default(); len].into_boxed_slice());
        Ok(Buf { id: floats.len() as u32 - 1, off: 0, len })
    }

    fn alloc_ints(&self, len: usize) -> Result<Ints> {
        self.reserve((len * 4) as u64)?;
        let ints = unsafe { &mut *self.ints.get() };
        ints.push(vec![0; len].into_boxed_slice());
        Ok(Ints { id: ints.len() as u32 - 1, off: 0, len })
    }

    fn allocation_mark(&self) -> AllocationMark {
        // SAFETY: reading the lengths of the tables; no op is running (the backend is not Sync).
        unsafe { AllocationMark { floats: (*self.floats.get()).len(), ints: (*self.ints.get()).len() } }
    }

    fn release_since(&self, mark: AllocationMark) -> Result<()> {
        // SAFETY: no view is alive across calls; the released buffers' handles are not used again.
        let (floats, ints) = unsafe { (&mut *self.floats.get(), &mut *self.ints.get()) };
        if mark.floats > floats.len() || mark.ints > ints.len() {
            bail!("internal: release to a mark past the allocations");
        }
        let bytes: usize =
            floats[mark.floats..].iter().map(|b| b.len() * std::mem::size_of::<T>()).sum::<usize>()
                + ints[mark.ints..].iter().map(|b| b.len() * 4).sum::<usize>();
        floats.truncate(mark.floats);
        ints.truncate(mark.ints);
        self.allocated.set(self.allocated.get() - bytes as u64);
        Ok(())
    }

    fn upload(&self, dst: Buf, src: &[f32]) -> Result<()> {
        self.check(&[dst], &[])?;
        self.need("upload destination", dst.len, src.len())?;
        let d = unsafe { self.w(dst) };
        for (d, &s) in d.iter_mut().zip(src) {
            *d = T::from_f64(s as f64);
        }
        Ok(())
    }

    fn upload_f64(&self, dst: Buf, src: &[f64]) -> Result<()> {
        self.check(&[dst], &[])?;
        self.need("upload destination", dst.len, src.len())?;
        let d = unsafe { self.w(dst) };
        for (d, &s) in d.iter_mut().zip(src) {
            *d = T::from_f64(s);
        }
        Ok(())
    }

    fn download(&self, src: Buf) -> Result<Vec<f32>> {
        self.check(&[], &[src])?;
        Ok(unsafe { self.r(src) }.iter().map(|x| x.to_f64() as f32).collect())
    }

    fn download_f64(&self, src: Buf) -> Result<Vec<f64>> {
        self.check(&[], &[src])?;
        Ok(unsafe { self.r(src) }.iter().map(|x| x.to_f64()).collect())
    }

    fn upload_ints(&self, dst: Ints, src: &[i32]) -> Result<()> {
        self.ints(dst)?;
        self.need("upload destination", dst.len, src.len())?;
        let ints = unsafe { &mut *self.ints.get() };
        ints[dst.id as usize][dst.off..dst.off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download_ints(&self, src: Ints) -> Result<Vec<i32>> {
        Ok(self.ints(src)?.to_vec())
    }

    fn fill(&self, dst: Buf, value: f32) -> Result<()> {
        self.check(&[dst], &[])?;
        unsafe { self.w(dst) }.fill(T::from_f64(value as f64));
        Ok(())
    }

    fn copy(&self, dst: Buf, src: Buf) -> Result<()> {
        self.check(&[dst], &[src])?;
        self.need("copy destination", dst.len, src.len)?;
        unsafe { self.w(dst)[..src.len].copy_from_slice(self.r(src)) };
        Ok(())
    }
}
