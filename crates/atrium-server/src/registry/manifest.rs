//! Manifests as the registry checks them: which media types it stores and
//! which blobs or manifests each one references, so nothing is accepted
//! that points at content the repository does not hold, and garbage
//! collection knows what is still in use.

use serde::Deserialize;

use super::names::Digest;

/// Largest manifest accepted (as the reference registry).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What one manifest needs present in its repository.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    /// Config and layers: blobs.
    pub blobs: Vec<Digest>,
    /// An index's entries: manifests.
    pub manifests: Vec<Digest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest sent with `content_type` (or, without one, the media
/// type it names itself), returning its media type and references.
pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<(String, References), String> {
    let body: Body = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let media_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| !c.is_empty() && c != "application/json" && c != "application/octet-stream")
        .or(body.media_type.clone())
        .ok_or("send the manifest's media type as its Content-Type")?;
    if let Some(own) = &body.media_type {
        if *own != media_type {
            return Err(format!(
                "the manifest says it is {own} but was sent as {media_type}"
            ));
        }
    }
    let digest = |d: &Descriptor| Digest::parse(&d.digest);
    let references = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = body
                .config
                .as_ref()
                .ok_or("an image manifest has a config")?;
            let mut blobs = vec![digest(config)?];
            for layer in &body.layers {
                blobs.push(digest(layer)?);
            }
            References {
                blobs,
                manifests: Vec::new(),
            }
        }
        OCI_INDEX | DOCKER_LIST => References {
            blobs: Vec::new(),
            manifests: body
                .manifests
                .as_deref()
                .ok_or("an index lists manifests")?
                .iter()
                .map(digest)
                .collect::<Result<_, _>>()?,
        },
        other => {
            return Err(format!(
                "media type {other:?} is not stored here; push an OCI or Docker v2 image \
                 manifest or index"
            ))
        }
    };
    Ok((media_type, references))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn an_image_manifest_references_its_config_and_layers() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[{{"mediaType":"y","digest":"{}","size":2}}]}}"#,
            d('a'),
            d('b')
        );
        let (media, refs) = parse(Some(OCI_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(media, OCI_MANIFEST);
        assert_eq!(refs.blobs.len(), 2);
        assert_eq!(refs.blobs[1].to_string(), d('b'));
        // Without a Content-Type, its own mediaType says what it is.
        assert!(parse(None, body.as_bytes()).is_ok());
        // Sent as one thing while claiming another: refused.
        assert!(parse(Some(OCI_INDEX), body.as_bytes()).is_err());
    }

    #[test]
    fn an_index_references_manifests_and_bad_ones_are_refused() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}}]}}"#,
            d('c')
        );
        let (_, refs) = parse(Some(OCI_INDEX), index.as_bytes()).unwrap();
        assert_eq!(refs.manifests.len(), 1);
        for (ct, bad) in [
            (Some(OCI_MANIFEST), "not json".to_string()),
            (Some(OCI_MANIFEST), r#"{"layers":[]}"#.to_string()),
            (Some("text/plain"), r#"{"layers":[]}"#.to_string()),
            (None, r#"{"layers":[]}"#.to_string()),
            (
                Some(OCI_MANIFEST),
                r#"{"config":{"digest":"sha256:../../etc/passwd"}}"#.to_string(),
            ),
            (
                Some(OCI_INDEX),
                r#"{"manifests":[{"digest":"md5:00"}]}"#.to_string(),
            ),
        ] {
            assert!(parse(ct, bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
