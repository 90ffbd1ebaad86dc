//! Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), the counter-based
//! generator of cuRAND: dropout masks are a pure function of (key, element index), so the CPU and CUDA
//! backends draw the very same masks and backward regenerates them instead of storing them.

use crate::backend::DropoutKey;
use crate::data::rng::KeyedRng;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Ten rounds of Philox4x32 on counter `c` with key `k`.
#[inline]
pub fn philox4x32(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for _ in 0..10 {
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// The 64-bit Philox key of a dropout site at a step.
pub fn key(k: DropoutKey) -> [u32; 2] {
    let h = KeyedRng::new(0x4452_4f50, &[k.seed, k.step, k.site]).next_u64();
    [h as u32, (h >> 32) as u32]
}

/// Keep threshold: an element is kept when its 32-bit draw is ≥ this.
pub fn threshold(p: f32) -> u32 {
    ((p as f64) * 4294967296.0).min(u32::MAX as f64) as u32
}

/// The 32-bit draw of element `e`: lane e mod 4 of the block at counter e / 4.
#[inline]
pub fn draw(key: [u32; 2], e: u64) -> u32 {
    let blk = e >> 2;
    philox4x32([blk as u32, (blk >> 32) as u32, 0, 0], key)[(e & 3) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        // Known-answer vectors of Random123 (kat_vectors: philox4x32_10).
        assert_eq!(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }
}
