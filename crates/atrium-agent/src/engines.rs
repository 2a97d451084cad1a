//! Third-party engines: llama.cpp's server (llama-cpp-python), vLLM and
//! SGLang, each run by the agent in the same sandbox as Atrium's own.
//!
//! The agent starts `atrium engine --kind <engine> …` through
//! `sandbox-exec` exactly as it starts the embedded engine; that process
//! learns its address from `--listen` and replaces itself (`exec`) with the
//! engine's own command line, made here. Nothing here passes through a
//! shell: every argument is one argv entry, and the only tenant-chosen
//! text in them is the deployment's name, validated by the control plane.
//!
//! llama-cpp-python is installed by the agent on first use into a venv of
//! the host's Python under the engine cache, which is root-owned and
//! readable by every tenant uid (the sandbox runs the engine as one).
//! vLLM and SGLang are the operator's to install there (GPU nodes only);
//! a node without one refuses the placement and says where it looked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use atrium_core::deployment::EngineKind;
use atrium_core::placement::PlacementSpec;
use atrium_core::quantity::GpuRequest;

/// The llama-cpp-python release installed, and how: portable x86-64-v3
/// code (AVX2, FMA), so the cache may be shared by any such node.
pub const LLAMA_CPP_PYTHON: &str = "llama-cpp-python[server]==0.3.36";
const LLAMA_CPP_CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
     -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF";
/// The context window a llama.cpp replica serves.
const LLAMA_CPP_CONTEXT: u32 = 4096;
/// The share of a GPU's memory vLLM or SGLang may take when the replica
/// holds the whole GPU.
const GPU_MEMORY_SHARE: f64 = 0.9;

/// Where third-party engines are installed unless configured: a system
/// directory when the agent is root (tenants' uids must read it, and a
/// home directory is closed to them), the user's cache otherwise.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ATRIUM_ENGINE_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/cache/atrium/engines");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/atrium/engines"),
        None => PathBuf::from("atrium-engines"),
    }
}

/// The engine's own name, as `atrium engine --kind` takes it.
pub fn kind_name(engine: EngineKind) -> Option<&'static str> {
    match engine {
        EngineKind::LlamaCpp => Some("llama-cpp"),
        EngineKind::Vllm => Some("vllm"),
        EngineKind::Sglang => Some("sglang"),
        _ => None,
    }
}

/// Where the agent probes a third-party engine for readiness: llama.cpp's
/// server has no health route, and lists its model once loaded.
pub fn health_path(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::LlamaCpp => "/v1/models",
        EngineKind::Vllm | EngineKind::Sglang => "/health",
        _ => "/healthz",
    }
}

/// What a third-party replica runs, given where it listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub engine: EngineKind,
    /// The engine's Python (llama-cpp, SGLang) or program (vLLM).
    pub program: PathBuf,
    pub model: PathBuf,
    /// The name tenants call it by (`model` in requests).
    pub name: String,
    pub threads: u32,
    pub gpu: Option<GpuRequest>,
}

impl Launch {
    /// The engine's argv (after the program) to listen on `host:port`.
    pub fn args(&self, host: &str, port: u16) -> Vec<String> {
        let model = self.model.display().to_string();
        let (host, port) = (host.to_string(), port.to_string());
        match self.engine {
            EngineKind::LlamaCpp => {
                let mut args: Vec<String> = vec![
                    "-m".into(),
                    "llama_cpp.server".into(),
                    "--model".into(),
                    model,
                    "--model_alias".into(),
                    self.name.clone(),
                    "--host".into(),
                    host,
                    "--port".into(),
                    port,
                    "--n_ctx".into(),
                    LLAMA_CPP_CONTEXT.to_string(),
                    "--n_threads".into(),
                    self.threads.to_string(),
                    "--n_threads_batch".into(),
                    self.threads.to_string(),
                ];
                // With a GPU every layer goes to it; without, none.
                let layers = if self.gpu.is_some() { "-1" } else { "0" };
                args.extend(["--n_gpu_layers".into(), layers.into()]);
                args
            }
            EngineKind::Vllm | EngineKind::Sglang => {
                // (program's leading arguments, the model's flag, the
                // memory share's flag, the tensor-parallel flag)
                let (lead, model_flag, share_flag, parallel_flag): (&[&str], _, _, _) =
                    if self.engine == EngineKind::Vllm {
                        (
                            &["serve"],
                            None,
                            "--gpu-memory-utilization",
                            "--tensor-parallel-size",
                        )
                    } else {
                        (
                            &["-m", "sglang.launch_server"],
                            Some("--model-path"),
                            "--mem-fraction-static",
                            "--tp-size",
                        )
                    };
                let mut args: Vec<String> = lead.iter().map(|a| a.to_string()).collect();
                args.extend(model_flag.map(String::from));
                args.push(model);
                args.extend([
                    "--served-model-name".into(),
                    self.name.clone(),
                    "--host".into(),
                    host,
                    "--port".into(),
                    port,
                    share_flag.into(),
                    format!("{:.3}", self.memory_share()),
                ]);
                if let Some(n) = self.whole_gpus().filter(|n| *n > 1) {
                    args.extend([parallel_flag.into(), n.to_string()]);
                }
                args
            }
            _ => Vec::new(),
        }
    }

    /// Whole GPUs the replica holds (a MIG instance or a share is one
    /// device as the engine sees it).
    fn whole_gpus(&self) -> Option<u32> {
        match self.gpu {
            Some(GpuRequest::Milli(m)) if m >= 1000 => Some(m / 1000),
            Some(_) => Some(1),
            None => None,
        }
    }

    /// The share of its device's memory the engine may take: most of a
    /// whole GPU or MIG instance (its own memory), and of a shared GPU
    /// only the replica's share, so co-tenants' replicas keep theirs.
    fn memory_share(&self) -> f64 {
        match self.gpu {
            Some(GpuRequest::Milli(m)) if m < 1000 => f64::from(m) / 1000.0 * GPU_MEMORY_SHARE,
            _ => GPU_MEMORY_SHARE,
        }
    }
}

/// The `atrium engine` arguments that start `spec`'s third-party engine
/// with `program` on `model` (the agent appends `--listen`).
pub fn engine_args(spec: &PlacementSpec, program: &Path, model: &Path) -> Vec<String> {
    let kind = kind_name(spec.engine).unwrap_or("unknown");
    // Threads: the replica's whole CPUs, at least one.
    let threads = (spec.resources.cpu.0 / 1000).max(1);
    let mut args = vec![
        "engine".to_string(),
        "--kind".into(),
        kind.into(),
        "--name".into(),
        spec.deployment_name.clone(),
        "--model".into(),
        model.display().to_string(),
        "--program".into(),
        program.display().to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    if let Some(gpu) = &spec.resources.gpu {
        args.extend(["--gpu".into(), gpu.to_string()]);
    }
    args
}

/// The engine's program on this node, installing llama-cpp-python into
/// `cache` first if need be (minutes, once per node; concurrent
/// placements wait for the one install).
pub fn program(engine: EngineKind, cache: &Path) -> Result<PathBuf, String> {
    match engine {
        EngineKind::LlamaCpp => llama_cpp_python(cache),
        EngineKind::Vllm => installed(cache, "vllm", "bin/vllm", "pip install vllm"),
        EngineKind::Sglang => installed(cache, "sglang", "bin/python", "pip install 'sglang[all]'"),
        other => Err(format!("{other:?} is not a third-party engine")),
    }
}

fn installed(cache: &Path, venv: &str, program: &str, how: &str) -> Result<PathBuf, String> {
    let path = cache.join(venv).join(program);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the {venv} engine is not installed on this node: make a venv at {} and `{how}` in it",
            cache.join(venv).display()
        ))
    }
}

/// The venv's Python with llama-cpp-python installed, made on first use.
fn llama_cpp_python(cache: &Path) -> Result<PathBuf, String> {
    let venv = cache.join("llama-cpp");
    let python = venv.join("bin/python");
    let done = venv.join(".installed");
    let done_text = format!("{LLAMA_CPP_PYTHON} {LLAMA_CPP_CMAKE_ARGS}");
    if std::fs::read_to_string(&done).is_ok_and(|t| t == done_text) {
        return Ok(python);
    }
    make_readable_dir(cache)?;
    // One install per node: a lock file held while pip runs.
    let lock_path = cache.join("llama-cpp.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    if std::fs::read_to_string(&done).is_ok_and(|t| t == done_text) {
        return Ok(python);
    }
    tracing::info!(venv = %venv.display(), "agent: installing {LLAMA_CPP_PYTHON} (it builds llama.cpp: minutes, once)");
    // The host's own Python, so the venv holds nothing under a user's home
    // that a tenant uid could not read.
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-cache-dir",
        ])
        .arg(LLAMA_CPP_PYTHON)
        .env("CMAKE_ARGS", LLAMA_CPP_CMAKE_ARGS)
        .env(
            "CMAKE_BUILD_PARALLEL_LEVEL",
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .to_string(),
        ))?;
    std::fs::write(&done, done_text).map_err(|e| format!("{}: {e}", done.display()))?;
    Ok(python)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: String = err
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ");
    Err(format!("{:?} failed: {tail}", cmd.get_program()))
}

/// The engine cache: created root-owned and world-readable (tenants' uids
/// run what is in it, and never write there).
fn make_readable_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(engine: EngineKind, gpu: Option<&str>) -> Launch {
        Launch {
            engine,
            program: "/cache/x/bin/python".into(),
            model: "/models/m.gguf".into(),
            name: "chat".into(),
            threads: 2,
            gpu: gpu.map(|g| g.parse().unwrap_or(GpuRequest::Milli(0))),
        }
    }

    fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).map(String::as_str)
    }

    #[test]
    fn llama_cpp_serves_the_deployments_name_on_the_sandbox_address() {
        let args = launch(EngineKind::LlamaCpp, None).args("10.201.1.2", 8001);
        assert_eq!(&args[..2], ["-m", "llama_cpp.server"]);
        assert_eq!(flag(&args, "--model"), Some("/models/m.gguf"));
        assert_eq!(flag(&args, "--model_alias"), Some("chat"));
        assert_eq!(flag(&args, "--host"), Some("10.201.1.2"));
        assert_eq!(flag(&args, "--port"), Some("8001"));
        assert_eq!(flag(&args, "--n_threads"), Some("2"));
        assert_eq!(flag(&args, "--n_gpu_layers"), Some("0"));
        let gpu = launch(EngineKind::LlamaCpp, Some("1")).args("h", 1);
        assert_eq!(flag(&gpu, "--n_gpu_layers"), Some("-1"));
    }

    #[test]
    fn vllm_and_sglang_take_their_gpus_and_memory_share() {
        let two = launch(EngineKind::Vllm, Some("2")).args("h", 9);
        assert_eq!(&two[..2], ["serve", "/models/m.gguf"]);
        assert_eq!(flag(&two, "--tensor-parallel-size"), Some("2"));
        assert_eq!(flag(&two, "--gpu-memory-utilization"), Some("0.900"));
        assert_eq!(flag(&two, "--served-model-name"), Some("chat"));
        let half = launch(EngineKind::Vllm, Some("0.5")).args("h", 9);
        assert_eq!(flag(&half, "--gpu-memory-utilization"), Some("0.450"));
        assert_eq!(flag(&half, "--tensor-parallel-size"), None);
        let mig = launch(EngineKind::Sglang, Some("3g.40gb")).args("h", 9);
        assert_eq!(&mig[..2], ["-m", "sglang.launch_server"]);
        assert_eq!(flag(&mig, "--mem-fraction-static"), Some("0.900"));
        assert_eq!(flag(&mig, "--tp-size"), None);
        let four = launch(EngineKind::Sglang, Some("4")).args("h", 9);
        assert_eq!(flag(&four, "--tp-size"), Some("4"));
    }

    #[test]
    fn engines_are_probed_where_they_answer() {
        assert_eq!(health_path(EngineKind::LlamaCpp), "/v1/models");
        assert_eq!(health_path(EngineKind::Vllm), "/health");
        assert_eq!(health_path(EngineKind::Embedded), "/healthz");
    }

    #[test]
    fn a_missing_operator_install_says_where_it_looked() {
        let dir = std::env::temp_dir().join(format!("atrium-engines-{}", std::process::id()));
        let err = program(EngineKind::Vllm, &dir).err().unwrap_or_default();
        assert!(
            err.contains("vllm") && err.contains(&dir.display().to_string()),
            "{err}"
        );
        assert!(program(EngineKind::Embedded, &dir).is_err());
    }
}
