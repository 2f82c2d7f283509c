//! The proxy's modules form layers: a request's stages from the top (accept) down, then the
//! services they use, then leaves. A module may use the modules of its own entry and of entries
//! below it, never one above; this test reads every source file of the library and fails on a
//! `crate::` or `super::` path that goes up, naming the file, the line and the rule it breaks.
//! The few edges that must go up are allowed below, each with its reason.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom first. A module belongs to the entry with the longest matching prefix; modules of one
/// line share a rank and may not use one another.
const LAYERS: &[&[&str]] = &[
    // Numbers and addresses as bytes, for the leaves' text (access-log lines).
    &["text"],
    // Leaves: no stage, no service (`http` only names its submodules).
    &[
        "http",
        "errors",
        "local",
        "peek",
        "splice",
        "logging",
        "config",
        "access_log",
    ],
    &["metrics", "http::path"],
    // TLS primitives (material, IO, ClientHello), module signatures, workload identity, then
    // the TLS contexts built from them.
    &["tls"],
    &["wasm::signing"],
    &["identity"],
    &["tls::client", "tls::server"],
    &["http::headers"],
    // Services the stages use: upstream clusters (balancing, pools, request bodies), the
    // route table, the Wasm host and its filter chain.
    &["upstream"],
    &["router"],
    &["wasm"],
    // The compiled configuration, and what the workers share of it.
    &["tcp::routes"],
    &["snapshot::listener"],
    &["sidecar"],
    &["snapshot"],
    &["published"],
    // The stages of an HTTP request, the last one first.
    &["http::conn"],
    &["http::record"],
    &["http::body"],
    &["http::respond"],
    &["http::check"],
    &["http::upgrade"],
    &["http::forward"],
    &["http::route"],
    &["http::filter"],
    &["http::request"],
    // Connections: HTTP, raw TCP, a sidecar's captured ones.
    &["http::server", "tcp"],
    &["sidecar::detect"],
    &["sidecar::capture"],
    // Accept, and the process around it.
    &["worker"],
    &["admin", "listener"],
    &["control"],
    &["process"],
];

/// Edges that go up on purpose: (from, to, why).
const ALLOWED: &[(&str, &str, &str)] = &[];

fn rank(module: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (i, line) in LAYERS.iter().enumerate() {
        for entry in *line {
            let matches = module == *entry || module.starts_with(&format!("{entry}::"));
            if matches && best.is_none_or(|(_, b)| entry.len() > b.len()) {
                best = Some((i, entry));
            }
        }
    }
    best
}

/// Every `.rs` file under `dir`, with its module path (`http/server.rs` → `http::server`).
fn modules(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read the source directory")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 file name")
            .to_owned();
        if path.is_dir() {
            let sub = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}::{name}")
            };
            modules(&path, &sub, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = match (prefix.is_empty(), name.as_str()) {
                (true, "lib" | "main") => continue,
                // A module's unit tests, in a file of their own: tests may use anything.
                (_, "tests") => continue,
                (true, _) => name,
                (false, "mod") => prefix.to_owned(),
                (false, _) => format!("{prefix}::{name}"),
            };
            out.push((module, path));
        }
    }
}

/// The source without comments, string literals and `#[cfg(test)]` modules (tests may use
/// anything).
fn code(source: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_test = false;
    for line in source.lines() {
        let text = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let text = strip_strings(text);
        let trimmed = text.trim();
        if trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
        } else if pending_test && trimmed.starts_with("mod ") && skip_depth.is_none() {
            skip_depth = Some(depth);
            pending_test = false;
        } else if !trimmed.is_empty() && !trimmed.starts_with("#[") {
            pending_test = false;
        }
        let opens = text.matches('{').count() as i32;
        let closes = text.matches('}').count() as i32;
        let skipping = skip_depth.is_some();
        depth += opens - closes;
        if let Some(d) = skip_depth
            && depth <= d
            && closes > 0
        {
            skip_depth = None;
        }
        lines.push(if skipping { String::new() } else { text });
    }
    lines
}

fn strip_strings(line: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        if c == '"' {
            in_str = true;
            continue;
        }
        out.push(c);
    }
    out
}

/// The module paths a line names: `crate::a::b`, `super::c`, and the items of
/// `use crate::a::{b, c::d}` groups (one level).
fn targets(module: &str, is_mod_file: bool, line: &str, known: &BTreeSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    let parent: Vec<&str> = {
        let mut parts: Vec<&str> = module.split("::").collect();
        if !is_mod_file {
            parts.pop();
        }
        parts
    };
    for (start, root) in [("crate::", Vec::new()), ("super::", parent.clone())] {
        let mut rest = line;
        while let Some(i) = rest.find(start) {
            let preceded = rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            let tail = &rest[i + start.len()..];
            rest = tail;
            if preceded {
                continue;
            }
            let mut base: Vec<String> = root.iter().map(|s| s.to_string()).collect();
            let path: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':' || *c == '{')
                .collect();
            let (head, group) = match path.split_once('{') {
                Some((h, _)) => {
                    let inner = tail[tail.find('{').map_or(0, |j| j + 1)..]
                        .split('}')
                        .next()
                        .unwrap_or("");
                    (h.trim_end_matches(':').to_owned(), Some(inner.to_owned()))
                }
                None => (path.trim_end_matches(':').to_owned(), None),
            };
            base.extend(head.split("::").filter(|s| !s.is_empty()).map(String::from));
            let mut candidates = Vec::new();
            if group.is_none() {
                candidates.push(base.clone());
            }
            if let Some(group) = group {
                for item in group.split(',') {
                    let item = item.trim();
                    let first = item.split("::").next().unwrap_or("").trim();
                    if first == "self" {
                        candidates.push(base.clone());
                    }
                    if first.is_empty() || first == "self" {
                        continue;
                    }
                    let mut c = base.clone();
                    c.extend(item.split("::").map(|s| s.trim().to_owned()));
                    candidates.push(c);
                }
            }
            for c in candidates {
                // The longest prefix that is a module.
                for n in (1..=c.len()).rev() {
                    let m = c[..n].join("::");
                    if known.contains(&m) {
                        found.push(m);
                        break;
                    }
                }
            }
        }
    }
    found
}

#[test]
fn no_module_uses_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    modules(&src, "", &mut files);
    assert!(files.len() > 50, "found only {} source files", files.len());
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut unranked = Vec::new();
    let mut violations = Vec::new();
    let mut used_allowances = BTreeSet::new();
    for (module, path) in &files {
        let Some((from_rank, from_entry)) = rank(module) else {
            unranked.push(module.clone());
            continue;
        };
        let source = std::fs::read_to_string(path).expect("read a source file");
        let is_mod_file = path.file_name().is_some_and(|n| n == "mod.rs");
        for (n, line) in code(&source).iter().enumerate() {
            for target in targets(module, is_mod_file, line, &known) {
                let Some((to_rank, to_entry)) = rank(&target) else {
                    continue;
                };
                if to_entry == from_entry || to_rank < from_rank {
                    continue;
                }
                if let Some(a) = ALLOWED
                    .iter()
                    .find(|(f, t, _)| module.starts_with(f) && target.starts_with(t))
                {
                    used_allowances.insert((a.0, a.1));
                    continue;
                }
                let rel = path.strip_prefix(&src).unwrap_or(path);
                violations.push(format!(
                    "src/{}:{}: {module} (layer of `{from_entry}`) uses {target} (layer of `{to_entry}`, {})",
                    rel.display(),
                    n + 1,
                    if to_rank == from_rank {
                        "the same rank"
                    } else {
                        "above it"
                    }
                ));
            }
        }
    }
    assert!(
        unranked.is_empty(),
        "modules with no place in LAYERS: {unranked:?}"
    );
    let unused: Vec<_> = ALLOWED
        .iter()
        .filter(|(f, t, _)| !used_allowances.contains(&(*f, *t)))
        .collect();
    assert!(
        unused.is_empty(),
        "allowed edges no module uses any more (remove them): {unused:?}"
    );
    assert!(
        violations.is_empty(),
        "{} upward uses:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_uses_in_every_form() {
    let known: BTreeSet<String> = ["http", "http::server", "http::request", "worker", "errors"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = |m: &str, line: &str| targets(m, false, line, &known);
    assert_eq!(t("http::server", "use crate::worker::Worker;"), ["worker"]);
    assert_eq!(
        t("http::server", "use crate::http::{request, server::X};"),
        ["http::request", "http::server"]
    );
    assert_eq!(t("http::server", "use super::request;"), ["http::request"]);
    assert_eq!(
        t(
            "http::server",
            "let x = crate::errors::ProxyError::NoRoute;"
        ),
        ["errors"]
    );
    assert!(t("http::server", "use weft_crate::worker;").is_empty());
    let stripped = code(
        "use crate::a; // crate::worker\nlet s = \"crate::worker\";\n#[cfg(test)]\nmod tests {\n    use crate::worker;\n}\nuse crate::b;\n",
    );
    assert!(
        !stripped.iter().any(|l| l.contains("worker")),
        "{stripped:?}"
    );
    assert!(stripped.iter().any(|l| l.contains("crate::b")));
    assert_eq!(rank("http::server").map(|r| r.1), Some("http::server"));
    assert_eq!(rank("wasm::host::headers").map(|r| r.1), Some("wasm"));
    assert_eq!(rank("wasm::signing").map(|r| r.1), Some("wasm::signing"));
}
