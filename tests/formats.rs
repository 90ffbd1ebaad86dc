//! Checkpoint formats: a tiny random BERT in every format bertcuda reads (tests/fixtures/formats, made by
//! the script there from one torch model) gives transformers' outputs; `convert`; and every bad input a
//! one-line error naming the file, with nothing executed and nothing half-written.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use bertcuda::infer::{forward, BatchFile, LoadedModel};
use bertcuda::model::formats::load_pretrained;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// Every fixture, with the precision its tensors are stored in (the key of its expected outputs).
const FORMATS: [(&str, &str); 8] = [
    ("hf-zip", "fp32"),
    ("hf-legacy", "fp32"),
    ("hf-sharded-fp16", "fp16"),
    ("hf-bf16", "bf16"),
    ("uncased_L-2_H-20_A-4", "fp32"),
    ("uncased_L-2_H-20_A-4/bert_model.ckpt", "fp32"),
    ("nvidia", "fp32"),
    ("nvidia/ckpt_7.pt", "fp32"),
];

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The largest |got - want| / max(1, |want|).
fn max_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f32::max)
}

/// Outputs and losses of `model` on the fixture batch, checked against transformers' (computed in float64
/// from the model the fixture was made from) within 1e-5. (torch's own fp32 forward is 4.3e-6 from them.)
fn check_outputs(label: &str, model: &LoadedModel, want: &serde_json::Value) {
    let batch: BatchFile = serde_json::from_value(expected()["batch"].clone()).unwrap();
    let fb = batch.flatten(Path::new("expected.json")).unwrap();
    let r = forward(bertcuda::backend::choice::Device::Cpu, model, &fb, true, false).unwrap();
    let tensor = |name: &str| &r.tensors.iter().find(|t| t.0 == name).unwrap().2;
    for name in ["prediction_logits", "seq_relationship_logits", "pooler_output"] {
        let err = max_error(tensor(name), &floats(&want[name]));
        assert!(err <= 1e-5, "{label}: {name} differs from transformers' by {err}");
    }
    let (mlm, nsp) = (r.losses.mlm.unwrap(), r.losses.nsp.unwrap());
    assert!(
        (mlm - want["mlm_loss"].as_f64().unwrap()).abs() <= 1e-5,
        "{label}: mlm loss {mlm} vs {}",
        want["mlm_loss"]
    );
    assert!(
        (nsp - want["nsp_loss"].as_f64().unwrap()).abs() <= 1e-5,
        "{label}: nsp loss {nsp} vs {}",
        want["nsp_loss"]
    );
}

#[test]
fn every_format_gives_transformers_outputs() {
    let e = expected();
    for (fixture, precision) in FORMATS {
        let model = LoadedModel::load(&fixtures().join(fixture)).unwrap();
        let r = &model.report;
        assert!(r.initialised.is_empty(), "{fixture}: initialised {:?}", r.initialised);
        assert_eq!(r.loaded.len(), 46, "{fixture}");
        assert_eq!(model.config.vocab_size, e["vocab_size"].as_u64().unwrap() as usize, "{fixture}");
        check_outputs(fixture, &model, &e[precision]);
    }
}

#[test]
fn load_reports_say_what_each_format_held() {
    let tf = load_pretrained(&fixtures().join("uncased_L-2_H-20_A-4"), 0).unwrap().2;
    assert!(tf.format.contains("TensorFlow"), "{}", tf.format);
    // Adam's two moments for each of the 46 variables, and the step counter: skipped, and said so.
    assert_eq!(tf.skipped.len(), 93, "{:?}", tf.skipped);
    assert!(tf.skipped.iter().any(|s| s == "global_step"));
    assert!(tf.skipped.iter().filter(|s| s.ends_with("/adam_m")).count() == 46);
    assert!(tf.summary().contains("adam_m ×46"), "{}", tf.summary());

    let nv = load_pretrained(&fixtures().join("nvidia"), 0).unwrap().2;
    assert!(nv.format.contains("ckpt_7.pt") && nv.format.contains("\"model\""), "{}", nv.format);
    for key in ["optimizer", "files", "epoch", "data_loader"] {
        assert!(nv.skipped.iter().any(|s| s == key), "{key} not in {:?}", nv.skipped);
    }
    // Their vocabulary padded from 58 to 64 rows: trimmed to vocab.txt.
    assert!(nv.notes.iter().any(|n| n.contains("6 padding rows")), "{:?}", nv.notes);

    let hf = load_pretrained(&fixtures().join("hf-zip"), 0).unwrap().2;
    // The tied decoder tensors (views of the embeddings' and bias' storages) are ignored, not loaded twice.
    assert!(hf.ignored.iter().any(|s| s.contains("cls.predictions.decoder.weight")), "{:?}", hf.ignored);
    assert!(hf.skipped.is_empty());
}

#[test]
fn the_casing_of_a_bare_vocabulary_comes_from_the_folder_name_or_the_vocabulary() {
    use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
    let tmp = tempfile::tempdir().unwrap();
    let words = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nThe\nBoston\n##s\n";
    let lower_words = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nboston\n##s\n";
    let case = |folder: &str, vocab: &str| {
        let d = tmp.path().join(folder);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vocab.txt"), vocab).unwrap();
        BertTokenizer::load(&d, LoadOptions::default())
    };
    assert!(case("uncased_L-12_H-768_A-12", lower_words).unwrap().do_lower_case);
    assert!(!case("cased_L-12_H-768_A-12", words).unwrap().do_lower_case);
    assert!(!case("bert-base-cased", words).unwrap().do_lower_case);
    // No name to go by: the vocabulary's capitals say cased, their absence uncased.
    assert!(!case("biobert_v1.1", words).unwrap().do_lower_case);
    assert!(case("scivocab", lower_words).unwrap().do_lower_case);
    // A name saying uncased over a cased vocabulary: an error naming the file and the way out.
    let e = case("uncased_L-2_H-4_A-2", words).err().expect("refused").to_string();
    assert!(e.contains("vocab.txt") && e.contains("--no-lowercase") && !e.contains('\n'), "{e}");
    // --no-lowercase decides.
    let d = tmp.path().join("uncased_L-2_H-4_A-2");
    assert!(!BertTokenizer::load(&d, LoadOptions { no_lowercase: true }).unwrap().do_lower_case);
}

#[test]
fn convert_writes_a_transformers_directory_of_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture, _) in FORMATS {
        let src = fixtures().join(fixture);
        let dst = tmp.path().join(fixture.replace('/', "_"));
        let out = bin().args(["convert", src.to_str().unwrap(), dst.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{fixture}: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("46 tensors loaded"), "{fixture}: {stderr}");
        for f in ["model.safetensors", "config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"]
        {
            assert!(dst.join(f).is_file(), "{fixture}: no {f}");
        }
        let (c0, p0, _) = load_pretrained(&src, 0).unwrap();
        let (c1, p1, r1) = load_pretrained(&dst, 0).unwrap();
        assert_eq!(c0.vocab_size, c1.vocab_size);
        assert_eq!(p0, p1, "{fixture}: the converted parameters differ");
        assert!(r1.initialised.is_empty() && r1.skipped.is_empty(), "{fixture}: {}", r1.summary());
        let tok = bertcuda::infer::model_tokenizer(&dst).unwrap();
        assert!(tok.do_lower_case, "{fixture}");
    }
    // An existing destination is kept unless --overwrite.
    let dst = tmp.path().join("hf-zip");
    let out = bin()
        .args(["convert", fixtures().join("hf-zip").to_str().unwrap(), dst.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bertcuda"))
}

/// A copy of a fixture folder in `tmp` under `name`.
fn copy_fixture(tmp: &Path, fixture: &str, name: &str) -> PathBuf {
    let dst = tmp.join(name);
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(fixtures().join(fixture)).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// The error of loading `dir`, through the library and through the command line (exit non-zero, one line
/// on stderr, no panic).
fn load_error(dir: &Path) -> String {
    let e = match load_pretrained(dir, 0) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    let out =
        bin().args(["embed", "--model", dir.to_str().unwrap(), "--device", "cpu", "x"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    e
}

/// A pickle of a state dict (protocol 2, as torch.save writes it): each entry a contiguous tensor of
/// `storage_type` (a torch storage class name) with the given storage key and shape.
fn state_dict_pickle(entries: &[(&str, &str, &str, &[usize])]) -> Vec<u8> {
    fn text(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    }
    fn tuple(p: &mut Vec<u8>, v: &[usize]) {
        p.push(b'(');
        v.iter().for_each(|&x| int(p, x));
        p.push(b't');
    }
    let mut p = vec![0x80, 2];
    p.extend(b"ccollections\nOrderedDict\n)R(");
    for (name, storage, key, shape) in entries {
        text(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        text(&mut p, "storage");
        p.extend(format!("ctorch\n{storage}\n").as_bytes());
        text(&mut p, key);
        text(&mut p, "cpu");
        int(&mut p, shape.iter().product());
        p.extend(b"tQ");
        int(&mut p, 0);
        tuple(&mut p, shape);
        let mut strides = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        tuple(&mut p, &strides);
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)Rt");
        p.push(b'R');
    }
    p.extend(b"u.");
    p
}

/// A torch zip archive with this pickle and storages (key → bytes).
fn torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn bad_checkpoints_are_one_line_errors_naming_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let emb = "bert.embeddings.word_embeddings.weight";
    let shape: &[usize] = &[58, 20];

    // A truncated zip archive, a truncated legacy file.
    for fixture in ["hf-zip", "hf-legacy"] {
        let d = copy_fixture(tmp.path(), fixture, &format!("truncated-{fixture}"));
        let f = d.join("pytorch_model.bin");
        let bytes = fs::read(&f).unwrap();
        fs::write(&f, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = load_error(&d);
        assert!(e.contains("pytorch_model.bin") && e.contains("truncated"), "{fixture}: {e}");
    }

    // A storage shorter than its tensor.
    let d = copy_fixture(tmp.path(), "hf-zip", "short-storage");
    let pkl = state_dict_pickle(&[(emb, "FloatStorage", "0", shape)]);
    torch_zip(&d.join("pytorch_model.bin"), &pkl, &[("0", vec![0u8; 58 * 20 * 4 - 40])]);
    let e = load_error(&d);
    assert!(e.contains(emb) && e.contains("shorter than its tensor"), "{e}");

    // A dtype no parameter can have, and a storage type this reader does not know.
    let d = copy_fixture(tmp.path(), "hf-zip", "int-dtype");
    let pkl = state_dict_pickle(&[(emb, "LongStorage", "0", shape)]);
    torch_zip(&d.join("pytorch_model.bin"), &pkl, &[("0", vec![0u8; 58 * 20 * 8])]);
    let e = load_error(&d);
    assert!(e.contains(emb) && e.contains("int64"), "{e}");
    let pkl = state_dict_pickle(&[(emb, "ComplexFloatStorage", "0", shape)]);
    torch_zip(&d.join("pytorch_model.bin"), &pkl, &[("0", vec![0u8; 58 * 20 * 8])]);
    let e = load_error(&d);
    assert!(e.contains("torch.ComplexFloatStorage"), "{e}");

    // A shape the config contradicts.
    let d = copy_fixture(tmp.path(), "hf-zip", "wrong-shape");
    let config = fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 37", "\"intermediate_size\": 36");
    fs::write(d.join("config.json"), config).unwrap();
    let e = load_error(&d);
    assert!(e.contains("pytorch_model.bin") && e.contains("intermediate.dense") && e.contains("[37]"), "{e}");

    // An index naming a missing shard.
    let d = copy_fixture(tmp.path(), "hf-sharded-fp16", "missing-shard");
    fs::remove_file(d.join("pytorch_model-00002-of-00002.bin")).unwrap();
    let e = load_error(&d);
    assert!(
        e.contains("pytorch_model.bin.index.json") && e.contains("pytorch_model-00002-of-00002.bin"),
        "{e}"
    );

    // A TF data file with a flipped byte, and a truncated TF index.
    let d = copy_fixture(tmp.path(), "uncased_L-2_H-20_A-4", "uncased_corrupt");
    let data = d.join("bert_model.ckpt.data-00000-of-00001");
    let mut bytes = fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    fs::write(&data, &bytes).unwrap();
    let e = load_error(&d);
    assert!(e.contains("data-00000-of-00001") && e.contains("checksum") && e.contains("variable"), "{e}");
    let index = d.join("bert_model.ckpt.index");
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..bytes.len() - 10]).unwrap();
    let e = load_error(&d);
    assert!(e.contains("bert_model.ckpt.index") && e.contains("truncated"), "{e}");

    // A directory with no checkpoint, a path that does not exist.
    let d = tmp.path().join("empty");
    fs::create_dir(&d).unwrap();
    assert!(load_error(&d).contains("no checkpoint"));
    assert!(load_error(&tmp.path().join("nope")).contains("no such model directory"));
}

#[test]
fn hostile_pickles_end_in_errors_not_hangs_or_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = copy_fixture(tmp.path(), "hf-zip", "hostile");
    let bin = d.join("pytorch_model.bin");
    // Legacy format: torch's magic number, protocol 1001, system info, then an object that is a set
    // containing itself (EMPTY_SET, MEMOIZE, MARK, GET 0, ADDITEMS), then no storages.
    let mut legacy = vec![0x80, 2, 0x8a, 10];
    legacy.extend(&0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]);
    legacy.push(b'.');
    legacy.extend(b"\x80\x02M\xe9\x03.\x80\x02}.");
    legacy.extend(b"\x80\x04\x8f\x94(h\x00\x90.");
    legacy.extend(b"\x80\x02].");
    fs::write(&bin, &legacy).unwrap();
    let e = load_error(&d);
    assert!(e.contains("not a dict of tensors"), "{e}");
    // A memo slot four billion away, a million nested tuples: one-line errors, no allocation of either.
    for pkl in [
        &b"\x80\x02N\x72\x00\x00\x00\xf0\xff"[..],
        &[[0x80u8, 2, b'N'].as_slice(), &[0x85u8; 1_000_000][..], b"\xff"].concat()[..],
    ] {
        torch_zip(&bin, pkl, &[]);
        let e = load_error(&d);
        assert!(e.contains("pytorch_model.bin"), "{e}");
    }
}

/// Where the fixture's payload would leave its mark if it ran.
const MARKER: &str = "/tmp/bertcuda-pickle-payload-ran";

#[test]
fn a_pickle_that_would_run_a_command_is_refused_and_nothing_runs() {
    let _ = fs::remove_file(MARKER);
    // The fixture: torch.save of an object whose __reduce__ is os.system("touch MARKER"); the fixture
    // script checked that Python's unpickler runs it.
    let e = load_error(&fixtures().join("evil"));
    assert!(e.contains("posix.system") && e.contains("refused"), "{e}");
    assert!(!Path::new(MARKER).exists(), "the payload ran");

    // Other callables: eval, exec, an unknown class, through GLOBAL and STACK_GLOBAL.
    let tmp = tempfile::tempdir().unwrap();
    let d = copy_fixture(tmp.path(), "hf-zip", "evil2");
    let cases: [(&[u8], &str); 4] = [
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1;\x85R.", "builtins.eval"),
        (b"\x80\x02c__builtin__\nexec\nX\x01\x00\x00\x00x\x85R.", "__builtin__.exec"),
        (b"\x80\x02cmymodels\nTrainer\n)\x81.", "mymodels.Trainer"),
        (b"\x80\x04\x8c\x02os\x94\x8c\x05popen\x94\x93X\x02\x00\x00\x00ls\x85R.", "os.popen"),
    ];
    for (pkl, name) in cases {
        torch_zip(&d.join("pytorch_model.bin"), pkl, &[]);
        let e = load_error(&d);
        assert!(e.contains(name), "{name}: {e}");
    }
    // convert of a refused checkpoint writes nothing.
    let dst = tmp.path().join("converted");
    let out = bin()
        .args(["convert", fixtures().join("evil").to_str().unwrap(), dst.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dst.exists());
    assert!(fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".converted")));
    assert!(!Path::new(MARKER).exists(), "the payload ran");
}

#[test]
fn init_from_a_google_tf_checkpoint_continues_pretraining() {
    use bertcuda::data::prepare::{prepare, PrepareConfig};
    use bertcuda::train::{train, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let words = "the a of and to in is it that was for on are with as his they at be this from";
    let text: String =
        (0..200).map(|i| format!("{} {}\n{}", words, i % 7, if i % 5 == 4 { "\n" } else { "" })).collect();
    let corpus = tmp.path().join("c.txt");
    fs::write(&corpus, text).unwrap();
    for (fixture, name) in [("uncased_L-2_H-20_A-4", "tf"), ("nvidia/ckpt_7.pt", "nvidia")] {
        let model = fixtures().join(fixture);
        let shards = tmp.path().join(format!("shards-{name}"));
        // The shards are made with the checkpoint's own vocab.txt (casing from the folder name).
        let tok_dir = bertcuda::model::formats::Source::locate(&model).unwrap().dir;
        prepare(&PrepareConfig {
            workers: 1,
            ..PrepareConfig::new(vec![corpus.clone()], tok_dir, shards.clone())
        })
        .unwrap();
        let out = tmp.path().join(format!("dapt-{name}"));
        let cfg = TrainConfig {
            data: vec![shards],
            output: out.clone(),
            init_from: Some(model),
            max_seq_len: 32,
            per_device_batch_size: 2,
            max_steps: Some(2),
            save_steps: 100,
            progress: false,
            ..TrainConfig::default()
        };
        let s = train(cfg, std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))).unwrap();
        assert_eq!(s.steps, 2, "{name}");
        assert!(s.losses.iter().all(|l| l.is_finite() && *l > 0.0), "{name}: {:?}", s.losses);
        let (c, _, r) = load_pretrained(&out, 0).unwrap();
        assert_eq!((c.hidden_size, c.vocab_size), (20, 58), "{name}");
        assert!(r.initialised.is_empty(), "{name}");
    }
}

#[test]
fn vocabulary_extension_for_continued_pretraining() {
    use bertcuda::data::prepare::{prepare, PrepareConfig};
    use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
    use bertcuda::model::extend::extend_vocabulary;
    use bertcuda::train::{train, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("hf-zip");
    // "ones" and "its" are cut into "one ##s" and "it ##s" by the fixture's vocabulary; "thes" is rare.
    let text: String = (0..120)
        .map(|i| {
            format!(
                "the ones of its {} are the ones it had\n{}",
                ["one", "its", "thes"][i % 3],
                if i % 4 == 3 { "\n" } else { "" }
            )
        })
        .collect();
    let corpus = tmp.path().join("domain.txt");
    fs::write(&corpus, text).unwrap();
    let ext_dir = tmp.path().join("tok-ext");
    let out = bin()
        .args([
            "tokenizer",
            "extend",
            "--tokenizer",
            model.to_str().unwrap(),
            "--input",
            corpus.to_str().unwrap(),
        ])
        .args(["--add", "2", "--min-frequency", "2", "--output", ext_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let added: Vec<&str> = lines.iter().map(|l| l["token"].as_str().unwrap()).collect();
    assert_eq!(added, ["ones", "its"], "{lines:?}");
    assert_eq!(lines[0]["id"], 58);
    assert_eq!(lines[0]["pieces"], serde_json::json!(["one", "##s"]));

    let (old, new) = (
        BertTokenizer::load(&model, LoadOptions::default()).unwrap(),
        BertTokenizer::load(&ext_dir, LoadOptions::default()).unwrap(),
    );
    // Every old id unchanged; a new word is one id.
    assert_eq!(new.vocab_size, 60);
    assert_eq!(new.vocab_in_order()[..58], old.vocab_in_order()[..]);
    assert_eq!(new.encode_ids("the of thes").unwrap(), old.encode_ids("the of thes").unwrap());
    assert_eq!(new.encode_ids("the ones").unwrap(), [6, 58]);
    assert_eq!(old.encode_ids("the ones").unwrap().len(), 3);

    // The grown model: old rows kept, new rows the mean of their pieces' rows.
    let (c, p, _) = load_pretrained(&model, 0).unwrap();
    let (c2, p2, n) = extend_vocabulary(&c, &p, &old, &new).unwrap();
    assert_eq!((n, c2.vocab_size), (2, 60));
    let (t, t2) =
        (bertcuda::model::params::ParamTable::new(&c), bertcuda::model::params::ParamTable::new(&c2));
    let (w, w2) = (
        t.get("bert.embeddings.word_embeddings.weight").unwrap(),
        t2.get("bert.embeddings.word_embeddings.weight").unwrap(),
    );
    let h = c.hidden_size;
    let row = |params: &[f32], off: usize, r: usize| params[off + r * h..off + (r + 1) * h].to_vec();
    assert_eq!(p2[w2.offset..w2.offset + 58 * h], p[w.offset..w.offset + 58 * h]);
    let (one, s) = (old.token_to_id("one").unwrap() as usize, old.token_to_id("##s").unwrap() as usize);
    let mean: Vec<f32> =
        row(&p, w.offset, one).iter().zip(row(&p, w.offset, s)).map(|(a, b)| (a + b) / 2.0).collect();
    assert_eq!(row(&p2, w2.offset, 58), mean);
    let (b, b2) = (t.get("cls.predictions.bias").unwrap(), t2.get("cls.predictions.bias").unwrap());
    assert_eq!(p2[b2.offset + 58], (p[b.offset + one] + p[b.offset + s]) / 2.0);
    let q = t.get("bert.encoder.layer.1.output.dense.weight").unwrap();
    let q2 = t2.get("bert.encoder.layer.1.output.dense.weight").unwrap();
    assert_eq!(p2[q2.offset..q2.offset + q2.len], p[q.offset..q.offset + q.len]);

    // Continued pretraining on shards of the extended tokenizer: accepted, the model grown and saved so.
    let shards = tmp.path().join("shards");
    prepare(&PrepareConfig {
        workers: 1,
        ..PrepareConfig::new(vec![corpus.clone()], ext_dir.clone(), shards.clone())
    })
    .unwrap();
    let run = |data: PathBuf, out: PathBuf| {
        train(
            TrainConfig {
                data: vec![data],
                output: out,
                init_from: Some(model.clone()),
                max_seq_len: 32,
                per_device_batch_size: 2,
                max_steps: Some(2),
                save_steps: 100,
                progress: false,
                ..TrainConfig::default()
            },
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
    };
    let dapt = tmp.path().join("dapt");
    let s = run(shards, dapt.clone()).unwrap();
    assert_eq!(s.steps, 2);
    let (c3, _, r3) = load_pretrained(&dapt, 0).unwrap();
    assert_eq!(c3.vocab_size, 60);
    assert!(r3.initialised.is_empty());
    assert_eq!(BertTokenizer::load(&dapt, LoadOptions::default()).unwrap().fingerprint(), new.fingerprint());

    // An unrelated vocabulary (not an extension of the checkpoint's) stays an error.
    let other_dir = tmp.path().join("tok-other");
    let words: Vec<String> = old.vocab_in_order().into_iter().rev().collect();
    let mut reordered = words.clone();
    reordered.sort();
    fs::create_dir_all(&other_dir).unwrap();
    fs::write(other_dir.join("vocab.txt"), reordered.join("\n") + "\n").unwrap();
    fs::write(other_dir.join("tokenizer_config.json"), r#"{"do_lower_case": true}"#).unwrap();
    let other_shards = tmp.path().join("other-shards");
    prepare(&PrepareConfig {
        workers: 1,
        ..PrepareConfig::new(vec![corpus], other_dir, other_shards.clone())
    })
    .unwrap();
    let e = run(other_shards, tmp.path().join("refused")).unwrap_err().to_string();
    assert!(e.contains("another tokenizer"), "{e}");
}
