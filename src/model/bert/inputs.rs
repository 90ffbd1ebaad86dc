//! What the model takes and gives: one batch ([`Inputs`]), what a pass does ([`StepOptions`]), and its
//! losses ([`Losses`]); the inputs' upload to the device.

use super::Bert;
use crate::backend::{Backend, IGNORE_INDEX};
use crate::bail;
use crate::error::Result;

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
    /// Multiplies the gradients too: a one-element region holding the loss scale on the backend (training
    /// under fp16, where the step control keeps the scale).
    pub loss_scale_by: Option<crate::backend::Buf>,
    /// The gradients' denominators; None = this batch's own counts.
    pub norm: Option<LossNorm>,
    /// Count correct predictions (argmax) for accuracy.
    pub accuracy: bool,
    /// Add the loss sums (MLM, NSP: two elements) into this region on the backend rather than reading
    /// them back: `Losses` then has counts and no values (training, which reads them when it logs).
    pub loss_sums: Option<crate::backend::Buf>,
}

impl StepOptions {
    /// Evaluation: no dropout, no gradients.
    pub fn eval() -> Self {
        StepOptions {
            train: None,
            backward: false,
            loss_scale: 1.0,
            loss_scale_by: None,
            norm: None,
            accuracy: false,
            loss_sums: None,
        }
    }
    /// Gradients of this batch's loss, no dropout.
    pub fn grads() -> Self {
        StepOptions { backward: true, ..Self::eval() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Losses {
    /// Mean MLM cross-entropy over this batch's predicted tokens (None without them, or with
    /// `StepOptions::loss_sums`).
    pub mlm: Option<f64>,
    /// Mean NSP cross-entropy over this batch's sequences (None without NSP labels, or with
    /// `StepOptions::loss_sums`).
    pub nsp: Option<f64>,
    /// Rows whose label counted in the MLM loss (0: no MLM loss).
    pub mlm_tokens: usize,
    /// Sequences in the NSP loss (0: no NSP loss).
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

impl<'a, B: Backend> Bert<'a, B> {
    pub(super) fn upload_inputs(&self, inp: &Inputs) -> Result<()> {
        let (b, t) = (inp.batch, inp.seq);
        let n = b * t;
        if b > self.capacity.max_batch || t > self.capacity.max_seq {
            bail!(
                "a batch of {b}×{t} is larger than the {}×{} planned",
                self.capacity.max_batch,
                self.capacity.max_seq
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
        // Every table at its region's place in one host vector, and one copy of it.
        let a = &self.a;
        let mut host = vec![0i32; a.inputs.len];
        let mut put = |region: crate::backend::Ints, values: &mut dyn Iterator<Item = i32>| {
            let at = region.off - a.inputs.off;
            for (dst, v) in host[at..at + region.len].iter_mut().zip(values) {
                *dst = v;
            }
        };
        let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<_>>().into_iter();
        put(a.ids, &mut as_i32(inp.input_ids));
        put(a.types, &mut as_i32(inp.token_type_ids));
        put(a.mask, &mut inp.attention_mask.iter().map(|&x| x as i32));
        put(a.cls_rows, &mut (0..b).map(|i| (i * t) as i32));
        put(a.head_rows, &mut as_i32(inp.head_rows));
        if let Some(l) = inp.head_labels {
            put(a.head_labels, &mut l.iter().copied());
        }
        if let Some(l) = inp.nsp_labels {
            put(a.nsp_labels, &mut as_i32(l));
        }
        self.be.upload_ints(a.inputs, &host)
    }
}
