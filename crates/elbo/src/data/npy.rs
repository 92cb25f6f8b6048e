//! Reading and writing NumPy `.npy` files (format versions 1.0, 2.0 and 3.0).
//!
//! Reading accepts arrays of `f4`, `f8`, `i1`/`i2`/`i4`/`i8`, `u1`/`u2`/`u4`/`u8` and `b1` in
//! either byte order (`<`, `>`, `|`) and either memory order (`fortran_order: True` arrays are
//! reordered to C order), converted to f32. Structured dtypes (a list of named fields) and other
//! element types are refused with a message naming the dtype. The data length implied by the
//! header is checked against the file length before anything is allocated, and every error
//! names the file and the byte offset of the problem. Writing produces version 1.0 `<f4` files with
//! the header laid out exactly as `numpy.save` does (padded so the data starts on a 64-byte
//! boundary).

use std::path::Path;

use crate::{Error, Result};

/// The 6-byte magic string every `.npy` file starts with.
const MAGIC: &[u8] = b"\x93NUMPY";
/// numpy aligns the start of the data to this many bytes.
const ALIGN: usize = 64;
/// numpy leaves room for the first axis to grow to this many digits.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// Read a `.npy` file: the values as f32 and the shape.
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_npy_bytes(&bytes, &path.display().to_string())
}

/// Parse the bytes of a `.npy` file; `name` labels error messages.
pub fn read_npy_bytes(bytes: &[u8], name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad = |m: String| Error::data(name, m);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(format!(
            "byte offset 0: not a .npy file (expected the magic bytes \\x93NUMPY and a 4-byte \
             version/length, found {} bytes starting {:02x?})",
            bytes.len(),
            &bytes[..bytes.len().min(6)]
        )));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad(format!(
                    "byte offset 8: truncated header (a version {major} file needs a 4-byte \
                     header length, the file ends at byte {})",
                    bytes.len()
                )));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        _ => {
            return Err(bad(format!(
                "byte offset 6: unsupported .npy format version {major}.{minor} (expected \
                 1.0, 2.0 or 3.0)"
            )))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "byte offset {start}: truncated header (its length field says {header_len} \
                 bytes, the file has {} after it)",
                bytes.len() - start
            ))
        })?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|e| {
        bad(format!(
            "byte offset {}: the header is not UTF-8 text",
            start + e.valid_up_to()
        ))
    })?;
    if major < 3 {
        if let Some(i) = header.bytes().position(|b| !b.is_ascii()) {
            return Err(bad(format!(
                "byte offset {}: the header of a version {major}.{minor} file must be ASCII",
                start + i
            )));
        }
    }
    let h = parse_header(header, start).map_err(|m| bad(format!("bad header: {m}")))?;
    let dtype = Dtype::parse(&h.descr).map_err(|m| bad(format!("byte offset {start}: {m}")))?;
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            bad(format!(
                "byte offset {start}: shape {:?} has more elements than memory can address",
                h.shape
            ))
        })?;
    let data = &bytes[end..];
    let expected = count.checked_mul(dtype.size).ok_or_else(|| {
        bad(format!(
            "byte offset {start}: shape {:?} of '{}' needs more bytes than memory can address",
            h.shape, h.descr
        ))
    })?;
    if data.len() < expected {
        return Err(bad(format!(
            "byte offset {end}: truncated data: shape {:?} of '{}' needs {expected} bytes, the \
             file has {}",
            h.shape,
            h.descr,
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(bad(format!(
            "byte offset {}: {} unexpected bytes after the data of shape {:?}",
            end + expected,
            data.len() - expected,
            h.shape
        )));
    }
    let values: Vec<f32> = data
        .chunks_exact(dtype.size)
        .map(|c| dtype.convert(c))
        .collect();
    let values = if h.fortran_order {
        fortran_to_c(&values, &h.shape)
    } else {
        values
    };
    Ok((values, h.shape))
}

/// Reorder `values` stored in Fortran (column-major) order of `shape` to C (row-major) order.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    if shape.len() < 2 || values.is_empty() {
        return values.to_vec();
    }
    // C-order strides
    let mut strides = vec![1usize; shape.len()];
    for k in (0..shape.len() - 1).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    let mut out = vec![0.0f32; values.len()];
    let mut idx = vec![0usize; shape.len()];
    for &v in values {
        let off: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
        out[off] = v;
        // advance the multi-index with the first axis fastest
        for (i, &d) in idx.iter_mut().zip(shape) {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    out
}

/// Write `data` with `shape` as a version 1.0 `<f4` `.npy` file (atomically: a crash leaves the
/// old file or the new one).
pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::Shape(format!(
            "write_npy {}: shape {shape:?} holds {count} values, data has {}",
            path.display(),
            data.len()
        )));
    }
    let shape_repr = match shape {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_repr}, }}");
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        header.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits)));
    }
    let hlen = header.len() + 1;
    let pad = ALIGN - (10 + hlen) % ALIGN;
    let total = u16::try_from(hlen + pad)
        .map_err(|_| Error::Shape(format!("write_npy: shape {shape:?} has too many axes")))?;
    let mut out = Vec::with_capacity(10 + hlen + pad + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    crate::atomic_file::write(path, &out)
}

/// The fields of a `.npy` header dictionary.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value in the header's Python dict literal.
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// Parse `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`; `base` is the byte
/// offset of `text` in the file, so that errors give file offsets.
fn parse_header(text: &str, base: usize) -> std::result::Result<Header, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        base,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        if key == "descr" && p.s.get(p.i) == Some(&b'[') {
            return Err(format!(
                "byte offset {}: the dtype is structured (a list of named fields), which is not \
                 supported; {SUPPORTED}. Save a plain numeric array instead, e.g. \
                 numpy.lib.recfunctions.structured_to_unstructured(arr)",
                p.at()
            ));
        }
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("descr", _) => {
                return Err(format!(
                    "'descr' must be a dtype string such as '<f4'; {SUPPORTED}"
                ))
            }
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            (k, _) => {
                return Err(format!(
                    "byte offset {}: unexpected key or value for '{k}' (expected 'descr': \
                     string, 'fortran_order': True/False, 'shape': tuple of integers)",
                    p.at()
                ))
            }
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    Ok(Header {
        descr: descr.ok_or_else(|| format!("byte offset {base}: missing 'descr'"))?,
        fortran_order: fortran
            .ok_or_else(|| format!("byte offset {base}: missing 'fortran_order'"))?,
        shape: shape.ok_or_else(|| format!("byte offset {base}: missing 'shape'"))?,
    })
}

/// A tiny cursor over the header text.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    /// File offset of `s[0]`.
    base: usize,
}

impl Parser<'_> {
    /// File offset of the cursor.
    fn at(&self) -> usize {
        self.base + self.i
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "byte offset {}: expected '{}'",
                self.at(),
                c as char
            ))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.s.get(self.i) {
            Some(&q) if q == b'\'' || q == b'"' => q,
            _ => {
                return Err(format!(
                    "byte offset {}: expected a quoted string",
                    self.at()
                ))
            }
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err(format!(
                "byte offset {}: unterminated string",
                self.base + start - 1
            ));
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }

    fn value(&mut self) -> std::result::Result<PyValue, String> {
        let rest = &self.s[self.i..];
        if rest.starts_with(b"True") {
            self.i += 4;
            return Ok(PyValue::Bool(true));
        }
        if rest.starts_with(b"False") {
            self.i += 5;
            return Ok(PyValue::Bool(false));
        }
        if self.eat(b'(') {
            let mut dims = Vec::new();
            loop {
                self.ws();
                if self.eat(b')') {
                    return Ok(PyValue::Tuple(dims));
                }
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                let d = digits.parse::<usize>().map_err(|_| {
                    format!(
                        "byte offset {}: expected a non-negative integer dimension in the \
                             shape",
                        self.base + start
                    )
                })?;
                dims.push(d);
                self.eat(b'L'); // Python 2 long suffix
                self.ws();
                if !self.eat(b',') {
                    self.ws();
                    self.expect(b')')?;
                    return Ok(PyValue::Tuple(dims));
                }
            }
        }
        if matches!(rest.first(), Some(b'\'') | Some(b'"')) {
            return self.string().map(PyValue::Str);
        }
        Err(format!(
            "byte offset {}: unsupported value (expected a string, True/False or a tuple)",
            self.at()
        ))
    }
}

/// Element kinds the reader converts.
#[derive(Clone, Copy)]
enum Kind {
    Float,
    Int,
    Uint,
    Bool,
}

/// The dtypes the reader converts, for error messages.
const SUPPORTED: &str = "supported dtypes: f4, f8, i1, i2, i4, i8, u1, u2, u4, u8, b1, \
                         little- or big-endian";

/// A supported element type.
struct Dtype {
    kind: Kind,
    size: usize,
    /// Stored big-endian (`>`): bytes are reversed before conversion.
    big: bool,
}

impl Dtype {
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        let unsupported = || format!("unsupported dtype '{descr}' ({SUPPORTED})");
        let mut chars = descr.chars();
        let order = chars.next().ok_or_else(unsupported)?;
        let rest = chars.as_str();
        let (kind, size) = match rest {
            "f4" => (Kind::Float, 4),
            "f8" => (Kind::Float, 8),
            "i1" => (Kind::Int, 1),
            "i2" => (Kind::Int, 2),
            "i4" => (Kind::Int, 4),
            "i8" => (Kind::Int, 8),
            "u1" => (Kind::Uint, 1),
            "u2" => (Kind::Uint, 2),
            "u4" => (Kind::Uint, 4),
            "u8" => (Kind::Uint, 8),
            "b1" => (Kind::Bool, 1),
            _ => return Err(unsupported()),
        };
        let big = match order {
            '<' | '|' => false,
            '>' => true,
            '=' => cfg!(target_endian = "big"),
            _ => return Err(unsupported()),
        };
        Ok(Dtype { kind, size, big })
    }

    /// Convert one element's bytes (`c.len() == self.size`, in the file's byte order) to f32.
    fn convert(&self, c: &[u8]) -> f32 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        if self.big {
            b[..c.len()].reverse();
        }
        match (self.kind, self.size) {
            (Kind::Float, 4) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            (Kind::Float, _) => f64::from_le_bytes(b) as f32,
            (Kind::Int, 1) => f32::from(c[0] as i8),
            (Kind::Int, 2) => f32::from(i16::from_le_bytes([b[0], b[1]])),
            (Kind::Int, 4) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            (Kind::Int, _) => i64::from_le_bytes(b) as f32,
            (Kind::Uint, _) => u64::from_le_bytes(b) as f32,
            (Kind::Bool, _) => {
                if c[0] != 0 {
                    1.0
                } else {
                    0.0
                }
            }
        }
    }
}
