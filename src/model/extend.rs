//! Continued pretraining with a vocabulary extended for the domain (`bertcuda tokenizer extend`): a
//! checkpoint's parameters grown to the longer vocabulary. Every old row is kept; the row of each new
//! token starts as the mean of the rows of the pieces the old tokenizer cut it into, in the word embeddings
//! (and so the tied decoder) and in the decoder bias.

use crate::bail;
use crate::data::tokenizer::BertTokenizer;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::params::ParamTable;

/// Whether `new` extends `old`: the same casing, and `old`'s vocabulary a proper prefix of `new`'s.
pub fn extends(new: &BertTokenizer, old: &BertTokenizer) -> bool {
    let (a, b) = (old.vocab_in_order(), new.vocab_in_order());
    new.do_lower_case == old.do_lower_case && b.len() > a.len() && b[..a.len()] == a[..]
}

/// The checkpoint (`config`, `params`, made with `old`) grown to `new`'s vocabulary: its config, its
/// parameters, and how many rows were added.
pub fn extend_vocabulary(
    config: &ModelConfig,
    params: &[f32],
    old: &BertTokenizer,
    new: &BertTokenizer,
) -> Result<(ModelConfig, Vec<f32>, usize)> {
    if !extends(new, old) {
        bail!("internal: the shards' vocabulary does not extend the checkpoint's");
    }
    if config.vocab_size != old.vocab_size {
        bail!(
            "the checkpoint's vocab_size is {} but its tokenizer has {} tokens; they do not belong together",
            config.vocab_size,
            old.vocab_size
        );
    }
    let mut grown = config.clone();
    grown.vocab_size = new.vocab_size;
    grown.validate()?;
    let (from, to) = (ParamTable::new(config), ParamTable::new(&grown));
    let mut out = vec![0f32; to.total];
    let vocab = new.vocab_in_order();
    // The old pieces of each new token.
    let pieces: Vec<Vec<usize>> = vocab[old.vocab_size..]
        .iter()
        .map(|w| {
            let ids = old.encode_ids(w)?;
            if ids.is_empty() {
                bail!("the new token {w:?} is no text to the checkpoint's tokenizer");
            }
            Ok(ids.into_iter().map(|i| i as usize).collect())
        })
        .collect::<Result<_>>()?;
    for p in &to.params {
        let q = from.get(&p.name).expect("the same parameters");
        let (src, dst) = (&params[q.offset..q.offset + q.len], &mut out[p.offset..p.offset + p.len]);
        if q.shape == p.shape {
            dst.copy_from_slice(src);
            continue;
        }
        // Indexed by vocabulary rows: the word embeddings (V, H) and the decoder bias (V).
        let width = p.shape.get(1).copied().unwrap_or(1);
        dst[..src.len()].copy_from_slice(src);
        for (k, ids) in pieces.iter().enumerate() {
            let row = &mut dst[(old.vocab_size + k) * width..(old.vocab_size + k + 1) * width];
            for &i in ids {
                for (r, s) in row.iter_mut().zip(&src[i * width..(i + 1) * width]) {
                    *r += s;
                }
            }
            row.iter_mut().for_each(|r| *r /= ids.len() as f32);
        }
    }
    Ok((grown, out, new.vocab_size - old.vocab_size))
}
