//! Reading the pretraining input format: one sentence per line, a blank line between documents; files or
//! directories (walked in sorted order), plain or gzip. Bad text is repaired or dropped and counted, never
//! a panic and never silent:
//! - invalid UTF-8: the invalid bytes are removed (as Google's `convert_to_unicode(..., errors="ignore")`);
//! - control characters (other than tab) are removed;
//! - a line longer than the limit is cut at the last character boundary within it, the rest dropped;
//! - a document that ends up with no sentence is dropped (counted by the consumer, after tokenization).
//!
//! A document also ends at the end of each file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::error::{Error, IoContext, Result};

/// Default cut-off for one line (one sentence), in bytes.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// What was repaired or dropped while reading and tokenizing, with counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputReport {
    pub files: u64,
    pub bytes: u64,
    pub lines: u64,
    /// Lines holding invalid UTF-8; the invalid bytes were removed.
    pub invalid_utf8_lines: u64,
    /// Lines holding control characters; they were removed.
    pub control_char_lines: u64,
    /// Lines longer than the limit; cut to it.
    pub long_lines_cut: u64,
    /// Lines that held no token once cleaned and tokenized; dropped.
    pub empty_sentences: u64,
    /// Documents with no sentence left; dropped.
    pub empty_documents: u64,
}

impl InputReport {
    pub fn add(&mut self, o: &InputReport) {
        self.files += o.files;
        self.bytes += o.bytes;
        self.lines += o.lines;
        self.invalid_utf8_lines += o.invalid_utf8_lines;
        self.control_char_lines += o.control_char_lines;
        self.long_lines_cut += o.long_lines_cut;
        self.empty_sentences += o.empty_sentences;
        self.empty_documents += o.empty_documents;
    }

    /// The repairs and drops as (description, count), for summaries.
    pub fn issues(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("lines with invalid UTF-8 (bytes removed)", self.invalid_utf8_lines),
            ("lines with control characters (removed)", self.control_char_lines),
            ("lines over the length limit (cut)", self.long_lines_cut),
            ("empty sentences (dropped)", self.empty_sentences),
            ("empty documents (dropped)", self.empty_documents),
        ]
    }
}

/// Every input file, in the order they are read: each argument in turn, directories walked recursively in
/// sorted order. Hidden files (names starting with '.') inside directories are skipped.
pub fn list_input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .at(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .at(dir)?;
        entries.sort();
        for p in entries {
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.is_file() {
                out.push(p);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        bail!("no input given: pass one or more text files or directories with --input");
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!(
                "{}: no such file or directory (an --input must be a text file, a .gz file or a directory)",
                p.display()
            );
        }
    }
    if out.is_empty() {
        bail!(
            "no input files found in {}",
            inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

/// Reads documents (lists of cleaned sentences) from a list of files, in order.
pub struct CorpusReader {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(PathBuf, Box<dyn BufRead + Send>)>,
    max_line_bytes: usize,
    /// Compressed bytes consumed so far, all files together (for progress).
    pub bytes_read: Arc<AtomicU64>,
    pub report: InputReport,
    line: Vec<u8>,
}

impl CorpusReader {
    pub fn new(files: Vec<PathBuf>, max_line_bytes: usize) -> Self {
        CorpusReader {
            files,
            next_file: 0,
            current: None,
            max_line_bytes: max_line_bytes.max(4),
            bytes_read: Arc::new(AtomicU64::new(0)),
            report: InputReport::default(),
            line: Vec::new(),
        }
    }

    /// Sum of the input files' sizes on disk.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
    }

    fn open(&mut self, path: &Path) -> Result<Box<dyn BufRead + Send>> {
        let file = File::open(path).at(path)?;
        let counting = CountingReader { inner: file, count: self.bytes_read.clone() };
        let mut buf = BufReader::with_capacity(1 << 20, counting);
        let is_gzip = buf.fill_buf().at(path)?.starts_with(&[0x1f, 0x8b]);
        self.report.files += 1;
        Ok(if is_gzip {
            Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(buf)))
        } else {
            Box::new(buf)
        })
    }

    /// The next document, or None at the end of the input. Sentences are cleaned but may still be empty
    /// after tokenization; documents are never empty of lines.
    pub fn next_document(&mut self) -> Result<Option<Vec<String>>> {
        let mut doc = Vec::new();
        loop {
            if self.current.is_none() {
                if self.next_file == self.files.len() {
                    return Ok(if doc.is_empty() { None } else { Some(doc) });
                }
                let path = self.files[self.next_file].clone();
                self.next_file += 1;
                let reader = self.open(&path)?;
                self.current = Some((path, reader));
                if !doc.is_empty() {
                    return Ok(Some(doc));
                }
            }
            let (path, reader) = self.current.as_mut().unwrap();
            let (got, cut) = read_line_bounded(reader.as_mut(), &mut self.line, self.max_line_bytes)
                .map_err(|e| read_error(path, e))?;
            if !got {
                self.current = None; // end of file ends the document
                continue;
            }
            self.report.lines += 1;
            self.report.bytes += self.line.len() as u64;
            if cut {
                self.report.long_lines_cut += 1;
            }
            if self.line.iter().all(|b| b.is_ascii_whitespace()) {
                if !doc.is_empty() {
                    return Ok(Some(doc));
                }
                continue;
            }
            let (text, invalid, control) = clean_line(&self.line);
            self.report.invalid_utf8_lines += invalid as u64;
            self.report.control_char_lines += control as u64;
            doc.push(text);
        }
    }
}

fn read_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::InvalidInput || e.kind() == std::io::ErrorKind::InvalidData {
        Error::corrupt(path, format!("cannot decompress: {e} (a truncated or corrupt .gz file?)"))
    } else {
        Error::io(path, e)
    }
}

/// Read one line (without its '\n' / "\r\n") into `buf`, keeping at most `limit` bytes and skipping the rest
/// of an over-long line without holding it in memory. Returns (a line was read, the line was cut).
fn read_line_bounded(r: &mut dyn BufRead, buf: &mut Vec<u8>, limit: usize) -> std::io::Result<(bool, bool)> {
    buf.clear();
    let mut any = false;
    let mut cut = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_sub(buf.len());
        if take > room {
            cut = true;
        }
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(if done { take + 1 } else { take });
        if done {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if cut {
        // Cut at a character boundary: drop a trailing partial UTF-8 sequence.
        let valid = match std::str::from_utf8(buf) {
            Ok(_) => buf.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => buf.len(),
        };
        buf.truncate(valid);
    }
    Ok((any, cut))
}

/// Decode a line, removing invalid UTF-8 and control characters (tab becomes a space).
/// Returns (text, had invalid UTF-8, had control characters).
pub fn clean_line(bytes: &[u8]) -> (String, bool, bool) {
    let (text, invalid) = match std::str::from_utf8(bytes) {
        Ok(s) => (std::borrow::Cow::Borrowed(s), false),
        Err(_) => (String::from_utf8_lossy(bytes), true),
    };
    let bad = |c: char| (c.is_control() && c != '\t') || (invalid && c == char::REPLACEMENT_CHARACTER);
    let has_control = text.chars().any(|c| c.is_control() && c != '\t');
    if !has_control && !invalid && !text.contains('\t') {
        return (text.into_owned(), false, false);
    }
    let cleaned: String =
        text.chars().filter(|&c| !bad(c)).map(|c| if c == '\t' { ' ' } else { c }).collect();
    (cleaned, invalid, has_control)
}

struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_long_lines_are_cut_at_a_char_boundary() {
        let text = "ééééé\nshort\n";
        let mut r = std::io::Cursor::new(text.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(read_line_bounded(&mut r, &mut buf, 5).unwrap(), (true, true));
        assert_eq!(std::str::from_utf8(&buf).unwrap(), "éé");
        assert_eq!(read_line_bounded(&mut r, &mut buf, 5).unwrap(), (true, false));
        assert_eq!(buf, b"short");
        assert_eq!(read_line_bounded(&mut r, &mut buf, 5).unwrap(), (false, false));
    }

    #[test]
    fn clean_line_removes_invalid_bytes_and_control_characters() {
        assert_eq!(clean_line(b"plain"), ("plain".into(), false, false));
        assert_eq!(clean_line(b"a\xffb"), ("ab".into(), true, false));
        assert_eq!(clean_line(b"a\x07b\tc"), ("ab c".into(), false, true));
    }
}
