//! BERT for pretraining (`BertForPreTraining`): one forward and one backward, written once against the
//! `Backend` trait, like llm.c's gpt2_forward/gpt2_backward. Post-LN encoder; pooler; MLM head (transform,
//! then the decoder tied to the word embeddings plus `cls.predictions.bias`) run on the rows asked for —
//! the masked positions in training, every position for full logits; NSP head on the pooled output.
//! Loss = mean MLM cross-entropy over predicted tokens + mean NSP cross-entropy, as transformers.
//!
//! Activations are planned once for the largest batch and sequence and reused. The MLM decoder runs in
//! chunks of `Plan::logit_rows` rows; in training each chunk's backward follows its forward at once (the
//! loss is a sum over rows), so the (rows, V) logits are never all in memory.

use crate::backend::{Backend, Buf, Dropout, DropoutKey, Ints, Kind, IGNORE_INDEX};
use crate::bail;
use crate::error::Result;
use crate::model::config::{Activation, ModelConfig};
use crate::model::params::{LayerOffsets, ParamTable};

/// The largest shapes the activations are planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub max_batch: usize,
    pub max_seq: usize,
    /// Rows of MLM logits computed at once.
    pub logit_rows: usize,
}

impl Plan {
    pub fn new(max_batch: usize, max_seq: usize) -> Self {
        Plan { max_batch, max_seq, logit_rows: 2048.min(max_batch * max_seq).max(1) }
    }
}

/// One batch as the model takes it, row-major (batch, seq).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: &'a [u32],
    pub token_type_ids: &'a [u32],
    pub attention_mask: &'a [u8],
    /// Flat positions b·seq + t the MLM head runs on.
    pub head_rows: &'a [u32],
    /// Their labels (IGNORE_INDEX: no loss), or None: no MLM loss.
    pub head_labels: Option<&'a [i32]>,
    /// (batch) 0 = B follows A, 1 = random; None: no NSP loss.
    pub nsp_labels: Option<&'a [u32]>,
}

impl<'a> Inputs<'a> {
    /// The loader's batch, with the MLM head on its masked positions.
    pub fn from_batch(b: &'a crate::data::loader::Batch, labels: &'a mut Vec<i32>) -> Self {
        labels.clear();
        labels.extend(b.masked_positions.iter().map(|&p| b.labels[p as usize]));
        Inputs {
            batch: b.batch_size,
            seq: b.seq_len,
            input_ids: &b.input_ids,
            token_type_ids: &b.token_type_ids,
            attention_mask: &b.attention_mask,
            head_rows: &b.masked_positions,
            head_labels: Some(labels),
            nsp_labels: b.next_sentence_label.as_deref(),
        }
    }
}

/// Called as the backward pass completes gradients: `Some(layer)` after each encoder layer (from the last
/// down), `None` at the end.
pub type GradsDone<'f> = dyn FnMut(Option<usize>) -> Result<()> + 'f;

/// Dropout on (training); off in evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Train {
    pub seed: u64,
    /// The micro-step: a new mask every forward pass.
    pub step: u64,
}

/// Denominators of the mean losses: the predicted tokens and the sequences of the whole effective batch
/// (every micro-batch of an accumulated step, every rank), so accumulation equals one larger batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossNorm {
    pub mlm_tokens: usize,
    pub sequences: usize,
}

/// What one pass does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// Dropout on (training) with these keys; None = evaluation.
    pub train: Option<Train>,
    /// Add the loss's gradients into `grads`.
    pub backward: bool,
    /// Multiplies the gradients (the fp16 loss scale).
    pub loss_scale: f32,
    /// The gradients' denominators; None = this batch's own counts.
    pub norm: Option<LossNorm>,
    /// Count correct predictions (argmax) for accuracy.
    pub accuracy: bool,
}

impl StepOptions {
    /// Evaluation: no dropout, no gradients.
    pub fn eval() -> Self {
        StepOptions { train: None, backward: false, loss_scale: 1.0, norm: None, accuracy: false }
    }
    /// Gradients of this batch's loss, no dropout.
    pub fn grads() -> Self {
        StepOptions { backward: true, ..Self::eval() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Losses {
    /// Mean MLM cross-entropy over this batch's predicted tokens.
    pub mlm: Option<f64>,
    /// Mean NSP cross-entropy over this batch's sequences.
    pub nsp: Option<f64>,
    /// Rows whose label counted in the MLM loss.
    pub mlm_tokens: usize,
    /// Sequences in the NSP loss.
    pub sequences: usize,
    /// With `accuracy`: correct argmax predictions.
    pub mlm_correct: usize,
    pub nsp_correct: usize,
}

impl Losses {
    /// MLM + NSP, the ones present; None when neither is.
    pub fn total(&self) -> Option<f64> {
        match (self.mlm, self.nsp) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        }
    }
}

/// Saved activations of one encoder layer; shapes for N = batch·seq rows.
struct LayerActs {
    qkv: Buf,       // (N, 3H)
    att_state: Buf, // backend-specific (probabilities or log-sum-exp)
    ctx: Buf,       // (N, H) attention output before its dense layer
    sum1: Buf,      // (N, H) x + dropout(attention dense): LN1 input
    mean1: Buf,     // (N)
    rstd1: Buf,     // (N)
    h1: Buf,        // (N, H) LN1 output: FFN input and residual
    ff1: Buf,       // (N, I) before GELU
    gelu: Buf,      // (N, I)
    sum2: Buf,      // (N, H) h1 + dropout(FFN out): LN2 input
    mean2: Buf,     // (N)
    rstd2: Buf,     // (N)
}

struct Acts {
    emb: Buf,      // (N, H) word + position + type: embedding LN input
    emb_mean: Buf, // (N)
    emb_rstd: Buf, // (N)
    emb_ln: Buf,   // (N, H) LN output before dropout
    x: Vec<Buf>,   // L+1 × (N, H): encoder layer inputs, x[L] = last hidden state
    layers: Vec<LayerActs>,
    tmp: Buf, // (N, H) a dense output before dropout
    // pooler and NSP head
    cls_in: Buf,     // (B, H)
    pooled: Buf,     // (B, H) after tanh
    pool_pre: Buf,   // (B, H) before tanh
    nsp_logits: Buf, // (B, 2)
    nsp_losses: Buf, // (B)
    // MLM head, rows R ≤ N
    head_in: Buf,    // (R, H)
    head_t: Buf,     // (R, H) transform dense output
    head_g: Buf,     // (R, H) GELU
    head_mean: Buf,  // (R)
    head_rstd: Buf,  // (R)
    head_h: Buf,     // (R, H) LN output: decoder input
    logits: Buf,     // (logit_rows, V)
    mlm_losses: Buf, // (R)
    loss_sum: Buf,   // (1)
    // gradients of activations
    dx: Buf,     // (N, H)
    dx2: Buf,    // (N, H)
    dwide: Buf,  // (N, max(3H, I))
    dwide2: Buf, // (N, I)
    dhead: Buf,  // (R, H)
    dhead2: Buf, // (R, H)
    // inputs
    ids: Ints,         // (N)
    types: Ints,       // (N)
    mask: Ints,        // (N)
    cls_rows: Ints,    // (B)
    head_rows: Ints,   // (R)
    head_labels: Ints, // (R)
    nsp_labels: Ints,  // (B)
    predictions: Ints, // (max(logit_rows, B)) argmax, for accuracy
}

pub struct Bert<'a, B: Backend> {
    pub be: &'a B,
    pub config: ModelConfig,
    pub table: ParamTable,
    act: Activation,
    pub plan: Plan,
    /// All parameters, one buffer; `table` gives each one's place.
    pub params: Buf,
    /// Their gradients, the same layout.
    pub grads: Buf,
    a: Acts,
    /// Floats allocated for activations and inputs.
    pub activation_floats: usize,
}

/// Dropout sites, for the mask keys.
fn site(layer: usize, which: u64) -> u64 {
    (layer as u64) * 4 + which
}
const SITE_ATTN_PROBS: u64 = 0;
const SITE_ATTN_OUT: u64 = 1;
const SITE_FFN_OUT: u64 = 2;
const SITE_EMBEDDINGS: u64 = u64::MAX;

impl<'a, B: Backend> Bert<'a, B> {
    /// Allocate parameters, gradients and activations for `plan`; parameters are zero until loaded.
    pub fn new(be: &'a B, config: ModelConfig, plan: Plan) -> Result<Self> {
        config.validate()?;
        if plan.max_seq > config.max_position_embeddings {
            bail!(
                "sequence length {} exceeds the model's max_position_embeddings {}",
                plan.max_seq,
                config.max_position_embeddings
            );
        }
        if plan.max_batch == 0 || plan.max_seq == 0 {
            bail!("the batch size and sequence length must be at least 1");
        }
        let act = config.activation()?;
        let table = ParamTable::new(&config);
        let params = be.alloc_kind(table.total, Kind::Param)?;
        let grads = be.alloc_kind(table.total, Kind::Grad)?;
        let (b, n) = (plan.max_batch, plan.max_batch * plan.max_seq);
        let (h, i, v, l) =
            (config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers);
        // Activations (f) and fp32 statistics (st).
        let floats = std::cell::Cell::new(0usize);
        let f = |len: usize| -> Result<Buf> {
            floats.set(floats.get() + len);
            be.alloc_kind(len, Kind::Activation)
        };
        let st = |len: usize| -> Result<Buf> {
            floats.set(floats.get() + len);
            be.alloc_kind(len, Kind::Stat)
        };
        let state = be.attention_state_len(plan.max_batch, plan.max_seq, config.num_attention_heads);
        let mut layers = Vec::with_capacity(l);
        for _ in 0..l {
            layers.push(LayerActs {
                qkv: f(n * 3 * h)?,
                att_state: st(state)?,
                ctx: f(n * h)?,
                sum1: f(n * h)?,
                mean1: st(n)?,
                rstd1: st(n)?,
                h1: f(n * h)?,
                ff1: f(n * i)?,
                gelu: f(n * i)?,
                sum2: f(n * h)?,
                mean2: st(n)?,
                rstd2: st(n)?,
            });
        }
        let a = Acts {
            emb: f(n * h)?,
            emb_mean: st(n)?,
            emb_rstd: st(n)?,
            emb_ln: f(n * h)?,
            x: (0..=l).map(|_| f(n * h)).collect::<Result<_>>()?,
            layers,
            tmp: f(n * h)?,
            cls_in: f(b * h)?,
            pooled: f(b * h)?,
            pool_pre: f(b * h)?,
            nsp_logits: f(b * 2)?,
            nsp_losses: st(b)?,
            head_in: f(n * h)?,
            head_t: f(n * h)?,
            head_g: f(n * h)?,
            head_mean: st(n)?,
            head_rstd: st(n)?,
            head_h: f(n * h)?,
            logits: f(plan.logit_rows * v)?,
            mlm_losses: st(n)?,
            loss_sum: st(1)?,
            dx: f(n * h)?,
            dx2: f(n * h)?,
            dwide: f(n * (3 * h).max(i))?,
            dwide2: f(n * i)?,
            dhead: f(n * h)?,
            dhead2: f(n * h)?,
            ids: be.alloc_ints(n)?,
            types: be.alloc_ints(n)?,
            mask: be.alloc_ints(n)?,
            cls_rows: be.alloc_ints(b)?,
            head_rows: be.alloc_ints(n)?,
            head_labels: be.alloc_ints(n)?,
            nsp_labels: be.alloc_ints(b)?,
            predictions: be.alloc_ints(plan.logit_rows.max(b))?,
        };
        let activation_floats = floats.get() + 7 * n;
        Ok(Bert { be, config, table, act, plan, params, grads, a, activation_floats })
    }

    fn p(&self, off: usize, len: usize) -> Buf {
        self.params.at(off, len)
    }
    fn g(&self, off: usize, len: usize) -> Buf {
        self.grads.at(off, len)
    }

    /// Load all parameters (in table order, `table.total` floats).
    pub fn set_params(&self, values: &[f32]) -> Result<()> {
        if values.len() != self.table.total {
            bail!("internal: {} parameter values for {} parameters", values.len(), self.table.total);
        }
        self.be.upload(self.params, values)
    }

    pub fn zero_grads(&self) -> Result<()> {
        self.be.fill(self.grads, 0.0)
    }

    fn upload_inputs(&self, inp: &Inputs) -> Result<()> {
        let (b, t) = (inp.batch, inp.seq);
        let n = b * t;
        if b > self.plan.max_batch || t > self.plan.max_seq {
            bail!(
                "a batch of {b}×{t} is larger than the {}×{} planned",
                self.plan.max_batch,
                self.plan.max_seq
            );
        }
        if inp.input_ids.len() != n || inp.token_type_ids.len() != n || inp.attention_mask.len() != n {
            bail!("input_ids, token_type_ids and attention_mask must each hold batch × seq = {n} values");
        }
        let v = self.config.vocab_size;
        if let Some(bad) = inp.input_ids.iter().find(|&&x| x as usize >= v) {
            bail!("token id {bad} is outside the model's vocabulary of {v}");
        }
        let tv = self.config.type_vocab_size;
        if let Some(bad) = inp.token_type_ids.iter().find(|&&x| x as usize >= tv) {
            bail!("token type id {bad} is outside the model's type_vocab_size {tv}");
        }
        if let Some(bad) = inp.head_rows.iter().find(|&&r| r as usize >= n) {
            bail!("MLM position {bad} is outside the batch's {n} positions");
        }
        if let Some(l) = inp.head_labels {
            if l.len() != inp.head_rows.len() {
                bail!("internal: {} MLM labels for {} rows", l.len(), inp.head_rows.len());
            }
            if let Some(bad) = l.iter().find(|&&x| x != IGNORE_INDEX && (x < 0 || x as usize >= v)) {
                bail!(
                    "MLM label {bad} is outside the vocabulary of {v} (use -100 for positions not predicted)"
                );
            }
        }
        if let Some(l) = inp.nsp_labels {
            if l.len() != b {
                bail!("next_sentence_label must hold one label per sequence ({b}), not {}", l.len());
            }
            if let Some(bad) = l.iter().find(|&&x| x > 1) {
                bail!("next_sentence_label {bad} must be 0 (B follows A) or 1 (B is random)");
            }
        }
        let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<_>>();
        self.be.upload_ints(self.a.ids, &as_i32(inp.input_ids))?;
        self.be.upload_ints(self.a.types, &as_i32(inp.token_type_ids))?;
        self.be
            .upload_ints(self.a.mask, &inp.attention_mask.iter().map(|&x| x as i32).collect::<Vec<_>>())?;
        self.be.upload_ints(self.a.cls_rows, &(0..b).map(|i| (i * t) as i32).collect::<Vec<_>>())?;
        self.be.upload_ints(self.a.head_rows, &as_i32(inp.head_rows))?;
        if let Some(l) = inp.head_labels {
            self.be.upload_ints(self.a.head_labels, l)?;
        }
        if let Some(l) = inp.nsp_labels {
            self.be.upload_ints(self.a.nsp_labels, &as_i32(l))?;
        }
        Ok(())
    }

    fn dropout(&self, p: f64, train: Option<Train>, site: u64) -> Option<Dropout> {
        match train {
            Some(t) if p > 0.0 => {
                Some(Dropout { p: p as f32, key: DropoutKey { seed: t.seed, step: t.step, site } })
            }
            _ => None,
        }
    }

    fn linear_fwd(
        &self,
        out: Buf,
        inp: Buf,
        w: usize,
        b: usize,
        rows: usize,
        in_f: usize,
        out_f: usize,
    ) -> Result<()> {
        let be = self.be;
        be.matmul(
            out.prefix(rows * out_f),
            inp.prefix(rows * in_f),
            self.p(w, out_f * in_f),
            rows,
            out_f,
            in_f,
            false,
            true,
            false,
        )?;
        be.add_bias(out, self.p(b, out_f), rows, out_f)
    }

    /// dinp (rows, in) = or += dout · W; dW += doutᵀ · inp; db += Σ dout (unless `b` is None: the bias
    /// gradient was reduced already, fused with the op that made `dout`).
    fn linear_bwd(
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
        be.matmul(
            self.g(w, out_f * in_f),
            dout,
            inp.prefix(rows * in_f),
            out_f,
            in_f,
            rows,
            true,
            false,
            true,
        )?;
        match b {
            Some(b) => be.bias_grad(self.g(b, out_f), dout, rows, out_f),
            None => Ok(()),
        }
    }

    /// Backward of `out = LayerNorm(sum)`, `sum = residual + dropout(branch)`, with `grad` = d(out) and
    /// `ln` = (sum, mean, rstd, weight offset, bias offset). Writes d(sum), the residual's gradient, into
    /// `dsum` and returns the buffer holding the branch's gradient: `grad` overwritten in place when there
    /// is dropout (fused with the LayerNorm backward), else `dsum` itself.
    fn residual_layernorm_bwd(
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
    fn encoder_fwd(&self, inp: &Inputs, train: Option<Train>) -> Result<()> {
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

    fn pooler_fwd(&self, inp: &Inputs) -> Result<()> {
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
    fn head_transform_fwd(&self, rows: usize) -> Result<()> {
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

    /// Logits of head rows [r0, r0 + k) into the logits buffer: head_h · word_embeddingsᵀ + bias.
    fn decoder_fwd(&self, r0: usize, k: usize) -> Result<Buf> {
        let (be, a, top, c) = (self.be, &self.a, &self.table.top, &self.config);
        let (h, v) = (c.hidden_size, c.vocab_size);
        let logits = a.logits.prefix(k * v);
        be.matmul(logits, a.head_h.at(r0 * h, k * h), self.p(top.word, v * h), k, v, h, false, true, false)?;
        be.add_bias(logits, self.p(top.mlm_bias, v), k, v)?;
        Ok(logits)
    }

    /// Forward, and with `backward` the gradients of the loss added into `grads` (scaled by `loss_scale`).
    /// Dropout on with `train`.
    pub fn step(&self, inp: &Inputs, o: StepOptions) -> Result<Losses> {
        self.step_with_hook(inp, o, None)
    }

    /// `step`, calling `grads_done(Some(l))` once the backward pass has finished encoder layer `l` (the
    /// heads' gradients are complete before the last layer's) and `grads_done(None)` at its end: the
    /// gradient buckets of data parallelism are reduced as soon as they are complete.
    pub fn step_with_hook(
        &self,
        inp: &Inputs,
        o: StepOptions,
        grads_done: Option<&mut GradsDone>,
    ) -> Result<Losses> {
        let (train, backward, loss_scale) = (o.train, o.backward, o.loss_scale);
        self.upload_inputs(inp)?;
        let (be, a, top, c) = (self.be, &self.a, &self.table.top, &self.config);
        let (b, t) = (inp.batch, inp.seq);
        let n = b * t;
        let (h, v) = (c.hidden_size, c.vocab_size);
        self.encoder_fwd(inp, train)?;
        let mut losses = Losses::default();
        if backward {
            be.fill(a.dx.prefix(n * h), 0.0)?;
        }

        // NSP head
        if let Some(nsp) = inp.nsp_labels {
            self.pooler_fwd(inp)?;
            let denom = o.norm.map_or(b, |n| n.sequences).max(1);
            let scale = backward.then_some(loss_scale as f64 / denom as f64);
            if o.accuracy {
                be.argmax_rows(a.predictions, a.nsp_logits.prefix(b * 2), b, 2)?;
                let pred = be.download_ints(a.predictions.prefix(b))?;
                losses.nsp_correct = pred.iter().zip(nsp).filter(|(p, l)| **p as u32 == **l).count();
            }
            be.cross_entropy(
                a.nsp_losses.prefix(b),
                a.nsp_logits.prefix(b * 2),
                a.nsp_labels.prefix(b),
                b,
                2,
                scale,
            )?;
            be.sum(a.loss_sum, a.nsp_losses.prefix(b))?;
            losses.nsp = Some(be.download_f64(a.loss_sum)?[0] / nsp.len() as f64);
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
        }

        // MLM head on the rows asked for, the decoder in chunks
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
                let k = self.plan.logit_rows.min(rows - r0);
                let logits = self.decoder_fwd(r0, k)?;
                if o.accuracy {
                    be.argmax_rows(a.predictions, logits, k, v)?;
                    let pred = be.download_ints(a.predictions.prefix(k))?;
                    let labels = &inp.head_labels.expect("counted > 0")[r0..r0 + k];
                    losses.mlm_correct += pred.iter().zip(labels).filter(|(p, l)| *p == *l).count();
                }
                be.cross_entropy(a.mlm_losses.at(r0, k), logits, a.head_labels.at(r0, k), k, v, scale)?;
                if backward {
                    // logits now hold d(loss)/d(logits): the decoder's backward, tied weight included
                    be.matmul(
                        a.dhead.at(r0 * h, k * h),
                        logits,
                        self.p(top.word, v * h),
                        k,
                        h,
                        v,
                        false,
                        false,
                        false,
                    )?;
                    be.matmul(
                        self.g(top.word, v * h),
                        logits,
                        a.head_h.at(r0 * h, k * h),
                        v,
                        h,
                        k,
                        true,
                        false,
                        true,
                    )?;
                    be.bias_grad(self.g(top.mlm_bias, v), logits, k, v)?;
                }
                r0 += k;
            }
            be.sum(a.loss_sum, a.mlm_losses.prefix(rows))?;
            losses.mlm = Some(be.download_f64(a.loss_sum)?[0] / counted as f64);
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

        if backward {
            self.encoder_bwd(inp, train, grads_done)?;
        }
        Ok(losses)
    }

    /// Backward through the encoder from dx = d(loss)/d(last hidden state).
    fn encoder_bwd(
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
            let dgelu = a.dwide2.prefix(n * i);
            self.linear_bwd(Some((dgelu, false)), dff2, la.gelu, lo.ff2_w, Some(lo.ff2_b), n, i, h)?;
            let dff1 = a.dwide.prefix(n * i);
            be.gelu_bias_bwd(dff1, self.g(lo.ff1_b, i), dgelu, la.ff1.prefix(n * i), n, i, self.act)?;
            // dh1 = dsum2 (still in dx2) + dff1 · W1
            self.linear_bwd(Some((dx2, true)), dff1, la.h1, lo.ff1_w, None, n, h, i)?;
            // h1 = LN1(sum1): dsum1 into dx; the attention branch's gradient dropout'(dsum1) in dx2
            let attn_drop = self.dropout(c.hidden_dropout_prob, train, site(l, SITE_ATTN_OUT));
            let ln1 = (la.sum1.prefix(nhid), la.mean1, la.rstd1, lo.ln1_w, lo.ln1_b);
            let dattn = self.residual_layernorm_bwd(dx, dx2, ln1, n, attn_drop)?;
            let dctx = a.tmp.prefix(nhid);
            self.linear_bwd(Some((dctx, false)), dattn, la.ctx, lo.attn_out_w, Some(lo.attn_out_b), n, h, h)?;
            let dqkv = a.dwide.prefix(n * 3 * h);
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

    /// Outputs for inspection (eval mode): last hidden state (B·T·H), pooler output (B·H), NSP logits (B·2).
    pub fn outputs(&self, inp: &Inputs) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        self.upload_inputs(inp)?;
        self.encoder_fwd(inp, None)?;
        self.pooler_fwd(inp)?;
        let (b, n, h) = (inp.batch, inp.batch * inp.seq, self.config.hidden_size);
        let a = &self.a;
        Ok((
            self.be.download(a.x[self.config.num_hidden_layers].prefix(n * h))?,
            self.be.download(a.pooled.prefix(b * h))?,
            self.be.download(a.nsp_logits.prefix(b * 2))?,
        ))
    }

    /// MLM logits (rows × V) of the head rows (eval mode).
    pub fn mlm_logits(&self, inp: &Inputs) -> Result<Vec<f32>> {
        self.upload_inputs(inp)?;
        self.encoder_fwd(inp, None)?;
        let rows = inp.head_rows.len();
        let v = self.config.vocab_size;
        let mut out = Vec::with_capacity(rows * v);
        if rows == 0 {
            return Ok(out);
        }
        self.head_transform_fwd(rows)?;
        let mut r0 = 0;
        while r0 < rows {
            let k = self.plan.logit_rows.min(rows - r0);
            out.extend(self.be.download(self.decoder_fwd(r0, k)?)?);
            r0 += k;
        }
        Ok(out)
    }
}
