//! Google BERT's TensorFlow checkpoints, read directly: the tensor bundle's index (`<prefix>.index`, an
//! SSTable of `BundleEntryProto` records keyed by variable name) and its data files
//! (`<prefix>.data-<shard>-of-<shards>`), with Google's variable names mapped to transformers'.
//!
//! SSTable (LevelDB's table format): a 48-byte footer (the metaindex and index block handles as varints,
//! padded to 40 bytes, then the magic number); blocks of prefix-compressed entries (shared, unshared and
//! value lengths as varints, then the key's new bytes and the value) ended by restart offsets, each block
//! followed by a 1-byte compression type and a masked CRC-32C. The index block's values are the data
//! blocks' handles. A bundle's entry "" is its header (number of shards, endianness); every other entry
//! a tensor: dtype, shape, shard, offset and size in the data file, and the masked CRC-32C of its bytes.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{decode, Dtype, Stored};
use crate::error::{Error, IoContext, Result};

const TABLE_MAGIC: u64 = 0xdb4775248b80fb57;
/// A variable name's length at most, and the bytes of all keys of one block.
const MAX_KEY: usize = 1 << 16;
const MAX_KEY_BYTES: usize = 64 << 20;

/// One tensor of the bundle, as its index entry describes it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// TensorFlow's DataType enum value.
    pub dtype: u64,
    pub shape: Vec<usize>,
    pub shard: usize,
    pub offset: usize,
    pub size: usize,
    pub crc32c: Option<u32>,
    pub sliced: bool,
}

/// An opened bundle: its entries and its mapped data files.
pub struct Bundle {
    pub index: PathBuf,
    pub entries: Vec<Entry>,
    shards: Vec<(PathBuf, Mmap)>,
}

fn dtype_name(t: u64) -> String {
    match t {
        1 => "float32".into(),
        2 => "float64".into(),
        3 => "int32".into(),
        4 => "uint8".into(),
        5 => "int16".into(),
        6 => "int8".into(),
        7 => "string".into(),
        9 => "int64".into(),
        10 => "bool".into(),
        14 => "bfloat16".into(),
        19 => "float16".into(),
        other => format!("TensorFlow dtype {other}"),
    }
}

fn crc_unmask(masked: u32) -> u32 {
    let rot = masked.wrapping_sub(0xa282ead8);
    rot.rotate_left(15)
}

/// A cursor over protobuf / varint bytes; errors are sentences.
struct Bytes<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn new(b: &'a [u8]) -> Self {
        Bytes { b, pos: 0 }
    }
    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("a varint runs past its block")?;
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }
    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let n = usize::try_from(n).map_err(|_| "a length beyond memory".to_string())?;
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("a field runs past its block")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// One protobuf field: (number, wire type, varint value or bytes).
    fn field(&mut self) -> std::result::Result<(u64, Field<'a>), String> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed(u64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            2 => {
                let n = self.varint()?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed(u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as u64),
            w => return Err(format!("protobuf wire type {w}")),
        };
        Ok((num, f))
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed(u64),
    Bytes(&'a [u8]),
}

fn parse_shape(b: &[u8]) -> std::result::Result<Vec<usize>, String> {
    let mut shape = Vec::new();
    let mut r = Bytes::new(b);
    while !r.done() {
        match r.field()? {
            (2, Field::Bytes(dim)) => {
                let mut d = Bytes::new(dim);
                let mut size = 0i64;
                while !d.done() {
                    if let (1, Field::Varint(v)) = d.field()? {
                        size = v as i64;
                    }
                }
                if size < 0 {
                    return Err("a dimension of unknown size".into());
                }
                shape.push(size as usize);
            }
            (3, Field::Varint(1)) => return Err("a tensor of unknown rank".into()),
            _ => {}
        }
    }
    Ok(shape)
}

fn parse_entry(name: String, b: &[u8]) -> std::result::Result<Entry, String> {
    let mut e = Entry {
        name,
        dtype: 0,
        shape: Vec::new(),
        shard: 0,
        offset: 0,
        size: 0,
        crc32c: None,
        sliced: false,
    };
    let mut r = Bytes::new(b);
    while !r.done() {
        match r.field()? {
            (1, Field::Varint(v)) => e.dtype = v,
            (2, Field::Bytes(s)) => e.shape = parse_shape(s)?,
            (3, Field::Varint(v)) => e.shard = v as usize,
            (4, Field::Varint(v)) => e.offset = v as usize,
            (5, Field::Varint(v)) => e.size = v as usize,
            (6, Field::Fixed(v)) => e.crc32c = Some(v as u32),
            (7, _) => e.sliced = true,
            _ => {}
        }
    }
    Ok(e)
}

/// A block's entries: each key (whole) and its value.
type BlockEntries<'a> = Vec<(Vec<u8>, &'a [u8])>;

/// The key/value entries of one SSTable block (its trailer checked).
fn block_entries(file: &[u8], offset: u64, size: u64) -> std::result::Result<BlockEntries<'_>, String> {
    let (offset, size) = (offset as usize, size as usize);
    let end = offset
        .checked_add(size)
        .filter(|&e| e.checked_add(5).is_some_and(|t| t <= file.len()))
        .ok_or("a block runs past the end of the file (truncated?)")?;
    let block = &file[offset..end];
    let trailer = &file[end..end + 5];
    match trailer[0] {
        0 => {}
        1 => return Err("a Snappy-compressed block, which TensorFlow's bundles do not write".into()),
        t => return Err(format!("block compression type {t}")),
    }
    let want = crc_unmask(u32::from_le_bytes(trailer[1..5].try_into().unwrap()));
    let got = crc32c::crc32c_append(crc32c::crc32c(block), &trailer[..1]);
    if got != want {
        return Err(format!("the block at byte {offset} fails its checksum (corrupt file)"));
    }
    if block.len() < 4 {
        return Err("a block too short for its restart count".into());
    }
    let restarts = u32::from_le_bytes(block[block.len() - 4..].try_into().unwrap()) as usize;
    let data_end = restarts
        .checked_mul(4)
        .and_then(|r| block.len().checked_sub(4 + r))
        .ok_or("a block whose restart array is larger than the block")?;
    let mut r = Bytes::new(&block[..data_end]);
    let mut key: Vec<u8> = Vec::new();
    let mut key_bytes = 0usize;
    let mut out = Vec::new();
    while !r.done() {
        let shared = r.varint()? as usize;
        let unshared = r.varint()?;
        let value_len = r.varint()?;
        if shared > key.len() {
            return Err("a key sharing more bytes than the previous key has".into());
        }
        key.truncate(shared);
        key.extend_from_slice(r.take(unshared)?);
        // Variable names are short; a block of ever longer shared keys would copy quadratically.
        key_bytes += key.len();
        if key.len() > MAX_KEY || key_bytes > MAX_KEY_BYTES {
            return Err("keys longer than any variable name (corrupt index)".into());
        }
        out.push((key.clone(), r.take(value_len)?));
    }
    Ok(out)
}

fn data_path(prefix: &Path, shard: usize, shards: usize) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(format!(".data-{shard:05}-of-{shards:05}"));
    PathBuf::from(s)
}

impl Bundle {
    /// Open `<prefix>.index` and its data files.
    pub fn open(prefix: &Path) -> Result<Self> {
        let mut index = prefix.as_os_str().to_owned();
        index.push(".index");
        let index = PathBuf::from(index);
        let bad = |what: String| Error::corrupt(&index, what);
        let file = std::fs::read(&index).at(&index)?;
        if file.len() < 48 {
            return Err(bad("too short for a TensorFlow checkpoint index (truncated?)".into()));
        }
        let footer = &file[file.len() - 48..];
        if u64::from_le_bytes(footer[40..].try_into().unwrap()) != TABLE_MAGIC {
            return Err(bad("not a TensorFlow checkpoint index (no table magic number; truncated?)".into()));
        }
        let mut f = Bytes::new(&footer[..40]);
        let parse =
            |f: &mut Bytes| -> std::result::Result<(u64, u64), String> { Ok((f.varint()?, f.varint()?)) };
        let _metaindex = parse(&mut f).map_err(&bad)?;
        let (io, is) = parse(&mut f).map_err(&bad)?;
        let mut entries = Vec::new();
        let mut shards = 1usize;
        for (_, handle) in block_entries(&file, io, is).map_err(&bad)? {
            let mut h = Bytes::new(handle);
            let (o, s) = parse(&mut h).map_err(&bad)?;
            for (key, value) in block_entries(&file, o, s).map_err(&bad)? {
                if key.is_empty() {
                    // The header: BundleHeaderProto { num_shards = 1, endianness = 2 }.
                    let mut r = Bytes::new(value);
                    while !r.done() {
                        match r.field().map_err(&bad)? {
                            (1, Field::Varint(n)) => shards = (n as usize).max(1),
                            (2, Field::Varint(1)) => {
                                return Err(bad(
                                    "a big-endian checkpoint; bertcuda reads little-endian ones".into()
                                ))
                            }
                            _ => {}
                        }
                    }
                    continue;
                }
                let name =
                    String::from_utf8(key).map_err(|_| bad("a variable name that is not UTF-8".into()))?;
                let e = parse_entry(name.clone(), value).map_err(|e| bad(format!("variable {name}: {e}")))?;
                entries.push(e);
            }
        }
        let mut mapped = Vec::new();
        for shard in 0..shards {
            let path = data_path(prefix, shard, shards);
            let f = std::fs::File::open(&path).map_err(|e| {
                Error::Invalid(format!(
                    "{}: {e}; a TensorFlow checkpoint needs its data files beside {}",
                    path.display(),
                    index.display()
                ))
            })?;
            // SAFETY: read-only map of a file we do not modify.
            let map = unsafe { Mmap::map(&f) }.at(&path)?;
            mapped.push((path, map));
        }
        Ok(Bundle { index, entries, shards: mapped })
    }

    /// A tensor's values as f32, its checksum verified.
    pub fn read(&self, e: &Entry) -> Result<Vec<f32>> {
        let bad = |what: String| Error::corrupt(&self.index, format!("variable {}: {what}", e.name));
        if e.sliced {
            return Err(bad("a partitioned (sliced) variable, which BERT checkpoints do not have".into()));
        }
        let dtype = match e.dtype {
            1 => Dtype::F32,
            2 => Dtype::F64,
            19 => Dtype::F16,
            14 => Dtype::Bf16,
            other => {
                return Err(bad(format!("dtype {}; a parameter must be a float type", dtype_name(other))))
            }
        };
        let (path, map) =
            self.shards.get(e.shard).ok_or_else(|| bad(format!("shard {} does not exist", e.shard)))?;
        let bytes = e
            .offset
            .checked_add(e.size)
            .filter(|&end| end <= map.len())
            .map(|end| &map[e.offset..end])
            .ok_or_else(|| {
                Error::corrupt(
                    path,
                    format!(
                        "variable {}: its {} bytes at {} run past the end of the file (truncated?)",
                        e.name, e.size, e.offset
                    ),
                )
            })?;
        let count = super::numel(&e.shape).and_then(|n| n.checked_mul(dtype.size()));
        if count != Some(bytes.len()) {
            return Err(bad(format!(
                "{} bytes for a {:?} tensor of {}",
                bytes.len(),
                e.shape,
                dtype_name(e.dtype)
            )));
        }
        if let Some(masked) = e.crc32c {
            if crc32c::crc32c(bytes) != crc_unmask(masked) {
                return Err(Error::corrupt(
                    path,
                    format!("variable {}: its bytes fail their checksum (corrupt file)", e.name),
                ));
            }
        }
        decode(path, &e.name, dtype, bytes)
    }
}

/// What a Google BERT variable is in transformers' BertForPreTraining: its name, and whether the values are
/// transposed (TF dense kernels are [in, out], torch's Linear weights [out, in]). `None`: not a model
/// variable (optimizer slots and the step counter are told apart by `is_training_state`).
pub fn hf_name(tf: &str) -> Option<(String, bool)> {
    let special = match tf {
        "cls/predictions/output_bias" => Some("cls.predictions.bias"),
        "cls/seq_relationship/output_weights" => Some("cls.seq_relationship.weight"),
        "cls/seq_relationship/output_bias" => Some("cls.seq_relationship.bias"),
        _ => None,
    };
    if let Some(s) = special {
        return Some((s.to_string(), false));
    }
    if !tf.starts_with("bert/") && !tf.starts_with("cls/") {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    for p in tf.split('/') {
        match p.strip_prefix("layer_") {
            Some(n) if n.parse::<usize>().is_ok() => {
                parts.push("layer".into());
                parts.push(n.into());
            }
            _ => parts.push(p.into()),
        }
    }
    let last = parts.pop()?;
    let (leaf, transposed) = match last.as_str() {
        "kernel" => ("weight", true),
        "gamma" => ("weight", false),
        "beta" => ("bias", false),
        "bias" => ("bias", false),
        e if e.ends_with("_embeddings") => {
            parts.push(last.clone());
            ("weight", false)
        }
        _ => return None,
    };
    Some((format!("{}.{leaf}", parts.join(".")), transposed))
}

/// Variables of the training run, not the model: Adam's moments, the step counter, loss-scale state.
pub fn is_training_state(tf: &str) -> bool {
    let leaf = tf.rsplit('/').next().unwrap_or(tf);
    matches!(leaf, "adam_m" | "adam_v" | "Adam" | "Adam_1" | "global_step" | "loss_scale" | "good_steps")
        || tf.starts_with("global_step")
        || tf == "_CHECKPOINTABLE_OBJECT_GRAPH"
}

/// The bundle's tensors under transformers' names; the rest reported as skipped (training state) or
/// ignored (variables with no place in BertForPreTraining).
pub fn tensors(bundle: &Bundle) -> (Vec<Stored<'_>>, Vec<String>, Vec<String>) {
    let (mut out, mut skipped, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    for e in &bundle.entries {
        if is_training_state(&e.name) {
            skipped.push(e.name.clone());
            continue;
        }
        let Some((name, transposed)) = hf_name(&e.name) else {
            ignored.push(e.name.clone());
            continue;
        };
        if transposed && e.shape.len() == 2 {
            let (rows, cols) = (e.shape[0], e.shape[1]);
            out.push(Stored::new(name, vec![cols, rows], &bundle.index, move || {
                let v = bundle.read(e)?;
                let mut t = vec![0f32; v.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        t[c * rows + r] = v[r * cols + c];
                    }
                }
                Ok(t)
            }));
        } else {
            out.push(Stored::new(name, e.shape.clone(), &bundle.index, move || bundle.read(e)));
        }
    }
    (out, skipped, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_names_map_to_transformers() {
        let cases = [
            ("bert/embeddings/word_embeddings", "bert.embeddings.word_embeddings.weight", false),
            ("bert/embeddings/LayerNorm/gamma", "bert.embeddings.LayerNorm.weight", false),
            (
                "bert/encoder/layer_11/attention/self/query/kernel",
                "bert.encoder.layer.11.attention.self.query.weight",
                true,
            ),
            (
                "bert/encoder/layer_0/output/LayerNorm/beta",
                "bert.encoder.layer.0.output.LayerNorm.bias",
                false,
            ),
            ("bert/pooler/dense/bias", "bert.pooler.dense.bias", false),
            ("cls/predictions/transform/dense/kernel", "cls.predictions.transform.dense.weight", true),
            ("cls/predictions/output_bias", "cls.predictions.bias", false),
            ("cls/seq_relationship/output_weights", "cls.seq_relationship.weight", false),
        ];
        for (tf, hf, t) in cases {
            assert_eq!(hf_name(tf), Some((hf.to_string(), t)), "{tf}");
        }
        assert!(is_training_state("bert/encoder/layer_0/attention/self/query/kernel/adam_m"));
        assert!(is_training_state("global_step"));
        assert_eq!(hf_name("output_weights"), None);
    }

    #[test]
    fn crc_mask_round_trips() {
        let crc = crc32c::crc32c(b"bert");
        let masked = (crc.rotate_right(15)).wrapping_add(0xa282ead8);
        assert_eq!(crc_unmask(masked), crc);
    }
}
