//! HTTP/1.1 as the gateway speaks it, both to tenants and to replicas: the
//! pure half (parsing heads, framing bodies, writing heads), without I/O,
//! so the fuzz target can drive it byte by byte.
//!
//! Why by hand: every inference request crosses two HTTP hops in this
//! process, and a general-purpose stack (hyper's server and pooled client,
//! a router and its middleware) costs more CPU per request than the proxy
//! work itself (`atrium bench gateway`). The gateway needs one thing from
//! HTTP/1.1 — move small JSON bodies and SSE streams between keep-alive
//! connections — and this does only that, strictly: a request that could
//! be framed two ways (`Content-Length` beside `Transfer-Encoding`, two
//! different lengths) is refused rather than guessed at, since a proxy
//! that frames a body differently from its peer is how requests are
//! smuggled.

use std::fmt::Write as _;

/// Most header lines a request or response head may carry.
const MAX_HEADERS: usize = 64;
/// Largest head accepted (request line or status line plus headers).
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Longest chunk-extension or trailer section accepted.
const MAX_CHUNK_META: usize = 8 << 10;

/// Why a message cannot be read; for a tenant's request, the status and
/// message it is answered with (before the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (zero: no body).
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Delete,
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Other => "OTHER",
        }
    }
}

/// What the gateway needs of a request's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The target's path, query removed.
    pub path: String,
    /// The target's query, without its `?`, when it has one.
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub framing: Framing,
    /// Whether the client wants the connection kept after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before
    /// sending the body.
    pub expect_continue: bool,
    /// `x-atrium-ingress-site` and `x-request-id`: believed only on the
    /// peer link, where the sending site's certificate is checked.
    pub ingress_site: Option<String>,
    pub request_id: Option<String>,
}

/// What the gateway needs of a replica's response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_type: Option<String>,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// Headers that decide framing and persistence, gathered the same way for
/// requests and responses.
#[derive(Default)]
struct Delimiters {
    content_length: Option<u64>,
    chunked: bool,
    other_encoding: bool,
    close: bool,
    keep_alive: bool,
}

impl Delimiters {
    fn take(&mut self, name: &str, value: &[u8]) -> Result<(), HttpError> {
        if name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(value).unwrap_or("").trim();
            let n: u64 = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                text.parse()
                    .map_err(|_| HttpError::new(400, "Content-Length is too large"))?
            } else {
                return Err(HttpError::new(
                    400,
                    format!("Content-Length {text:?} is not a number"),
                ));
            };
            if self.content_length.is_some_and(|m| m != n) {
                return Err(HttpError::new(
                    400,
                    "two different Content-Length headers: the body's length is ambiguous",
                ));
            }
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Codings apply in order; only a final `chunked` alone frames
            // a body this gateway can read.
            for coding in String::from_utf8_lossy(value).split(',') {
                let coding = coding.trim();
                if coding.eq_ignore_ascii_case("chunked") && !self.chunked {
                    self.chunked = true;
                } else if !coding.is_empty() {
                    self.other_encoding = true;
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for option in String::from_utf8_lossy(value).split(',') {
                let option = option.trim();
                if option.eq_ignore_ascii_case("close") {
                    self.close = true;
                } else if option.eq_ignore_ascii_case("keep-alive") {
                    self.keep_alive = true;
                }
            }
        }
        Ok(())
    }

    fn keep_alive(&self, version: u8) -> bool {
        !self.close && (version >= 1 || self.keep_alive)
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` when it is not
/// complete yet, else the head and its length in bytes.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD_BYTES {
                Err(HttpError::new(431, "request head over 64 KiB"))
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "more than 64 request headers"))
        }
        Err(e) => return Err(HttpError::new(400, format!("malformed HTTP request: {e}"))),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HttpError::new(431, "request head over 64 KiB"));
    }
    let method = match request.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        _ => Method::Other,
    };
    let target = request.path.unwrap_or("");
    let without_fragment = target.split('#').next().unwrap_or("");
    let (path, query) = match without_fragment.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (without_fragment.to_string(), None),
    };
    let version = request.version.unwrap_or(1);
    let mut delimiters = Delimiters::default();
    let mut authorization = None;
    let mut content_type = None;
    let mut expect_continue = false;
    let (mut ingress_site, mut request_id) = (None, None);
    for h in request.headers.iter() {
        delimiters.take(h.name, h.value)?;
        let text = || std::str::from_utf8(h.value).ok().map(str::to_string);
        if h.name.eq_ignore_ascii_case("x-atrium-ingress-site") {
            ingress_site = text();
        } else if h.name.eq_ignore_ascii_case("x-request-id") {
            request_id = text();
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = std::str::from_utf8(h.value).ok().map(str::to_string);
        } else if h.name.eq_ignore_ascii_case("content-type") {
            content_type = std::str::from_utf8(h.value).ok().map(str::to_string);
        } else if h.name.eq_ignore_ascii_case("expect") {
            if h.value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(HttpError::new(
                    417,
                    "only `Expect: 100-continue` is supported",
                ));
            }
        }
    }
    let framing = if delimiters.other_encoding {
        return Err(HttpError::new(
            501,
            "unsupported Transfer-Encoding: send the body plain or `chunked`",
        ));
    } else if delimiters.chunked {
        if delimiters.content_length.is_some() || version == 0 {
            return Err(HttpError::new(
                400,
                "Transfer-Encoding with Content-Length (or in HTTP/1.0): the body's length is ambiguous",
            ));
        }
        Framing::Chunked
    } else {
        Framing::Length(delimiters.content_length.unwrap_or(0))
    };
    Ok(Some((
        RequestHead {
            method,
            path,
            query,
            authorization,
            content_type,
            framing,
            keep_alive: delimiters.keep_alive(version),
            expect_continue: expect_continue && version >= 1,
            ingress_site,
            request_id,
        },
        len,
    )))
}

/// Parses a response head at the start of `buf` (1xx interim responses
/// are returned like any other; the caller skips them).
pub fn parse_response_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::new(502, "response head over 64 KiB"))
        }
        Err(e) => return Err(HttpError::new(502, format!("malformed HTTP response: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let version = response.version.unwrap_or(1);
    let mut delimiters = Delimiters::default();
    let mut content_type = None;
    for h in response.headers.iter() {
        delimiters
            .take(h.name, h.value)
            .map_err(|e| HttpError::new(502, e.message))?;
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = std::str::from_utf8(h.value).ok().map(str::to_string);
        }
    }
    let framing = if status < 200 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if delimiters.other_encoding {
        return Err(HttpError::new(
            502,
            "the replica answered with an unsupported Transfer-Encoding",
        ));
    } else if delimiters.chunked {
        Framing::Chunked
    } else if let Some(n) = delimiters.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok(Some((
        ResponseHead {
            status,
            content_type,
            keep_alive: delimiters.keep_alive(version) && framing != Framing::UntilClose,
            framing,
        },
        len,
    )))
}

/// Decodes a chunked body as its bytes arrive, in any split.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
    meta: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    Done,
}

impl ChunkedDecoder {
    /// Consumes framing and data from `input`, appending the data to `out`,
    /// and returns how many bytes of `input` it took (all of them unless
    /// the body ended within it).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => {
                    i += 1;
                    if let Some(v) = (b as char).to_digit(16) {
                        if self.digits == 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + u64::from(v);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err("chunk size is not hexadecimal");
                    } else if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if matches!(b, b';' | b' ' | b'\t') {
                        self.state = ChunkState::Extension;
                    } else {
                        return Err("chunk size is not hexadecimal");
                    }
                }
                ChunkState::Extension => {
                    i += 1;
                    self.meta += 1;
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' || self.meta > MAX_CHUNK_META {
                        return Err("malformed chunk extension");
                    }
                }
                ChunkState::SizeLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err("chunk size line not ended by CRLF");
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        self.meta = 0;
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    i += 1;
                    let (want, next) = if self.state == ChunkState::DataCr {
                        (b'\r', ChunkState::DataLf)
                    } else {
                        (b'\n', ChunkState::Size)
                    };
                    if b != want {
                        return Err("chunk data not followed by CRLF");
                    }
                    self.state = next;
                }
                ChunkState::Trailer => {
                    i += 1;
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    } else {
                        // A trailer line: read and dropped (the gateway
                        // forwards no trailers).
                        self.size += 1;
                        self.meta += 1;
                        if b == b'\n' || self.meta > MAX_CHUNK_META {
                            return Err("malformed chunked trailer");
                        }
                    }
                }
                ChunkState::TrailerLf => {
                    i += 1;
                    if b != b'\n' {
                        return Err("chunked trailer not ended by CRLF");
                    }
                    if self.size == 0 {
                        self.state = ChunkState::Done;
                        return Ok(i);
                    }
                    self.size = 0;
                    self.state = ChunkState::Trailer;
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Bytes of the current chunk announced but not yet decoded: a body
    /// limit is enforced on what is announced, before it arrives.
    pub fn announced(&self) -> u64 {
        match self.state {
            ChunkState::Data => self.size,
            _ => 0,
        }
    }
}

/// The reason phrase of the statuses the gateway sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// How a response head announces its body.
pub enum BodyLength {
    Known(usize),
    Chunked,
}

/// Writes a response head. Header values come from the gateway itself or
/// from a replica's head (parsed by httparse, so free of CR and LF).
pub fn write_response_head(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    length: BodyLength,
    keep_alive: bool,
    date: &str,
) {
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\ndate: {date}\r\n",
        reason(status)
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    match length {
        BodyLength::Known(n) => {
            let _ = write!(head, "content-length: {n}\r\n");
        }
        BodyLength::Chunked => head.push_str("transfer-encoding: chunked\r\n"),
    }
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    out.extend_from_slice(head.as_bytes());
}

/// Appends one chunk of a chunked body (never empty: that would end it).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let _ = write!(VecWriter(out), "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(RequestHead, usize)>, HttpError> {
        parse_request_head(text.as_bytes())
    }

    #[test]
    fn requests_are_framed_one_way_only() {
        let (h, len) = head("POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\nContent-Length: 12\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!(len, 96);
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.authorization.as_deref(), Some("Bearer k"));
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive);
        assert!(head("POST / HTTP/1.1\r\nContent-Len").unwrap().is_none());
        let chunked = head("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(chunked.0.framing, Framing::Chunked);
        for (bad, status) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                501,
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
            ("GARBAGE\r\n\r\n", 400),
        ] {
            assert_eq!(head(bad).unwrap_err().status, status, "{bad}");
        }
        let same_twice = head("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(same_twice.unwrap().unwrap().0.framing, Framing::Length(3));
        let huge = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(head(&huge).unwrap_err().status, 431);
    }

    #[test]
    fn persistence_follows_version_and_connection() {
        let keep = |t: &str| head(t).unwrap().unwrap().0.keep_alive;
        assert!(keep("GET / HTTP/1.1\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"));
        assert!(keep("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        let expect = head("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n");
        assert!(expect.unwrap().unwrap().0.expect_continue);
    }

    #[test]
    fn responses_are_framed_by_status_encoding_length_or_close() {
        let framing = |t: &str| parse_response_head(t.as_bytes()).unwrap().unwrap().0;
        let r = framing(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        assert_eq!(r.framing, Framing::Length(5));
        assert!(r.keep_alive);
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        let until_close = framing("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(until_close.framing, Framing::UntilClose);
        assert!(!until_close.keep_alive);
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").framing,
            Framing::Length(0)
        );
        assert!(!framing("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\n")
            .unwrap()
            .is_none());
        assert_eq!(
            parse_response_head(b"SPDY/9 200\r\n\r\n")
                .unwrap_err()
                .status,
            502
        );
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let first = d.decode(&body[..split], &mut out).unwrap();
            let used = if d.is_done() {
                first
            } else {
                assert_eq!(first, split);
                first + d.decode(&body[split..], &mut out).unwrap()
            };
            assert!(d.is_done());
            assert_eq!(out, b"hello, world");
            assert_eq!(&body[used..], b"NEXT", "split at {split}");
        }
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nbad\n",
        ] {
            let mut d = ChunkedDecoder::default();
            assert!(d.decode(bad, &mut Vec::new()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_and_chunks_are_written_as_http_1_1() {
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            429,
            &[("retry-after", "3")],
            BodyLength::Known(2),
            false,
            "Sat, 28 Nov 2026 10:00:00 GMT",
        );
        write_chunk(&mut out, b"");
        write_chunk(&mut out, b"0123456789abcdefg");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 429 Too Many Requests\r\ndate: Sat, 28 Nov 2026 10:00:00 GMT\r\nretry-after: 3\r\ncontent-length: 2\r\nconnection: close\r\n\r\n11\r\n0123456789abcdefg\r\n"
        );
    }
}
