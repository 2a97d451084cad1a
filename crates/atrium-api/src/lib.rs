//! Wire types of Atrium's public REST API (`/v1/...`) and of the messages the
//! planes exchange. Plain data: no logic beyond construction.
//!
//! Every resource travels in one envelope, [`ResourceView`]: identity and
//! revision fields owned by the control plane, the `spec` the client wrote,
//! and the `status` controllers observed. [`Resource`] names each kind and
//! its spec and status types; [`Object<R>`] is its envelope.

mod resource;

pub use resource::{
    Batch, Cluster, Collection, Credential, Database, Deployment, Exec, File, Gateway, JoinToken,
    Key, Model, NoStatus, Node, Object, Ownership, Placement, Resource, ServiceRoute, Site, Tenant,
    Volume, Workload,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A resource as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceView<S, T = Value> {
    pub id: String,
    pub name: String,
    /// Owning tenant; absent for provider-level and public resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Revision of the last change to this resource.
    pub revision: i64,
    pub created_at: String,
    pub updated_at: String,
    pub spec: S,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<T>,
}

/// Body of a create request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest<S> {
    /// A DNS label, unique per kind within the tenant.
    pub name: String,
    /// Owning tenant. Tenant callers may omit it (their own tenant is
    /// implied); the provider admin names it for tenant-owned resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub spec: S,
}

/// Body of an update (replace) request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRequest<S> {
    pub spec: S,
    /// Apply only if the resource is still at this revision (optimistic
    /// concurrency); unconditional when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    /// The store revision the page was read at: watch from here to follow
    /// every later change.
    pub revision: i64,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// Kinds of watch events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WatchEventType {
    Added,
    Modified,
    Deleted,
    /// No change for the watcher, only progress: resume from `revision`.
    Bookmark,
}

/// One line of a `?watch=true` stream (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchEvent<T> {
    #[serde(rename = "type")]
    pub kind: WatchEventType,
    pub revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<T>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `not_found`, `quota_exceeded`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
    /// Structured facts: the fields at fault, the quota numbers.
    #[serde(default)]
    pub details: Value,
}

/// Status of an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// When the key was revoked; it authenticates nothing after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// Where tenant clusters' Kubernetes clients connect (`GET
/// /v1/kube/endpoint`): the control plane's TLS listener and the CA that
/// issued its certificate, as a kubeconfig's `certificate-authority-data`
/// (base64 of the PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeEndpoint {
    pub server: String,
    pub certificate_authority_data: String,
}

/// A key just created: the only response that carries its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key: ResourceView<atrium_core::key::KeySpec, KeyStatus>,
    /// The whole token, `atr_<id>_<secret>`. Shown once; store it now.
    pub secret: String,
}

/// A tenant's quota beside what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaView {
    pub tenant: String,
    pub quota: atrium_core::quota::Quota,
    pub used: atrium_core::quota::ResourceUsage,
}

/// Body of `PUT /v1/quotas/{tenant}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaUpdate {
    pub quota: atrium_core::quota::Quota,
}

/// One audited mutation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEventView {
    pub revision: i64,
    pub at: String,
    /// Who: `admin` or the key id.
    pub actor: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What: e.g. `deployment.create`.
    pub action: String,
    pub kind: String,
    pub object_id: String,
    pub object_name: String,
    pub request_id: String,
}

/// One metered request, as a gateway reports it and `/v1/usage` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecordView {
    /// When the request finished (RFC 3339).
    pub at: String,
    pub tenant: String,
    /// Deployment name (the `model` the tenant called).
    pub deployment: String,
    /// The site that processed the request.
    pub site: String,
    /// The replica (placement) that served it.
    pub replica: String,
    /// Never negative: the control plane refuses a batch with a negative
    /// count.
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// The gateway's `x-request-id` of the request.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Set when the gateway recorded its own count because the upstream's
    /// was outside what the request could produce: says what it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// The Batch API job (`batch_…`) the request ran for; absent for the
    /// tenant's own requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// How many requests the record sums: 1 for a request's own record;
    /// more for an aggregate (then `at` is the minute it covers and
    /// `request_id` is empty).
    #[serde(default = "one_request", skip_serializing_if = "is_one_request")]
    pub requests: i64,
    /// The site the request entered at, when another site (`site`) served
    /// it under the tenant's residency; absent when served where it
    /// entered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ingress_site: String,
}

fn one_request() -> i64 {
    1
}

fn is_one_request(n: &i64) -> bool {
    *n == 1
}

/// Body of `POST /v1/usage`: a batch, recorded at most once per id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    pub batch_id: String,
    pub records: Vec<UsageRecordView>,
}

/// Body of `POST /v1/limits/sync`: what one gateway admitted since its last
/// sync, per limited scope (`key:<id>` or `tenant:<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSync {
    /// The gateway's stable id (kept in its data directory).
    pub gateway: String,
    pub site: String,
    #[serde(default)]
    pub scopes: Vec<ScopeDelta>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeDelta {
    pub scope: String,
    pub requests: u64,
    pub tokens: u64,
}

/// Answer to a sync: how many gateways the site has, and per scope what
/// the *other* gateways admitted in the last minute and today (UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSyncAnswer {
    pub gateways: u64,
    pub scopes: Vec<ScopeTotals>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeTotals {
    pub scope: String,
    pub requests_minute: u64,
    pub tokens_minute: u64,
    pub tokens_day: u64,
}

/// Body of `POST /v1/load`: what one gateway saw of each deployment it
/// routed to over its last interval, for the autoscaler. A deployment it
/// leaves out had no requests there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    /// The gateway's stable id (kept in its data directory).
    pub gateway: String,
    pub site: String,
    #[serde(default)]
    pub deployments: Vec<DeploymentLoad>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentLoad {
    /// The deployment's id.
    pub deployment: String,
    /// Mean requests in flight to its replicas over the interval.
    pub in_flight: f64,
    /// Requests that started in the interval.
    pub requests: u64,
    /// Requests held now because none of its replicas is ready.
    pub waiting: u64,
}

/// Body of `POST /v1/join-tokens`: the provider lets one node or gateway
/// join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    pub plane: atrium_core::plane::Plane,
    /// The node's (or gateway's) name; absent: each joiner names itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub site: String,
    /// Joins it admits [default: 1]; more than one only without a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// How long the token may wait to be used [default: 3600].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// Status of a join token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenStatus {
    /// When it was last exchanged for a credential; once its uses are
    /// spent it joins nothing after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at: Option<String>,
    /// The names it joined, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<String>,
}

/// Body of `POST /v1/join` for a token without a name: the joiner's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A join token just issued: the only response that carries its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatedJoinToken {
    pub join_token: ResourceView<atrium_core::plane::JoinTokenSpec, JoinTokenStatus>,
    /// `atrj_<id>_<secret>`: give it to the node or gateway once.
    pub secret: String,
}

/// Status of a plane credential.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialStatus {
    /// When it was last issued (joined or rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<String>,
    /// When it was revoked; it authenticates nothing after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// A credential just issued (by a join or a rotation): the only response
/// that carries its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCredential {
    pub credential: ResourceView<atrium_core::plane::CredentialSpec, CredentialStatus>,
    /// `atrn_<id>_<secret>` or `atrg_<id>_<secret>`: the plane's only
    /// credential from now on.
    pub secret: String,
}

/// `POST /v1/site-certificates`: a gateway asks for a certificate for its
/// site's peer link. Only the public half of its key travels; the site
/// named in the certificate is the credential's, never one it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteCertificateRequest {
    /// The ECDSA P-256 public key, uncompressed (65 bytes), in hex.
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteCertificate {
    /// PEM, valid for `<site>.site.atrium` as a server and a client.
    pub certificate_pem: String,
    /// The Atrium CA's certificate, PEM: the only root peers trust.
    pub ca_pem: String,
    /// Seconds it stays valid from now.
    pub valid_for_s: u64,
}
