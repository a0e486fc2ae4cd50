//! Flow log sinks: where `--flow-log` records go, in `--flow-log-format` (JSON Lines or CSV).
//!
//! Invariants:
//! - The log is opened before the command starts, so an unwritable path fails the run
//!   before anything happens instead of leaving the command without its log.
//! - Every record is flushed as it is written (live `tail -f`, complete after a crash of the
//!   command or a signal to childflow — childflow forwards signals and writes everything the
//!   table still holds before it exits).
//! - A write error (full disk, closed pipe) is returned to the caller with the log's path;
//!   the collector reports it at once, keeps the command running and fails the run at exit.

pub mod csv;
pub mod jsonl;
pub mod schema;

use std::{
    fmt,
    fs::File,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use self::{
    csv::CsvWriter,
    jsonl::JsonlWriter,
    schema::{DnsRecord, FlowRecord, FlowRecordKind, HeaderRecord, RecordRef, RunRecord},
};
pub use crate::cli::FlowLogFormat;

/// Where a flow log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is stdout, anything else a file path.
    pub fn from_arg(path: &Path) -> Self {
        if path.as_os_str() == "-" { Target::Stdout } else { Target::File(path.to_path_buf()) }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Stdout => f.write_str("stdout"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why a flow log could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The log file could not be created (missing directory, permissions, read-only fs).
    #[error("failed to create flow log {target}")]
    Open {
        target: Target,
        #[source]
        source: io::Error,
    },
    /// A record could not be written (full disk, closed pipe, I/O error).
    #[error("failed to write flow log {target}")]
    Write {
        target: Target,
        #[source]
        source: io::Error,
    },
}

type Out = Box<dyn Write + Send>;

enum Writer {
    Jsonl(JsonlWriter<Out>),
    Csv(Box<CsvWriter<Out>>),
}

/// An open flow log.
pub struct FlowLog {
    target: Target,
    writer: Writer,
}

impl FlowLog {
    /// Creates (or truncates) the log at `target`. CSV writes its header row right away.
    pub fn create(target: Target, format: FlowLogFormat) -> Result<Self, SinkError> {
        let out: Out = match &target {
            Target::Stdout => Box::new(io::stdout()),
            Target::File(path) => match File::create(path) {
                // Records are flushed one by one; the buffer only joins a record's pieces.
                Ok(f) => Box::new(BufWriter::with_capacity(64 * 1024, f)),
                Err(source) => return Err(SinkError::Open { target, source }),
            },
        };
        Self::from_writer(target, format, out)
    }

    /// A log over any writer (tests, pipes).
    pub fn from_writer(target: Target, format: FlowLogFormat, out: Out) -> Result<Self, SinkError> {
        let writer = match format {
            FlowLogFormat::Jsonl => Writer::Jsonl(JsonlWriter::new(out)),
            FlowLogFormat::Csv => match CsvWriter::new(out) {
                Ok(w) => Writer::Csv(Box::new(w)),
                Err(source) => return Err(SinkError::Write { target, source }),
            },
        };
        Ok(FlowLog { target, writer })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The header record (JSONL only).
    pub fn header(&mut self, header: &HeaderRecord) -> Result<(), SinkError> {
        self.jsonl(RecordRef::Header(header))
    }

    /// A flow record: JSONL writes updates and ends, CSV only ends.
    pub fn flow(&mut self, flow: &FlowRecord) -> Result<(), SinkError> {
        let result = match &mut self.writer {
            Writer::Jsonl(w) => w.write(RecordRef::Flow(flow)),
            Writer::Csv(w) if flow.event == FlowRecordKind::End => w.write(flow),
            Writer::Csv(_) => Ok(()),
        };
        result.map_err(|source| SinkError::Write { target: self.target.clone(), source })
    }

    /// A DNS response record (JSONL only).
    pub fn dns(&mut self, dns: &DnsRecord) -> Result<(), SinkError> {
        self.jsonl(RecordRef::Dns(dns))
    }

    /// The final run record (JSONL only).
    pub fn run(&mut self, run: &RunRecord) -> Result<(), SinkError> {
        self.jsonl(RecordRef::Run(run))
    }

    fn jsonl(&mut self, record: RecordRef<'_>) -> Result<(), SinkError> {
        match &mut self.writer {
            Writer::Jsonl(w) => w
                .write(record)
                .map_err(|source| SinkError::Write { target: self.target.clone(), source }),
            Writer::Csv(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::schema::fixtures::sample_run;

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let target = Target::File("/nonexistent-dir/flows.jsonl".into());
        let err = FlowLog::create(target, FlowLogFormat::Jsonl).err().expect("must fail");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(
            chain.starts_with("failed to create flow log /nonexistent-dir/flows.jsonl: "),
            "{chain}"
        );
        assert!(chain.contains("No such file or directory"), "{chain}");
    }

    #[test]
    fn a_full_disk_is_a_write_error_naming_the_log() {
        let (_, flows) = sample_run();
        let full = File::options().write(true).open("/dev/full").expect("/dev/full exists");
        let target = Target::File("/dev/full".into());
        let mut log = FlowLog::from_writer(target, FlowLogFormat::Jsonl, Box::new(full)).unwrap();
        let err = log.flow(&flows[0]).expect_err("ENOSPC");
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            chain,
            "failed to write flow log /dev/full: No space left on device (os error 28)"
        );
    }

    #[test]
    fn csv_skips_updates_and_non_flow_records() {
        let (dns, flows) = sample_run();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.csv");
        let mut log = FlowLog::create(Target::File(path.clone()), FlowLogFormat::Csv).unwrap();
        let mut update = flows[0].clone();
        update.event = FlowRecordKind::Update;
        log.dns(&dns[0]).unwrap();
        log.flow(&update).unwrap();
        log.flow(&flows[0]).unwrap();
        let text = std::fs::read_to_string(&path).expect("flushed without closing");
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
