//! The whole model and training on the CUDA backend against the CPU reference, the tensor-core wrappers,
//! and NCCL. The per-op tests live with their op family (`src/ops/<family>.rs`); this file shares their
//! machinery (src/ops/testing.rs): every test body runs twice, as `emu::<name>` on the emulated device (the
//! kernels compiled for the CPU, with the checker of out-of-bounds accesses, uninitialised reads and
//! races) in every `cargo test`, and as `gpu::<name>` on a real GPU, `#[ignore]`d, run on the GPU machine
//! with `cargo test --release --test gpu gpu:: -- --ignored --test-threads=1` (scripts/gpu-check.sh runs
//! these, the op families' GPU tests, the sanitizers and the benchmarks in one go).

#[macro_use]
#[path = "../src/ops/testing.rs"]
mod testing;

use testing::*;

use bertcuda::model::bert::{Bert, Capacity, Inputs, StepOptions, Train};
use bertcuda::model::config::ModelConfig;
use bertcuda::model::params::ParamTable;

/// The repository: the working directory when it is one (the GPU machine runs these from a copy of the
/// tree elsewhere), else where this was built.
fn repo_root() -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap();
    if cwd.join("data/sample/rust-book.txt").is_file() {
        cwd
    } else {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }
}

fn small_model() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny", V).unwrap();
    c.hidden_size = H;
    c.num_attention_heads = NH;
    c.intermediate_size = 80;
    c.max_position_embeddings = 64;
    c.initializer_range = 0.2;
    c
}

struct Batch {
    ids: Vec<u32>,
    types: Vec<u32>,
    mask: Vec<u8>,
    rows: Vec<u32>,
    labels: Vec<i32>,
    nsp: Vec<u32>,
}

fn batch() -> Batch {
    let m = mask();
    let mut r = KeyedRng::new(8, &[2]);
    let ids: Vec<u32> =
        (0..B * T).map(|k| if m[k] == 1 { 5 + r.below(V as u64 - 5) as u32 } else { 0 }).collect();
    let rows: Vec<u32> = (0..(B * T) as u32).filter(|&k| m[k as usize] == 1 && r.bernoulli(0.2)).collect();
    let mut labels: Vec<i32> = rows.iter().map(|&k| ids[k as usize] as i32).collect();
    labels[1] = IGNORE_INDEX;
    Batch {
        types: (0..B * T).map(|k| ((k % T) >= 10 && m[k] == 1) as u32).collect(),
        mask: m.iter().map(|&x| x as u8).collect(),
        ids,
        rows,
        labels,
        nsp: vec![0, 1, 1],
    }
}

fn inputs(b: &Batch) -> Inputs<'_> {
    Inputs {
        batch: B,
        seq: T,
        input_ids: &b.ids,
        token_type_ids: &b.types,
        attention_mask: &b.mask,
        head_rows: &b.rows,
        head_labels: Some(&b.labels),
        nsp_labels: Some(&b.nsp),
    }
}

/// Losses and every gradient of the small model on a backend.
fn model_grads<Bk: Backend>(be: &Bk, train: Option<Train>) -> (f64, Vec<f32>) {
    let c = small_model();
    let mut plan = Capacity::new(B, T);
    plan.logit_rows = 7;
    let m = Bert::new(be, c.clone(), plan).unwrap();
    m.set_params(&ParamTable::new(&c).init(&c, 11)).unwrap();
    m.zero_grads().unwrap();
    let b = batch();
    let l = m.step(&inputs(&b), StepOptions { train, ..StepOptions::grads() }).unwrap();
    (l.total().unwrap(), be.download(m.grads).unwrap())
}

/// The largest difference in one parameter's gradient (`len` values at `off`), relative to its largest
/// CPU value, or to `floor` times the model's largest gradient when that is more: the exact gradient of
/// the key biases is zero (softmax does not change when every score of a row moves by one amount), so
/// theirs is rounding noise of both backends.
fn tensor_error(cpu: &[f32], dev: &[f32], off: usize, len: usize, floor: f32) -> f32 {
    let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (a, b) = (&cpu[off..off + len], &dev[off..off + len]);
    let scale = largest(a).max(floor * largest(cpu)).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn whole_model_loss_and_every_gradient_equal_the_cpu() {
    let table = ParamTable::new(&small_model());
    for train in [None, Some(Train { seed: 1, step: 3 })] {
        let (lc, gc) = model_grads(&Cpu::<f32>::new(), train);
        let (lg, gg) = model_grads(&gpu(), train);
        assert!((lc - lg).abs() < 1e-5 * lc.abs(), "loss cpu {lc} gpu {lg}");
        for p in &table.params {
            let err = tensor_error(&gc, &gg, p.offset, p.len, 1e-3);
            // fp32 with different summation orders: 1e-4 of the tensor's largest gradient.
            assert!(err < 1e-4, "{} (train={}): relative error {err:e}", p.name, train.is_some());
        }
    }
}

fn bf16_activations_track_the_fp32_cpu_model() {
    let table = ParamTable::new(&small_model());
    let (lc, gc) = model_grads(&Cpu::<f32>::new(), None);
    let be = gpu();
    assert_eq!(be.set_precision("bf16").unwrap(), "bf16");
    let (lg, gg) = model_grads(&be, None);
    // bf16 activations (8 bits of mantissa): the loss within 1%, each gradient tensor within 10% of its
    // largest element.
    assert!((lc - lg).abs() < 1e-2 * lc.abs(), "loss cpu {lc} gpu bf16 {lg}");
    for p in &table.params {
        // bf16 stores dq, dk, dv rounded: the key biases' zero gradient is noise of 1% of the largest.
        let err = tensor_error(&gc, &gg, p.offset, p.len, 1e-2);
        assert!(err < 0.1, "{}: relative error {err:e}", p.name);
    }
}

fn the_gpu_loss_has_the_gradient_the_gpu_backward_computes() {
    // Central differences of the GPU loss along the GPU gradient, fp32: d/dε L(θ + ε·g) at 0 = |g|².
    let c = small_model();
    let be = gpu();
    let m = Bert::new(&be, c.clone(), Capacity::new(B, T)).unwrap();
    let p0 = ParamTable::new(&c).init(&c, 11);
    m.set_params(&p0).unwrap();
    m.zero_grads().unwrap();
    let b = batch();
    m.step(&inputs(&b), StepOptions::grads()).unwrap();
    let g = be.download(m.grads).unwrap();
    let g2: f64 = g.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    let eps = 1e-3 / g2.sqrt();
    let at = |s: f64| {
        let p: Vec<f32> = p0.iter().zip(&g).map(|(p, g)| p + (s * *g as f64) as f32).collect();
        m.set_params(&p).unwrap();
        m.step(&inputs(&b), StepOptions::eval()).unwrap().total().unwrap()
    };
    let fd = (at(eps) - at(-eps)) / (2.0 * eps);
    assert!((fd - g2).abs() < 2e-2 * g2, "finite difference {fd} vs |g|² {g2}");
}

fn the_same_seed_gives_bitwise_equal_gpu_losses_and_gradients() {
    let t = Some(Train { seed: 4, step: 1 });
    let (l1, g1) = model_grads(&gpu(), t);
    let (l2, g2) = model_grads(&gpu(), t);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
}

fn training_on_the_gpu_tracks_the_cpu() {
    use bertcuda::backend::choice::parse;
    use bertcuda::train::{train, TrainConfig};
    use std::sync::{atomic::AtomicBool, Arc};
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/sample/rust-book.txt")).unwrap();
    let tok = bertcuda::data::tokenizer::BertTokenizer::train(text.lines(), 2000, 2, true).unwrap();
    tok.save_hf(&tmp.path().join("tok")).unwrap();
    bertcuda::data::prepare::prepare(&bertcuda::data::prepare::PrepareConfig::new(
        vec![root.join("data/sample")],
        tmp.path().join("tok"),
        tmp.path().join("shards"),
    ))
    .unwrap();
    // The emulated device runs the kernels on the CPU: a shorter run, fp32 only.
    let (steps, batch, seq, precisions): (usize, usize, usize, &[(&str, f64)]) = if emulated() {
        (40, 8, 64, &[("fp32", 0.02)])
    } else {
        (200, 16, 128, &[("fp32", 0.02), ("bf16", 0.05), ("fp16", 0.05)])
    };
    let run = |device: &str, precision: &str| {
        let cfg = TrainConfig {
            data: vec![tmp.path().join("shards")],
            output: tmp.path().join(format!("{device}-{precision}")),
            model_config: "tiny".into(),
            device: parse(device).unwrap(),
            precision: parse(precision).unwrap(),
            per_device_batch_size: batch,
            max_seq_len: seq,
            learning_rate: 1e-3,
            warmup_steps: Some(20),
            max_steps: Some(steps as u64),
            save_steps: 1000,
            logging_steps: 10,
            progress: false,
            ..TrainConfig::default()
        };
        train(cfg, Arc::new(AtomicBool::new(false))).unwrap().losses
    };
    let c = run("cpu", "fp32");
    // Means over windows of 20 steps agree within 2% in fp32 (rounding grows over 200 updates), within 5%
    // with bf16 or fp16 tensor-core matrix products.
    for &(precision, tol) in precisions {
        let g = run(device_name(), precision);
        for w in (0..steps).step_by(20) {
            let (mc, mg) = (c[w..w + 20].iter().sum::<f64>() / 20.0, g[w..w + 20].iter().sum::<f64>() / 20.0);
            assert!((mc - mg).abs() < tol * mc, "{precision}, steps {w}..{}: cpu {mc} gpu {mg}", w + 20);
        }
    }
}

/// LAMB and a phase switch (the model rebuilt for longer sequences, the old activations released on the
/// device) in a training run: the losses the CPU computes, step by step.
fn lamb_and_a_phase_switch_track_the_cpu() {
    use bertcuda::backend::choice::{parse, Precision};
    use bertcuda::optim::{OptimizerKind, Schedule};
    use bertcuda::train::{train, PhaseConfig, TrainConfig};
    use std::sync::{atomic::AtomicBool, Arc};
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/sample/rust-book.txt")).unwrap();
    let part: String = text.lines().take(1500).map(|l| format!("{l}\n")).collect();
    std::fs::write(tmp.path().join("part.txt"), &part).unwrap();
    let tok = bertcuda::data::tokenizer::BertTokenizer::train(part.lines(), 500, 2, true).unwrap();
    tok.save_hf(&tmp.path().join("tok")).unwrap();
    bertcuda::data::prepare::prepare(&bertcuda::data::prepare::PrepareConfig::new(
        vec![tmp.path().join("part.txt")],
        tmp.path().join("tok"),
        tmp.path().join("shards"),
    ))
    .unwrap();
    let run = |device: &str| {
        let cfg = TrainConfig {
            data: vec![tmp.path().join("shards")],
            output: tmp.path().join(device),
            model_config: "tiny".into(),
            device: parse(device).unwrap(),
            precision: Precision::Fp32,
            optim: OptimizerKind::Lamb,
            lr_scheduler: Schedule::PolyWarmup,
            lr_power: 0.5,
            warmup_ratio: Some(0.34),
            learning_rate: 2e-3,
            per_device_batch_size: 4,
            max_seq_len: 32,
            phases: vec![
                PhaseConfig { max_steps: 3, ..PhaseConfig::default() },
                PhaseConfig {
                    max_steps: 3,
                    max_seq_len: Some(64),
                    per_device_batch_size: Some(2),
                    learning_rate: Some(1e-3),
                    ..PhaseConfig::default()
                },
            ],
            save_steps: 1000,
            logging_steps: 1,
            progress: false,
            ..TrainConfig::default()
        };
        train(cfg, Arc::new(AtomicBool::new(false))).unwrap().losses
    };
    let (c, g) = (run("cpu"), run(device_name()));
    assert_eq!((c.len(), g.len()), (6, 6));
    for (k, (a, b)) in c.iter().zip(&g).enumerate() {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "step {k}: cpu {a} vs device {b}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (and libnccl.so)"]
fn nccl_with_world_size_one_through_the_whole_training_path() {
    use bertcuda::backend::choice::Device;
    use bertcuda::dist::RankInfo;
    use bertcuda::train::{train_distributed, TrainConfig};
    use std::sync::{atomic::AtomicBool, Arc};
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/sample/rust-book.txt")).unwrap();
    let tok =
        bertcuda::data::tokenizer::BertTokenizer::train(text.lines().take(2000), 1000, 2, true).unwrap();
    tok.save_hf(&tmp.path().join("tok")).unwrap();
    bertcuda::data::prepare::prepare(&bertcuda::data::prepare::PrepareConfig::new(
        vec![root.join("data/sample")],
        tmp.path().join("tok"),
        tmp.path().join("shards"),
    ))
    .unwrap();
    let cfg = TrainConfig {
        data: vec![tmp.path().join("shards")],
        output: tmp.path().join("out"),
        model_config: "tiny".into(),
        device: Device::Cuda,
        per_device_batch_size: 8,
        max_steps: Some(5),
        save_steps: 5,
        progress: false,
        ..TrainConfig::default()
    };
    let info = RankInfo {
        rank: 0,
        world: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: bertcuda::dist::free_port().unwrap(),
    };
    let s = train_distributed(cfg, Arc::new(AtomicBool::new(false)), info).unwrap();
    assert_eq!(s.steps, 5);
    assert!(s.losses.iter().all(|l| l.is_finite()));
}

/// After a run's first step the device allocates nothing and the host waits for no step, only for the
/// read back of the records at the log; what the steps cost the host (waits, uploads, downloads) is
/// counted: bf16 (the tensor-core attention at head size 64), a few steps.
fn no_device_allocation_after_the_first_step() {
    use bertcuda::backend::choice::{parse, Precision};
    use bertcuda::train::{train, TrainConfig};
    use std::sync::{atomic::AtomicBool, Arc};
    let tmp = tempfile::tempdir().unwrap();
    testing::common::sample_shards(tmp.path(), 600, 400);
    let cfg = TrainConfig {
        data: vec![tmp.path().join("shards")],
        output: tmp.path().join("out"),
        model_config: "tiny".into(),
        device: parse(device_name()).unwrap(),
        precision: Precision::Bf16,
        per_device_batch_size: 4,
        max_seq_len: 32,
        max_steps: Some(4),
        save_steps: 1000,
        logging_steps: 1000,
        progress: false,
        ..TrainConfig::default()
    };
    let s = train(cfg, Arc::new(AtomicBool::new(false))).unwrap();
    let (t, steps) = s.traffic.expect("a device counts its traffic");
    assert_eq!(steps, 3);
    assert_eq!(t.allocations, 0, "device allocations after the first step: {t:?}");
    assert!(t.uploads >= steps, "each step uploads its batch: {t:?}");
    // The steps wait for nothing: the host reads the steps' records back once, for the log of the last
    // step (two copies back).
    assert_eq!((t.synchronisations, t.downloads), (2, 2), "the host waited inside the steps: {t:?}");
}

on_both_devices!(
    no_device_allocation_after_the_first_step,
    whole_model_loss_and_every_gradient_equal_the_cpu,
    bf16_activations_track_the_fp32_cpu_model,
    the_gpu_loss_has_the_gradient_the_gpu_backward_computes,
    the_same_seed_gives_bitwise_equal_gpu_losses_and_gradients,
    training_on_the_gpu_tracks_the_cpu,
    lamb_and_a_phase_switch_track_the_cpu,
    tensor_core_wrappers_follow_the_ptx_fragment_layouts,
);

/// The tensor-core wrappers of kernels/mma.cuh (mma.sync m16n8k16 bf16, ldmatrix x4, cp.async) on one tile
/// against a product in f64: on the emulated device this checks the kernel against the PTX fragment layouts
/// as the emulator implements them; on a GPU, the emulator's layouts against the hardware's.
fn tensor_core_wrappers_follow_the_ptx_fragment_layouts() {
    let be = gpu();
    let dev = be.device();
    let bf = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>();
    let (a, bt, c) = (bf(&randn(40, 16 * 16, 1.0)), bf(&randn(41, 8 * 16, 1.0)), randn(42, 16 * 8, 1.0));
    let up = |bytes: &[u8]| {
        let m = dev.alloc(bytes.len(), false).unwrap();
        dev.htod(m.ptr, bytes).unwrap();
        m
    };
    let (ma, mb, mc) =
        (up(bytemuck::cast_slice(&a)), up(bytemuck::cast_slice(&bt)), up(bytemuck::cast_slice(&c)));
    let md = dev.alloc(4 * 16 * 8, false).unwrap();
    let k = dev.kernel("mma_tile_check").unwrap();
    for via_ldmatrix in [0i32, 1] {
        dev.memset_zero(md.ptr, 4 * 16 * 8).unwrap();
        let launch = bertcuda::backend::device::Launch::new((1, 1, 1), 32);
        dev.launch(k, launch, &[&md.ptr, &ma.ptr, &mb.ptr, &mc.ptr, &via_ldmatrix]).unwrap();
        let mut d = vec![0f32; 16 * 8];
        dev.dtoh(bytemuck::cast_slice_mut(&mut d), md.ptr).unwrap();
        for i in 0..16 {
            for j in 0..8 {
                let terms: Vec<f64> =
                    (0..16).map(|k| a[i * 16 + k].to_f64() * bt[j * 16 + k].to_f64()).collect();
                let want = c[i * 8 + j] as f64 + terms.iter().sum::<f64>();
                let scale = c[i * 8 + j].abs() as f64 + terms.iter().map(|x| x.abs()).sum::<f64>();
                let got = d[i * 8 + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * scale,
                    "ldmatrix={via_ldmatrix} D[{i}][{j}]: {got} vs {want}"
                );
            }
        }
    }
}
