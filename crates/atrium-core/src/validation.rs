//! Field-level validation errors, collected rather than returned one by one so
//! a caller learns everything that is wrong with a request at once.

use serde::Serialize;

/// One problem with one field of an input, named by its dotted path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.resources.cpu`.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

/// Every problem found in one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Records the error of `result`, if any, under `field`.
    pub fn check<T, E: std::fmt::Display>(&mut self, field: &str, result: Result<T, E>) {
        if let Err(e) = result {
            self.push(field, e.to_string());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// Prefixes every field path, so nested validators can report paths
    /// relative to themselves.
    pub fn nest(mut self, prefix: &str) -> Self {
        for e in &mut self.0 {
            e.field = format!("{prefix}.{}", e.field);
        }
        self
    }

    pub fn extend(&mut self, other: FieldErrors) {
        self.0.extend(other.0);
    }
}

impl std::fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for FieldErrors {}
