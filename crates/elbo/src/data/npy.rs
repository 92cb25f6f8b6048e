//! Reading and writing NumPy `.npy` files (format versions 1.0, 2.0 and 3.0).
//!
//! Reading accepts little-endian, C-order arrays of `f4`, `f8`, `i1`/`i2`/`i4`/`i8`,
//! `u1`/`u2`/`u4`/`u8` and `b1`, converted to f32. Writing produces version 1.0 `<f4` files with
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
        return Err(bad("not a .npy file (bad magic bytes)".into()));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header".into()));
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        _ => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor}"
            )))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("truncated header".into()))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("header is not valid text".into()))?;
    if major < 3 && !header.is_ascii() {
        return Err(bad("header of a version 1/2 file must be ASCII".into()));
    }
    let h = parse_header(header).map_err(|m| bad(format!("bad header: {m}")))?;
    if h.fortran_order {
        return Err(bad(
            "Fortran-ordered arrays are not supported; save a C-ordered array \
             (numpy.ascontiguousarray)"
                .into(),
        ));
    }
    let dtype = Dtype::parse(&h.descr).map_err(bad)?;
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape is too large".into()))?;
    let data = &bytes[end..];
    let expected = count
        .checked_mul(dtype.size)
        .ok_or_else(|| bad("shape is too large".into()))?;
    if data.len() < expected {
        return Err(bad(format!(
            "truncated data: shape {:?} of '{}' needs {expected} bytes, file has {}",
            h.shape,
            h.descr,
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(bad(format!(
            "{} unexpected bytes after the data of shape {:?}",
            data.len() - expected,
            h.shape
        )));
    }
    let values = data
        .chunks_exact(dtype.size)
        .map(|c| dtype.convert(c))
        .collect();
    Ok((values, h.shape))
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

/// Parse `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
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
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", PyValue::Str(s)) => descr = Some(s),
            ("descr", _) => return Err("structured dtypes are not supported".into()),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(t)) => shape = Some(t),
            (k, _) => return Err(format!("unexpected key or value for '{k}'")),
        }
        p.ws();
        if !p.eat(b',') {
            p.ws();
            p.expect(b'}')?;
            break;
        }
    }
    Ok(Header {
        descr: descr.ok_or("missing 'descr'")?,
        fortran_order: fortran.ok_or("missing 'fortran_order'")?,
        shape: shape.ok_or("missing 'shape'")?,
    })
}

/// A tiny cursor over the header text.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
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
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.s.get(self.i) {
            Some(&q) if q == b'\'' || q == b'"' => q,
            _ => return Err(format!("expected a quoted string at byte {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i >= self.s.len() {
            return Err("unterminated string".into());
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
                let d = digits
                    .parse::<usize>()
                    .map_err(|_| format!("bad dimension in shape at byte {start}"))?;
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
        Err(format!("unsupported value at byte {}", self.i))
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

/// A supported element type.
struct Dtype {
    kind: Kind,
    size: usize,
}

impl Dtype {
    fn parse(descr: &str) -> std::result::Result<Dtype, String> {
        let unsupported = || {
            format!(
                "unsupported dtype '{descr}' (supported: little-endian f4, f8, i1, i2, i4, i8, \
                 u1, u2, u4, u8, b1)"
            )
        };
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
        match order {
            '<' | '|' => {}
            '>' if size == 1 => {}
            '>' => {
                return Err(format!(
                    "big-endian dtype '{descr}' is not supported; convert with \
                     arr.astype('<{rest}')"
                ))
            }
            _ => return Err(unsupported()),
        }
        Ok(Dtype { kind, size })
    }

    /// Convert one element's little-endian bytes (`c.len() == self.size`) to f32.
    fn convert(&self, c: &[u8]) -> f32 {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
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
