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
//! exhaust before authenticating: connections relayed at once, and how
//! long one waits for PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections relayed at once, all tenants together: below PostgreSQL's
/// own `max_connections`, so tenants cannot fill the provider's slots with
/// half-open handshakes.
const MAX_RELAYED: usize = 128;
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

async fn serve(listener: TcpListener, target: SocketAddr) {
    let slots = Arc::new(Semaphore::new(MAX_RELAYED));
    loop {
        let (inbound, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "database relay: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, "database relay: {MAX_RELAYED} connections open; refused");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
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
}
