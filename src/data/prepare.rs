//! `bertcuda prepare`: text → token shards.
//!
//! A reader thread streams documents off disk into chunks of about `CHUNK_BYTES`; windows of chunks are
//! tokenized in parallel on the worker pool and appended, in input order, to the shard being built. The
//! output is byte-identical whatever the number of workers, memory stays bounded by one shard plus a window
//! of chunks, and the directory appears only when complete (`AtomicDir`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use rayon::prelude::*;

use crate::bail;
use crate::data::shards::{Manifest, ShardBuilder, ShardEntry, FORMAT_VERSION, MANIFEST, MANIFEST_FORMAT};
use crate::data::text::{list_input_files, CorpusReader, InputReport};
use crate::data::tokenizer::{BertTokenizer, LoadOptions};
use crate::error::{Error, Result};
use crate::fsutil::AtomicDir;
use crate::progress::Progress;

/// Text per chunk handed to one worker.
const CHUNK_BYTES: usize = 256 * 1024;
/// Default tokens per shard file (128 MiB of u16 ids).
pub const DEFAULT_SHARD_TOKENS: u64 = 1 << 26;

#[derive(Debug, Clone)]
pub struct PrepareConfig {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub no_lowercase: bool,
    pub output: PathBuf,
    /// Tokenizer threads; 0 = every core.
    pub workers: usize,
    pub overwrite: bool,
    pub max_line_bytes: usize,
    pub shard_tokens: u64,
    /// 2 or 4; None = 2 when the vocabulary fits in u16, else 4.
    pub id_bytes: Option<u32>,
    pub progress: bool,
}

impl PrepareConfig {
    /// The defaults of `bertcuda prepare`: every core, no overwrite, no progress output.
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, output: PathBuf) -> Self {
        PrepareConfig {
            inputs,
            tokenizer,
            no_lowercase: false,
            output,
            workers: 0,
            overwrite: false,
            max_line_bytes: crate::data::text::DEFAULT_MAX_LINE_BYTES,
            shard_tokens: DEFAULT_SHARD_TOKENS,
            id_bytes: None,
            progress: false,
        }
    }
}

pub struct PrepareSummary {
    pub output: PathBuf,
    pub manifest: Manifest,
    pub seconds: f64,
}

/// One chunk's documents as token ids, flattened.
#[derive(Default)]
struct TokenizedChunk {
    tokens: Vec<u32>,
    /// Tokens of each kept sentence.
    sentence_lens: Vec<u32>,
    /// Kept sentences of each kept document.
    document_lens: Vec<u32>,
    empty_sentences: u64,
    empty_documents: u64,
}

fn tokenize_chunk(tok: &BertTokenizer, docs: &[Vec<String>]) -> Result<TokenizedChunk> {
    let mut out = TokenizedChunk::default();
    for doc in docs {
        let mut kept = 0u32;
        for sentence in doc {
            let ids = tok.encode_ids(sentence)?;
            if ids.is_empty() {
                out.empty_sentences += 1;
                continue;
            }
            out.tokens.extend_from_slice(&ids);
            out.sentence_lens.push(ids.len() as u32);
            kept += 1;
        }
        if kept == 0 {
            out.empty_documents += 1;
        } else {
            out.document_lens.push(kept);
        }
    }
    Ok(out)
}

enum ReaderMsg {
    Chunk(Vec<Vec<String>>),
    Done(InputReport),
    Failed(Error),
}

fn read_chunks(mut reader: CorpusReader, tx: std::sync::mpsc::SyncSender<ReaderMsg>) {
    let mut chunk = Vec::new();
    let mut bytes = 0usize;
    loop {
        match reader.next_document() {
            Ok(Some(doc)) => {
                bytes += doc.iter().map(|s| s.len() + 1).sum::<usize>();
                chunk.push(doc);
                if bytes >= CHUNK_BYTES {
                    bytes = 0;
                    if tx.send(ReaderMsg::Chunk(std::mem::take(&mut chunk))).is_err() {
                        return;
                    }
                }
            }
            Ok(None) => {
                if !chunk.is_empty() && tx.send(ReaderMsg::Chunk(chunk)).is_err() {
                    return;
                }
                let _ = tx.send(ReaderMsg::Done(reader.report.clone()));
                return;
            }
            Err(e) => {
                let _ = tx.send(ReaderMsg::Failed(e));
                return;
            }
        }
    }
}

/// Receive up to `n` chunks; Ok(None) once the reader is done (with its report stored).
fn next_window(
    rx: &Receiver<ReaderMsg>,
    n: usize,
    report: &mut Option<InputReport>,
) -> Result<Vec<Vec<Vec<String>>>> {
    let mut window = Vec::new();
    while window.len() < n && report.is_none() {
        match rx.recv() {
            Ok(ReaderMsg::Chunk(c)) => window.push(c),
            Ok(ReaderMsg::Done(r)) => *report = Some(r),
            Ok(ReaderMsg::Failed(e)) => return Err(e),
            Err(_) => bail!("the input reader stopped unexpectedly"),
        }
    }
    Ok(window)
}

pub fn prepare(cfg: &PrepareConfig) -> Result<PrepareSummary> {
    let start = Instant::now();
    let files = list_input_files(&cfg.inputs)?;
    let tok = BertTokenizer::load(&cfg.tokenizer, LoadOptions { no_lowercase: cfg.no_lowercase })?;
    let id_bytes = match cfg.id_bytes {
        None if tok.vocab_size <= 1 << 16 => 2,
        None => 4,
        Some(2) if tok.vocab_size > 1 << 16 => bail!(
            "--id-width 16 cannot hold the ids of {} ({} tokens, more than 65,536); use --id-width 32 or auto",
            tok.source.display(),
            tok.vocab_size
        ),
        Some(w @ (2 | 4)) => w,
        Some(w) => bail!("id width of {w} bytes is not supported (2 or 4)"),
    };
    if cfg.shard_tokens == 0 {
        bail!("--shard-tokens must be at least 1");
    }
    let workers = if cfg.workers == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        cfg.workers
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start {workers} worker threads: {e}")))?;

    let out = AtomicDir::create(&cfg.output, cfg.overwrite)?;
    let reader = CorpusReader::new(files, cfg.max_line_bytes);
    let total_bytes = reader.total_bytes();
    let bytes_read = reader.bytes_read.clone();
    let mut progress = Progress::bytes("prepare", total_bytes, cfg.progress);

    let (tx, rx) = sync_channel(workers * 4);
    let reader_thread = std::thread::Builder::new()
        .name("prepare-reader".into())
        .spawn(move || read_chunks(reader, tx))
        .map_err(|e| Error::Invalid(format!("cannot start the reader thread: {e}")))?;

    let vocab_size = tok.vocab_size as u32;
    let mut shard = ShardBuilder::new(id_bytes, vocab_size);
    let mut entries: Vec<ShardEntry> = Vec::new();
    let mut report_in: Option<InputReport> = None;
    let (mut empty_sentences, mut empty_documents) = (0u64, 0u64);
    let flush = |shard: &mut ShardBuilder, entries: &mut Vec<ShardEntry>| -> Result<()> {
        let name = format!("shard-{:05}.bin", entries.len());
        let bytes = shard.to_bytes();
        out.write(&name, &bytes)?;
        entries.push(shard.entry(name, &bytes));
        *shard = ShardBuilder::new(id_bytes, vocab_size);
        Ok(())
    };

    let result: Result<()> = (|| {
        loop {
            let window = next_window(&rx, workers * 4, &mut report_in)?;
            if window.is_empty() {
                break;
            }
            let chunks: Vec<TokenizedChunk> = pool.install(|| {
                window.par_iter().map(|docs| tokenize_chunk(&tok, docs)).collect::<Result<_>>()
            })?;
            for c in &chunks {
                empty_sentences += c.empty_sentences;
                empty_documents += c.empty_documents;
                let (mut t, mut s) = (0usize, 0usize);
                for &n in &c.document_lens {
                    let lens = &c.sentence_lens[s..s + n as usize];
                    shard.push_document(lens.iter().map(|&l| {
                        let sl = &c.tokens[t..t + l as usize];
                        t += l as usize;
                        sl
                    }));
                    s += n as usize;
                    if shard.tokens() >= cfg.shard_tokens {
                        flush(&mut shard, &mut entries)?;
                    }
                }
            }
            progress.set(bytes_read.load(Ordering::Relaxed));
        }
        Ok(())
    })();
    drop(rx);
    let _ = reader_thread.join();
    progress.finish();
    result?;
    if shard.documents() > 0 {
        flush(&mut shard, &mut entries)?;
    }
    let mut report = report_in.unwrap_or_default();
    report.empty_sentences = empty_sentences;
    report.empty_documents = empty_documents;
    let (documents, sentences, tokens) =
        entries.iter().fold((0, 0, 0), |a, e| (a.0 + e.documents, a.1 + e.sentences, a.2 + e.tokens));
    if documents == 0 {
        bail!(
            "the input holds no text ({} files, {} lines, none with a token); check --input: one sentence per line, a blank line between documents",
            report.files,
            report.lines
        );
    }
    tok.save_hf(out.path())?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: FORMAT_VERSION,
        created_by: format!("bertcuda {}", env!("CARGO_PKG_VERSION")),
        tokenizer_fingerprint: tok.fingerprint(),
        vocab_size,
        do_lower_case: tok.do_lower_case,
        special_tokens: tok.special,
        id_bytes,
        documents,
        sentences,
        tokens,
        report,
        shards: entries,
    };
    out.write(MANIFEST, serde_json::to_string_pretty(&manifest).expect("manifest serialises").as_bytes())?;
    let output = out.commit()?;
    Ok(PrepareSummary { output, manifest, seconds: start.elapsed().as_secs_f64() })
}
