//! Tenant-salted prefix affinity.
//!
//! Requests whose prompts start alike should reach the same replica, whose
//! prefix cache then already holds them. But a shared cache is a side
//! channel: if tenant A's prompt could warm a cache entry tenant B then
//! hits, B could time its way to A's prompts. So everything affinity and
//! caching key on is salted per tenant — `salt = HMAC(gateway secret,
//! tenant)` — and the same salt goes upstream as vLLM/SGLang's
//! `cache_salt`, replacing whatever the client sent, so two tenants with
//! the same prompt never share an affinity key or a cache block.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of the prompt the affinity key covers: the first blocks, where
/// shared system prompts and few-shot examples live.
pub const AFFINITY_PREFIX_BYTES: usize = 4 * 256;

/// Derives per-tenant salts from a gateway secret shared by the gateways
/// of a site (so they agree on affinity and on cache salts). Each tenant's
/// salt, and the MAC keyed with it, is derived once and kept: the request
/// path only clones a keyed MAC.
pub struct Salter {
    mac: Hmac<Sha256>,
    tenants: RwLock<HashMap<String, Arc<TenantSalt>>>,
}

/// A tenant's salt (64 hex characters) and the affinity MAC keyed with it.
pub struct TenantSalt {
    pub hex: String,
    keyed: Hmac<Sha256>,
}

impl TenantSalt {
    /// `affinity_key(&self.hex, prefix)`, without keying a MAC again.
    pub fn affinity_key(&self, prefix: &[u8]) -> u64 {
        first_word(self.keyed.clone().chain_update(prefix))
    }
}

impl Salter {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .unwrap_or_else(|_| Hmac::<Sha256>::new(&Default::default()));
        Salter {
            mac,
            tenants: RwLock::default(),
        }
    }

    /// The tenant's salt, as 64 hex characters.
    pub fn tenant_salt(&self, tenant: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(b"atrium tenant salt\0");
        mac.update(tenant.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The tenant's salt and keyed MAC, derived on its first request.
    pub fn tenant(&self, tenant: &str) -> Arc<TenantSalt> {
        if let Some(known) = self
            .tenants
            .read()
            .ok()
            .and_then(|t| t.get(tenant).cloned())
        {
            return known;
        }
        let hex = self.tenant_salt(tenant);
        let keyed = Hmac::<Sha256>::new_from_slice(hex.as_bytes())
            .unwrap_or_else(|_| Hmac::<Sha256>::new(&Default::default()));
        let salt = Arc::new(TenantSalt { hex, keyed });
        if let Ok(mut t) = self.tenants.write() {
            t.insert(tenant.to_string(), salt.clone());
        }
        salt
    }
}

fn first_word(mac: Hmac<Sha256>) -> u64 {
    let digest = mac.finalize().into_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The affinity key of a prompt prefix under a tenant's salt.
pub fn affinity_key(salt: &str, prefix: &[u8]) -> u64 {
    let Ok(mac) = Hmac::<Sha256>::new_from_slice(salt.as_bytes()) else {
        return 0;
    };
    first_word(mac.chain_update(prefix))
}

/// Rendezvous (highest random weight) hashing: the replica an affinity key
/// prefers, stable as other replicas come and go.
pub fn rendezvous_weight(key: u64, replica: &str) -> u64 {
    // FNV-1a over the replica id, then mixed with the key (splitmix64).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in replica.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h ^ key;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Kind, ProxyRequest};
    use serde_json::json;

    fn prefix_of(body: serde_json::Value) -> Vec<u8> {
        prefix_in(Kind::Chat, body)
    }

    fn prefix_in(kind: Kind, body: serde_json::Value) -> Vec<u8> {
        let mut body = body;
        body["model"] = json!("m");
        let text = body.to_string();
        ProxyRequest::parse(text.as_bytes(), kind)
            .unwrap()
            .prompt_prefix()
            .to_vec()
    }

    #[test]
    fn same_prompt_different_tenants_differ() {
        let salter = Salter::new(b"gateway secret");
        let (a, b) = (salter.tenant_salt("acme"), salter.tenant_salt("globex"));
        assert_ne!(a, b);
        assert_eq!(a, salter.tenant_salt("acme"), "stable");
        assert_ne!(a, Salter::new(b"another secret").tenant_salt("acme"));
        let body = json!({"messages": [{"role": "user", "content": "What is a GPU?"}]});
        let prefix = prefix_of(body.clone());
        assert_eq!(prefix, b"user\nWhat is a GPU?");
        assert_ne!(affinity_key(&a, &prefix), affinity_key(&b, &prefix));
        let kept = salter.tenant("acme");
        assert_eq!(kept.hex, a);
        assert_eq!(kept.affinity_key(&prefix), affinity_key(&a, &prefix));
        assert!(Arc::ptr_eq(&kept, &salter.tenant("acme")), "derived once");
        assert_eq!(affinity_key(&a, &prefix), affinity_key(&a, &prefix));
    }

    #[test]
    fn prefix_is_bounded_and_reads_every_shape() {
        let long = "x".repeat(5000);
        let body = json!({"messages": [{"role": "system", "content": long}, {"role": "user", "content": "tail"}]});
        assert_eq!(prefix_of(body.clone()).len(), AFFINITY_PREFIX_BYTES);
        let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]});
        assert_eq!(prefix_of(parts), b"user\nab");
        assert_eq!(
            prefix_in(Kind::Completion, json!({"prompt": ["p", "q"]})),
            b"pq"
        );
        assert_eq!(prefix_in(Kind::Embedding, json!({"input": "e"})), b"e");
        assert!(prefix_of(json!({"messages": 3})).is_empty());
    }

    #[test]
    fn rendezvous_spreads_keys_and_is_stable() {
        let replicas = ["pl_a", "pl_b", "pl_c", "pl_d"];
        fn pick(key: u64, set: &[&'static str]) -> &'static str {
            set.iter()
                .max_by_key(|r| rendezvous_weight(key, r))
                .unwrap()
        }
        let mut counts = std::collections::HashMap::new();
        for key in 0..4000u64 {
            let k = affinity_key("salt", &key.to_le_bytes());
            *counts.entry(pick(k, &replicas)).or_insert(0) += 1;
            // Removing a replica moves only the keys it held.
            let before = pick(k, &replicas);
            if before != "pl_d" {
                assert_eq!(pick(k, &replicas[..3]), before);
            }
        }
        assert!(
            counts.values().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }
}
