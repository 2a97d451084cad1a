//! A tenant cluster's objects in the control plane's store: each resource
//! type of each cluster is one store kind (`k8s:<cluster-id>:<plural>`),
//! an object's store name is `<namespace>/<name>` (or `<name>`), its id
//! its `uid`, its tenant the cluster's. The store's revision is the
//! object's `resourceVersion`, so optimistic concurrency is the store's
//! `if_revision` and a watch is its change log. Every write is audited.
//! A cluster holds at most its tenant's `quota.cluster_objects` objects,
//! counted in each create's transaction (so one cluster cannot fill the
//! store every tenant shares).

use atrium_core::quota::Counted;
use atrium_kube::managed;
use atrium_kube::meta::{self, with_resource_version};
use atrium_kube::selector::{FieldSelector, LabelSelector};
use atrium_kube::table::{table, Include};
use atrium_kube::{patch, KubeError, ResourceType};
use atrium_store::{
    AuditContext, Count, Object, Precondition, StoreError, TenantFilter, Write, WriteError,
};
use axum::http::{header, Method, StatusCode};
use serde_json::{json, Value};

use super::body::{body, content_type, dry_run};
use super::custom::{catalog_of, custom_types, delete_custom_objects, warned};
use super::path::At;
use super::{from_api, watch, KubeResponse, Request};
use crate::error::ApiError;
use crate::AppState;

/// Namespaces every cluster starts with; the first three cannot be
/// deleted, as upstream.
const DEFAULT_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];
pub(super) const PROTECTED_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// Most objects one list answers with.
const MAX_LIMIT: usize = 1000;

/// One request for a resource of a cluster: what every handler of one
/// takes.
#[derive(Clone, Copy)]
pub(super) struct Call<'a> {
    pub state: &'a AppState,
    pub scope: &'a Scope,
    pub at: &'a At,
    pub req: &'a Request,
}

impl<'a> Call<'a> {
    /// Its state, scope, target and request, for a handler to take apart.
    pub fn parts(&self) -> (&'a AppState, &'a Scope, &'a At, &'a Request) {
        (self.state, self.scope, self.at, self.req)
    }

    /// The object the path names (empty for a collection).
    pub fn name(&self) -> &'a str {
        self.at.name.as_deref().unwrap_or_default()
    }
}

/// The cluster a request is in, and the key its secrets are sealed with.
#[derive(Clone)]
pub(super) struct Scope {
    pub id: String,
    pub tenant: String,
    sealer: std::sync::Arc<super::sealed::Sealer>,
}

impl Scope {
    pub fn of(state: &AppState, cluster: &Object) -> Scope {
        Scope {
            id: cluster.id.clone(),
            tenant: cluster.tenant.clone().unwrap_or_default(),
            sealer: state.sealer.clone(),
        }
    }

    /// Where an object is, as its sealed values are bound to it.
    fn place(&self, key: &str) -> String {
        format!("{}/{key}", self.id)
    }

    /// A stored body as clients see it: a secret's values opened.
    pub fn plain(&self, r: &ResourceType, key: &str, body: Value) -> Result<Value, KubeError> {
        if r.builtin_kind() == "Secret" {
            self.sealer.open(&self.tenant, &self.place(key), body)
        } else {
            Ok(body)
        }
    }

    /// A body as it is stored: a secret's values sealed.
    pub fn sealed(&self, r: &ResourceType, key: &str, body: Value) -> Result<Value, KubeError> {
        if r.builtin_kind() == "Secret" {
            self.sealer.seal(&self.tenant, &self.place(key), body)
        } else {
            Ok(body)
        }
    }

    /// A stored object as it leaves the server: a custom object in the
    /// version it was asked for (its versions share one stored form).
    pub fn shown(&self, r: &ResourceType, o: &Object) -> Result<Value, KubeError> {
        self.shown_at(r, o, o.revision)
    }

    /// `o` as it leaves the server at `revision` (a watch event's).
    pub fn shown_at(
        &self,
        r: &ResourceType,
        o: &Object,
        revision: i64,
    ) -> Result<Value, KubeError> {
        let mut body = self.plain(r, &o.name, o.body.clone())?;
        if r.custom.is_some() {
            body["apiVersion"] = json!(r.api_version());
        }
        Ok(with_resource_version(body, revision))
    }

    pub fn kind(&self, r: &ResourceType) -> String {
        kind_in(&self.id, r)
    }

    /// What every one of this cluster's store kinds starts with.
    pub fn kind_prefix(&self) -> String {
        format!("k8s:{}:", self.id)
    }

    pub fn filter(&self) -> TenantFilter {
        TenantFilter::Exactly(Some(self.tenant.clone()))
    }
}

/// The store kind of type `r` in cluster `cluster_id`.
fn kind_in(cluster_id: &str, r: &ResourceType) -> String {
    format!("k8s:{cluster_id}:{}", r.qualified())
}

pub(super) fn key(r: &ResourceType, namespace: Option<&str>, name: &str) -> String {
    match (r.namespaced, namespace) {
        (true, Some(ns)) => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

pub(super) fn store_error(e: StoreError) -> KubeError {
    from_api(ApiError::from(e))
}

/// A random version-4 UUID: an object's `uid`.
pub(super) fn uid() -> String {
    let r: u128 = rand::random();
    let hex = format!(
        "{:032x}",
        (r & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
    );
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Five characters completing a `generateName`, as upstream's.
pub(super) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect()
}

pub(super) async fn find(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    key: &str,
) -> Result<Option<Object>, KubeError> {
    state
        .store
        .get_by_name(&scope.kind(r), Some(&scope.tenant), key)
        .await
        .map_err(store_error)
}

pub(super) async fn write(
    state: &AppState,
    w: Write,
    audit: AuditContext,
) -> Result<Object, StoreError> {
    match state.store.write::<()>(w, None, audit).await {
        Ok(change) => Ok(change.object),
        Err(WriteError::Store(e)) => Err(e),
        Err(WriteError::Rejected(())) => Err(StoreError::Corrupt("write rejected".into())),
    }
}

/// Creates `w`, object `name` of type `r`, if the cluster holds fewer
/// objects than its tenant's `cluster_objects` quota: counted in the
/// write's own transaction, over every resource type of the cluster.
pub(super) async fn insert(
    state: &AppState,
    scope: &Scope,
    r: &ResourceType,
    (namespace, name): (Option<&str>, &str),
    obj: Value,
    audit: AuditContext,
) -> Result<Object, KubeError> {
    let tenant = scope.tenant.clone();
    // A service's address is its own: checked against the cluster's other
    // services inside the same transaction.
    let address = obj
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| r.builtin_kind() == "Service" && *ip != "None")
        .map(str::to_string);
    let key = key(r, namespace, name);
    let w = Write::Create {
        kind: scope.kind(r),
        id: uid_of(&obj),
        tenant: Some(scope.tenant.clone()),
        body: scope.sealed(r, &key, obj)?,
        name: key,
    };
    let services = match address {
        Some(_) => service_kinds(state, scope).await?,
        None => Vec::new(),
    };
    let kinds: Vec<&str> = services.iter().map(String::as_str).collect();
    let precondition = Precondition {
        reads: crate::kinds::tenant_reads(&tenant, &kinds),
        counts: vec![Count {
            kind_prefix: scope.kind_prefix(),
            tenant: scope.filter(),
        }],
        check: Box::new(move |read: &[Vec<Object>], counts: &[u64]| {
            crate::kinds::quota_read(read, &tenant)?
                .admit_one(
                    Counted::ClusterObjects,
                    counts.first().copied().unwrap_or(0),
                )
                .map_err(ApiError::QuotaExceeded)?;
            // Each cluster's services, then (last) the tenant.
            let taken = |ip: &String| {
                read.iter()
                    .take(read.len().saturating_sub(1))
                    .flatten()
                    .any(|o| o.body.pointer("/spec/clusterIP").and_then(Value::as_str) == Some(ip))
            };
            match address.filter(|_| read.len() > 1) {
                Some(ip) if taken(&ip) => Err(ApiError::Conflict {
                    code: "cluster_ip_taken",
                    message: format!(
                        "spec.clusterIP: Invalid value: {ip:?}: provided IP is already allocated"
                    ),
                    details: Value::Null,
                }),
                _ => Ok(()),
            }
        }),
    };
    match state.store.write(w, Some(precondition), audit).await {
        Ok(change) => Ok(change.object),
        Err(WriteError::Store(StoreError::NameTaken { .. })) => {
            Err(KubeError::already_exists(&r.plural, name))
        }
        Err(WriteError::Store(e)) => Err(store_error(e)),
        Err(WriteError::Rejected(ApiError::QuotaExceeded(q))) => Err(KubeError::exceeded_quota(
            &r.plural,
            name,
            &format!(
                "cluster_objects, requested: {}, used: {}, limited: {}: this cluster holds as \
                 many objects as its tenant's quota allows; delete some, or ask the provider \
                 to raise quota.cluster_objects",
                q.requested, q.used, q.limit
            ),
        )),
        Err(WriteError::Rejected(ApiError::Conflict {
            code: "cluster_ip_taken",
            message,
            ..
        })) => Err(KubeError::invalid(&r.kind, name, message)),
        Err(WriteError::Rejected(e)) => Err(from_api(e)),
    }
}

/// The store kinds of the services of every cluster of the tenant: a
/// service's address is unique among them all, since a tenant's pods on
/// a node share one network.
async fn service_kinds(state: &AppState, scope: &Scope) -> Result<Vec<String>, KubeError> {
    use crate::kinds::{Cluster, Resource};
    let clusters = state
        .store
        .list_all(Cluster::KIND, &scope.filter())
        .await
        .map_err(store_error)?;
    let services = atrium_kube::find("", "v1", "services")
        .ok_or_else(|| KubeError::internal("services are not served"))?;
    Ok(clusters.iter().map(|c| kind_in(&c.id, services)).collect())
}

/// Deletes `o`; one already gone is fine.
pub(super) async fn remove(
    state: &AppState,
    o: &Object,
    audit: AuditContext,
) -> Result<(), StoreError> {
    let w = Write::Delete {
        kind: o.kind.clone(),
        id: o.id.clone(),
    };
    match write(state, w, audit).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes a new cluster's default namespaces.
pub async fn create_defaults(state: &AppState, cluster: &Object) -> Result<(), ApiError> {
    let scope = Scope::of(state, cluster);
    let Some(ns) = atrium_kube::find("", "v1", "namespaces") else {
        return Ok(());
    };
    for name in DEFAULT_NAMESPACES {
        let mut obj = json!({"metadata": {"name": name}});
        let made = meta::prepare_create(ns, &mut obj, None, &uid(), &timestamp(), name_suffix);
        let Ok(name) = made else { continue };
        let w = Write::Create {
            kind: scope.kind(ns),
            id: uid_of(&obj),
            tenant: Some(scope.tenant.clone()),
            name,
            body: obj,
        };
        match write(state, w, system_audit("kube.namespace.create")).await {
            Ok(_) | Err(StoreError::NameTaken { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Now, as Kubernetes writes times: RFC 3339 to the second.
pub(super) fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let whole = now.replace_nanosecond(0).unwrap_or(now);
    whole
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

pub(crate) fn system_audit(action: &str) -> AuditContext {
    AuditContext::system("atrium", action)
}

pub(super) fn uid_of(obj: &Value) -> String {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Deletes every object of `cluster` (which is being deleted).
pub async fn delete_cluster_objects(state: &AppState, cluster: &Object) -> Result<(), ApiError> {
    let scope = Scope::of(state, cluster);
    super::routes::delete_all(state, &scope).await?;
    let catalog = catalog_of(state, &scope).await?;
    for r in catalog.stored() {
        for o in state
            .store
            .list_all(&scope.kind(r), &scope.filter())
            .await?
        {
            let audit = system_audit(&format!("kube.{}.delete", r.singular));
            remove(state, &o, audit).await?;
        }
    }
    Ok(())
}

/// Serves one request for a resource of `cluster`.
pub(super) async fn serve(
    state: &AppState,
    cluster: &Object,
    at: &At,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let scope = Scope::of(state, cluster);
    let call = Call {
        state,
        scope: &scope,
        at,
        req,
    };
    let r = &at.resource;
    if r.read_only() {
        return super::nodes::serve(&call).await;
    }
    match at.subresource.as_deref() {
        None => {}
        // A built-in object's status is its controller's: read-only here.
        Some("status") if req.method == Method::GET => {}
        // A custom object's is written through `/status` only.
        Some("status")
            if r.custom.is_some()
                && r.status_is_separate()
                && matches!(req.method, Method::PUT | Method::PATCH) => {}
        Some("log") if r.builtin_kind() == "Pod" && req.method == Method::GET => {
            return super::subresources::pod_log(&call).await;
        }
        Some("exec")
            if r.builtin_kind() == "Pod" && matches!(req.method, Method::GET | Method::POST) =>
        {
            return super::exec::pod_exec(&call).await;
        }
        Some("token") if r.builtin_kind() == "ServiceAccount" && req.method == Method::POST => {
            return super::tokens::token_request(&call).await;
        }
        Some("scale") if r.scalable() => {
            return super::subresources::scale(&call).await;
        }
        Some(sub) => {
            return Err(KubeError::method_not_allowed(&format!(
                "{} of {}/{sub}",
                req.method, r.plural
            )))
        }
    }
    let name = at.name.as_deref();
    match (&req.method, name) {
        (&Method::GET, None) if req.param("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch::serve(state, scope, at, req).await
        }
        (&Method::GET, None) => list(&call).await,
        (&Method::POST, None) => create(&call).await,
        (&Method::GET, Some(_)) => get(&call).await,
        (&Method::PUT, Some(_)) => update(&call).await,
        (&Method::PATCH, Some(_)) => patch(&call).await,
        (&Method::DELETE, Some(_)) => super::delete::delete(&call).await,
        (m, _) => Err(KubeError::method_not_allowed(&format!(
            "{m} on {}",
            r.plural
        ))),
    }
}

/// The selectors of a list or watch.
pub(super) struct Selection {
    labels: LabelSelector,
    fields: FieldSelector,
    namespace: Option<String>,
}

impl Selection {
    pub fn of(at: &At, req: &Request) -> Result<Selection, KubeError> {
        Ok(Selection {
            labels: LabelSelector::parse(req.param("labelSelector").unwrap_or(""))?,
            fields: FieldSelector::parse(req.param("fieldSelector").unwrap_or(""))?,
            namespace: at.namespace.clone(),
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
        self.namespace
            .as_deref()
            .is_none_or(|want| ns == Some(want))
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

pub(super) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn list(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let r = &at.resource;
    let selection = Selection::of(at, req)?;
    let head = state.store.head();
    let mut objects = state
        .store
        .list_all(&scope.kind(r), &scope.filter())
        .await
        .map_err(store_error)?;
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    let after = req.param("continue").unwrap_or("");
    let limit = req
        .param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .map_or(MAX_LIMIT, |l| l.min(MAX_LIMIT));
    // The continue token is the store name of the last object answered.
    let mut items: Vec<Value> = Vec::new();
    let (mut last, mut more) = (None, None);
    for o in objects.iter().filter(|o| o.name.as_str() > after) {
        let obj = scope.shown(r, o)?;
        if !selection.matches(&obj) {
            continue;
        }
        if items.len() == limit {
            more = last.take();
            break;
        }
        items.push(obj);
        last = Some(o.name.clone());
    }
    let ok = |v| Ok(KubeResponse::Json(StatusCode::OK, v));
    if req.wants_table() {
        let include = Include::parse(req.param("includeObject"));
        return ok(table(r, &items, head, more.as_deref(), include, now_unix()));
    }
    let mut metadata = json!({"resourceVersion": head.to_string()});
    if let Some(token) = more {
        metadata["continue"] = json!(token);
    }
    ok(json!({
        "kind": format!("{}List", r.kind),
        "apiVersion": r.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

pub(super) async fn existing(
    state: &AppState,
    scope: &Scope,
    at: &At,
    name: &str,
) -> Result<Object, KubeError> {
    find(
        state,
        scope,
        &at.resource,
        &key(&at.resource, at.namespace.as_deref(), name),
    )
    .await?
    .ok_or_else(|| KubeError::not_found(&at.resource.plural, name))
}

async fn get(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let o = existing(state, scope, at, name).await?;
    let obj = scope.shown(&at.resource, &o)?;
    if req.wants_table() {
        let include = Include::parse(req.param("includeObject"));
        let t = table(&at.resource, &[obj], o.revision, None, include, now_unix());
        return Ok(KubeResponse::Json(StatusCode::OK, t));
    }
    Ok(KubeResponse::Json(StatusCode::OK, obj))
}

async fn create(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let mut obj = body(req)?;
    managed::record_update(None, &mut obj, &field_manager(req)?, &timestamp());
    create_object(state, scope, at, obj, req).await
}

/// Who a write's fields are recorded as set by: its `fieldManager`, else
/// the client's program, as its User-Agent names it (upstream's default).
pub(super) fn field_manager(req: &Request) -> Result<String, KubeError> {
    if let Some(m) = req.param("fieldManager") {
        managed::check_manager(m)?;
        return Ok(m.to_string());
    }
    let agent = req
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split('/').next())
        .filter(|a| managed::check_manager(a).is_ok());
    Ok(agent.unwrap_or("unknown").to_string())
}

/// A pod, however made, is refused now — not later in its status — when
/// it cannot run as a workload of the tenant, and starts pending.
pub(super) fn pending_pod(r: &ResourceType, obj: &mut Value) -> Result<(), KubeError> {
    if r.builtin_kind() == "Pod" {
        atrium_kube::pod::workload_of(obj)?;
        obj["status"] = json!({"phase": "Pending"});
    }
    Ok(())
}

/// Refuses, when written, what its controller could never carry out:
/// an inference service that could be no deployment, a stateful set
/// asking for what is not served. What only admission knows (quota, the
/// model) comes back in the object's status instead.
fn refuse_unservable(r: &ResourceType, obj: &Value) -> Result<(), KubeError> {
    match r.builtin_kind() {
        "InferenceService" => atrium_kube::inference::deployment_of(obj).map(|_| ()),
        "StatefulSet" => atrium_kube::statefulset::policy(obj).map(|_| ()),
        _ => Ok(()),
    }
}

/// Creates `obj` (its `managedFields` already recorded).
pub(super) async fn create_object(
    state: &AppState,
    scope: &Scope,
    at: &At,
    mut obj: Value,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let r = &at.resource;
    let name = meta::prepare_create(
        r,
        &mut obj,
        at.namespace.as_deref(),
        &uid(),
        &timestamp(),
        name_suffix,
    )?;
    if let (true, Some(ns)) = (r.namespaced, at.namespace.as_deref()) {
        let namespaces = atrium_kube::find("", "v1", "namespaces")
            .ok_or_else(|| KubeError::internal("namespaces are not served"))?;
        let Some(namespace) = find(state, scope, namespaces, ns).await? else {
            return Err(KubeError::not_found("namespaces", ns));
        };
        if namespace
            .body
            .pointer("/metadata/deletionTimestamp")
            .is_some()
        {
            return Err(KubeError::forbidden(
                &r.plural,
                &name,
                &format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            ));
        }
        super::quotas::admit(state, scope, r, ns, &obj).await?;
    }
    refuse_unservable(r, &obj)?;
    if r.builtin_kind() == "Service" {
        let mut taken = std::collections::HashSet::new();
        for kind in service_kinds(state, scope).await? {
            let services = state.store.list_all(&kind, &scope.filter()).await;
            taken.extend(services.map_err(store_error)?.iter().filter_map(|o| {
                o.body
                    .pointer("/spec/clusterIP")?
                    .as_str()?
                    .parse::<std::net::Ipv4Addr>()
                    .ok()
            }));
        }
        atrium_kube::service::prepare_create(&mut obj, &taken)?;
    }
    pending_pod(r, &mut obj)?;
    let warnings = custom_types(state, scope, r, &mut obj, None, req).await?;
    if dry_run(req) {
        return Ok(warned(StatusCode::CREATED, obj, &warnings));
    }
    let audit = req.audit(format!("kube.{}.create", r.singular));
    let o = insert(
        state,
        scope,
        r,
        (at.namespace.as_deref(), &name),
        obj,
        audit,
    )
    .await?;
    Ok(warned(StatusCode::CREATED, scope.shown(r, &o)?, &warnings))
}

/// Writes `new` over `old`, if `old` is still at `revision`.
pub(super) async fn replace(
    state: &AppState,
    scope: &Scope,
    at: &At,
    old: &Object,
    mut new: Value,
    revision: i64,
    req: &Request,
) -> Result<KubeResponse, KubeError> {
    let r = &at.resource;
    let was = scope.plain(r, &old.name, old.body.clone())?;
    if at.subresource.as_deref() == Some("status") {
        meta::prepare_status_update(&was, &mut new);
    } else {
        meta::prepare_update(r, &was, &mut new)?;
    }
    // An apply recorded its own fields.
    if content_type(req) != super::apply::MEDIA_TYPE {
        managed::record_update(Some(&was), &mut new, &field_manager(req)?, &timestamp());
    }
    if r.builtin_kind() == "Service" {
        atrium_kube::service::prepare_update(&was, &mut new)?;
    }
    refuse_unservable(r, &new)?;
    if r.builtin_kind() == "Pod" {
        // A pod's spec is what its workload runs.
        if new.get("spec") != was.get("spec") {
            return Err(KubeError::invalid(
                "Pod",
                meta::name_of(&was).unwrap_or_default(),
                "spec: Forbidden: pod updates may not change the spec; delete the pod and create it anew",
            ));
        }
    }
    if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let warnings = custom_types(state, scope, r, &mut new, Some(&was), req).await?;
    // A write that changes nothing is no write, as upstream: no new
    // resourceVersion and no watch event, so a controller that writes
    // what is already there does not wake itself again.
    if revision == old.revision && new == was {
        return Ok(warned(StatusCode::OK, scope.shown(r, old)?, &warnings));
    }
    if dry_run(req) {
        let shown = with_resource_version(new, old.revision);
        return Ok(warned(StatusCode::OK, shown, &warnings));
    }
    let name = meta::name_of(&old.body).unwrap_or_default().to_string();
    let finished = meta::finalized(&new);
    let w = Write::Update {
        kind: old.kind.clone(),
        id: old.id.clone(),
        body: scope.sealed(r, &old.name, new)?,
        if_revision: Some(revision),
    };
    match write(state, w, req.audit(format!("kube.{}.update", r.singular))).await {
        Ok(o) if finished => {
            // Its last finalizer is gone: the delete it waited for.
            let shown = scope.shown(r, &o)?;
            remove(state, &o, req.audit(format!("kube.{}.delete", r.singular)))
                .await
                .map_err(store_error)?;
            if r.builtin_kind() == "CustomResourceDefinition" {
                delete_custom_objects(state, scope, &o.body)
                    .await
                    .map_err(store_error)?;
            }
            Ok(KubeResponse::Json(StatusCode::OK, shown))
        }
        Ok(o) => Ok(warned(StatusCode::OK, scope.shown(r, &o)?, &warnings)),
        Err(StoreError::RevisionMismatch { .. }) => Err(KubeError::conflict(&r.plural, &name)),
        Err(StoreError::NotFound { .. }) => Err(KubeError::not_found(&r.plural, &name)),
        Err(e) => Err(store_error(e)),
    }
}

async fn update(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let old = existing(state, scope, at, name).await?;
    let new = body(req)?;
    // A stated resourceVersion must still be the object's; none means
    // "whatever it is now".
    let revision = match new
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) => rv.parse().map_err(|_| {
            KubeError::bad_request(format!(
                "resourceVersion {rv:?} is not one this server gave"
            ))
        })?,
        None => old.revision,
    };
    replace(state, scope, at, &old, new, revision, req).await
}

async fn patch(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let content_type = content_type(req);
    if content_type == super::apply::MEDIA_TYPE {
        return super::apply::serve(call).await;
    }
    let given = body(req)?;
    let old = existing(state, scope, at, name).await?;
    let current = scope.plain(&at.resource, &old.name, old.body.clone())?;
    let new = match content_type.as_str() {
        "application/merge-patch+json" => {
            let mut doc = current;
            patch::merge(&mut doc, &given);
            doc
        }
        "application/strategic-merge-patch+json" => {
            let mut doc = current;
            patch::strategic(&mut doc, &given)?;
            doc
        }
        "application/json-patch+json" => patch::json_patch(current, &given)?,
        other => return Err(KubeError::unsupported_media_type(other)),
    };
    replace(state, scope, at, &old, new, old.revision, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_version_4() {
        let u = uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(uid(), u);
    }
}
