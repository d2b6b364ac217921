//! `application/x-www-form-urlencoded` bodies (and query strings) as RFC 6749
//! reads them: every parameter at most once, an empty value the same as an
//! absent one (§3.1, §3.2).
//!
//! Written by hand rather than through `serde_urlencoded`, because a
//! duplicated parameter must be an error, not "the last one wins", and
//! because this is the server's one parser of untrusted bytes before the
//! token parser: small enough to read in full and to fuzz.

use std::borrow::Cow;
use std::fmt;

/// Most parameters a form may carry; a token request has at most seven.
pub const MAX_PARAMS: usize = 64;

/// Why a form was refused. The text is safe to show the client: it names a
/// parameter, never a value.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormError {
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// A name or value that is not UTF-8 after decoding.
    NotUtf8,
    /// The same parameter twice (RFC 6749 §3.2).
    Duplicate {
        /// The parameter's name, cut to 64 bytes.
        name: String,
    },
    /// More than [`MAX_PARAMS`] parameters.
    TooMany,
}

impl fmt::Display for FormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormError::BadPercentEncoding => f.write_str("malformed percent-encoding"),
            FormError::NotUtf8 => f.write_str("parameters must be UTF-8"),
            FormError::Duplicate { name } => write!(f, "parameter {name} is repeated"),
            FormError::TooMany => write!(f, "more than {MAX_PARAMS} parameters"),
        }
    }
}

impl std::error::Error for FormError {}

/// A parsed form: each parameter at most once, empty values dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Form<'a> {
    pairs: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl fmt::Debug for Form<'_> {
    /// Names only: values are codes, tokens and secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.pairs.iter().map(|(k, _)| k))
            .finish()
    }
}

impl<'a> Form<'a> {
    /// The value of `name`, if present and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| &**v)
    }

    /// Parameter names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(k, _)| &**k)
    }

    /// Number of (non-empty) parameters.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Parse `input` (a request body or a query string without its `?`).
///
/// `+` is a space and `%XX` a byte; names and values must decode to UTF-8.
/// A parameter with an empty value is treated as absent (RFC 6749 §3.1), so
/// `a=&a=x` is one `a`; any other repetition is [`FormError::Duplicate`].
pub fn parse(input: &[u8]) -> Result<Form<'_>, FormError> {
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    for part in input.split(|b| *b == b'&') {
        if part.is_empty() {
            continue;
        }
        let (name, value) = match part.iter().position(|b| *b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &[][..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        if value.is_empty() {
            continue;
        }
        if pairs.iter().any(|(k, _)| *k == name) {
            let mut cut = name.len().min(64);
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            return Err(FormError::Duplicate {
                name: name[..cut].to_owned(),
            });
        }
        if pairs.len() == MAX_PARAMS {
            return Err(FormError::TooMany);
        }
        pairs.push((name, value));
    }
    Ok(Form { pairs })
}

/// Percent-decode one name or value, borrowing when nothing is encoded.
fn decode(raw: &[u8]) -> Result<Cow<'_, str>, FormError> {
    if !raw.iter().any(|b| *b == b'%' || *b == b'+') {
        return std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| FormError::NotUtf8);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = raw.get(i + 1).and_then(|b| hex(*b));
                let lo = raw.get(i + 2).and_then(|b| hex(*b));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => return Err(FormError::BadPercentEncoding),
                }
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| FormError::NotUtf8)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decode a whole string with `+` as space (for the parts of an
/// HTTP Basic credential, RFC 6749 §2.3.1).
pub(crate) fn decode_component(raw: &str) -> Result<String, FormError> {
    decode(raw.as_bytes()).map(Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_and_percent() {
        let f = parse(b"grant_type=refresh_token&scope=a+b%20c&x=%E2%9C%93").unwrap();
        assert_eq!(f.get("grant_type"), Some("refresh_token"));
        assert_eq!(f.get("scope"), Some("a b c"));
        assert_eq!(f.get("x"), Some("\u{2713}"));
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn duplicate_is_refused_and_names_only_the_parameter() {
        let e = parse(b"code=a&code=secret").unwrap_err();
        assert_eq!(e.to_string(), "parameter code is repeated");
        // Encoded differently, still the same name.
        assert!(matches!(
            parse(b"code=a&%63ode=b"),
            Err(FormError::Duplicate { .. })
        ));
    }

    #[test]
    fn empty_values_are_absent() {
        let f = parse(b"scope=&scope=x&&flag&y=").unwrap();
        assert_eq!(f.get("scope"), Some("x"));
        assert_eq!(f.get("flag"), None);
        assert_eq!(f.get("y"), None);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn malformed_encoding_is_refused() {
        assert_eq!(parse(b"a=%zz"), Err(FormError::BadPercentEncoding));
        assert_eq!(parse(b"a=%4"), Err(FormError::BadPercentEncoding));
        assert_eq!(parse(b"a=%ff"), Err(FormError::NotUtf8));
        assert_eq!(parse(b"a=\xff"), Err(FormError::NotUtf8));
    }

    #[test]
    fn too_many_parameters() {
        let body: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert_eq!(parse(body.join("&").as_bytes()), Err(FormError::TooMany));
    }

    #[test]
    fn debug_shows_names_not_values() {
        let f = parse(b"client_secret=hunter2").unwrap();
        let d = format!("{f:?}");
        assert!(d.contains("client_secret") && !d.contains("hunter2"), "{d}");
    }
}
