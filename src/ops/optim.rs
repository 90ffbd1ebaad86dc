//! The optimizer's ops over the one contiguous parameter buffer: the sum of squares (gradient norm and
//! finite check), scaling, AdamW and LAMB. Kernels: kernels/optim.cu.
//!
//! One op family in two places: its kernels in `kernels/optim.cu`, and this file: the `Optim` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Optim for Cpu<T>`), the CUDA launchers
//! (`impl Optim for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{SUM_SQUARES_BLOCKS, SUM_SQUARES_CHUNK, THREADS};
use crate::backend::cuda::{grid_for, Cuda, StorageType};
use crate::backend::device::KernelArg;
use crate::backend::{AdamWStep, Buf, Ints, LambLayout, LambStep};
use crate::bail;
use crate::error::Result;

pub trait Optim {
    /// out (1) = Σ x² over `x` (inf or NaN when any element is not finite): gradient norm and finite check.
    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()>;
    /// x *= factor.
    fn scale(&self, x: Buf, factor: f32) -> Result<()>;
    /// One AdamW update of the whole parameter buffer, torch semantics: p −= lr·wd·p where decay (1),
    /// m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    fn adamw(&self, params: Buf, grads: Buf, m: Buf, v: Buf, decay: Ints, h: &AdamWStep) -> Result<()>;
    /// One LAMB update, per tensor of `layout`: g' = g / divisor, m = β1·m + (1−β1)·g',
    /// v = β2·v + (1−β2)·g'², u = (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) + wd·p (wd 0 outside the decay group),
    /// r = ‖p‖/‖u‖ over the tensor (1 when either is 0, and for the no-decay group unless `all_tensors`),
    /// p −= lr·r·u. The gradients are left as they were.
    fn lamb(&self, params: Buf, grads: Buf, m: Buf, v: Buf, layout: &LambLayout, h: &LambStep) -> Result<()>;
}

impl<T: Real> Optim for Cpu<T> {
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
}

/// optim.cu's AdamWArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AdamWArgs {
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

/// optim.cu's LambArgs.
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

impl Cuda {
    /// After an optimizer update: the bf16 copy of the weights (under --precision bf16) that the kernels and
    /// matrix products read follows the new fp32 master weights.
    fn refresh_bf16_copy(&self, params: Buf) -> Result<()> {
        let ([master], []) = self.ptrs([params], [])?;
        let ([shadow], []) = self.ptrs_as(StorageType::Bf16, [params], [])?;
        if shadow != master {
            let n = params.len as i64;
            self.launch(self.k.cast_bf16, (grid_for(params.len), 1, 1), THREADS, &[&shadow, &master, &n])?;
        }
        Ok(())
    }
}

impl Optim for Cuda {
    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()> {
        self.need_f32("sum of squares output", &[out])?;
        let dt = self.storage(x)?;
        let ([po], [px]) = self.ptrs_as(dt, [out], [x])?;
        let blocks = x.len.div_ceil(SUM_SQUARES_CHUNK as usize).clamp(1, SUM_SQUARES_BLOCKS as usize);
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
        let dt = self.storage(x)?;
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
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn adamw_and_scale() {
        let n = 100_003;
        let decay: Vec<i32> = (0..n).map(|k| (k % 3 != 0) as i32).collect();
        let c = Case {
            floats: vec![randn(30, n, 0.01)],
            ints: vec![decay],
            outs: vec![
                (n, Some(randn(31, n, 1.0))),
                (n, Some(randn(32, n, 0.01))),
                (n, Some(randn(33, n, 0.0001).iter().map(|x| x.abs()).collect())),
            ],
        };
        let h = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01, step: 7 };
        same("adamw", &c, 1e-7, 1e-5, &|be, f, i, o| {
            be.adamw(o[0], f[0], o[1], o[2], i[0], &h)?;
            be.scale(o[0], 0.5)
        });
    }

    /// LAMB over tensors of several chunks (launch.cuh's LAMB_CHUNK is 8192), a chunk-sized one, a bias and a
    /// tensor at zero, with and without the trust ratio on every tensor.
    fn lamb_over_chunked_tensors() {
        let tensors =
            common::flat_tensors(&[(20_000, true), (5, true), (777, false), (1_000, true), (8_192, true)]);
        let offset: usize = tensors.iter().map(|t| t.len).sum();
        let n = offset;
        let mut params = randn(40, n, 0.05);
        params[20_005 + 777..20_005 + 777 + 1_000].fill(0.0);
        let c = Case {
            floats: vec![randn(41, n, 0.3)],
            ints: vec![],
            outs: vec![
                (n, Some(params)),
                (n, Some(randn(42, n, 0.01))),
                (n, Some(randn(43, n, 0.0001).iter().map(|x| x.abs()).collect())),
            ],
        };
        for all_tensors in [false, true] {
            let h = LambStep {
                lr: 6e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-6,
                weight_decay: 0.01,
                step: 7,
                grad_divisor: 3.5,
                all_tensors,
            };
            same(&format!("lamb all_tensors={all_tensors}"), &c, 1e-7, 1e-5, &|be, f, _, o| {
                let layout = LambLayout::new(be, &tensors)?;
                be.lamb(o[0], f[0], o[1], o[2], &layout, &h)
            });
        }
    }

    on_both_devices!(adamw_and_scale, lamb_over_chunked_tensors,);
}
