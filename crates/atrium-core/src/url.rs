//! Upstream URLs a tenant names (an `external` deployment's endpoint),
//! parsed into typed parts and written out again from those parts only.
//!
//! The gateway writes an upstream's path into its request line and its
//! host into the `Host` header: a carriage return, a line feed or a space
//! that got through would let a tenant inject headers and whole requests
//! into a connection. So nothing is passed on as the tenant wrote it: the
//! scheme, host, port and path are each checked against a narrow grammar
//! (no user info, no query or fragment, no control characters, no spaces,
//! no `..` segments) and the URL the gateway uses is re-serialised from
//! them. Which addresses the host may resolve to is the gateway's egress
//! policy, not a property of the URL.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Longest upstream URL accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An upstream's host: a DNS name (lowercased) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// A parsed `http(s)://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
    /// The path prefix without a trailing `/`: empty, or `/seg/seg`.
    pub path: String,
}

impl UpstreamUrl {
    /// Parses `text`, or says what is wrong with it in words a tenant can
    /// act on.
    pub fn parse(text: &str) -> Result<UpstreamUrl, String> {
        if text.len() > MAX_URL_LEN {
            return Err(format!(
                "is {} bytes long; at most {MAX_URL_LEN}",
                text.len()
            ));
        }
        if let Some(b) = text.bytes().find(|b| !b.is_ascii_graphic()) {
            return Err(format!(
                "contains the byte 0x{b:02x}: spaces, control characters and non-ASCII \
                 characters are not allowed (percent-encode them in the path)"
            ));
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            _ => return Err("must start with http:// or https://".into()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("must not carry user information (user:password@); give \
                        credentials another way"
                .into());
        }
        if path.contains(['?', '#']) {
            return Err("must not have a query or fragment: name the base URL only".into());
        }
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("port {p:?} is not a port number (1-65535)")),
                Ok(n) => n,
            },
        };
        Ok(UpstreamUrl {
            scheme,
            host: parse_host(host)?,
            port,
            path: parse_path(path)?,
        })
    }

    /// `host:port` as the `Host` header and a socket address want it.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}:{}{}",
            self.scheme.as_str(),
            self.host,
            self.port,
            self.path
        )
    }
}

fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), String> {
    if authority.is_empty() {
        return Err("has no host".into());
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (inner, after) = rest
            .split_once(']')
            .ok_or("has an unclosed '[' in its host")?;
        return match after {
            "" => Ok((inner, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((inner, Some(port))),
                None => Err(format!("has {after:?} after its IPv6 address")),
            },
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn parse_host(host: &str) -> Result<Host, String> {
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(IpAddr::V6(v6)));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "host {host:?} is neither an IP address nor a DNS name \
             (letters, digits, '-' and '.')"
        ));
    }
    // All-numeric dotted names are IPv4 in some resolvers' eyes and not in
    // others' ("0x7f.1", "127.1"): refuse the ambiguity.
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        || name
            .split('.')
            .next_back()
            .is_some_and(|l| l.starts_with("0x") || l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "host {host:?} looks like a malformed IP address; write it as a.b.c.d"
        ));
    }
    Ok(Host::Name(name))
}

/// A path of segments of RFC 3986 `pchar`s; `.` and `..` segments refused
/// (an upstream might resolve them where a proxy would not).
fn parse_path(path: &str) -> Result<String, String> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for segment in trimmed[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(format!("path {path:?} has an empty, '.' or '..' segment"));
        }
        let bytes = segment.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'%' {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
                if hex.is_none() {
                    return Err(format!(
                        "path {path:?} has a '%' not followed by two hex digits"
                    ));
                }
                i += 3;
                continue;
            }
            if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)) {
                return Err(format!(
                    "path {path:?} contains {:?}; percent-encode it",
                    char::from(b)
                ));
            }
            i += 1;
        }
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reserialises_from_parts() {
        let u = UpstreamUrl::parse("HTTP://API.Example.com/v1/").unwrap();
        assert_eq!(u.to_string(), "http://api.example.com:80/v1");
        assert_eq!(u.authority(), "api.example.com:80");
        let u = UpstreamUrl::parse("https://[::1]:8443").unwrap();
        assert_eq!(
            (u.host, u.port, u.path.as_str()),
            (Host::Ip("::1".parse().unwrap()), 8443, "")
        );
        let u = UpstreamUrl::parse("http://10.0.0.1:8000/openai/deployments/x%20y").unwrap();
        assert_eq!(u.path, "/openai/deployments/x%20y");
    }

    #[test]
    fn refuses_what_could_reach_a_request_line_or_header() {
        for bad in [
            "http://up:80/v1\r\nX-Injected: 1",
            "http://up:80/v1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /",
            "http://up/v1\nx",
            "http://up/a b",
            "http://up\t/",
            "http://user:pw@up/",
            "http://up/?q=1",
            "http://up/#f",
            "http://up/../admin",
            "http://up/a//b",
            "http://up/%zz",
            "http://up/é",
            "http://up:0/",
            "http://up:99999/",
            "http://:80/",
            "http://[::1/",
            "http://127.1/",
            "http://0x7f.0.0.1/",
            "http://up_1/",
            "ftp://up/",
            "up:80",
            "",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(UpstreamUrl::parse(&format!("http://up/{}", "a".repeat(MAX_URL_LEN))).is_err());
    }
}
