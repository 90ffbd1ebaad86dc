//! The emulated device proves that it catches bugs: every planted bug of kernels/emu/mutants.txt (a copy
//! of a kernel with one deliberate mistake — a missing barrier, an off-by-one bound, a wrong shuffle lane,
//! a wrong shared-memory index, overlapping blocks) runs through the CUDA backend's own launches and must
//! be reported by the checker or the emulator, or fail the comparison with the CPU reference. The same
//! scenarios on the unchanged kernels must pass clean. Then the emulator's own primitives: conversions,
//! launch limits, argument checking, block orders.

mod common;

use bertcuda::backend::cpu::Cpu;
use bertcuda::backend::cuda::Cuda;
use bertcuda::backend::device::emu::{self, BlockOrder, Emu, EmuOptions};
use bertcuda::backend::device::{Device, Launch};
use bertcuda::backend::{Backend, Dropout, DropoutKey, Kind, IGNORE_INDEX};
use bertcuda::model::config::Activation;
use common::randn;

fn emulated(planted_bug: Option<&str>, order: BlockOrder) -> Cuda {
    assert!(
        emu::checker_built(),
        "the emulator's checker is not built: build.rs needs clang++ (scripts/install-emulator-compiler.sh)"
    );
    let opts = EmuOptions { check: true, order, planted_bug: planted_bug.map(String::from) };
    Cuda::emulated(opts).expect("the emulated device")
}

fn upload(be: &dyn Backend, v: &[f32]) -> bertcuda::Result<bertcuda::backend::Buf> {
    let b = be.alloc(v.len())?;
    be.upload(b, v)?;
    Ok(b)
}

fn upload_ints(be: &dyn Backend, v: &[i32]) -> bertcuda::Result<bertcuda::backend::Ints> {
    let b = be.alloc_ints(v.len())?;
    be.upload_ints(b, v)?;
    Ok(b)
}

/// Runs one scenario on a backend: the ops that exercise a kernel family, on odd shapes; its outputs.
fn scenario(be: &dyn Backend, name: &str) -> bertcuda::Result<Vec<Vec<f32>>> {
    let get = |bufs: &[bertcuda::backend::Buf]| bufs.iter().map(|b| be.download(*b)).collect();
    match name {
        "attention" => {
            // Two blocks of query rows per (batch, head), padding, dropout.
            let (b, t, nh, hs) = (2, 70, 3, 16);
            let h = nh * hs;
            let lens = [70, 33];
            let mask: Vec<i32> = (0..b * t).map(|r| ((r % t) < lens[r / t]) as i32).collect();
            let d = Some(Dropout { p: 0.1, key: DropoutKey { seed: 5, step: 9, site: 2 } });
            let qkv = upload(be, &randn(1, b * t * 3 * h, 1.0))?;
            let dout = upload(be, &randn(2, b * t * h, 1.0))?;
            let m = upload_ints(be, &mask)?;
            let (out, dqkv) = (be.alloc(b * t * h)?, be.alloc(b * t * 3 * h)?);
            let state = be.alloc(be.attention_state_len(b, t, nh))?;
            be.attention_fwd(out, state, qkv, m, b, t, nh, hs, d)?;
            be.attention_bwd(dqkv, dout, out, qkv, state, m, b, t, nh, hs, d)?;
            get(&[out, dqkv]) // (the backward's saved state is each backend's own)
        }
        "attention_tc" => {
            // The tensor-core forward (bf16, head size 64): two query blocks and two key tiles, padding,
            // dropout. The CPU reference computes in fp32 (it refuses bf16) from the same bf16-exact inputs.
            let _ = be.set_precision("bf16");
            let (b, t, nh, hs) = (2, 100, 2, 64);
            let h = nh * hs;
            let lens = [100, 61];
            let mask: Vec<i32> = (0..b * t).map(|r| ((r % t) < lens[r / t]) as i32).collect();
            let d = Some(Dropout { p: 0.1, key: DropoutKey { seed: 5, step: 9, site: 2 } });
            let bf16 = |v: Vec<f32>| -> Vec<f32> {
                v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
            };
            let qkv = be.alloc_kind(b * t * 3 * h, Kind::Activation)?;
            be.upload(qkv, &bf16(randn(1, b * t * 3 * h, 1.0)))?;
            let m = upload_ints(be, &mask)?;
            let dout = be.alloc_kind(b * t * h, Kind::Activation)?;
            be.upload(dout, &bf16(randn(2, b * t * h, 1.0)))?;
            let out = be.alloc_kind(b * t * h, Kind::Activation)?;
            let dqkv = be.alloc_kind(b * t * 3 * h, Kind::Activation)?;
            let state = be.alloc(be.attention_state_len(b, t, nh))?;
            be.attention_fwd(out, state, qkv, m, b, t, nh, hs, d)?;
            // The backward recomputes the probabilities from the forward's log-sum-exp.
            be.attention_bwd(dqkv, dout, out, qkv, state, m, b, t, nh, hs, d)?;
            get(&[out, dqkv])
        }
        "layernorm" => {
            let (rows, c) = (111, 200); // every lane holds part of a row (200 = 50 vectors of 4)
            let x = upload(be, &randn(3, rows * c, 1.0))?;
            let (w, bias) = (upload(be, &randn(4, c, 1.0))?, upload(be, &randn(5, c, 1.0))?);
            let g = upload(be, &randn(6, rows * c, 1.0))?;
            let (out, mean, rstd, dx) =
                (be.alloc(rows * c)?, be.alloc(rows)?, be.alloc(rows)?, be.alloc(rows * c)?);
            let (dw, db) = (be.alloc(c)?, be.alloc(c)?);
            be.layernorm_fwd(out, mean, rstd, x, w, bias, rows, c, 1e-12)?;
            be.layernorm_bwd(dx, dw, db, g, x, mean, rstd, w, rows, c)?;
            get(&[out, mean, rstd, dx, dw, db])
        }
        "cross_entropy" => {
            // 211 classes in rows of 211 (most rows start off a 16-byte boundary), then in rows 256 apart
            // as the MLM logits' are padded (the padding random: left as it was).
            let (m, v) = (17, 211);
            let mut labels: Vec<i32> = (0..m as i32).map(|k| (k * 37) % v as i32).collect();
            labels[3] = IGNORE_INDEX;
            let l = upload_ints(be, &labels)?;
            let loss_scale = upload(be, &[4.0])?; // on the device, as training keeps it under fp16
            let mut outs = Vec::new();
            for ld in [v, 256] {
                let z = upload(be, &randn(7, m * ld, 3.0))?;
                let losses = be.alloc(m)?;
                be.cross_entropy(losses, z, l, (m, v, ld), Some(1.0 / 15.0), Some(loss_scale))?;
                outs.extend(get(&[losses, z])?);
            }
            Ok(outs)
        }
        "argmax" => {
            let (m, v) = (17, 211);
            let mut outs = Vec::new();
            for ld in [v, 256] {
                let z = upload(be, &randn(8, m * ld, 1.0))?;
                let out = be.alloc_ints(m)?;
                be.argmax_rows(out, z, (m, v, ld))?;
                outs.push(be.download_ints(out)?.into_iter().map(|i| i as f32).collect());
            }
            Ok(outs)
        }
        "bias" => {
            // An odd width in rows further apart (the padding random: left as it was).
            let (rows, cols, ld) = (37, 53, 64);
            let out = upload(be, &randn(32, rows * ld, 1.0))?;
            let (bias, dout) = (upload(be, &randn(33, cols, 1.0))?, upload(be, &randn(34, rows * ld, 1.0))?);
            let dbias = upload(be, &randn(35, cols, 1.0))?;
            be.add_bias(out, bias, rows, cols, ld)?;
            be.bias_grad(dbias, dout, rows, cols, ld)?;
            get(&[out, dbias])
        }
        "add" => {
            let n = 1001; // 250 vectors of 4 and a tail of 1
            let (a, b) = (upload(be, &randn(9, n, 1.0))?, upload(be, &randn(10, n, 1.0))?);
            let out = be.alloc(n)?;
            be.add(out, a, b)?;
            get(&[out])
        }
        "embedding" => {
            let (b, t, h, v) = (3, 37, 48, 211);
            let ids: Vec<i32> = (0..b * t).map(|k| ((k * 7919) % 23) as i32).collect(); // many repeats
            let types: Vec<i32> = (0..b * t).map(|k| ((k % t) > t / 2) as i32).collect();
            let (i, ty) = (upload_ints(be, &ids)?, upload_ints(be, &types)?);
            let g = upload(be, &randn(11, b * t * h, 1.0))?;
            let (dw, dp, dt) = (be.alloc(v * h)?, be.alloc(t * h)?, be.alloc(2 * h)?);
            be.embeddings_bwd(dw, dp, dt, g, i, ty, b, t, h)?;
            get(&[dw, dp, dt])
        }
        "adamw" | "lamb" => {
            // Tensors of two chunks (OPTIMIZER_CHUNK 8192), a short one, one whose start is not 16-byte
            // aligned, a bias, a decayed tensor at zero; three steps, the second not finite (skipped, the
            // loss scale halved), clipped, the scaler doubling after two good steps.
            let tensors = common::flat_tensors(&[(9_000, true), (5, true), (777, false), (300, true)]);
            let n: usize = tensors.iter().map(|t| t.len).sum();
            let mut init = randn(14, n, 0.1);
            init[n - 300..].fill(0.0);
            let p = upload(be, &init)?;
            let mut grads: Vec<Vec<f32>> = (0..3).map(|k| randn(15 + k, n, 1.0)).collect();
            grads[1][9_003] = f32::NAN;
            let lamb = name == "lamb";
            let opt = common::test_optimizer(be, lamb, if lamb { 0.01 } else { 0.1 }, &tensors)?;
            let control = common::optimizer_steps(be, &opt, p, &grads, &[1e-2, 2e-2, 3e-2], (1.0, 4.0, 2))?;
            let (m, v) = opt.moments();
            let counters = be.download_ints(control.counters)?;
            let mut out: Vec<Vec<f32>> = get(&[p, m, v, control.stats])?;
            out.push(counters.iter().map(|&k| k as f32).collect());
            Ok(out)
        }
        "scatter" => {
            let (n, m, c) = (111, 17, 48);
            let rows: Vec<i32> = (0..m as i32).map(|k| k * 5 + 1).collect();
            let r = upload_ints(be, &rows)?;
            let d = upload(be, &randn(14, n * c, 1.0))?;
            let g = upload(be, &randn(15, m * c, 1.0))?;
            be.scatter_add_rows(d, g, r, m, c)?;
            get(&[d])
        }
        "bias_gelu" => {
            let (rows, cols) = (111, 80);
            let pre = upload(be, &randn(14, rows * cols, 1.0))?;
            let bias = upload(be, &randn(15, cols, 1.0))?;
            let out = be.alloc(rows * cols)?;
            be.bias_gelu_fwd(pre, out, bias, rows, cols, Activation::GeluErf)?;
            get(&[pre, out])
        }
        "gelu_bias" => {
            let (rows, cols) = (111, 80);
            let pre = upload(be, &randn(16, rows * cols, 1.0))?;
            let g = upload(be, &randn(17, rows * cols, 1.0))?;
            let (dpre, db) = (be.alloc(rows * cols)?, be.alloc(cols)?);
            be.gelu_bias_bwd(dpre, db, g, pre, rows, cols, Activation::GeluErf)?;
            get(&[dpre, db])
        }
        "residual_layernorm_bwd" => {
            let (rows, c) = (111, 200); // every lane holds part of a row (200 = 50 vectors of 4)
            let x = upload(be, &randn(18, rows * c, 1.0))?;
            let (w, bias) = (upload(be, &randn(19, c, 1.0))?, upload(be, &randn(20, c, 1.0))?);
            let (out, mean, rstd) = (be.alloc(rows * c)?, be.alloc(rows)?, be.alloc(rows)?);
            be.layernorm_fwd(out, mean, rstd, x, w, bias, rows, c, 1e-12)?;
            let g = upload(be, &randn(21, rows * c, 1.0))?;
            let (ds, dw, db) = (be.alloc(rows * c)?, be.alloc(c)?, be.alloc(c)?);
            let d = Dropout { p: 0.1, key: DropoutKey { seed: 1, step: 2, site: 3 } };
            be.residual_layernorm_bwd(ds, dw, db, g, x, mean, rstd, w, rows, c, d)?;
            get(&[ds, g, dw, db])
        }
        other => panic!("no scenario {other}"),
    }
}

/// The tensor-core check (kernels/mma_check.cu: one m16n8k16 tile, fragments loaded by hand and by
/// ldmatrix) on a device: both results, one after the other.
fn mma_scenario(dev: &dyn Device) -> bertcuda::Result<Vec<Vec<f32>>> {
    let (a, bt, c) = mma_inputs();
    let up = |bytes: &[u8]| -> bertcuda::Result<bertcuda::backend::device::Mem> {
        let m = dev.alloc(bytes.len(), false)?;
        dev.htod(m.ptr, bytes)?;
        Ok(m)
    };
    let (ma, mb, mc) =
        (up(bytemuck::cast_slice(&a))?, up(bytemuck::cast_slice(&bt))?, up(bytemuck::cast_slice(&c))?);
    let md = dev.alloc(4 * 16 * 8, false)?;
    let k = dev.kernel("mma_tile_check")?;
    let mut out = Vec::new();
    for via_ldmatrix in [0i32, 1] {
        dev.launch(k, Launch::new((1, 1, 1), 32), &[&md.ptr, &ma.ptr, &mb.ptr, &mc.ptr, &via_ldmatrix])?;
        let mut d = vec![0f32; 16 * 8];
        dev.dtoh(bytemuck::cast_slice_mut(&mut d), md.ptr)?;
        out.push(d);
    }
    Ok(out)
}

fn mma_inputs() -> (Vec<half::bf16>, Vec<half::bf16>, Vec<f32>) {
    let bf = |v: Vec<f32>| v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>();
    (bf(randn(40, 16 * 16, 1.0)), bf(randn(41, 8 * 16, 1.0)), randn(42, 16 * 8, 1.0))
}

/// D = A·B + C of `mma_inputs` in f64, twice (as `mma_scenario` returns it).
fn mma_reference() -> Vec<Vec<f32>> {
    let (a, bt, c) = mma_inputs();
    let d: Vec<f32> = (0..16 * 8)
        .map(|e| {
            let (i, j) = (e / 8, e % 8);
            let s: f64 = (0..16).map(|k| a[i * 16 + k].to_f64() * bt[j * 16 + k].to_f64()).sum();
            (c[e] as f64 + s) as f32
        })
        .collect();
    vec![d.clone(), d]
}

/// A scenario's CPU reference, and its outcome on the emulated device (with a planted bug, or none).
fn run_both(
    name: &str,
    planted_bug: Option<&str>,
    order: BlockOrder,
) -> (Vec<Vec<f32>>, bertcuda::Result<Vec<Vec<f32>>>) {
    if name == "mma" {
        let opts = EmuOptions { check: true, order, planted_bug: planted_bug.map(String::from) };
        let dev = Emu::new(opts).expect("the emulated device");
        return (mma_reference(), mma_scenario(&dev));
    }
    (scenario(&Cpu::<f32>::new(), name).unwrap(), scenario(&emulated(planted_bug, order), name))
}

/// The first output element that differs from the CPU's beyond rounding, described: fp32's, or for a
/// scenario in bf16 (`_tc`) 2% of the output's largest element (bf16 keeps 8 bits of mantissa).
fn difference(scenario: &str, want: &[Vec<f32>], got: &[Vec<f32>]) -> Option<String> {
    for (k, (w, g)) in want.iter().zip(got).enumerate() {
        let largest = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (atol, rtol) = if scenario.ends_with("_tc") { (2e-2 * largest, 0.0) } else { (1e-4, 1e-4) };
        for (j, (a, b)) in w.iter().zip(g).enumerate() {
            if !((a - b).abs() <= atol + rtol * a.abs() || (a.is_nan() && b.is_nan())) {
                return Some(format!("output {k}[{j}]: cpu {a} vs emulated {b}"));
            }
        }
    }
    None
}

struct Planted {
    name: String,
    scenario: String,
    caught_as: String,
}

fn planted_bugs() -> Vec<Planted> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/emu/mutants.txt")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split(" | ").map(str::trim).collect();
            Planted { name: f[0].into(), scenario: f[6].into(), caught_as: f[7].into() }
        })
        .collect()
}

#[test]
fn every_scenario_passes_clean_on_the_real_kernels_in_every_block_order() {
    let mut scenarios: Vec<String> = planted_bugs().into_iter().map(|p| p.scenario).collect();
    scenarios.sort();
    scenarios.dedup();
    for s in &scenarios {
        for order in [BlockOrder::Forward, BlockOrder::Reverse, BlockOrder::Shuffled] {
            let (want, got) = run_both(s, None, order);
            let got = got.unwrap_or_else(|e| panic!("{s} ({order:?}): {e}"));
            assert_eq!(difference(s, &want, &got), None, "{s} ({order:?})");
        }
    }
}

#[test]
fn every_planted_bug_is_caught() {
    let bugs = planted_bugs();
    assert!(bugs.len() >= 19, "kernels/emu/mutants.txt lists {} planted bugs", bugs.len());
    let mut missed = Vec::new();
    for bug in &bugs {
        let (want, outcome) = run_both(&bug.scenario, Some(&bug.name), BlockOrder::Forward);
        let caught = match (&outcome, bug.caught_as.as_str()) {
            (Ok(got), "wrong") => difference(&bug.scenario, &want, got).is_some(),
            (Err(_), "wrong") => true,
            (Err(e), kinds) => kinds.split(" or ").any(|k| e.to_string().contains(k)),
            (Ok(_), _) => false,
        };
        if !caught {
            missed.push(format!(
                "{} (expected: {}): {:?}",
                bug.name,
                bug.caught_as,
                outcome.err().map(|e| e.to_string())
            ));
        }
    }
    assert!(missed.is_empty(), "planted bugs not caught:\n{}", missed.join("\n"));
}

#[test]
fn reports_name_the_kernel_the_thread_and_the_address() {
    let cpu = Cpu::<f32>::new();
    let _ = scenario(&cpu, "layernorm").unwrap();
    let e =
        scenario(&emulated(Some("layernorm_partials_past_the_last_row"), BlockOrder::Forward), "layernorm")
            .unwrap_err()
            .to_string();
    assert!(e.contains("/layernorm_param_partial_bwd_f32, block (1,0,0), thread ("), "{e}");
    assert!(e.contains("out of bounds: read of 4 bytes at device address 0x"), "{e}");
    assert!(e.contains("byte offset"), "{e}");
    let e =
        scenario(&emulated(Some("attention_fwd_no_barrier_after_tile"), BlockOrder::Forward), "attention")
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("/attention_fwd_f32_hs16, block (0,0,0), thread (") && e.contains("shared memory byte"),
        "{e}"
    );
}

#[test]
fn conversions_round_to_nearest_even_like_the_device() {
    // Every 2^16-th bit pattern plus the edges: bf16 and fp16 against the `half` crate (round to nearest
    // even; the device's NaN is 0x7fff).
    let mut xs: Vec<f32> = (0..=u32::MAX).step_by(65_521).map(f32::from_bits).collect();
    xs.extend([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 5.96e-8, 2.98e-8, 2.9802322e-8, f32::INFINITY]);
    xs.extend([f32::MIN_POSITIVE, 6.1035156e-5, 6.097555e-5, 1.0 + f32::EPSILON, 3.0e38, -3.4e38]);
    for x in xs {
        let (b, h) = (emu::f32_to_bf16_bits(x), emu::f32_to_f16_bits(x));
        if x.is_nan() {
            assert_eq!((b, h), (0x7fff, 0x7fff), "NaN {:#x}", x.to_bits());
            continue;
        }
        assert_eq!(b, half::bf16::from_f32(x).to_bits(), "bf16 of {x:e} ({:#x})", x.to_bits());
        assert_eq!(h, half::f16::from_f32(x).to_bits(), "fp16 of {x:e} ({:#x})", x.to_bits());
        let back = emu::f16_bits_to_f32(h);
        assert_eq!(back.to_bits(), half::f16::from_bits(h).to_f32().to_bits(), "fp16 {h:#x} widened");
    }
}

#[test]
fn launch_limits_and_argument_lists_are_errors_as_on_the_device() {
    let dev = Emu::new(EmuOptions::from_env()).unwrap();
    let k = dev.kernel("fill_f32").unwrap();
    let buf = dev.alloc(4 * 64, false).unwrap();
    let (p, n, v) = (buf.ptr, 64i64, 1.5f32);
    let ok = Launch::new((1, 1, 1), 64);
    dev.launch(k, ok, &[&p, &n, &v]).unwrap();
    let mut back = vec![0f32; 64];
    dev.dtoh(bytemuck::cast_slice_mut(&mut back), p).unwrap();
    assert!(back.iter().all(|&x| x == 1.5));
    let err = |l: Launch, args: &[&dyn bertcuda::backend::device::KernelArg]| {
        dev.launch(k, l, args).unwrap_err().to_string()
    };
    assert!(err(Launch::new((1, 1, 1), 1025), &[&p, &n, &v]).contains("at most 1024 threads"));
    assert!(err(Launch { block: (32, 32, 2), ..ok }, &[&p, &n, &v]).contains("at most 1024 threads"));
    assert!(err(Launch::new((0, 1, 1), 64), &[&p, &n, &v]).contains("invalid grid"));
    assert!(err(Launch::new((1, 65_536, 1), 64), &[&p, &n, &v]).contains("invalid grid"));
    assert!(
        err(Launch { shared: 48 * 1024 + 1, ..ok }, &[&p, &n, &v]).contains("needs the MAX_DYNAMIC_SHARED")
    );
    dev.set_max_dynamic_shared(k, 100 * 1024).unwrap();
    dev.launch(k, Launch { shared: 100 * 1024, ..ok }, &[&p, &n, &v]).unwrap();
    assert!(dev.set_max_dynamic_shared(k, 300 * 1024).is_err());
    assert!(err(ok, &[&p, &n]).contains("launched with 2 arguments, it takes 3"));
    let n32 = 64i32;
    assert!(err(ok, &[&p, &n32, &v]).contains("argument 1 is 4 bytes, the parameter is 8"));
    assert!(dev.kernel("no_such_kernel").unwrap_err().to_string().contains("no_such_kernel"));
    // A copy outside an allocation is refused, naming it.
    let e = dev.htod(p + 4 * 60, &[0u8; 32]).unwrap_err().to_string();
    assert!(e.contains("not inside one live allocation"), "{e}");
}

#[test]
fn an_unwritten_scratch_buffer_read_by_a_kernel_is_reported() {
    // Device memory allocated without zeroing and never written, read by a kernel: initcheck's report.
    let dev = Emu::new(EmuOptions { check: true, ..EmuOptions::from_env() }).unwrap();
    let k = dev.kernel("add_f32").unwrap();
    let (out, a, b) = (
        dev.alloc(4 * 40, false).unwrap(),
        dev.alloc(4 * 40, true).unwrap(),
        dev.alloc(4 * 40, false).unwrap(),
    );
    dev.htod(b.ptr, bytemuck::cast_slice(&[1f32; 39])).unwrap(); // the last element stays unwritten
    let n = 40i64;
    let e =
        dev.launch(k, Launch::new((1, 1, 1), 64), &[&out.ptr, &a.ptr, &b.ptr, &n]).unwrap_err().to_string();
    // add reads 16-byte vectors of 4: thread 9's holds elements 36..39, the last unwritten.
    assert!(e.contains("uninitialised: read of 16 bytes") && e.contains("thread (9,0,0)"), "{e}");
    let n = 39i64;
    dev.launch(k, Launch::new((1, 1, 1), 64), &[&out.ptr, &a.ptr, &b.ptr, &n]).unwrap();
}
