//! `atrium volume`: a tenant's persistent disks, mounted into its
//! workloads (`atrium workload run … --volume data:/data`).

use anyhow::{anyhow, Result};
use atrium_api::Volume;
use atrium_core::quantity::ByteSize;
use atrium_core::volume::{VolumeMount, VolumeSpec};
use clap::Subcommand;

use super::{create, read, Ctx, FromFile, ReadCmd};
use crate::client::Columns;

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// A volume of a hard size, e.g. `atrium volume create data --size 10Gi`;
    /// it is made on the node of the first workload that mounts it
    Create {
        name: Option<String>,
        #[arg(long)]
        size: Option<ByteSize>,
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        from: FromFile,
    },
    #[command(flatten)]
    Read(ReadCmd),
}

pub const VOLUME_COLUMNS: Columns = &[
    ("NAME", "/name"),
    ("TENANT", "/tenant"),
    ("SIZE", "/spec/size"),
    ("NODE", "/status/node"),
    ("ID", "/id"),
];

pub async fn run(ctx: &Ctx, cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            tenant,
            from,
        } => {
            create::<Volume>(ctx, VOLUME_COLUMNS, &from, name, tenant, || {
                Ok(VolumeSpec {
                    size: size.ok_or_else(|| anyhow!("--size is required (e.g. 10Gi)"))?,
                })
            })
            .await
        }
        VolumeCmd::Read(c) => read::<Volume>(ctx, VOLUME_COLUMNS, &c).await,
    }
}

/// Parses `--volume NAME[:PATH][:ro]`.
pub fn parse_mount(s: &str) -> Result<VolumeMount, String> {
    let mut parts = s.split(':');
    let volume = parts.next().unwrap_or_default().to_string();
    let mut mount = VolumeMount {
        volume,
        path: None,
        read_only: false,
    };
    for part in parts {
        match part {
            "ro" if !mount.read_only => mount.read_only = true,
            p if p.starts_with('/') && mount.path.is_none() => mount.path = Some(p.to_string()),
            _ => return Err(format!("{s:?} is not NAME[:/PATH][:ro]")),
        }
    }
    if mount.volume.is_empty() {
        return Err(format!("{s:?} names no volume: NAME[:/PATH][:ro]"));
    }
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_with_a_path_and_read_only_in_either_order() {
        let m = parse_mount("data:/data:ro").unwrap();
        assert_eq!(
            (m.volume.as_str(), m.path.as_deref(), m.read_only),
            ("data", Some("/data"), true)
        );
        let m = parse_mount("data").unwrap();
        assert_eq!((m.path, m.read_only), (None, false));
        for bad in ["", ":/x", "data:rel", "data:ro:ro", "data:/a:/b"] {
            assert!(parse_mount(bad).is_err(), "{bad:?}");
        }
    }
}
