//! Every checkpoint a continued-pretraining user brings, read natively and without running anything a file
//! says: transformers' `model.safetensors` and `pytorch_model.bin` (torch's zip archive and its legacy
//! format, sharded or not), Google BERT's TensorFlow checkpoints and NVIDIA DeepLearningExamples'
//! `ckpt_<step>.pt`.
//!
//! Each format's reader (`safetensors.rs`, `torch.rs`, `tf.rs`) hands over its tensors under
//! transformers' `BertForPreTraining` names with their shapes, values read lazily; `assign` puts them into
//! the parameter table the same way for all (the tied decoder, a decoder bias standing in for
//! `cls.predictions.bias`, shapes checked against the config, parameters the checkpoint lacks initialised),
//! and the load report says what was loaded, initialised, ignored and skipped (training state).

pub mod pickle;
mod safetensors;
pub mod tf;
pub mod torch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::bail;
use crate::data::tokenizer::{BertTokenizer, LoadOptions};
use crate::error::{Error, IoContext, Result};
use crate::model::config::ModelConfig;
use crate::model::params::ParamTable;

/// The float element types a parameter may be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// Little-endian values of `dtype` as f32 (`bytes` holds exactly the tensor's elements).
pub fn decode(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() % dtype.size() != 0 {
        return Err(Error::corrupt(
            path,
            format!("tensor {name}: {} bytes is not a whole number of elements", bytes.len()),
        ));
    }
    let chunks = |w: usize| bytes.chunks_exact(w);
    Ok(match dtype {
        Dtype::F32 => chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F64 => chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::F16 => chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::Bf16 => chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    })
}

/// The element count of a shape from a file (`None`: it overflows, no such tensor can exist).
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// A tensor of a checkpoint under transformers' name, its values read when asked for.
pub struct Stored<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    /// The file it is in, for messages.
    pub file: PathBuf,
    read: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
}

impl<'a> Stored<'a> {
    pub fn new(
        name: String,
        shape: Vec<usize>,
        file: &Path,
        read: impl Fn() -> Result<Vec<f32>> + 'a,
    ) -> Self {
        Stored { name, shape, file: file.to_path_buf(), read: Box::new(read) }
    }

    /// The values, checked to be as many as the shape says.
    pub fn values(&self) -> Result<Vec<f32>> {
        let want = numel(&self.shape).ok_or_else(|| {
            Error::corrupt(
                &self.file,
                format!("tensor {}: shape {:?} has more elements than memory", self.name, self.shape),
            )
        })?;
        let v = (self.read)()?;
        if v.len() != want {
            return Err(Error::corrupt(
                &self.file,
                format!("tensor {}: {} values for shape {:?}", self.name, v.len(), self.shape),
            ));
        }
        Ok(v)
    }
}

/// The checkpoint formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// transformers' model.safetensors (or its shards).
    Safetensors,
    /// transformers' pytorch_model.bin (or its shards), either torch format.
    TorchBin,
    /// A Google BERT TensorFlow checkpoint.
    GoogleTf,
    /// NVIDIA DeepLearningExamples' ckpt_<step>.pt.
    NvidiaPt,
}

/// Where a checkpoint's weights, config and tokenizer are.
#[derive(Debug, Clone)]
pub struct Source {
    pub format: Format,
    /// The weight files (safetensors and torch), or the TF checkpoint's prefix.
    pub weights: Vec<PathBuf>,
    /// The folder with the config and tokenizer files.
    pub dir: PathBuf,
}

impl Source {
    /// Find the checkpoint at `path`: a model directory (any format), or one file of it (a `.safetensors`,
    /// `.bin` or `.pt` file, a TF checkpoint's `.index` file or its prefix).
    pub fn locate(path: &Path) -> Result<Source> {
        let parent =
            || path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_file() {
            let one = |format| Ok(Source { format, weights: vec![path.to_path_buf()], dir: parent() });
            if name.ends_with(".safetensors") {
                return one(Format::Safetensors);
            }
            if let Some(prefix) = name.strip_suffix(".index") {
                return Ok(Source {
                    format: Format::GoogleTf,
                    weights: vec![parent().join(prefix)],
                    dir: parent(),
                });
            }
            if name.ends_with(".index.json") {
                let weights = index_shards(path)?;
                let format =
                    if name.contains("safetensors") { Format::Safetensors } else { Format::TorchBin };
                return Ok(Source { format, weights, dir: parent() });
            }
            if [".bin", ".pt", ".pth", ".ckpt"].iter().any(|e| name.ends_with(e)) {
                return one(if name.ends_with(".bin") { Format::TorchBin } else { Format::NvidiaPt });
            }
            bail!(
                "{}: not a checkpoint file bertcuda knows (.safetensors, pytorch_model.bin, .pt, a TF .index); \
                 or give the model's directory",
                path.display()
            );
        }
        if !path.exists() {
            let mut index = path.as_os_str().to_owned();
            index.push(".index");
            if Path::new(&index).is_file() {
                return Ok(Source {
                    format: Format::GoogleTf,
                    weights: vec![path.to_path_buf()],
                    dir: parent(),
                });
            }
            bail!(
                "{}: no such model directory or checkpoint; give a directory with config.json and \
                 model.safetensors (or pytorch_model.bin, a TF checkpoint, ckpt_<step>.pt)",
                path.display()
            );
        }
        let dir = path.to_path_buf();
        let here = |f: &str| dir.join(f);
        if here("model.safetensors").is_file() {
            return Ok(Source { format: Format::Safetensors, weights: vec![here("model.safetensors")], dir });
        }
        if here("model.safetensors.index.json").is_file() {
            let weights = index_shards(&here("model.safetensors.index.json"))?;
            return Ok(Source { format: Format::Safetensors, weights, dir });
        }
        if here("pytorch_model.bin").is_file() {
            return Ok(Source { format: Format::TorchBin, weights: vec![here("pytorch_model.bin")], dir });
        }
        if here("pytorch_model.bin.index.json").is_file() {
            let weights = index_shards(&here("pytorch_model.bin.index.json"))?;
            return Ok(Source { format: Format::TorchBin, weights, dir });
        }
        let files: Vec<String> = std::fs::read_dir(&dir)
            .at(&dir)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        if let Some(prefix) = tf_prefix(&dir, &files)? {
            return Ok(Source { format: Format::GoogleTf, weights: vec![prefix], dir });
        }
        if let Some(pt) = newest_pt(&dir, &files)? {
            return Ok(Source { format: Format::NvidiaPt, weights: vec![pt], dir });
        }
        bail!(
            "{}: no checkpoint in this directory: bertcuda reads model.safetensors, pytorch_model.bin (and their \
             sharded forms), a TensorFlow checkpoint (<name>.index + <name>.data-*) and ckpt_<step>.pt",
            dir.display()
        )
    }
}

/// The shard files a `*.index.json` names (each must exist).
fn index_shards(index: &Path) -> Result<Vec<PathBuf>> {
    let dir = index.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(index).at(index)?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::corrupt(index, format!("not valid JSON: {e}")))?;
    let files: BTreeSet<String> = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::corrupt(index, "no weight_map"))?
        .values()
        .map(|f| {
            f.as_str()
                .map(String::from)
                .ok_or_else(|| Error::corrupt(index, "a weight_map value is not a file name"))
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for f in files {
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(Error::corrupt(index, format!("names the shard {f:?}, outside its directory")));
        }
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(Error::corrupt(
                index,
                format!("names the shard {f}, which is missing from {}", dir.display()),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// The TF checkpoint of a directory: the one named by its `checkpoint` file, or its only `*.index`.
fn tf_prefix(dir: &Path, files: &[String]) -> Result<Option<PathBuf>> {
    let mut prefixes: Vec<&str> = files.iter().filter_map(|f| f.strip_suffix(".index")).collect();
    prefixes.retain(|p| !p.ends_with(".json"));
    prefixes.sort();
    match prefixes.len() {
        0 => Ok(None),
        1 => Ok(Some(dir.join(prefixes[0]))),
        _ => {
            // TF's `checkpoint` file: model_checkpoint_path: "model.ckpt-1000"
            let state = std::fs::read_to_string(dir.join("checkpoint")).unwrap_or_default();
            let named = state.lines().find_map(|l| {
                l.strip_prefix("model_checkpoint_path:").map(|v| v.trim().trim_matches('"').to_string())
            });
            match named {
                Some(n) if prefixes.contains(&n.as_str()) => Ok(Some(dir.join(n))),
                _ => bail!(
                    "{}: holds several TensorFlow checkpoints ({}); give one: --init-from {}",
                    dir.display(),
                    prefixes.join(", "),
                    dir.join(prefixes[prefixes.len() - 1]).display()
                ),
            }
        }
    }
}

/// The `.pt` checkpoint of a directory: `ckpt_<step>.pt` with the highest step, or its only `.pt`.
fn newest_pt(dir: &Path, files: &[String]) -> Result<Option<PathBuf>> {
    let mut pts: Vec<&String> = files.iter().filter(|f| f.ends_with(".pt") || f.ends_with(".pth")).collect();
    pts.sort();
    let step = |f: &str| f.strip_prefix("ckpt_")?.strip_suffix(".pt")?.parse::<u64>().ok();
    if let Some(best) = pts.iter().filter_map(|f| Some((step(f)?, f))).max() {
        return Ok(Some(dir.join(best.1)));
    }
    match pts.len() {
        0 => Ok(None),
        1 => Ok(Some(dir.join(pts[0]))),
        _ => bail!(
            "{}: holds several .pt files ({}); give one: --init-from {}",
            dir.display(),
            pts.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            dir.join(pts[0]).display()
        ),
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// What was read: the format and file.
    pub format: String,
    pub loaded: Vec<String>,
    /// Parameters the checkpoint did not have: initialised as a new model's.
    pub initialised: Vec<String>,
    /// Checkpoint tensors with no place in BertForPreTraining (or tied/buffer tensors).
    pub ignored: Vec<String>,
    /// Training state the checkpoint carries (optimizer moments, step counters, data-loader state): skipped.
    pub skipped: Vec<String>,
    /// What was adapted on the way (NVIDIA's padded vocabulary trimmed, ...).
    pub notes: Vec<String>,
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
        if !self.skipped.is_empty() {
            s.push_str(&format!(", {} skipped (training state)", self.skipped.len()));
        }
        if !self.format.is_empty() {
            s = format!("{}: {s}", self.format);
        }
        if !self.initialised.is_empty() {
            s.push_str(&format!("\n  initialised: {}", group(&self.initialised)));
        }
        if !self.ignored.is_empty() {
            s.push_str(&format!("\n  ignored: {}", group(&self.ignored)));
        }
        if !self.skipped.is_empty() {
            s.push_str(&format!("\n  skipped: {}", count_leaves(&self.skipped)));
        }
        for n in &self.notes {
            s.push_str(&format!("\n  {n}"));
        }
        s
    }
}

/// Names grouped by their module prefix ("cls.predictions.*", ...), for short messages.
fn group(names: &[String]) -> String {
    let mut groups: BTreeSet<String> = BTreeSet::new();
    for n in names {
        let sep = if n.contains('/') { '/' } else { '.' };
        let parts: Vec<&str> = n.split(sep).collect();
        let keep = parts.len().min(2);
        let joined = parts[..keep].join(&sep.to_string());
        groups.insert(if parts.len() > keep { format!("{joined}{sep}*") } else { n.clone() });
    }
    groups.into_iter().collect::<Vec<_>>().join(", ")
}

/// Names counted by their last component ("adam_m ×46, global_step"), for training state.
fn count_leaves(names: &[String]) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for n in names {
        *counts.entry(n.rsplit('/').next().unwrap_or(n)).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(leaf, n)| if n > 1 { format!("{leaf} ×{n}") } else { leaf.to_string() })
        .collect::<Vec<_>>()
        .join(", ")
}

/// transformers' name for a torch checkpoint's tensor: a DataParallel `module.` prefix dropped, NVIDIA's
/// `dense_act` (their fused Linear + activation) read as `dense`, a bare BertModel's names under `bert.`,
/// legacy `LayerNorm.gamma`/`beta` as `weight`/`bias`.
pub fn canonical(name: &str) -> String {
    let name = name.strip_prefix("module.").unwrap_or(name);
    let name = name.replace(".dense_act.", ".dense.");
    let mut n = if ["embeddings.", "encoder.", "pooler."].iter().any(|p| name.starts_with(p)) {
        format!("bert.{name}")
    } else {
        name
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

/// The parameters indexed by vocabulary rows (NVIDIA pads them to a multiple of 8).
const VOCAB_ROWS: [&str; 4] = [
    "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.weight",
    "cls.predictions.bias",
    "cls.predictions.decoder.bias",
];

/// Put a checkpoint's tensors (under transformers' names) into a new model's parameters. With
/// `trim_vocab`, vocabulary-indexed tensors with more rows than the config's vocabulary are cut to it.
fn assign(
    config: &ModelConfig,
    seed: u64,
    tensors: &[Stored],
    trim_vocab: bool,
    report: &mut LoadReport,
) -> Result<Vec<f32>> {
    let table = ParamTable::new(config);
    let mut params = table.init(config, seed);
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    let mut decoder_bias: Option<(PathBuf, Vec<f32>)> = None;
    let mut trimmed = 0usize;
    let mut sorted: Vec<&Stored> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for t in sorted {
        let name = t.name.as_str();
        if name.ends_with("position_ids") || name == "bert.embeddings.token_type_ids" {
            report.ignored.push(format!("{name} (a buffer)"));
            continue;
        }
        let mut shape = t.shape.clone();
        let rows = shape.first().copied().unwrap_or(0);
        // NVIDIA pads the vocabulary to a multiple of 8: those rows, and only those, are dropped.
        let cut = trim_vocab
            && VOCAB_ROWS.contains(&name)
            && rows > config.vocab_size
            && rows == config.vocab_size.div_ceil(8) * 8;
        if cut {
            trimmed = rows - config.vocab_size;
            shape[0] = config.vocab_size;
        }
        let values = || -> Result<Vec<f32>> {
            let mut v = t.values()?;
            if cut {
                v.truncate(numel(&shape).unwrap_or(0));
            }
            Ok(v)
        };
        if name == "cls.predictions.decoder.weight" {
            let want = [config.vocab_size, config.hidden_size];
            if shape != want {
                return Err(Error::corrupt(
                    &t.file,
                    format!("tensor {name} has shape {shape:?}, the model needs {want:?}"),
                ));
            }
            report.ignored.push(format!("{name} (tied to the word embeddings)"));
            continue;
        }
        if name == "cls.predictions.decoder.bias" {
            // Checked before reading: every tensor read has a size the config bounds.
            if numel(&shape) != Some(config.vocab_size) {
                return Err(Error::corrupt(
                    &t.file,
                    format!("tensor {name} has shape {shape:?}, the model needs [{}]", config.vocab_size),
                ));
            }
            decoder_bias = Some((t.file.clone(), values()?));
            continue;
        }
        let Some(info) = table.get(name) else {
            report.ignored.push(name.to_string());
            continue;
        };
        if shape != info.shape {
            return Err(Error::corrupt(
                &t.file,
                format!(
                    "tensor {name} has shape {shape:?}, but the config makes {} {:?}",
                    info.name, info.shape
                ),
            ));
        }
        params[info.offset..info.offset + info.len].copy_from_slice(&values()?);
        loaded.insert(info.name.clone());
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
    if trimmed > 0 {
        report.notes.push(format!(
            "the vocabulary-indexed tensors had {trimmed} padding rows beyond the vocabulary's {} tokens: dropped",
            config.vocab_size
        ));
    }
    if loaded.is_empty() {
        bail!("{}: none of its tensors is a BERT parameter; is this a BERT checkpoint?", report.format);
    }
    for p in &table.params {
        if loaded.contains(&p.name) {
            report.loaded.push(p.name.clone());
        } else {
            report.initialised.push(p.name.clone());
        }
    }
    Ok(params)
}

/// The config of a checkpoint's folder: config.json, else bert_config.json (Google's and NVIDIA's name).
fn load_config(source: &Source) -> Result<ModelConfig> {
    let dir = &source.dir;
    let mut config =
        match ["config.json", "bert_config.json"].iter().map(|f| dir.join(f)).find(|p| p.is_file()) {
            Some(p) => ModelConfig::load(&p)?,
            None => bail!(
            "{}: no config.json or bert_config.json beside the checkpoint; bertcuda needs the model's sizes",
            dir.display()
        ),
        };
    if source.format == Format::NvidiaPt {
        // NVIDIA trains with the vocabulary padded to a multiple of 8 and may write the padded size into
        // bert_config.json; the real vocabulary is vocab.txt's.
        let vocab = dir.join("vocab.txt");
        if vocab.is_file() {
            let n = crate::data::tokenizer::vocab_file_size(&vocab)?;
            let padded = n.div_ceil(8) * 8;
            if config.vocab_size != n && config.vocab_size != padded {
                return Err(Error::corrupt(
                    &vocab,
                    format!("has {n} tokens but bert_config.json says vocab_size {}", config.vocab_size),
                ));
            }
            config.vocab_size = n;
            config.validate()?;
        }
    }
    Ok(config)
}

/// The tokenizer beside a checkpoint (`tokenizer.json` or `vocab.txt` in its folder), if it has one.
pub fn checkpoint_tokenizer(path: &Path, opts: LoadOptions) -> Result<Option<BertTokenizer>> {
    let dir = Source::locate(path)?.dir;
    if ["tokenizer.json", "vocab.txt"].iter().any(|f| dir.join(f).is_file()) {
        Ok(Some(BertTokenizer::load(&dir, opts)?))
    } else {
        Ok(None)
    }
}

/// Load a checkpoint (see `Source::locate` for what `path` may be): its config and every parameter
/// (missing ones initialised with `seed`), and the report of what was read.
pub fn load_pretrained(path: &Path, seed: u64) -> Result<(ModelConfig, Vec<f32>, LoadReport)> {
    let source = Source::locate(path)?;
    let config = load_config(&source)?;
    let mut report = LoadReport::default();
    let params = match source.format {
        Format::Safetensors => {
            let files =
                source.weights.iter().map(|p| safetensors::File::open(p)).collect::<Result<Vec<_>>>()?;
            report.format = format!("{} (safetensors)", describe(&source));
            let tensors = files.iter().map(|f| f.tensors()).collect::<Result<Vec<_>>>()?;
            let tensors: Vec<Stored> = tensors.into_iter().flatten().collect();
            assign(&config, seed, &tensors, false, &mut report)?
        }
        Format::TorchBin | Format::NvidiaPt => {
            let files =
                source.weights.iter().map(|p| torch::TorchFile::open(p)).collect::<Result<Vec<_>>>()?;
            let mut tensors = Vec::new();
            let mut nested = None;
            for f in &files {
                let sd = torch::state_dict(f)?;
                report.skipped.extend(sd.skipped);
                report.ignored.extend(sd.ignored);
                nested = nested.or(sd.nested_in);
                for mut t in sd.tensors {
                    t.name = canonical(&t.name);
                    tensors.push(t);
                }
            }
            let nvidia = source.format == Format::NvidiaPt || nested.is_some();
            report.format = match &nested {
                Some(key) => format!(
                    "{} (torch training checkpoint, the model from its {key:?} entry)",
                    describe(&source)
                ),
                None => format!("{} (torch state dict)", describe(&source)),
            };
            assign(&config, seed, &tensors, nvidia, &mut report)?
        }
        Format::GoogleTf => {
            let bundle = tf::Bundle::open(&source.weights[0])?;
            let (tensors, skipped, ignored) = tf::tensors(&bundle);
            report.skipped = skipped;
            report.ignored = ignored;
            report.format = format!("{} (TensorFlow checkpoint)", describe(&source));
            assign(&config, seed, &tensors, false, &mut report)?
        }
    };
    Ok((config, params, report))
}

fn describe(source: &Source) -> String {
    match source.weights.as_slice() {
        [one] => one.display().to_string(),
        many => format!("{} ({} shards)", source.dir.display(), many.len()),
    }
}
