//! Running a trained model: `forward` (losses, outputs and gradients for a batch given as JSON),
//! `fill-mask` and `embed`. Evaluation mode (no dropout), on the CPU reference backend.

use std::path::Path;

use serde::Deserialize;

use crate::backend::choice::{on_backend, Device};
use crate::backend::Backend;
use crate::bail;
use crate::data::tokenizer::{BertTokenizer, LoadOptions};
use crate::error::{Error, IoContext, Result};
use crate::model::bert::{Bert, Capacity, Inputs, Losses, StepOptions};
use crate::model::config::ModelConfig;
use crate::model::hf::{load_pretrained, LoadReport};

/// A model directory loaded for inference.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    pub report: LoadReport,
}

impl LoadedModel {
    pub fn load(dir: &Path) -> Result<Self> {
        let (config, params, report) = load_pretrained(dir, 0)?;
        Ok(LoadedModel { config, params, report })
    }

    /// The checkpoint has the MLM head (`cls.predictions.*`; without it, it runs initialised).
    pub fn has_mlm_head(&self) -> bool {
        !self.lacks("cls.predictions.")
    }

    /// The checkpoint has the NSP head (`cls.seq_relationship.*`).
    pub fn has_nsp_head(&self) -> bool {
        !self.lacks("cls.seq_relationship.")
    }

    /// The checkpoint has the pooler (`bert.pooler.*`).
    pub fn has_pooler(&self) -> bool {
        !self.lacks("bert.pooler.")
    }

    /// Whether the checkpoint lacked the parameters under `prefix` (they run initialised).
    fn lacks(&self, prefix: &str) -> bool {
        self.report.initialised.iter().any(|n| n.starts_with(prefix))
    }

    fn model<'a, B: Backend>(&self, be: &'a B, batch: usize, seq: usize) -> Result<Bert<'a, B>> {
        let m = Bert::new(be, self.config.clone(), Capacity::new(batch.max(1), seq.max(1)))?;
        m.set_params(&self.params)?;
        Ok(m)
    }
}

/// The batch file of `bertcuda forward`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    pub input_ids: Vec<Vec<i64>>,
    #[serde(default)]
    pub token_type_ids: Option<Vec<Vec<i64>>>,
    #[serde(default)]
    pub attention_mask: Option<Vec<Vec<i64>>>,
    #[serde(default)]
    pub labels: Option<Vec<Vec<i64>>>,
    #[serde(default)]
    pub next_sentence_label: Option<Vec<i64>>,
}

/// A batch file checked and flattened (B, T).
pub struct FlatBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    pub attention_mask: Vec<u8>,
    pub labels: Option<Vec<i32>>,
    pub nsp: Option<Vec<u32>>,
}

impl BatchFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        serde_json::from_str(&text).map_err(|e| {
            Error::corrupt(
                path,
                format!("not a valid batch: {e}. Expected JSON with input_ids, token_type_ids, attention_mask (lists per sequence), optional labels and next_sentence_label"),
            )
        })
    }

    pub fn flatten(&self, path: &Path) -> Result<FlatBatch> {
        let b = self.input_ids.len();
        if b == 0 {
            return Err(Error::corrupt(path, "input_ids is empty"));
        }
        let t = self.input_ids[0].len();
        if t == 0 {
            return Err(Error::corrupt(path, "input_ids holds an empty sequence"));
        }
        let bad = |key: &str, what: String| Error::corrupt(path, format!("{key}: {what}"));
        let flat = |key: &str, rows: &Vec<Vec<i64>>| -> Result<Vec<i64>> {
            if rows.len() != b {
                return Err(bad(key, format!("{} sequences, input_ids has {b}", rows.len())));
            }
            if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != t) {
                return Err(bad(
                    key,
                    format!("sequence {i} has {} values; every sequence must have {t} (pad them)", r.len()),
                ));
            }
            Ok(rows.concat())
        };
        let to_u32 = |key: &str, v: Vec<i64>| -> Result<Vec<u32>> {
            v.into_iter()
                .map(|x| {
                    u32::try_from(x).map_err(|_| bad(key, format!("value {x} is negative or too large")))
                })
                .collect()
        };
        let input_ids = to_u32("input_ids", flat("input_ids", &self.input_ids)?)?;
        let token_type_ids = match &self.token_type_ids {
            Some(r) => to_u32("token_type_ids", flat("token_type_ids", r)?)?,
            None => vec![0; b * t],
        };
        let attention_mask = match &self.attention_mask {
            Some(r) => flat("attention_mask", r)?
                .into_iter()
                .map(|x| match x {
                    0 | 1 => Ok(x as u8),
                    _ => Err(bad("attention_mask", format!("value {x}; use 1 for tokens and 0 for padding"))),
                })
                .collect::<Result<_>>()?,
            None => vec![1; b * t],
        };
        let labels = match &self.labels {
            Some(r) => Some(
                flat("labels", r)?
                    .into_iter()
                    .map(|x| {
                        i32::try_from(x).map_err(|_| bad("labels", format!("value {x} is out of range")))
                    })
                    .collect::<Result<_>>()?,
            ),
            None => None,
        };
        let nsp = match &self.next_sentence_label {
            Some(v) if v.len() != b => {
                return Err(bad("next_sentence_label", format!("{} labels for {b} sequences", v.len())))
            }
            Some(v) => Some(to_u32("next_sentence_label", v.clone())?),
            None => None,
        };
        Ok(FlatBatch { batch: b, seq: t, input_ids, token_type_ids, attention_mask, labels, nsp })
    }
}

pub struct ForwardResult {
    pub losses: Losses,
    /// name → (shape, values): outputs, and with grads `grad.<parameter>`.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

/// `bertcuda forward`: losses; with `outputs` the output tensors; with `grads` every parameter's gradient.
fn forward_on<B: Backend>(
    be: &B,
    model: &LoadedModel,
    fb: &FlatBatch,
    outputs: bool,
    grads: bool,
) -> Result<ForwardResult> {
    let m = model.model(be, fb.batch, fb.seq)?;
    let (b, t, h, v) = (fb.batch, fb.seq, model.config.hidden_size, model.config.vocab_size);
    let all_rows: Vec<u32> = (0..(b * t) as u32).collect();
    let inp = Inputs {
        batch: b,
        seq: t,
        input_ids: &fb.input_ids,
        token_type_ids: &fb.token_type_ids,
        attention_mask: &fb.attention_mask,
        head_rows: &all_rows,
        head_labels: fb.labels.as_deref(),
        nsp_labels: fb.nsp.as_deref(),
    };
    let mut tensors = Vec::new();
    if outputs {
        let (last, pooled, nsp) = m.outputs(&inp)?;
        tensors.push(("last_hidden_state".into(), vec![b, t, h], last));
        tensors.push(("pooler_output".into(), vec![b, h], pooled));
        tensors.push(("prediction_logits".into(), vec![b, t, v], m.mlm_logits(&inp)?));
        tensors.push(("seq_relationship_logits".into(), vec![b, 2], nsp));
    }
    m.zero_grads()?;
    let backward = grads && (fb.labels.is_some() || fb.nsp.is_some());
    if grads && !backward {
        bail!("--grads needs labels or next_sentence_label in the batch: there is no loss to differentiate");
    }
    let losses = m.step(&inp, StepOptions { backward, ..StepOptions::eval() })?;
    if backward {
        let g = be.download(m.grads)?;
        for p in &m.table.params {
            tensors.push((
                format!("grad.{}", p.name),
                p.shape.clone(),
                g[p.offset..p.offset + p.len].to_vec(),
            ));
        }
    }
    Ok(ForwardResult { losses, tensors })
}

/// Write tensors as f32 safetensors.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, shape, v)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(v),
            )
            .map(|t| (n.clone(), t))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("internal: {e}")))?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Invalid(format!("internal: {e}")))?;
    std::fs::write(path, bytes).at(path)
}

/// The tokenizer of a model directory.
pub fn model_tokenizer(path: &Path) -> Result<BertTokenizer> {
    crate::model::formats::checkpoint_tokenizer(path, LoadOptions::default())?.ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no tokenizer beside the checkpoint; the model's folder needs tokenizer.json or vocab.txt",
            path.display()
        ))
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub token: String,
    pub token_id: u32,
    pub score: f64,
}

/// `bertcuda fill-mask`: for each [MASK] in the text, its position and the top-k predictions.
fn fill_mask_on<B: Backend>(
    be: &B,
    model: &LoadedModel,
    tok: &BertTokenizer,
    text: &str,
    top_k: usize,
) -> Result<Vec<(usize, Vec<Prediction>)>> {
    let (ids, types) = tok.encode_with_specials(text, None)?;
    let rows: Vec<u32> =
        ids.iter().enumerate().filter(|(_, &id)| id == tok.special.mask).map(|(i, _)| i as u32).collect();
    if rows.is_empty() {
        bail!("the text has no {} token to fill", "[MASK]");
    }
    let t = ids.len();
    if t > model.config.max_position_embeddings {
        bail!(
            "the text is {t} tokens long; the model takes at most {}",
            model.config.max_position_embeddings
        );
    }
    let m = model.model(be, 1, t)?;
    let mask = vec![1u8; t];
    let inp = Inputs {
        batch: 1,
        seq: t,
        input_ids: &ids,
        token_type_ids: &types,
        attention_mask: &mask,
        head_rows: &rows,
        head_labels: None,
        nsp_labels: None,
    };
    let logits = m.mlm_logits(&inp)?;
    let v = model.config.vocab_size;
    let mut out = Vec::new();
    for (k, &pos) in rows.iter().enumerate() {
        let row = &logits[k * v..(k + 1) * v];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - mx).exp()).sum();
        let mut idx: Vec<usize> = (0..v).collect();
        let k_ = top_k.min(v).max(1);
        idx.select_nth_unstable_by(k_ - 1, |&a, &b| row[b].total_cmp(&row[a]));
        idx.truncate(k_);
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let preds = idx
            .into_iter()
            .map(|i| Prediction {
                token: tok.id_to_token(i as u32).unwrap_or_default(),
                token_id: i as u32,
                score: ((row[i] as f64 - mx).exp()) / z,
            })
            .collect();
        out.push((pos as usize, preds));
    }
    Ok(out)
}

/// `embed --pooling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooling {
    /// BertPooler's output: tanh(W·h[CLS] + b).
    #[default]
    Pooler,
    /// The [CLS] hidden state.
    Cls,
    /// Mean of the hidden states of the text's tokens, special tokens included (sentence-transformers).
    Mean,
}

/// `bertcuda embed`: one vector per text.
fn embed_on<B: Backend>(
    be: &B,
    model: &LoadedModel,
    tok: &BertTokenizer,
    texts: &[String],
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    let enc: Vec<(Vec<u32>, Vec<u32>)> =
        texts.iter().map(|t| tok.encode_with_specials(t, None)).collect::<Result<_>>()?;
    let t = enc.iter().map(|e| e.0.len()).max().unwrap_or(0);
    let max = model.config.max_position_embeddings;
    if t > max {
        bail!("a text is {t} tokens long; the model takes at most {max}");
    }
    let b = texts.len();
    let (mut ids, mut types, mut mask) = (vec![tok.special.pad; b * t], vec![0u32; b * t], vec![0u8; b * t]);
    for (i, (e, ty)) in enc.iter().enumerate() {
        ids[i * t..i * t + e.len()].copy_from_slice(e);
        types[i * t..i * t + e.len()].copy_from_slice(ty);
        mask[i * t..i * t + e.len()].fill(1);
    }
    let m = model.model(be, b, t)?;
    let inp = Inputs {
        batch: b,
        seq: t,
        input_ids: &ids,
        token_type_ids: &types,
        attention_mask: &mask,
        head_rows: &[],
        head_labels: None,
        nsp_labels: None,
    };
    let (last, pooled, _) = m.outputs(&inp)?;
    let h = model.config.hidden_size;
    Ok((0..b)
        .map(|i| match pooling {
            Pooling::Pooler => pooled[i * h..(i + 1) * h].to_vec(),
            Pooling::Cls => last[i * t * h..i * t * h + h].to_vec(),
            Pooling::Mean => {
                let n = enc[i].0.len();
                let mut v = vec![0f64; h];
                for p in 0..n {
                    for (a, &x) in v.iter_mut().zip(&last[(i * t + p) * h..(i * t + p + 1) * h]) {
                        *a += x as f64;
                    }
                }
                v.into_iter().map(|x| (x / n as f64) as f32).collect()
            }
        })
        .collect())
}

/// Losses as the JSON `bertcuda forward` prints.
pub fn losses_json(l: &Losses) -> serde_json::Value {
    serde_json::json!({"loss": l.total(), "mlm_loss": l.mlm, "nsp_loss": l.nsp})
}

/// `bertcuda eval`: the model on fixed batches of the corpus.
fn evaluate_on<B: Backend>(
    be: &B,
    model: &LoadedModel,
    corpus: &crate::data::examples::Corpus,
    cfg: &crate::data::loader::LoaderConfig,
    max_batches: usize,
) -> Result<crate::train::EvalResult> {
    let m = model.model(be, cfg.batch_size, cfg.examples.max_seq_len)?;
    crate::train::evaluate(&m, corpus, cfg, max_batches)
}

/// `bertcuda forward` on `device` (cpu, cuda or auto).
pub fn forward(
    device: Device,
    model: &LoadedModel,
    fb: &FlatBatch,
    outputs: bool,
    grads: bool,
) -> Result<ForwardResult> {
    on_backend!(device.open()?, be => forward_on(be, model, fb, outputs, grads))
}

/// `bertcuda fill-mask` on `device`.
pub fn fill_mask(
    device: Device,
    model: &LoadedModel,
    tok: &BertTokenizer,
    text: &str,
    top_k: usize,
) -> Result<Vec<(usize, Vec<Prediction>)>> {
    if top_k == 0 {
        bail!("--top-k 0 asks for no predictions; give 1 or more");
    }
    if !model.has_mlm_head() {
        bail!(
            "the checkpoint has no MLM head (cls.predictions.*): its predictions would come from random \
             weights; fill-mask needs a BertForPreTraining or BertForMaskedLM checkpoint"
        );
    }
    on_backend!(device.open()?, be => fill_mask_on(be, model, tok, text, top_k))
}

/// `bertcuda embed` on `device`.
pub fn embed(
    device: Device,
    model: &LoadedModel,
    tok: &BertTokenizer,
    texts: &[String],
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    if pooling == Pooling::Pooler && !model.has_pooler() {
        bail!("the checkpoint has no pooler (bert.pooler.*): use --pooling cls or --pooling mean");
    }
    on_backend!(device.open()?, be => embed_on(be, model, tok, texts, pooling))
}

/// `bertcuda eval` on `device`.
pub fn evaluate(
    device: Device,
    model: &LoadedModel,
    corpus: &crate::data::examples::Corpus,
    cfg: &crate::data::loader::LoaderConfig,
    max_batches: usize,
) -> Result<crate::train::EvalResult> {
    on_backend!(device.open()?, be => evaluate_on(be, model, corpus, cfg, max_batches))
}
