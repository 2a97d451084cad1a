//! A kube-rs `Controller` (kube 5, k8s-openapi 0.29, v1.37) against a
//! tenant cluster, over the kubeconfig `atrium cluster kubeconfig`
//! writes: its watcher lists and watches, its reconciler reads, applies
//! server-side and reacts to changes. Compatibility with what kube-rs
//! sends, not upstream conformance.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::kubectl::fixture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::{Action, Controller};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_controller_reconciles_in_a_tenants_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let f = tokio::task::spawn_blocking({
        let path = dir.path().to_path_buf();
        move || fixture(&path)
    })
    .await
    .unwrap();
    let kubeconfig = Kubeconfig::from_yaml(&f.config).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
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
