//! The parameter table: every parameter of `BertForPreTraining` by its Hugging Face name, with its shape,
//! its place in the one contiguous parameter buffer, its initialisation and whether weight decay applies.
//!
//! The buffer's order is ours, chosen so each layer's query, key and value weights are one (3H, H) matrix
//! and their biases one (3H) vector: the QKV projection is then a single matrix product. Names and shapes
//! are transformers' (Linear weights [out, in]); the tied `cls.predictions.decoder.weight` is the word
//! embedding matrix and has no entry of its own.

use std::collections::HashMap;

use crate::data::rng::KeyedRng;
use crate::model::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// normal(0, initializer_range)
    Normal,
    /// normal(0, initializer_range) with the padding row zeroed (the word embeddings)
    NormalPaddingZero,
    Zeros,
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    /// Offset in elements in the parameter buffer.
    pub offset: usize,
    pub len: usize,
    pub init: Init,
    /// AdamW weight decay applies (not to biases and LayerNorm weights).
    pub decay: bool,
}

/// Offsets of one encoder layer's parameters.
#[derive(Debug, Clone, Copy)]
pub struct LayerOffsets {
    pub qkv_w: usize,      // (3H, H): query, key, value weights stacked
    pub qkv_b: usize,      // (3H)
    pub attn_out_w: usize, // (H, H)
    pub attn_out_b: usize, // (H)
    pub ln1_w: usize,      // (H)
    pub ln1_b: usize,      // (H)
    pub ff1_w: usize,      // (I, H)
    pub ff1_b: usize,      // (I)
    pub ff2_w: usize,      // (H, I)
    pub ff2_b: usize,      // (H)
    pub ln2_w: usize,      // (H)
    pub ln2_b: usize,      // (H)
}

/// Offsets of the non-layer parameters.
#[derive(Debug, Clone, Copy)]
pub struct Offsets {
    pub word: usize,        // (V, H)
    pub position: usize,    // (P, H)
    pub token_type: usize,  // (TV, H)
    pub emb_ln_w: usize,    // (H)
    pub emb_ln_b: usize,    // (H)
    pub pooler_w: usize,    // (H, H)
    pub pooler_b: usize,    // (H)
    pub mlm_dense_w: usize, // (H, H)
    pub mlm_dense_b: usize, // (H)
    pub mlm_ln_w: usize,    // (H)
    pub mlm_ln_b: usize,    // (H)
    pub mlm_bias: usize,    // (V) cls.predictions.bias = decoder bias
    pub nsp_w: usize,       // (2, H)
    pub nsp_b: usize,       // (2)
}

#[derive(Debug, Clone)]
pub struct ParamTable {
    pub params: Vec<ParamInfo>,
    pub total: usize,
    pub top: Offsets,
    pub layers: Vec<LayerOffsets>,
    by_name: HashMap<String, usize>,
}

impl ParamTable {
    pub fn new(c: &ModelConfig) -> Self {
        let (v, h, i, p, tv) =
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.max_position_embeddings, c.type_vocab_size);
        let mut params = Vec::new();
        let mut total = 0usize;
        let mut add = |name: String, shape: Vec<usize>, init: Init| -> usize {
            let len = shape.iter().product();
            let decay = !(name.ends_with(".bias") || name.contains("LayerNorm"));
            params.push(ParamInfo { name, shape, offset: total, len, init, decay });
            total += len;
            total - len
        };
        let e = "bert.embeddings";
        let word = add(format!("{e}.word_embeddings.weight"), vec![v, h], Init::NormalPaddingZero);
        let position = add(format!("{e}.position_embeddings.weight"), vec![p, h], Init::Normal);
        let token_type = add(format!("{e}.token_type_embeddings.weight"), vec![tv, h], Init::Normal);
        let emb_ln_w = add(format!("{e}.LayerNorm.weight"), vec![h], Init::Ones);
        let emb_ln_b = add(format!("{e}.LayerNorm.bias"), vec![h], Init::Zeros);
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let pre = format!("bert.encoder.layer.{l}");
            let qkv_w = add(format!("{pre}.attention.self.query.weight"), vec![h, h], Init::Normal);
            add(format!("{pre}.attention.self.key.weight"), vec![h, h], Init::Normal);
            add(format!("{pre}.attention.self.value.weight"), vec![h, h], Init::Normal);
            let qkv_b = add(format!("{pre}.attention.self.query.bias"), vec![h], Init::Zeros);
            add(format!("{pre}.attention.self.key.bias"), vec![h], Init::Zeros);
            add(format!("{pre}.attention.self.value.bias"), vec![h], Init::Zeros);
            layers.push(LayerOffsets {
                qkv_w,
                qkv_b,
                attn_out_w: add(format!("{pre}.attention.output.dense.weight"), vec![h, h], Init::Normal),
                attn_out_b: add(format!("{pre}.attention.output.dense.bias"), vec![h], Init::Zeros),
                ln1_w: add(format!("{pre}.attention.output.LayerNorm.weight"), vec![h], Init::Ones),
                ln1_b: add(format!("{pre}.attention.output.LayerNorm.bias"), vec![h], Init::Zeros),
                ff1_w: add(format!("{pre}.intermediate.dense.weight"), vec![i, h], Init::Normal),
                ff1_b: add(format!("{pre}.intermediate.dense.bias"), vec![i], Init::Zeros),
                ff2_w: add(format!("{pre}.output.dense.weight"), vec![h, i], Init::Normal),
                ff2_b: add(format!("{pre}.output.dense.bias"), vec![h], Init::Zeros),
                ln2_w: add(format!("{pre}.output.LayerNorm.weight"), vec![h], Init::Ones),
                ln2_b: add(format!("{pre}.output.LayerNorm.bias"), vec![h], Init::Zeros),
            });
        }
        let top = Offsets {
            word,
            position,
            token_type,
            emb_ln_w,
            emb_ln_b,
            pooler_w: add("bert.pooler.dense.weight".into(), vec![h, h], Init::Normal),
            pooler_b: add("bert.pooler.dense.bias".into(), vec![h], Init::Zeros),
            mlm_dense_w: add("cls.predictions.transform.dense.weight".into(), vec![h, h], Init::Normal),
            mlm_dense_b: add("cls.predictions.transform.dense.bias".into(), vec![h], Init::Zeros),
            mlm_ln_w: add("cls.predictions.transform.LayerNorm.weight".into(), vec![h], Init::Ones),
            mlm_ln_b: add("cls.predictions.transform.LayerNorm.bias".into(), vec![h], Init::Zeros),
            mlm_bias: add("cls.predictions.bias".into(), vec![v], Init::Zeros),
            nsp_w: add("cls.seq_relationship.weight".into(), vec![2, h], Init::Normal),
            nsp_b: add("cls.seq_relationship.bias".into(), vec![2], Init::Zeros),
        };
        let by_name = params.iter().enumerate().map(|(k, p)| (p.name.clone(), k)).collect();
        ParamTable { params, total, top, layers, by_name }
    }

    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.by_name.get(name).map(|&k| &self.params[k])
    }

    /// The parameters of the encoder (`bert.*`, no heads).
    pub fn encoder_len(&self) -> usize {
        self.params.iter().filter(|p| p.name.starts_with("bert.")).map(|p| p.len).sum()
    }

    /// HF `_init_weights`, deterministic in `seed`: one stream per parameter.
    pub fn init(&self, c: &ModelConfig, seed: u64) -> Vec<f32> {
        let mut out = vec![0f32; self.total];
        for (k, p) in self.params.iter().enumerate() {
            let dst = &mut out[p.offset..p.offset + p.len];
            match p.init {
                Init::Zeros => {}
                Init::Ones => dst.fill(1.0),
                Init::Normal | Init::NormalPaddingZero => {
                    let mut rng = KeyedRng::new(0x494e_4954, &[seed, k as u64]);
                    fill_normal(&mut rng, dst, c.initializer_range);
                    if p.init == Init::NormalPaddingZero {
                        let h = p.shape[1];
                        dst[c.pad_token_id * h..(c.pad_token_id + 1) * h].fill(0.0);
                    }
                }
            }
        }
        out
    }
}

/// Normal(0, std) by Box–Muller.
pub fn fill_normal(rng: &mut KeyedRng, dst: &mut [f32], std: f64) {
    let mut i = 0;
    while i < dst.len() {
        let u1 = 1.0 - rng.uniform(); // (0, 1]
        let u2 = rng.uniform();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = 2.0 * std::f64::consts::PI * u2;
        dst[i] = (r * t.cos()) as f32;
        if i + 1 < dst.len() {
            dst[i + 1] = (r * t.sin()) as f32;
        }
        i += 2;
    }
}
