//! Hugging Face checkpoints: `config.json` + `model.safetensors` in and out.
//!
//! Loading accepts `BertForPreTraining`, `BertForMaskedLM` and bare `BertModel` checkpoints (names without
//! the `bert.` prefix), sharded safetensors (`model.safetensors.index.json`), f32/f16/bf16/f64 tensors,
//! legacy `LayerNorm.gamma`/`beta` names; it ignores `position_ids` and rebuilds the tied
//! `cls.predictions.decoder.*` from the word embeddings and `cls.predictions.bias`. What was loaded,
//! initialised and ignored is reported. Saving writes the `BertForPreTraining` layout transformers writes
//! (tied decoder tensors omitted, metadata `format: pt`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::bail;
use crate::error::{Error, IoContext, Result};
use crate::model::config::ModelConfig;
use crate::model::params::ParamTable;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// Parameters the checkpoint did not have: initialised as a new model's.
    pub initialised: Vec<String>,
    /// Checkpoint tensors with no place in BertForPreTraining (or tied/buffer tensors).
    pub ignored: Vec<String>,
}

impl LoadReport {
    /// A short human summary: counts, and the names of initialised parameters grouped by module.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} tensors loaded, {} initialised, {} ignored",
            self.loaded.len(),
            self.initialised.len(),
            self.ignored.len()
        );
        if !self.initialised.is_empty() {
            s.push_str(&format!("\n  initialised: {}", group(&self.initialised)));
        }
        if !self.ignored.is_empty() {
            s.push_str(&format!("\n  ignored: {}", group(&self.ignored)));
        }
        s
    }
}

/// Names grouped by their module prefix ("cls.predictions.*", ...), for short messages.
fn group(names: &[String]) -> String {
    let mut groups: BTreeSet<String> = BTreeSet::new();
    for n in names {
        let parts: Vec<&str> = n.split('.').collect();
        let keep = if parts.len() > 2 { 2 } else { parts.len() };
        groups.insert(if parts.len() > keep { format!("{}.*", parts[..keep].join(".")) } else { n.clone() });
    }
    groups.into_iter().collect::<Vec<_>>().join(", ")
}

/// The safetensors files of a model directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "{}: no such model directory; give a directory with config.json and model.safetensors",
            dir.display()
        );
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).at(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::corrupt(&index, format!("not valid JSON: {e}")))?;
        let files: BTreeSet<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::corrupt(&index, "no weight_map"))?
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{}: holds only pytorch_model.bin; bertcuda reads safetensors. Convert it once with python: \
             `from transformers import AutoModelForPreTraining as M; M.from_pretrained(\"{d}\").save_pretrained(\"{d}\", safe_serialization=True)`",
            dir.display(),
            d = dir.display()
        );
    }
    bail!("{}: no model.safetensors in this directory", dir.display())
}

/// Map a checkpoint tensor name onto BertForPreTraining's.
fn canonical(name: &str) -> String {
    let mut n = if name.starts_with("bert.") || name.starts_with("cls.") {
        name.to_string()
    } else if ["embeddings.", "encoder.", "pooler."].iter().any(|p| name.starts_with(p)) {
        format!("bert.{name}")
    } else {
        name.to_string()
    };
    if n.contains("LayerNorm.") {
        if let Some(base) = n.strip_suffix(".gamma") {
            n = format!("{base}.weight");
        } else if let Some(base) = n.strip_suffix(".beta") {
            n = format!("{base}.bias");
        }
    }
    n
}

/// Convert a tensor's bytes to f32.
fn to_f32(path: &Path, name: &str, dtype: Dtype, data: &[u8], out: &mut [f32]) -> Result<()> {
    let chunks = |w: usize| data.chunks_exact(w);
    match dtype {
        Dtype::F32 => chunks(4).zip(out).for_each(|(c, o)| *o = f32::from_le_bytes(c.try_into().unwrap())),
        Dtype::F64 => {
            chunks(8).zip(out).for_each(|(c, o)| *o = f64::from_le_bytes(c.try_into().unwrap()) as f32)
        }
        Dtype::F16 => {
            chunks(2).zip(out).for_each(|(c, o)| *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        }
        Dtype::BF16 => {
            chunks(2).zip(out).for_each(|(c, o)| *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        }
        other => {
            return Err(Error::corrupt(
                path,
                format!("tensor {name} has dtype {other:?}; expected a float type"),
            ))
        }
    }
    Ok(())
}

/// Load a model directory: its config and every parameter (missing ones initialised with `seed`).
pub fn load_pretrained(dir: &Path, seed: u64) -> Result<(ModelConfig, Vec<f32>, LoadReport)> {
    let files = weight_files(dir)?;
    let config = ModelConfig::load(dir)?;
    let table = ParamTable::new(&config);
    let mut params = table.init(&config, seed);
    let mut report = LoadReport::default();
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    let mut decoder_bias: Option<(PathBuf, Vec<f32>)> = None;
    for path in files {
        let file = std::fs::File::open(&path).at(&path)?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&path)?;
        let st = SafeTensors::deserialize(&map).map_err(|e| {
            Error::corrupt(&path, format!("not a readable safetensors file (truncated or corrupt?): {e}"))
        })?;
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (raw, view) in tensors {
            let name = canonical(&raw);
            if name.ends_with("position_ids") {
                report.ignored.push(raw);
                continue;
            }
            let shape = view.shape().to_vec();
            if name == "cls.predictions.decoder.weight" {
                let want = [config.vocab_size, config.hidden_size];
                if shape != want {
                    return Err(Error::corrupt(
                        &path,
                        format!("tensor {raw} has shape {shape:?}, the model needs {want:?}"),
                    ));
                }
                report.ignored.push(format!("{raw} (tied to the word embeddings)"));
                continue;
            }
            if name == "cls.predictions.decoder.bias" {
                let mut v = vec![0f32; shape.iter().product()];
                to_f32(&path, &raw, view.dtype(), view.data(), &mut v)?;
                decoder_bias = Some((path.clone(), v));
                continue;
            }
            let Some(info) = table.get(&name) else {
                report.ignored.push(raw);
                continue;
            };
            if shape != info.shape {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "tensor {raw} has shape {shape:?}, but config.json makes {} {:?}",
                        info.name, info.shape
                    ),
                ));
            }
            to_f32(&path, &raw, view.dtype(), view.data(), &mut params[info.offset..info.offset + info.len])?;
            loaded.insert(info.name.clone());
        }
    }
    // A decoder bias stands in for cls.predictions.bias when that is absent (they are one tensor).
    if let Some((path, v)) = decoder_bias {
        let info = table.get("cls.predictions.bias").expect("in the table");
        if loaded.contains(&info.name) {
            report.ignored.push("cls.predictions.decoder.bias (tied to cls.predictions.bias)".into());
        } else {
            if v.len() != info.len {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "cls.predictions.decoder.bias has {} values, the model needs {}",
                        v.len(),
                        info.len
                    ),
                ));
            }
            params[info.offset..info.offset + info.len].copy_from_slice(&v);
            loaded.insert(info.name.clone());
        }
    }
    if loaded.is_empty() {
        bail!("{}: none of its tensors is a BERT parameter; is this a BERT checkpoint?", dir.display());
    }
    for p in &table.params {
        if loaded.contains(&p.name) {
            report.loaded.push(p.name.clone());
        } else {
            report.initialised.push(p.name.clone());
        }
    }
    Ok((config, params, report))
}

/// The safetensors bytes of the parameters in transformers' BertForPreTraining layout.
pub fn safetensors_bytes(table: &ParamTable, params: &[f32]) -> Result<Vec<u8>> {
    let views = table
        .params
        .iter()
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
