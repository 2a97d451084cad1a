//! Configuration: command-line flags, then `ATRIUM_*` environment variables
//! (clap reads both), then an optional TOML file, then defaults. Everything
//! is validated in one pass so an operator sees every mistake at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The optional TOML file (`--config` / `ATRIUM_CONFIG`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub server: ServerFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub server: Option<String>,
    pub token: Option<String>,
    pub output: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub body_limit_bytes: Option<usize>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

pub fn load_file(path: Option<&Path>) -> Result<FileConfig, String> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// Where Atrium keeps its state by default: `$XDG_DATA_HOME/atrium`, else
/// `~/.local/share/atrium`, else `./atrium-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("atrium");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/atrium");
    }
    PathBuf::from("atrium-data")
}

/// Server settings after merging, or every problem found.
pub fn server_config(
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    body_limit: Option<usize>,
    file: &ServerFile,
) -> Result<atrium_server::ServerConfig, Vec<String>> {
    let mut errors = Vec::new();
    let listen_text = listen
        .or_else(|| file.listen.clone())
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen: Option<SocketAddr> = match listen_text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errors.push(format!(
                "listen: {listen_text:?} is not an address like 127.0.0.1:7070"
            ));
            None
        }
    };
    let data_dir = data_dir
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    if data_dir.exists() && !data_dir.is_dir() {
        errors.push(format!(
            "data-dir: {} exists and is not a directory",
            data_dir.display()
        ));
    }
    let database_url = database_url.or_else(|| file.database_url.clone());
    if let Some(url) = &database_url {
        let known = ["sqlite:", "postgres:", "postgresql:"];
        if !known.iter().any(|p| url.starts_with(p)) {
            errors.push(format!(
                "database-url: {url:?} must start with sqlite:// or postgres://"
            ));
        }
    }
    let body_limit = body_limit
        .or(file.body_limit_bytes)
        .unwrap_or(atrium_server::DEFAULT_BODY_LIMIT);
    if !(1024..=64 << 20).contains(&body_limit) {
        errors.push(format!(
            "body-limit: {body_limit} must be between 1024 and 67108864 bytes"
        ));
    }
    match (listen, errors.is_empty()) {
        (Some(listen), true) => Ok(atrium_server::ServerConfig {
            listen,
            data_dir,
            database_url,
            body_limit,
            tls_listen: None,
            tls_names: Vec::new(),
            changes_kept: atrium_server::DEFAULT_CHANGES_KEPT,
            compact_every: atrium_server::DEFAULT_COMPACT_EVERY,
            databases: None,
        }),
        _ => Err(errors),
    }
}

/// The database service's settings, when `--databases-url` asks for it.
pub fn databases_config(
    admin_url: Option<String>,
    volumes: Option<PathBuf>,
    data_dir: &std::path::Path,
) -> Option<atrium_server::DatabasesConfig> {
    Some(atrium_server::DatabasesConfig {
        admin_url: admin_url?,
        volumes: volumes.unwrap_or_else(|| data_dir.join("databases")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_error_at_once() {
        let file = ServerFile {
            body_limit_bytes: Some(1),
            ..ServerFile::default()
        };
        let errors = server_config(
            Some("nowhere".into()),
            Some(PathBuf::from("/etc/hostname")),
            Some("mysql://x".into()),
            None,
            &file,
        )
        .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("listen:"));
        assert!(errors[1].starts_with("data-dir:"));
        assert!(errors[2].starts_with("database-url:"));
        assert!(errors[3].starts_with("body-limit:"));
    }

    #[test]
    fn flags_beat_the_file() {
        let file = ServerFile {
            listen: Some("127.0.0.1:1".into()),
            ..ServerFile::default()
        };
        let c = server_config(Some("127.0.0.1:2".into()), None, None, None, &file).unwrap();
        assert_eq!(c.listen.port(), 2);
        let c = server_config(None, None, None, None, &file).unwrap();
        assert_eq!(c.listen.port(), 1);
    }
}
