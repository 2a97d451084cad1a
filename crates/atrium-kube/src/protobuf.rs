//! The little of Kubernetes' protobuf encoding a tenant cluster reads:
//! client-go's typed clients send some requests only as protobuf
//! (`kubectl create token` sends its `TokenRequest` so). A body is the
//! magic `k8s\0` and a `runtime.Unknown` whose `raw` field (2) holds the
//! object. Everything is bounds-checked; what cannot be read is refused,
//! never guessed.

use crate::KubeError;

const MAGIC: &[u8] = b"k8s\0";

/// One field of a message: its number and, for what is read here, its
/// value (a varint, or length-delimited bytes).
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn bad() -> KubeError {
    KubeError::bad_request("the protobuf body cannot be read; send the object as JSON")
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, KubeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*at).ok_or_else(bad)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(bad())
}

/// The fields of `msg`, in order.
fn fields(msg: &[u8]) -> Result<Vec<(u64, Value<'_>)>, KubeError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Value::Varint(varint(msg, &mut at)?),
            2 => {
                let len = usize::try_from(varint(msg, &mut at)?).map_err(|_| bad())?;
                let end = at
                    .checked_add(len)
                    .filter(|e| *e <= msg.len())
                    .ok_or_else(bad)?;
                let bytes = &msg[at..end];
                at = end;
                Value::Bytes(bytes)
            }
            1 => {
                at = at
                    .checked_add(8)
                    .filter(|e| *e <= msg.len())
                    .ok_or_else(bad)?;
                continue;
            }
            5 => {
                at = at
                    .checked_add(4)
                    .filter(|e| *e <= msg.len())
                    .ok_or_else(bad)?;
                continue;
            }
            _ => return Err(bad()),
        };
        out.push((number, value));
    }
    Ok(out)
}

fn bytes_of<'a>(fields: &[(u64, Value<'a>)], number: u64) -> Option<&'a [u8]> {
    fields.iter().rev().find_map(|(n, v)| match v {
        Value::Bytes(b) if *n == number => Some(*b),
        _ => None,
    })
}

/// The object inside a `k8s\0` envelope.
fn unwrap_envelope(body: &[u8]) -> Result<&[u8], KubeError> {
    let unknown = body.strip_prefix(MAGIC).ok_or_else(bad)?;
    bytes_of(&fields(unknown)?, 2).ok_or_else(bad)
}

/// A `TokenRequest`'s spec: its audiences and `expirationSeconds`.
pub fn token_request_spec(body: &[u8]) -> Result<(Vec<String>, Option<i64>), KubeError> {
    let request = fields(unwrap_envelope(body)?)?;
    let Some(spec) = bytes_of(&request, 2) else {
        return Ok((Vec::new(), None));
    };
    let spec = fields(spec)?;
    let mut audiences = Vec::new();
    let mut seconds = None;
    for (number, value) in &spec {
        match (number, value) {
            (1, Value::Bytes(b)) => {
                audiences.push(String::from_utf8(b.to_vec()).map_err(|_| bad())?);
            }
            (4, Value::Varint(v)) => seconds = Some(i64::try_from(*v).map_err(|_| bad())?),
            _ => {}
        }
    }
    Ok((audiences, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_bytes(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3 | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    /// A `kubectl create token --duration=20m` body, as client-go frames it.
    fn token_request(seconds: u64) -> Vec<u8> {
        let mut spec = field_bytes(1, b"https://kubernetes.default.svc");
        spec.push(4 << 3);
        let mut v = seconds;
        while v >= 0x80 {
            spec.push((v as u8) | 0x80);
            v >>= 7;
        }
        spec.push(v as u8);
        let object = [field_bytes(1, b""), field_bytes(2, &spec)].concat();
        let type_meta = [
            field_bytes(1, b"authentication.k8s.io/v1"),
            field_bytes(2, b"TokenRequest"),
        ]
        .concat();
        let unknown = [field_bytes(1, &type_meta), field_bytes(2, &object)].concat();
        [MAGIC, &unknown].concat()
    }

    #[test]
    fn a_token_requests_spec_is_read_from_its_envelope() {
        let (audiences, seconds) = token_request_spec(&token_request(1200)).unwrap();
        assert_eq!(audiences, ["https://kubernetes.default.svc"]);
        assert_eq!(seconds, Some(1200));
    }

    #[test]
    fn truncated_or_hostile_bodies_are_refused_not_read_past() {
        let whole = token_request(1200);
        for cut in 0..whole.len() {
            let _ = token_request_spec(&whole[..cut]);
        }
        assert!(token_request_spec(b"{\"json\": true}").is_err());
        // A length far past the end, and a varint that never ends.
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&[2 << 3 | 2, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(token_request_spec(&long).is_err());
        let mut endless = MAGIC.to_vec();
        endless.extend_from_slice(&[0x80; 20]);
        assert!(token_request_spec(&endless).is_err());
    }
}
