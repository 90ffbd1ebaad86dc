//! `bertcuda eval | forward | fill-mask | embed | convert`: a trained model at work.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use bertcuda::backend::choice::Device;
use bertcuda::data::loader::open_corpus;
use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
use bertcuda::infer::{BatchFile, LoadedModel, Pooling};

use super::data::DataArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// A model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    device: Device,
    #[command(flatten)]
    data: DataArgs,
    /// Sequences per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Batches evaluated at most (the first ones of epoch 0).
    #[arg(long, default_value_t = 100)]
    max_batches: usize,
    /// Seed of the pairs and masks: the same seed gives two models the same predictions to make.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// A model directory (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// The batch, as JSON.
    #[arg(long)]
    batch: PathBuf,
    /// The device (the CPU reference unless told).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Write last_hidden_state, pooler_output, prediction_logits and seq_relationship_logits (f32) here.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// With --dump: also the loss's gradient of every parameter, as grad.<name>.
    #[arg(long, requires = "dump")]
    grads: bool,
}

#[derive(Args)]
pub struct FillMaskArgs {
    /// A model directory with an MLM head and its tokenizer (ours or a Hugging Face one).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    device: Device,
    /// Predictions printed per [MASK].
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// The text, with one or more [MASK] tokens.
    text: String,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum, default_value_t)]
    device: Device,
    #[arg(long, value_enum, default_value_t)]
    pooling: Pooling,
    #[arg(required = true)]
    text: Vec<String>,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The checkpoint: a model directory, or one of its files.
    src: PathBuf,
    /// The transformers directory to write (must not exist, unless --overwrite).
    dst: PathBuf,
    #[arg(long)]
    overwrite: bool,
    /// Keep case: the checkpoint's vocab.txt is cased (when no tokenizer_config.json or folder name says).
    #[arg(long)]
    no_lowercase: bool,
}

pub fn load_model(dir: &std::path::Path) -> Result<LoadedModel> {
    let m = LoadedModel::load(dir)?;
    eprintln!("{}", m.report.summary());
    Ok(m)
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let fb = BatchFile::read(&a.batch)?.flatten(&a.batch)?;
    let r = bertcuda::infer::forward(a.device, &model, &fb, a.dump.is_some(), a.grads)?;
    if let Some(path) = &a.dump {
        bertcuda::infer::write_safetensors(path, &r.tensors)?;
    }
    println!("{}", bertcuda::infer::losses_json(&r.losses));
    Ok(())
}

pub fn fill_mask(a: FillMaskArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = bertcuda::infer::model_tokenizer(&a.model)?;
    for (pos, preds) in bertcuda::infer::fill_mask(a.device, &model, &tok, &a.text, a.top_k)? {
        println!("{}", serde_json::json!({"position": pos, "predictions": preds}));
    }
    Ok(())
}

pub fn embed(a: EmbedArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = bertcuda::infer::model_tokenizer(&a.model)?;
    for v in bertcuda::infer::embed(a.device, &model, &tok, &a.text, a.pooling)? {
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let model = LoadedModel::load(&a.model)?;
    if !model.has_nsp_head() && !model.has_mlm_head() {
        bail!(
            "{}: the checkpoint has neither an MLM nor an NSP head (a bare BertModel), so there is nothing to \
             evaluate; continue pretraining it first: bertcuda train --init-from {0} ...",
            a.model.display()
        );
    }
    let corpus = open_corpus(&a.data.data)?;
    if let Ok(t) = BertTokenizer::load(&a.model, LoadOptions::default()) {
        corpus.sets[0].check_tokenizer(&t)?;
    }
    let cfg = a.data.loader(a.seed, a.batch_size);
    cfg.validate()?;
    let mut r = bertcuda::infer::evaluate(a.device, &model, &corpus, &cfg, a.max_batches)?;
    if !model.has_nsp_head() {
        eprintln!("{}: no NSP head in the checkpoint; NSP results omitted", a.model.display());
        (r.nsp_loss, r.nsp_accuracy) = (None, None);
    }
    if !model.has_mlm_head() {
        eprintln!("{}: no MLM head in the checkpoint; MLM results omitted", a.model.display());
        (r.mlm_loss, r.mlm_accuracy, r.perplexity) = (None, None, None);
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!("sequences      {}", r.sequences);
        println!("mlm_loss       {}", f(r.mlm_loss));
        println!("mlm_accuracy   {}", f(r.mlm_accuracy));
        println!("perplexity     {}", f(r.perplexity));
        println!("nsp_loss       {}", f(r.nsp_loss));
        println!("nsp_accuracy   {}", f(r.nsp_accuracy));
    }
    Ok(())
}

/// `bertcuda convert SRC DST`.
pub fn convert(a: ConvertArgs) -> Result<()> {
    let opts = LoadOptions { no_lowercase: a.no_lowercase };
    let report = bertcuda::model::hf::convert(&a.src, &a.dst, a.overwrite, opts)?;
    eprintln!("{}", report.summary());
    println!("wrote {}", a.dst.display());
    Ok(())
}
