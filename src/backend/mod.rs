//! The `Backend` trait: memory and the ops the BERT forward and backward passes are written against. The
//! CPU backend (`cpu`) is the reference; the CUDA backend runs hand-written kernels and cuBLAS.
//!
//! Memory is the backend's: `alloc` hands out a `Buf` (floats) or `Ints` (i32), a plain (buffer, offset,
//! length) handle like a device pointer, and `Buf::at` takes sub-regions of it. An op names its outputs and
//! inputs; outputs never overlap inputs or each other (checked).
//!
//! The contract of every op, as in llm.c: **parameter gradients accumulate (`+=`), activations and
//! activation gradients are written (`=`)** unless an argument says otherwise. Shapes are row-major and
//! given in the comments: N = batch·seq rows, H hidden, I intermediate, V vocabulary, M head rows.

pub mod choice;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod philox;

use crate::error::Result;
use crate::model::config::Activation;

/// A region of a float buffer, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub id: u32,
    pub off: usize,
    pub len: usize,
}

/// A region of an i32 buffer, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ints {
    pub id: u32,
    pub off: usize,
    pub len: usize,
}

impl Buf {
    /// Elements [off, off + len) of this region.
    pub fn at(self, off: usize, len: usize) -> Buf {
        assert!(off + len <= self.len, "region [{off}, {}) outside a buffer of {}", off + len, self.len);
        Buf { id: self.id, off: self.off + off, len }
    }
    /// The first `len` elements.
    pub fn prefix(self, len: usize) -> Buf {
        self.at(0, len)
    }
    pub fn overlaps(&self, o: &Buf) -> bool {
        self.id == o.id && self.off < o.off + o.len && o.off < self.off + self.len
    }
}

impl Ints {
    pub fn at(self, off: usize, len: usize) -> Ints {
        assert!(off + len <= self.len, "region [{off}, {}) outside a buffer of {}", off + len, self.len);
        Ints { id: self.id, off: self.off + off, len }
    }
    pub fn prefix(self, len: usize) -> Ints {
        self.at(0, len)
    }
}

/// What a buffer holds; a backend may store each kind in its own precision (the CUDA backend keeps
/// activations in bf16 under `--precision bf16`; parameters, gradients, optimizer state and statistics stay
/// fp32). Values cross the trait as f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Master weights (fp32); a backend may keep a low-precision copy for its matrix products.
    Param,
    /// Parameter gradients (fp32).
    Grad,
    /// Activations and their gradients.
    Activation,
    /// Statistics, losses, optimizer moments: always fp32.
    Stat,
}

/// What keys a dropout mask: the same key gives the same mask in forward and backward, on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    pub seed: u64,
    /// The micro-step (forward/backward pass) counter.
    pub step: u64,
    /// Which dropout site: layer and place in the layer.
    pub site: u64,
}

/// A dropout: drop probability and its key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub key: DropoutKey,
}

/// The numbers of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The step number t, from 1.
    pub step: u64,
}

/// The numbers of one LAMB step (NVIDIA's FusedLAMB, adam_w_mode, bias correction, grad averaging).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LambStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Of the decay group; the no-decay group has 0.
    pub weight_decay: f32,
    /// The step number t, from 1.
    pub step: u64,
    /// The gradients are divided by this: the loss scale times the global-norm clipping ratio
    /// (‖g‖ / max_norm when ‖g‖ exceeds it, else 1).
    pub grad_divisor: f32,
    /// The trust ratio for every tensor (FusedLAMB's use_nvlamb), not only the decayed ones.
    pub all_tensors: bool,
}

/// Where the tensors of the flat parameter buffer lie, for LAMB's per-tensor trust ratios: made once
/// (`optim::Lamb::new`), resident on the backend.
#[derive(Debug, Clone, Copy)]
pub struct LambLayout {
    /// Per chunk `[start, len, tensor, decays]` (chunks of at most `launch::LAMB_CHUNK` elements, none
    /// across a tensor's end), then per tensor `[first chunk, chunks]`.
    pub table: Ints,
    pub chunks: usize,
    pub tensors: usize,
    /// Scratch: Σw² and Σu² per chunk (2 × chunks, chunk-major).
    pub partials: Buf,
    /// Scratch: ‖w‖² and ‖u‖² per tensor (2 × tensors).
    pub norms: Buf,
}

/// The buffers allocated up to a point (`Backend::allocation_mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationMark {
    pub floats: usize,
    pub ints: usize,
}

/// Labels of rows that take no part in a loss.
pub const IGNORE_INDEX: i32 = -100;

pub trait Backend {
    /// One line for logs: which device, which precision.
    fn describe(&self) -> String;

    /// Settle `--precision` (auto, fp32, bf16, fp16) for this backend; the name of what it runs. The CPU
    /// computes in fp32: fp16 there runs the loss scaler around fp32 arithmetic, bf16 is refused.
    fn set_precision(&self, requested: &str) -> Result<&'static str> {
        match requested {
            "auto" | "fp32" => Ok("fp32"),
            "fp16" => Ok("fp16"),
            other => crate::bail!("--precision {other}: the CPU backend computes in fp32; use --precision fp32 (or fp16 for the loss scaler), or a GPU"),
        }
    }

    /// Wait for all queued work (timing); the CPU computes synchronously.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Device memory in use, bytes, where the backend knows it.
    fn memory_used(&self) -> Option<u64> {
        None
    }

    // ---- memory -------------------------------------------------------------------------------------
    /// A zeroed float buffer.
    fn alloc(&self, len: usize) -> Result<Buf>;
    /// A zeroed buffer for what `kind` says it holds.
    fn alloc_kind(&self, len: usize, kind: Kind) -> Result<Buf> {
        let _ = kind;
        self.alloc(len)
    }
    /// A zeroed i32 buffer.
    fn alloc_ints(&self, len: usize) -> Result<Ints>;
    /// How many float and int buffers exist: a mark for `release_since`.
    fn allocation_mark(&self) -> AllocationMark;
    /// Free every buffer allocated after `mark` (a model rebuilt for another shape: its activations);
    /// their handles must not be used again.
    fn release_since(&self, mark: AllocationMark) -> Result<()>;
    fn upload(&self, dst: Buf, src: &[f32]) -> Result<()>;
    fn upload_f64(&self, dst: Buf, src: &[f64]) -> Result<()>;
    fn download(&self, src: Buf) -> Result<Vec<f32>>;
    fn download_f64(&self, src: Buf) -> Result<Vec<f64>>;
    fn upload_ints(&self, dst: Ints, src: &[i32]) -> Result<()>;
    fn download_ints(&self, src: Ints) -> Result<Vec<i32>>;
    fn fill(&self, dst: Buf, value: f32) -> Result<()>;
    fn copy(&self, dst: Buf, src: Buf) -> Result<()>;

    // ---- dense algebra ------------------------------------------------------------------------------
    /// C (m, n) = or += op(A) · op(B), with op(A) (m, k) — A stored (m, k), or (k, m) when `a_t` — and
    /// op(B) (k, n) — B stored (k, n), or (n, k) when `b_t`. `accumulate` chooses `+=`.
    fn matmul(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        m: usize,
        n: usize,
        k: usize,
        a_t: bool,
        b_t: bool,
        accumulate: bool,
    ) -> Result<()>;
    /// out (rows, cols) += bias (cols), every row.
    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize) -> Result<()>;
    /// dbias (cols) += Σ_rows dout (rows, cols).
    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize) -> Result<()>;
    /// out (n) = a + b.
    fn add(&self, out: Buf, a: Buf, b: Buf) -> Result<()>;
    /// out (1) = Σ inp.
    fn sum(&self, out: Buf, inp: Buf) -> Result<()>;

    // ---- embeddings ---------------------------------------------------------------------------------
    /// out (B·T, H) = word[ids] + position[t] + token_type[types].
    fn embeddings_fwd(
        &self,
        out: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        batch: usize,
        seq: usize,
        h: usize,
    ) -> Result<()>;
    /// dword, dposition, dtoken_type += the scatter of dout (B·T, H); deterministic.
    fn embeddings_bwd(
        &self,
        dword: Buf,
        dposition: Buf,
        dtoken_type: Buf,
        dout: Buf,
        ids: Ints,
        types: Ints,
        batch: usize,
        seq: usize,
        h: usize,
    ) -> Result<()>;

    // ---- normalisation and activations --------------------------------------------------------------
    /// out (rows, c) = (inp − mean) · rstd · w + b; mean, rstd (rows) saved for backward.
    fn layernorm_fwd(
        &self,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        inp: Buf,
        w: Buf,
        b: Buf,
        rows: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// dinp (rows, c) =; dw, db (c) +=.
    fn layernorm_bwd(
        &self,
        dinp: Buf,
        dw: Buf,
        db: Buf,
        dout: Buf,
        inp: Buf,
        mean: Buf,
        rstd: Buf,
        w: Buf,
        rows: usize,
        c: usize,
    ) -> Result<()>;
    /// sum (rows, c) = residual + dropout(branch); out = LayerNorm(sum), mean and rstd saved. `branch` is
    /// scratch (a backend may overwrite it). The unfused composition is the default.
    fn residual_layernorm_fwd(
        &self,
        sum: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        residual: Buf,
        branch: Buf,
        w: Buf,
        b: Buf,
        rows: usize,
        c: usize,
        eps: f32,
        dropout: Option<Dropout>,
    ) -> Result<()> {
        match dropout {
            None => self.add(sum, residual, branch)?,
            Some(d) => {
                self.dropout_fwd(sum, branch, d)?;
                self.copy(branch, sum)?;
                self.add(sum, residual, branch)?;
            }
        }
        self.layernorm_fwd(out, mean, rstd, sum, w, b, rows, c, eps)
    }
    /// Backward of `out = LayerNorm(sum)`, `sum = residual + dropout(branch)`: reads `grad` = d(out); writes
    /// dsum (rows, c) = d(sum) (the residual's gradient); dw, db +=; then overwrites `grad` with
    /// dropout'(dsum), the branch's gradient.
    fn residual_layernorm_bwd(
        &self,
        dsum: Buf,
        dw: Buf,
        db: Buf,
        grad: Buf,
        sum: Buf,
        mean: Buf,
        rstd: Buf,
        w: Buf,
        rows: usize,
        c: usize,
        dropout: Dropout,
    ) -> Result<()> {
        self.layernorm_bwd(dsum, dw, db, grad, sum, mean, rstd, w, rows, c)?;
        self.dropout_bwd(grad, dsum, dropout)
    }
    /// Backward of `out = gelu(pre)`, `pre = … + bias`: dpre (rows, cols) = dout · gelu'(pre); dbias (cols)
    /// += Σ_r dpre. The unfused composition is the default.
    fn gelu_bias_bwd(
        &self,
        dpre: Buf,
        dbias: Buf,
        dout: Buf,
        pre: Buf,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        let n = rows * cols;
        if dpre.len.min(dout.len).min(pre.len) < n {
            crate::bail!("internal: gelu bias backward: a buffer is shorter than {rows}×{cols}");
        }
        self.gelu_bwd(dpre.prefix(n), dout.prefix(n), pre.prefix(n), act)?;
        self.bias_grad(dbias, dpre.prefix(n), rows, cols)
    }
    /// pre (rows, cols) += bias, in place; out = gelu(pre).
    fn bias_gelu_fwd(
        &self,
        pre: Buf,
        out: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        self.add_bias(pre, bias, rows, cols)?;
        self.gelu_fwd(out, pre, act)
    }
    /// emb (B·T, H) = word[ids] + position[t] + token_type[types]; out = LayerNorm(emb), mean, rstd saved.
    fn embeddings_layernorm_fwd(
        &self,
        emb: Buf,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        ids: Ints,
        types: Ints,
        word: Buf,
        position: Buf,
        token_type: Buf,
        w: Buf,
        b: Buf,
        batch: usize,
        seq: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        self.embeddings_fwd(emb, ids, types, word, position, token_type, batch, seq, h)?;
        self.layernorm_fwd(out, mean, rstd, emb, w, b, batch * seq, h, eps)
    }
    /// out = gelu(inp), elementwise.
    fn gelu_fwd(&self, out: Buf, inp: Buf, act: Activation) -> Result<()>;
    /// dinp = dout · gelu'(inp).
    fn gelu_bwd(&self, dinp: Buf, dout: Buf, inp: Buf, act: Activation) -> Result<()>;
    /// out = tanh(inp).
    fn tanh_fwd(&self, out: Buf, inp: Buf) -> Result<()>;
    /// dinp = dout · (1 − out²).
    fn tanh_bwd(&self, dinp: Buf, dout: Buf, out: Buf) -> Result<()>;
    /// out = inp · keep / (1 − p), keep drawn from the key (element index as the counter).
    fn dropout_fwd(&self, out: Buf, inp: Buf, d: Dropout) -> Result<()>;
    /// dinp = dout · keep / (1 − p), the same mask regenerated.
    fn dropout_bwd(&self, dinp: Buf, dout: Buf, d: Dropout) -> Result<()>;

    // ---- attention ----------------------------------------------------------------------------------
    /// Floats of state `attention_fwd` saves for backward.
    fn attention_state_len(&self, batch: usize, seq: usize, heads: usize) -> usize;
    /// out (B·T, H) = softmax(Q Kᵀ/√d + mask) V per head, Q, K, V the thirds of qkv (B·T, 3H); keys where
    /// mask (B, T) is 0 are excluded; probabilities dropped out with `dropout`. Saves `state`.
    fn attention_fwd(
        &self,
        out: Buf,
        state: Buf,
        qkv: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        head_size: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;
    /// dqkv (B·T, 3H) =; `out` is attention_fwd's output.
    fn attention_bwd(
        &self,
        dqkv: Buf,
        dout: Buf,
        out: Buf,
        qkv: Buf,
        state: Buf,
        mask: Ints,
        batch: usize,
        seq: usize,
        heads: usize,
        head_size: usize,
        dropout: Option<Dropout>,
    ) -> Result<()>;

    // ---- data parallelism ------------------------------------------------------------------------------
    /// buf = Σ over the ranks of `comm`, in place. This default goes through host memory; the CUDA
    /// backend sums on the device with NCCL.
    fn all_reduce_sum(&self, buf: Buf, comm: &dyn crate::dist::Comm) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        let mut h = self.download(buf)?;
        comm.all_reduce_sum(&mut h)?;
        self.upload(buf, &h)
    }

    /// Wait, on the compute side, for every `all_reduce_sum` queued so far (the CUDA backend runs them on
    /// a communication stream, overlapping the backward pass).
    fn all_reduce_wait(&self) -> Result<()> {
        Ok(())
    }

    // ---- optimizer ----------------------------------------------------------------------------------
    /// out (1) = Σ x² over `x` (inf or NaN when any element is not finite): gradient norm and finite check.
    fn sum_squares(&self, out: Buf, x: Buf) -> Result<()>;
    /// x *= factor.
    fn scale(&self, x: Buf, factor: f32) -> Result<()>;
    /// One AdamW update of the whole parameter buffer, torch semantics: p −= lr·wd·p where decay (1),
    /// m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    fn adamw(&self, params: Buf, grads: Buf, m: Buf, v: Buf, decay: Ints, h: &AdamWStep) -> Result<()>;
    /// One LAMB update, per tensor of `layout`: g' = g / divisor, m = β1·m + (1−β1)·g',
    /// v = β2·v + (1−β2)·g'², u = (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) + wd·p (wd 0 outside the decay group),
    /// r = ‖p‖/‖u‖ over the tensor (1 when either is 0, and for the no-decay group unless `all_tensors`),
    /// p −= lr·r·u. The gradients are left as they were.
    fn lamb(&self, params: Buf, grads: Buf, m: Buf, v: Buf, layout: &LambLayout, h: &LambStep) -> Result<()>;

    // ---- rows and losses ----------------------------------------------------------------------------
    /// out (m, c) = inp[rows] (inp (·, c)).
    fn gather_rows(&self, out: Buf, inp: Buf, rows: Ints, m: usize, c: usize) -> Result<()>;
    /// dinp[rows] += dout (m, c).
    fn scatter_add_rows(&self, dinp: Buf, dout: Buf, rows: Ints, m: usize, c: usize) -> Result<()>;
    /// Softmax cross-entropy per row: losses (m) = logsumexp(logits) − logits[label], 0 where the label is
    /// IGNORE_INDEX. With `grad_scale`, logits (m, v) are overwritten by (softmax − onehot) · grad_scale
    /// (0 on ignored rows).
    fn cross_entropy(
        &self,
        losses: Buf,
        logits: Buf,
        labels: Ints,
        m: usize,
        v: usize,
        grad_scale: Option<f64>,
    ) -> Result<()>;
    /// out (m) = the index of each row's largest logit (logits (m, v)); ties take the first.
    fn argmax_rows(&self, out: Ints, logits: Buf, m: usize, v: usize) -> Result<()>;
}
