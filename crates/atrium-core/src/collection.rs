//! A tenant's vector collection: what it is (dimension, metric, the
//! embedding deployment that turns text into its vectors) and what it
//! holds. The points themselves live in the control plane's vector store
//! (`atrium-vector`), not in the object store.

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

/// Widest vector a collection takes (OpenAI's largest embeddings are 3,072).
pub const MAX_DIMENSION: u32 = 4_096;
/// Points one upsert may carry.
pub const MAX_POINTS_PER_WRITE: usize = 1_000;
/// Most neighbours one search returns, and the widest `ef` it may ask.
pub const MAX_SEARCH_LIMIT: usize = 100;
pub const MAX_EF: usize = 1_000;
/// A point's payload, as JSON, at most.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VectorMetric {
    Cosine,
    Dot,
    L2,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectionSpec {
    pub dimension: u32,
    pub metric: VectorMetric,
    /// One of the tenant's embedding deployments: points and searches may
    /// then give `text` instead of a vector, embedded through the gateway
    /// (metered like any request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_model: Option<String>,
}

impl CollectionSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if !(1..=MAX_DIMENSION).contains(&self.dimension) {
            errors.push("dimension", format!("must be 1 to {MAX_DIMENSION}"));
        }
        if let Some(m) = &self.embedding_model {
            errors.check("embedding_model", crate::name::validate_name(m));
        }
        errors.into_result()
    }
}

/// What a collection holds, as its last write left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CollectionStatus {
    pub points: u64,
    /// Its vectors' floats and its payloads' JSON, in bytes.
    #[serde(default)]
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_and_model_name_are_bounded() {
        let ok = CollectionSpec {
            dimension: 384,
            metric: VectorMetric::Cosine,
            embedding_model: Some("minilm".into()),
        };
        assert!(ok.validate().is_ok());
        let bad = CollectionSpec {
            dimension: 0,
            embedding_model: Some("../x".into()),
            ..ok.clone()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("dimension") && e.contains("embedding_model"),
            "{e}"
        );
        let wide = CollectionSpec {
            dimension: MAX_DIMENSION + 1,
            ..ok
        };
        assert!(wide.validate().is_err());
    }
}
