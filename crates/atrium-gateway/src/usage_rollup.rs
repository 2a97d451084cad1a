//! Usage rolled up as it is shipped.
//!
//! The spool keeps a line per request: that is what makes metering exact
//! across a crash (a batch is a range of spool lines, resent whole under
//! its id, recorded once). What the control plane is sent for a range is
//! one record per (tenant, deployment, site, replica, minute, batch job,
//! flag, ingress site) with its request count and token sums, plus the line itself for
//! a tenant that asked for per-request records. The control plane's work
//! then grows with the aggregates rather than with the requests — it
//! was the fleet's ceiling: ~8–22 µs of its CPU per proxied request, one
//! core for ~45–120k requests/s of all gateways together.
//!
//! A line that is not a record, or carries a negative count (a spool
//! from before usage was checked), is dropped and logged: the control
//! plane would refuse the batch for it, and its request cannot be billed
//! from what is left of it.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use atrium_api::{UsageBatch, UsageRecordView};
use serde::Deserialize;

/// A spooled line as read back (`usage::UsageLine` as written).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spooled {
    at: String,
    tenant: String,
    deployment: String,
    site: String,
    replica: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    flag: Option<String>,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    itemised: bool,
    /// Empty in lines spooled before gateways recorded it.
    #[serde(default)]
    ingress_site: String,
}

/// What an aggregate is kept per: everything a record names but the
/// request's own id and time (its minute stays).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    tenant: String,
    deployment: String,
    site: String,
    replica: String,
    minute: String,
    batch: Option<String>,
    flag: Option<String>,
    ingress_site: String,
}

#[derive(Default, Clone, Copy)]
struct Sums {
    requests: i64,
    prompt: i64,
    completion: i64,
}

/// The minute an RFC 3339 UTC time falls in (`…T12:25:00Z`); any other
/// shape is kept as it is (its requests then roll up per exact time).
fn minute_of(at: &str) -> String {
    let b = at.as_bytes();
    match at.get(..16) {
        Some(head) if b.get(10) == Some(&b'T') && b.get(13) == Some(&b':') && at.ends_with('Z') => {
            format!("{head}:00Z")
        }
        _ => at.to_string(),
    }
}

fn record(s: Spooled) -> UsageRecordView {
    UsageRecordView {
        at: s.at,
        tenant: s.tenant,
        deployment: s.deployment,
        site: s.site,
        replica: s.replica,
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        request_id: s.request_id,
        flag: s.flag,
        batch: s.batch,
        requests: 1,
        ingress_site: s.ingress_site,
    }
}

/// The records to ship for `lines` (spooled lines, each ending in `\n`):
/// at most one per line, so a batch's bound on lines bounds its records.
/// Also how many lines were dropped.
pub fn rollup(lines: &[u8]) -> (Vec<UsageRecordView>, usize) {
    let mut records = Vec::new();
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    let mut dropped = 0;
    for line in lines.split_inclusive(|b| *b == b'\n') {
        let Ok(s) = serde_json::from_slice::<Spooled>(line) else {
            dropped += 1;
            continue;
        };
        if s.prompt_tokens < 0 || s.completion_tokens < 0 {
            dropped += 1;
            continue;
        }
        if s.itemised {
            records.push(record(s));
            continue;
        }
        let (prompt, completion) = (s.prompt_tokens, s.completion_tokens);
        let (at, request_id) = (s.at, s.request_id);
        // The line's strings move into the key: a batch has thousands.
        let key = Key {
            minute: minute_of(&at),
            tenant: s.tenant,
            deployment: s.deployment,
            site: s.site,
            replica: s.replica,
            batch: s.batch,
            flag: s.flag,
            ingress_site: s.ingress_site,
        };
        let entry = sums.entry(key);
        let now = match &entry {
            Entry::Occupied(o) => *o.get(),
            Entry::Vacant(_) => Sums::default(),
        };
        match (
            now.requests.checked_add(1),
            now.prompt.checked_add(prompt),
            now.completion.checked_add(completion),
        ) {
            (Some(requests), Some(prompt), Some(completion)) => {
                *entry.or_default() = Sums {
                    requests,
                    prompt,
                    completion,
                };
            }
            // Past i64 (not reachable with bounded counts): this request
            // is billed on its own record rather than wrapped into the sum.
            _ => {
                let k = entry.key();
                records.push(UsageRecordView {
                    at,
                    tenant: k.tenant.clone(),
                    deployment: k.deployment.clone(),
                    site: k.site.clone(),
                    replica: k.replica.clone(),
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    request_id,
                    flag: k.flag.clone(),
                    batch: k.batch.clone(),
                    requests: 1,
                    ingress_site: k.ingress_site.clone(),
                });
            }
        }
    }
    records.extend(sums.into_iter().map(|(k, s)| UsageRecordView {
        at: k.minute,
        tenant: k.tenant,
        deployment: k.deployment,
        site: k.site,
        replica: k.replica,
        prompt_tokens: s.prompt,
        completion_tokens: s.completion,
        request_id: String::new(),
        flag: k.flag,
        batch: k.batch,
        requests: s.requests,
        ingress_site: k.ingress_site,
    }));
    (records, dropped)
}

/// The body of `POST /v1/usage` for a batch of spooled lines.
pub fn batch_body(batch_id: &str, lines: &[u8]) -> Vec<u8> {
    let (records, dropped) = rollup(lines);
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "gateway: unreadable or negative usage records dropped from a batch"
        );
    }
    let batch = UsageBatch {
        batch_id: batch_id.to_string(),
        records,
    };
    serde_json::to_vec(&batch).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(at: &str, tenant: &str, prompt: i64, extra: &str) -> String {
        format!(
            "{{\"at\":\"{at}\",\"tenant\":\"{tenant}\",\"deployment\":\"d\",\"site\":\"s\",\
             \"replica\":\"r\",\"prompt_tokens\":{prompt},\"completion_tokens\":2,\
             \"request_id\":\"req_{prompt}\"{extra}}}\n"
        )
    }

    #[test]
    fn requests_sum_per_minute_and_tenant_and_itemised_ones_stay_whole() {
        let text = [
            line("2026-12-07T12:25:01.5Z", "a", 1, ""),
            line("2026-12-07T12:25:59.9Z", "a", 2, ""),
            line("2026-12-07T12:26:00Z", "a", 4, ""),
            line("2026-12-07T12:25:30Z", "b", 8, ""),
            line(
                "2026-12-07T12:25:30Z",
                "a",
                16,
                r#","batch":"batch_0123456789abcdef""#,
            ),
            line("2026-12-07T12:25:31Z", "c", 32, r#","itemised":true"#),
            line("2026-12-07T12:25:32Z", "c", 64, r#","itemised":true"#),
        ]
        .concat();
        let (records, dropped) = rollup(text.as_bytes());
        assert_eq!(dropped, 0);
        /// tenant, at, requests, prompt, completion, request id, batch
        type Seen<'a> = (&'a str, &'a str, i64, i64, i64, &'a str, Option<&'a str>);
        let seen: Vec<Seen> = records
            .iter()
            .map(|r| {
                (
                    r.tenant.as_str(),
                    r.at.as_str(),
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.request_id.as_str(),
                    r.batch.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("c", "2026-12-07T12:25:31Z", 1, 32, 2, "req_32", None),
                ("c", "2026-12-07T12:25:32Z", 1, 64, 2, "req_64", None),
                ("a", "2026-12-07T12:25:00Z", 2, 3, 4, "", None),
                (
                    "a",
                    "2026-12-07T12:25:00Z",
                    1,
                    16,
                    2,
                    "",
                    Some("batch_0123456789abcdef")
                ),
                ("a", "2026-12-07T12:26:00Z", 1, 4, 2, "", None),
                ("b", "2026-12-07T12:25:00Z", 1, 8, 2, "", None),
            ]
        );
        // Every request and token is in exactly one record.
        assert_eq!(records.iter().map(|r| r.requests).sum::<i64>(), 7);
        assert_eq!(records.iter().map(|r| r.prompt_tokens).sum::<i64>(), 127);
    }

    #[test]
    fn what_is_not_a_record_is_dropped_and_counted() {
        let text = [
            line("2026-12-07T12:25:01Z", "a", 1, ""),
            "{\"not\":\"a record\"}\n".to_string(),
            "\0\0garbage\n".to_string(),
            line("2026-12-07T12:25:01Z", "a", -5, ""),
            line("2026-12-07T12:25:02Z", "a", 2, ""),
        ]
        .concat();
        let (records, dropped) = rollup(text.as_bytes());
        assert_eq!(dropped, 3);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].requests, records[0].prompt_tokens), (2, 3));
        let body: UsageBatch =
            serde_json::from_slice(&batch_body("ub_1", text.as_bytes())).unwrap();
        assert_eq!(body.batch_id, "ub_1");
        assert_eq!(body.records, records);
    }

    #[test]
    fn sums_that_would_overflow_bill_the_request_on_its_own() {
        let text = [
            line("2026-12-07T12:25:01Z", "a", i64::MAX - 1, ""),
            line("2026-12-07T12:25:02Z", "a", 5, ""),
        ]
        .concat();
        let (records, _) = rollup(text.as_bytes());
        let mut prompts: Vec<i64> = records.iter().map(|r| r.prompt_tokens).collect();
        prompts.sort_unstable();
        assert_eq!(prompts, [5, i64::MAX - 1]);
    }

    #[test]
    fn odd_times_are_kept_as_they_are() {
        assert_eq!(minute_of("2026-12-07T12:25:13.25Z"), "2026-12-07T12:25:00Z");
        assert_eq!(
            minute_of("2026-12-07T12:25:13+02:00"),
            "2026-12-07T12:25:13+02:00"
        );
        assert_eq!(minute_of("é"), "é");
        assert_eq!(minute_of(""), "");
    }
}
