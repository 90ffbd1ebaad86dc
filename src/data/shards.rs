//! Token shards: what `prepare` writes and the loader memory-maps.
//!
//! A shard directory holds `manifest.json`, the tokenizer files, and shard files `shard-NNNNN.bin`:
//! ```text
//! offset  size          field (all little-endian)
//! 0       8             magic b"BCSHARD\0"
//! 8       4             format version (1)
//! 12      4             id width in bytes: 2 (u16 ids) or 4 (u32 ids)
//! 16      8             D = documents
//! 24      8             S = sentences
//! 32      8             N = tokens
//! 40      4             vocabulary size (every id is below it)
//! 44      20            zero
//! 64      8·(D+1)       document offsets: document d is sentences [doc[d], doc[d+1])
//! ..      8·(S+1)       sentence offsets: sentence s is tokens [sent[s], sent[s+1])
//! ..      width·N       token ids (word pieces, no special tokens)
//! ```
//! Every array starts on an 8-byte boundary, so a memory map is read in place with bytemuck.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::data::text::InputReport;
use crate::data::tokenizer::{BertTokenizer, SpecialIds};
use crate::error::{Error, IoContext, Result};

pub const MAGIC: &[u8; 8] = b"BCSHARD\0";
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_FORMAT: &str = "bertcuda-shards";

/// `manifest.json` of a shard directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_by: String,
    /// `BertTokenizer::fingerprint` of the tokenizer that made the ids.
    pub tokenizer_fingerprint: String,
    pub vocab_size: u32,
    pub do_lower_case: bool,
    pub special_tokens: SpecialIds,
    pub id_bytes: u32,
    pub documents: u64,
    pub sentences: u64,
    pub tokens: u64,
    pub report: InputReport,
    pub shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub file: String,
    pub bytes: u64,
    /// CRC-32C of the whole file, as 8 hex digits.
    pub crc32c: String,
    pub documents: u64,
    pub sentences: u64,
    pub tokens: u64,
}

/// Builds one shard in memory, then writes it whole.
pub struct ShardBuilder {
    id_bytes: u32,
    vocab_size: u32,
    doc_offsets: Vec<u64>,
    sent_offsets: Vec<u64>,
    tokens: Vec<u32>,
}

impl ShardBuilder {
    pub fn new(id_bytes: u32, vocab_size: u32) -> Self {
        ShardBuilder { id_bytes, vocab_size, doc_offsets: vec![0], sent_offsets: vec![0], tokens: Vec::new() }
    }

    pub fn documents(&self) -> u64 {
        self.doc_offsets.len() as u64 - 1
    }
    pub fn tokens(&self) -> u64 {
        self.tokens.len() as u64
    }

    /// Add one document given as its sentences' token ids (none empty).
    pub fn push_document<'a>(&mut self, sentences: impl IntoIterator<Item = &'a [u32]>) {
        for s in sentences {
            debug_assert!(!s.is_empty());
            self.tokens.extend_from_slice(s);
            self.sent_offsets.push(self.tokens.len() as u64);
        }
        self.doc_offsets.push(self.sent_offsets.len() as u64 - 1);
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (d, s, n) = (self.documents(), self.sent_offsets.len() as u64 - 1, self.tokens());
        let mut out = Vec::with_capacity(file_size(d, s, n, self.id_bytes) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.id_bytes.to_le_bytes());
        for v in [d, s, n] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.vocab_size.to_le_bytes());
        out.resize(HEADER_BYTES, 0);
        for v in self.doc_offsets.iter().chain(&self.sent_offsets) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match self.id_bytes {
            2 => self.tokens.iter().for_each(|&t| out.extend_from_slice(&(t as u16).to_le_bytes())),
            _ => self.tokens.iter().for_each(|&t| out.extend_from_slice(&t.to_le_bytes())),
        }
        out
    }

    pub fn entry(&self, file: String, bytes: &[u8]) -> ShardEntry {
        ShardEntry {
            file,
            bytes: bytes.len() as u64,
            crc32c: format!("{:08x}", crc32c::crc32c(bytes)),
            documents: self.documents(),
            sentences: self.sent_offsets.len() as u64 - 1,
            tokens: self.tokens(),
        }
    }
}

fn file_size(d: u64, s: u64, n: u64, id_bytes: u32) -> u64 {
    HEADER_BYTES as u64 + 8 * (d + 1) + 8 * (s + 1) + id_bytes as u64 * n
}

/// The token ids of one sentence, in the shard's width.
#[derive(Debug, Clone, Copy)]
pub enum Tokens<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

impl Tokens<'_> {
    pub fn len(&self) -> usize {
        match self {
            Tokens::U16(t) => t.len(),
            Tokens::U32(t) => t.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> u32 {
        match self {
            Tokens::U16(t) => t[i] as u32,
            Tokens::U32(t) => t[i],
        }
    }
    pub fn extend_into(&self, out: &mut Vec<u32>) {
        match self {
            Tokens::U16(t) => out.extend(t.iter().map(|&x| x as u32)),
            Tokens::U32(t) => out.extend_from_slice(t),
        }
    }
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_into(&mut v);
        v
    }
}

/// One memory-mapped shard file, read in place.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    id_bytes: u32,
    pub documents: usize,
    pub sentences: usize,
    pub tokens: usize,
    pub vocab_size: u32,
}

impl Shard {
    /// Map a shard and check its header and size (cheap; `verify` also checks contents).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).at(path)?;
        // SAFETY: shard files are written once and never modified in place; a concurrent writer would be
        // replacing the whole directory by rename, which leaves this mapping valid.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        let bad = |what: String| {
            Error::corrupt(path, format!("{what}; re-run `bertcuda prepare` for this shard directory"))
        };
        if map.len() < HEADER_BYTES {
            return Err(bad(format!(
                "truncated: {} bytes, shorter than the {HEADER_BYTES}-byte header",
                map.len()
            )));
        }
        if &map[0..8] != MAGIC {
            return Err(bad("not a bertcuda shard (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "shard format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let id_bytes = u32_at(12);
        if id_bytes != 2 && id_bytes != 4 {
            return Err(bad(format!("id width {id_bytes} bytes in the header (must be 2 or 4)")));
        }
        let (d, s, n) = (u64_at(16), u64_at(24), u64_at(32));
        let vocab_size = u32_at(40);
        let expect = d
            .checked_add(1)
            .and_then(|d1| s.checked_add(1).map(|s1| (d1, s1)))
            .and_then(|(d1, s1)| {
                d1.checked_add(s1)?.checked_mul(8)?.checked_add(n.checked_mul(id_bytes as u64)?)
            })
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if expect != Some(map.len() as u64) {
            return Err(bad(format!(
                "size {} bytes does not match its header ({d} documents, {s} sentences, {n} tokens): truncated or corrupt",
                map.len()
            )));
        }
        let shard = Shard {
            path: path.to_path_buf(),
            map,
            id_bytes,
            documents: d as usize,
            sentences: s as usize,
            tokens: n as usize,
            vocab_size,
        };
        let (doc, sent) = (shard.doc_offsets(), shard.sent_offsets());
        if doc[0] != 0 || doc[d as usize] != s || sent[0] != 0 || sent[s as usize] != n {
            return Err(bad("offset tables do not span the shard".into()));
        }
        // Increasing offsets are what every read relies on (a corrupt table must not become a panic).
        if doc.windows(2).any(|w| w[0] >= w[1]) || sent.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("offset tables are not increasing (corrupt)".into()));
        }
        Ok(shard)
    }

    fn doc_offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.map[HEADER_BYTES..HEADER_BYTES + 8 * (self.documents + 1)])
    }
    fn sent_offsets(&self) -> &[u64] {
        let start = HEADER_BYTES + 8 * (self.documents + 1);
        bytemuck::cast_slice(&self.map[start..start + 8 * (self.sentences + 1)])
    }
    fn tokens_start(&self) -> usize {
        HEADER_BYTES + 8 * (self.documents + 1) + 8 * (self.sentences + 1)
    }

    /// Sentence indices of document `d`.
    pub fn document(&self, d: usize) -> std::ops::Range<usize> {
        let o = self.doc_offsets();
        o[d] as usize..o[d + 1] as usize
    }

    /// Token count of sentence `s`.
    pub fn sentence_len(&self, s: usize) -> usize {
        let o = self.sent_offsets();
        (o[s + 1] - o[s]) as usize
    }

    /// Token ids of sentence `s`.
    pub fn sentence(&self, s: usize) -> Tokens<'_> {
        let o = self.sent_offsets();
        let (a, b) = (o[s] as usize, o[s + 1] as usize);
        let base = self.tokens_start();
        match self.id_bytes {
            2 => Tokens::U16(bytemuck::cast_slice(&self.map[base + 2 * a..base + 2 * b])),
            _ => Tokens::U32(bytemuck::cast_slice(&self.map[base + 4 * a..base + 4 * b])),
        }
    }

    /// Full structural check: offsets non-decreasing and in range, no empty sentence, every id below the
    /// vocabulary size.
    pub fn check_contents(&self) -> Result<()> {
        let bad = |what: String| Error::corrupt(&self.path, what);
        let doc = self.doc_offsets();
        if doc.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "document offsets are not increasing (an empty or negative-length document)".into()
            ));
        }
        let sent = self.sent_offsets();
        if sent.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "sentence offsets are not increasing (an empty or negative-length sentence)".into()
            ));
        }
        let base = self.tokens_start();
        let max = match self.id_bytes {
            2 => bytemuck::cast_slice::<u8, u16>(&self.map[base..]).iter().map(|&t| t as u32).max(),
            _ => bytemuck::cast_slice::<u8, u32>(&self.map[base..]).iter().copied().max(),
        };
        if let Some(m) = max {
            if m >= self.vocab_size {
                return Err(bad(format!(
                    "token id {m} is outside the vocabulary of {} ids",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }
}

/// An opened shard directory: its manifest and every shard mapped.
pub struct ShardSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<Shard>,
}

impl ShardSet {
    /// Open a shard directory, checking each shard against the manifest (header, size, counts). Checksums
    /// are checked by `verify`, which reads every byte.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for e in &manifest.shards {
            let path = dir.join(&e.file);
            if !path.is_file() {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "named in {} but missing; re-run `bertcuda prepare`",
                        dir.join(MANIFEST).display()
                    ),
                ));
            }
            let shard = Shard::open(&path)?;
            if shard.map.len() as u64 != e.bytes
                || shard.documents as u64 != e.documents
                || shard.sentences as u64 != e.sentences
                || shard.tokens as u64 != e.tokens
                || shard.id_bytes != manifest.id_bytes
                || shard.vocab_size != manifest.vocab_size
            {
                return Err(Error::corrupt(&path, "does not match its entry in manifest.json (size, counts, id width or vocabulary); re-run `bertcuda prepare`"));
            }
            shards.push(shard);
        }
        Ok(ShardSet { dir: dir.to_path_buf(), manifest, shards })
    }

    /// Refuse shards made with another tokenizer.
    pub fn check_tokenizer(&self, tok: &BertTokenizer) -> Result<()> {
        let fp = tok.fingerprint();
        if fp != self.manifest.tokenizer_fingerprint {
            bail!(
                "{}: these shards were made with another tokenizer ({}) than {} ({fp}); re-run `bertcuda prepare --tokenizer {}` or use the matching tokenizer",
                self.dir.display(),
                self.manifest.tokenizer_fingerprint,
                tok.source.display(),
                tok.source.display()
            );
        }
        Ok(())
    }

    /// The tokenizer the shards carry.
    pub fn tokenizer(&self) -> Result<BertTokenizer> {
        BertTokenizer::load(&self.dir, Default::default())
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !dir.is_dir() {
        bail!("{}: no such shard directory; make one with `bertcuda prepare --input TEXT --tokenizer TOK --output DIR`", dir.display());
    }
    if !path.is_file() {
        return Err(Error::corrupt(&path, "missing: this is not a complete shard directory (an interrupted prepare?); re-run `bertcuda prepare`"));
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::corrupt(&path, format!("not a valid shard manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT || m.version != FORMAT_VERSION {
        return Err(Error::corrupt(
            &path,
            format!(
                "format {} version {}, this build reads {MANIFEST_FORMAT} version {FORMAT_VERSION}",
                m.format, m.version
            ),
        ));
    }
    Ok(m)
}

/// `bertcuda shards verify`: every shard's size, header, checksum and contents. Names the first bad file.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    for e in &manifest.shards {
        let path = dir.join(&e.file);
        let bytes = std::fs::read(&path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                Error::corrupt(&path, "named in manifest.json but missing")
            } else {
                Error::io(&path, err)
            }
        })?;
        if bytes.len() as u64 != e.bytes {
            return Err(Error::corrupt(
                &path,
                format!("{} bytes, manifest.json says {} (truncated or replaced)", bytes.len(), e.bytes),
            ));
        }
        let crc = format!("{:08x}", crc32c::crc32c(&bytes));
        if crc != e.crc32c {
            return Err(Error::corrupt(
                &path,
                format!(
                    "checksum {crc} does not match manifest.json's {} (corrupted on disk or in transfer)",
                    e.crc32c
                ),
            ));
        }
        let shard = Shard::open(&path)?;
        shard.check_contents()?;
    }
    for f in crate::data::tokenizer::HF_TOKENIZER_FILES {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::corrupt(&p, "tokenizer file missing from the shard directory"));
        }
    }
    let tok = BertTokenizer::load(dir, Default::default())?;
    if tok.fingerprint() != manifest.tokenizer_fingerprint {
        return Err(Error::corrupt(
            dir.join("tokenizer.json"),
            "does not match the tokenizer fingerprint in manifest.json",
        ));
    }
    Ok(manifest)
}
