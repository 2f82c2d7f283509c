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

/// Canonicalizes `path` (no query) as the listener's options say.
pub fn canonicalize<'a>(path: &'a str, opts: &PathOptions) -> Result<Canonical<'a>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    let bytes = path.as_bytes();
    // Fast path: nothing to decode, no dot segment, no double slash.
    let suspicious = bytes.iter().any(|&b| matches!(b, b'%' | b'\\' | b';'))
        || (opts.normalize && (path.contains("/.")))
        || (opts.merge_slashes && path.contains("//"));
    if !suspicious {
        return Ok(Canonical::Path(Cow::Borrowed(path)));
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Forbidden);
    }

    // Decode percent-encodings we are allowed to (unreserved always when normalizing;
    // slashes when unescaping), upper-case the rest.
    let mut decoded = String::with_capacity(path.len());
    let mut unescaped_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(b as char);
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
                EscapedSlashes::UnescapeAndRedirect => {
                    decoded.push('/');
                    unescaped_slash = true;
                }
                EscapedSlashes::Keep => {
                    decoded.push('%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                    decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
            }
        } else if opts.normalize && is_unreserved(c) {
            decoded.push(c as char);
        } else {
            decoded.push('%');
            decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
            decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
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
        return Ok(Canonical::Redirect(out));
    }
    if out == path {
        Ok(Canonical::Path(Cow::Borrowed(path)))
    } else {
        Ok(Canonical::Path(Cow::Owned(out)))
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
}
