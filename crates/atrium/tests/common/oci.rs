//! OCI images the tests build themselves: a busybox image in an OCI
//! layout directory, as skopeo reads it.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image layout holding busybox as image `1`; returns its manifest
/// digest and the digests of its config and layer.
pub fn busybox_layout(dir: &Path) -> (String, Vec<String>) {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    // The applets a test execs by name, as an image's would be.
    for applet in ["cat", "sh"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let layer_tar = dir.join("layer.tar");
    let tar = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--mtime=@0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    let diff_id = sha256(&std::fs::read(&layer_tar).unwrap());
    // Compressed, as skopeo would compress it on the way to a registry:
    // the layer it pushes is then byte for byte this one.
    assert!(Command::new("gzip")
        .arg("-n")
        .arg(&layer_tar)
        .status()
        .unwrap()
        .success());
    let layer_tar = dir.join("layer.tar.gz");
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let digest = sha256(bytes);
        std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        digest
    };
    let layer = std::fs::read(&layer_tar).unwrap();
    let layer_digest = put(&layer);
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string();
    let config_digest = put(config.as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer.len()}],
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    (manifest_digest, vec![config_digest, layer_digest])
}
