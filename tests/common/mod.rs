//! Helpers shared by the test files.
#![allow(dead_code)]

use bertcuda::data::rng::KeyedRng;

/// `n` normal draws of standard deviation `std` from stream `stream` (seed `seed`), in f64.
pub fn randn_f64(stream: u64, seed: u64, n: usize, std: f64) -> Vec<f64> {
    let mut r = KeyedRng::new(stream, &[seed]);
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - r.uniform(), r.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std
        })
        .collect()
}

/// As `randn_f64` on stream 3, rounded to f32.
pub fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    randn_f64(3, seed, n, std as f64).into_iter().map(|x| x as f32).collect()
}

/// The repository (the sample corpus, fixtures, the test checkpoint's cache).
pub fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny preset with these sizes (the rest as the preset).
pub fn small_model(
    vocab: usize,
    hidden: usize,
    heads: usize,
    intermediate: usize,
    positions: usize,
) -> bertcuda::model::config::ModelConfig {
    let mut c = bertcuda::model::config::ModelConfig::preset("tiny", vocab).unwrap();
    c.hidden_size = hidden;
    c.num_attention_heads = heads;
    c.intermediate_size = intermediate;
    c.max_position_embeddings = positions;
    c
}

/// Shards of the sample corpus's first `lines` lines in `dir`/shards, with a WordPiece vocabulary of
/// `vocab` trained on them in `dir`/tok; the tokenizer.
pub fn sample_shards(
    dir: &std::path::Path,
    lines: usize,
    vocab: usize,
) -> bertcuda::data::tokenizer::BertTokenizer {
    use bertcuda::data::prepare::{prepare, PrepareConfig};
    let text = std::fs::read_to_string(root().join("data/sample/rust-book.txt")).unwrap();
    let part: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, &part).unwrap();
    let tok = bertcuda::data::tokenizer::BertTokenizer::train(part.lines(), vocab, 2, true).unwrap();
    tok.save_hf(&dir.join("tok")).unwrap();
    prepare(&PrepareConfig {
        workers: 1,
        ..PrepareConfig::new(vec![corpus], dir.join("tok"), dir.join("shards"))
    })
    .unwrap();
    tok
}

/// Flat tensors of these (length, decayed) one after the other, named t0, t1, …: a parameter table for
/// the optimizers' tests.
pub fn flat_tensors(sizes: &[(usize, bool)]) -> Vec<bertcuda::model::params::ParamInfo> {
    use bertcuda::model::params::{Init, ParamInfo};
    let mut offset = 0;
    sizes
        .iter()
        .enumerate()
        .map(|(k, &(len, decay))| {
            let p =
                ParamInfo { name: format!("t{k}"), shape: vec![len], offset, len, init: Init::Zeros, decay };
            offset += len;
            p
        })
        .collect()
}

/// Optimizer steps as training makes them, on `be`: for each gradient set in turn, its upload, Σg², the
/// step control's decisions (clipping at `max_grad_norm`, the loss scale `scale`, the scaler's growth
/// interval `growth`: 0 for none) and the update, with the schedule of `lrs`; the step control after, its
/// records of the steps unread.
pub fn optimizer_steps(
    be: &dyn bertcuda::backend::Backend,
    opt: &bertcuda::optim::Optimizer,
    params: bertcuda::backend::Buf,
    grads: &[Vec<f32>],
    lrs: &[f64],
    (max_grad_norm, scale, growth): (f64, f64, u64),
) -> bertcuda::Result<bertcuda::backend::StepControl> {
    use bertcuda::backend::{ControlStep, StepControl};
    use bertcuda::optim::ControlCounters;
    let mut control = StepControl::new(be)?;
    control.set_schedule(be, &opt.schedule_rows(lrs.iter().copied()))?;
    control.start(be, &ControlCounters { updates: 0, scale, good_steps: 0 })?;
    let g = be.alloc(params.len)?;
    for (slot, values) in grads.iter().enumerate() {
        be.upload(g, values)?;
        opt.step(be, params, g, &control, &ControlStep { max_grad_norm, growth_interval: growth, slot })?;
    }
    Ok(control)
}

/// AdamW or LAMB (β 0.9 / 0.999, ε 1e-6, decay `weight_decay`, LAMB's trust ratio on the decayed tensors)
/// over `tensors` on `be`, for the optimizers' tests.
pub fn test_optimizer(
    be: &dyn bertcuda::backend::Backend,
    lamb: bool,
    weight_decay: f64,
    tensors: &[bertcuda::model::params::ParamInfo],
) -> bertcuda::Result<bertcuda::optim::Optimizer> {
    use bertcuda::optim::{AdamW, AdamWConfig, Lamb, LambConfig, Optimizer};
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-6);
    Ok(if lamb {
        let c = LambConfig { beta1, beta2, eps, weight_decay, all_tensors: false };
        Optimizer::Lamb(Lamb::new(be, c, tensors)?)
    } else {
        let c = AdamWConfig { lr: 1e-2, beta1, beta2, eps, weight_decay };
        Optimizer::AdamW(AdamW::new(be, c, tensors)?)
    })
}
