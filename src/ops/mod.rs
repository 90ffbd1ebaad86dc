//! The ops the BERT forward and backward passes are written against, one family per file. A family lives
//! in two places: its kernels in `kernels/<family>.cu`, and `src/ops/<family>.rs`, which holds the
//! family's trait (each op's shapes and its `=` / `+=` contract), the CPU reference
//! (`impl<T: Real> Family for Cpu<T>`), the CUDA launcher (`impl Family for Cuda`) and its tests, which
//! hold the device (emulated in every `cargo test`, a GPU with `--ignored`) to the CPU reference.
//!
//! | family       | ops                                                                          |
//! |--------------|------------------------------------------------------------------------------|
//! | `linear`     | matmul(_strided), add_bias, bias_grad, linear, linear_param_grads            |
//! | `norm`       | layernorm_fwd/bwd, residual_layernorm_fwd/bwd                                |
//! | `activation` | gelu_fwd/bwd, tanh_fwd/bwd, dropout_fwd/bwd, bias_gelu_fwd, gelu_bias_bwd    |
//! | `embedding`  | embeddings_fwd/bwd, embeddings_layernorm_fwd                                 |
//! | `attention`  | attention_state_len, attention_fwd/bwd                                       |
//! | `loss`       | cross_entropy, argmax_rows                                                   |
//! | `optim`      | sum_squares, scale, adamw, lamb                                              |
//! | `tensor`     | add, sum, gather_rows, scatter_add_rows                                      |
//!
//! The contract of every op, as in llm.c: **parameter gradients accumulate (`+=`), activations and
//! activation gradients are written (`=`)** unless an argument says otherwise. Shapes are row-major and
//! given in the comments: N = batch·seq rows, H hidden, I intermediate, V vocabulary, M head rows.
//!
//! A fused op's default is the unfused composition (a supertrait gives it the ops it composes): the CPU
//! inherits it, and the tests hold the fused kernel to it. `crate::backend::Backend` is the union of the
//! families and the memory layer (`crate::backend::Memory`).

#[cfg(test)]
#[macro_use]
mod testing;

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod tensor;

pub use activation::Activations;
pub use attention::Attention;
pub use embedding::Embedding;
pub use linear::{Linear, Strides};
pub use loss::Loss;
pub use norm::Norm;
pub use optim::Optim;
pub use tensor::Tensor;
