#![no_main]
//! The path canonicalizer: never panics, and what it returns is canonical again (every
//! spelling of a path has one form), for every combination of options.

use libfuzzer_sys::fuzz_target;
use weft_proxy::config::{EscapedSlashes, PathOptions};
use weft_proxy::http::path::{Canonical, canonicalize};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = PathOptions {
        normalize: flags & 1 != 0,
        merge_slashes: flags & 2 != 0,
        escaped_slashes: match (flags >> 2) % 3 {
            0 => EscapedSlashes::Reject,
            1 => EscapedSlashes::Keep,
            _ => EscapedSlashes::UnescapeAndRedirect,
        },
    };
    let out = match canonicalize(path, &opts) {
        Ok(Canonical::Path(p)) => p.into_owned(),
        Ok(Canonical::Redirect(to)) => {
            assert!(!to.starts_with("//"), "{path:?} redirects to {to:?}");
            to
        }
        Err(_) => return,
    };
    assert!(out.starts_with('/'), "{path:?} -> {out:?}");
    match canonicalize(&out, &opts) {
        Ok(Canonical::Path(again)) => {
            assert_eq!(
                again, out,
                "{path:?} -> {out:?} is not canonical with {opts:?}"
            )
        }
        other => panic!("{path:?} -> {out:?} -> {other:?} with {opts:?}"),
    }
    if opts.normalize {
        assert!(
            !out.split('/').any(|s| s == "." || s == ".."),
            "{path:?} -> {out:?} keeps a dot segment"
        );
        assert!(out.is_ascii(), "{path:?} -> {out:?} carries a raw byte");
    }
    if opts.merge_slashes {
        assert!(!out.contains("//"), "{path:?} -> {out:?}");
    }
});
