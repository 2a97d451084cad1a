//! The gateway's HTTP/1.1 server: accepts tenants' connections and runs
//! their requests one after another on each (keep-alive, pipelining
//! tolerated), reading a head and body, handing them to the gateway and
//! writing its answer — a whole body in one `write`, or a stream as chunks
//! the moment each arrives.

use std::future::Future;
use std::io;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::http1::{self, BodyLength, ChunkedDecoder, Framing, HttpError, Method, RequestHead};

/// How long connections may wait on their clients.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A kept-alive connection, idle, before the next request.
    pub idle: Duration,
    /// A request, to arrive whole once its first byte has.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(60),
            request: Duration::from_secs(60),
        }
    }
}

/// How many connections the gateway holds open, and for how long an idle
/// one: without caps, one client can hold every descriptor the gateway
/// has with connections that send nothing.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open at once, all clients together.
    pub max_total: usize,
    /// Open at once from one client address.
    pub max_per_ip: usize,
    /// A kept-alive connection, idle, before it is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_total: 16_384,
            max_per_ip: 1_024,
            idle_timeout: Timeouts::default().idle,
        }
    }
}

/// The connections open now, in total and per client address; each
/// connection holds an [`Open`] that gives its place back when it ends.
#[derive(Default)]
struct Admission {
    open: std::sync::Mutex<OpenCounts>,
}

#[derive(Default)]
struct OpenCounts {
    total: usize,
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

struct Open {
    admission: std::sync::Arc<Admission>,
    ip: std::net::IpAddr,
}

impl Admission {
    /// A place for one more connection from `ip`, unless a cap is reached.
    fn enter(
        self: &std::sync::Arc<Self>,
        ip: std::net::IpAddr,
        limits: &ConnectionLimits,
    ) -> Option<Open> {
        let mut open = self.open.lock().ok()?;
        let OpenCounts { total, per_ip } = &mut *open;
        let mine = per_ip.entry(ip).or_default();
        if *total >= limits.max_total || *mine >= limits.max_per_ip {
            if *mine == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Open {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Ok(mut open) = self.admission.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.per_ip.remove(&self.ip);
                }
            }
        }
    }
}
/// How long a refused request's remaining bytes are drained before close.
const LINGER: Duration = Duration::from_secs(1);
/// Bodies up to this size go out in the same `write` as their head.
const COALESCE_BYTES: usize = 64 << 10;

pub struct Request {
    pub head: RequestHead,
    pub body: Bytes,
}

pub enum ResponseBody {
    Full(Bytes),
    /// Sent chunked as the pieces arrive; the end of the channel ends it.
    Stream(mpsc::Receiver<Bytes>),
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: ResponseBody,
    /// Work that must follow the answer but not delay it (metering): run
    /// once a whole response has been handed to the kernel — or could not
    /// be — (a stream's, before its head), and before anything else is
    /// read from the connection.
    pub after_sent: Option<AfterSent>,
}

pub type AfterSent = Box<dyn FnOnce() + Send>;

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response {
        Response {
            status,
            headers: vec![("content-type", content_type.to_string())],
            body: ResponseBody::Full(body.into()),
            after_sent: None,
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        let body = serde_json::to_vec(value).unwrap_or_default();
        Response::new(status, "application/json", body)
    }

    pub fn header(&mut self, name: &'static str, value: impl Into<String>) {
        let value = value.into();
        // Values reach the wire verbatim: nothing may end a header line.
        if !value.bytes().any(|b| b == b'\r' || b == b'\n') {
            self.headers.retain(|(n, _)| *n != name);
            self.headers.push((name, value));
        }
    }
}

/// The largest body a request to a path may carry.
pub type BodyLimit = fn(&str) -> usize;

/// Accepts connections forever, each served by its own task; a connection
/// past a cap is closed at once.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    body_limit: BodyLimit,
    timeouts: Timeouts,
    limits: ConnectionLimits,
) where
    H: Fn(Request) -> F + Clone + Send + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let admission = std::sync::Arc::new(Admission::default());
    loop {
        let (stream, open) = match listener.accept().await {
            Ok((s, peer)) => match admission.enter(peer.ip(), &limits) {
                Some(open) => (s, open),
                None => {
                    tracing::debug!(client = %peer.ip(), "gateway: connection cap reached; closing");
                    continue;
                }
            },
            Err(e) => {
                // Out of descriptors and the like: wait for some to close.
                tracing::warn!(error = %e, "gateway: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small writes (SSE chunks) must not wait for delayed ACKs.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            connection(stream, handler, body_limit, timeouts).await;
            drop(open);
        });
    }
}

enum ReadError {
    /// Answer with this, then close.
    Http(HttpError),
    /// The client went away or the connection broke: just close.
    Gone,
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Gone
    }
}

/// Serves one connection's requests, one after another, until it closes.
pub async fn connection<S, H, F>(
    mut stream: S,
    handler: H,
    body_limit: BodyLimit,
    timeouts: Timeouts,
) where
    S: Transport,
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut buf = BytesMut::with_capacity(8 << 10);
    let mut out = Vec::with_capacity(4 << 10);
    // One idle timer per connection, not one per request: when it fires
    // it is moved to the last answer's time plus the idle timeout, and
    // only closes the connection once that has passed. (A timer armed and
    // cancelled around every request puts a timer-wheel insert and removal
    // and clock reads on every request's path.)
    let idle = tokio::time::sleep(timeouts.idle);
    tokio::pin!(idle);
    let mut last_answered = Instant::now();
    loop {
        if buf.is_empty() {
            let read = loop {
                tokio::select! {
                    biased;
                    read = stream.read_buf(&mut buf) => break read,
                    () = &mut idle => {
                        let deadline = last_answered + timeouts.idle;
                        if Instant::now() >= deadline {
                            return;
                        }
                        idle.as_mut().reset(deadline);
                    }
                }
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
        let request = match read_request(&mut stream, &mut buf, body_limit, timeouts.request).await
        {
            Ok(r) => r,
            Err(ReadError::Http(e)) => {
                let refusal = crate::refusal::Refusal::Protocol {
                    status: e.status,
                    message: e.message,
                }
                .into_response();
                let _ = write_response(&mut stream, &mut out, refusal, false, false).await;
                // Closing with unread bytes would reset the connection and
                // could destroy the answer before the client reads it: say
                // we are done, then drain briefly.
                let _ = stream.shutdown().await;
                let _ = tokio::time::timeout(LINGER, async {
                    let mut sink = [0u8; 8 << 10];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return;
            }
            Err(ReadError::Gone) => return,
        };
        let keep_alive = request.head.keep_alive;
        let head_only = request.head.method == Method::Head;
        let response = handler(request).await;
        if write_response(&mut stream, &mut out, response, keep_alive, head_only)
            .await
            .is_err()
            || !keep_alive
        {
            return;
        }
        last_answered = Instant::now();
    }
}

/// Reads more of a request that has not all arrived, within `within` of
/// the first time more was needed. A request already whole in the buffer
/// (the usual case) never arms a timer.
async fn read_more<S: Transport>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: &mut Option<Instant>,
    within: Duration,
) -> Result<(), ReadError> {
    let at = *deadline.get_or_insert_with(|| Instant::now() + within);
    match tokio::time::timeout_at(at, stream.read_buf(buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(_) => Err(ReadError::Gone),
        Err(_) => Err(ReadError::Http(HttpError::new(
            408,
            "the request did not arrive in time",
        ))),
    }
}

/// Reads one request from `buf` and, as needed, the connection.
async fn read_request<S: Transport>(
    stream: &mut S,
    buf: &mut BytesMut,
    body_limit: BodyLimit,
    within: Duration,
) -> Result<Request, ReadError> {
    let mut deadline = None;
    let head = loop {
        if let Some((head, len)) = http1::parse_request_head(buf).map_err(ReadError::Http)? {
            let _ = buf.split_to(len);
            break head;
        }
        read_more(stream, buf, &mut deadline, within).await?;
    };
    let body_limit = body_limit(&head.path);
    let too_large = || {
        ReadError::Http(HttpError::new(
            413,
            format!("request body over {body_limit} bytes"),
        ))
    };
    let has_body = head.framing != Framing::Length(0);
    if let Framing::Length(n) = head.framing {
        if n > body_limit as u64 {
            return Err(too_large());
        }
    }
    if head.expect_continue && has_body && buf.is_empty() {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let body = match head.framing {
        Framing::Length(n) => {
            let n = n as usize;
            while buf.len() < n {
                buf.reserve(n - buf.len());
                read_more(stream, buf, &mut deadline, within).await?;
            }
            buf.split_to(n).freeze()
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            let mut body = Vec::new();
            loop {
                let used = decoder.decode(buf, &mut body).map_err(|e| {
                    ReadError::Http(HttpError::new(400, format!("malformed chunked body: {e}")))
                })?;
                let _ = buf.split_to(used);
                if body.len() as u64 + decoder.announced() > body_limit as u64 {
                    return Err(too_large());
                }
                if decoder.is_done() {
                    break;
                }
                buf.reserve(8 << 10);
                read_more(stream, buf, &mut deadline, within).await?;
            }
            Bytes::from(body)
        }
        Framing::UntilClose => Bytes::new(),
    };
    Ok(Request { head, body })
}

/// Runs a response's `after_sent` work once: when told to, or when the
/// answer is dropped unsent (the connection task cancelled mid-write), so
/// it is never skipped.
struct AfterSentGuard(Option<AfterSent>);

impl AfterSentGuard {
    fn run(&mut self) {
        if let Some(work) = self.0.take() {
            work();
        }
    }
}

impl Drop for AfterSentGuard {
    fn drop(&mut self) {
        self.run();
    }
}

/// A connection requests are read from and answers written to: a
/// tenant's TCP connection, or a peer gateway's TLS one.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The first attempt to send `bytes`, without waiting: all of them, as
    /// a rule, unless the client has stopped reading. A transport that
    /// cannot try (TLS) sends nothing here, and everything after.
    fn try_send(&self, _bytes: &[u8]) -> io::Result<usize> {
        Ok(0)
    }
}

impl Transport for TcpStream {
    fn try_send(&self, bytes: &[u8]) -> io::Result<usize> {
        match self.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {}

async fn write_response<S: Transport>(
    stream: &mut S,
    out: &mut Vec<u8>,
    response: Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    // Runs right after the first attempt to send — never waiting on a
    // client that does not read.
    let mut after_sent = AfterSentGuard(response.after_sent);
    let headers: Vec<(&str, &str)> = response
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    out.clear();
    match response.body {
        ResponseBody::Full(body) => {
            http1::write_response_head(
                out,
                response.status,
                &headers,
                BodyLength::Known(body.len()),
                keep_alive,
                &http_date(),
            );
            let coalesced = !head_only && body.len() <= COALESCE_BYTES;
            if coalesced {
                out.extend_from_slice(&body);
            }
            let sent = stream.try_send(out);
            after_sent.run();
            stream.write_all(&out[sent?..]).await?;
            if !head_only && !coalesced {
                stream.write_all(&body).await?;
            }
            stream.flush().await
        }
        ResponseBody::Stream(mut rx) => {
            http1::write_response_head(
                out,
                response.status,
                &headers,
                BodyLength::Chunked,
                keep_alive,
                &http_date(),
            );
            // A stream meters itself as it passes; anything else to do
            // after the answer goes before its first byte.
            after_sent.run();
            if head_only {
                stream.write_all(out).await?;
                return stream.flush().await;
            }
            // The head goes with the first piece, unless that is slow to
            // come (a replica still computing): then the head goes alone.
            match rx.try_recv() {
                Ok(first) => http1::write_chunk(out, &first),
                Err(_) => {
                    stream.write_all(out).await?;
                    stream.flush().await?;
                    out.clear();
                }
            }
            while let Some(piece) = rx.recv().await {
                http1::write_chunk(out, &piece);
                // Whatever else is already here goes in the same write.
                while out.len() < COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok(more) => http1::write_chunk(out, &more),
                        Err(_) => break,
                    }
                }
                stream.write_all(out).await?;
                stream.flush().await?;
                out.clear();
            }
            out.extend_from_slice(http1::LAST_CHUNK);
            stream.write_all(out).await?;
            stream.flush().await
        }
    }
}

/// The `Date` header's value, formatted once a second per thread.
fn http_date() -> String {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        c.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server whose handler echoes the request's method, path and body,
    /// or streams three pieces for `/stream`.
    async fn echo_server() -> std::net::SocketAddr {
        echo_server_with(Timeouts::default()).await
    }

    async fn echo_server_with(timeouts: Timeouts) -> std::net::SocketAddr {
        echo_server_limited(timeouts, ConnectionLimits::default()).await
    }

    async fn echo_server_limited(
        timeouts: Timeouts,
        limits: ConnectionLimits,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = |r: Request| async move {
            if r.head.path == "/stream" {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    for piece in ["data: a\n\n", "data: b\n\n", "data: [DONE]\n\n"] {
                        tx.send(Bytes::from(piece)).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
                return Response {
                    status: 200,
                    headers: vec![("content-type", "text/event-stream".into())],
                    body: ResponseBody::Stream(rx),
                    after_sent: None,
                };
            }
            let text = format!(
                "{:?} {} {}",
                r.head.method,
                r.head.path,
                String::from_utf8_lossy(&r.body)
            );
            Response::new(200, "text/plain", text)
        };
        tokio::spawn(serve(listener, handler, |_| 64, timeouts, limits));
        addr
    }

    /// Whether the server closes `s` within 300 ms.
    async fn closed_at_once(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn connections_past_a_cap_are_closed_at_once_and_places_come_back() {
        let limits = ConnectionLimits {
            max_total: 5,
            max_per_ip: 3,
            ..ConnectionLimits::default()
        };
        let addr = echo_server_limited(Timeouts::default(), limits).await;
        let open = |ip: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(open("127.0.0.1").await);
        }
        assert!(
            closed_at_once(&mut open("127.0.0.1").await).await,
            "a fourth from one address"
        );
        // Another address still gets in, up to the total.
        held.push(open("127.0.0.3").await);
        held.push(open("127.0.0.3").await);
        assert!(
            closed_at_once(&mut open("127.0.0.4").await).await,
            "a sixth in total"
        );
        for s in &mut held {
            assert!(!closed_at_once(s).await, "one within the caps was closed");
        }
        held.truncate(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (out, _) = exchange(addr, b"GET /again HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("/again"), "places are given back: {out}");
    }

    /// Sends `raw` and reads until the server closes or goes quiet.
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> (String, bool) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (String::from_utf8_lossy(&out).into_owned(), closed)
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let addr = echo_server().await;
        let (out, closed) = exchange(
            addr,
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nonePOST /b?q=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\ntwo",
        )
        .await;
        let first = out.find("Post /a one").unwrap();
        let second = out.find("Post /b two").unwrap();
        assert!(first < second, "{out}");
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2);
        assert!(!closed, "kept alive");
    }

    #[tokio::test]
    async fn chunked_bodies_and_expect_continue_are_read() {
        let addr = echo_server().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .await
            .unwrap();
        let n = s.read(&mut buf).await.unwrap();
        let out = String::from_utf8_lossy(&buf[..n]);
        assert!(out.ends_with("Post /c abcde"), "{out}");
    }

    #[tokio::test]
    async fn bad_framing_and_large_bodies_are_refused_and_closed() {
        let addr = echo_server().await;
        for (raw, status) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"[..],
                "413 Payload Too Large",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n",
                "413 Payload Too Large",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400 Bad Request",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "400 Bad Request",
            ),
            (b"NONSENSE\r\n\r\n", "400 Bad Request"),
        ] {
            let (out, closed) = exchange(addr, raw).await;
            assert!(out.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{out}");
            assert!(out.contains("connection: close\r\n"), "{out}");
            assert!(out.contains("\"error\""), "{out}");
            assert!(closed);
        }
    }

    #[tokio::test]
    async fn head_http_1_0_and_streams_are_framed_right() {
        let addr = echo_server().await;
        let (out, _) = exchange(addr, b"HEAD /h HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("content-length: 8\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "no body: {out}");
        let (out, closed) = exchange(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
        assert!(
            out.contains("connection: close\r\n") && out.ends_with("Get /old "),
            "{out}"
        );
        assert!(closed);
        let (out, closed) = exchange(addr, b"GET /stream HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            out.ends_with(
                "9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
            ),
            "{out:?}"
        );
        assert!(!closed);
    }

    #[tokio::test]
    async fn idle_connections_close_and_busy_ones_stay_open() {
        let addr = echo_server_with(Timeouts {
            idle: Duration::from_millis(300),
            request: Duration::from_secs(60),
        })
        .await;
        let mut buf = [0u8; 4096];
        // Requests 200 ms apart for well past one idle period: kept open.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        for i in 0..6 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            busy.write_all(format!("POST /{i} HTTP/1.1\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let n = busy.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed while in use, before request {i}");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));
        }
        // Then left idle: closed about one idle period after the last answer.
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), busy.read(&mut buf))
            .await
            .expect("an idle connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_request_that_stalls_is_answered_408_and_closed() {
        let addr = echo_server_with(Timeouts {
            idle: Duration::from_secs(60),
            request: Duration::from_millis(200),
        })
        .await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => panic!("no answer to a stalled request"),
            }
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
        assert!(out.contains("did not arrive in time"), "{out}");
    }

    #[tokio::test]
    async fn work_after_the_answer_runs_once_it_is_sent_and_before_the_next_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (log_tx, mut log) = mpsc::unbounded_channel::<String>();
        let handler = move |r: Request| {
            let log_tx = log_tx.clone();
            async move {
                let path = r.head.path.clone();
                let _ = log_tx.send(format!("handle {path}"));
                let mut response = Response::new(200, "text/plain", path.clone());
                response.after_sent = Some(Box::new(move || {
                    let _ = log_tx.send(format!("after {path}"));
                }));
                response
            }
        };
        tokio::spawn(serve(
            listener,
            handler,
            |_| 64,
            Timeouts::default(),
            ConnectionLimits::default(),
        ));
        let (out, _) = exchange(
            addr,
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.ends_with("/b"), "{out}");
        let mut seen = Vec::new();
        while let Ok(line) = log.try_recv() {
            seen.push(line);
        }
        assert_eq!(seen, ["handle /a", "after /a", "handle /b", "after /b"]);

        // A client gone before its answer: the work still runs, once.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /gone HTTP/1.1\r\n\r\n").await.unwrap();
        drop(s);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut gone = Vec::new();
        while gone.len() < 2 && std::time::Instant::now() < deadline {
            if let Ok(Some(line)) =
                tokio::time::timeout(Duration::from_millis(100), log.recv()).await
            {
                gone.push(line);
            }
        }
        assert_eq!(gone, ["handle /gone", "after /gone"]);
    }
}
