//! The gateway's client to replicas (and external upstreams): plain
//! HTTP/1.1 over pooled keep-alive connections, one `write` per request.
//!
//! Connections are pooled per (tenant, deployment, upstream address), never
//! across tenants: whatever an upstream does with one tenant's connection
//! (an answer it sends twice, bytes a smuggled request produced) can reach
//! no other tenant's request. And a connection goes back to its pool only
//! when its response was framed exactly and nothing is left unread after
//! it; anything else closes it.
//!
//! A pooled connection the replica has closed (its idle timeout, a restart)
//! is the one failure a proxy must hide: it is noticed before use when the
//! reactor has already seen its end, and otherwise by the request failing
//! before any byte of an answer came back — then the request is sent once
//! more, on a new connection. A replica that closed an idle connection
//! never read a request sent into it, so the resend cannot run it twice.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http1::{self, ChunkedDecoder, Framing, ResponseHead};
use crate::link::Link;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A peer gateway's connection and handshake: past this, another allowed
/// site is tried (failover within a second is the goal).
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(700);
/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle connections kept per upstream address.
const MAX_IDLE_PER_UPSTREAM: usize = 1024;
/// Largest non-streamed response body read from an upstream.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
const READ_CHUNK: usize = 16 << 10;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: another replica may take the request.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Address(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// `http://host:port/prefix` split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub authority: String,
    pub prefix: String,
}

/// Splits a replica's endpoint (as its agent reported it) into its parts.
/// Nothing that could end a request line or a header passes.
pub fn address(base: &str) -> Result<Address, UpstreamError> {
    if base.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(UpstreamError::Address(format!(
            "unusable upstream address {base:?}"
        )));
    }
    let rest = match base.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &base[7..],
        _ => {
            return Err(UpstreamError::Address(format!(
                "unusable upstream address {base:?}: only http:// upstreams are supported"
            )))
        }
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(UpstreamError::Address(format!(
            "unusable upstream address {base:?}"
        )));
    }
    Ok(Address {
        authority: authority.to_string(),
        prefix: prefix.to_string(),
    })
}

/// Where one request goes.
pub struct Peer<'a> {
    /// The pool its connection comes from and goes back to: one per
    /// (tenant, deployment, upstream address).
    pub pool: &'a str,
    /// `host:port`, for the `Host` header.
    pub authority: &'a str,
    /// The upstream's path prefix, from a parsed URL.
    pub prefix: &'a str,
    /// The addresses to connect to, checked by the egress policy; empty
    /// for a replica, whose endpoint `authority` is connected to as is.
    pub addrs: &'a [SocketAddr],
    /// Set for another site's gateway, reached over the peer link.
    pub link: Option<PeerLink<'a>>,
}

/// The peer link to another site's gateway.
pub struct PeerLink<'a> {
    pub connector: &'a tokio_rustls::TlsConnector,
    /// The name its certificate must carry: the chosen site's.
    pub server_name: &'a ServerName<'static>,
    /// This gateway's site, sent as `x-atrium-ingress-site` (the peer
    /// checks it against this gateway's certificate).
    pub ingress_site: &'a str,
    /// The tenant's `Authorization`, for a forwarded request: the serving
    /// gateway authenticates and admits the request itself.
    pub authorization: Option<&'a str>,
}

struct Connection {
    stream: Link,
    /// Bytes read past the previous response (none, from a well-behaved
    /// upstream; kept so they are not lost if there are).
    buf: BytesMut,
    idle_since: Instant,
}

impl Connection {
    /// Whether the reactor has seen this idle connection readable: its
    /// end (or bytes nobody asked for) arrived, so it must not be reused.
    /// Asks the reactor only; no system call.
    fn looks_closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.stream.tcp().poll_read_ready(&mut cx), Poll::Ready(_))
    }
}

/// Pooled connections to upstreams, by pool key (see [`Peer::pool`]).
#[derive(Default)]
pub struct Upstreams {
    idle: Mutex<HashMap<String, Vec<Connection>>>,
}

/// A response whose head has been read; its body is read on demand.
pub struct Response {
    pub head: ResponseHead,
    pub body: Body,
}

/// A response body being read from its connection, which goes back to the
/// pool once the body has been read to its end.
pub struct Body {
    pool: Arc<Upstreams>,
    pool_key: String,
    connection: Option<Connection>,
    framing: Framing,
    remaining: u64,
    chunked: ChunkedDecoder,
    keep_alive: bool,
    done: bool,
}

impl Upstreams {
    fn checkout(&self, pool: &str) -> Option<Connection> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(pool)?;
        while let Some(c) = list.pop() {
            if c.idle_since.elapsed() < IDLE_TIMEOUT && !c.looks_closed() {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, pool: &str, mut connection: Connection) {
        // Bytes past the response are an answer nobody asked for: reused,
        // the connection would hand them to the next request as its own.
        if !connection.buf.is_empty() {
            tracing::warn!(
                pool,
                bytes = connection.buf.len(),
                "gateway: an upstream sent bytes past its response; connection closed"
            );
            return;
        }
        let now = Instant::now();
        connection.idle_since = now;
        if let Ok(mut idle) = self.idle.lock() {
            // The pool is a new key only the first time.
            let list = match idle.get_mut(pool) {
                Some(list) => list,
                None => idle.entry(pool.to_string()).or_default(),
            };
            // Oldest first: drop those past their time from the front.
            let expired = list
                .iter()
                .take_while(|c| now.duration_since(c.idle_since) >= IDLE_TIMEOUT)
                .count();
            list.drain(..expired);
            if list.len() < MAX_IDLE_PER_UPSTREAM {
                list.push(connection);
            }
        }
    }

    /// Closes every idle connection of `pool` (a peer that stopped
    /// answering: a connection into a dead link would take a request and
    /// never answer it).
    pub fn forget(&self, pool: &str) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.remove(pool);
        }
    }

    /// Closes idle connections past their time, for upstreams no request
    /// goes to any more (a replica that was removed).
    pub fn sweep(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|_, list| {
                list.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
                !list.is_empty()
            });
        }
    }

    /// POSTs a JSON body to `peer` at its prefix + `path` and reads the
    /// response head; `request_id`, when given, goes as `x-request-id`.
    pub async fn post(
        self: &Arc<Self>,
        peer: &Peer<'_>,
        path: &str,
        request_id: Option<&str>,
        body: &[u8],
    ) -> Result<Response, UpstreamError> {
        let mut request = Vec::with_capacity(256 + body.len());
        request.extend_from_slice(b"POST ");
        request.extend_from_slice(peer.prefix.as_bytes());
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        request.extend_from_slice(peer.authority.as_bytes());
        request.extend_from_slice(b"\r\ncontent-type: application/json");
        if let Some(id) = request_id {
            request.extend_from_slice(b"\r\nx-request-id: ");
            request.extend_from_slice(id.as_bytes());
        }
        if let Some(link) = &peer.link {
            request.extend_from_slice(b"\r\nx-atrium-ingress-site: ");
            request.extend_from_slice(link.ingress_site.as_bytes());
            if let Some(authorization) = link.authorization {
                request.extend_from_slice(b"\r\nauthorization: ");
                request.extend_from_slice(authorization.as_bytes());
            }
        }
        request.extend_from_slice(b"\r\ncontent-length: ");
        request.extend_from_slice(body.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(body);

        if let Some(mut pooled) = self.checkout(peer.pool) {
            match exchange(&mut pooled, &request).await {
                Ok(head) => return Ok(self.response(peer.pool, pooled, head)),
                // Sent into a connection the upstream had closed, and
                // nothing came back: it never read this request.
                Err(Exchange::NothingBack(_)) => {}
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let connect = async {
            let tcp = if peer.addrs.is_empty() {
                TcpStream::connect(peer.authority).await
            } else {
                TcpStream::connect(peer.addrs).await
            }?;
            // Small writes (SSE chunks) must not wait for delayed ACKs.
            let _ = tcp.set_nodelay(true);
            match &peer.link {
                None => Ok(Link::Plain(tcp)),
                Some(link) => link
                    .connector
                    .connect(link.server_name.clone(), tcp)
                    .await
                    .map(|s| Link::Tls(Box::new(s))),
            }
        };
        let within = if peer.link.is_some() {
            PEER_CONNECT_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        };
        let stream = match tokio::time::timeout(within, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => {
                return Err(UpstreamError::Connect(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {within:?}"),
                )))
            }
        };
        let mut fresh = Connection {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            idle_since: Instant::now(),
        };
        match exchange(&mut fresh, &request).await {
            Ok(head) => Ok(self.response(peer.pool, fresh, head)),
            Err(Exchange::NothingBack(e)) | Err(Exchange::Failed(e)) => Err(e),
        }
    }

    fn response(
        self: &Arc<Self>,
        pool: &str,
        connection: Connection,
        head: ResponseHead,
    ) -> Response {
        let remaining = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let done = head.framing == Framing::Length(0);
        let mut body = Body {
            pool: self.clone(),
            pool_key: pool.to_string(),
            connection: Some(connection),
            framing: head.framing,
            remaining,
            chunked: ChunkedDecoder::default(),
            keep_alive: head.keep_alive,
            done,
        };
        if done {
            body.finish();
        }
        Response { head, body }
    }
}

enum Exchange {
    NothingBack(UpstreamError),
    Failed(UpstreamError),
}

/// Writes a request and reads the final response head (skipping interim
/// 1xx answers).
async fn exchange(c: &mut Connection, request: &[u8]) -> Result<ResponseHead, Exchange> {
    let sent = async {
        c.stream.write_all(request).await?;
        c.stream.flush().await
    };
    if let Err(e) = sent.await {
        return Err(Exchange::NothingBack(e.into()));
    }
    let mut answered = false;
    loop {
        match http1::parse_response_head(&c.buf) {
            Ok(Some((head, len))) => {
                let _ = c.buf.split_to(len);
                if head.status >= 200 {
                    return Ok(head);
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => return Err(Exchange::Failed(UpstreamError::Protocol(e.message))),
        }
        c.buf.reserve(READ_CHUNK);
        match c.stream.read_buf(&mut c.buf).await {
            Ok(0) if !answered => {
                return Err(Exchange::NothingBack(UpstreamError::Protocol(
                    "the upstream closed the connection without answering".into(),
                )))
            }
            Ok(0) => {
                return Err(Exchange::Failed(UpstreamError::Protocol(
                    "the upstream closed the connection mid-answer".into(),
                )))
            }
            Ok(_) => answered = true,
            Err(e) if !answered => return Err(Exchange::NothingBack(e.into())),
            Err(e) => return Err(Exchange::Failed(e.into())),
        }
    }
}

impl Body {
    /// The next piece of the body, `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, UpstreamError>> {
        loop {
            if self.done {
                return None;
            }
            let c = self.connection.as_mut()?;
            if !c.buf.is_empty() {
                let data = match self.framing {
                    Framing::Length(_) => {
                        let n = c
                            .buf
                            .len()
                            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                        self.remaining -= n as u64;
                        if self.remaining == 0 {
                            self.done = true;
                        }
                        c.buf.split_to(n).freeze()
                    }
                    Framing::UntilClose => c.buf.split().freeze(),
                    Framing::Chunked => {
                        let mut out = Vec::new();
                        match self.chunked.decode(&c.buf, &mut out) {
                            Ok(used) => {
                                let _ = c.buf.split_to(used);
                            }
                            Err(e) => {
                                self.connection = None;
                                return Some(Err(UpstreamError::Protocol(format!(
                                    "malformed chunked body: {e}"
                                ))));
                            }
                        }
                        self.done = self.chunked.is_done();
                        Bytes::from(out)
                    }
                };
                if self.done {
                    self.finish();
                }
                if !data.is_empty() {
                    return Some(Ok(data));
                }
                continue;
            }
            c.buf.reserve(READ_CHUNK);
            match c.stream.read_buf(&mut c.buf).await {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.done = true;
                    self.connection = None;
                    return None;
                }
                Ok(0) => {
                    self.connection = None;
                    return Some(Err(UpstreamError::Protocol(
                        "the upstream closed the connection mid-body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.connection = None;
                    return Some(Err(e.into()));
                }
            }
        }
    }

    /// The whole body, at most `MAX_RESPONSE_BYTES`.
    pub async fn collect(mut self) -> Result<Bytes, UpstreamError> {
        let mut first: Option<Bytes> = None;
        let mut rest: Vec<u8> = Vec::new();
        while let Some(chunk) = self.chunk().await {
            let chunk = chunk?;
            match &first {
                None => first = Some(chunk),
                Some(f) => {
                    if rest.is_empty() {
                        rest.extend_from_slice(f);
                    }
                    rest.extend_from_slice(&chunk);
                    if rest.len() > MAX_RESPONSE_BYTES {
                        return Err(UpstreamError::Protocol(format!(
                            "response body over {MAX_RESPONSE_BYTES} bytes"
                        )));
                    }
                }
            }
        }
        Ok(if rest.is_empty() {
            first.unwrap_or_default()
        } else {
            Bytes::from(rest)
        })
    }

    /// The body has been read to its end: the connection goes back to the
    /// pool if the upstream keeps it.
    fn finish(&mut self) {
        if let Some(c) = self.connection.take() {
            if self.keep_alive {
                self.pool.checkin(&self.pool_key, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A replica that answers each request with `answer`, and closes each
    /// connection after `per_connection` answers.
    async fn replica(answer: &'static [u8], per_connection: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    for _ in 0..per_connection {
                        // Read one request (head and Content-Length body).
                        loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                                let len: usize = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap_or(0);
                                if buf.len() >= end + 4 + len {
                                    let _ = buf.split_to(end + 4 + len);
                                    break;
                                }
                            }
                            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        s.write_all(answer).await.unwrap();
                    }
                });
            }
        });
        (url, served)
    }

    /// POSTs `{}` to `url` + `path` through the pool named `pool`.
    async fn post_to(
        pool: &Arc<Upstreams>,
        key: &str,
        url: &str,
        path: &str,
    ) -> Result<Response, UpstreamError> {
        let a = address(url)?;
        let peer = Peer {
            pool: key,
            authority: &a.authority,
            prefix: &a.prefix,
            addrs: &[],
            link: None,
        };
        pool.post(&peer, path, Some("req_1"), b"{}").await
    }

    fn idle_in(pool: &Upstreams) -> usize {
        pool.idle.lock().unwrap().values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn bodies_of_every_framing_are_read_and_connections_reused() {
        let pool = Arc::new(Upstreams::default());
        let (url, served) = replica(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 100).await;
        for _ in 0..3 {
            let r = post_to(&pool, &url, &url, "/v1/x").await.unwrap();
            assert_eq!(r.head.status, 200);
            assert_eq!(&r.body.collect().await.unwrap()[..], b"{}");
        }
        assert_eq!(served.load(Ordering::SeqCst), 3);
        assert_eq!(idle_in(&pool), 1, "one connection, reused");

        let (url, _) = replica(b"HTTP/1.1 200 OK\r\n\r\nuntil close", 1).await;
        let r = post_to(&pool, &url, &url, "/").await.unwrap();
        assert!(!r.head.keep_alive);
        assert_eq!(&r.body.collect().await.unwrap()[..], b"until close");
    }

    #[tokio::test]
    async fn a_connection_the_replica_closed_is_replaced_not_failed() {
        let pool = Arc::new(Upstreams::default());
        // One answer per connection, but it says keep-alive: the pooled
        // connection is dead when the next request takes it.
        let (url, served) = replica(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 1).await;
        for _ in 0..5 {
            let r = post_to(&pool, "t/d", &url, "/").await.unwrap();
            assert_eq!(&r.body.collect().await.unwrap()[..], b"ok");
        }
        assert_eq!(served.load(Ordering::SeqCst), 5, "each request ran once");
    }

    #[tokio::test]
    async fn refused_connections_are_connect_errors() {
        let pool = Arc::new(Upstreams::default());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = post_to(&pool, "t/d", &format!("http://127.0.0.1:{port}"), "/")
            .await
            .err()
            .unwrap();
        assert!(e.is_connect(), "{e}");
        let (url, _) = replica(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 1).await;
        let r = post_to(&pool, "t/d", &url, "/").await.unwrap();
        assert!(
            r.body.collect().await.is_err(),
            "a body cut short is an error"
        );
    }

    #[tokio::test]
    async fn bytes_past_a_response_close_its_connection() {
        let pool = Arc::new(Upstreams::default());
        // Each answer carries a second, forged one in the same write.
        let (url, served) = replica(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmineHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
            100,
        )
        .await;
        for _ in 0..3 {
            let r = post_to(&pool, "t/d", &url, "/").await.unwrap();
            assert_eq!(&r.body.collect().await.unwrap()[..], b"mine");
        }
        assert_eq!(served.load(Ordering::SeqCst), 3);
        assert_eq!(idle_in(&pool), 0, "no connection with unread bytes is kept");
    }

    #[tokio::test]
    async fn pools_are_never_shared_between_keys() {
        let pool = Arc::new(Upstreams::default());
        let (url, _) = replica(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 100).await;
        for key in ["tenant-a/d1", "tenant-b/d1", "tenant-a/d1"] {
            let r = post_to(&pool, key, &url, "/").await.unwrap();
            assert_eq!(&r.body.collect().await.unwrap()[..], b"ok");
        }
        let idle = pool.idle.lock().unwrap();
        assert_eq!(idle.len(), 2, "one pool per key");
        assert!(idle.values().all(|l| l.len() == 1));
    }

    #[test]
    fn addresses_are_plain_http_with_an_optional_prefix() {
        let a = address("http://10.0.0.1:8000").unwrap();
        assert_eq!(
            (a.authority.as_str(), a.prefix.as_str()),
            ("10.0.0.1:8000", "")
        );
        let a = address("HTTP://upstream:80/openai/").unwrap();
        assert_eq!(
            (a.authority.as_str(), a.prefix.as_str()),
            ("upstream:80", "/openai")
        );
        for bad in [
            "https://api.example.com",
            "10.0.0.1:80",
            "http://",
            "http://a b",
            "http://u@h",
            "http://h:80/v1\r\nx: y",
            "http://h:80/a b",
        ] {
            assert!(address(bad).is_err(), "{bad}");
        }
    }
}
