//! Atomic directory output: build a directory under a temporary name beside its destination, fsync every
//! file and the directory, rename it into place, fsync the parent. An interrupted writer leaves only a
//! hidden temporary directory, never one that looks complete.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::bail;
use crate::error::{IoContext, Result};

/// A directory being written; removed on drop unless `commit` moved it into place.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Start writing `dest`. It must not exist unless `overwrite`, in which case it is replaced only when
    /// the new one is complete.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            bail!(
                "{}: already exists; pass --overwrite to replace it, or choose another output",
                dest.display()
            );
        }
        let parent = parent_of(dest);
        fs::create_dir_all(&parent).at(&parent)?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        fs::create_dir(&tmp).at(&tmp)?;
        Ok(AtomicDir { tmp, dest: dest.to_path_buf(), committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Write a whole file inside the directory and fsync it.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_synced(&self.tmp.join(name), bytes)
    }

    /// fsync everything, then rename into place (replacing an old directory only now) and fsync the parent.
    pub fn commit(mut self) -> Result<PathBuf> {
        for entry in fs::read_dir(&self.tmp).at(&self.tmp)? {
            let p = entry.at(&self.tmp)?.path();
            if p.is_file() {
                File::open(&p).and_then(|f| f.sync_all()).at(&p)?;
            }
        }
        sync_dir(&self.tmp)?;
        let parent = parent_of(&self.dest);
        let old = if self.dest.exists() {
            let name = self.dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            if old.exists() {
                fs::remove_dir_all(&old).at(&old)?; // a leftover of an earlier process with this id
            }
            fs::rename(&self.dest, &old).at(&self.dest)?;
            Some(old)
        } else {
            None
        };
        fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        sync_dir(&parent)?;
        self.committed = true;
        if let Some(old) = old {
            // The new directory is in place; failing to delete the old one loses nothing.
            if let Err(e) = fs::remove_dir_all(&old) {
                tracing::warn!("could not remove {}: {e}", old.display());
            }
        }
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Write a file and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// Replace a file atomically: write a temporary file beside it, fsync, rename over it, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = parent_of(path).join(format!(".{name}.tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).at(path)?;
    sync_dir(&parent_of(path))
}

/// A directory moved aside while its replacement starts: `commit` (the replacement wrote its first
/// result) deletes it; dropped without a commit, the replacement is removed and the directory put back.
pub struct SetAside {
    dir: PathBuf,
    aside: PathBuf,
    done: bool,
}

impl SetAside {
    /// Move `dir` to a hidden sibling, `.NAME.replaced-PID`.
    pub fn new(dir: &Path) -> Result<Self> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let aside = parent_of(dir).join(format!(".{name}.replaced-{}", std::process::id()));
        if aside.exists() {
            fs::remove_dir_all(&aside).at(&aside)?; // a leftover of an earlier process with this id
        }
        fs::rename(dir, &aside).at(dir)?;
        Ok(SetAside { dir: dir.to_path_buf(), aside, done: false })
    }

    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        fs::remove_dir_all(&self.aside).at(&self.aside)
    }
}

impl Drop for SetAside {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
            if let Err(e) = fs::rename(&self.aside, &self.dir) {
                tracing::warn!(
                    "could not put {} back in place from {}: {e}",
                    self.dir.display(),
                    self.aside.display()
                );
            }
        }
    }
}

/// fsync a directory (its entries).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// MemAvailable of /proc/meminfo in bytes (None where there is none).
pub fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
