//! Path canonicalization: one view of the path, computed once per request, used by the router,
//! by filters and sent upstream — so nothing authorizes one path and forwards another.

use std::borrow::Cow;

use crate::config::{EscapedSlashes, PathOptions};

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadEncoding,
    /// `%2F` / `%5C` with `escaped_slashes: reject`.
    EscapedSlash,
    /// A `.`/`..` segment carrying `;` parameters (`/..;x=y/`), which some backends resolve.
    DotSegmentParams,
    /// Raw `\` or an encoded NUL / control character.
    Forbidden,
    /// Not an origin-form path (`*` or empty) where one is required.
    NotOriginForm,
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            PathError::BadEncoding => "malformed percent-encoding",
            PathError::EscapedSlash => "encoded slash or backslash",
            PathError::DotSegmentParams => "dot segment with parameters",
            PathError::Forbidden => "forbidden character",
            PathError::NotOriginForm => "not an absolute path",
        }
    }
}

/// The outcome of canonicalizing.
#[derive(Debug, PartialEq, Eq)]
pub enum Canonical<'a> {
    /// Route and forward this path.
    Path(Cow<'a, str>),
    /// `unescape_and_redirect`: send the client to this path instead.
    Redirect(String),
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes a path segment may carry as they are (RFC 3986 `pchar` without `%`, plus `/`):
/// unreserved, sub-delims, `:` and `@`.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_encoded(out: &mut String, b: u8) {
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// Canonicalizes `path` (no query) as the listener's options say.
///
/// With `normalize` (the default), every spelling of one path has one canonical form:
/// percent-encoded unreserved characters are decoded, every other percent-encoding is
/// upper-cased, bytes a path may not carry as they are (non-ASCII, `"`, `{`, `|`, …) are
/// percent-encoded, `.` and `..` segments are resolved, and (with `merge_slashes`) runs of `/`
/// collapse. The result is canonical again: canonicalizing it changes nothing.
pub fn canonicalize<'a>(path: &'a str, opts: &PathOptions) -> Result<Canonical<'a>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let bytes = path.as_bytes();
    // Fast path: only plain path characters, no dot segment, no double slash.
    let suspicious = bytes.iter().any(|&b| !is_path_char(b) || b == b';')
        || (opts.normalize && (path.contains("/.")))
        || (opts.merge_slashes && path.contains("//"));
    if !suspicious {
        return Ok(Canonical::Path(Cow::Borrowed(path)));
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Forbidden);
    }

    // Decode percent-encodings we are allowed to (unreserved always when normalizing;
    // slashes when unescaping), upper-case the rest, encode what may not appear raw.
    let mut decoded = String::with_capacity(path.len() + 8);
    let mut unescaped_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if b < 0x20 || b == 0x7f {
                return Err(PathError::Forbidden);
            }
            if is_path_char(b) || !opts.normalize {
                // Without normalization a path passes as it came (the URI parser has already
                // refused what HTTP does not allow).
                if b.is_ascii() {
                    decoded.push(b as char);
                } else {
                    // Part of a UTF-8 character: copy the whole character.
                    let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
                    decoded.push_str(&path[i..i + ch_len]);
                    i += ch_len;
                    continue;
                }
            } else {
                push_encoded(&mut decoded, b);
            }
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEncoding);
        };
        let c = h << 4 | l;
        if c < 0x20 || c == 0x7f {
            return Err(PathError::Forbidden);
        }
        if c == b'/' || c == b'\\' {
            match opts.escaped_slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                // Both become `/`, as a browser reads `\` in an http URL.
                EscapedSlashes::UnescapeAndRedirect => {
                    decoded.push('/');
                    unescaped_slash = true;
                }
                EscapedSlashes::Keep => push_encoded(&mut decoded, c),
            }
        } else if opts.normalize && is_unreserved(c) {
            decoded.push(c as char);
        } else {
            push_encoded(&mut decoded, c);
        }
        i += 3;
    }

    for seg in decoded.split('/') {
        if let Some((name, _params)) = seg.split_once(';')
            && (name == "." || name == "..")
        {
            return Err(PathError::DotSegmentParams);
        }
    }

    let mut out = if opts.merge_slashes {
        merge_slashes(&decoded)
    } else {
        decoded
    };
    if opts.normalize {
        out = remove_dot_segments(&out);
    }
    if unescaped_slash {
        return Ok(Canonical::Redirect(no_scheme_relative(out)));
    }
    if out == path {
        Ok(Canonical::Path(Cow::Borrowed(path)))
    } else {
        Ok(Canonical::Path(Cow::Owned(out)))
    }
}

/// A path used as a `Location` must not start with `//`: a client would read it as another
/// host (`//evil.example/`).
pub fn no_scheme_relative(mut path: String) -> String {
    if path.starts_with("//") {
        let extra = path.len() - path.trim_start_matches('/').len() - 1;
        path.replace_range(..extra, "");
    }
    path
}

/// Canonicalizes a request target, `path[?query]`: `Ok(None)` when it is canonical already,
/// `Ok(Some(target))` with the canonical path and the query as it was otherwise. A target that
/// would need a redirect is refused here: only a client's own request is redirected.
pub fn canonical_target(target: &str, opts: &PathOptions) -> Result<Option<String>, PathError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    match canonicalize(path, opts)? {
        Canonical::Path(Cow::Borrowed(_)) => Ok(None),
        Canonical::Path(Cow::Owned(p)) => Ok(Some(match query {
            Some(q) => format!("{p}?{q}"),
            None => p,
        })),
        Canonical::Redirect(_) => Err(PathError::EscapedSlash),
    }
}

fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut prev_slash = false;
    for c in p.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments vanish, `..` removes the one before it,
/// and nothing climbs above the root.
fn remove_dot_segments(p: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = p.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, s) in parts.iter().enumerate() {
        match *s {
            "." => trailing_slash = i == last,
            ".." => {
                segs.pop();
                trailing_slash = i == last;
            }
            s => {
                segs.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(p.len());
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(p: &str) -> Result<String, PathError> {
        canon_with(p, &PathOptions::default())
    }

    fn canon_with(p: &str, o: &PathOptions) -> Result<String, PathError> {
        canonicalize(p, o).map(|c| match c {
            Canonical::Path(p) => p.into_owned(),
            Canonical::Redirect(p) => format!("redirect:{p}"),
        })
    }

    #[test]
    fn dot_segments() {
        assert_eq!(canon("/a/b/../c").as_deref(), Ok("/a/c"));
        assert_eq!(canon("/info/../private").as_deref(), Ok("/private"));
        assert_eq!(canon("/../../etc/passwd").as_deref(), Ok("/etc/passwd"));
        assert_eq!(canon("/a/./b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(canon("/a/..").as_deref(), Ok("/"));
        assert_eq!(canon("/a/.hidden").as_deref(), Ok("/a/.hidden"));
    }

    #[test]
    fn encodings() {
        assert_eq!(canon("/%61%62c").as_deref(), Ok("/abc"));
        assert_eq!(canon("/public/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(canon("/a%3fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(canon("/a%zz"), Err(PathError::BadEncoding));
        assert_eq!(canon("/a%00"), Err(PathError::Forbidden));
        assert_eq!(canon("/a\\b"), Err(PathError::Forbidden));
    }

    #[test]
    fn escaped_slashes_follow_the_option() {
        assert_eq!(
            canon("/something%2F..%2Fadmin"),
            Err(PathError::EscapedSlash)
        );
        let keep = PathOptions {
            escaped_slashes: EscapedSlashes::Keep,
            ..Default::default()
        };
        assert_eq!(canon_with("/a%2fb", &keep).as_deref(), Ok("/a%2Fb"));
        let redirect = PathOptions {
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
            ..Default::default()
        };
        assert_eq!(
            canon_with("/something%2F..%2Fadmin", &redirect).as_deref(),
            Ok("redirect:/admin")
        );
    }

    #[test]
    fn slashes_and_params() {
        assert_eq!(canon("//a///b").as_deref(), Ok("/a/b"));
        assert_eq!(
            canon("/user/..;foo=bar/admin"),
            Err(PathError::DotSegmentParams)
        );
        assert_eq!(canon("/a;v=1/b").as_deref(), Ok("/a;v=1/b"));
        let off = PathOptions {
            normalize: false,
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
        };
        assert_eq!(canon_with("//a/../b", &off).as_deref(), Ok("//a/../b"));
        assert_eq!(canon("*"), Err(PathError::NotOriginForm));
    }

    #[test]
    fn bytes_a_path_may_not_carry_raw_are_encoded() {
        assert_eq!(canon("/caf\u{e9}").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(canon("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(canon("/a\"b{c}|d").as_deref(), Ok("/a%22b%7Bc%7D%7Cd"));
        assert_eq!(canon("/a%7b").as_deref(), Ok("/a%7B"));
        assert_eq!(canon("/a\u{7f}"), Err(PathError::Forbidden));
    }

    #[test]
    fn redirects_never_name_another_host() {
        let o = PathOptions {
            normalize: false,
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
        };
        assert_eq!(
            canon_with("//evil.example%2Fx", &o).as_deref(),
            Ok("redirect:/evil.example/x")
        );
        assert_eq!(
            canon_with("/%2F%2Fevil", &o).as_deref(),
            Ok("redirect:/evil")
        );
    }

    /// Pieces hostile paths are made of: every spelling of a separator, a dot, a letter.
    const PIECES: &[&str] = &[
        "/", "//", ".", "..", "%2e", "%2E", "%2e%2E", "%2F", "%2f", "%5C", "%5c", "\\", "a",
        "admin", "%61", "%41dmin", ";p=1", ";", "%3B", "%00", "%0a", "%252e", "%25", "%", "%g1",
        "%2", "~", "%7e", "%7E", "\u{e9}", "%C3%A9", "%c3%a9", "{", "\"", "|", "@", ":", "+",
        "%20", "*", "!", "%7f",
    ];

    fn generated(rng: &mut fastrand::Rng) -> String {
        let mut p = String::from("/");
        for _ in 0..rng.usize(0..10) {
            p.push_str(PIECES[rng.usize(..PIECES.len())]);
        }
        p
    }

    fn all_options() -> Vec<PathOptions> {
        let mut v = Vec::new();
        for normalize in [true, false] {
            for merge_slashes in [true, false] {
                for escaped_slashes in [
                    EscapedSlashes::Reject,
                    EscapedSlashes::Keep,
                    EscapedSlashes::UnescapeAndRedirect,
                ] {
                    v.push(PathOptions {
                        normalize,
                        merge_slashes,
                        escaped_slashes,
                    });
                }
            }
        }
        v
    }

    #[test]
    fn canonical_paths_are_canonical_again() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for opts in all_options() {
            for _ in 0..20_000 {
                let p = generated(&mut rng);
                let c = match canonicalize(&p, &opts) {
                    Ok(Canonical::Path(c)) => c.into_owned(),
                    Ok(Canonical::Redirect(to)) => {
                        assert!(!to.starts_with("//"), "{p:?} redirects to {to:?}");
                        // Following the redirect lands on a path that is served as it is.
                        to
                    }
                    Err(_) => continue,
                };
                assert_eq!(
                    canonicalize(&c, &opts),
                    Ok(Canonical::Path(Cow::Borrowed(c.as_str()))),
                    "{p:?} -> {c:?} is not canonical with {opts:?}"
                );
                if opts.normalize {
                    let segs: Vec<&str> = c.split('/').skip(1).collect();
                    assert!(
                        !segs.iter().any(|s| *s == "." || *s == ".."),
                        "{p:?} -> {c:?} keeps a dot segment"
                    );
                    assert!(
                        c.bytes().all(|b| is_path_char(b) || b == b'%'),
                        "{p:?} -> {c:?} carries a raw byte"
                    );
                }
                if opts.merge_slashes {
                    assert!(!c.contains("//"), "{p:?} -> {c:?}");
                }
            }
        }
    }

    /// Spelling an unreserved character encoded (`%61` for `a`, `%2E` for `.`) never changes
    /// what a path canonicalizes to.
    #[test]
    fn every_spelling_of_a_path_has_one_canonical_form() {
        let mut rng = fastrand::Rng::with_seed(0xface);
        let opts = PathOptions::default();
        for _ in 0..50_000 {
            let p = generated(&mut rng);
            let Ok(plain) = canonicalize(&p, &opts) else {
                continue;
            };
            // Re-spell each unreserved ASCII character, at random, percent-encoded.
            let mut spelled = String::new();
            let mut escape_left = 0;
            for ch in p.chars() {
                if ch == '%' {
                    escape_left = 3;
                }
                if escape_left > 0 {
                    // Part of an escape (or of a malformed one): left as it is.
                    escape_left -= 1;
                    spelled.push(ch);
                } else if ch.is_ascii() && is_unreserved(ch as u8) && rng.bool() {
                    spelled.push('%');
                    let b = ch as u8;
                    let hexes = if rng.bool() {
                        b"0123456789abcdef"
                    } else {
                        b"0123456789ABCDEF"
                    };
                    spelled.push(hexes[usize::from(b >> 4)] as char);
                    spelled.push(hexes[usize::from(b & 0xf)] as char);
                } else {
                    spelled.push(ch);
                }
            }
            let other = canonicalize(&spelled, &opts);
            match (&plain, &other) {
                (Canonical::Path(a), Ok(Canonical::Path(b))) => {
                    assert_eq!(a, b, "{p:?} and {spelled:?}")
                }
                (Canonical::Redirect(a), Ok(Canonical::Redirect(b))) => {
                    assert_eq!(a, b, "{p:?} and {spelled:?}")
                }
                _ => panic!("{p:?} -> {plain:?} but {spelled:?} -> {other:?}"),
            }
        }
    }
}
