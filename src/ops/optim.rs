//! The optimizer's ops over the one contiguous parameter buffer: the sum of squares (gradient norm and
//! finite check), scaling, AdamW and LAMB. Kernels: kernels/optim.cu.
//!
//! One op family in two places: its kernels in `kernels/optim.cu`, and this file: the `Optim` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Optim for Cpu<T>`), the CUDA launchers
//! (`impl Optim for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{
    CONTROL_APPLIED, CONTROL_CLIP, CONTROL_DIVISOR, CONTROL_FLOATS, CONTROL_GOOD_STEPS, CONTROL_INTS,
    CONTROL_INV_SCALE, CONTROL_MLM, CONTROL_NSP, CONTROL_RECORD, CONTROL_ROW, CONTROL_SCALE, CONTROL_SQUARES,
    CONTROL_UPDATES, SCHEDULE_ROW, SUM_SQUARES_BLOCKS, SUM_SQUARES_CHUNK, THREADS,
};
use crate::backend::cuda::{Cuda, StorageType};
use crate::backend::device::KernelArg;
use crate::backend::{AdamWConsts, Buf, ControlStep, LambConsts, StepControl, TensorChunks};
use crate::bail;
use crate::error::Result;
use crate::optim::clip_coefficient;

pub trait Optim {
    /// out (1) = Σ x² over `x` (inf or NaN when any element is not finite): gradient norm and finite check.
    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()>;
    /// The step's decisions, from its Σg² and loss sums (slots of `c.stats`), with scale s: the step
    /// applies when they are finite; ‖g‖ = √Σg² / s; AdamW's multipliers 1/s and
    /// min(max / (‖g‖ + 1e-6), 1) (1 without clipping); LAMB's divisor s·max(‖g‖ / max, 1); the schedule
    /// row (the updates so far), counted on when it applies; the dynamic loss scaler (with a growth
    /// interval: halve on a step that does not apply, double after that many that do); the record of
    /// the step in `h.slot`; the loss sums zeroed.
    fn step_control(&self, c: &StepControl, h: &ControlStep) -> Result<()>;
    /// One AdamW update of the whole parameter buffer when `c` applies it, torch semantics, with the
    /// schedule row's numbers: g' = g·(1/s)·clip, p −= lr·wd·p where the tensor decays (`chunks`),
    /// m = β1·m + (1−β1)·g', v = β2·v + (1−β2)·g'², p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε). The
    /// gradients are left as they were.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &AdamWConsts,
    ) -> Result<()>;
    /// One LAMB update when `c` applies it, per tensor of `chunks`: g' = g / divisor, m = β1·m + (1−β1)·g',
    /// v = β2·v + (1−β2)·g'², u = (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) + wd·p (wd 0 outside the decay group),
    /// r = ‖p‖/‖u‖ over the tensor (1 when either is 0, and for the no-decay group unless `all_tensors`),
    /// p −= lr·r·u, lr and the bias corrections from the schedule row. The gradients are left as they were.
    #[allow(clippy::too_many_arguments)]
    fn lamb(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &LambConsts,
    ) -> Result<()>;
}

/// The slots of the step control a step's record needs: its floats and ints.
fn control_spans(slot: usize) -> (usize, usize) {
    (CONTROL_FLOATS as usize + CONTROL_RECORD as usize * (slot + 1), CONTROL_INTS as usize + slot + 1)
}

/// Each tensor's range [start, end) and decay flag, from the chunk table; an error unless they tile `n`.
fn tensor_ranges(table: &[i32], chunks: usize, n: usize) -> Result<Vec<(usize, usize, bool)>> {
    let (chunk_part, tensor_part) = table.split_at(4 * chunks);
    let mut at = 0;
    let mut ranges = Vec::new();
    // an empty tensor has no chunks and nothing to update
    for t in tensor_part.chunks_exact(2).filter(|t| t[1] > 0) {
        let (first, count) = (t[0] as usize, t[1] as usize);
        let (a, b) = (&chunk_part[4 * first..4 * first + 4], &chunk_part[4 * (first + count - 1)..][..4]);
        let (start, end) = (a[0] as usize, (b[0] + b[1]) as usize);
        if start != at || end > n {
            bail!("internal: the optimizer's tensors do not tile the buffer");
        }
        ranges.push((start, end, a[3] != 0));
        at = end;
    }
    if at != n {
        bail!("internal: the optimizer's tensors do not tile the buffer");
    }
    Ok(ranges)
}

/// Disjoint mutable slices of `p`, `m`, `v` (and shared ones of `g`) per range.
#[allow(clippy::type_complexity)]
fn split_ranges<'a, T>(
    ranges: &[(usize, usize, bool)],
    p: &'a mut [T],
    g: &'a [T],
    m: &'a mut [T],
    v: &'a mut [T],
) -> Vec<(&'a mut [T], &'a [T], &'a mut [T], &'a mut [T], bool)> {
    let mut parts = Vec::with_capacity(ranges.len());
    let (mut p_rest, mut m_rest, mut v_rest, mut at) = (p, m, v, 0usize);
    for &(start, end, decays) in ranges {
        let (p0, p1) = std::mem::take(&mut p_rest).split_at_mut(end - at);
        let (m0, m1) = std::mem::take(&mut m_rest).split_at_mut(end - at);
        let (v0, v1) = std::mem::take(&mut v_rest).split_at_mut(end - at);
        parts.push((p0, &g[start..end], m0, v0, decays));
        (p_rest, m_rest, v_rest, at) = (p1, m1, v1, end);
    }
    parts
}

impl<T: Real> Cpu<T> {
    /// The schedule row of the step the control applies, or None.
    fn applied_row(&self, c: &StepControl) -> Result<Option<Vec<f64>>> {
        let k = self.ints(c.counters)?;
        if k[CONTROL_APPLIED as usize] == 0 {
            return Ok(None);
        }
        let (w, row) = (SCHEDULE_ROW as usize, k[CONTROL_ROW as usize] as usize);
        self.need("schedule", c.schedule.len, (row + 1) * w)?;
        Ok(Some(unsafe { self.r(c.schedule) }[row * w..(row + 1) * w].iter().map(|x| x.to_f64()).collect()))
    }
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

    fn step_control(&self, c: &StepControl, h: &ControlStep) -> Result<()> {
        self.check(&[c.stats], &[c.schedule])?;
        let (floats, ints) = control_spans(h.slot);
        self.need("step control", c.stats.len, floats)?;
        self.need("step control counters", c.counters.len, ints)?;
        let rows = c.schedule.len / SCHEDULE_ROW as usize;
        let (s, k) = unsafe { (self.w(c.stats), self.ints_mut(c.counters)?) };
        let at = |slot: u32| slot as usize;
        let (squares, mlm, nsp) = (s[at(CONTROL_SQUARES)], s[at(CONTROL_MLM)], s[at(CONTROL_NSP)]);
        let scale = s[at(CONTROL_SCALE)].to_f64();
        let updates = k[at(CONTROL_UPDATES)];
        let applies = [squares, mlm, nsp].iter().all(|x| x.to_f64().is_finite()) && (updates as usize) < rows;
        let record = at(CONTROL_FLOATS) + at(CONTROL_RECORD) * h.slot;
        s[record..record + 3].copy_from_slice(&[squares, mlm, nsp]);
        k[at(CONTROL_INTS) + h.slot] = applies as i32;
        k[at(CONTROL_APPLIED)] = applies as i32;
        k[at(CONTROL_ROW)] = updates;
        // In f64 and rounded once to f32, as the device does.
        let f32_of = |x: f64| T::from_f64(x as f32 as f64);
        let norm = squares.to_f64().sqrt() / scale;
        let max = h.max_grad_norm;
        s[at(CONTROL_INV_SCALE)] = f32_of(1.0 / scale);
        s[at(CONTROL_CLIP)] = f32_of(if max > 0.0 { clip_coefficient(norm, max) } else { 1.0 });
        let ratio = if max > 0.0 && norm > max { norm / max } else { 1.0 };
        s[at(CONTROL_DIVISOR)] = f32_of(ratio * scale);
        if applies {
            k[at(CONTROL_UPDATES)] = updates + 1;
        }
        if h.growth_interval > 0 {
            let (mut good, mut next) =
                if applies { (k[at(CONTROL_GOOD_STEPS)] + 1, scale) } else { (0, scale * 0.5) };
            if good as u64 == h.growth_interval {
                (good, next) = (0, scale * 2.0);
            }
            s[at(CONTROL_SCALE)] = f32_of(next);
            k[at(CONTROL_GOOD_STEPS)] = good;
        }
        s[at(CONTROL_MLM)] = T::default();
        s[at(CONTROL_NSP)] = T::default();
        Ok(())
    }

    fn adamw(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &AdamWConsts,
    ) -> Result<()> {
        self.check(&[params, m, v], &[grads, c.stats])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n {
            bail!("internal: adamw buffers of different lengths");
        }
        let Some(row) = self.applied_row(c)? else { return Ok(()) };
        let ranges = tensor_ranges(self.ints(chunks.table)?, chunks.chunks, n)?;
        let stats = unsafe { self.r(c.stats) };
        let (inv_scale, clip) = (stats[CONTROL_INV_SCALE as usize], stats[CONTROL_CLIP as usize]);
        let (p, g, mv, vv) = unsafe { (self.w(params), self.r(grads), self.w(m), self.w(v)) };
        // As torch's single-tensor AdamW, in the parameters' precision.
        let c = |x: f64| T::from_f64(x);
        let (decay_f, step_size, bc2s) = (c(row[0]), c(row[1]), c(row[2]));
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let (one_b1, b2t, one_b2, epst) = (c(1.0 - b1), c(b2), c(1.0 - b2), c(h.eps as f64));
        split_ranges(&ranges, p, g, mv, vv).into_par_iter().for_each(|(p, g, m, v, decays)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * inv_scale * clip;
                if decays {
                    *p *= decay_f;
                }
                *m += (g - *m) * one_b1;
                *v = *v * b2t + g * g * one_b2;
                let denom = v.sqrt() / bc2s + epst;
                *p -= step_size * (*m / denom);
            }
        });
        Ok(())
    }

    fn lamb(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &LambConsts,
    ) -> Result<()> {
        self.check(&[params, m, v], &[grads, c.stats])?;
        let n = params.len;
        if grads.len != n || m.len != n || v.len != n {
            bail!("internal: lamb buffers of different lengths");
        }
        let Some(row) = self.applied_row(c)? else { return Ok(()) };
        let ranges = tensor_ranges(self.ints(chunks.table)?, chunks.chunks, n)?;
        let div = unsafe { self.r(c.stats) }[CONTROL_DIVISOR as usize];
        let (p, g, mv, vv) = unsafe { (self.w(params), self.r(grads), self.w(m), self.w(v)) };
        // FusedLAMB in the parameters' precision; the two norms accumulated in f64.
        let c = |x: f64| T::from_f64(x);
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let (b1t, one_b1, b2t, one_b2) = (c(b1), c(1.0 - b1), c(b2), c(1.0 - b2));
        let (lr, bc1t, bc2t, eps) = (row[0], c(row[1]), c(row[2]), c(h.eps as f64));
        split_ranges(&ranges, p, g, mv, vv).into_par_iter().for_each(|(p, g, m, v, decays)| {
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
            let step = c(lr * ratio);
            for i in 0..p.len() {
                let u = (m[i] / bc1t) / ((v[i] / bc2t).sqrt() + eps) + wd * p[i];
                p[i] -= step * u;
            }
        });
        Ok(())
    }
}

/// optim.cu's ControlArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ControlArgs {
    max_grad_norm: f64,
    growth_interval: i32,
    slot: i32,
    rows: i32,
    unused: i32,
}

/// optim.cu's AdamWArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AdamWArgs {
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
}

/// optim.cu's LambArgs.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LambArgs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    weight_decay: f32,
    all_tensors: i32,
}

macro_rules! kernel_args {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn bytes(&self) -> &[u8] {
                bytemuck::bytes_of(self)
            }
        }
    )*};
}
kernel_args!(ControlArgs, AdamWArgs, LambArgs);

impl Cuda {
    /// The bf16 copy of the weights (under --precision bf16) that the kernels and matrix products read,
    /// which the optimizer's last pass writes beside the fp32 master weights; null without one.
    fn bf16_copy(&self, params: Buf) -> Result<u64> {
        let ([master], []) = self.ptrs([params], [])?;
        let ([shadow], []) = self.ptrs_as(StorageType::Bf16, [params], [])?;
        Ok(if shadow != master { shadow } else { 0 })
    }

    /// The optimizer's buffers, all fp32 and of one length.
    fn optimizer_buffers(
        &self,
        what: &str,
        bufs: &[Buf],
        chunks: &TensorChunks,
        c: &StepControl,
    ) -> Result<()> {
        self.need_f32(what, bufs)?;
        self.need_f32("step control", &[c.stats, c.schedule, chunks.partials, chunks.norms])?;
        if bufs.iter().any(|b| b.len != bufs[0].len) {
            bail!("internal: {what} of different lengths");
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

    fn step_control(&self, c: &StepControl, h: &ControlStep) -> Result<()> {
        self.need_f32("step control", &[c.stats, c.schedule])?;
        let (floats, ints) = control_spans(h.slot);
        Self::need("step control", c.stats.len, floats)?;
        Self::need("step control counters", c.counters.len, ints)?;
        let ([ps], [_]) = self.ptrs([c.stats], [c.schedule])?;
        let pk = self.iptr(c.counters)?;
        let args = ControlArgs {
            max_grad_norm: h.max_grad_norm,
            growth_interval: h.growth_interval.min(i32::MAX as u64) as i32,
            slot: h.slot as i32,
            rows: (c.schedule.len / SCHEDULE_ROW as usize) as i32,
            unused: 0,
        };
        self.launch(self.k.step_control, (1, 1, 1), 32, &[&ps, &pk, &args])?;
        Ok(())
    }

    fn adamw(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &AdamWConsts,
    ) -> Result<()> {
        self.optimizer_buffers("AdamW buffers", &[params, grads, m, v], chunks, c)?;
        let ([pp, pm, pv], [pg, psched, pstats]) = self.ptrs([params, m, v], [grads, c.schedule, c.stats])?;
        let (pt, pk) = (self.iptr(chunks.table)?, self.iptr(c.counters)?);
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let args = AdamWArgs {
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: h.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: h.eps,
        };
        let shadow = self.bf16_copy(params)?;
        if chunks.chunks > 0 {
            self.launch(
                self.k.adamw,
                (chunks.chunks as u32, 1, 1),
                THREADS,
                &[&pp, &shadow, &pg, &pm, &pv, &pt, &psched, &pstats, &pk, &args],
            )?;
        }
        Ok(())
    }

    fn lamb(
        &self,
        params: Buf,
        grads: Buf,
        m: Buf,
        v: Buf,
        chunks: &TensorChunks,
        c: &StepControl,
        h: &LambConsts,
    ) -> Result<()> {
        self.optimizer_buffers("LAMB buffers", &[params, grads, m, v], chunks, c)?;
        let ([pp, pm, pv, ppart, pnorm], [pg, psched, pstats]) =
            self.ptrs([params, m, v, chunks.partials, chunks.norms], [grads, c.schedule, c.stats])?;
        let (pt, pk) = (self.iptr(chunks.table)?, self.iptr(c.counters)?);
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let args = LambArgs {
            beta1: h.beta1,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: h.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: h.eps,
            weight_decay: h.weight_decay,
            all_tensors: h.all_tensors as i32,
        };
        if chunks.chunks > 0 {
            let n = chunks.chunks as u32;
            self.launch(
                self.k.lamb_moments,
                (n, 1, 1),
                THREADS,
                &[&pp, &pg, &pm, &pv, &pt, &ppart, &psched, &pstats, &pk, &args],
            )?;
            let (cc, t) = (chunks.chunks as i32, chunks.tensors as i32);
            let blocks = chunks.tensors.div_ceil(THREADS as usize) as u32;
            self.launch(self.k.lamb_norms, (blocks, 1, 1), THREADS, &[&pt, &cc, &t, &ppart, &pnorm, &pk])?;
            let shadow = self.bf16_copy(params)?;
            let a: [&dyn KernelArg; 9] = [&pp, &shadow, &pm, &pv, &pt, &pnorm, &psched, &pk, &args];
            self.launch(self.k.lamb_apply, (n, 1, 1), THREADS, &a)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;
    use bertcuda::optim::{AdamW, AdamWConfig, Lamb, LambConfig, Optimizer};

    /// Steps of `opt` (made on each backend by `make`) from `init` through `grads`, as training makes
    /// them: the parameters, the moments, the step control's numbers (records included) and counters,
    /// the CPU against the device.
    fn same_steps(
        what: &str,
        init: &[f32],
        grads: &[Vec<f32>],
        settings: (f64, f64, u64),
        make: &dyn Fn(&dyn Backend) -> bertcuda::Result<Optimizer>,
    ) {
        use bertcuda::backend::cuda::launch::{
            CONTROL_FLOATS, CONTROL_HISTORY, CONTROL_INTS, CONTROL_RECORD,
        };
        let lrs: Vec<f64> = (0..grads.len()).map(|k| 1e-3 * (k + 1) as f64).collect();
        let n = init.len();
        let (floats, ints) = (
            (CONTROL_FLOATS + CONTROL_RECORD * CONTROL_HISTORY) as usize,
            (CONTROL_INTS + CONTROL_HISTORY) as usize,
        );
        let c = Case {
            floats: vec![],
            ints: vec![],
            outs: vec![(n, Some(init.to_vec())), (n, None), (n, None), (floats, None), (ints, None)],
        };
        same(what, &c, 1e-7, 1e-5, &|be, _, _, o| {
            let opt = make(be)?;
            let control = common::optimizer_steps(be, &opt, o[0], grads, &lrs, settings)?;
            let (m, v) = opt.moments();
            be.copy(o[1], m)?;
            be.copy(o[2], v)?;
            be.copy(o[3], control.stats)?;
            let counters: Vec<f32> = be.download_ints(control.counters)?.iter().map(|&k| k as f32).collect();
            be.upload(o[4], &counters)
        });
    }

    fn adamw_over_chunked_tensors() {
        // A tensor of several chunks (OPTIMIZER_CHUNK 8192), a short one not 16-byte aligned after it, a
        // bias, a tensor at zero; a skipped step between two clipped ones under the loss scaler.
        let tensors =
            common::flat_tensors(&[(20_000, true), (5, true), (777, false), (1_000, true), (8_192, true)]);
        let n: usize = tensors.iter().map(|t| t.len).sum();
        let mut init = randn(30, n, 0.05);
        init[20_782..21_782].fill(0.0);
        let mut grads: Vec<Vec<f32>> = (0..3).map(|k| randn(31 + k, n, 0.3)).collect();
        grads[1][17] = f32::INFINITY;
        for (max_grad_norm, scale, growth) in [(1.0, 8.0, 2), (0.0, 1.0, 0), (1e6, 1.0, 0)] {
            same_steps(
                &format!("adamw max_grad_norm={max_grad_norm} scale={scale}"),
                &init,
                &grads,
                (max_grad_norm, scale, growth),
                &|be| {
                    let c = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 };
                    Ok(Optimizer::AdamW(AdamW::new(be, c, &tensors)?))
                },
            );
        }
    }

    /// LAMB over tensors of several chunks, a chunk-sized one, a bias and a tensor at zero, with and
    /// without the trust ratio on every tensor.
    fn lamb_over_chunked_tensors() {
        let tensors =
            common::flat_tensors(&[(20_000, true), (5, true), (777, false), (1_000, true), (8_192, true)]);
        let n: usize = tensors.iter().map(|t| t.len).sum();
        let mut init = randn(40, n, 0.05);
        init[20_005 + 777..20_005 + 777 + 1_000].fill(0.0);
        let mut grads: Vec<Vec<f32>> = (0..3).map(|k| randn(41 + k, n, 0.3)).collect();
        grads[1][17] = f32::NAN;
        for all_tensors in [false, true] {
            same_steps(&format!("lamb all_tensors={all_tensors}"), &init, &grads, (1.0, 2.0, 2), &|be| {
                let c = LambConfig { beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01, all_tensors };
                Ok(Optimizer::Lamb(Lamb::new(be, c, &tensors)?))
            });
        }
    }

    /// Under bf16 the optimizer's last pass also writes the weights' bf16 copy, which the kernels and
    /// products read: it equals bf16 of the new fp32 weights after AdamW and after LAMB (read through a
    /// row gather into a bf16 activation).
    fn the_bf16_copy_follows_the_optimizer() {
        use bertcuda::backend::Tensor;
        let be = gpu();
        assert_eq!(be.set_precision("bf16").unwrap(), "bf16");
        let tensors = common::flat_tensors(&[(9_000, true), (5, false), (301, true)]);
        let n: usize = tensors.iter().map(|t| t.len).sum();
        let grads: Vec<Vec<f32>> = (0..2).map(|k| randn(60 + k, n, 0.3)).collect();
        let rows = be.alloc_ints(n).unwrap();
        be.upload_ints(rows, &(0..n as i32).collect::<Vec<_>>()).unwrap();
        let copy = be.alloc_kind(n, Kind::Activation).unwrap();
        for lamb in [false, true] {
            let p = be.alloc_kind(n, Kind::Param).unwrap();
            be.upload(p, &randn(59, n, 0.05)).unwrap();
            let opt = common::test_optimizer(&be, lamb, 0.01, &tensors).unwrap();
            common::optimizer_steps(&be, &opt, p, &grads, &[1e-2, 1e-2], (1.0, 1.0, 0)).unwrap();
            be.gather_rows(copy, p, rows, n, 1).unwrap();
            let (master, bf16) = (be.download(p).unwrap(), be.download(copy).unwrap());
            for (k, (w, c)) in master.iter().zip(&bf16).enumerate() {
                assert_eq!(half::bf16::from_f32(*w).to_f32(), *c, "lamb={lamb}: the bf16 copy of weight {k}");
            }
            assert!(master.iter().zip(randn(59, n, 0.05)).any(|(a, b)| *a != b), "the weights moved");
        }
    }

    on_both_devices!(
        adamw_over_chunked_tensors,
        lamb_over_chunked_tensors,
        the_bf16_copy_follows_the_optimizer,
    );
}
