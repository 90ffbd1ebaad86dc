//! Generic tensor ops that are not model math: an elementwise sum, a full sum, and the row gathers of the
//! heads (gather_rows, scatter_add_rows). Kernels: kernels/tensor.cu (which also holds the fill, the bf16
//! cast of the parameters and the second stage of the row reductions, used by the memory layer and the
//! other families).
//!
//! One op family in two places: its kernels in `kernels/tensor.cu`, and this file: the `Tensor` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Tensor for Cpu<T>`), the CUDA launchers
//! (`impl Tensor for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{PARTIAL_ROWS, THREADS};
use crate::backend::cuda::Cuda;
use crate::backend::{Buf, Ints};
use crate::bail;
use crate::error::Result;

pub trait Tensor {
    /// out (n) = a + b.
    fn add(&self, out: Buf, a: Buf, b: Buf) -> Result<()>;
    /// out (1) += Σ inp (loss sums accumulate over a step's micro-batches).
    fn sum(&self, out: Buf, inp: Buf) -> Result<()>;
    /// out (m, c) = inp[rows] (inp (·, c)).
    fn gather_rows(&self, out: Buf, inp: Buf, rows: Ints, m: usize, c: usize) -> Result<()>;
    /// dinp[rows] += dout (m, c).
    fn scatter_add_rows(&self, dinp: Buf, dout: Buf, rows: Ints, m: usize, c: usize) -> Result<()>;
}

impl<T: Real> Tensor for Cpu<T> {
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
        unsafe { self.w(out)[0] += T::from_f64(s) };
        Ok(())
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
}

impl Tensor for Cuda {
    fn add(&self, out: Buf, a: Buf, b: Buf) -> Result<()> {
        let dt = self.storage(out)?;
        Self::need("add", a.len.min(b.len), out.len)?;
        let ([po], [pa, pb]) = self.ptrs_as(dt, [out], [a, b])?;
        self.elementwise(self.k.add.of(dt), &[po, pa, pb], out.len, None::<&i32>)
    }

    fn sum(&self, out: Buf, inp: Buf) -> Result<()> {
        self.need_f32("sum output", &[out])?;
        let dt = self.storage(inp)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        // Σ as the bias gradient of a one-column matrix: blocks of 64 rows, then the blocks in order.
        let chunks = inp.len.div_ceil(PARTIAL_ROWS as usize).max(1);
        let part = self.partials(chunks)?;
        let (r, c, ld) = (inp.len as i64, 1i32, 1i64);
        self.launch(
            self.k.bias_grad_partial.of(dt),
            (chunks as u32, 1, 1),
            THREADS,
            &[&part, &pi, &r, &c, &ld],
        )?;
        self.sum_partials(po, part, chunks, 1, 1)
    }

    fn gather_rows(&self, out: Buf, inp: Buf, rows: Ints, m: usize, c: usize) -> Result<()> {
        let dt = self.storage(out)?;
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
        let dt = self.storage(dinp)?;
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
        self.launch(self.k.scatter_add_rows.of(dt), (m as u32, 1, 1), THREADS, &[&pd, &pg, &pr, &mm, &cc])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn embeddings_rows_cross_entropy_and_argmax() {
        let n = B * T;
        let m = 17;
        let rows: Vec<i32> = (0..m as i32).map(|k| k * 5 + 1).collect();
        let c = Case {
            floats: vec![randn(24, n * H, 1.0), randn(25, m * H, 1.0)],
            ints: vec![rows],
            outs: vec![(m * H, None), (n * H, Some(randn(26, n * H, 1.0)))],
        };
        same("gather/scatter rows", &c, 1e-6, 1e-6, &|be, f, i, o| {
            be.gather_rows(o[0], f[0], i[0], m, H)?;
            be.scatter_add_rows(o[1], f[1], i[0], m, H)
        });
    }

    on_both_devices!(embeddings_rows_cross_entropy_and_argmax,);
}
