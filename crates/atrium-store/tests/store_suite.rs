//! The store's contract, run against SQLite and a real PostgreSQL server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use atrium_store::testing::{fresh_database_url, TestBackend, BOTH};
use atrium_store::{
    AuditContext, ChangeOp, Count, Precondition, Selection, Store, StoreError, TenantFilter, Write,
    WriteError,
};
use serde_json::json;

async fn open(backend: TestBackend, dir: &tempfile::TempDir) -> Store {
    Store::open(&fresh_database_url(backend, dir.path()).await)
        .await
        .unwrap()
}

fn create(kind: &str, id: &str, tenant: Option<&str>, name: &str) -> Write {
    Write::Create {
        kind: kind.into(),
        id: id.into(),
        tenant: tenant.map(String::from),
        name: name.into(),
        body: json!({"n": name}),
    }
}

fn audit(action: &str) -> AuditContext {
    AuditContext {
        actor: "test".into(),
        role: "provider-admin".into(),
        action: action.into(),
        request_id: "r1".into(),
    }
}

async fn write(store: &Store, w: Write) -> Result<atrium_store::Change, WriteError<()>> {
    store.write::<()>(w, None, audit("test")).await
}

#[tokio::test]
async fn crud_revisions_and_names() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        assert_eq!(store.head(), 0);
        let c1 = write(&store, create("site", "s1", None, "fra"))
            .await
            .unwrap();
        let c2 = write(&store, create("deployment", "d1", Some("acme"), "chat"))
            .await
            .unwrap();
        assert_eq!((c1.revision, c2.revision), (1, 2), "{backend:?}");
        assert_eq!(store.head(), 2);

        // Names are unique per kind and tenant, not globally.
        let dup = write(&store, create("deployment", "d2", Some("acme"), "chat")).await;
        assert!(
            matches!(dup, Err(WriteError::Store(StoreError::NameTaken { .. }))),
            "{backend:?}"
        );
        write(&store, create("deployment", "d3", Some("globex"), "chat"))
            .await
            .unwrap();

        let got = store
            .get_by_name("deployment", Some("acme"), "chat")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.id, "d1");
        assert_eq!(got.tenant.as_deref(), Some("acme"));

        let upd = Write::Update {
            kind: "deployment".into(),
            id: "d1".into(),
            body: json!({"v": 2}),
            if_revision: Some(2),
        };
        let c = write(&store, upd.clone()).await.unwrap();
        assert_eq!(c.op, ChangeOp::Updated);
        // A second update based on the old revision is refused.
        let stale = write(&store, upd).await;
        assert!(matches!(
            stale,
            Err(WriteError::Store(StoreError::RevisionMismatch { .. }))
        ));

        write(
            &store,
            Write::Delete {
                kind: "deployment".into(),
                id: "d1".into(),
            },
        )
        .await
        .unwrap();
        assert!(store.get("deployment", "d1").await.unwrap().is_none());
        let missing = write(
            &store,
            Write::Delete {
                kind: "deployment".into(),
                id: "d1".into(),
            },
        )
        .await;
        assert!(matches!(
            missing,
            Err(WriteError::Store(StoreError::NotFound { .. }))
        ));

        // Failed writes consumed no revision.
        assert_eq!(store.head(), 5, "{backend:?}");
        let events = store.audit(&TenantFilter::All, 0, 100).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
    }
}

#[tokio::test]
async fn list_pages_and_filters_by_tenant() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        for i in 0..5 {
            write(
                &store,
                create("model", &format!("m{i}"), Some("acme"), &format!("a{i}")),
            )
            .await
            .unwrap();
        }
        write(&store, create("model", "m9", None, "public"))
            .await
            .unwrap();
        write(&store, create("model", "m8", Some("globex"), "g"))
            .await
            .unwrap();

        let own = TenantFilter::Exactly(Some("acme".into()));
        let p1 = store.list("model", &own, None, 2).await.unwrap();
        assert_eq!(
            p1.objects.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["m0", "m1"]
        );
        assert_eq!(p1.revision, 7);
        let p2 = store
            .list("model", &own, p1.next_after.as_deref(), 2)
            .await
            .unwrap();
        let p3 = store
            .list("model", &own, p2.next_after.as_deref(), 2)
            .await
            .unwrap();
        assert_eq!(p3.objects.len(), 1);
        assert_eq!(p3.next_after, None);

        let visible = store
            .list(
                "model",
                &TenantFilter::OwnAndPublic("acme".into()),
                None,
                100,
            )
            .await
            .unwrap();
        assert_eq!(visible.objects.len(), 6, "{backend:?}");
        assert!(visible
            .objects
            .iter()
            .all(|o| o.tenant.as_deref() != Some("globex")));
        let all = store
            .list("model", &TenantFilter::All, None, 100)
            .await
            .unwrap();
        assert_eq!(all.objects.len(), 7);
    }
}

#[tokio::test]
async fn changes_are_ordered_and_filtered() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        write(&store, create("deployment", "d1", Some("acme"), "a"))
            .await
            .unwrap();
        write(&store, create("deployment", "d2", Some("globex"), "b"))
            .await
            .unwrap();
        write(&store, create("site", "s1", None, "fra"))
            .await
            .unwrap();
        write(
            &store,
            Write::Delete {
                kind: "deployment".into(),
                id: "d1".into(),
            },
        )
        .await
        .unwrap();

        let all = store
            .changes(0, store.head(), None, &TenantFilter::All, 100)
            .await
            .unwrap();
        assert_eq!(
            all.iter().map(|c| c.revision).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        let acme = store
            .changes(
                0,
                store.head(),
                Some("deployment"),
                &TenantFilter::Exactly(Some("acme".into())),
                100,
            )
            .await
            .unwrap();
        assert_eq!(
            acme.iter().map(|c| (c.revision, c.op)).collect::<Vec<_>>(),
            vec![(1, ChangeOp::Created), (4, ChangeOp::Deleted)]
        );
        assert_eq!(
            acme[1].object.name, "a",
            "a deletion carries the last state"
        );
        let later = store
            .changes(1, 3, Some("deployment"), &TenantFilter::All, 100)
            .await
            .unwrap();
        assert_eq!(later.len(), 1);
    }
}

#[tokio::test]
async fn precondition_is_atomic_under_concurrency() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        let mut tasks = Vec::new();
        for i in 0..50 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let pre = Precondition {
                    reads: vec![Selection {
                        kind: "deployment".into(),
                        tenant: TenantFilter::Exactly(Some("acme".into())),
                        name: None,
                    }],
                    counts: Vec::new(),
                    check: Box::new(|read: &[Vec<atrium_store::Object>], _: &[u64]| {
                        if read[0].len() < 7 {
                            Ok(())
                        } else {
                            Err("full")
                        }
                    }),
                };
                store
                    .write(
                        create(
                            "deployment",
                            &format!("d{i}"),
                            Some("acme"),
                            &format!("n{i}"),
                        ),
                        Some(pre),
                        audit("create"),
                    )
                    .await
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => admitted += 1,
                Err(WriteError::Rejected("full")) => {}
                Err(e) => panic!("{backend:?}: unexpected {e}"),
            }
        }
        assert_eq!(admitted, 7, "{backend:?}");
        assert_eq!(
            store
                .list_all("deployment", &TenantFilter::All)
                .await
                .unwrap()
                .len(),
            7
        );
    }
}

#[tokio::test]
async fn counts_take_every_kind_with_the_prefix_of_one_tenant_only() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        let objects = [
            ("k8s:c1:configmaps", "acme"),
            ("k8s:c1:pods", "acme"),
            ("k8s:c1:pods", "globex"),
            // Sorts right after the prefix's range: not in it.
            ("k8s:c1;x", "acme"),
            ("k8s:c10:pods", "acme"),
            ("k8s:c2:pods", "acme"),
        ];
        for (i, (kind, tenant)) in objects.iter().enumerate() {
            write(&store, create(kind, &format!("o{i}"), Some(tenant), "n"))
                .await
                .unwrap();
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = seen.clone();
        let pre = Precondition {
            reads: Vec::new(),
            counts: vec![
                Count {
                    kind_prefix: "k8s:c1:".into(),
                    tenant: TenantFilter::Exactly(Some("acme".into())),
                },
                Count {
                    kind_prefix: "k8s:".into(),
                    tenant: TenantFilter::All,
                },
            ],
            check: Box::new(move |_: &[Vec<atrium_store::Object>], counts: &[u64]| {
                *into.lock().unwrap() = counts.to_vec();
                Err("just counting")
            }),
        };
        let refused = store
            .write(create("x", "x", None, "x"), Some(pre), audit("create"))
            .await;
        assert!(matches!(
            refused,
            Err(WriteError::Rejected("just counting"))
        ));
        assert_eq!(*seen.lock().unwrap(), [2, 6], "{backend:?}");
    }
}

#[tokio::test]
async fn head_advances_across_processes_sharing_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database_url(TestBackend::Postgres, dir.path()).await;
    let writer = Store::open(&url).await.unwrap();
    let reader = Arc::new(Store::open(&url).await.unwrap());
    let mut rx = reader.subscribe();
    write(&writer, create("site", "s1", None, "fra"))
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.wait_for(|h| *h >= 1))
        .await
        .expect("the second store saw the first's commit")
        .unwrap();
    let seen = reader
        .changes(0, reader.head(), None, &TenantFilter::All, 10)
        .await
        .unwrap();
    assert_eq!(seen.len(), 1);
}

#[tokio::test]
async fn meta_is_set_once() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        assert!(store.set_meta_if_absent("k", "v1").await.unwrap());
        assert!(!store.set_meta_if_absent("k", "v2").await.unwrap());
        assert_eq!(store.get_meta("k").await.unwrap().as_deref(), Some("v1"));
    }
}

#[tokio::test]
async fn usage_batches_are_recorded_once_and_whole() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        // More records than one INSERT statement carries.
        let records: Vec<atrium_store::UsageRecord> = (0..250)
            .map(|i| atrium_store::UsageRecord {
                at: "2026-01-01T00:00:00Z".into(),
                tenant: if i % 2 == 0 { "a" } else { "b" }.into(),
                deployment: "d".into(),
                site: "s".into(),
                replica: "r".into(),
                prompt_tokens: i,
                completion_tokens: 1,
                request_id: format!("req_{i}"),
                flag: (i % 7 == 0).then(|| format!("flag {i}")),
                batch: (i % 5 == 0).then(|| format!("batch_{i:0>16}")),
                requests: 1 + i % 3,
                ingress_site: if i % 4 == 0 { "edge" } else { "s" }.into(),
            })
            .collect();
        assert!(store.record_usage("ub_1", &records).await.unwrap());
        assert!(
            !store.record_usage("ub_1", &records).await.unwrap(),
            "{backend:?}: once"
        );
        let all = store.usage(&TenantFilter::All, 0, 1000).await.unwrap();
        let read: Vec<i64> = all.iter().map(|(_, r)| r.prompt_tokens).collect();
        assert_eq!(read, (0..250).collect::<Vec<_>>(), "{backend:?}: in order");
        assert_eq!(all[249].1.request_id, "req_249");
        let flags: Vec<Option<String>> = all.iter().map(|(_, r)| r.flag.clone()).collect();
        let expected: Vec<Option<String>> = records.iter().map(|r| r.flag.clone()).collect();
        assert_eq!(flags, expected, "{backend:?}: flags kept, absent ones NULL");
        let read_back: Vec<atrium_store::UsageRecord> = all.into_iter().map(|(_, r)| r).collect();
        assert_eq!(read_back, records, "{backend:?}: every field as written");
        let a = store
            .usage(&TenantFilter::Exactly(Some("a".into())), 0, 1000)
            .await
            .unwrap();
        assert_eq!(a.len(), 125, "{backend:?}");
    }
}

#[tokio::test]
async fn compaction_keeps_the_newest_changes_and_refuses_reads_from_before_them() {
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        for i in 0..10 {
            write(
                &store,
                create("site", &format!("s{i}"), None, &format!("n{i}")),
            )
            .await
            .unwrap();
        }
        let head = store.head();
        let everything = TenantFilter::All;
        assert_eq!(store.compacted().await.unwrap(), 0);
        assert_eq!(
            store
                .changes(0, head, None, &everything, 100)
                .await
                .unwrap()
                .len(),
            10
        );

        let up_to = store.compact(3).await.unwrap();
        assert_eq!(up_to, head - 3, "{backend:?}");
        assert_eq!(store.compacted().await.unwrap(), head - 3);
        match store.changes(0, head, None, &everything, 100).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (0, head - 3));
            }
            other => panic!("{backend:?}: a read from before the window: {other:?}"),
        }
        let kept = store
            .changes(head - 3, head, None, &everything, 100)
            .await
            .unwrap();
        let revisions: Vec<i64> = kept.iter().map(|c| c.revision).collect();
        assert_eq!(revisions, [head - 2, head - 1, head], "{backend:?}");
        // The objects themselves stay; compacting again moves nothing back.
        assert_eq!(store.list_all("site", &everything).await.unwrap().len(), 10);
        assert_eq!(store.compact(100).await.unwrap(), head - 3);
    }
}

#[tokio::test]
async fn a_deposed_leaders_writes_are_refused_by_its_fence() {
    use atrium_store::Fence;
    use std::time::Duration;
    for backend in BOTH {
        let dir = tempfile::tempdir().unwrap();
        let store = open(backend, &dir).await;
        let ttl = Duration::from_millis(300);
        assert_eq!(store.lead("controllers", "a", ttl).await.unwrap(), Some(1));
        assert_eq!(
            store.lead("controllers", "b", ttl).await.unwrap(),
            None,
            "{backend:?}"
        );
        assert_eq!(
            store.lead("controllers", "a", ttl).await.unwrap(),
            Some(1),
            "a renews"
        );
        let fence = |holder: &str, term| Fence {
            name: "controllers".into(),
            holder: holder.into(),
            term,
        };
        let as_a = store.fenced(fence("a", 1));
        write(&as_a, create("site", "s1", None, "one"))
            .await
            .unwrap();

        // a stops renewing (paused, partitioned): b takes over in term 2,
        // and a's next write is refused, whatever a believes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(store.lead("controllers", "b", ttl).await.unwrap(), Some(2));
        let refused = write(&as_a, create("site", "s2", None, "two")).await;
        assert!(
            matches!(
                refused,
                Err(WriteError::Store(StoreError::Fenced {
                    term: 1,
                    current: 2,
                    ..
                }))
            ),
            "{backend:?}: {refused:?}"
        );
        assert!(
            store.get("site", "s2").await.unwrap().is_none(),
            "nothing written"
        );
        let as_b = store.fenced(fence("b", 2));
        write(&as_b, create("site", "s3", None, "three"))
            .await
            .unwrap();
        // A stale term of the same holder is refused too.
        assert!(write(
            &store.fenced(fence("b", 1)),
            create("site", "s4", None, "four")
        )
        .await
        .is_err());

        // A leader that stops gives the lease up at once.
        store.resign("controllers", "b").await.unwrap();
        assert_eq!(store.lead("controllers", "a", ttl).await.unwrap(), Some(3));
        // The unfenced store (the API's) writes whoever leads.
        write(&store, create("site", "s5", None, "five"))
            .await
            .unwrap();
    }
}
