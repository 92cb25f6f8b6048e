//! Training curves: the training loss, its moving average and a held-out metric against the step.

use std::path::Path;

use plotters::prelude::*;

use super::{
    padded, prepare, quantile, render, tick_format, Drawn, DATA_COLOR, FONT, GRID_LINE,
    SAMPLE_COLOR,
};
use crate::{Error, Result};

/// Centred moving average with the given window.
fn moving_average(ys: &[f64], window: usize) -> Vec<f64> {
    let mut prefix = vec![0.0; ys.len() + 1];
    for (i, y) in ys.iter().enumerate() {
        prefix[i + 1] = prefix[i] + y;
    }
    (0..ys.len())
        .map(|i| {
            let lo = i.saturating_sub(window / 2);
            let hi = (i + window - window / 2).min(ys.len());
            (prefix[hi] - prefix[lo]) / (hi - lo) as f64
        })
        .collect()
}

/// Training loss (thin line plus a moving average over ~50 points) and a held-out metric
/// (markers) against the step, sharing one y axis labelled `y_label`.
///
/// Pairs with a non-finite step or value are dropped. `eval` may be empty; `train` must keep at
/// least one finite pair. The y range covers everything but the top 2% of training losses (early
/// spikes are clipped at the top edge). The image is 900 x 540.
pub fn loss_curve(
    path: &Path,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    title: &str,
    y_label: &str,
) -> Result<()> {
    let finite = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = v
            .iter()
            .copied()
            .filter(|(s, y)| s.is_finite() && y.is_finite())
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let (train, eval) = (finite(train), finite(eval));
    if train.is_empty() {
        return Err(Error::data(
            "training curve",
            "no finite (step, loss) pairs",
        ));
    }
    prepare(path)?;
    let ys: Vec<f64> = train.iter().map(|p| p.1).collect();
    let window = 50.min(ys.len() / 4);
    let smooth = (window >= 2).then(|| moving_average(&ys, window));
    let mut sorted = ys.clone();
    sorted.sort_by(f64::total_cmp);
    let all_eval = eval.iter().map(|p| p.1);
    let lo = all_eval.clone().fold(sorted[0], f64::min);
    let mut hi = all_eval.fold(quantile(&sorted, 0.98), f64::max);
    if let Some(s) = &smooth {
        hi = s[s.len() / 20..].iter().copied().fold(hi, f64::max);
    }
    let yr = padded(lo, hi, 0.05);
    let steps = train.iter().chain(&eval).map(|p| p.0);
    let (s0, s1) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), s| {
        (a.min(s), b.max(s))
    });
    let xr = padded(s0, s1, 0.02);
    let clamp = |(s, y): (f64, f64)| (s, y.clamp(yr.start, yr.end));
    let draw = |path: &Path| -> Drawn {
        let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xr.clone(), yr.clone())?;
        let (fx, fy) = (
            tick_format(xr.end - xr.start),
            tick_format(yr.end - yr.start),
        );
        chart
            .configure_mesh()
            .light_line_style(GRID_LINE)
            .label_style((FONT, 13))
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .x_desc("step")
            .y_desc(y_label)
            .axis_desc_style((FONT, 15))
            .draw()?;
        let raw = RGBColor(150, 190, 230);
        chart
            .draw_series(LineSeries::new(train.iter().copied().map(clamp), raw))?
            .label("train")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], raw));
        if let Some(s) = &smooth {
            let line = DATA_COLOR.stroke_width(2);
            let pts = train.iter().zip(s).map(|(p, &m)| clamp((p.0, m)));
            chart
                .draw_series(LineSeries::new(pts, line))?
                .label(format!("train, moving average of {window}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line));
        }
        if !eval.is_empty() {
            let dot = SAMPLE_COLOR.filled();
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 4, dot)))?
                .label("held-out")
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, dot));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .label_font((FONT, 14))
            .draw()?;
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

#[cfg(test)]
mod tests {
    #[test]
    fn moving_average_is_centred_and_shrinks_at_the_ends() {
        let ma = super::moving_average(&[0.0, 0.0, 3.0, 0.0, 0.0], 3);
        assert_eq!(ma, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
    }
}
