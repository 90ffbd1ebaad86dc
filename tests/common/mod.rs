//! Helpers shared by the test files.
#![allow(dead_code)]

use bertcuda::data::rng::KeyedRng;

/// `n` normal draws of standard deviation `std` from stream `stream` (seed `seed`), in f64.
pub fn randn_f64(stream: u64, seed: u64, n: usize, std: f64) -> Vec<f64> {
    let mut r = KeyedRng::new(stream, &[seed]);
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - r.uniform(), r.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std
        })
        .collect()
}

/// As `randn_f64` on stream 3, rounded to f32.
pub fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    randn_f64(3, seed, n, std as f64).into_iter().map(|x| x as f32).collect()
}
