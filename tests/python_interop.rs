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

/// A tiny run of `bertcuda train` on shards of the sample corpus; its output directory.
fn tiny_run(tmp: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = tmp.join("tok");
    let shards = tmp.join("shards");
    let out = tmp.join("run");
    let sample = root.join("data/sample/rust-book.txt");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_bertcuda")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "tokenizer",
        "train",
        "--input",
        sample.to_str().unwrap(),
        "--vocab-size",
        "1000",
        "--output",
        tok.to_str().unwrap(),
    ]);
    run(&[
        "prepare",
        "--input",
        sample.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--output",
        shards.to_str().unwrap(),
        "--quiet",
    ]);
    run(&[
        "train",
        "--data",
        shards.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--model-config",
        "tiny",
        "--max-steps",
        "6",
        "--per-device-batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--save-steps",
        "3",
        "--logging-steps",
        "1",
        "--quiet",
    ]);
    out
}

#[test]
#[ignore = "needs python3 with torch and transformers"]
fn transformers_loads_a_train_checkpoint_with_the_same_mlm_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(tmp.path());
    let batch = tmp.path().join("batch.json");
    std::fs::write(&batch, r#"{"input_ids": [[2, 40, 41, 4, 42, 3, 43, 44, 3], [2, 50, 4, 51, 3, 52, 3, 0, 0]],
        "token_type_ids": [[0,0,0,0,0,0,1,1,1],[0,0,0,0,0,1,1,0,0]], "attention_mask": [[1,1,1,1,1,1,1,1,1],[1,1,1,1,1,1,1,0,0]]}"#)
        .unwrap();
    for dir in [out.join("checkpoint-000003"), out.clone()] {
        let dump = tmp.path().join("ours.safetensors");
        let o = Command::new(env!("CARGO_BIN_EXE_bertcuda"))
            .args([
                "forward",
                "--model",
                dir.to_str().unwrap(),
                "--batch",
                batch.to_str().unwrap(),
                "--dump",
                dump.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let code = r#"
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertForPreTraining
model = BertForPreTraining.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
AutoTokenizer.from_pretrained(sys.argv[1])
b = json.load(open(sys.argv[2]))
with torch.no_grad():
    o = model(**{k: torch.tensor(v) for k, v in b.items()})
save_file({"prediction_logits": o.prediction_logits.contiguous(), "seq_relationship_logits": o.seq_relationship_logits.contiguous()}, sys.argv[3])
"#;
        let theirs_path = tmp.path().join("theirs.safetensors");
        run_python(code, &[dir.to_str().unwrap(), batch.to_str().unwrap(), theirs_path.to_str().unwrap()]);
        let (ours, theirs) = (read_tensors(&dump), read_tensors(&theirs_path));
        for k in ["prediction_logits", "seq_relationship_logits"] {
            let e = rel(&ours[k].1, &theirs[k].1);
            assert!(e <= 1e-4, "{}: {k}: relative error {e:e}", dir.display());
        }
    }
}

#[test]
#[ignore = "needs python3 with tensorboard"]
fn tensorboard_reads_the_event_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tiny_run(tmp.path());
    let code = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1]); acc.Reload()
tags = acc.Tags()["scalars"]
loss = acc.Scalars("train/loss")
print(len(loss), ",".join(sorted(tags)))
"#;
    let out = run_python(code, &[out.join("runs").to_str().unwrap()]);
    let (n, tags) = out.trim().split_once(' ').unwrap();
    assert_eq!(n, "6");
    for t in [
        "train/loss",
        "train/mlm_loss",
        "train/nsp_loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/loss_scale",
    ] {
        assert!(tags.split(',').any(|x| x == t), "{t} missing from {tags}");
    }
}

#[test]
#[ignore = "needs python3 with torch and transformers"]
fn transformers_loads_what_convert_writes_from_every_format() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats");
    let tmp = tempfile::tempdir().unwrap();
    let code = r#"
import json, sys, torch
from transformers import AutoTokenizer, BertForPreTraining
model = BertForPreTraining.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
e = json.load(open(sys.argv[2]))
want = e[sys.argv[3]]
b = {k: torch.tensor(v) for k, v in e["batch"].items() if k in ("input_ids", "token_type_ids", "attention_mask")}
with torch.no_grad():
    o = model.double()(**b)
got = o.prediction_logits.flatten()
ref = torch.tensor(want["prediction_logits"], dtype=torch.float64)
err = ((got - ref).abs() / ref.abs().clamp(min=1)).max().item()
print(err, tok("the of", "it")["input_ids"] == [3, 6, 8, 4, 13, 4])
"#;
    for (fixture, precision) in [
        ("hf-zip", "fp32"),
        ("hf-legacy", "fp32"),
        ("hf-sharded-fp16", "fp16"),
        ("hf-bf16", "bf16"),
        ("uncased_L-2_H-20_A-4", "fp32"),
        ("nvidia", "fp32"),
    ] {
        let dst = tmp.path().join(fixture);
        let st = Command::new(env!("CARGO_BIN_EXE_bertcuda"))
            .args(["convert", fixtures.join(fixture).to_str().unwrap(), dst.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "{fixture}");
        let out = run_python(
            code,
            &[dst.to_str().unwrap(), fixtures.join("expected.json").to_str().unwrap(), precision],
        );
        let (err, ids) = out.trim().split_once(' ').unwrap();
        let err: f64 = err.parse().unwrap();
        // float64 in transformers on the converted weights: the model the fixture was made from, exactly.
        assert!(err <= 1e-9, "{fixture}: transformers' logits on the converted model differ by {err:e}");
        assert_eq!(ids, "True", "{fixture}: the converted tokenizer gives other ids");
    }
}

#[test]
#[ignore = "needs python3 with torch"]
fn python_unpickling_the_refused_fixture_runs_its_command() {
    // The payload tests/formats.rs proves bertcuda does not run is live: Python's unpickler runs it.
    let marker = Path::new("/tmp/bertcuda-pickle-payload-ran");
    let _ = std::fs::remove_file(marker);
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats/evil/pytorch_model.bin");
    let code = r#"
import pickle, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
pickle.loads(z.read([n for n in z.namelist() if n.endswith("data.pkl")][0]))
"#;
    run_python(code, &[bin.to_str().unwrap()]);
    assert!(marker.exists(), "Python did not run the payload");
    std::fs::remove_file(marker).unwrap();
}

#[test]
#[ignore = "needs python3 with torch and transformers"]
fn transformers_loads_a_model_continued_with_an_extended_vocabulary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/formats/hf-zip");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("domain.txt");
    let text: String = (0..120)
        .map(|i| format!("the ones of its one are the ones it had\n{}", if i % 4 == 3 { "\n" } else { "" }))
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let (tok, shards, out) = (tmp.path().join("tok"), tmp.path().join("shards"), tmp.path().join("dapt"));
    let bin = env!("CARGO_BIN_EXE_bertcuda");
    let run = |args: &[&str]| assert!(Command::new(bin).args(args).status().unwrap().success(), "{args:?}");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "tokenizer",
        "extend",
        "--tokenizer",
        &s(&model),
        "--input",
        &s(&corpus),
        "--add",
        "2",
        "--min-frequency",
        "2",
        "--output",
        &s(&tok),
    ]);
    run(&["prepare", "--input", &s(&corpus), "--tokenizer", &s(&tok), "--output", &s(&shards)]);
    run(&[
        "train",
        "--data",
        &s(&shards),
        "--init-from",
        &s(&model),
        "--output",
        &s(&out),
        "--max-steps",
        "2",
        "--per-device-batch-size",
        "2",
        "--max-seq-len",
        "32",
        "--device",
        "cpu",
        "--quiet",
    ]);
    let code = r#"
import sys
from transformers import AutoTokenizer, BertForPreTraining
m = BertForPreTraining.from_pretrained(sys.argv[1])
t = AutoTokenizer.from_pretrained(sys.argv[1])
print(m.config.vocab_size, m.bert.embeddings.word_embeddings.weight.shape[0], t("ones its")["input_ids"])
"#;
    let printed = run_python(code, &[&s(&out)]);
    assert_eq!(printed.trim(), "60 60 [3, 58, 59, 4]");
}
