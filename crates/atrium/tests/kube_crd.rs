//! A tenant's own resource types through the real kubectl 1.37: a
//! CustomResourceDefinition applied, established and discovered; custom
//! objects pruned, defaulted and validated by its schema; printed with its
//! columns, explained from its schema, scaled and given a status through
//! their subresources, read in another served version; and the types gone
//! with their objects when the definition goes. Another tenant's cluster
//! never sees them. Compatibility with kubectl, not upstream conformance.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use common::kubectl::{cli, fixture, kubectl, write, Kube};

const DEFINITION: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the widget should be.
            required: [size]
            properties:
              size:
                type: integer
                minimum: 1
                maximum: 10
                description: How big the widget is.
              color:
                type: string
                enum: [red, blue]
                default: red
              replicas:
                type: integer
          status:
            type: object
            properties:
              replicas:
                type: integer
    subresources:
      status: {}
      scale:
        specReplicasPath: .spec.replicas
        statusReplicasPath: .status.replicas
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Color
      type: string
      jsonPath: .spec.color
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
";

const WIDGET: &str = "\
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w1
  namespace: default
spec:
  size: 3
  replicas: 1
";

#[test]
fn kubectl_defines_a_type_and_uses_its_objects_in_a_tenants_cluster() {
    let bin = kubectl();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let kube = Kube::new(&bin, dir.path(), "acme.kubeconfig", &f.config);
    let file = |name: &str, text: &str| write(dir.path(), name, text).to_str().unwrap().to_string();

    let crd = file("crd.yaml", DEFINITION);
    let applied = kube.ok(&["apply", "-f", &crd]);
    assert!(
        applied
            .contains("customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"),
        "{applied}"
    );
    let waited = kube.ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=20s",
        "crd/widgets.example.com",
    ]);
    assert!(waited.contains("condition met"), "{waited}");
    let resources = kube.ok(&["api-resources", "--api-group=example.com"]);
    assert!(
        resources.contains("widgets") && resources.contains("wd") && resources.contains("Widget"),
        "{resources}"
    );

    // Unknown fields are refused under kubectl's strict validation; a
    // value the schema forbids is refused by the server, field by field.
    let unknown = file(
        "unknown.yaml",
        &WIDGET.replace("  size: 3\n", "  size: 3\n  bogus: yes\n"),
    );
    let (ok, said) = kube.run(&["apply", "-f", &unknown]);
    assert!(
        !ok && said.contains("unknown field \"spec.bogus\""),
        "{said}"
    );
    let big = file("big.yaml", &WIDGET.replace("size: 3", "size: 11"));
    let (ok, said) = kube.run(&["apply", "-f", &big]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("spec.size") && said.contains("less than or equal to 10"),
        "{said}"
    );
    let no_size = file("nosize.yaml", &WIDGET.replace("  size: 3\n", ""));
    let (ok, said) = kube.run(&["apply", "-f", &no_size]);
    assert!(!ok && said.contains("spec.size: Required value"), "{said}");

    let widget = file("widget.yaml", WIDGET);
    let created = kube.ok(&["apply", "-f", &widget]);
    assert!(
        created.contains("widget.example.com/w1 created"),
        "{created}"
    );
    let again = kube.ok(&["apply", "-f", &widget]);
    assert!(again.contains("widget.example.com/w1 unchanged"), "{again}");

    // Its columns, its default, its schema.
    let listed = kube.ok(&["get", "wd"]);
    let header: Vec<&str> = listed.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "COLOR", "AGE"], "{listed}");
    assert!(listed.contains("w1") && listed.contains("red"), "{listed}");
    let color = kube.ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.color}"]);
    assert_eq!(color, "red");
    let explained = kube.ok(&["explain", "widget.spec"]);
    for line in [
        "GROUP:      example.com",
        "KIND:       Widget",
        "What the widget should be.",
        "size\t<integer> -required-",
        "How big the widget is.",
    ] {
        assert!(explained.contains(line), "{line:?} in {explained}");
    }

    // `/scale` sets the path its definition names; `/status` is the only
    // way to the status.
    let scaled = kube.ok(&["scale", "widget", "w1", "--replicas=4"]);
    assert!(scaled.contains("widget.example.com/w1 scaled"), "{scaled}");
    let replicas = kube.ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(replicas, "4");
    kube.ok(&[
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":9}}"#,
    ]);
    let status = || kube.ok(&["get", "widget", "w1", "-o", "jsonpath={.status.replicas}"]);
    assert_eq!(status(), "", "a write of the object keeps its status");
    kube.ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":4},"spec":{"size":9}}"#,
    ]);
    assert_eq!(status(), "4");
    let size = kube.ok(&["get", "widget", "w1", "-o", "jsonpath={.spec.size}"]);
    assert_eq!(size, "3", "a write of the status keeps the rest");

    // Another served version reads the same object.
    let v1beta1 = kube.ok(&[
        "get",
        "widgets.v1beta1.example.com",
        "w1",
        "-o",
        "jsonpath={.apiVersion} {.spec.size}",
    ]);
    assert_eq!(v1beta1, "example.com/v1beta1 3");

    // Another tenant's cluster has no such type.
    let globex = cli(&f.url, &f.keys["globex"], &["cluster", "create", "other"]);
    assert!(globex.contains("other"), "{globex}");
    let config = cli(
        &f.url,
        &f.keys["globex"],
        &["cluster", "kubeconfig", "other"],
    );
    let theirs = Kube::new(&bin, dir.path(), "globex.kubeconfig", &config);
    let (ok, said) = theirs.run(&["get", "widgets", "-A"]);
    assert!(
        !ok && said.contains("the server doesn't have a resource type \"widgets\""),
        "{said}"
    );

    // The definition goes, and its objects with it.
    let deleted = kube.ok(&["delete", "-f", &crd]);
    assert!(deleted.contains("deleted"), "{deleted}");
    let (ok, said) = kube.run(&["get", "widgets"]);
    assert!(!ok, "{said}");
    kube.ok(&["apply", "-f", &crd]);
    let none = kube.ok(&["get", "widgets", "-A"]);
    assert!(none.contains("No resources found"), "{none}");
}
