//! PNG plots for judging generative models by eye: data next to samples, data next to a model
//! density, training curves and grids of generated images.
//!
//! Everything renders with plotters' bitmap backend and the vendored DejaVu Sans Mono font, so no
//! system fonts are needed. Paths must end in `.png`; missing parent folders are created. Bad
//! inputs (empty, wrong shape, nothing finite) return an error and write nothing.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Error, Result, Rng};

mod curve;
mod grid;

pub use curve::loss_curve;
pub use grid::{image_grid, MAX_GRID_SIDE};

/// Most points drawn per scatter panel; larger sets are thinned to a fixed-seed random subset.
pub const MAX_SCATTER_POINTS: usize = 20_000;

const FONT: &str = "sans-serif";
const DATA_COLOR: RGBColor = RGBColor(31, 119, 180);
const SAMPLE_COLOR: RGBColor = RGBColor(214, 39, 40);
const GRID_LINE: RGBColor = RGBColor(235, 235, 235);

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Drawn<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Register the vendored font once; plotters finds it under the "sans-serif" family.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = include_bytes!("../../../../assets/DejaVuSansMono.ttf");
            plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| "the vendored font assets/DejaVuSansMono.ttf is unreadable".into())
        })
        .clone()
        .map_err(Error::Config)
}

/// Check the path, create its folder and make sure the font is available.
fn prepare(path: &Path) -> Result<()> {
    let png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        return Err(Error::Config(format!(
            "plot path {} must end in .png",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    ensure_font()
}

fn plot_error(path: &Path, e: Box<dyn std::error::Error>) -> Error {
    Error::io(path, std::io::Error::other(format!("plotting failed: {e}")))
}

/// Draw into a temporary PNG beside `path` and move it into place atomically (a failed or
/// interrupted plot leaves the previous picture, never a truncated one).
fn render<F>(path: &Path, draw: F) -> Result<()>
where
    F: FnOnce(&Path) -> Drawn,
{
    crate::atomic_file::write_with(path, |tmp| draw(tmp).map_err(|e| plot_error(path, e)))
}

/// Parse row-major [n, 2] coordinates, dropping non-finite points.
fn points(name: &str, xy: &[f32]) -> Result<Vec<(f64, f64)>> {
    if xy.is_empty() {
        return Err(Error::data(name, "no points to plot"));
    }
    if !xy.len().is_multiple_of(2) {
        return Err(Error::Shape(format!(
            "{name}: {} values is not a row-major [n, 2] array",
            xy.len()
        )));
    }
    let pts: Vec<(f64, f64)> = xy
        .chunks_exact(2)
        .map(|p| (f64::from(p[0]), f64::from(p[1])))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return Err(Error::data(name, "no finite points to plot"));
    }
    Ok(pts)
}

/// The value at quantile `q` of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A range padded by `frac` of its span on each side (or by a unit-ish amount when degenerate).
fn padded(lo: f64, hi: f64, frac: f64) -> Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        frac * span
    } else {
        0.5 * lo.abs().max(1.0)
    };
    (lo - pad)..(hi + pad)
}

/// Axis range from the 0.5% / 99.5% quantiles of one coordinate, padded 10%.
fn robust_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    padded(quantile(&v, 0.005), quantile(&v, 0.995), 0.1)
}

/// Points inside the view and how many fell outside; more than `MAX_SCATTER_POINTS` are thinned
/// to a fixed-seed random subset (a stride would alias with data stored class by class).
fn visible(pts: &[(f64, f64)], xr: &Range<f64>, yr: &Range<f64>) -> (Vec<(f64, f64)>, usize) {
    let mut inside: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|(x, y)| xr.contains(x) && yr.contains(y))
        .collect();
    let outside = pts.len() - inside.len();
    if inside.len() > MAX_SCATTER_POINTS {
        let mut rng = Rng::new(0x05ca_77e4);
        for i in 0..MAX_SCATTER_POINTS {
            let j = i + rng.below(inside.len() - i);
            inside.swap(i, j);
        }
        inside.truncate(MAX_SCATTER_POINTS);
    }
    (inside, outside)
}

/// Tick labels with as many decimals as the axis span needs, trailing zeros and "-0" removed.
fn tick_format(span: f64) -> impl Fn(&f64) -> String {
    let step = span / 10.0;
    let decimals = if step > 0.0 && step.is_finite() {
        (1.0 - step.log10().floor()).clamp(0.0, 9.0) as usize
    } else {
        3
    };
    move |v: &f64| {
        let mut s = format!("{v:.decimals$}");
        if s.contains('.') {
            s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        }
        if s == "-0" {
            s = "0".to_string();
        }
        s
    }
}

/// One scatter panel with its own caption and the given axis ranges.
fn scatter_panel(
    area: &Area,
    name: &str,
    pts: &[(f64, f64)],
    color: RGBColor,
    xr: Range<f64>,
    yr: Range<f64>,
) -> Drawn {
    let (shown, outside) = visible(pts, &xr, &yr);
    let mut caption = format!("{name} (n={})", pts.len());
    if shown.len() + outside < pts.len() {
        caption = format!("{name} ({} of {} shown)", shown.len(), pts.len());
    }
    if outside > 0 {
        caption.push_str(&format!(", {outside} outside view"));
    }
    let (fx, fy) = (
        tick_format(xr.end - xr.start),
        tick_format(yr.end - yr.start),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(xr, yr)?;
    chart
        .configure_mesh()
        .light_line_style(GRID_LINE)
        .label_style((FONT, 12))
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .draw()?;
    let style = color.mix(0.35).filled();
    chart.draw_series(shown.iter().map(|&p| Circle::new(p, 2, style)))?;
    Ok(())
}

/// Data and model samples side by side, on the same axes.
///
/// `data` and `samples` are row-major [n, 2]. Both panels use the range of the data's 0.5% and
/// 99.5% quantiles padded by 10%, so samples that stray are counted in the caption rather than
/// squashing the view. At most [`MAX_SCATTER_POINTS`] points are drawn per panel. The image is
/// 1000 x 520 pixels.
pub fn scatter_compare(path: &Path, data: &[f32], samples: &[f32], title: &str) -> Result<()> {
    let data = points("data", data)?;
    let samples = points("samples", samples)?;
    prepare(path)?;
    let xr = robust_range(data.iter().map(|p| p.0));
    let yr = robust_range(data.iter().map(|p| p.1));
    let draw = |path: &Path| -> Drawn {
        let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 22))?;
        let panels = body.split_evenly((1, 2));
        scatter_panel(
            &panels[0],
            "data",
            &data,
            DATA_COLOR,
            xr.clone(),
            yr.clone(),
        )?;
        scatter_panel(&panels[1], "samples", &samples, SAMPLE_COLOR, xr, yr)?;
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

/// A viridis-like colour for `t` in [0, 1].
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (f64::from(a) + f * (f64::from(b) - f64::from(a))).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Data scatter next to a heat map of a model density evaluated on a grid.
///
/// `density` is row-major [grid.0, grid.1]: row `i` covers the `i`-th horizontal band of the
/// extent counted from `ymin` upwards, column `j` the `j`-th vertical band from `xmin`.
/// `extent = (xmin, xmax, ymin, ymax)` is also the view of the scatter panel. Densities must be
/// non-negative (pass `exp(log p)`); non-finite cells are drawn grey. The image is 1000 x 520.
pub fn density_compare(
    path: &Path,
    data: &[f32],
    density: &[f64],
    grid: (usize, usize),
    extent: (f64, f64, f64, f64),
    title: &str,
) -> Result<()> {
    let data = points("data", data)?;
    let (rows, cols) = grid;
    if rows == 0 || cols == 0 || rows.checked_mul(cols) != Some(density.len()) {
        return Err(Error::Shape(format!(
            "density has {} values but the grid is {rows} x {cols}",
            density.len()
        )));
    }
    let (x0, x1, y0, y1) = extent;
    if !(x0.is_finite() && x1.is_finite() && y0.is_finite() && y1.is_finite())
        || x0 >= x1
        || y0 >= y1
    {
        return Err(Error::Config(format!(
            "density extent {extent:?} must be finite with xmin < xmax and ymin < ymax"
        )));
    }
    if density.iter().any(|&d| d < 0.0) {
        return Err(Error::data(
            "density",
            "negative values; pass densities, not log-densities",
        ));
    }
    let peak = density
        .iter()
        .copied()
        .filter(|d| d.is_finite())
        .fold(f64::NAN, f64::max);
    if peak.is_nan() {
        return Err(Error::data("density", "no finite values to plot"));
    }
    prepare(path)?;
    let (dx, dy) = ((x1 - x0) / cols as f64, (y1 - y0) / rows as f64);
    let draw = |path: &Path| -> Drawn {
        let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let body = root.titled(title, (FONT, 22))?;
        let panels = body.split_evenly((1, 2));
        scatter_panel(&panels[0], "data", &data, DATA_COLOR, x0..x1, y0..y1)?;
        let mut chart = ChartBuilder::on(&panels[1])
            .caption(format!("model density (max {peak:.4})"), (FONT, 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let (fx, fy) = (tick_format(x1 - x0), tick_format(y1 - y0));
        chart
            .configure_mesh()
            .disable_mesh()
            .label_style((FONT, 12))
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .draw()?;
        let cells = density.iter().enumerate().map(|(k, &d)| {
            let (i, j) = ((k / cols) as f64, (k % cols) as f64);
            let color = if !d.is_finite() {
                RGBColor(160, 160, 160)
            } else if peak > 0.0 {
                viridis(d / peak)
            } else {
                viridis(0.0)
            };
            let lo = (x0 + j * dx, y0 + i * dy);
            Rectangle::new([lo, (lo.0 + dx, lo.1 + dy)], color.filled())
        });
        chart.draw_series(cells)?;
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_interleaved_classes_and_counts_outliers() {
        // class A at x < 0 and class B at x > 0, stored alternately: a stride of 2 would keep one
        let pts: Vec<(f64, f64)> = (0..2 * MAX_SCATTER_POINTS + 10)
            .map(|i| if i % 2 == 0 { (-1.0, 0.0) } else { (1.0, 0.0) })
            .chain([(100.0, 0.0)])
            .collect();
        let (shown, outside) = visible(&pts, &(-2.0..2.0), &(-1.0..1.0));
        assert_eq!(outside, 1);
        assert_eq!(shown.len(), MAX_SCATTER_POINTS);
        let a = shown.iter().filter(|p| p.0 < 0.0).count() as f64 / shown.len() as f64;
        assert!((a - 0.5).abs() < 0.02, "class A fraction {a}");
    }

    #[test]
    fn tick_labels_are_tidy() {
        let f = tick_format(2.4);
        assert_eq!(
            (f(&-0.0), f(&0.25), f(&1.0), f(&-0.5)),
            ("0".into(), "0.25".into(), "1".into(), "-0.5".into())
        );
        assert_eq!(tick_format(3000.0)(&500.0), "500");
        let r = robust_range([0.0, 1.0, 2.0].into_iter());
        assert!((r.start + 0.2).abs() < 1e-12 && (r.end - 2.2).abs() < 1e-12);
    }
}
