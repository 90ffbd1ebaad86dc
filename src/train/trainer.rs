//! The training loop. A [`Trainer`] is made once per run (per rank) from its [`Setup`]; each
//! [`Trainer::step`] is one optimizer step, as named calls: the micro-batches, forward and backward (the
//! gradients summed across ranks as backward completes each bucket), the non-finite check and clipping,
//! the optimizer at the schedule's rate, the log. The step's decisions (finite or skipped, clipping, the
//! loss scale) are made on the backend (`StepControl`), so a step waits for nothing: the host reads the
//! steps' records back when it logs, evaluates or saves, and replays them into its state. [`Trainer::save`] writes a checkpoint,
//! [`Trainer::finish`] the last one and the final model.
//!
//! Every choice is a function of the config, the seed and counters that checkpoints keep, so a resumed
//! run continues bit for bit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::{OptimizerState, TrainConfig};
use super::eval::evaluate;
use super::log::{print_plan, RunLog, StepMetrics};
use super::setup::{Phase, Setup};
use super::TrainSummary;
use crate::backend::device::Traffic;
use crate::backend::{AllocationMark, Backend};
use crate::backend::{ControlStep, StepControl};
use crate::bail;
use crate::checkpoint::{self, CheckpointData, TrainerState, STATE_VERSION};
use crate::data::examples::{Corpus, ExampleConfig};
use crate::data::loader::{open_corpus, Batch, Cursor, Loader, LoaderConfig};
use crate::dist::{Bucket, Comm};
use crate::error::{Error, Result};
use crate::fsutil::SetAside;
use crate::model::bert::{Bert, Capacity, Inputs, LossNorm, StepOptions, Train};
use crate::model::config::ModelConfig;
use crate::model::params::ParamTable;
use crate::optim::{
    AdamW, AdamWConfig, ControlCounters, Lamb, LambConfig, LossScaler, Optimizer, OptimizerKind, StepRecord,
};

/// Run training to its end or a stop signal: the seed's loop.
pub(super) fn run<B: Backend>(
    be: &B,
    setup: Setup,
    stop: Arc<AtomicBool>,
    comm: &dyn Comm,
) -> Result<TrainSummary> {
    let mut trainer = Trainer::new(be, setup, comm)?;
    while !trainer.done() {
        if trainer.stop_requested(&stop)? {
            break;
        }
        trainer.step()?;
        if trainer.save_due() {
            trainer.save()?;
        }
    }
    trainer.finish()
}

/// A run in progress on one rank.
pub(super) struct Trainer<'a, B: Backend> {
    be: &'a B,
    comm: &'a dyn Comm,
    /// Rank 0 alone prints, logs and writes checkpoints.
    lead: bool,
    cfg: TrainConfig,
    corpus: Arc<Corpus>,
    eval_corpus: Option<Arc<Corpus>>,
    config: ModelConfig,
    phases: Vec<Phase>,
    /// Steps of all phases together.
    total: u64,
    state: TrainerState,
    /// The model of the phase running: its activations sized for the phase's batches.
    model: Bert<'a, B>,
    optimizer: Optimizer,
    loader: Loader,
    /// Each phase's model and loader are allocated after this mark and released at the phase's end.
    mark: AllocationMark,
    /// The steps' decisions and records on the backend; the schedule of the phase running.
    control: StepControl,
    /// Steps run since the host last read their records, oldest first.
    pending: Vec<PendingStep>,
    /// The last step read back: its losses and update, for the log.
    last: Option<(StepLosses, Update)>,
    /// Label buffers, one per micro-batch, reused.
    labels: Vec<Vec<i32>>,
    /// Gradient buckets reduced across ranks as the backward pass completes each.
    buckets: Vec<Bucket>,
    log: RunLog,
    /// The old output `--overwrite-output` replaces, deleted at this run's first checkpoint.
    replaced: Option<Arc<Mutex<Option<SetAside>>>>,
    last_saved: u64,
    summary: TrainSummary,
    loop_start: Instant,
    save_seconds: f64,
    /// The backend's traffic after this run's first step, and the step it was read at.
    traffic_start: Option<(Traffic, u64)>,
}

/// A step run on the backend whose record the host has not read yet: what the host knows of it.
struct PendingStep {
    /// The global step it ran at (before the count moved past it).
    step: u64,
    /// The whole step's predicted tokens and sequences (every rank's).
    norm: LossNorm,
    /// Whether any micro-batch of any rank had each loss.
    mlm: bool,
    nsp: bool,
    /// The longest sequence of the step's micro-batches.
    longest: usize,
}

/// What a step's forward and backward passes measured, summed over the ranks.
struct StepLosses {
    mlm: Option<f64>,
    nsp: Option<f64>,
    /// The longest sequence of the step's micro-batches.
    longest: usize,
}

impl StepLosses {
    fn total(&self) -> f64 {
        self.mlm.unwrap_or(0.0) + self.nsp.unwrap_or(0.0)
    }
}

/// What a step's update did.
struct Update {
    lr: f64,
    grad_norm: f64,
    loss_scale: f64,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// The optimizer, the state (new or the checkpoint's), the phase's model and loader, the log; the
    /// plan printed.
    pub fn new(be: &'a B, setup: Setup, comm: &'a dyn Comm) -> Result<Self> {
        let Setup { cfg, resume, corpus, config, params, init_note, fingerprint, replaced } = setup;
        // The backend settles the precision (fp16 always runs the dynamic loss scaler).
        let precision = be.set_precision(&crate::backend::choice::name(cfg.precision))?;
        let (lead, world) = (comm.rank() == 0, comm.world());
        let phase_settings = cfg.phase_configs()?;
        let table = ParamTable::new(&config);
        let optimizer = new_optimizer(be, &cfg, &table)?;
        let mut control = StepControl::new(be)?;
        let mark = be.allocation_mark();
        let mut state = TrainerState {
            version: STATE_VERSION,
            global_step: 0,
            updates: 0,
            micro_step: 0,
            cursor: Cursor::default(),
            epoch: 0.0,
            scaler: LossScaler::new(precision == "fp16"),
            skipped_steps: 0,
            consecutive_nonfinite: 0,
            phase: 0,
            phase_start_step: 0,
            phase_start_updates: 0,
            world_size: world,
            tokenizer_fingerprint: fingerprint.clone(),
            config: serde_json::to_value(&cfg).expect("config serialises"),
        };
        if let Some((dir, saved)) = &resume {
            state = resumed_state(be, dir, saved, state, &optimizer, &table, world, phase_settings.len())?;
        }
        check_ranks_agree(&state, comm)?;

        let eval_corpus = if cfg.eval_data.is_empty() { None } else { Some(open_corpus(&cfg.eval_data)?) };
        if eval_corpus.as_ref().is_some_and(|ec| ec.tokenizer.fingerprint() != fingerprint) {
            bail!("--eval-data {} was made with another tokenizer than --data", cfg.eval_data[0].display());
        }
        let model = phase_model(&phase_settings[state.phase].0, be, &config, &params)?;
        drop(params);
        let phases = phase_settings
            .iter()
            .map(|(pc, keep)| Phase::new(pc, *keep, &corpus, comm))
            .collect::<Result<Vec<_>>>()?;
        let total: u64 = phases.iter().map(|p| p.steps).sum();
        check_phase_span(&state, &phases)?;
        if lead {
            print_plan(be, &init_note, &corpus, &phases, precision, &model, &cfg, world);
        }
        let mut log = RunLog::open(&cfg.output, lead, total, cfg.progress)?;
        log.progress.set(state.global_step);
        let phase = &phases[state.phase];
        start_control(be, &mut control, &optimizer, phase, &state)?;
        let loader = start_loader(&corpus, phase, state.cursor, cfg.loader_threads)?;
        let labels = vec![Vec::new(); phase.cfg.gradient_accumulation_steps];
        let buckets =
            crate::dist::buckets(&table, ((cfg.bucket_size_mb * (1 << 20) as f64) / 4.0).max(1.0) as usize);
        let summary = TrainSummary {
            steps: state.global_step,
            last: None,
            losses: vec![],
            stopped_by_signal: false,
            output: cfg.output.clone(),
            loop_seconds: 0.0,
            traffic: None,
        };
        Ok(Trainer {
            be,
            comm,
            lead,
            corpus,
            eval_corpus,
            config,
            phases,
            total,
            last_saved: state.global_step,
            state,
            model,
            optimizer,
            loader,
            mark,
            control,
            pending: Vec::new(),
            last: None,
            labels,
            buckets,
            log,
            replaced,
            summary,
            loop_start: Instant::now(),
            save_seconds: 0.0,
            traffic_start: None,
            cfg,
        })
    }

    /// Every phase's steps are done.
    pub fn done(&self) -> bool {
        self.state.global_step >= self.total
    }

    /// Whether any rank was asked to stop (a signal): they all stop, at the same step.
    pub fn stop_requested(&mut self, stop: &AtomicBool) -> Result<bool> {
        let mut votes = [stop.load(Ordering::Relaxed) as u8 as f64];
        self.comm.all_reduce_sum_f64(&mut votes)?;
        self.summary.stopped_by_signal = votes[0] > 0.0;
        Ok(self.summary.stopped_by_signal)
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<()> {
        if self.state.global_step == self.phase_end(self.state.phase) {
            self.next_phase()?;
        }
        if self.pending.len() == StepControl::HISTORY {
            self.read_back()?;
        }
        let batches = self.next_batches()?;
        let pending = self.forward_backward(&batches)?;
        self.update(pending)?;
        self.state.global_step += 1;
        self.summary.steps = self.state.global_step;
        self.log.progress.set(self.state.global_step);
        self.log_step()?;
        if self.traffic_start.is_none() {
            // The first step allocates and uploads what later steps reuse: count from its end.
            self.traffic_start = self.be.traffic().map(|t| (t, self.state.global_step));
        }
        Ok(())
    }

    /// A checkpoint is due after this step (the last one is `finish`'s).
    pub fn save_due(&self) -> bool {
        self.state.global_step % self.cfg.save_steps == 0 && self.state.global_step < self.total
    }

    /// Write a checkpoint (rank 0; the others wait for it at a barrier).
    pub fn save(&mut self) -> Result<()> {
        let t = Instant::now();
        if let Some(dir) = self.checkpoint()? {
            tracing::info!("saved {}", dir.display());
        }
        self.save_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The last checkpoint (unless this step has one) and, at the end of the run, the final model in the
    /// output directory itself, like save_pretrained.
    pub fn finish(mut self) -> Result<TrainSummary> {
        self.read_back()?;
        self.summary.loop_seconds = self.loop_start.elapsed().as_secs_f64() - self.save_seconds;
        if let (Some((start, step)), Some(now)) = (self.traffic_start, self.be.traffic()) {
            let steps = self.state.global_step - step;
            self.summary.traffic = (steps > 0).then_some((now - start, steps));
        }
        self.log.progress.finish();
        if self.state.global_step != self.last_saved {
            if let Some(dir) = self.checkpoint()? {
                eprintln!("saved {}", dir.display());
            }
        }
        if !self.lead {
            return Ok(self.summary);
        }
        let output = &self.cfg.output;
        if self.summary.stopped_by_signal {
            eprintln!("stopped by a signal at step {}; resume with --resume auto", self.state.global_step);
        } else {
            let params = self.be.download(self.model.params)?;
            crate::model::hf::save_pretrained(output, &self.config, &params)?;
            self.corpus.tokenizer.save_hf(output)?;
            eprintln!("done: {} steps; the final model is in {}", self.state.global_step, output.display());
        }
        Ok(self.summary)
    }

    /// The step after phase `phase`'s last.
    fn phase_end(&self, phase: usize) -> u64 {
        self.phases[..=phase].iter().map(|p| p.steps).sum()
    }

    /// The next phase: the end of this one kept (a failure to start the next, its batches too large say,
    /// loses nothing), its model, loader and schedule, the optimizer's moments kept or reset.
    fn next_phase(&mut self) -> Result<()> {
        self.read_back()?;
        if self.state.global_step != self.last_saved {
            if let Some(dir) = self.checkpoint()? {
                tracing::info!("saved {} at the end of phase {}", dir.display(), self.state.phase + 1);
            }
        }
        let params = self.be.download(self.model.params)?;
        let state = &mut self.state;
        state.phase += 1;
        state.phase_start_step = state.global_step;
        state.phase_start_updates = state.updates;
        state.cursor = Cursor::default();
        let phase = &self.phases[state.phase];
        if phase.optimizer_state == OptimizerState::Reset {
            let (m, v) = self.optimizer.moments();
            self.be.fill(m, 0.0)?;
            self.be.fill(v, 0.0)?;
        }
        // The old phase's buffers (its model's activations, weights and gradients) are released before the
        // new phase's are allocated; the old loader's thread ends as the new loader replaces it.
        self.be.release_since(self.mark)?;
        self.model = phase_model(&phase.cfg, self.be, &self.config, &params)?;
        start_control(self.be, &mut self.control, &self.optimizer, phase, state)?;
        self.loader = start_loader(&self.corpus, phase, state.cursor, self.cfg.loader_threads)?;
        self.labels = vec![Vec::new(); phase.cfg.gradient_accumulation_steps];
        self.log.progress.println(&format!(
            "phase {} of {} from step {}: ≤{} tokens, batch {} × accumulation {}, peak lr {}",
            state.phase + 1,
            self.phases.len(),
            state.global_step,
            phase.cfg.max_seq_len,
            phase.cfg.per_device_batch_size,
            phase.cfg.gradient_accumulation_steps,
            phase.cfg.learning_rate
        ));
        Ok(())
    }

    /// The step's micro-batches; the cursor and epoch moved past them.
    fn next_batches(&mut self) -> Result<Vec<Batch>> {
        let n = self.phases[self.state.phase].cfg.gradient_accumulation_steps;
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            match self.loader.next_batch() {
                Some(b) => batches.push(b?),
                None => bail!("internal: the loader ended"),
            }
        }
        let last = batches.last().expect("at least one micro-batch");
        // Past the epoch's last batch the loader moves on to the next epoch by itself (epochs have
        // different sizes, so the trainer does not roll the cursor over).
        self.state.cursor = Cursor { epoch: last.cursor.epoch, batch: last.cursor.batch + 1 };
        self.state.epoch =
            last.cursor.epoch as f64 + (last.cursor.batch + 1) as f64 / last.epoch_batches.max(1) as f64;
        Ok(batches)
    }

    /// Forward and backward over the micro-batches, the gradients accumulated and (with several ranks)
    /// summed across them, the loss sums added on the backend; each loss's denominator is the whole
    /// step's predicted tokens or sequences, so accumulation equals one larger batch.
    fn forward_backward(&mut self, batches: &[Batch]) -> Result<PendingStep> {
        let mut counts = [
            batches.iter().map(|b| b.masked_positions.len()).sum::<usize>() as f64,
            batches.iter().map(|b| b.batch_size).sum::<usize>() as f64,
        ];
        self.comm.all_reduce_sum_f64(&mut counts)?;
        let norm = LossNorm { mlm_tokens: counts[0] as usize, sequences: counts[1] as usize };
        self.model.zero_grads()?;
        // Whether any micro-batch had each loss.
        let mut had = [0.0, 0.0];
        let last_micro = batches.len() - 1;
        for (k, (b, labels)) in batches.iter().zip(self.labels.iter_mut()).enumerate() {
            let inp = Inputs::from_batch(b, labels);
            let opts = StepOptions {
                train: Some(Train { seed: self.cfg.seed, step: self.state.micro_step }),
                backward: true,
                // fp16: the scale the last step's control left, read on the device.
                loss_scale: 1.0,
                loss_scale_by: self.state.scaler.enabled.then(|| self.control.loss_scale()),
                norm: Some(norm),
                accuracy: false,
                loss_sums: Some(self.control.loss_sums()),
            };
            let l = if self.comm.world() > 1 && k == last_micro {
                // Sum each bucket across the ranks as soon as the backward pass has completed it (no
                // reduction on the earlier micro-batches: their gradients accumulate locally).
                let (be, comm, grads) = (self.be, self.comm, self.model.grads);
                let mut reduced = vec![false; self.buckets.len()];
                let buckets = &self.buckets;
                let mut reduce_ready = |layer: Option<usize>| -> Result<()> {
                    for (done, bk) in reduced.iter_mut().zip(buckets) {
                        let ready = match (layer, bk.ready_after_layer) {
                            (None, _) => true,
                            (Some(l), Some(r)) => r >= l,
                            (Some(_), None) => false,
                        };
                        if ready && !*done {
                            be.all_reduce_sum(grads.at(bk.start, bk.len), comm)?;
                            *done = true;
                        }
                    }
                    Ok(())
                };
                self.model.step_with_hook(&inp, opts, Some(&mut reduce_ready))?
            } else {
                self.model.step(&inp, opts)?
            };
            self.state.micro_step += 1;
            had[0] += (l.mlm_tokens > 0) as u8 as f64;
            had[1] += (l.sequences > 0) as u8 as f64;
            self.log.sequences += b.batch_size;
            self.log.tokens += b.lengths.iter().map(|&x| x as usize).sum::<usize>();
        }
        // The ranks' gradients (each already divided by the global counts) and loss sums summed.
        self.be.all_reduce_sum(self.control.loss_sums(), self.comm)?;
        self.be.all_reduce_wait()?;
        self.comm.all_reduce_sum_f64(&mut had)?;
        Ok(PendingStep {
            step: self.state.global_step,
            norm,
            mlm: had[0] > 0.0,
            nsp: had[1] > 0.0,
            longest: batches.iter().flat_map(|b| b.lengths.iter()).map(|&l| l as usize).max().unwrap_or(0),
        })
    }

    /// The step's decisions and update, on the backend: the gradient norm (of the scaled gradients) and
    /// the finite check in one pass, then the optimizer at the schedule's rate with the unscaling and
    /// clipping inside it, or, with a non-finite loss or gradient, the step skipped. Nothing is read back.
    fn update(&mut self, pending: PendingStep) -> Result<()> {
        let be = self.be;
        if self.cfg.debug_nonfinite_steps.contains(&pending.step) {
            be.fill(self.model.grads.prefix(1), f32::NAN)?;
        }
        let scaler = &self.state.scaler;
        let h = ControlStep {
            max_grad_norm: self.cfg.max_grad_norm,
            growth_interval: if scaler.enabled { scaler.growth_interval } else { 0 },
            slot: self.pending.len(),
        };
        self.optimizer.step(be, self.model.params, self.model.grads, &self.control, &h)?;
        self.pending.push(pending);
        Ok(())
    }

    /// The records of the steps run since the last read, read back (two copies) and replayed in order
    /// into the host's state as the backend decided them: the losses and gradient norms, the loss
    /// scaler, the updates and skipped steps, and the checks that stop a run (at the step they name). The
    /// backend's counters must then equal the host's.
    fn read_back(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (records, device) = self.control.read(self.be, self.pending.len())?;
        for (p, r) in std::mem::take(&mut self.pending).iter().zip(&records) {
            self.replay(p, r)?;
        }
        let state = &self.state;
        let host = ControlCounters {
            updates: state.updates - state.phase_start_updates,
            scale: state.scaler.scale as f32 as f64,
            good_steps: state.scaler.good_steps,
        };
        if device != host {
            bail!("internal: the backend's step counters {device:?} differ from the host's {host:?}");
        }
        Ok(())
    }

    /// One step's record into the host's state.
    fn replay(&mut self, p: &PendingStep, r: &StepRecord) -> Result<()> {
        let state = &mut self.state;
        let losses = StepLosses {
            mlm: p.mlm.then(|| r.mlm_sum / p.norm.mlm_tokens.max(1) as f64),
            nsp: p.nsp.then(|| r.nsp_sum / p.norm.sequences.max(1) as f64),
            longest: p.longest,
        };
        let finite = r.squares.is_finite() && losses.total().is_finite();
        if finite != r.applied {
            bail!("internal: step {}: the backend's decision differs from its record {r:?}", p.step);
        }
        let loss_scale = state.scaler.scale;
        let lr = self.phases[state.phase].schedule.lr(state.updates - state.phase_start_updates);
        if state.scaler.update(finite) {
            state.consecutive_nonfinite = 0;
            state.updates += 1;
        } else {
            count_skipped_step(state, &self.cfg, p.step)?;
        }
        self.summary.losses.push(losses.total());
        self.last = Some((losses, Update { lr, grad_norm: r.squares.sqrt() / loss_scale, loss_scale }));
        Ok(())
    }

    /// At a logging (or evaluation) step: the steps read back, the metrics, evaluation on --eval-data,
    /// the log written.
    fn log_step(&mut self) -> Result<()> {
        let step = self.state.global_step;
        let log_now = step % self.cfg.logging_steps == 0 || step == self.total;
        let eval_now = self.eval_corpus.is_some() && (step % self.cfg.eval_steps == 0 || step == self.total);
        if !log_now && !eval_now {
            return Ok(());
        }
        self.read_back()?;
        let Some((losses, update)) = &self.last else { bail!("internal: no step read back to log") };
        let secs = self.log.window_seconds();
        // Throughput of the whole job.
        let mut seen = [self.log.sequences as f64, self.log.tokens as f64];
        self.comm.all_reduce_sum_f64(&mut seen)?;
        let phase = &self.phases[self.state.phase];
        let eval = match &self.eval_corpus {
            Some(ec) if eval_now && self.lead => {
                let examples = ExampleConfig { seed: 0, ..phase.loader.examples.clone() };
                let loader = LoaderConfig { examples, ..phase.loader.clone() };
                Some(evaluate(&self.model, ec, &loader, self.cfg.eval_batches)?)
            }
            _ => None,
        };
        let several = self.phases.len() > 1;
        let m = StepMetrics {
            step,
            epoch: self.state.epoch,
            loss: losses.total(),
            mlm_loss: losses.mlm,
            nsp_loss: losses.nsp,
            learning_rate: update.lr,
            grad_norm: update.grad_norm,
            loss_scale: update.loss_scale,
            skipped_steps: self.state.skipped_steps,
            seq_per_s: seen[0] / secs,
            tokens_per_s: seen[1] / secs,
            phase: several.then_some(self.state.phase + 1),
            longest_sequence: several.then_some(losses.longest),
            eval,
        };
        self.log.write(&m, self.total)?;
        self.summary.last = Some(m);
        Ok(())
    }

    /// Rank 0 writes a checkpoint of this step and rotates the old ones; the others wait at the barrier
    /// so no rank runs ahead of a checkpoint. The output `--overwrite-output` replaced goes with the first.
    fn checkpoint(&mut self) -> Result<Option<PathBuf>> {
        self.read_back()?;
        self.last_saved = self.state.global_step;
        if !self.lead {
            self.comm.barrier()?;
            return Ok(None);
        }
        let (be, cfg) = (self.be, &self.cfg);
        let params = be.download(self.model.params)?;
        let (bm, bv) = self.optimizer.moments();
        let (m, v) = (be.download(bm)?, be.download(bv)?);
        let pause =
            (cfg.debug_pause_in_save_ms > 0).then(|| Duration::from_millis(cfg.debug_pause_in_save_ms));
        let data = CheckpointData {
            config: &self.config,
            params: &params,
            exp_avg: &m,
            exp_avg_sq: &v,
            tokenizer: &self.corpus.tokenizer,
            state: &self.state,
        };
        let dir = checkpoint::save(&cfg.output, &data, pause)?;
        checkpoint::rotate(&cfg.output, cfg.save_total_limit, self.state.global_step)?;
        self.comm.barrier()?;
        if let Some(aside) = self.replaced.as_ref().and_then(|r| r.lock().ok()?.take()) {
            aside.commit()?;
        }
        Ok(Some(dir))
    }
}

/// The loader of a phase from `cursor`.
fn start_loader(corpus: &Arc<Corpus>, phase: &Phase, cursor: Cursor, threads: usize) -> Result<Loader> {
    Loader::start(corpus.clone(), phase.loader.clone(), cursor, threads, 4, None)
}

/// The state of the checkpoint resumed, its optimizer moments loaded; refused when its world size or
/// phase does not fit this run.
#[allow(clippy::too_many_arguments)]
fn resumed_state<B: Backend>(
    be: &B,
    dir: &std::path::Path,
    saved: &TrainerState,
    fresh: TrainerState,
    optimizer: &Optimizer,
    table: &ParamTable,
    world: usize,
    phases: usize,
) -> Result<TrainerState> {
    let (m, v) = checkpoint::load_optimizer(dir, table.total)?;
    let (bm, bv) = optimizer.moments();
    be.upload(bm, &m)?;
    be.upload(bv, &v)?;
    if saved.world_size != world {
        bail!(
            "cannot resume from {}: it was trained with {} ranks and this run has {world}; the loader's order depends on the world size, so resume with {} ranks",
            dir.display(),
            saved.world_size,
            saved.world_size
        );
    }
    if saved.scaler.enabled && !(1..=i32::MAX as u64).contains(&saved.scaler.growth_interval) {
        bail!(
            "cannot resume from {}: its loss scaler's growth interval {} is not between 1 and {}; the checkpoint is damaged",
            dir.display(),
            saved.scaler.growth_interval,
            i32::MAX
        );
    }
    if saved.phase >= phases {
        bail!(
            "cannot resume from {}: it is in phase {} and this run has {phases}",
            dir.display(),
            saved.phase + 1
        );
    }
    Ok(TrainerState { config: fresh.config, ..saved.clone() })
}

/// A checkpoint lies inside its phase of this run (a resume with other phase lengths is refused).
fn check_phase_span(state: &TrainerState, phases: &[Phase]) -> Result<()> {
    let start: u64 = phases[..state.phase].iter().map(|p| p.steps).sum();
    let end = start + phases[state.phase].steps;
    if state.phase_start_step != start || state.global_step > end {
        bail!(
            "cannot resume: the checkpoint is at step {} of phase {} (which began at step {}), but this run's phase {} spans steps {start}..{end}; resume with the phases it was trained with",
            state.global_step,
            state.phase + 1,
            state.phase_start_step,
            state.phase + 1,
        );
    }
    Ok(())
}

/// The step control at the start of a phase, or at a resumed checkpoint's point in it: the phase's
/// schedule (a row per update it can make), the counters from `state`.
fn start_control<B: Backend>(
    be: &B,
    control: &mut StepControl,
    optimizer: &Optimizer,
    phase: &Phase,
    state: &TrainerState,
) -> Result<()> {
    control.set_schedule(be, &optimizer.schedule_rows((0..phase.steps).map(|k| phase.schedule.lr(k))))?;
    let counters = ControlCounters {
        updates: state.updates - state.phase_start_updates,
        scale: state.scaler.scale,
        good_steps: state.scaler.good_steps,
    };
    control.start(be, &counters)
}

/// The model sized for a phase's batches (`cfg`), with `params`.
fn phase_model<'a, B: Backend>(
    cfg: &TrainConfig,
    be: &'a B,
    config: &ModelConfig,
    params: &[f32],
) -> Result<Bert<'a, B>> {
    let model = Bert::new(be, config.clone(), Capacity::new(cfg.per_device_batch_size, cfg.max_seq_len))
        .map_err(|e| match e {
            Error::OutOfMemory(m) => Error::OutOfMemory(format!(
                "{m}: lower --per-device-batch-size {} (and raise --gradient-accumulation-steps to keep the \
                 batch) or --max-seq-len {}, or choose a smaller --model-config",
                cfg.per_device_batch_size, cfg.max_seq_len
            )),
            e => e,
        })?;
    model.set_params(params)?;
    Ok(model)
}

/// The run's optimizer (`--optim`), its state on the backend.
fn new_optimizer<B: Backend>(be: &B, cfg: &TrainConfig, table: &ParamTable) -> Result<Optimizer> {
    Ok(if cfg.optim == OptimizerKind::Lamb {
        Optimizer::Lamb(Lamb::new(
            be,
            LambConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
                all_tensors: cfg.lamb_all_tensors,
            },
            &table.params,
        )?)
    } else {
        Optimizer::AdamW(AdamW::new(
            be,
            AdamWConfig {
                lr: cfg.learning_rate,
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            &table.params,
        )?)
    })
}

/// Every rank must start from rank 0's point (a rank that resumed elsewhere, or not at all, would silently
/// diverge): compare with rank 0's numbers, and stop together on any difference.
fn check_ranks_agree(state: &TrainerState, comm: &dyn Comm) -> Result<()> {
    if comm.world() > 1 {
        let mine = [
            state.global_step as f64,
            state.updates as f64,
            state.micro_step as f64,
            state.cursor.epoch as f64,
            state.cursor.batch as f64,
        ];
        let mut zero = if comm.rank() == 0 { mine } else { [0.0; 5] };
        comm.all_reduce_sum_f64(&mut zero)?;
        let mut differs = [(zero != mine) as u8 as f64];
        comm.all_reduce_sum_f64(&mut differs)?;
        if differs[0] > 0.0 {
            bail!(
                "rank {}: the ranks do not start from the same point (rank 0 at step {}, this rank at step {}); every rank must see rank 0's checkpoints (a shared --output)",
                comm.rank(),
                zero[0],
                mine[0]
            );
        }
    }
    Ok(())
}

/// A step whose gradients are not finite: skipped and counted; with fp16 the scaler has halved the scale.
/// The run stops when the scale falls below 1, or after `--max-nonfinite-steps` such steps in a row.
fn count_skipped_step(state: &mut TrainerState, cfg: &TrainConfig, step: u64) -> Result<()> {
    state.skipped_steps += 1;
    if state.scaler.enabled {
        tracing::warn!("step {}: non-finite gradients; skipped, loss scale now {}", step, state.scaler.scale);
        if state.scaler.scale < 1.0 {
            bail!(
                "step {}: the fp16 loss scale fell below 1 (the gradients are not finite at any scale); stopping. The last good checkpoint in {} is intact: lower --learning-rate, or train in fp32",
                step,
                cfg.output.display()
            );
        }
    } else {
        state.consecutive_nonfinite += 1;
        tracing::warn!(
            "step {}: non-finite loss or gradients; step skipped ({} in a row)",
            step,
            state.consecutive_nonfinite
        );
        if state.consecutive_nonfinite >= cfg.max_nonfinite_steps {
            bail!(
                "step {}: {} non-finite steps in a row (--max-nonfinite-steps {}); stopping. The last good checkpoint in {} is intact: lower --learning-rate or check the data, then --resume auto",
                step,
                state.consecutive_nonfinite,
                cfg.max_nonfinite_steps,
                cfg.output.display()
            );
        }
    }
    Ok(())
}
