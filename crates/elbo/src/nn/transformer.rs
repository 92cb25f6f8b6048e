//! A pre-LN transformer over token sequences (Vaswani et al. 2017, "Attention Is All You Need";
//! layer norm before each sub-layer as in Xiong et al. 2020, "On Layer Normalization in the
//! Transformer Architecture").
//!
//! The architecture is exactly the `CharTransformer` of the PyTorch reference workloads: token
//! embedding plus learned absolute positions, `n_layers` blocks of
//! `x + proj(attn(LN(x)))` and `x + fc2(GELU(fc1(LN(x))))` with a 4x MLP and exact (erf) GELU,
//! a final layer norm and an untied linear head. Attention is causal (autoregressive models) or
//! bidirectional (masked diffusion). Initialisation follows PyTorch's defaults: linear layers
//! U(-1/sqrt(in), 1/sqrt(in)), embeddings N(0, 1), layer norms weight 1 and bias 0.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` record no gradient, so this module builds
//! both from differentiable primitives ([`softmax_last_dim`], [`layer_norm`]).

use candle_core::{DType, Device, Tensor, Var, D};

use super::ParamInit;
use crate::{Error, Result};

/// Shapes of a [`Transformer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Number of input token ids (including e.g. a mask token).
    pub vocab_in: usize,
    /// Number of output classes of the head.
    pub vocab_out: usize,
    /// Longest sequence (number of learned positions).
    pub max_len: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Causal (position i attends to j <= i) or bidirectional attention.
    pub causal: bool,
}

impl TransformerConfig {
    /// Check the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("transformer: {m}")));
        if self.vocab_in == 0 || self.vocab_out == 0 || self.max_len == 0 {
            return bad("vocab_in, vocab_out and max_len must be at least 1".into());
        }
        if self.d_model == 0 || self.n_heads == 0 || self.d_model % self.n_heads != 0 {
            return bad(format!(
                "d_model ({}) must be a positive multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        Ok(())
    }

    /// The number of parameters, from the formula: embeddings `(V_in + L) d`, per block two
    /// layer norms `4d`, qkv `3d^2 + 3d`, proj `d^2 + d`, MLP `8d^2 + 5d`; final norm `2d`;
    /// head `d V_out + V_out`.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d);
        (self.vocab_in + self.max_len) * d
            + self.n_layers * block
            + 2 * d
            + d * self.vocab_out
            + self.vocab_out
    }
}

/// Layer normalisation (Ba et al. 2016) over the last dimension, built from differentiable ops:
/// `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, as
/// `torch.nn.LayerNorm`. `x: [..., D]`, `weight`, `bias: [D]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?; // [..., 1]
    let xc = x.broadcast_sub(&mean)?; // [..., D]
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
    let inv = (var + eps)?.sqrt()?.recip()?; // [..., 1]
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// Softmax over the last dimension, `exp(x - max) / sum exp(x - max)`, differentiable (the
/// maximum is a detached constant: the result does not depend on it).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // [..., 1]
    let e = x.broadcast_sub(&max)?.exp()?; // [..., V]
    let s = e.sum_keepdim(D::Minus1)?; // [..., 1]
    Ok(e.broadcast_div(&s)?)
}

/// `log softmax` over the last dimension, differentiable (detached maximum).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // [..., 1]
    let z = x.broadcast_sub(&max)?; // [..., V]
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?; // [..., 1]
    Ok(z.broadcast_sub(&lse)?)
}

/// Per-row cross-entropy `-log softmax(logits)[target]`: `logits: [N, V]`, `targets: [N]`
/// (u32) -> `[N]`.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if targets.dims() != [n] {
        return Err(Error::Shape(format!(
            "cross-entropy: logits {:?} but targets {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    let logp = log_softmax_last_dim(logits)?; // [N, V]
    let picked = logp.gather(&targets.reshape((n, 1))?, 1)?; // [N, 1]
    Ok(picked.reshape(n)?.neg()?)
}

/// A layer norm with learned weight (init 1) and bias (init 0), eps 1e-5.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    /// Parameters `weight` and `bias` of width `d` under `p`.
    pub fn new(p: &mut ParamInit, d: usize) -> Result<Self> {
        Ok(Self {
            weight: p.constant("weight", &[d], 1.0)?,
            bias: p.constant("bias", &[d], 0.0)?,
            eps: 1e-5,
        })
    }

    /// `x: [..., d]` -> `[..., d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}

/// `y = x W^T + b` applied to `[B, L, in]` as one `[B L, in] x [in, out]` product.
#[derive(Clone, Debug)]
struct Dense {
    weight: Var,
    bias: Var,
}

impl Dense {
    fn new(p: &mut ParamInit, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[d_out, d_in], bound)?,
            bias: p.uniform("bias", &[d_out], bound)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let y = x
            .reshape((b * l, d))? // [B L, in]
            .matmul(&self.weight.as_tensor().t()?)? // [B L, out]
            .broadcast_add(self.bias.as_tensor())?;
        Ok(y.reshape((b, l, ()))?) // [B, L, out]
    }
}

/// One pre-LN block: `x + proj(MHA(LN1 x))`, then `x + fc2(GELU(fc1(LN2 x)))`.
#[derive(Clone, Debug)]
struct Block {
    ln1: LayerNorm,
    qkv: Dense,
    proj: Dense,
    ln2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    n_heads: usize,
}

impl Block {
    fn new(p: &mut ParamInit, d: usize, n_heads: usize) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(&mut p.push("ln1"), d)?,
            qkv: Dense::new(&mut p.push("qkv"), d, 3 * d)?,
            proj: Dense::new(&mut p.push("proj"), d, d)?,
            ln2: LayerNorm::new(&mut p.push("ln2"), d)?,
            fc1: Dense::new(&mut p.push("fc1"), d, 4 * d)?,
            fc2: Dense::new(&mut p.push("fc2"), 4 * d, d)?,
            n_heads,
        })
    }

    /// Scaled dot-product attention (Vaswani et al. 2017, eq. 1) over `n_heads` heads;
    /// `mask: [L, L]` is added to the scores (0 or -inf).
    fn attn(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let (h, dh) = (self.n_heads, d / self.n_heads);
        let qkv = self
            .qkv
            .forward(x)? // [B, L, 3D]
            .reshape((b, l, 3, h, dh))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?; // [3, B, H, L, dh]
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B, H, L, dh]
        let s = q.matmul(&k.t()?)?.affine(1.0 / (dh as f64).sqrt(), 0.0)?; // [B, H, L, L]
        let s = match mask {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        let y = softmax_last_dim(&s)?.matmul(&v)?; // [B, H, L, dh]
        let y = y.transpose(1, 2)?.reshape((b, l, d))?; // [B, L, D]
        self.proj.forward(&y)
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn(&self.ln1.forward(x)?, mask)?)?; // [B, L, D]
        let m = self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?; // [B, L, 4D]
        Ok((x + self.fc2.forward(&m)?)?)
    }
}

/// The pre-LN transformer of the module documentation. Parameter names follow PyTorch's
/// `CharTransformer`: `tok.weight`, `pos.weight`, `blocks.{i}.{ln1,qkv,proj,ln2,fc1,fc2}.*`,
/// `lnf.*`, `head.*`.
#[derive(Clone, Debug)]
pub struct Transformer {
    cfg: TransformerConfig,
    tok: Var,
    pos: Var,
    blocks: Vec<Block>,
    lnf: LayerNorm,
    head: Dense,
}

impl Transformer {
    /// Create the parameters under `p` (in PyTorch's order: embeddings, blocks, norm, head).
    pub fn new(p: &mut ParamInit, cfg: TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let tok = p.push("tok").normal("weight", &[cfg.vocab_in, d], 1.0)?;
        let pos = p.push("pos").normal("weight", &[cfg.max_len, d], 1.0)?;
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(&mut p.push(&format!("blocks.{i}")), d, cfg.n_heads))
            .collect::<Result<Vec<_>>>()?;
        let lnf = LayerNorm::new(&mut p.push("lnf"), d)?;
        let head = Dense::new(&mut p.push("head"), d, cfg.vocab_out)?;
        Ok(Self {
            cfg,
            tok,
            pos,
            blocks,
            lnf,
            head,
        })
    }

    /// The shapes.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// `[L, L]` additive causal mask: 0 on and below the diagonal, -inf above.
    fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..l * l)
            .map(|ij| {
                if ij % l > ij / l {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, (l, l), device)?)
    }

    /// Logits `[B, L, vocab_out]` for token ids `ids: [B, L]` (u32, each `< vocab_in`,
    /// `L <= max_len`).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if l > self.cfg.max_len {
            return Err(Error::Shape(format!(
                "transformer: sequence length {l} exceeds max_len {}",
                self.cfg.max_len
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(Error::Shape(format!(
                "transformer: token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let d = self.cfg.d_model;
        // candle's index_select rejects ids >= vocab_in with an error.
        let tok = self.tok.as_tensor().index_select(&ids.flatten_all()?, 0)?; // [B L, D]
        let pos = self.pos.as_tensor().narrow(0, 0, l)?; // [L, D]
        let mut x = tok.reshape((b, l, d))?.broadcast_add(&pos)?; // [B, L, D]
        let mask = if self.cfg.causal {
            Some(Self::causal_mask(l, ids.device())?)
        } else {
            None
        };
        for blk in &self.blocks {
            x = blk.forward(&x, mask.as_ref())?;
        }
        self.head.forward(&self.lnf.forward(&x)?) // [B, L, V_out]
    }
}

// ---------------------------------------------------------------------------------------------
// Language-model extensions (issue 5): extra input embeddings and a KV cache for causal
// incremental decoding. Kept in this separate block at the end of the file.
// ---------------------------------------------------------------------------------------------

/// Keys and values of every block for the positions decoded so far (causal models only).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Per block: keys and values `[B, H, T, dh]`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache.
    len: usize,
}

impl KvCache {
    /// Number of positions already decoded.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Transformer {
    /// Token plus learned position embeddings of `ids: [B, T]` placed at positions
    /// `start..start + T`, plus `extra: [B, T, D]` when given -> `[B, T, D]`.
    fn embed_at(&self, ids: &Tensor, start: usize, extra: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        if start + l > self.cfg.max_len {
            return Err(Error::Shape(format!(
                "transformer: positions up to {} exceed max_len {}",
                start + l,
                self.cfg.max_len
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(Error::Shape(format!(
                "transformer: token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let d = self.cfg.d_model;
        let tok = self.tok.as_tensor().index_select(&ids.flatten_all()?, 0)?; // [B T, D]
        let pos = self.pos.as_tensor().narrow(0, start, l)?; // [T, D]
        let x = tok.reshape((b, l, d))?.broadcast_add(&pos)?; // [B, T, D]
        match extra {
            None => Ok(x),
            Some(e) if e.dims() == [b, l, d] => Ok((x + e)?),
            Some(e) => Err(Error::Shape(format!(
                "transformer: extra embeddings {:?}, expected [{b}, {l}, {d}]",
                e.dims()
            ))),
        }
    }

    /// Like [`Transformer::forward`], with `extra: [B, L, D]` added to the input embeddings
    /// (e.g. the target-position embeddings of an any-order model). Differentiable.
    pub fn forward_with(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let mut x = self.embed_at(ids, 0, extra)?; // [B, L, D]
        let l = x.dim(1)?;
        let mask = if self.cfg.causal {
            Some(Self::causal_mask(l, ids.device())?)
        } else {
            None
        };
        for blk in &self.blocks {
            x = blk.forward(&x, mask.as_ref())?;
        }
        self.head.forward(&self.lnf.forward(&x)?) // [B, L, V_out]
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    /// Incremental causal decoding: logits `[B, T, V_out]` of the `T` new tokens `ids: [B, T]`
    /// at positions `cache.len()..cache.len() + T`, attending to everything in `cache` and
    /// causally within the new tokens; appends their keys and values to `cache`. Equal to the
    /// corresponding rows of [`Transformer::forward_with`] on the whole prefix.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        extra: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if !self.cfg.causal {
            return Err(Error::Config(
                "a KV cache needs a causal transformer".into(),
            ));
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Shape("KV cache made for another model".into()));
        }
        let start = cache.len;
        let mut x = self.embed_at(ids, start, extra)?; // [B, T, D]
        let (b, t, d) = x.dims3()?;
        let total = start + t;
        // query i (absolute start + i) sees keys j <= start + i
        let mask: Vec<f32> = (0..t * total)
            .map(|ij| {
                if ij % total > start + ij / total {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), ids.device())?; // [T, T_total]
        for (blk, slot) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let (h, dh) = (blk.n_heads, d / blk.n_heads);
            let qkv = blk
                .qkv
                .forward(&blk.ln1.forward(&x)?)? // [B, T, 3D]
                .reshape((b, t, 3, h, dh))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?; // [3, B, H, T, dh]
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B, H, T, dh]
            let (k, v) = match slot.take() {
                Some((kc, vc)) => (Tensor::cat(&[&kc, &k], 2)?, Tensor::cat(&[&vc, &v], 2)?),
                None => (k, v),
            }; // [B, H, T_total, dh]
            let s = q
                .matmul(&k.t()?.contiguous()?)?
                .affine(1.0 / (dh as f64).sqrt(), 0.0)?
                .broadcast_add(&mask)?; // [B, H, T, T_total]
            let y = softmax_last_dim(&s)?.matmul(&v)?; // [B, H, T, dh]
            let y = y.transpose(1, 2)?.reshape((b, t, d))?; // [B, T, D]
            x = (x + blk.proj.forward(&y)?)?;
            let m = blk.fc1.forward(&blk.ln2.forward(&x)?)?.gelu_erf()?; // [B, T, 4D]
            x = (x + blk.fc2.forward(&m)?)?;
            *slot = Some((k, v));
        }
        cache.len = total;
        self.head.forward(&self.lnf.forward(&x)?) // [B, T, V_out]
    }
}
