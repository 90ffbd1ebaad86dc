//! `bertcuda bench`: speed as ratios against a reference, never as test assertions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::prepare::{prepare, PrepareConfig, DEFAULT_SHARD_TOKENS};
use crate::data::text::{list_input_files, CorpusReader, DEFAULT_MAX_LINE_BYTES};
use crate::data::tokenizer::{BertTokenizer, LoadOptions};
use crate::error::{Error, Result};

pub struct PrepareBench {
    pub text_mb: f64,
    pub workers: usize,
    /// The tokenizer alone: `encode_batch` / `encode_batch_fast` over every sentence, text already in memory.
    pub encode_batch_mb_s: f64,
    pub encode_batch_fast_mb_s: f64,
    /// `prepare` end to end: read, clean, tokenize, write shards.
    pub prepare_mb_s: f64,
}

/// prepare's MB/s of text next to the tokenizer's own batch encoding on the same text and threads.
pub fn bench_prepare(
    inputs: &[PathBuf],
    tokenizer: &Path,
    workers: usize,
    repeats: usize,
) -> Result<PrepareBench> {
    let files = list_input_files(inputs)?;
    let tok = BertTokenizer::load(tokenizer, LoadOptions::default())?;
    let mut reader = CorpusReader::new(files, DEFAULT_MAX_LINE_BYTES);
    let mut sentences = Vec::new();
    while let Some(doc) = reader.next_document()? {
        sentences.extend(doc);
    }
    let text_mb = reader.report.bytes as f64 / 1e6;
    let repeats = repeats.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start {workers} threads: {e}")))?;
    let refs: Vec<&str> = sentences.iter().map(|s| s.as_str()).collect();
    let time_best = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let enc_err = |e: tokenizers::Error| Error::Invalid(format!("encode_batch: {e}"));
    let t_batch = pool.install(|| {
        time_best(&|| tok.inner().encode_batch(refs.clone(), false).map(|_| ()).map_err(enc_err))
    })?;
    let t_fast = pool.install(|| {
        time_best(&|| tok.inner().encode_batch_fast(refs.clone(), false).map(|_| ()).map_err(enc_err))
    })?;
    let out = std::env::temp_dir().join(format!("bertcuda-bench-prepare-{}", std::process::id()));
    let cfg = PrepareConfig {
        inputs: inputs.to_vec(),
        tokenizer: tokenizer.to_path_buf(),
        no_lowercase: false,
        output: out.clone(),
        workers,
        overwrite: true,
        max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        shard_tokens: DEFAULT_SHARD_TOKENS,
        id_bytes: None,
        progress: false,
    };
    let t_prepare = time_best(&|| prepare(&cfg).map(|_| ()));
    let _ = std::fs::remove_dir_all(&out);
    let t_prepare = t_prepare?;
    Ok(PrepareBench {
        text_mb,
        workers,
        encode_batch_mb_s: text_mb / t_batch,
        encode_batch_fast_mb_s: text_mb / t_fast,
        prepare_mb_s: text_mb / t_prepare,
    })
}

pub struct LoaderBench {
    pub max_seq_len: usize,
    /// Sequences per second of one loader thread making batches (examples, masking, collation).
    pub seq_per_s: f64,
    /// Building one epoch's index (all threads), seconds, and its examples.
    pub index_seconds: f64,
    pub epoch_examples: usize,
}

/// One loader thread's sequences per second at each sequence length.
pub fn bench_loader(
    dirs: &[PathBuf],
    seq_lens: &[usize],
    batch_size: usize,
    seconds: f64,
) -> Result<Vec<LoaderBench>> {
    use crate::data::examples::ExampleConfig;
    use crate::data::loader::{EpochPlan, LoaderConfig};
    let corpus = crate::data::loader::open_corpus(dirs)?;
    let one =
        rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| Error::Invalid(e.to_string()))?;
    let mut out = Vec::new();
    for &t in seq_lens {
        let cfg = LoaderConfig {
            examples: ExampleConfig { max_seq_len: t, ..Default::default() },
            batch_size,
            rank: 0,
            world_size: 1,
            pad_to_max: false,
            drop_last: false,
        };
        cfg.validate()?;
        let start = Instant::now();
        let plan = EpochPlan::new(&corpus, &cfg, 0)?;
        let index_seconds = start.elapsed().as_secs_f64();
        let batches = plan.batches(&cfg);
        let (mut seqs, mut k) = (0usize, 0u64);
        let start = Instant::now();
        one.install(|| {
            while start.elapsed().as_secs_f64() < seconds {
                let b = plan.batch(&corpus, &cfg, k % batches);
                seqs += b.batch_size;
                k += 1;
            }
        });
        out.push(LoaderBench {
            max_seq_len: t,
            seq_per_s: seqs as f64 / start.elapsed().as_secs_f64(),
            index_seconds,
            epoch_examples: plan.epoch_examples(),
        });
    }
    Ok(out)
}

pub struct ModelBench {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    /// Forward + backward steps per second (dropout on, MLM head on the masked 15%).
    pub steps_per_s: f64,
    pub params: usize,
    /// Activation memory planned for the batch, bytes.
    pub activation_bytes: usize,
}

/// Forward + backward steps per second of the CPU backend on a random batch.
pub fn bench_model(preset: &str, batch: usize, seq: usize, steps: usize) -> Result<ModelBench> {
    use crate::backend::cpu::Cpu;
    use crate::data::rng::KeyedRng;
    use crate::model::bert::{Bert, Capacity, Inputs, StepOptions, Train};
    use crate::model::config::ModelConfig;
    use crate::model::params::ParamTable;
    let config = ModelConfig::preset(preset, 30522)?;
    let be = Cpu::<f32>::new();
    let model = Bert::new(&be, config.clone(), Capacity::new(batch, seq))?;
    let table = ParamTable::new(&config);
    model.set_params(&table.init(&config, 0))?;
    let n = batch * seq;
    let mut rng = KeyedRng::new(7, &[1]);
    let ids: Vec<u32> = (0..n).map(|_| 1000 + rng.below(29000) as u32).collect();
    let types: Vec<u32> = (0..n).map(|i| ((i % seq) >= seq / 2) as u32).collect();
    let mask = vec![1u8; n];
    let rows: Vec<u32> = (0..n as u32).filter(|_| rng.bernoulli(0.15)).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| ids[r as usize] as i32).collect();
    let nsp: Vec<u32> = (0..batch as u32).map(|i| i % 2).collect();
    let inp = Inputs {
        batch,
        seq,
        input_ids: &ids,
        token_type_ids: &types,
        attention_mask: &mask,
        head_rows: &rows,
        head_labels: Some(&labels),
        nsp_labels: Some(&nsp),
    };
    for s in 0..2 {
        model.step(&inp, StepOptions { train: Some(Train { seed: 0, step: s }), ..StepOptions::grads() })?;
    }
    let start = Instant::now();
    for s in 0..steps.max(1) {
        model.step(
            &inp,
            StepOptions { train: Some(Train { seed: 0, step: 2 + s as u64 }), ..StepOptions::grads() },
        )?;
    }
    Ok(ModelBench {
        preset: preset.into(),
        batch,
        seq,
        threads: rayon::current_num_threads(),
        steps_per_s: steps.max(1) as f64 / start.elapsed().as_secs_f64(),
        params: table.total,
        activation_bytes: model.activation_floats * 4,
    })
}

pub struct TrainBench {
    pub device: String,
    pub steps: u64,
    pub batch: usize,
    /// Whole training steps: loader, forward, backward, clipping, AdamW, logging.
    pub train_seq_per_s: f64,
    pub train_tokens_per_s: f64,
    /// Forward + backward alone on one batch of the same data, same dropout.
    pub model_seq_per_s: f64,
    /// Model FLOPs per second of the whole steps: (6·N + 12·L·H·T) per token, N the encoder's parameters.
    pub model_tflops: f64,
    /// Device memory in use after the model-alone run (the GPU), bytes.
    pub memory_bytes: Option<u64>,
    /// On a device: the host's waits, transfers and device allocations over the steps after the first,
    /// and how many steps.
    pub traffic: Option<(crate::backend::device::Traffic, u64)>,
}

/// `bertcuda bench train`: whole training steps next to the model's own forward + backward, with the
/// model FLOP rate for MFU.
pub fn bench_train(
    data: &[PathBuf],
    preset: &str,
    device: crate::backend::choice::Device,
    precision: crate::backend::choice::Precision,
    batch: usize,
    seq: usize,
    steps: u64,
) -> Result<TrainBench> {
    use crate::backend::choice::on_backend;
    use crate::backend::Memory;
    use crate::data::loader::open_corpus;
    use crate::model::config::ModelConfig;
    use crate::model::params::ParamTable;
    use crate::train::{train, TrainConfig};
    let out = std::env::temp_dir().join(format!("bertcuda-bench-train-{}", std::process::id()));
    let cfg = TrainConfig {
        data: data.to_vec(),
        output: out.clone(),
        model_config: preset.into(),
        device,
        precision,
        per_device_batch_size: batch,
        max_seq_len: seq,
        max_steps: Some(steps),
        logging_steps: steps,
        save_steps: steps,
        overwrite_output: true,
        progress: false,
        ..TrainConfig::default()
    };
    let s = train(cfg.clone(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let _ = std::fs::remove_dir_all(&out);
    let s = s?;
    let tokens_per_s = s.last.as_ref().map_or(0.0, |m| m.tokens_per_s);
    let corpus = open_corpus(data)?;
    let config = ModelConfig::preset(preset, corpus.tokenizer.vocab_size)?;
    let table = ParamTable::new(&config);
    let n_encoder =
        table.params.iter().filter(|p| p.name.starts_with("bert.encoder.")).map(|p| p.len).sum::<usize>()
            as f64;
    let flops_per_token =
        6.0 * n_encoder + 12.0 * (config.num_hidden_layers * config.hidden_size * seq) as f64;
    let (model_seq_per_s, memory_bytes, device_name) = on_backend!(device.open()?, be => {
        (model_alone(be, &cfg, &corpus, &config, steps)?, be.memory_used(), be.describe())
    });
    Ok(TrainBench {
        device: device_name,
        steps,
        batch,
        train_seq_per_s: (steps as usize * batch) as f64 / s.loop_seconds,
        train_tokens_per_s: tokens_per_s,
        model_seq_per_s,
        model_tflops: flops_per_token * tokens_per_s / 1e12,
        memory_bytes,
        traffic: s.traffic,
    })
}

/// Sequences per second of forward + backward alone, on the run's first batch.
fn model_alone<B: crate::backend::Backend>(
    be: &B,
    cfg: &crate::train::TrainConfig,
    corpus: &crate::data::examples::Corpus,
    config: &crate::model::config::ModelConfig,
    steps: u64,
) -> Result<f64> {
    use crate::data::loader::EpochPlan;
    use crate::model::bert::{Bert, Capacity, Inputs, StepOptions, Train};
    use crate::model::params::ParamTable;
    be.set_precision(&crate::backend::choice::name(cfg.precision))?;
    let model = Bert::new(be, config.clone(), Capacity::new(cfg.per_device_batch_size, cfg.max_seq_len))?;
    model.set_params(&ParamTable::new(config).init(config, 0))?;
    let loader = cfg.loader();
    let b = EpochPlan::new(corpus, &loader, 0)?.batch(corpus, &loader, 0);
    let mut labels = Vec::new();
    let inp = Inputs::from_batch(&b, &mut labels);
    model.step(&inp, StepOptions { train: Some(Train { seed: 0, step: 0 }), ..StepOptions::grads() })?;
    be.synchronize()?;
    let start = Instant::now();
    for k in 0..steps {
        model.step(
            &inp,
            StepOptions { train: Some(Train { seed: 0, step: k + 1 }), ..StepOptions::grads() },
        )?;
    }
    be.synchronize()?;
    Ok(b.batch_size as f64 * steps as f64 / start.elapsed().as_secs_f64())
}

/// One line of `bertcuda bench kernels`.
pub struct KernelBench {
    pub name: String,
    pub ms: f64,
    /// GB/s for memory-bound kernels, TFLOP/s for matrix products.
    pub rate: f64,
    pub unit: &'static str,
    /// rate / the device's measured ceiling (copy bandwidth or GEMM peak).
    pub fraction: f64,
}

impl KernelBench {
    /// A memory-bound kernel that moved `bytes` in `ms`, against the copy bandwidth `ceiling` (GB/s).
    fn bandwidth(name: impl Into<String>, ms: f64, bytes: f64, ceiling: f64) -> Self {
        let rate = bytes / ms / 1e6;
        KernelBench { name: name.into(), ms, rate, unit: "GB/s", fraction: rate / ceiling }
    }
    /// A compute-bound kernel that did `flops` in `ms` (no measured ceiling).
    fn compute(name: impl Into<String>, ms: f64, flops: f64) -> Self {
        KernelBench { name: name.into(), ms, rate: flops / ms / 1e9, unit: "TFLOP/s", fraction: f64::NAN }
    }
}

/// Milliseconds per call of `f` on `be`'s stream: one warm-up call, then `reps` timed ones.
fn time_cuda(be: &crate::backend::cuda::Cuda, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    use crate::backend::Memory;
    f()?;
    be.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    be.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

/// Attention forward and backward on BERT's shapes (12 heads of 64; batch 32 at seq 128, 8 at 512), on
/// random inputs (not constant ones, whose softmax is flat), without and with dropout 0.1 on the
/// probabilities: compare with benches/torch_attention.py (PyTorch's scaled_dot_product_attention, its
/// flash backend) on the same shapes. FLOPs: 4·B·NH·T²·64 forward, 2.5× that backward (as FlashAttention
/// counts them).
fn attention_rows(be: &crate::backend::cuda::Cuda, label: &str, out: &mut Vec<KernelBench>) -> Result<()> {
    use crate::backend::{Attention, Dropout, DropoutKey, Kind, Memory};
    let normal = |stream: u64, n: usize| {
        let mut v = vec![0f32; n];
        crate::model::params::fill_normal(&mut crate::data::rng::KeyedRng::new(stream, &[0]), &mut v, 1.0);
        v
    };
    let (nh, hs) = (12usize, 64usize);
    let h = nh * hs;
    for (bb, seq) in [(32usize, 128usize), (8, 512)] {
        let rows = bb * seq;
        let qkv = be.alloc_kind(rows * 3 * h, Kind::Activation)?;
        be.upload(qkv, &normal(7, rows * 3 * h))?;
        let dout = be.alloc_kind(rows * h, Kind::Activation)?;
        be.upload(dout, &normal(8, rows * h))?;
        let (o, dqkv) =
            (be.alloc_kind(rows * h, Kind::Activation)?, be.alloc_kind(rows * 3 * h, Kind::Activation)?);
        let st = be.alloc_kind(be.attention_state_len(bb, seq, nh), Kind::Stat)?;
        let mask = be.alloc_ints(rows)?;
        be.upload_ints(mask, &vec![1; rows])?;
        let flops = 4.0 * (bb * nh * seq * seq * hs) as f64;
        for dropout in [None, Some(Dropout { p: 0.1, key: DropoutKey { seed: 1, step: 0, site: 0 } })] {
            let what =
                format!("{bb}×{seq}, 12×64, {label}{}", if dropout.is_some() { ", dropout" } else { "" });
            let f_ms =
                time_cuda(be, 10, &mut || be.attention_fwd(o, st, qkv, mask, bb, seq, nh, hs, dropout))?;
            let b_ms = time_cuda(be, 10, &mut || {
                be.attention_bwd(dqkv, dout, o, qkv, st, mask, bb, seq, nh, hs, dropout)
            })?;
            out.push(KernelBench::compute(format!("attention_fwd ({what})"), f_ms, flops));
            out.push(KernelBench::compute(format!("attention_bwd ({what})"), b_ms, 2.5 * flops));
        }
    }
    Ok(())
}

/// Each CUDA kernel on BERT-base shapes (batch 32, seq 128, hidden 768, 12 heads), timed over repeats,
/// against the device's own measured copy bandwidth (and cuBLAS SGEMM for the matrix product).
pub fn bench_kernels() -> Result<(String, Vec<KernelBench>)> {
    use crate::backend::cuda::Cuda;
    use crate::backend::{
        Activations, AdamWConsts, Dropout, DropoutKey, LambConsts, Linear, Loss, Memory, Norm, Optim,
    };
    use crate::model::bert::logit_stride;
    use crate::model::config::Activation;
    let be = Cuda::new(0)?;
    let (b, t, h, i, v) = (32usize, 128usize, 768usize, 3072usize, 30522usize);
    let n = b * t;
    let time = |reps: usize, f: &mut dyn FnMut() -> Result<()>| time_cuda(&be, reps, f);
    let mut out = Vec::new();
    // The ceiling: a device-to-device copy of 256 MiB, bytes read + written.
    let big = 64 << 20;
    let (x, y) = (be.alloc(big)?, be.alloc(big)?);
    let copy_ms = time(20, &mut || be.copy(y, x))?;
    let copy_gbs = 2.0 * 4.0 * big as f64 / copy_ms / 1e6;
    out.push(KernelBench::bandwidth(
        "copy (device to device, the ceiling)",
        copy_ms,
        2.0 * 4.0 * big as f64,
        copy_gbs,
    ));
    let mut mem =
        |name: &str, bytes: f64, ms: f64| out.push(KernelBench::bandwidth(name, ms, bytes, copy_gbs));
    let act = be.alloc(n * i)?;
    let act2 = be.alloc(n * i)?;
    let act3 = be.alloc(n * i)?;
    be.fill(act, 0.5)?;
    be.fill(act3, 0.25)?;
    let w = be.alloc(h)?;
    be.fill(w, 1.0)?;
    let (mean, rstd) = (be.alloc(n)?, be.alloc(n)?);
    let (dw, db) = (be.alloc(h)?, be.alloc(h)?);
    let nh_ = n * h;
    let ms =
        time(50, &mut || be.layernorm_fwd(act2.prefix(nh_), mean, rstd, act.prefix(nh_), w, w, n, h, 1e-12))?;
    mem("layernorm_fwd (4096×768)", 4.0 * 2.0 * nh_ as f64, ms);
    let ms = time(50, &mut || {
        be.layernorm_bwd(act2.prefix(nh_), dw, db, act3.prefix(nh_), act.prefix(nh_), mean, rstd, w, n, h)
    })?;
    mem("layernorm_bwd (4096×768)", 4.0 * 3.0 * nh_ as f64, ms);
    let ms = time(50, &mut || be.gelu_fwd(act2, act, Activation::GeluErf))?;
    mem("gelu_fwd (4096×3072)", 4.0 * 2.0 * (n * i) as f64, ms);
    let ms = time(50, &mut || be.gelu_bwd(act2, act3, act, Activation::GeluErf))?;
    mem("gelu_bwd (4096×3072)", 4.0 * 3.0 * (n * i) as f64, ms);
    let d = Dropout { p: 0.1, key: DropoutKey { seed: 0, step: 0, site: 0 } };
    let ms = time(50, &mut || be.dropout_fwd(act2.prefix(nh_), act.prefix(nh_), d))?;
    mem("dropout_fwd (4096×768)", 4.0 * 2.0 * nh_ as f64, ms);
    // Masked cross-entropy over the vocabulary: 15% of the tokens, in the model's padded rows.
    let rows = n * 15 / 100;
    let ld = logit_stride(v);
    let logits = be.alloc(rows * ld)?;
    let losses = be.alloc(rows)?;
    let labels = be.alloc_ints(rows)?;
    be.upload_ints(labels, &(0..rows as i32).map(|r| r % v as i32).collect::<Vec<_>>())?;
    let ms = time(20, &mut || {
        be.fill(logits, 0.1)?;
        be.cross_entropy(losses, logits, labels, (rows, v, ld), Some(1.0 / rows as f64), None)
    })?;
    let fill_ms = time(20, &mut || be.fill(logits, 0.1))?;
    mem("cross_entropy fwd+bwd (614×30522, rows 30528 apart)", 4.0 * 2.0 * (rows * v) as f64, ms - fill_ms);
    // AdamW and LAMB over BERT-base's tensors, the step control set to apply: AdamW reads param, m, v, the
    // gradient and writes param, m, v; LAMB reads param, m, v twice and the gradient, writes them.
    let table =
        crate::model::params::ParamTable::new(&crate::model::config::ModelConfig::preset("base", 30522)?);
    let nt = table.total;
    let np = nt;
    let (p, g, m1, m2) = (be.alloc(np)?, be.alloc(np)?, be.alloc(np)?, be.alloc(np)?);
    let chunks = crate::backend::TensorChunks::new(&be, &table.params)?;
    let mut control = crate::backend::StepControl::new(&be)?;
    control.set_schedule(&be, &[0.999_999, 1e-3, 0.03])?;
    control.start(&be, &crate::optim::ControlCounters { updates: 0, scale: 1.0, good_steps: 0 })?;
    be.sum_squares(control.squares(), g)?;
    be.step_control(
        &control,
        &crate::backend::ControlStep { max_grad_norm: 1.0, growth_interval: 0, slot: 0 },
    )?;
    let consts = AdamWConsts { beta1: 0.9, beta2: 0.999, eps: 1e-6 };
    let ms = time(10, &mut || be.adamw(p, g, m1, m2, &chunks, &control, &consts))?;
    let params = format!("{:.0} M parameters, {} tensors", nt as f64 / 1e6, table.params.len());
    mem(&format!("adamw ({params})"), 4.0 * 7.0 * nt as f64, ms);
    let lamb = LambConsts { beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01, all_tensors: false };
    control.set_schedule(&be, &[1e-3, 0.1, 0.001])?; // LAMB's row: lr, 1 − β1, 1 − β2 (t = 1)
    let ms = time(10, &mut || be.lamb(p, g, m1, m2, &chunks, &control, &lamb))?;
    mem(&format!("lamb ({params})"), 4.0 * 10.0 * nt as f64, ms);
    let sq = be.alloc(1)?;
    let ms = time(10, &mut || be.sum_squares(sq, g))?;
    mem(&format!("gradient norm ({:.0} M)", np as f64 / 1e6), 4.0 * np as f64, ms);
    attention_rows(&be, "fp32, CUDA cores", &mut out)?;
    // cuBLAS SGEMM (fp32, no TF32) on the FFN shape.
    let (a, bm, c) = (be.alloc(n * h)?, be.alloc(i * h)?, be.alloc(n * i)?);
    let ms = time(20, &mut || be.matmul(c, a, bm, n, i, h, false, true, false))?;
    out.push(KernelBench::compute("sgemm (4096×3072×768, fp32)", ms, 2.0 * (n * i * h) as f64));
    bf16_rows(copy_gbs, &mut out)?;
    Ok((be.describe(), out))
}

/// The bf16 path of `bench kernels`: a second backend whose activations are stored in bf16 (the matrix
/// product on bf16 tensor cores, the memory-bound kernels moving half the bytes), rated against the fp32
/// backend's measured copy bandwidth.
fn bf16_rows(copy_gbs: f64, out: &mut Vec<KernelBench>) -> Result<()> {
    use crate::backend::cuda::Cuda;
    use crate::backend::{Activations, Dropout, DropoutKey, Kind, Linear, Memory, Norm};
    use crate::model::config::Activation;
    let (n, h, i) = (32usize * 128, 768usize, 3072usize);
    let d = Dropout { p: 0.1, key: DropoutKey { seed: 0, step: 0, site: 0 } };
    let b16 = Cuda::new(0)?;
    b16.set_precision("bf16")?;
    let (xa, wa, ya) = (
        b16.alloc_kind(n * h, Kind::Activation)?,
        b16.alloc_kind(i * h, Kind::Param)?,
        b16.alloc_kind(n * i, Kind::Activation)?,
    );
    attention_rows(&b16, "bf16, tensor cores", out)?;
    let time16 = |reps: usize, f: &mut dyn FnMut() -> Result<()>| time_cuda(&b16, reps, f);
    let ms = time16(20, &mut || b16.matmul(ya, xa, wa, n, i, h, false, true, false))?;
    out.push(KernelBench::compute("gemm bf16 (4096×3072×768)", ms, 2.0 * (n * i * h) as f64));
    // The encoder's linear layers as training runs them: the bias in the forward product's epilogue, the
    // bias gradient reduced by the weight-gradient product's (cuBLASLt), rated as the products are.
    for (name, in_f, out_f) in
        [("qkv", h, 3 * h), ("attention output", h, h), ("ffn up", h, i), ("ffn down", i, h)]
    {
        let (x, y) =
            (b16.alloc_kind(n * in_f, Kind::Activation)?, b16.alloc_kind(n * out_f, Kind::Activation)?);
        let (w, b) = (b16.alloc_kind(out_f * in_f, Kind::Param)?, b16.alloc_kind(out_f, Kind::Param)?);
        let (dw, db) = (b16.alloc_kind(out_f * in_f, Kind::Grad)?, b16.alloc_kind(out_f, Kind::Grad)?);
        let flops = 2.0 * (n * in_f * out_f) as f64;
        let ms = time16(20, &mut || b16.linear(y, x, w, b, (n, in_f, out_f), out_f))?;
        out.push(KernelBench::compute(format!("linear + bias bf16, {name} ({n}×{out_f}×{in_f})"), ms, flops));
        let ms = time16(20, &mut || b16.linear_param_grads(dw, db, y, x, (n, in_f, out_f), out_f))?;
        out.push(KernelBench::compute(format!("weight + bias gradient bf16, {name}"), ms, flops));
    }
    let (ya2, ln_w) = (b16.alloc_kind(n * i, Kind::Activation)?, b16.alloc_kind(h, Kind::Param)?);
    let (m16, r16) = (b16.alloc_kind(n, Kind::Stat)?, b16.alloc_kind(n, Kind::Stat)?);
    let ms = time16(50, &mut || b16.gelu_fwd(ya2, ya, Activation::GeluErf))?;
    let mut mem16 =
        |name: &str, bytes: f64, ms: f64| out.push(KernelBench::bandwidth(name, ms, bytes, copy_gbs));
    mem16("gelu_fwd bf16 (4096×3072)", 2.0 * 2.0 * (n * i) as f64, ms);
    let ms = time16(50, &mut || {
        b16.layernorm_fwd(ya2.prefix(n * h), m16, r16, ya.prefix(n * h), ln_w, ln_w, n, h, 1e-12)
    })?;
    mem16("layernorm_fwd bf16 (4096×768)", 2.0 * 2.0 * (n * h) as f64, ms);
    // The fused backwards, rated by the bytes they move.
    let (ya3, dbias) = (b16.alloc_kind(n * i, Kind::Activation)?, b16.alloc_kind(i, Kind::Grad)?);
    let ms = time16(50, &mut || b16.gelu_bias_bwd(ya3, dbias, ya, ya2, n, i, Activation::GeluErf))?;
    // dout and pre read, dpre written (the partial sums are i floats per 64 rows). The unfused pair beside
    // it is rated by the same bytes, so the two rates compare as times do.
    mem16("gelu_bias_bwd bf16 (4096×3072)", 3.0 * 2.0 * (n * i) as f64, ms);
    let ms = time16(50, &mut || {
        b16.gelu_bwd(ya3, ya, ya2, Activation::GeluErf)?;
        b16.bias_grad(dbias, ya3, n, i, i)
    })?;
    mem16("gelu_bwd + bias_grad bf16, unfused (4096×3072)", 3.0 * 2.0 * (n * i) as f64, ms);
    let (dsum, dw, db) = (
        b16.alloc_kind(n * h, Kind::Activation)?,
        b16.alloc_kind(h, Kind::Grad)?,
        b16.alloc_kind(h, Kind::Grad)?,
    );
    let (g, sum) = (ya.prefix(n * h), ya2.prefix(n * h));
    let ms = time16(50, &mut || b16.residual_layernorm_bwd(dsum, dw, db, g, sum, m16, r16, ln_w, n, h, d))?;
    // The weight-gradient pass reads g and sum; the fused pass reads them again and writes dsum and g.
    mem16("residual_layernorm_bwd bf16 (4096×768)", 6.0 * 2.0 * (n * h) as f64, ms);
    let ms = time16(50, &mut || {
        b16.layernorm_bwd(dsum, dw, db, g, sum, m16, r16, ln_w, n, h)?;
        b16.dropout_bwd(g, dsum, d)
    })?;
    mem16("layernorm_bwd + dropout_bwd bf16, unfused (4096×768)", 6.0 * 2.0 * (n * h) as f64, ms);
    Ok(())
}

/// `bertcuda bench allreduce`: NCCL all-reduce of fp32 buffers from 1 MiB to 1 GiB across the ranks the
/// environment describes (torchrun / SLURM / `--nproc-per-node`), as nccl-tests reports it: algorithm
/// bandwidth = bytes / time, bus bandwidth = algorithm bandwidth · 2(n−1)/n. Rows: (bytes, ms, algbw, busbw).
pub fn bench_allreduce(info: &crate::dist::RankInfo) -> Result<Vec<(usize, f64, f64, f64)>> {
    use crate::backend::cuda::{Cuda, NcclComm};
    use crate::backend::Memory;
    use crate::dist::Comm;
    let be = Cuda::new(info.local_rank)?;
    let timeout = std::time::Duration::from_secs(120);
    let id = if info.rank == 0 { Some(NcclComm::unique_id()?) } else { None };
    let id = crate::dist::rendezvous(info, id, timeout)?;
    let driver = be.driver().ok_or_else(|| crate::error::Error::Invalid("NCCL needs a real GPU".into()))?;
    let comm = NcclComm::new(driver, info.rank, info.world, id, timeout)?;
    be.set_sync_timeout(Some(timeout));
    let n = info.world as f64;
    let mut out = Vec::new();
    let mut bytes = 1usize << 20;
    while bytes <= 1 << 30 {
        let buf = be.alloc(bytes / 4)?;
        be.all_reduce_sum(buf, &comm)?;
        be.synchronize()?;
        comm.barrier()?;
        let reps = 10;
        let start = Instant::now();
        for _ in 0..reps {
            be.all_reduce_sum(buf, &comm)?;
        }
        be.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let alg = bytes as f64 / ms / 1e6;
        out.push((bytes, ms, alg, alg * 2.0 * (n - 1.0) / n));
        bytes *= 4;
    }
    Ok(out)
}
