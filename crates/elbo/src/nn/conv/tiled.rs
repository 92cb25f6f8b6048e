//! The threaded, tiled kernels behind [`super::Conv2dOp`]: forward `y = cols(x) W^T + b` and
//! backward `dW = dy^T cols(x)`, `db = sum dy`, `dx = col2im(dy W)` on channels-last images,
//! without materialising the column matrix.
//!
//! The rows of `cols(x)` (output pixels, image-major) are split into one contiguous range per
//! thread, each walked in tiles of about [`TILE_FLOATS`] column floats: gather the tile into a
//! per-thread buffer (still in cache when multiplied) and multiply it with the `gemm` crate on
//! that thread alone (its AVX-512 micro-kernels, Van Zee & van de Geijn 2015). One parallel
//! region per convolution replaces the per-tile threading of a general GEMM call, whose wake-ups
//! and yields cost more than the products on these shapes. The forward pass writes each output
//! tile in place after seeding it with the bias (no separate bias pass, no temporary product).
//! The backward pass splits at image boundaries so each thread keeps its own partial `dW` and
//! `db`, summed at the end in a fixed order (results do not depend on the scheduling, only on
//! the thread count). For stride 1, `dx` is the convolution of `dy` with the flipped, transposed
//! kernel (Dumoulin & Visin 2016, "A guide to convolution arithmetic", sec. 4) and runs as a
//! forward pass; otherwise each thread scatter-adds `dy W` into its own images of `dx`.

use gemm::Parallelism;
use rayon::prelude::*;

use super::im2col::Geometry;
use super::Window;

/// Column floats per tile (1 MiB of f32).
pub const TILE_FLOATS: usize = 1 << 18;

/// Fewest rows in a tile, so each product amortises the packing of `W`.
const MIN_TILE_ROWS: usize = 96;

/// Multiply-adds below which a convolution runs on the calling thread alone.
const PAR_MIN_FLOPS: usize = 1 << 20;

/// Rows per tile for rows of `row` floats.
fn tile_rows(row: usize) -> usize {
    (TILE_FLOATS / row.max(1)).max(MIN_TILE_ROWS)
}

/// A raw pointer that may cross threads; each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks sharing a `SendPtr` write disjoint row ranges of one buffer that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A row-major or transposed operand of [`gemm_into`]: `(pointer, row stride, column stride)`.
type Operand = (*const f32, usize, usize);

/// `dst[m, n] = (dst +) lhs[m, k] rhs[k, n]` for a row-major `dst` with row stride `ldd`.
///
/// # Safety
/// Every element addressed through the strides is valid; `dst` is not aliased.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    (a, a_rs, a_cs): Operand,
    (b, b_rs, b_cs): Operand,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ldd as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// How `units` units of work are shared out: `(tasks, units per task, GEMM parallelism inside
/// a task)`. One task per thread; with a single task, the GEMM itself uses the threads.
fn plan(units: usize, flops: usize) -> (usize, usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || flops < PAR_MIN_FLOPS {
        return (1, units.max(1), Parallelism::None);
    }
    let tasks = threads.min(units.max(1));
    let per = units.div_ceil(tasks).max(1);
    let tasks = units.div_ceil(per).max(1);
    let par = if tasks == 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    (tasks, per, par)
}

/// Split global rows `r0..r1` (pixel-major within image-major order) into per-image pieces
/// `(image, p0, p1, offset of the piece within the range)`.
fn pieces(
    r0: usize,
    r1: usize,
    pixels: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut r = r0;
    std::iter::from_fn(move || {
        if r >= r1 || pixels == 0 {
            return None;
        }
        let (i, p0) = (r / pixels, r % pixels);
        let p1 = pixels.min(p0 + (r1 - r));
        let piece = (i, p0, p1, r - r0);
        r += p1 - p0;
        Some(piece)
    })
}

/// Gather rows `r0..r1` of `cols(x)` into `out`.
fn gather_rows(g: &Geometry, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
    let row = g.row();
    for (i, p0, p1, off) in pieces(r0, r1, g.pixels()) {
        let img = &x[i * g.image()..(i + 1) * g.image()];
        g.gather(img, p0, p1, &mut out[off * row..(off + p1 - p0) * row]);
    }
}

/// Scatter-add rows `r0..r1` of a column gradient into `dx`, whose first image is `i0`.
fn scatter_rows(g: &Geometry, cols: &[f32], r0: usize, r1: usize, i0: usize, dx: &mut [f32]) {
    let row = g.row();
    for (i, p0, p1, off) in pieces(r0, r1, g.pixels()) {
        let img = &mut dx[(i - i0) * g.image()..(i - i0 + 1) * g.image()];
        g.scatter(&cols[off * row..(off + p1 - p0) * row], p0, p1, img);
    }
}

/// `y = cols(x) W^T + bias` for `b` images `x: [b, H, W, C]`, `w: [out, k k C]` and a bias
/// `[out]`, or `[b, out]` (one per image), giving `[b Ho Wo, out]`.
pub(crate) fn forward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    b: usize,
    c_out: usize,
) -> Vec<f32> {
    let (row, pixels) = (g.row(), g.pixels());
    let per_image = bias.len() != c_out;
    let rows = b * pixels;
    let mut y: Vec<f32> = Vec::with_capacity(rows * c_out);
    let (tasks, per, par) = plan(rows, rows * row * c_out);
    let yp = SendPtr(y.as_mut_ptr());
    let run = |t: usize| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
        let tile = tile_rows(row).min(r1.saturating_sub(r0)).max(1);
        let mut cols = vec![0f32; tile * row];
        let mut s = r0;
        while s < r1 {
            let e = (s + tile).min(r1);
            let n = e - s;
            gather_rows(g, x, s, e, &mut cols[..n * row]);
            // SAFETY: rows s..e of `y` (capacity rows * out) belong to this task alone; they
            // are seeded with the bias, then accumulated into by the product.
            unsafe {
                let dst = yp.get().add(s * c_out);
                for r in 0..n {
                    let bi = if per_image {
                        (s + r) / pixels * c_out
                    } else {
                        0
                    };
                    std::ptr::copy_nonoverlapping(bias[bi..].as_ptr(), dst.add(r * c_out), c_out);
                }
                // [n, k k C] x [k k C, out]: W read transposed in place
                gemm_into(
                    (n, c_out, row),
                    dst,
                    c_out,
                    true,
                    (cols.as_ptr(), row, 1),
                    (w.as_ptr(), 1, row),
                    par,
                );
            }
            s = e;
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    // SAFETY: the tasks cover rows 0..rows and wrote every element of them.
    unsafe { y.set_len(rows * c_out) };
    y
}

/// The kernel of the input gradient of a stride-1 convolution: `w: [out, k, k, C]` to
/// `[C, k, k, out]` with both spatial axes reversed.
fn flip_kernel(w: &[f32], c_out: usize, k: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for o in 0..c_out {
        for ky in 0..k {
            for kx in 0..k {
                let src = &w[((o * k + ky) * k + kx) * c..][..c];
                let (fy, fx) = (k - 1 - ky, k - 1 - kx);
                for (ci, &v) in src.iter().enumerate() {
                    t[((ci * k + fy) * k + fx) * c_out + o] = v;
                }
            }
        }
    }
    t
}

/// The gradients of [`forward`] for output gradient `dy: [b Ho Wo, out]`: `(dx, dW, db)` with
/// `db: [b, out]` (the bias gradient of each image), `dx` empty unless `want_dx`.
pub(crate) fn backward(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    b: usize,
    want_dx: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (row, pixels) = (g.row(), g.pixels());
    let c_out = w.len().checked_div(row).unwrap_or(0);
    let Window { k, stride, padding } = g.win;
    if want_dx && stride == 1 && padding < k {
        // stride 1: dx is itself a convolution, of dy (padded by k - 1 - p) with the flipped,
        // transposed kernel, so it is gathered and multiplied like a forward pass (no column
        // gradient, no scatter-add, no zeroed dx)
        let gt = Geometry {
            h: g.ho,
            w: g.wo,
            c: c_out,
            win: Window {
                k,
                stride: 1,
                padding: k - 1 - padding,
            },
            ho: g.h,
            wo: g.w,
        };
        let wt = flip_kernel(w, c_out, k, g.c); // [C, k k out]
        let dx = forward(&gt, dy, &wt, &vec![0f32; g.c], b, g.c);
        let (_, dw, db) = backward(g, x, w, dy, b, false);
        return (dx, dw, db);
    }
    let rows = b * pixels;
    let mut dx = if want_dx {
        vec![0f32; b * g.image()]
    } else {
        Vec::new()
    };
    // whole images per task, so no two tasks scatter into the same image
    let (tasks, per_img, par) = plan(b, 2 * rows * row * c_out);
    let run = |t: usize, dx: &mut [f32]| -> (Vec<f32>, Vec<f32>) {
        let (i0, i1) = (t * per_img, ((t + 1) * per_img).min(b));
        let (r0, r1) = (i0 * pixels, i1 * pixels);
        let mut dw = vec![0f32; c_out * row];
        // [images of the task, out]: per-image sums of dy
        let mut db = vec![0f32; (i1 - i0) * c_out];
        for (dbi, img) in db
            .chunks_exact_mut(c_out.max(1))
            .zip(dy[r0 * c_out..r1 * c_out].chunks_exact((pixels * c_out).max(1)))
        {
            for r in img.chunks_exact(c_out.max(1)) {
                for (a, v) in dbi.iter_mut().zip(r) {
                    *a += v;
                }
            }
        }
        let tile = tile_rows(row).min(r1.saturating_sub(r0)).max(1);
        let mut cols = vec![0f32; tile * row];
        let mut dcols = if want_dx {
            vec![0f32; tile * row]
        } else {
            Vec::new()
        };
        let mut s = r0;
        while s < r1 {
            let e = (s + tile).min(r1);
            let n = e - s;
            gather_rows(g, x, s, e, &mut cols[..n * row]);
            let dyt = dy[s * c_out..].as_ptr();
            // SAFETY: `dw` is [out, k k C], `cols` holds n rows, `dy` rows s..e exist;
            // `dcols` holds n rows when wanted.
            unsafe {
                // dW += dy_tile^T cols_tile: [out, n] x [n, k k C]
                gemm_into(
                    (c_out, row, n),
                    dw.as_mut_ptr(),
                    row,
                    s > r0,
                    (dyt, 1, c_out),
                    (cols.as_ptr(), row, 1),
                    par,
                );
                if want_dx {
                    // dcols = dy_tile W: [n, out] x [out, k k C]
                    gemm_into(
                        (n, row, c_out),
                        dcols.as_mut_ptr(),
                        row,
                        false,
                        (dyt, c_out, 1),
                        (w.as_ptr(), row, 1),
                        par,
                    );
                }
            }
            if want_dx {
                scatter_rows(g, &dcols[..n * row], s, e, i0, dx);
            }
            s = e;
        }
        (dw, db)
    };
    let image = g.image();
    let partial: Vec<(Vec<f32>, Vec<f32>)> = if tasks == 1 {
        vec![run(0, &mut dx)]
    } else if want_dx {
        dx.par_chunks_mut(per_img * image)
            .enumerate()
            .map(|(t, d)| run(t, d))
            .collect()
    } else {
        (0..tasks)
            .into_par_iter()
            .map(|t| run(t, &mut []))
            .collect()
    };
    let mut dw = vec![0f32; c_out * row];
    let mut db = Vec::with_capacity(b * c_out);
    for (pw, pb) in partial {
        for (a, v) in dw.iter_mut().zip(&pw) {
            *a += v;
        }
        db.extend_from_slice(&pb);
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::super::im2col::geometry;
    use super::*;

    /// `(y, dx, dW, db)` of the convolution by direct loops in f64: `x: [B, H, W, C]`,
    /// `w: [out, k, k, C]`, `bias: [B, out]`, loss `sum(y * r)`.
    fn direct(
        g: &Geometry,
        b: usize,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        r: &[f32],
    ) -> [Vec<f64>; 4] {
        let (c, co, k) = (g.c, bias.len() / b, g.win.k);
        let (s, p) = (g.win.stride as isize, g.win.padding as isize);
        let mut y = vec![0f64; b * g.pixels() * co];
        let (mut dx, mut dw, mut db) = (
            vec![0f64; x.len()],
            vec![0f64; w.len()],
            vec![0f64; bias.len()],
        );
        for i in 0..b {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let row = (i * g.ho + oy) * g.wo + ox;
                    for o in 0..co {
                        let gr = f64::from(r[row * co + o]);
                        let mut acc = f64::from(bias[i * co + o]);
                        db[i * co + o] += gr;
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = oy as isize * s + ky as isize - p;
                                let ix = ox as isize * s + kx as isize - p;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for ci in 0..c {
                                    let xi = ((i * g.h + iy as usize) * g.w + ix as usize) * c + ci;
                                    let wi = ((o * k + ky) * k + kx) * c + ci;
                                    acc += f64::from(x[xi]) * f64::from(w[wi]);
                                    dx[xi] += gr * f64::from(w[wi]);
                                    dw[wi] += gr * f64::from(x[xi]);
                                }
                            }
                        }
                        y[row * co + o] = acc;
                    }
                }
            }
        }
        [y, dx, dw, db]
    }

    fn close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&a, &e)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(a) - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{what}[{i}]: {a} vs {e}"
            );
        }
    }

    /// Forward and all three gradients against direct loops: 1x1, 2x2 and 3x3 windows,
    /// strides 1 and 2, with and without padding, channel counts that are not multiples of
    /// the vector width, one image or many (the threaded split), small and several-tile sizes.
    #[test]
    fn matches_direct_convolution() {
        let f = |i: usize, salt: usize| (((i * 7919 + salt * 104_729) % 37) as f32 / 18.0) - 1.0;
        // (b, h, w, c, out, k, stride, padding)
        for &(b, h, w, c, co, k, st, pad) in &[
            (2, 5, 6, 3, 4, 3, 1, 1),
            (3, 7, 6, 5, 3, 3, 2, 1),
            (2, 4, 3, 3, 2, 1, 1, 0),
            (1, 6, 5, 2, 3, 2, 2, 0),
            (5, 9, 8, 17, 19, 3, 1, 1),
            (1, 30, 28, 24, 7, 3, 1, 1),
            (4, 40, 36, 48, 8, 3, 2, 1),
        ] {
            let win = Window {
                k,
                stride: st,
                padding: pad,
            };
            let g = geometry((b, h, w, c), win).unwrap();
            let x: Vec<f32> = (0..b * g.image()).map(|i| f(i, 1)).collect();
            let wt: Vec<f32> = (0..co * g.row()).map(|i| f(i, 2)).collect();
            let bias: Vec<f32> = (0..b * co).map(|i| f(i, 3)).collect();
            let r: Vec<f32> = (0..b * g.pixels() * co).map(|i| f(i, 4)).collect();
            let [y, dx, dw, db] = direct(&g, b, &x, &wt, &bias, &r);
            let tag = format!("{b}x{h}x{w}x{c} -> {co}, {win:?}");
            close(&format!("{tag} y"), &forward(&g, &x, &wt, &bias, b, co), &y);
            // one bias for all images: the same as a per-image bias repeated
            let shared: Vec<f32> = bias[..co].repeat(b);
            let [y1, ..] = direct(&g, b, &x, &wt, &shared, &r);
            close(
                &format!("{tag} y1"),
                &forward(&g, &x, &wt, &bias[..co], b, co),
                &y1,
            );
            let (gx, gw, gb) = backward(&g, &x, &wt, &r, b, true);
            close(&format!("{tag} dx"), &gx, &dx);
            close(&format!("{tag} dW"), &gw, &dw);
            close(&format!("{tag} db"), &gb, &db);
            let (gx, gw2, _) = backward(&g, &x, &wt, &r, b, false);
            assert!(gx.is_empty());
            assert_eq!(gw, gw2, "{tag}: dW without dx");
        }
    }
}
