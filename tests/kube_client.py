"""The official Python `kubernetes` client (PyPI) against an Atrium tenant
cluster: compatibility with what it sends and reads, not upstream
conformance. Usage: python3 tests/kube_client.py <kubeconfig>

Version and discovery, namespaces, config maps and secrets through their
typed APIs, a watch from a resourceVersion, a 409 on a stale update, a
404, label selectors, pages with `limit`/`continue`, and a deployment the
cluster's controllers turn into a replica set. Exits non-zero, with the
reason, on the first failure.
"""

import sys
import threading
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


def refused(status, call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except ApiException as e:
        assert e.status == status, f"{call.__name__}: {e.status} (wanted {status}): {e.body}"
        return e
    raise AssertionError(f"{call.__name__} was not refused")


def meta(name, **kw):
    return client.V1ObjectMeta(name=name, **kw)


def main(kubeconfig):
    config.load_kube_config(config_file=kubeconfig)
    version = client.VersionApi().get_code()
    assert (version.major, version.minor) == ("1", "37"), version
    groups = [g.name for g in client.ApisApi().get_api_versions().groups]
    assert "apps" in groups and "batch" in groups, groups

    core, apps = client.CoreV1Api(), client.AppsV1Api()
    names = [n.metadata.name for n in core.list_namespace().items]
    assert "default" in names and "kube-system" in names, names
    core.create_namespace(client.V1Namespace(metadata=meta("py")))

    made = core.create_namespaced_config_map(
        "py", client.V1ConfigMap(metadata=meta("cfg", labels={"app": "py"}), data={"k": "1"})
    )
    assert made.metadata.uid and made.metadata.resource_version, made.metadata

    # A watch from the create's resourceVersion sees what follows, in order.
    seen = []
    w = watch.Watch()

    def follow():
        stream = w.stream(
            core.list_namespaced_config_map,
            "py",
            resource_version=made.metadata.resource_version,
            timeout_seconds=10,
        )
        for event in stream:
            seen.append((event["type"], event["object"].metadata.name, event["object"].data))
            if len(seen) == 2:
                w.stop()

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.5)
    core.patch_namespaced_config_map("cfg", "py", {"data": {"k": "2"}})
    core.delete_namespaced_config_map("cfg", "py")
    follower.join(15)
    assert seen == [("MODIFIED", "cfg", {"k": "2"}), ("DELETED", "cfg", {"k": "2"})], seen

    # Optimistic concurrency: an update from a stale read is a conflict.
    cm = core.create_namespaced_config_map("py", client.V1ConfigMap(metadata=meta("c2"), data={"k": "a"}))
    cm.data = {"k": "b"}
    core.replace_namespaced_config_map("c2", "py", cm)
    cm.data = {"k": "c"}
    refused(409, core.replace_namespaced_config_map, "c2", "py", cm)
    assert core.read_namespaced_config_map("c2", "py").data == {"k": "b"}
    refused(404, core.read_namespaced_config_map, "nope", "py")

    # Label selectors, and pages.
    for i in range(5):
        labels = {"batch": "odd" if i % 2 else "even"}
        core.create_namespaced_config_map(
            "py", client.V1ConfigMap(metadata=meta(f"page-{i}", labels=labels), data={"i": str(i)})
        )
    odd = core.list_namespaced_config_map("py", label_selector="batch=odd").items
    assert sorted(c.metadata.name for c in odd) == ["page-1", "page-3"], odd
    names, token = [], None
    while True:
        page = core.list_namespaced_config_map("py", limit=2, _continue=token, label_selector="batch")
        assert len(page.items) <= 2
        names += [c.metadata.name for c in page.items]
        token = page.metadata._continue
        if not token:
            break
    assert names == [f"page-{i}" for i in range(5)], names

    # A secret's string data comes back as base64 data.
    core.create_namespaced_secret("py", client.V1Secret(metadata=meta("db"), string_data={"pw": "hunter2"}))
    assert core.read_namespaced_secret("db", "py").data == {"pw": "aHVudGVyMg=="}

    # A deployment: its controller makes the replica set it owns.
    container = client.V1Container(name="main", image="acme/busybox:1", command=["/bin/busybox", "sleep", "60"])
    template = client.V1PodTemplateSpec(
        metadata=meta(None, labels={"app": "api"}), spec=client.V1PodSpec(containers=[container])
    )
    spec = client.V1DeploymentSpec(
        replicas=1, selector=client.V1LabelSelector(match_labels={"app": "api"}), template=template
    )
    deployment = apps.create_namespaced_deployment("py", client.V1Deployment(metadata=meta("api"), spec=spec))
    owned = []
    for _ in range(100):
        owned = [
            rs
            for rs in apps.list_namespaced_replica_set("py").items
            if any(o.uid == deployment.metadata.uid for o in rs.metadata.owner_references or [])
        ]
        if owned:
            break
        time.sleep(0.1)
    assert len(owned) == 1, "the deployment's controller made no replica set"
    apps.delete_namespaced_deployment("api", "py")
    core.delete_namespace("py")
    print("python kubernetes client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
