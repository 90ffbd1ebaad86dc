//! A keyed random stream for the data pipeline. Every random choice the loader makes comes from a stream
//! keyed by what it is for — (seed, epoch, document) while building an epoch's index, (seed, epoch, sample)
//! while making a sample — so batches do not depend on thread counts, ranks or timing, and a cursor resumes
//! the exact stream. SplitMix64 over a key hashed with the same mixer.

#[derive(Debug, Clone)]
pub struct KeyedRng {
    state: u64,
}

/// Purposes, so streams made for different things from the same numbers never coincide.
pub mod stream {
    pub const SHUFFLE: u64 = 0x5348_5546;
    pub const DOCUMENT: u64 = 0x444f_4355;
    pub const SAMPLE: u64 = 0x5341_4d50;
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl KeyedRng {
    /// A stream keyed by a purpose and a tuple of numbers.
    pub fn new(purpose: u64, key: &[u64]) -> Self {
        let mut h = mix(purpose ^ 0x9e37_79b9_7f4a_7c15);
        for &k in key {
            h = mix(h ^ mix(k.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        }
        KeyedRng { state: h }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`.
    #[inline]
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Uniform integer in [0, n); n > 0. (Lemire's multiply; the bias is below 2^-32 for any n < 2^32.)
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform integer in [lo, hi] inclusive, as Python's `random.randint`.
    #[inline]
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_on_every_key_part_and_purpose() {
        let a = KeyedRng::new(stream::SAMPLE, &[1, 2, 3]).next_u64();
        assert_eq!(a, KeyedRng::new(stream::SAMPLE, &[1, 2, 3]).next_u64());
        assert_ne!(a, KeyedRng::new(stream::SAMPLE, &[1, 2, 4]).next_u64());
        assert_ne!(a, KeyedRng::new(stream::SAMPLE, &[2, 1, 3]).next_u64());
        assert_ne!(a, KeyedRng::new(stream::SHUFFLE, &[1, 2, 3]).next_u64());
    }

    #[test]
    fn uniform_draws_are_unbiased_within_bounds() {
        let mut r = KeyedRng::new(0, &[7]);
        let n = 200_000;
        let mut counts = [0u32; 7];
        let mut sum = 0.0;
        for _ in 0..n {
            counts[r.below(7) as usize] += 1;
            sum += r.uniform();
        }
        // 5 sigma bounds.
        let expect = n as f64 / 7.0;
        let sd = (n as f64 * (1.0 / 7.0) * (6.0 / 7.0)).sqrt();
        for c in counts {
            assert!((c as f64 - expect).abs() < 5.0 * sd, "{counts:?}");
        }
        let mean = sum / n as f64;
        assert!((mean - 0.5).abs() < 5.0 * (1.0 / 12.0f64 / n as f64).sqrt(), "{mean}");
    }
}
