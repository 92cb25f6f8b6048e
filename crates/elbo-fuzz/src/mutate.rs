//! Byte-level mutations in the style of AFL's havoc stage (Zalewski, "american fuzzy lop",
//! technical details): bit flips, byte insertion and deletion, truncation, splicing of two
//! inputs, repeated chunks, and replacing decimal numbers with boundary values (huge, negative,
//! NaN), which reaches the size and shape checks of headers.

use elbo::Rng;

/// Values written over a decimal number found in the input.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "255",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
    "1000000000000",
    "1e308",
    "-1e308",
    "1e-45",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-0",
    "0x10",
    "",
];

/// The largest input a mutation may produce (keeps every input cheap to run).
pub const MAX_LEN: usize = 1 << 16;

/// Apply 1 to 4 random mutations to `input`; `other` is a second input for splicing.
pub fn mutate(input: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        mutate_once(input, other, rng);
    }
    input.truncate(MAX_LEN);
}

fn mutate_once(input: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    let len = input.len();
    match rng.below(9) {
        // flip one bit
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        // overwrite a byte with a random or boundary value
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = match rng.below(4) {
                0 => 0,
                1 => 0xff,
                2 => 0x7f,
                _ => rng.below(256) as u8,
            };
        }
        // insert random bytes
        2 => {
            let at = rng.below(len + 1);
            let k = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..k).map(|_| rng.below(256) as u8).collect();
            input.splice(at..at, bytes);
        }
        // delete a range
        3 if len > 0 => {
            let at = rng.below(len);
            let k = 1 + rng.below((len - at).min(16));
            input.drain(at..at + k);
        }
        // truncate
        4 => {
            let at = rng.below(len + 1);
            input.truncate(at);
        }
        // splice: a prefix of this input, a suffix of the other
        5 if !other.is_empty() => {
            let a = rng.below(len + 1);
            let b = rng.below(other.len());
            input.truncate(a);
            input.extend_from_slice(&other[b..]);
        }
        // repeat a chunk
        6 if len > 0 => {
            let at = rng.below(len);
            let k = 1 + rng.below((len - at).min(64));
            let chunk = input[at..at + k].to_vec();
            let times = 1 + rng.below(16);
            for _ in 0..times {
                input.splice(at..at, chunk.iter().copied());
            }
        }
        // replace a decimal number with a boundary value
        7 => replace_number(input, rng),
        // overwrite a little-endian length-like field with a boundary value
        _ if len >= 4 => {
            let at = rng.below(len - 3);
            let v: u32 = match rng.below(4) {
                0 => u32::MAX,
                1 => 0,
                2 => 0x8000_0000,
                _ => rng.below(1 << 20) as u32,
            };
            input[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
}

/// Replace a run of ASCII digits (with a leading `-` if any) by a value of [`INTERESTING`].
fn replace_number(input: &mut Vec<u8>, rng: &mut Rng) {
    let runs: Vec<(usize, usize)> = {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < input.len() {
            if input[i].is_ascii_digit() {
                let start = if i > 0 && input[i - 1] == b'-' {
                    i - 1
                } else {
                    i
                };
                while i < input.len() && (input[i].is_ascii_digit() || input[i] == b'.') {
                    i += 1;
                }
                runs.push((start, i));
            } else {
                i += 1;
            }
        }
        runs
    };
    if runs.is_empty() {
        return;
    }
    let (a, b) = runs[rng.below(runs.len())];
    let v = INTERESTING[rng.below(INTERESTING.len())];
    input.splice(a..b, v.bytes());
}
