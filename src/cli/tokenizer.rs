//! `bertcuda tokenizer train | extend` and `bertcuda tokenize`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use bertcuda::data::text::{clean_line, list_input_files, CorpusReader, DEFAULT_MAX_LINE_BYTES};
use bertcuda::data::tokenizer::{BertTokenizer, LoadOptions};
use bertcuda::fsutil::AtomicDir;

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a BERT WordPiece vocabulary and write a Hugging Face tokenizer directory.
    #[command(
        after_help = "Example:\n  bertcuda tokenizer train --input corpus.txt --vocab-size 30522 --output tok/\n\n\
        Writes vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json;\n\
        transformers' AutoTokenizer.from_pretrained(\"tok/\") loads them."
    )]
    Train(TokenizerTrainArgs),
    /// Add a domain corpus's frequent whole words to a tokenizer's vocabulary (every existing id unchanged).
    #[command(
        after_help = "Example:\n  bertcuda tokenizer extend --tokenizer bert-base-uncased/ --input pubmed/ --add 2000 --output tok-bio/\n\n\
        Finds the words of the corpus that the tokenizer splits into several pieces, appends up to --add of the\n\
        most frequent (seen --min-frequency times at least) to its vocabulary, writes a transformers tokenizer\n\
        directory and prints one JSON line per added word: {\"token\", \"id\", \"count\", \"pieces\"}.\n\
        Then: bertcuda prepare --tokenizer tok-bio/ ...; bertcuda train --init-from bert-base-uncased/ ...\n\
        (the new rows of the embeddings start as the mean of the word's old pieces)."
    )]
    Extend(TokenizerExtendArgs),
}

#[derive(Args)]
pub struct TokenizerExtendArgs {
    /// The tokenizer to extend: a model or tokenizer directory, a tokenizer.json or a vocab.txt.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The domain corpus: text files or directories (one sentence per line; .gz accepted).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Words to add at most.
    #[arg(long)]
    add: usize,
    /// Add only words seen at least this often.
    #[arg(long, default_value_t = 10)]
    min_frequency: u64,
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// With a bare vocab.txt: keep case.
    #[arg(long)]
    no_lowercase: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// Text files or directories (one sentence per line; .gz accepted).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Vocabulary size, the five special tokens included.
    #[arg(long, default_value_t = 30522)]
    pub vocab_size: usize,
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Keep case (a cased tokenizer); the default lower-cases and strips accents like bert-base-uncased.
    #[arg(long)]
    pub no_lowercase: bool,
    /// Drop word pieces seen fewer times than this.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// A Hugging Face model or tokenizer directory, a tokenizer.json, or a vocab.txt.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Each input is a pair: segment A, a TAB, segment B.
    #[arg(long)]
    pair: bool,
    /// With a bare vocab.txt: keep case.
    #[arg(long)]
    no_lowercase: bool,
    /// Texts; standard-input lines when none are given.
    text: Vec<String>,
}

/// The sentences of a corpus as one stream; a read error ends it and is left in `failure`, to report after.
pub fn sentences<'a>(
    reader: &'a mut CorpusReader,
    failure: &'a mut Option<bertcuda::Error>,
) -> impl Iterator<Item = String> + 'a {
    std::iter::from_fn(move || loop {
        if failure.is_some() {
            return None;
        }
        match reader.next_document() {
            Ok(Some(doc)) => return Some(doc),
            Ok(None) => return None,
            Err(e) => *failure = Some(e),
        }
    })
    .flatten()
}

pub fn tokenizer_extend(a: TokenizerExtendArgs) -> Result<()> {
    if a.add == 0 {
        anyhow::bail!("--add 0 adds nothing; give the number of words to add");
    }
    let tok = BertTokenizer::load(&a.tokenizer, LoadOptions { no_lowercase: a.no_lowercase })?;
    let files = list_input_files(&a.input)?;
    let out = AtomicDir::create(&a.output, a.overwrite)?;
    let mut reader = CorpusReader::new(files, DEFAULT_MAX_LINE_BYTES);
    let mut failure = None;
    let words = tok.frequent_split_words(sentences(&mut reader, &mut failure), a.add, a.min_frequency);
    if let Some(e) = failure {
        return Err(e.into());
    }
    let words = words?;
    let extended = tok.extended(&words.iter().map(|w| w.word.clone()).collect::<Vec<_>>())?;
    extended.save_hf(out.path())?;
    let dir = out.commit()?;
    for (k, w) in words.iter().enumerate() {
        let line = serde_json::json!({"token": w.word, "id": tok.vocab_size + k, "count": w.count, "pieces": w.pieces});
        println!("{line}");
    }
    eprintln!(
        "added {} words (of --add {}, seen ≥{} times) to the {} tokens of {} → {} ({} tokens)",
        words.len(),
        a.add,
        a.min_frequency,
        tok.vocab_size,
        a.tokenizer.display(),
        dir.display(),
        extended.vocab_size
    );
    Ok(())
}

pub fn tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let files = list_input_files(&a.input)?;
    let out = AtomicDir::create(&a.output, a.overwrite)?;
    let mut reader = CorpusReader::new(files, DEFAULT_MAX_LINE_BYTES);
    let mut failure = None;
    let tok = BertTokenizer::train(
        sentences(&mut reader, &mut failure),
        a.vocab_size,
        a.min_frequency,
        !a.no_lowercase,
    );
    if let Some(e) = failure {
        return Err(e.into());
    }
    let tok = tok?;
    tok.save_hf(out.path())?;
    let dir = out.commit()?;
    let r = &reader.report;
    eprintln!(
        "trained a {} WordPiece vocabulary of {} tokens on {} lines ({:.1} MB) → {}",
        if tok.do_lower_case { "lower-cased" } else { "cased" },
        tok.vocab_size,
        r.lines,
        r.bytes as f64 / 1e6,
        dir.display()
    );
    print_issues(r);
    Ok(())
}

pub fn print_issues(r: &bertcuda::data::text::InputReport) {
    for (what, n) in r.issues() {
        if n > 0 {
            eprintln!("  {what}: {n}");
        }
    }
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = BertTokenizer::load(&a.tokenizer, LoadOptions { no_lowercase: a.no_lowercase })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut one = |text: &str, where_: &dyn Fn() -> String| -> Result<()> {
        let (ids, types) = if a.pair {
            let Some((first, second)) = text.split_once('\t') else {
                bail!("{}: --pair needs a TAB between segment A and segment B", where_());
            };
            tok.encode_with_specials(first, Some(second))?
        } else {
            tok.encode_with_specials(text, None)?
        };
        serde_json::to_writer(&mut out, &serde_json::json!({"input_ids": ids, "token_type_ids": types}))?;
        out.write_all(b"\n")?;
        Ok(())
    };
    if !a.text.is_empty() {
        for (i, t) in a.text.iter().enumerate() {
            one(t, &|| format!("argument {}", i + 1))?;
        }
    } else {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        let mut buf = Vec::new();
        let mut n = 0usize;
        loop {
            buf.clear();
            if lock.read_until(b'\n', &mut buf).context("reading standard input")? == 0 {
                break;
            }
            n += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let text = match std::str::from_utf8(&buf) {
                Ok(s) => s.to_string(),
                Err(_) => {
                    // Keep the TAB of a pair; remove only the invalid bytes.
                    eprintln!("warning: standard input line {n}: invalid UTF-8 removed");
                    let parts: Vec<String> = buf.split(|&b| b == b'\t').map(|p| clean_line(p).0).collect();
                    parts.join("\t")
                }
            };
            one(&text, &|| format!("standard input line {n}"))?;
        }
    }
    out.flush()?;
    Ok(())
}
