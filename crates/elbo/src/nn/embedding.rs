//! Sinusoidal time embeddings (Vaswani et al. 2017, sec. 3.5; as used by DDPM and flow matching).

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Sinusoidal features of a batch of times: `t: [B]` -> `[B, dim]` =
/// `[sin(t f_0..f_{h-1}), cos(t f_0..f_{h-1})]` with `f_i = max_period^(-i/h)`, `h = dim/2`.
/// This is the exact layout of the PyTorch reference workloads.
pub fn sinusoidal_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    let device: &Device = t.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(max_period.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?; // [1, h]
    let t = t.to_dtype(DType::F32)?.reshape(((), 1))?; // [B, 1]
    let a = t.broadcast_mul(&freqs)?; // [B, h]
    let emb = Tensor::cat(&[a.sin()?, a.cos()?], 1)?; // [B, 2h]
    if dim % 2 == 1 {
        let pad = Tensor::zeros((emb.dim(0)?, 1), DType::F32, device)?;
        return Ok(Tensor::cat(&[emb, pad], 1)?);
    }
    Ok(emb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_closed_form() {
        let t = Tensor::new(&[0.0f32, 0.5, 3.0], &Device::Cpu).unwrap();
        let e = sinusoidal_embedding(&t, 8, 10000.0).unwrap();
        let v = e.to_vec2::<f32>().unwrap();
        for (row, &tv) in v.iter().zip(&[0.0f64, 0.5, 3.0]) {
            for i in 0..4 {
                let f = 10000f64.powf(-(i as f64) / 4.0);
                assert!((row[i] as f64 - (tv * f).sin()).abs() < 1e-6);
                assert!((row[4 + i] as f64 - (tv * f).cos()).abs() < 1e-6);
            }
        }
    }
}
