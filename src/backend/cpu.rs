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

use crate::backend::{
    philox, AdamWStep, AllocationMark, Backend, Buf, Dropout, Ints, LambLayout, LambStep, IGNORE_INDEX,
};
use crate::bail;
use crate::error::{Error, Result};
use crate::model::config::Activation;

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

/// A pointer that may cross threads: each thread writes a disjoint part (checked by the caller).
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

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

    fn check(&self, outs: &[Buf], ins: &[Buf]) -> Result<()> {
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
    unsafe fn r(&self, b: Buf) -> &[T] {
        let floats = &*self.floats.get();
        &floats[b.id as usize][b.off..b.off + b.len]
    }

    /// SAFETY: as `r`; the region is not aliased by any other view while this one lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn w(&self, b: Buf) -> &mut [T] {
        let floats = &mut *self.floats.get();
        let base = floats[b.id as usize].as_mut_ptr();
        std::slice::from_raw_parts_mut(base.add(b.off), b.len)
    }

    fn ints(&self, i: Ints) -> Result<&[i32]> {
        // SAFETY: i32 buffers are only written by upload_ints, never while an op holds a view.
        let ints = unsafe { &*self.ints.get() };
        match ints.get(i.id as usize) {
            Some(buf) if i.off + i.len <= buf.len() => Ok(&buf[i.off..i.off + i.len]),
            _ => bail!("internal: int region {i:?} out of bounds"),
        }
    }

    fn need(&self, what: &str, got: usize, want: usize) -> Result<()> {
        if got < want {
            bail!("internal: {what} holds {got} elements, {want} needed");
        }
        Ok(())
    }
}

fn gelu<T: Real>(x: T, act: Activation) -> T {
    let half = T::from_f64(0.5);
    match act {
        Activation::GeluErf => {
            half * x * (T::from_f64(1.0) + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
        }
        Activation::GeluTanh => {
            let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
            half * x * (T::from_f64(1.0) + (c * (x + T::from_f64(0.044715) * x * x * x)).tanh())
        }
    }
}

fn gelu_grad<T: Real>(x: T, act: Activation) -> T {
    let (half, one) = (T::from_f64(0.5), T::from_f64(1.0));
    match act {
        Activation::GeluErf => {
            let cdf = half * (one + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-(half * x * x)).exp() * T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let a = T::from_f64(0.044715);
            let t = (c * (x + a * x * x * x)).tanh();
            half * (one + t) + half * x * (one - t * t) * c * (one + T::from_f64(3.0) * a * x * x)
        }
    }
}

/// Sum `f(block of rows) -> partial (c)` over blocks of REDUCE_BLOCK rows, in block order, into `acc`.
fn reduce_rows<T: Real>(
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

impl<T: Real> Backend for Cpu<T> {
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
        self.check(&[c], &[a, b])?;
        self.need("matmul C", c.len, m * n)?;
        self.need("matmul A", a.len, m * k)?;
        self.need("matmul B", b.len, k * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (cv, av, bv) = unsafe { (self.w(c), self.r(a), self.r(b)) };
        if k == 0 {
            if !accumulate {
                cv[..m * n].fill(T::default());
            }
            return Ok(());
        }
        let (lhs_cs, lhs_rs) = if a_t { (m as isize, 1) } else { (1, k as isize) };
        let (rhs_cs, rhs_rs) = if b_t { (k as isize, 1) } else { (1, n as isize) };
        let par = if m * n * k >= 1 << 15 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the regions were bounds-checked for these shapes and strides, and C does not overlap A or B.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cv.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                av.as_ptr(),
                lhs_cs,
                lhs_rs,
                bv.as_ptr(),
                rhs_cs,
                rhs_rs,
                T::from_f64(1.0),
                T::from_f64(1.0),
                false,
                false,
                false,
                par,
            )
        };
        Ok(())
    }

    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize) -> Result<()> {
        self.check(&[out], &[bias])?;
        self.need("add_bias out", out.len, rows * cols)?;
        let (o, b) = unsafe { (self.w(out), self.r(bias)) };
        o[..rows * cols].par_chunks_mut(cols).for_each(|row| {
            for (x, &bb) in row.iter_mut().zip(b) {
                *x += bb;
            }
        });
        Ok(())
    }

    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize) -> Result<()> {
        self.check(&[dbias], &[dout])?;
        self.need("bias_grad dout", dout.len, rows * cols)?;
        let (db, d) = unsafe { (self.w(dbias), self.r(dout)) };
        reduce_rows(rows, cols, &mut db[..cols], |range, p| {
            for r in range {
                for (acc, &x) in p.iter_mut().zip(&d[r * cols..(r + 1) * cols]) {
                    *acc += x;
                }
            }
        });
        Ok(())
    }

    fn add(&self, out: Buf, a: Buf, b: Buf) -> Result<()> {
        self.check(&[out], &[a, b])?;
        self.need("add", a.len.min(b.len), out.len)?;
        let (o, a, b) = unsafe { (self.w(out), self.r(a), self.r(b)) };
        o.par_iter_mut().zip(a.par_iter().zip(b)).for_each(|(o, (&a, &b))| *o = a + b);
        Ok(())
    }

    fn sum(&self, out: Buf, inp: Buf) -> Result<()> {
        self.check(&[out], &[inp])?;
        let s: f64 = unsafe { self.r(inp) }.iter().map(|x| x.to_f64()).sum();
        unsafe { self.w(out)[0] = T::from_f64(s) };
        Ok(())
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
        self.check(&[out], &[word, position, token_type])?;
        let n = batch * seq;
        self.need("embeddings out", out.len, n * h)?;
        let (ids, types) = (self.ints(ids)?, self.ints(types)?);
        let (o, wv, pv, tv) = unsafe { (self.w(out), self.r(word), self.r(position), self.r(token_type)) };
        let (nv, np, nt) = (word.len / h, position.len / h, token_type.len / h);
        if seq > np {
            bail!("sequence length {seq} exceeds max_position_embeddings {np}");
        }
        if let Some(&bad) = ids[..n].iter().find(|&&i| i < 0 || i as usize >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        if let Some(&bad) = types[..n].iter().find(|&&i| i < 0 || i as usize >= nt) {
            bail!("token type {bad} is outside type_vocab_size {nt}");
        }
        o[..n * h].par_chunks_mut(h).enumerate().for_each(|(r, row)| {
            let (id, ty, t) = (ids[r] as usize, types[r] as usize, r % seq);
            let (we, pe, te) = (&wv[id * h..][..h], &pv[t * h..][..h], &tv[ty * h..][..h]);
            for j in 0..h {
                row[j] = we[j] + pe[j] + te[j];
            }
        });
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
        self.check(&[dword, dposition, dtoken_type], &[dout])?;
        let n = batch * seq;
        let (ids, types) = (self.ints(ids)?, self.ints(types)?);
        let (dw, dp, dt, d) =
            unsafe { (self.w(dword), self.w(dposition), self.w(dtoken_type), self.r(dout)) };
        // In row order: the same sums in the same order whatever the thread count.
        for r in 0..n {
            let g = &d[r * h..(r + 1) * h];
            let (id, ty, t) = (ids[r] as usize, types[r] as usize, r % seq);
            for (targ, base) in [(&mut *dw, id * h), (&mut *dp, t * h), (&mut *dt, ty * h)] {
                for (x, &gv) in targ[base..base + h].iter_mut().zip(g) {
                    *x += gv;
                }
            }
        }
        Ok(())
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
        self.check(&[out, mean, rstd], &[inp, w, b])?;
        self.need("layernorm out", out.len.min(inp.len), rows * c)?;
        self.need("layernorm stats", mean.len.min(rstd.len), rows)?;
        let (o, mv, rv, x, wv, bv) =
            unsafe { (self.w(out), self.w(mean), self.w(rstd), self.r(inp), self.r(w), self.r(b)) };
        let eps = T::from_f64(eps as f64);
        let cf = T::from_f64(c as f64);
        o[..rows * c]
            .par_chunks_mut(c)
            .zip(mv[..rows].par_iter_mut().zip(rv[..rows].par_iter_mut()))
            .enumerate()
            .for_each(|(r, (row, (m, s)))| {
                let xr = &x[r * c..(r + 1) * c];
                let mu = xr.iter().copied().sum::<T>() / cf;
                let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() / cf;
                let rs = T::from_f64(1.0) / (var + eps).sqrt();
                for j in 0..c {
                    row[j] = (xr[j] - mu) * rs * wv[j] + bv[j];
                }
                *m = mu;
                *s = rs;
            });
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
        self.check(&[dinp, dw, db], &[dout, inp, mean, rstd, w])?;
        self.need("layernorm dinp", dinp.len, rows * c)?;
        let (di, dwv, dbv, d, x, mv, rv, wv) = unsafe {
            (
                self.w(dinp),
                self.w(dw),
                self.w(db),
                self.r(dout),
                self.r(inp),
                self.r(mean),
                self.r(rstd),
                self.r(w),
            )
        };
        let cf = T::from_f64(c as f64);
        di[..rows * c].par_chunks_mut(c).enumerate().for_each(|(r, dr)| {
            let (xr, g) = (&x[r * c..(r + 1) * c], &d[r * c..(r + 1) * c]);
            let (mu, rs) = (mv[r], rv[r]);
            let (mut mean_dxhat, mut mean_dxhat_xhat) = (T::default(), T::default());
            for j in 0..c {
                let xhat = (xr[j] - mu) * rs;
                let dxhat = g[j] * wv[j];
                mean_dxhat += dxhat;
                mean_dxhat_xhat += dxhat * xhat;
            }
            mean_dxhat = mean_dxhat / cf;
            mean_dxhat_xhat = mean_dxhat_xhat / cf;
            for j in 0..c {
                let xhat = (xr[j] - mu) * rs;
                dr[j] = rs * (g[j] * wv[j] - mean_dxhat - xhat * mean_dxhat_xhat);
            }
        });
        let mut both = vec![T::default(); 2 * c];
        reduce_rows(rows, 2 * c, &mut both, |range, p| {
            for r in range {
                let (xr, g) = (&x[r * c..(r + 1) * c], &d[r * c..(r + 1) * c]);
                for j in 0..c {
                    p[j] += g[j] * (xr[j] - mv[r]) * rv[r];
                    p[c + j] += g[j];
                }
            }
        });
        for j in 0..c {
            dwv[j] += both[j];
            dbv[j] += both[c + j];
        }
        Ok(())
    }

    fn gelu_fwd(&self, out: Buf, inp: Buf, act: Activation) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        o.par_iter_mut().zip(x.par_iter()).for_each(|(o, &x)| *o = gelu(x, act));
        Ok(())
    }

    fn gelu_bwd(&self, dinp: Buf, dout: Buf, inp: Buf, act: Activation) -> Result<()> {
        self.check(&[dinp], &[dout, inp])?;
        let (di, d, x) = unsafe { (self.w(dinp), self.r(dout), self.r(inp)) };
        di.par_iter_mut()
            .zip(d.par_iter().zip(x.par_iter()))
            .for_each(|(di, (&d, &x))| *di = d * gelu_grad(x, act));
        Ok(())
    }

    fn tanh_fwd(&self, out: Buf, inp: Buf) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = x.tanh());
        Ok(())
    }

    fn tanh_bwd(&self, dinp: Buf, dout: Buf, out: Buf) -> Result<()> {
        self.check(&[dinp], &[dout, out])?;
        let (di, d, y) = unsafe { (self.w(dinp), self.r(dout), self.r(out)) };
        di.iter_mut().zip(d.iter().zip(y)).for_each(|(di, (&d, &y))| *di = d * (T::from_f64(1.0) - y * y));
        Ok(())
    }

    fn dropout_fwd(&self, out: Buf, inp: Buf, d: Dropout) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        dropout_apply(o, x, d);
        Ok(())
    }

    fn dropout_bwd(&self, dinp: Buf, dout: Buf, d: Dropout) -> Result<()> {
        self.check(&[dinp], &[dout])?;
        let (o, x) = unsafe { (self.w(dinp), self.r(dout)) };
        dropout_apply(o, x, d);
        Ok(())
    }

    fn attention_state_len(&self, batch: usize, seq: usize, heads: usize) -> usize {
        batch * heads * seq * seq
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
        self.check(&[out, state], &[qkv])?;
        let h = heads * hs;
        self.need("attention out", out.len, batch * seq * h)?;
        self.need("attention qkv", qkv.len, batch * seq * 3 * h)?;
        self.need("attention state", state.len, self.attention_state_len(batch, seq, heads))?;
        let mask = self.ints(mask)?;
        self.need("attention mask", mask.len(), batch * seq)?;
        let (o, probs, x) = unsafe { (self.w(out), self.w(state), self.r(qkv)) };
        let scale = T::from_f64(1.0 / (hs as f64).sqrt());
        let optr = SyncPtr(o.as_mut_ptr());
        let drop = dropout
            .map(|d| (philox::key(d.key), philox::threshold(d.p), T::from_f64(1.0 / (1.0 - d.p as f64))));
        probs[..batch * heads * seq * seq].par_chunks_mut(seq * seq).enumerate().for_each(|(bh, p)| {
            let (b, hd) = (bh / heads, bh % heads);
            let m = &mask[b * seq..(b + 1) * seq];
            let any_key = m.iter().any(|&v| v != 0);
            let row = |t: usize, part: usize| &x[(b * seq + t) * 3 * h + part * h + hd * hs..][..hs];
            let mut acc = vec![T::default(); hs];
            for i in 0..seq {
                let q = row(i, 0);
                let pi = &mut p[i * seq..(i + 1) * seq];
                let mut mx = T::from_f64(f64::NEG_INFINITY);
                for j in 0..seq {
                    if m[j] != 0 || !any_key {
                        let k = row(j, 1);
                        let s = q.iter().zip(k).map(|(&a, &b)| a * b).sum::<T>() * scale;
                        pi[j] = s;
                        if s > mx {
                            mx = s;
                        }
                    }
                }
                let mut z = T::default();
                for j in 0..seq {
                    if m[j] != 0 || !any_key {
                        pi[j] = (pi[j] - mx).exp();
                        z += pi[j];
                    } else {
                        pi[j] = T::default();
                    }
                }
                for v in pi.iter_mut() {
                    *v = *v / z;
                }
                // out row i of this head = Σ_j dropout(p_ij) v_j
                acc.fill(T::default());
                for j in 0..seq {
                    let mut pij = pi[j];
                    if let Some((key, thr, inv)) = drop {
                        let e = ((bh * seq + i) * seq + j) as u64;
                        pij = if philox::draw(key, e) >= thr { pij * inv } else { T::default() };
                    }
                    if pij != T::default() {
                        for (a, &vv) in acc.iter_mut().zip(row(j, 2)) {
                            *a += pij * vv;
                        }
                    }
                }
                // SAFETY: (b, head, i) owns out[(b·T + i)·H + head·hs ..][..hs]; no other task writes it.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut({ optr }.0.add((b * seq + i) * h + hd * hs), hs)
                };
                dst.copy_from_slice(&acc);
            }
        });
        Ok(())
    }

    fn attention_bwd(
        &self,
        dqkv: Buf,
        dout: Buf,
        _out: Buf,
        qkv: Buf,
        state: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        hs: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        self.check(&[dqkv], &[dout, qkv, state])?;
        let h = heads * hs;
        self.need("attention dqkv", dqkv.len, batch * seq * 3 * h)?;
        let _ = self.ints(mask)?;
        let (dx, d, x, probs) = unsafe { (self.w(dqkv), self.r(dout), self.r(qkv), self.r(state)) };
        let scale = T::from_f64(1.0 / (hs as f64).sqrt());
        let dptr = SyncPtr(dx.as_mut_ptr());
        let drop = dropout
            .map(|d| (philox::key(d.key), philox::threshold(d.p), T::from_f64(1.0 / (1.0 - d.p as f64))));
        (0..batch * heads).into_par_iter().for_each(|bh| {
            let (b, hd) = (bh / heads, bh % heads);
            let p = &probs[bh * seq * seq..(bh + 1) * seq * seq];
            let row = |t: usize, part: usize| &x[(b * seq + t) * 3 * h + part * h + hd * hs..][..hs];
            let go = |t: usize| &d[(b * seq + t) * h + hd * hs..][..hs];
            let (mut dq, mut dk, mut dv) =
                (vec![T::default(); seq * hs], vec![T::default(); seq * hs], vec![T::default(); seq * hs]);
            let mut dp = vec![T::default(); seq];
            for i in 0..seq {
                let pi = &p[i * seq..(i + 1) * seq];
                let g = go(i);
                // dP_ij = dout_i · v_j through the dropout; dv_j += dropout(p_ij) dout_i
                let mut dot = T::default();
                for j in 0..seq {
                    let keep = match drop {
                        Some((key, thr, inv)) => {
                            if philox::draw(key, ((bh * seq + i) * seq + j) as u64) >= thr {
                                inv
                            } else {
                                T::default()
                            }
                        }
                        None => T::from_f64(1.0),
                    };
                    let v = row(j, 2);
                    let gv = g.iter().zip(v).map(|(&a, &b)| a * b).sum::<T>();
                    dp[j] = gv * keep;
                    let pd = pi[j] * keep;
                    if pd != T::default() {
                        for (dvv, &gg) in dv[j * hs..(j + 1) * hs].iter_mut().zip(g) {
                            *dvv += pd * gg;
                        }
                    }
                    dot += pi[j] * dp[j];
                }
                // dS_ij = p_ij (dP_ij − Σ_k p_ik dP_ik); dq_i = scale Σ_j dS_ij k_j; dk_j += scale dS_ij q_i
                let q = row(i, 0);
                for j in 0..seq {
                    let ds = pi[j] * (dp[j] - dot) * scale;
                    if ds == T::default() {
                        continue;
                    }
                    let k = row(j, 1);
                    for t in 0..hs {
                        dq[i * hs + t] += ds * k[t];
                        dk[j * hs + t] += ds * q[t];
                    }
                }
            }
            for t in 0..seq {
                let base = (b * seq + t) * 3 * h + hd * hs;
                for (part, src) in [(0, &dq), (1, &dk), (2, &dv)] {
                    // SAFETY: (b, head) owns columns head·hs.. of each third of its rows of dqkv.
                    let dst = unsafe { std::slice::from_raw_parts_mut({ dptr }.0.add(base + part * h), hs) };
                    dst.copy_from_slice(&src[t * hs..(t + 1) * hs]);
                }
            }
        });
        Ok(())
    }

    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()> {
        self.check(&[out], &[x])?;
        let xs = unsafe { self.r(x) };
        // Fixed blocks summed in order: the same result for any thread count.
        let partials: Vec<f64> =
            xs.par_chunks(1 << 14).map(|c| c.iter().map(|v| v.to_f64() * v.to_f64()).sum()).collect();
        unsafe { self.w(out)[0] = T::from_f64(partials.iter().sum()) };
        Ok(())
    }

    fn scale(&self, x: Buf, factor: f32) -> Result<()> {
        self.check(&[x], &[])?;
        let f = T::from_f64(factor as f64);
        unsafe { self.w(x) }.par_iter_mut().for_each(|v| *v *= f);
        Ok(())
    }

    fn adamw(&self, params: Buf, grads: Buf, m: Buf, v: Buf, decay: Ints, h: &AdamWStep) -> Result<()> {
        self.check(&[params, m, v], &[grads])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n || decay.len != n {
            bail!("internal: adamw buffers of different lengths");
        }
        let decay = self.ints(decay)?;
        let (p, g, mv, vv) = unsafe { (self.w(params), self.r(grads), self.w(m), self.w(v)) };
        // As torch's single-tensor AdamW, in the parameters' precision.
        let c = |x: f64| T::from_f64(x);
        let (lr, b1, b2, eps, wd) =
            (h.lr as f64, h.beta1 as f64, h.beta2 as f64, h.eps as f64, h.weight_decay as f64);
        let bc1 = 1.0 - b1.powi(h.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(h.step as i32)).sqrt();
        let (decay_f, step_size) = (c(1.0 - lr * wd), c(lr / bc1));
        let (one_b1, b2t, one_b2, bc2s, epst) = (c(1.0 - b1), c(b2), c(1.0 - b2), c(bc2_sqrt), c(eps));
        p.par_iter_mut()
            .zip(g.par_iter())
            .zip(mv.par_iter_mut().zip(vv.par_iter_mut()))
            .zip(decay.par_iter())
            .for_each(|(((p, &g), (m, v)), &d)| {
                if d != 0 {
                    *p *= decay_f;
                }
                *m += (g - *m) * one_b1;
                *v = *v * b2t + g * g * one_b2;
                let denom = v.sqrt() / bc2s + epst;
                *p -= step_size * (*m / denom);
            });
        Ok(())
    }

    fn lamb(&self, params: Buf, grads: Buf, m: Buf, v: Buf, layout: &LambLayout, h: &LambStep) -> Result<()> {
        self.check(&[params, m, v], &[grads])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n {
            bail!("internal: lamb buffers of different lengths");
        }
        let table = self.ints(layout.table)?;
        let (chunks, tensor_part) = table.split_at(4 * layout.chunks);
        // Each tensor's range and decay flag, from its chunks.
        let ranges: Vec<(usize, usize, bool)> = tensor_part
            .chunks_exact(2)
            .filter(|t| t[1] > 0) // an empty tensor has no chunks and nothing to update
            .map(|t| {
                let (first, count) = (t[0] as usize, t[1] as usize);
                let (a, b) = (
                    &chunks[4 * first..4 * first + 4],
                    &chunks[4 * (first + count - 1)..4 * (first + count)],
                );
                (a[0] as usize, (b[0] + b[1]) as usize, a[3] != 0)
            })
            .collect();
        let (p, g, mv, vv) = unsafe { (self.w(params), self.r(grads), self.w(m), self.w(v)) };
        // Disjoint per-tensor slices, updated in parallel.
        let mut parts = Vec::with_capacity(ranges.len());
        let (mut p_rest, mut m_rest, mut v_rest, mut at) = (&mut p[..], &mut mv[..], &mut vv[..], 0usize);
        for &(start, end, decays) in &ranges {
            if start != at || end > n {
                bail!("internal: lamb tensors do not tile the buffer");
            }
            let (p0, p1) = std::mem::take(&mut p_rest).split_at_mut(end - start);
            let (m0, m1) = std::mem::take(&mut m_rest).split_at_mut(end - start);
            let (v0, v1) = std::mem::take(&mut v_rest).split_at_mut(end - start);
            parts.push((p0, &g[start..end], m0, v0, decays));
            (p_rest, m_rest, v_rest, at) = (p1, m1, v1, end);
        }
        // FusedLAMB in the parameters' precision; the two norms accumulated in f64.
        let c = |x: f64| T::from_f64(x);
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let (bc1, bc2) = (1.0 - b1.powi(h.step as i32), 1.0 - b2.powi(h.step as i32));
        let (b1t, one_b1, b2t, one_b2) = (c(b1), c(1.0 - b1), c(b2), c(1.0 - b2));
        let (bc1t, bc2t, eps, div) = (c(bc1), c(bc2), c(h.eps as f64), c(h.grad_divisor as f64));
        parts.into_par_iter().for_each(|(p, g, m, v, decays)| {
            let wd = c(if decays { h.weight_decay as f64 } else { 0.0 });
            let (mut wn, mut un) = (0f64, 0f64);
            for i in 0..p.len() {
                let gi = g[i] / div;
                m[i] = b1t * m[i] + one_b1 * gi;
                v[i] = b2t * v[i] + one_b2 * gi * gi;
                let u = (m[i] / bc1t) / ((v[i] / bc2t).sqrt() + eps) + wd * p[i];
                wn += p[i].to_f64() * p[i].to_f64();
                un += u.to_f64() * u.to_f64();
            }
            let (wn, un) = (wn.sqrt(), un.sqrt());
            let trusted = h.all_tensors || (decays && h.weight_decay != 0.0);
            let ratio = if trusted && wn > 0.0 && un > 0.0 { wn / un } else { 1.0 };
            let step = c(h.lr as f64 * ratio);
            for i in 0..p.len() {
                let u = (m[i] / bc1t) / ((v[i] / bc2t).sqrt() + eps) + wd * p[i];
                p[i] -= step * u;
            }
        });
        Ok(())
    }

    fn argmax_rows(&self, out: Ints, logits: Buf, m: usize, v: usize) -> Result<()> {
        self.check(&[], &[logits])?;
        self.need("argmax logits", logits.len, m * v)?;
        let z = unsafe { self.r(logits) };
        let best: Vec<i32> = z[..m * v]
            .par_chunks(v)
            .map(|row| {
                let mut b = 0;
                for j in 1..v {
                    if row[j] > row[b] {
                        b = j;
                    }
                }
                b as i32
            })
            .collect();
        self.upload_ints(out, &best)
    }

    fn gather_rows(&self, out: Buf, inp: Buf, rows: Ints, m: usize, c: usize) -> Result<()> {
        self.check(&[out], &[inp])?;
        self.need("gather out", out.len, m * c)?;
        let rows = self.ints(rows)?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        let n = x.len() / c.max(1);
        if let Some(&bad) = rows[..m].iter().find(|&&r| r < 0 || r as usize >= n) {
            bail!("row {bad} outside the {n} rows");
        }
        o[..m * c]
            .par_chunks_mut(c)
            .zip(&rows[..m])
            .for_each(|(dst, &r)| dst.copy_from_slice(&x[r as usize * c..][..c]));
        Ok(())
    }

    fn scatter_add_rows(&self, dinp: Buf, dout: Buf, rows: Ints, m: usize, c: usize) -> Result<()> {
        self.check(&[dinp], &[dout])?;
        let rows = self.ints(rows)?;
        let (di, d) = unsafe { (self.w(dinp), self.r(dout)) };
        for (k, &r) in rows[..m].iter().enumerate() {
            for (a, &g) in di[r as usize * c..][..c].iter_mut().zip(&d[k * c..(k + 1) * c]) {
                *a += g;
            }
        }
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
        self.check(&[losses, logits], &[])?;
        self.need("cross_entropy logits", logits.len, m * v)?;
        let labels = self.ints(labels)?;
        if let Some(&bad) = labels[..m].iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v)) {
            bail!("label {bad} is outside the {v} classes (and not {IGNORE_INDEX})");
        }
        let (lv, z) = unsafe { (self.w(losses), self.w(logits)) };
        let scale = grad_scale.map(T::from_f64);
        lv[..m].par_iter_mut().zip(z[..m * v].par_chunks_mut(v)).zip(&labels[..m]).for_each(
            |((loss, row), &label)| {
                if label == IGNORE_INDEX {
                    *loss = T::default();
                    if scale.is_some() {
                        row.fill(T::default());
                    }
                    return;
                }
                let mut mx = row[0];
                for &x in row.iter() {
                    if x > mx {
                        mx = x;
                    }
                }
                let s: T = row.iter().map(|&x| (x - mx).exp()).sum();
                let lse = mx + s.ln();
                *loss = lse - row[label as usize];
                if let Some(sc) = scale {
                    for x in row.iter_mut() {
                        *x = (*x - lse).exp() * sc;
                    }
                    row[label as usize] -= sc;
                }
            },
        );
        Ok(())
    }
}

fn dropout_apply<T: Real>(out: &mut [T], inp: &[T], d: Dropout) {
    let key = philox::key(d.key);
    let thr = philox::threshold(d.p);
    let inv = T::from_f64(1.0 / (1.0 - d.p as f64));
    out.par_iter_mut().zip(inp.par_iter()).enumerate().for_each(|(e, (o, &x))| {
        *o = if philox::draw(key, e as u64) >= thr { x * inv } else { T::default() };
    });
}
