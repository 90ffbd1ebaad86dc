//! BERT for pretraining (`BertForPreTraining`): one forward and one backward, written once against the
//! `Backend` trait, like llm.c's gpt2_forward/gpt2_backward. Post-LN encoder; pooler; MLM head (transform,
//! then the decoder tied to the word embeddings plus `cls.predictions.bias`) run on the rows asked for —
//! the masked positions in training, every position for full logits; NSP head on the pooled output.
//! Loss = mean MLM cross-entropy over predicted tokens + mean NSP cross-entropy, as transformers.
//!
//! Activations are planned once for the largest batch and sequence and reused. The MLM decoder runs in
//! chunks of `Capacity::logit_rows` rows; in training each chunk's backward follows its forward at once (the
//! loss is a sum over rows), so the (rows, V) logits are never all in memory.
//!
//! Files: [`inputs`] (a batch, the options of a pass, the losses), `activations` (the saved activations),
//! `encoder` (embeddings and layers, forward and backward), `heads` (pooler + NSP, MLM).

mod activations;
mod encoder;
mod heads;
pub mod inputs;

pub use inputs::{GradsDone, Inputs, LossNorm, Losses, StepOptions, Train};

use crate::backend::{Backend, Buf, Kind};
use crate::bail;
use crate::error::Result;
use crate::model::config::{Activation, ModelConfig};
use crate::model::params::ParamTable;
use activations::Acts;

/// The largest batch and sequence length the activations are allocated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub max_batch: usize,
    pub max_seq: usize,
    /// Rows of MLM logits computed at once.
    pub logit_rows: usize,
}

/// The MLM logits' rows are this many elements apart at least: the vocabulary (30522 in BERT's) padded
/// to a multiple of 64 (30528), so every row starts 16-byte aligned and the decoder's products, its bias
/// epilogues and the cross-entropy's vectors apply. The padding is never read or written; the
/// parameters and checkpoints keep the vocabulary's shapes.
pub const LOGIT_ROW_ALIGN: usize = 64;

/// The row stride of the MLM logits for a vocabulary of `v`.
pub fn logit_stride(v: usize) -> usize {
    v.next_multiple_of(LOGIT_ROW_ALIGN)
}

impl Capacity {
    pub fn new(max_batch: usize, max_seq: usize) -> Self {
        Capacity { max_batch, max_seq, logit_rows: 2048.min(max_batch * max_seq).max(1) }
    }
}

pub struct Bert<'a, B: Backend> {
    pub be: &'a B,
    pub config: ModelConfig,
    pub table: ParamTable,
    act: Activation,
    pub capacity: Capacity,
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
    /// Allocate parameters, gradients and activations for `capacity`; parameters are zero until loaded.
    pub fn new(be: &'a B, config: ModelConfig, capacity: Capacity) -> Result<Self> {
        config.validate()?;
        if capacity.max_seq > config.max_position_embeddings {
            bail!(
                "sequence length {} exceeds the model's max_position_embeddings {}",
                capacity.max_seq,
                config.max_position_embeddings
            );
        }
        if capacity.max_batch == 0 || capacity.max_seq == 0 {
            bail!("the batch size and sequence length must be at least 1");
        }
        let act = config.activation()?;
        let table = ParamTable::new(&config);
        let params = be.alloc_kind(table.total, Kind::Param)?;
        let grads = be.alloc_kind(table.total, Kind::Grad)?;
        let (a, activation_floats) = Acts::new(be, &config, capacity)?;
        Ok(Bert { be, config, table, act, capacity, params, grads, a, activation_floats })
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
        self.upload_inputs(inp)?;
        self.encoder_fwd(inp, o.train)?;
        let mut losses = Losses::default();
        if o.backward {
            self.be.fill(self.a.dx.prefix(inp.batch * inp.seq * self.config.hidden_size), 0.0)?;
        }
        if let Some(labels) = inp.nsp_labels {
            self.nsp_head(inp, labels, &o, &mut losses)?;
        }
        self.mlm_head(inp, &o, &mut losses)?;
        if o.backward {
            self.encoder_bwd(inp, o.train, grads_done)?;
        }
        Ok(losses)
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
        let (v, ld) = (self.config.vocab_size, logit_stride(self.config.vocab_size));
        let mut out = Vec::with_capacity(rows * v);
        if rows == 0 {
            return Ok(out);
        }
        self.head_transform_fwd(rows)?;
        let mut r0 = 0;
        while r0 < rows {
            let k = self.capacity.logit_rows.min(rows - r0);
            let logits = self.be.download(self.decoder_fwd(r0, k)?)?;
            out.extend(logits.chunks(ld).flat_map(|row| &row[..v]));
            r0 += k;
        }
        Ok(out)
    }
}
