//! Linear layers: the matrix product and its bias, `y = x·Wᵀ + b` and its gradients. The products are
//! cuBLAS's (the gemm crate's on the CPU); the bias kernels are kernels/linear.cu.
//!
//! One op family in two places: its kernels in `kernels/linear.cu`, and this file: the `Linear` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Linear for Cpu<T>`), the CUDA launchers
//! (`impl Linear for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{reduce_rows, Cpu, Real};
use crate::backend::cuda::launch::{PARTIAL_ROWS, THREADS};
use crate::backend::cuda::{grid_for, Cuda, StorageType};
use crate::backend::device::Device;
use crate::backend::device::{Compute, Elem, Epilogue, Gemm, EPILOGUE_ALIGNMENT};
use crate::backend::{strided_len, Buf};
use crate::bail;
use crate::error::Result;

/// Where a product's matrices keep their rows: the row stride, in elements, of A, B and C as stored
/// (row-major; `None` = dense, a stored row's width). A wider stride leaves the elements past each row's
/// width alone: the MLM logits, (rows, V) in rows of V padded to a multiple of 64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Strides {
    pub a: Option<usize>,
    pub b: Option<usize>,
    pub c: Option<usize>,
}

impl Strides {
    /// Every matrix dense.
    pub const DENSE: Strides = Strides { a: None, b: None, c: None };
}

pub trait Linear {
    /// C (m, n) = or += op(A) · op(B), with op(A) (m, k) — A stored (m, k), or (k, m) when `a_t` — and
    /// op(B) (k, n) — B stored (k, n), or (n, k) when `b_t`; the stored rows `ld` apart. `accumulate`
    /// chooses `+=`.
    fn matmul_strided(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        mnk: (usize, usize, usize),
        a_t: bool,
        b_t: bool,
        accumulate: bool,
        ld: Strides,
    ) -> Result<()>;
    /// `matmul_strided` with every matrix dense.
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
    ) -> Result<()> {
        self.matmul_strided(c, a, b, (m, n, k), a_t, b_t, accumulate, Strides::DENSE)
    }
    /// out (rows, cols; rows `ld` apart) += bias (cols), every row.
    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize, ld: usize) -> Result<()>;
    /// dbias (cols) += Σ_rows dout (rows, cols; rows `ld` apart).
    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize, ld: usize) -> Result<()>;
    /// out (rows, out_f; rows `out_ld` apart) = inp (rows, in_f) · Wᵀ + bias, W stored (out_f, in_f): a
    /// linear layer's forward. This default is `matmul` then `add_bias`; the CUDA backend adds the bias in
    /// the product's epilogue.
    fn linear(
        &self,
        out: Buf,
        inp: Buf,
        w: Buf,
        bias: Buf,
        (rows, in_f, out_f): (usize, usize, usize),
        out_ld: usize,
    ) -> Result<()> {
        let ld = Strides { c: Some(out_ld), ..Strides::DENSE };
        self.matmul_strided(out, inp, w, (rows, out_f, in_f), false, true, false, ld)?;
        self.add_bias(out, bias, rows, out_f, out_ld)
    }
    /// dW (out_f, in_f) += doutᵀ · inp and dbias (out_f) += Σ_rows dout (dout (rows, out_f; rows `dout_ld`
    /// apart), inp (rows, in_f)): a linear layer's parameter gradients. This default is `matmul` then
    /// `bias_grad`; the CUDA backend reduces the bias gradient in the product's epilogue.
    fn linear_param_grads(
        &self,
        dw: Buf,
        dbias: Buf,
        dout: Buf,
        inp: Buf,
        (rows, in_f, out_f): (usize, usize, usize),
        dout_ld: usize,
    ) -> Result<()> {
        let ld = Strides { a: Some(dout_ld), ..Strides::DENSE };
        self.matmul_strided(dw, dout, inp, (out_f, in_f, rows), true, false, true, ld)?;
        self.bias_grad(dbias, dout, rows, out_f, dout_ld)
    }
}

/// The stored row strides of a product's A, B and C (`ld`'s, or dense) and the elements each then spans;
/// an error when a stride is below its row's width.
fn layout(
    (m, n, k): (usize, usize, usize),
    a_t: bool,
    b_t: bool,
    ld: Strides,
) -> Result<[(usize, usize); 3]> {
    let (ar, ac) = if a_t { (k, m) } else { (m, k) };
    let (br, bc) = if b_t { (n, k) } else { (k, n) };
    let mut out = [(0, 0); 3];
    for (slot, (what, rows, cols, stride)) in
        out.iter_mut().zip([("A", ar, ac, ld.a), ("B", br, bc, ld.b), ("C", m, n, ld.c)])
    {
        let stride = stride.unwrap_or(cols);
        if stride < cols {
            bail!("internal: matmul {what}'s row stride {stride} is below its {cols} columns");
        }
        *slot = (stride, strided_len(rows, cols, stride));
    }
    Ok(out)
}

impl<T: Real> Linear for Cpu<T> {
    fn matmul_strided(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        (m, n, k): (usize, usize, usize),
        a_t: bool,
        b_t: bool,
        accumulate: bool,
        ld: Strides,
    ) -> Result<()> {
        self.check(&[c], &[a, b])?;
        let [(lda, sa), (ldb, sb), (ldc, sc)] = layout((m, n, k), a_t, b_t, ld)?;
        self.need("matmul C", c.len, sc)?;
        self.need("matmul A", a.len, sa)?;
        self.need("matmul B", b.len, sb)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (cv, av, bv) = unsafe { (self.w(c), self.r(a), self.r(b)) };
        if k == 0 {
            if !accumulate {
                cv[..sc].chunks_mut(ldc).for_each(|row| row[..n].fill(T::default()));
            }
            return Ok(());
        }
        let (lhs_cs, lhs_rs) = if a_t { (lda as isize, 1) } else { (1, lda as isize) };
        let (rhs_cs, rhs_rs) = if b_t { (ldb as isize, 1) } else { (1, ldb as isize) };
        let par = if m * n * k >= 1 << 15 {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the regions were bounds-checked for these shapes and strides, and C does not overlap A or B.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                cv.as_mut_ptr(),
                1,
                ldc as isize,
                accumulate,
                av.as_ptr(),
                lhs_cs,
                lhs_rs,
                bv.as_ptr(),
                rhs_cs,
                rhs_rs,
                T::from_f64(1.0),
                T::from_f64(1.0),
                false,
                false,
                false,
                par,
            )
        };
        Ok(())
    }

    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize, ld: usize) -> Result<()> {
        self.check(&[out], &[bias])?;
        self.need("add_bias out", out.len, strided_len(rows, cols, ld))?;
        self.need("add_bias bias", bias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (o, b) = unsafe { (self.w(out), self.r(bias)) };
        o[..strided_len(rows, cols, ld)].par_chunks_mut(ld).for_each(|row| {
            for (x, &bb) in row[..cols].iter_mut().zip(b) {
                *x += bb;
            }
        });
        Ok(())
    }

    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize, ld: usize) -> Result<()> {
        self.check(&[dbias], &[dout])?;
        self.need("bias_grad dout", dout.len, strided_len(rows, cols, ld))?;
        self.need("bias_grad dbias", dbias.len, cols)?;
        let (db, d) = unsafe { (self.w(dbias), self.r(dout)) };
        reduce_rows(rows, cols, &mut db[..cols], |range, p| {
            for r in range {
                for (acc, &x) in p.iter_mut().zip(&d[r * ld..r * ld + cols]) {
                    *acc += x;
                }
            }
        });
        Ok(())
    }
}

/// What a CUDA product adds to `matmul`'s: a bias on its output, or the bias gradient (+=) of its first
/// operand (`a`, which must be transposed: the weight gradient's doutᵀ).
#[derive(Clone, Copy, PartialEq)]
enum Extra {
    None,
    Bias(Buf),
    BiasGrad(Buf),
}

impl Cuda {
    /// `matmul_strided`, and `extra` — in the product's epilogue where the output, the operands and the
    /// bias start at addresses and have row strides in bytes that are multiples of EPILOGUE_ALIGNMENT,
    /// else by our kernels after the plain product (add_bias, bias_grad).
    fn product(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        (m, n, k): (usize, usize, usize),
        (a_t, b_t, accumulate): (bool, bool, bool),
        ld: Strides,
        extra: Extra,
    ) -> Result<()> {
        let [(lda, sa), (ldb, sb), (ldc, sc)] = layout((m, n, k), a_t, b_t, ld)?;
        if c.len < sc || a.len < sa || b.len < sb {
            bail!("internal: matmul regions too small for ({m}, {n}, {k})");
        }
        // Operands in bf16 when any activation involved is (parameters then come from their bf16 copy);
        // the output keeps its own storage (fp32 for parameter gradients).
        let (dc, da, db) = (self.storage(c)?, self.storage(a)?, self.storage(b)?);
        let op_dt =
            if [dc, da, db].contains(&StorageType::Bf16) { StorageType::Bf16 } else { StorageType::F32 };
        let ([pc], [pa, pb]) = self.ptrs_as(op_dt, [c], [a, b])?;
        let pc = if dc == StorageType::F32 { self.ptrs([c], [])?.0[0] } else { pc };
        let elem = |d: StorageType| if d == StorageType::Bf16 { Elem::Bf16 } else { Elem::F32 };
        let align = EPILOGUE_ALIGNMENT as u64;
        let rows = [(pc, ldc * dc.size()), (pa, lda * op_dt.size()), (pb, ldb * op_dt.size())];
        let fused = m * n * k > 0 && rows.iter().all(|&(p, row)| p % align == 0 && row as u64 % align == 0);
        // Row-major C (m, n) = op(A) op(B) is column-major Cᵀ (n, m) = op(B)ᵀ op(A)ᵀ: B first; a bias of
        // C's n columns is the column-major bias of its n rows, and the bias gradient of row-major A's
        // columns (A transposed) is that of the column-major B operand.
        let epilogue = match extra {
            Extra::None => Epilogue::None,
            Extra::Bias(bias) => {
                Self::need("bias", bias.len, n)?;
                let ([], [p]) = self.ptrs_as(dc, [], [bias])?;
                if fused && p % align == 0 {
                    Epilogue::Bias { bias: p, elem: elem(dc) }
                } else {
                    Epilogue::None
                }
            }
            Extra::BiasGrad(dbias) => {
                self.need_f32_out("bias gradient", &[dbias])?;
                Self::need("bias gradient", dbias.len, m)?;
                if !a_t {
                    bail!("internal: a bias gradient in a product's epilogue needs the transposed operand");
                }
                if fused {
                    Epilogue::BiasGradB { grad: self.partials(m)? }
                } else {
                    Epilogue::None
                }
            }
        };
        if m * n * k == 0 {
            if !accumulate && m * n > 0 {
                // C's rows, each once when they are apart (nothing between them is C's).
                let (row, rows) = if ldc == n { (m * n, 1) } else { (n, m) };
                for r in 0..rows {
                    self.dev.memset_zero(pc + (r * ldc * dc.size()) as u64, dc.size() * row)?;
                }
            }
        } else {
            let compute = if op_dt == StorageType::Bf16 { Compute::F32 } else { self.gemm.get().0 };
            self.dev.gemm(&Gemm {
                trans_a: b_t,
                trans_b: a_t,
                m: n,
                n: m,
                k,
                alpha: 1.0,
                a: pb,
                a_type: elem(op_dt),
                lda: ldb.max(1),
                b: pa,
                b_type: elem(op_dt),
                ldb: lda.max(1),
                beta: if accumulate { 1.0 } else { 0.0 },
                c: pc,
                c_type: elem(dc),
                ldc: ldc.max(1),
                compute,
                epilogue,
            })?;
        }
        match (extra, epilogue) {
            // The epilogue wrote the bias gradient (=) into scratch: added to dbias (+=).
            (Extra::BiasGrad(dbias), Epilogue::BiasGradB { grad }) => {
                let ([pdb], []) = self.ptrs([dbias], [])?;
                self.sum_partials(pdb, grad, 1, m, m)
            }
            (Extra::Bias(bias), Epilogue::None) => self.add_bias(c, bias, m, n, ldc),
            (Extra::BiasGrad(dbias), Epilogue::None) => self.bias_grad(dbias, a, k, m, lda),
            _ => Ok(()),
        }
    }
}

impl Linear for Cuda {
    fn matmul_strided(
        &self,
        c: Buf,
        a: Buf,
        b: Buf,
        mnk: (usize, usize, usize),
        a_t: bool,
        b_t: bool,
        accumulate: bool,
        ld: Strides,
    ) -> Result<()> {
        self.product(c, a, b, mnk, (a_t, b_t, accumulate), ld, Extra::None)
    }

    fn linear(
        &self,
        out: Buf,
        inp: Buf,
        w: Buf,
        bias: Buf,
        (rows, in_f, out_f): (usize, usize, usize),
        out_ld: usize,
    ) -> Result<()> {
        let ld = Strides { c: Some(out_ld), ..Strides::DENSE };
        self.product(out, inp, w, (rows, out_f, in_f), (false, true, false), ld, Extra::Bias(bias))
    }

    fn linear_param_grads(
        &self,
        dw: Buf,
        dbias: Buf,
        dout: Buf,
        inp: Buf,
        (rows, in_f, out_f): (usize, usize, usize),
        dout_ld: usize,
    ) -> Result<()> {
        let ld = Strides { a: Some(dout_ld), ..Strides::DENSE };
        self.product(dw, dout, inp, (out_f, in_f, rows), (true, false, true), ld, Extra::BiasGrad(dbias))
    }

    fn add_bias(&self, out: Buf, bias: Buf, rows: usize, cols: usize, ld: usize) -> Result<()> {
        let dt = self.storage(out)?;
        Self::need("add_bias out", out.len, strided_len(rows, cols, ld))?;
        Self::need("add_bias bias", bias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let ([po], [pb]) = self.ptrs_as(dt, [out], [bias])?;
        let (r, c, l) = (rows as i64, cols as i32, ld as i32);
        self.launch(self.k.add_bias.of(dt), (grid_for(rows * cols), 1, 1), THREADS, &[&po, &pb, &r, &c, &l])?;
        Ok(())
    }

    fn bias_grad(&self, dbias: Buf, dout: Buf, rows: usize, cols: usize, ld: usize) -> Result<()> {
        self.need_f32_out("bias gradient", &[dbias])?;
        let dt = self.storage(dout)?;
        Self::need("bias_grad dout", dout.len, strided_len(rows, cols, ld))?;
        Self::need("bias_grad dbias", dbias.len, cols)?;
        if cols == 0 {
            return Ok(());
        }
        let ([pd], [pg]) = self.ptrs_as(dt, [dbias], [dout])?;
        let chunks = rows.div_ceil(PARTIAL_ROWS as usize).max(1);
        let part = self.partials(chunks * cols)?;
        let (r, c, l) = (rows as i64, cols as i32, ld as i64);
        self.launch(
            self.k.bias_grad_partial.of(dt),
            (chunks as u32, cols.div_ceil(THREADS as usize) as u32, 1),
            THREADS,
            &[&part, &pg, &r, &c, &l],
        )?;
        self.sum_partials(pd, part, chunks, cols, cols)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn matmul_in_every_transpose() {
        let (m, n, k) = (37, 53, 29);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            for acc in [false, true] {
                let c = Case {
                    floats: vec![randn(1, m * k, 1.0), randn(2, k * n, 1.0)],
                    ints: vec![],
                    outs: vec![(m * n, acc.then(|| randn(3, m * n, 1.0)))],
                };
                // fp32 SGEMM vs the gemm crate: summation order differs; 1e-4 relative over k = 29.
                same(&format!("matmul a_t={a_t} b_t={b_t} acc={acc}"), &c, 1e-4, 1e-4, &|be, f, _, o| {
                    be.matmul(o[0], f[0], f[1], m, n, k, a_t, b_t, acc)
                });
            }
        }
    }

    /// Every matrix stored in rows wider than it (the MLM logits' padded rows): the product reads and
    /// writes only each row's first elements; what lies between rows (random here) is left as it was.
    fn matmul_with_row_strides() {
        let (m, n, k) = (37, 53, 29);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            for acc in [false, true] {
                let (ar, ac) = if a_t { (k, m) } else { (m, k) };
                let (br, bc) = if b_t { (n, k) } else { (k, n) };
                let ld = Strides { a: Some(ac + 3), b: Some(bc + 5), c: Some(n + 11) };
                let c = Case {
                    floats: vec![randn(1, ar * (ac + 3), 1.0), randn(2, br * (bc + 5), 1.0)],
                    ints: vec![],
                    outs: vec![(m * (n + 11), Some(randn(3, m * (n + 11), 1.0)))],
                };
                let what = format!("strided matmul a_t={a_t} b_t={b_t} acc={acc}");
                same(&what, &c, 1e-4, 1e-4, &|be, f, _, o| {
                    be.matmul_strided(o[0], f[0], f[1], (m, n, k), a_t, b_t, acc, ld)
                });
            }
        }
    }

    fn elementwise_ops_bias_and_reductions() {
        let (rows, cols) = (B * T, H);
        let c = Case {
            floats: vec![randn(7, rows * cols, 1.0), randn(8, cols, 1.0)],
            ints: vec![],
            outs: vec![
                (rows * cols, Some(randn(9, rows * cols, 1.0))),
                (cols, Some(randn(10, cols, 1.0))),
                (1, Some(vec![0.75])), // the sum accumulates
                (1, None),
            ],
        };
        same("bias add/grad, sum, sum of squares", &c, 1e-4, 1e-5, &|be, f, _, o| {
            be.add_bias(o[0], f[1], rows, cols, cols)?;
            be.bias_grad(o[1], f[0], rows, cols, cols)?;
            be.sum(o[2], f[0])?;
            be.sum_squares(o[3], f[0])
        });
        // Rows 7 elements wider than the matrix: what lies between them is neither read nor written.
        let ld = cols + 7;
        let c = Case {
            floats: vec![randn(11, rows * ld, 1.0), randn(12, cols, 1.0)],
            ints: vec![],
            outs: vec![(rows * ld, Some(randn(13, rows * ld, 1.0))), (cols, Some(randn(14, cols, 1.0)))],
        };
        same("bias add/grad in strided rows", &c, 1e-4, 1e-5, &|be, f, _, o| {
            be.add_bias(o[0], f[1], rows, cols, ld)?;
            be.bias_grad(o[1], f[0], rows, cols, ld)
        });
    }

    fn bf16_ops_against_the_fp32_cpu() {
        use Kind::{Activation as A, Grad as G, Param as P};
        // Matrix products: activation × parameter → activation, and activations → a parameter gradient.
        let (m, n, k) = (37, 53, 29);
        let c = Case {
            floats: vec![randn(1, m * k, 1.0), randn(2, n * k, 1.0), randn(3, m * n, 1.0)],
            ints: vec![],
            outs: vec![(m * n, None), (n * k, Some(vec![0.0; n * k]))],
        };
        same_bf16("matmul", &c, &[A, P, A], &[A, G], 3e-2, &|be, f, _, o| {
            be.matmul(o[0], f[0], f[1], m, n, k, false, true, false)?;
            be.matmul(o[1], f[2], f[0], n, k, m, true, false, true)
        });
    }

    /// A linear layer's forward and parameter gradients — on the device the bias in the product's
    /// epilogue and the bias gradient reduced by it (rows of whole 16-byte vectors), or the plain product
    /// and our kernels (odd widths) — against the CPU's matmul + add_bias and matmul + bias_grad, in fp32
    /// and with bf16 activations; the gradients accumulate. The output rows dense, or apart by the MLM
    /// logits' padding (53 → 64: 16-byte aligned rows of an odd width, the decoder's case) or by an odd
    /// stride (the fallback).
    fn linear_layers_with_epilogues() {
        use Kind::{Activation as A, Grad as G, Param as P};
        for (rows, in_f, out_f, ld) in
            [(37, 32, 48, 48), (37, 29, 53, 53), (37, 32, 53, 64), (37, 32, 48, 51)]
        {
            linear_layer((rows, in_f, out_f), ld, &[A, P, P, A], &[A, G, G]);
        }
    }

    fn linear_layer(
        (rows, in_f, out_f): (usize, usize, usize),
        ld: usize,
        kinds: &[Kind],
        out_kinds: &[Kind],
    ) {
        let c = Case {
            floats: vec![
                randn(50, rows * in_f, 1.0),
                randn(51, out_f * in_f, 0.3),
                randn(52, out_f, 1.0),
                randn(53, rows * ld, 1.0),
            ],
            ints: vec![],
            outs: vec![
                (rows * ld, Some(randn(56, rows * ld, 1.0))),
                (out_f * in_f, Some(randn(54, out_f * in_f, 1.0))),
                (out_f, Some(randn(55, out_f, 1.0))),
            ],
        };
        let op: Op = &|be, f, _, o| {
            be.linear(o[0], f[0], f[1], f[2], (rows, in_f, out_f), ld)?;
            be.linear_param_grads(o[1], o[2], f[3], f[0], (rows, in_f, out_f), ld)
        };
        let what = format!("linear {rows}×{in_f} → {out_f} (rows {ld} apart) and its parameter gradients");
        same(&what, &c, 1e-4, 1e-4, op);
        same_bf16(&what, &c, kinds, out_kinds, 3e-2, op);
    }

    on_both_devices!(
        matmul_in_every_transpose,
        matmul_with_row_strides,
        elementwise_ops_bias_and_reductions,
        bf16_ops_against_the_fp32_cpu,
        linear_layers_with_epilogues,
    );
}
