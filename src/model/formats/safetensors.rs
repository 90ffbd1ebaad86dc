//! transformers' `model.safetensors` (one file of a sharded checkpoint at a time).

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::{canonical, decode, Dtype, Stored};
use crate::error::{Error, IoContext, Result};

pub struct File {
    path: PathBuf,
    map: Mmap,
}

impl File {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).at(path)?;
        // SAFETY: read-only map of a file we do not modify.
        let map = unsafe { Mmap::map(&file) }.at(path)?;
        Ok(File { path: path.to_path_buf(), map })
    }

    /// Its tensors under transformers' names.
    pub fn tensors(&self) -> Result<Vec<Stored<'_>>> {
        let st = SafeTensors::deserialize(&self.map).map_err(|e| {
            Error::corrupt(
                &self.path,
                format!("not a readable safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let mut out = Vec::new();
        for (raw, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let (dtype, data) = (view.dtype(), view.data());
            let path = &self.path;
            let name = raw.clone();
            out.push(Stored::new(canonical(&raw), shape, path, move || {
                let dtype = match dtype {
                    StDtype::F32 => Dtype::F32,
                    StDtype::F64 => Dtype::F64,
                    StDtype::F16 => Dtype::F16,
                    StDtype::BF16 => Dtype::Bf16,
                    other => {
                        return Err(Error::corrupt(
                            path,
                            format!("tensor {name} has dtype {other:?}; expected a float type"),
                        ))
                    }
                };
                decode(path, &name, dtype, data)
            }));
        }
        Ok(out)
    }
}
