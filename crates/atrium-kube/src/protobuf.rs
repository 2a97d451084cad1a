//! The little of Kubernetes' protobuf encoding a tenant cluster reads:
//! client-go's typed clients send some requests only as protobuf —
//! `kubectl create token` its `TokenRequest`, `kubectl create configmap …`
//! and `kubectl run` their objects — and do not fall back to JSON when
//! refused. A body is the magic `k8s\0` and a `runtime.Unknown` whose
//! `typeMeta` (1) names the object and whose `raw` (2) holds it. The
//! objects of `messages` are read into the JSON the rest of the API takes.
//! Everything is bounds-checked, and the read follows a fixed, non-recursive
//! table, so no body can make it loop or nest without end; what cannot be
//! read is refused, never guessed.

mod messages;

use base64::Engine as _;
use serde_json::{Map, Value as Json};

use crate::KubeError;
use messages::{Card, Field, Kind};

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

/// The object in a `k8s\0` envelope as the JSON the API takes, when it is
/// of a kind `messages` reads; `None` when it is not (the caller answers
/// 415, naming JSON).
pub fn object(body: &[u8]) -> Result<Option<Json>, KubeError> {
    let unknown = fields(body.strip_prefix(MAGIC).ok_or_else(bad)?)?;
    if [3, 4]
        .iter()
        .any(|n| bytes_of(&unknown, *n).is_some_and(|b| !b.is_empty()))
    {
        return Err(refused("the envelope", "an encoded or typed raw body"));
    }
    let type_meta = fields(bytes_of(&unknown, 1).unwrap_or_default())?;
    let text = |number| {
        std::str::from_utf8(bytes_of(&type_meta, number).unwrap_or_default())
            .map_err(|_| refused("typeMeta", "not UTF-8"))
    };
    let (api_version, kind) = (text(1)?, text(2)?);
    let Some(message) = messages::message_of(api_version, kind) else {
        return Ok(None);
    };
    let mut object = read_message(bytes_of(&unknown, 2).unwrap_or_default(), message, "")?;
    object.insert("apiVersion".into(), api_version.into());
    object.insert("kind".into(), kind.into());
    Ok(Some(Json::Object(object)))
}

fn refused(at: &str, why: &str) -> KubeError {
    KubeError::bad_request(format!(
        "the protobuf body cannot be read at {at}: {why}; send the object as JSON \
         (kubectl create -f or apply -f)"
    ))
}

fn read_message(msg: &[u8], table: &[Field], path: &str) -> Result<Map<String, Json>, KubeError> {
    let mut out = Map::new();
    for (number, value) in fields(msg)? {
        let field = table.iter().find(|f| f.number == number).ok_or_else(|| {
            let at = if path.is_empty() { "the object" } else { path };
            refused(at, &format!("field {number} is not one this server reads"))
        })?;
        let at = if path.is_empty() {
            field.json.to_string()
        } else {
            format!("{path}.{}", field.json)
        };
        let bytes = || match value {
            Value::Bytes(b) => Ok(b),
            Value::Varint(_) => Err(refused(&at, "a number where a message or string belongs")),
        };
        if let Kind::MapStr | Kind::MapBytes | Kind::MapQuantity = field.kind {
            let (key, entry) = map_entry(bytes()?, field.kind, &at)?;
            let map = out
                .entry(field.json)
                .or_insert_with(|| Json::Object(Map::new()));
            if let Json::Object(map) = map {
                map.insert(key, entry);
            }
            continue;
        }
        let read = read_value(field.kind, &value, &at)?;
        match field.card {
            Card::Repeated => {
                let list = out
                    .entry(field.json)
                    .or_insert_with(|| Json::Array(Vec::new()));
                if let Json::Array(list) = list {
                    list.push(read);
                }
            }
            Card::Value if is_zero(&read) => {
                out.remove(field.json);
            }
            Card::Value | Card::Pointer => {
                out.insert(field.json.into(), read);
            }
        }
    }
    Ok(out)
}

/// What Go's JSON leaves out of a value field (`omitempty`).
fn is_zero(value: &Json) -> bool {
    match value {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::String(s) => s.is_empty(),
        Json::Number(n) => n.as_i64() == Some(0),
        Json::Array(_) | Json::Object(_) => false,
    }
}

fn read_value(kind: Kind, value: &Value<'_>, at: &str) -> Result<Json, KubeError> {
    let wrong = || refused(at, "the wrong wire type for this field");
    match (kind, value) {
        (Kind::Bool, Value::Varint(v)) => Ok(Json::Bool(*v != 0)),
        // int32 and int64 are sign-extended to 64 bits on the wire.
        (Kind::Int32, Value::Varint(v)) => i32::try_from(*v as i64)
            .map(Json::from)
            .map_err(|_| refused(at, "out of the range of int32")),
        (Kind::Int64, Value::Varint(v)) => Ok(Json::from(*v as i64)),
        (Kind::Str, Value::Bytes(b)) => utf8(b, at).map(Json::from),
        (Kind::Message(table), Value::Bytes(b)) => Ok(Json::Object(read_message(b, table, at)?)),
        (Kind::Time, Value::Bytes(b)) => time(b, at),
        (Kind::IntOrString, Value::Bytes(b)) => int_or_string(b, at),
        (Kind::Opaque, Value::Bytes([])) => Ok(Json::Null),
        (Kind::Discarded, Value::Bytes(_)) => Ok(Json::Null),
        (Kind::Opaque, Value::Bytes(_)) => {
            Err(refused(at, "a field this server reads only as JSON"))
        }
        _ => Err(wrong()),
    }
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn utf8(bytes: &[u8], at: &str) -> Result<String, KubeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| refused(at, "a string that is not UTF-8"))
}

/// A map entry: a message of its key (1) and value (2).
fn map_entry(entry: &[u8], kind: Kind, at: &str) -> Result<(String, Json), KubeError> {
    let entry = fields(entry)?;
    let key = utf8(bytes_of(&entry, 1).unwrap_or_default(), at)?;
    let raw = bytes_of(&entry, 2).unwrap_or_default();
    let value = match kind {
        Kind::MapBytes => Json::from(B64.encode(raw)),
        Kind::MapQuantity => Json::from(utf8(bytes_of(&fields(raw)?, 1).unwrap_or_default(), at)?),
        _ => Json::from(utf8(raw, at)?),
    };
    Ok((key, value))
}

/// `meta.v1.Time`: RFC 3339, or null when zero (Go writes a zero time as
/// an empty message).
fn time(msg: &[u8], at: &str) -> Result<Json, KubeError> {
    let parts = fields(msg)?;
    let number = |n| {
        parts.iter().rev().find_map(|(f, v)| match v {
            Value::Varint(v) if *f == n => Some(*v as i64),
            _ => None,
        })
    };
    let (seconds, nanos) = (number(1).unwrap_or(0), number(2).unwrap_or(0));
    if seconds == 0 && nanos == 0 {
        return Ok(Json::Null);
    }
    let bad_time = || refused(at, "not a time");
    let nanos = i128::from(seconds) * 1_000_000_000 + i128::from(nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(Json::from)
        .ok_or_else(bad_time)
}

/// `util.intstr.IntOrString`: its type (1) says whether `intVal` (2) or
/// `strVal` (3) is meant.
fn int_or_string(msg: &[u8], at: &str) -> Result<Json, KubeError> {
    let parts = fields(msg)?;
    let varint = |n| {
        parts.iter().rev().find_map(|(f, v)| match v {
            Value::Varint(v) if *f == n => Some(*v),
            _ => None,
        })
    };
    match varint(1).unwrap_or(0) {
        0 => read_value(Kind::Int32, &Value::Varint(varint(2).unwrap_or(0)), at),
        1 => utf8(bytes_of(&parts, 3).unwrap_or_default(), at).map(Json::from),
        _ => Err(refused(at, "neither an int nor a string")),
    }
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
        let spec = [
            field_bytes(1, b"https://kubernetes.default.svc"),
            field_varint(4, seconds),
        ]
        .concat();
        let object = [field_bytes(1, b""), field_bytes(2, &spec)].concat();
        envelope("authentication.k8s.io/v1", "TokenRequest", &object)
    }

    fn field_varint(number: u64, mut v: u64) -> Vec<u8> {
        let mut out = vec![(number << 3) as u8];
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    }

    fn envelope(api_version: &str, kind: &str, object: &[u8]) -> Vec<u8> {
        let type_meta = [
            field_bytes(1, api_version.as_bytes()),
            field_bytes(2, kind.as_bytes()),
        ]
        .concat();
        let unknown = [field_bytes(1, &type_meta), field_bytes(2, object)].concat();
        [MAGIC, &unknown].concat()
    }

    fn entry(key: &[u8], value: &[u8]) -> Vec<u8> {
        [field_bytes(1, key), field_bytes(2, value)].concat()
    }

    /// A config map as Go writes it: empty value fields written too, an
    /// empty creation time, a map of strings and one of bytes.
    fn config_map() -> Vec<u8> {
        let meta = [
            field_bytes(1, b"settings"),
            field_bytes(2, b""),
            field_varint(7, 0),
            field_bytes(8, b""),
            field_bytes(11, &entry(b"app", b"web")),
        ]
        .concat();
        let object = [
            field_bytes(1, &meta),
            field_bytes(2, &entry(b"mode", b"fast")),
            field_bytes(2, &entry(b"level", b"3")),
            field_bytes(3, &entry(b"blob", &[0xff, 0x00])),
        ]
        .concat();
        envelope("v1", "ConfigMap", &object)
    }

    #[test]
    fn an_object_reads_into_the_json_the_api_takes() {
        let object = object(&config_map()).unwrap().unwrap();
        assert_eq!(
            object,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "settings", "labels": {"app": "web"}},
                "data": {"mode": "fast", "level": "3"},
                "binaryData": {"blob": "/wA="},
            })
        );
        // A kind not read here is the caller's to refuse with 415.
        assert!(object_of("v1", "Node", &[]).unwrap().is_none());
    }

    fn object_of(api_version: &str, kind: &str, body: &[u8]) -> Result<Option<Json>, KubeError> {
        object(&envelope(api_version, kind, body))
    }

    #[test]
    fn a_pointers_zero_is_kept_a_values_is_left_out_and_numbers_keep_their_sign() {
        let port = |target: &[u8]| [field_varint(3, 80), field_bytes(4, target)].concat();
        let spec = [field_varint(1, 0), field_varint(5, 0), field_bytes(3, &[])].concat();
        let deployment = object_of("apps/v1", "Deployment", &field_bytes(2, &spec))
            .unwrap()
            .unwrap();
        assert_eq!(
            deployment["spec"],
            serde_json::json!({"replicas": 0, "template": {}})
        );

        let named = [field_varint(1, 1), field_bytes(3, b"http")].concat();
        let numbered = field_varint(2, 8080);
        let service_spec = [
            field_bytes(1, &port(&named)),
            field_bytes(1, &port(&numbered)),
        ]
        .concat();
        let service = object_of("v1", "Service", &field_bytes(2, &service_spec))
            .unwrap()
            .unwrap();
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
        assert_eq!(service["spec"]["ports"][1]["targetPort"], 8080);

        // -1 as an int32 is ten bytes, sign-extended; kept, for validation
        // to refuse with its own message.
        let negative = field_varint(1, u64::MAX);
        let job = object_of("batch/v1", "Job", &field_bytes(2, &negative))
            .unwrap()
            .unwrap();
        assert_eq!(job["spec"]["parallelism"], -1);
        let too_big = field_varint(1, 1 << 40);
        let refused = object_of("batch/v1", "Job", &field_bytes(2, &too_big)).unwrap_err();
        assert!(refused.to_status()["message"]
            .as_str()
            .unwrap()
            .contains("spec.parallelism"));
    }

    #[test]
    fn what_is_not_read_is_refused_by_where_it_is_never_dropped() {
        let message = |e: KubeError| e.to_status()["message"].as_str().unwrap().to_string();
        // A container's security context is read only from JSON.
        let container = [
            field_bytes(1, b"main"),
            field_bytes(15, &field_varint(1, 1)),
        ]
        .concat();
        let pod_spec = field_bytes(2, &container);
        let template = field_bytes(2, &pod_spec);
        let spec = field_bytes(3, &template);
        let said = message(object_of("apps/v1", "Deployment", &field_bytes(2, &spec)).unwrap_err());
        assert!(
            said.contains("spec.template.spec.containers.securityContext"),
            "{said}"
        );
        assert!(said.contains("send the object as JSON"), "{said}");
        // A field number no message here has.
        let said = message(object_of("v1", "ConfigMap", &field_bytes(9, b"x")).unwrap_err());
        assert!(said.contains("field 9"), "{said}");
        // A string field sent as a number.
        let said = message(object_of("v1", "Secret", &field_varint(3, 1)).unwrap_err());
        assert!(said.contains("at type"), "{said}");
        // Strings are UTF-8.
        let meta = field_bytes(1, &field_bytes(1, &[0xc3, 0x28]));
        assert!(object_of("v1", "ConfigMap", &meta).is_err());
        // An encoded raw body is not guessed at.
        let mut encoded = config_map();
        encoded.extend(field_bytes(3, b"gzip"));
        assert!(object(&encoded).is_err());
    }

    #[test]
    fn every_cut_and_every_flipped_byte_of_an_object_is_read_or_refused_without_a_panic() {
        let whole = config_map();
        for cut in 0..whole.len() {
            let _ = object(&whole[..cut]);
        }
        for at in MAGIC.len()..whole.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut body = whole.clone();
                body[at] ^= flip;
                let _ = object(&body);
            }
        }
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
