//! What the workspace's tests share. A dev-dependency only: nothing here
//! is linked into the binary.
#![allow(clippy::panic)]

use std::path::Path;

/// Compares `got` with the snapshot `<dir>/<name>.txt`, or writes it when
/// `UPDATE_SNAPSHOTS` is set (after a deliberate change, to review as a
/// diff). Panics with the differing lines.
pub fn assert_snapshot(dir: &Path, name: &str, got: &str) {
    let path = dir.join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        if let Err(e) = std::fs::write(&path, got) {
            panic!("cannot write {}: {e}", path.display());
        }
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run with UPDATE_SNAPSHOTS=1 and review it",
            path.display()
        )
    });
    if want != got {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "{name} decisions changed ({} vs {} lines):\n{}\n--- now:\n{got}",
            want.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
}
