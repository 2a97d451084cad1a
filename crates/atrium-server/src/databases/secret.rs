//! A database role's password, and what PostgreSQL is told of it: the
//! SCRAM-SHA-256 verifier (RFC 5802/7677, PostgreSQL's `rolpassword`
//! form), computed here, so the password itself never reaches the
//! server's statement log or `pg_stat_activity`.

use base64::Engine as _;
use rand::Rng;
use ring::{digest, hmac, pbkdf2};

/// PostgreSQL's own iteration count for verifiers it makes.
const ITERATIONS: u32 = 4096;

/// 32 letters and digits: 190 bits, and nothing a connection string must
/// escape.
pub fn new_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, base64.
pub fn scram_verifier(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    verifier_with_salt(password, &salt)
}

fn verifier_with_salt(password: &str, salt: &[u8]) -> String {
    let mut salted = [0u8; 32];
    let iterations = std::num::NonZeroU32::new(ITERATIONS).unwrap_or(std::num::NonZeroU32::MIN);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64(salt),
        b64(stored_key.as_ref()),
        b64(server_key.as_ref())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What PostgreSQL 15 itself stored for `CREATE ROLE … PASSWORD
    /// 'pencil'` (read back from `pg_authid.rolpassword`), from its salt.
    #[test]
    fn matches_the_verifier_postgresql_makes() {
        let made = "SCRAM-SHA-256$4096:gjqzXBBhqAE6AsO9qO/tkA==$\
                    FWoPfctlVLGlLCOEdTnRIb+qKYK3GekZC/OEBGB6Y/Q=:\
                    KkSC0xdiQYGD0OWBEYkxqsq+UzBHQjkmyWWDp70WMsc=";
        let salt = base64::engine::general_purpose::STANDARD
            .decode("gjqzXBBhqAE6AsO9qO/tkA==")
            .unwrap();
        assert_eq!(verifier_with_salt("pencil", &salt), made);
    }

    #[test]
    fn passwords_are_long_and_plain() {
        let a = new_password();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, new_password());
        assert!(!scram_verifier(&a).contains(&a));
    }
}
