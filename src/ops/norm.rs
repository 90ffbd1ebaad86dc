//! LayerNorm over the last dimension (fp32 statistics), and the fused residual + dropout + LayerNorm of
//! every sub-layer's output, forward and backward. Kernels: kernels/norm.cu.
//!
//! One op family in two places: its kernels in `kernels/norm.cu`, and this file: the `Norm` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Norm for Cpu<T>`), the CUDA launchers
//! (`impl Norm for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{reduce_rows, Cpu, Real};
use crate::backend::cuda::launch::{PARTIAL_ROWS, THREADS, WARP_ROWS};
use crate::backend::cuda::{Cuda, DropoutArgs, StorageType};
use crate::backend::{Buf, Dropout, Memory};
use crate::error::Result;
use crate::ops::{Activations, Tensor};

pub trait Norm: Memory + Tensor + Activations {
    /// out (rows, c) = (inp − mean) · rstd · w + b; mean, rstd (rows) saved for backward.
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
    ) -> Result<()>;
    /// dinp (rows, c) =; dw, db (c) +=.
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
    ) -> Result<()>;
    /// sum (rows, c) = residual + dropout(branch); out = LayerNorm(sum), mean and rstd saved. `branch` is
    /// scratch (a backend may overwrite it). The unfused composition is the default.
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
        match dropout {
            None => self.add(sum, residual, branch)?,
            Some(d) => {
                self.dropout_fwd(sum, branch, d)?;
                self.copy(branch, sum)?;
                self.add(sum, residual, branch)?;
            }
        }
        self.layernorm_fwd(out, mean, rstd, sum, w, b, rows, c, eps)
    }
    /// Backward of `out = LayerNorm(sum)`, `sum = residual + dropout(branch)`: reads `grad` = d(out); writes
    /// dsum (rows, c) = d(sum) (the residual's gradient); dw, db +=; then overwrites `grad` with
    /// dropout'(dsum), the branch's gradient.
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
        self.layernorm_bwd(dsum, dw, db, grad, sum, mean, rstd, w, rows, c)?;
        self.dropout_bwd(grad, dsum, dropout)
    }
}

impl<T: Real> Norm for Cpu<T> {
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
}

impl Cuda {
    /// dw, db (c) += the LayerNorm weight gradients of d(out) = `g` at input `x` with statistics `m`, `r`:
    /// per 64-row block partial sums, then the blocks in order (deterministic).
    fn layernorm_param_grads(
        &self,
        dt: StorageType,
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
}

impl Norm for Cuda {
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
        let dt = self.storage_of_all("layernorm", &[out, inp])?;
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
        let dt = self.storage_of_all("layernorm backward", &[dinp, dout, inp])?;
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
        let dt = self.storage_of_all("residual layernorm", &[sum, out, residual, branch])?;
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
        let dt = self.storage_of_all("residual layernorm backward", &[dsum, grad, sum])?;
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
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn layernorm_forward_and_backward() {
        let rows = B * T;
        // H: rows held in registers with 16-byte accesses; 37: the element-wise path of odd widths.
        for w in [H, 37] {
            let c = Case {
                floats: vec![
                    randn(11, rows * w, 2.0),
                    randn(12, w, 1.0),
                    randn(13, w, 1.0),
                    randn(14, rows * w, 1.0),
                ],
                ints: vec![],
                outs: vec![
                    (rows * w, None),
                    (rows, None),
                    (rows, None),
                    (rows * w, None),
                    (w, Some(randn(15, w, 1.0))),
                    (w, Some(randn(16, w, 1.0))),
                ],
            };
            same(&format!("layernorm width {w}"), &c, 1e-5, 1e-4, &|be, f, _, o| {
                be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, w, 1e-12)?;
                be.layernorm_bwd(o[3], o[4], o[5], f[3], f[0], o[1], o[2], f[1], rows, w)
            });
        }
    }

    fn bf16_ops_against_the_fp32_cpu() {
        use Kind::{Activation as A, Grad as G, Param as P, Stat as S};
        let rows = B * T;
        // LayerNorm: activations in/out, weights from the bf16 copy, statistics and weight gradients fp32.
        let c = Case {
            floats: vec![
                randn(11, rows * H, 2.0),
                randn(12, H, 1.0),
                randn(13, H, 1.0),
                randn(14, rows * H, 1.0),
            ],
            ints: vec![],
            outs: vec![
                (rows * H, None),
                (rows, None),
                (rows, None),
                (rows * H, None),
                (H, Some(vec![0.0; H])),
                (H, Some(vec![0.0; H])),
            ],
        };
        same_bf16("layernorm", &c, &[A, P, P, A], &[A, S, S, A, G, G], 3e-2, &|be, f, _, o| {
            be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, H, 1e-12)?;
            be.layernorm_bwd(o[3], o[4], o[5], f[3], f[0], o[1], o[2], f[1], rows, H)
        });
    }

    fn fused_forward_kernels_equal_the_unfused_cpu_ops() {
        let rows = B * T;
        // H: rows held in registers with 16-byte accesses; 37: the element-wise path of odd widths.
        for w in [H, 37] {
            let drop = Dropout { p: 0.1, key: DropoutKey { seed: 3, step: 4, site: 5 } };
            for dropout in [None, Some(drop)] {
                let c = Case {
                    floats: vec![
                        randn(40, rows * w, 1.0),
                        randn(41, rows * w, 1.0),
                        randn(42, w, 1.0),
                        randn(43, w, 1.0),
                    ],
                    ints: vec![],
                    outs: vec![(rows * w, None), (rows * w, None), (rows, None), (rows, None)],
                };
                same(
                    &format!("residual + layernorm, dropout={}", dropout.is_some()),
                    &c,
                    1e-5,
                    1e-4,
                    &|be, f, _, o| {
                        let branch = be.alloc(rows * w)?;
                        be.copy(branch, f[1])?;
                        be.residual_layernorm_fwd(
                            o[0], o[1], o[2], o[3], f[0], branch, f[2], f[3], rows, w, 1e-12, dropout,
                        )
                    },
                );
            }
            // Its backward: d(sum), the weight gradients, and the branch's gradient written over d(out).
            let c = Case {
                floats: vec![randn(51, rows * w, 2.0), randn(52, w, 1.0), randn(53, w, 1.0)],
                ints: vec![],
                outs: vec![
                    (rows * w, None),
                    (rows, None),
                    (rows, None),
                    (rows * w, None),
                    (w, Some(vec![0.0; w])),
                    (w, Some(vec![0.0; w])),
                    (rows * w, Some(randn(54, rows * w, 1.0))),
                ],
            };
            let op: Op = &|be, f, _, o| {
                be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, w, 1e-12)?;
                be.residual_layernorm_bwd(o[3], o[4], o[5], o[6], f[0], o[1], o[2], f[1], rows, w, drop)
            };
            same("residual + layernorm backward", &c, 1e-5, 1e-4, op);
            // The bf16 instantiation: activations and gradients in bf16, statistics and weight gradients fp32.
            {
                use Kind::{Activation as A, Grad as G, Param as P, Stat as S};
                same_bf16("residual + layernorm backward", &c, &[A, P, P], &[A, S, S, A, G, G, A], 3e-2, op);
            }
        }
    }

    on_both_devices!(
        layernorm_forward_and_backward,
        bf16_ops_against_the_fp32_cpu,
        fused_forward_kernels_equal_the_unfused_cpu_ops,
    );
}
