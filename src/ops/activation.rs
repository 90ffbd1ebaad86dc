//! Activations and dropout: GELU (erf or tanh form), tanh (the pooler), dropout with Philox masks shared
//! by every backend, and the fused bias + GELU forward and GELU + bias backward. Kernels:
//! kernels/activation.cu.
//!
//! One op family in two places: its kernels in `kernels/activation.cu`, and this file: the `Activations` trait (shapes
//! and the `=` / `+=` contract of each op), the CPU reference (`impl Activations for Cpu<T>`), the CUDA launchers
//! (`impl Activations for Cuda`), and the tests that hold the device to the reference on every backend.

use rayon::prelude::*;

use crate::backend::cpu::{Cpu, Real};
use crate::backend::cuda::launch::{PARTIAL_ROWS, THREADS};
use crate::backend::cuda::{grid_for, Cuda, DropoutArgs};
use crate::backend::{philox, Buf, Dropout};
use crate::error::Result;
use crate::model::config::Activation;
use crate::ops::Linear;

pub trait Activations: Linear {
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
        self.add_bias(pre, bias, rows, cols, cols)?;
        self.gelu_fwd(out, pre, act)
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
        self.bias_grad(dbias, dpre.prefix(n), rows, cols, cols)
    }
}

fn gelu<T: Real>(x: T, act: Activation) -> T {
    let half = T::from_f64(0.5);
    match act {
        Activation::GeluErf => {
            half * x * (T::from_f64(1.0) + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
        }
        Activation::GeluTanh => {
            let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
            half * x * (T::from_f64(1.0) + (c * (x + T::from_f64(0.044715) * x * x * x)).tanh())
        }
    }
}

fn gelu_grad<T: Real>(x: T, act: Activation) -> T {
    let (half, one) = (T::from_f64(0.5), T::from_f64(1.0));
    match act {
        Activation::GeluErf => {
            let cdf = half * (one + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
            let pdf = (-(half * x * x)).exp() * T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
        Activation::GeluTanh => {
            let c = T::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let a = T::from_f64(0.044715);
            let t = (c * (x + a * x * x * x)).tanh();
            half * (one + t) + half * x * (one - t * t) * c * (one + T::from_f64(3.0) * a * x * x)
        }
    }
}

fn dropout_apply<T: Real>(out: &mut [T], inp: &[T], d: Dropout) {
    let key = philox::key(d.key);
    let thr = philox::threshold(d.p);
    let inv = T::from_f64(1.0 / (1.0 - d.p as f64));
    out.par_iter_mut().zip(inp.par_iter()).enumerate().for_each(|(e, (o, &x))| {
        *o = if philox::draw(key, e as u64) >= thr { x * inv } else { T::default() };
    });
}

impl<T: Real> Activations for Cpu<T> {
    fn gelu_fwd(&self, out: Buf, inp: Buf, act: Activation) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        o.par_iter_mut().zip(x.par_iter()).for_each(|(o, &x)| *o = gelu(x, act));
        Ok(())
    }

    fn gelu_bwd(&self, dinp: Buf, dout: Buf, inp: Buf, act: Activation) -> Result<()> {
        self.check(&[dinp], &[dout, inp])?;
        let (di, d, x) = unsafe { (self.w(dinp), self.r(dout), self.r(inp)) };
        di.par_iter_mut()
            .zip(d.par_iter().zip(x.par_iter()))
            .for_each(|(di, (&d, &x))| *di = d * gelu_grad(x, act));
        Ok(())
    }

    fn tanh_fwd(&self, out: Buf, inp: Buf) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = x.tanh());
        Ok(())
    }

    fn tanh_bwd(&self, dinp: Buf, dout: Buf, out: Buf) -> Result<()> {
        self.check(&[dinp], &[dout, out])?;
        let (di, d, y) = unsafe { (self.w(dinp), self.r(dout), self.r(out)) };
        di.iter_mut().zip(d.iter().zip(y)).for_each(|(di, (&d, &y))| *di = d * (T::from_f64(1.0) - y * y));
        Ok(())
    }

    fn dropout_fwd(&self, out: Buf, inp: Buf, d: Dropout) -> Result<()> {
        self.check(&[out], &[inp])?;
        let (o, x) = unsafe { (self.w(out), self.r(inp)) };
        dropout_apply(o, x, d);
        Ok(())
    }

    fn dropout_bwd(&self, dinp: Buf, dout: Buf, d: Dropout) -> Result<()> {
        self.check(&[dinp], &[dout])?;
        let (o, x) = unsafe { (self.w(dinp), self.r(dout)) };
        dropout_apply(o, x, d);
        Ok(())
    }
}

impl Activations for Cuda {
    fn gelu_fwd(&self, out: Buf, inp: Buf, act: Activation) -> Result<()> {
        let dt = self.storage_of_all("gelu", &[out, inp])?;
        Self::need("elementwise input", inp.len, out.len)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        let approx = (act == Activation::GeluTanh) as i32;
        self.elementwise(self.k.gelu_fwd.of(dt), &[po, pi], out.len, Some(&approx))
    }

    fn gelu_bwd(&self, dinp: Buf, dout: Buf, inp: Buf, act: Activation) -> Result<()> {
        let dt = self.storage_of_all("gelu backward", &[dinp, dout, inp])?;
        Self::need("elementwise input", dout.len.min(inp.len), dinp.len)?;
        let ([pd], [pg, pi]) = self.ptrs_as(dt, [dinp], [dout, inp])?;
        let approx = (act == Activation::GeluTanh) as i32;
        self.elementwise(self.k.gelu_bwd.of(dt), &[pd, pg, pi], dinp.len, Some(&approx))
    }

    fn tanh_fwd(&self, out: Buf, inp: Buf) -> Result<()> {
        let dt = self.storage_of_all("tanh", &[out, inp])?;
        Self::need("elementwise input", inp.len, out.len)?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        self.elementwise(self.k.tanh_fwd.of(dt), &[po, pi], out.len, None::<&i32>)
    }

    fn tanh_bwd(&self, dinp: Buf, dout: Buf, out: Buf) -> Result<()> {
        let dt = self.storage_of_all("tanh backward", &[dinp, dout, out])?;
        Self::need("elementwise input", dout.len.min(out.len), dinp.len)?;
        let ([pd], [pg, po]) = self.ptrs_as(dt, [dinp], [dout, out])?;
        self.elementwise(self.k.tanh_bwd.of(dt), &[pd, pg, po], dinp.len, None::<&i32>)
    }

    fn dropout_fwd(&self, out: Buf, inp: Buf, d: Dropout) -> Result<()> {
        let dt = self.storage_of_all("dropout", &[out, inp])?;
        let ([po], [pi]) = self.ptrs_as(dt, [out], [inp])?;
        let args = DropoutArgs::of(Some(d));
        self.elementwise(self.k.dropout.of(dt), &[po, pi], out.len.min(inp.len), Some(&args))
    }

    fn dropout_bwd(&self, dinp: Buf, dout: Buf, d: Dropout) -> Result<()> {
        self.dropout_fwd(dinp, dout, d)
    }

    fn bias_gelu_fwd(
        &self,
        pre: Buf,
        out: Buf,
        bias: Buf,
        rows: usize,
        cols: usize,
        act: Activation,
    ) -> Result<()> {
        let dt = self.storage_of_all("bias gelu", &[pre, out])?;
        Self::need("bias gelu", pre.len.min(out.len), rows * cols)?;
        Self::need("bias gelu bias", bias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let ([pp, po], [pb]) = self.ptrs_as(dt, [pre, out], [bias])?;
        let (r, c, approx) = (rows as i64, cols as i32, (act == Activation::GeluTanh) as i32);
        self.launch(
            self.k.bias_gelu.of(dt),
            (grid_for(rows * cols), 1, 1),
            THREADS,
            &[&pp, &po, &pb, &r, &c, &approx],
        )?;
        Ok(())
    }

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
        self.need_f32_out("bias gradient", &[dbias])?;
        let dt = self.storage_of_all("gelu bias backward", &[dpre, dout, pre])?;
        Self::need("gelu bias backward", dpre.len.min(dout.len).min(pre.len), rows * cols)?;
        Self::need("gelu bias backward dbias", dbias.len, cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let n = rows * cols;
        let ([pd, pb], [pg, pp]) =
            self.ptrs_as(dt, [dpre.prefix(n), dbias], [dout.prefix(n), pre.prefix(n)])?;
        let chunks = rows.div_ceil(PARTIAL_ROWS as usize);
        let part = self.partials(chunks * cols)?;
        let (r, c, approx) = (rows as i64, cols as i32, (act == Activation::GeluTanh) as i32);
        // A 16-byte vector of columns per thread where the rows hold whole vectors and start aligned.
        let vector = 16 / dt.size();
        let per_thread =
            if cols % vector == 0 && [pd, pg, pp].iter().all(|p| p % 16 == 0) { vector } else { 1 };
        let columns_per_block = THREADS as usize * per_thread;
        let w = per_thread as i32;
        self.launch(
            self.k.gelu_bias_bwd.of(dt),
            (chunks as u32, cols.div_ceil(columns_per_block) as u32, 1),
            THREADS,
            &[&pd, &part, &pg, &pp, &r, &c, &approx, &w],
        )?;
        self.sum_partials(pb, part, chunks, cols, cols)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testing::*;

    fn elementwise_ops_bias_and_reductions() {
        let n = B * T * H;
        let x = randn(4, n, 1.5);
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            let c = Case {
                floats: vec![x.clone(), randn(5, n, 1.0)],
                ints: vec![],
                outs: vec![(n, None), (n, None)],
            };
            same(&format!("{act:?}"), &c, 1e-6, 1e-5, &|be, f, _, o| {
                be.gelu_fwd(o[0], f[0], act)?;
                be.gelu_bwd(o[1], f[1], f[0], act)
            });
        }
        let c = Case {
            floats: vec![x.clone(), randn(6, n, 1.0)],
            ints: vec![],
            outs: vec![(n, None), (n, None), (n, None)],
        };
        let d = Dropout { p: 0.1, key: DropoutKey { seed: 1, step: 2, site: 3 } };
        // The dropout masks are bit-identical (Philox): exact.
        same("tanh, add, dropout", &c, 1e-6, 1e-6, &|be, f, _, o| {
            be.tanh_fwd(o[0], f[0])?;
            be.add(o[1], f[0], f[1])?;
            be.dropout_fwd(o[2], f[0], d)
        });
        // Four elements per Philox call, and a tail of n mod 4 = 3 one by one: the same masks.
        let m = 4 * 101 + 3;
        let c = Case { floats: vec![randn(7, m, 1.0)], ints: vec![], outs: vec![(m, None)] };
        same("dropout with a tail", &c, 1e-6, 1e-6, &|be, f, _, o| be.dropout_fwd(o[0], f[0], d));
    }

    fn fused_forward_kernels_equal_the_unfused_cpu_ops() {
        let rows = B * T;
        let (r, cols) = (rows, 80);
        // 80 columns: 16-byte vectors; 37: the element-wise path.
        for w in [cols, 37] {
            let c = Case {
                floats: vec![randn(44, w, 1.0)],
                ints: vec![],
                outs: vec![(r * w, Some(randn(45, r * w, 1.5))), (r * w, None)],
            };
            for act in [Activation::GeluErf, Activation::GeluTanh] {
                same(&format!("bias + {act:?}, width {w}"), &c, 1e-5, 1e-5, &|be, f, _, o| {
                    be.bias_gelu_fwd(o[0], o[1], f[0], r, w, act)
                });
            }
        }
        // Its backward: d(pre), and the bias gradient added to what is there (two 64-row chunks, one partial).
        let c = Case {
            floats: vec![randn(60, r * cols, 1.0), randn(61, r * cols, 1.5)],
            ints: vec![],
            outs: vec![(r * cols, None), (cols, Some(randn(62, cols, 1.0)))],
        };
        for act in [Activation::GeluErf, Activation::GeluTanh] {
            let op: Op = &|be, f, _, o| be.gelu_bias_bwd(o[0], o[1], f[0], f[1], r, cols, act);
            same(&format!("{act:?} + bias backward"), &c, 1e-4, 1e-5, op);
            use Kind::{Activation as A, Grad as G};
            same_bf16(&format!("{act:?} + bias backward"), &c, &[A, A], &[A, G], 3e-2, op);
        }
    }

    on_both_devices!(elementwise_ops_bias_and_reductions, fused_forward_kernels_equal_the_unfused_cpu_ops,);
}
