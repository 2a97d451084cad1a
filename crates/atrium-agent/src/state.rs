//! What the agent remembers across its own restarts, in
//! `<data-dir>/agent/state.json`: the placements assigned to this node (so
//! it keeps running them while the control plane is unreachable), the
//! engine process each one runs (so a restarted agent re-adopts it instead
//! of starting a duplicate), each tenant's slot on this node (its network
//! and uid), and GPUs released but not yet sanitised.
//!
//! Written whole to a temporary file, synced and renamed over the old one:
//! a crash leaves either the old state or the new, never half of one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use atrium_core::placement::PlacementSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub tenant: String,
    pub spec: PlacementSpec,
}

/// An engine process the agent started. `start_ticks` (the kernel's start
/// time of the process) tells it apart from a later process that reuses
/// the PID.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningEngine {
    pub pid: u32,
    pub start_ticks: u64,
    pub endpoint: String,
    pub isolation: String,
    pub restarts: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub assigned: BTreeMap<String, Assignment>,
    pub running: BTreeMap<String, RunningEngine>,
    /// Tenant → its slot on this node (network index, uid offset).
    pub tenant_slots: BTreeMap<String, u32>,
    /// GPU indices whose last holder was released and that have not been
    /// sanitised since: no new workload gets them until they are.
    pub gpus_to_sanitize: BTreeSet<u32>,
}

impl AgentState {
    /// The slot of `tenant`, allocating the lowest free one.
    pub fn tenant_slot(&mut self, tenant: &str) -> u32 {
        if let Some(slot) = self.tenant_slots.get(tenant) {
            return *slot;
        }
        let used: BTreeSet<u32> = self.tenant_slots.values().copied().collect();
        let slot = (0..).find(|s| !used.contains(s)).unwrap_or_default();
        self.tenant_slots.insert(tenant.to_string(), slot);
        slot
    }
}

/// The state file and its in-memory copy.
pub struct StateFile {
    path: PathBuf,
    state: Mutex<AgentState>,
}

impl StateFile {
    /// Loads the state, or starts empty when there is none. A state file
    /// that cannot be parsed is kept aside (`state.json.bad`), not lost.
    pub fn open(dir: &Path) -> std::io::Result<StateFile> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, path = %path.display(), "agent: unreadable state; starting empty");
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                AgentState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(e) => return Err(e),
        };
        Ok(StateFile {
            path,
            state: Mutex::new(state),
        })
    }

    pub fn read<T>(&self, f: impl FnOnce(&AgentState) -> T) -> T {
        match self.state.lock() {
            Ok(s) => f(&s),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Changes the state and writes it out before returning.
    pub fn update<T>(&self, f: impl FnOnce(&mut AgentState) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let out = f(&mut guard);
        if let Err(e) = self.write(&guard) {
            tracing::error!(error = %e, path = %self.path.display(), "agent: cannot save its state");
        }
        out
    }

    fn write(&self, state: &AgentState) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// The kernel's start time of process `pid` (clock ticks since boot), or
/// `None` when there is no such process (or it is a zombie).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    // Field 22 overall; state (field 3) was the first after ')'.
    fields.nth(18)?.parse().ok()
}

/// Whether the process recorded as `engine` still runs.
pub fn is_alive(engine: &RunningEngine) -> bool {
    process_start_ticks(engine.pid) == Some(engine.start_ticks)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn own_process_has_a_stable_start_time_and_state_round_trips() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        assert_eq!(process_start_ticks(me), Some(ticks));
        assert_eq!(process_start_ticks(u32::MAX - 1), None);

        let dir = std::env::temp_dir().join(format!("atrium-state-test-{me}"));
        let _ = std::fs::remove_dir_all(&dir);
        let file = StateFile::open(&dir).unwrap();
        let (a, b, a_again) = file.update(|s| {
            let a = s.tenant_slot("acme");
            let b = s.tenant_slot("globex");
            (a, b, s.tenant_slot("acme"))
        });
        assert_eq!((a, b, a_again), (0, 1, 0));
        file.update(|s| {
            s.tenant_slots.remove("acme");
        });
        let reopened = StateFile::open(&dir).unwrap();
        assert_eq!(reopened.read(|s| s.tenant_slots.clone()).len(), 1);
        // The freed slot is reused.
        assert_eq!(reopened.update(|s| s.tenant_slot("initech")), 0);
        std::fs::write(dir.join("state.json"), b"{not json").unwrap();
        let recovered = StateFile::open(&dir).unwrap();
        assert!(recovered.read(|s| s.tenant_slots.is_empty()));
        assert!(dir.join("state.json.bad").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
