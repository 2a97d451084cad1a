//! Atrium's domain model: names, resource quantities, sites, nodes, tenants,
//! API keys, models and deployments, with the validation and quota rules that
//! apply to them.
//!
//! This crate does no IO and knows nothing of HTTP or SQL: every other crate
//! builds on it, so it must stay cheap to compile and deterministic to test.
//! The `utoipa::ToSchema` derives are schema metadata only, so the OpenAPI
//! document is generated from these very types.

pub mod autoscale;
pub mod batch;
pub mod cluster;
pub mod collection;
pub mod database;
pub mod deployment;
pub mod exec;
pub mod gateway;
pub mod histogram;
pub mod key;
pub mod lifecycle;
pub mod limits;
pub mod model;
pub mod name;
pub mod node;
pub mod overlay;
pub mod placement;
pub mod plane;
pub mod quantity;
pub mod quota;
pub mod service_route;
pub mod site;
pub mod tenant;
pub mod url;
pub mod validation;
pub mod volume;
pub mod workload;

pub use validation::{FieldError, FieldErrors};
