//! CI smoke run: 10^4 fuzzed inputs per loader, none may panic, and both outcomes occur (so the
//! generators make valid inputs and the mutations make invalid ones).

use std::time::Duration;

use elbo_fuzz::{fuzz, Loader};

#[test]
fn ten_thousand_inputs_per_loader_without_a_panic() {
    let out = tempfile::tempdir().unwrap();
    for loader in Loader::ALL {
        let r = fuzz(
            loader,
            10_000,
            7,
            Duration::from_secs(10),
            out.path(),
            false,
        );
        eprintln!("{}: {r:?}", loader.name());
        assert_eq!(r.inputs, 10_000);
        assert_eq!(r.failures, 0, "{}: {:?}", loader.name(), r.repro_files);
        assert_eq!(r.errors + r.accepted, r.inputs);
        assert!(
            r.accepted > 100,
            "{}: too few valid inputs: {r:?}",
            loader.name()
        );
        assert!(
            r.errors > 100,
            "{}: too few rejections: {r:?}",
            loader.name()
        );
        // the mutations reach the deep checks, not only the first one
        let reached = |what: &str| r.rejection_kinds.keys().any(|k| k.contains(what));
        let deep: &[&str] = match loader {
            Loader::Npy => &[
                "structured",
                "truncated data",
                "unsupported dtype",
                "bad header",
            ],
            Loader::Csv => &[
                "expected a number",
                "fields like the rows above",
                "not UTF-",
            ],
            Loader::Text => &["holds out"],
            Loader::Config => &["fuzz.toml"],
            Loader::Checkpoint => &[
                "not a valid safetensors file",
                "corrupted: FNV-a hash",
                "truncated or overwritten",
                "state.json: invalid JSON",
            ],
        };
        for what in deep {
            assert!(
                reached(what),
                "{}: no rejection '{what}' in {:#?}",
                loader.name(),
                r.rejection_kinds
            );
        }
    }
}
