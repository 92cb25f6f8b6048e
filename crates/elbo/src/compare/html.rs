//! The comparison as one self-contained HTML file: inline CSS (with a print stylesheet), no
//! scripts, no network; images embedded as `data:image/png;base64,...` (RFC 2397, RFC 4648)
//! and the bits/dim chart as inline SVG.

use std::fmt::Write as _;
use std::path::Path;

use super::report::{gap, opt, pm, CompareReport, EntryReport, EntryStatus, LikelihoodRow};
use crate::likelihood::NllKind;
use crate::Result;

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}th,td{padding:.25em .5em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f4f4f4}
.badge{display:inline-block;padding:0 .45em;border-radius:.6em;font-size:.8em;color:#fff}
.exact{background:#2e7d32}.bound{background:#1565c0}.estimate{background:#ef6c00}.none{background:#757575}
.pass{color:#2e7d32;font-weight:600}.fail{color:#c62828;font-weight:600}
.err{color:#c62828;white-space:pre-wrap}.entry{page-break-inside:avoid;margin-bottom:1em}
.imgs img{max-width:48%;height:auto;margin-right:1%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.5em;overflow-x:auto;font-size:.8em}
.meta{color:#555;font-size:.85em}
@media print{body{max-width:none;margin:0;font-size:10pt}details{display:block}details>*{display:block}
.entry{page-break-inside:avoid}a{color:inherit;text-decoration:none}}
";

/// RFC 4648 base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Text escaped for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn kind_class(k: &NllKind) -> &'static str {
    k.label()
}

fn badge(r: &LikelihoodRow) -> String {
    format!(
        "<span class=\"badge {}\" title=\"{}\">{}</span>",
        kind_class(&r.kind),
        esc(&r.kind_label),
        r.kind.label()
    )
}

/// A PNG file as an `<img>`, or nothing when the file is absent or not a PNG.
fn img(path: &Path, alt: &str) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if !bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return None;
    }
    Some(format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
        esc(alt),
        base64(&bytes)
    ))
}

/// The report as one HTML document.
pub fn render(r: &CompareReport) -> Result<String> {
    let mut s = String::new();
    let title = format!(
        "elbo compare: {}{}",
        r.suite,
        if r.quick { " (--quick)" } else { "" }
    );
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let m = &r.machine;
    let _ = writeln!(
        s,
        "<p class=\"meta\">{} ({} cores, {}); elbo {}, commit <code>{}</code>; report schema {}</p>",
        esc(&m.cpu),
        m.cores,
        esc(&m.os),
        esc(&m.elbo_version),
        esc(&m.git_commit),
        r.schema_version
    );
    table(&mut s, r);
    failures(&mut s, r);
    let _ = writeln!(s, "<h2>Bits/dim</h2>");
    s.push_str(&chart(r));
    checks(&mut s, r);
    let _ = writeln!(s, "<h2>Entries</h2>");
    for e in &r.entries {
        entry(&mut s, e)?;
    }
    s.push_str("</body></html>\n");
    Ok(s)
}

fn table(s: &mut String, r: &CompareReport) {
    let _ = writeln!(
        s,
        "<h2>Held-out likelihood</h2>\n<table id=\"likelihoods\"><thead><tr><th>entry</th><th>family</th>\
         <th>data</th><th>likelihood</th><th>kind</th><th>{} ± s.e.</th><th>NLL nats ± s.e.</th>\
         <th>gap to entropy</th><th>n</th><th>checkpoint</th><th>steps</th><th>train s</th>\
         <th>params</th></tr></thead><tbody>",
        r.unit()
    );
    for l in r.sorted_lines() {
        let (e, row) = (l.entry, l.row);
        let _ = writeln!(
            s,
            "<tr class=\"row\"><td><a href=\"#e-{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&e.name),
            esc(&e.name),
            esc(&e.family),
            esc(&e.data),
            esc(&row.likelihood),
            badge(row),
            pm(row.bits_per_dim, row.stderr_bits_per_dim),
            pm(row.nats, row.stderr_nats),
            opt(gap(e, row)),
            row.n,
            esc(&row.checkpoint),
            e.steps.map_or("—".into(), |x| x.to_string()),
            e.train_seconds.map_or("—".into(), |x| format!("{x:.1}")),
            e.parameters.map_or("—".into(), |x| x.to_string()),
        );
    }
    for e in r.failures() {
        let _ = writeln!(
            s,
            "<tr class=\"row failed\"><td><a href=\"#e-{}\">{}</a></td><td>{}</td><td>{}</td>\
             <td colspan=\"10\" class=\"err\">failed: {}</td></tr>",
            esc(&e.name),
            esc(&e.name),
            esc(&e.family),
            esc(&e.data),
            esc(e.error.as_deref().unwrap_or("unknown error"))
        );
    }
    let _ = writeln!(s, "</tbody></table>");
}

fn failures(s: &mut String, r: &CompareReport) {
    let failed: Vec<&EntryReport> = r.failures().collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(s, "<h2>Failed entries</h2><ul>");
    for e in failed {
        let _ = writeln!(
            s,
            "<li><b>{}</b>: <span class=\"err\">{}</span></li>",
            esc(&e.name),
            esc(e.error.as_deref().unwrap_or("unknown error"))
        );
    }
    let _ = writeln!(s, "</ul>");
}

fn checks(s: &mut String, r: &CompareReport) {
    let _ = writeln!(s, "<h2>Consistency checks</h2>");
    if r.checks.is_empty() {
        let _ = writeln!(s, "<p>No check applies to these entries.</p>");
        return;
    }
    let _ = writeln!(
        s,
        "<table id=\"checks\"><thead><tr><th>check</th><th>entry</th><th>result</th><th>numbers</th></tr></thead><tbody>"
    );
    for c in &r.checks {
        let (cls, word) = if c.passed {
            ("pass", "pass")
        } else {
            ("fail", "FAIL")
        };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"{cls}\">{word}</td><td>{}</td></tr>",
            c.kind.title(),
            esc(&c.entry),
            esc(&c.detail)
        );
    }
    let _ = writeln!(s, "</tbody></table>");
}

/// Horizontal bars of bits/dim with ±1 s.e. whiskers; exact figures green squares, bounds
/// blue triangles, estimates orange circles.
fn chart(r: &CompareReport) -> String {
    let lines: Vec<_> = r
        .sorted_lines()
        .into_iter()
        .filter(|l| l.row.bits_per_dim.is_some())
        .collect();
    if lines.is_empty() {
        return "<p>No figure to chart.</p>\n".into();
    }
    let hi = lines
        .iter()
        .map(|l| l.row.bits_per_dim.unwrap_or(0.0) + l.row.stderr_bits_per_dim.unwrap_or(0.0))
        .fold(0.0f64, f64::max);
    let lo = lines
        .iter()
        .map(|l| l.row.bits_per_dim.unwrap_or(0.0) - l.row.stderr_bits_per_dim.unwrap_or(0.0))
        .fold(0.0f64, f64::min);
    let span = (hi - lo).max(1e-9);
    let (left, width, rowh) = (220.0, 520.0, 22.0);
    let axis = 14.0 + rowh * lines.len() as f64;
    let h = axis + 34.0;
    // coordinates to 0.1 px keep the page small
    let x = |v: f64| ((left + (v - lo) / span * width) * 10.0).round() / 10.0;
    let mut s = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" \
         viewBox=\"0 0 {} {h}\" font-size=\"11\" font-family=\"sans-serif\">\n",
        left + width + 90.0,
        left + width + 90.0
    );
    let _ = writeln!(
        s,
        "<line x1=\"{0}\" y1=\"4\" x2=\"{0}\" y2=\"{axis}\" stroke=\"#999\"/>\
         <line x1=\"{left}\" y1=\"{axis}\" x2=\"{1}\" y2=\"{axis}\" stroke=\"#999\"/>",
        x(0.0_f64.max(lo)),
        left + width
    );
    let step = tick_step(span);
    let mut t = (lo / step).ceil() * step;
    while t <= hi + 1e-12 {
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{axis}\" x2=\"{0}\" y2=\"{1}\" stroke=\"#999\"/>\
             <text x=\"{0}\" y=\"{2}\" text-anchor=\"middle\">{3}</text>",
            x(t),
            axis + 4.0,
            axis + 15.0,
            (t * 1e6).round() / 1e6
        );
        t += step;
    }
    for (i, l) in lines.iter().enumerate() {
        let v = l.row.bits_per_dim.unwrap_or(0.0);
        let se = l.row.stderr_bits_per_dim.unwrap_or(0.0);
        let y = 10.0 + rowh * i as f64;
        let (colour, marker) = match l.row.kind {
            NllKind::Exact => (
                "#2e7d32",
                format!(
                    "<rect x=\"{}\" y=\"{}\" width=\"8\" height=\"8\" fill=\"#2e7d32\"/>",
                    x(v) - 4.0,
                    y + 3.0
                ),
            ),
            NllKind::Bound => (
                "#1565c0",
                format!(
                    "<polygon points=\"{},{} {},{} {},{}\" fill=\"#1565c0\"/>",
                    x(v) - 5.0,
                    y + 12.0,
                    x(v) + 5.0,
                    y + 12.0,
                    x(v),
                    y + 2.0
                ),
            ),
            _ => (
                "#ef6c00",
                format!(
                    "<circle cx=\"{}\" cy=\"{}\" r=\"4.5\" fill=\"#ef6c00\"/>",
                    x(v),
                    y + 7.0
                ),
            ),
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} / {}</text>\
             <rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"10\" fill=\"{colour}\" opacity=\"0.25\"/>\
             <line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>{marker}\
             <text x=\"{}\" y=\"{}\">{:.3}</text>",
            left - 6.0,
            y + 11.0,
            esc(&l.entry.name),
            esc(&l.row.likelihood),
            x(lo.max(0.0)),
            y + 2.0,
            (x(v) - x(lo.max(0.0))).max(0.0),
            x(v - se),
            y + 7.0,
            x(v + se),
            y + 7.0,
            left + width + 8.0,
            y + 11.0,
            v
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{left}\" y=\"{}\">{} (whiskers ±1 s.e.; green square exact, blue triangle bound, orange circle estimate)</text></svg>",
        h - 4.0,
        r.unit()
    );
    s
}

/// A round tick spacing (1, 2 or 5 times a power of ten) giving about five ticks over `span`.
fn tick_step(span: f64) -> f64 {
    let raw = span / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= raw)
        .unwrap_or(10.0 * p)
}

fn entry(s: &mut String, e: &EntryReport) -> Result<()> {
    let _ = writeln!(
        s,
        "<div class=\"entry\" id=\"e-{}\"><h3>{} <span class=\"meta\">{} on {}{}</span></h3>",
        esc(&e.name),
        esc(&e.name),
        esc(&e.family),
        esc(&e.data),
        if e.provenance.is_empty() {
            String::new()
        } else {
            format!("; {}", esc(&e.provenance))
        }
    );
    if e.status == EntryStatus::Failed {
        let _ = writeln!(
            s,
            "<p class=\"err\">failed: {}</p>",
            esc(e.error.as_deref().unwrap_or("unknown error"))
        );
    }
    let _ = writeln!(
        s,
        "<p class=\"meta\">run <code>{}</code>",
        esc(&e.run_dir.display().to_string())
    );
    for r in &e.rows {
        let _ = write!(s, "<br>{}: {}", esc(&r.likelihood), esc(&r.method));
    }
    for (name, m) in &e.metrics {
        let _ = write!(
            s,
            "<br>{}: {} ({} samples)",
            esc(name),
            pm(Some(m.value), m.stderr),
            m.n_samples
        );
    }
    let _ = writeln!(s, "</p>");
    let imgs: Vec<String> = [
        ("samples.png", "samples"),
        ("loss.png", "training and held-out curves"),
    ]
    .iter()
    .filter_map(|(f, alt)| img(&e.run_dir.join(f), &format!("{} {alt}", e.name)))
    .collect();
    if !imgs.is_empty() {
        let _ = writeln!(s, "<div class=\"imgs\">{}</div>", imgs.join(""));
    }
    if !e.text_samples.is_empty() {
        let _ = writeln!(s, "<pre>{}</pre>", esc(&e.text_samples.join("\n---\n")));
    }
    if !e.config.is_null() {
        let cfg = serde_json::to_string_pretty(&e.config).unwrap_or_default();
        let _ = writeln!(
            s,
            "<details><summary>config</summary><pre>{}</pre></details>",
            esc(&cfg)
        );
    }
    let _ = writeln!(s, "</div>");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn ticks_are_round_and_about_five() {
        assert_eq!(tick_step(5.5), 2.0);
        assert_eq!(tick_step(1.0), 0.2);
        assert_eq!(tick_step(0.03), 0.01);
        for span in [0.07, 0.9, 3.0, 42.0, 1234.0] {
            let n = span / tick_step(span);
            assert!((2.0..=5.0).contains(&n), "{span}: {n} ticks");
        }
    }

    #[test]
    fn chart_marks_each_kind_differently_and_the_page_escapes_errors() {
        use crate::compare::report::{EntryReport, LikelihoodRow};
        let row = |name: &str, kind: NllKind, bpd: f64| LikelihoodRow {
            likelihood: name.into(),
            kind_label: kind.label().into(),
            kind,
            nats: Some(bpd),
            stderr_nats: Some(0.1),
            bits_per_dim: Some(bpd),
            stderr_bits_per_dim: Some(0.1),
            n: 10,
            dims: 1,
            method: String::new(),
            checkpoint: String::new(),
            split: "test".into(),
        };
        let mut e = EntryReport::failed("ddpm", Path::new("/nonexistent"), String::new());
        e.status = EntryStatus::Ok;
        e.error = None;
        e.rows = vec![
            row("vlb", NllKind::Bound, 2.2),
            row("pf-ode", NllKind::Estimate { samples: 2 }, 2.1),
            row("exact", NllKind::Exact, 2.0),
        ];
        let bad = EntryReport::failed("bad", Path::new("/nonexistent"), "<oops>".into());
        let html = render(&CompareReport::new("s", false, vec![e, bad])).unwrap();
        let chart = &html[html.find("<svg").unwrap()..html.find("</svg>").unwrap()];
        assert_eq!(
            chart.matches("<polygon").count(),
            1,
            "one bound: a triangle"
        );
        assert_eq!(
            chart.matches("<circle").count(),
            1,
            "one estimate: a circle"
        );
        assert_eq!(
            chart.matches("width=\"8\" height=\"8\"").count(),
            1,
            "one exact: a square"
        );
        assert_eq!(html.matches("<tr class=\"row").count(), 4);
        assert!(html.contains("failed: &lt;oops&gt;") && !html.contains("<oops>"));
        // sorted by bits/dim: exact (2.0) before pf-ode (2.1) before vlb (2.2)
        let pos = |s: &str| html.find(&format!("<td>{s}</td>")).unwrap();
        assert!(pos("exact") < pos("pf-ode") && pos("pf-ode") < pos("vlb"));
    }

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
