//! The Batch API, as OpenAI's clients call it: a tenant uploads a JSONL
//! file of requests (`/v1/files`, purpose `batch`), creates a batch over it
//! (`/v1/batches`), and later reads a results file. This module is what a
//! file and a batch are, how an input file is checked line by line, and
//! how a result line is written; who runs the requests is the gateway's.
//!
//! Everything in an input file is the tenant's: each line is parsed with
//! bounds (count, `custom_id` length, one model, no streaming) before a
//! single request is sent, and a bad line fails the whole batch with the
//! line's number, as OpenAI does, rather than being skipped.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::FieldErrors;

/// Largest file a tenant may upload (OpenAI's is 200 MB; a batch's input
/// is held in memory while it is checked and run).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Most requests in one batch (OpenAI's limit).
pub const MAX_BATCH_REQUESTS: usize = 50_000;
/// Longest `custom_id`, in bytes.
pub const MAX_CUSTOM_ID: usize = 256;
/// Longest file name, in bytes.
pub const MAX_FILENAME: usize = 255;
/// The one completion window OpenAI offers, and its length.
pub const COMPLETION_WINDOW: &str = "24h";
pub const COMPLETION_WINDOW_SECONDS: i64 = 24 * 3600;
/// Metadata bounds (OpenAI's): pairs, key and value bytes.
pub const MAX_METADATA: usize = 16;
const MAX_METADATA_KEY: usize = 64;
const MAX_METADATA_VALUE: usize = 512;
/// Line errors reported for one input file; the rest are counted.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FilePurpose {
    /// A batch's input, uploaded by the tenant.
    Batch,
    /// A batch's results or errors, written by Atrium.
    BatchOutput,
}

impl FilePurpose {
    pub fn parse(s: &str) -> Option<FilePurpose> {
        match s {
            "batch" => Some(FilePurpose::Batch),
            "batch_output" => Some(FilePurpose::BatchOutput),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FilePurpose::Batch => "batch",
            FilePurpose::BatchOutput => "batch_output",
        }
    }
}

/// A stored file. Its bytes are kept by the control plane beside the
/// store, named by the file's id; this is what is known of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub filename: String,
    pub purpose: FilePurpose,
    pub bytes: u64,
    /// Hex SHA-256 of the bytes, checked when they are read back.
    pub sha256: String,
}

/// Checks a file name a client sent: it is only ever shown back, never a
/// path, but it is bounded and printable.
pub fn check_filename(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FILENAME {
        return Err(format!("must be 1 to {MAX_FILENAME} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// The endpoints a batch may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum BatchEndpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
    #[serde(rename = "/v1/responses")]
    Responses,
}

impl BatchEndpoint {
    pub const ALL: [BatchEndpoint; 4] = [
        BatchEndpoint::ChatCompletions,
        BatchEndpoint::Completions,
        BatchEndpoint::Embeddings,
        BatchEndpoint::Responses,
    ];

    pub fn path(self) -> &'static str {
        match self {
            BatchEndpoint::ChatCompletions => "/v1/chat/completions",
            BatchEndpoint::Completions => "/v1/completions",
            BatchEndpoint::Embeddings => "/v1/embeddings",
            BatchEndpoint::Responses => "/v1/responses",
        }
    }

    pub fn parse(path: &str) -> Option<BatchEndpoint> {
        BatchEndpoint::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// What a tenant asks for, as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    pub input_file_id: String,
    pub endpoint: BatchEndpoint,
    pub completion_window: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The key that created the batch (set by the control plane): its
    /// requests run under that key's limits and stop when it is revoked.
    pub key: String,
    /// The model every line names (checked when the batch is created).
    pub model: String,
}

/// Checks a batch's metadata against OpenAI's bounds.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), FieldErrors> {
    let mut errors = FieldErrors::new();
    if metadata.len() > MAX_METADATA {
        errors.push("metadata", format!("at most {MAX_METADATA} pairs"));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > MAX_METADATA_KEY {
            errors.push(
                "metadata",
                format!("keys must be 1 to {MAX_METADATA_KEY} bytes"),
            );
        }
        if v.len() > MAX_METADATA_VALUE {
            errors.push(
                format!(
                    "metadata.{}",
                    k.chars().take(MAX_METADATA_KEY).collect::<String>()
                ),
                format!("must be at most {MAX_METADATA_VALUE} bytes"),
            );
        }
    }
    errors.into_result()
}

/// Where a batch is in its life (OpenAI's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Checked and waiting for a gateway to run it.
    Validating,
    /// Its input did not check out; nothing ran.
    Failed,
    InProgress,
    /// Every request has an answer; the results are being written.
    Finalizing,
    Completed,
    /// Its completion window ended first; what ran is in its files.
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchState {
    /// Whether nothing more will happen to it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BatchState::Failed
                | BatchState::Completed
                | BatchState::Expired
                | BatchState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Validating => "validating",
            BatchState::Failed => "failed",
            BatchState::InProgress => "in_progress",
            BatchState::Finalizing => "finalizing",
            BatchState::Completed => "completed",
            BatchState::Expired => "expired",
            BatchState::Cancelling => "cancelling",
            BatchState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestCounts {
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
}

/// Why an input file was refused, by line (1-based) where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
}

/// What has come of a batch. Times are Unix seconds, as OpenAI gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchStatus {
    pub state: BatchState,
    #[serde(default)]
    pub request_counts: RequestCounts,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<BatchError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_file_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizing_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelling_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_at: Option<i64>,
    /// The gateway running it, and until when (Unix seconds) its claim
    /// holds unless renewed; another gateway takes over after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<i64>,
}

/// How long a finished batch, and the results files Atrium wrote for it,
/// are kept (OpenAI keeps batch results 30 days).
pub const RETAIN_SECONDS: i64 = 30 * 86_400;

impl BatchStatus {
    /// When it finished (Unix seconds), if it has.
    pub fn finished_at(&self) -> Option<i64> {
        if !self.state.is_final() {
            return None;
        }
        [
            self.completed_at,
            self.failed_at,
            self.expired_at,
            self.cancelled_at,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// Whether it finished more than `RETAIN_SECONDS` before `now`.
    pub fn past_retention(&self, now: i64) -> bool {
        self.finished_at()
            .is_some_and(|at| now.saturating_sub(at) > RETAIN_SECONDS)
    }

    /// A batch just created, checked or not.
    pub fn new(checked: &Result<CheckedInput, Vec<BatchError>>, now: i64) -> BatchStatus {
        let mut status = BatchStatus {
            state: BatchState::Validating,
            request_counts: RequestCounts::default(),
            errors: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            runner: None,
            lease_until: None,
        };
        match checked {
            Ok(input) => {
                status.request_counts.total = u32::try_from(input.lines.len()).unwrap_or(u32::MAX)
            }
            Err(errors) => {
                status.state = BatchState::Failed;
                status.failed_at = Some(now);
                status.errors = errors.clone();
            }
        }
        status
    }
}

/// How long a gateway's claim on a batch holds without a progress report.
pub const LEASE_SECONDS: i64 = 60;
/// Largest results file a gateway hands in.
pub const MAX_RESULTS_BYTES: u64 = 4 * MAX_FILE_BYTES;

/// What a gateway running a batch reports (`PUT /v1/batches/{id}/progress`):
/// its counts so far, and whether it has handed in everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchProgress {
    pub request_counts: RequestCounts,
    pub done: bool,
}

/// One request of an input file.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLine {
    pub custom_id: String,
    /// The request body, sent as the endpoint's request.
    pub body: Value,
}

/// An input file that checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedInput {
    pub lines: Vec<BatchLine>,
    /// The model every line names.
    pub model: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    custom_id: Value,
    method: Value,
    url: Value,
    body: Value,
}

/// Checks a batch's input file for `endpoint`: every non-blank line a JSON
/// object with a unique `custom_id`, `method` `POST`, `url` the endpoint,
/// and a `body` object naming the same `model` as every other line and not
/// streaming. Reports up to [`MAX_REPORTED_ERRORS`] line errors.
pub fn check_input(bytes: &[u8], endpoint: BatchEndpoint) -> Result<CheckedInput, Vec<BatchError>> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(vec![BatchError {
            code: "invalid_file".into(),
            message: "the file is not UTF-8 text".into(),
            line: None,
        }]);
    };
    let mut report = Report::default();
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    let mut model: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let number = u32::try_from(i + 1).ok();
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() + report.count() >= MAX_BATCH_REQUESTS {
            return Err(vec![BatchError {
                code: "too_many_requests".into(),
                message: format!("a batch holds at most {MAX_BATCH_REQUESTS} requests"),
                line: number,
            }]);
        }
        let line: InputLine = match serde_json::from_str(raw) {
            Ok(l) => l,
            Err(e) => {
                report.push(
                    number,
                    "invalid_json_line",
                    format!("not a request object ({{custom_id, method, url, body}}): {e}"),
                );
                continue;
            }
        };
        match check_line(line, endpoint, &mut seen, &mut model) {
            Ok(l) => lines.push(l),
            Err((code, message)) => report.push(number, code, message),
        }
    }
    if lines.is_empty() && report.count() == 0 {
        report.push(None, "empty_file", "the file holds no requests".into());
    }
    match (report.count(), model) {
        (0, Some(model)) => Ok(CheckedInput { lines, model }),
        _ => Err(report.finish()),
    }
}

/// Line errors, the first [`MAX_REPORTED_ERRORS`] kept and the rest counted.
#[derive(Default)]
struct Report {
    errors: Vec<BatchError>,
    more: usize,
}

impl Report {
    fn push(&mut self, line: Option<u32>, code: &str, message: String) {
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(BatchError {
                code: code.into(),
                message,
                line,
            });
        } else {
            self.more += 1;
        }
    }

    fn count(&self) -> usize {
        self.errors.len() + self.more
    }

    fn finish(mut self) -> Vec<BatchError> {
        if self.more > 0 {
            self.errors.push(BatchError {
                code: "more_errors".into(),
                message: format!("{} more lines have errors", self.more),
                line: None,
            });
        }
        self.errors
    }
}

fn check_line(
    line: InputLine,
    endpoint: BatchEndpoint,
    seen: &mut HashSet<String>,
    model: &mut Option<String>,
) -> Result<BatchLine, (&'static str, String)> {
    let Value::String(custom_id) = line.custom_id else {
        return Err(("invalid_custom_id", "custom_id must be a string".into()));
    };
    if custom_id.is_empty() || custom_id.len() > MAX_CUSTOM_ID {
        return Err((
            "invalid_custom_id",
            format!("custom_id must be 1 to {MAX_CUSTOM_ID} bytes"),
        ));
    }
    if line.method != Value::String("POST".into()) {
        return Err(("invalid_method", "method must be \"POST\"".into()));
    }
    if line.url.as_str() != Some(endpoint.path()) {
        return Err((
            "mismatched_url",
            format!("url must be the batch's endpoint, {}", endpoint.path()),
        ));
    }
    let Value::Object(body) = &line.body else {
        return Err(("invalid_body", "body must be a JSON object".into()));
    };
    let Some(Value::String(name)) = body.get("model") else {
        return Err(("invalid_body", "body.model must name a model".into()));
    };
    if matches!(body.get("stream"), Some(Value::Bool(true))) {
        return Err((
            "invalid_body",
            "body.stream must not be true: a batch's answers are whole".into(),
        ));
    }
    match model {
        Some(m) if m != name => {
            return Err((
                "mismatched_model",
                format!(
                    "every request of a batch must name one model: `{m}` before, `{name}` here"
                ),
            ))
        }
        Some(_) => {}
        None => *model = Some(name.clone()),
    }
    if !seen.insert(custom_id.clone()) {
        return Err((
            "duplicate_custom_id",
            format!("custom_id `{custom_id}` appears more than once"),
        ));
    }
    Ok(BatchLine {
        custom_id,
        body: line.body,
    })
}

/// A results line: the request's answer (`status_code` and body as the
/// endpoint gave it) or, when it never got one, the error.
#[derive(Debug, Serialize)]
pub struct ResultLine<'a> {
    pub id: String,
    pub custom_id: &'a str,
    pub response: Option<ResultResponse<'a>>,
    pub error: Option<ResultError>,
}

#[derive(Debug, Serialize)]
pub struct ResultResponse<'a> {
    pub status_code: u16,
    pub request_id: &'a str,
    pub body: Value,
}

#[derive(Debug, Serialize)]
pub struct ResultError {
    pub code: String,
    pub message: String,
}

/// An answer's body as a results line carries it: its JSON, or its text
/// when it is not JSON (an upstream's plain-text error).
pub fn answer_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
    }

    #[test]
    fn a_good_file_checks_out_with_its_lines_in_order() {
        let text = format!("{}\n\n{}\n", line("a", "m"), line("b", "m"));
        let checked = check_input(text.as_bytes(), BatchEndpoint::ChatCompletions);
        let checked = checked.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(checked.model, "m");
        let ids: Vec<_> = checked.lines.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(checked.lines[0].body["messages"][0]["content"], "hi");
    }

    #[test]
    fn bad_lines_are_reported_by_number_and_nothing_runs() {
        let text = [
            line("a", "m"),
            "not json".into(),
            line("a", "m"),
            line("c", "other"),
            r#"{"custom_id":"d","method":"GET","url":"/v1/chat/completions","body":{"model":"m"}}"#.into(),
            r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#.into(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#.into(),
            r#"{"custom_id":7,"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#.into(),
            format!(r#"{{"custom_id":"{}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m"}}}}"#, "x".repeat(MAX_CUSTOM_ID + 1)),
            r#"{"custom_id":"g","method":"POST","url":"/v1/chat/completions","body":[]}"#.into(),
        ]
        .join("\n");
        let errors = check_input(text.as_bytes(), BatchEndpoint::ChatCompletions)
            .err()
            .unwrap_or_default();
        let got: Vec<_> = errors
            .iter()
            .map(|e| (e.line.unwrap_or(0), e.code.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "invalid_json_line"),
                (3, "duplicate_custom_id"),
                (4, "mismatched_model"),
                (5, "invalid_method"),
                (6, "mismatched_url"),
                (7, "invalid_body"),
                (8, "invalid_custom_id"),
                (9, "invalid_custom_id"),
                (10, "invalid_body"),
            ]
        );
    }

    #[test]
    fn empty_binary_and_oversized_files_are_refused_whole() {
        let codes = |bytes: &[u8]| {
            check_input(bytes, BatchEndpoint::ChatCompletions)
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.code)
                .collect::<Vec<_>>()
        };
        assert_eq!(codes(b"\n  \n"), ["empty_file"]);
        assert_eq!(codes(&[0xff, 0xfe, b'\n']), ["invalid_file"]);
        let many = (0..=MAX_BATCH_REQUESTS)
            .map(|i| line(&i.to_string(), "m"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(codes(many.as_bytes()), ["too_many_requests"]);
        let bad = vec!["x"; MAX_REPORTED_ERRORS + 5].join("\n");
        let errors = codes(bad.as_bytes());
        assert_eq!(errors.len(), MAX_REPORTED_ERRORS + 1);
        assert_eq!(errors.last().map(String::as_str), Some("more_errors"));
    }

    #[test]
    fn metadata_and_file_names_are_bounded() {
        let mut m = BTreeMap::new();
        assert!(check_metadata(&m).is_ok());
        m.insert("k".into(), "v".repeat(MAX_METADATA_VALUE + 1));
        assert!(check_metadata(&m).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_METADATA)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(check_metadata(&many).is_err());
        assert!(check_filename("in.jsonl").is_ok());
        assert!(check_filename("").is_err());
        assert!(check_filename("a\r\nb").is_err());
        assert!(check_filename(&"a".repeat(MAX_FILENAME + 1)).is_err());
    }

    #[test]
    fn endpoints_and_purposes_round_trip_their_wire_names() {
        for e in BatchEndpoint::ALL {
            assert_eq!(BatchEndpoint::parse(e.path()), Some(e));
            let json = serde_json::to_string(&e).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", e.path()));
        }
        assert_eq!(BatchEndpoint::parse("/v1/models"), None);
        assert_eq!(FilePurpose::parse("batch"), Some(FilePurpose::Batch));
        assert_eq!(FilePurpose::parse("fine-tune"), None);
    }

    #[test]
    fn finished_batches_are_kept_for_their_retention_only() {
        let ok = check_input(line("a", "m").as_bytes(), BatchEndpoint::ChatCompletions);
        let mut status = BatchStatus::new(&ok, 0);
        assert!(
            !status.past_retention(i64::MAX),
            "a batch not finished is kept"
        );
        status.state = BatchState::Completed;
        status.completed_at = Some(1_000);
        assert!(!status.past_retention(1_000 + RETAIN_SECONDS));
        assert!(status.past_retention(1_001 + RETAIN_SECONDS));
        let failed = BatchStatus::new(&Err(vec![]), 5);
        assert_eq!(failed.finished_at(), Some(5));
    }

    #[test]
    fn an_answer_that_is_not_json_is_kept_as_text() {
        assert_eq!(answer_body(br#"{"a":1}"#)["a"], 1);
        assert_eq!(
            answer_body(b"upstream broke"),
            Value::String("upstream broke".into())
        );
    }
}
