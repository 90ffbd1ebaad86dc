//! BertTokenizer through the `tokenizers` crate: loading from the places users keep one (a Hugging Face
//! directory, a tokenizer.json, a bare vocab.txt), training a WordPiece vocabulary, and writing the files
//! transformers' `AutoTokenizer.from_pretrained` reads.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Model, Tokenizer};

use crate::bail;
use crate::error::{Error, IoContext, Result};

/// The longest word WordPiece splits; longer ones become `[UNK]` (as BertTokenizer).
pub const MAX_INPUT_CHARS_PER_WORD: usize = 100;
/// The five special tokens of BERT, in the order a trained vocabulary lists them first.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Ids of the special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecialIds {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl SpecialIds {
    pub fn all(&self) -> [u32; 5] {
        [self.pad, self.unk, self.cls, self.sep, self.mask]
    }
}

/// A BERT WordPiece tokenizer with its special-token ids resolved.
pub struct BertTokenizer {
    inner: Tokenizer,
    pub special: SpecialIds,
    pub do_lower_case: bool,
    /// Vocabulary size including added tokens: the embedding table's row count.
    pub vocab_size: usize,
    /// Where it was loaded from, for messages.
    pub source: PathBuf,
}

/// A whole word a tokenizer cuts into pieces, with its count in a corpus.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SplitWord {
    pub word: String,
    pub count: u64,
    pub pieces: Vec<String>,
}

/// How to read a bare vocab.txt (which carries no casing information of its own).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Keep case when building from a bare vocab.txt (without it, the casing is read off the folder's
    /// name or the vocabulary); ignored for tokenizer.json and directories with a tokenizer_config.json,
    /// which say themselves.
    pub no_lowercase: bool,
}

impl BertTokenizer {
    /// Load from a Hugging Face model/tokenizer directory (tokenizer.json when present, else vocab.txt with
    /// tokenizer_config.json's `do_lower_case`), a tokenizer.json file, or a bare vocab.txt.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            let vocab = path.join("vocab.txt");
            let config = read_tokenizer_config(path)?;
            if json.is_file() {
                Self::from_tokenizer_json(&json, config.as_ref().and_then(|c| c["do_lower_case"].as_bool()))
            } else if vocab.is_file() {
                match config.as_ref().and_then(|c| c["do_lower_case"].as_bool()) {
                    Some(lower) => Self::from_vocab_txt(&vocab, lower),
                    None => Self::from_bare_vocab_txt(&vocab, opts),
                }
            } else {
                bail!(
                    "{}: no tokenizer.json or vocab.txt in this directory; point --tokenizer at a Hugging Face \
                     model or tokenizer directory, a tokenizer.json, or a vocab.txt (or make one with \
                     `bertcuda tokenizer train`)",
                    path.display()
                )
            }
        } else if path.is_file() {
            if path.extension().is_some_and(|e| e == "json") {
                Self::from_tokenizer_json(path, None)
            } else {
                Self::from_bare_vocab_txt(path, opts)
            }
        } else {
            bail!(
                "{}: no such tokenizer file or directory; give a Hugging Face model directory, a tokenizer.json \
                 or a vocab.txt",
                path.display()
            )
        }
    }

    fn from_tokenizer_json(path: &Path, do_lower_case: Option<bool>) -> Result<Self> {
        let text = fs::read_to_string(path).at(path)?;
        let inner: Tokenizer = text.parse().map_err(|e| {
            Error::corrupt(path, format!("not a tokenizer.json the `tokenizers` library can read: {e}"))
        })?;
        // The casing lives in the normalizer; tokenizer_config.json, when present, wins (as in transformers).
        let from_json = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| find_lowercase(&v["normalizer"]))
            .unwrap_or(false);
        Self::finish(inner, do_lower_case.unwrap_or(from_json), path)
    }

    /// A vocab.txt with nothing beside it that says its casing: `--no-lowercase` when given, else the
    /// folder's name as Google and the hub name models (`uncased_L-12_H-768_A-12`, `bert-base-cased`),
    /// else the vocabulary itself (words with capitals: a cased model). A lower-casing guess contradicted
    /// by a vocabulary with capitalised words is an error, not a cased model silently lower-cased.
    fn from_bare_vocab_txt(path: &Path, opts: LoadOptions) -> Result<Self> {
        let text = read_vocab_text(path)?;
        let capitalised: Vec<&str> = text
            .lines()
            .filter(|t| !(t.starts_with('[') && t.ends_with(']')) && t.to_lowercase() != *t)
            .collect();
        let folder = path
            .parent()
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_lowercase()))
            .unwrap_or_default();
        let words: Vec<&str> = folder.split(|c: char| !c.is_ascii_alphanumeric()).collect();
        // A cased vocabulary has capitalised words by the thousand (Google's cased: a third of it); a few
        // odd symbols do not make one.
        let cased_vocab = capitalised.len() * 100 >= text.lines().count();
        let lower = if opts.no_lowercase {
            false
        } else if words.contains(&"uncased") {
            if cased_vocab {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "the folder name says uncased but this vocab.txt has {} words with capitals (e.g. {:?}), \
                         which lower-cased text never reaches: pass --no-lowercase if the model is cased, or \
                         add a tokenizer_config.json with \"do_lower_case\"",
                        capitalised.len(),
                        capitalised[0]
                    ),
                ));
            }
            true
        } else if words.contains(&"cased") {
            false
        } else {
            !cased_vocab
        };
        Self::from_vocab_text(&text, lower, path)
    }

    fn from_vocab_txt(path: &Path, lowercase: bool) -> Result<Self> {
        Self::from_vocab_text(&read_vocab_text(path)?, lowercase, path)
    }

    /// The BERT pipeline over the vocabulary `text` (read from `path`).
    fn from_vocab_text(text: &str, lowercase: bool, path: &Path) -> Result<Self> {
        let model = wordpiece_from_vocab_text(text)
            .map_err(|e| Error::corrupt(path, format!("cannot build WordPiece from this vocab.txt: {e}")))?;
        let inner = bert_pipeline(model, lowercase, path)?;
        Self::finish(inner, lowercase, path)
    }

    fn finish(mut inner: Tokenizer, do_lower_case: bool, path: &Path) -> Result<Self> {
        // Padding and truncation saved in a tokenizer.json (sentence-transformers saves both) are off, as
        // in transformers until asked for: callers pad and cut themselves.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::corrupt(path, e.to_string()))?;
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!(
                        "the vocabulary has no {t} token; a BERT tokenizer needs all of {SPECIAL_TOKENS:?}"
                    ),
                )
            })
        };
        let special = SpecialIds {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(BertTokenizer { inner, special, do_lower_case, vocab_size, source: path.to_path_buf() })
    }

    /// Train a WordPiece vocabulary on sentences (BertTokenizer pipeline, `##` continuations).
    pub fn train<I, S>(sentences: I, vocab_size: usize, min_frequency: u64, lowercase: bool) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size < SPECIAL_TOKENS.len() + 1 {
            bail!("--vocab-size {vocab_size} is too small: it must leave room for the 5 special tokens and at least one word piece");
        }
        let mut trainer: tokenizers::models::TrainerWrapper = WordPieceTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .show_progress(false)
            .continuing_subword_prefix("##".into())
            .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
            .build()
            .into();
        let placeholder = WordPiece::builder()
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(MAX_INPUT_CHARS_PER_WORD)
            .build()
            .map_err(|e| Error::Invalid(format!("WordPiece: {e}")))?;
        let mut inner = Tokenizer::new(placeholder);
        inner.with_normalizer(Some(bert_normalizer(lowercase))).map_err(|e| Error::Invalid(e.to_string()))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner
            .train(&mut trainer, sentences)
            .map_err(|e| Error::Invalid(format!("training the WordPiece vocabulary failed: {e}")))?;
        // The trainer's model keeps its own settings; rebuild the full BERT pipeline around its vocabulary.
        let vocab: HashMap<String, u32> = inner.get_model().get_vocab();
        if vocab.len() <= SPECIAL_TOKENS.len() {
            bail!("the input has no text to learn a vocabulary from");
        }
        let mut by_id: Vec<(u32, String)> = vocab.into_iter().map(|(t, i)| (i, t)).collect();
        by_id.sort();
        let text: String = by_id.into_iter().map(|(_, t)| t + "\n").collect();
        let model =
            wordpiece_from_vocab_text(&text).map_err(|e| Error::Invalid(format!("WordPiece: {e}")))?;
        let path = PathBuf::from("<trained>");
        let inner = bert_pipeline(model, lowercase, &path)?;
        Self::finish(inner, lowercase, &path)
    }

    /// The whole words of `documents` (as this tokenizer normalizes and splits text) that it cuts into
    /// several pieces, none unknown: those seen at least `min_frequency` times, most frequent first (ties
    /// in byte order), at most `n` — the candidates a domain vocabulary extension adds.
    pub fn frequent_split_words<I>(
        &self,
        documents: I,
        n: usize,
        min_frequency: u64,
    ) -> Result<Vec<SplitWord>>
    where
        I: IntoIterator<Item = String>,
    {
        let unk = self.special.unk;
        let mut counts: HashMap<String, (u64, Vec<String>)> = HashMap::new();
        let mut batch: Vec<String> = Vec::new();
        let mut flush = |batch: &mut Vec<String>| -> Result<()> {
            let encodings = self.inner.encode_batch(std::mem::take(batch), false).map_err(|e| self.err(e))?;
            for enc in encodings {
                let (ids, tokens, words) = (enc.get_ids(), enc.get_tokens(), enc.get_word_ids());
                let mut i = 0;
                while i < ids.len() {
                    let mut j = i + 1;
                    while j < ids.len() && words[j].is_some() && words[j] == words[i] {
                        j += 1;
                    }
                    if j - i >= 2 && words[i].is_some() && !ids[i..j].contains(&unk) {
                        let word: String = tokens[i..j]
                            .iter()
                            .enumerate()
                            .map(|(k, t)| if k == 0 { t.as_str() } else { t.strip_prefix("##").unwrap_or(t) })
                            .collect();
                        let e = counts.entry(word).or_insert_with(|| (0, tokens[i..j].to_vec()));
                        e.0 += 1;
                    }
                    i = j;
                }
            }
            Ok(())
        };
        for doc in documents {
            batch.push(doc);
            if batch.len() == 256 {
                flush(&mut batch)?;
            }
        }
        flush(&mut batch)?;
        let mut words: Vec<SplitWord> = counts
            .into_iter()
            .filter(|(_, (c, _))| *c >= min_frequency)
            .map(|(word, (count, pieces))| SplitWord { word, count, pieces })
            .collect();
        words.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.word.cmp(&b.word)));
        words.truncate(n);
        Ok(words)
    }

    /// This tokenizer with `words` appended to its WordPiece vocabulary (ids from `vocab_size` on; every
    /// existing id, and the normalizer, pre-tokenizer and post-processor, unchanged): each then
    /// tokenizes to one id where it stands as a whole word.
    pub fn extended(&self, words: &[String]) -> Result<Self> {
        let tokenizers::ModelWrapper::WordPiece(wp) = self.inner.get_model() else {
            bail!(
                "{}: not a WordPiece tokenizer; only a BERT WordPiece vocabulary can be extended",
                self.source.display()
            );
        };
        let mut by_id: Vec<(u32, String)> = wp.get_vocab().into_iter().map(|(t, id)| (id, t)).collect();
        by_id.sort();
        if by_id.iter().enumerate().any(|(k, (id, _))| *id as usize != k) || by_id.len() != self.vocab_size {
            bail!(
                "{}: the vocabulary's ids are not 0..{} in order; it cannot be extended",
                self.source.display(),
                self.vocab_size
            );
        }
        let mut text: String = by_id.into_iter().map(|(_, t)| t + "\n").collect();
        let mut seen = std::collections::HashSet::new();
        for w in words {
            if self.inner.token_to_id(w).is_some()
                || !seen.insert(w)
                || w.trim().is_empty()
                || w.contains(char::is_whitespace)
            {
                bail!("{w:?} cannot be added to the vocabulary of {}: it is there already (or twice in the list), or not a word", self.source.display());
            }
            text.push_str(w);
            text.push('\n');
        }
        let vocab =
            WordPiece::read_bytes(text.as_bytes()).map_err(|e| Error::Invalid(format!("WordPiece: {e}")))?;
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token(wp.unk_token.clone())
            .continuing_subword_prefix(wp.continuing_subword_prefix.clone())
            .max_input_chars_per_word(wp.max_input_chars_per_word)
            .build()
            .map_err(|e| Error::Invalid(format!("WordPiece: {e}")))?;
        let mut inner = self.inner.clone();
        inner.with_model(model);
        Self::finish(inner, self.do_lower_case, &self.source)
    }

    /// Word-piece ids of one text, without special tokens.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`: (input_ids, token_type_ids).
    pub fn encode_with_specials(&self, a: &str, b: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match b {
            Some(b) => self.inner.encode_fast((a, b), true),
            None => self.inner.encode_fast(a, true),
        }
        .map_err(|e| self.err(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// As transformers' `get_special_tokens_mask(ids, already_has_special_tokens=True)`: 1 for every id
    /// that is one of the special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]), else 0.
    pub fn special_tokens_mask(&self, ids: &[u32]) -> Vec<u8> {
        let all = self.special.all();
        ids.iter().map(|id| all.contains(id) as u8).collect()
    }

    /// The underlying `tokenizers` pipeline (benchmarks compare against it).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.err(e))
    }

    /// The vocabulary in id order; ids that no token has (holes) are empty strings.
    pub fn vocab_in_order(&self) -> Vec<String> {
        let mut out = vec![String::new(); self.vocab_size];
        for (tok, id) in self.inner.get_vocab(true) {
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = tok;
            }
        }
        out
    }

    /// A fingerprint of what decides the ids: the vocabulary in id order and the casing. Shards keep it, so
    /// a model or shard set made with another tokenizer is refused.
    pub fn fingerprint(&self) -> String {
        let mut crc = 0u32;
        for tok in self.vocab_in_order() {
            crc = crc32c::crc32c_append(crc, tok.as_bytes());
            crc = crc32c::crc32c_append(crc, b"\n");
        }
        format!("vocab-crc32c:{crc:08x}:lower={}", self.do_lower_case)
    }

    /// Write the files `AutoTokenizer.from_pretrained(dir)` reads (transformers v4 and v5): vocab.txt,
    /// tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).at(dir)?;
        let mut vocab = self.vocab_in_order().join("\n");
        vocab.push('\n');
        write_file(&dir.join("vocab.txt"), vocab.as_bytes())?;
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Invalid(format!("cannot serialise the tokenizer: {e}")))?;
        write_file(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "do_basic_tokenize": true,
            "never_split": null,
            "tokenize_chinese_chars": true,
            "strip_accents": null,
            "model_max_length": 512,
            "clean_up_tokenization_spaces": true,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        });
        write_file(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        )?;
        let map = json!({
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
        });
        write_file(
            &dir.join("special_tokens_map.json"),
            serde_json::to_string_pretty(&map).unwrap().as_bytes(),
        )?;
        Ok(())
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Invalid(format!("tokenizer {}: {e}", self.source.display()))
    }
}

/// The names of the files `save_hf` writes.
pub const HF_TOKENIZER_FILES: [&str; 4] =
    ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// WordPiece over a vocab.txt's text: one token a line, the line number is its id (as transformers'
/// `load_vocab`; a token listed twice keeps its last line).
fn read_vocab_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).at(path)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::corrupt(path, format!("vocab.txt is not valid UTF-8 ({e})")))?;
    if text.trim().is_empty() {
        return Err(Error::corrupt(path, "vocab.txt is empty"));
    }
    Ok(text)
}

/// The number of tokens of a vocab.txt (the embedding rows a model made with it has).
pub fn vocab_file_size(path: &Path) -> Result<usize> {
    let text = read_vocab_text(path)?;
    let vocab = WordPiece::read_bytes(text.as_bytes())
        .map_err(|e| Error::corrupt(path, format!("not a readable vocab.txt: {e}")))?;
    Ok(vocab.len())
}

fn wordpiece_from_vocab_text(text: &str) -> tokenizers::Result<WordPiece> {
    WordPiece::builder()
        .vocab(WordPiece::read_bytes(text.as_bytes())?)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(MAX_INPUT_CHARS_PER_WORD)
        .build()
}

fn bert_normalizer(lowercase: bool) -> BertNormalizer {
    // strip_accents None = follow lowercase, as BertTokenizer.
    BertNormalizer::new(true, true, None, lowercase)
}

/// The BertTokenizer pipeline around a WordPiece model: BertNormalizer, BertPreTokenizer, WordPiece,
/// `[CLS] A [SEP] (B [SEP])` post-processing, the special tokens registered so "[MASK]" in text stays whole.
fn bert_pipeline(model: WordPiece, lowercase: bool, path: &Path) -> Result<Tokenizer> {
    let id = |t: &str| {
        model.token_to_id(t).ok_or_else(|| {
            Error::corrupt(
                path,
                format!("the vocabulary has no {t} token; a BERT tokenizer needs all of {SPECIAL_TOKENS:?}"),
            )
        })
    };
    let (sep, cls) = (id("[SEP]")?, id("[CLS]")?);
    for t in SPECIAL_TOKENS {
        id(t)?;
    }
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(bert_normalizer(lowercase))).map_err(|e| Error::Invalid(e.to_string()))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
    tok.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    tok.add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect::<Vec<_>>())
        .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(tok)
}

fn read_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join("tokenizer_config.json");
    if !p.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&p).at(&p)?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::corrupt(&p, format!("not valid JSON: {e}")))
}

/// `lowercase` of a BertNormalizer, looking inside a normalizer Sequence too.
fn find_lowercase(normalizer: &serde_json::Value) -> Option<bool> {
    match normalizer["type"].as_str()? {
        "BertNormalizer" => normalizer["lowercase"].as_bool(),
        "Lowercase" => Some(true),
        "Sequence" => normalizer["normalizers"].as_array()?.iter().find_map(find_lowercase),
        _ => None,
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).at(path)
}
