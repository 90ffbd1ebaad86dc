//! The training loop: optimizer math against torch, learning, exact resume, checkpoints that survive kills
//! and corruption, non-finite steps, signals, metrics and TensorBoard files, evaluation, and bad input.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bertcuda::backend::choice::{Device, Precision};
use bertcuda::backend::cpu::Cpu;
use bertcuda::backend::{Buf, ControlStep, Memory, Optim, StepControl};
use bertcuda::checkpoint;
use bertcuda::data::loader::{open_corpus, EpochPlan, LoaderConfig};
use bertcuda::data::prepare::{prepare, PrepareConfig};
use bertcuda::model::bert::{Bert, Capacity, Inputs, StepOptions};
use bertcuda::model::config::ModelConfig;
use bertcuda::model::params::{ParamInfo, ParamTable};
use bertcuda::optim::{
    lr_lambda, lr_multiplier, AdamW, AdamWConfig, ControlCounters, Lamb, LambConfig, LossScaler, Optimizer,
    OptimizerKind, Polynomial, Schedule,
};
use bertcuda::train::{train, StepMetrics, TrainConfig};

mod common;
use common::root;

/// Shards of the first part of the sample corpus with a 600-token vocabulary, and a small model config
/// for them; made once for all tests.
struct Fixture {
    _dir: tempfile::TempDir,
    shards: PathBuf,
    model_config: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tok = common::sample_shards(dir.path(), 1500, 600);
        let shards = dir.path().join("shards");
        let model_config = dir.path().join("config.json");
        common::small_model(tok.vocab_size, 32, 2, 64, 64).save(&model_config).unwrap();
        Fixture { _dir: dir, shards, model_config }
    })
}

fn base_config(output: &Path) -> TrainConfig {
    let f = fixture();
    TrainConfig {
        data: vec![f.shards.clone()],
        output: output.to_path_buf(),
        model_config: f.model_config.to_str().unwrap().into(),
        per_device_batch_size: 8,
        max_seq_len: 32,
        learning_rate: 2e-3,
        warmup_steps: Some(2),
        max_steps: Some(12),
        logging_steps: 1,
        save_steps: 4,
        save_total_limit: 3,
        progress: false,
        ..TrainConfig::default()
    }
}

fn never() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

fn metrics(out: &Path) -> Vec<StepMetrics> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `opt`'s steps as training makes them, on the CPU: per step of torch's fixture, its gradients, Σg², the
/// step control (clipping at `max_norm`) and the update at `lrs`; the gradient norm and the parameters
/// after each step held to torch's. How many steps were clipped.
fn torch_steps(
    be: &Cpu<f32>,
    opt: &Optimizer,
    p: Buf,
    steps: &[serde_json::Value],
    lrs: &[f64],
    max_norm: f64,
    what: &str,
) -> usize {
    let mut control = StepControl::new(be).unwrap();
    control.set_schedule(be, &opt.schedule_rows(lrs.iter().copied())).unwrap();
    control.start(be, &ControlCounters { updates: 0, scale: 1.0, good_steps: 0 }).unwrap();
    let g = be.alloc(p.len).unwrap();
    let mut clipped = 0;
    for (k, step) in steps.iter().enumerate() {
        let grads: Vec<Vec<f32>> = serde_json::from_value(step["grads"].clone()).unwrap();
        be.upload(g, &grads.concat()).unwrap();
        let h = ControlStep { max_grad_norm: max_norm, growth_interval: 0, slot: k };
        opt.step(be, p, g, &control, &h).unwrap();
        let (records, counters) = control.read(be, k + 1).unwrap();
        let norm = records[k].squares.sqrt();
        assert!(
            (norm - step["grad_norm"].as_f64().unwrap()).abs() < 1e-5 * norm,
            "{what}: grad norm at step {k}"
        );
        assert!(records[k].applied && counters.updates == k as u64 + 1, "{what}: step {k} applied");
        clipped += (norm > max_norm) as usize;
        let want: Vec<Vec<f32>> = serde_json::from_value(step["params"].clone()).unwrap();
        for (j, (got, want)) in be.download(p).unwrap().iter().zip(want.concat()).enumerate() {
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{what} step {k} [{j}]: {got} vs {want}"
            );
        }
    }
    clipped
}

#[test]
fn adamw_clipping_schedules_and_scaler_equal_torch() {
    let e: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("tests/fixtures/optim/expected.json")).unwrap())
            .unwrap();
    let a = &e["adamw"];
    let init: Vec<Vec<f32>> = serde_json::from_value(a["init"].clone()).unwrap();
    let params: Vec<f32> = init.concat();
    let be = Cpu::<f32>::new();
    let p = be.alloc(9).unwrap();
    be.upload(p, &params).unwrap();
    let opt = Optimizer::AdamW(
        AdamW::new(
            &be,
            AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01 },
            &common::flat_tensors(&[(6, true), (3, false)]),
        )
        .unwrap(),
    );
    let steps = a["steps"].as_array().unwrap();
    let lrs: Vec<f64> =
        (0..steps.len()).map(|k| 1e-2 * lr_lambda(Schedule::Linear, k as u64, 2, 8)).collect();
    for (k, step) in steps.iter().enumerate() {
        assert!((lrs[k] - step["lr"].as_f64().unwrap()).abs() < 1e-12, "lr at step {k}");
    }
    // Clipped at 1.0 as clip_grad_norm_, inside the update.
    torch_steps(&be, &opt, p, steps, &lrs, 1.0, "adamw");
    let s = &e["schedules"];
    let (w, t) = (s["warmup"].as_u64().unwrap(), s["total"].as_u64().unwrap());
    for (name, kind) in [
        ("linear", Schedule::Linear),
        ("cosine", Schedule::Cosine),
        ("constant", Schedule::Constant),
        ("constant_with_warmup", Schedule::ConstantWithWarmup),
    ] {
        for (k, want) in s["lambdas"][name].as_array().unwrap().iter().enumerate() {
            let got = lr_lambda(kind, k as u64, w, t);
            assert!((got - want.as_f64().unwrap()).abs() < 1e-9, "{name} at {k}: {got} vs {want}");
        }
    }
    let sc = &e["scaler"];
    let mut scaler = LossScaler::new(true);
    scaler.growth_interval = sc["growth_interval"].as_u64().unwrap();
    // The host's scaler (which replays the steps' records) and the step control's, on the backend.
    let mut control = StepControl::new(&be).unwrap();
    control.set_schedule(&be, &opt.schedule_rows(std::iter::repeat_n(1e-3, 64))).unwrap();
    control.start(&be, &ControlCounters { updates: 0, scale: scaler.scale, good_steps: 0 }).unwrap();
    let found = sc["found_inf"].as_array().unwrap();
    for (k, (f, want)) in found.iter().zip(sc["scales"].as_array().unwrap()).enumerate() {
        let found_inf = f.as_bool().unwrap();
        let applied = scaler.update(!found_inf);
        assert_eq!(applied, !found_inf);
        assert_eq!(scaler.scale, want.as_f64().unwrap());
        be.upload(control.squares(), &[if found_inf { f32::INFINITY } else { 1.0 }]).unwrap();
        let h = ControlStep { max_grad_norm: 0.0, growth_interval: scaler.growth_interval, slot: k };
        be.step_control(&control, &h).unwrap();
        let (records, counters) = control.read(&be, k + 1).unwrap();
        assert_eq!(
            (records[k].applied, counters.scale),
            (!found_inf, scaler.scale),
            "the device's scaler at {k}"
        );
    }
}

#[test]
fn lamb_and_the_polynomial_schedule_equal_the_torch_reference() {
    let e: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("tests/fixtures/optim/expected.json")).unwrap())
            .unwrap();
    // transformers' polynomial decay (power 0.5, lr_end 1e-7) with warmup, past its end too.
    let p = &e["polynomial"];
    let (w, t, peak) =
        (p["warmup"].as_u64().unwrap(), p["total"].as_u64().unwrap(), p["lr"].as_f64().unwrap());
    let poly = Polynomial::for_peak(p["power"].as_f64().unwrap(), peak);
    for (k, want) in p["rates"].as_array().unwrap().iter().enumerate() {
        let got = peak * lr_multiplier(Schedule::Polynomial, k as u64, w, t, poly);
        assert!((got - want.as_f64().unwrap()).abs() <= 1e-12, "polynomial at {k}: {got} vs {want}");
    }

    // NVIDIA's PolyWarmUpScheduler as their BERT steps it (warmup given as a fraction).
    let n = &e["poly_warmup"];
    let poly = Polynomial {
        power: n["power"].as_f64().unwrap(),
        end_fraction: 0.0,
        warmup_fraction: Some(n["warmup_fraction"].as_f64().unwrap()),
    };
    let t = n["total"].as_u64().unwrap();
    for (k, want) in n["lambdas"].as_array().unwrap().iter().enumerate() {
        let got = lr_multiplier(Schedule::PolyWarmup, k as u64, 0, t, poly);
        assert!((got - want.as_f64().unwrap()).abs() <= 1e-12, "poly_warmup at {k}: {got} vs {want}");
    }

    // LAMB: decayed tensors, a bias, a decayed tensor at zero (norm 0: ratio 1), a clipped step.
    let l = &e["lamb"];
    let init: Vec<Vec<f32>> = serde_json::from_value(l["init"].clone()).unwrap();
    let decay: Vec<bool> = serde_json::from_value(l["decay"].clone()).unwrap();
    let mut offset = 0;
    let tensors: Vec<ParamInfo> = init
        .iter()
        .zip(&decay)
        .enumerate()
        .map(|(k, (v, &d))| {
            let p = ParamInfo {
                name: format!("t{k}"),
                shape: vec![v.len()],
                offset,
                len: v.len(),
                init: bertcuda::model::params::Init::Zeros,
                decay: d,
            };
            offset += v.len();
            p
        })
        .collect();
    let (lw, lt) = (l["warmup"].as_u64().unwrap(), l["total"].as_u64().unwrap());
    let lpoly = Polynomial::for_peak(l["power"].as_f64().unwrap(), l["lr"].as_f64().unwrap());
    for (key, all_tensors) in [("steps", false), ("steps_all_tensors", true)] {
        let be = Cpu::<f32>::new();
        let p = be.alloc(offset).unwrap();
        be.upload(p, &init.concat()).unwrap();
        let config = LambConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: l["weight_decay"].as_f64().unwrap(),
            all_tensors,
        };
        let lamb = Optimizer::Lamb(Lamb::new(&be, config, &tensors).unwrap());
        let steps = l[key].as_array().unwrap();
        let lrs: Vec<f64> = (0..steps.len())
            .map(|k| l["lr"].as_f64().unwrap() * lr_multiplier(Schedule::Polynomial, k as u64, lw, lt, lpoly))
            .collect();
        for (k, step) in steps.iter().enumerate() {
            assert!((lrs[k] - step["lr"].as_f64().unwrap()).abs() < 1e-12, "lr at step {k}");
        }
        let max_norm = l["max_grad_norm"].as_f64().unwrap();
        let clipped = torch_steps(&be, &lamb, p, steps, &lrs, max_norm, key);
        assert!(clipped > 0, "the fixture has a clipped step");
    }
}

#[test]
fn the_tiny_model_overfits_fixed_batches() {
    let f = fixture();
    let corpus = open_corpus(std::slice::from_ref(&f.shards)).unwrap();
    let config = ModelConfig::load(&f.model_config).unwrap();
    let cfg = LoaderConfig {
        examples: bertcuda::data::examples::ExampleConfig { max_seq_len: 32, ..Default::default() },
        batch_size: 4,
        rank: 0,
        world_size: 1,
        pad_to_max: false,
        drop_last: true,
    };
    let plan = EpochPlan::new(&corpus, &cfg, 0).unwrap();
    let batches = [plan.batch(&corpus, &cfg, 0), plan.batch(&corpus, &cfg, 1)];
    let be = Cpu::<f32>::new();
    let model = Bert::new(&be, config.clone(), Capacity::new(4, 32)).unwrap();
    let table = ParamTable::new(&config);
    model.set_params(&table.init(&config, 0)).unwrap();
    let opt = Optimizer::AdamW(
        AdamW::new(
            &be,
            AdamWConfig { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.0 },
            &table.params,
        )
        .unwrap(),
    );
    let mut control = StepControl::new(&be).unwrap();
    control.set_schedule(&be, &opt.schedule_rows(std::iter::repeat_n(3e-3, 300))).unwrap();
    control.start(&be, &ControlCounters { updates: 0, scale: 1.0, good_steps: 0 }).unwrap();
    let mut labels = Vec::new();
    let mut last = f64::MAX;
    let mut first = 0.0;
    for step in 0..300 {
        let b = &batches[step % 2];
        model.zero_grads().unwrap();
        let l = model.step(&Inputs::from_batch(b, &mut labels), StepOptions::grads()).unwrap();
        let h = ControlStep { max_grad_norm: 0.0, growth_interval: 0, slot: step };
        opt.step(&be, model.params, model.grads, &control, &h).unwrap();
        if step == 0 {
            first = l.total().unwrap();
        }
        last = l.total().unwrap();
    }
    assert!(first > 5.0 && last < 0.05, "loss {first} → {last}");
}

#[test]
fn training_lowers_the_loss_and_writes_what_it_promises() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = TrainConfig { max_steps: Some(40), save_steps: 20, ..base_config(&out) };
    let s = train(cfg, never()).unwrap();
    assert_eq!(s.steps, 40);
    let first: f64 = s.losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = s.losses[35..].iter().sum::<f64>() / 5.0;
    assert!(last < first - 0.5, "loss {first} → {last}");
    let m = metrics(&out);
    assert_eq!(m.len(), 40);
    assert!(m
        .iter()
        .all(|x| x.mlm_loss.is_some() && x.nsp_loss.is_some() && x.seq_per_s > 0.0 && x.grad_norm > 0.0));
    assert_eq!(m[0].learning_rate, 0.0, "the first update of a warmup has rate 0, as transformers");
    assert!((m[2].learning_rate - 2e-3).abs() < 1e-12);
    // Final model in OUTPUT/, checkpoints at 20 and 40.
    for f in [
        "model.safetensors",
        "config.json",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let ckpts: Vec<u64> = checkpoint::list(&out).into_iter().map(|c| c.0).collect();
    assert_eq!(ckpts, [40, 20]);
    let state = checkpoint::verify(&out.join("checkpoint-000040")).unwrap();
    assert_eq!((state.global_step, state.updates, state.micro_step), (40, 40, 40));
    // TensorBoard: one file, every record's CRCs good, the first the file version.
    let tb: Vec<PathBuf> = fs::read_dir(out.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(tb.len(), 1);
    assert!(tb[0].file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let records = bertcuda::tensorboard::read_records(&fs::read(&tb[0]).unwrap()).unwrap();
    assert_eq!(records.len(), 41);
    assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
    assert!(records[1].windows(10).any(|w| w == b"train/loss"));
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let big = TrainConfig {
        per_device_batch_size: 8,
        max_steps: Some(3),
        pad_to_max: true,
        ..base_config(&tmp.path().join("a"))
    };
    let acc = TrainConfig { per_device_batch_size: 4, gradient_accumulation_steps: 2, ..big.clone() };
    let acc = TrainConfig { output: tmp.path().join("b"), ..acc };
    // The same examples in the same order: batch k of 8 = batches 2k, 2k+1 of 4; dropout keys differ
    // per micro-step, so compare with dropout off.
    let mut c = ModelConfig::load(&fixture().model_config).unwrap();
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    let nodrop = tmp.path().join("nodrop.json");
    c.save(&nodrop).unwrap();
    let big = TrainConfig { model_config: nodrop.to_str().unwrap().into(), ..big };
    let acc = TrainConfig { model_config: nodrop.to_str().unwrap().into(), ..acc };
    let a = train(big, never()).unwrap();
    let b = train(acc, never()).unwrap();
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 1e-5 * x.abs(), "{:?} vs {:?}", a.losses, b.losses);
    }
    let pa = fs::read(tmp.path().join("a/model.safetensors")).unwrap();
    let pb = fs::read(tmp.path().join("b/model.safetensors")).unwrap();
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&pa).unwrap(),
        safetensors::SafeTensors::deserialize(&pb).unwrap(),
    );
    for (name, t) in ta.tensors() {
        let (x, y) = (t.data(), tb.tensor(&name).unwrap().data());
        let max = x.chunks(4).zip(y.chunks(4)).map(|(a, b)| {
            let (a, b) =
                (f32::from_le_bytes(a.try_into().unwrap()), f32::from_le_bytes(b.try_into().unwrap()));
            (a - b).abs()
        });
        assert!(max.fold(0f32, f32::max) < 1e-5, "{name}");
    }
}

#[test]
fn a_resumed_run_is_bitwise_the_run_that_never_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut finals = Vec::new();
    // AdamW with the linear schedule; LAMB with the polynomial one (NVIDIA's BERT recipe).
    for (optim, schedule) in
        [(OptimizerKind::AdamW, Schedule::Linear), (OptimizerKind::Lamb, Schedule::Polynomial)]
    {
        let config =
            |out: &Path| TrainConfig { optim, lr_scheduler: schedule, lr_power: 0.5, ..base_config(out) };
        let a_out = tmp.path().join(format!("{optim:?}-a"));
        train(config(&a_out), never()).unwrap();
        // B: a copy of A as it was after step 8 (its checkpoint 8 only), resumed.
        let b_out = tmp.path().join(format!("{optim:?}-b"));
        fs::create_dir_all(&b_out).unwrap();
        copy_dir(&a_out.join("checkpoint-000008"), &b_out.join("checkpoint-000008"));
        let lines: Vec<String> =
            fs::read_to_string(a_out.join("metrics.jsonl")).unwrap().lines().map(String::from).collect();
        fs::write(b_out.join("metrics.jsonl"), lines[..8].join("\n") + "\n").unwrap();
        let cfg = TrainConfig { resume: Some("auto".into()), ..config(&b_out) };
        let s = train(cfg, never()).unwrap();
        assert_eq!(s.steps, 12);
        assert_eq!(
            fs::read(a_out.join("model.safetensors")).unwrap(),
            fs::read(b_out.join("model.safetensors")).unwrap(),
            "{optim:?}"
        );
        let (ma, mb) = (metrics(&a_out), metrics(&b_out));
        for (x, y) in ma[8..].iter().zip(&mb[8..]) {
            assert_eq!(
                (x.step, x.loss.to_bits(), x.grad_norm.to_bits()),
                (y.step, y.loss.to_bits(), y.grad_norm.to_bits())
            );
        }
        assert_eq!(
            fs::read(a_out.join("checkpoint-000012/optimizer.safetensors")).unwrap(),
            fs::read(b_out.join("checkpoint-000012/optimizer.safetensors")).unwrap()
        );
        assert!(ma.iter().all(|m| m.loss.is_finite()), "{optim:?}");
        finals.push(fs::read(a_out.join("model.safetensors")).unwrap());
    }
    assert_ne!(finals[0], finals[1], "--optim lamb trained the same weights as adamw");
}

#[test]
fn two_phases_switch_length_and_batch_and_resume_exactly_anywhere() {
    use bertcuda::train::PhaseConfig;
    let tmp = tempfile::tempdir().unwrap();
    // Phase 1: 6 steps of ≤32 tokens, batch 8; phase 2: 6 steps of ≤64 tokens, batch 4 × 2, its own
    // warmup and peak rate; LAMB with the polynomial schedule, as NVIDIA's recipe.
    let config = |out: &Path| TrainConfig {
        optim: OptimizerKind::Lamb,
        lr_scheduler: Schedule::Polynomial,
        lr_power: 0.5,
        max_steps: None,
        save_steps: 2,
        save_total_limit: 10,
        phases: vec![
            PhaseConfig { max_steps: 6, ..PhaseConfig::default() },
            PhaseConfig {
                max_steps: 6,
                max_seq_len: Some(64),
                per_device_batch_size: Some(4),
                gradient_accumulation_steps: Some(2),
                learning_rate: Some(1e-3),
                warmup_steps: Some(1),
                ..PhaseConfig::default()
            },
        ],
        ..base_config(out)
    };
    let a_out = tmp.path().join("a");
    let s = train(config(&a_out), never()).unwrap();
    assert_eq!(s.steps, 12);
    let ma = metrics(&a_out);
    assert_eq!(ma.len(), 12);
    for m in &ma {
        let (phase, longest) = (m.phase.unwrap(), m.longest_sequence.unwrap());
        assert_eq!(phase, if m.step <= 6 { 1 } else { 2 }, "step {}", m.step);
        if phase == 1 {
            assert!(longest <= 32, "step {}: {longest}", m.step);
        } else {
            assert!(longest > 32 && longest <= 64, "step {}: {longest}", m.step);
        }
    }
    // Each phase warms up from 0 to its own peak: the first step of phase 2 runs at lr 0.
    assert_eq!(ma[6].learning_rate, 0.0);
    assert!((ma[7].learning_rate - 1e-3).abs() < 1e-12, "{}", ma[7].learning_rate);

    // Resumed mid-phase-1, at the switch and mid-phase-2: bitwise the run that never stopped.
    let lines: Vec<String> =
        fs::read_to_string(a_out.join("metrics.jsonl")).unwrap().lines().map(String::from).collect();
    for at in [4u64, 6, 10] {
        let b_out = tmp.path().join(format!("b{at}"));
        fs::create_dir_all(&b_out).unwrap();
        let ckpt = format!("checkpoint-{at:06}");
        copy_dir(&a_out.join(&ckpt), &b_out.join(&ckpt));
        fs::write(b_out.join("metrics.jsonl"), lines[..at as usize].join("\n") + "\n").unwrap();
        let s = train(TrainConfig { resume: Some("auto".into()), ..config(&b_out) }, never()).unwrap();
        assert_eq!(s.steps, 12);
        assert_eq!(
            fs::read(a_out.join("model.safetensors")).unwrap(),
            fs::read(b_out.join("model.safetensors")).unwrap(),
            "resumed at step {at}"
        );
        for (x, y) in ma.iter().zip(&metrics(&b_out)).skip(at as usize) {
            assert_eq!(
                (x.step, x.loss.to_bits(), x.learning_rate.to_bits()),
                (y.step, y.loss.to_bits(), y.learning_rate.to_bits())
            );
        }
    }

    // The flags for the two-phase case make the same run.
    let c_out = tmp.path().join("c");
    let flags = TrainConfig {
        phases: vec![],
        max_steps: Some(6),
        phase2_steps: Some(6),
        phase2_max_seq_len: Some(64),
        phase2_per_device_batch_size: Some(4),
        phase2_gradient_accumulation_steps: Some(2),
        phase2_learning_rate: Some(1e-3),
        phase2_warmup_steps: Some(1),
        ..config(&c_out)
    };
    train(flags, never()).unwrap();
    assert_eq!(
        fs::read(a_out.join("model.safetensors")).unwrap(),
        fs::read(c_out.join("model.safetensors")).unwrap()
    );

    // Impossible phase settings are refused before anything runs.
    let e =
        train(TrainConfig { phase2_max_seq_len: Some(64), ..base_config(&tmp.path().join("x")) }, never())
            .unwrap_err()
            .to_string();
    assert!(e.contains("--phase2-steps"), "{e}");
    let mut bad = config(&tmp.path().join("y"));
    bad.phases[1].max_seq_len = Some(100_000);
    let e = train(bad, never()).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn the_two_phase_recipe_resolves_and_runs_both_phases_with_lamb() {
    let recipe = root().join("recipes/bert-base-two-phase.toml");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let flags = serde_json::json!({
        "data": [fixture().shards],
        "output": out,
        "model_config": fixture().model_config,
        "progress": false,
    });
    let mut cfg = TrainConfig::resolve(Some(TrainConfig::file_values(&recipe).unwrap()), flags).unwrap();
    assert_eq!((cfg.optim, cfg.lr_scheduler, cfg.lr_power), (OptimizerKind::Lamb, Schedule::PolyWarmup, 0.5));
    let phases = cfg.phase_configs().unwrap();
    let global: Vec<usize> =
        phases.iter().map(|(p, _)| p.per_device_batch_size * p.gradient_accumulation_steps).collect();
    assert_eq!(global, [65_536, 32_768]);
    let shape: Vec<(u64, usize, f64)> =
        phases.iter().map(|(p, _)| (p.max_steps.unwrap(), p.max_seq_len, p.learning_rate)).collect();
    assert_eq!(shape, [(7038, 128, 6e-3), (1563, 512, 4e-3)]);
    // The same recipe, shrunk to the fixture (a tiny model of 64 positions, a small corpus): both phases run.
    for (k, p) in cfg.phases.iter_mut().enumerate() {
        p.max_steps = 2;
        p.max_seq_len = Some(32 * (k + 1));
        p.per_device_batch_size = Some(4);
        p.gradient_accumulation_steps = Some(1);
    }
    cfg.precision = Precision::Auto;
    cfg.device = Device::Cpu;
    cfg.logging_steps = 1;
    let s = train(cfg, never()).unwrap();
    assert_eq!(s.steps, 4);
    let phases: Vec<usize> = metrics(&out).iter().map(|m| m.phase.unwrap()).collect();
    assert_eq!(phases, [1, 1, 2, 2]);
}

#[test]
fn overwrite_output_keeps_the_old_output_until_the_new_run_has_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    fs::create_dir_all(out.join("checkpoint-000004")).unwrap();
    fs::write(out.join("checkpoint-000004/precious.txt"), "the old run").unwrap();
    let leftovers = || {
        fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".replaced-"))
            .count()
    };
    // Runs that fail to start, each after the output would have been deleted before: the old output stays.
    let failing = [
        TrainConfig { max_seq_len: 100, ..base_config(&out) },
        TrainConfig { init_from: Some(tmp.path().join("no-such-model")), ..base_config(&out) },
        TrainConfig { data: vec![tmp.path().join("no-such-shards")], ..base_config(&out) },
    ];
    for cfg in failing {
        let e = train(TrainConfig { overwrite_output: true, ..cfg }, never()).unwrap_err().to_string();
        assert_eq!(
            fs::read_to_string(out.join("checkpoint-000004/precious.txt")).unwrap(),
            "the old run",
            "{e}"
        );
        assert_eq!(leftovers(), 0, "{e}");
    }
    // A run that starts replaces it.
    train(TrainConfig { overwrite_output: true, max_steps: Some(4), ..base_config(&out) }, never()).unwrap();
    assert!(!out.join("checkpoint-000004/precious.txt").exists());
    assert!(out.join("checkpoint-000004/manifest.json").is_file());
    assert_eq!(leftovers(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn resume_auto_takes_the_newest_checkpoint_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(base_config(&out), never()).unwrap();
    // 12 corrupted, 16 partial (no manifest): 8 is the one to take.
    let m = out.join("checkpoint-000012/model.safetensors");
    let mut bytes = fs::read(&m).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    fs::write(&m, bytes).unwrap();
    copy_dir(&out.join("checkpoint-000008"), &out.join("checkpoint-000016"));
    fs::remove_file(out.join("checkpoint-000016/manifest.json")).unwrap();
    let (found, skipped) = checkpoint::find_resume(&out);
    let (dir, state) = found.unwrap();
    assert!(dir.ends_with("checkpoint-000008"));
    assert_eq!(state.global_step, 8);
    assert_eq!(skipped.len(), 2);
    assert!(skipped[0].contains("checkpoint-000016") && skipped[0].contains("manifest.json"), "{skipped:?}");
    assert!(
        skipped[1].contains("checkpoint-000012") && skipped[1].contains("model.safetensors"),
        "{skipped:?}"
    );
}

#[test]
fn resuming_with_other_settings_is_refused_unless_only_the_schedule_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(TrainConfig { max_steps: Some(4), ..base_config(&out) }, never()).unwrap();
    let e = train(
        TrainConfig { resume: Some("auto".into()), max_seq_len: 48, max_steps: Some(4), ..base_config(&out) },
        never(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("max_seq_len") && e.contains("32") && e.contains("48"), "{e}");
    let e =
        train(TrainConfig { resume: Some("auto".into()), max_steps: Some(6), ..base_config(&out) }, never())
            .unwrap_err()
            .to_string();
    assert!(e.contains("max_steps") && e.contains("--allow-config-change"), "{e}");
    let s = train(
        TrainConfig {
            resume: Some("auto".into()),
            max_steps: Some(6),
            allow_config_change: true,
            ..base_config(&out)
        },
        never(),
    )
    .unwrap();
    assert_eq!(s.steps, 6);
}

#[test]
fn non_finite_steps_skip_with_fp16_and_stop_fp32_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fp16");
    let cfg = TrainConfig {
        precision: Precision::Fp16,
        max_steps: Some(6),
        debug_nonfinite_steps: vec![2, 3],
        ..base_config(&out)
    };
    train(cfg, never()).unwrap();
    let m = metrics(&out);
    assert_eq!(m[1].loss_scale, 65536.0);
    assert_eq!(
        (m[2].skipped_steps, m[2].loss_scale),
        (1, 65536.0),
        "the step that overflowed is logged with its scale"
    );
    assert_eq!((m[3].skipped_steps, m[3].loss_scale), (2, 32768.0));
    assert_eq!((m[4].skipped_steps, m[4].loss_scale), (2, 16384.0));
    let state = checkpoint::verify(&out.join("checkpoint-000006")).unwrap();
    assert_eq!((state.updates, state.skipped_steps, state.scaler.scale), (4, 2, 16384.0));

    let out = tmp.path().join("fp32");
    let cfg = TrainConfig {
        max_steps: Some(12),
        max_nonfinite_steps: 3,
        debug_nonfinite_steps: vec![5, 6, 7, 8],
        ..base_config(&out)
    };
    let e = train(cfg, never()).unwrap_err().to_string();
    assert!(e.contains("step 7") && e.contains("3 non-finite steps in a row") && e.contains("intact"), "{e}");
    checkpoint::verify(&out.join("checkpoint-000004")).unwrap();
}

#[test]
fn bad_settings_and_inputs_get_clear_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let err = |cfg: TrainConfig| train(cfg, never()).unwrap_err().to_string();
    let e = err(TrainConfig { data: vec![tmp.path().join("missing")], ..base_config(&out) });
    assert!(e.contains("missing") && e.contains("bertcuda prepare"), "{e}");
    let e = err(TrainConfig { precision: Precision::Bf16, ..base_config(&out) });
    assert!(e.contains("bf16") && e.contains("fp32"), "{e}");
    if bertcuda::backend::cuda::probe().is_err() {
        // No GPU here: --device cuda says why (and auto falls back to the CPU, tested by every other run).
        let e = err(TrainConfig { device: Device::Cuda, ..base_config(&out) });
        assert!(e.starts_with("--device cuda: "), "{e}");
    }
    let e = err(TrainConfig { warmup_ratio: Some(0.1), ..base_config(&out) });
    assert!(e.contains("--warmup-steps or --warmup-ratio"), "{e}");
    let e = err(TrainConfig { max_seq_len: 100, ..base_config(&out) });
    assert!(e.contains("--max-seq-len 100") && e.contains("max_position_embeddings 64"), "{e}");
    let e = err(TrainConfig { per_device_batch_size: 100_000, ..base_config(&out) });
    assert!(e.contains("fewer than one step"), "{e}");
    // Activations past the machine's memory: an error naming the settings, not an abort.
    let e = err(TrainConfig { per_device_batch_size: 1 << 32, ..base_config(&out) });
    assert!(e.contains("out of memory") && e.contains("--per-device-batch-size 4294967296"), "{e}");
    // A choice outside its list, in a config file (flags are checked by clap).
    let e = TrainConfig::resolve(None, serde_json::json!({"lr_scheduler": "wavy"})).unwrap_err().to_string();
    assert!(e.contains("wavy") && e.contains("polynomial"), "{e}");
    let e = err(TrainConfig { model_config: "huge".into(), ..base_config(&out) });
    assert!(e.contains("huge"), "{e}");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("something"), "x").unwrap();
    let e = err(base_config(&out));
    assert!(e.contains("--resume auto") && e.contains("--overwrite-output"), "{e}");
    let e = err(TrainConfig {
        resume: Some(tmp.path().join("nope").to_str().unwrap().into()),
        ..base_config(&out)
    });
    assert!(e.contains("cannot resume") && e.contains("nope"), "{e}");
    let e = TrainConfig::resolve(None, serde_json::json!({"learning_rat": 1})).unwrap_err().to_string();
    assert!(e.contains("learning_rat"), "{e}");
}

#[test]
fn init_from_a_real_checkpoint_continues_pretraining_and_refuses_other_vocabularies() {
    let minilm = root().join(".cache/models/all-MiniLM-L6-v2");
    assert!(minilm.join("model.safetensors").is_file(), "run scripts/fetch-test-models.sh");
    let tmp = tempfile::tempdir().unwrap();
    // Shards made with our fixture's tokenizer: refused.
    let e =
        train(TrainConfig { init_from: Some(minilm.clone()), ..base_config(&tmp.path().join("x")) }, never())
            .unwrap_err()
            .to_string();
    assert!(e.contains("another tokenizer") && e.contains("bertcuda prepare --tokenizer"), "{e}");
    // Shards made with the model's tokenizer: trains, heads initialised.
    let text = fs::read_to_string(root().join("data/sample/rust-book.txt")).unwrap();
    let corpus = tmp.path().join("c.txt");
    fs::write(&corpus, text.lines().take(300).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let shards = tmp.path().join("shards");
    prepare(&PrepareConfig {
        workers: 1,
        ..PrepareConfig::new(vec![corpus], minilm.clone(), shards.clone())
    })
    .unwrap();
    let out = tmp.path().join("dapt");
    let cfg = TrainConfig {
        data: vec![shards],
        init_from: Some(minilm),
        max_steps: Some(2),
        per_device_batch_size: 2,
        save_steps: 100,
        ..base_config(&out)
    };
    let s = train(cfg, never()).unwrap();
    assert_eq!(s.steps, 2);
    assert!(s.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let c = ModelConfig::load(&out).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers), (384, 6));
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bertcuda"))
}

fn train_process(config: &Path, extra: &[&str]) -> std::process::Child {
    bin()
        .args(["train", "--config", config.to_str().unwrap(), "--quiet"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_config(path: &Path, cfg: &TrainConfig) {
    fs::write(path, serde_json::to_string(cfg).unwrap()).unwrap();
}

fn tmp_dirs(out: &Path) -> Vec<String> {
    fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn killed_during_a_save_or_a_step_the_run_resumes_from_its_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg_path = tmp.path().join("train.json");
    write_config(
        &cfg_path,
        &TrainConfig {
            max_steps: Some(200),
            save_steps: 2,
            debug_pause_in_save_ms: 1500,
            ..base_config(&out)
        },
    );
    let mut child = train_process(&cfg_path, &[]);
    // The second save pauses with its files written: kill it there.
    wait_for("checkpoint 2", Duration::from_secs(60), || checkpoint::list(&out).iter().any(|c| c.0 == 2));
    wait_for("the second save", Duration::from_secs(60), || !tmp_dirs(&out).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out.join("checkpoint-000004").exists(), "a half-written checkpoint looks complete");
    let (found, _) = checkpoint::find_resume(&out);
    assert_eq!(found.unwrap().1.global_step, 2);

    // Killed during a step: resume picks checkpoint 2 (or a later complete one) and runs on.
    write_config(
        &cfg_path,
        &TrainConfig {
            max_steps: Some(200),
            save_steps: 2,
            resume: Some("auto".into()),
            ..base_config(&out)
        },
    );
    let mut child = train_process(&cfg_path, &[]);
    wait_for("a step after resuming", Duration::from_secs(60), || metrics(&out).len() >= 5);
    child.kill().unwrap();
    child.wait().unwrap();
    let (found, _) = checkpoint::find_resume(&out);
    let resumed_at = found.unwrap().1.global_step;
    assert!(resumed_at >= 2);
    write_config(
        &cfg_path,
        &TrainConfig {
            max_steps: Some(200),
            save_steps: 2,
            resume: Some("auto".into()),
            ..base_config(&out)
        },
    );
    let cfg: TrainConfig = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let s = train(TrainConfig { max_steps: Some(200), ..cfg }, never()).unwrap();
    assert_eq!(s.steps, 200);
}

#[cfg(unix)]
#[test]
fn sigterm_saves_a_checkpoint_and_exits_zero_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg_path = tmp.path().join("train.json");
    write_config(
        &cfg_path,
        &TrainConfig { max_steps: Some(100_000), save_steps: 100_000, ..base_config(&out) },
    );
    let child = train_process(&cfg_path, &[]);
    wait_for("training steps", Duration::from_secs(60), || {
        out.join("metrics.jsonl").is_file() && metrics(&out).len() >= 3
    });
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stopped by a signal") && err.contains("--resume auto"), "{err}");
    let (found, _) = checkpoint::find_resume(&out);
    let state = found.unwrap().1;
    assert!(state.global_step >= 3);
    let cfg = TrainConfig {
        resume: Some("auto".into()),
        max_steps: Some(state.global_step + 2),
        allow_config_change: true,
        ..base_config(&out)
    };
    assert_eq!(train(cfg, never()).unwrap().steps, state.global_step + 2);
}

#[test]
fn eval_reports_losses_accuracy_and_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(TrainConfig { max_steps: Some(4), ..base_config(&out) }, never()).unwrap();
    let shards = fixture().shards.to_str().unwrap();
    let run = |extra: &[&str]| {
        let o = bin()
            .args([
                "eval",
                "--model",
                out.to_str().unwrap(),
                "--data",
                shards,
                "--max-seq-len",
                "32",
                "--max-batches",
                "3",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(run(&["--json"]).trim()).unwrap();
    for k in ["mlm_loss", "mlm_accuracy", "perplexity", "nsp_loss", "nsp_accuracy"] {
        assert!(v[k].as_f64().is_some(), "{k}: {v}");
    }
    assert!((v["perplexity"].as_f64().unwrap() - v["mlm_loss"].as_f64().unwrap().exp()).abs() < 1e-6);
    assert_eq!(v["sequences"], 96);
    // The same seed, the same numbers; --no-nsp data: nsp keys null.
    assert_eq!(run(&["--json"]), run(&["--json"]));
    let v: serde_json::Value = serde_json::from_str(run(&["--json", "--no-nsp"]).trim()).unwrap();
    assert!(v["nsp_loss"].is_null() && v["nsp_accuracy"].is_null() && v["mlm_loss"].is_f64());
    assert!(run(&[]).contains("perplexity"));
    // A bare BertModel (no heads at all): refused, with what to do.
    let minilm = root().join(".cache/models/all-MiniLM-L6-v2");
    let o = bin().args(["eval", "--model", minilm.to_str().unwrap(), "--data", shards]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("neither an MLM nor an NSP head") && e.contains("--init-from"),
        "{e}"
    );
}

#[test]
fn resume_is_exact_from_any_checkpoint_across_epochs_of_different_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let a_out = tmp.path().join("a");
    // Batches of 128: about nine steps an epoch, so 30 steps cross epoch boundaries (epochs differ in
    // size: their examples are drawn per epoch).
    // A seed whose epoch 1 has more batches than epoch 0: the case a cursor rolled over by epoch 0's
    // size would get wrong.
    let corpus = open_corpus(std::slice::from_ref(&fixture().shards)).unwrap();
    let seed = (0..200u64)
        .find(|&seed| {
            let l = TrainConfig { per_device_batch_size: 128, seed, ..base_config(&a_out) }.loader();
            EpochPlan::new(&corpus, &l, 1).unwrap().batches(&l)
                > EpochPlan::new(&corpus, &l, 0).unwrap().batches(&l)
        })
        .expect("a seed with a larger epoch 1");
    let cfg = |out: &Path| TrainConfig {
        per_device_batch_size: 128,
        seed,
        max_steps: Some(30),
        save_steps: 1,
        save_total_limit: 40,
        ..base_config(out)
    };
    train(cfg(&a_out), never()).unwrap();
    let states: Vec<_> =
        (1..30).map(|k| checkpoint::verify(&a_out.join(checkpoint::checkpoint_name(k))).unwrap()).collect();
    assert!(states.last().unwrap().cursor.epoch >= 2, "{:?}", states.last().unwrap().cursor);
    let want = fs::read(a_out.join("model.safetensors")).unwrap();
    // Resume from the checkpoints just before and after each epoch boundary, and one inside.
    let mut picks: Vec<u64> = vec![5];
    for w in states.windows(2) {
        if w[0].cursor.epoch != w[1].cursor.epoch || w[1].cursor.batch == 0 {
            picks.extend([w[0].global_step, w[1].global_step]);
        }
    }
    picks.dedup();
    for k in picks {
        let b_out = tmp.path().join(format!("b{k}"));
        fs::create_dir_all(&b_out).unwrap();
        copy_dir(&a_out.join(checkpoint::checkpoint_name(k)), &b_out.join(checkpoint::checkpoint_name(k)));
        train(TrainConfig { resume: Some("auto".into()), ..cfg(&b_out) }, never()).unwrap();
        assert_eq!(fs::read(b_out.join("model.safetensors")).unwrap(), want, "resumed from step {k}");
    }
}

#[test]
fn rotation_keeps_the_new_checkpoint_and_ignores_an_abandoned_continuation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    train(
        TrainConfig { max_steps: Some(12), save_steps: 4, save_total_limit: 3, ..base_config(&out) },
        never(),
    )
    .unwrap();
    // Roll back to step 4 and continue with other save settings: 8 and 12 belong to the abandoned run.
    let cfg = TrainConfig {
        resume: Some(out.join("checkpoint-000004").to_str().unwrap().into()),
        max_steps: Some(12),
        save_steps: 2,
        save_total_limit: 2,
        ..base_config(&out)
    };
    train(cfg, never()).unwrap();
    let steps: Vec<u64> = checkpoint::list(&out).into_iter().map(|c| c.0).collect();
    assert_eq!(steps, [12, 10], "the newest complete checkpoints of this run");
    assert!(
        out.join("abandoned-checkpoint-000008").is_dir() && out.join("abandoned-checkpoint-000012").is_dir()
    );
    // A leftover temporary directory and a checkpoint caught between the renames of a replacement.
    fs::create_dir_all(out.join(".checkpoint-000014.tmp-99999")).unwrap();
    fs::rename(out.join("checkpoint-000012"), out.join(".checkpoint-000012.old-99999")).unwrap();
    checkpoint::clean_leftovers(&out).unwrap();
    assert!(!out.join(".checkpoint-000014.tmp-99999").exists());
    checkpoint::verify(&out.join("checkpoint-000012")).unwrap();
}

#[test]
fn flags_win_over_the_config_file_even_at_their_default_values() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg_path = tmp.path().join("train.json");
    // The file sets a seed and steps; the command line gives --seed at its default value, and steps.
    write_config(
        &cfg_path,
        &TrainConfig { seed: 7, max_steps: Some(5), save_steps: 100, ..base_config(&out) },
    );
    let child = bin()
        .args([
            "train",
            "--config",
            cfg_path.to_str().unwrap(),
            "--quiet",
            "--seed",
            "42",
            "--max-steps",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(child.status.success(), "{}", String::from_utf8_lossy(&child.stderr));
    let state = checkpoint::verify(&out.join("checkpoint-000002")).unwrap();
    let saved: TrainConfig = serde_json::from_value(state.config).unwrap();
    assert_eq!((saved.seed, saved.max_steps), (42, Some(2)), "the flags' values");
    // What neither gave is the default; what only the file gave is the file's.
    assert_eq!((saved.weight_decay, saved.per_device_batch_size), (TrainConfig::default().weight_decay, 8));
    assert!(!saved.progress, "--quiet");
}
