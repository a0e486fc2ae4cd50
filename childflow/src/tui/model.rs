//! The dashboard's view model: what one frame of the dashboard knows about the run.
//!
//! A [`Snapshot`] is a self-contained copy of the run's state at one moment, published by
//! the collector into a [`SnapshotCell`] and read by every live view (the dashboard, the
//! `--events` stream, `attach` clients over the run's socket). Keeping the dashboard on its
//! own small model means it never holds a lock on the flow table and can be fed by anything
//! that can fill these structs: the collector, a socket, a test fixture.
//!
//! Invariants:
//! - Counters are cumulative and every timestamp is nanoseconds since the UNIX epoch
//!   ([`UnixNanos`]), like the event model; rates are *not* in the snapshot, each view
//!   derives them from successive snapshots ([`super::history`]).
//! - [`FlowRow::id`] is unique within a run and stable for a flow's whole life, so a view
//!   can follow one flow while rows are re-sorted.
//! - Publishing never blocks on readers for longer than a pointer swap: readers clone an
//!   `Arc` and let go of the lock at once.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::event::{CloseReason, UnixNanos};

/// What the run is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The command line, as given after `--`.
    pub command: Vec<String>,
    /// `rootless` or `rootful`.
    pub backend: String,
    /// childflow's own pid.
    pub pid: u32,
    pub started: UnixNanos,
    /// Set once the command ended.
    pub ended: Option<RunEnd>,
}

/// How the command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    pub ts: UnixNanos,
    /// childflow's exit code for it (the command's code, or 128+N for signal N).
    pub code: i32,
    /// "exit code 0", "killed by signal 9 (SIGKILL)".
    pub status: String,
}

/// Counters summed over every flow of the run, live or ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub pkts_out: u64,
    pub pkts_in: u64,
}

/// Losses counted by one part of the pipeline, cumulative.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub source: String,
    pub count: u64,
}

/// The process that opened a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub comm: String,
}

/// One flow, as the dashboard shows it. Close to the flow model (Zeek `conn_state` and
/// `history`, Community ID, DNS attribution, process, close reason).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// Run-unique, stable for the flow's life (the flow model's `uid`).
    pub id: u64,
    /// `tcp`, `udp`, `icmp`, `icmp6`, or the protocol number.
    pub proto: String,
    /// The command's side.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The DNS name the command resolved `remote` from, if any.
    pub name: Option<String>,
    pub process: Option<ProcessRef>,
    /// A short state for live views: `SYN_SENT`, `ESTABLISHED`, `CLOSED`, `ACTIVE`...
    pub state: String,
    /// Zeek's `conn_state` (`S0`, `SF`, `REJ`, ...), if the model computed it.
    pub conn_state: Option<String>,
    /// Zeek's history letters (upper case: originator).
    pub history: String,
    /// Why the flow ended; `None` while it is live.
    pub close_reason: Option<CloseReason>,
    /// IP bytes (headers included), as counted at the capture point.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Transport payload bytes: what the application sent and received.
    pub payload_out: u64,
    pub payload_in: u64,
    pub pkts_out: u64,
    pub pkts_in: u64,
    pub first_seen: UnixNanos,
    pub last_seen: UnixNanos,
    /// Community ID v1 (`1:...`), empty if not computed.
    pub community_id: String,
}

impl FlowRow {
    /// Whether the flow is still open.
    pub fn is_live(&self) -> bool {
        self.close_reason.is_none()
    }

    /// The destination as a person names it: the DNS name, else the address.
    pub fn destination(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.remote.ip().to_string())
    }
}

/// The run's state at one moment. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Increases by one with each published snapshot.
    pub seq: u64,
    /// When the snapshot was taken.
    pub ts: UnixNanos,
    pub run: RunInfo,
    pub totals: Totals,
    /// Live flows and the ended flows still kept for display, in no particular order.
    /// Shared: a row that did not change is the same allocation in successive snapshots.
    pub flows: Vec<Arc<FlowRow>>,
    /// Flows seen since the start, including ones no longer in `flows`.
    pub flows_total: u64,
    /// Distinct DNS names the command resolved.
    pub dns_names: u64,
    pub drops: Vec<DropCount>,
    /// Flows pushed out of a full flow table (`--max-flows`).
    pub evictions: u64,
}

impl Snapshot {
    /// Flows still open.
    pub fn live_flows(&self) -> usize {
        self.flows.iter().filter(|f| f.is_live()).count()
    }

    /// Everything lost, summed over sources.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().map(|d| d.count).sum()
    }
}

/// The latest [`Snapshot`], shared between the collector (one writer) and the live views.
///
/// A watch channel in miniature: writers replace the snapshot, readers take the newest one
/// and can tell whether it changed since they last looked ([`SnapshotCell::seq`]); a slow
/// reader simply misses intermediate snapshots.
#[derive(Debug, Default)]
pub struct SnapshotCell {
    latest: Mutex<Arc<Snapshot>>,
    seq: AtomicU64,
}

impl SnapshotCell {
    pub fn new(initial: Snapshot) -> Arc<Self> {
        let seq = initial.seq;
        Arc::new(Self { latest: Mutex::new(Arc::new(initial)), seq: AtomicU64::new(seq) })
    }

    /// Replaces the snapshot, giving it the next sequence number.
    pub fn publish(&self, mut snapshot: Snapshot) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        snapshot.seq = seq;
        let snapshot = Arc::new(snapshot);
        // A poisoned lock only means a reader panicked while cloning an Arc; the data is fine.
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }

    /// The newest snapshot.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The sequence number of the newest snapshot.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// Fixture builders for the dashboard's tests.
#[cfg(test)]
pub mod fixtures {
    use super::*;

    pub const SEC: u64 = 1_000_000_000;
    /// 2026-01-01T00:00:00Z, the start of every fixture run.
    pub const T0: UnixNanos = 1_767_225_600 * SEC;

    /// An established TCP flow to example.test:443 opened by curl.
    pub fn established_flow(id: u64) -> FlowRow {
        FlowRow {
            id,
            proto: "tcp".into(),
            local: format!("10.0.2.100:{}", 40000 + id).parse().unwrap(),
            remote: "198.18.1.2:443".parse().unwrap(),
            name: Some("example.test".into()),
            process: Some(ProcessRef { pid: 42, comm: "curl".into() }),
            state: "ESTABLISHED".into(),
            conn_state: Some("S1".into()),
            history: "ShAD".into(),
            close_reason: None,
            bytes_out: 1_000,
            bytes_in: 20_000,
            payload_out: 500,
            payload_in: 19_000,
            pkts_out: 10,
            pkts_in: 20,
            first_seen: T0 + SEC,
            last_seen: T0 + 2 * SEC,
            community_id: "1:LQU9qZlK+B5F3KDmev6m5PMibrg=".into(),
        }
    }

    /// A finished UDP DNS exchange without a name of its own.
    pub fn dns_flow(id: u64) -> FlowRow {
        FlowRow {
            proto: "udp".into(),
            remote: "198.18.1.2:53".parse().unwrap(),
            name: None,
            process: Some(ProcessRef { pid: 42, comm: "curl".into() }),
            state: "CLOSED".into(),
            conn_state: Some("SF".into()),
            history: "Dd".into(),
            close_reason: Some(CloseReason::IdleTimeout),
            bytes_out: 60,
            bytes_in: 120,
            payload_out: 32,
            payload_in: 92,
            pkts_out: 1,
            pkts_in: 1,
            ..established_flow(id)
        }
    }

    /// A run of curl with the given flows, taken `secs` seconds after the start.
    pub fn snapshot(secs: u64, flows: Vec<FlowRow>) -> Snapshot {
        let mut totals = Totals::default();
        for f in &flows {
            totals.bytes_out += f.bytes_out;
            totals.bytes_in += f.bytes_in;
            totals.pkts_out += f.pkts_out;
            totals.pkts_in += f.pkts_in;
        }
        Snapshot {
            seq: secs,
            ts: T0 + secs * SEC,
            run: RunInfo {
                command: vec!["curl".into(), "-s".into(), "https://example.test/".into()],
                backend: "rootless".into(),
                pid: 1000,
                started: T0,
                ended: None,
            },
            totals,
            flows_total: flows.len() as u64,
            flows: flows.into_iter().map(Arc::new).collect(),
            dns_names: 1,
            drops: Vec::new(),
            evictions: 0,
        }
    }

    /// `flow` with its byte counters scaled to `n` times their values.
    pub fn grown(mut flow: FlowRow, n: u64) -> FlowRow {
        flow.bytes_out *= n;
        flow.bytes_in *= n;
        flow.payload_out *= n;
        flow.payload_in *= n;
        flow
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn a_reader_sees_the_newest_snapshot_and_its_sequence() {
        let cell = SnapshotCell::new(Snapshot::default());
        assert_eq!(cell.seq(), 0);
        cell.publish(snapshot(1, vec![established_flow(1)]));
        cell.publish(snapshot(2, vec![established_flow(1), dns_flow(2)]));
        assert_eq!(cell.seq(), 2);
        let latest = cell.latest();
        assert_eq!(latest.seq, 2);
        assert_eq!(latest.flows.len(), 2);
        assert_eq!(latest.live_flows(), 1);
    }

    #[test]
    fn snapshots_round_trip_through_json() {
        let snap = snapshot(3, vec![established_flow(1), dns_flow(2)]);
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
    }
}
