//! The encoder: embeddings (word + position + token type, LayerNorm, dropout) and the post-LN layers
//! (fused QKV, attention, dense, residual + LayerNorm, FFN with GELU, residual + LayerNorm), forward and
//! backward; the dense layers' forward and backward shared with the heads.

use super::activations::LayerActs;
use super::inputs::Train;
use super::inputs::{GradsDone, Inputs};
use super::{site, Bert, SITE_ATTN_OUT, SITE_ATTN_PROBS, SITE_EMBEDDINGS, SITE_FFN_OUT};
use crate::backend::{Backend, Buf, Dropout, DropoutKey};
use crate::error::Result;
use crate::model::params::LayerOffsets;

impl<'a, B: Backend> Bert<'a, B> {
    pub(super) fn dropout(&self, p: f64, train: Option<Train>, site: u64) -> Option<Dropout> {
        match train {
            Some(t) if p > 0.0 => {
                Some(Dropout { p: p as f32, key: DropoutKey { seed: t.seed, step: t.step, site } })
            }
            _ => None,
        }
    }

    pub(super) fn linear_fwd(
        &self,
        out: Buf,
        inp: Buf,
        w: usize,
        b: usize,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Result<()> {
        self.be.linear(out, inp, self.p(w, out_f * in_f), self.p(b, out_f), (rows, in_f, out_f), out_f)
    }

    /// dinp (rows, in) = or += dout · W; dW += doutᵀ · inp; db += Σ dout (unless `b` is None: the bias
    /// gradient was reduced already, fused with the op that made `dout`).
    pub(super) fn linear_bwd(
        &self,
        dinp: Option<(Buf, bool)>,
        dout: Buf,
        inp: Buf,
        w: usize,
        b: Option<usize>,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Result<()> {
        let be = self.be;
        let dout = dout.prefix(rows * out_f);
        if let Some((dinp, acc)) = dinp {
            be.matmul(
                dinp.prefix(rows * in_f),
                dout,
                self.p(w, out_f * in_f),
                rows,
                in_f,
                out_f,
                false,
                false,
                acc,
            )?;
        }
        match b {
            Some(b) => be.linear_param_grads(
                self.g(w, out_f * in_f),
                self.g(b, out_f),
                dout,
                inp,
                (rows, in_f, out_f),
                out_f,
            ),
            None => be.matmul(
                self.g(w, out_f * in_f),
                dout,
                inp.prefix(rows * in_f),
                out_f,
                in_f,
                rows,
                true,
                false,
                true,
            ),
        }
    }

    /// Backward of `out = LayerNorm(sum)`, `sum = residual + dropout(branch)`, with `grad` = d(out) and
    /// `ln` = (sum, mean, rstd, weight offset, bias offset). Writes d(sum), the residual's gradient, into
    /// `dsum` and returns the buffer holding the branch's gradient: `grad` overwritten in place when there
    /// is dropout (fused with the LayerNorm backward), else `dsum` itself.
    pub(super) fn residual_layernorm_bwd(
        &self,
        dsum: Buf,
        grad: Buf,
        ln: (Buf, Buf, Buf, usize, usize),
        rows: usize,
        dropout: Option<Dropout>,
    ) -> Result<Buf> {
        let h = self.config.hidden_size;
        let (sum, mean, rstd, w, b) = ln;
        let (dw, db, pw) = (self.g(w, h), self.g(b, h), self.p(w, h));
        match dropout {
            Some(d) => {
                self.be.residual_layernorm_bwd(dsum, dw, db, grad, sum, mean, rstd, pw, rows, h, d)?;
                Ok(grad)
            }
            None => {
                self.be.layernorm_bwd(dsum, dw, db, grad, sum, mean, rstd, pw, rows, h)?;
                Ok(dsum)
            }
        }
    }

    /// The encoder: embeddings and every layer; leaves the last hidden state in x[L].
    pub(super) fn encoder_fwd(&self, inp: &Inputs, train: Option<Train>) -> Result<()> {
        let (be, c, a, top) = (self.be, &self.config, &self.a, &self.table.top);
        let (b, t) = (inp.batch, inp.seq);
        let n = b * t;
        let (h, i, v, nh, hs) =
            (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads, c.head_size());
        let eps = c.layer_norm_eps as f32;
        let nhid = n * h;
        let emb_drop = self.dropout(c.hidden_dropout_prob, train, SITE_EMBEDDINGS);
        let ln_out = if emb_drop.is_some() { a.emb_ln } else { a.x[0] };
        be.embeddings_layernorm_fwd(
            a.emb.prefix(nhid),
            ln_out.prefix(nhid),
            a.emb_mean,
            a.emb_rstd,
            a.ids,
            a.types,
            self.p(top.word, v * h),
            self.p(top.position, c.max_position_embeddings * h),
            self.p(top.token_type, c.type_vocab_size * h),
            self.p(top.emb_ln_w, h),
            self.p(top.emb_ln_b, h),
            b,
            t,
            h,
            eps,
        )?;
        if let Some(d) = emb_drop {
            be.dropout_fwd(a.x[0].prefix(nhid), a.emb_ln.prefix(nhid), d)?;
        }
        for (l, (lo, la)) in self.table.layers.iter().zip(&a.layers).enumerate() {
            let x = a.x[l].prefix(nhid);
            self.linear_fwd(la.qkv, x, lo.qkv_w, lo.qkv_b, n, h, 3 * h)?;
            let probs_drop = self.dropout(c.attention_probs_dropout_prob, train, site(l, SITE_ATTN_PROBS));
            be.attention_fwd(
                la.ctx.prefix(nhid),
                la.att_state,
                la.qkv.prefix(n * 3 * h),
                a.mask.prefix(n),
                b,
                t,
                nh,
                hs,
                probs_drop,
            )?;
            self.linear_fwd(a.tmp, la.ctx, lo.attn_out_w, lo.attn_out_b, n, h, h)?;
            // h1 = LN1(x + dropout(attention output)), fused
            be.residual_layernorm_fwd(
                la.sum1.prefix(nhid),
                la.h1.prefix(nhid),
                la.mean1,
                la.rstd1,
                x,
                a.tmp.prefix(nhid),
                self.p(lo.ln1_w, h),
                self.p(lo.ln1_b, h),
                n,
                h,
                eps,
                self.dropout(c.hidden_dropout_prob, train, site(l, SITE_ATTN_OUT)),
            )?;
            // gelu(h1 · W1ᵀ + b1): the product, then bias and GELU in one pass
            be.matmul(
                la.ff1.prefix(n * i),
                la.h1.prefix(nhid),
                self.p(lo.ff1_w, i * h),
                n,
                i,
                h,
                false,
                true,
                false,
            )?;
            be.bias_gelu_fwd(
                la.ff1.prefix(n * i),
                la.gelu.prefix(n * i),
                self.p(lo.ff1_b, i),
                n,
                i,
                self.act,
            )?;
            self.linear_fwd(a.tmp, la.gelu, lo.ff2_w, lo.ff2_b, n, i, h)?;
            // x[l+1] = LN2(h1 + dropout(FFN output)), fused
            be.residual_layernorm_fwd(
                la.sum2.prefix(nhid),
                a.x[l + 1].prefix(nhid),
                la.mean2,
                la.rstd2,
                la.h1.prefix(nhid),
                a.tmp.prefix(nhid),
                self.p(lo.ln2_w, h),
                self.p(lo.ln2_b, h),
                n,
                h,
                eps,
                self.dropout(c.hidden_dropout_prob, train, site(l, SITE_FFN_OUT)),
            )?;
        }
        Ok(())
    }

    /// Backward through the encoder from dx = d(loss)/d(last hidden state).
    pub(super) fn encoder_bwd(
        &self,
        inp: &Inputs,
        train: Option<Train>,
        mut grads_done: Option<&mut GradsDone>,
    ) -> Result<()> {
        let (be, c, a, top) = (self.be, &self.config, &self.a, &self.table.top);
        let (b, t) = (inp.batch, inp.seq);
        let n = b * t;
        let (h, i, v, nh, hs) =
            (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_attention_heads, c.head_size());
        let nhid = n * h;
        let (dx, dx2) = (a.dx.prefix(nhid), a.dx2.prefix(nhid));
        for l in (0..c.num_hidden_layers).rev() {
            let (lo, la): (&LayerOffsets, &LayerActs) = (&self.table.layers[l], &a.layers[l]);
            // out = LN2(sum2): dsum2 into dx2 (the residual carries it to h1); the FFN branch's gradient
            // dropout'(dsum2) in dx (in place, fused with the LayerNorm backward when there is dropout)
            let ffn_drop = self.dropout(c.hidden_dropout_prob, train, site(l, SITE_FFN_OUT));
            let ln2 = (la.sum2.prefix(nhid), la.mean2, la.rstd2, lo.ln2_w, lo.ln2_b);
            let dff2 = self.residual_layernorm_bwd(dx2, dx, ln2, n, ffn_drop)?;
            let dgelu = a.dgelu.prefix(n * i);
            self.linear_bwd(Some((dgelu, false)), dff2, la.gelu, lo.ff2_w, Some(lo.ff2_b), n, i, h)?;
            let dff1 = a.dqkv_ff1.prefix(n * i);
            be.gelu_bias_bwd(dff1, self.g(lo.ff1_b, i), dgelu, la.ff1.prefix(n * i), n, i, self.act)?;
            // dh1 = dsum2 (still in dx2) + dff1 · W1
            self.linear_bwd(Some((dx2, true)), dff1, la.h1, lo.ff1_w, None, n, h, i)?;
            // h1 = LN1(sum1): dsum1 into dx; the attention branch's gradient dropout'(dsum1) in dx2
            let attn_drop = self.dropout(c.hidden_dropout_prob, train, site(l, SITE_ATTN_OUT));
            let ln1 = (la.sum1.prefix(nhid), la.mean1, la.rstd1, lo.ln1_w, lo.ln1_b);
            let dattn = self.residual_layernorm_bwd(dx, dx2, ln1, n, attn_drop)?;
            let dctx = a.tmp.prefix(nhid);
            self.linear_bwd(Some((dctx, false)), dattn, la.ctx, lo.attn_out_w, Some(lo.attn_out_b), n, h, h)?;
            let dqkv = a.dqkv_ff1.prefix(n * 3 * h);
            let probs_drop = self.dropout(c.attention_probs_dropout_prob, train, site(l, SITE_ATTN_PROBS));
            be.attention_bwd(
                dqkv,
                dctx,
                la.ctx.prefix(nhid),
                la.qkv.prefix(n * 3 * h),
                la.att_state,
                a.mask.prefix(n),
                b,
                t,
                nh,
                hs,
                probs_drop,
            )?;
            // dx (the layer input) = dsum1 + dqkv · Wqkv
            self.linear_bwd(Some((dx, true)), dqkv, a.x[l], lo.qkv_w, Some(lo.qkv_b), n, h, 3 * h)?;
            if let Some(f) = grads_done.as_deref_mut() {
                f(Some(l))?;
            }
        }
        // embeddings: x0 = dropout(LN(emb))
        let demb_ln = match self.dropout(c.hidden_dropout_prob, train, SITE_EMBEDDINGS) {
            Some(d) => {
                be.dropout_bwd(dx2, dx, d)?;
                dx2
            }
            None => dx,
        };
        let demb = if demb_ln == dx { dx2 } else { dx };
        be.layernorm_bwd(
            demb,
            self.g(top.emb_ln_w, h),
            self.g(top.emb_ln_b, h),
            demb_ln,
            a.emb.prefix(nhid),
            a.emb_mean,
            a.emb_rstd,
            self.p(top.emb_ln_w, h),
            n,
            h,
        )?;
        be.embeddings_bwd(
            self.g(top.word, v * h),
            self.g(top.position, c.max_position_embeddings * h),
            self.g(top.token_type, c.type_vocab_size * h),
            demb,
            a.ids,
            a.types,
            b,
            t,
            h,
        )?;
        match grads_done {
            Some(f) => f(None),
            None => Ok(()),
        }
    }
}
