//! An emulated wide-area link: a TCP relay that holds each direction's
//! bytes for a fixed one-way delay, and can go dark — a partition, where
//! nothing passes and nothing is refused. It stands in for `tc netem`,
//! which this machine's kernel lacks (`CONFIG_NET_SCH_NETEM` is not set).
//!
//! Each direction of a connection is read by one thread and written by
//! another that sleeps until each chunk is due: `std::thread::sleep` keeps
//! the delay within about a tenth of a millisecond, where an async timer
//! would round it to the millisecond.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Link {
    /// Where the link's near end listens.
    pub addr: SocketAddr,
    pub one_way: Duration,
    dark: Arc<AtomicBool>,
}

impl Link {
    /// A link to `target` on a loopback port of its own.
    pub fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let dark = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let d = dark.clone();
        std::thread::spawn(move || {
            for near in listener.incoming().flatten() {
                if d.load(Ordering::Relaxed) {
                    // Accepted and never answered, as a dark link's peer
                    // would be to a handshake.
                    if let Ok(mut held) = held.lock() {
                        held.push(near);
                    }
                    continue;
                }
                let Ok(far) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = (near.set_nodelay(true), far.set_nodelay(true));
                let (Ok(near2), Ok(far2)) = (near.try_clone(), far.try_clone()) else {
                    continue;
                };
                pipe(near, far, one_way, d.clone());
                pipe(far2, near2, one_way, d.clone());
            }
        });
        Ok(Link {
            addr,
            one_way,
            dark,
        })
    }

    /// From now on nothing passes, either way, on any connection.
    pub fn darken(&self) {
        self.dark.store(true, Ordering::Relaxed);
    }

    /// The link is back: new connections pass (those open across the dark
    /// spell lost bytes, as their ends will find).
    pub fn light(&self) {
        self.dark.store(false, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.darken();
    }
}

/// Relays `from` to `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, dark: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let d = dark.clone();
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if d.load(Ordering::Relaxed) {
                continue;
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        if !d.load(Ordering::Relaxed) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) if !dark.load(Ordering::Relaxed) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_a_delay_later_each_way_and_not_at_all_when_dark() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let link = Link::start(target, Duration::from_millis(5)).unwrap();
        let mut c = TcpStream::connect(link.addr).unwrap();
        c.set_nodelay(true).unwrap();
        let mut b = [0u8; 2];
        for _ in 0..5 {
            let started = Instant::now();
            c.write_all(b"hi").unwrap();
            c.read_exact(&mut b).unwrap();
            let rtt = started.elapsed();
            assert!(rtt >= Duration::from_millis(10), "{rtt:?}");
            assert!(rtt < Duration::from_millis(200), "{rtt:?}");
        }
        link.darken();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        c.write_all(b"hi").unwrap();
        assert!(c.read_exact(&mut b).is_err(), "nothing passes a dark link");
        link.light();
        let mut fresh = TcpStream::connect(link.addr).unwrap();
        fresh.write_all(b"ok").unwrap();
        fresh.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok");
    }
}
