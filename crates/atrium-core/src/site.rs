//! Sites: the places a provider runs hardware, and the jurisdiction whose
//! data-residency rules apply there.

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// A large data centre.
    Core,
    /// A small site close to users, usually with fewer GPUs.
    Edge,
}

/// Checks a jurisdiction code: two to eight uppercase ASCII letters or
/// digits, e.g. `EU`, `DE`, `US`, `USCA`. Codes are compared exactly.
pub fn validate_jurisdiction(code: &str) -> Result<(), String> {
    let ok = (2..=8).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{code:?} is not a jurisdiction code; use 2 to 8 uppercase letters or digits, \
             e.g. \"EU\" or \"DE\""
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub kind: SiteKind,
    /// Jurisdiction whose residency rules the site satisfies, e.g. `EU`.
    pub jurisdiction: String,
    /// Free-form location, e.g. `Frankfurt, DE`.
    #[serde(default)]
    pub location: String,
}

impl SiteSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        errors.check("jurisdiction", validate_jurisdiction(&self.jurisdiction));
        if self.location.len() > 256 {
            errors.push("location", "must be at most 256 characters");
        }
        errors.into_result()
    }
}
