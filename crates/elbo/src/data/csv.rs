//! Reading numeric CSV files into a 2-D array.
//!
//! The file must be UTF-8 text (a leading byte-order mark is skipped). Lines end in `\r\n`,
//! `\n` or a lone `\r` (old Mac files). Fields are separated by commas (spaces and tabs around a
//! field are ignored); a file whose first non-empty line has no comma is read as
//! whitespace-separated columns instead. Empty lines are skipped and every data row must have
//! the same number of fields. A value is whatever Rust's `f32` parser accepts: decimal and
//! exponent forms (`1e5`, `+.5`, `-2.`), `inf`, `infinity` and `nan` in any case; it rejects
//! hexadecimal (`0x10`), suffixes (`2.5f`) and digit separators (`1_000`).
//!
//! The first non-empty row is a header according to [`CsvHeader`]: with `auto` (the default) it
//! is a header only when none of its fields is a number at all (neither a value nor
//! number-looking text such as `0x10`), so a numeric first row in an unusual notation is never
//! silently dropped; a first row mixing numbers and text is an error naming the line and field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Whether the first non-empty row of a CSV file is a header (`data.csv_header`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CsvHeader {
    /// A header exactly when none of its fields is a number at all.
    #[default]
    Auto,
    /// Always a header: the first row is skipped whatever it holds.
    Yes,
    /// Never a header: the first row is data and must be all numbers.
    No,
}

/// Read a numeric CSV file, detecting a header ([`CsvHeader::Auto`]): the values row-major as
/// f32 and the shape `[rows, columns]`.
pub fn read_csv(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    read_csv_with(path, CsvHeader::Auto)
}

/// [`read_csv`] with the header rule given.
pub fn read_csv_with(path: &Path, header: CsvHeader) -> Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_csv_bytes(&bytes, &path.display().to_string(), header)
}

/// Parse the bytes of a CSV file; an error names the line and byte offset of the first byte
/// that is not UTF-8. `name` labels error messages (usually the file path).
pub fn parse_csv_bytes(
    bytes: &[u8],
    name: &str,
    header: CsvHeader,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = lines(std::str::from_utf8(&bytes[..at]).unwrap_or("")).count();
        Error::data(
            name,
            format!(
                "line {line} (byte offset {at}): not UTF-8 text; save the file as UTF-8 \
                 (plain ASCII numbers are)"
            ),
        )
    })?;
    parse_csv_with(text, name, header)
}

/// Parse CSV text, detecting a header ([`CsvHeader::Auto`]); `name` labels error messages.
pub fn parse_csv(text: &str, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    parse_csv_with(text, name, CsvHeader::Auto)
}

/// The lines of `text` split at `\r\n`, `\n` and lone `\r`, without their endings.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

/// Whether `field` is a number at all: a value `f32` parses, or text that starts like one
/// (an optional sign, then a digit or a `.` and a digit), such as `0x10` or `2.5f`.
fn is_numberish(field: &str) -> bool {
    if field.parse::<f32>().is_ok() {
        return true;
    }
    let s = field.strip_prefix(['+', '-']).unwrap_or(field);
    let b = s.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_digit() => true,
        Some(b'.') => b.get(1).is_some_and(u8::is_ascii_digit),
        _ => false,
    }
}

/// Parse CSV text with the header rule given; `name` labels error messages.
pub fn parse_csv_with(text: &str, name: &str, header: CsvHeader) -> Result<(Vec<f32>, Vec<usize>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows_iter = lines(text)
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .peekable();
    let comma = match rows_iter.peek() {
        Some((_, first)) => first.contains(','),
        None => return Err(Error::data(name, "the file has no rows")),
    };
    let split = |line: &'_ str| -> Vec<String> {
        if comma {
            line.split(',').map(|f| f.trim().to_string()).collect()
        } else {
            line.split_whitespace().map(str::to_string).collect()
        }
    };

    let mut values = Vec::new();
    let mut width = None;
    let mut rows = 0usize;
    let mut first = true;
    for (lineno, line) in rows_iter {
        let fields = split(line);
        if std::mem::take(&mut first) {
            let numberish: Vec<bool> = fields.iter().map(|f| is_numberish(f)).collect();
            match header {
                CsvHeader::Yes => continue,
                CsvHeader::Auto if numberish.iter().all(|n| !n) => continue,
                CsvHeader::Auto => {
                    if let Some(col) = numberish.iter().position(|n| !n) {
                        return Err(Error::data(
                            name,
                            format!(
                                "line {lineno}, field {}: expected a number, found '{}' (the \
                                 first row mixes numbers and text, so it is neither a header \
                                 nor data; fix the row, or set data.csv_header = \"yes\" to \
                                 skip it)",
                                col + 1,
                                fields[col]
                            ),
                        ));
                    }
                }
                CsvHeader::No => {}
            }
        }
        match width {
            None => width = Some(fields.len()),
            Some(w) if w != fields.len() => {
                return Err(Error::data(
                    name,
                    format!(
                        "line {lineno}: expected {w} fields like the rows above, found {}",
                        fields.len()
                    ),
                ))
            }
            Some(_) => {}
        }
        for (col, field) in fields.iter().enumerate() {
            match field.parse::<f32>() {
                Ok(v) => values.push(v),
                Err(_) => {
                    let hint = if header == CsvHeader::No && rows == 0 {
                        " (data.csv_header = \"no\": the first row must be data)"
                    } else {
                        ""
                    };
                    return Err(Error::data(
                        name,
                        format!(
                            "line {lineno}, field {}: expected a number, found '{field}'{hint}",
                            col + 1
                        ),
                    ));
                }
            }
        }
        rows += 1;
    }
    match width {
        Some(w) if rows > 0 => Ok((values, vec![rows, w])),
        _ => Err(Error::data(name, "the file has a header but no data rows")),
    }
}
