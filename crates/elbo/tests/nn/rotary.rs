//! Rotary position embeddings: the closed-form rotation, the relative-offset property that is
//! their reason to exist, orthogonality of the map (and hence of its gradient), and the packed
//! `[B, T, 3D]` form leaving the values alone.

use candle_core::{Device, Tensor, Var};
use elbo::nn::rotary::{Rotary, RotaryAt, ROPE_BASE};
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The rotation of one head vector `x` at position `m`, pair `(i, i + dh/2)` by `m θ_i`, in f64.
fn naive(x: &[f64], m: usize) -> Vec<f64> {
    let dh = x.len();
    let half = dh / 2;
    let mut y = vec![0.0; dh];
    for i in 0..half {
        let a = m as f64 * ROPE_BASE.powf(-2.0 * i as f64 / dh as f64);
        let (c, s) = (a.cos(), a.sin());
        y[i] = x[i] * c - x[i + half] * s;
        y[i + half] = x[i + half] * c + x[i] * s;
    }
    y
}

#[test]
fn heads_match_the_closed_form_rotation() {
    let (b, h, t, dh) = (2, 3, 9, 8);
    let rope = Rotary::new(40, h * dh, h, &CPU).unwrap();
    let mut rng = Rng::new(1);
    let x = rng.normal_tensor(&[b, h, t, dh], &CPU).unwrap();
    for start in [0usize, 5, 31] {
        let y = vals(&rope.apply_heads(&x, start).unwrap());
        let xv = vals(&x);
        let mut worst = 0.0f64;
        for row in 0..b * h * t {
            let pos = start + row % t;
            let want = naive(&xv[row * dh..(row + 1) * dh], pos);
            for (a, w) in y[row * dh..(row + 1) * dh].iter().zip(&want) {
                worst = worst.max((a - w).abs());
            }
        }
        assert!(worst < 2e-5, "start {start}: off by {worst}");
    }
    // positions past the table are an error, not a panic
    assert!(rope.apply_heads(&x, 35).is_err());
}

#[test]
fn scores_depend_only_on_the_offset() {
    let (h, dh) = (2, 16);
    let rope = Rotary::new(64, h * dh, h, &CPU).unwrap();
    let mut rng = Rng::new(2);
    let q = rng.normal_tensor(&[1, h, 1, dh], &CPU).unwrap();
    let k = rng.normal_tensor(&[1, h, 1, dh], &CPU).unwrap();
    let score = |m: usize, n: usize| -> Vec<f64> {
        let qm = vals(&rope.apply_heads(&q, m).unwrap());
        let kn = vals(&rope.apply_heads(&k, n).unwrap());
        (0..h)
            .map(|j| (0..dh).map(|i| qm[j * dh + i] * kn[j * dh + i]).sum())
            .collect()
    };
    let mut differs = false;
    for (m, n) in [(0usize, 0usize), (3, 7), (10, 2), (0, 20)] {
        let base = score(m, n);
        for shift in [1usize, 13, 40] {
            let moved = score(m + shift, n + shift);
            for (a, b) in base.iter().zip(&moved) {
                assert!((a - b).abs() < 1e-4, "({m},{n})+{shift}: {a} vs {b}");
            }
        }
        differs |= base
            .iter()
            .zip(score(m, n + 1))
            .any(|(a, b)| (a - b).abs() > 1e-3);
    }
    assert!(differs, "scores must change with the offset");
}

#[test]
fn rotation_is_orthogonal_and_so_is_its_gradient() {
    let (b, t, h, dh) = (2, 5, 2, 6);
    let rope = Rotary::new(8, h * dh, h, &CPU).unwrap();
    let mut rng = Rng::new(3);
    let x = Var::from_tensor(&rng.normal_tensor(&[b, h, t, dh], &CPU).unwrap()).unwrap();
    let w = rng.normal_tensor(&[b, h, t, dh], &CPU).unwrap();
    let y = rope.apply_heads(x.as_tensor(), 2).unwrap();
    // norms per head vector are preserved
    let (xv, yv) = (vals(x.as_tensor()), vals(&y));
    for row in 0..b * h * t {
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        let (nx, ny) = (n(&xv[row * dh..][..dh]), n(&yv[row * dh..][..dh]));
        assert!(
            (nx - ny).abs() < 1e-4 * nx.max(1.0),
            "row {row}: {nx} vs {ny}"
        );
    }
    // d<w, R x>/dx = R^T w: same norm as w per row, and <R^T w, x> = <w, R x>
    let loss = (y.clone() * &w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    let gx = vals(g.get(x.as_tensor()).unwrap());
    let wv = vals(&w);
    for row in 0..b * h * t {
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        let (ng, nw) = (n(&gx[row * dh..][..dh]), n(&wv[row * dh..][..dh]));
        assert!(
            (ng - nw).abs() < 1e-4 * nw.max(1.0),
            "row {row}: {ng} vs {nw}"
        );
    }
    let lhs: f64 = gx.iter().zip(&xv).map(|(a, b)| a * b).sum();
    let rhs = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (lhs - rhs).abs() < 1e-3 * rhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}

#[test]
fn packed_qkv_rotates_queries_and_keys_only() {
    let (b, t, h, dh) = (2, 7, 3, 4);
    let d = h * dh;
    let rope = Rotary::new(16, d, h, &CPU).unwrap();
    let mut rng = Rng::new(4);
    let qkv = rng.normal_tensor(&[b, t, 3 * d], &CPU).unwrap();
    let start = 4;
    let out = rope.apply_qkv(&qkv, RotaryAt::From(start)).unwrap();
    assert_eq!(out.dims(), &[b, t, 3 * d]);
    let (x, y) = (vals(&qkv), vals(&out));
    for bi in 0..b {
        for ti in 0..t {
            let row = (bi * t + ti) * 3 * d;
            for part in 0..3 {
                for hi in 0..h {
                    let off = row + part * d + hi * dh;
                    let want = if part == 2 {
                        x[off..off + dh].to_vec()
                    } else {
                        naive(&x[off..off + dh], start + ti)
                    };
                    for (a, w) in y[off..off + dh].iter().zip(&want) {
                        assert!((a - w).abs() < 2e-5, "b{bi} t{ti} part{part} h{hi}");
                    }
                }
            }
        }
    }
    // wrong widths are errors
    assert!(rope
        .apply_qkv(
            &Tensor::zeros((1, 2, 3 * d + 3), candle_core::DType::F32, &CPU).unwrap(),
            RotaryAt::From(0)
        )
        .is_err());
    assert!(Rotary::new(8, 6, 2, &CPU).is_err(), "odd head width");
    let (q, k) = (vec![0u32; b * t], vec![16u32; b * t]);
    let rows = RotaryAt::Rows { q: &q, k: &k };
    assert!(
        rope.apply_qkv(&qkv, rows).is_err(),
        "a key position past the table"
    );
    let rows = RotaryAt::Rows { q: &q[1..], k: &k };
    assert!(rope.apply_qkv(&qkv, rows).is_err(), "too few positions");
}

#[test]
fn fused_packed_op_matches_the_composition_in_values_and_gradients() {
    // small (serial) and large (parallel, >= 2^15 elements) inputs, odd shapes, offsets, and
    // per-token query / key positions
    let cases = [(1, 1, 1, 2, 0), (3, 7, 3, 4, 5), (4, 45, 2, 30, 3)];
    for ((b, t, h, dh, start), rows) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
        let d = h * dh;
        let rope = Rotary::new(64, d, h, &CPU).unwrap();
        let mut rng = Rng::new(5 + t as u64);
        let x = Var::from_tensor(&rng.normal_tensor(&[b, t, 3 * d], &CPU).unwrap()).unwrap();
        let w = rng.normal_tensor(&[b, t, 3 * d], &CPU).unwrap();
        let q: Vec<u32> = (0..b * t).map(|_| rng.below(64) as u32).collect();
        let k: Vec<u32> = (0..b * t).map(|_| rng.below(64) as u32).collect();
        let at = if rows {
            RotaryAt::Rows { q: &q, k: &k }
        } else {
            RotaryAt::From(start)
        };
        let fused = rope.apply_qkv(x.as_tensor(), at).unwrap();
        let composed = rope.apply_qkv_composed(x.as_tensor(), at).unwrap();
        let diff = |a: &Tensor, c: &Tensor| {
            vals(a)
                .iter()
                .zip(vals(c))
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
        };
        assert!(diff(&fused, &composed) < 1e-5, "values, t {t} rows {rows}");
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gf, gc) = (
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
        );
        assert!(diff(gf, gc) < 1e-5, "gradients, t {t} rows {rows}");
    }
}
