//! What a registry request names: a repository, a tag, a digest, an upload.
//! Every one of them becomes a path under the registry's directory, so each
//! is checked against the OCI distribution grammar (narrowed where the
//! grammar would let a name reach outside its place) before any file is
//! touched: no component can be empty, `.`, `..`, start with `_` (our own
//! bookkeeping directories) or hold a `/` or `%`.

use std::fmt;

/// Longest repository name accepted, as the distribution reference allows.
const MAX_REPO_LEN: usize = 255;
/// Length of the upload ids this registry hands out.
pub const UPLOAD_ID_LEN: usize = 32;

/// The namespace of the provider's public images, readable by every tenant.
pub const PUBLIC_NAMESPACE: &str = "library";

/// A repository: `<namespace>/<path>`, the namespace being a tenant's name
/// or [`PUBLIC_NAMESPACE`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Repo {
    name: String,
}

impl Repo {
    pub fn parse(name: &str) -> Result<Repo, String> {
        if name.len() > MAX_REPO_LEN {
            return Err(format!(
                "repository names are at most {MAX_REPO_LEN} characters"
            ));
        }
        let components: Vec<&str> = name.split('/').collect();
        if components.len() < 2 {
            return Err(format!(
                "{name:?} has no namespace: name it <tenant>/{name} (or {PUBLIC_NAMESPACE}/{name})"
            ));
        }
        if let Some(bad) = components.iter().find(|c| !valid_component(c)) {
            return Err(format!(
                "{name:?}: component {bad:?} must be lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes"
            ));
        }
        Ok(Repo {
            name: name.to_string(),
        })
    }

    /// The tenant (or `library`) the repository belongs to.
    pub fn namespace(&self) -> &str {
        self.name.split('/').next().unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// `repo:tag` or `repo@digest`, as clients name an image.
    pub fn image(&self, reference: &Reference) -> String {
        match reference {
            Reference::Tag(tag) => format!("{self}:{tag}"),
            Reference::Digest(digest) => format!("{self}@{digest}"),
        }
    }

    /// Its components, each safe as one path component.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.name.split('/')
    }
}

impl fmt::Display for Repo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Whether `s` can be a repository's first component (one path component).
pub fn is_namespace(s: &str) -> bool {
    valid_component(s)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: alphanumeric runs joined by one
/// separator each, so never empty, never `.`/`..`, never starting with `_`.
fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// A content digest. Only SHA-256 is accepted: it is what every client
/// pushes, and one algorithm keeps blob paths unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, String> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(format!(
                "{s:?} is not a digest: write sha256:<64 hex digits>"
            ));
        };
        if algorithm != "sha256" {
            return Err(format!(
                "digest algorithm {algorithm:?} is not supported; use sha256"
            ));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("{s:?}: a sha256 digest is 64 lowercase hex digits"));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest::from_hasher(sha2::Sha256::new_with_prefix(bytes))
    }

    pub fn from_hasher(hasher: sha2::Sha256) -> Digest {
        use sha2::Digest as _;
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex digits: safe as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, String> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        // `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`: never `.` or `..`.
        let ok = (1..=128).contains(&s.len())
            && s.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
            });
        if ok {
            Ok(Reference::Tag(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is neither a tag (letters, digits, '_', then also '.' and '-', \
                 at most 128) nor a sha256 digest"
            ))
        }
    }
}

/// Checks an upload id from a URL: exactly what [`new_upload_id`] makes.
pub fn check_upload_id(id: &str) -> Result<(), String> {
    if id.len() == UPLOAD_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!("{id:?} is not an upload this registry started"))
    }
}

pub fn new_upload_id() -> String {
    crate::auth::random_token(UPLOAD_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_that_could_leave_their_directory_are_refused() {
        for ok in ["acme/busybox", "acme/team/a.b_c__d--e", "library/python3"] {
            assert!(Repo::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "busybox",
            "acme/../globex/x",
            "acme/./x",
            "acme//x",
            "acme/x/",
            "/acme/x",
            "acme/_layers",
            "acme/x/_manifests",
            "acme/X",
            "acme/%2e%2e",
            "acme/a\\b",
            "acme/a..b",
            "acme/a___b",
            "acme/-a",
            "acme/a.",
            "acme/a\0b",
        ] {
            assert!(Repo::parse(bad).is_err(), "{bad}");
        }
        let long = format!("acme/{}", "a".repeat(300));
        assert!(Repo::parse(&long).is_err());
        let repo = Repo::parse("acme/team/app").unwrap();
        assert_eq!(repo.namespace(), "acme");
        assert_eq!(repo.image(&Reference::Tag("1".into())), "acme/team/app:1");
        let digest = Digest::of(b"");
        assert_eq!(
            repo.image(&Reference::Digest(digest.clone())),
            format!("acme/team/app@{digest}")
        );
        assert_eq!(
            repo.components().collect::<Vec<_>>(),
            ["acme", "team", "app"]
        );
    }

    #[test]
    fn only_plain_tags_and_sha256_digests_are_references() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        for tag in ["1", "latest", "v1.2-rc_3", "_x"] {
            assert_eq!(Reference::parse(tag), Ok(Reference::Tag(tag.into())));
        }
        for bad in [
            "",
            ".",
            "..",
            "-x",
            "a/b",
            "a%2f",
            "sha512:00",
            "sha256:ABCD",
            "sha256:../../etc",
            &"t".repeat(129),
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn upload_ids_are_only_ours() {
        assert!(check_upload_id(&new_upload_id()).is_ok());
        for bad in ["", "../x", &"a".repeat(31), &format!("{}/", "a".repeat(31))] {
            assert!(check_upload_id(bad).is_err(), "{bad}");
        }
    }
}
