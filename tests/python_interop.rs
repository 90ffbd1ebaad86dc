//! Interoperability with transformers, run where python3 has it (`BERTCUDA_PYTHON` names the interpreter,
//! default `python3`):  cargo test --test python_interop -- --ignored

use std::path::Path;
use std::process::Command;

use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};

fn python() -> String {
    std::env::var("BERTCUDA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Run a Python snippet with arguments; its stdout.
fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().expect("python3 runs");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const TEXTS: [&str; 6] = [
    "Ownership is Rust's most unique feature.",
    "Café résumé naïve ÀÉÎ",
    "北京欢迎你 and 東京",
    "a [MASK] token, and a long supercalifragilisticexpialidociously word",
    "tab\there and  spaces",
    "",
];

#[test]
#[ignore = "needs python3 with transformers"]
fn transformers_auto_tokenizer_loads_a_trained_tokenizer_and_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/rust-book.txt");
    for lower in [true, false] {
        let dir = tmp.path().join(format!("tok-{lower}"));
        let mut args = vec![
            "tokenizer",
            "train",
            "--input",
            corpus.to_str().unwrap(),
            "--vocab-size",
            "2000",
            "--output",
            dir.to_str().unwrap(),
        ];
        if !lower {
            args.push("--no-lowercase");
        }
        let st = Command::new(env!("CARGO_BIN_EXE_bertcuda")).args(&args).status().unwrap();
        assert!(st.success());
        let ours = BertTokenizer::load(&dir, LoadOptions::default()).unwrap();
        assert_eq!(ours.do_lower_case, lower);
        let code = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
out = [tok(t)["input_ids"] for t in texts] + [tok(texts[0], texts[1])["input_ids"], tok(texts[0], texts[1])["token_type_ids"]]
print(json.dumps(out))
"#;
        let texts = serde_json::to_string(&TEXTS).unwrap();
        let theirs: Vec<Vec<u32>> =
            serde_json::from_str(&run_python(code, &[dir.to_str().unwrap(), &texts])).unwrap();
        for (i, t) in TEXTS.iter().enumerate() {
            assert_eq!(ours.encode_with_specials(t, None).unwrap().0, theirs[i], "lower={lower} {t:?}");
        }
        let (ids, types) = ours.encode_with_specials(TEXTS[0], Some(TEXTS[1])).unwrap();
        assert_eq!(ids, theirs[TEXTS.len()]);
        assert_eq!(types, theirs[TEXTS.len() + 1]);
    }
}

fn read_tensors(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (n, (t.shape().to_vec(), v))
        })
        .collect()
}

/// max |a − b| / max |b|. A tensor whose true gradient is zero (the key bias: softmax ignores a constant
/// added to every score of a row) holds rounding noise on both sides: there the scale is 1 (absolute).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if scale < 1e-6 { 1.0 } else { scale };
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
#[ignore = "needs python3 with torch and transformers"]
fn outputs_losses_and_every_gradient_equal_transformers_bert_for_pretraining() {
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/hf_reference.py");
    let st = Command::new(python()).arg(&script).arg(tmp.path()).status().unwrap();
    assert!(st.success());
    let dump = tmp.path().join("ours.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args(["forward", "--model"])
        .arg(tmp.path().join("model"))
        .arg("--batch")
        .arg(tmp.path().join("batch.json"))
        .arg("--dump")
        .arg(&dump)
        .arg("--grads")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let losses: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs = read_tensors(&tmp.path().join("reference.safetensors"));
    let ours = read_tensors(&dump);
    let want = &theirs["loss"].1;
    for (k, key) in ["loss", "mlm_loss", "nsp_loss"].iter().enumerate() {
        let got = losses[key].as_f64().unwrap() as f32;
        assert!((got - want[k]).abs() <= 1e-4 * want[k].abs(), "{key}: {got} vs {}", want[k]);
    }
    let mut compared = 0;
    for (name, (shape, want)) in &theirs {
        if name == "loss" {
            continue;
        }
        let (s, got) = ours.get(name).unwrap_or_else(|| panic!("{name} missing from bertcuda's dump"));
        assert_eq!(s, shape, "{name}");
        let e = rel(got, want);
        assert!(e <= 1e-4, "{name}: relative error {e:e}");
        compared += 1;
    }
    assert!(compared > 40, "{compared}");
}
