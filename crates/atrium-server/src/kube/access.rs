//! Who a request to a tenant cluster is, and whether it may do what it
//! asks.
//!
//! - An Atrium key (or the provider's admin token): its Atrium role over
//!   the cluster's tenant — a tenant admin's key is the cluster's
//!   administrator, a viewer's only reads, another tenant's finds no
//!   cluster (404).
//! - A service account token (`tokens`): only its own cluster, only while
//!   the account exists with the uid it was issued for, and only what the
//!   cluster's RBAC grants the account (`atrium_kube::rbac`). Discovery
//!   and the OpenAPI documents are open to every account, as upstream's
//!   `system:discovery`; RBAC objects are never an account's to write.
//!
//! Bad credentials get a 401 `Status`, as kubectl expects.

use atrium_kube::rbac::{self, Attributes, Subject};
use atrium_kube::{find, Catalog, KubeError, ResourceType};
use atrium_store::Object;
use axum::extract::{Request as HttpRequest, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::custom::catalog_for;
use super::objects::{find as find_object, now_unix, store_error, Scope};
use super::path::{self, Target};
use super::tokens::{self, Claims};
use super::{from_api, refusal};
use crate::auth::{self, Caller, Role};
use crate::crud::{require, resolve};
use crate::kinds::{Access, Cluster, Resource};
use crate::AppState;

/// A caller of a tenant cluster.
#[derive(Clone)]
pub enum Who {
    Atrium(Caller),
    ServiceAccount(Claims),
}

fn unauthorized(why: &str) -> KubeError {
    let mut e = from_api(crate::error::ApiError::Unauthenticated(why.into()));
    e.message = why.to_string();
    e
}

/// The middleware of `/k8s/…`: a service account token, else whatever
/// the rest of the API accepts.
pub async fn authenticate(
    State(state): State<AppState>,
    mut req: HttpRequest,
    next: Next,
) -> Response {
    let token = match auth::bearer(req.headers()) {
        Ok(t) => t.to_string(),
        Err(e) => return refusal(from_api(e)),
    };
    let who = if token.starts_with(tokens::PREFIX) {
        let key = match state.sealer.token_key() {
            Ok(key) => key,
            Err(e) => return refusal(e),
        };
        match tokens::verify(&key, &token, now_unix()) {
            Some(claims) => Who::ServiceAccount(claims),
            None => {
                return refusal(unauthorized(
                    "the service account token is invalid or expired",
                ))
            }
        }
    } else {
        match auth::authenticate(&state.store, req.headers()).await {
            Ok(caller) => Who::Atrium(caller),
            Err(e) => return refusal(from_api(e)),
        }
    };
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// A request let in: its cluster, the caller to audit, what it asks for
/// and the types the cluster serves.
pub(super) struct Admitted {
    pub cluster: Object,
    pub caller: Caller,
    pub target: Target,
    pub catalog: Catalog,
}

/// What `rest` names in `cluster`, among the types it serves.
async fn target_of(
    state: &AppState,
    cluster: &Object,
    rest: &str,
) -> Result<(Target, Catalog), KubeError> {
    let catalog = catalog_for(state, &Scope::of(state, cluster), rest).await?;
    Ok((path::parse(rest, &catalog)?, catalog))
}

/// The cluster `ident` names, and the caller to audit, if `who` may make
/// this request.
pub(super) async fn admit(
    state: &AppState,
    who: Who,
    ident: &str,
    rest: &str,
    method: &Method,
    query: &[(String, String)],
) -> Result<Admitted, KubeError> {
    match who {
        Who::Atrium(caller) => {
            require::<Cluster>(&caller, Access::Read).map_err(from_api)?;
            let cluster = resolve::<Cluster>(state, &caller, ident, None)
                .await
                .map_err(from_api)?;
            let (target, catalog) = target_of(state, &cluster, rest).await?;
            // Running a command in a pod is a write, though it is a GET.
            let exec = matches!(&target, Target::Resource(at) if at.subresource.as_deref() == Some("exec"));
            if !matches!(*method, Method::GET | Method::HEAD) || exec {
                require::<Cluster>(&caller, Access::Write).map_err(from_api)?;
            }
            Ok(Admitted {
                cluster,
                caller,
                target,
                catalog,
            })
        }
        Who::ServiceAccount(claims) => {
            let cluster = state
                .store
                .get(Cluster::KIND, &claims.cluster)
                .await
                .map_err(store_error)?
                .filter(|c| c.id == ident || c.name == ident)
                .ok_or_else(|| unauthorized("the service account token is not for this cluster"))?;
            let scope = Scope::of(state, &cluster);
            let accounts = find("", "v1", "serviceaccounts")
                .ok_or_else(|| KubeError::internal("service accounts are not served"))?;
            let account = find_object(
                state,
                &scope,
                accounts,
                &format!("{}/{}", claims.namespace, claims.name),
            )
            .await?;
            let current = account
                .as_ref()
                .and_then(|a| a.body["metadata"]["uid"].as_str())
                == Some(claims.uid.as_str());
            if !current {
                return Err(unauthorized(
                    "the service account this token was issued for no longer exists",
                ));
            }
            let subject = Subject {
                namespace: claims.namespace.clone(),
                name: claims.name.clone(),
            };
            let (target, catalog) = target_of(state, &cluster, rest).await?;
            if let Target::Resource(at) = &target {
                let watching = query
                    .iter()
                    .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
                let mut verb = rbac::verb(method.as_str(), at.name.is_some(), watching);
                if at.subresource.as_deref() == Some("exec") {
                    verb = "create";
                }
                let attributes = Attributes {
                    verb: verb.to_string(),
                    group: at.resource.group.to_string(),
                    resource: at.resource.plural.to_string(),
                    subresource: at.subresource.clone(),
                    name: at.name.clone(),
                    namespace: at.namespace.clone(),
                };
                authorize(state, &scope, &subject, &at.resource, &attributes).await?;
            }
            let caller = Caller {
                role: Role::Viewer,
                tenant: cluster.tenant.clone(),
                actor: subject.user(),
                plane: None,
                may_infer: false,
            };
            Ok(Admitted {
                cluster,
                caller,
                target,
                catalog,
            })
        }
    }
}

/// The cluster's RBAC, asked about `attributes` for `subject`.
async fn authorize(
    state: &AppState,
    scope: &Scope,
    subject: &Subject,
    resource: &ResourceType,
    attributes: &Attributes,
) -> Result<(), KubeError> {
    let forbidden = |why: &str| {
        KubeError::forbidden(
            &resource.plural,
            attributes.name.as_deref().unwrap_or_default(),
            &format!(
                "User {:?} cannot {}{why}",
                subject.user(),
                attributes.describe()
            ),
        )
    };
    let reads = ["get", "list", "watch"];
    if resource.group == "rbac.authorization.k8s.io" && !reads.contains(&attributes.verb.as_str()) {
        return Err(forbidden(
            ": RBAC objects are written with the tenant's Atrium keys only",
        ));
    }
    let list = |plural: &str| {
        let kind = find("rbac.authorization.k8s.io", "v1", plural).map(|r| scope.kind(r));
        async move {
            match kind {
                Some(k) => state
                    .store
                    .list_all(&k, &scope.filter())
                    .await
                    .map_err(store_error),
                None => Ok(Vec::new()),
            }
        }
    };
    let (roles, cluster_roles) = (list("roles").await?, list("clusterroles").await?);
    let (bindings, cluster_bindings) = (
        list("rolebindings").await?,
        list("clusterrolebindings").await?,
    );
    fn bodies(objects: &[Object]) -> Vec<&serde_json::Value> {
        objects.iter().map(|o| &o.body).collect()
    }
    let policy = rbac::Policy {
        roles: bodies(&roles),
        cluster_roles: bodies(&cluster_roles),
        role_bindings: bodies(&bindings),
        cluster_role_bindings: bodies(&cluster_bindings),
    };
    if policy.allows(subject, attributes) {
        Ok(())
    } else {
        Err(forbidden(""))
    }
}
