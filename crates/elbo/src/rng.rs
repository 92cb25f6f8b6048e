//! Seeded, splittable random number generator whose state is checkpointed.
//!
//! candle's CPU RNG cannot be seeded, so every random draw in elbo comes from an [`Rng`] that the
//! caller passes in explicitly. The generator is ChaCha12 (rand_chacha); its full state (seed,
//! stream, word position) serialises to JSON, so a resumed run continues the exact same stream.

use candle_core::{Device, Tensor};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A seeded random generator. Cloning copies the state (both copies then draw the same numbers);
/// use [`Rng::split`] or [`Rng::fork`] for independent streams.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: ChaCha12Rng,
}

/// The serialisable state of an [`Rng`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RngState {
    /// The 32-byte ChaCha key, hex encoded.
    pub seed: String,
    /// The ChaCha stream id.
    pub stream: u64,
    /// Position in the stream, in 32-bit words (as a decimal string: JSON has no u128).
    pub word_pos: String,
}

impl Rng {
    /// A generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha12Rng::seed_from_u64(seed),
        }
    }

    /// An independent generator drawn from this one (advances `self`).
    pub fn split(&mut self) -> Rng {
        let mut seed = [0u8; 32];
        self.inner.fill_bytes(&mut seed);
        Rng {
            inner: ChaCha12Rng::from_seed(seed),
        }
    }

    /// A deterministic, named sub-stream that does not advance `self`: the same `(self, tag)`
    /// always gives the same generator. Used for e.g. fixed held-out sets.
    pub fn fork(&self, tag: u64) -> Rng {
        let mut inner = self.inner.clone();
        inner.set_stream(self.inner.get_stream() ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        inner.set_word_pos(0);
        Rng { inner }
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> RngState {
        let seed: String = self
            .inner
            .get_seed()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        RngState {
            seed,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    /// Restore a generator from a saved state.
    pub fn from_state(state: &RngState) -> Result<Self> {
        let bad = |m: &str| crate::Error::Config(format!("bad RNG state: {m}"));
        if state.seed.len() != 64 {
            return Err(bad("seed must be 64 hex digits"));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.seed[2 * i..2 * i + 2], 16)
                .map_err(|_| bad("seed is not hex"))?;
        }
        let word_pos: u128 = state
            .word_pos
            .parse()
            .map_err(|_| bad("word_pos is not an integer"))?;
        let mut inner = ChaCha12Rng::from_seed(seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(word_pos);
        Ok(Self { inner })
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// A standard normal draw.
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.inner)
    }

    /// A uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        self.inner.random_range(0..n)
    }

    /// `n` standard normal draws as f32.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f32 = StandardNormal.sample(&mut self.inner);
                z
            })
            .collect()
    }

    /// `n` uniform [0, 1) draws as f32.
    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.inner.random::<f32>()).collect()
    }

    /// A tensor of standard normal draws with the given shape.
    pub fn normal_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n), shape, device)?)
    }

    /// A tensor of uniform [0, 1) draws with the given shape.
    pub fn uniform_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.uniform_vec(n), shape, device)?)
    }

    /// A tensor of Rademacher (+1/-1) draws with the given shape.
    pub fn rademacher_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if self.inner.random::<bool>() {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// A random permutation of 0..n (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }

    /// Access to the underlying `rand` generator, for `rand_distr` distributions.
    pub fn raw(&mut self) -> &mut impl RngCore {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = Rng::new(7);
        for _ in 0..13 {
            a.normal();
        }
        let st = a.state();
        let json = serde_json::to_string(&st).unwrap();
        let mut b = Rng::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        for _ in 0..100 {
            assert_eq!(a.uniform().to_bits(), b.uniform().to_bits());
        }
    }

    #[test]
    fn split_and_fork_are_independent_and_deterministic() {
        let mut a = Rng::new(1);
        let mut s1 = a.split();
        let mut s2 = a.split();
        assert_ne!(s1.uniform(), s2.uniform());
        let f1 = Rng::new(3).fork(5).uniform();
        let f2 = Rng::new(3).fork(5).uniform();
        let f3 = Rng::new(3).fork(6).uniform();
        assert_eq!(f1, f2);
        assert_ne!(f1, f3);
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(0);
        let v = r.normal_vec(200_000);
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n;
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn bad_state_is_an_error() {
        let st = RngState {
            seed: "zz".into(),
            stream: 0,
            word_pos: "0".into(),
        };
        assert!(Rng::from_state(&st).is_err());
    }
}
