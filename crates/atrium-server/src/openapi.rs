//! The OpenAPI 3.1 document served at `/v1/openapi.json`, generated from the
//! code: one set of paths per [`Kind`] (the same generic routes the router
//! mounts) with schemas derived from the domain types by `utoipa`.

use atrium_core::lifecycle::Status;
use atrium_core::quota::{Quota, ResourceUsage};
use serde_json::{json, Map, Value};
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;

use crate::kinds::{
    Cluster, Credential, Deployment, Exec, Gateway, JoinToken, Key, Kind, Model, Node, Placement,
    Resource, ServiceRoute, Site, Tenant, Volume, Workload,
};

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn add_schema<T: ToSchema>(schemas: &mut Map<String, Value>) {
    let mut nested: Vec<(String, RefOr<Schema>)> = Vec::new();
    T::schemas(&mut nested);
    nested.push((T::name().into_owned(), T::schema()));
    for (name, schema) in nested {
        schemas.insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
}

fn error_responses(codes: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for code in codes {
        m.insert(
            (*code).to_string(),
            json!({"description": "error", "content": {"application/json": {"schema": schema_ref("Error")}}}),
        );
    }
    m
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn operation(id: String, tag: &str, summary: String, ok: (&str, Value), errors: &[&str]) -> Value {
    let mut responses = error_responses(errors);
    responses.insert(ok.0.to_string(), ok.1);
    json!({"operationId": id, "tags": [tag], "summary": summary, "responses": responses})
}

fn with_body(mut op: Value, schema: Value) -> Value {
    op["requestBody"] =
        json!({"required": true, "content": {"application/json": {"schema": schema}}});
    op
}

fn with_params(mut op: Value, params: Value) -> Value {
    op["parameters"] = params;
    op
}

fn query(name: &str, ty: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": ty}})
}

fn add_kind<K: Kind>(
    paths: &mut Map<String, Value>,
    schemas: &mut Map<String, Value>,
    status: Option<&str>,
) {
    add_schema::<K::Spec>(schemas);
    let spec_name = <K::Spec as ToSchema>::name().into_owned();
    // `join_token` → `JoinToken`.
    let title: String = K::KIND
        .split('_')
        .map(|word| {
            let mut c = word.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    let status_schema = status.map(schema_ref).unwrap_or(json!({}));
    schemas.insert(
        title.clone(),
        json!({
            "type": "object",
            "required": ["id", "name", "revision", "created_at", "updated_at", "spec"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "tenant": {"type": "string", "description": "owning tenant; absent for provider-level and public objects"},
                "revision": {"type": "integer", "format": "int64"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "spec": schema_ref(&spec_name),
                "status": status_schema,
            }
        }),
    );
    schemas.insert(
        format!("{title}Create"),
        json!({
            "type": "object", "additionalProperties": false, "required": ["name", "spec"],
            "properties": {"name": {"type": "string"}, "tenant": {"type": "string"}, "spec": schema_ref(&spec_name)}
        }),
    );
    schemas.insert(
        format!("{title}Update"),
        json!({
            "type": "object", "additionalProperties": false, "required": ["spec"],
            "properties": {"spec": schema_ref(&spec_name), "revision": {"type": "integer", "format": "int64"}}
        }),
    );
    schemas.insert(
        format!("{title}List"),
        json!({
            "type": "object", "required": ["items", "revision"],
            "properties": {
                "items": {"type": "array", "items": schema_ref(&title)},
                "revision": {"type": "integer", "format": "int64"},
                "next_page_token": {"type": "string"}
            }
        }),
    );
    let plural = K::PLURAL;
    let list = with_params(
        operation(
            format!("list_{plural}"),
            plural,
            format!("List {plural}, or watch them with watch=true (newline-delimited JSON)"),
            (
                "200",
                json!({"description": "a page, or a stream of watch events", "content": {
                    "application/json": {"schema": schema_ref(&format!("{title}List"))},
                    "application/x-ndjson": {"schema": schema_ref("WatchEvent")}
                }}),
            ),
            &["400", "401", "403"],
        ),
        json!([
            query("limit", "integer", "page size, 1 to 1000 (default 100)"),
            query(
                "page_token",
                "string",
                "next_page_token of the previous page"
            ),
            query("watch", "boolean", "stream changes instead of listing"),
            query(
                "since",
                "integer",
                "with watch: changes after this revision"
            ),
            query("tenant", "string", "provider admin: one tenant's objects"),
        ]),
    );
    let create_schema = match K::KIND {
        k if k == Key::KIND => "CreatedKey".to_string(),
        k if k == JoinToken::KIND => "CreatedJoinToken".to_string(),
        _ => title.clone(),
    };
    let create = with_body(
        operation(
            format!("create_{}", K::KIND),
            plural,
            format!("Create a {}", K::KIND),
            ("201", json_response("created", schema_ref(&create_schema))),
            &["400", "401", "403", "404", "409", "413", "415"],
        ),
        schema_ref(&format!("{title}Create")),
    );
    paths.insert(
        format!("/v1/{plural}"),
        json!({"get": list, "post": create}),
    );

    let ident = json!([
        {"name": "ident", "in": "path", "required": true, "description": "id or name", "schema": {"type": "string"}},
        query("tenant", "string", "provider admin: the tenant a name belongs to"),
    ]);
    let get = operation(
        format!("get_{}", K::KIND),
        plural,
        format!("Get a {}", K::KIND),
        ("200", json_response("the object", schema_ref(&title))),
        &["401", "403", "404"],
    );
    let update = with_body(
        operation(
            format!("update_{}", K::KIND),
            plural,
            format!("Replace a {}'s spec", K::KIND),
            ("200", json_response("updated", schema_ref(&title))),
            &["400", "401", "403", "404", "409", "413", "415"],
        ),
        schema_ref(&format!("{title}Update")),
    );
    let delete = operation(
        format!("delete_{}", K::KIND),
        plural,
        format!("Delete a {}", K::KIND),
        (
            "200",
            json_response("deleted; the last state", schema_ref(&title)),
        ),
        &["401", "403", "404", "409"],
    );
    paths.insert(
        format!("/v1/{plural}/{{ident}}"),
        json!({"parameters": ident, "get": get, "put": update, "delete": delete}),
    );
}

/// Join tokens are created by their own body and never replaced;
/// credentials are made only by joining, and rotated or revoked.
fn plane_credentials(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    for plural in [JoinToken::PLURAL, Credential::PLURAL] {
        if let Some(Value::Object(item)) = paths.get_mut(&format!("/v1/{plural}/{{ident}}")) {
            item.remove("put");
        }
    }
    if let Some(Value::Object(list)) = paths.get_mut("/v1/credentials") {
        list.remove("post");
    }
    if let Some(create) = paths
        .get_mut("/v1/join-tokens")
        .and_then(|p| p.get_mut("post"))
    {
        create["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {
            "type": "object", "additionalProperties": false, "required": ["plane", "name", "site"],
            "properties": {"plane": {"type": "string", "enum": ["node", "gateway"]}, "name": {"type": "string"},
                "site": {"type": "string"}, "ttl_seconds": {"type": "integer", "description": "default 3600, at most a week"}}}}}});
    }
    schemas.insert(
        "JoinTokenStatus".into(),
        json!({"type": "object", "properties": {"used_at": {"type": "string", "format": "date-time"}}}),
    );
    schemas.insert(
        "CredentialStatus".into(),
        json!({"type": "object", "properties": {"issued_at": {"type": "string", "format": "date-time"},
            "revoked_at": {"type": "string", "format": "date-time"}}}),
    );
    schemas.insert(
        "CreatedJoinToken".into(),
        json!({"type": "object", "required": ["join_token", "secret"], "properties": {
            "join_token": schema_ref("JoinToken"),
            "secret": {"type": "string", "description": "atrj_<id>_<secret>; shown once, usable once"}
        }}),
    );
    schemas.insert(
        "IssuedCredential".into(),
        json!({"type": "object", "required": ["credential", "secret"], "properties": {
            "credential": schema_ref("Credential"),
            "secret": {"type": "string", "description": "atrn_<id>_<secret> (node) or atrg_<id>_<secret> (gateway); shown once"}
        }}),
    );
    let ident =
        json!([{"name": "ident", "in": "path", "required": true, "schema": {"type": "string"}}]);
    paths.insert(
        "/v1/join".into(),
        json!({"post": {"operationId": "join", "tags": ["credentials"],
            "summary": "Exchange a join token (as the bearer) for a node or gateway credential, once",
            "responses": {"201": json_response("the credential", schema_ref("IssuedCredential")),
                "401": json_response("invalid, expired or used join token", schema_ref("Error"))}}}),
    );
    paths.insert(
        "/v1/credentials/{ident}/rotate".into(),
        json!({"post": with_params(operation("rotate_credential".into(), "credentials",
            "A new secret for a credential (its holder or the provider); the old one stops working".into(),
            ("200", json_response("the credential", schema_ref("IssuedCredential"))), &["401", "404", "409"]),
            ident.clone())}),
    );
    paths.insert(
        "/v1/credentials/{ident}/revoke".into(),
        json!({"post": with_params(operation("revoke_credential".into(), "credentials",
            "Revoke a node's or gateway's credential (provider)".into(),
            ("200", json_response("revoked", schema_ref("Credential"))), &["401", "403", "404"]),
            ident)}),
    );
}

/// Builds the document.
/// OpenAI's Batch API (files and batches in OpenAI's own shapes), and the
/// routes gateways run batches by.
fn batch_api(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    use atrium_core::batch::{BatchProgress, BatchSpec, BatchStatus, FileSpec};
    add_schema::<BatchSpec>(schemas);
    add_schema::<BatchStatus>(schemas);
    add_schema::<BatchProgress>(schemas);
    add_schema::<FileSpec>(schemas);
    let object = |d: &str| json_response(d, json!({"type": "object"}));
    let op = |id: &str, summary: &str, ok: Value| {
        operation(
            id.into(),
            "batches",
            summary.into(),
            ("200", ok),
            &["400", "401", "403", "404"],
        )
    };
    let list_params = json!([
        query("after", "string", "the id to list after"),
        query("limit", "integer", "1 to 100 [20]"),
        query("order", "string", "desc (newest first) or asc")
    ]);
    let mut file_params = list_params.clone();
    if let Value::Array(p) = &mut file_params {
        p.push(query("purpose", "string", "batch or batch_output"));
    }
    let upload = json!({"content": {"multipart/form-data": {"schema": {"type": "object", "required": ["purpose", "file"],
        "properties": {"purpose": {"type": "string", "enum": ["batch"]}, "file": {"type": "string", "format": "binary"}}}}}});
    let mut create_file = op(
        "create_file",
        "Upload a JSONL file of batch requests (at most 64 MiB)",
        object("the file, in OpenAI's shape"),
    );
    create_file["requestBody"] = upload;
    let entries = [
        (
            "/v1/files",
            json!({"get": with_params(op("list_files", "The tenant's files", object("a page")), file_params),
            "post": create_file}),
        ),
        (
            "/v1/files/{id}",
            json!({"get": op("get_file", "One file", object("the file")),
            "delete": op("delete_file", "Delete a file no unfinished batch reads", object("deleted"))}),
        ),
        (
            "/v1/files/{id}/content",
            json!({"get": op("file_content", "A file's bytes (the tenant's, or a held batch's input for its gateway)",
            json!({"description": "the bytes", "content": {"application/octet-stream": {}}}))}),
        ),
        (
            "/v1/batches",
            json!({"get": with_params(op("list_batches", "The tenant's batches", object("a page")), list_params),
            "post": with_body(op("create_batch", "Run a file's requests at low priority within 24h", object("the batch, in OpenAI's shape")),
                json!({"type": "object", "required": ["input_file_id", "endpoint", "completion_window"]}))}),
        ),
        (
            "/v1/batches/{id}",
            json!({"get": op("get_batch", "One batch", object("the batch"))}),
        ),
        (
            "/v1/batches/{id}/cancel",
            json!({"post": op("cancel_batch", "Cancel a batch; a running one is cancelling until its gateway stops", object("the batch"))}),
        ),
        (
            "/v1/batches/claim",
            json!({"post": op("claim_batch", "A gateway takes the oldest runnable batch under a lease (204: none)", object("the batch, as stored"))}),
        ),
        (
            "/v1/batches/{id}/progress",
            json!({"put": with_body(op("batch_progress", "The holding gateway's counts; renews its lease, or finishes the batch", object("the batch, as stored")),
            schema_ref("BatchProgress"))}),
        ),
        (
            "/v1/batches/{id}/results",
            json!({"post": with_params(op("batch_results", "The holding gateway hands in a results file (JSONL)", object("the batch, as stored")),
            json!([query("kind", "string", "output or error")]))}),
        ),
    ];
    for (path, mut item) in entries {
        if path.contains("{id}") {
            item["parameters"] = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
        }
        paths.insert(path.into(), item);
    }
}

/// Vector collections and their points (`vectors`).
fn vector_api(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    use atrium_core::collection::{CollectionSpec, CollectionStatus};
    add_schema::<CollectionSpec>(schemas);
    add_schema::<CollectionStatus>(schemas);
    let object = |d: &str| json_response(d, json!({"type": "object"}));
    let op = |id: &str, summary: &str, ok: Value| {
        operation(
            id.into(),
            "collections",
            summary.into(),
            ("200", ok),
            &["400", "401", "403", "404", "409"],
        )
    };
    let body = |required: &[&str], properties: Value| json!({"type": "object", "required": required, "properties": properties});
    let filter = json!({"type": "object", "description": "must / should / must_not: conditions {key, match: {value|any|except}} or {key, range: {gt,gte,lt,lte}}, or nested {filter}; at most 64"});
    let entries = [
        (
            "/v1/collections",
            json!({"get": op("list_collections", "The tenant's collections", object("{collections: [...]}")),
            "post": with_body(op("create_collection", "A collection: name, dimension (1 to 4096), metric (cosine, dot, l2), embedding_model", object("the collection")),
                body(&["name", "dimension", "metric"], json!({"name": {"type": "string"}, "dimension": {"type": "integer"},
                    "metric": {"type": "string", "enum": ["cosine", "dot", "l2"]}, "embedding_model": {"type": "string"}})))}),
        ),
        (
            "/v1/collections/{name}",
            json!({"get": op("get_collection", "One collection, by name or id", object("the collection")),
            "delete": op("delete_collection", "Delete a collection and its points", object("deleted"))}),
        ),
        (
            "/v1/collections/{name}/points",
            json!({"post": with_body(op("upsert_points", "Add or replace 1 to 1000 points {id, vector, payload}; acknowledged once on disk", object("{points}")),
                body(&["points"], json!({"points": {"type": "array", "items": {"type": "object"}}})))}),
        ),
        (
            "/v1/collections/{name}/points/delete",
            json!({"post": with_body(op("delete_points", "Delete 1 to 1000 points by id", object("{deleted, points}")),
                body(&["ids"], json!({"ids": {"type": "array", "items": {}}})))}),
        ),
        (
            "/v1/collections/{name}/points/search",
            json!({"post": with_body(op("search_points", "The nearest points to a vector, optionally filtered", object("{result: [{id, score, payload}], plan}")),
                body(&["vector"], json!({"vector": {"type": "array", "items": {"type": "number"}}, "limit": {"type": "integer"},
                    "ef": {"type": "integer"}, "filter": filter.clone(), "with_payload": {"type": "boolean"}})))}),
        ),
        (
            "/v1/collections/{name}/points/scroll",
            json!({"post": with_body(op("scroll_points", "Points in id order, a page at a time", object("{points, next_offset}")),
                body(&[], json!({"limit": {"type": "integer"}, "offset": {}, "filter": filter.clone()})))}),
        ),
        (
            "/v1/collections/{name}/points/count",
            json!({"post": with_body(op("count_points", "How many points the filter accepts", object("{count}")),
                body(&[], json!({"filter": filter})))}),
        ),
        (
            "/v1/collections/{name}/points/{id}",
            json!({"get": op("get_point", "One point, by id", object("the point"))}),
        ),
    ];
    for (path, mut item) in entries {
        let mut params = vec![
            json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}),
        ];
        if path.ends_with("{id}") {
            params.push(
                json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}),
            );
        }
        if path.contains("{name}") {
            item["parameters"] = Value::Array(params);
        }
        paths.insert(path.into(), item);
    }
}

/// Tenants' PostgreSQL databases (`databases`).
fn database_api(paths: &mut Map<String, Value>, schemas: &mut Map<String, Value>) {
    use atrium_core::database::{DatabaseSpec, DatabaseStatus};
    add_schema::<DatabaseSpec>(schemas);
    add_schema::<DatabaseStatus>(schemas);
    let object = |d: &str| json_response(d, json!({"type": "object"}));
    let op = |id: &str, summary: &str, ok: (&str, Value)| {
        operation(
            id.into(),
            "databases",
            summary.into(),
            ok,
            &["400", "401", "403", "404", "409", "503"],
        )
    };
    let shown = "{id, name, connection_limit, statement_timeout_ms, size, phase, host, port, database, user}";
    let entries = [
        (
            "/v1/databases",
            json!({"get": op("list_databases", "The tenant's databases (never their passwords)", ("200", object("{databases: [...]}"))),
            "post": with_body(op("create_database", "A database on the provider's PostgreSQL; the answer holds its password and URL, shown this once",
                    ("201", object(&format!("{shown} with password and url")))),
                json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                    "connection_limit": {"type": "integer", "default": 10}, "statement_timeout_ms": {"type": "integer", "default": 30000},
                    "size": {"type": "string", "default": "1Gi"}}}))}),
        ),
        (
            "/v1/databases/{name}",
            json!({"get": op("get_database", "One database, by name or id", ("200", object(shown))),
            "delete": op("delete_database", "Drop the database, its role and its disk (zeroed)", ("200", object("deleted")))}),
        ),
        (
            "/v1/databases/{name}/rotate",
            json!({"post": op("rotate_database_password", "A new password, shown this once; sessions opened with the old one end",
                ("200", object(&format!("{shown} with password and url"))))}),
        ),
    ];
    for (path, mut item) in entries {
        if path.contains("{name}") {
            item["parameters"] = json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
        }
        paths.insert(path.into(), item);
    }
}

pub fn document() -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    add_kind::<Site>(&mut paths, &mut schemas, None);
    add_kind::<Node>(&mut paths, &mut schemas, None);
    add_kind::<Gateway>(&mut paths, &mut schemas, None);
    add_kind::<Tenant>(&mut paths, &mut schemas, None);
    add_kind::<Model>(&mut paths, &mut schemas, None);
    add_kind::<Deployment>(&mut paths, &mut schemas, Some("Status"));
    add_kind::<Workload>(&mut paths, &mut schemas, Some("Status"));
    add_kind::<Volume>(&mut paths, &mut schemas, Some("VolumeStatus"));
    add_kind::<Exec>(&mut paths, &mut schemas, Some("ExecStatus"));
    add_kind::<Cluster>(&mut paths, &mut schemas, None);
    add_kind::<ServiceRoute>(&mut paths, &mut schemas, None);
    add_kind::<Key>(&mut paths, &mut schemas, Some("KeyStatus"));
    add_kind::<Placement>(&mut paths, &mut schemas, Some("ReplicaStatus"));
    add_kind::<JoinToken>(&mut paths, &mut schemas, Some("JoinTokenStatus"));
    add_kind::<Credential>(&mut paths, &mut schemas, Some("CredentialStatus"));
    plane_credentials(&mut paths, &mut schemas);
    batch_api(&mut paths, &mut schemas);
    vector_api(&mut paths, &mut schemas);
    database_api(&mut paths, &mut schemas);
    add_schema::<atrium_core::placement::ReplicaStatus>(&mut schemas);
    add_schema::<Status>(&mut schemas);
    add_schema::<atrium_core::volume::VolumeStatus>(&mut schemas);
    add_schema::<atrium_core::exec::ExecStatus>(&mut schemas);
    add_schema::<atrium_core::exec::ExecRequest>(&mut schemas);
    add_schema::<Quota>(&mut schemas);
    add_schema::<ResourceUsage>(&mut schemas);
    schemas.insert(
        "KeyStatus".into(),
        json!({"type": "object", "properties": {"revoked_at": {"type": "string", "format": "date-time"}}}),
    );
    schemas.insert(
        "CreatedKey".into(),
        json!({"type": "object", "required": ["key", "secret"], "properties": {
            "key": schema_ref("Key"),
            "secret": {"type": "string", "description": "the whole token, atr_<id>_<secret>; shown once"}
        }}),
    );
    schemas.insert(
        "QuotaView".into(),
        json!({"type": "object", "required": ["tenant", "quota", "used"], "properties": {
            "tenant": {"type": "string"}, "quota": schema_ref("Quota"), "used": schema_ref("ResourceUsage")
        }}),
    );
    schemas.insert(
        "AuditEvent".into(),
        json!({"type": "object", "properties": {
            "revision": {"type": "integer", "format": "int64"}, "at": {"type": "string", "format": "date-time"},
            "actor": {"type": "string"}, "role": {"type": "string"}, "tenant": {"type": "string"},
            "action": {"type": "string"}, "kind": {"type": "string"}, "object_id": {"type": "string"},
            "object_name": {"type": "string"}, "request_id": {"type": "string"}
        }}),
    );
    schemas.insert(
        "WatchEvent".into(),
        json!({"type": "object", "required": ["type", "revision"], "properties": {
            "type": {"type": "string", "enum": ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]},
            "revision": {"type": "integer", "format": "int64"},
            "object": {"type": "object"}
        }}),
    );
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "details": {}
            }
        }}}),
    );

    let tenant_param =
        json!([{"name": "tenant", "in": "path", "required": true, "schema": {"type": "string"}}]);
    paths.insert(
        "/v1/keys/{ident}/revoke".into(),
        json!({"post": with_params(operation(
            "revoke_key".into(), "keys", "Revoke a key; it stops authenticating at once".into(),
            ("200", json_response("revoked", schema_ref("Key"))), &["401", "403", "404"]),
            json!([{"name": "ident", "in": "path", "required": true, "schema": {"type": "string"}}]))}),
    );
    paths.insert(
        "/v1/quotas".into(),
        json!({"get": operation("list_quotas".into(), "quotas", "Quotas and use of the tenants the caller may see".into(),
            ("200", json_response("quotas", json!({"type": "object", "properties": {
                "items": {"type": "array", "items": schema_ref("QuotaView")}, "revision": {"type": "integer"}}}))),
            &["401", "403"])}),
    );
    paths.insert(
        "/v1/quotas/{tenant}".into(),
        json!({
            "parameters": tenant_param,
            "get": operation("get_quota".into(), "quotas", "A tenant's quota and use".into(),
                ("200", json_response("quota", schema_ref("QuotaView"))), &["401", "403", "404"]),
            "put": with_body(operation("set_quota".into(), "quotas", "Set a tenant's quota (provider admin)".into(),
                ("200", json_response("quota", schema_ref("QuotaView"))), &["400", "401", "403", "404"]),
                json!({"type": "object", "required": ["quota"], "properties": {"quota": schema_ref("Quota")}}))
        }),
    );
    // What nodes report: a replica's state, an exec's result.
    for (plural, operation_id, summary, object, status) in [
        (
            "placements",
            "set_replica_status",
            "a replica's observed state",
            "Placement",
            "ReplicaStatus",
        ),
        (
            "execs",
            "set_exec_status",
            "what came of an exec",
            "Exec",
            "ExecStatus",
        ),
    ] {
        paths.insert(
            format!("/v1/{plural}/{{ident}}/status"),
            json!({"put": with_params(with_body(operation(operation_id.into(), plural,
                format!("Report {summary} (the node's agent)"),
                ("200", json_response("updated", schema_ref(object))), &["400", "401", "403", "404"]),
                schema_ref(status)),
                json!([{"name": "ident", "in": "path", "required": true, "schema": {"type": "string"}}]))}),
        );
    }
    paths.insert(
        "/v1/workloads/{ident}/exec".into(),
        json!({"post": with_params(with_body(operation("exec_workload".into(), "workloads",
            "Run a command in a running replica of a workload; poll the exec for its result".into(),
            ("201", json_response("the exec, pending", schema_ref("Exec"))), &["400", "401", "403", "404", "409"]),
            schema_ref("ExecRequest")),
            json!([{"name": "ident", "in": "path", "required": true, "schema": {"type": "string"}},
                   query("tenant", "string", "provider admin: the tenant a name belongs to")]))}),
    );
    paths.insert(
        "/v1/kube/endpoint".into(),
        json!({"get": operation("kube_endpoint".into(), "clusters",
            "Where tenant clusters' Kubernetes clients connect (the TLS listener) and the CA they trust".into(),
            ("200", json_response("the endpoint", json!({"type": "object", "required": ["server", "certificate_authority_data"],
                "properties": {"server": {"type": "string"}, "certificate_authority_data": {"type": "string",
                    "description": "base64 of the CA's PEM, as a kubeconfig carries it"}}}))),
            &["401", "403", "409"])}),
    );
    // Execs are made through their workload and never replaced.
    if let Some(Value::Object(list)) = paths.get_mut("/v1/execs") {
        list.remove("post");
    }
    if let Some(Value::Object(item)) = paths.get_mut("/v1/execs/{ident}") {
        item.remove("put");
    }
    paths.insert(
        "/v1/usage".into(),
        json!({
            "get": with_params(operation("list_usage".into(), "usage", "Usage records, oldest first".into(),
                ("200", json_response("records", json!({"type": "object"}))), &["400", "401", "403"]),
                json!([query("after", "integer", "records after this sequence number"), query("limit", "integer", "1 to 1000"),
                       query("tenant", "string", "provider admin: one tenant")])),
            "post": with_body(operation("record_usage".into(), "usage", "Record a batch of usage (gateways); idempotent per batch id".into(),
                ("200", json_response("recorded", json!({"type": "object"}))), &["400", "401", "403"]),
                json!({"type": "object", "required": ["batch_id", "records"]}))
        }),
    );
    paths.insert(
        "/v1/limits/sync".into(),
        json!({"post": with_body(operation("sync_limits".into(), "usage",
            "A gateway reports what it admitted per limited scope and learns the site's other gateways' counts".into(),
            ("200", json_response("the other gateways' counts", json!({"type": "object", "required": ["gateways", "scopes"]}))),
            &["400", "401", "403"]),
            json!({"type": "object", "required": ["gateway", "site", "scopes"]}))}),
    );
    paths.insert(
        "/v1/load".into(),
        json!({"post": with_body(operation("report_load".into(), "usage",
            "A gateway reports each deployment's requests in flight, started and held, for the autoscaler".into(),
            ("200", json_response("how many deployments it named", json!({"type": "object", "required": ["deployments"]}))),
            &["400", "401", "403"]),
            json!({"type": "object", "required": ["gateway", "site"], "properties": {
                "gateway": {"type": "string"}, "site": {"type": "string"},
                "deployments": {"type": "array", "items": {"type": "object",
                    "required": ["deployment", "in_flight", "requests", "waiting"]}}}}))}),
    );
    paths.insert(
        "/v1/audit".into(),
        json!({"get": with_params(operation("list_audit".into(), "audit", "Audit events, oldest first".into(),
            ("200", json_response("events", json!({"type": "object", "properties": {
                "items": {"type": "array", "items": schema_ref("AuditEvent")},
                "revision": {"type": "integer"}, "next_page_token": {"type": "string"}}}))),
            &["400", "401", "403"]),
            json!([query("after", "integer", "events after this revision"), query("limit", "integer", "1 to 1000"),
                   query("tenant", "string", "provider admin: one tenant")]))}),
    );
    for (path, summary) in [
        ("/healthz", "Liveness"),
        ("/readyz", "Readiness: the store answers"),
    ] {
        paths.insert(
            path.into(),
            json!({"get": {"operationId": path.trim_start_matches('/'), "tags": ["health"], "summary": summary,
                "security": [], "responses": {"200": {"description": "ok"}, "503": {"description": "not ready"}}}}),
        );
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Atrium control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Sites, nodes, tenants, keys, quotas, models and deployments of an Atrium cloud."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "admin token or tenant API key"}}
        },
        "security": [{"bearer": []}]
    })
}
