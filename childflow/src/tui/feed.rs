//! Turning backend [`Event`]s into dashboard [`Snapshot`]s, and publishing them.
//!
//! This is a small stand-in for the flow table (`flow::FlowTable`, being built next to this
//! module): it keeps one [`FlowRow`] per flow key, names peers from the DNS answers the
//! command received, and attributes processes. When the flow table lands, the dashboard is
//! fed from it instead (a collector consumer copying the table into a `Snapshot` on each
//! tick) and this module shrinks to [`Publisher`]'s pacing.
//!
//! Invariants: a key that starts again after it ended is a new flow with a new id; ended
//! flows stay visible (the most recent [`KEEP_ENDED`]) and their counters stay in the totals
//! after they are dropped from the list; publishing happens at most every [`PUBLISH`].

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use childflow_common::flow::{DIR_IN, DIR_OUT, PROTO_TCP, TCP_FIN, TCP_RST, TCP_SYN};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::model::{DropCount, FlowRow, ProcessRef, RunInfo, Snapshot, SnapshotCell, Totals};
use crate::event::{DnsData, Event, FlowKey, FlowPhase, FlowStats, UnixNanos, now_unix_nanos};

/// Ended flows kept in snapshots (older ones only count in the totals).
pub const KEEP_ENDED: usize = 1_000;
/// The shortest time between two published snapshots.
pub const PUBLISH: Duration = Duration::from_millis(100);
/// Without events, a snapshot is still published this often, so rates fall to zero and
/// the clock moves for every view.
pub const IDLE_PUBLISH: Duration = Duration::from_millis(500);

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Feed {
    run: RunInfo,
    next_id: u64,
    live: HashMap<FlowKey, FlowRow>,
    ended: VecDeque<FlowRow>,
    /// Counters of ended flows no longer in `ended`.
    retired: Totals,
    names: HashMap<IpAddr, String>,
    distinct_names: HashSet<String>,
    processes: HashMap<FlowKey, ProcessRef>,
    drops: BTreeMap<String, u64>,
    flows_total: u64,
    evictions: u64,
}

/// A short state for live views from the cumulative TCP flags (RFC 9293 state names where
/// the counters allow telling them apart).
fn state(key: &FlowKey, stats: &FlowStats, ended: bool) -> String {
    if key.proto != PROTO_TCP {
        return if ended { "CLOSED" } else { "ACTIVE" }.into();
    }
    let (out, inn) = (stats.tcp_flags[DIR_OUT], stats.tcp_flags[DIR_IN]);
    let s = if (out | inn) & TCP_RST != 0 {
        "RESET"
    } else if out & TCP_FIN != 0 && inn & TCP_FIN != 0 {
        "CLOSED"
    } else if (out | inn) & TCP_FIN != 0 {
        "FIN_WAIT"
    } else if ended {
        "CLOSED"
    } else if out & TCP_SYN != 0 && inn & TCP_SYN == 0 {
        "SYN_SENT"
    } else {
        "ESTABLISHED"
    };
    s.into()
}

impl Feed {
    pub fn new(run: RunInfo) -> Self {
        Self { run, ..Self::default() }
    }

    /// Takes in one event.
    pub fn ingest(&mut self, event: &Event) {
        match event {
            Event::Flow(update) => {
                let key = update.key;
                let ended = matches!(update.phase, FlowPhase::End(_));
                if !self.live.contains_key(&key) {
                    self.next_id += 1;
                    self.flows_total += 1;
                    let row = FlowRow {
                        id: self.next_id,
                        proto: key.proto_name().to_string(),
                        local: key.local(),
                        remote: key.remote(),
                        name: None,
                        process: None,
                        state: String::new(),
                        conn_state: None,
                        history: String::new(),
                        close_reason: None,
                        bytes_out: 0,
                        bytes_in: 0,
                        payload_out: 0,
                        payload_in: 0,
                        pkts_out: 0,
                        pkts_in: 0,
                        first_seen: update.stats.first_ns,
                        last_seen: update.stats.last_ns,
                        community_id: String::new(),
                    };
                    self.live.insert(key, row);
                }
                let Some(row) = self.live.get_mut(&key) else { return };
                let s = &update.stats;
                row.bytes_out = s.bytes[DIR_OUT];
                row.bytes_in = s.bytes[DIR_IN];
                row.payload_out = s.payload_bytes[DIR_OUT];
                row.payload_in = s.payload_bytes[DIR_IN];
                row.pkts_out = s.packets[DIR_OUT];
                row.pkts_in = s.packets[DIR_IN];
                row.first_seen = s.first_ns.min(row.first_seen.max(1));
                row.last_seen = s.last_ns.max(row.last_seen);
                row.history = String::from_utf8_lossy(s.history()).into_owned();
                row.state = state(&key, s, ended);
                if row.name.is_none() {
                    row.name = self.names.get(&key.remote_ip()).cloned();
                }
                if row.process.is_none() {
                    row.process = self.processes.get(&key).cloned();
                }
                if let FlowPhase::End(reason) = update.phase {
                    let mut row = self.live.remove(&key).expect("present above");
                    row.close_reason = Some(reason);
                    if reason == crate::event::CloseReason::Evicted {
                        self.evictions += 1;
                    }
                    self.processes.remove(&key);
                    self.ended.push_back(row);
                    if self.ended.len() > KEEP_ENDED {
                        let old = self.ended.pop_front().expect("non-empty");
                        add(&mut self.retired, &old);
                    }
                }
            }
            Event::Dns(dns) => {
                for answer in &dns.answers {
                    if let DnsData::Addr(ip) = answer.data {
                        self.names.insert(ip, dns.query.clone());
                        self.distinct_names.insert(dns.query.clone());
                    }
                }
            }
            Event::Process(p) => {
                let process = ProcessRef { pid: p.process.pid, comm: p.process.comm.clone() };
                if let Some(row) = self.live.get_mut(&p.key) {
                    row.process = Some(process.clone());
                }
                self.processes.insert(p.key, process);
            }
            Event::Drops(d) => {
                self.drops.insert(d.source.to_string(), d.count);
            }
            Event::Packet(_) => {}
        }
    }

    /// Counts events the channel dropped (the emitter's counter).
    pub fn set_queue_drops(&mut self, count: u64) {
        if count > 0 {
            self.drops.insert("event queue".into(), count);
        }
    }

    /// The current state as a snapshot taken at `now`.
    pub fn snapshot(&self, now: UnixNanos) -> Snapshot {
        let flows: Vec<FlowRow> = self.live.values().chain(self.ended.iter()).cloned().collect();
        let mut totals = self.retired;
        for f in &flows {
            add(&mut totals, f);
        }
        Snapshot {
            seq: 0,
            ts: now,
            run: self.run.clone(),
            totals,
            flows,
            flows_total: self.flows_total,
            dns_names: self.distinct_names.len() as u64,
            drops: self
                .drops
                .iter()
                .map(|(s, &c)| DropCount { source: s.clone(), count: c })
                .collect(),
            evictions: self.evictions,
        }
    }
}

fn add(t: &mut Totals, f: &FlowRow) {
    t.bytes_out += f.bytes_out;
    t.bytes_in += f.bytes_in;
    t.pkts_out += f.pkts_out;
    t.pkts_in += f.pkts_in;
}

/// Drains the event channel into a [`Feed`] and publishes snapshots into `cell`, at most
/// every [`PUBLISH`], and once more when the channel closes. Returns the number of events.
///
/// Idle snapshots (no new events) are published only once `launched` is set: before the
/// sandbox is cloned this thread must not allocate (see [`super::launch`]).
pub fn drain(
    events: Receiver<Event>,
    mut feed: Feed,
    cell: &Arc<SnapshotCell>,
    launched: &AtomicBool,
) -> u64 {
    let mut count = 0;
    let mut last = Instant::now();
    let mut dirty = false;
    loop {
        match events.recv_timeout(PUBLISH) {
            Ok(event) => {
                feed.ingest(&event);
                count += 1;
                dirty = true;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let due = if dirty { PUBLISH } else { IDLE_PUBLISH };
        if last.elapsed() >= due && (dirty || launched.load(Ordering::Relaxed)) {
            cell.publish(feed.snapshot(now_unix_nanos()));
            last = Instant::now();
            dirty = false;
        }
    }
    cell.publish(feed.snapshot(now_unix_nanos()));
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        CloseReason, DnsAnswer, DnsEvent, DnsTransport, FlowUpdate, ProcessEvent, ProcessInfo,
    };

    fn key() -> FlowKey {
        FlowKey::new(
            PROTO_TCP,
            "10.0.2.100:40000".parse().unwrap(),
            "198.18.1.2:80".parse().unwrap(),
        )
    }

    fn update(out: u64, inn: u64, phase: FlowPhase) -> Event {
        let mut stats = FlowStats::new(DIR_OUT, 1_000);
        stats.account(DIR_OUT, out as u32, 0, TCP_SYN, 1_000);
        stats.account(DIR_IN, inn as u32, 0, TCP_SYN | 0x10, 2_000);
        Event::Flow(FlowUpdate { key: key(), stats, phase })
    }

    fn dns_answer() -> Event {
        Event::Dns(DnsEvent {
            ts: 500,
            server: "198.18.1.2:53".parse().unwrap(),
            transport: DnsTransport::Udp,
            id: 1,
            query: "example.test".into(),
            qtype: 1,
            rcode: 0,
            answers: vec![DnsAnswer {
                name: "example.test".into(),
                rtype: 1,
                ttl: 60,
                data: DnsData::Addr("198.18.1.2".parse().unwrap()),
            }],
        })
    }

    #[test]
    fn a_named_flow_from_dns_process_and_counters() {
        let mut feed = Feed::new(RunInfo::default());
        feed.ingest(&dns_answer());
        feed.ingest(&update(60, 60, FlowPhase::Start));
        feed.ingest(&Event::Process(ProcessEvent {
            key: key(),
            process: ProcessInfo { pid: 7, comm: "curl".into(), ..Default::default() },
        }));
        feed.ingest(&update(100, 5000, FlowPhase::Update));
        let snap = feed.snapshot(3_000);
        assert_eq!(snap.flows.len(), 1);
        let f = &snap.flows[0];
        assert_eq!(f.name.as_deref(), Some("example.test"));
        assert_eq!(f.process.as_ref().map(|p| p.comm.as_str()), Some("curl"));
        assert_eq!((f.bytes_out, f.bytes_in), (100, 5000));
        assert_eq!(f.state, "ESTABLISHED");
        assert_eq!(snap.dns_names, 1);
        assert_eq!(snap.totals.bytes_in, 5000);
    }

    #[test]
    fn an_ended_key_that_starts_again_is_a_new_flow() {
        let mut feed = Feed::new(RunInfo::default());
        feed.ingest(&update(1, 1, FlowPhase::Start));
        feed.ingest(&update(10, 10, FlowPhase::End(CloseReason::Fin)));
        feed.ingest(&update(2, 2, FlowPhase::Start));
        let snap = feed.snapshot(1);
        assert_eq!(snap.flows_total, 2);
        assert_eq!(snap.live_flows(), 1);
        let mut ids: Vec<u64> = snap.flows.iter().map(|f| f.id).collect();
        ids.sort();
        assert_eq!(ids, [1, 2]);
        assert_eq!(snap.totals.bytes_out, 12);
    }

    #[test]
    fn old_ended_flows_leave_the_list_but_not_the_totals() {
        let mut feed = Feed::new(RunInfo::default());
        for _ in 0..KEEP_ENDED + 5 {
            feed.ingest(&update(1, 1, FlowPhase::Start));
            feed.ingest(&update(1, 1, FlowPhase::End(CloseReason::Evicted)));
        }
        let snap = feed.snapshot(1);
        assert_eq!(snap.flows.len(), KEEP_ENDED);
        assert_eq!(snap.totals.bytes_out, (KEEP_ENDED + 5) as u64);
        assert_eq!(snap.evictions, (KEEP_ENDED + 5) as u64);
    }

    #[test]
    fn drain_publishes_a_final_snapshot_when_the_channel_closes() {
        let (emitter, rx) = crate::event::channel(16);
        emitter.emit(dns_answer());
        emitter.emit(update(1, 1, FlowPhase::Start));
        drop(emitter);
        let cell = SnapshotCell::new(Snapshot::default());
        let launched = AtomicBool::new(true);
        assert_eq!(drain(rx, Feed::new(RunInfo::default()), &cell, &launched), 2);
        assert_eq!(cell.latest().flows.len(), 1);
    }
}
