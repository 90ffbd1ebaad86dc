//! Training checkpoints: `OUTPUT/checkpoint-STEP/` holds what transformers' `from_pretrained` reads
//! (config.json, model.safetensors with the fp32 master weights, the tokenizer files) plus
//! optimizer.safetensors (AdamW's moments), trainer_state.json (step, loader cursor, schedule, scaler,
//! dropout counter, the resolved config) and manifest.json (a CRC-32C per file), written last.
//!
//! A checkpoint is written into a hidden temporary directory, every file and the directory fsynced, then
//! renamed into place and the parent fsynced (`AtomicDir`); one without a verifying manifest is never
//! used. Old checkpoints are deleted only after the new one is complete, keeping at least two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bail;
use crate::data::loader::Cursor;
use crate::data::tokenizer::BertTokenizer;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::AtomicDir;
use crate::model::config::ModelConfig;
use crate::model::hf::safetensors_bytes;
use crate::model::params::ParamTable;
use crate::optim::LossScaler;

pub const STATE_VERSION: u32 = 1;

/// Where a run stands, enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub version: u32,
    /// Training steps done (applied or skipped).
    pub global_step: u64,
    /// Optimizer updates applied: the schedule's position and AdamW's t.
    pub updates: u64,
    /// Forward/backward passes done: the dropout masks' counter.
    pub micro_step: u64,
    /// The next batch the loader gives.
    pub cursor: Cursor,
    pub epoch: f64,
    pub scaler: LossScaler,
    pub skipped_steps: u64,
    pub consecutive_nonfinite: u64,
    pub world_size: usize,
    /// `BertTokenizer::fingerprint` of the data's tokenizer.
    pub tokenizer_fingerprint: String,
    /// The run's settings (a `TrainConfig` as JSON).
    pub config: serde_json::Value,
    /// The phase running (0-based), the step it started at and the updates made before it (its schedule
    /// and its optimizer's bias correction count from there).
    #[serde(default)]
    pub phase: usize,
    #[serde(default)]
    pub phase_start_step: u64,
    #[serde(default)]
    pub phase_start_updates: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Manifest {
    format: String,
    /// file name → CRC-32C (8 hex digits) and size
    files: BTreeMap<String, (String, u64)>,
}

const MANIFEST: &str = "manifest.json";

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// What one checkpoint holds.
pub struct CheckpointData<'a> {
    pub config: &'a ModelConfig,
    pub params: &'a [f32],
    pub exp_avg: &'a [f32],
    pub exp_avg_sq: &'a [f32],
    pub tokenizer: &'a BertTokenizer,
    pub state: &'a TrainerState,
}

/// Write `out/checkpoint-STEP` atomically; returns its path. `pause_before_commit` (testing) sleeps with
/// every file written but the manifest and the rename not yet done.
pub fn save(
    out: &Path,
    d: &CheckpointData,
    pause_before_commit: Option<std::time::Duration>,
) -> Result<PathBuf> {
    let dest = out.join(checkpoint_name(d.state.global_step));
    let dir = AtomicDir::create(&dest, true)?;
    let table = ParamTable::new(d.config);
    dir.write("model.safetensors", &safetensors_bytes(&table, d.params)?)?;
    d.config.save(&dir.path().join("config.json"))?;
    d.tokenizer.save_hf(dir.path())?;
    let views = [("exp_avg", d.exp_avg), ("exp_avg_sq", d.exp_avg_sq)]
        .into_iter()
        .map(|(n, v)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![v.len()],
                bytemuck::cast_slice(v),
            )
            .map(|t| (n, t))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Invalid(format!("internal: {e}")))?;
    let opt = safetensors::serialize(views, None).map_err(|e| Error::Invalid(format!("internal: {e}")))?;
    dir.write("optimizer.safetensors", &opt)?;
    dir.write(
        "trainer_state.json",
        serde_json::to_string_pretty(d.state).expect("state serialises").as_bytes(),
    )?;
    if let Some(p) = pause_before_commit {
        std::thread::sleep(p);
    }
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).at(dir.path())? {
        let p = entry.at(dir.path())?.path();
        let bytes = std::fs::read(&p).at(&p)?;
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        files.insert(name, (format!("{:08x}", crc32c::crc32c(&bytes)), bytes.len() as u64));
    }
    let m = Manifest { format: "bertcuda-checkpoint".into(), files };
    dir.write(MANIFEST, serde_json::to_string_pretty(&m).expect("manifest serialises").as_bytes())?;
    dir.commit()
}

/// Check every file of a checkpoint against its manifest; the trainer state when all verify.
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let mpath = dir.join(MANIFEST);
    if !mpath.is_file() {
        return Err(Error::corrupt(&mpath, "missing: the checkpoint is incomplete"));
    }
    let text = std::fs::read_to_string(&mpath).at(&mpath)?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::corrupt(&mpath, format!("unreadable: {e}")))?;
    for (name, (crc, len)) in &m.files {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).map_err(|e| Error::corrupt(&p, format!("unreadable ({e})")))?;
        if bytes.len() as u64 != *len || format!("{:08x}", crc32c::crc32c(&bytes)) != *crc {
            return Err(Error::corrupt(
                &p,
                "does not match the checkpoint's manifest (truncated or corrupted)",
            ));
        }
    }
    for required in ["model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"] {
        if !m.files.contains_key(required) {
            return Err(Error::corrupt(dir.join(required), "missing from the checkpoint"));
        }
    }
    let p = dir.join("trainer_state.json");
    let state: TrainerState = serde_json::from_slice(&std::fs::read(&p).at(&p)?)
        .map_err(|e| Error::corrupt(&p, format!("unreadable trainer state: {e}")))?;
    if state.version != STATE_VERSION {
        return Err(Error::corrupt(
            &p,
            format!("trainer state version {}, this build reads {STATE_VERSION}", state.version),
        ));
    }
    Ok(state)
}

/// Checkpoint directories of a run, newest step first.
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v
}

/// The newest checkpoint that verifies; the ones skipped, with why.
pub fn find_resume(out: &Path) -> (Option<(PathBuf, TrainerState)>, Vec<String>) {
    let mut skipped = Vec::new();
    for (_, dir) in list(out) {
        match verify(&dir) {
            Ok(state) => return (Some((dir, state)), skipped),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    (None, skipped)
}

/// Delete the oldest complete checkpoints beyond `keep` (at least 2) among those of this run up to
/// `current` (a checkpoint with a later step belongs to an abandoned run and is not counted); `current`
/// itself is never deleted.
pub fn rotate(out: &Path, keep: usize, current: u64) -> Result<()> {
    let keep = keep.max(2);
    let complete = list(out).into_iter().filter(|(s, d)| *s <= current && d.join(MANIFEST).is_file());
    for (step, dir) in complete.skip(keep) {
        if step != current {
            std::fs::remove_dir_all(&dir).at(&dir)?;
        }
    }
    Ok(())
}

/// A run resuming from step `from` sets aside the checkpoints of later steps (an abandoned continuation),
/// renaming them `abandoned-checkpoint-STEP`, so `--resume auto` can never go back to them. Their names.
pub fn set_aside_later(out: &Path, from: u64) -> Result<Vec<PathBuf>> {
    let mut moved = Vec::new();
    for (step, dir) in list(out).into_iter().filter(|(s, _)| *s > from) {
        let to = out.join(format!("abandoned-{}", checkpoint_name(step)));
        if to.exists() {
            std::fs::remove_dir_all(&to).at(&to)?;
        }
        std::fs::rename(&dir, &to).at(&dir)?;
        moved.push(to);
    }
    Ok(moved)
}

/// Leftovers of interrupted writes in `out`: hidden temporary directories are removed, and a
/// checkpoint caught between the two renames of a replacement (`.NAME.old-PID` with no `NAME`) is put back.
pub fn clean_leftovers(out: &Path) -> Result<()> {
    for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.') else { continue };
        if let Some((base, _)) = rest.rsplit_once(".tmp-") {
            if base.starts_with("checkpoint-") {
                std::fs::remove_dir_all(e.path()).at(e.path())?;
            }
        } else if let Some((base, _)) = rest.rsplit_once(".old-") {
            if base.starts_with("checkpoint-") {
                let dest = out.join(base);
                if dest.exists() {
                    std::fs::remove_dir_all(e.path()).at(e.path())?;
                } else {
                    std::fs::rename(e.path(), &dest).at(&dest)?;
                }
            }
        }
    }
    Ok(())
}

/// AdamW's moments of a checkpoint.
pub fn load_optimizer(dir: &Path, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let p = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&p).at(&p)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::corrupt(&p, e.to_string()))?;
    let get = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|e| Error::corrupt(&p, format!("{name}: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != [n] {
            bail!("{}: {name} has shape {:?}, the model has {n} parameters", p.display(), t.shape());
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    Ok((get("exp_avg")?, get("exp_avg_sq")?))
}
