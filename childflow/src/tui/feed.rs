//! Feeding the live views from the collector: a [`Consumer`] that copies the flow table into
//! a dashboard [`Snapshot`] and publishes it.
//!
//! The table holds live flows only; an ended flow reaches consumers once, as its end record.
//! So this consumer keeps the most recent [`KEEP_ENDED`] ended flows itself (the dashboard
//! shows them dimmed), and their counters stay in the totals after they are dropped.
//!
//! Invariants:
//! - At most one snapshot every [`PUBLISH`] while events come, and one every
//!   [`IDLE_PUBLISH`] without them (so rates decay to zero and the clock moves); one more at
//!   the end of the run. A copy that takes long (a huge table) spaces the next ones out, so
//!   copying takes at most about a tenth of the collector's time.
//! - Nothing is published before the live views' threads are launched (`launched`): the
//!   collector ticks its consumers from the moment it starts, which is before the sandbox
//!   is cloned, and this thread must not allocate then ([`super::launch`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use childflow_common::flow::{DIR_IN, DIR_OUT};

use super::model::{DropCount, FlowRow, ProcessRef, RunInfo, Snapshot, SnapshotCell, Totals};
use crate::{
    collector::{Consumer, QUEUE_DROPS},
    event::{Event, UnixNanos, now_unix_nanos},
    flow::{Flow, FlowTable, PacketFlow, TcpState},
    sink::schema::{DnsRecord, FlowRecord, FlowRecordKind, RunRecord},
};

/// Ended flows kept in snapshots (older ones only count in the totals).
pub const KEEP_ENDED: usize = 1_000;
/// The shortest time between two published snapshots.
pub const PUBLISH: Duration = Duration::from_millis(100);
/// Without events, a snapshot is still published this often.
pub const IDLE_PUBLISH: Duration = Duration::from_millis(500);

/// The state column: RFC 9293-like names for TCP, `ACTIVE`/`CLOSED` for the rest.
fn state(tcp: Option<&str>, ended: bool) -> String {
    match tcp {
        Some(s) => s.to_ascii_uppercase(),
        None if ended => "CLOSED".into(),
        None => "ACTIVE".into(),
    }
}

/// A live flow of the table, as a row.
pub fn row_of_flow(f: &Flow) -> FlowRow {
    let s = &f.stats;
    FlowRow {
        id: f.uid,
        proto: f.key.proto_name().to_string(),
        local: f.key.local(),
        remote: f.key.remote(),
        name: f.dns.as_ref().map(|d| d.names.first().cloned().unwrap_or_else(|| d.query.clone())),
        process: f.process.as_ref().map(|p| ProcessRef { pid: p.pid, comm: p.comm.clone() }),
        state: state(f.tcp_state().map(TcpState::as_str), f.close_reason.is_some()),
        conn_state: Some(f.conn_state().to_string()),
        history: f.history().to_owned(),
        close_reason: f.close_reason,
        bytes_out: s.bytes[DIR_OUT],
        bytes_in: s.bytes[DIR_IN],
        payload_out: s.payload_bytes[DIR_OUT],
        payload_in: s.payload_bytes[DIR_IN],
        pkts_out: s.packets[DIR_OUT],
        pkts_in: s.packets[DIR_IN],
        first_seen: s.first_ns,
        last_seen: s.last_ns,
        community_id: f.community_id.to_string(),
    }
}

/// An end (or update) record, as a row: the record is oriented originator → responder,
/// the row from the command's side.
pub fn row_of_record(r: &FlowRecord) -> FlowRow {
    let orig = SocketAddr::new(r.id.orig_h, r.id.orig_p);
    let resp = SocketAddr::new(r.id.resp_h, r.id.resp_p);
    let (local, remote) = if r.local_orig { (orig, resp) } else { (resp, orig) };
    let ((bo, po, ko), (bi, pi, ki)) = {
        let o = (r.orig_ip_bytes, r.orig_bytes, r.orig_pkts);
        let s = (r.resp_ip_bytes, r.resp_bytes, r.resp_pkts);
        if r.local_orig { (o, s) } else { (s, o) }
    };
    let ns = |secs: f64| (secs * 1e9).round() as UnixNanos;
    FlowRow {
        id: r.uid,
        proto: r.proto.clone(),
        local,
        remote,
        name: r.dns.as_ref().map(|d| d.names.first().cloned().unwrap_or_else(|| d.query.clone())),
        process: r.process.as_ref().map(|p| ProcessRef { pid: p.pid, comm: p.comm.clone() }),
        state: state(r.tcp_state.as_deref(), r.close_reason.is_some()),
        conn_state: Some(r.conn_state.to_string()),
        history: r.history.clone(),
        close_reason: r.close_reason,
        bytes_out: bo,
        bytes_in: bi,
        payload_out: po,
        payload_in: pi,
        pkts_out: ko,
        pkts_in: ki,
        first_seen: ns(r.ts),
        last_seen: ns(r.last_ts),
        community_id: r.community_id.clone(),
    }
}

/// What a live flow's row is built from, to tell whether it changed since the last copy.
#[derive(Clone, Copy, PartialEq, Eq)]
struct RowSource {
    last_ns: u64,
    packets: u64,
    named: bool,
    attributed: bool,
}

impl RowSource {
    fn of(f: &Flow) -> Self {
        Self {
            last_ns: f.stats.last_ns,
            packets: f.stats.packets[DIR_OUT] + f.stats.packets[DIR_IN],
            named: f.dns.is_some(),
            attributed: f.process.is_some(),
        }
    }
}

fn add(t: &mut Totals, f: &FlowRow) {
    t.bytes_out += f.bytes_out;
    t.bytes_in += f.bytes_in;
    t.pkts_out += f.pkts_out;
    t.pkts_in += f.pkts_in;
}

/// See the module documentation.
pub struct LiveConsumer {
    cell: Arc<SnapshotCell>,
    run: RunInfo,
    launched: Arc<AtomicBool>,
    queue_drops: Arc<AtomicU64>,
    ended: VecDeque<Arc<FlowRow>>,
    /// The rows of the last snapshot's live flows, by uid, with what they were built from:
    /// an unchanged flow is not converted again.
    rows: HashMap<u64, (RowSource, Arc<FlowRow>)>,
    /// Counters of ended flows no longer in `ended`.
    retired: Totals,
    names: HashSet<String>,
    /// The table's counters at the last tick, for the snapshot after the table is gone.
    table_stats: (u64, u64, Vec<DropCount>),
    dirty: bool,
    last: Option<Instant>,
    /// How long the last copy took: the next one waits at least ten times that, so copying
    /// a huge table never takes more than a tenth of the collector's time.
    last_cost: Duration,
}

impl LiveConsumer {
    pub fn new(
        cell: Arc<SnapshotCell>,
        run: RunInfo,
        launched: Arc<AtomicBool>,
        queue_drops: Arc<AtomicU64>,
    ) -> Self {
        Self {
            cell,
            run,
            launched,
            queue_drops,
            ended: VecDeque::new(),
            rows: HashMap::new(),
            retired: Totals::default(),
            names: HashSet::new(),
            table_stats: (0, 0, Vec::new()),
            dirty: true,
            last: None,
            last_cost: Duration::ZERO,
        }
    }

    /// Copies the table's counters (flows seen, evictions, drops by source).
    fn take_stats(&mut self, table: &FlowTable) {
        let stats = table.stats();
        let mut drops: BTreeMap<String, u64> =
            stats.drops.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        let queued = self.queue_drops.load(Ordering::Relaxed);
        if queued > 0 {
            drops.insert(QUEUE_DROPS.into(), queued);
        }
        let drops = drops.into_iter().map(|(source, count)| DropCount { source, count }).collect();
        self.table_stats = (stats.flows, stats.evictions, drops);
    }

    /// The run's state as of `now`: the live flows of `table` (if any), the ended flows
    /// kept here, the table's counters as of the last [`Self::take_stats`].
    pub fn snapshot(&mut self, table: Option<&FlowTable>, now: UnixNanos) -> Snapshot {
        let mut rows = HashMap::with_capacity(self.rows.len());
        let mut flows = Vec::with_capacity(table.map_or(0, FlowTable::len) + self.ended.len());
        for f in table.into_iter().flat_map(FlowTable::iter) {
            let source = RowSource::of(f);
            let row = match self.rows.remove(&f.uid) {
                Some((old, row)) if old == source => row,
                _ => Arc::new(row_of_flow(f)),
            };
            flows.push(row.clone());
            rows.insert(f.uid, (source, row));
        }
        self.rows = rows;
        flows.extend(self.ended.iter().cloned());
        let mut totals = self.retired;
        for f in &flows {
            add(&mut totals, f);
        }
        let (flows_total, evictions, drops) = self.table_stats.clone();
        Snapshot {
            seq: 0,
            ts: now,
            run: self.run.clone(),
            totals,
            flows,
            flows_total,
            dns_names: self.names.len() as u64,
            drops,
            evictions,
        }
    }

    fn publish(&mut self, table: Option<&FlowTable>) {
        let started = Instant::now();
        if let Some(table) = table {
            self.take_stats(table);
        }
        let snapshot = self.snapshot(table, now_unix_nanos());
        self.cell.publish(snapshot);
        self.last = Some(Instant::now());
        self.last_cost = started.elapsed();
        self.dirty = false;
    }
}

impl Consumer for LiveConsumer {
    fn name(&self) -> String {
        "live view".into()
    }

    fn event(&mut self, _event: &mut Event, _flow: Option<PacketFlow<'_>>) -> Result<()> {
        self.dirty = true;
        Ok(())
    }

    fn flow(&mut self, record: &FlowRecord) -> Result<()> {
        if record.event == FlowRecordKind::End {
            self.ended.push_back(Arc::new(row_of_record(record)));
            if self.ended.len() > KEEP_ENDED {
                let old = self.ended.pop_front().expect("longer than KEEP_ENDED");
                add(&mut self.retired, &old);
            }
        }
        self.dirty = true;
        Ok(())
    }

    fn dns(&mut self, record: &DnsRecord) -> Result<()> {
        if !record.answers.is_empty() && !self.names.contains(&record.query) {
            self.names.insert(record.query.clone());
        }
        Ok(())
    }

    fn tick(&mut self, table: &FlowTable) -> Result<()> {
        if !self.launched.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Always, so the snapshot after the table is gone has its final counters.
        self.take_stats(table);
        let due = if self.dirty { PUBLISH } else { IDLE_PUBLISH }.max(self.last_cost * 10);
        if self.last.is_none_or(|t| t.elapsed() >= due) {
            self.publish(Some(table));
        }
        Ok(())
    }

    fn finish(&mut self, _run: &RunRecord) -> Result<()> {
        // The table has ended every flow (each came here as an end record); its counters
        // are those of the last tick, which the collector runs just before `finish`.
        self.publish(None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        collector::Collector,
        event::{CloseReason, DnsAnswer, DnsData, DnsEvent, DnsTransport, FlowPhase},
        flow::{TableConfig, fixtures::*},
    };

    fn consumer() -> (LiveConsumer, Arc<SnapshotCell>) {
        let cell = SnapshotCell::new(Snapshot::default());
        let launched = Arc::new(AtomicBool::new(true));
        let c = LiveConsumer::new(cell.clone(), RunInfo::default(), launched, Arc::default());
        (c, cell)
    }

    fn dns_answer(ip: &str) -> Event {
        Event::Dns(DnsEvent {
            ts: T0,
            server: "198.18.0.1:53".parse().unwrap(),
            transport: DnsTransport::Udp,
            id: 1,
            query: "example.test".into(),
            qtype: 1,
            rcode: 0,
            answers: vec![DnsAnswer {
                name: "example.test".into(),
                rtype: 1,
                ttl: 60,
                data: DnsData::Addr(ip.parse().unwrap()),
            }],
        })
    }

    fn by_id(snapshot: &Snapshot) -> HashMap<u64, &FlowRow> {
        snapshot.flows.iter().map(|f| (f.id, &**f)).collect()
    }

    #[test]
    fn live_and_ended_flows_become_rows_with_names_and_counters() {
        let (live, cell) = consumer();
        let mut collector = Collector::new(
            TableConfig::default(),
            crate::collector::RunInfo {
                command: vec!["curl".into()],
                backend: "rootless".into(),
                start: T0,
            },
        );
        collector.add(Box::new(live));
        collector.handle(dns_answer("198.18.0.1"));
        collector.handle(established_flow());
        let closed = tcp_key(40001, "198.18.0.1:443");
        collector.handle(flow_event(closed, closed_stats(T0), FlowPhase::Start));
        collector.handle(flow_event(closed, closed_stats(T0), FlowPhase::End(CloseReason::Fin)));
        collector.tick(T0 + 10 * MS);
        let snap = cell.latest();
        assert_eq!(snap.flows.len(), 2, "{snap:#?}");
        assert_eq!(snap.live_flows(), 1);
        assert_eq!(snap.flows_total, 2);
        assert_eq!(snap.dns_names, 1);
        let rows = by_id(&snap);
        let live = rows.values().find(|f| f.is_live()).unwrap();
        assert_eq!(live.name.as_deref(), Some("example.test"));
        assert_eq!(live.state, "ESTABLISHED");
        assert_eq!((live.payload_out, live.payload_in), (100, 1000));
        assert!(live.community_id.starts_with("1:"));
        let ended = rows.values().find(|f| !f.is_live()).unwrap();
        assert_eq!(ended.close_reason, Some(CloseReason::Fin));
        assert_eq!(ended.local, "10.0.2.100:40001".parse().unwrap());
        assert_eq!(ended.remote, "198.18.0.1:443".parse().unwrap());
        assert_eq!((ended.bytes_out, ended.bytes_in), (316, 1164));
        assert_eq!(ended.conn_state.as_deref(), Some("SF"));
        assert_eq!(ended.name.as_deref(), Some("example.test"));
        assert_eq!(snap.totals.bytes_in, live.bytes_in + ended.bytes_in);
    }

    #[test]
    fn nothing_is_published_before_launch() {
        let cell = SnapshotCell::new(Snapshot::default());
        let launched = Arc::new(AtomicBool::new(false));
        let mut c =
            LiveConsumer::new(cell.clone(), RunInfo::default(), launched.clone(), Arc::default());
        let table = FlowTable::new(TableConfig::default());
        c.tick(&table).unwrap();
        assert_eq!(cell.seq(), 0);
        launched.store(true, Ordering::Relaxed);
        c.tick(&table).unwrap();
        assert_eq!(cell.seq(), 1);
    }

    #[test]
    fn old_ended_flows_leave_the_list_but_not_the_totals() {
        let (mut c, _) = consumer();
        let table = FlowTable::new(TableConfig::default());
        let _ = &table;
        let mut collector_table = FlowTable::new(TableConfig::default());
        let key = tcp_key(40000, "198.18.0.1:80");
        let _ = collector_table.ingest(&flow_event(key, closed_stats(T0), FlowPhase::Start));
        let _ = collector_table.ingest(&flow_event(
            key,
            closed_stats(T0),
            FlowPhase::End(CloseReason::Fin),
        ));
        let record = collector_table
            .drain_output()
            .find_map(|o| match o {
                crate::flow::Output::End(f) => Some(FlowRecord::from_flow(&f, FlowRecordKind::End)),
                _ => None,
            })
            .expect("an end record");
        for _ in 0..KEEP_ENDED + 5 {
            c.flow(&record).unwrap();
        }
        let snap = c.snapshot(Some(&table), T0);
        assert_eq!(snap.flows.len(), KEEP_ENDED);
        assert_eq!(snap.totals.bytes_out, (KEEP_ENDED as u64 + 5) * record.orig_ip_bytes);
    }

    /// `cargo test -p childflow --release --lib tui::feed -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn copying_ten_thousand_flows() {
        let mut table = FlowTable::new(TableConfig::default());
        for i in 0..10_000u32 {
            let key = tcp_key(
                10_000 + (i % 50_000) as u16,
                &format!("198.18.{}.{}:80", i / 250, i % 250 + 1),
            );
            let _ = table.ingest(&flow_event(key, established_stats(T0), FlowPhase::Start));
        }
        assert_eq!(table.len(), 10_000);
        let t = std::time::Instant::now();
        let rows: Vec<FlowRow> = table.iter().map(row_of_flow).collect();
        let convert = t.elapsed().as_secs_f64() * 1e3;
        println!("10000 flows: row_of_flow for all {convert:.2} ms ({} rows)", rows.len());
        let (mut c, cell) = consumer();
        let t = std::time::Instant::now();
        cell.publish(c.snapshot(Some(&table), T0));
        let cold = t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        for _ in 0..10 {
            cell.publish(c.snapshot(Some(&table), T0));
        }
        let warm = t.elapsed().as_secs_f64() * 1e3 / 10.0;
        println!(
            "10000 flows: snapshot with every row converted {cold:.2} ms, \
             with unchanged rows shared {warm:.2} ms"
        );
    }
}
