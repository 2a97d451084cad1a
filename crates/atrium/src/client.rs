//! The HTTP client behind the CLI's client commands, and how their results
//! are printed (`--output table|json`).
#![allow(clippy::print_stdout)]

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Client {
    pub fn new(base: &str, token: String) -> Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends a request and returns the JSON answer, or the API's error as a
    /// readable message.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let err = &value["error"];
        let mut message = format!(
            "{} ({}): {}",
            err["code"].as_str().unwrap_or("error"),
            status.as_u16(),
            err["message"].as_str().unwrap_or(&value.to_string())
        );
        if let Some(fields) = err["details"]["fields"].as_array() {
            for f in fields {
                message.push_str(&format!(
                    "\n  {}: {}",
                    f["field"].as_str().unwrap_or("?"),
                    f["message"].as_str().unwrap_or("?")
                ));
            }
        }
        bail!(message)
    }

    /// Follows a watch stream, handing each event line to `on_event`.
    pub async fn watch(
        &self,
        path: &str,
        mut on_event: impl FnMut(Value) -> Result<()>,
    ) -> Result<()> {
        let resp = self
            .request(Method::GET, path)
            .send()
            .await
            .context("cannot reach the server")?;
        if !resp.status().is_success() {
            let status = resp.status();
            bail!(
                "watch refused ({status}): {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            buf.extend_from_slice(&chunk.context("watch stream broke")?);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let event: Value =
                    serde_json::from_slice(&line).map_err(|e| anyhow!("bad watch line: {e}"))?;
                on_event(event)?;
            }
        }
        Ok(())
    }
}

/// Columns of a table: a header and a JSON pointer into each item.
pub type Columns = &'static [(&'static str, &'static str)];

fn cell(item: &Value, pointer: &str) -> String {
    match item.pointer(pointer) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => {
            let parts: Vec<String> = a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect();
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(",")
            }
        }
        Some(other) => other.to_string(),
    }
}

pub fn render_table(items: &[Value], columns: Columns) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, p)| cell(item, p)).collect())
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(columns.iter().map(|(h, _)| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row));
    }
    out
}

/// Prints a list response or a single object.
pub fn print(value: &Value, output: Output, columns: Columns) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Table => {
            let items: Vec<Value> = match value.get("items").and_then(Value::as_array) {
                Some(items) => items.clone(),
                None => vec![value.clone()],
            };
            println!("{}", render_table(&items, columns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_show_missing_as_dash() {
        let items = vec![
            json!({"name": "acme", "spec": {"scopes": ["admin", "read"]}}),
            json!({"name": "a", "spec": {}}),
        ];
        let t = render_table(&items, &[("NAME", "/name"), ("SCOPES", "/spec/scopes")]);
        assert_eq!(t, "NAME  SCOPES\nacme  admin,read\na     -");
    }
}
