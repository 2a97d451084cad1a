//! `Api<R>`: the REST calls of one resource kind, typed (after kube-rs's
//! `Api<K>`). Every plane and the CLI reach resources through it, so a
//! kind's paths, bodies and answers are spelled once, by [`Resource`].

use std::marker::PhantomData;

use atrium_api::{CreateRequest, ListResponse, Object, Resource, UpdateRequest};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ClientError, ControlPlane, Update};

/// The objects of kind `R` the caller may see: all of them, or (for the
/// provider admin) one tenant's.
pub struct Api<R> {
    cp: ControlPlane,
    /// `?tenant=`: the tenant a name refers to, or whose objects to list.
    tenant: Option<String>,
    kind: PhantomData<fn() -> R>,
}

impl<R> Clone for Api<R> {
    fn clone(&self) -> Self {
        Api {
            cp: self.cp.clone(),
            tenant: self.tenant.clone(),
            kind: PhantomData,
        }
    }
}

impl<R: Resource> Api<R> {
    /// Every object of the kind the caller may see.
    pub fn all(cp: &ControlPlane) -> Api<R> {
        Api {
            cp: cp.clone(),
            tenant: None,
            kind: PhantomData,
        }
    }

    /// The provider admin's view of one tenant's objects (`None`: all).
    pub fn of_tenant(cp: &ControlPlane, tenant: Option<&str>) -> Api<R> {
        Api {
            tenant: tenant.map(str::to_string),
            ..Api::all(cp)
        }
    }

    /// `/v1/<plural>/<ident>[/<action>]`, with the tenant when scoped.
    fn object_path(&self, ident: &str, action: Option<&str>) -> String {
        let mut path = format!("/v1/{}/{}", R::PLURAL, encode(ident));
        if let Some(action) = action {
            path.push('/');
            path.push_str(action);
        }
        if let Some(t) = &self.tenant {
            path.push_str("?tenant=");
            path.push_str(&encode(t));
        }
        path
    }

    fn list_path(&self, extra: &str) -> String {
        let mut query = vec!["limit=1000".to_string()];
        if let Some(t) = &self.tenant {
            query.push(format!("tenant={}", encode(t)));
        }
        if !extra.is_empty() {
            query.push(extra.to_string());
        }
        format!("/v1/{}?{}", R::PLURAL, query.join("&"))
    }

    pub async fn get(&self, ident: &str) -> Result<Object<R>, ClientError> {
        self.cp
            .request(Method::GET, &self.object_path(ident, None), None::<&()>)
            .await
    }

    /// Every object (all pages) and the revision the first page was read
    /// at: watch from there to see every later change.
    pub async fn list(&self) -> Result<(Vec<Object<R>>, i64), ClientError> {
        let mut items = Vec::new();
        let mut revision = None;
        let mut token: Option<String> = None;
        loop {
            let extra = token
                .as_deref()
                .map(|t| format!("page_token={}", encode(t)))
                .unwrap_or_default();
            let page: ListResponse<Object<R>> = self
                .cp
                .request(Method::GET, &self.list_path(&extra), None::<&()>)
                .await?;
            revision.get_or_insert(page.revision);
            items.extend(page.items);
            token = page.next_page_token;
            if token.is_none() {
                return Ok((items, revision.unwrap_or(0)));
            }
        }
    }

    /// Creates `name`, owned by the scoped tenant (a tenant caller's own
    /// when unscoped).
    pub async fn create(&self, name: &str, spec: &R::Spec) -> Result<Object<R>, ClientError> {
        self.create_as(name, spec).await
    }

    /// `create` for kinds whose create answer is not the object (a key
    /// comes back with its secret).
    pub async fn create_as<T: DeserializeOwned>(
        &self,
        name: &str,
        spec: &R::Spec,
    ) -> Result<T, ClientError> {
        let body = CreateRequest {
            name: name.to_string(),
            tenant: self.tenant.clone(),
            spec: spec.clone(),
        };
        self.cp
            .request(Method::POST, &format!("/v1/{}", R::PLURAL), Some(&body))
            .await
    }

    /// Makes `name`'s spec `spec`: replaced when it exists, created when
    /// it does not (an agent registering its node, again at each start).
    pub async fn create_or_update(
        &self,
        name: &str,
        spec: &R::Spec,
    ) -> Result<Object<R>, ClientError> {
        match self.get(name).await {
            Ok(_) => self.update(name, spec, None).await,
            Err(e) if e.status() == Some(404) => self.create(name, spec).await,
            Err(e) => Err(e),
        }
    }

    /// Replaces the spec; only while the object is still at `revision`
    /// when one is given.
    pub async fn update(
        &self,
        ident: &str,
        spec: &R::Spec,
        revision: Option<i64>,
    ) -> Result<Object<R>, ClientError> {
        let body = UpdateRequest {
            spec: spec.clone(),
            revision,
        };
        self.cp
            .request(Method::PUT, &self.object_path(ident, None), Some(&body))
            .await
    }

    pub async fn delete(&self, ident: &str) -> Result<Object<R>, ClientError> {
        self.cp
            .request(Method::DELETE, &self.object_path(ident, None), None::<&()>)
            .await
    }

    /// A kind's own verb on one object: `POST /v1/<plural>/<ident>/<action>`
    /// (a key's `revoke`), answering the object.
    pub async fn act(&self, ident: &str, action: &str) -> Result<Object<R>, ClientError> {
        self.cp
            .request(
                Method::POST,
                &self.object_path(ident, Some(action)),
                None::<&()>,
            )
            .await
    }

    /// Sets what a controller observed: `PUT /v1/<plural>/<ident>/status`.
    pub async fn replace_status(
        &self,
        ident: &str,
        status: &R::Status,
    ) -> Result<Object<R>, ClientError> {
        self.cp
            .request(
                Method::PUT,
                &self.object_path(ident, Some("status")),
                Some(status),
            )
            .await
    }

    /// Lists, then follows every change forever (see
    /// [`ControlPlane::follow`]); objects that do not parse as `R` (a
    /// newer control plane's) are skipped, and logged.
    pub async fn follow(&self, mut on_update: impl FnMut(Update<Object<R>>) + Send) {
        let typed = |v: serde_json::Value| -> Option<Object<R>> {
            serde_json::from_value(v)
                .map_err(|e| tracing::warn!(kind = R::KIND, error = %e, "skipping an object that does not parse"))
                .ok()
        };
        self.cp
            .follow_raw(&self.list_path(""), R::PLURAL, move |update| {
                let update = match update {
                    Update::Snapshot(items) => {
                        Update::Snapshot(items.into_iter().filter_map(typed).collect())
                    }
                    Update::Added(o) => match typed(o) {
                        Some(o) => Update::Added(o),
                        None => return,
                    },
                    Update::Modified(o) => match typed(o) {
                        Some(o) => Update::Modified(o),
                        None => return,
                    },
                    Update::Deleted(o) => match typed(o) {
                        Some(o) => Update::Deleted(o),
                        None => return,
                    },
                };
                on_update(update);
            })
            .await
    }
}

/// Percent-encodes a path segment or query value: identifiers are DNS
/// labels and ids, but a caller's typo must not become another path.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ControlPlane {
    /// A typed call: `body` serialised as JSON, the answer parsed as `T`.
    pub async fn request<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Some(bytes::Bytes::from(
                serde_json::to_vec(b).map_err(|e| ClientError::Decode(e.to_string()))?,
            )),
            None => None,
        };
        let value = self.call_raw(method, path, body).await?;
        serde_json::from_value(value).map_err(|e| ClientError::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atrium_api::{Deployment, Key};

    #[test]
    fn paths_carry_the_plural_and_the_escaped_tenant() {
        let cp = ControlPlane::new("http://cp", "t");
        let api = Api::<Key>::of_tenant(&cp, Some("acme"));
        assert_eq!(
            api.object_path("ci", Some("revoke")),
            "/v1/keys/ci/revoke?tenant=acme"
        );
        let all = Api::<Deployment>::all(&cp);
        assert_eq!(
            all.object_path("../keys", None),
            "/v1/deployments/..%2Fkeys"
        );
        assert_eq!(
            Api::<Deployment>::of_tenant(&cp, Some("a&watch=true")).list_path(""),
            "/v1/deployments?limit=1000&tenant=a%26watch%3Dtrue"
        );
    }
}
