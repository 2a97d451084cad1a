//! Services and their Endpoints. A tenant cluster serves `ClusterIP`
//! services (and headless ones, `clusterIP: None`): each gets a virtual
//! address of [`SERVICE_NETWORK`], fixed for its life and unique across
//! its tenant's clusters — a tenant's pods on a node share one network,
//! where each address is routed (`route_of`) to the service's ready
//! endpoints.
//! The endpoints controller lists, for each service with a selector, the
//! pods it selects — ready ones as addresses, the others as not ready —
//! with each port's `targetPort` resolved against the pod's named ports.
//!
//! `NodePort`, `LoadBalancer` and `ExternalName` are refused: a tenant
//! cluster's nodes are the provider's, and no tenant opens ports on them.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use atrium_core::service_route::{
    self, is_service_address, Backend, RoutePort, RouteProtocol, SERVICE_NETWORK,
};

use crate::selector::LabelSelector;
use crate::KubeError;

/// Most ports one service lists.
const MAX_PORTS: usize = service_route::MAX_PORTS;

fn invalid(svc: &Value, why: impl Into<String>) -> KubeError {
    let name = svc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    KubeError::invalid("Service", name, why)
}

/// The lowest address of the range no other service holds (neither the
/// network's nor its broadcast address).
fn allocate(taken: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let (net, bits) = SERVICE_NETWORK;
    let first = u32::from(net) + 1;
    let last = u32::from(net) + (1u32 << (32 - u32::from(bits))) - 2;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !taken.contains(ip))
}

/// Checks a new service and gives it its defaults and address: `taken`
/// are the addresses the cluster's other services hold.
pub fn prepare_create(svc: &mut Value, taken: &HashSet<Ipv4Addr>) -> Result<(), KubeError> {
    check_spec(svc)?;
    let asked = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ip = match asked.as_str() {
        "" => allocate(taken)
            .ok_or_else(|| invalid(svc, "spec.clusterIP: the cluster's service range is full"))?
            .to_string(),
        "None" => "None".to_string(),
        given => {
            let ip: Ipv4Addr = given.parse().map_err(|_| {
                invalid(svc, format!("spec.clusterIP: Invalid value: {given:?}: must be a valid IP address or None"))
            })?;
            if !is_service_address(ip) {
                return Err(invalid(
                    svc,
                    format!("spec.clusterIP: Invalid value: {given:?}: provided IP is not in the valid range; the range of valid IPs is 10.96.0.0/16"),
                ));
            }
            if taken.contains(&ip) {
                return Err(invalid(
                    svc,
                    format!("spec.clusterIP: Invalid value: {given:?}: provided IP is already allocated"),
                ));
            }
            given.to_string()
        }
    };
    svc["spec"]["clusterIP"] = json!(ip);
    svc["spec"]["clusterIPs"] = json!([ip]);
    Ok(())
}

/// Checks a replacement: the address stays the service's.
pub fn prepare_update(old: &Value, new: &mut Value) -> Result<(), KubeError> {
    check_spec(new)?;
    let was = old.pointer("/spec/clusterIP").cloned().unwrap_or(json!(""));
    match new.pointer("/spec/clusterIP") {
        None | Some(Value::Null) => new["spec"]["clusterIP"] = was.clone(),
        Some(v) if v.as_str() == Some("") => new["spec"]["clusterIP"] = was.clone(),
        Some(v) if *v != was => {
            return Err(invalid(
                new,
                "spec.clusterIP: Invalid value: field is immutable",
            ))
        }
        Some(_) => {}
    }
    new["spec"]["clusterIPs"] = json!([was]);
    Ok(())
}

/// Type, ports and selector.
fn check_spec(svc: &mut Value) -> Result<(), KubeError> {
    if !svc["spec"].is_object() {
        svc["spec"] = json!({});
    }
    let kind = svc
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if kind != "ClusterIP" {
        return Err(invalid(
            svc,
            format!("spec.type: Unsupported value: {kind:?}: a tenant cluster's services are ClusterIP (or headless)"),
        ));
    }
    svc["spec"]["type"] = json!("ClusterIP");
    if !svc["spec"]["sessionAffinity"].is_string() {
        svc["spec"]["sessionAffinity"] = json!("None");
    }
    let ports = svc
        .pointer_mut("/spec/ports")
        .and_then(Value::as_array_mut)
        .map(std::mem::take)
        .unwrap_or_default();
    if ports.len() > MAX_PORTS {
        return Err(invalid(
            svc,
            format!(
                "spec.ports: Too many: {}: must have at most {MAX_PORTS} items",
                ports.len()
            ),
        ));
    }
    let mut checked = Vec::with_capacity(ports.len());
    let mut names = HashSet::new();
    for (i, mut p) in ports.into_iter().enumerate() {
        let port = p["port"].as_u64().filter(|n| (1..=65535).contains(n));
        let Some(port) = port else {
            return Err(invalid(
                svc,
                format!(
                    "spec.ports[{i}].port: Invalid value: must be between 1 and 65535, inclusive"
                ),
            ));
        };
        let protocol = p["protocol"].as_str().unwrap_or("TCP").to_string();
        if protocol != "TCP" && protocol != "UDP" {
            return Err(invalid(
                svc,
                format!("spec.ports[{i}].protocol: Unsupported value: {protocol:?}: supported values: \"TCP\", \"UDP\""),
            ));
        }
        p["protocol"] = json!(protocol);
        match &p["targetPort"] {
            Value::Null => p["targetPort"] = json!(port),
            Value::Number(n) if n.as_u64().is_some_and(|n| (1..=65535).contains(&n)) => {}
            Value::String(s) if !s.is_empty() && s.len() <= 15 => {}
            _ => {
                return Err(invalid(
                    svc,
                    format!("spec.ports[{i}].targetPort: Invalid value: a port number (1-65535) or a port name (at most 15 characters)"),
                ))
            }
        }
        let name = p["name"].as_str().unwrap_or("").to_string();
        if !names.insert(name.clone()) {
            return Err(invalid(
                svc,
                format!("spec.ports[{i}].name: Duplicate value: {name:?}"),
            ));
        }
        checked.push(p);
    }
    svc["spec"]["ports"] = Value::Array(checked);
    if let Some(sel) = svc.pointer("/spec/selector") {
        if !sel.is_null()
            && !sel
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string))
        {
            return Err(invalid(svc, "spec.selector: must map label keys to values"));
        }
    }
    Ok(())
}

/// Whether `svc` has a selector: only then are its endpoints the
/// controller's (a service without one has endpoints its tenant writes).
pub fn selects(svc: &Value) -> bool {
    svc.pointer("/spec/selector")
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty())
}

/// The port `target` names on `pod`: a number as it is, a name looked up
/// among the pod's container ports.
fn resolve(target: &Value, pod: &Value) -> Option<u64> {
    match target {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => pod
            .pointer("/spec/containers")?
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find(|p| p["name"].as_str() == Some(name))?
            .get("containerPort")?
            .as_u64(),
        _ => None,
    }
}

/// A service port on a pod: name, port number, protocol.
type ResolvedPort = (String, u64, String);
/// A subset's ready addresses, then its not-ready ones.
type Addresses = (Vec<Value>, Vec<Value>);

/// The `Endpoints` of `svc` over the pods of its namespace: one subset
/// per distinct set of resolved ports, as upstream groups them.
pub fn endpoints_of(svc: &Value, pods: &[Value]) -> Value {
    let meta = &svc["metadata"];
    let selector: BTreeMap<String, String> = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let selector = LabelSelector::equal(&selector);
    let ports: Vec<&Value> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let mut subsets: BTreeMap<Vec<ResolvedPort>, Addresses> = BTreeMap::new();
    for pod in pods {
        let ip = pod.pointer("/status/podIP").and_then(Value::as_str);
        let (Some(ip), true) = (ip, selector.matches(pod)) else {
            continue;
        };
        let resolved: Option<Vec<ResolvedPort>> = ports
            .iter()
            .map(|p| {
                Some((
                    p["name"].as_str().unwrap_or("").to_string(),
                    resolve(&p["targetPort"], pod)?,
                    p["protocol"].as_str().unwrap_or("TCP").to_string(),
                ))
            })
            .collect();
        let Some(resolved) = resolved else { continue };
        let address = json!({"ip": ip, "targetRef": {"kind": "Pod",
            "namespace": pod["metadata"]["namespace"], "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"]}});
        let entry = subsets.entry(resolved).or_default();
        let ready = pod.pointer("/status/containerStatuses/0/ready") == Some(&json!(true));
        if ready {
            entry.0.push(address);
        } else {
            entry.1.push(address);
        }
    }
    let subsets: Vec<Value> = subsets
        .into_iter()
        .map(|(ports, (ready, not_ready))| {
            let ports: Vec<Value> = ports
                .into_iter()
                .map(|(name, port, protocol)| {
                    let mut p = json!({"port": port, "protocol": protocol});
                    if !name.is_empty() {
                        p["name"] = json!(name);
                    }
                    p
                })
                .collect();
            let mut s = json!({"ports": ports});
            if !ready.is_empty() {
                s["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = json!(not_ready);
            }
            s
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                     "labels": meta.get("labels").cloned().unwrap_or(json!({}))},
        "subsets": subsets,
    })
}

/// `PORT(S)` as `kubectl get services` prints it: `80/TCP,53/UDP`.
pub fn ports_column(svc: &Value) -> String {
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array);
    let listed: Vec<String> = ports
        .into_iter()
        .flatten()
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
        .collect();
    if listed.is_empty() {
        "<none>".into()
    } else {
        listed.join(",")
    }
}

/// `ENDPOINTS` as `kubectl get endpoints` prints it: up to three
/// `ip:port`, then how many more.
pub fn endpoints_column(ep: &Value) -> String {
    let mut all = Vec::new();
    for s in ep["subsets"].as_array().into_iter().flatten() {
        for a in s["addresses"].as_array().into_iter().flatten() {
            for p in s["ports"].as_array().into_iter().flatten() {
                all.push(format!("{}:{}", a["ip"].as_str().unwrap_or(""), p["port"]));
            }
        }
    }
    match all.len() {
        0 => "<none>".into(),
        n if n <= 3 => all.join(","),
        n => format!("{} + {} more...", all[..3].join(","), n - 3),
    }
}

/// What `svc` routes to, by its `Endpoints` `ep`: its address and, for
/// each TCP or UDP port, the ready endpoints' addresses and resolved
/// ports. `None` for a service without an address (headless).
pub fn route_of(svc: &Value, ep: &Value) -> Option<(Ipv4Addr, Vec<RoutePort>)> {
    let address: Ipv4Addr = svc.pointer("/spec/clusterIP")?.as_str()?.parse().ok()?;
    if !is_service_address(address) {
        return None;
    }
    let subsets = ep["subsets"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ports = svc.pointer("/spec/ports").and_then(Value::as_array)?;
    let routes = ports
        .iter()
        .filter_map(|p| {
            let protocol = match p["protocol"].as_str().unwrap_or("TCP") {
                "TCP" => RouteProtocol::Tcp,
                "UDP" => RouteProtocol::Udp,
                _ => return None,
            };
            let port = u16::try_from(p["port"].as_u64()?).ok()?;
            let name = p["name"].as_str().unwrap_or("");
            let mut backends: Vec<Backend> = subsets
                .iter()
                .flat_map(|subset| {
                    let target = subset["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|sp| sp["name"].as_str().unwrap_or("") == name)
                        .and_then(|sp| u16::try_from(sp["port"].as_u64()?).ok());
                    let ready = subset["addresses"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    ready.iter().filter_map(move |a| {
                        Some(Backend {
                            address: a["ip"].as_str()?.parse().ok()?,
                            port: target?,
                        })
                    })
                })
                .collect();
            backends.sort_by_key(|b| (b.address, b.port));
            backends.dedup();
            backends.truncate(service_route::MAX_BACKENDS);
            Some(RoutePort {
                protocol,
                port,
                backends,
            })
        })
        .collect();
    Some((address, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    #[test]
    fn addresses_come_from_the_range_once_each_and_stay() {
        let mut a = svc(json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}));
        prepare_create(&mut a, &HashSet::new()).unwrap();
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        let taken = HashSet::from([Ipv4Addr::new(10, 96, 0, 1)]);
        let mut b = svc(json!({"ports": [{"port": 80}]}));
        prepare_create(&mut b, &taken).unwrap();
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.2");
        let mut dup = svc(json!({"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}));
        assert!(prepare_create(&mut dup, &taken)
            .unwrap_err()
            .message
            .contains("already allocated"));
        let mut outside = svc(json!({"clusterIP": "192.168.1.1"}));
        assert!(prepare_create(&mut outside, &taken).is_err());
        let mut headless = svc(json!({"clusterIP": "None"}));
        prepare_create(&mut headless, &taken).unwrap();
        assert_eq!(headless["spec"]["clusterIP"], "None");
        let mut moved = a.clone();
        moved["spec"]["clusterIP"] = json!("10.96.0.9");
        assert!(prepare_update(&a, &mut moved)
            .unwrap_err()
            .message
            .contains("immutable"));
        let mut omitted = a.clone();
        omitted["spec"].as_object_mut().unwrap().remove("clusterIP");
        prepare_update(&a, &mut omitted).unwrap();
        assert_eq!(omitted["spec"]["clusterIP"], "10.96.0.1");
    }

    #[test]
    fn what_a_tenant_cluster_cannot_give_is_refused() {
        for spec in [
            json!({"type": "NodePort", "ports": [{"port": 80}]}),
            json!({"type": "LoadBalancer"}),
            json!({"ports": [{"port": 0}]}),
            json!({"ports": [{"port": 70000}]}),
            json!({"ports": [{"port": 80, "protocol": "SCTP"}]}),
            json!({"ports": [{"port": 80, "targetPort": -1}]}),
            json!({"ports": [{"port": 80, "name": "a"}, {"port": 81, "name": "a"}]}),
            json!({"selector": {"app": 7}}),
        ] {
            let mut s = svc(spec.clone());
            let e = prepare_create(&mut s, &HashSet::new()).unwrap_err();
            assert_eq!(e.code, 422, "{spec}");
        }
        let many: Vec<Value> = (1..=101)
            .map(|p| json!({"port": p, "name": format!("p{p}")}))
            .collect();
        let mut s = svc(json!({"ports": many}));
        assert!(prepare_create(&mut s, &HashSet::new()).is_err());
    }

    #[test]
    fn endpoints_list_the_selected_pods_by_readiness_with_named_ports_resolved() {
        let mut s = svc(json!({"selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}));
        prepare_create(&mut s, &HashSet::new()).unwrap();
        let pod = |name: &str, app: &str, ip: &str, ready: bool| {
            json!({"metadata": {"name": name, "namespace": "default", "uid": name,
                                "labels": {"app": app}},
                   "spec": {"containers": [{"name": "main",
                       "ports": [{"name": "web", "containerPort": 8080}]}]},
                   "status": {"podIP": ip, "containerStatuses": [{"ready": ready}]}})
        };
        let pods = [
            pod("a", "web", "10.1.0.2", true),
            pod("b", "web", "10.1.0.6", false),
            pod("c", "db", "10.1.0.10", true),
        ];
        let ep = endpoints_of(&s, &pods);
        let subset = &ep["subsets"][0];
        assert_eq!(subset["addresses"][0]["ip"], "10.1.0.2");
        assert_eq!(subset["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(subset["notReadyAddresses"][0]["ip"], "10.1.0.6");
        assert_eq!(
            subset["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        assert_eq!(ep["subsets"].as_array().unwrap().len(), 1);
        assert_eq!(endpoints_column(&ep), "10.1.0.2:8080");
        assert_eq!(ports_column(&s), "80/TCP");

        // Its route: the address's port to the ready pod's resolved port.
        let (address, ports) = route_of(&s, &ep).unwrap();
        assert_eq!(address, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(ports.len(), 1);
        assert_eq!((ports[0].protocol, ports[0].port), (RouteProtocol::Tcp, 80));
        let backends: Vec<(Ipv4Addr, u16)> = ports[0]
            .backends
            .iter()
            .map(|b| (b.address, b.port))
            .collect();
        assert_eq!(backends, [(Ipv4Addr::new(10, 1, 0, 2), 8080)]);
        // Without endpoints it still routes, to nothing: refused, not lost.
        assert!(route_of(&s, &Value::Null).unwrap().1[0].backends.is_empty());
        let mut headless = s.clone();
        headless["spec"]["clusterIP"] = json!("None");
        assert!(route_of(&headless, &ep).is_none());
    }
}
