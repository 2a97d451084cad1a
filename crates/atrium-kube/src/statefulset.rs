//! StatefulSets, as a pure plan: pods with stable names `<set>-<ordinal>`,
//! made in order, each only once the ones before it are ready
//! (`OrderedReady`, the default) or all at once (`Parallel`); removed
//! from the highest ordinal down; and, on a new template, replaced one at
//! a time from the highest ordinal down to the `partition`
//! (`RollingUpdate`) or left until deleted (`OnDelete`). The control
//! plane's `statefulsets` module carries each step out.

use serde_json::Value;

use crate::KubeError;

/// One pod of the set as it is: its ordinal, whether it is ready, and
/// whether it runs the current template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub ordinal: u32,
    pub ready: bool,
    pub updated: bool,
}

/// How the set is asked to behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub replicas: u32,
    pub parallel: bool,
    /// `None` for `OnDelete`: pods keep their template until deleted.
    pub partition: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Create(u32),
    Delete(u32),
}

/// The policy a set's spec asks for, refusing what is not served.
pub fn policy(sts: &Value) -> Result<Policy, KubeError> {
    let name = sts
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let invalid = |why: &str| KubeError::invalid("StatefulSet", name, why);
    let spec = &sts["spec"];
    if spec
        .get("volumeClaimTemplates")
        .and_then(Value::as_array)
        .is_some_and(|v| !v.is_empty())
    {
        return Err(invalid(
            "spec.volumeClaimTemplates: Forbidden: persistent volume claims are not served in tenant clusters yet",
        ));
    }
    let replicas = match &spec["replicas"] {
        Value::Null => 1,
        v => v
            .as_u64()
            .filter(|n| *n <= 1000)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid("spec.replicas: must be 0 to 1000"))?,
    };
    let parallel = match spec["podManagementPolicy"]
        .as_str()
        .unwrap_or("OrderedReady")
    {
        "OrderedReady" => false,
        "Parallel" => true,
        other => {
            return Err(invalid(&format!(
                "spec.podManagementPolicy: Unsupported value: {other:?}"
            )))
        }
    };
    let strategy = &spec["updateStrategy"];
    let partition = match strategy["type"].as_str().unwrap_or("RollingUpdate") {
        "RollingUpdate" => Some(
            strategy
                .pointer("/rollingUpdate/partition")
                .map_or(Some(0), Value::as_u64)
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| {
                    invalid("spec.updateStrategy.rollingUpdate.partition: must be a whole number")
                })?,
        ),
        "OnDelete" => None,
        other => {
            return Err(invalid(&format!(
                "spec.updateStrategy.type: Unsupported value: {other:?}"
            )))
        }
    };
    Ok(Policy {
        replicas,
        parallel,
        partition,
    })
}

/// What to do next. Ordered sets take one step per pass, and only from a
/// ready state; parallel ones make and remove all at once but still
/// replace one pod at a time.
pub fn plan(policy: &Policy, members: &[Member]) -> Vec<Step> {
    let member = |i: u32| members.iter().find(|m| m.ordinal == i);
    let mut steps = Vec::new();
    // Past the replica count, highest first.
    let mut excess: Vec<u32> = members
        .iter()
        .map(|m| m.ordinal)
        .filter(|o| *o >= policy.replicas)
        .collect();
    excess.sort_unstable_by(|a, b| b.cmp(a));
    for i in 0..policy.replicas {
        match member(i) {
            None => {
                steps.push(Step::Create(i));
                if !policy.parallel {
                    return steps;
                }
            }
            Some(m) if !m.ready && !policy.parallel => return steps,
            Some(_) => {}
        }
    }
    if !excess.is_empty() {
        if policy.parallel {
            steps.extend(excess.into_iter().map(Step::Delete));
        } else if steps.is_empty() {
            steps.push(Step::Delete(excess[0]));
        }
        return steps;
    }
    if !steps.is_empty() {
        return steps;
    }
    // Every pod there: replace the highest outdated one at or above the
    // partition, once all are ready.
    let Some(partition) = policy.partition else {
        return steps;
    };
    if members.iter().any(|m| !m.ready) {
        return steps;
    }
    if let Some(m) = members
        .iter()
        .filter(|m| !m.updated && m.ordinal >= partition && m.ordinal < policy.replicas)
        .max_by_key(|m| m.ordinal)
    {
        steps.push(Step::Delete(m.ordinal));
    }
    steps
}

/// The ordinal in a member pod's name `<set>-<ordinal>`.
pub fn ordinal_of(set: &str, pod: &str) -> Option<u32> {
    let rest = pod.strip_prefix(set)?.strip_prefix('-')?;
    if rest.len() > 1 && rest.starts_with('0') {
        return None;
    }
    rest.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(ordinal: u32, ready: bool, updated: bool) -> Member {
        Member {
            ordinal,
            ready,
            updated,
        }
    }

    const ORDERED: Policy = Policy {
        replicas: 3,
        parallel: false,
        partition: Some(0),
    };

    #[test]
    fn ordered_sets_grow_one_ready_pod_at_a_time() {
        assert_eq!(plan(&ORDERED, &[]), [Step::Create(0)]);
        assert_eq!(plan(&ORDERED, &[m(0, false, true)]), []);
        assert_eq!(plan(&ORDERED, &[m(0, true, true)]), [Step::Create(1)]);
        let all = [m(0, true, true), m(1, true, true), m(2, true, true)];
        assert_eq!(plan(&ORDERED, &all), []);
        let parallel = Policy {
            parallel: true,
            ..ORDERED
        };
        assert_eq!(
            plan(&parallel, &[m(1, false, true)]),
            [Step::Create(0), Step::Create(2)]
        );
    }

    #[test]
    fn they_shrink_from_the_top_and_roll_from_the_top_down_to_the_partition() {
        let five = [
            m(0, true, true),
            m(1, true, true),
            m(2, true, true),
            m(3, true, true),
            m(4, true, true),
        ];
        assert_eq!(plan(&ORDERED, &five), [Step::Delete(4)]);
        let stale = [m(0, true, false), m(1, true, false), m(2, true, false)];
        assert_eq!(plan(&ORDERED, &stale), [Step::Delete(2)]);
        let rolling = [m(0, true, false), m(1, true, false), m(2, false, true)];
        assert_eq!(plan(&ORDERED, &rolling), [], "waits for the new pod");
        let partitioned = Policy {
            partition: Some(2),
            ..ORDERED
        };
        let below = [m(0, true, false), m(1, true, false), m(2, true, true)];
        assert_eq!(plan(&partitioned, &below), []);
        let on_delete = Policy {
            partition: None,
            ..ORDERED
        };
        assert_eq!(plan(&on_delete, &stale), []);
    }

    #[test]
    fn specs_are_read_and_what_is_not_served_refused() {
        let p = policy(&json!({"metadata": {"name": "db"}, "spec": {"replicas": 3,
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}}}))
        .unwrap();
        assert_eq!(
            p,
            Policy {
                replicas: 3,
                parallel: false,
                partition: Some(1)
            }
        );
        for bad in [
            json!({"replicas": 5000}),
            json!({"podManagementPolicy": "Sometimes"}),
            json!({"volumeClaimTemplates": [{"metadata": {"name": "data"}}]}),
        ] {
            let e = policy(&json!({"metadata": {"name": "db"}, "spec": bad})).unwrap_err();
            assert_eq!(e.code, 422, "{}", e.message);
        }
        assert_eq!(ordinal_of("db", "db-12"), Some(12));
        assert_eq!(ordinal_of("db", "db-012"), None);
        assert_eq!(ordinal_of("db", "dbx-1"), None);
        assert_eq!(ordinal_of("db", "db-1-2"), None);
    }
}
