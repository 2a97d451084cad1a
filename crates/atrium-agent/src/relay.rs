//! The provider's PostgreSQL as tenants' workloads reach it: one TCP relay
//! per agent, on an ephemeral port of the host that the agent's firewall
//! opens to tenant interfaces and closes to everything else. Inside each
//! tenant's namespace the well-known address
//! (`atrium_core::database::WORKLOAD_HOST:WORKLOAD_PORT`) is translated to
//! it (`sandbox::net`), so every workload connects to the same place.
//!
//! The relay carries bytes only: who may use which database is
//! PostgreSQL's to decide (each database's role alone may connect, by
//! password). What the relay bounds is what a tenant could otherwise
//! exhaust before authenticating: connections relayed at once — in all,
//! and from one source address, which is one tenant's namespace, so one
//! tenant holding open connections cannot shut the others out — and how
//! long one waits for PostgreSQL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections relayed at once, all tenants together: below PostgreSQL's
/// own `max_connections`, so tenants cannot fill the provider's slots with
/// half-open handshakes.
const MAX_RELAYED: usize = 128;
/// Of those, from one source address (one tenant's namespace) at most.
const MAX_PER_SOURCE: usize = 32;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening relay: its port, and its task (aborting it closes the port).
pub struct Relay {
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
}

/// Listens on an ephemeral port of every host address (the agent's
/// firewall admits tenant interfaces to it and drops everything else) and
/// relays to `target`.
pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
    let listener = TcpListener::bind(("0.0.0.0", 0)).await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(serve(listener, target));
    Ok(Relay { port, task })
}

/// Connections open per source address; a `Held` gives its one back.
#[derive(Default)]
struct PerSource(Mutex<HashMap<IpAddr, usize>>);

struct Held {
    counts: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    fn take(counts: &Arc<PerSource>, source: IpAddr) -> Option<Held> {
        let mut map = counts.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(source).or_insert(0);
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Held {
            counts: counts.clone(),
            source,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut map = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

async fn serve(listener: TcpListener, target: SocketAddr) {
    let slots = Arc::new(Semaphore::new(MAX_RELAYED));
    let per_source = Arc::new(PerSource::default());
    loop {
        let (inbound, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "database relay: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(held) = PerSource::take(&per_source, from.ip()) else {
            tracing::warn!(%from, "database relay: {MAX_PER_SOURCE} connections open from there; refused");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "database relay: {MAX_RELAYED} connections open; refused");
            continue;
        };
        tokio::spawn(async move {
            let _held = (slot, held);
            relay(inbound, target).await;
        });
    }
}

async fn relay(mut inbound: TcpStream, target: SocketAddr) {
    let outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await;
    let mut outbound = match outbound {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%target, error = %e, "database relay: PostgreSQL unreachable");
            return;
        }
        Err(_) => {
            tracing::warn!(%target, "database relay: PostgreSQL did not answer in time");
            return;
        }
    };
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn carries_bytes_both_ways() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let port = start(target).await.unwrap().port;
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"HELLO");
    }

    /// A hostile tenant holds connections open to shut others out: past
    /// its own share the relay closes its next one at once, while another
    /// namespace (another source address) is still relayed.
    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let port = start(target).await.unwrap().port;
        let connect_from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind((std::net::Ipv4Addr::from(ip), 0).into())
                .unwrap();
            socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
        };
        let round_trip = |mut c: TcpStream| async move {
            c.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                .await
                .unwrap()
                .unwrap_or(0);
            (c, n)
        };
        let mut held = Vec::new();
        for _ in 0..MAX_PER_SOURCE {
            let (c, n) = round_trip(connect_from([127, 0, 0, 1]).await).await;
            assert_eq!(n, 1, "within its share: relayed");
            held.push(c);
        }
        let (_, n) = round_trip(connect_from([127, 0, 0, 1]).await).await;
        assert_eq!(n, 0, "past its share: closed");
        let (_, n) = round_trip(connect_from([127, 0, 0, 2]).await).await;
        assert_eq!(n, 1, "another source: still relayed");
        drop(held);
    }
}
