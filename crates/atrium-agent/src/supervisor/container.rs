//! Starting a workload's replica: its image pulled (or found in the
//! node's cache), a runc bundle built over the sandbox the agent made for
//! it, and `runc run` supervised in the foreground like an engine.

use std::path::Path;
use std::process::Stdio;

use atrium_core::lifecycle::LifecycleState;
use atrium_core::volume::{check_path, VolumeAttachment, VOLUMES_DIR};
use atrium_core::workload::ContainerSpec;

use super::{Engine, ReplicaCtx};
use crate::runtime::{gpu_devices, process_args, Bundle, ImageCache, Runc, VolumeBind};
use crate::sandbox::{CPU_PERIOD_US, PIDS_LIMIT};
use crate::state::RunningEngine;

impl ReplicaCtx {
    pub(super) fn runc(&self) -> Runc {
        Runc::for_data_dir(&self.shared.config.data_dir)
    }

    /// Pulls the image, builds the bundle and starts runc, returning it
    /// and what was recorded of it. A pull that fails says
    /// `ErrImagePull` and why.
    pub(super) async fn start_container(
        &self,
        container: &ContainerSpec,
        restarts: u32,
    ) -> Result<(Engine, RunningEngine), String> {
        if !self.shared.host.root {
            return Err("containers run with runc, which needs the agent to run as root".into());
        }
        self.report(Self::status(
            LifecycleState::Provisioning,
            format!("pulling {}", container.image),
            restarts,
            None,
        ))
        .await;
        let cache = ImageCache::new(self.shared.config.data_dir.join("images"));
        let pulled = cache
            .pull(&self.shared.cp, &container.image)
            .await
            .map_err(|why| format!("ErrImagePull: {}: {why}", container.image))?;
        let shared = self.shared.clone();
        let (id, spec, tenant) = (self.id.clone(), self.spec().clone(), self.tenant());
        let sandbox = tokio::task::spawn_blocking(move || {
            shared
                .host
                .enter(&id, &tenant, &spec, &shared.gpus, &mut [])
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let (Some(uid), Some(scratch)) = (sandbox.uid, sandbox.work_dir.clone()) else {
            return Err(format!(
                "a container runs only as its tenant's uid, which this node cannot give: {}",
                sandbox.isolation
            ));
        };
        let volumes = self.bind_volumes(uid, &pulled.rootfs).await?;
        let port = container.ports.first().copied();
        let mut running = self.reserve_ports(
            &sandbox.listen_ip,
            &container.ports,
            &sandbox.isolation,
            restarts,
        )?;
        let image = &pulled.config;
        let args = process_args(
            &container.command,
            &container.args,
            image.entrypoint.as_deref(),
            image.cmd.as_deref(),
        );
        if args.is_empty() {
            self.shared.state.update(|s| s.running.remove(&self.id));
            return Err(format!(
                "{} names no entrypoint or command: give the workload a command",
                container.image
            ));
        }
        // The image's environment, the workload's over it, then what the
        // sandbox decides (GPU visibility), which the tenant cannot override.
        let mut env: Vec<(String, String)> = image
            .env
            .iter()
            .flatten()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let mut set = |k: &str, v: &str| {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        };
        for (k, v) in &container.env {
            set(k, v);
        }
        for (k, v) in sandbox
            .env
            .iter()
            .filter(|(k, _)| k.ends_with("VISIBLE_DEVICES"))
        {
            set(k, v);
        }
        if self.retries().is_some() {
            // As Kubernetes' indexed jobs: which index this replica runs.
            set("JOB_COMPLETION_INDEX", &self.spec().replica.to_string());
        }
        set("HOME", "/scratch");
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push((
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ));
        }
        // Checked by the control plane; checked again because it becomes
        // a file's content and the UTS name.
        let hostname = container
            .hostname
            .clone()
            .filter(|h| atrium_core::workload::is_hostname(h))
            .unwrap_or_else(|| self.spec().deployment_name.clone());
        env.retain(|(k, _)| k != "HOSTNAME");
        env.push(("HOSTNAME".into(), hostname.clone()));
        let resources = &self.spec().resources;
        let gpus: Vec<u32> = self.spec().gpus.iter().map(|g| g.gpu).collect();
        let bundle = Bundle {
            dir: self.shared.config.data_dir.join("bundles").join(&self.id),
            rootfs: pulled.rootfs.clone(),
            hostname,
            args,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: image
                .working_dir
                .clone()
                .filter(|d| d.starts_with('/'))
                .unwrap_or_else(|| "/".into()),
            uid,
            netns: sandbox.netns_path.clone(),
            cgroup: sandbox.cgroup.clone(),
            memory: resources.memory.0,
            cpu_quota_us: resources.cpu.0.saturating_mul(CPU_PERIOD_US) / 1000,
            cpu_period_us: CPU_PERIOD_US,
            pids: u64::from(PIDS_LIMIT),
            scratch,
            devices: gpu_devices(&gpus),
            volumes,
        };
        let written = tokio::task::spawn_blocking(move || bundle.write())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        let dir = match written {
            Ok(dir) => dir,
            Err(e) => {
                self.shared.state.update(|s| s.running.remove(&self.id));
                return Err(e);
            }
        };
        let runc = self.runc();
        runc.delete(&self.id);
        let (out, err) = self.log_stdio();
        let child = tokio::process::Command::new(&runc.binary)
            .args(runc.run_args(&self.id, &dir))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn();
        running.isolation = format!("{} runtime=runc image={}", running.isolation, pulled.digest);
        if port.is_none() {
            running.endpoint = format!("tcp://{}", sandbox.listen_ip);
        }
        let child = self.started(child, &mut running, "runc")?;
        let pid = running.pid;
        tracing::info!(placement = %self.id, pid, image = %container.image, digest = %pulled.digest,
            fetched = pulled.fetched, "agent: container started");
        Ok((Engine::Child(child), running))
    }

    /// The placement's volumes, made and mounted on this node, as binds
    /// into the container. A mount point outside `/volumes` must be a
    /// directory the image has.
    async fn bind_volumes(&self, uid: u32, rootfs: &Path) -> Result<Vec<VolumeBind>, String> {
        let attachments = self.spec().volumes.clone();
        if attachments.is_empty() {
            return Ok(Vec::new());
        }
        let (shared, rootfs) = (self.shared.clone(), rootfs.to_path_buf());
        let bind = move |a: &VolumeAttachment| -> Result<VolumeBind, String> {
            check_path(&a.path)?;
            if !a.path.starts_with(&format!("{VOLUMES_DIR}/")) {
                image_dir(&rootfs, &a.path)?;
            }
            let source = shared.volumes.ensure(&a.id, a.size.0, uid)?;
            Ok(VolumeBind {
                source,
                destination: a.path.clone(),
                read_only: a.read_only,
            })
        };
        tokio::task::spawn_blocking(move || {
            attachments
                .iter()
                .map(|a| bind(a).map_err(|why| format!("volume {}: {why}", a.name)))
                .collect()
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// A container is healthy when its first port accepts a connection,
    /// or, with no port, as long as it runs.
    pub(super) async fn container_healthy(&self, endpoint: &str) -> bool {
        let Some(addr) = endpoint.strip_prefix("tcp://").filter(|a| a.contains(':')) else {
            return true;
        };
        let connect = tokio::net::TcpStream::connect(addr);
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), connect).await,
            Ok(Ok(_))
        )
    }
}

/// Checks that `path` is a directory of the image at `rootfs`, reached
/// without a symlink: runc would otherwise make the mount point in the
/// cached image, which other tenants' containers share.
fn image_dir(rootfs: &Path, path: &str) -> Result<(), String> {
    let mut at = rootfs.to_path_buf();
    for part in path.trim_start_matches('/').split('/') {
        at.push(part);
        let is_dir = std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir());
        if !is_dir {
            return Err(format!(
                "{path} is not a directory of the image (symlinks are not followed): \
                 mount it under {VOLUMES_DIR}/ or at a directory the image has"
            ));
        }
    }
    Ok(())
}
