//! The machinery of the tests that hold the CUDA backend to the CPU reference, shared by every op
//! family's tests (`src/ops/<family>.rs`) and the whole-model tests (tests/gpu.rs, which includes this
//! file). Every test body runs twice:
//! - `emu::<name>`, on the emulated device (the kernels compiled for the CPU, with the checker of
//!   out-of-bounds accesses, uninitialised reads and races): in every `cargo test`, on any machine;
//! - `gpu::<name>`, on a real GPU: `#[ignore]`d, run on the GPU machine with
//!   `cargo test --release --lib ops:: -- --ignored --test-threads=1` (the op families) and
//!   `cargo test --release --test gpu gpu:: -- --ignored --test-threads=1` (the whole model);
//!   scripts/gpu-check.sh runs these, the sanitizers and the benchmarks in one go.
//!
//! Each op runs on both backends with the same random inputs on odd shapes (batch 3, seq 37, hidden 48,
//! vocab 211, padding, ignored rows); outputs written with `=` are poisoned with NaN first, so an element
//! a kernel forgets shows. Tolerances (fp32): |gpu − cpu| ≤ atol + rtol·|cpu|, stated per test.
//!
//! Paths go through `bertcuda::` so that the file compiles both inside the library (its unit tests) and in
//! tests/gpu.rs.
#![allow(dead_code, unused_imports)]

#[path = "../../tests/common/mod.rs"]
pub mod common;

pub use common::randn;

pub use bertcuda::backend::cpu::Cpu;
pub use bertcuda::backend::cuda::Cuda;
use bertcuda::backend::device::emu::EmuOptions;
pub use bertcuda::backend::{Backend, Buf, Dropout, DropoutKey, Ints, Kind, Memory, IGNORE_INDEX};
pub use bertcuda::data::rng::KeyedRng;
pub use bertcuda::model::config::Activation;
pub use bertcuda::ops::Strides;

pub const B: usize = 3;
pub const T: usize = 37;
pub const H: usize = 48;
pub const NH: usize = 3; // head size 16
pub const V: usize = 211;

thread_local! {
    /// Whether this test thread's body runs on the emulated device (set by the `emu::` wrappers).
    static EMULATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run this thread's test body on the emulated device (the `emu::` wrappers call it).
pub fn emulate_this_thread() {
    EMULATED.with(|e| e.set(true));
}

pub fn emulated() -> bool {
    EMULATED.with(|e| e.get())
}

/// The device under test: the emulated one (checker on) or GPU 0.
pub fn gpu() -> Cuda {
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
pub fn device_name() -> &'static str {
    if emulated() {
        "emu"
    } else {
        "cuda"
    }
}

/// Each body as `emu::<name>` (every run) and `gpu::<name>` (ignored: needs a CUDA GPU). The calling
/// module imports this file's items (`emulate_this_thread`).
macro_rules! on_both_devices {
    ($($name:ident),* $(,)?) => {
        mod emu {
            $(
                #[test]
                fn $name() {
                    super::emulate_this_thread();
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
pub struct Case {
    pub floats: Vec<Vec<f32>>,
    pub ints: Vec<Vec<i32>>,
    pub outs: Vec<(usize, Option<Vec<f32>>)>,
}

pub type Op<'a> = &'a dyn Fn(&dyn Backend, &[Buf], &[Ints], &[Buf]) -> bertcuda::Result<()>;

pub fn run(be: &dyn Backend, c: &Case, op: Op) -> Vec<Vec<f32>> {
    run_kinds(be, c, &[], &[], op)
}

/// `run`, allocating each input and output as the kind given (fp32 statistics where none is).
pub fn run_kinds(be: &dyn Backend, c: &Case, kinds: &[Kind], out_kinds: &[Kind], op: Op) -> Vec<Vec<f32>> {
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
pub fn same(what: &str, c: &Case, atol: f32, rtol: f32, op: Op) {
    let (cpu, gpu_) = (Cpu::<f32>::new(), gpu());
    let want = run(&cpu, c, op);
    let got = run(&gpu_, c, op);
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        for (j, (a, b)) in w.iter().zip(g).enumerate() {
            assert!(
                a == b || (a - b).abs() <= atol + rtol * a.abs() || (a.is_nan() && b.is_nan()),
                "{what}: output {k}[{j}]: cpu {a} vs gpu {b}"
            );
        }
    }
}

/// The CPU in fp32 against the GPU with bf16 activations: each output within `tol` of its largest
/// element (bf16 keeps 8 bits of mantissa; inputs are rounded to it on upload).
pub fn same_bf16(what: &str, c: &Case, kinds: &[Kind], out_kinds: &[Kind], tol: f32, op: Op) {
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

/// The padding mask of the test batch: sequences of 37, 20 and 1 tokens.
pub fn mask() -> Vec<i32> {
    let lens = [37, 20, 1];
    (0..B * T).map(|r| ((r % T) < lens[r / T]) as i32).collect()
}
