//! Layer-level tests: group norm (composition and fused op) against a direct computation,
//! candle autograd and finite differences; the convolution against a direct f64 convolution,
//! candle's `conv2d` and finite differences; im2col / col2im adjointness; exact upsampling.

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use elbo::nn::conv::{Conv2d, Window};
use elbo::nn::group_norm::{group_norm, group_norm_nhwc};
use elbo::nn::unet::upsample_nearest2;
use elbo::nn::ParamInit;
use elbo::Rng;

use super::{randn, vals, CPU};

/// Group norm of `x: [B, C, S]` computed with plain loops in f64.
fn group_norm_direct(
    x: &[f64],
    b: usize,
    c: usize,
    s: usize,
    g: usize,
    w: &[f64],
    bias: &[f64],
) -> Vec<f64> {
    let cg = c / g;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for gi in 0..g {
            let idx: Vec<usize> = (0..cg)
                .flat_map(|k| (0..s).map(move |j| (bi * c + gi * cg + k) * s + j))
                .collect();
            let n = idx.len() as f64;
            let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / n;
            let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / n;
            for &i in &idx {
                let ch = (i / s) % c;
                out[i] = (x[i] - mean) / (var + 1e-5).sqrt() * w[ch] + bias[ch];
            }
        }
    }
    out
}

#[test]
fn group_norm_matches_direct_computation_and_finite_differences() {
    let mut rng = Rng::new(7);
    let (b, c, h, w, g) = (2, 6, 3, 4, 3);
    let x = randn(&mut rng, &[b, c, h, w]).affine(2.0, 0.5).unwrap();
    let wt = (randn(&mut rng, &[c]) + 1.0).unwrap();
    let bt = randn(&mut rng, &[c]);
    let y = group_norm(&x, g, &wt, &bt, 1e-5).unwrap();
    let direct = group_norm_direct(&vals(&x), b, c, h * w, g, &vals(&wt), &vals(&bt));
    for (a, d) in vals(&y).iter().zip(&direct) {
        assert!((a - d).abs() < 1e-5, "{a} vs {d}");
    }
    // candle-nn's group norm (a composition as well) agrees
    let reference = candle_nn::GroupNorm::new(wt.clone(), bt.clone(), c, g, 1e-5).unwrap();
    let yr = candle_core::Module::forward(&reference, &x).unwrap();
    let dmax = vals(&(&y - &yr).unwrap().abs().unwrap().max_all().unwrap())[0];
    assert!(dmax < 1e-5);

    // gradients of L = sum(y * r) against central differences in f64
    let xv = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let wv = Var::from_tensor(&wt.to_dtype(DType::F64).unwrap()).unwrap();
    let bv = Var::from_tensor(&bt.to_dtype(DType::F64).unwrap()).unwrap();
    let r = randn(&mut rng, &[b, c, h, w]).to_dtype(DType::F64).unwrap();
    let loss = |x: &Tensor, wt: &Tensor, bt: &Tensor| -> f64 {
        let y = group_norm(x, g, wt, bt, 1e-5).unwrap();
        (y * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let l = group_norm(xv.as_tensor(), g, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
    let grads = (l * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-6;
    for (k, var) in [&xv, &wv, &bv].into_iter().enumerate() {
        let gan = vals(grads.get(var.as_tensor()).unwrap());
        let base = vals(var.as_tensor());
        let shape = var.as_tensor().dims().to_vec();
        for i in (0..base.len()).step_by(5) {
            let mut num = 0.0;
            for sgn in [1.0, -1.0] {
                let mut v = base.clone();
                v[i] += sgn * eps;
                let pert = Tensor::from_vec(v, shape.as_slice(), &CPU).unwrap();
                let args: [Tensor; 3] = match k {
                    0 => [pert, wv.as_tensor().clone(), bv.as_tensor().clone()],
                    1 => [xv.as_tensor().clone(), pert, bv.as_tensor().clone()],
                    _ => [xv.as_tensor().clone(), wv.as_tensor().clone(), pert],
                };
                num += sgn * loss(&args[0], &args[1], &args[2]);
            }
            num /= 2.0 * eps;
            assert!(
                (num - gan[i]).abs() < 1e-5 * (1.0 + num.abs()),
                "arg {k} index {i}: analytic {} vs numeric {num}",
                gan[i]
            );
        }
    }
}

#[test]
fn fused_group_norm_matches_composition_and_finite_differences() {
    let mut rng = Rng::new(17);
    let (b, h, w, c, g) = (3, 2, 5, 8, 4);
    let x = randn(&mut rng, &[b, h, w, c]).affine(1.5, -0.3).unwrap();
    let wt = (randn(&mut rng, &[c]) + 1.0).unwrap();
    let bt = randn(&mut rng, &[c]);
    let r = randn(&mut rng, &[b, h, w, c]);
    for silu in [false, true] {
        // reference: the channels-first composition on the permuted input
        let reference = group_norm(&x.permute((0, 3, 1, 2)).unwrap(), g, &wt, &bt, 1e-5)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let reference = if silu {
            reference.silu().unwrap()
        } else {
            reference
        };
        let y = group_norm_nhwc(&x, g, &wt, &bt, 1e-5, silu).unwrap();
        let dmax = vals(&(&y - &reference).unwrap().abs().unwrap().max_all().unwrap())[0];
        assert!(dmax < 1e-5, "silu {silu}: {dmax}");
        // gradients of sum(y r) against the composition's (autograd through candle ops)
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&wt).unwrap(),
            Var::from_tensor(&bt).unwrap(),
        );
        let fused = group_norm_nhwc(
            xv.as_tensor(),
            g,
            wv.as_tensor(),
            bv.as_tensor(),
            1e-5,
            silu,
        )
        .unwrap();
        let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let comp = group_norm(
            &xv.as_tensor().permute((0, 3, 1, 2)).unwrap(),
            g,
            wv.as_tensor(),
            bv.as_tensor(),
            1e-5,
        )
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
        let comp = if silu { comp.silu().unwrap() } else { comp };
        let gc = (comp * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&xv, &wv, &bv] {
            let a = vals(gf.get(v.as_tensor()).unwrap());
            let e = vals(gc.get(v.as_tensor()).unwrap());
            for (p, q) in a.iter().zip(&e) {
                assert!(
                    (p - q).abs() < 2e-4 * (1.0 + q.abs()),
                    "silu {silu}: {p} vs {q}"
                );
            }
        }
        // and a few central differences of the fused forward (f32, so a loose tolerance)
        let xs = vals(&x);
        let ga = vals(gf.get(xv.as_tensor()).unwrap());
        let eps = 1e-2;
        for i in (0..xs.len()).step_by(37) {
            let f = |d: f64| {
                let mut v = xs.clone();
                v[i] += d;
                let xp = Tensor::from_vec(v, (b, h, w, c), &CPU)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let y = group_norm_nhwc(&xp, g, &wt, &bt, 1e-5, silu).unwrap();
                vals(&(y * &r).unwrap().sum_all().unwrap())[0]
            };
            let num = (f(eps) - f(-eps)) / (2.0 * eps);
            assert!(
                (num - ga[i]).abs() < 2e-2 * (1.0 + num.abs()),
                "silu {silu} x[{i}]: {} vs {num}",
                ga[i]
            );
        }
    }
}

#[test]
fn conv_backward_matches_finite_differences() {
    let mut rng = Rng::new(8);
    // (c_in, c_out, k, stride, padding, h, w): 3x3 same, 3x3 stride 2 on an odd size, 1x1
    for (ci, co, k, s, pad, h, w) in [
        (3, 4, 3, 1, 1, 5, 6),
        (2, 3, 3, 2, 1, 7, 6),
        (3, 2, 1, 1, 0, 4, 3),
    ] {
        let vm = VarMap::new();
        let mut prng = Rng::new(9);
        let win = Window {
            k,
            stride: s,
            padding: pad,
        };
        let conv = Conv2d::new(&mut ParamInit::new(&vm, &mut prng, &CPU), ci, co, win).unwrap();
        let x = Var::from_tensor(&randn(&mut rng, &[2, ci, h, w])).unwrap();
        let y = conv.forward(x.as_tensor()).unwrap();
        let (ho, wo) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
        assert_eq!(y.dims(), [2, co, ho, wo]);
        let r = randn(&mut rng, &[2, co, ho, wo]);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        // the loss is linear in x and in W: differences in f64 of an f32 forward are exact
        // up to rounding, so compare with a direct f64 convolution instead
        let wts = vals(&conv.weight_oihw().unwrap());
        let xs = vals(x.as_tensor());
        let rs = vals(&r);
        let direct = |xs: &[f64], wts: &[f64]| -> f64 {
            let mut l = 0.0;
            for bi in 0..2 {
                for o in 0..co {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let mut acc = 0.0;
                            for i in 0..ci {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (oy * s + ky) as isize - pad as isize;
                                        let ix = (ox * s + kx) as isize - pad as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        acc += wts[((o * ci + i) * k + ky) * k + kx]
                                            * xs[((bi * ci + i) * h + iy as usize) * w
                                                + ix as usize];
                                    }
                                }
                            }
                            l += acc * rs[((bi * co + o) * ho + oy) * wo + ox];
                        }
                    }
                }
            }
            l
        };
        let eps = 1e-3;
        for (what, base, g) in [
            ("x", &xs, vals(grads.get(x.as_tensor()).unwrap())),
            (
                "w",
                &wts,
                vals(
                    &grads
                        .get(conv.weight())
                        .unwrap()
                        .reshape((co, k, k, ci))
                        .unwrap()
                        .permute((0, 3, 1, 2))
                        .unwrap(),
                ),
            ),
        ] {
            for i in 0..base.len() {
                let (mut p, mut m) = (base.clone(), base.clone());
                p[i] += eps;
                m[i] -= eps;
                let num = if what == "x" {
                    (direct(&p, &wts) - direct(&m, &wts)) / (2.0 * eps)
                } else {
                    (direct(&xs, &p) - direct(&xs, &m)) / (2.0 * eps)
                };
                assert!(
                    (num - g[i]).abs() < 1e-4 * (1.0 + num.abs()),
                    "conv {ci}->{co} k{k} s{s}: d{what}[{i}] analytic {} vs numeric {num}",
                    g[i]
                );
            }
        }
        // candle's conv2d gives the same output
        let yc = x
            .as_tensor()
            .conv2d(&conv.weight_oihw().unwrap(), pad, s, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias().reshape((1, co, 1, 1)).unwrap())
            .unwrap();
        let dmax = vals(&(&y - &yc).unwrap().abs().unwrap().max_all().unwrap())[0];
        assert!(dmax < 1e-5, "conv vs candle conv2d: {dmax}");
        // the forward pass agrees with the direct convolution too
        let l = vals(&(&y * &r).unwrap().sum_all().unwrap())[0];
        let d = direct(&xs, &wts)
            + vals(&r.sum((0, 2, 3)).unwrap())
                .iter()
                .zip(vals(conv.bias()))
                .map(|(a, b)| a * b)
                .sum::<f64>();
        assert!((l - d).abs() < 1e-4 * (1.0 + d.abs()), "{l} vs {d}");
    }
}

#[test]
fn upsample_is_exact_nearest_neighbour() {
    let x = Tensor::arange(0f32, 24.0, &CPU)
        .unwrap()
        .reshape((1, 2, 3, 4))
        .unwrap();
    let y = upsample_nearest2(&x).unwrap();
    assert_eq!(y.dims(), [1, 2, 6, 8]);
    let (xv, yv) = (vals(&x), vals(&y));
    for c in 0..2 {
        for i in 0..6 {
            for j in 0..8 {
                assert_eq!(yv[(c * 6 + i) * 8 + j], xv[(c * 3 + i / 2) * 4 + j / 2]);
            }
        }
    }
    // its gradient sums each 2x2 block
    let xv2 = Var::from_tensor(&x).unwrap();
    let r = Tensor::arange(0f32, 96.0, &CPU)
        .unwrap()
        .reshape((1, 2, 6, 8))
        .unwrap();
    let g = (upsample_nearest2(xv2.as_tensor()).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gv = vals(g.get(xv2.as_tensor()).unwrap());
    let rv = vals(&r);
    for c in 0..2 {
        for i in 0..3 {
            for j in 0..4 {
                let want: f64 = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(a, b)| rv[(c * 6 + 2 * i + a) * 8 + 2 * j + b])
                    .sum();
                assert_eq!(gv[(c * 3 + i) * 4 + j], want);
            }
        }
    }
}

/// `<im2col(x), c> = <x, col2im(c)>`: the backward of the gather is its exact adjoint.
#[test]
fn col2im_is_the_adjoint_of_im2col() {
    use elbo::nn::conv::{Col2Im, Im2Col};
    let mut rng = Rng::new(50);
    for win in [
        Window {
            k: 3,
            stride: 1,
            padding: 1,
        },
        Window {
            k: 3,
            stride: 2,
            padding: 1,
        },
        Window {
            k: 2,
            stride: 2,
            padding: 0,
        },
    ] {
        let (b, h, w, c) = (2, 7, 6, 3);
        let x = randn(&mut rng, &[b, h, w, c]);
        let cols = x.apply_op1_no_bwd(&Im2Col { win }).unwrap();
        let cv = randn(&mut rng, cols.dims());
        let back = cv
            .apply_op1_no_bwd(&Col2Im {
                win,
                shape: (b, h, w, c),
            })
            .unwrap();
        let lhs = vals(&(&cols * &cv).unwrap().sum_all().unwrap())[0];
        let rhs = vals(&(&x * &back).unwrap().sum_all().unwrap())[0];
        assert!(
            (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
            "{win:?}: {lhs} vs {rhs}"
        );
    }
}

/// Images larger than one tile of the fused op (several tiles per image, and a strided
/// window): output and gradients agree with candle's `conv2d` and its autograd.
#[test]
fn tiled_conv_matches_candle_conv2d() {
    use elbo::nn::conv::TILE_FLOATS;
    let mut rng = Rng::new(60);
    let (b, h, w, ci, co) = (2, 40, 36, 48, 8);
    assert!(
        h * w * 9 * ci > 2 * TILE_FLOATS,
        "the test must span several tiles"
    );
    for win in [
        Window {
            k: 3,
            stride: 1,
            padding: 1,
        },
        Window {
            k: 3,
            stride: 2,
            padding: 1,
        },
    ] {
        let vm = VarMap::new();
        let mut prng = Rng::new(61);
        let conv = Conv2d::new(&mut ParamInit::new(&vm, &mut prng, &CPU), ci, co, win).unwrap();
        let x = Var::from_tensor(&randn(&mut rng, &[b, h, w, ci])).unwrap();
        let y = conv.forward_nhwc(x.as_tensor(), false).unwrap(); // [B, H', W', out]
        let r = randn(&mut rng, y.dims());
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        // reference: candle's conv2d in NCHW on copies of the same values
        let xr = Var::from_tensor(
            &x.as_tensor()
                .permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap();
        let wr = Var::from_tensor(&conv.weight_oihw().unwrap()).unwrap();
        let yr = xr
            .as_tensor()
            .conv2d(wr.as_tensor(), win.padding, win.stride, 1, 1)
            .unwrap()
            .broadcast_add(&conv.bias().reshape((1, co, 1, 1)).unwrap())
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let close = |a: &Tensor, e: &Tensor, what: &str| {
            let d = vals(&(a - e).unwrap().abs().unwrap().max_all().unwrap())[0];
            let s = vals(&e.abs().unwrap().max_all().unwrap())[0];
            assert!(
                d < 1e-4 * (1.0 + s),
                "{win:?} {what}: max diff {d} (scale {s})"
            );
        };
        close(&y, &yr, "output");
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().permute((0, 3, 1, 2)).unwrap();
        close(&dx, gr.get(xr.as_tensor()).unwrap(), "dx");
        let dw = g
            .get(conv.weight())
            .unwrap()
            .reshape((co, 3, 3, ci))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        close(&dw, gr.get(wr.as_tensor()).unwrap(), "dW");
        let db = g.get(conv.bias()).unwrap();
        close(db, &r.sum((0, 1, 2)).unwrap(), "db");
    }
}
