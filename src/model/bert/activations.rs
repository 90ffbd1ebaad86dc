//! The activations the backward pass needs, allocated once for the largest batch and sequence
//! ([`Capacity`]) and reused by every step; shapes for N = batch·seq rows, R ≤ N head rows.

use super::{logit_stride, Capacity};
use crate::backend::{Backend, Buf, Ints, Kind};
use crate::error::Result;
use crate::model::config::ModelConfig;

/// Saved activations of one encoder layer; shapes for N = batch·seq rows.
pub(super) struct LayerActs {
    pub qkv: Buf,       // (N, 3H)
    pub att_state: Buf, // backend-specific (probabilities or log-sum-exp)
    pub ctx: Buf,       // (N, H) attention output before its dense layer
    pub sum1: Buf,      // (N, H) x + dropout(attention dense): LN1 input
    pub mean1: Buf,     // (N)
    pub rstd1: Buf,     // (N)
    pub h1: Buf,        // (N, H) LN1 output: FFN input and residual
    pub ff1: Buf,       // (N, I) before GELU
    pub gelu: Buf,      // (N, I)
    pub sum2: Buf,      // (N, H) h1 + dropout(FFN out): LN2 input
    pub mean2: Buf,     // (N)
    pub rstd2: Buf,     // (N)
}

pub(super) struct Acts {
    pub emb: Buf,      // (N, H) word + position + type: embedding LN input
    pub emb_mean: Buf, // (N)
    pub emb_rstd: Buf, // (N)
    pub emb_ln: Buf,   // (N, H) LN output before dropout
    pub x: Vec<Buf>,   // L+1 × (N, H): encoder layer inputs, x[L] = last hidden state
    pub layers: Vec<LayerActs>,
    pub tmp: Buf, // (N, H) a dense output before dropout
    // pooler and NSP head
    pub cls_in: Buf,     // (B, H)
    pub pooled: Buf,     // (B, H) after tanh
    pub pool_pre: Buf,   // (B, H) before tanh
    pub nsp_logits: Buf, // (B, 2)
    pub nsp_losses: Buf, // (B)
    // MLM head, rows R ≤ N
    pub head_in: Buf,    // (R, H)
    pub head_t: Buf,     // (R, H) transform dense output
    pub head_g: Buf,     // (R, H) GELU
    pub head_mean: Buf,  // (R)
    pub head_rstd: Buf,  // (R)
    pub head_h: Buf,     // (R, H) LN output: decoder input
    pub logits: Buf,     // (logit_rows, V)
    pub mlm_losses: Buf, // (R)
    pub loss_sum: Buf,   // (1)
    // gradients of activations
    pub dx: Buf,       // (N, H)
    pub dx2: Buf,      // (N, H)
    pub dqkv_ff1: Buf, // (N, max(3H, I)): d(qkv) or d(ff1)
    pub dgelu: Buf,    // (N, I)
    pub dhead: Buf,    // (R, H)
    pub dhead2: Buf,   // (R, H)
    // inputs: regions of one buffer, in this order, which one copy fills (`Bert::upload_inputs`)
    pub inputs: Ints,      // (5N + 2B)
    pub ids: Ints,         // (N)
    pub types: Ints,       // (N)
    pub mask: Ints,        // (N)
    pub cls_rows: Ints,    // (B)
    pub head_rows: Ints,   // (N)
    pub head_labels: Ints, // (N)
    pub nsp_labels: Ints,  // (B)
    pub predictions: Ints, // (max(logit_rows, B)) argmax, for accuracy
}

impl Acts {
    /// Every activation buffer for `capacity`, and the floats they take (inputs included).
    pub(super) fn new<B: Backend>(be: &B, config: &ModelConfig, capacity: Capacity) -> Result<(Acts, usize)> {
        let (b, n) = (capacity.max_batch, capacity.max_batch * capacity.max_seq);
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
        let state = be.attention_state_len(capacity.max_batch, capacity.max_seq, config.num_attention_heads);
        let inputs = be.alloc_ints(5 * n + 2 * b)?;
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
            logits: f(capacity.logit_rows * logit_stride(v))?,
            mlm_losses: st(n)?,
            loss_sum: st(1)?,
            dx: f(n * h)?,
            dx2: f(n * h)?,
            dqkv_ff1: f(n * (3 * h).max(i))?,
            dgelu: f(n * i)?,
            dhead: f(n * h)?,
            dhead2: f(n * h)?,
            inputs,
            ids: inputs.at(0, n),
            types: inputs.at(n, n),
            mask: inputs.at(2 * n, n),
            head_rows: inputs.at(3 * n, n),
            head_labels: inputs.at(4 * n, n),
            cls_rows: inputs.at(5 * n, b),
            nsp_labels: inputs.at(5 * n + b, b),
            predictions: be.alloc_ints(capacity.logit_rows.max(b))?,
        };
        Ok((a, floats.get() + 5 * n + 2 * b))
    }
}
