//! CSV flow logs (RFC 4180): a header row, then one row per finished flow with the JSONL
//! flow record's fields flattened — nested objects become dotted column names (`id.orig_h`,
//! `dns.query`, `process.pid`), lists are joined with spaces, `null` is an empty cell.
//! Update, DNS and run records exist only in JSONL.
//!
//! The columns are derived from the serialized [`FlowRecord`] itself, so CSV and JSONL
//! cannot drift apart; a test checks [`COLUMNS`] against a fully populated record.

use std::io::{self, Write};

use serde_json::Value;

use super::schema::FlowRecord;

/// The CSV columns, in order.
pub const COLUMNS: &[&str] = &[
    "uid",
    "ts",
    "last_ts",
    "duration",
    "proto",
    "id.orig_h",
    "id.orig_p",
    "id.resp_h",
    "id.resp_p",
    "local_orig",
    "icmp_id",
    "orig_pkts",
    "orig_ip_bytes",
    "orig_bytes",
    "resp_pkts",
    "resp_ip_bytes",
    "resp_bytes",
    "conn_state",
    "history",
    "tcp_state",
    "orig_flags",
    "resp_flags",
    "close_reason",
    "community_id",
    "dns.query",
    "dns.qtype",
    "dns.qtype_name",
    "dns.names",
    "process.pid",
    "process.uid",
    "process.comm",
    "process.exe",
    "process.cmdline",
    "policy.action",
    "policy.rule",
];

/// Writes finished flows as CSV rows to `W`.
pub struct CsvWriter<W: Write> {
    out: csv::Writer<W>,
}

impl<W: Write> CsvWriter<W> {
    /// Writes the header row right away, so even a run without flows leaves a loadable file.
    pub fn new(out: W) -> io::Result<Self> {
        let mut out = csv::WriterBuilder::new().has_headers(false).from_writer(out);
        out.write_record(COLUMNS).map_err(io::Error::other)?;
        out.flush()?;
        Ok(CsvWriter { out })
    }

    /// Writes one flow as a row and flushes it.
    pub fn write(&mut self, flow: &FlowRecord) -> io::Result<()> {
        let value = serde_json::to_value(flow).map_err(io::Error::other)?;
        self.out.write_record(COLUMNS.iter().map(|c| cell(&value, c))).map_err(csv_io)?;
        self.out.flush()
    }

    pub fn into_inner(self) -> io::Result<W> {
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

fn csv_io(e: csv::Error) -> io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::other(format!("{other:?}")),
    }
}

/// The cell of dotted `column` in a serialized record.
fn cell(record: &Value, column: &str) -> String {
    let mut v = record;
    for part in column.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// Every dotted leaf path of a serialized record (test helper and documentation check).
#[cfg(test)]
fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaf_paths(child, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{PolicyAction, PolicyVerdict};
    use crate::sink::schema::fixtures::sample_run;

    #[test]
    fn the_columns_are_exactly_the_flattened_flow_record_minus_event() {
        let (_, flows) = sample_run();
        let mut full = flows[0].clone();
        full.policy = Some(PolicyVerdict { action: PolicyAction::Allow, rule: Some("*".into()) });
        full.icmp_id = Some(1);
        let mut paths = Vec::new();
        leaf_paths(&serde_json::to_value(&full).unwrap(), "", &mut paths);
        paths.retain(|p| p != "event");
        paths.sort();
        let mut columns = COLUMNS.to_vec();
        columns.sort();
        assert_eq!(paths, columns, "CSV columns must follow the JSONL schema");
    }

    #[test]
    fn rows_flatten_nested_fields_and_leave_nulls_empty() {
        let (_, flows) = sample_run();
        let mut w = CsvWriter::new(Vec::new()).unwrap();
        for f in &flows {
            w.write(f).unwrap();
        }
        let text = String::from_utf8(w.into_inner().unwrap()).unwrap();
        let mut rows = csv::Reader::from_reader(text.as_bytes());
        let header = rows.headers().unwrap().clone();
        assert_eq!(header.iter().collect::<Vec<_>>(), COLUMNS);
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let rows: Vec<csv::StringRecord> = rows.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), flows.len());
        assert_eq!(&rows[0][col("id.resp_h")], "198.18.0.1");
        assert_eq!(&rows[0][col("dns.names")], "www.example.test example.test");
        assert_eq!(&rows[0][col("process.cmdline")], "curl -s http://www.example.test/");
        assert_eq!(&rows[0][col("local_orig")], "true");
        assert_eq!(&rows[1][col("conn_state")], "REJ");
        assert_eq!(&rows[1][col("dns.query")], "");
        assert_eq!(&rows[2][col("tcp_state")], "");
    }
}
