//! Language-model extensions of [`Transformer`]: extra input embeddings, per-token positions,
//! and a KV cache for incremental decoding (causal, token by token) and for block-by-block
//! decoding (block diffusion: a noisy block against the cache of finished blocks, Arriola et
//! al. 2025, sec. 3.3).

use candle_core::{DType, Tensor};

use super::*;

/// Keys and values of every block for the positions decoded so far (causal models only), in
/// buffers preallocated for the model's `max_len` positions on the first call and filled in
/// place: decoding `L` tokens one at a time copies each key once instead of re-concatenating
/// the whole cache at every step.
#[derive(Debug, Default)]
pub struct KvCache {
    /// Per block: key and value buffers `[B, H, cap, dh]`, allocated on first use.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache.
    len: usize,
    /// Rows allocated per head (the model's `max_len`).
    cap: usize,
    /// Per block: `qkv`, `proj`, `fc1`, `fc2` packed on first use (CPU `f32`), then the head.
    /// A cache belongs to one decoding run, during which the weights are frozen, so the
    /// weights are packed once per run instead of at every call (with a few rows per call,
    /// packing cost as much as the product).
    packs: Option<Vec<Option<fused::PackedLinear>>>,
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

    /// Block `i`'s buffers for `[B, H, *, dh]` keys, allocated on first use; an error when the
    /// cache was filled for another batch.
    fn buffers(
        &mut self,
        i: usize,
        like: &Tensor,
        (b, h, dh): (usize, usize, usize),
    ) -> Result<(Tensor, Tensor)> {
        let cap = self.cap;
        let slot = self
            .layers
            .get_mut(i)
            .ok_or_else(|| Error::Shape("KV cache made for another model".into()))?;
        if let Some((k, v)) = slot.as_ref() {
            if k.dims() != [b, h, cap, dh] || k.dtype() != like.dtype() {
                return Err(Error::Shape(format!(
                    "KV cache holds keys {:?} ({:?}), the new tokens need [{b}, {h}, {cap}, {dh}] \
                     ({:?}): use one cache per batch",
                    k.dims(),
                    k.dtype(),
                    like.dtype()
                )));
            }
            return Ok((k.clone(), v.clone()));
        }
        let zeros = || Tensor::zeros((b, h, cap, dh), like.dtype(), like.device());
        let (k, v) = (zeros()?, zeros()?);
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
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
            cap: self.cfg.max_len,
            packs: None,
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
        let logits = self.cached_step(ids, extra, at, cache, AttentionMask::Causal)?;
        cache.len += ids.dim(1)?;
        Ok(logits)
    }

    /// Block decoding (Arriola et al. 2025, Alg. 2): logits `[B, T, V_out]` of one block
    /// `ids: [B, T]` at positions `cache.len()..cache.len() + T`, each token attending to every
    /// cached key and to every token of the block (bidirectionally); `cache` is left as it was
    /// (a noisy block being denoised: its keys are written past the cached positions and
    /// overwritten by the next call). Equal to the `x_t` rows of the block under
    /// [`AttentionMask::BlockDiffusion`] in [`Transformer::forward_masked`].
    pub fn forward_block_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.cached_step(ids, None, None, cache, AttentionMask::Full)
    }

    /// [`Transformer::forward_block_cached`] for a finished (clean) block, appending its keys
    /// and values to `cache`; its logits equal the `x_0` rows of the block under
    /// [`AttentionMask::BlockDiffusion`].
    pub fn commit_block(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let logits = self.cached_step(ids, None, None, cache, AttentionMask::Full)?;
        cache.len += ids.dim(1)?;
        Ok(logits)
    }

    /// The logits of the new tokens `ids` after the cached ones, under `mask` over
    /// `[cache ; new]` (aligned bottom-right); the new tokens' keys and values are written into
    /// the cache buffers after the cached positions (the caller decides whether they count).
    fn cached_step(
        &self,
        ids: &Tensor,
        extra: Option<&Tensor>,
        at: Option<RotaryAt>,
        cache: &mut KvCache,
        mask: AttentionMask,
    ) -> Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            return Err(Error::Shape("KV cache made for another model".into()));
        }
        let start = cache.len;
        let x = self.embed_at(ids, start, extra)?; // [B, T, D]
        let t = x.dim(1)?;
        if start + t > cache.cap {
            return Err(Error::Shape(format!(
                "KV cache: positions up to {} exceed its {} (the model's max_len)",
                start + t,
                cache.cap
            )));
        }
        let rope = self.rope(at, start)?;
        if cache.packs.is_none() {
            let mut packs = Vec::with_capacity(4 * self.blocks.len() + 1);
            for blk in &self.blocks {
                for dense in [&blk.qkv, &blk.proj, &blk.fc1, &blk.fc2] {
                    packs.push(dense.pack()?);
                }
            }
            packs.push(self.head.pack()?);
            cache.packs = Some(packs);
        }
        let packs = cache.packs.take().unwrap_or_default();
        let out = self.cached_blocks(x, &packs, rope, cache, mask);
        cache.packs = Some(packs);
        out
    }

    /// The blocks and the head of [`Transformer::cached_step`] for embedded new tokens `x`,
    /// with the cache's packed weights `packs`.
    fn cached_blocks(
        &self,
        mut x: Tensor,
        packs: &[Option<fused::PackedLinear>],
        rope: Rope<'_>,
        cache: &mut KvCache,
        mask: AttentionMask,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let start = cache.len;
        let pk = |i: usize| packs.get(i).and_then(|p| p.as_ref());
        for (i, blk) in self.blocks.iter().enumerate() {
            let (h, dh) = (blk.n_heads, d / blk.n_heads);
            let qkv =
                blk.qkv
                    .forward_with(&blk.ln1.forward(&x)?, pk(4 * i), fused::RowAct::Identity)?; // [B, T, 3D]
            let qkv = match rope {
                Some((r, at)) => r.apply_qkv(&qkv, at)?, // [B, T, 3D]
                None => qkv,
            };
            let qkv = qkv
                .reshape((b, t, 3, h, dh))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?; // [3, B, H, T, dh]
            let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B, H, T, dh]
            let (kb, vb) = cache.buffers(i, &k, (b, h, dh))?; // [B, H, cap, dh]
            kb.slice_set(&k.contiguous()?, 2, start)?;
            vb.slice_set(&v.contiguous()?, 2, start)?;
            let y = attention_cached(&q, &kb, &vb, start + t, mask)?; // [B, H, T, dh]
            let y = y.transpose(1, 2)?.reshape((b, t, d))?; // [B, T, D]
            x = (x + blk
                .proj
                .forward_with(&y, pk(4 * i + 1), fused::RowAct::Identity)?)?;
            let ln2 = blk.ln2.forward(&x)?;
            let m = blk
                .fc1
                .forward_with(&ln2, pk(4 * i + 2), fused::RowAct::GeluErf)?; // [B, T, 4D]
            x = (x + blk
                .fc2
                .forward_with(&m, pk(4 * i + 3), fused::RowAct::Identity)?)?;
        }
        let head = pk(4 * self.blocks.len());
        self.head
            .forward_with(&self.lnf.forward(&x)?, head, fused::RowAct::Identity)
        // [B, T, V_out]
    }
}
