//! Text → tokenizer → shards: tokenization against transformers' fixtures, round trips, corruption, bad
//! text, determinism, and the errors a user meets.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use bertcuda::data::prepare::{prepare, PrepareConfig, DEFAULT_SHARD_TOKENS};
use bertcuda::data::shards::{self, ShardSet};
use bertcuda::data::text::DEFAULT_MAX_LINE_BYTES;
use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
use bertcuda::Error;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn config(inputs: Vec<PathBuf>, tokenizer: PathBuf, output: PathBuf) -> PrepareConfig {
    PrepareConfig {
        inputs,
        tokenizer,
        no_lowercase: false,
        output,
        workers: 2,
        overwrite: false,
        max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        shard_tokens: DEFAULT_SHARD_TOKENS,
        id_bytes: None,
        progress: false,
    }
}

fn uncased_vocab() -> PathBuf {
    fixtures().join("uncased/vocab.txt")
}

/// A small corpus: documents of numbered sentences.
fn write_corpus(dir: &Path, name: &str, docs: usize, sentences: usize) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).unwrap();
    for d in 0..docs {
        for s in 0..sentences {
            writeln!(f, "Document {d} says sentence number {s} about ownership and borrowing.").unwrap();
        }
        writeln!(f).unwrap();
    }
    path
}

#[test]
fn tokenization_equals_transformers_bert_tokenizer_on_fixtures() {
    let expected: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (name, lower) in [("uncased", true), ("cased", false)] {
        let vocab = fixtures().join(name).join("vocab.txt");
        let bare = BertTokenizer::load(&vocab, LoadOptions { no_lowercase: !lower }).unwrap();
        assert_eq!(bare.do_lower_case, lower);
        // The same tokenizer saved as a Hugging Face directory and loaded back through tokenizer.json.
        let dir = tmp.path().join(name);
        bare.save_hf(&dir).unwrap();
        let from_dir = BertTokenizer::load(&dir, LoadOptions::default()).unwrap();
        let from_json = BertTokenizer::load(&dir.join("tokenizer.json"), LoadOptions::default()).unwrap();
        assert_eq!(from_dir.fingerprint(), bare.fingerprint());
        let mut checked = 0;
        for case in expected["cases"].as_array().unwrap() {
            let a = case["a"].as_str().unwrap();
            let b = case["b"].as_str();
            let want = &case[name];
            let want_ids: Vec<u32> = serde_json::from_value(want["input_ids"].clone()).unwrap();
            let want_types: Vec<u32> = serde_json::from_value(want["token_type_ids"].clone()).unwrap();
            let want_mask: Vec<u8> = serde_json::from_value(want["special_tokens_mask"].clone()).unwrap();
            for tok in [&bare, &from_dir, &from_json] {
                let (ids, types) = tok.encode_with_specials(a, b).unwrap();
                assert_eq!(ids, want_ids, "{name} {a:?} {b:?}");
                assert_eq!(types, want_types, "{name} {a:?} {b:?}");
                assert_eq!(tok.special_tokens_mask(&ids), want_mask, "{name} {a:?}");
            }
            checked += 1;
        }
        assert!(checked >= 20);
    }
}

#[test]
fn a_directory_without_tokenizer_json_uses_tokenizer_config_casing() {
    let tmp = tempfile::tempdir().unwrap();
    fs::copy(fixtures().join("cased/vocab.txt"), tmp.path().join("vocab.txt")).unwrap();
    fs::write(tmp.path().join("tokenizer_config.json"), r#"{"do_lower_case": false}"#).unwrap();
    let tok = BertTokenizer::load(tmp.path(), LoadOptions::default()).unwrap();
    assert!(!tok.do_lower_case);
    fs::write(tmp.path().join("tokenizer_config.json"), r#"{"do_lower_case": true}"#).unwrap();
    assert!(BertTokenizer::load(tmp.path(), LoadOptions::default()).unwrap().do_lower_case);
}

#[test]
fn trained_tokenizer_round_trips_through_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let sentences =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/rust-book.txt")).unwrap();
    let tok = BertTokenizer::train(sentences.lines().take(2000), 1000, 2, true).unwrap();
    assert!(tok.vocab_size <= 1000 && tok.vocab_size > 200, "{}", tok.vocab_size);
    assert_eq!(
        (tok.special.pad, tok.special.unk, tok.special.cls, tok.special.sep, tok.special.mask),
        (0, 1, 2, 3, 4)
    );
    tok.save_hf(tmp.path()).unwrap();
    let back = BertTokenizer::load(tmp.path(), LoadOptions::default()).unwrap();
    let text = "Ownership and borrowing are checked by the compiler.";
    assert_eq!(back.encode_with_specials(text, None).unwrap(), tok.encode_with_specials(text, None).unwrap());
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["do_lower_case"], true);
    assert_eq!(config["model_max_length"], 512);
    assert_eq!(config["tokenizer_class"], "BertTokenizer");
}

#[test]
fn prepared_shards_read_back_as_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path(), "corpus.txt", 7, 5);
    let out = tmp.path().join("shards");
    let summary = prepare(&config(vec![input.clone()], uncased_vocab(), out.clone())).unwrap();
    assert_eq!(summary.manifest.documents, 7);
    assert_eq!(summary.manifest.sentences, 35);
    assert_eq!(summary.manifest.id_bytes, 2);
    let set = ShardSet::open(&out).unwrap();
    let tok = set.tokenizer().unwrap();
    set.check_tokenizer(&BertTokenizer::load(&uncased_vocab(), LoadOptions::default()).unwrap()).unwrap();
    let text = fs::read_to_string(&input).unwrap();
    let docs: Vec<Vec<&str>> =
        text.split("\n\n").filter(|d| !d.trim().is_empty()).map(|d| d.lines().collect()).collect();
    let shard = &set.shards[0];
    assert_eq!(shard.documents, docs.len());
    for (d, doc) in docs.iter().enumerate() {
        let range = shard.document(d);
        assert_eq!(range.len(), doc.len());
        for (s, line) in range.zip(doc) {
            let ids = shard.sentence(s).to_vec();
            assert_eq!(ids, tok.encode_ids(line).unwrap());
            assert_eq!(tok.decode(&ids, true).unwrap(), line.to_lowercase());
        }
    }
    shards::verify(&out).unwrap();
}

#[test]
fn output_is_byte_identical_for_any_worker_count_and_gzip_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path(), "corpus.txt", 400, 7);
    let gz = tmp.path().join("corpus.txt.gz");
    let mut enc = flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&fs::read(&input).unwrap()).unwrap();
    enc.finish().unwrap();
    let mut outputs = Vec::new();
    for (workers, inp) in [(1, &input), (2, &input), (3, &gz)] {
        let out = tmp.path().join(format!("shards-{workers}"));
        let mut cfg = config(vec![inp.clone()], uncased_vocab(), out.clone());
        cfg.workers = workers;
        cfg.shard_tokens = 5_000; // several shards
        prepare(&cfg).unwrap();
        outputs.push(out);
    }
    let m = shards::read_manifest(&outputs[0]).unwrap();
    assert!(m.shards.len() > 3, "{} shards", m.shards.len());
    for out in &outputs[1..] {
        for e in &m.shards {
            assert_eq!(
                fs::read(outputs[0].join(&e.file)).unwrap(),
                fs::read(out.join(&e.file)).unwrap(),
                "{}",
                e.file
            );
        }
        let mut other = shards::read_manifest(out).unwrap();
        other.report.bytes = m.report.bytes;
        assert_eq!(other.shards, m.shards);
    }
}

#[test]
fn bad_text_is_repaired_or_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.txt");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"A good first sentence.\nInvalid \xff\xfe bytes here.\n\n");
    bytes.extend_from_slice(b"Control \x07 bell and \x1b escape.\n");
    bytes.extend_from_slice(&b"x".repeat(300));
    bytes.extend_from_slice(b"\n\n");
    bytes.extend_from_slice(b"\x00\x01\x02\n\x0b\x0c\n\n"); // a document of nothing but control characters
    bytes.extend_from_slice(b"Last document.\n");
    fs::write(&path, &bytes).unwrap();
    let mut cfg = config(vec![path], uncased_vocab(), tmp.path().join("out"));
    cfg.max_line_bytes = 100;
    let m = prepare(&cfg).unwrap().manifest;
    let r = &m.report;
    assert_eq!(r.invalid_utf8_lines, 1);
    assert_eq!(r.control_char_lines, 3);
    assert_eq!(r.long_lines_cut, 1);
    assert_eq!(r.empty_sentences, 2);
    assert_eq!(r.empty_documents, 1);
    assert_eq!(m.documents, 3);
    assert_eq!(m.sentences, 5);
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap();
    b[at] ^= 0x40;
    fs::write(path, b).unwrap();
}

#[test]
fn verify_names_a_corrupt_truncated_or_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path(), "corpus.txt", 50, 4);
    let make = |name: &str| {
        let out = tmp.path().join(name);
        let mut cfg = config(vec![input.clone()], uncased_vocab(), out.clone());
        cfg.shard_tokens = 1000;
        prepare(&cfg).unwrap();
        shards::verify(&out).unwrap();
        out
    };
    let err_text = |dir: &Path| shards::verify(dir).unwrap_err().to_string();

    let flipped = make("flipped");
    flip_byte(&flipped.join("shard-00001.bin"), 300);
    let e = err_text(&flipped);
    assert!(e.contains("shard-00001.bin") && e.contains("checksum"), "{e}");

    let truncated = make("truncated");
    let f = truncated.join("shard-00002.bin");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len - 3).unwrap();
    let e = err_text(&truncated);
    assert!(e.contains("shard-00002.bin") && e.contains("truncated"), "{e}");
    let e = ShardSet::open(&truncated).err().unwrap().to_string();
    assert!(e.contains("shard-00002.bin"), "{e}");

    let missing = make("missing");
    fs::remove_file(missing.join("shard-00000.bin")).unwrap();
    let e = err_text(&missing);
    assert!(e.contains("shard-00000.bin") && e.contains("missing"), "{e}");
    let e = ShardSet::open(&missing).err().unwrap().to_string();
    assert!(e.contains("shard-00000.bin") && e.contains("missing"), "{e}");

    let header = make("header");
    flip_byte(&header.join("shard-00000.bin"), 2);
    let e = ShardSet::open(&header).err().unwrap().to_string();
    assert!(e.contains("shard-00000.bin") && e.contains("magic"), "{e}");

    // A corrupt offset table is refused when the shards are opened, before any read relies on it.
    let offsets = make("offsets");
    let f = offsets.join("shard-00000.bin");
    let mut b = fs::read(&f).unwrap();
    b[64 + 8] = 0xff; // the second document offset
    fs::write(&f, b).unwrap();
    let e = ShardSet::open(&offsets).err().unwrap().to_string();
    assert!(e.contains("shard-00000.bin") && (e.contains("offset") || e.contains("increasing")), "{e}");

    let no_manifest = make("no-manifest");
    fs::remove_file(no_manifest.join("manifest.json")).unwrap();
    let e = err_text(&no_manifest);
    assert!(e.contains("manifest.json") && e.contains("missing"), "{e}");
}

#[test]
fn errors_name_the_file_or_value_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path(), "corpus.txt", 3, 3);
    let out = tmp.path().join("out");
    let msg = |r: Result<_, Error>| r.err().expect("an error").to_string();

    let e = msg(prepare(&config(vec![tmp.path().join("nope.txt")], uncased_vocab(), out.clone())));
    assert!(e.contains("nope.txt") && e.contains("no such file"), "{e}");

    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "\n\n   \n").unwrap();
    let e = msg(prepare(&config(vec![empty], uncased_vocab(), out.clone())));
    assert!(e.contains("no text"), "{e}");

    let e = msg(prepare(&config(vec![input.clone()], tmp.path().join("missing-tok"), out.clone())));
    assert!(e.contains("missing-tok"), "{e}");

    let not_tok = tmp.path().join("weird.json");
    fs::write(&not_tok, r#"{"hello": 1}"#).unwrap();
    let e = msg(prepare(&config(vec![input.clone()], not_tok, out.clone())));
    assert!(e.contains("weird.json") && e.contains("tokenizer.json"), "{e}");

    let no_specials = tmp.path().join("vocab-no-cls.txt");
    fs::write(&no_specials, "[PAD]\n[UNK]\n[SEP]\n[MASK]\nhello\n").unwrap();
    let e = msg(prepare(&config(vec![input.clone()], no_specials, out.clone())));
    assert!(e.contains("vocab-no-cls.txt") && e.contains("[CLS]"), "{e}");

    let big = tmp.path().join("big-vocab.txt");
    let mut v = String::from("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n");
    for i in 0..70_000 {
        v.push_str(&format!("w{i}\n"));
    }
    fs::write(&big, v).unwrap();
    let mut cfg = config(vec![input.clone()], big.clone(), out.clone());
    cfg.id_bytes = Some(2);
    let e = msg(prepare(&cfg));
    assert!(e.contains("--id-width") && e.contains("70005"), "{e}");
    cfg.id_bytes = None;
    assert_eq!(prepare(&cfg).unwrap().manifest.id_bytes, 4);

    let e = msg(prepare(&config(vec![input.clone()], uncased_vocab(), out.clone())));
    assert!(e.contains("already exists") && e.contains("--overwrite"), "{e}");

    // Failures above left no partial output and no temporary directory.
    let names: Vec<String> =
        fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");

    let e = shards::verify(&tmp.path().join("nowhere")).unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");
}

fn bertcuda(args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bertcuda"));
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        let mut i = child.stdin.take().unwrap();
        if let Some(bytes) = stdin {
            i.write_all(bytes).unwrap();
        }
    }
    let o = child.wait_with_output().unwrap();
    (o.status.success(), String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
}

#[test]
fn tokenize_prints_one_json_object_per_input() {
    let vocab = uncased_vocab();
    let v = vocab.to_str().unwrap();
    let (ok, out, err) = bertcuda(&["tokenize", "--tokenizer", v, "Hello, World!", "second"], None);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["input_ids"], serde_json::json!([101, 7592, 1010, 2088, 999, 102]));
    assert_eq!(lines[0]["token_type_ids"], serde_json::json!([0, 0, 0, 0, 0, 0]));

    let (ok, out, err) =
        bertcuda(&["tokenize", "--tokenizer", v, "--pair"], Some(b"hello\tworld\nx \xff y\tz\n"));
    assert!(ok, "{err}");
    assert!(err.contains("line 2") && err.contains("invalid UTF-8"), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["input_ids"], serde_json::json!([101, 7592, 102, 2088, 102]));
    assert_eq!(lines[0]["token_type_ids"], serde_json::json!([0, 0, 0, 1, 1]));
    assert_eq!(lines.len(), 2);

    let (ok, _, err) = bertcuda(&["tokenize", "--tokenizer", v, "--pair"], Some(b"no tab here\n"));
    assert!(!ok);
    assert!(err.contains("line 1") && err.contains("TAB"), "{err}");
}

#[test]
fn cli_prepare_and_verify_report_and_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_corpus(tmp.path(), "corpus.txt", 5, 3);
    let out = tmp.path().join("shards");
    let (i, o, t) = (input.to_str().unwrap(), out.to_str().unwrap(), uncased_vocab());
    let (ok, _, err) =
        bertcuda(&["prepare", "--input", i, "--tokenizer", t.to_str().unwrap(), "--output", o], None);
    assert!(ok, "{err}");
    assert!(err.contains("5 documents") && err.contains("15 sentences"), "{err}");
    let (ok, stdout, err) = bertcuda(&["shards", "verify", o], None);
    assert!(ok && stdout.contains("OK"), "{err}");
    flip_byte(&out.join("shard-00000.bin"), 100);
    let (ok, _, err) = bertcuda(&["shards", "verify", o], None);
    assert!(!ok);
    assert!(
        err.starts_with("error: ") && err.contains("shard-00000.bin") && !err.contains("panicked"),
        "{err}"
    );
}
