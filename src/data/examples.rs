//! Pretraining examples, made at load time: NSP sentence pairs (Google BERT's
//! `create_instances_from_document`) or single-segment sequences (`nsp = false`), then MLM masking (the
//! reference code: Bernoulli selection, 80% `[MASK]` / 10% random / 10% unchanged).
//!
//! An epoch's *index* is a list of small fixed-size records, one per example, made by running Google's
//! chunking over every document with a stream keyed by (seed, epoch, document). An example's tokens stay
//! in the memory-mapped shards; `make` builds it from its record with a stream keyed by
//! (seed, epoch, sample index): the random next segment, the truncation and the masks.
//!
//! Documented edge cases:
//! - a document of one sentence yields examples whose B segment is a random next (Google's rule);
//! - with a corpus of one document the "random" B segment comes from that same document (there is no
//!   other; Google's code does the same after ten tries) — such a corpus is fine for MLM (`nsp = false`);
//! - a sentence longer than the sequence is truncated (`truncate_seq_pair`), never dropped;
//! - `max_predictions_per_seq` caps the predicted tokens of a sequence: when the Bernoulli draw selects more,
//!   a random subset of whole words (whole-word masking) or tokens is kept.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::bail;
use crate::data::rng::{stream, KeyedRng};
use crate::data::shards::{ShardSet, Tokens};
use crate::data::tokenizer::{BertTokenizer, SpecialIds};
use crate::error::Result;

/// What an example is made of.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExampleConfig {
    pub max_seq_len: usize,
    /// Probability of a shorter target length, drawn from [2, max_seq_len - 3], per document.
    pub short_seq_prob: f64,
    /// Sentence pairs with a next-sentence label; false = one segment of whole sentences.
    pub nsp: bool,
    pub mlm_probability: f64,
    pub whole_word_mask: bool,
    pub max_predictions_per_seq: Option<usize>,
    pub seed: u64,
}

impl Default for ExampleConfig {
    fn default() -> Self {
        ExampleConfig {
            max_seq_len: 128,
            short_seq_prob: 0.1,
            nsp: true,
            mlm_probability: 0.15,
            whole_word_mask: false,
            max_predictions_per_seq: None,
            seed: 0,
        }
    }
}

impl ExampleConfig {
    pub fn validate(&self) -> Result<()> {
        let min = if self.nsp { 5 } else { 3 };
        if self.max_seq_len < min || self.max_seq_len > 65_535 {
            bail!("--max-seq-len {} is out of range: it must be between {min} and 65535 (BERT models use up to 512)", self.max_seq_len);
        }
        if !(0.0..=1.0).contains(&self.short_seq_prob) {
            bail!("short_seq_prob {} must be between 0 and 1", self.short_seq_prob);
        }
        if !(self.mlm_probability > 0.0 && self.mlm_probability < 1.0) {
            bail!("--mlm-probability {} must be above 0 and below 1", self.mlm_probability);
        }
        if self.max_predictions_per_seq == Some(0) {
            bail!("--max-predictions-per-seq must be at least 1");
        }
        Ok(())
    }
}

/// One or more shard directories made with the same tokenizer, seen as one corpus of documents.
pub struct Corpus {
    pub sets: Vec<ShardSet>,
    /// (set, shard) of each shard in corpus order, and the global index of its first document.
    shards: Vec<(usize, usize)>,
    doc_start: Vec<u64>,
    pub documents: u64,
    pub special: SpecialIds,
    pub vocab_size: u32,
    /// Per id: the token is a `##` continuation of a word.
    continuation: Vec<bool>,
    /// Ids a random replacement draws from: the vocabulary less the special tokens.
    replaceable: Vec<u32>,
    pub tokenizer: BertTokenizer,
}

impl Corpus {
    pub fn open(dirs: &[PathBuf]) -> Result<Self> {
        if dirs.is_empty() {
            bail!("no shard directory given: pass --data DIR (made by `bertcuda prepare`)");
        }
        let sets = dirs.iter().map(|d| ShardSet::open(d)).collect::<Result<Vec<_>>>()?;
        let first = &sets[0].manifest;
        for s in &sets[1..] {
            if s.manifest.tokenizer_fingerprint != first.tokenizer_fingerprint {
                bail!(
                    "{} and {} were made with different tokenizers ({} vs {}); shard directories mixed in one run must share one",
                    sets[0].dir.display(),
                    s.dir.display(),
                    first.tokenizer_fingerprint,
                    s.manifest.tokenizer_fingerprint
                );
            }
        }
        let tokenizer = sets[0].tokenizer()?;
        sets[0].check_tokenizer(&tokenizer)?;
        let mut shards = Vec::new();
        let mut doc_start = Vec::new();
        let mut documents = 0u64;
        for (i, set) in sets.iter().enumerate() {
            for (j, shard) in set.shards.iter().enumerate() {
                shards.push((i, j));
                doc_start.push(documents);
                documents += shard.documents as u64;
            }
        }
        if documents == 0 {
            bail!("{}: the shards hold no document", dirs[0].display());
        }
        if documents > u32::MAX as u64 {
            bail!("{documents} documents: more than this build indexes (2^32); split the corpus across runs");
        }
        let vocab = tokenizer.vocab_in_order();
        let continuation = vocab.iter().map(|t| t.starts_with("##")).collect();
        let special = tokenizer.special;
        let replaceable: Vec<u32> =
            (0..vocab.len() as u32).filter(|id| !special.all().contains(id)).collect();
        if replaceable.is_empty() {
            bail!("{}: the tokenizer's vocabulary holds only special tokens", dirs[0].display());
        }
        Ok(Corpus {
            vocab_size: first.vocab_size,
            special,
            sets,
            shards,
            doc_start,
            documents,
            continuation,
            replaceable,
            tokenizer,
        })
    }

    fn locate(&self, doc: u32) -> (&crate::data::shards::Shard, std::ops::Range<usize>) {
        let k = self.doc_start.partition_point(|&s| s <= doc as u64) - 1;
        let (i, j) = self.shards[k];
        let shard = &self.sets[i].shards[j];
        let range = shard.document((doc as u64 - self.doc_start[k]) as usize);
        (shard, range)
    }

    /// Token counts of a document's sentences.
    fn sentence_lens(&self, doc: u32, out: &mut Vec<u32>) {
        let (shard, range) = self.locate(doc);
        out.clear();
        out.extend(range.map(|s| shard.sentence_len(s) as u32));
    }

    /// Append the tokens of sentences [first, first + count) of a document; returns how many were appended.
    fn append_sentences(&self, doc: u32, first: usize, count: usize, out: &mut Vec<u32>) -> usize {
        let (shard, range) = self.locate(doc);
        let before = out.len();
        for s in range.start + first..range.start + first + count {
            shard.sentence(s).extend_into(out);
        }
        out.len() - before
    }

    fn document_sentences(&self, doc: u32) -> usize {
        self.locate(doc).1.len()
    }

    fn sentence(&self, doc: u32, s: usize) -> Tokens<'_> {
        let (shard, range) = self.locate(doc);
        shard.sentence(range.start + s)
    }
}

/// One example of an epoch, before tokens are gathered. 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Instance {
    pub doc: u32,
    /// First sentence of segment A, within the document.
    pub first: u32,
    /// Target length in tokens (special tokens excluded).
    pub target: u16,
    /// Sentences in A.
    pub a_sents: u16,
    /// Sentences in B when B follows A; 0 when B is a random next (or with no NSP).
    pub b_sents: u16,
    pub random_next: bool,
    /// B is a random next because the chunk had one sentence (not by the coin flip).
    pub forced_random: bool,
}

/// Google's `create_instances_from_document`, keeping records instead of tokens.
fn document_instances(lens: &[u32], doc: u32, cfg: &ExampleConfig, epoch: u64, out: &mut Vec<Instance>) {
    let mut rng = KeyedRng::new(stream::DOCUMENT, &[cfg.seed, epoch, doc as u64]);
    let specials = if cfg.nsp { 3 } else { 2 };
    let max_num_tokens = (cfg.max_seq_len - specials) as u64;
    let mut target = max_num_tokens;
    if rng.bernoulli(cfg.short_seq_prob) {
        target = rng.range_inclusive(2.min(max_num_tokens), max_num_tokens);
    }
    let n = lens.len();
    if !cfg.nsp {
        // Whole consecutive sentences, as many as fit; a sentence longer than the target stands alone.
        let (mut start, mut len) = (0usize, 0u64);
        for (i, &l) in lens.iter().enumerate() {
            if i > start && len + l as u64 > target {
                out.push(single(doc, start, i - start, target));
                (start, len) = (i, 0);
            }
            len += l as u64;
        }
        if n > start {
            out.push(single(doc, start, n - start, target));
        }
        return;
    }
    let (mut start, mut len) = (0usize, 0u64);
    let mut i = 0usize;
    while i < n {
        len += lens[i] as u64;
        if i == n - 1 || len >= target {
            let chunk = i + 1 - start;
            let mut inst = Instance {
                doc,
                first: start as u32,
                target: target as u16,
                a_sents: chunk as u16,
                b_sents: 0,
                random_next: false,
                forced_random: false,
            };
            {
                let a_end = if chunk >= 2 { rng.range_inclusive(1, chunk as u64 - 1) as usize } else { 1 };
                inst.a_sents = a_end as u16;
                if chunk == 1 || rng.bernoulli(0.5) {
                    inst.random_next = true;
                    inst.forced_random = chunk == 1;
                    // The chunk's unused sentences go back for the next chunk.
                    i -= chunk - a_end;
                } else {
                    inst.b_sents = (chunk - a_end) as u16;
                }
            }
            out.push(inst);
            start = i + 1;
            len = 0;
        }
        i += 1;
    }
}

fn single(doc: u32, first: usize, sents: usize, target: u64) -> Instance {
    Instance {
        doc,
        first: first as u32,
        target: target as u16,
        a_sents: sents as u16,
        b_sents: 0,
        random_next: false,
        forced_random: false,
    }
}

/// The examples of one epoch, in corpus order (the loader shuffles).
pub fn epoch_index(corpus: &Corpus, cfg: &ExampleConfig, epoch: u64) -> Vec<Instance> {
    const DOCS_PER_TASK: u32 = 4096;
    let tasks = corpus.documents.div_ceil(DOCS_PER_TASK as u64) as u32;
    let parts: Vec<Vec<Instance>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut out = Vec::new();
            let mut lens = Vec::new();
            let end = ((t as u64 + 1) * DOCS_PER_TASK as u64).min(corpus.documents) as u32;
            for doc in t * DOCS_PER_TASK..end {
                corpus.sentence_lens(doc, &mut lens);
                document_instances(&lens, doc, cfg, epoch, &mut out);
            }
            out
        })
        .collect();
    parts.concat()
}

/// One example, unpadded.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u8>,
    /// -100 where not predicted, else the original token.
    pub labels: Vec<i32>,
    /// 0 = B follows A, 1 = B is random; None without NSP.
    pub next_sentence_label: Option<u8>,
}

/// Trim the longer segment, from the front or the back with probability 0.5 each, until the pair fits
/// (Google's `truncate_seq_pair`). Segments are ranges into a token buffer.
fn truncate_seq_pair(
    a: &mut std::ops::Range<usize>,
    b: &mut std::ops::Range<usize>,
    max: usize,
    rng: &mut KeyedRng,
) {
    while a.len() + b.len() > max {
        let longer = if a.len() > b.len() { &mut *a } else { &mut *b };
        if rng.bernoulli(0.5) {
            longer.start += 1;
        } else {
            longer.end -= 1;
        }
    }
}

/// Build the example of `inst`, the `sample`-th of the epoch's index.
pub fn make(corpus: &Corpus, cfg: &ExampleConfig, epoch: u64, sample: u64, inst: &Instance) -> Example {
    let mut rng = KeyedRng::new(stream::SAMPLE, &[cfg.seed, epoch, sample]);
    let mut buf = Vec::with_capacity(cfg.max_seq_len * 2);
    let sp = corpus.special;
    let (input_ids, token_type_ids, nsp_label) = if cfg.nsp {
        let a_len = corpus.append_sentences(inst.doc, inst.first as usize, inst.a_sents as usize, &mut buf);
        if inst.random_next {
            let target_b = (inst.target as usize).saturating_sub(a_len).max(1);
            let other = if corpus.documents > 1 {
                // Uniform over the other documents.
                let r = rng.below(corpus.documents - 1) as u32;
                if r >= inst.doc {
                    r + 1
                } else {
                    r
                }
            } else {
                inst.doc
            };
            let n = corpus.document_sentences(other);
            let start = rng.below(n as u64) as usize;
            for s in start..n {
                corpus.sentence(other, s).extend_into(&mut buf);
                if buf.len() - a_len >= target_b {
                    break;
                }
            }
        } else {
            corpus.append_sentences(
                inst.doc,
                inst.first as usize + inst.a_sents as usize,
                inst.b_sents as usize,
                &mut buf,
            );
        }
        let (mut a, mut b) = (0..a_len, a_len..buf.len());
        truncate_seq_pair(&mut a, &mut b, cfg.max_seq_len - 3, &mut rng);
        let mut ids = Vec::with_capacity(a.len() + b.len() + 3);
        ids.push(sp.cls);
        ids.extend_from_slice(&buf[a.clone()]);
        ids.push(sp.sep);
        ids.extend_from_slice(&buf[b.clone()]);
        ids.push(sp.sep);
        let mut types = vec![0u8; a.len() + 2];
        types.resize(ids.len(), 1);
        (ids, types, Some(inst.random_next as u8))
    } else {
        corpus.append_sentences(inst.doc, inst.first as usize, inst.a_sents as usize, &mut buf);
        buf.truncate(cfg.max_seq_len - 2);
        let mut ids = Vec::with_capacity(buf.len() + 2);
        ids.push(sp.cls);
        ids.extend_from_slice(&buf);
        ids.push(sp.sep);
        let types = vec![0u8; ids.len()];
        (ids, types, None)
    };
    let (input_ids, labels) = mask_tokens(corpus, cfg, input_ids, &mut rng);
    Example { input_ids, token_type_ids, labels, next_sentence_label: nsp_label }
}

/// MLM masking: each maskable token (or word, with whole-word masking) is selected with probability
/// `mlm_probability`; special tokens are never selected. Of the selected tokens 80% become `[MASK]`, 10% a
/// random non-special token, 10% stay. Labels hold the original token where selected, -100 elsewhere.
fn mask_tokens(
    corpus: &Corpus,
    cfg: &ExampleConfig,
    mut ids: Vec<u32>,
    rng: &mut KeyedRng,
) -> (Vec<u32>, Vec<i32>) {
    let special = corpus.special.all();
    let is_special = |id: u32| special.contains(&id);
    // Units of selection: [start, end) token ranges (single tokens, or words with their ## pieces).
    let mut units: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if is_special(ids[i]) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if cfg.whole_word_mask {
            while j < ids.len()
                && !is_special(ids[j])
                && corpus.continuation.get(ids[j] as usize).copied().unwrap_or(false)
            {
                j += 1;
            }
        }
        if rng.bernoulli(cfg.mlm_probability) {
            units.push((i, j));
        }
        i = j;
    }
    if let Some(cap) = cfg.max_predictions_per_seq {
        let total: usize = units.iter().map(|u| u.1 - u.0).sum();
        if total > cap {
            rng.shuffle(&mut units);
            let mut kept = 0;
            units.retain(|u| {
                let keep = kept + (u.1 - u.0) <= cap;
                if keep {
                    kept += u.1 - u.0;
                }
                keep
            });
            units.sort_unstable();
        }
    }
    let mut labels = vec![-100i32; ids.len()];
    for (s, e) in units {
        for t in s..e {
            labels[t] = ids[t] as i32;
            let r = rng.uniform();
            if r < 0.8 {
                ids[t] = corpus.special.mask;
            } else if r < 0.9 {
                ids[t] = corpus.replaceable[rng.below(corpus.replaceable.len() as u64) as usize];
            }
        }
    }
    (ids, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_record_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Instance>(), 16);
    }

    #[test]
    fn chunking_follows_google_and_covers_every_sentence_once_when_b_follows() {
        let cfg = ExampleConfig { max_seq_len: 20, short_seq_prob: 0.0, ..Default::default() };
        let lens = [5, 6, 7, 3, 9, 2, 4, 8, 1];
        for epoch in 0..20 {
            let mut out = Vec::new();
            document_instances(&lens, 3, &cfg, epoch, &mut out);
            let mut next = 0u32;
            for inst in &out {
                assert_eq!(inst.first, next, "{out:?}");
                assert!(inst.a_sents >= 1);
                next = inst.first + inst.a_sents as u32 + inst.b_sents as u32;
                assert_eq!(inst.random_next, inst.b_sents == 0);
            }
            assert_eq!(next as usize, lens.len());
        }
    }
}
