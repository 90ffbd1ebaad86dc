//! `ModelConfig`: Hugging Face's BertConfig, read from and written to `config.json`, with the usual sizes
//! as presets.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, IoContext, Result};

/// The activation of the feed-forward layers and the MLM head's transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `hidden_act: "gelu"`: x·Φ(x), with erf.
    GeluErf,
    /// `"gelu_new"` / `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
}

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_pos() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_init() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}
fn d_pos_type() -> String {
    "absolute".into()
}

/// HF BertConfig. Unknown keys are kept and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_drop")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "d_drop")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_types")]
    pub type_vocab_size: usize,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "d_pos_type")]
    pub position_embedding_type: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

pub const PRESETS: [&str; 6] = ["tiny", "mini", "small", "medium", "base", "large"];

impl ModelConfig {
    /// The usual BERT sizes (Google's BERT miniatures and the two originals), for a vocabulary size.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let (l, h, a) = match name {
            "tiny" => (2, 128, 2),
            "mini" => (4, 256, 4),
            "small" => (4, 512, 8),
            "medium" => (8, 512, 8),
            "base" => (12, 768, 12),
            "large" => (24, 1024, 16),
            _ => bail!("unknown model preset {name:?}; choose one of {PRESETS:?} or give a config.json"),
        };
        let mut c: ModelConfig = serde_json::from_str("{}").expect("defaults");
        c.vocab_size = vocab_size;
        c.num_hidden_layers = l;
        c.hidden_size = h;
        c.num_attention_heads = a;
        c.intermediate_size = 4 * h;
        Ok(c)
    }

    /// Read a config.json (a file, or the one in a model directory) and check it.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).at(&file)?;
        let c: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| Error::corrupt(&file, format!("not a valid BERT config.json: {e}")))?;
        if let Some(t) = c.extra.get("model_type").and_then(|v| v.as_str()) {
            if t != "bert" {
                return Err(Error::corrupt(
                    &file,
                    format!("model_type {t:?}: bertcuda trains BERT models (model_type \"bert\")"),
                ));
            }
        }
        c.validate().map_err(|e| Error::corrupt(&file, e.to_string()))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                bail!("{name} is 0; it must be at least 1");
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.pad_token_id >= self.vocab_size {
            bail!("pad_token_id {} is outside the vocabulary of {}", self.pad_token_id, self.vocab_size);
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("{name} {p} must be in [0, 1)");
            }
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            bail!("layer_norm_eps {} must be positive", self.layer_norm_eps);
        }
        if self.position_embedding_type != "absolute" {
            bail!(
                "position_embedding_type {:?} is not supported; bertcuda implements BERT's absolute position embeddings",
                self.position_embedding_type
            );
        }
        self.activation()?;
        // The parameters live in host memory (fp32) whatever the device: a size no machine here can hold
        // is refused before anything is allocated.
        let params = self.parameter_count();
        let avail = crate::fsutil::mem_available().map_or(1u128 << 50, u128::from);
        if params * 4 > avail {
            let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
            bail!(
                "the model has {params} parameters ({:.1} GiB in fp32) and this machine has {:.1} GiB of \
                 memory available: choose smaller sizes",
                gib(params * 4),
                gib(avail)
            );
        }
        Ok(())
    }

    /// The parameters of `BertForPreTraining` with this config (u128: no size a config file can give
    /// overflows it).
    pub fn parameter_count(&self) -> u128 {
        let [v, h, l, i, p, t] = [
            self.vocab_size,
            self.hidden_size,
            self.num_hidden_layers,
            self.intermediate_size,
            self.max_position_embeddings,
            self.type_vocab_size,
        ]
        .map(|x| x as u128);
        let embeddings = (v + p + t) * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * (h * i) + i + h + 4 * h;
        let pooler = h * h + h;
        let heads = (h * h + h + 2 * h + v) + (2 * h + 2);
        embeddings + l * layer + pooler + heads
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => bail!(
                "hidden_act {other:?} is not supported (\"gelu\", \"gelu_new\" or \"gelu_pytorch_tanh\")"
            ),
        }
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The config.json transformers reads, for `BertForPreTraining`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().unwrap();
        m.insert("model_type".into(), "bert".into());
        m.insert("architectures".into(), serde_json::json!(["BertForPreTraining"]));
        m.entry("torch_dtype").or_insert("float32".into());
        m.entry("classifier_dropout").or_insert(serde_json::Value::Null);
        m.entry("use_cache").or_insert(true.into());
        v
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_hf_json()).expect("config serialises");
        crate::fsutil::write_atomic(path, text.as_bytes())
    }
}
