//! `atrium image`: the images in the control plane's registry that the
//! caller may read, and deleting them. Pushing is any OCI client's job
//! (skopeo, crane, docker) with a tenant key as the password.
#![allow(clippy::print_stdout)]

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::Ctx;
use crate::client::Columns;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Every tag the caller may read: repository, tag, digest, size.
    List,
    /// Delete an image (`REPO:TAG` or `REPO@sha256:…`): its manifest and
    /// every tag naming it. Its storage is freed at the next garbage
    /// collection.
    Delete { image: String },
}

const IMAGE_COLUMNS: Columns = &[
    ("REPOSITORY", "/repository"),
    ("TAG", "/tag"),
    ("DIGEST", "/digest"),
    ("SIZE", "/size"),
];

#[derive(Serialize)]
struct ImageRow {
    repository: String,
    tag: String,
    digest: String,
    /// Config and layers, compressed, as the manifest states them; `None`
    /// for an index.
    size: Option<u64>,
}

#[derive(Deserialize)]
struct Catalog {
    repositories: Vec<String>,
}

#[derive(Deserialize)]
struct Tags {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Descriptor {
    size: u64,
}

#[derive(Deserialize)]
struct Manifest {
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

pub async fn run(ctx: &Ctx, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::List => list(ctx).await,
        ImageCmd::Delete { image } => delete(ctx, &image).await,
    }
}

async fn list(ctx: &Ctx) -> Result<()> {
    let catalog: Catalog = ctx
        .cp
        .request(Method::GET, "/v2/_catalog", None::<&()>)
        .await?;
    let mut rows = Vec::new();
    for repository in catalog.repositories {
        let tags: Tags = ctx
            .cp
            .request(
                Method::GET,
                &format!("/v2/{repository}/tags/list"),
                None::<&()>,
            )
            .await?;
        for tag in tags.tags.unwrap_or_default() {
            let (digest, size) = manifest(ctx, &repository, &tag).await?;
            rows.push(ImageRow {
                repository: repository.clone(),
                tag,
                digest,
                size,
            });
        }
    }
    ctx.show(&serde_json::json!({ "items": rows }), IMAGE_COLUMNS)
}

/// The digest of the manifest `reference` names, and its image's size.
async fn manifest(ctx: &Ctx, repository: &str, reference: &str) -> Result<(String, Option<u64>)> {
    let bytes = ctx
        .cp
        .get_bytes(&format!("/v2/{repository}/manifests/{reference}"))
        .await?;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let size = serde_json::from_slice::<Manifest>(&bytes)
        .ok()
        .and_then(|m| {
            let config = m.config?.size;
            m.layers
                .iter()
                .try_fold(config, |sum, l| sum.checked_add(l.size))
        });
    Ok((digest, size))
}

/// `REPO:TAG` or `REPO@DIGEST`, split where the reference starts.
fn split_image(image: &str) -> Result<(&str, &str)> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
    if let Some(bad) = image.chars().find(|c| !allowed(*c)) {
        bail!("{image:?}: {bad:?} cannot be in an image name; write REPO:TAG or REPO@sha256:…");
    }
    if let Some((repository, digest)) = image.split_once('@') {
        return Ok((repository, digest));
    }
    let last = image.rfind('/').map_or(0, |i| i + 1);
    match image[last..].rfind(':') {
        Some(i) => Ok((&image[..last + i], &image[last + i + 1..])),
        None => bail!("{image:?} names no tag or digest; write REPO:TAG or REPO@sha256:…"),
    }
}

async fn delete(ctx: &Ctx, image: &str) -> Result<()> {
    let (repository, reference) = split_image(image)?;
    // Deleting by tag would only untag; the image goes by its digest.
    let digest = if reference.starts_with("sha256:") {
        reference.to_string()
    } else {
        manifest(ctx, repository, reference)
            .await
            .with_context(|| format!("finding {image}"))?
            .0
    };
    let _: serde_json::Value = ctx
        .cp
        .request(
            Method::DELETE,
            &format!("/v2/{repository}/manifests/{digest}"),
            None::<&()>,
        )
        .await?;
    println!("deleted {repository}@{digest}; its storage is freed at the next garbage collection");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_split_at_their_reference() {
        assert_eq!(
            split_image("acme/busybox:1").unwrap(),
            ("acme/busybox", "1")
        );
        assert_eq!(
            split_image("localhost:5000/acme/x:v2").unwrap(),
            ("localhost:5000/acme/x", "v2")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_image(&format!("acme/x@{d}")).unwrap(),
            ("acme/x", d.as_str())
        );
        assert!(split_image("acme/busybox").is_err());
        assert!(split_image("acme/x:1?mount=y").is_err());
        assert!(split_image("acme/x:1#").is_err());
    }
}
