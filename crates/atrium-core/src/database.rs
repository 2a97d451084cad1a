//! A tenant's PostgreSQL database on the provider's PostgreSQL: its own
//! database and login role, a connection limit, a statement timeout, and a
//! hard size (a tablespace on a disk of that size). The credentials are
//! shown once, when made or rotated; the object keeps none of them.

use serde::{Deserialize, Serialize};

use crate::quantity::ByteSize;
use crate::FieldErrors;

/// Where a tenant's workloads reach the provider's PostgreSQL, on every
/// node whose agent relays to it: a link-local address each tenant's
/// network namespace translates to its agent's relay.
pub const WORKLOAD_HOST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 100, 5);
pub const WORKLOAD_PORT: u16 = 5432;

/// Connections one database's role may hold at once, at most.
pub const MAX_CONNECTIONS: u32 = 100;
/// The statement timeout's bounds: a tenant may not turn it off.
pub const MIN_STATEMENT_TIMEOUT_MS: u64 = 100;
pub const MAX_STATEMENT_TIMEOUT_MS: u64 = 24 * 3_600_000;
/// Smallest and largest size: a new database copies ~8 MiB from its
/// template into its tablespace, and no host holds more than this.
pub const MIN_DATABASE_BYTES: u64 = 32 << 20;
pub const MAX_DATABASE_BYTES: u64 = 1 << 40;

fn default_connections() -> u32 {
    10
}

fn default_timeout() -> u64 {
    30_000
}

fn default_size() -> ByteSize {
    ByteSize(1 << 30)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    /// Connections the database's role may hold at once [default: 10].
    #[serde(default = "default_connections")]
    pub connection_limit: u32,
    /// A statement running longer is cancelled, even one whose session
    /// set its own `statement_timeout` [default: 30000].
    #[serde(default = "default_timeout")]
    pub statement_timeout_ms: u64,
    /// Its hard size: a write past it fails (`could not extend file`),
    /// the server and other databases carry on [default: 1Gi].
    #[serde(default = "default_size")]
    #[schema(value_type = String, example = "1Gi")]
    pub size: ByteSize,
}

impl DatabaseSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if !(1..=MAX_CONNECTIONS).contains(&self.connection_limit) {
            errors.push(
                "connection_limit",
                format!("must be 1 to {MAX_CONNECTIONS}"),
            );
        }
        if !(MIN_STATEMENT_TIMEOUT_MS..=MAX_STATEMENT_TIMEOUT_MS)
            .contains(&self.statement_timeout_ms)
        {
            errors.push(
                "statement_timeout_ms",
                format!("must be {MIN_STATEMENT_TIMEOUT_MS} to {MAX_STATEMENT_TIMEOUT_MS}"),
            );
        }
        if !(MIN_DATABASE_BYTES..=MAX_DATABASE_BYTES).contains(&self.size.0) {
            errors.push(
                "size",
                format!(
                    "must be {} to {}",
                    ByteSize(MIN_DATABASE_BYTES),
                    ByteSize(MAX_DATABASE_BYTES)
                ),
            );
        }
        errors.into_result()
    }
}

/// Whether the database exists on the provider's PostgreSQL yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatabasePhase {
    /// Recorded; its disk, role and database are being made (again, after
    /// a crash midway).
    #[default]
    Provisioning,
    Ready,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatabaseStatus {
    pub phase: DatabasePhase,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_a_request_leaves_out_and_bounds_hold() {
        let spec: DatabaseSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.connection_limit, 10);
        assert_eq!(spec.size, ByteSize(1 << 30));
        assert!(spec.validate().is_ok());
        let bad = DatabaseSpec {
            connection_limit: 0,
            statement_timeout_ms: 0,
            size: ByteSize(1 << 20),
        };
        let e = bad.validate().unwrap_err().to_string();
        for field in ["connection_limit", "statement_timeout_ms", "size"] {
            assert!(e.contains(field), "{e}");
        }
        assert!(serde_json::from_str::<DatabaseSpec>(r#"{"password":"x"}"#).is_err());
    }
}
