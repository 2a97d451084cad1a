//! Deployments: a tenant's desired state for serving one model — which
//! engine, what each replica needs, how many replicas, and where.

use serde::{Deserialize, Serialize};

use crate::quantity::{ByteSize, CpuMillis, GpuMilli, GpuRequest};
use crate::quota::ResourceUsage;
use crate::FieldErrors;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Atrium's own candle engine, run by the agent.
    Embedded,
    /// A simulated engine with configurable latency, for load tests.
    Simulated,
    /// llama.cpp's OpenAI-compatible server (llama-cpp-python), run by
    /// the agent on a GGUF model, CPU or GPU.
    #[serde(rename = "llama-cpp")]
    LlamaCpp,
    /// vLLM, run by the agent on a GPU node.
    Vllm,
    /// SGLang, run by the agent on a GPU node.
    Sglang,
    /// An existing OpenAI-compatible URL; nothing is run.
    External,
    /// A tenant's OCI image, run by the agent with runc: what a workload's
    /// replicas run. A deployment may not name it.
    Container,
}

/// What each replica needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[schema(value_type = String, example = "2")]
    pub cpu: CpuMillis,
    #[schema(value_type = String, example = "4Gi")]
    pub memory: ByteSize,
    /// Whole GPUs (`"2"`), a fraction of one (`"0.5"`) or a MIG profile
    /// (`"3g.40gb"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1")]
    pub gpu: Option<GpuRequest>,
    /// GPU memory needed, per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "40Gi")]
    pub gpu_memory: Option<ByteSize>,
    /// Acceptable GPU models (any of them); any model when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_models: Vec<String>,
    /// Local scratch storage.
    #[serde(default)]
    #[schema(value_type = String, example = "10Gi")]
    pub storage: ByteSize,
}

/// How many replicas run: between `min` and `max`, as many as the
/// requests in flight need at `target_in_flight` each (Knative/KServe's
/// concurrency autoscaling). With `min: 0` an idle deployment scales to
/// zero and the gateway holds the next request while a replica starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    pub min: u32,
    pub max: u32,
    /// Requests in flight per replica the autoscaler aims at (1 to
    /// 10,000; 8 when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_in_flight: Option<u32>,
    /// How long load must stay low before replicas are removed — to
    /// zero, with `min: 0` (1 to 86,400 seconds; 60 when left out).
    /// Scaling up never waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_delay_seconds: Option<u32>,
}

/// Requests in flight per replica when a deployment does not say.
pub const DEFAULT_TARGET_IN_FLIGHT: u32 = 8;
/// Seconds of low load before scaling down, when a deployment does not say.
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u32 = 60;
const MAX_TARGET_IN_FLIGHT: u32 = 10_000;
const MAX_SCALE_DOWN_DELAY_SECONDS: u32 = 86_400;

impl Replicas {
    /// Exactly `n` replicas, never scaled.
    pub fn fixed(n: u32) -> Replicas {
        Replicas {
            min: n,
            max: n,
            target_in_flight: None,
            scale_down_delay_seconds: None,
        }
    }

    pub fn target_in_flight(&self) -> u32 {
        self.target_in_flight.unwrap_or(DEFAULT_TARGET_IN_FLIGHT)
    }

    pub fn scale_down_delay_seconds(&self) -> u32 {
        self.scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECONDS)
    }

    /// The replicas a deployment runs before the autoscaler has said:
    /// its minimum, but at least one, so a new deployment shows it can
    /// start (Knative's initial scale) before it may idle to zero.
    pub fn initial(&self) -> u32 {
        self.min.max(1).min(self.max)
    }

    fn validate(&self, errors: &mut FieldErrors) {
        if self.max == 0 {
            errors.push("replicas.max", "must be at least 1");
        }
        if self.min > self.max {
            errors.push(
                "replicas.min",
                format!("{} is more than replicas.max {}", self.min, self.max),
            );
        }
        if self.max > MAX_REPLICAS {
            errors.push("replicas.max", format!("must be at most {MAX_REPLICAS}"));
        }
        if let Some(t) = self
            .target_in_flight
            .filter(|t| !(1..=MAX_TARGET_IN_FLIGHT).contains(t))
        {
            errors.push(
                "replicas.target_in_flight",
                format!("{t} is outside 1 to {MAX_TARGET_IN_FLIGHT}"),
            );
        }
        if let Some(s) = self
            .scale_down_delay_seconds
            .filter(|s| !(1..=MAX_SCALE_DOWN_DELAY_SECONDS).contains(s))
        {
            errors.push(
                "replicas.scale_down_delay_seconds",
                format!("{s} is outside 1 to {MAX_SCALE_DOWN_DELAY_SECONDS}"),
            );
        }
    }
}

/// What a chat or completion request that leaves a field out (or sends it
/// as `null`) is given, as vLLM takes a model's generation config: a small
/// model sampled at OpenAI's default temperature of 1 rambles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    /// 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Above 0, at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// -2 to 2, as OpenAI defines them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// The most tokens an answer gets when its request sets no bound
    /// (`max_tokens`, `max_completion_tokens`, a response's
    /// `max_output_tokens`); 1 to 1,048,576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

/// The largest `sampling.max_tokens` a deployment may set.
pub const MAX_DEFAULT_MAX_TOKENS: u32 = 1 << 20;

impl SamplingDefaults {
    pub fn is_empty(&self) -> bool {
        *self == SamplingDefaults::default()
    }

    fn validate(&self, errors: &mut FieldErrors) {
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                errors.push("sampling.temperature", format!("{t} is outside 0 to 2"));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                errors.push("sampling.top_p", format!("{p} is outside (0, 1]"));
            }
        }
        let penalties = [
            ("sampling.presence_penalty", self.presence_penalty),
            ("sampling.frequency_penalty", self.frequency_penalty),
        ];
        for (field, penalty) in penalties {
            if let Some(p) = penalty.filter(|p| !(-2.0..=2.0).contains(p)) {
                errors.push(field, format!("{p} is outside -2 to 2"));
            }
        }
        if let Some(m) = self
            .max_tokens
            .filter(|m| !(1..=MAX_DEFAULT_MAX_TOKENS).contains(m))
        {
            errors.push(
                "sampling.max_tokens",
                format!("{m} is outside 1 to {MAX_DEFAULT_MAX_TOKENS}"),
            );
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Name of a model in the caller's tenant or the public catalogue.
    pub model: String,
    pub engine: EngineKind,
    pub resources: Resources,
    pub replicas: Replicas,
    /// Sites the replicas may run in; any permitted site when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// Sites its replicas are placed at, and its requests served at, first:
    /// the others `sites` and the tenant's residency allow take them only
    /// when these have no room or no ready replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_sites: Vec<String>,
    /// Upstream base URL, for `engine: external` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// Sampling fields a request leaves out get these, whatever the engine.
    #[serde(default, skip_serializing_if = "SamplingDefaults::is_empty")]
    pub sampling: SamplingDefaults,
}

/// Most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 1000;

impl DeploymentSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        errors.check("model", crate::name::validate_name(&self.model));
        self.replicas.validate(&mut errors);
        if self.engine != EngineKind::External && self.resources.memory.0 == 0 {
            errors.push("resources.memory", "must be more than zero");
        }
        if self.resources.gpu.is_none() && self.resources.gpu_memory.is_some() {
            errors.push("resources.gpu_memory", "needs resources.gpu");
        }
        for (i, site) in self.sites.iter().enumerate() {
            errors.check(&format!("sites[{i}]"), crate::name::validate_name(site));
        }
        for (i, site) in self.preferred_sites.iter().enumerate() {
            let field = format!("preferred_sites[{i}]");
            errors.check(&field, crate::name::validate_name(site));
            if !self.sites.is_empty() && !self.sites.contains(site) {
                errors.push(
                    field,
                    format!("{site:?} is not among `sites`: a preferred site must be allowed"),
                );
            }
        }
        if matches!(self.engine, EngineKind::Vllm | EngineKind::Sglang)
            && self.resources.gpu.is_none()
        {
            errors.push(
                "resources.gpu",
                "vllm and sglang run on GPUs: ask for one (or run llama-cpp on CPUs)",
            );
        }
        if self.engine == EngineKind::Container {
            errors.push(
                "engine",
                "\"container\" runs a workload's image: create it with POST /v1/workloads",
            );
        }
        self.sampling.validate(&mut errors);
        match (self.engine, &self.external_url) {
            (EngineKind::External, Some(url)) => {
                if let Err(why) = crate::url::UpstreamUrl::parse(url) {
                    errors.push("external_url", why);
                }
            }
            (EngineKind::External, None) => {
                errors.push("external_url", "is required for engine \"external\"")
            }
            (_, Some(_)) => errors.push("external_url", "is only for engine \"external\""),
            (_, None) => {}
        }
        errors.into_result()
    }

    /// What this deployment holds against its tenant's quota: every replica
    /// it may scale to, so scaling up can never break the quota later.
    pub fn quota_usage(&self) -> ResourceUsage {
        let mut usage = self.resources.times(u64::from(self.replicas.max));
        usage.deployments = 1;
        usage
    }

    /// What this deployment holds while `placed` (the resources each of
    /// its placements holds) still run: the larger of its spec's usage and
    /// what its placements hold, per resource. A spec updated down (fewer
    /// GPUs, say) therefore frees quota only once the replicas holding the
    /// old amount are gone.
    pub fn quota_usage_holding<'a>(
        &self,
        placed: impl IntoIterator<Item = &'a Resources>,
    ) -> ResourceUsage {
        self.quota_usage().max(Resources::sum(placed))
    }
}

impl Resources {
    /// What `placed` replicas hold together.
    pub fn sum<'a>(placed: impl IntoIterator<Item = &'a Resources>) -> ResourceUsage {
        placed.into_iter().fold(ResourceUsage::default(), |sum, r| {
            sum.saturating_add(r.times(1))
        })
    }

    /// `n` replicas' worth of these resources (no deployment counted).
    pub fn times(&self, n: u64) -> ResourceUsage {
        ResourceUsage {
            gpus: GpuMilli(self.gpu.map(|g| g.milli()).unwrap_or(0).saturating_mul(n)),
            gpu_memory: ByteSize(self.gpu_memory.map(|b| b.0).unwrap_or(0).saturating_mul(n)),
            cpu: CpuMillis(self.cpu.0.saturating_mul(n)),
            memory: ByteSize(self.memory.0.saturating_mul(n)),
            storage: ByteSize(self.storage.0.saturating_mul(n)),
            deployments: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gpu: Option<&str>, max: u32) -> DeploymentSpec {
        serde_json::from_value(serde_json::json!({
            "model": "m", "engine": "simulated", "replicas": {"min": 1, "max": max},
            "resources": {"cpu": "1", "memory": "1Gi", "gpu": gpu}
        }))
        .unwrap()
    }

    #[test]
    fn a_preferred_site_must_be_an_allowed_one() {
        let with = |sites: &[&str], preferred: &[&str]| {
            let mut s = spec(None, 1);
            s.sites = sites.iter().map(|x| x.to_string()).collect();
            s.preferred_sites = preferred.iter().map(|x| x.to_string()).collect();
            s.validate()
        };
        assert!(with(&[], &["edge-de"]).is_ok());
        assert!(with(&["edge-de", "core-eu"], &["edge-de"]).is_ok());
        let refused = with(&["core-eu"], &["edge-de"]).unwrap_err().to_string();
        assert!(refused.contains("preferred_sites[0]"), "{refused}");
        assert!(with(&[], &["Edge DE"]).is_err());
    }

    #[test]
    fn an_update_down_holds_what_its_replicas_still_hold() {
        let old = spec(Some("1"), 1);
        let new = spec(None, 1);
        assert_eq!(new.quota_usage().gpus, GpuMilli(0));
        let held = new.quota_usage_holding([&old.resources]);
        assert_eq!(held.gpus, GpuMilli(1000));
        assert_eq!(held.deployments, 1);
        // Four old replicas hold four GPUs, whatever the new spec says.
        let four = [&old.resources; 4];
        assert_eq!(new.quota_usage_holding(four).gpus, GpuMilli(4000));
        // Nothing placed yet: the spec's own usage.
        assert_eq!(
            spec(Some("2"), 3).quota_usage_holding([]).gpus,
            GpuMilli(6000)
        );
    }

    #[test]
    fn autoscaling_numbers_out_of_range_are_refused_by_field() {
        for (field, value) in [
            ("target_in_flight", 0u64),
            ("target_in_flight", 10_001),
            ("target_in_flight", u64::from(u32::MAX)),
            ("scale_down_delay_seconds", 0),
            ("scale_down_delay_seconds", 86_401),
        ] {
            let s: DeploymentSpec = serde_json::from_value(serde_json::json!({
                "model": "m", "engine": "simulated",
                "replicas": {"min": 0, "max": 2, field: value},
                "resources": {"cpu": "1", "memory": "1Gi"}
            }))
            .unwrap();
            let errors = format!("{:?}", s.validate().unwrap_err());
            assert!(errors.contains(&format!("replicas.{field}")), "{errors}");
        }
        // A number past u32 is a parse error, never a wrapped value.
        assert!(serde_json::from_value::<DeploymentSpec>(serde_json::json!({
            "model": "m", "replicas": {"min": 0, "max": 2, "target_in_flight": 1u64 << 32},
            "resources": {"cpu": "1", "memory": "1Gi"}
        }))
        .is_err());
        let mut ok = spec(None, 2);
        ok.replicas.target_in_flight = Some(10_000);
        ok.replicas.scale_down_delay_seconds = Some(86_400);
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn external_urls_must_parse() {
        let mut s = spec(None, 1);
        s.engine = EngineKind::External;
        s.external_url = Some("http://up:80/v1\r\nx: y".into());
        let errors = s.validate().unwrap_err();
        assert!(format!("{errors:?}").contains("external_url"));
        s.external_url = Some("https://api.example.com/v1".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn sampling_defaults_are_checked_and_misspellings_refused() {
        let mut s = spec(None, 1);
        s.sampling.temperature = Some(2.5);
        s.sampling.top_p = Some(0.0);
        s.sampling.frequency_penalty = Some(-2.5);
        s.sampling.max_tokens = Some(0);
        let errors = format!("{:?}", s.validate().unwrap_err());
        for field in [
            "sampling.temperature",
            "sampling.top_p",
            "sampling.frequency_penalty",
            "sampling.max_tokens",
        ] {
            assert!(errors.contains(field), "{field} missing from {errors}");
        }
        s.sampling = SamplingDefaults {
            temperature: Some(0.2),
            top_p: Some(0.9),
            presence_penalty: Some(0.5),
            frequency_penalty: None,
            max_tokens: Some(256),
        };
        assert!(s.validate().is_ok());
        let typo = serde_json::json!({"model": "m", "engine": "simulated", "replicas": {"min": 1, "max": 1},
            "resources": {"cpu": "1", "memory": "1Gi"}, "sampling": {"temprature": 0.2}});
        let err = serde_json::from_value::<DeploymentSpec>(typo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("temprature"), "{err}");
    }
}
