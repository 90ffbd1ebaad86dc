//! Multi-head self-attention, flash-style on the device (no T×T matrix in global memory), with padding
//! masks and dropout on the probabilities. Kernels: kernels/attention.cu.
//!
//! One op family in two places: its kernels in `kernels/attention.cu`, and this file: the `Attention` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Attention for Cpu<T>`), the CUDA launchers
//! (`impl Attention for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{ATTENTION_ROWS, ATTENTION_TC_THREADS, THREADS};
use crate::backend::cuda::{grid_for, AttentionKernels, Cuda, DropoutArgs, StorageType};
use crate::backend::{philox, Buf, Dropout, Ints};
use crate::error::{Error, Result};

pub trait Attention {
    /// Floats of state `attention_fwd` saves for backward.
    fn attention_state_len(&self, batch: usize, seq: usize, heads: usize) -> usize;
    /// out (B·T, H) = softmax(Q Kᵀ/√d + mask) V per head, Q, K, V the thirds of qkv (B·T, 3H); keys where
    /// mask (B, T) is 0 are excluded; probabilities dropped out with `dropout`. Saves `state`.
    fn attention_fwd(
        &self,
        out: Buf,
        state: Buf,
        qkv: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        head_size: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;
    /// dqkv (B·T, 3H) =; `out` is attention_fwd's output.
    fn attention_bwd(
        &self,
        dqkv: Buf,
        dout: Buf,
        out: Buf,
        qkv: Buf,
        state: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        head_size: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;
}

/// A pointer that may cross threads: each thread writes a disjoint part (checked by the caller).
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);

unsafe impl<T> Send for SyncPtr<T> {}

unsafe impl<T> Sync for SyncPtr<T> {}

impl<T: Real> Attention for Cpu<T> {
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
}

impl Cuda {
    fn attention_kernels(&self, hs: usize) -> Result<&AttentionKernels> {
        self.k.attention.iter().find(|a| a.hs == hs).ok_or_else(|| {
            Error::Invalid(format!(
                "head size {hs} is not supported by the CUDA attention kernels (16, 32, 64 or 128)"
            ))
        })
    }
}

impl Attention for Cuda {
    fn attention_state_len(&self, batch: usize, seq: usize, heads: usize) -> usize {
        // log-sum-exp per (batch, head, query), and the backward's row terms D per (batch, query, head)
        2 * batch * heads * seq
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
        self.need_f32("attention state", &[state])?;
        let dt = self.storage(qkv)?;
        let (rows, hid) = (batch * seq, heads * hs);
        Self::need("attention state", state.len, self.attention_state_len(batch, seq, heads))?;
        Self::need("attention out", out.len, rows * hid)?;
        Self::need("attention qkv", qkv.len, rows * 3 * hid)?;
        Self::need("attention mask", mask.len, rows)?;
        if rows * heads == 0 {
            return Ok(());
        }
        let kernels = self.attention_kernels(hs)?;
        // bf16 on tensor cores where there is a kernel for the head size; else (fp32: the exact path) one
        // query per thread on the CUDA cores.
        let (f, threads) = match (dt, kernels.fwd_tensor_core) {
            (StorageType::Bf16, Some(tc)) => (tc, ATTENTION_TC_THREADS),
            _ => (kernels.fwd.of(dt), ATTENTION_ROWS),
        };
        let ([po, pl], [pq]) = self.ptrs_as(dt, [out, state.prefix(batch * heads * seq)], [qkv])?;
        let pm = self.iptr(mask)?;
        let (t, nh, scale, d) =
            (seq as i32, heads as i32, (1.0 / (hs as f64).sqrt()) as f32, DropoutArgs::of(dropout));
        self.launch(
            f,
            ((batch * heads) as u32, seq.div_ceil(ATTENTION_ROWS as usize) as u32, 1),
            threads,
            &[&po, &pl, &pq, &pm, &t, &nh, &scale, &d],
        )?;
        Ok(())
    }

    fn attention_bwd(
        &self,
        dqkv: Buf,
        dout: Buf,
        out: Buf,
        qkv: Buf,
        state: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        hs: usize,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        self.need_f32("attention state", &[state])?;
        let dt = self.storage(qkv)?;
        let rows = batch * seq;
        Self::need("attention state", state.len, self.attention_state_len(batch, seq, heads))?;
        Self::need("attention dqkv", dqkv.len.min(qkv.len), rows * 3 * heads * hs)?;
        Self::need("attention dout", dout.len.min(out.len), rows * heads * hs)?;
        Self::need("attention mask", mask.len, rows)?;
        if rows * heads == 0 {
            return Ok(());
        }
        let kernels = self.attention_kernels(hs)?;
        // bf16 on tensor cores where there are kernels for the head size; else one row per thread.
        let ((fkv, fq), threads) = match (dt, kernels.bwd_tensor_core) {
            (StorageType::Bf16, Some(tc)) => (tc, ATTENTION_TC_THREADS),
            _ => ((kernels.bwd_dkdv.of(dt), kernels.bwd_dq.of(dt)), ATTENTION_ROWS),
        };
        let half = batch * heads * seq;
        let (lse, dd) = (state.prefix(half), state.at(half, half));
        let ([pdd], [pg, po]) = self.ptrs_as(dt, [dd], [dout, out])?;
        let (rows, nh, hsi) = ((batch * seq) as i32, heads as i32, hs as i32);
        self.launch(
            self.k.attention_bwd_d.of(dt),
            (grid_for(half), 1, 1),
            THREADS,
            &[&pdd, &pg, &po, &rows, &nh, &hsi],
        )?;
        let ([pdq], [pg, pq, pl, pd]) = self.ptrs_as(dt, [dqkv], [dout, qkv, lse, dd])?;
        let pm = self.iptr(mask)?;
        let (t, scale, d) = (seq as i32, (1.0 / (hs as f64).sqrt()) as f32, DropoutArgs::of(dropout));
        let grid = ((batch * heads) as u32, seq.div_ceil(ATTENTION_ROWS as usize) as u32, 1);
        for f in [fkv, fq] {
            self.launch(f, grid, threads, &[&pdq, &pg, &pq, &pl, &pd, &pm, &t, &nh, &scale, &d])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn attention_forward_and_backward_with_padding_and_dropout() {
        let hs = H / NH;
        for dropout in [None, Some(Dropout { p: 0.1, key: DropoutKey { seed: 5, step: 9, site: 2 } })] {
            let c = Case {
                floats: vec![randn(17, B * T * 3 * H, 1.0), randn(18, B * T * H, 1.0)],
                ints: vec![mask()],
                outs: vec![(B * T * H, None), (B * T * 3 * H, None)],
            };
            same(&format!("attention dropout={}", dropout.is_some()), &c, 1e-5, 1e-4, &|be, f, i, o| {
                let state = be.alloc(be.attention_state_len(B, T, NH))?;
                be.attention_fwd(o[0], state, f[0], i[0], B, T, NH, hs, dropout)?;
                be.attention_bwd(o[1], f[1], o[0], f[0], state, i[0], B, T, NH, hs, dropout)
            });
        }
    }

    fn bf16_ops_against_the_fp32_cpu() {
        use Kind::{Activation as A, Stat as S};
        let rows = B * T;
        // Attention with padding.
        let hs = H / NH;
        let c = Case {
            floats: vec![randn(17, rows * 3 * H, 1.0), randn(18, rows * H, 1.0)],
            ints: vec![mask()],
            outs: vec![(rows * H, None), (rows * 3 * H, None)],
        };
        same_bf16("attention", &c, &[A, A], &[A, A], 3e-2, &|be, f, i, o| {
            let state = be.alloc_kind(be.attention_state_len(B, T, NH), S)?;
            be.attention_fwd(o[0], state, f[0], i[0], B, T, NH, hs, None)?;
            be.attention_bwd(o[1], f[1], o[0], f[0], state, i[0], B, T, NH, hs, None)
        });
    }

    /// bf16 attention at the head sizes the tensor-core forward takes, over several query blocks and key
    /// tiles: sequences of 100 tokens, of 70 with a masked key inside, and of none (every key attended);
    /// with and without dropout (the same masks as the CPU's), the backward from the saved log-sum-exp.
    fn tensor_core_attention_at_head_sizes_32_64_128() {
        use Kind::{Activation as A, Stat as S};
        let (b, t, nh) = (3, 100, 2);
        let mask: Vec<i32> =
            (0..b * t).map(|r| (r / t == 0 || (r / t == 1 && r % t < 70 && r % t != 5)) as i32).collect();
        for hs in [32, 64, 128] {
            let hid = nh * hs;
            for dropout in [None, Some(Dropout { p: 0.1, key: DropoutKey { seed: 3, step: 1, site: 0 } })] {
                let c = Case {
                    floats: vec![randn(21, b * t * 3 * hid, 1.0), randn(22, b * t * hid, 1.0)],
                    ints: vec![mask.clone()],
                    outs: vec![(b * t * hid, None), (b * t * 3 * hid, None)],
                };
                let what = format!("attention hs {hs} dropout={}", dropout.is_some());
                same_bf16(&what, &c, &[A, A], &[A, A], 3e-2, &|be, f, i, o| {
                    let state = be.alloc_kind(be.attention_state_len(b, t, nh), S)?;
                    be.attention_fwd(o[0], state, f[0], i[0], b, t, nh, hs, dropout)?;
                    be.attention_bwd(o[1], f[1], o[0], f[0], state, i[0], b, t, nh, hs, dropout)
                });
            }
        }
    }

    on_both_devices!(
        attention_forward_and_backward_with_padding_and_dropout,
        bf16_ops_against_the_fp32_cpu,
        tensor_core_attention_at_head_sizes_32_64_128,
    );
}
