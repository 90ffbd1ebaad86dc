//! Batches and the loader.
//!
//! An epoch is the corpus's examples (`examples::epoch_index`) in an order shuffled by (seed, epoch). Rank
//! r of W takes positions r, r + W, r + 2W, ... of that order (as DistributedSampler, without padding):
//! ranks are disjoint and together cover the epoch. Batch k of a rank is its positions [k·B, (k+1)·B);
//! every example is a pure function of (seed, epoch, sample index), so a batch is a pure function of
//! (config, epoch, k): thread counts and timing change nothing, and a cursor (epoch, k) resumes exactly.
//! A background thread builds batches ahead into a bounded queue.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::data::examples::{epoch_index, make, Corpus, Example, ExampleConfig, Instance};
use crate::data::rng::{stream, KeyedRng};
use crate::error::{Error, Result};

/// Labels of tokens that are not predicted.
pub const IGNORE_INDEX: i32 = -100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub examples: ExampleConfig,
    pub batch_size: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Pad every batch to max_seq_len instead of its longest sequence.
    pub pad_to_max: bool,
    /// Drop a last batch smaller than batch_size (training does; inspect and eval do not).
    pub drop_last: bool,
}

impl LoaderConfig {
    pub fn validate(&self) -> Result<()> {
        self.examples.validate()?;
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            bail!(
                "--rank {} must be below --world-size {} (and the world size at least 1)",
                self.rank,
                self.world_size
            );
        }
        Ok(())
    }
}

/// Where a stream of batches stands: the next batch to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: u64,
}

/// A padded batch, row-major (B, T).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// The original token where predicted, IGNORE_INDEX elsewhere.
    pub labels: Vec<i32>,
    /// (B): 0 = B follows A, 1 = random; None without NSP.
    pub next_sentence_label: Option<Vec<u32>>,
    /// Flat indices b·T + t of the predicted tokens, ascending: the rows the MLM head runs on.
    pub masked_positions: Vec<u32>,
    /// (B) unpadded lengths.
    pub lengths: Vec<u32>,
    /// Which batch of the stream this is.
    pub cursor: Cursor,
    /// Batches in this batch's epoch (epochs differ: their examples are drawn per epoch).
    pub epoch_batches: u64,
}

impl Batch {
    /// Pad examples into a batch (`pad_sequence(batch_first=True, padding_value=pad_id)`), to the longest
    /// or to `pad_to`.
    pub fn collate(examples: &[Example], pad_id: u32, pad_to: Option<usize>, cursor: Cursor) -> Batch {
        let b = examples.len();
        let longest = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
        let t = pad_to.unwrap_or(longest).max(longest);
        let mut batch = Batch {
            batch_size: b,
            seq_len: t,
            input_ids: vec![pad_id; b * t],
            token_type_ids: vec![0; b * t],
            attention_mask: vec![0; b * t],
            labels: vec![IGNORE_INDEX; b * t],
            next_sentence_label: examples
                .first()
                .and_then(|e| e.next_sentence_label)
                .map(|_| Vec::with_capacity(b)),
            masked_positions: Vec::new(),
            lengths: Vec::with_capacity(b),
            cursor,
            epoch_batches: 0,
        };
        for (i, e) in examples.iter().enumerate() {
            let n = e.input_ids.len();
            let row = i * t;
            batch.input_ids[row..row + n].copy_from_slice(&e.input_ids);
            for (d, &s) in batch.token_type_ids[row..row + n].iter_mut().zip(&e.token_type_ids) {
                *d = s as u32;
            }
            batch.attention_mask[row..row + n].fill(1);
            batch.labels[row..row + n].copy_from_slice(&e.labels);
            for (j, &l) in e.labels.iter().enumerate() {
                if l != IGNORE_INDEX {
                    batch.masked_positions.push((row + j) as u32);
                }
            }
            if let (Some(v), Some(l)) = (batch.next_sentence_label.as_mut(), e.next_sentence_label) {
                v.push(l as u32);
            }
            batch.lengths.push(n as u32);
        }
        batch
    }

    pub fn row<'a, T>(&self, v: &'a [T], i: usize) -> &'a [T] {
        &v[i * self.seq_len..(i + 1) * self.seq_len]
    }
}

/// One epoch's shuffled order for one rank.
pub struct EpochPlan {
    pub epoch: u64,
    index: Vec<Instance>,
    /// Sample indices (into `index`) this rank sees, in order.
    order: Vec<u32>,
}

impl EpochPlan {
    pub fn new(corpus: &Corpus, cfg: &LoaderConfig, epoch: u64) -> Result<Self> {
        let index = epoch_index(corpus, &cfg.examples, epoch);
        if index.len() > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "{} examples in one epoch: more than this build indexes (2^32)",
                index.len()
            )));
        }
        let mut all: Vec<u32> = (0..index.len() as u32).collect();
        KeyedRng::new(stream::SHUFFLE, &[cfg.examples.seed, epoch]).shuffle(&mut all);
        let mut order: Vec<u32> = all.into_iter().skip(cfg.rank).step_by(cfg.world_size).collect();
        if cfg.drop_last {
            // As DistributedSampler(drop_last=True): every rank the same count, so ranks stay in step.
            order.truncate(index.len() / cfg.world_size);
        }
        Ok(EpochPlan { epoch, index, order })
    }

    /// This rank's sample indices (positions in the epoch's index), in the order batches take them.
    pub fn samples(&self) -> &[u32] {
        &self.order
    }

    pub fn instance(&self, sample: u32) -> &Instance {
        &self.index[sample as usize]
    }

    /// Examples in the whole epoch (all ranks).
    pub fn epoch_examples(&self) -> usize {
        self.index.len()
    }

    /// Examples this rank sees.
    pub fn rank_examples(&self) -> usize {
        self.order.len()
    }

    /// Batches this rank makes in the epoch.
    pub fn batches(&self, cfg: &LoaderConfig) -> u64 {
        let n = self.order.len() as u64;
        let b = cfg.batch_size as u64;
        if cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Batch `k` of this epoch, its examples made on the current rayon pool.
    pub fn batch(&self, corpus: &Corpus, cfg: &LoaderConfig, k: u64) -> Batch {
        let lo = (k as usize * cfg.batch_size).min(self.order.len());
        let hi = (lo + cfg.batch_size).min(self.order.len());
        let ex = &cfg.examples;
        let examples: Vec<Example> = self.order[lo..hi]
            .par_iter()
            .map(|&s| make(corpus, ex, self.epoch, s as u64, &self.index[s as usize]))
            .collect();
        let pad_to = cfg.pad_to_max.then_some(ex.max_seq_len);
        let mut b =
            Batch::collate(&examples, corpus.special.pad, pad_to, Cursor { epoch: self.epoch, batch: k });
        b.epoch_batches = self.batches(cfg);
        b
    }
}

/// Batches in order from a cursor on, built ahead by a background thread.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Loader {
    /// Start at `cursor`; `threads` build each batch's examples in parallel; `prefetch` batches are kept
    /// ready. With `epochs` = Some(n) the stream ends after epoch n-1.
    pub fn start(
        corpus: Arc<Corpus>,
        cfg: LoaderConfig,
        cursor: Cursor,
        threads: usize,
        prefetch: usize,
        epochs: Option<u64>,
    ) -> Result<Self> {
        cfg.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("loader-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start loader threads: {e}")))?;
        let (tx, rx) = sync_channel(prefetch.max(1));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                pool.install(|| {
                    let mut cur = cursor;
                    loop {
                        if epochs.is_some_and(|n| cur.epoch >= n) {
                            return;
                        }
                        let plan = match EpochPlan::new(&corpus, &cfg, cur.epoch) {
                            Ok(p) => p,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        let n = plan.batches(&cfg);
                        if n == 0 {
                            let _ = tx.send(Err(Error::Invalid(format!(
                                "an epoch has {} examples for this rank, fewer than one batch of {}: lower the batch size or add data",
                                plan.rank_examples(),
                                cfg.batch_size
                            ))));
                            return;
                        }
                        while cur.batch < n {
                            if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                                return;
                            }
                            if tx.send(Ok(plan.batch(&corpus, &cfg, cur.batch))).is_err() {
                                return;
                            }
                            cur.batch += 1;
                        }
                        cur = Cursor { epoch: cur.epoch + 1, batch: 0 };
                    }
                })
            })
            .map_err(|e| Error::Invalid(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { rx, thread: Some(thread), stop })
    }

    /// The next batch; None when the requested epochs are done.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        self.rx.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Unblock a sender waiting on a full queue, then wait for the thread.
        while self.rx.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            drop(std::mem::replace(&mut self.rx, sync_channel(1).1));
            let _ = t.join();
        }
    }
}

/// Open shard directories as one corpus (shared by the loader thread and its caller).
pub fn open_corpus(dirs: &[PathBuf]) -> Result<Arc<Corpus>> {
    Corpus::open(dirs).map(Arc::new)
}
