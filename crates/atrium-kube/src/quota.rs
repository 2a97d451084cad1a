//! ResourceQuotas of a namespace: what its objects use, against each
//! quota's `spec.hard`, as upstream's quota admission counts it — object
//! counts (`pods`, `services`, `configmaps`, `secrets`, `count/<plural>`
//! and `count/<plural>.<group>`) and the pods' compute (`requests.cpu`
//! or `cpu`, `requests.memory` or `memory`, `limits.cpu`,
//! `limits.memory`, `requests.nvidia.com/gpu`). Amounts are kept in
//! whole units of their kind: millicores, bytes, counts.
//!
//! A tenant cluster's quotas bound the tenant within its own cluster;
//! what it may use of the fleet is its Atrium quota, enforced apart.

use std::collections::BTreeMap;

use atrium_core::quantity::{ByteSize, CpuMillis};
use serde_json::{json, Value};

use crate::resource::ResourceType;
use crate::KubeError;

/// Amounts by quota resource name.
pub type Amounts = BTreeMap<String, u64>;

/// How a quota resource's amounts are read and written.
#[derive(Clone, Copy)]
enum Unit {
    Millicores,
    Bytes,
    Count,
}

fn unit_of(resource: &str) -> Unit {
    match resource {
        "cpu" | "requests.cpu" | "limits.cpu" => Unit::Millicores,
        "memory" | "requests.memory" | "limits.memory" => Unit::Bytes,
        _ => Unit::Count,
    }
}

fn parse(resource: &str, v: &Value) -> Option<u64> {
    match unit_of(resource) {
        Unit::Millicores => crate::parse_quantity::<CpuMillis>(v).ok().map(|c| c.0),
        Unit::Bytes => crate::parse_quantity::<ByteSize>(v).ok().map(|b| b.0),
        Unit::Count => crate::parse_quantity(v).ok(),
    }
}

fn show(resource: &str, amount: u64) -> String {
    match unit_of(resource) {
        Unit::Millicores if amount.is_multiple_of(1000) => (amount / 1000).to_string(),
        Unit::Millicores => format!("{amount}m"),
        Unit::Bytes => ByteSize(amount).to_string(),
        Unit::Count => amount.to_string(),
    }
}

/// A quota's `spec.hard`, read; an amount that is no quantity is refused.
pub fn hard(quota: &Value) -> Result<Amounts, KubeError> {
    let name = quota["metadata"]["name"].as_str().unwrap_or_default();
    let mut out = Amounts::new();
    for (k, v) in quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let amount = parse(k, v).ok_or_else(|| {
            KubeError::invalid(
                "ResourceQuota",
                name,
                format!("spec.hard[{k}]: {v} is not a quantity"),
            )
        })?;
        out.insert(k.clone(), amount);
    }
    Ok(out)
}

/// The pod's compute, summed over its containers.
fn pod_compute(pod: &Value, out: &mut Amounts) {
    let mut add = |key: &str, v: u64| {
        let e = out.entry(key.to_string()).or_default();
        *e = e.saturating_add(v);
    };
    for c in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for (kind, prefix) in [("requests", "requests."), ("limits", "limits.")] {
            for res in ["cpu", "memory", "nvidia.com/gpu"] {
                let key = format!("{prefix}{res}");
                let given = c.pointer(&format!("/resources/{kind}/{}", res.replace('/', "~1")));
                if let Some(n) = given.and_then(|v| parse(&key, v)) {
                    add(&key, n);
                    if kind == "requests" && res != "nvidia.com/gpu" {
                        add(res, n);
                    }
                }
            }
        }
    }
}

/// What one object of type `r` adds to its namespace's usage.
pub fn usage_of(r: &ResourceType, obj: &Value) -> Amounts {
    let mut out = Amounts::new();
    let count = if r.group.is_empty() {
        format!("count/{}", r.plural)
    } else {
        format!("count/{}.{}", r.plural, r.group)
    };
    out.insert(count, 1);
    if r.group.is_empty()
        && matches!(
            r.plural.as_ref(),
            "pods" | "services" | "configmaps" | "secrets"
        )
    {
        out.insert(r.plural.to_string(), 1);
    }
    if r.builtin_kind() == "Pod" {
        pod_compute(obj, &mut out);
    }
    out
}

/// Sums amounts.
pub fn add(total: &mut Amounts, more: &Amounts) {
    for (k, v) in more {
        let e = total.entry(k.clone()).or_default();
        *e = e.saturating_add(*v);
    }
}

/// Admits `adding` on top of `used` under quota `name`'s `hard`, or says
/// the numbers, as upstream: `exceeded quota: q, requested: pods=1,
/// used: pods=2, limited: pods=2`.
pub fn admit(name: &str, hard: &Amounts, used: &Amounts, adding: &Amounts) -> Result<(), String> {
    let over: Vec<&String> = adding
        .iter()
        .filter(|(k, v)| {
            hard.get(*k)
                .is_some_and(|h| used.get(*k).copied().unwrap_or(0).saturating_add(**v) > *h)
        })
        .map(|(k, _)| k)
        .collect();
    if over.is_empty() {
        return Ok(());
    }
    let list = |m: &Amounts| {
        over.iter()
            .map(|k| format!("{k}={}", show(k, m.get(*k).copied().unwrap_or(0))))
            .collect::<Vec<_>>()
            .join(",")
    };
    Err(format!(
        "{name}, requested: {}, used: {}, limited: {}",
        list(adding),
        list(used),
        list(hard)
    ))
}

/// A quota's `status`: its hard amounts and what the namespace uses of
/// them.
pub fn status(hard: &Amounts, used: &Amounts) -> Value {
    let shown = |m: &Amounts, only: &Amounts| -> Value {
        only.keys()
            .map(|k| (k.clone(), json!(show(k, m.get(k).copied().unwrap_or(0)))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({"hard": shown(hard, hard), "used": shown(used, hard)})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find;

    fn pod(cpu: &str, memory: &str) -> Value {
        json!({"spec": {"containers": [{"name": "main", "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"cpu": cpu, "memory": memory}}}]}})
    }

    #[test]
    fn pods_count_and_carry_their_compute() {
        let pods = find("", "v1", "pods").unwrap();
        let u = usage_of(pods, &pod("250m", "64Mi"));
        assert_eq!(u["pods"], 1);
        assert_eq!(u["count/pods"], 1);
        assert_eq!(u["requests.cpu"], 250);
        assert_eq!(u["cpu"], 250);
        assert_eq!(u["limits.memory"], 64 << 20);
        let deploys = find("apps", "v1", "deployments").unwrap();
        assert_eq!(usage_of(deploys, &json!({}))["count/deployments.apps"], 1);
    }

    #[test]
    fn a_quota_refuses_what_would_pass_it_with_upstreams_numbers() {
        let q = json!({"metadata": {"name": "small"},
            "spec": {"hard": {"pods": "2", "requests.cpu": "500m", "limits.memory": "1Gi"}}});
        let hard = hard(&q).unwrap();
        let pods = find("", "v1", "pods").unwrap();
        let mut used = Amounts::new();
        add(&mut used, &usage_of(pods, &pod("250m", "64Mi")));
        assert_eq!(
            admit("small", &hard, &used, &usage_of(pods, &pod("250m", "64Mi"))),
            Ok(())
        );
        add(&mut used, &usage_of(pods, &pod("250m", "64Mi")));
        let e = admit("small", &hard, &used, &usage_of(pods, &pod("100m", "64Mi"))).unwrap_err();
        assert_eq!(
            e,
            "small, requested: pods=1,requests.cpu=100m, used: pods=2,requests.cpu=500m, limited: pods=2,requests.cpu=500m"
        );
        let s = status(&hard, &used);
        assert_eq!(s["used"]["pods"], "2");
        assert_eq!(s["hard"]["requests.cpu"], "500m");
        let bad = json!({"metadata": {"name": "x"}, "spec": {"hard": {"pods": "many"}}});
        assert_eq!(super::hard(&bad).unwrap_err().code, 422);
    }
}
