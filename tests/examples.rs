#![allow(clippy::needless_range_loop)] // rows and positions are indexed in parallel arrays
//! What the model sees: NSP pairs, MLM masking, batches, the loader. A synthetic corpus whose every token
//! names its document and sentence ("d3s5") makes the structure checkable token by token.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bertcuda::data::examples::{epoch_index, Corpus, ExampleConfig};
use bertcuda::data::loader::{open_corpus, Batch, Cursor, EpochPlan, Loader, LoaderConfig, IGNORE_INDEX};
use bertcuda::data::prepare::{prepare, PrepareConfig};

const WORDS: [&str; 3] = ["run", "walk", "jump"];
const PIECES: [&str; 3] = ["##ning", "##s", "##ed"];

/// Documents of sentences; sentence s of document d is the token "d{d}s{s}" repeated `len(d, s)` times,
/// followed by `words` whole words ("running", "walks", ...) when asked.
struct Synth {
    docs: Vec<usize>,
    len: fn(usize, usize) -> usize,
    words: bool,
}

fn build(dir: &Path, synth: &Synth) -> PathBuf {
    let max_s = *synth.docs.iter().max().unwrap();
    let mut vocab =
        vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].into_iter().map(String::from).collect::<Vec<_>>();
    for d in 0..synth.docs.len() {
        for s in 0..max_s {
            vocab.push(format!("d{d}s{s}"));
        }
    }
    vocab.extend(WORDS.iter().chain(&PIECES).map(|s| s.to_string()));
    fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    let mut f = fs::File::create(dir.join("corpus.txt")).unwrap();
    for (d, &n) in synth.docs.iter().enumerate() {
        for s in 0..n {
            let mut line = vec![format!("d{d}s{s}"); (synth.len)(d, s)].join(" ");
            if synth.words {
                for (i, w) in WORDS.iter().enumerate() {
                    line.push_str(&format!(" {w}{}", PIECES[(d + s + i) % 3].trim_start_matches("##")));
                }
            }
            writeln!(f, "{line}").unwrap();
        }
        writeln!(f).unwrap();
    }
    drop(f);
    let out = dir.join("shards");
    prepare(&PrepareConfig {
        workers: 1,
        ..PrepareConfig::new(vec![dir.join("corpus.txt")], dir.join("vocab.txt"), out.clone())
    })
    .unwrap();
    out
}

fn corpus(synth: &Synth) -> (tempfile::TempDir, Arc<Corpus>) {
    let tmp = tempfile::tempdir().unwrap();
    let shards = build(tmp.path(), synth);
    let c = open_corpus(&[shards]).unwrap();
    (tmp, c)
}

fn standard() -> Synth {
    Synth { docs: (0..40).map(|d| 6 + d % 9).collect(), len: |d, s| 1 + (d * 7 + s * 3) % 6, words: false }
}

fn loader_cfg(ex: ExampleConfig, batch_size: usize) -> LoaderConfig {
    LoaderConfig { examples: ex, batch_size, rank: 0, world_size: 1, pad_to_max: false, drop_last: false }
}

/// Every batch of one epoch.
fn epoch_batches(c: &Corpus, cfg: &LoaderConfig, epoch: u64) -> Vec<Batch> {
    let plan = EpochPlan::new(c, cfg, epoch).unwrap();
    (0..plan.batches(cfg)).map(|k| plan.batch(c, cfg, k)).collect()
}

/// (document, sentence) of a synthetic token, None for special tokens and words.
fn origin(c: &Corpus, id: u32) -> Option<(usize, usize)> {
    let t = c.tokenizer.id_to_token(id)?;
    let rest = t.strip_prefix('d')?;
    let (d, s) = rest.split_once('s')?;
    Some((d.parse().ok()?, s.parse().ok()?))
}

/// The tokens before masking: the label where predicted, the input elsewhere.
fn original(batch: &Batch, i: usize) -> Vec<u32> {
    let n = batch.lengths[i] as usize;
    let ids = &batch.row(&batch.input_ids, i)[..n];
    let labels = &batch.row(&batch.labels, i)[..n];
    ids.iter().zip(labels).map(|(&t, &l)| if l == IGNORE_INDEX { t } else { l as u32 }).collect()
}

/// Sentences of a segment are consecutive in one document: returns (doc, first sentence, last sentence).
fn segment(c: &Corpus, tokens: &[u32]) -> (usize, usize, usize) {
    let o: Vec<(usize, usize)> = tokens.iter().map(|&t| origin(c, t).expect("a synthetic token")).collect();
    let doc = o[0].0;
    for w in o.windows(2) {
        assert_eq!(w[1].0, doc, "a segment spans documents: {o:?}");
        assert!(w[1].1 == w[0].1 || w[1].1 == w[0].1 + 1, "sentences not consecutive: {o:?}");
    }
    (doc, o[0].1, o.last().unwrap().1)
}

#[test]
fn nsp_pairs_have_bert_structure_and_follow_google_rules() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig { max_seq_len: 24, ..Default::default() };
    let cfg = loader_cfg(ex.clone(), 16);
    let sp = c.special;
    let (mut is_next, mut random, mut truncated) = (0, 0, 0);
    for epoch in 0..6 {
        for batch in epoch_batches(&c, &cfg, epoch) {
            let nsp = batch.next_sentence_label.as_ref().unwrap();
            for i in 0..batch.batch_size {
                let n = batch.lengths[i] as usize;
                assert!(n <= ex.max_seq_len);
                let ids = original(&batch, i);
                let types = &batch.row(&batch.token_type_ids, i)[..n];
                assert_eq!(ids[0], sp.cls);
                assert_eq!(ids[n - 1], sp.sep);
                let seps: Vec<usize> = (0..n).filter(|&j| ids[j] == sp.sep).collect();
                assert_eq!(seps.len(), 2, "{ids:?}");
                let mid = seps[0];
                assert!(mid >= 2 && n - mid >= 3, "both segments non-empty");
                assert!(types[..=mid].iter().all(|&t| t == 0) && types[mid + 1..].iter().all(|&t| t == 1));
                let (da, _, a_last) = segment(&c, &ids[1..mid]);
                let (db, b_first, _) = segment(&c, &ids[mid + 1..n - 1]);
                if n == ex.max_seq_len {
                    truncated += 1;
                }
                match nsp[i] {
                    0 => {
                        is_next += 1;
                        assert_eq!(da, db, "is_next pair from two documents");
                        assert!(b_first > a_last || (b_first == a_last && n == ex.max_seq_len));
                        if n < ex.max_seq_len {
                            assert_eq!(b_first, a_last + 1, "B must follow A");
                        }
                    }
                    1 => {
                        random += 1;
                        assert_ne!(da, db, "a random next from the same document");
                    }
                    l => panic!("label {l}"),
                }
            }
        }
    }
    assert!(is_next > 200 && random > 200 && truncated > 10, "{is_next} {random} {truncated}");
}

#[test]
fn nsp_label_rate_is_one_half_where_the_coin_decides() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig { max_seq_len: 32, ..Default::default() };
    let (mut coin, mut random, mut forced) = (0u64, 0u64, 0u64);
    for epoch in 0..30 {
        for inst in epoch_index(&c, &ex, epoch) {
            if inst.forced_random {
                forced += 1;
                assert!(inst.random_next);
                continue;
            }
            coin += 1;
            random += inst.random_next as u64;
        }
    }
    let p = random as f64 / coin as f64;
    let sd = (0.25 / coin as f64).sqrt();
    assert!((p - 0.5).abs() < 5.0 * sd, "rate {p} over {coin} (sd {sd})");
    assert!(forced > 0 && coin > 1000, "{forced} forced, {coin} by the coin");
}

#[test]
fn masking_selects_fifteen_percent_and_splits_80_10_10() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig { max_seq_len: 64, ..Default::default() };
    let cfg = LoaderConfig { pad_to_max: true, ..loader_cfg(ex, 32) };
    let specials: HashSet<u32> = c.special.all().into_iter().collect();
    let (mut maskable, mut selected, mut as_mask, mut as_random, mut unchanged) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for epoch in 0..30 {
        for batch in epoch_batches(&c, &cfg, epoch) {
            assert_eq!(batch.seq_len, 64);
            let predicted: Vec<u32> = (0..batch.labels.len())
                .filter(|&j| batch.labels[j] != IGNORE_INDEX)
                .map(|j| j as u32)
                .collect();
            assert_eq!(batch.masked_positions, predicted);
            for i in 0..batch.batch_size {
                let ids = batch.row(&batch.input_ids, i);
                let labels = batch.row(&batch.labels, i);
                let mask = batch.row(&batch.attention_mask, i);
                let orig = original(&batch, i);
                for j in 0..batch.seq_len {
                    if mask[j] == 0 {
                        assert_eq!(labels[j], IGNORE_INDEX, "padding selected");
                        assert_eq!(ids[j], c.special.pad);
                        continue;
                    }
                    if specials.contains(&orig[j]) {
                        assert_eq!(labels[j], IGNORE_INDEX, "a special token selected");
                        continue;
                    }
                    maskable += 1;
                    if labels[j] == IGNORE_INDEX {
                        continue;
                    }
                    selected += 1;
                    assert!(
                        origin(&c, labels[j] as u32).is_some(),
                        "label {} is not an original token",
                        labels[j]
                    );
                    if ids[j] == c.special.mask {
                        as_mask += 1;
                    } else if ids[j] as i32 == labels[j] {
                        unchanged += 1;
                    } else {
                        assert!(!specials.contains(&ids[j]), "a random replacement drew a special token");
                        as_random += 1;
                    }
                }
            }
        }
    }
    let within = |k: u64, n: u64, p: f64, what: &str| {
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!((k as f64 - n as f64 * p).abs() < 5.0 * sd, "{what}: {k} of {n}, expected p={p}");
    };
    assert!(maskable > 50_000, "{maskable}");
    within(selected, maskable, 0.15, "selected");
    let v = c.tokenizer.vocab_size as f64 - 5.0; // a random draw equal to the original looks unchanged
    within(as_mask, selected, 0.8, "[MASK]");
    within(as_random, selected, 0.1 * (1.0 - 1.0 / v), "random");
    within(unchanged, selected, 0.1 + 0.1 / v, "unchanged");
}

#[test]
fn whole_word_masking_selects_a_word_with_its_pieces() {
    let synth = Synth { words: true, ..standard() };
    let (_t, c) = corpus(&synth);
    let ex = ExampleConfig { max_seq_len: 64, whole_word_mask: true, ..Default::default() };
    let cfg = loader_cfg(ex, 16);
    let piece = |id: u32| c.tokenizer.id_to_token(id).is_some_and(|t| t.starts_with("##"));
    let (mut words, mut selected_words) = (0, 0);
    for batch in epoch_batches(&c, &cfg, 0).into_iter().chain(epoch_batches(&c, &cfg, 1)) {
        for i in 0..batch.batch_size {
            let orig = original(&batch, i);
            let labels = &batch.row(&batch.labels, i)[..orig.len()];
            for j in 1..orig.len() {
                // A piece right after [CLS]/[SEP] lost its word to truncation: it is a word of its own.
                if piece(orig[j]) && !c.special.all().contains(&orig[j - 1]) {
                    assert_eq!(
                        labels[j] != IGNORE_INDEX,
                        labels[j - 1] != IGNORE_INDEX,
                        "piece {j} split from its word: {orig:?} {labels:?}"
                    );
                    if !piece(orig[j - 1]) {
                        words += 1;
                        selected_words += (labels[j] != IGNORE_INDEX) as u32;
                    }
                }
            }
        }
    }
    assert!(words > 1000 && selected_words > 100, "{words} {selected_words}");
}

#[test]
fn max_predictions_per_seq_caps_the_predicted_tokens() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig {
        max_seq_len: 64,
        mlm_probability: 0.5,
        max_predictions_per_seq: Some(5),
        ..Default::default()
    };
    let cfg = loader_cfg(ex, 16);
    let mut at_cap = 0;
    for batch in epoch_batches(&c, &cfg, 0) {
        for i in 0..batch.batch_size {
            let n = batch.row(&batch.labels, i).iter().filter(|&&l| l != IGNORE_INDEX).count();
            assert!(n <= 5);
            at_cap += (n == 5) as u32;
        }
    }
    assert!(at_cap > 10);
}

#[test]
fn without_nsp_a_sequence_is_whole_consecutive_sentences_of_one_document() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig { max_seq_len: 20, nsp: false, short_seq_prob: 0.0, ..Default::default() };
    let cfg = loader_cfg(ex.clone(), 8);
    for batch in epoch_batches(&c, &cfg, 0) {
        assert!(batch.next_sentence_label.is_none());
        for i in 0..batch.batch_size {
            let n = batch.lengths[i] as usize;
            assert!(n <= ex.max_seq_len);
            let ids = original(&batch, i);
            assert_eq!((ids[0], ids[n - 1]), (c.special.cls, c.special.sep));
            assert!(batch.row(&batch.token_type_ids, i).iter().all(|&t| t == 0));
            let (d, first, last) = segment(&c, &ids[1..n - 1]);
            // Whole sentences: the first and last sentences appear with all their tokens.
            let count = |s: usize| ids.iter().filter(|&&t| origin(&c, t) == Some((d, s))).count();
            let len = (standard().len)(d, first);
            assert_eq!(count(first), len);
            assert_eq!(count(last), (standard().len)(d, last));
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_batches_whatever_the_threads() {
    let (_t, c) = corpus(&standard());
    let cfg = loader_cfg(ExampleConfig { max_seq_len: 32, seed: 7, ..Default::default() }, 8);
    let take = |threads: usize, cursor: Cursor, n: usize| -> Vec<Batch> {
        let mut l = Loader::start(c.clone(), cfg.clone(), cursor, threads, 3, None).unwrap();
        (0..n).map(|_| l.next_batch().unwrap().unwrap()).collect()
    };
    let a = take(1, Cursor::default(), 40);
    let b = take(3, Cursor::default(), 40);
    assert_eq!(a, b);
    // Across an epoch boundary.
    let per_epoch = EpochPlan::new(&c, &cfg, 0).unwrap().batches(&cfg) as usize;
    assert!(per_epoch < 40, "{per_epoch}");
    assert_eq!(a[per_epoch].cursor, Cursor { epoch: 1, batch: 0 });
    // Resume from a cursor gives the very same stream.
    let resumed = take(2, a[per_epoch - 2].cursor, 5);
    assert_eq!(&resumed[..], &a[per_epoch - 2..per_epoch + 3]);
    // Another seed, another stream; another epoch, another order.
    let other = LoaderConfig { examples: ExampleConfig { seed: 8, ..cfg.examples.clone() }, ..cfg.clone() };
    let mut l = Loader::start(c.clone(), other, Cursor::default(), 1, 1, None).unwrap();
    assert_ne!(l.next_batch().unwrap().unwrap().input_ids, a[0].input_ids);
    assert_ne!(a[0].input_ids, a[per_epoch].input_ids);
}

#[test]
fn ranks_get_disjoint_samples_that_cover_the_epoch() {
    let (_t, c) = corpus(&standard());
    let ex = ExampleConfig { max_seq_len: 32, ..Default::default() };
    let world = 3;
    let whole = EpochPlan::new(&c, &loader_cfg(ex.clone(), 1), 2).unwrap();
    let mut seen = HashSet::new();
    for rank in 0..world {
        let cfg = LoaderConfig { rank, world_size: world, ..loader_cfg(ex.clone(), 1) };
        let plan = EpochPlan::new(&c, &cfg, 2).unwrap();
        for (k, &s) in plan.samples().iter().enumerate() {
            assert!(seen.insert(s), "sample {s} on two ranks");
            // Rank r's k-th example is the whole epoch's (k·W + r)-th.
            assert_eq!(s, whole.samples()[k * world + rank]);
        }
        // And the batch it makes is the same example.
        let b = plan.batch(&c, &cfg, 1);
        let w = whole.batch(&c, &loader_cfg(ex.clone(), 1), world as u64 + rank as u64);
        assert_eq!(b.input_ids, w.input_ids);
        assert_eq!(b.labels, w.labels);
    }
    assert_eq!(seen.len(), whole.epoch_examples());
}

#[test]
fn edge_cases_are_handled_as_documented() {
    // Documents of one sentence, sentences longer than the sequence.
    let synth = Synth { docs: vec![1, 1, 1, 5, 1], len: |_, s| if s == 2 { 80 } else { 3 }, words: false };
    let (_t, c) = corpus(&synth);
    let ex = ExampleConfig { max_seq_len: 16, ..Default::default() };
    let cfg = loader_cfg(ex.clone(), 4);
    for batch in epoch_batches(&c, &cfg, 0) {
        for i in 0..batch.batch_size {
            assert!(batch.lengths[i] as usize <= 16);
        }
    }
    for inst in epoch_index(&c, &ex, 0).iter().filter(|i| synth.docs[i.doc as usize] == 1) {
        assert!(inst.random_next && inst.forced_random);
    }

    // A corpus of one document: random next segments come from that document; MLM-only works as usual.
    let one = Synth { docs: vec![12], len: |_, _| 4, words: false };
    let (_t2, c1) = corpus(&one);
    let b = epoch_batches(&c1, &loader_cfg(ex.clone(), 4), 0);
    assert!(!b.is_empty());
    let mlm = loader_cfg(ExampleConfig { nsp: false, ..ex.clone() }, 4);
    assert!(!epoch_batches(&c1, &mlm, 0).is_empty());

    // A batch larger than the data: one short batch, or a clear error when training drops it.
    let big = loader_cfg(ex.clone(), 10_000);
    let plan = EpochPlan::new(&c, &big, 0).unwrap();
    assert_eq!(plan.batches(&big), 1);
    assert_eq!(plan.batch(&c, &big, 0).batch_size, plan.rank_examples());
    let drop = LoaderConfig { drop_last: true, ..big };
    let mut l = Loader::start(c.clone(), drop, Cursor::default(), 1, 1, None).unwrap();
    let e = l.next_batch().unwrap().unwrap_err().to_string();
    assert!(e.contains("fewer than one batch"), "{e}");

    // Impossible settings are refused with the value named.
    for (bad, what) in [
        (ExampleConfig { max_seq_len: 4, ..ex.clone() }, "--max-seq-len 4"),
        (ExampleConfig { mlm_probability: 0.0, ..ex.clone() }, "--mlm-probability 0"),
        (ExampleConfig { max_predictions_per_seq: Some(0), ..ex.clone() }, "--max-predictions-per-seq"),
    ] {
        let e = Loader::start(c.clone(), loader_cfg(bad, 4), Cursor::default(), 1, 1, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(what), "{e}");
    }
    let e = Loader::start(
        c.clone(),
        LoaderConfig { rank: 3, world_size: 2, ..loader_cfg(ex, 4) },
        Cursor::default(),
        1,
        1,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--rank 3"), "{e}");
}

#[test]
fn shard_directories_with_different_tokenizers_are_not_mixed() {
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::tempdir().unwrap();
    let a = build(t1.path(), &standard());
    let b = build(t2.path(), &Synth { docs: vec![3, 4], len: |_, _| 2, words: false });
    let e = Corpus::open(&[a.clone(), b]).err().unwrap().to_string();
    assert!(e.contains("different tokenizers"), "{e}");
    let both = Corpus::open(&[a.clone(), a]).unwrap();
    assert_eq!(both.documents, 80);
}

#[test]
fn inspect_prints_the_documented_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = build(tmp.path(), &standard());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args([
            "inspect",
            "--data",
            shards.to_str().unwrap(),
            "--batch-size",
            "3",
            "--num-batches",
            "2",
            "--decode",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for key in ["input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label", "text"] {
        assert_eq!(lines[0][key].as_array().unwrap().len(), 3, "{key}");
    }
    assert!(lines[0]["text"][0].as_str().unwrap().starts_with("[CLS]"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args(["inspect", "--data", shards.to_str().unwrap(), "--no-nsp"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("next_sentence_label").is_none());
}
