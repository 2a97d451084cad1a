//! A kube-rs `Controller` (kube 5, k8s-openapi 0.29, v1.37) against a
//! tenant cluster, over the kubeconfig `atrium cluster kubeconfig`
//! writes: its watcher lists and watches, its reconciler reads, applies
//! server-side and reacts to changes; and an operator of the tenant's own
//! type: a definition created and awaited, the type found by discovery,
//! its objects' status written through `/status`. Compatibility with what kube-rs
//! sends, not upstream conformance.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::kubectl::{fixture, Fixture};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Api, Client, Config, Resource, ResourceExt};

/// Mirrors each config map labelled `mirror=yes` into `<name>-copy`,
/// owned by it, applied server-side.
async fn reconcile(cm: Arc<ConfigMap>, api: Arc<Api<ConfigMap>>) -> Result<Action, kube::Error> {
    let name = format!("{}-copy", cm.name_any());
    let copy = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            owner_references: cm.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: cm.data.clone(),
        ..ConfigMap::default()
    };
    let params = PatchParams::apply("mirror-controller").force();
    api.patch(&name, &params, &Patch::Apply(&copy)).await?;
    Ok(Action::await_change())
}

fn retry(_: Arc<ConfigMap>, _: &kube::Error, _: Arc<Api<ConfigMap>>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

async fn copy_of(api: &Api<ConfigMap>, name: &str, want: &str) -> ConfigMap {
    for _ in 0..150 {
        if let Ok(Some(c)) = api.get_opt(name).await {
            if c.data.as_ref().and_then(|d| d.get("k")).map(String::as_str) == Some(want) {
                return c;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never held k={want}");
}

/// A control plane with acme's cluster, and a kube-rs client of it.
async fn cluster(dir: &std::path::Path) -> (Fixture, Client) {
    let f = tokio::task::spawn_blocking({
        let path = dir.to_path_buf();
        move || fixture(&path)
    })
    .await
    .unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&f.config).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    (f, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_controller_reconciles_in_a_tenants_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, client) = cluster(dir.path()).await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37")
    );

    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let controller = Controller::new(api.clone(), watcher::Config::default().labels("mirror=yes"))
        .run(reconcile, retry, Arc::new(api.clone()))
        .for_each(|_| async {});
    let running = tokio::spawn(controller);

    let source = |k: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some("src".into()),
            labels: Some(BTreeMap::from([("mirror".into(), "yes".into())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("k".into(), k.into())])),
        ..ConfigMap::default()
    };
    let made = api
        .create(&PostParams::default(), &source("1"))
        .await
        .unwrap();
    let copy = copy_of(&api, "src-copy", "1").await;
    let owner = &copy.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(Some(&owner.uid), made.metadata.uid.as_ref());
    let managers: Vec<String> = copy
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["mirror-controller"]);

    // A change to the source reaches the controller through its watch.
    let mut changed = api.get("src").await.unwrap();
    changed.data = source("2").data;
    api.replace("src", &PostParams::default(), &changed)
        .await
        .unwrap();
    copy_of(&api, "src-copy", "2").await;
    // A config map it does not select is left alone.
    let mut other = source("3");
    other.metadata.name = Some("plain".into());
    other.metadata.labels = None;
    api.create(&PostParams::default(), &other).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(api.get_opt("plain-copy").await.unwrap().is_none());
    // The copy it owns goes with its source.
    running.abort();
    api.delete("src", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("src-copy").await.unwrap().is_none());
}

/// Writes each widget's `spec.size` into its status, through `/status`,
/// as an operator of a custom type does.
async fn observe(
    w: Arc<DynamicObject>,
    api: Arc<Api<DynamicObject>>,
) -> Result<Action, kube::Error> {
    let size = w.data["spec"]["size"].clone();
    let status = Patch::Merge(serde_json::json!({"status": {"observedSize": size}}));
    api.patch_status(&w.name_any(), &PatchParams::default(), &status)
        .await?;
    Ok(Action::await_change())
}

fn retry_widget(_: Arc<DynamicObject>, _: &kube::Error, _: Arc<Api<DynamicObject>>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

async fn observed(api: &Api<DynamicObject>, want: i64) -> DynamicObject {
    for _ in 0..150 {
        let w = api.get("w").await.unwrap();
        if w.data["status"]["observedSize"].as_i64() == Some(want) {
            return w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the widget's status never observed size {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_operator_defines_a_type_and_writes_its_objects_status() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, client) = cluster(dir.path()).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "size": {"type": "integer"},
                        "color": {"type": "string", "default": "red"}}},
                    "status": {"type": "object", "properties": {
                        "observedSize": {"type": "integer"}}}}}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let established = await_condition(
        crds,
        "widgets.example.com",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(20), established)
        .await
        .unwrap()
        .unwrap();

    // kube-rs finds the type by discovery, as for any cluster's.
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let (ar, caps) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let controller = Controller::new_with(api.clone(), watcher::Config::default(), ar.clone())
        .run(observe, retry_widget, Arc::new(api.clone()))
        .for_each(|_| async {});
    let running = tokio::spawn(controller);

    let widget = DynamicObject::new("w", &ar).data(serde_json::json!({"spec": {"size": 3}}));
    let made = api.create(&PostParams::default(), &widget).await.unwrap();
    assert_eq!(made.data["spec"]["color"], "red", "defaulted by the schema");
    let w = observed(&api, 3).await;
    assert_eq!(
        w.metadata.generation,
        Some(1),
        "a status write is no new generation"
    );

    let mut bigger = w.clone();
    bigger.data["spec"]["size"] = serde_json::json!(5);
    api.replace("w", &PostParams::default(), &bigger)
        .await
        .unwrap();
    let w = observed(&api, 5).await;
    assert_eq!(w.metadata.generation, Some(2));
    running.abort();
}

/// Compatibility, not conformance: the objects the Kubernetes driver
/// (`atrium agent --driver kubernetes`) makes, applied as it applies them
/// (server-side, field manager `atrium`) to Atrium's own tenant
/// Kubernetes API, and found again by the driver's selector. A tenant
/// cluster serves no NetworkPolicy, so the driver as a whole cannot use
/// one as its cluster: the apply of the policy is refused there (404),
/// and the driver reports the tenant's placements failed with that
/// refusal rather than run their pods without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_drivers_objects_apply_to_a_tenant_cluster() {
    use atrium_kube_driver::plan;
    use k8s_openapi::api::core::v1::{Namespace, Pod, ResourceQuota};
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    let dir = tempfile::tempdir().unwrap();
    let (_f, client) = cluster(dir.path()).await;
    let spec: atrium_core::placement::PlacementSpec = serde_json::from_value(serde_json::json!({
        "deployment": "dep_1", "deployment_name": "chat", "replica": 0, "node": "k8s-1",
        "engine": "simulated", "model": "m", "model_source": "", "model_task": "chat",
        "resources": {"cpu": "1", "memory": "1Gi"}}))
    .unwrap();
    let assigned = plan::Assigned {
        id: "pla_compat".into(),
        tenant: "acme".into(),
        spec: spec.clone(),
    };
    // A tenant cluster takes images of Atrium's own registry only.
    let images = plan::Images {
        atrium: "acme/atrium:test".into(),
        registry: "registry.local:5000".into(),
    };
    let params = PatchParams::apply(plan::FIELD_MANAGER).force();
    let ns = plan::namespace("k8s-1", "acme").unwrap();
    let ns_name = ns.name_any();
    Api::<Namespace>::all(client.clone())
        .patch(&ns_name, &params, &Patch::Apply(&ns))
        .await
        .unwrap();
    let quota = plan::resource_quota("k8s-1", "acme", &[&spec]).unwrap();
    let applied = Api::<ResourceQuota>::namespaced(client.clone(), &ns_name)
        .patch(&quota.name_any(), &params, &Patch::Apply(&quota))
        .await
        .unwrap();
    assert_eq!(applied.spec.unwrap().hard.unwrap()["pods"].0, "1");
    let pod = plan::pod("k8s-1", &images, &assigned).unwrap();
    let applied = Api::<Pod>::namespaced(client.clone(), &ns_name)
        .patch(&pod.name_any(), &params, &Patch::Apply(&pod))
        .await
        .unwrap();
    assert_eq!(
        applied.annotations()[plan::PLACEMENT],
        "pla_compat",
        "applied as sent"
    );
    let driver = atrium_kube_driver::Cluster::new(client.clone(), "k8s-1", images);
    let pods = driver.pods().await.unwrap();
    assert_eq!(
        pods.keys().collect::<Vec<_>>(),
        ["pla_compat"],
        "found by its selector"
    );
    let policy = plan::network_policy("k8s-1", "acme").unwrap();
    let refused = Api::<NetworkPolicy>::namespaced(client, &ns_name)
        .patch(&policy.name_any(), &params, &Patch::Apply(&policy))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 404),
        "{refused:?}"
    );
}
