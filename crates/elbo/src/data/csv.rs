//! Reading numeric CSV files into a 2-D array.
//!
//! Fields are separated by commas (spaces and tabs around a field are ignored); a file whose
//! first non-empty line has no comma is read as whitespace-separated columns instead. The first
//! non-empty row is taken as a header and skipped when any of its fields is not a number. Empty
//! lines are skipped and every data row must have the same number of fields.

use std::path::Path;

use crate::{Error, Result};

/// Read a numeric CSV file: the values row-major as f32 and the shape `[rows, columns]`.
pub fn read_csv(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_csv(&text, &path.display().to_string())
}

/// Parse CSV text; `name` labels error messages (usually the file path).
pub fn parse_csv(text: &str, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .peekable();
    let comma = match lines.peek() {
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
    for (lineno, line) in lines {
        let fields = split(line);
        let parsed: Vec<std::result::Result<f32, &String>> = fields
            .iter()
            .map(|f| f.parse::<f32>().map_err(|_| f))
            .collect();
        if first && parsed.iter().any(|p| p.is_err()) {
            // A header row: skip it, but it still fixes nothing about the width.
            first = false;
            continue;
        }
        first = false;
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
        for (col, p) in parsed.into_iter().enumerate() {
            match p {
                Ok(v) => values.push(v),
                Err(field) => {
                    return Err(Error::data(
                        name,
                        format!(
                            "line {lineno}, field {}: '{field}' is not a number",
                            col + 1
                        ),
                    ))
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
