//! `torch.save` files: the zip archive of torch ≥ 1.6 (`<name>/data.pkl` + `<name>/data/<key>`) and the
//! legacy format before it (successive pickles: magic number, protocol version, system info, the object,
//! the storage keys, then each storage raw: an 8-byte element count and its bytes). The object's pickle is
//! read by the safe reader in `pickle.rs`; tensors are strided views of the storages, read lazily.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::pickle::{self, StorageDtype, TensorRef, Value};
use super::{decode, Dtype, Stored};
use crate::error::{Error, IoContext, Result};

/// The magic number the legacy format starts with (a pickled 80-bit int).
const LEGACY_MAGIC: u128 = 0x1950a86a20f9469cfc6c;

/// Where one entry's bytes lie in the mapped file.
struct Span {
    start: usize,
    len: usize,
}

/// An opened torch file: its top-level object and its storages by key.
pub struct TorchFile {
    pub path: PathBuf,
    map: Mmap,
    storages: HashMap<String, Span>,
    pub object: Value,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).at(path)?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        if map.starts_with(b"PK\x03\x04") || map.starts_with(b"PK\x05\x06") {
            Self::open_zip(path, map)
        } else if map.first() == Some(&0x80) {
            Self::open_legacy(path, map)
        } else if map.starts_with(b"version https://git-lfs") {
            Err(Error::corrupt(path, "a Git LFS pointer, not the checkpoint: fetch it with `git lfs pull`"))
        } else {
            Err(Error::corrupt(path, "not a torch.save file (neither a zip archive nor a pickle)"))
        }
    }

    fn open_zip(path: &Path, map: Mmap) -> Result<Self> {
        let bad = |what: String| Error::corrupt(path, what);
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..]))
            .map_err(|e| bad(format!("not a readable zip archive (truncated?): {e}")))?;
        let mut entries: HashMap<String, Span> = HashMap::new();
        let mut pickle_name: Option<String> = None;
        for i in 0..zip.len() {
            let raw = zip.by_index_raw(i).map_err(|e| bad(format!("zip entry {i}: {e}")))?;
            let name = raw.name().to_string();
            let stored = raw.compression() == zip::CompressionMethod::Stored;
            let (start, len) = (raw.data_start(), raw.size());
            drop(raw);
            let bytes = match (stored, start) {
                (true, Some(start)) => {
                    let (start, len) = (start as usize, len as usize);
                    if start.checked_add(len).is_none_or(|end| end > map.len()) {
                        return Err(bad(format!(
                            "zip entry {name} runs past the end of the file (truncated?)"
                        )));
                    }
                    Span { start, len }
                }
                // torch.save stores every entry uncompressed; a compressed one (possibly a decompression
                // bomb) is not its output.
                _ => {
                    return Err(bad(format!(
                        "zip entry {name} is compressed; torch.save writes entries uncompressed"
                    )))
                }
            };
            if name.ends_with("/data.pkl") || name == "data.pkl" {
                pickle_name = Some(name.clone());
            }
            entries.insert(name, bytes);
        }
        let pkl =
            pickle_name.ok_or_else(|| bad("a zip archive without data.pkl: not a torch.save file".into()))?;
        let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
        if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
            let order = slice(&map, order);
            if order != b"little" {
                return Err(bad(format!(
                    "byte order {:?}: bertcuda reads little-endian checkpoints",
                    String::from_utf8_lossy(order)
                )));
            }
        }
        let (object, _) =
            pickle::load(slice(&map, &entries[&pkl])).map_err(|e| bad(format!("{pkl}: {e}")))?;
        let data_prefix = format!("{prefix}data/");
        let storages = entries
            .into_iter()
            .filter_map(|(name, b)| name.strip_prefix(&data_prefix).map(|key| (key.to_string(), b)))
            .collect();
        Ok(TorchFile { path: path.to_path_buf(), map, storages, object })
    }

    fn open_legacy(path: &Path, map: Mmap) -> Result<Self> {
        let bad = |what: String| Error::corrupt(path, what);
        let mut pos = 0usize;
        let mut next = |what: &str| -> Result<Value> {
            let (v, n) = pickle::load(&map[pos..]).map_err(|e| bad(format!("{what}: {e}")))?;
            pos += n;
            Ok(v)
        };
        match next("the magic number")? {
            Value::BigInt(m) if *m == LEGACY_MAGIC.to_le_bytes()[..10] => {}
            _ => {
                return Err(bad(
                    "a pickle that is not a torch.save file (no torch magic number); bertcuda reads state dicts saved by torch"
                        .into(),
                ))
            }
        }
        match next("the protocol version")? {
            Value::Int(1001) => {}
            other => {
                return Err(bad(format!(
                    "torch legacy protocol {}; bertcuda reads version 1001",
                    other.kind()
                )))
            }
        }
        let info = next("the system info")?;
        if let Some(entries) = info.dict_entries() {
            if entries.iter().any(|(k, v)| k == "little_endian" && matches!(v, Value::Bool(false))) {
                return Err(bad("a big-endian checkpoint; bertcuda reads little-endian checkpoints".into()));
            }
        }
        let object = next("the saved object")?;
        let keys = next("the storage keys")?;
        let keys: Vec<String> = match &keys {
            Value::List(l) => l.borrow().iter().map(|k| k.as_str().map(str::to_owned)).collect::<Option<_>>(),
            _ => None,
        }
        .ok_or_else(|| bad("the storage key list is not a list of strings".into()))?;
        // The element size of each storage comes from the references in the object.
        let mut sizes: HashMap<String, usize> = HashMap::new();
        collect_storages(&object, &mut |s| {
            sizes.insert(s.key.clone(), s.dtype.size());
        });
        let mut storages = HashMap::new();
        for key in keys {
            let numel = map
                .get(pos..pos + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .ok_or_else(|| bad(format!("storage {key}: the file ends before it (truncated?)")))?;
            pos += 8;
            let elem = *sizes.get(&key).ok_or_else(|| {
                bad(format!(
                    "storage {key} is listed but nothing in the saved object refers to it (corrupt file?)"
                ))
            })?;
            let len = (numel as usize)
                .checked_mul(elem)
                .filter(|&l| pos.checked_add(l).is_some_and(|e| e <= map.len()))
                .ok_or_else(|| {
                    bad(format!("storage {key}: {numel} elements of {elem} bytes run past the end of the file (truncated?)"))
                })?;
            storages.insert(key, Span { start: pos, len });
            pos += len;
        }
        Ok(TorchFile { path: path.to_path_buf(), map, storages, object })
    }

    /// A tensor's values as f32 (views and strides followed; integer and bool tensors refused).
    pub fn read(&self, name: &str, t: &TensorRef) -> Result<Vec<f32>> {
        let bad = |what: String| Error::corrupt(&self.path, format!("tensor {name}: {what}"));
        let bytes = self
            .storages
            .get(&t.storage.key)
            .map(|b| slice(&self.map, b))
            .ok_or_else(|| bad(format!("its storage {} is missing from the file", t.storage.key)))?;
        let dtype = match t.storage.dtype {
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::F64 => Dtype::F64,
            StorageDtype::F16 => Dtype::F16,
            StorageDtype::Bf16 => Dtype::Bf16,
            other => return Err(bad(format!("dtype {}; a parameter must be a float type", other.name()))),
        };
        let elem = t.storage.dtype.size();
        let have = bytes.len() / elem;
        let count = super::numel(&t.shape)
            .ok_or_else(|| bad(format!("shape {:?} has more elements than memory", t.shape)))?;
        if count == 0 {
            return Ok(Vec::new());
        }
        // The last element the view touches must lie inside the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.strides)
            .try_fold(t.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
        if last.is_none_or(|l| l >= have) {
            return Err(bad(format!(
                "its view (offset {}, size {:?}, stride {:?}) reaches past its storage of {have} elements \
                 (a storage shorter than its tensor: truncated or corrupt file)",
                t.offset, t.shape, t.strides
            )));
        }
        let contiguous = t.strides == contiguous_strides(&t.shape);
        if contiguous {
            let start = t.offset * elem;
            return decode(&self.path, name, dtype, &bytes[start..start + count * elem]);
        }
        // A strided view: gather element by element.
        let mut gathered = Vec::with_capacity(count * elem);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..count {
            let at = t.offset + index.iter().zip(&t.strides).map(|(i, s)| i * s).sum::<usize>();
            gathered.extend_from_slice(&bytes[at * elem..(at + 1) * elem]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        decode(&self.path, name, dtype, &gathered)
    }
}

fn slice<'m>(map: &'m Mmap, b: &Span) -> &'m [u8] {
    &map[b.start..b.start + b.len]
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Every storage reference inside a value (the state dict's tensors; nested containers walked once each).
fn collect_storages(v: &Value, f: &mut dyn FnMut(&pickle::StorageRef)) {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![v.clone()];
    while let Some(v) = todo.pop() {
        let id = match &v {
            Value::List(l) => std::rc::Rc::as_ptr(l) as *const u8,
            Value::Dict(d) => std::rc::Rc::as_ptr(d) as *const u8,
            Value::Tuple(t) => std::rc::Rc::as_ptr(t) as *const u8,
            Value::Set(l) => std::rc::Rc::as_ptr(l) as *const u8,
            _ => std::ptr::null(),
        };
        if !id.is_null() && !seen.insert(id) {
            continue;
        }
        match &v {
            Value::Tensor(t) => f(&t.storage),
            Value::Storage(s) => f(s),
            Value::List(l) => todo.extend(l.borrow().iter().cloned()),
            Value::Set(l) => todo.extend(l.borrow().iter().cloned()),
            Value::Tuple(t) => todo.extend(t.iter().cloned()),
            Value::Dict(d) => todo.extend(d.borrow().iter().flat_map(|(k, v)| [k.clone(), v.clone()])),
            _ => {}
        }
    }
}

/// What a torch file holds, as named tensors and the entries skipped.
pub struct StateDict<'f> {
    pub tensors: Vec<Stored<'f>>,
    /// Top-level entries that are not the model (optimizer state, data loader, epoch, ...).
    pub skipped: Vec<String>,
    /// Values in the state dict that are not tensors.
    pub ignored: Vec<String>,
    /// The state dict was the `model` entry of a training checkpoint (NVIDIA's layout).
    pub nested_in: Option<String>,
}

/// The state dict of a torch file: the object itself, or its `model` / `state_dict` entry (a training
/// checkpoint: NVIDIA's `ckpt_<step>.pt`, Lightning's `.ckpt`).
pub fn state_dict(file: &TorchFile) -> Result<StateDict<'_>> {
    let entries = file.object.dict_entries().ok_or_else(|| {
        Error::corrupt(
            &file.path,
            "the saved object is not a dict of tensors (a state dict); save model.state_dict()",
        )
    })?;
    let is_tensor = |v: &Value| matches!(v, Value::Tensor(_));
    let mut skipped = Vec::new();
    let mut nested_in = None;
    let mut dict = entries.clone();
    if !entries.iter().any(|(_, v)| is_tensor(v)) {
        if let Some((key, inner)) = ["model", "state_dict", "module"].iter().find_map(|k| {
            entries.iter().find(|(n, _)| n == k).and_then(|(n, v)| Some((n.clone(), v.dict_entries()?)))
        }) {
            for (n, _) in &entries {
                if *n != key {
                    skipped.push(n.clone());
                }
            }
            nested_in = Some(key);
            dict = inner;
        }
    }
    let mut tensors = Vec::new();
    let mut ignored = Vec::new();
    for (name, v) in dict {
        match v {
            Value::Tensor(t) => {
                let shape = t.shape.clone();
                let key = name.clone();
                tensors.push(Stored::new(name, shape, &file.path, move || file.read(&key, &t)));
            }
            _ => ignored.push(name),
        }
    }
    if tensors.is_empty() {
        return Err(Error::corrupt(&file.path, "no tensors in it: not a model's state dict"));
    }
    Ok(StateDict { tensors, skipped, ignored, nested_in })
}
