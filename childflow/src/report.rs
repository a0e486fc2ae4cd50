//! `childflow report FLOWLOG`: reads a JSONL flow log back and prints the same summary
//! `--summary` prints at the end of a run (text, Markdown or JSON).
//!
//! Strict about what it reads: a line that is not a record of a known schema version fails
//! the report with the file and line number, rather than printing totals that silently
//! miss part of the log. Record kinds from a newer writer of the same version are skipped.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use crate::{
    cli::{ReportArgs, ReportFormat},
    sink::schema::{HeaderRecord, Record, RunRecord, SCHEMA_NAME, SCHEMA_VERSION},
    summary::{Summary, SummaryBuilder},
};

/// Why a flow log could not be reported on.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The file could not be opened.
    #[error("failed to open flow log {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading failed part way.
    #[error("failed to read flow log {}, line {line}", path.display())]
    Read {
        path: PathBuf,
        line: usize,
        #[source]
        source: io::Error,
    },
    /// A line is not a flow log record.
    #[error("{}:{line}: not a childflow flow log record{hint}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        hint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The log was written with a schema this childflow does not know.
    #[error(
        "{}:{line}: flow log schema {schema} version {version} is not supported (this childflow reads {SCHEMA_NAME} version {SCHEMA_VERSION})",
        path.display()
    )]
    Version { path: PathBuf, line: usize, schema: String, version: u32 },
}

/// Runs `childflow report`.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let summary = if args.flow_log.as_os_str() == "-" {
        read(io::stdin().lock(), Path::new("<stdin>"))?
    } else {
        let file = File::open(&args.flow_log)
            .map_err(|source| ReportError::Open { path: args.flow_log.clone(), source })?;
        read(BufReader::new(file), &args.flow_log)?
    };
    let text = match args.format {
        ReportFormat::Text => summary.to_text(),
        ReportFormat::Markdown => summary.to_markdown(),
        ReportFormat::Json => summary.to_json(),
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Reads a JSONL flow log into its summary. `path` names it in errors.
pub fn read(reader: impl BufRead, path: &Path) -> Result<Summary, ReportError> {
    let mut builder = SummaryBuilder::new();
    let mut header: Option<HeaderRecord> = None;
    let mut run: Option<RunRecord> = None;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| ReportError::Read {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line).map_err(|source| ReportError::Parse {
            path: path.to_path_buf(),
            line: line_no,
            hint: if line_no == 1 && line.starts_with("uid,") {
                " (this looks like a CSV flow log; report reads the JSONL format, --flow-log-format jsonl)"
            } else {
                ""
            },
            source,
        })?;
        match record {
            Record::Header(h) => {
                if h.schema != SCHEMA_NAME || h.version != SCHEMA_VERSION {
                    return Err(ReportError::Version {
                        path: path.to_path_buf(),
                        line: line_no,
                        schema: h.schema,
                        version: h.version,
                    });
                }
                header = Some(h);
            }
            Record::Flow(f) => builder.add_flow(&f),
            Record::Dns(d) => builder.add_dns(&d),
            Record::Run(r) => run = Some(r),
            Record::Unknown => {}
        }
    }
    let run = run.unwrap_or_else(|| RunRecord {
        command: header.as_ref().map(|h| h.command.clone()).unwrap_or_default(),
        backend: header.as_ref().map(|h| h.backend.clone()).unwrap_or_default(),
        exit_code: None,
        status: "unknown (no run record: the log was cut short)".into(),
        error: None,
        ts: header.as_ref().map_or(0.0, |h| h.ts),
        end_ts: 0.0,
        duration: 0.0,
        totals: Default::default(),
        drops: Default::default(),
        evictions: 0,
    });
    Ok(builder.finish(&run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::RunInfo;
    use crate::sink::schema::fixtures::{run_record, sample_run};

    fn sample_log() -> String {
        let (dns, flows) = sample_run();
        let header = RunInfo {
            command: vec!["curl".into()],
            backend: "rootless".into(),
            start: crate::flow::fixtures::T0,
        }
        .header();
        let mut lines = vec![serde_json::to_string(&Record::Header(header)).unwrap()];
        lines.push(serde_json::to_string(&Record::Dns(dns[0].clone())).unwrap());
        for f in &flows {
            lines.push(serde_json::to_string(&Record::Flow(Box::new(f.clone()))).unwrap());
        }
        lines.push(serde_json::to_string(&Record::Run(run_record(&flows))).unwrap());
        lines.join("\n") + "\n"
    }

    fn read_str(s: &str) -> Result<Summary, ReportError> {
        read(s.as_bytes(), Path::new("flows.jsonl"))
    }

    #[test]
    fn a_log_reads_back_into_the_summary_of_its_run() {
        let s = read_str(&sample_log()).expect("a valid log");
        assert_eq!(s.totals.flows, 3);
        assert_eq!(s.status, "exit code 0");
        assert_eq!(s.top_dns_names[0].name, "www.example.test");
    }

    #[test]
    fn a_bad_line_is_rejected_with_its_number() {
        let mut log = sample_log();
        log.push_str("{\"record\":\"flow\",\"uid\":\n");
        let err = read_str(&log).expect_err("must fail");
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert!(msg.starts_with("flows.jsonl:7: not a childflow flow log record: "), "{msg}");
    }

    #[test]
    fn a_csv_log_gets_a_hint() {
        let err = read_str("uid,ts,last_ts\n1,2,3\n").expect_err("must fail");
        assert!(err.to_string().contains("looks like a CSV flow log"), "{err}");
    }

    #[test]
    fn a_newer_schema_version_is_refused() {
        let log = r#"{"record":"header","schema":"childflow.flow-log","version":99,"childflow":"9","command":[],"backend":"x","ts":0}"#;
        let err = read_str(log).expect_err("must fail");
        assert!(err.to_string().contains("version 99 is not supported"), "{err}");
    }

    #[test]
    fn a_log_without_a_run_record_still_reports_its_flows() {
        let log: String = sample_log()
            .lines()
            .filter(|l| !l.contains(r#""record":"run""#))
            .map(|l| format!("{l}\n"))
            .collect();
        let s = read_str(&log).expect("readable");
        assert_eq!(s.totals.flows, 3);
        assert!(s.status.contains("cut short"));
    }
}
