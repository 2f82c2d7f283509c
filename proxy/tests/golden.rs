//! Golden tests: `weft validate` on every invalid config under `golden/invalid/` prints exactly
//! its `.err` file and exits non-zero; every config under `golden/valid/` and `examples/` passes.
//!
//! `WEFT_BLESS=1 cargo test --test golden` rewrites the `.err` files (review the diff!).

use std::path::{Path, PathBuf};
use std::process::Command;

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

fn validate(dir: &Path, file: &Path) -> (bool, String, String) {
    let out = Command::new(WEFT)
        .current_dir(dir)
        .args(["validate", "--config"])
        .arg(file.file_name().expect("file name"))
        .output()
        .expect("weft runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_configs_print_their_golden_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/invalid");
    let bless = std::env::var_os("WEFT_BLESS").is_some();
    let mut failures = Vec::new();
    let files = yaml_files(&dir);
    assert!(files.len() >= 10, "golden cases are missing");
    for file in files {
        let (ok, _, stderr) = validate(&dir, &file);
        let golden = file.with_extension("err");
        if ok {
            failures.push(format!("{}: validated but must not", file.display()));
            continue;
        }
        if bless {
            std::fs::write(&golden, &stderr).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|_| format!("<missing {}>", golden.display()));
        if want != stderr {
            failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{stderr}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn valid_configs_and_examples_pass() {
    // The examples name the built-in filters' modules: build them first.
    weft_testkit::filters::builtin("telemetry");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [root.join("tests/golden/valid"), root.join("../examples")] {
        let files = yaml_files(&dir);
        assert!(!files.is_empty(), "no configs in {}", dir.display());
        for file in files {
            let (ok, stdout, stderr) = validate(&dir, &file);
            assert!(ok, "{}: {stderr}", file.display());
            assert!(stdout.contains("valid"), "{stdout}");
        }
    }
}
