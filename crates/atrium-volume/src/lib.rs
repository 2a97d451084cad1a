//! Hard-sized disks on this host: each one an ext4 filesystem in an image
//! file of its size (`<dir>/<id>.ext4`, its blocks reserved with
//! `fallocate`, so a full host disk cannot take them back), loop-mounted
//! `nosuid,nodev` at `<dir>/<id>/`, its root owned by the uid that is to
//! write it: a tenant's uid for a workload volume (bound into that
//! tenant's containers only), PostgreSQL's for a database's tablespace.
//! Writing past the size is ENOSPC for that writer alone; the host and
//! other tenants see nothing.
//!
//! A deleted volume is scrubbed before its file is removed: every block
//! of the image that holds data is overwritten with zeros and synced, so
//! the disk blocks the next user of the host's filesystem gets never held
//! this tenant's bytes. (fscrypt with a destroyed key would do the same in
//! constant time; the image files do not use it yet.)
//!
//! Ids come from the control plane; each store takes only its own kind's
//! (`vol_…`, `db_…`) and checks them again before they become a path.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The disks of one kind in one directory. Its users share one lock, so
/// two of them mounting one volume (a gang's workers) never make it twice.
pub struct VolumeStore {
    dir: PathBuf,
    /// The id prefix this store takes.
    prefix: &'static str,
    /// The directory's mode: 0700 unless another user (PostgreSQL) must
    /// pass through it to reach its own disk's root.
    dir_mode: u32,
    lock: Mutex<()>,
}

/// What `mkfs.ext4` and `mount` need, as a line for the node's isolation
/// report.
pub fn summary() -> String {
    let mkfs = which("mkfs.ext4");
    let fscrypt = Path::new("/sys/fs/ext4/features/encryption").exists();
    let made = if mkfs {
        "loop-mounted ext4 images of a hard size, zero-filled when deleted"
    } else {
        "none: mkfs.ext4 is missing (apt-get install e2fsprogs)"
    };
    let fscrypt = if fscrypt {
        "available, not used"
    } else {
        "not in this kernel"
    };
    format!("{made}; fscrypt {fscrypt}")
}

fn which(tool: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// `prefix` and letters and digits: an id as the control plane mints
/// them, nothing that could leave the directory.
fn check_id(prefix: &str, id: &str) -> Result<(), String> {
    let ok = id.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{id:?} is not an id of the form {prefix}…"))
    }
}

impl VolumeStore {
    /// A node's workload volumes, `<data>/volumes`, reached by root alone.
    pub fn for_data_dir(data_dir: &Path) -> VolumeStore {
        VolumeStore::new(data_dir.join("volumes"), "vol_", 0o700)
    }

    pub fn new(dir: PathBuf, prefix: &'static str, dir_mode: u32) -> VolumeStore {
        VolumeStore {
            dir,
            prefix,
            dir_mode,
            lock: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.ext4"))
    }

    fn mount_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume mounted and owned by `owner`, made first if this node
    /// has not got it: returns where it is mounted. Blocking.
    pub fn ensure(&self, id: &str, size: u64, owner: u32) -> Result<PathBuf, String> {
        check_id(self.prefix, id)?;
        let _held = self.locked();
        let at = |p: &Path, e: io::Error| format!("{}: {e}", p.display());
        std::fs::create_dir_all(&self.dir).map_err(|e| at(&self.dir, e))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(self.dir_mode))
            .map_err(|e| at(&self.dir, e))?;
        let (image, dir) = (self.image(id), self.mount_dir(id));
        if !mounted(&dir) {
            // Its filesystem may live on in a container that is still
            // stopping: a second mount of it would corrupt it.
            if attached(&image) {
                return Err(format!(
                    "volume {id} is still in use by a container that is stopping; retrying"
                ));
            }
            if !image.exists() {
                make_image(&image, size, owner)?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| at(&dir, e))?;
            run(Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev"])
                .arg(&image)
                .arg(&dir))?;
        }
        // The root is the tenant's alone (its uid may differ from when
        // the image was made, on a node that was rebuilt).
        std::os::unix::fs::chown(&dir, Some(owner), Some(owner)).map_err(|e| at(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| at(&dir, e))?;
        Ok(dir)
    }

    /// The ids of the volumes this node holds.
    pub fn ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".ext4")?;
                check_id(self.prefix, id).is_ok().then(|| id.to_string())
            })
            .collect()
    }

    /// Unmounts every volume (the agent stopping): their data stays in
    /// their images for the next mount.
    pub fn unmount_all(&self) {
        let _held = self.locked();
        for id in self.ids() {
            if let Err(why) = self.unmount(id.as_str()) {
                tracing::warn!(volume = %id, %why, "agent: volume left mounted");
            }
        }
    }

    /// Unmounts it here, unless a container still has it: its filesystem
    /// then lives on in that container's mount namespace, and must be
    /// neither mounted a second time nor zeroed under it.
    fn unmount(&self, id: &str) -> Result<(), String> {
        let dir = self.mount_dir(id);
        if let Some(device) = mounted_device(&dir) {
            if mounted_elsewhere(&device) {
                return Err(format!("volume {id} is still mounted in a container"));
            }
            run(Command::new("umount").arg(&dir))?;
        }
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!("{}: {e}", dir.display())),
            _ => Ok(()),
        }
    }

    /// Scrubs and removes a deleted volume: unmounted (refused while a
    /// container still holds it), its data blocks zeroed and synced, then
    /// its image removed. Blocking.
    pub fn scrub(&self, id: &str) -> Result<(), String> {
        check_id(self.prefix, id)?;
        let _held = self.locked();
        self.unmount(id)?;
        let image = self.image(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        zero_data(&file).map_err(|e| format!("zeroing {}: {e}", image.display()))?;
        std::fs::remove_file(&image).map_err(|e| format!("{}: {e}", image.display()))
    }
}

/// An image of `size` bytes, reserved on disk, holding an empty ext4 whose
/// root `owner` owns; made under a temporary name so a crash midway leaves
/// nothing that looks whole.
fn make_image(image: &Path, size: u64, owner: u32) -> Result<(), String> {
    let tmp = image.with_extension("ext4.new");
    let at = |e: io::Error| format!("{}: {e}", tmp.display());
    let file = File::create(&tmp).map_err(at)?;
    file.set_len(size).map_err(at)?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
        .map_err(|e| format!("reserving {size} bytes for {}: {e}", tmp.display()))?;
    drop(file);
    // No blocks reserved for root: the tenant may fill all of it.
    let made = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E"])
        .arg(format!("root_owner={owner}:{owner}"))
        .arg(&tmp));
    if let Err(why) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(why);
    }
    std::fs::rename(&tmp, image).map_err(|e| format!("{}: {e}", image.display()))
}

/// Overwrites every data extent of `file` with zeros and syncs it. Holes
/// (never written) read as zeros already.
fn zero_data(file: &File) -> io::Result<()> {
    use rustix::fs::SeekFrom;
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let len = file.metadata()?.len();
    let mut offset = 0u64;
    while offset < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?.min(len);
        let mut at = start;
        while at < end {
            let n = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        offset = end;
    }
    file.sync_all()
}

/// Whether a loop device is backed by `image`.
fn attached(image: &Path) -> bool {
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return false;
    };
    let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    let image = image.to_string_lossy();
    devices.flatten().any(|d| {
        std::fs::read_to_string(d.path().join("loop/backing_file"))
            .is_ok_and(|f| f.trim_end() == image)
    })
}

/// Whether something is mounted at `dir`.
fn mounted(dir: &Path) -> bool {
    mounted_device(dir).is_some()
}

/// The device (`major:minor`) mounted at `dir` in the agent's mount
/// namespace, if any.
fn mounted_device(dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = escape(&dir.to_string_lossy());
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        (fields.get(4) == Some(&want.as_str())).then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

/// Whether a process in another mount namespace (a container) has
/// `device` mounted.
fn mounted_elsewhere(device: &str) -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let own = ns("self");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let pid = p.file_name().to_string_lossy().to_string();
        // A process whose namespace cannot be read (PID 1 in some
        // sandboxes) is not known to be elsewhere.
        let theirs = ns(&pid);
        if !pid.bytes().all(|b| b.is_ascii_digit()) || theirs.is_none() || theirs == own {
            return false;
        }
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .is_ok_and(|info| info.lines().any(|l| l.split(' ').nth(2) == Some(device)))
    })
}

/// A path as mountinfo writes it: space, tab, newline and backslash as
/// octal escapes.
fn escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_leave_the_directory_are_refused() {
        for id in [
            "vol_",
            "vol_../x",
            "vol_a/b",
            "../vol_a",
            "dep_abc",
            "vol_a.ext4",
        ] {
            assert!(check_id("vol_", id).is_err(), "{id:?}");
        }
        assert!(check_id("vol_", "vol_9aZ").is_ok());
        assert!(check_id("db_", "vol_9aZ").is_err());
    }

    #[test]
    fn zeroing_leaves_no_byte_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(b"secret", 3 << 20).unwrap();
        file.write_all_at(b"secret", 7 << 20).unwrap();
        drop(file);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        zero_data(&file).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn mount_points_are_matched_as_mountinfo_escapes_them() {
        assert_eq!(escape("/a b\\c"), "/a\\040b\\134c");
        assert!(mounted(Path::new("/proc")));
        assert!(!mounted(Path::new("/proc/self")));
    }
}
