//! The losses of the heads: softmax cross-entropy fused with its gradient (MLM and NSP), and the argmax of
//! each row (accuracy). Kernels: kernels/loss.cu.
//!
//! One op family in two places: its kernels in `kernels/loss.cu`, and this file: the `Loss` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Loss for Cpu<T>`), the CUDA launchers
//! (`impl Loss for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::THREADS;
use crate::backend::cuda::Cuda;
use crate::backend::{strided_len, Buf, Ints, Memory, IGNORE_INDEX};
use crate::bail;
use crate::error::Result;

pub trait Loss {
    /// Softmax cross-entropy per row of logits (m, v; rows `ld` apart): losses (m) =
    /// logsumexp(logits) − logits[label], 0 where the label is IGNORE_INDEX. With `grad_scale`, the logits
    /// are overwritten by (softmax − onehot) · grad_scale (0 on ignored rows), and with `scale_by` also by
    /// its one element as the backend holds it (the fp16 loss scale, which the step control keeps on the
    /// device). The elements between a row's v and the next row are neither read nor written.
    fn cross_entropy(
        &self,
        losses: Buf,
        logits: Buf,
        labels: Ints,
        shape: (usize, usize, usize),
        grad_scale: Option<f64>,
        scale_by: Option<Buf>,
    ) -> Result<()>;
    /// out (m) = the index of each row's largest logit (logits (m, v; rows `ld` apart)); ties take the
    /// first.
    fn argmax_rows(&self, out: Ints, logits: Buf, shape: (usize, usize, usize)) -> Result<()>;
}

impl<T: Real> Loss for Cpu<T> {
    fn cross_entropy(
        &self,
        losses: Buf,
        logits: Buf,
        labels: Ints,
        (m, v, ld): (usize, usize, usize),
        grad_scale: Option<f64>,
        scale_by: Option<Buf>,
    ) -> Result<()> {
        self.check(&[losses, logits], &scale_by.into_iter().collect::<Vec<_>>())?;
        self.need("cross_entropy logits", logits.len, strided_len(m, v, ld))?;
        let labels = self.ints(labels)?;
        if let Some(&bad) = labels[..m].iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v)) {
            bail!("label {bad} is outside the {v} classes (and not {IGNORE_INDEX})");
        }
        let (lv, z) = unsafe { (self.w(losses), self.w(logits)) };
        let by = scale_by.map(|b| unsafe { self.r(b) }[0]);
        let scale = grad_scale.map(T::from_f64);
        lv[..m].par_iter_mut().zip(z[..strided_len(m, v, ld)].par_chunks_mut(ld)).zip(&labels[..m]).for_each(
            |((loss, row), &label)| {
                let row = &mut row[..v];
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
                    if let Some(by) = by {
                        row.iter_mut().for_each(|x| *x *= by);
                    }
                }
            },
        );
        Ok(())
    }

    fn argmax_rows(&self, out: Ints, logits: Buf, (m, v, ld): (usize, usize, usize)) -> Result<()> {
        self.check(&[], &[logits])?;
        self.need("argmax logits", logits.len, strided_len(m, v, ld))?;
        let z = unsafe { self.r(logits) };
        let best: Vec<i32> = z[..strided_len(m, v, ld)]
            .par_chunks(ld)
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
}

impl Loss for Cuda {
    fn cross_entropy(
        &self,
        losses: Buf,
        logits: Buf,
        labels: Ints,
        (m, v, ld): (usize, usize, usize),
        grad_scale: Option<f64>,
        scale_by: Option<Buf>,
    ) -> Result<()> {
        self.need_f32("losses", &[losses])?;
        let dt = self.storage(logits)?;
        Self::need("cross_entropy logits", logits.len, strided_len(m, v, ld))?;
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
        let by = match scale_by {
            Some(b) => {
                self.need_f32("loss scale", &[b])?;
                self.ptrs([], [b])?.1[0]
            }
            None => 0,
        };
        let (mm, vv, ldd, grad, scale) =
            (m as i32, v as i32, ld as i64, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0) as f32);
        self.launch(
            self.k.cross_entropy.of(dt),
            (m as u32, 1, 1),
            THREADS,
            &[&pl, &pz, &pb, &mm, &vv, &ldd, &grad, &scale, &by],
        )?;
        Ok(())
    }

    fn argmax_rows(&self, out: Ints, logits: Buf, (m, v, ld): (usize, usize, usize)) -> Result<()> {
        let dt = self.storage(logits)?;
        Self::need("argmax logits", logits.len, strided_len(m, v, ld))?;
        Self::need("argmax out", out.len, m)?;
        // The device values change; the host copy (for row checks) no longer knows them: mark it invalid.
        self.ints.borrow_mut()[out.id as usize].host[out.off..out.off + m].fill(-1);
        let ([], [pz]) = self.ptrs_as(dt, [], [logits])?;
        let po = self.iptr(out)?;
        let (mm, vv, ldd) = (m as i32, v as i32, ld as i64);
        if m == 0 {
            return Ok(());
        }
        self.launch(self.k.argmax_rows.of(dt), (m as u32, 1, 1), THREADS, &[&po, &pz, &mm, &vv, &ldd])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn embeddings_rows_cross_entropy_and_argmax() {
        let m = 17;
        let mut labels: Vec<i32> = (0..m as i32).map(|k| (k * 37) % V as i32).collect();
        labels[3] = IGNORE_INDEX;
        labels[10] = IGNORE_INDEX;
        for grad in [None, Some(1.0 / 15.0)] {
            let c = Case {
                floats: vec![],
                ints: vec![labels.clone()],
                outs: vec![(m, None), (m * V, Some(randn(27, m * V, 3.0)))],
            };
            same(&format!("cross_entropy grad={grad:?}"), &c, 1e-5, 1e-5, &|be, _, i, o| {
                be.cross_entropy(o[0], o[1], i[0], (m, V, V), grad, None)
            });
        }
        // All rows ignored.
        let c = Case {
            floats: vec![],
            ints: vec![vec![IGNORE_INDEX; m]],
            outs: vec![(m, None), (m * V, Some(randn(28, m * V, 3.0)))],
        };
        same("cross_entropy all ignored", &c, 0.0, 0.0, &|be, _, i, o| {
            be.cross_entropy(o[0], o[1], i[0], (m, V, V), Some(1.0), None)
        });
        for be in [&Cpu::<f32>::new() as &dyn Backend, &gpu()] {
            let z = be.alloc(m * V).unwrap();
            be.upload(z, &randn(29, m * V, 1.0)).unwrap();
            let out = be.alloc_ints(m).unwrap();
            be.argmax_rows(out, z, (m, V, V)).unwrap();
            let got = be.download_ints(out).unwrap();
            let host = randn(29, m * V, 1.0);
            for (k, g) in got.iter().enumerate() {
                let row = &host[k * V..(k + 1) * V];
                let best = (0..V).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                assert_eq!(*g as usize, best, "{}", be.describe());
            }
        }
    }

    fn bf16_ops_against_the_fp32_cpu() {
        use Kind::{Activation as A, Grad as G, Param as P, Stat as S};
        // GELU, bias, cross-entropy with its in-place gradient.
        let cols = 211;
        let mut labels: Vec<i32> = (0..17).map(|r| (r * 37) % cols as i32).collect();
        labels[3] = IGNORE_INDEX;
        let c = Case {
            floats: vec![randn(4, 17 * cols, 1.5), randn(5, cols, 1.0)],
            ints: vec![labels],
            outs: vec![
                (17 * cols, None),
                (17, None),
                (17 * cols, Some(randn(6, 17 * cols, 2.0))),
                (cols, Some(vec![0.0; cols])),
            ],
        };
        same_bf16("gelu, bias, cross-entropy", &c, &[A, P], &[A, S, A, G], 3e-2, &|be, f, i, o| {
            be.gelu_fwd(o[0], f[0], Activation::GeluErf)?;
            be.add_bias(o[0], f[1], 17, cols, cols)?;
            be.bias_grad(o[3], o[0], 17, cols, cols)?;
            be.cross_entropy(o[1], o[2], i[0], (17, cols, cols), Some(1.0 / 16.0), None)
        });
    }

    /// Logits in rows padded as the MLM head pads them (v = 211 → 256, and an odd stride): the loss, the
    /// in-place gradient and the argmax read and write each row's v classes only; the padding (random
    /// here) is left as it was.
    fn cross_entropy_and_argmax_in_padded_rows() {
        let (m, v) = (17, 211);
        let mut labels: Vec<i32> = (0..m as i32).map(|r| (r * 37) % v as i32).collect();
        labels[5] = IGNORE_INDEX;
        for ld in [256, 219] {
            for grad in [None, Some(1.0 / 16.0)] {
                let c = Case {
                    floats: vec![],
                    ints: vec![labels.clone()],
                    outs: vec![(m, None), (m * ld, Some(randn(30, m * ld, 3.0)))],
                };
                same(
                    &format!("cross_entropy rows {ld} apart, grad={grad:?}"),
                    &c,
                    1e-5,
                    1e-5,
                    &|be, _, i, o| be.cross_entropy(o[0], o[1], i[0], (m, v, ld), grad, None),
                );
            }
            let host = randn(31, m * ld, 1.0);
            for be in [&Cpu::<f32>::new() as &dyn Backend, &gpu()] {
                let z = be.alloc(m * ld).unwrap();
                // The padding the largest of all: an argmax that looked past v would find it.
                let padded: Vec<f32> =
                    host.iter().enumerate().map(|(e, &x)| if e % ld >= v { 100.0 } else { x }).collect();
                be.upload(z, &padded).unwrap();
                let out = be.alloc_ints(m).unwrap();
                be.argmax_rows(out, z, (m, v, ld)).unwrap();
                for (r, g) in be.download_ints(out).unwrap().iter().enumerate() {
                    let row = &host[r * ld..r * ld + v];
                    let best = (0..v).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                    assert_eq!(*g as usize, best, "row {r}, rows {ld} apart, {}", be.describe());
                }
            }
        }
    }

    on_both_devices!(
        embeddings_rows_cross_entropy_and_argmax,
        bf16_ops_against_the_fp32_cpu,
        cross_entropy_and_argmax_in_padded_rows,
    );
}
