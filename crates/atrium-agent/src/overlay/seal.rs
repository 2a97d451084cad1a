//! Sealing tenants' overlay frames between sites: a datagram protocol in
//! the manner of WireGuard's transport (this kernel has no WireGuard and
//! no IPsec ESP, so it is done here, in userspace).
//!
//! Each node has a static X25519 key; its public half is in its node
//! record. Two nodes agree a secret, and each direction of each sender
//! *session* (one per agent start, a number that only grows) gets its own
//! ChaCha20-Poly1305 key, derived with HKDF-SHA256 from the secret, both
//! public keys in sending order and the session. A datagram is
//! `version | sender index | session | counter | sealed frame`; the
//! header is authenticated with the frame and the counter is the nonce,
//! so a key never sees one nonce twice. The receiver refuses what fails
//! authentication, counters it has seen (a sliding window), and sessions
//! older than the newest it accepted: a recorded datagram cannot be
//! played back.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};

const VERSION: u8 = 1;
/// Bytes before the sealed frame.
pub const HEADER: usize = 21;
const TAG: usize = 16;
const WINDOW: u64 = 128;
const LABEL: &[u8] = b"atrium overlay v1";

/// This node's key pair.
pub struct Keys {
    secret: StaticSecret,
    pub public: [u8; 32],
}

impl Keys {
    pub fn from_secret(bytes: [u8; 32]) -> Keys {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Keys { secret, public }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    OldSession,
    Replayed,
    Forged,
}

/// The sender a datagram claims (to find its link; nothing is believed
/// until the link opens it).
pub fn sender_of(datagram: &[u8]) -> Option<u32> {
    if datagram.len() < HEADER + TAG || datagram[0] != VERSION {
        return None;
    }
    Some(u32::from_be_bytes(datagram[1..5].try_into().ok()?))
}

fn direction_key(
    shared: &[u8; 32],
    from: &[u8; 32],
    to: &[u8; 32],
    session: u64,
) -> Option<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, LABEL).extract(shared);
    let session = session.to_be_bytes();
    let info = [from.as_slice(), to.as_slice(), session.as_slice()];
    let mut key = [0u8; 32];
    prk.expand(&info, hkdf::HKDF_SHA256)
        .ok()?
        .fill(&mut key)
        .ok()?;
    let key = UnboundKey::new(&CHACHA20_POLY1305, &key).ok()?;
    Some(LessSafeKey::new(key))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Counters seen within the last [`WINDOW`] of the highest.
#[derive(Debug, Default)]
struct ReplayWindow {
    highest: Option<u64>,
    seen: u128,
}

impl ReplayWindow {
    fn fresh(&self, counter: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) if counter > h => true,
            Some(h) => h - counter < WINDOW && self.seen & (1u128 << (h - counter)) == 0,
        }
    }

    fn mark(&mut self, counter: u64) {
        match self.highest {
            Some(h) if counter <= h => self.seen |= 1u128 << (h - counter),
            Some(h) => {
                let shift = counter - h;
                self.seen = if shift >= WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.highest = Some(counter);
            }
            None => {
                self.seen = 1;
                self.highest = Some(counter);
            }
        }
    }
}

struct Inbound {
    session: u64,
    key: LessSafeKey,
    window: ReplayWindow,
}

/// Both directions between this node and one peer.
pub struct Link {
    shared: [u8; 32],
    own: [u8; 32],
    peer: [u8; 32],
    own_index: u32,
    session: u64,
    send_key: LessSafeKey,
    counter: u64,
    inbound: Option<Inbound>,
}

impl Link {
    /// `None` when the peer's key agrees no secret (a low-order point).
    pub fn new(keys: &Keys, own_index: u32, session: u64, peer_key: [u8; 32]) -> Option<Link> {
        let shared = keys.secret.diffie_hellman(&PublicKey::from(peer_key));
        if !shared.was_contributory() {
            return None;
        }
        let shared = shared.to_bytes();
        Some(Link {
            send_key: direction_key(&shared, &keys.public, &peer_key, session)?,
            shared,
            own: keys.public,
            peer: peer_key,
            own_index,
            session,
            counter: 0,
            inbound: None,
        })
    }

    /// `frame` sealed for the peer, into `out` (cleared first: one buffer
    /// serves every frame).
    pub fn seal(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let counter = self.counter;
        self.counter += 1;
        let mut header = [0u8; HEADER];
        header[0] = VERSION;
        header[1..5].copy_from_slice(&self.own_index.to_be_bytes());
        header[5..13].copy_from_slice(&self.session.to_be_bytes());
        header[13..21].copy_from_slice(&counter.to_be_bytes());
        out.clear();
        out.extend_from_slice(&header);
        out.extend_from_slice(frame);
        let sealed = self.send_key.seal_in_place_separate_tag(
            nonce(counter),
            Aad::from(header),
            &mut out[HEADER..],
        );
        match sealed {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            // Only past ChaCha20's 256 GiB under one nonce: the header
            // alone goes, and the peer refuses it as malformed.
            Err(_) => out.truncate(HEADER),
        }
    }

    /// The frame inside a datagram from the peer, if it is genuine, new,
    /// and of its newest session: opened in place.
    pub fn open<'d>(&mut self, datagram: &'d mut [u8]) -> Result<&'d [u8], Refused> {
        if datagram.len() < HEADER + TAG || datagram[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&datagram[..HEADER]);
        let field = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        let (session, counter) = (field(5), field(13));
        let current = self.inbound.as_ref().map(|i| i.session);
        if current.is_some_and(|c| session < c) {
            return Err(Refused::OldSession);
        }
        // A session not seen yet: its key, kept once a datagram of it opens.
        let fresh = match current == Some(session) {
            true => None,
            false => Some(
                direction_key(&self.shared, &self.peer, &self.own, session)
                    .ok_or(Refused::Forged)?,
            ),
        };
        let key = match (&fresh, &self.inbound) {
            (Some(key), _) => key,
            (None, Some(i)) if i.window.fresh(counter) => &i.key,
            (None, _) => return Err(Refused::Replayed),
        };
        let len = key
            .open_in_place(nonce(counter), Aad::from(header), &mut datagram[HEADER..])
            .map_err(|_| Refused::Forged)?
            .len();
        if let Some(key) = fresh {
            // Authenticated, and newer than any before: the peer started
            // again. Its older session is refused from now on.
            self.inbound = Some(Inbound {
                session,
                key,
                window: ReplayWindow::default(),
            });
        }
        if let Some(i) = &mut self.inbound {
            i.window.mark(counter);
        }
        Ok(&datagram[HEADER..HEADER + len])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sealed(link: &mut Link, frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        link.seal(frame, &mut out);
        out
    }

    fn opened(link: &mut Link, datagram: &[u8]) -> Result<Vec<u8>, Refused> {
        let mut copy = datagram.to_vec();
        link.open(&mut copy).map(<[u8]>::to_vec)
    }

    fn pair(session_a: u64, session_b: u64) -> (Keys, Keys, Link, Link) {
        let (a, b) = (Keys::from_secret([7; 32]), Keys::from_secret([9; 32]));
        let ab = Link::new(&a, 1, session_a, b.public).unwrap();
        let ba = Link::new(&b, 2, session_b, a.public).unwrap();
        (a, b, ab, ba)
    }

    #[test]
    fn frames_cross_both_ways_and_nothing_of_them_shows() {
        let (_, _, mut ab, mut ba) = pair(10, 20);
        let frame = b"GET /secret-of-acme HTTP/1.1";
        let datagram = sealed(&mut ab, frame);
        assert_eq!(sender_of(&datagram), Some(1));
        assert!(!datagram.windows(6).any(|w| w == b"secret"));
        assert_eq!(opened(&mut ba, &datagram).unwrap(), frame);
        let back = sealed(&mut ba, b"200 OK");
        assert_eq!(opened(&mut ab, &back).unwrap(), b"200 OK");
    }

    #[test]
    fn tampering_replay_and_old_sessions_are_refused() {
        let (a, b, mut ab, mut ba) = pair(10, 20);
        let first = sealed(&mut ab, b"one");
        let second = sealed(&mut ab, b"two");
        // Out of order within the window is fine; each only once.
        assert_eq!(opened(&mut ba, &second).unwrap(), b"two");
        assert_eq!(opened(&mut ba, &first).unwrap(), b"one");
        assert_eq!(opened(&mut ba, &first), Err(Refused::Replayed));

        let mut tampered = sealed(&mut ab, b"three");
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(opened(&mut ba, &tampered), Err(Refused::Forged));
        // A header rewritten to claim another counter fails too.
        let mut moved = sealed(&mut ab, b"four");
        moved[20] ^= 0x40;
        assert_eq!(opened(&mut ba, &moved), Err(Refused::Forged));

        // The sender starts again (a newer session): its old datagrams
        // stop opening.
        let old = sealed(&mut ab, b"before restart");
        let mut restarted = Link::new(&a, 1, 11, b.public).unwrap();
        assert_eq!(
            opened(&mut ba, &sealed(&mut restarted, b"after")).unwrap(),
            b"after"
        );
        assert_eq!(opened(&mut ba, &old), Err(Refused::OldSession));

        // A third node's key opens nothing of theirs.
        let c = Keys::from_secret([5; 32]);
        let mut cb = Link::new(&c, 1, 99, b.public).unwrap();
        assert_eq!(
            opened(&mut ba, &sealed(&mut cb, b"forged")),
            Err(Refused::Forged)
        );
        assert_eq!(opened(&mut ba, &[1, 0, 0]), Err(Refused::Malformed));
    }

    #[test]
    fn the_window_slides() {
        let mut w = ReplayWindow::default();
        for c in [5, 3, 200] {
            assert!(w.fresh(c));
            w.mark(c);
        }
        assert!(!w.fresh(200));
        assert!(!w.fresh(5), "beyond the window");
        assert!(w.fresh(199));
        assert!(w.fresh(73));
        assert!(!w.fresh(72), "exactly WINDOW behind");
    }

    #[test]
    fn a_low_order_key_agrees_nothing() {
        let a = Keys::from_secret([7; 32]);
        assert!(Link::new(&a, 1, 1, [0; 32]).is_none());
    }
}
