//! `atrium.dev/v1 InferenceService`: a model served to the tenant through
//! its OpenAI-compatible gateway, declared in a tenant cluster. Each one
//! is an Atrium deployment of the cluster's tenant named
//! `<name>.<namespace>.<cluster>` — the `model` a client asks the gateway
//! for, and a name no tenant can give (tenants' names have no dots) — so
//! it is admitted like any deployment: the tenant's quota, its models and
//! the public catalogue, its residency. Its status comes back from the
//! deployment's.
//!
//! ```yaml
//! apiVersion: atrium.dev/v1
//! kind: InferenceService
//! metadata: {name: chat}
//! spec:
//!   model: smollm2          # a model of the tenant's, or a public one
//!   engine: embedded        # embedded (default), llama-cpp, vllm, sglang or simulated
//!   replicas: 1             # or {min: 0, max: 3, targetInFlight: 8,
//!                           #     scaleDownDelaySeconds: 60}
//!   resources: {cpu: "1", memory: 2Gi, gpu: "1"}   # 1 CPU, 1Gi by default
//! ```

use atrium_core::deployment::{DeploymentSpec, EngineKind, Replicas, Resources, SamplingDefaults};
use atrium_core::lifecycle::{LifecycleState, Status};
use atrium_core::quantity::{ByteSize, CpuMillis};
use serde_json::{json, Value};

use crate::KubeError;

pub const GROUP: &str = "atrium.dev";

fn invalid(isvc: &Value, why: impl Into<String>) -> KubeError {
    let name = isvc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    KubeError::invalid("InferenceService", name, why)
}

/// The Atrium deployment (and gateway `model`) of an inference service.
pub fn deployment_name(name: &str, namespace: &str, cluster: &str) -> String {
    format!("{name}.{namespace}.{cluster}")
}

/// Reads a quantity (`"250m"`, `2Gi`, `1`) into an Atrium quantity.
fn quantity<T: std::str::FromStr>(isvc: &Value, field: &str) -> Result<Option<T>, KubeError>
where
    T::Err: std::fmt::Display,
{
    match isvc.pointer(&format!("/spec/resources/{field}")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => crate::parse_quantity(v)
            .map(Some)
            .map_err(|e| invalid(isvc, format!("spec.resources.{field}: {e}"))),
    }
}

/// The deployment an inference service is.
pub fn deployment_of(isvc: &Value) -> Result<DeploymentSpec, KubeError> {
    let spec = &isvc["spec"];
    let model = spec["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid(isvc, "spec.model: Required value: the model to serve"))?
        .to_string();
    let engine = match spec["engine"].as_str().unwrap_or("embedded") {
        "embedded" => EngineKind::Embedded,
        "vllm" => EngineKind::Vllm,
        "llama-cpp" => EngineKind::LlamaCpp,
        "sglang" => EngineKind::Sglang,
        "simulated" => EngineKind::Simulated,
        other => {
            return Err(invalid(
                isvc,
                format!("spec.engine: Unsupported value: {other:?}: supported values: \"embedded\", \"llama-cpp\", \"vllm\", \"sglang\", \"simulated\""),
            ))
        }
    };
    let replicas = match &spec["replicas"] {
        Value::Null => Replicas::fixed(1),
        Value::Number(n) => {
            let n = n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| invalid(isvc, "spec.replicas: must be a whole number"))?;
            Replicas::fixed(n)
        }
        Value::Object(r) => {
            let bound = |k: &str| {
                r.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        invalid(
                            isvc,
                            format!("spec.replicas.{k}: Required value: a whole number"),
                        )
                    })
            };
            let optional = |k: &str| match r.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => bound(k).map(Some),
            };
            Replicas {
                min: bound("min")?,
                max: bound("max")?,
                target_in_flight: optional("targetInFlight")?,
                scale_down_delay_seconds: optional("scaleDownDelaySeconds")?,
            }
        }
        _ => {
            return Err(invalid(
                isvc,
                "spec.replicas: a number, or {min, max, targetInFlight, scaleDownDelaySeconds}",
            ))
        }
    };
    let resources = Resources {
        cpu: quantity(isvc, "cpu")?.unwrap_or(CpuMillis(1000)),
        memory: quantity(isvc, "memory")?.unwrap_or(ByteSize(1 << 30)),
        gpu: quantity(isvc, "gpu")?,
        gpu_memory: quantity::<ByteSize>(isvc, "gpuMemory")?,
        gpu_models: Vec::new(),
        storage: ByteSize::default(),
    };
    let sites = spec["sites"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let sampling_field = |field: &str| match isvc.pointer(&format!("/spec/sampling/{field}")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(isvc, format!("spec.sampling.{field}: must be a number"))),
    };
    let max_tokens = match isvc.pointer("/spec/sampling/maxTokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    invalid(isvc, "spec.sampling.maxTokens: must be a positive integer")
                })?,
        ),
    };
    let sampling = SamplingDefaults {
        temperature: sampling_field("temperature")?,
        top_p: sampling_field("topP")?,
        presence_penalty: sampling_field("presencePenalty")?,
        frequency_penalty: sampling_field("frequencyPenalty")?,
        max_tokens,
    };
    let deployment = DeploymentSpec {
        model,
        engine,
        resources,
        replicas,
        sites,
        preferred_sites: Vec::new(),
        external_url: None,
        sampling,
    };
    deployment
        .validate()
        .map_err(|e| invalid(isvc, format!("spec: {e}")))?;
    Ok(deployment)
}

/// The service's `status`: `Err` when its deployment could not be made
/// (the reason), else the deployment's state.
pub fn status_of(deployment: Result<&Status, &str>, model: &str, generation: i64) -> Value {
    let (ready, state, reason) = match deployment {
        Err(why) => (false, "Failed".to_string(), why.to_string()),
        Ok(s) => (
            s.state == LifecycleState::Running,
            format!("{:?}", s.state),
            s.reason.clone(),
        ),
    };
    json!({
        "observedGeneration": generation,
        "model": model,
        "state": state,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "reason": state, "message": reason}],
    })
}

/// The OpenAPI schema served for the kind (it has no upstream type).
pub fn schema() -> Value {
    let string = |d: &str| json!({"type": "string", "description": d});
    json!({
        "description": "InferenceService serves a model through the tenant's OpenAI-compatible gateway, as an Atrium deployment of the tenant.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": string("APIVersion defines the versioned schema of this representation of an object."),
            "kind": string("Kind is a string value representing the REST resource this object represents."),
            "metadata": {"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}],
                         "description": "Standard object's metadata."},
            "spec": {
                "description": "What to serve, with what, and how many replicas.",
                "type": "object",
                "required": ["model"],
                "properties": {
                    "model": string("A model of the tenant's, or of the public catalogue."),
                    "engine": string("embedded (default), llama-cpp, vllm, sglang or simulated."),
                    "replicas": {"description": "A number of replicas, or {min, max, targetInFlight, scaleDownDelaySeconds}: scaled by requests in flight per replica; min 0 scales to zero when idle.",
                                 "x-kubernetes-int-or-string": true},
                    "resources": {"description": "What each replica needs: cpu, memory, gpu, gpuMemory (quantities).",
                                  "type": "object", "additionalProperties": {"type": "string"}},
                    "sites": {"description": "Sites the replicas may run in; any permitted site when empty.",
                              "type": "array", "items": {"type": "string"}},
                    "sampling": {"description": "What requests that leave them out get: temperature (0 to 2), topP (above 0, at most 1), presencePenalty and frequencyPenalty (-2 to 2), maxTokens (the most tokens an answer gets when its request sets no bound).",
                                 "type": "object",
                                 "properties": {"temperature": {"type": "number"}, "topP": {"type": "number"},
                                                "presencePenalty": {"type": "number"}, "frequencyPenalty": {"type": "number"},
                                                "maxTokens": {"type": "integer"}}},
                },
            },
            "status": {
                "description": "What the deployment is doing.",
                "type": "object",
                "properties": {
                    "model": string("The model name a client asks the gateway for."),
                    "state": string("The deployment's state."),
                    "observedGeneration": {"type": "integer", "format": "int64"},
                    "conditions": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isvc(spec: Value) -> Value {
        json!({"apiVersion": "atrium.dev/v1", "kind": "InferenceService",
               "metadata": {"name": "chat", "namespace": "default"}, "spec": spec})
    }

    #[test]
    fn a_service_is_a_deployment_of_its_model() {
        let d = deployment_of(&isvc(json!({"model": "smollm2", "replicas": 2,
            "resources": {"cpu": "250m", "memory": "128Mi"}})))
        .unwrap();
        assert_eq!(d.model, "smollm2");
        assert_eq!(d.engine, EngineKind::Embedded);
        assert_eq!((d.replicas.min, d.replicas.max), (2, 2));
        assert_eq!(d.resources.cpu.0, 250);
        assert_eq!(d.resources.memory.0, 128 << 20);
        let ranged = deployment_of(&isvc(json!({"model": "m", "engine": "simulated",
            "replicas": {"min": 1, "max": 3}})))
        .unwrap();
        assert_eq!((ranged.replicas.min, ranged.replicas.max), (1, 3));
        assert_eq!(ranged.replicas.target_in_flight, None);
        let scaled = deployment_of(&isvc(json!({"model": "m", "engine": "simulated",
            "replicas": {"min": 0, "max": 3, "targetInFlight": 2, "scaleDownDelaySeconds": 30}})))
        .unwrap();
        assert_eq!(scaled.replicas.target_in_flight, Some(2));
        assert_eq!(scaled.replicas.scale_down_delay_seconds, Some(30));
        let tuned = deployment_of(&isvc(json!({"model": "m",
            "sampling": {"temperature": 0.2, "topP": 0.9}})))
        .unwrap();
        assert_eq!(
            (tuned.sampling.temperature, tuned.sampling.top_p),
            (Some(0.2), Some(0.9))
        );
        assert_eq!(
            deployment_name("chat", "default", "dev"),
            "chat.default.dev"
        );
    }

    #[test]
    fn what_a_deployment_may_not_be_is_refused_by_field() {
        for (spec, field) in [
            (json!({}), "spec.model"),
            (json!({"model": "m", "engine": "external"}), "spec.engine"),
            (json!({"model": "m", "engine": "container"}), "spec.engine"),
            (json!({"model": "m", "replicas": -1}), "spec.replicas"),
            (json!({"model": "m", "replicas": 5000}), "spec"),
            (
                json!({"model": "m", "replicas": {"min": 0, "max": 2, "targetInFlight": -1}}),
                "spec.replicas.targetInFlight",
            ),
            (
                json!({"model": "m", "replicas": {"min": 0, "max": 2, "targetInFlight": 0}}),
                "replicas.target_in_flight",
            ),
            (
                json!({"model": "m", "resources": {"cpu": "lots"}}),
                "spec.resources.cpu",
            ),
            (
                json!({"model": "m", "sampling": {"temperature": "hot"}}),
                "spec.sampling.temperature",
            ),
            (
                json!({"model": "m", "sampling": {"topP": 2}}),
                "sampling.top_p",
            ),
        ] {
            let e = deployment_of(&isvc(spec.clone())).unwrap_err();
            assert_eq!(e.code, 422, "{spec}");
            assert!(e.message.contains(field), "{spec}: {}", e.message);
        }
    }

    #[test]
    fn status_says_ready_only_when_running() {
        let running = Status::new(LifecycleState::Running, "2 of 2 replicas running");
        let s = status_of(Ok(&running), "chat.default.dev", 3);
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["model"], "chat.default.dev");
        assert_eq!(s["observedGeneration"], 3);
        let refused = status_of(Err("quota exceeded for gpus"), "chat.default.dev", 1);
        assert_eq!(refused["conditions"][0]["status"], "False");
        assert_eq!(
            refused["conditions"][0]["message"],
            "quota exceeded for gpus"
        );
    }
}
