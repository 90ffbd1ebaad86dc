//! The embeddings: word + position + token type, their scatter-add backward (deterministic, no atomics),
//! and the fused embeddings + LayerNorm forward. Kernels: kernels/embedding.cu.
//!
//! One op family in two places: its kernels in `kernels/embedding.cu`, and this file: the `Embedding` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Embedding for Cpu<T>`), the CUDA launchers
//! (`impl Embedding for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{PARTIAL_ROWS, THREADS, WARP_ROWS};
use crate::backend::cuda::{grid_for, Cuda, StorageType};
use crate::backend::{Buf, Ints};
use crate::bail;
use crate::error::Result;
use crate::ops::Norm;

pub trait Embedding: Norm {
    /// out (B·T, H) = word[ids] + position[t] + token_type[types].
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
    ) -> Result<()>;
    /// dword, dposition, dtoken_type += the scatter of dout (B·T, H); deterministic.
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
    ) -> Result<()>;
    /// emb (B·T, H) = word[ids] + position[t] + token_type[types]; out = LayerNorm(emb), mean, rstd saved.
    fn embeddings_layernorm_fwd(
        &self,
        emb: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        w: Buf,
        b: Buf,
        batch: usize,
        seq: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        self.embeddings_fwd(emb, ids, types, word, position, token_type, batch, seq, h)?;
        self.layernorm_fwd(out, mean, rstd, emb, w, b, batch * seq, h, eps)
    }
}

impl<T: Real> Embedding for Cpu<T> {
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
}

impl Cuda {
    /// table[id] += Σ of dout's rows whose token id is `id`, deterministically: the (id, row) items of the
    /// n rows sorted on the device (a bitonic sort of the next power of two of them), then one block per
    /// run of an id, adding its rows in row order.
    fn word_gradient(
        &self,
        dt: StorageType,
        table: u64,
        dout: u64,
        ids: u64,
        n: usize,
        h: usize,
    ) -> Result<()> {
        let n2 = n.next_power_of_two();
        let items = self.sort_items.borrow_mut().at_least(&self.dev, 8 * n2)?;
        let (ni, n2i, hi) = (n as i32, n2 as i32, h as i32);
        let grid = (grid_for(n2), 1, 1);
        self.launch(self.k.embedding_sort_init, grid, THREADS, &[&items, &ids, &ni, &n2i])?;
        let mut k = 2;
        while k <= n2 {
            let mut j = k / 2;
            while j > 0 {
                let (ki, ji) = (k as i32, j as i32);
                self.launch(self.k.embedding_sort_stage, grid, THREADS, &[&items, &n2i, &ki, &ji])?;
                j /= 2;
            }
            k *= 2;
        }
        self.launch(
            self.k.embedding_key_runs.of(dt),
            (n as u32, 1, 1),
            THREADS,
            &[&table, &dout, &items, &ni, &hi],
        )
    }
}

impl Embedding for Cuda {
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
        let dt = self.storage(out)?;
        Self::need("embeddings out", out.len, batch * seq * h)?;
        if batch * seq == 0 {
            return Ok(());
        }
        let n = batch * seq;
        if position.len / h < seq {
            bail!("sequence length {seq} exceeds max_position_embeddings {}", position.len / h);
        }
        let (idh, tyh) = (self.host_ints(ids.prefix(n))?, self.host_ints(types.prefix(n))?);
        let nv = (word.len / h) as i32;
        if let Some(bad) = idh.iter().find(|&&i| i < 0 || i >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        let nt = (token_type.len / h) as i32;
        if let Some(bad) = tyh.iter().find(|&&i| i < 0 || i >= nt) {
            bail!("token type {bad} is outside type_vocab_size {nt}");
        }
        let ([po], [pw, pp, pt]) = self.ptrs_as(dt, [out], [word, position, token_type])?;
        let (pi, pty) = (self.iptr(ids)?, self.iptr(types)?);
        let (rows, s, hh) = (n as i32, seq as i32, h as i32);
        self.launch(
            self.k.embeddings_fwd.of(dt),
            (n as u32, 1, 1),
            THREADS,
            &[&po, &pi, &pty, &pw, &pp, &pt, &rows, &s, &hh],
        )?;
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
        self.need_f32_out("embedding gradients", &[dword, dposition, dtoken_type])?;
        let dt = self.storage(dout)?;
        let n = batch * seq;
        let ([pw, pp, pt], [pg]) = self.ptrs_as(dt, [dword, dposition, dtoken_type], [dout])?;
        if n == 0 {
            return Ok(());
        }
        let nv = dword.len / h;
        if let Some(bad) = self.host_ints(ids.prefix(n))?.iter().find(|&&i| i < 0 || i as usize >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        self.word_gradient(dt, pw, pg, self.iptr(ids)?, n, h)?;
        let (b, s, hi) = (batch as i32, seq as i32, h as i32);
        let columns = h.div_ceil(THREADS as usize) as u32;
        self.launch(
            self.k.embedding_position_bwd.of(dt),
            (seq as u32, columns, 1),
            THREADS,
            &[&pp, &pg, &b, &s, &hi],
        )?;
        // Token types: partial sums per block of rows, then their sum in block order.
        let ntypes = dtoken_type.len / h;
        let chunks = n.div_ceil(PARTIAL_ROWS as usize);
        let partial = self.partials(chunks * ntypes * h)?;
        let (rows, nt, pty) = (n as i32, ntypes as i32, self.iptr(types)?);
        self.launch(
            self.k.embedding_type_partial.of(dt),
            (chunks as u32, columns, 1),
            THREADS,
            &[&partial, &pg, &pty, &rows, &nt, &hi],
        )?;
        self.sum_partials(pt, partial, chunks, ntypes * h, ntypes * h)
    }

    fn embeddings_layernorm_fwd(
        &self,
        emb: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        w: Buf,
        b: Buf,
        batch: usize,
        seq: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        let dt = self.storage_of_all("embeddings layernorm", &[emb, out])?;
        let n = batch * seq;
        self.need_f32_out("layernorm statistics", &[mean, rstd])?;
        Self::need("embeddings out", emb.len.min(out.len), n * h)?;
        Self::need("layernorm stats", mean.len.min(rstd.len), n)?;
        if n == 0 {
            return Ok(());
        }
        if position.len / h < seq {
            bail!("sequence length {seq} exceeds max_position_embeddings {}", position.len / h);
        }
        let nv = (word.len / h) as i32;
        if let Some(bad) = self.host_ints(ids.prefix(n))?.iter().find(|&&i| i < 0 || i >= nv) {
            bail!("token id {bad} is outside the vocabulary of {nv}");
        }
        let nt = (token_type.len / h) as i32;
        if let Some(bad) = self.host_ints(types.prefix(n))?.iter().find(|&&i| i < 0 || i >= nt) {
            bail!("token type {bad} is outside type_vocab_size {nt}");
        }
        let ([pe, po, pm, pr], [pw, pp, pt, plw, plb]) =
            self.ptrs_as(dt, [emb, out, mean, rstd], [word, position, token_type, w, b])?;
        let (pi, pty) = (self.iptr(ids)?, self.iptr(types)?);
        let (rows, s, hh) = (n as i32, seq as i32, h as i32);
        self.launch(
            self.k.embeddings_layernorm.of(dt),
            (n.div_ceil(WARP_ROWS as usize) as u32, 1, 1),
            THREADS,
            &[&pe, &po, &pm, &pr, &pi, &pty, &pw, &pp, &pt, &plw, &plb, &rows, &s, &hh, &eps],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn embeddings_rows_cross_entropy_and_argmax() {
        let n = B * T;
        let mut r = KeyedRng::new(4, &[1]);
        let ids: Vec<i32> = (0..n).map(|_| r.below(V as u64) as i32).collect(); // many repeats
        let types: Vec<i32> = (0..n).map(|k| ((k % T) > T / 2) as i32).collect();
        let c = Case {
            floats: vec![
                randn(19, V * H, 1.0),
                randn(20, T * H, 1.0),
                randn(21, 2 * H, 1.0),
                randn(22, n * H, 1.0),
            ],
            ints: vec![ids, types],
            outs: vec![
                (n * H, None),
                (V * H, Some(randn(23, V * H, 1.0))),
                (T * H, Some(vec![0.0; T * H])),
                (2 * H, Some(vec![0.0; 2 * H])),
            ],
        };
        same("embeddings", &c, 1e-5, 1e-5, &|be, f, i, o| {
            be.embeddings_fwd(o[0], i[0], i[1], f[0], f[1], f[2], B, T, H)?;
            be.embeddings_bwd(o[1], o[2], o[3], f[3], i[0], i[1], B, T, H)
        });
    }

    fn bf16_ops_against_the_fp32_cpu() {
        use Kind::{Activation as A, Grad as G, Param as P};
        let rows = B * T;
        let ids: Vec<i32> = (0..rows as i32).map(|r| (r * 7) % V as i32).collect();
        let types: Vec<i32> = (0..rows).map(|r| ((r % T) > T / 2) as i32).collect();
        let c = Case {
            floats: vec![
                randn(19, V * H, 1.0),
                randn(20, T * H, 1.0),
                randn(21, 2 * H, 1.0),
                randn(22, rows * H, 1.0),
            ],
            ints: vec![ids, types],
            outs: vec![
                (rows * H, None),
                (V * H, Some(vec![0.0; V * H])),
                (T * H, Some(vec![0.0; T * H])),
                (2 * H, Some(vec![0.0; 2 * H])),
            ],
        };
        same_bf16("embeddings", &c, &[P, P, P, A], &[A, G, G, G], 3e-2, &|be, f, i, o| {
            be.embeddings_fwd(o[0], i[0], i[1], f[0], f[1], f[2], B, T, H)?;
            be.embeddings_bwd(o[1], o[2], o[3], f[3], i[0], i[1], B, T, H)
        });
    }

    fn fused_forward_kernels_equal_the_unfused_cpu_ops() {
        let rows = B * T;
        let ids: Vec<i32> = (0..rows as i32).map(|k| (k * 13) % V as i32).collect();
        let types: Vec<i32> = (0..rows).map(|k| ((k % T) > 9) as i32).collect();
        // H: rows held in registers with 16-byte accesses; 37: the element-wise path of odd widths.
        for w in [H, 37] {
            let c = Case {
                floats: vec![
                    randn(46, V * w, 1.0),
                    randn(47, T * w, 1.0),
                    randn(48, 2 * w, 1.0),
                    randn(49, w, 1.0),
                    randn(50, w, 1.0),
                ],
                ints: vec![ids.clone(), types.clone()],
                outs: vec![(rows * w, None), (rows * w, None), (rows, None), (rows, None)],
            };
            same(&format!("embeddings + layernorm, width {w}"), &c, 1e-5, 1e-4, &|be, f, i, o| {
                be.embeddings_layernorm_fwd(
                    o[0], o[1], o[2], o[3], i[0], i[1], f[0], f[1], f[2], f[3], f[4], B, T, w, 1e-12,
                )
            });
        }
    }

    on_both_devices!(
        embeddings_rows_cross_entropy_and_argmax,
        bf16_ops_against_the_fp32_cpu,
        fused_forward_kernels_equal_the_unfused_cpu_ops,
    );
}
