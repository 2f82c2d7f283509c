//! The behaviour filters of `tests/filters/` (one crate per behaviour, written with the public
//! `proxy-wasm` SDK), built for `wasm32-wasip1` once per test process, and paths to them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("filters")
}

fn build() -> Result<PathBuf, String> {
    ensure_target();
    let dir = workspace();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&dir)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip1",
        ])
        // The filters have a target directory of their own (another target, other flags).
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the test filters failed (is the target installed? `rustup target add wasm32-wasip1`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir.join("target/wasm32-wasip1/release"))
}

/// The `.wasm` of behaviour filter `name` (`headers`, `body`, `local`, `callout`, `grpc`,
/// `shared`, `queue`, `metrics`, `tick`, `properties`, `config`, `panic`, the service `hello`, and for
/// benchmarks `noop` and `add_header`).
pub fn path(name: &str) -> String {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(build)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join(format!("{name}.wasm"));
    assert!(
        file.exists(),
        "no test filter {name:?} at {}",
        file.display()
    );
    file.to_string_lossy().into_owned()
}

/// The built-in filters (`filters/`, written with weft-sdk) and the example filter, built for
/// `wasm32-wasip1` from the main workspace once per test process.
/// Adds the `wasm32-wasip1` target when rustup says it is missing (a fresh machine).
fn ensure_target() {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-wasip1"))
        .unwrap_or(true);
    if !installed {
        let _ = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip1"])
            .status();
    }
}

fn build_builtin() -> Result<PathBuf, String> {
    ensure_target();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .ok_or("no workspace root")?;
    let target = root.join("target/wasm-filters");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "--target",
        "wasm32-wasip1",
    ]);
    for p in BUILTIN {
        cmd.args(["-p", p]);
    }
    let out = cmd
        // A target directory of their own: the outer cargo holds the main one's lock.
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the built-in filters failed (is the target installed? `rustup target add wasm32-wasip1`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target.join("wasm32-wasip1/release"))
}

/// The packages [`builtin`] builds.
const BUILTIN: &[&str] = &[
    "weft-filter-fault",
    "weft-filter-quota",
    "weft-filter-policy",
    "weft-filter-telemetry",
    "weft-example-api-key",
];

/// The `.wasm` of built-in filter `name` (`fault`, `quota`, `policy`, `telemetry`, and the
/// example `api_key`). The first call builds them all (release, into `target/wasm-filters`).
pub fn builtin(name: &str) -> String {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(build_builtin)
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join(format!("{name}.wasm"));
    assert!(
        file.exists(),
        "no built-in filter {name:?} at {}",
        file.display()
    );
    file.to_string_lossy().into_owned()
}
