//! Hugging Face checkpoints: `config.json` + `model.safetensors` in and out.
//!
//! Loading accepts `BertForPreTraining`, `BertForMaskedLM` and bare `BertModel` checkpoints (names without
//! the `bert.` prefix) in every format of `formats/` (safetensors, pytorch_model.bin, Google's TF
//! checkpoints, NVIDIA's .pt), f32/f16/bf16/f64 tensors, legacy `LayerNorm.gamma`/`beta` names; it ignores
//! `position_ids` and rebuilds the tied `cls.predictions.decoder.*` from the word embeddings and
//! `cls.predictions.bias`. What was loaded, initialised, ignored and skipped is reported. Saving writes the
//! `BertForPreTraining` layout transformers writes (tied decoder tensors omitted, metadata `format: pt`).

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;

use crate::bail;
use crate::data::tokenizer::LoadOptions;
use crate::error::{Error, IoContext, Result};
use crate::model::config::ModelConfig;
use crate::model::params::ParamTable;

pub use crate::model::formats::{load_pretrained, LoadReport};

/// The safetensors bytes of the parameters in transformers' BertForPreTraining layout.
pub fn safetensors_bytes(table: &ParamTable, params: &[f32]) -> Result<Vec<u8>> {
    safetensors_bytes_of(table, params, |_| true)
}

/// The safetensors bytes of the parameters `keep` selects (by name).
pub fn safetensors_bytes_of(
    table: &ParamTable,
    params: &[f32],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<u8>> {
    let views = table
        .params
        .iter()
        .filter(|p| keep(&p.name))
        .map(|p| {
            let bytes: &[u8] = bytemuck::cast_slice(&params[p.offset..p.offset + p.len]);
            safetensors::tensor::TensorView::new(Dtype::F32, p.shape.clone(), bytes)
                .map(|v| (p.name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("internal: {e}")))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid(format!("internal: {e}")))
}

/// Write config.json and model.safetensors into `dir` (each file fsynced).
pub fn save_pretrained(dir: &Path, config: &ModelConfig, params: &[f32]) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let table = ParamTable::new(config);
    let bytes = safetensors_bytes(&table, params)?;
    crate::fsutil::write_atomic(&dir.join("model.safetensors"), &bytes)?;
    config.save(&dir.join("config.json"))
}

/// `bertcuda convert`: the checkpoint at `src` (any format `formats::Source::locate` finds) written as a
/// transformers directory `dst`: model.safetensors with the tensors the checkpoint has (parameters it lacks
/// are left out, for transformers to initialise and report as it does), config.json, and the tokenizer
/// files when the checkpoint has a vocabulary. Built under a temporary name and renamed into place, so a
/// failed conversion leaves nothing that looks complete.
pub fn convert(src: &Path, dst: &Path, overwrite: bool, tokenizer: LoadOptions) -> Result<LoadReport> {
    let (config, params, mut report) = load_pretrained(src, 0)?;
    let tok = crate::model::formats::checkpoint_tokenizer(src, tokenizer)?;
    if let Some(t) = &tok {
        if t.vocab_size != config.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens but the model's vocabulary is {}; they do not belong together",
                src.display(),
                t.vocab_size,
                config.vocab_size
            );
        }
    }
    let out = crate::fsutil::AtomicDir::create(dst, overwrite)?;
    let table = ParamTable::new(&config);
    let initialised: std::collections::BTreeSet<&str> =
        report.initialised.iter().map(|s| s.as_str()).collect();
    out.write("model.safetensors", &safetensors_bytes_of(&table, &params, |n| !initialised.contains(n))?)?;
    config.save(&out.path().join("config.json"))?;
    match &tok {
        Some(t) => t.save_hf(out.path())?,
        None => report
            .notes
            .push(format!("{}: no tokenizer files beside the checkpoint; none written", src.display())),
    }
    if !report.initialised.is_empty() {
        report
            .notes
            .push("parameters the checkpoint lacks are not written (transformers initialises them)".into());
    }
    out.commit()?;
    Ok(report)
}
