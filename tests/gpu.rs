//! The CUDA backend against the CPU reference. Every test body runs twice:
//! - `emu::<name>`, on the emulated device (the kernels compiled for the CPU, with the checker of
//!   out-of-bounds accesses, uninitialised reads and races): in every `cargo test`, on any machine;
//! - `gpu::<name>`, on a real GPU: `#[ignore]`d, run on the GPU machine with
//!   `cargo test --release --test gpu gpu:: -- --ignored --test-threads=1`
//!   (scripts/gpu-check.sh runs these, the sanitizers and the benchmarks in one go).
//!
//! Each op runs on both backends with the same random inputs on odd shapes (batch 3, seq 37, hidden 48,
//! vocab 211, padding, ignored rows); outputs written with `=` are poisoned with NaN first, so an element
//! a kernel forgets shows. Tolerances (fp32): |gpu − cpu| ≤ atol + rtol·|cpu|, stated per test.

mod common;

use common::randn;

use bertcuda::backend::cpu::Cpu;
use bertcuda::backend::cuda::Cuda;
use bertcuda::backend::device::emu::EmuOptions;
use bertcuda::backend::{
    AdamWStep, Backend, Buf, Dropout, DropoutKey, Ints, Kind, LambLayout, LambStep, IGNORE_INDEX,
};
use bertcuda::data::rng::KeyedRng;
use bertcuda::model::bert::{Bert, Capacity, Inputs, StepOptions, Train};
use bertcuda::model::config::{Activation, ModelConfig};
use bertcuda::model::params::ParamTable;

const B: usize = 3;
const T: usize = 37;
const H: usize = 48;
const NH: usize = 3; // head size 16
const V: usize = 211;

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

thread_local! {
    /// Whether this test thread's body runs on the emulated device (set by the `emu::` wrappers).
    static EMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn emulated() -> bool {
    EMULATED.with(|e| e.get())
}

/// The device under test: the emulated one (checker on) or GPU 0.
fn gpu() -> Cuda {
    if emulated() {
        let opts = EmuOptions { check: true, ..EmuOptions::from_env() };
        let c = Cuda::emulated(opts).expect("the emulated device (build.rs needs a C++ compiler)");
        assert!(c.is_emulated());
        c
    } else {
        Cuda::new(0).expect("a CUDA GPU with the kernels built")
    }
}

/// `--device` for the whole-training tests.
fn device_name() -> &'static str {
    if emulated() {
        "emu"
    } else {
        "cuda"
    }
}

/// Each body as `emu::<name>` (every run) and `gpu::<name>` (ignored: needs a CUDA GPU).
macro_rules! on_both_devices {
    ($($name:ident),* $(,)?) => {
        mod emu {
            $(
                #[test]
                fn $name() {
                    super::EMULATED.with(|e| e.set(true));
                    super::$name();
                }
            )*
        }
        mod gpu {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn $name() {
                    super::$name();
                }
            )*
        }
    };
}

/// Inputs, int inputs, and outputs (length, initial value: None = poisoned with NaN).
struct Case {
    floats: Vec<Vec<f32>>,
    ints: Vec<Vec<i32>>,
    outs: Vec<(usize, Option<Vec<f32>>)>,
}

type Op<'a> = &'a dyn Fn(&dyn Backend, &[Buf], &[Ints], &[Buf]) -> bertcuda::Result<()>;

fn run(be: &dyn Backend, c: &Case, op: Op) -> Vec<Vec<f32>> {
    run_kinds(be, c, &[], &[], op)
}

/// `run`, allocating each input and output as the kind given (fp32 statistics where none is).
fn run_kinds(be: &dyn Backend, c: &Case, kinds: &[Kind], out_kinds: &[Kind], op: Op) -> Vec<Vec<f32>> {
    let kind = |ks: &[Kind], k: usize| ks.get(k).copied().unwrap_or(Kind::Stat);
    let f: Vec<Buf> = c
        .floats
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let b = be.alloc_kind(v.len(), kind(kinds, k)).unwrap();
            be.upload(b, v).unwrap();
            b
        })
        .collect();
    let i: Vec<Ints> = c
        .ints
        .iter()
        .map(|v| {
            let b = be.alloc_ints(v.len()).unwrap();
            be.upload_ints(b, v).unwrap();
            b
        })
        .collect();
    let o: Vec<Buf> = c
        .outs
        .iter()
        .enumerate()
        .map(|(k, (n, init))| {
            let b = be.alloc_kind(*n, kind(out_kinds, k)).unwrap();
            match init {
                Some(v) => be.upload(b, v).unwrap(),
                None => be.fill(b, f32::NAN).unwrap(),
            }
            b
        })
        .collect();
    op(be, &f, &i, &o).unwrap();
    o.iter().map(|b| be.download(*b).unwrap()).collect()
}

/// Run on both backends and compare every output.
fn same(what: &str, c: &Case, atol: f32, rtol: f32, op: Op) {
    let (cpu, gpu_) = (Cpu::<f32>::new(), gpu());
    let want = run(&cpu, c, op);
    let got = run(&gpu_, c, op);
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        for (j, (a, b)) in w.iter().zip(g).enumerate() {
            assert!(
                (a - b).abs() <= atol + rtol * a.abs() || (a.is_nan() && b.is_nan()),
                "{what}: output {k}[{j}]: cpu {a} vs gpu {b}"
            );
        }
    }
}

fn mask() -> Vec<i32> {
    let lens = [37, 20, 1];
    (0..B * T).map(|r| ((r % T) < lens[r / T]) as i32).collect()
}

fn matmul_in_every_transpose() {
    let (m, n, k) = (37, 53, 29);
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        for acc in [false, true] {
            let c = Case {
                floats: vec![randn(1, m * k, 1.0), randn(2, k * n, 1.0)],
                ints: vec![],
                outs: vec![(m * n, acc.then(|| randn(3, m * n, 1.0)))],
            };
            // fp32 SGEMM vs the gemm crate: summation order differs; 1e-4 relative over k = 29.
            same(&format!("matmul a_t={a_t} b_t={b_t} acc={acc}"), &c, 1e-4, 1e-4, &|be, f, _, o| {
                be.matmul(o[0], f[0], f[1], m, n, k, a_t, b_t, acc)
            });
        }
    }
}

fn elementwise_ops_bias_and_reductions() {
    let n = B * T * H;
    let x = randn(4, n, 1.5);
    for act in [Activation::GeluErf, Activation::GeluTanh] {
        let c = Case {
            floats: vec![x.clone(), randn(5, n, 1.0)],
            ints: vec![],
            outs: vec![(n, None), (n, None)],
        };
        same(&format!("{act:?}"), &c, 1e-6, 1e-5, &|be, f, _, o| {
            be.gelu_fwd(o[0], f[0], act)?;
            be.gelu_bwd(o[1], f[1], f[0], act)
        });
    }
    let c = Case {
        floats: vec![x.clone(), randn(6, n, 1.0)],
        ints: vec![],
        outs: vec![(n, None), (n, None), (n, None)],
    };
    let d = Dropout { p: 0.1, key: DropoutKey { seed: 1, step: 2, site: 3 } };
    // The dropout masks are bit-identical (Philox): exact.
    same("tanh, add, dropout", &c, 1e-6, 1e-6, &|be, f, _, o| {
        be.tanh_fwd(o[0], f[0])?;
        be.add(o[1], f[0], f[1])?;
        be.dropout_fwd(o[2], f[0], d)
    });
    let (rows, cols) = (B * T, H);
    let c = Case {
        floats: vec![randn(7, rows * cols, 1.0), randn(8, cols, 1.0)],
        ints: vec![],
        outs: vec![
            (rows * cols, Some(randn(9, rows * cols, 1.0))),
            (cols, Some(randn(10, cols, 1.0))),
            (1, None),
            (1, None),
        ],
    };
    same("bias add/grad, sum, sum of squares", &c, 1e-4, 1e-5, &|be, f, _, o| {
        be.add_bias(o[0], f[1], rows, cols)?;
        be.bias_grad(o[1], f[0], rows, cols)?;
        be.sum(o[2], f[0])?;
        be.sum_squares(o[3], f[0])
    });
}

fn layernorm_forward_and_backward() {
    let rows = B * T;
    let c = Case {
        floats: vec![
            randn(11, rows * H, 2.0),
            randn(12, H, 1.0),
            randn(13, H, 1.0),
            randn(14, rows * H, 1.0),
        ],
        ints: vec![],
        outs: vec![
            (rows * H, None),
            (rows, None),
            (rows, None),
            (rows * H, None),
            (H, Some(randn(15, H, 1.0))),
            (H, Some(randn(16, H, 1.0))),
        ],
    };
    same("layernorm", &c, 1e-5, 1e-4, &|be, f, _, o| {
        be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, H, 1e-12)?;
        be.layernorm_bwd(o[3], o[4], o[5], f[3], f[0], o[1], o[2], f[1], rows, H)
    });
}

fn attention_forward_and_backward_with_padding_and_dropout() {
    let hs = H / NH;
    for dropout in [None, Some(Dropout { p: 0.1, key: DropoutKey { seed: 5, step: 9, site: 2 } })] {
        let c = Case {
            floats: vec![randn(17, B * T * 3 * H, 1.0), randn(18, B * T * H, 1.0)],
            ints: vec![mask()],
            outs: vec![(B * T * H, None), (B * T * 3 * H, None)],
        };
        same(&format!("attention dropout={}", dropout.is_some()), &c, 1e-5, 1e-4, &|be, f, i, o| {
            let state = be.alloc(be.attention_state_len(B, T, NH))?;
            be.attention_fwd(o[0], state, f[0], i[0], B, T, NH, hs, dropout)?;
            be.attention_bwd(o[1], f[1], o[0], f[0], state, i[0], B, T, NH, hs, dropout)
        });
    }
}

fn embeddings_rows_cross_entropy_and_argmax() {
    let n = B * T;
    let mut r = KeyedRng::new(4, &[1]);
    let ids: Vec<i32> = (0..n).map(|_| r.below(V as u64) as i32).collect(); // many repeats
    let types: Vec<i32> = (0..n).map(|k| ((k % T) > T / 2) as i32).collect();
    let c = Case {
        floats: vec![
            randn(19, V * H, 1.0),
            randn(20, T * H, 1.0),
            randn(21, 2 * H, 1.0),
            randn(22, n * H, 1.0),
        ],
        ints: vec![ids, types],
        outs: vec![
            (n * H, None),
            (V * H, Some(randn(23, V * H, 1.0))),
            (T * H, Some(vec![0.0; T * H])),
            (2 * H, Some(vec![0.0; 2 * H])),
        ],
    };
    same("embeddings", &c, 1e-5, 1e-5, &|be, f, i, o| {
        be.embeddings_fwd(o[0], i[0], i[1], f[0], f[1], f[2], B, T, H)?;
        be.embeddings_bwd(o[1], o[2], o[3], f[3], i[0], i[1], B, T, H)
    });
    let m = 17;
    let rows: Vec<i32> = (0..m as i32).map(|k| k * 5 + 1).collect();
    let c = Case {
        floats: vec![randn(24, n * H, 1.0), randn(25, m * H, 1.0)],
        ints: vec![rows],
        outs: vec![(m * H, None), (n * H, Some(randn(26, n * H, 1.0)))],
    };
    same("gather/scatter rows", &c, 1e-6, 1e-6, &|be, f, i, o| {
        be.gather_rows(o[0], f[0], i[0], m, H)?;
        be.scatter_add_rows(o[1], f[1], i[0], m, H)
    });
    let mut labels: Vec<i32> = (0..m as i32).map(|k| (k * 37) % V as i32).collect();
    labels[3] = IGNORE_INDEX;
    labels[10] = IGNORE_INDEX;
    for grad in [None, Some(1.0 / 15.0)] {
        let c = Case {
            floats: vec![],
            ints: vec![labels.clone()],
            outs: vec![(m, None), (m * V, Some(randn(27, m * V, 3.0)))],
        };
        same(&format!("cross_entropy grad={grad:?}"), &c, 1e-5, 1e-5, &|be, _, i, o| {
            be.cross_entropy(o[0], o[1], i[0], m, V, grad)
        });
    }
    // All rows ignored.
    let c = Case {
        floats: vec![],
        ints: vec![vec![IGNORE_INDEX; m]],
        outs: vec![(m, None), (m * V, Some(randn(28, m * V, 3.0)))],
    };
    same("cross_entropy all ignored", &c, 0.0, 0.0, &|be, _, i, o| {
        be.cross_entropy(o[0], o[1], i[0], m, V, Some(1.0))
    });
    for be in [&Cpu::<f32>::new() as &dyn Backend, &gpu()] {
        let z = be.alloc(m * V).unwrap();
        be.upload(z, &randn(29, m * V, 1.0)).unwrap();
        let out = be.alloc_ints(m).unwrap();
        be.argmax_rows(out, z, m, V).unwrap();
        let got = be.download_ints(out).unwrap();
        let host = randn(29, m * V, 1.0);
        for (k, g) in got.iter().enumerate() {
            let row = &host[k * V..(k + 1) * V];
            let best = (0..V).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            assert_eq!(*g as usize, best, "{}", be.describe());
        }
    }
}

fn adamw_and_scale() {
    let n = 100_003;
    let decay: Vec<i32> = (0..n).map(|k| (k % 3 != 0) as i32).collect();
    let c = Case {
        floats: vec![randn(30, n, 0.01)],
        ints: vec![decay],
        outs: vec![
            (n, Some(randn(31, n, 1.0))),
            (n, Some(randn(32, n, 0.01))),
            (n, Some(randn(33, n, 0.0001).iter().map(|x| x.abs()).collect())),
        ],
    };
    let h = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.01, step: 7 };
    same("adamw", &c, 1e-7, 1e-5, &|be, f, i, o| {
        be.adamw(o[0], f[0], o[1], o[2], i[0], &h)?;
        be.scale(o[0], 0.5)
    });
}

/// LAMB over tensors of several chunks (launch.cuh's LAMB_CHUNK is 8192), a chunk-sized one, a bias and a
/// tensor at zero, with and without the trust ratio on every tensor.
fn lamb_over_chunked_tensors() {
    use bertcuda::model::params::{Init, ParamInfo};
    let sizes = [(20_000, true), (5, true), (777, false), (1_000, true), (8_192, true)];
    let mut offset = 0;
    let tensors: Vec<ParamInfo> = sizes
        .iter()
        .enumerate()
        .map(|(k, &(len, decay))| {
            let p =
                ParamInfo { name: format!("t{k}"), shape: vec![len], offset, len, init: Init::Zeros, decay };
            offset += len;
            p
        })
        .collect();
    let n = offset;
    let mut params = randn(40, n, 0.05);
    params[20_005 + 777..20_005 + 777 + 1_000].fill(0.0);
    let c = Case {
        floats: vec![randn(41, n, 0.3)],
        ints: vec![],
        outs: vec![
            (n, Some(params)),
            (n, Some(randn(42, n, 0.01))),
            (n, Some(randn(43, n, 0.0001).iter().map(|x| x.abs()).collect())),
        ],
    };
    for all_tensors in [false, true] {
        let h = LambStep {
            lr: 6e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            step: 7,
            grad_divisor: 3.5,
            all_tensors,
        };
        same(&format!("lamb all_tensors={all_tensors}"), &c, 1e-7, 1e-5, &|be, f, _, o| {
            let layout = LambLayout::new(be, &tensors)?;
            be.lamb(o[0], f[0], o[1], o[2], &layout, &h)
        });
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

/// The CPU in fp32 against the GPU with bf16 activations: each output within `tol` of its largest
/// element (bf16 keeps 8 bits of mantissa; inputs are rounded to it on upload).
fn same_bf16(what: &str, c: &Case, kinds: &[Kind], out_kinds: &[Kind], tol: f32, op: Op) {
    let want = run_kinds(&Cpu::<f32>::new(), c, kinds, out_kinds, op);
    let g = gpu();
    assert_eq!(g.set_precision("bf16").unwrap(), "bf16");
    let got = run_kinds(&g, c, kinds, out_kinds, op);
    for (k, (w, x)) in want.iter().zip(&got).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = w.iter().zip(x).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(err <= tol, "{what} (bf16): output {k}: relative error {err:e}");
    }
}

fn bf16_ops_against_the_fp32_cpu() {
    use Kind::{Activation as A, Grad as G, Param as P, Stat as S};
    let rows = B * T;
    // LayerNorm: activations in/out, weights from the bf16 copy, statistics and weight gradients fp32.
    let c = Case {
        floats: vec![
            randn(11, rows * H, 2.0),
            randn(12, H, 1.0),
            randn(13, H, 1.0),
            randn(14, rows * H, 1.0),
        ],
        ints: vec![],
        outs: vec![
            (rows * H, None),
            (rows, None),
            (rows, None),
            (rows * H, None),
            (H, Some(vec![0.0; H])),
            (H, Some(vec![0.0; H])),
        ],
    };
    same_bf16("layernorm", &c, &[A, P, P, A], &[A, S, S, A, G, G], 3e-2, &|be, f, _, o| {
        be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, H, 1e-12)?;
        be.layernorm_bwd(o[3], o[4], o[5], f[3], f[0], o[1], o[2], f[1], rows, H)
    });
    // Attention with padding.
    let hs = H / NH;
    let c = Case {
        floats: vec![randn(17, rows * 3 * H, 1.0), randn(18, rows * H, 1.0)],
        ints: vec![mask()],
        outs: vec![(rows * H, None), (rows * 3 * H, None)],
    };
    same_bf16("attention", &c, &[A, A], &[A, A], 3e-2, &|be, f, i, o| {
        let state = be.alloc_kind(be.attention_state_len(B, T, NH), S)?;
        be.attention_fwd(o[0], state, f[0], i[0], B, T, NH, hs, None)?;
        be.attention_bwd(o[1], f[1], o[0], f[0], state, i[0], B, T, NH, hs, None)
    });
    // Matrix products: activation × parameter → activation, and activations → a parameter gradient.
    let (m, n, k) = (37, 53, 29);
    let c = Case {
        floats: vec![randn(1, m * k, 1.0), randn(2, n * k, 1.0), randn(3, m * n, 1.0)],
        ints: vec![],
        outs: vec![(m * n, None), (n * k, Some(vec![0.0; n * k]))],
    };
    same_bf16("matmul", &c, &[A, P, A], &[A, G], 3e-2, &|be, f, _, o| {
        be.matmul(o[0], f[0], f[1], m, n, k, false, true, false)?;
        be.matmul(o[1], f[2], f[0], n, k, m, true, false, true)
    });
    // GELU, bias, cross-entropy with its in-place gradient, embeddings.
    let cols = 211;
    let mut labels: Vec<i32> = (0..17).map(|r| (r * 37) % cols as i32).collect();
    labels[3] = IGNORE_INDEX;
    let c = Case {
        floats: vec![randn(4, 17 * cols, 1.5), randn(5, cols, 1.0)],
        ints: vec![labels],
        outs: vec![
            (17 * cols, None),
            (17, None),
            (17 * cols, Some(randn(6, 17 * cols, 2.0))),
            (cols, Some(vec![0.0; cols])),
        ],
    };
    same_bf16("gelu, bias, cross-entropy", &c, &[A, P], &[A, S, A, G], 3e-2, &|be, f, i, o| {
        be.gelu_fwd(o[0], f[0], Activation::GeluErf)?;
        be.add_bias(o[0], f[1], 17, cols)?;
        be.bias_grad(o[3], o[0], 17, cols)?;
        be.cross_entropy(o[1], o[2], i[0], 17, cols, Some(1.0 / 16.0))
    });
    let ids: Vec<i32> = (0..rows as i32).map(|r| (r * 7) % V as i32).collect();
    let types: Vec<i32> = (0..rows).map(|r| ((r % T) > T / 2) as i32).collect();
    let c = Case {
        floats: vec![
            randn(19, V * H, 1.0),
            randn(20, T * H, 1.0),
            randn(21, 2 * H, 1.0),
            randn(22, rows * H, 1.0),
        ],
        ints: vec![ids, types],
        outs: vec![
            (rows * H, None),
            (V * H, Some(vec![0.0; V * H])),
            (T * H, Some(vec![0.0; T * H])),
            (2 * H, Some(vec![0.0; 2 * H])),
        ],
    };
    same_bf16("embeddings", &c, &[P, P, P, A], &[A, G, G, G], 3e-2, &|be, f, i, o| {
        be.embeddings_fwd(o[0], i[0], i[1], f[0], f[1], f[2], B, T, H)?;
        be.embeddings_bwd(o[1], o[2], o[3], f[3], i[0], i[1], B, T, H)
    });
}

fn fused_forward_kernels_equal_the_unfused_cpu_ops() {
    let rows = B * T;
    let drop = Dropout { p: 0.1, key: DropoutKey { seed: 3, step: 4, site: 5 } };
    for dropout in [None, Some(drop)] {
        let c = Case {
            floats: vec![
                randn(40, rows * H, 1.0),
                randn(41, rows * H, 1.0),
                randn(42, H, 1.0),
                randn(43, H, 1.0),
            ],
            ints: vec![],
            outs: vec![(rows * H, None), (rows * H, None), (rows, None), (rows, None)],
        };
        same(
            &format!("residual + layernorm, dropout={}", dropout.is_some()),
            &c,
            1e-5,
            1e-4,
            &|be, f, _, o| {
                let branch = be.alloc(rows * H)?;
                be.copy(branch, f[1])?;
                be.residual_layernorm_fwd(
                    o[0], o[1], o[2], o[3], f[0], branch, f[2], f[3], rows, H, 1e-12, dropout,
                )
            },
        );
    }
    // Its backward: d(sum), the weight gradients, and the branch's gradient written over d(out).
    let c = Case {
        floats: vec![randn(51, rows * H, 2.0), randn(52, H, 1.0), randn(53, H, 1.0)],
        ints: vec![],
        outs: vec![
            (rows * H, None),
            (rows, None),
            (rows, None),
            (rows * H, None),
            (H, Some(vec![0.0; H])),
            (H, Some(vec![0.0; H])),
            (rows * H, Some(randn(54, rows * H, 1.0))),
        ],
    };
    let op: Op = &|be, f, _, o| {
        be.layernorm_fwd(o[0], o[1], o[2], f[0], f[1], f[2], rows, H, 1e-12)?;
        be.residual_layernorm_bwd(o[3], o[4], o[5], o[6], f[0], o[1], o[2], f[1], rows, H, drop)
    };
    same("residual + layernorm backward", &c, 1e-5, 1e-4, op);
    // The bf16 instantiation: activations and gradients in bf16, statistics and weight gradients fp32.
    {
        use Kind::{Activation as A, Grad as G, Param as P, Stat as S};
        same_bf16("residual + layernorm backward", &c, &[A, P, P], &[A, S, S, A, G, G, A], 3e-2, op);
    }
    let (r, cols) = (rows, 80);
    let c = Case {
        floats: vec![randn(44, cols, 1.0)],
        ints: vec![],
        outs: vec![(r * cols, Some(randn(45, r * cols, 1.5))), (r * cols, None)],
    };
    for act in [Activation::GeluErf, Activation::GeluTanh] {
        same(&format!("bias + {act:?}"), &c, 1e-5, 1e-5, &|be, f, _, o| {
            be.bias_gelu_fwd(o[0], o[1], f[0], r, cols, act)
        });
    }
    // Its backward: d(pre), and the bias gradient added to what is there (two 64-row chunks, one partial).
    let c = Case {
        floats: vec![randn(60, r * cols, 1.0), randn(61, r * cols, 1.5)],
        ints: vec![],
        outs: vec![(r * cols, None), (cols, Some(randn(62, cols, 1.0)))],
    };
    for act in [Activation::GeluErf, Activation::GeluTanh] {
        let op: Op = &|be, f, _, o| be.gelu_bias_bwd(o[0], o[1], f[0], f[1], r, cols, act);
        same(&format!("{act:?} + bias backward"), &c, 1e-4, 1e-5, op);
        use Kind::{Activation as A, Grad as G};
        same_bf16(&format!("{act:?} + bias backward"), &c, &[A, A], &[A, G], 3e-2, op);
    }
    let ids: Vec<i32> = (0..rows as i32).map(|k| (k * 13) % V as i32).collect();
    let types: Vec<i32> = (0..rows).map(|k| ((k % T) > 9) as i32).collect();
    let c = Case {
        floats: vec![
            randn(46, V * H, 1.0),
            randn(47, T * H, 1.0),
            randn(48, 2 * H, 1.0),
            randn(49, H, 1.0),
            randn(50, H, 1.0),
        ],
        ints: vec![ids, types],
        outs: vec![(rows * H, None), (rows * H, None), (rows, None), (rows, None)],
    };
    same("embeddings + layernorm", &c, 1e-5, 1e-4, &|be, f, i, o| {
        be.embeddings_layernorm_fwd(
            o[0], o[1], o[2], o[3], i[0], i[1], f[0], f[1], f[2], f[3], f[4], B, T, H, 1e-12,
        )
    });
}

on_both_devices!(
    matmul_in_every_transpose,
    elementwise_ops_bias_and_reductions,
    layernorm_forward_and_backward,
    attention_forward_and_backward_with_padding_and_dropout,
    embeddings_rows_cross_entropy_and_argmax,
    adamw_and_scale,
    lamb_over_chunked_tensors,
    whole_model_loss_and_every_gradient_equal_the_cpu,
    bf16_activations_track_the_fp32_cpu_model,
    the_gpu_loss_has_the_gradient_the_gpu_backward_computes,
    the_same_seed_gives_bitwise_equal_gpu_losses_and_gradients,
    training_on_the_gpu_tracks_the_cpu,
    lamb_and_a_phase_switch_track_the_cpu,
    bf16_ops_against_the_fp32_cpu,
    fused_forward_kernels_equal_the_unfused_cpu_ops,
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
