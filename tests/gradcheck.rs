#![allow(clippy::needless_range_loop)] // numeric loops index several arrays by one position
//! Finite differences in f64: every op of the CPU backend, then the whole model on a small odd-sized
//! config with padding, ignored labels and dropout.

mod common;

use bertcuda::backend::cpu::Cpu;
use bertcuda::backend::{
    Activations, Attention, Buf, Dropout, DropoutKey, Embedding, Linear, Loss, Memory, Norm, Tensor,
    IGNORE_INDEX,
};
use bertcuda::data::rng::KeyedRng;
use bertcuda::model::bert::{Bert, Capacity, Inputs, StepOptions, Train};
use bertcuda::model::config::{Activation, ModelConfig};
use bertcuda::model::params::ParamTable;

const H: f64 = 1e-6;

fn randn(seed: u64, n: usize, std: f64) -> Vec<f64> {
    common::randn_f64(1, seed, n, std)
}

/// max |a − b| / max |b| (or max |a| when b is all zero, then it must be tiny).
fn rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
    let scale = numeric.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = analytic.iter().zip(numeric).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    if scale < 1e-9 {
        diff
    } else {
        diff / scale
    }
}

/// Check d/dx of L(x) = Σ dout ⊙ f(x) against `grad(x)`, for the op under test.
fn check(what: &str, x: &[f64], f: impl Fn(&[f64]) -> Vec<f64>, grad: impl Fn(&[f64], &[f64]) -> Vec<f64>) {
    let y = f(x);
    let dout = randn(99, y.len(), 1.0);
    let analytic = grad(x, &dout);
    let mut numeric = vec![0.0; x.len()];
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + H;
        let lp: f64 = f(&xp).iter().zip(&dout).map(|(a, b)| a * b).sum();
        xp[i] = orig - H;
        let lm: f64 = f(&xp).iter().zip(&dout).map(|(a, b)| a * b).sum();
        xp[i] = orig;
        numeric[i] = (lp - lm) / (2.0 * H);
    }
    let e = rel_err(&analytic, &numeric);
    assert!(e <= 1e-6, "{what}: relative error {e:e}");
}

fn buf(be: &Cpu<f64>, v: &[f64]) -> Buf {
    let b = be.alloc(v.len()).unwrap();
    be.upload_f64(b, v).unwrap();
    b
}

#[test]
fn matmul_gradients_in_every_transpose() {
    let (m, n, k) = (3, 4, 5);
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        let b_vals = randn(2, k * n, 1.0);
        let f = |a: &[f64]| {
            let be = Cpu::<f64>::new();
            let (av, bv, c) = (buf(&be, a), buf(&be, &b_vals), be.alloc(m * n).unwrap());
            be.matmul(c, av, bv, m, n, k, a_t, b_t, false).unwrap();
            be.download_f64(c).unwrap()
        };
        // dA = dC · op(B)ᵀ, laid out as A is stored.
        let g = |a: &[f64], dout: &[f64]| {
            let be = Cpu::<f64>::new();
            let (_av, bv, dc, da) =
                (buf(&be, a), buf(&be, &b_vals), buf(&be, dout), be.alloc(m * k).unwrap());
            if a_t {
                be.matmul(da, bv, dc, k, m, n, b_t, true, false).unwrap();
            } else {
                be.matmul(da, dc, bv, m, k, n, false, !b_t, false).unwrap();
            }
            be.download_f64(da).unwrap()
        };
        check(&format!("matmul a_t={a_t} b_t={b_t}"), &randn(1, m * k, 1.0), f, g);
        // accumulate adds
        let be = Cpu::<f64>::new();
        let (av, bv, c) = (buf(&be, &randn(1, m * k, 1.0)), buf(&be, &b_vals), buf(&be, &vec![1.0; m * n]));
        be.matmul(c, av, bv, m, n, k, a_t, b_t, true).unwrap();
        let with = be.download_f64(c).unwrap();
        be.matmul(c, av, bv, m, n, k, a_t, b_t, false).unwrap();
        let without = be.download_f64(c).unwrap();
        assert!(with.iter().zip(&without).all(|(a, b)| (a - b - 1.0).abs() < 1e-12));
    }
}

#[test]
fn layernorm_gradients() {
    let (rows, c) = (4, 7);
    let split =
        |x: &[f64]| (x[..rows * c].to_vec(), x[rows * c..rows * c + c].to_vec(), x[rows * c + c..].to_vec());
    let f = |x: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, w, b) = split(x);
        let (iv, wv, bv) = (buf(&be, &i), buf(&be, &w), buf(&be, &b));
        let (o, m, r) = (be.alloc(rows * c).unwrap(), be.alloc(rows).unwrap(), be.alloc(rows).unwrap());
        be.layernorm_fwd(o, m, r, iv, wv, bv, rows, c, 1e-5).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |x: &[f64], dout: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, w, b) = split(x);
        let (iv, wv, bv, d) = (buf(&be, &i), buf(&be, &w), buf(&be, &b), buf(&be, dout));
        let (o, m, r) = (be.alloc(rows * c).unwrap(), be.alloc(rows).unwrap(), be.alloc(rows).unwrap());
        be.layernorm_fwd(o, m, r, iv, wv, bv, rows, c, 1e-5).unwrap();
        let (di, dw, db) = (be.alloc(rows * c).unwrap(), be.alloc(c).unwrap(), be.alloc(c).unwrap());
        be.layernorm_bwd(di, dw, db, d, iv, m, r, wv, rows, c).unwrap();
        [be.download_f64(di).unwrap(), be.download_f64(dw).unwrap(), be.download_f64(db).unwrap()].concat()
    };
    check("layernorm", &randn(3, rows * c + 2 * c, 1.0), f, g);
}

#[test]
fn elementwise_gradients_gelu_tanh_dropout_bias() {
    let n = 11;
    let x = randn(4, n, 1.5);
    for act in [Activation::GeluErf, Activation::GeluTanh] {
        let f = |x: &[f64]| {
            let be = Cpu::<f64>::new();
            let (i, o) = (buf(&be, x), be.alloc(n).unwrap());
            be.gelu_fwd(o, i, act).unwrap();
            be.download_f64(o).unwrap()
        };
        let g = |x: &[f64], d: &[f64]| {
            let be = Cpu::<f64>::new();
            let (i, dv, di) = (buf(&be, x), buf(&be, d), be.alloc(n).unwrap());
            be.gelu_bwd(di, dv, i, act).unwrap();
            be.download_f64(di).unwrap()
        };
        check(&format!("{act:?}"), &x, f, g);
    }
    let f = |x: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, o) = (buf(&be, x), be.alloc(n).unwrap());
        be.tanh_fwd(o, i).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |x: &[f64], d: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, o, dv, di) = (buf(&be, x), be.alloc(n).unwrap(), buf(&be, d), be.alloc(n).unwrap());
        be.tanh_fwd(o, i).unwrap();
        be.tanh_bwd(di, dv, o).unwrap();
        be.download_f64(di).unwrap()
    };
    check("tanh", &x, f, g);
    let drop = Dropout { p: 0.3, key: DropoutKey { seed: 1, step: 2, site: 3 } };
    let f = |x: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, o) = (buf(&be, x), be.alloc(n).unwrap());
        be.dropout_fwd(o, i, drop).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |_: &[f64], d: &[f64]| {
        let be = Cpu::<f64>::new();
        let (dv, di) = (buf(&be, d), be.alloc(n).unwrap());
        be.dropout_bwd(di, dv, drop).unwrap();
        be.download_f64(di).unwrap()
    };
    check("dropout", &x, f, g);
    let y = f(&x);
    let dropped = y.iter().filter(|v| **v == 0.0).count();
    assert!(dropped > 0 && dropped < n, "{y:?}");
    let (rows, cols) = (3, 4);
    let f = |b: &[f64]| {
        let be = Cpu::<f64>::new();
        let (o, bv) = (buf(&be, &vec![0.5; rows * cols]), buf(&be, b));
        be.add_bias(o, bv, rows, cols, cols).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |_: &[f64], d: &[f64]| {
        let be = Cpu::<f64>::new();
        let (dv, db) = (buf(&be, d), be.alloc(cols).unwrap());
        be.bias_grad(db, dv, rows, cols, cols).unwrap();
        be.download_f64(db).unwrap()
    };
    check("bias", &randn(5, cols, 1.0), f, g);
}

#[test]
fn attention_gradients_with_padding_and_dropout() {
    let (b, t, nh, hs) = (2, 5, 3, 2);
    let h = nh * hs;
    let mask: Vec<i32> = vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    for dropout in [None, Some(Dropout { p: 0.25, key: DropoutKey { seed: 5, step: 1, site: 0 } })] {
        let run = |x: &[f64], dout: Option<&[f64]>| {
            let be = Cpu::<f64>::new();
            let qkv = buf(&be, x);
            let m = be.alloc_ints(b * t).unwrap();
            be.upload_ints(m, &mask).unwrap();
            let (o, st) = (be.alloc(b * t * h).unwrap(), be.alloc(be.attention_state_len(b, t, nh)).unwrap());
            be.attention_fwd(o, st, qkv, m, b, t, nh, hs, dropout).unwrap();
            match dout {
                None => be.download_f64(o).unwrap(),
                Some(d) => {
                    let (dv, dq) = (buf(&be, d), be.alloc(b * t * 3 * h).unwrap());
                    be.attention_bwd(dq, dv, o, qkv, st, m, b, t, nh, hs, dropout).unwrap();
                    be.download_f64(dq).unwrap()
                }
            }
        };
        check(
            &format!("attention dropout={}", dropout.is_some()),
            &randn(6, b * t * 3 * h, 1.0),
            |x| run(x, None),
            |x, d| run(x, Some(d)),
        );
    }
}

#[test]
fn embeddings_gather_and_cross_entropy_gradients() {
    let (b, t, h, v, p, tv) = (2, 3, 4, 5, 6, 2);
    let ids = [1, 4, 4, 0, 2, 4];
    let types = [0, 0, 1, 1, 0, 1];
    let split = |x: &[f64]| (x[..v * h].to_vec(), x[v * h..(v + p) * h].to_vec(), x[(v + p) * h..].to_vec());
    let setup = |be: &Cpu<f64>| {
        let (i, ty) = (be.alloc_ints(b * t).unwrap(), be.alloc_ints(b * t).unwrap());
        be.upload_ints(i, &ids).unwrap();
        be.upload_ints(ty, &types).unwrap();
        (i, ty)
    };
    let f = |x: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, ty) = setup(&be);
        let (w, ps, tt) = split(x);
        let o = be.alloc(b * t * h).unwrap();
        be.embeddings_fwd(o, i, ty, buf(&be, &w), buf(&be, &ps), buf(&be, &tt), b, t, h).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |_: &[f64], d: &[f64]| {
        let be = Cpu::<f64>::new();
        let (i, ty) = setup(&be);
        let (dw, dp, dt) = (be.alloc(v * h).unwrap(), be.alloc(p * h).unwrap(), be.alloc(tv * h).unwrap());
        be.embeddings_bwd(dw, dp, dt, buf(&be, d), i, ty, b, t, h).unwrap();
        [be.download_f64(dw).unwrap(), be.download_f64(dp).unwrap(), be.download_f64(dt).unwrap()].concat()
    };
    check("embeddings", &randn(7, (v + p + tv) * h, 1.0), f, g);

    let rows = [2, 0, 2, 1];
    let f = |x: &[f64]| {
        let be = Cpu::<f64>::new();
        let r = be.alloc_ints(4).unwrap();
        be.upload_ints(r, &rows).unwrap();
        let o = be.alloc(4 * h).unwrap();
        be.gather_rows(o, buf(&be, x), r, 4, h).unwrap();
        be.download_f64(o).unwrap()
    };
    let g = |_: &[f64], d: &[f64]| {
        let be = Cpu::<f64>::new();
        let r = be.alloc_ints(4).unwrap();
        be.upload_ints(r, &rows).unwrap();
        let di = be.alloc(3 * h).unwrap();
        be.scatter_add_rows(di, buf(&be, d), r, 4, h).unwrap();
        be.download_f64(di).unwrap()
    };
    check("gather/scatter rows", &randn(8, 3 * h, 1.0), f, g);

    // Cross-entropy: the loss of each row, gradient written in place of the logits; -100 rows count 0.
    let (m, classes) = (4, 7);
    let labels = [3, IGNORE_INDEX, 0, 6];
    let run = |x: &[f64], scale: Option<f64>| {
        let be = Cpu::<f64>::new();
        let l = be.alloc_ints(m).unwrap();
        be.upload_ints(l, &labels).unwrap();
        let (z, loss) = (buf(&be, x), be.alloc(m).unwrap());
        be.cross_entropy(loss, z, l, (m, classes, classes), scale, None).unwrap();
        (be.download_f64(loss).unwrap(), be.download_f64(z).unwrap())
    };
    let x = randn(9, m * classes, 2.0);
    let (losses, _) = run(&x, None);
    assert_eq!(losses[1], 0.0);
    // L = Σ_rows loss_r: its gradient is the in-place output with scale 1.
    let f = |x: &[f64]| vec![run(x, None).0.iter().sum::<f64>()];
    let g = |x: &[f64], d: &[f64]| run(x, Some(1.0)).1.iter().map(|v| v * d[0]).collect();
    check("cross_entropy", &x, f, g);
}

fn small_config() -> ModelConfig {
    let mut c = common::small_model(23, 12, 3, 20, 16);
    c.num_hidden_layers = 2;
    c.initializer_range = 0.4;
    c
}

/// A padded batch of three sequences of lengths 7, 5 and 3, some labels ignored.
struct TestBatch {
    ids: Vec<u32>,
    types: Vec<u32>,
    mask: Vec<u8>,
    rows: Vec<u32>,
    labels: Vec<i32>,
    nsp: Vec<u32>,
}

fn test_batch() -> TestBatch {
    let t = 7;
    let lens = [7, 5, 3];
    let mut b = TestBatch {
        ids: vec![0; 21],
        types: vec![0; 21],
        mask: vec![0; 21],
        rows: vec![],
        labels: vec![],
        nsp: vec![0, 1, 1],
    };
    let mut r = KeyedRng::new(2, &[3]);
    for (s, &len) in lens.iter().enumerate() {
        for i in 0..len {
            b.ids[s * t + i] = 1 + r.below(22) as u32;
            b.types[s * t + i] = (i >= len / 2) as u32;
            b.mask[s * t + i] = 1;
        }
    }
    // head rows: some positions with labels, one ignored
    for (p, l) in [(1, 5), (3, 22), (8, 0), (9, IGNORE_INDEX), (15, 7), (16, 7)] {
        b.rows.push(p);
        b.labels.push(l);
    }
    b
}

fn inputs(b: &TestBatch) -> Inputs<'_> {
    Inputs {
        batch: 3,
        seq: 7,
        input_ids: &b.ids,
        token_type_ids: &b.types,
        attention_mask: &b.mask,
        head_rows: &b.rows,
        head_labels: Some(&b.labels),
        nsp_labels: Some(&b.nsp),
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    let c = small_config();
    let be = Cpu::<f64>::new();
    let mut plan = Capacity::new(3, 7);
    plan.logit_rows = 4; // the decoder in two chunks
    let model = Bert::new(&be, c.clone(), plan).unwrap();
    let table = ParamTable::new(&c);
    // Random everything, LayerNorm weights around 1.
    let mut params = randn(11, table.total, 0.4);
    for p in &table.params {
        if p.name.contains("LayerNorm.weight") {
            params[p.offset..p.offset + p.len].iter_mut().for_each(|x| *x += 1.0);
        }
    }
    let batch = test_batch();
    let inp = inputs(&batch);
    for train in [None, Some(Train { seed: 3, step: 7 })] {
        be.upload_f64(model.params, &params).unwrap();
        model.zero_grads().unwrap();
        let losses = model.step(&inp, StepOptions { train, ..StepOptions::grads() }).unwrap();
        assert!(losses.mlm.unwrap() > 0.0 && losses.nsp.unwrap() > 0.0);
        assert_eq!(losses.mlm_tokens, 5);
        let grads = be.download_f64(model.grads).unwrap();
        let loss_at = |p: &[f64]| {
            be.upload_f64(model.params, p).unwrap();
            model.step(&inp, StepOptions { train, ..StepOptions::eval() }).unwrap().total().unwrap()
        };
        let mut p = params.clone();
        let mut failures = Vec::new();
        for info in &table.params {
            let mut numeric = vec![0.0; info.len];
            for k in 0..info.len {
                let i = info.offset + k;
                let orig = p[i];
                p[i] = orig + H;
                let lp = loss_at(&p);
                p[i] = orig - H;
                let lm = loss_at(&p);
                p[i] = orig;
                numeric[k] = (lp - lm) / (2.0 * H);
            }
            let e = rel_err(&grads[info.offset..info.offset + info.len], &numeric);
            if e > 1e-6 {
                failures.push(format!("{} (train={}): relative error {e:e}", info.name, train.is_some()));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn gradients_accumulate_and_loss_scale_scales_them() {
    let c = small_config();
    let be = Cpu::<f64>::new();
    let model = Bert::new(&be, c.clone(), Capacity::new(3, 7)).unwrap();
    let table = ParamTable::new(&c);
    be.upload(model.params, &table.init(&c, 1)).unwrap();
    let batch = test_batch();
    let inp = inputs(&batch);
    model.zero_grads().unwrap();
    model.step(&inp, StepOptions::grads()).unwrap();
    let once = be.download_f64(model.grads).unwrap();
    model.step(&inp, StepOptions { loss_scale: 3.0, ..StepOptions::grads() }).unwrap();
    let sum = be.download_f64(model.grads).unwrap();
    for (a, b) in once.iter().zip(&sum) {
        assert!((b - 4.0 * a).abs() <= 1e-9 * (1.0 + a.abs()), "{a} {b}");
    }
    // The padding row of the word embeddings starts at zero, as HF's init.
    let w = table.get("bert.embeddings.word_embeddings.weight").unwrap();
    let params = table.init(&c, 1);
    assert!(params[w.offset..w.offset + c.hidden_size].iter().all(|&x| x == 0.0));
}
