//! How the CLI's answers are printed (`--output table|json`): the wire
//! format, as JSON or as a table of JSON pointers into it.
#![allow(clippy::print_stdout)]

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub use atrium_client::encode;

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
