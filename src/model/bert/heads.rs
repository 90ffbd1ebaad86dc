//! The pretraining heads: the pooler and NSP head on the [CLS] rows, the MLM head (transform, then the
//! decoder tied to the word embeddings) on the rows asked for — forward, loss and backward of each.

use super::inputs::{Inputs, Losses, StepOptions};
use super::{logit_stride, Bert};
use crate::backend::{strided_len, Backend, Buf, IGNORE_INDEX};
use crate::error::Result;
use crate::ops::Strides;

impl<'a, B: Backend> Bert<'a, B> {
    pub(super) fn pooler_fwd(&self, inp: &Inputs) -> Result<()> {
        let (be, a, top, h) = (self.be, &self.a, &self.table.top, self.config.hidden_size);
        let b = inp.batch;
        be.gather_rows(
            a.cls_in.prefix(b * h),
            a.x[self.config.num_hidden_layers],
            a.cls_rows.prefix(b),
            b,
            h,
        )?;
        self.linear_fwd(a.pool_pre, a.cls_in, top.pooler_w, top.pooler_b, b, h, h)?;
        be.tanh_fwd(a.pooled.prefix(b * h), a.pool_pre.prefix(b * h))?;
        self.linear_fwd(a.nsp_logits, a.pooled, top.nsp_w, top.nsp_b, b, h, 2)
    }

    /// The MLM transform on `rows` gathered rows: head_h = LN(gelu(dense(x[rows]))).
    pub(super) fn head_transform_fwd(&self, rows: usize) -> Result<()> {
        let (be, a, top, c) = (self.be, &self.a, &self.table.top, &self.config);
        let h = c.hidden_size;
        let rh = rows * h;
        be.gather_rows(a.head_in.prefix(rh), a.x[c.num_hidden_layers], a.head_rows.prefix(rows), rows, h)?;
        be.matmul(
            a.head_t.prefix(rh),
            a.head_in.prefix(rh),
            self.p(top.mlm_dense_w, h * h),
            rows,
            h,
            h,
            false,
            true,
            false,
        )?;
        be.bias_gelu_fwd(
            a.head_t.prefix(rh),
            a.head_g.prefix(rh),
            self.p(top.mlm_dense_b, h),
            rows,
            h,
            self.act,
        )?;
        be.layernorm_fwd(
            a.head_h.prefix(rh),
            a.head_mean,
            a.head_rstd,
            a.head_g.prefix(rh),
            self.p(top.mlm_ln_w, h),
            self.p(top.mlm_ln_b, h),
            rows,
            h,
            c.layer_norm_eps as f32,
        )
    }

    /// Σ of a head's per-row losses: added into element `which` of `o.loss_sums` on the backend (None),
    /// or read back.
    fn loss_sum(&self, row_losses: Buf, o: &StepOptions, which: usize) -> Result<Option<f64>> {
        let be = self.be;
        if let Some(sums) = o.loss_sums {
            be.sum(sums.at(which, 1), row_losses)?;
            return Ok(None);
        }
        be.fill(self.a.loss_sum, 0.0)?;
        be.sum(self.a.loss_sum, row_losses)?;
        Ok(Some(be.download_f64(self.a.loss_sum)?[0]))
    }

    /// Logits of head rows [r0, r0 + k) into the logits buffer, (k, V) in rows `logit_stride(V)` apart:
    /// head_h · word_embeddingsᵀ + bias.
    pub(super) fn decoder_fwd(&self, r0: usize, k: usize) -> Result<Buf> {
        let (be, a, top, c) = (self.be, &self.a, &self.table.top, &self.config);
        let (h, v) = (c.hidden_size, c.vocab_size);
        let ld = logit_stride(v);
        let logits = a.logits.prefix(strided_len(k, v, ld));
        be.linear(
            logits,
            a.head_h.at(r0 * h, k * h),
            self.p(top.word, v * h),
            self.p(top.mlm_bias, v),
            (k, h, v),
            ld,
        )?;
        Ok(logits)
    }

    /// The pooler and NSP head: its loss (and accuracy) into `losses`; with `o.backward` its gradients,
    /// the [CLS] rows' added into `dx`.
    pub(super) fn nsp_head(
        &self,
        inp: &Inputs,
        nsp: &[u32],
        o: &StepOptions,
        losses: &mut Losses,
    ) -> Result<()> {
        let (be, a, top) = (self.be, &self.a, &self.table.top);
        let (b, n, h) = (inp.batch, inp.batch * inp.seq, self.config.hidden_size);
        let (backward, loss_scale) = (o.backward, o.loss_scale);
        self.pooler_fwd(inp)?;
        let denom = o.norm.map_or(b, |n| n.sequences).max(1);
        let scale = backward.then_some(loss_scale as f64 / denom as f64);
        if o.accuracy {
            be.argmax_rows(a.predictions, a.nsp_logits.prefix(b * 2), (b, 2, 2))?;
            let pred = be.download_ints(a.predictions.prefix(b))?;
            losses.nsp_correct = pred.iter().zip(nsp).filter(|(p, l)| **p as u32 == **l).count();
        }
        be.cross_entropy(
            a.nsp_losses.prefix(b),
            a.nsp_logits.prefix(b * 2),
            a.nsp_labels.prefix(b),
            (b, 2, 2),
            scale,
            o.loss_scale_by,
        )?;
        losses.nsp = self.loss_sum(a.nsp_losses.prefix(b), o, 1)?.map(|s| s / nsp.len() as f64);
        losses.sequences = b;
        if backward {
            // nsp_logits now hold d(loss)/d(logits)
            self.linear_bwd(
                Some((a.dhead, false)),
                a.nsp_logits,
                a.pooled,
                top.nsp_w,
                Some(top.nsp_b),
                b,
                h,
                2,
            )?;
            be.tanh_bwd(a.dhead2.prefix(b * h), a.dhead.prefix(b * h), a.pooled.prefix(b * h))?;
            self.linear_bwd(
                Some((a.dhead, false)),
                a.dhead2,
                a.cls_in,
                top.pooler_w,
                Some(top.pooler_b),
                b,
                h,
                h,
            )?;
            be.scatter_add_rows(a.dx.prefix(n * h), a.dhead.prefix(b * h), a.cls_rows.prefix(b), b, h)?;
        }
        Ok(())
    }

    /// The MLM head on the rows asked for, the decoder in chunks (each chunk's backward right after its
    /// forward): its loss (and accuracy) into `losses`; with `o.backward` its gradients, the head rows'
    /// added into `dx`.
    pub(super) fn mlm_head(&self, inp: &Inputs, o: &StepOptions, losses: &mut Losses) -> Result<()> {
        let (be, a, top) = (self.be, &self.a, &self.table.top);
        let (n, h, v) = (inp.batch * inp.seq, self.config.hidden_size, self.config.vocab_size);
        let ld = logit_stride(v);
        let (backward, loss_scale) = (o.backward, o.loss_scale);
        let rows = inp.head_rows.len();
        let counted = inp.head_labels.map(|l| l.iter().filter(|&&x| x != IGNORE_INDEX).count()).unwrap_or(0);
        if rows > 0 && counted > 0 {
            self.head_transform_fwd(rows)?;
            let denom = o.norm.map_or(counted, |n| n.mlm_tokens).max(1);
            let scale = backward.then_some(loss_scale as f64 / denom as f64);
            if backward {
                be.fill(a.dhead.prefix(rows * h), 0.0)?;
            }
            let mut r0 = 0;
            while r0 < rows {
                let k = self.capacity.logit_rows.min(rows - r0);
                let logits = self.decoder_fwd(r0, k)?;
                if o.accuracy {
                    be.argmax_rows(a.predictions, logits, (k, v, ld))?;
                    let pred = be.download_ints(a.predictions.prefix(k))?;
                    let labels = &inp.head_labels.expect("counted > 0")[r0..r0 + k];
                    losses.mlm_correct += pred.iter().zip(labels).filter(|(p, l)| *p == *l).count();
                }
                let labels = a.head_labels.at(r0, k);
                be.cross_entropy(a.mlm_losses.at(r0, k), logits, labels, (k, v, ld), scale, o.loss_scale_by)?;
                if backward {
                    // logits now hold d(loss)/d(logits): the decoder's backward, tied weight included
                    let (dhead, word) = (a.dhead.at(r0 * h, k * h), self.p(top.word, v * h));
                    let strided = Strides { a: Some(ld), ..Strides::DENSE };
                    be.matmul_strided(dhead, logits, word, (k, h, v), false, false, false, strided)?;
                    be.linear_param_grads(
                        self.g(top.word, v * h),
                        self.g(top.mlm_bias, v),
                        logits,
                        a.head_h.at(r0 * h, k * h),
                        (k, h, v),
                        ld,
                    )?;
                }
                r0 += k;
            }
            losses.mlm = self.loss_sum(a.mlm_losses.prefix(rows), o, 0)?.map(|s| s / counted as f64);
            losses.mlm_tokens = counted;
            if backward {
                let rh = rows * h;
                be.layernorm_bwd(
                    a.dhead2.prefix(rh),
                    self.g(top.mlm_ln_w, h),
                    self.g(top.mlm_ln_b, h),
                    a.dhead.prefix(rh),
                    a.head_g.prefix(rh),
                    a.head_mean,
                    a.head_rstd,
                    self.p(top.mlm_ln_w, h),
                    rows,
                    h,
                )?;
                let (dpre, dbias) = (a.dhead.prefix(rh), self.g(top.mlm_dense_b, h));
                be.gelu_bias_bwd(dpre, dbias, a.dhead2.prefix(rh), a.head_t.prefix(rh), rows, h, self.act)?;
                self.linear_bwd(
                    Some((a.dhead2, false)),
                    a.dhead,
                    a.head_in,
                    top.mlm_dense_w,
                    None,
                    rows,
                    h,
                    h,
                )?;
                be.scatter_add_rows(
                    a.dx.prefix(n * h),
                    a.dhead2.prefix(rh),
                    a.head_rows.prefix(rows),
                    rows,
                    h,
                )?;
            }
        }
        Ok(())
    }
}
