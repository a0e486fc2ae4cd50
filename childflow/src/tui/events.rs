//! `--events -|PATH`: the live updates as JSON lines, for scripts.
//!
//! A consumer of the same [`Snapshot`]s as the dashboard. Each line is one JSON object with
//! a `type`:
//! - `run`: once, first: the command, backend, childflow's pid, start time.
//! - `flow`: a flow that is new or changed since the previous line about it: every field of
//!   [`FlowRow`] under `flow`, and its current rate each way (`rate_out`, `rate_in`, bytes/s).
//! - `totals`: the run's counters when they changed: bytes/packets each way, live and total
//!   flows, DNS names, drops by source, evictions, current rate each way.
//! - `end`: once, last: how the command ended.
//!
//! Timestamps are nanoseconds since the UNIX epoch, like the event model. A slow reader
//! makes the writer skip snapshots (each line still carries the newest state), never slows
//! the collector.

use std::{io::Write, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;

use super::{
    history::History,
    launch::{Later, Launcher},
    model::{DropCount, FlowRow, RunInfo, Snapshot, SnapshotCell, Totals},
};
use crate::event::UnixNanos;

/// One line of the stream.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line<'a> {
    Run {
        run: &'a RunInfo,
    },
    Flow {
        ts: UnixNanos,
        flow: &'a FlowRow,
        rate_out: f64,
        rate_in: f64,
    },
    Totals {
        ts: UnixNanos,
        #[serde(flatten)]
        totals: &'a Totals,
        live_flows: usize,
        flows_total: u64,
        dns_names: u64,
        drops: &'a [DropCount],
        evictions: u64,
        rate_out: f64,
        rate_in: f64,
    },
    End {
        ts: UnixNanos,
        run: &'a RunInfo,
    },
}

/// The diffing state of the stream: what was last written.
#[derive(Default)]
pub struct Stream {
    prev: Option<Arc<Snapshot>>,
    history: History,
    ended: bool,
}

impl Stream {
    /// Writes the lines that take a reader from the previous snapshot to `snap`.
    pub fn write(&mut self, snap: &Arc<Snapshot>, out: &mut impl Write) -> std::io::Result<()> {
        if self.ended {
            return Ok(());
        }
        self.history.observe(snap);
        let mut line = |l: &Line| -> std::io::Result<()> {
            serde_json::to_writer(&mut *out, l)?;
            out.write_all(b"\n")
        };
        let prev = self.prev.as_deref();
        if prev.is_none() {
            line(&Line::Run { run: &snap.run })?;
        }
        let old: std::collections::HashMap<u64, &FlowRow> =
            prev.map(|p| p.flows.iter().map(|f| (f.id, &**f)).collect()).unwrap_or_default();
        let mut flows: Vec<&FlowRow> = snap
            .flows
            .iter()
            .map(|f| &**f)
            .filter(|f| old.get(&f.id).is_none_or(|o| *o != *f))
            .collect();
        flows.sort_by_key(|f| f.id);
        for flow in flows {
            let rate = self.history.rate(flow.id);
            line(&Line::Flow { ts: snap.ts, flow, rate_out: rate.out, rate_in: rate.r#in })?;
        }
        let changed = prev.is_none_or(|p| {
            p.totals != snap.totals
                || p.flows_total != snap.flows_total
                || p.live_flows() != snap.live_flows()
                || p.dns_names != snap.dns_names
                || p.drops != snap.drops
                || p.evictions != snap.evictions
        });
        if changed {
            let rate = self.history.run_rate();
            line(&Line::Totals {
                ts: snap.ts,
                totals: &snap.totals,
                live_flows: snap.live_flows(),
                flows_total: snap.flows_total,
                dns_names: snap.dns_names,
                drops: &snap.drops,
                evictions: snap.evictions,
                rate_out: rate.out,
                rate_in: rate.r#in,
            })?;
        }
        if let Some(end) = &snap.run.ended {
            line(&Line::End { ts: end.ts, run: &snap.run })?;
            self.ended = true;
        }
        out.flush()?;
        self.prev = Some(snap.clone());
        Ok(())
    }
}

/// The `--events` writer thread.
pub struct Writer {
    thread: Later<Result<()>>,
    stop: Sender<()>,
}

impl Writer {
    /// Opens `path` (`-`: stdout); the thread writing what `cell` publishes is queued on
    /// `launcher`.
    pub fn start(path: &Path, cell: Arc<SnapshotCell>, launcher: &mut Launcher) -> Result<Self> {
        let out: Box<dyn Write + Send> =
            if path.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                Box::new(std::fs::File::create(path).with_context(|| {
                    format!("failed to create the events file {}", path.display())
                })?)
            };
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let thread = launcher.spawn("events", move || write_loop(out, &cell, &stopped));
        Ok(Self { thread, stop })
    }

    /// Writes what the last snapshot adds and closes the stream.
    pub fn finish(self) -> Result<()> {
        let _ = self.stop.send(());
        match self.thread.join() {
            None => Ok(()),
            Some(result) => result.map_err(|_| anyhow::anyhow!("the --events writer panicked"))?,
        }
    }
}

fn write_loop(
    mut out: Box<dyn Write + Send>,
    cell: &SnapshotCell,
    stopped: &Receiver<()>,
) -> Result<()> {
    let mut out = std::io::BufWriter::new(&mut out);
    let mut stream = Stream::default();
    let mut seen = None;
    loop {
        let stop = !matches!(
            stopped.recv_timeout(Duration::from_millis(100)),
            Err(RecvTimeoutError::Timeout)
        );
        if seen != Some(cell.seq()) {
            seen = Some(cell.seq());
            stream.write(&cell.latest(), &mut out).context("failed to write --events")?;
        }
        if stop {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::model::{RunEnd, fixtures::*};

    fn lines(stream: &mut Stream, snap: Snapshot) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        stream.write(&Arc::new(snap), &mut out).unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    fn types(lines: &[serde_json::Value]) -> Vec<&str> {
        lines.iter().map(|l| l["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn the_stream_starts_with_the_run_then_flows_and_totals() {
        let mut stream = Stream::default();
        let first = lines(&mut stream, snapshot(1, vec![established_flow(1), dns_flow(2)]));
        assert_eq!(types(&first), ["run", "flow", "flow", "totals"]);
        assert_eq!(first[0]["run"]["backend"], "rootless");
        assert_eq!(first[1]["flow"]["name"], "example.test");
        assert_eq!(first[1]["flow"]["bytes_in"], 20_000);
        assert_eq!(first[3]["bytes_in"], 20_120);
        assert_eq!(first[3]["live_flows"], 1);
    }

    #[test]
    fn only_changed_flows_are_written_again_and_end_closes_the_stream() {
        let mut stream = Stream::default();
        lines(&mut stream, snapshot(1, vec![established_flow(1), dns_flow(2)]));
        assert!(lines(&mut stream, snapshot(2, vec![established_flow(1), dns_flow(2)])).is_empty());
        let next =
            lines(&mut stream, snapshot(3, vec![grown(established_flow(1), 2), dns_flow(2)]));
        assert_eq!(types(&next), ["flow", "totals"]);
        assert_eq!(next[0]["flow"]["id"], 1);
        assert_eq!(next[0]["rate_in"], 20_000.0, "20,000 bytes more in the last second");
        let mut last = snapshot(4, vec![grown(established_flow(1), 2), dns_flow(2)]);
        last.run.ended = Some(RunEnd { ts: T0 + 4 * SEC, code: 0, status: "exit code 0".into() });
        assert_eq!(types(&lines(&mut stream, last.clone())), ["end"]);
        assert!(lines(&mut stream, last).is_empty(), "nothing after the end");
    }
}
