//! The runtime and data planes as commands: `atrium agent` and `atrium
//! gateway` run them with their own credentials; `atrium node join` and
//! `atrium gateway join` exchange a one-time join token for one; the
//! provider issues join tokens (`… join-token`), lists and revokes
//! credentials (`atrium credential`), and a holder rotates its own
//! (`… rotate-credential`).
//!
//! No plane ever runs with the provider's admin token: it reaches the
//! whole control plane, where a node's credential reaches its node's work
//! and a gateway's its site's routing and usage.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use atrium_api::{CreatedJoinToken, JoinTokenRequest};
use atrium_client::{ControlPlane, CredentialFile};
use atrium_core::plane::Plane;
use clap::{Args, Subcommand};
use reqwest::Method;

use crate::client::{self, Columns, Output};

/// Where a plane keeps its credential in its data directory.
pub fn credential_path(plane: Plane, data_dir: &Path) -> PathBuf {
    match plane {
        Plane::Node => data_dir.join("node.credential"),
        Plane::Gateway => data_dir.join("gateway").join("gateway.credential"),
    }
}

/// How a plane process finds its credential: the file in its data
/// directory, else a join with `join_token` (saving the file), else a
/// credential token given on the command line. An admin token or tenant
/// key is refused, whatever the route.
pub async fn credential(
    plane: Plane,
    data_dir: &Path,
    server: &str,
    token: Option<String>,
    join_token: Option<&str>,
    name: Option<&str>,
) -> Result<(CredentialFile, PathBuf)> {
    let path = credential_path(plane, data_dir);
    let who = plane.as_str();
    if let Some(token) = token {
        if Plane::of_token(&token) != Some(plane) {
            bail!(
                "--token / ATRIUM_TOKEN is not a {who} credential: the {who} never holds the \
                 provider's admin token or a tenant key. Ask the provider for a join token \
                 (atrium {who} join-token NAME --site SITE) and run `atrium {who} join \
                 --join-token <token>` here"
            );
        }
    }
    if let Some(file) = CredentialFile::load(&path)? {
        if file.plane != plane {
            bail!(
                "{} holds a {} credential, not a {who}'s",
                path.display(),
                file.plane.as_str()
            );
        }
        return Ok((file, path));
    }
    let Some(join_token) = join_token else {
        bail!(
            "no {who} credential in {}: join first with `atrium {who} join --join-token <token>` \
             (the provider issues one with `atrium {who} join-token NAME --site SITE`)",
            path.display()
        );
    };
    Ok((join(plane, server, join_token, name, &path).await?, path))
}

/// Exchanges a join token and saves the credential.
async fn join(
    plane: Plane,
    server: &str,
    join_token: &str,
    name: Option<&str>,
    path: &Path,
) -> Result<CredentialFile> {
    let file = CredentialFile::join(server, join_token, name)
        .await
        .with_context(|| format!("joining the control plane at {server}"))?;
    if file.plane != plane {
        bail!(
            "that join token is for a {}, not a {}",
            file.plane.as_str(),
            plane.as_str()
        );
    }
    file.save(path)
        .with_context(|| format!("saving the credential to {}", path.display()))?;
    Ok(file)
}

/// `atrium node join` / `atrium gateway join`.
pub async fn join_command(
    plane: Plane,
    server: &str,
    join_token: &str,
    name: Option<&str>,
    data_dir: &Path,
) -> Result<()> {
    let path = credential_path(plane, data_dir);
    let file = join(plane, server, join_token, name, &path).await?;
    println!(
        "Joined as {} {:?} of site {:?}; credential saved to {} (0600).",
        plane.as_str(),
        file.name,
        file.site,
        path.display()
    );
    Ok(())
}

/// `atrium node rotate-credential` / `atrium gateway rotate-credential`: a
/// running agent or gateway picks the new secret up from the file the
/// next time the control plane refuses the old one.
pub async fn rotate_command(plane: Plane, data_dir: &Path) -> Result<()> {
    let path = credential_path(plane, data_dir);
    let file = CredentialFile::load(&path)?
        .ok_or_else(|| anyhow!("no {} credential in {}", plane.as_str(), path.display()))?;
    let rotated = file.rotate().await.context("rotating the credential")?;
    rotated.save(&path)?;
    println!("Rotated; the new credential is in {}.", path.display());
    Ok(())
}

/// `atrium node join-token` / `atrium gateway join-token` (the provider).
pub async fn issue_join_token(
    cp: &ControlPlane,
    output: Output,
    plane: Plane,
    name: &str,
    site: &str,
    ttl_seconds: u64,
    uses: u32,
) -> Result<()> {
    let created = join_token(cp, plane, name, site, ttl_seconds, uses).await?;
    match output {
        Output::Json => client::print(&serde_json::to_value(&created)?, output, JOIN_TOKEN_COLUMNS),
        Output::Table => {
            let token = serde_json::to_value(&created.join_token)?;
            client::print(&token, output, JOIN_TOKEN_COLUMNS);
            println!(
                "\nJoin token (shown once, usable {}):\n  {}\nOn the {}: atrium {} join --join-token <token>{}",
                if uses == 1 { "once".to_string() } else { format!("{uses} times") },
                created.secret,
                plane.as_str(),
                plane.as_str(),
                if name.is_empty() { " --name <its name>" } else { "" }
            );
        }
    }
    Ok(())
}

/// Issues a join token for `plane` `name` of `site` (an empty name: each
/// joiner names itself, up to `uses` of them).
pub async fn join_token(
    cp: &ControlPlane,
    plane: Plane,
    name: &str,
    site: &str,
    ttl_seconds: u64,
    uses: u32,
) -> Result<CreatedJoinToken> {
    let body = JoinTokenRequest {
        plane,
        name: name.to_string(),
        site: site.to_string(),
        ttl_seconds: Some(ttl_seconds),
        uses: Some(uses),
    };
    Ok(cp
        .request(Method::POST, "/v1/join-tokens", Some(&body))
        .await?)
}

/// Joining and credentials, the same for nodes and gateways.
#[derive(Subcommand)]
pub enum PlaneCmd {
    /// Exchange a one-time join token for this machine's credential (saved
    /// in the data directory, 0600)
    Join {
        #[arg(long, env = "ATRIUM_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
        /// This machine's name, for a join token that names none
        #[arg(long)]
        name: Option<String>,
    },
    /// Issue a join token (the provider): for one named node or gateway,
    /// or — without a name — for up to --uses of them, each naming
    /// itself when it joins (a Kubernetes DaemonSet's agents)
    JoinToken {
        /// The node's (or gateway's) name; leave it out for a token of
        /// several uses
        name: Option<String>,
        #[arg(long)]
        site: String,
        /// How long the token may wait to be used
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
        /// How many may join with it (only without a name)
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Replace this machine's credential with a new one; the old stops
    /// working at once (a running agent or gateway picks the new one up)
    RotateCredential,
}

pub const JOIN_TOKEN_COLUMNS: Columns = &[
    ("PLANE", "/spec/plane"),
    ("NAME", "/spec/name"),
    ("SITE", "/spec/site"),
    ("USES", "/spec/uses"),
    ("EXPIRES", "/spec/expires_at"),
    ("USED", "/status/used_at"),
    ("JOINED", "/status/joined"),
    ("ID", "/id"),
];

pub const CREDENTIAL_COLUMNS: Columns = &[
    ("PLANE", "/spec/plane"),
    ("NAME", "/spec/name"),
    ("SITE", "/spec/site"),
    ("ISSUED", "/status/issued_at"),
    ("REVOKED", "/status/revoked_at"),
    ("ID", "/id"),
];

/// A duration flag: `90s`, `5m`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (90s, 5m, 500ms or seconds)");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
    .and_then(|d| if d.is_zero() { Err(bad()) } else { Ok(d) })
}

/// What a gateway lets tenants reach and how many connections it holds.
#[derive(Args, Clone)]
pub struct GatewayFlags {
    /// Ranges external upstreams may be in although internal (loopback,
    /// private, link-local, this host): e.g. 10.9.0.0/16,127.0.0.2
    #[arg(
        long = "external-allow",
        env = "ATRIUM_EXTERNAL_ALLOW",
        value_delimiter = ','
    )]
    pub external_allow: Vec<atrium_gateway::egress::Cidr>,
    /// Bearer token /metrics requires [default: <data-dir>/gateway/metrics.token]
    #[arg(long, env = "ATRIUM_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Connections held open at once, all clients
    #[arg(long, env = "ATRIUM_GATEWAY_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Connections held open at once from one client address
    #[arg(
        long,
        env = "ATRIUM_GATEWAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 1_024
    )]
    pub max_connections_per_ip: usize,
    /// How long an idle keep-alive connection stays open
    #[arg(long, env = "ATRIUM_GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long a request waits for a replica of its deployment to start
    /// (from zero, say) before it gets 503 with Retry-After
    #[arg(long, env = "ATRIUM_GATEWAY_HOLD_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub hold_timeout: Duration,
    /// Where other sites' gateways forward requests to this one (TLS with
    /// the sites' certificates), e.g. 10.0.0.2:8443; without it, this
    /// gateway forwards but takes no forwarded requests
    #[arg(long, env = "ATRIUM_GATEWAY_PEER_LISTEN")]
    pub peer_listen: Option<std::net::SocketAddr>,
    /// The address peers are told to use, when it is not --peer-listen's
    /// (a wildcard listener, a NAT)
    #[arg(long, env = "ATRIUM_GATEWAY_PEER_ADDRESS")]
    pub peer_address: Option<std::net::SocketAddr>,
}

impl Default for GatewayFlags {
    /// The flags' own defaults.
    fn default() -> Self {
        let limits = atrium_gateway::ConnectionLimits::default();
        GatewayFlags {
            external_allow: Vec::new(),
            metrics_token: None,
            max_connections: limits.max_total,
            max_connections_per_ip: limits.max_per_ip,
            idle_timeout: limits.idle_timeout,
            hold_timeout: atrium_gateway::DEFAULT_HOLD_TIMEOUT,
            peer_listen: None,
            peer_address: None,
        }
    }
}

impl GatewayFlags {
    pub fn config(
        &self,
        credential: CredentialFile,
        credential_path: PathBuf,
        listen: std::net::SocketAddr,
        data_dir: PathBuf,
        secret: Option<String>,
    ) -> atrium_gateway::GatewayConfig {
        atrium_gateway::GatewayConfig {
            credential,
            credential_path,
            listen,
            data_dir,
            secret,
            external_allow: self.external_allow.clone(),
            metrics_token: self.metrics_token.clone(),
            connections: atrium_gateway::ConnectionLimits {
                max_total: self.max_connections,
                max_per_ip: self.max_connections_per_ip,
                idle_timeout: self.idle_timeout,
            },
            hold_timeout: self.hold_timeout,
            peer_listen: self.peer_listen,
            peer_address: self.peer_address,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "0", "1h", "-1s", "s", "99999999999999999999m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
