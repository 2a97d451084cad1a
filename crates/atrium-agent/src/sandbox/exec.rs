//! `atrium sandbox-exec`: the one step between the agent (root) and a
//! workload. It runs single-threaded, before anything of the workload,
//! and each step closes a way out:
//!
//! 1. join the workload's cgroups — every process after this one counts
//!    against its CPU, memory and pids limits;
//! 2. enter its tenant's network namespace — it sees only its own veth;
//! 3. in a mount namespace of its own, bind the model files read-only at
//!    the paths the engine is told (the host's files are never re-owned or
//!    re-moded to make them readable: the mount is the workload's alone
//!    and gone with it);
//! 4. forbid new privileges (no setuid binary regains root);
//! 5. drop to the tenant's uid and gid, with no supplementary groups, and
//!    `exec` the engine — the PID the agent recorded is the engine's.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags};

use super::SandboxError;

/// What `atrium sandbox-exec` is told.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub cgroup_procs: Vec<PathBuf>,
    pub netns: Option<String>,
    /// Model files to bind read-only: (source, target). Sources are
    /// canonical paths inside the node's model roots (the agent checked);
    /// targets are the canonical paths of empty files or directories the
    /// agent made for them, in root-owned directories.
    pub binds: Vec<(PathBuf, PathBuf)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl ExecRequest {
    /// The arguments of `atrium sandbox-exec` carrying this request, up to
    /// and including `--` (the program and its arguments follow): with
    /// [`ExecRequest::parse`], the one place its flags are spelled.
    pub fn flags(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        for procs in &self.cgroup_procs {
            out.extend(["--cgroup-procs".into(), procs.clone().into_os_string()]);
        }
        if let Some(ns) = &self.netns {
            out.extend(["--netns".into(), ns.into()]);
        }
        for (source, target) in &self.binds {
            out.extend([
                "--ro-bind".into(),
                source.clone().into_os_string(),
                target.clone().into_os_string(),
            ]);
        }
        if let Some(uid) = self.uid {
            out.extend(["--uid".into(), uid.to_string().into()]);
        }
        if let Some(gid) = self.gid {
            out.extend(["--gid".into(), gid.to_string().into()]);
        }
        out.push("--".into());
        out
    }

    /// The flags and everything after them (`--`, the program, its
    /// arguments).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out = self.flags();
        out.push(self.program.clone());
        out.extend(self.args.iter().cloned());
        out
    }

    /// Reads what [`ExecRequest::to_args`] writes.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<ExecRequest, SandboxError> {
        let mut args = args.into_iter();
        let mut req = ExecRequest::default();
        let value = |flag: &str, args: &mut dyn Iterator<Item = OsString>| {
            args.next().ok_or_else(|| refused!("{flag} needs a value"))
        };
        let id = |flag: &str, v: OsString| {
            v.to_str()
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| refused!("{flag} {v:?} is not a number"))
        };
        loop {
            let Some(arg) = args.next() else {
                return Err(refused!("give the program after --"));
            };
            match arg.to_str() {
                Some("--cgroup-procs") => req
                    .cgroup_procs
                    .push(value("--cgroup-procs", &mut args)?.into()),
                Some("--netns") => {
                    let ns = value("--netns", &mut args)?;
                    req.netns = Some(
                        ns.into_string()
                            .map_err(|ns| refused!("--netns {ns:?} is not UTF-8"))?,
                    );
                }
                Some("--ro-bind") => {
                    let source = value("--ro-bind", &mut args)?;
                    let target = value("--ro-bind", &mut args)?;
                    req.binds.push((source.into(), target.into()));
                }
                Some("--uid") => req.uid = Some(id("--uid", value("--uid", &mut args)?)?),
                Some("--gid") => req.gid = Some(id("--gid", value("--gid", &mut args)?)?),
                Some("--") => break,
                _ => return Err(refused!("unknown sandbox-exec argument {arg:?}")),
            }
        }
        req.program = args
            .next()
            .ok_or_else(|| refused!("give the program after --"))?;
        req.args = args.collect();
        Ok(req)
    }
}

/// Turns this process into the sandboxed workload (see the module doc),
/// keeping its PID. Returns only on failure. Must run before any other
/// thread exists: entering a namespace changes only the calling thread.
pub fn exec_sandboxed(req: ExecRequest) -> io::Error {
    let me = std::process::id().to_string();
    for procs in &req.cgroup_procs {
        if let Err(e) = std::fs::write(procs, &me) {
            return io::Error::new(e.kind(), format!("{}: {e}", procs.display()));
        }
    }
    if let Some(ns) = &req.netns {
        let path = Path::new("/run/netns").join(ns);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => return io::Error::new(e.kind(), format!("{}: {e}", path.display())),
        };
        if let Err(e) = rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        ) {
            return io::Error::other(format!("cannot enter network namespace {ns}: {e}"));
        }
    }
    if !req.binds.is_empty() {
        if let Err(e) = bind_read_only(&req.binds) {
            return e;
        }
    }
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        return io::Error::other(format!("cannot set no_new_privs: {e}"));
    }
    let mut cmd = Command::new(&req.program);
    cmd.args(&req.args);
    // std drops supplementary groups (setgroups(0)) when root sets a uid.
    if let Some(gid) = req.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = req.uid {
        cmd.uid(uid);
    }
    cmd.exec()
}

/// Enters a mount namespace of this process's own, whose mounts never
/// reach the host's, and binds each source read-only (and without devices,
/// setuid or exec) at its target.
fn bind_read_only(binds: &[(PathBuf, PathBuf)]) -> Result<(), io::Error> {
    // `unshare` is marked deprecated only because CLONE_FILES can leave
    // another thread with descriptors it no longer shares; this process
    // has one thread and unshares its mounts alone.
    #[allow(deprecated)]
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)
        .map_err(|e| io::Error::other(format!("cannot make a mount namespace: {e}")))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| io::Error::other(format!("cannot make mounts private: {e}")))?;
    let by_fd = |fd: &std::os::fd::OwnedFd| {
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd))
    };
    for (source, target) in binds {
        // Both opened as checked, and mounted by descriptor: no path is
        // looked up again between the check and the mount.
        let (from, onto) = (open_exactly(source)?, open_exactly(target)?);
        let fail = |what: &str, e: rustix::io::Errno| {
            io::Error::other(format!(
                "cannot {what} {} at {}: {e}",
                source.display(),
                target.display()
            ))
        };
        rustix::mount::mount_bind(by_fd(&from).as_str(), by_fd(&onto).as_str())
            .map_err(|e| fail("bind", e))?;
        rustix::mount::mount_remount(
            target,
            MountFlags::BIND
                | MountFlags::RDONLY
                | MountFlags::NOSUID
                | MountFlags::NODEV
                | MountFlags::NOEXEC,
            "",
        )
        .map_err(|e| fail("make read-only", e))?;
    }
    Ok(())
}

/// Opens `path` as it was checked: a regular file or a directory at
/// exactly that canonical path. Had a component been replaced by a link
/// since the agent's check, the open would land elsewhere — and is
/// refused rather than mounted.
fn open_exactly(path: &Path) -> Result<std::os::fd::OwnedFd, io::Error> {
    let refused = |why: String| io::Error::other(format!("model view {}: {why}", path.display()));
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refused(e.to_string()))?;
    let kind = rustix::fs::fstat(&fd)
        .map(|st| FileType::from_raw_mode(st.st_mode))
        .map_err(|e| refused(e.to_string()))?;
    if !matches!(kind, FileType::RegularFile | FileType::Directory) {
        return Err(refused("is neither a file nor a directory".into()));
    }
    let opened = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))?;
    if opened != path {
        return Err(refused(format!("resolves to {} now", opened.display())));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_read_back_as_written() {
        let req = ExecRequest {
            cgroup_procs: vec!["/sys/fs/cgroup/a/cgroup.procs".into()],
            netns: Some("atrium201-acme".into()),
            binds: vec![("/models/m".into(), "/views/acme/m".into())],
            uid: Some(2003296),
            gid: Some(2003296),
            program: "/bin/engine".into(),
            args: vec!["--listen".into(), "--".into()],
        };
        let back = ExecRequest::parse(req.to_args()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
        for bad in [
            &["--uid", "x", "--", "p"][..],
            &["--bogus", "--", "p"],
            &["--netns"],
            &["--"],
        ] {
            assert!(
                ExecRequest::parse(bad.iter().map(OsString::from)).is_err(),
                "{bad:?}"
            );
        }
    }
}
