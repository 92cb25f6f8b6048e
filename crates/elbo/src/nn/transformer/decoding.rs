//! Language-model extensions of [`Transformer`]: extra input embeddings, per-token positions,
//! and a KV cache for incremental decoding (causal, token by token) and for block-by-block
//! decoding (block diffusion: a noisy block against the cache of finished blocks, Arriola et
//! al. 2025, sec. 3.3).

use candle_core::{DType, Tensor};

use super::*;

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

    /// Replaces every block's keys and values by `layers`, which hold `added` more positions.
    fn push(&mut self, layers: Vec<(Tensor, Tensor)>, added: usize) {
        self.layers = layers.into_iter().map(Some).collect();
        self.len += added;
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
        // candle's index_select rejects ids >= vocab_in with an error.
        let tok = self.tok.as_tensor().index_select(&ids.flatten_all()?, 0)?; // [B T, D]
        let tok = tok.reshape((b, l, d))?; // [B, T, D]
        let x = match &self.pos {
            Some(pos) => tok.broadcast_add(&pos.as_tensor().narrow(0, start, l)?)?, // [B, T, D]
            None => tok,
        };
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
        self.forward_at(ids, extra, None)
    }

    /// The rotary tables with the tokens at `at` (default: positions `start..`), or `None`
    /// with learned positions (where `at` must be `None`).
    fn rope<'a>(&'a self, at: Option<RotaryAt<'a>>, start: usize) -> Result<Rope<'a>> {
        match (&self.rotary, at) {
            (Some(r), at) => Ok(Some((r, at.unwrap_or(RotaryAt::From(start))))),
            (None, None) => Ok(None),
            (None, Some(_)) => Err(Error::Config(
                "per-token rotary positions need a transformer with positions = \"rope\"".into(),
            )),
        }
    }

    /// Like [`Transformer::forward_with`], with the rotary positions of every query and key
    /// given (`at`; `None`: `0..L`). An any-order model rotates each query by the position it
    /// predicts and each key by its token's position. Rotary positions only.
    pub fn forward_at(
        &self,
        ids: &Tensor,
        extra: Option<&Tensor>,
        at: Option<RotaryAt>,
    ) -> Result<Tensor> {
        let mut x = self.embed_at(ids, 0, extra)?; // [B, L, D]
        let rope = self.rope(at, 0)?;
        for blk in &self.blocks {
            x = blk.forward(&x, self.cfg.mask, rope)?;
        }
        self.head.forward(&self.lnf.forward(&x)?) // [B, L, V_out]
    }

    /// Logits `[B, T, V_out]` of `ids: [B, T]` with token `i` at position `positions[i]` (the
    /// same for every row; learned or rotary) under `mask` instead of the configured one. Block
    /// diffusion's training pass (Arriola et al. 2025, sec. 3.2) runs `[x_t ; x_0]` with
    /// positions `0..L` twice and [`AttentionMask::BlockDiffusion`]. Differentiable.
    pub fn forward_masked(
        &self,
        ids: &Tensor,
        positions: &[u32],
        mask: AttentionMask,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if positions.len() != t {
            return Err(Error::Shape(format!(
                "transformer: {} positions for {t} tokens",
                positions.len()
            )));
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= self.cfg.max_len) {
            return Err(Error::Shape(format!(
                "transformer: position {p} exceeds max_len {}",
                self.cfg.max_len
            )));
        }
        mask.check(t, t).map_err(Error::Shape)?;
        if ids.dtype() != DType::U32 {
            return Err(Error::Shape(format!(
                "transformer: token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let d = self.cfg.d_model;
        let tok = self.tok.as_tensor().index_select(&ids.flatten_all()?, 0)?; // [B T, D]
        let mut x = tok.reshape((b, t, d))?; // [B, T, D]
        let rows: Vec<u32> = positions.repeat(b);
        if let Some(pos) = &self.pos {
            let at = Tensor::from_vec(positions.to_vec(), t, ids.device())?;
            x = x.broadcast_add(&pos.as_tensor().index_select(&at, 0)?)?; // [B, T, D]
        }
        let rope = self
            .rotary
            .as_ref()
            .map(|r| (r, RotaryAt::Rows { q: &rows, k: &rows }));
        for blk in &self.blocks {
            x = blk.forward(&x, mask, rope)?;
        }
        self.head.forward(&self.lnf.forward(&x)?) // [B, T, V_out]
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
        self.forward_cached_at(ids, extra, None, cache)
    }

    /// [`Transformer::forward_cached`] with the rotary positions of the new queries and keys
    /// given (`None`: `cache.len()..`), as [`Transformer::forward_at`].
    pub fn forward_cached_at(
        &self,
        ids: &Tensor,
        extra: Option<&Tensor>,
        at: Option<RotaryAt>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if self.cfg.mask != AttentionMask::Causal {
            return Err(Error::Config(
                "a KV cache for incremental decoding needs a causal transformer".into(),
            ));
        }
        let (logits, layers) = self.cached_step(ids, extra, at, cache, AttentionMask::Causal)?;
        cache.push(layers, ids.dim(1)?);
        Ok(logits)
    }

    /// Block decoding (Arriola et al. 2025, Alg. 2): logits `[B, T, V_out]` of one block
    /// `ids: [B, T]` at positions `cache.len()..cache.len() + T`, each token attending to every
    /// cached key and to every token of the block (bidirectionally); `cache` is left as it was
    /// (a noisy block being denoised). Equal to the `x_t` rows of the block under
    /// [`AttentionMask::BlockDiffusion`] in [`Transformer::forward_masked`].
    pub fn forward_block_cached(&self, ids: &Tensor, cache: &KvCache) -> Result<Tensor> {
        Ok(self
            .cached_step(ids, None, None, cache, AttentionMask::Full)?
            .0)
    }

    /// [`Transformer::forward_block_cached`] for a finished (clean) block, appending its keys
    /// and values to `cache`; its logits equal the `x_0` rows of the block under
    /// [`AttentionMask::BlockDiffusion`].
    pub fn commit_block(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (logits, layers) = self.cached_step(ids, None, None, cache, AttentionMask::Full)?;
        cache.push(layers, ids.dim(1)?);
        Ok(logits)
    }

    /// The logits of the new tokens `ids` after the cached ones, under `mask` over
    /// `[cache ; new]` (aligned bottom-right), and every block's keys and values of
    /// `[cache ; new]`.
    fn cached_step(
        &self,
        ids: &Tensor,
        extra: Option<&Tensor>,
        at: Option<RotaryAt>,
        cache: &KvCache,
        mask: AttentionMask,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Shape("KV cache made for another model".into()));
        }
        let start = cache.len;
        let mut x = self.embed_at(ids, start, extra)?; // [B, T, D]
        let (b, t, d) = x.dims3()?;
        let rope = self.rope(at, start)?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (blk, slot) in self.blocks.iter().zip(&cache.layers) {
            let (h, dh) = (blk.n_heads, d / blk.n_heads);
            let qkv = blk.qkv.forward(&blk.ln1.forward(&x)?)?; // [B, T, 3D]
            let qkv = match rope {
                Some((r, at)) => r.apply_qkv(&qkv, at)?, // [B, T, 3D]
                None => qkv,
            };
            let qkv = qkv
                .reshape((b, t, 3, h, dh))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?; // [3, B, H, T, dh]
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B, H, T, dh]
            let (k, v) = match slot.as_ref() {
                Some((kc, vc)) => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
                None => (k, v),
            }; // [B, H, T_total, dh]
            let y = attention(&q, &k, &v, mask)?; // [B, H, T, dh]
            let y = y.transpose(1, 2)?.reshape((b, t, d))?; // [B, T, D]
            x = (x + blk.proj.forward(&y)?)?;
            let m = blk.fc1.forward(&blk.ln2.forward(&x)?)?.gelu_erf()?; // [B, T, 4D]
            x = (x + blk.fc2.forward(&m)?)?;
            layers.push((k, v));
        }
        let logits = self.head.forward(&self.lnf.forward(&x)?)?; // [B, T, V_out]
        Ok((logits, layers))
    }
}
