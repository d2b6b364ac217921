//! The `htu` comparison of RFC 9449 §4.3 (point 9): the proof's URI
//! without query and fragment, against the token endpoint's, after the
//! syntax-based normalisation of RFC 3986 §6.2.2 and the scheme-based one
//! of §6.2.3 that matter between a client and this server: scheme and host
//! are case-insensitive, a default port is the same as none, an empty path
//! is `/`, and percent-encodings compare with upper-case hex.

/// `uri` normalised for comparison, without query and fragment; `None`
/// if it is not an absolute `http` or `https` URI with a host (or carries
/// user information, which a token endpoint URL never has).
pub fn normalise(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    // Query and fragment are not compared (RFC 9449 §4.3).
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    // The port follows the last colon outside an IPv6 literal's brackets.
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], &authority[i + 1..]),
        _ => (authority, ""),
    };
    if host.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut out = String::with_capacity(uri.len());
    out.push_str(&scheme);
    out.push_str("://");
    out.push_str(&host.to_ascii_lowercase());
    // ":80" on http, ":" alone, and leading zeros name the default port
    // (RFC 3986 §6.2.3).
    let port = port.trim_start_matches('0');
    if !port.is_empty() && port != default_port {
        out.push(':');
        out.push_str(port);
    }
    if path.is_empty() {
        out.push('/');
    }
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = bytes.next()?;
            let lo = bytes.next()?;
            if !hi.is_ascii_hexdigit() || !lo.is_ascii_hexdigit() {
                return None;
            }
            out.push('%');
            out.push(hi.to_ascii_uppercase() as char);
            out.push(lo.to_ascii_uppercase() as char);
        } else {
            out.push(b as char);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_host_case_default_port_query_and_fragment_do_not_matter() {
        let want = normalise("https://as.example/oauth2/token").unwrap();
        for same in [
            "HTTPS://AS.Example/oauth2/token",
            "https://as.example:443/oauth2/token",
            "https://as.example/oauth2/token?x=1",
            "https://as.example/oauth2/token#f",
        ] {
            assert_eq!(normalise(same).as_deref(), Some(&*want), "{same}");
        }
        for other in [
            "https://as.example/oauth2/Token",
            "https://as.example:8443/oauth2/token",
            "http://as.example/oauth2/token",
            "https://other.example/oauth2/token",
            "https://as.example/oauth2/token/",
        ] {
            assert_ne!(normalise(other).as_deref(), Some(&*want), "{other}");
        }
        assert_eq!(
            normalise("http://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(
            normalise("http://[::1]:80/a%2fb").as_deref(),
            Some("http://[::1]/a%2Fb")
        );
    }

    #[test]
    fn what_is_not_an_http_uri_is_refused() {
        for bad in [
            "",
            "/oauth2/token",
            "ftp://as.example/x",
            "https:///x",
            "https://user@as.example/x",
            "https://as.example:x/",
            "https://as.example/%zz",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
    }
}
