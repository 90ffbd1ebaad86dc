//! Evaluation: MLM and NSP losses and accuracies of a model over fixed batches of a corpus (`bertcuda
//! eval`, and during training with `--eval-data`).

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::examples::Corpus;
use crate::data::loader::{EpochPlan, LoaderConfig};
use crate::error::Result;
use crate::model::bert::{Bert, Inputs, StepOptions};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    pub mlm_loss: Option<f64>,
    pub mlm_accuracy: Option<f64>,
    pub perplexity: Option<f64>,
    pub nsp_loss: Option<f64>,
    pub nsp_accuracy: Option<f64>,
    pub sequences: usize,
}

/// epoch 0), at most `max_batches`.
pub fn evaluate<B: Backend>(
    model: &Bert<B>,
    corpus: &Corpus,
    cfg: &LoaderConfig,
    max_batches: usize,
) -> Result<EvalResult> {
    let cfg = LoaderConfig { drop_last: false, rank: 0, world_size: 1, ..cfg.clone() };
    let plan = EpochPlan::new(corpus, &cfg, 0)?;
    let n = (plan.batches(&cfg) as usize).min(max_batches.max(1));
    let (mut mlm_sum, mut mlm_n, mut mlm_ok, mut nsp_sum, mut nsp_n, mut nsp_ok, mut seqs) =
        (0.0, 0usize, 0usize, 0.0, 0usize, 0usize, 0usize);
    let mut labels = Vec::new();
    for k in 0..n {
        let batch = plan.batch(corpus, &cfg, k as u64);
        let inp = Inputs::from_batch(&batch, &mut labels);
        let l = model.step(&inp, StepOptions { accuracy: true, ..StepOptions::eval() })?;
        if let Some(m) = l.mlm {
            mlm_sum += m * l.mlm_tokens as f64;
            mlm_n += l.mlm_tokens;
            mlm_ok += l.mlm_correct;
        }
        if let Some(s) = l.nsp {
            nsp_sum += s * l.sequences as f64;
            nsp_n += l.sequences;
            nsp_ok += l.nsp_correct;
        }
        seqs += batch.batch_size;
    }
    let mean = |s: f64, n: usize| (n > 0).then(|| s / n as f64);
    let mlm_loss = mean(mlm_sum, mlm_n);
    Ok(EvalResult {
        mlm_loss,
        mlm_accuracy: mean(mlm_ok as f64, mlm_n),
        perplexity: mlm_loss.map(f64::exp),
        nsp_loss: mean(nsp_sum, nsp_n),
        nsp_accuracy: mean(nsp_ok as f64, nsp_n),
        sequences: seqs,
    })
}
