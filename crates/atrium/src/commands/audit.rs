//! `atrium audit`: who changed what, when.

use anyhow::Result;
use atrium_api::{AuditEventView, ListResponse};
use reqwest::Method;

use super::Ctx;
use crate::client::{encode, Columns};

const AUDIT_COLUMNS: Columns = &[
    ("REVISION", "/revision"),
    ("AT", "/at"),
    ("ACTOR", "/actor"),
    ("ROLE", "/role"),
    ("TENANT", "/tenant"),
    ("ACTION", "/action"),
    ("OBJECT", "/object_name"),
    ("REQUEST", "/request_id"),
];

/// Audit events after revision `after`, of one tenant or all.
pub async fn run(ctx: &Ctx, tenant: Option<String>, after: Option<i64>) -> Result<()> {
    let mut query = vec![format!("after={}", after.unwrap_or(0))];
    if let Some(t) = tenant {
        query.push(format!("tenant={}", encode(&t)));
    }
    let path = format!("/v1/audit?{}", query.join("&"));
    let events: ListResponse<AuditEventView> =
        ctx.cp.request(Method::GET, &path, None::<&()>).await?;
    ctx.show(&events, AUDIT_COLUMNS)
}
