//! The seccomp filter every container runs under. Capabilities are
//! already all dropped, so most privileged calls fail anyway; this closes
//! what an unprivileged process may still reach and what has carried
//! container escapes: new user namespaces (where a process gets every
//! capability over new kernel objects), the new mount API, keyrings, BPF,
//! perf, userfaultfd and io_uring, module and kexec loading, handle-based
//! opens. Everything else is allowed (a denylist, as Docker's default is
//! in effect): tenants run arbitrary software.
//!
//! Denied calls fail with EPERM; `clone3` with ENOSYS, so the C library
//! falls back to `clone`, whose namespace flags the filter can read.

use serde_json::{json, Value};

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// Calls no container makes.
const DENIED: &[&str] = &[
    // Namespaces and mounts.
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    // Kernel keyrings, BPF, perf, page-fault handling, io_uring.
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // The kernel itself, the clock, swap, accounting.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "iopl",
    "ioperm",
    "quotactl",
    "lookup_dcookie",
    "uselib",
    "nfsservctl",
    // Files by handle bypass the path (and so the mount namespace).
    "open_by_handle_at",
    "name_to_handle_at",
];

/// `clone` flags that make new namespaces.
const CLONE_NEW: &[u64] = &[
    0x0002_0000, // NEWNS
    0x0200_0000, // NEWCGROUP
    0x0400_0000, // NEWUTS
    0x0800_0000, // NEWIPC
    0x1000_0000, // NEWUSER
    0x2000_0000, // NEWPID
    0x4000_0000, // NEWNET
];

/// The architectures whose calls the filter covers: the host's, and the
/// 32-bit ABIs it also runs (a filter that named only the native one
/// would leave `int 0x80` open).
fn architectures() -> Vec<&'static str> {
    if cfg!(target_arch = "aarch64") {
        vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    }
}

/// The `linux.seccomp` section of a container's `config.json`.
pub fn profile() -> Value {
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    // On x86-64 the flags are clone's first argument. One rule per flag:
    // seccomp compares an argument, so "any of these bits" is one masked
    // comparison each.
    syscalls.extend(CLONE_NEW.iter().map(|flag| {
        json!({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
               "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    }));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_namespaces_mounts_and_io_uring_are_denied() {
        let p = profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let denied = p["syscalls"][0]["names"].as_array().unwrap();
        for call in [
            "unshare",
            "setns",
            "mount",
            "fsopen",
            "io_uring_setup",
            "bpf",
            "keyctl",
        ] {
            assert!(denied.iter().any(|n| n == call), "{call}");
        }
        let newuser = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["args"][0]["value"] == 0x1000_0000u64)
            .unwrap();
        assert_eq!(newuser["names"][0], "clone");
        assert_eq!(newuser["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    }
}
