//! Resource names: DNS labels, so they can become hostnames, Kubernetes
//! names and path segments without escaping.

/// Checks that `name` is a DNS label: 1–63 characters of lowercase ASCII
/// letters, digits and `-`, starting with a letter and not ending with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "must be 1 to 63 characters long, got {}",
            name.len()
        ));
    }
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_lowercase() {
        return Err(format!("{name:?} must start with a lowercase letter"));
    }
    if bytes[bytes.len() - 1] == b'-' {
        return Err(format!("{name:?} must not end with '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use lowercase letters, digits and '-' only"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn accepts_dns_labels_and_rejects_the_rest() {
        for ok in ["a", "acme", "acme-2", "x1"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Acme",
            "1acme",
            "acme-",
            "ac_me",
            "ac.me",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
