//! Load an HTML report in a real headless Chromium and read back what the page saw: console
//! errors, images that fail to decode, the likelihood table's rows; and take a screenshot.
//!
//! The browser is found on PATH (`chromium-headless-shell`, `chromium`, `chromium-browser`,
//! `google-chrome`) or named by `ELBO_BROWSER`. Without one the check is skipped with a message,
//! unless `ELBO_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs Chromium): then it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the page reported once every image had settled.
#[derive(Debug)]
pub struct PageProbe {
    /// Number of `<img>` elements.
    pub images: usize,
    /// Images that failed to decode or decoded to nothing (their `alt` text).
    pub bad_images: Vec<String>,
    /// The first cell (entry name) of every `#likelihoods tr.row`.
    pub row_entries: Vec<String>,
    /// `console.error` calls, uncaught exceptions and failed resource loads.
    pub errors: Vec<String>,
}

const BROWSERS: [&str; 4] = [
    "chromium-headless-shell",
    "chromium",
    "chromium-browser",
    "google-chrome",
];

/// The browser to use, or `None` (after printing why) when the check should be skipped.
pub fn find_browser() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("ELBO_BROWSER") {
        return Some(PathBuf::from(b));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in BROWSERS {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let required = std::env::var("ELBO_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "ELBO_REQUIRE_BROWSER=1 but no headless Chromium on PATH ({BROWSERS:?}); \
         install chromium-headless-shell (apt-get install chromium-headless-shell) or set ELBO_BROWSER"
    );
    eprintln!("skipping the browser check: no headless Chromium on PATH ({BROWSERS:?})");
    None
}

/// Script inserted first in `<head>`: it records errors from the moment parsing starts and, at
/// `load`, checks every image and writes the findings into `<pre id="elbo-probe">`.
const PROBE: &str = r#"<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target.tagName ? ' (' + e.target.tagName + ')' : '';
  window.__errs.push('error: ' + (e.message || 'resource failed') + t);
}, true);
(function () {
  var ce = console.error;
  console.error = function () {
    window.__errs.push('console.error: ' + Array.from(arguments).join(' '));
    ce.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  // `load` waits for every image, so each one has decoded (naturalWidth > 0) or failed (0)
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
    .map(function (i) { return i.alt; });
  var rows = Array.from(document.querySelectorAll('#likelihoods tr.row'))
    .map(function (tr) { return tr.cells[0].textContent; });
  var out = document.createElement('pre');
  out.id = 'elbo-probe';
  out.textContent = 'ELBO-' + 'PROBE ' + JSON.stringify({
    images: imgs.length, bad: bad, rows: rows, errors: window.__errs });
  document.body.appendChild(out);
});
</script>"#;

/// Load `html` (a report file) with the probe inserted and return what it found.
pub fn probe_page(browser: &Path, html: &Path) -> PageProbe {
    let text = std::fs::read_to_string(html).unwrap();
    assert!(text.contains("<head>"), "{} has no <head>", html.display());
    let probed = html.with_file_name("probed.html");
    std::fs::write(
        &probed,
        text.replacen("<head>", &format!("<head>{PROBE}"), 1),
    )
    .unwrap();
    let o = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--virtual-time-budget=10000", "--dump-dom"])
        .arg(format!(
            "file://{}",
            probed.canonicalize().unwrap().display()
        ))
        .output()
        .expect("failed to start the browser");
    let dom = String::from_utf8_lossy(&o.stdout);
    let json = dom
        .split("ELBO-PROBE ")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| {
            panic!(
                "the page never reported (status {}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )
        });
    let json = json
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap_or("").to_string())
            .collect()
    };
    PageProbe {
        images: v["images"].as_u64().unwrap() as usize,
        bad_images: strings("bad"),
        row_entries: strings("rows"),
        errors: strings("errors"),
    }
}

/// A laptop-sized screenshot of `html` written to `png`; returns the PNG's bytes.
pub fn screenshot(browser: &Path, html: &Path, png: &Path) -> Vec<u8> {
    let o = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .args(["--window-size=1280,1300", "--virtual-time-budget=10000"])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.canonicalize().unwrap().display()))
        .output()
        .expect("failed to start the browser");
    std::fs::read(png).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}; status {}): {}",
            png.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )
    })
}
