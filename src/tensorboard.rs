//! A TensorBoard event-file writer for scalars, written to the format: TFRecord framing (u64 length,
//! masked CRC-32C of the length, data, masked CRC-32C of the data) around `Event` protocol buffers —
//! `Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5}`,
//! `Summary{value=1}`, `Value{tag=1, simple_value=2 (float)}` — the first record carrying
//! `file_version: "brain.Event:2"`. File name `events.out.tfevents.<secs>.<host>`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// TFRecord's CRC mask.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An Event with wall time, step, and either a file version or scalar values.
pub fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    e.push((1 << 3) | 1); // wall_time, 64-bit
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(2 << 3); // step, varint
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        len_delimited(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut val = Vec::new();
            len_delimited(1, tag.as_bytes(), &mut val);
            val.push((2 << 3) | 5); // simple_value, 32-bit
            val.extend_from_slice(&value.to_le_bytes());
            len_delimited(1, &val, &mut summary);
        }
        len_delimited(5, &summary, &mut e);
    }
    e
}

/// One TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

pub struct EventWriter {
    file: File,
    pub path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).at(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let mut file = File::create(&path).at(&path)?;
        file.write_all(&record(&event(t, 0, Some("brain.Event:2"), &[]))).at(&path)?;
        file.flush().at(&path)?;
        Ok(EventWriter { file, path })
    }

    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        self.file.write_all(&record(&event(now(), step as i64, None, values))).at(&self.path)?;
        self.file.flush().at(&self.path)
    }
}

/// Read back records, checking both CRCs of each: the data of every record.
pub fn read_records(bytes: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes.len() - i < 12 {
            return Err(format!("truncated record header at byte {i}"));
        }
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        if crc != masked_crc(len_bytes) {
            return Err(format!("bad length CRC at byte {i}"));
        }
        let start = i + 12;
        if bytes.len() < start + len + 4 {
            return Err(format!("truncated record at byte {i}"));
        }
        let data = &bytes[start..start + len];
        let dcrc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into().unwrap());
        if dcrc != masked_crc(data) {
            return Err(format!("bad data CRC at byte {i}"));
        }
        out.push(data.to_vec());
        i = start + len + 4;
    }
    Ok(out)
}
