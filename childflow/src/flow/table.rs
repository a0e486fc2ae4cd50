//! The flow table: the live flows of a run, fed by backend [`Event`]s, and the decisions of
//! when a flow ends.
//!
//! The table never reads the clock: [`FlowTable::tick`] and [`FlowTable::finish`] take the
//! current time, so tests drive it with a virtual clock. Everything a sink must write comes
//! out of [`FlowTable::drain_output`] in order: periodic [`Output::Update`]s of long flows and
//! one [`Output::End`] per flow.
//!
//! A flow ends when
//! - the backend says so ([`FlowPhase::End`]),
//! - a TCP flow was closed (FIN both ways, or RST) and stayed quiet for [`IdleTimeouts::closed`],
//! - it saw no packet for its protocol's idle timeout (Zeek's defaults: TCP 5 min, UDP and
//!   ICMP 1 min),
//! - the table is full (`--max-flows`): the least recently active flows are evicted, counted,
//!   and logged with [`CloseReason::Evicted`],
//! - the command exits ([`FlowTable::finish`], [`CloseReason::CommandExit`]).
//!
//! Backends report cumulative counters. When the table ends a flow on its own (idle, closed,
//! evicted) the backend may still report the same flow later; the counters it already
//! logged are remembered per key (bounded) and subtracted, so totals never count a byte
//! twice. The backend's `first_ns` tells a continuation from a new flow on a reused key.
//!
//! Bounded memory: at most `max_flows` live flows, and as many remembered retired keys,
//! pending process attributions and DNS addresses each.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use childflow_common::flow::{PROTO_TCP, PROTO_UDP};

use super::{Flow, community_id, dns::DnsNames, is_icmp};
use crate::event::{
    CloseReason, DnsEvent, Event, FlowKey, FlowPhase, FlowStats, FlowUpdate, PacketEvent,
    ProcessEvent, ProcessInfo, UnixNanos,
};

/// How long a flow may be quiet before the table ends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    pub other: Duration,
    /// A TCP flow closed by FIN or RST ends after this much quiet (it catches the last ACK
    /// and retransmitted FINs in the same record).
    pub closed: Duration,
}

impl Default for IdleTimeouts {
    /// Zeek's `tcp_inactivity_timeout`, `udp_inactivity_timeout`, `icmp_inactivity_timeout`.
    fn default() -> Self {
        IdleTimeouts {
            tcp: Duration::from_secs(300),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(60),
            other: Duration::from_secs(60),
            closed: Duration::from_secs(1),
        }
    }
}

impl IdleTimeouts {
    fn for_proto(&self, proto: u8) -> Duration {
        match proto {
            PROTO_TCP => self.tcp,
            PROTO_UDP => self.udp,
            p if is_icmp(p) => self.icmp,
            _ => self.other,
        }
    }
}

/// How the table behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// `--max-flows`.
    pub max_flows: usize,
    pub idle: IdleTimeouts,
    /// `--flow-update-interval`; `None` for no update records.
    pub update_interval: Option<Duration>,
    /// `--community-id-seed`.
    pub community_id_seed: u16,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            max_flows: 100_000,
            idle: IdleTimeouts::default(),
            update_interval: Some(Duration::from_secs(5)),
            community_id_seed: 0,
        }
    }
}

/// What the table hands to the sinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A snapshot of a long-lived flow (`--flow-update-interval`).
    Update(Flow),
    /// A flow ended; its `close_reason` is set. Exactly one per flow.
    End(Flow),
}

impl Output {
    pub fn flow(&self) -> &Flow {
        match self {
            Output::Update(f) | Output::End(f) => f,
        }
    }
}

/// Counters about the table itself, for the run record and the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Flows seen so far.
    pub flows: u64,
    /// Flows ended because the table was full.
    pub evictions: u64,
    /// Drops the backends reported, cumulative per source.
    pub drops: Vec<(&'static str, u64)>,
}

/// A copy of the table at one moment, for views running on another thread.
#[derive(Clone, Debug, Default)]
pub struct TableSnapshot {
    pub live: Vec<Flow>,
    pub stats: TableStats,
}

struct Entry {
    flow: Flow,
    /// What an earlier incarnation of this key already accounted for. Boxed: rare, and the
    /// entry stays smaller for the map's probes and moves.
    baseline: Option<Box<FlowStats>>,
    /// The backend's `first_ns` for this flow (before a baseline moved `stats.first_ns`).
    backend_first_ns: UnixNanos,
    /// When the last update record was emitted (or the flow started).
    logged_ns: UnixNanos,
    /// `stats.last_ns` at the last update record, to skip updates of idle flows.
    logged_last_ns: UnixNanos,
    /// A packet of this flow has been looked up ([`FlowTable::packet`]).
    packet_seen: bool,
}

/// A packet's flow, from [`FlowTable::packet`].
#[derive(Clone, Copy, Debug)]
pub struct PacketFlow<'a> {
    pub flow: &'a Flow,
    /// The first packet looked up for this flow.
    pub first: bool,
}

/// Remembered per key once the table ended a flow the backend may still report.
#[derive(Clone, Copy)]
struct Retired {
    /// The backend's `first_ns` of the flow, identifying its incarnation.
    first_ns: UnixNanos,
    /// The cumulative counters already logged.
    stats: FlowStats,
}

/// The live flows of a run. See the module documentation.
pub struct FlowTable {
    config: TableConfig,
    flows: FastMap<FlowKey, Entry>,
    retired: Bounded<FlowKey, Retired>,
    pending_process: Bounded<FlowKey, Arc<ProcessInfo>>,
    /// Flows whose packets arrived before the backend reported the flow (the rootless
    /// engine reports a TCP flow once its upstream connect is done; the rootful ring
    /// buffers are not ordered with each other). Their first packet still needs the
    /// Community ID, which depends only on the key and who sent first.
    early: Bounded<FlowKey, Flow>,
    /// The most recent flows that started without a name. A backend whose DNS answers and
    /// flow starts travel separately (rootful: two ring buffers) may report the answer
    /// after the flow it named; the answer then names these flows.
    unnamed: VecDeque<FlowKey>,
    processes: FastMap<u32, Arc<ProcessInfo>>,
    dns: DnsNames,
    output: Vec<Output>,
    next_uid: u64,
    stats: TableStats,
}

/// The flow map's hasher: foldhash is several times faster than the default SipHash on a
/// 40-byte key (SipHash was a fifth of the cost of a new flow in the benchmark) and still
/// randomly seeded per table, which keeps collisions out of a peer's reach.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How many recent unnamed flows a late DNS answer can still name.
const UNNAMED: usize = 256;

/// At most this many processes are remembered for sharing one `Arc` among their flows.
const MAX_PROCESSES: usize = 4096;

impl FlowTable {
    pub fn new(config: TableConfig) -> Self {
        let max = config.max_flows.max(1);
        FlowTable {
            flows: FastMap::with_capacity_and_hasher(max.min(1 << 16), Default::default()),
            retired: Bounded::new(max),
            pending_process: Bounded::new(max.min(1 << 16)),
            early: Bounded::new(max.min(1 << 12)),
            unnamed: VecDeque::with_capacity(UNNAMED),
            processes: FastMap::default(),
            dns: DnsNames::new(max.min(1 << 16)),
            output: Vec::new(),
            next_uid: 1,
            stats: TableStats::default(),
            config: TableConfig { max_flows: max, ..config },
        }
    }

    /// Takes in one event. Returns the flow it concerns (live, or just ended), if any:
    /// packets are not matched here (see [`FlowTable::lookup`]).
    pub fn ingest(&mut self, event: &Event) -> Option<&Flow> {
        match event {
            Event::Flow(update) => self.ingest_flow(update),
            Event::Process(p) => self.ingest_process(p),
            Event::Dns(d) => {
                self.learn_dns(d);
                None
            }
            Event::Drops(d) => {
                match self.stats.drops.iter_mut().find(|(s, _)| *s == d.source) {
                    Some((_, n)) => *n = (*n).max(d.count),
                    None => self.stats.drops.push((d.source, d.count)),
                }
                None
            }
            Event::Packet(p) => self.packet(p).map(|p| p.flow),
        }
    }

    /// The live flow a captured packet belongs to, and whether this is the first packet
    /// looked up for that flow (the capture writer comments the first packet of a flow).
    pub fn packet(&mut self, packet: &PacketEvent) -> Option<PacketFlow<'_>> {
        let key = super::packet::key_of_frame(packet.direction, &packet.data)?;
        if self.flows.contains_key(&key) {
            let entry = self.flows.get_mut(&key)?;
            let first = !entry.packet_seen;
            entry.packet_seen = true;
            return Some(PacketFlow { flow: &entry.flow, first });
        }
        let first = self.early.get(&key).is_none();
        if first {
            // Whoever sends the first packet originates the flow.
            let local_orig = packet.direction == crate::event::Direction::Out;
            let flow = Flow {
                uid: 0,
                key,
                community_id: community_id::of_key(&key, local_orig, self.config.community_id_seed),
                stats: FlowStats::default(),
                close_reason: None,
                dns: self.dns.lookup(key.remote_ip()),
                process: self.pending_process.get(&key).cloned(),
                policy: None,
            };
            self.early.insert(key, flow);
        }
        Some(PacketFlow { flow: self.early.get(&key)?, first })
    }

    fn ingest_flow(&mut self, update: &FlowUpdate) -> Option<&Flow> {
        let key = update.key;
        if let FlowPhase::End(reason) = update.phase {
            self.update_or_insert(update)?;
            self.end(&key, reason);
            return self.output.last().map(Output::flow);
        }
        self.update_or_insert(update).map(|e| &e.flow)
    }

    /// The live entry of `update.key` with the update's counters, created (evicting if the
    /// table is full) when the key is new.
    fn update_or_insert(&mut self, update: &FlowUpdate) -> Option<&mut Entry> {
        let key = update.key;
        // Checked first because returning a `get_mut` borrow on one branch only does not
        // compile before Polonius; the second lookup hits the cache lines just touched.
        if !self.flows.contains_key(&key) {
            let entry = self.new_entry(update)?;
            if self.flows.len() >= self.config.max_flows {
                self.evict();
            }
            return Some(self.flows.entry(key).or_insert(entry));
        }
        let entry = self.flows.get_mut(&key)?;
        entry.flow.stats = match &entry.baseline {
            Some(base) => subtract(&update.stats, base),
            None => update.stats,
        };
        Some(entry)
    }

    /// A new live flow for `update`; `None` when the update only repeats what a retired
    /// incarnation of the key already logged (e.g. the backend's own FIN after the table
    /// ended the flow): that would be a record of zero packets.
    fn new_entry(&mut self, update: &FlowUpdate) -> Option<Entry> {
        let key = update.key;
        let retired = self.retired.get(&key).filter(|r| r.first_ns == update.stats.first_ns);
        let baseline = retired.map(|r| Box::new(r.stats));
        let stats = match &baseline {
            Some(base) => subtract(&update.stats, base),
            None => update.stats,
        };
        if baseline.is_some() && stats.packets == [0, 0] {
            return None;
        }
        self.retired.remove(&key);
        let local_orig = stats.initiator as usize == childflow_common::flow::DIR_OUT;
        let process = self.pending_process.remove(&key).or_else(|| {
            let mut any_port = key;
            any_port.local_port = 0;
            self.pending_process.get(&any_port).cloned()
        });
        let flow = Flow {
            uid: self.next_uid,
            key,
            community_id: community_id::of_key(&key, local_orig, self.config.community_id_seed),
            stats,
            close_reason: None,
            dns: self.dns.lookup(key.remote_ip()),
            process,
            policy: None,
        };
        if flow.dns.is_none() {
            if self.unnamed.len() == UNNAMED {
                self.unnamed.pop_front();
            }
            self.unnamed.push_back(key);
        }
        self.next_uid += 1;
        self.stats.flows += 1;
        Some(Entry {
            flow,
            baseline,
            backend_first_ns: update.stats.first_ns,
            logged_ns: stats.first_ns,
            logged_last_ns: stats.last_ns,
            packet_seen: self.early.remove(&key).is_some(),
        })
    }

    fn ingest_process(&mut self, event: &ProcessEvent) -> Option<&Flow> {
        let process = match self.processes.get(&event.process.pid) {
            Some(p) if **p == event.process => p.clone(),
            _ => {
                if self.processes.len() >= MAX_PROCESSES {
                    self.processes.clear();
                }
                let p = Arc::new(event.process.clone());
                self.processes.insert(event.process.pid, p.clone());
                p
            }
        };
        match self.flows.get_mut(&event.key) {
            Some(entry) => {
                entry.flow.process.get_or_insert(process);
                Some(&entry.flow)
            }
            None => {
                // Sockets are usually attributed before their first packet is counted.
                self.pending_process.insert(event.key, process);
                None
            }
        }
    }

    /// Learns the addresses in a DNS answer the command received.
    pub fn learn_dns(&mut self, event: &DnsEvent) {
        self.dns.learn(event);
        let (flows, dns) = (&mut self.flows, &self.dns);
        self.unnamed.retain(|key| {
            let Some(entry) = flows.get_mut(key) else { return false };
            entry.flow.dns = dns.lookup(key.remote_ip());
            entry.flow.dns.is_none()
        });
    }

    /// What the command resolved to reach `addr`.
    pub fn dns_names(&self, addr: IpAddr) -> Option<Arc<super::DnsAttribution>> {
        self.dns.lookup(addr)
    }

    /// The live flow of `key`. A packet's key (oriented from the command's side) finds its
    /// flow here: this is how the capture writer tags packets with a Community ID and process.
    pub fn lookup(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key).map(|e| &e.flow)
    }

    /// The live flows, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        self.flows.values().map(|e| &e.flow)
    }

    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn stats(&self) -> &TableStats {
        &self.stats
    }

    /// A copy of every live flow and the table's counters.
    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot { live: self.iter().cloned().collect(), stats: self.stats.clone() }
    }

    /// Ends quiet flows and emits update records that are due, as of `now`.
    pub fn tick(&mut self, now: UnixNanos) {
        let idle = self.config.idle;
        let interval = self.config.update_interval.map(nanos);
        let mut ended = Vec::new();
        for (key, entry) in self.flows.iter_mut() {
            let flow = &entry.flow;
            let quiet = now.saturating_sub(flow.stats.last_ns);
            if let Some(reason) = flow.tcp_closed()
                && quiet >= nanos(idle.closed)
            {
                ended.push((*key, reason));
            } else if quiet >= nanos(idle.for_proto(key.proto)) {
                ended.push((*key, CloseReason::IdleTimeout));
            } else if let Some(interval) = interval
                && now.saturating_sub(entry.logged_ns) >= interval
                && flow.stats.last_ns != entry.logged_last_ns
            {
                entry.logged_ns = now;
                entry.logged_last_ns = flow.stats.last_ns;
                self.output.push(Output::Update(flow.clone()));
            }
        }
        for (key, reason) in ended {
            self.retire(&key, reason);
        }
    }

    /// Ends every live flow with [`CloseReason::CommandExit`]; call once the backend is done.
    pub fn finish(&mut self) {
        let mut keys: Vec<(u64, FlowKey)> =
            self.flows.iter().map(|(k, e)| (e.flow.uid, *k)).collect();
        keys.sort_unstable_by_key(|(uid, _)| *uid);
        for (_, key) in keys {
            self.end(&key, CloseReason::CommandExit);
        }
    }

    /// Takes the records waiting to be written, oldest first.
    pub fn drain_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.output.drain(..)
    }

    /// Ends `key` because the backend said so.
    fn end(&mut self, key: &FlowKey, reason: CloseReason) {
        if let Some(mut entry) = self.flows.remove(key) {
            entry.flow.close_reason = Some(reason);
            self.output.push(Output::End(entry.flow));
        }
    }

    /// Ends `key` on the table's own decision, remembering what was logged in case the
    /// backend still reports the flow.
    fn retire(&mut self, key: &FlowKey, reason: CloseReason) {
        if let Some(mut entry) = self.flows.remove(key) {
            let mut logged = entry.flow.stats;
            if let Some(base) = &entry.baseline {
                logged = add(&logged, base);
            }
            let retired = Retired { first_ns: entry.backend_first_ns, stats: logged };
            self.retired.insert(*key, retired);
            entry.flow.close_reason = Some(reason);
            self.output.push(Output::End(entry.flow));
        }
    }

    /// Makes room: ends the least recently active 1/16th of the table (at least one flow),
    /// so a full table costs one O(n) selection per batch rather than per new flow (with
    /// 1/64th, the selection dominated the cost of a new flow in the benchmark).
    fn evict(&mut self) {
        let batch = (self.config.max_flows / 16).max(1);
        let mut by_age: Vec<(UnixNanos, FlowKey)> =
            self.flows.iter().map(|(k, e)| (e.flow.stats.last_ns, *k)).collect();
        if by_age.len() > batch {
            by_age.select_nth_unstable_by_key(batch - 1, |(t, _)| *t);
            by_age.truncate(batch);
        }
        by_age.sort_unstable_by_key(|(t, _)| *t);
        for (_, key) in by_age {
            self.retire(&key, CloseReason::Evicted);
            self.stats.evictions += 1;
        }
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// `cum - base` for the counters; flags and history stay cumulative.
fn subtract(cum: &FlowStats, base: &FlowStats) -> FlowStats {
    let mut s = *cum;
    for d in 0..2 {
        s.packets[d] = cum.packets[d].saturating_sub(base.packets[d]);
        s.bytes[d] = cum.bytes[d].saturating_sub(base.bytes[d]);
        s.payload_bytes[d] = cum.payload_bytes[d].saturating_sub(base.payload_bytes[d]);
    }
    s.first_ns = base.last_ns.max(cum.first_ns);
    s
}

fn add(a: &FlowStats, base: &FlowStats) -> FlowStats {
    let mut s = *a;
    for d in 0..2 {
        s.packets[d] += base.packets[d];
        s.bytes[d] += base.bytes[d];
        s.payload_bytes[d] += base.payload_bytes[d];
    }
    s.first_ns = base.first_ns;
    s
}

/// A map that forgets its oldest insertions beyond `capacity` (approximately: a key removed
/// and inserted again keeps its first place in line).
struct Bounded<K, V> {
    map: FastMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq + Copy, V> Bounded<K, V> {
    fn new(capacity: usize) -> Self {
        Bounded { map: FastMap::default(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key, value).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.capacity {
            let Some(oldest) = self.order.pop_front() else { break };
            self.map.remove(&oldest);
        }
        // `remove` leaves keys behind in `order`; compact it before it outgrows the map.
        if self.order.len() > 2 * self.capacity {
            self.order.retain(|k| self.map.contains_key(k));
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use childflow_common::flow::{DIR_IN, DIR_OUT};

    use super::*;
    use crate::event::DropReport;
    use crate::flow::{
        ConnState,
        dns::fixtures::{addr, answer, cname, dns_response},
        fixtures::*,
    };

    const SEC: u64 = 1_000_000_000;

    fn table() -> FlowTable {
        FlowTable::new(TableConfig::default())
    }

    fn ends(table: &mut FlowTable) -> Vec<Flow> {
        table
            .drain_output()
            .filter_map(|o| match o {
                Output::End(f) => Some(f),
                Output::Update(_) => None,
            })
            .collect()
    }

    fn process(pid: u32, comm: &str) -> ProcessInfo {
        ProcessInfo {
            pid,
            uid: 1000,
            comm: comm.into(),
            exe: Some(format!("/usr/bin/{comm}")),
            cmdline: Some(vec![comm.into(), "https://example.test/".into()]),
        }
    }

    #[test]
    fn a_started_flow_is_live_with_its_community_id() {
        let mut t = table();
        let flow = t.ingest(&established_flow()).expect("flow event yields its flow").clone();
        assert_eq!(flow.uid, 1);
        assert!(flow.community_id.starts_with("1:"), "{}", flow.community_id);
        assert_eq!(flow.conn_state(), ConnState::S1);
        assert!(flow.local_orig());
        assert_eq!(t.lookup(&flow.key), Some(&flow));
        assert_eq!(t.len(), 1);
        assert_eq!(t.drain_output().count(), 0);
    }

    #[test]
    fn the_backends_end_produces_exactly_one_end_record() {
        let mut t = table();
        let key = tcp_key(40000, "198.18.0.1:80");
        t.ingest(&established_flow());
        let ended = t
            .ingest(&flow_event(key, closed_stats(T0), FlowPhase::End(CloseReason::Fin)))
            .expect("the ended flow")
            .clone();
        assert_eq!(ended.close_reason, Some(CloseReason::Fin));
        assert_eq!(ended.conn_state(), ConnState::SF);
        assert_eq!(ended.history(), "ShADdFf");
        assert!(t.is_empty());
        assert_eq!(ends(&mut t), [ended]);
    }

    #[test]
    fn a_flow_seen_only_at_its_end_is_still_logged() {
        let mut t = table();
        let key = udp_key(5353, "198.18.0.53:53");
        t.ingest(&flow_event(
            key,
            udp_exchange_stats(T0),
            FlowPhase::End(CloseReason::IdleTimeout),
        ));
        let got = ends(&mut t);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].stats.packets, [1, 1]);
    }

    #[test]
    fn quiet_flows_end_after_their_protocols_idle_timeout() {
        let mut t = table();
        t.ingest(&established_flow());
        let udp = udp_key(5000, "198.18.0.7:7");
        t.ingest(&flow_event(udp, udp_exchange_stats(T0), FlowPhase::Start));
        t.tick(T0 + 61 * SEC);
        let got = ends(&mut t);
        assert_eq!(got.len(), 1, "only UDP has timed out");
        assert_eq!(got[0].key, udp);
        assert_eq!(got[0].close_reason, Some(CloseReason::IdleTimeout));
        t.tick(T0 + 301 * SEC);
        assert_eq!(ends(&mut t)[0].close_reason, Some(CloseReason::IdleTimeout));
    }

    #[test]
    fn a_closed_tcp_flow_ends_shortly_after_with_its_close_reason() {
        let mut t = table();
        let key = tcp_key(40001, "198.18.0.1:443");
        t.ingest(&flow_event(key, closed_stats(T0), FlowPhase::Update));
        t.tick(T0 + 6 * MS + SEC / 2);
        assert!(ends(&mut t).is_empty(), "still lingering");
        t.tick(T0 + 6 * MS + SEC);
        assert_eq!(ends(&mut t)[0].close_reason, Some(CloseReason::Fin));
        t.ingest(&flow_event(key, rejected_stats(T0 + 10 * SEC), FlowPhase::Update));
        t.tick(T0 + 12 * SEC);
        assert_eq!(ends(&mut t)[0].close_reason, Some(CloseReason::Rst));
    }

    #[test]
    fn long_flows_get_periodic_updates_only_while_active() {
        let mut t = FlowTable::new(TableConfig {
            update_interval: Some(Duration::from_secs(5)),
            ..TableConfig::default()
        });
        let key = tcp_key(40000, "198.18.0.1:80");
        let mut stats = established_stats(T0);
        t.ingest(&flow_event(key, stats, FlowPhase::Start));
        t.tick(T0 + 4 * SEC);
        assert_eq!(t.drain_output().count(), 0, "too young for an update");
        stats.account(DIR_IN, 1500, 1448, 0x10, T0 + 5 * SEC);
        t.ingest(&flow_event(key, stats, FlowPhase::Update));
        t.tick(T0 + 6 * SEC);
        let out: Vec<Output> = t.drain_output().collect();
        assert!(matches!(&out[..], [Output::Update(f)] if f.stats.packets[DIR_IN] == 3));
        t.tick(T0 + 12 * SEC);
        assert_eq!(t.drain_output().count(), 0, "no new packets, no update");
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_active_and_counts_it() {
        let mut t = FlowTable::new(TableConfig { max_flows: 3, ..TableConfig::default() });
        for port in 0..4u16 {
            let key = udp_key(1000 + port, "198.18.0.7:7");
            t.ingest(&flow_event(
                key,
                udp_exchange_stats(T0 + port as u64 * SEC),
                FlowPhase::Start,
            ));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.stats().evictions, 1);
        let got = ends(&mut t);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key.local_port, 1000);
        assert_eq!(got[0].close_reason, Some(CloseReason::Evicted));
    }

    #[test]
    fn a_flow_reported_again_after_the_table_ended_it_is_not_counted_twice() {
        let mut t = table();
        let key = udp_key(5000, "198.18.0.7:7");
        let mut stats = udp_exchange_stats(T0);
        t.ingest(&flow_event(key, stats, FlowPhase::Start));
        t.tick(T0 + 61 * SEC);
        let first = ends(&mut t).pop().expect("idle end");
        stats.account(DIR_OUT, 60, 32, 0, T0 + 62 * SEC);
        t.ingest(&flow_event(key, stats, FlowPhase::End(CloseReason::IdleTimeout)));
        let second = ends(&mut t).pop().expect("continuation end");
        assert_ne!(first.uid, second.uid);
        assert_eq!(first.stats.packets, [1, 1]);
        assert_eq!(second.stats.packets, [1, 0]);
        assert_eq!(second.stats.bytes, [60, 0]);
        // A new flow on the same key (a different first_ns) starts from zero.
        t.ingest(&flow_event(key, udp_exchange_stats(T0 + 100 * SEC), FlowPhase::Start));
        assert_eq!(t.lookup(&key).unwrap().stats.packets, [1, 1]);
    }

    #[test]
    fn the_backends_own_end_after_the_table_ended_the_flow_adds_no_empty_record() {
        let mut t = table();
        let key = tcp_key(40001, "198.18.0.1:443");
        t.ingest(&flow_event(key, closed_stats(T0), FlowPhase::Update));
        t.tick(T0 + 2 * SEC);
        assert_eq!(ends(&mut t).len(), 1);
        let again = t.ingest(&flow_event(key, closed_stats(T0), FlowPhase::End(CloseReason::Fin)));
        assert!(again.is_none());
        assert!(t.is_empty());
        assert!(ends(&mut t).is_empty(), "no zero-packet record");
    }

    #[test]
    fn the_process_is_attached_whether_it_comes_before_or_after_the_first_packet() {
        let mut t = table();
        let early = tcp_key(40000, "198.18.0.1:80");
        t.ingest(&Event::Process(ProcessEvent { key: early, process: process(42, "curl") }));
        let flow = t.ingest(&established_flow()).unwrap();
        assert_eq!(flow.process.as_deref().map(|p| p.pid), Some(42));

        let late = udp_key(5000, "198.18.0.7:7");
        t.ingest(&flow_event(late, udp_exchange_stats(T0), FlowPhase::Start));
        let flow = t
            .ingest(&Event::Process(ProcessEvent { key: late, process: process(42, "curl") }))
            .unwrap();
        assert_eq!(flow.process.as_deref().map(|p| p.comm.as_str()), Some("curl"));
        let a = t.lookup(&early).unwrap().process.clone().unwrap();
        let b = t.lookup(&late).unwrap().process.clone().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one process, one shared record");
    }

    #[test]
    fn a_process_seen_before_its_local_port_was_bound_still_matches() {
        let mut t = table();
        let unbound = tcp_key(0, "198.18.0.1:80");
        t.ingest(&Event::Process(ProcessEvent { key: unbound, process: process(7, "wget") }));
        let flow = t.ingest(&established_flow()).unwrap();
        assert_eq!(flow.process.as_deref().map(|p| p.pid), Some(7));
    }

    #[test]
    fn a_dns_answer_that_arrives_after_its_flow_still_names_it() {
        let mut t = table();
        assert!(t.ingest(&established_flow()).unwrap().dns.is_none());
        t.ingest(&Event::Dns(dns_response(
            "example.test",
            vec![answer("example.test", addr("198.18.0.1"))],
        )));
        let flow = t.iter().next().expect("the live flow");
        assert_eq!(flow.dns.as_deref().map(|d| d.query.as_str()), Some("example.test"));
    }

    #[test]
    fn flows_to_resolved_addresses_carry_the_names() {
        let mut t = table();
        t.ingest(&Event::Dns(dns_response(
            "www.example.test",
            vec![
                answer("www.example.test", cname("example.test")),
                answer("example.test", addr("198.18.0.1")),
            ],
        )));
        let flow = t.ingest(&established_flow()).unwrap();
        let dns = flow.dns.as_deref().expect("attributed");
        assert_eq!(dns.query, "www.example.test");
        assert_eq!(dns.names, ["www.example.test", "example.test"]);
        let other = udp_key(5000, "198.18.0.7:7");
        assert!(
            t.ingest(&flow_event(other, udp_exchange_stats(T0), FlowPhase::Start))
                .unwrap()
                .dns
                .is_none()
        );
    }

    #[test]
    fn finish_ends_every_live_flow_in_order_of_first_sighting() {
        let mut t = table();
        t.ingest(&established_flow());
        t.ingest(&flow_event(
            udp_key(5000, "198.18.0.7:7"),
            udp_exchange_stats(T0),
            FlowPhase::Start,
        ));
        t.finish();
        let got = ends(&mut t);
        assert_eq!(got.iter().map(|f| f.uid).collect::<Vec<_>>(), [1, 2]);
        assert!(got.iter().all(|f| f.close_reason == Some(CloseReason::CommandExit)));
        assert!(t.is_empty());
    }

    #[test]
    fn drops_are_kept_per_source_as_the_latest_cumulative_count() {
        let mut t = table();
        for (source, count) in [("ring", 3), ("map", 1), ("ring", 5), ("ring", 4)] {
            t.ingest(&Event::Drops(DropReport { source, count }));
        }
        assert_eq!(t.stats().drops, [("ring", 5), ("map", 1)]);
    }

    #[test]
    fn a_packet_finds_its_flow_and_knows_if_it_is_the_first() {
        use crate::event::{Direction, PacketEvent};
        use crate::flow::packet::tests::ipv4_frame;
        let mut t = table();
        t.ingest(&established_flow());
        let mut l4 = 80u16.to_be_bytes().to_vec();
        l4.extend(40000u16.to_be_bytes());
        l4.extend([0; 16]);
        let data = ipv4_frame(6, [198, 18, 0, 1], [10, 0, 2, 100], &l4);
        let packet =
            PacketEvent { ts: T0, direction: Direction::In, orig_len: 54, data: data.into() };
        let got = t.packet(&packet).expect("the flow of the packet");
        assert!(got.first);
        assert!(got.flow.community_id.starts_with("1:"));
        assert!(!t.packet(&packet).expect("again").first);
        assert_eq!(t.ingest(&Event::Packet(packet)).map(|f| f.uid), Some(1));
    }

    #[test]
    fn a_packet_before_its_flow_is_reported_still_carries_the_community_id() {
        use crate::event::{Direction, PacketEvent};
        use crate::flow::packet::tests::ipv4_frame;
        let mut t = table();
        // The command's SYN, seen before the backend reports the flow.
        let mut l4 = 40000u16.to_be_bytes().to_vec();
        l4.extend(80u16.to_be_bytes());
        l4.extend([0; 16]);
        let data = ipv4_frame(6, [10, 0, 2, 100], [198, 18, 0, 1], &l4);
        let syn =
            PacketEvent { ts: T0, direction: Direction::Out, orig_len: 54, data: data.into() };
        let got = t.packet(&syn).expect("a provisional flow");
        assert!(got.first);
        let early_id = got.flow.community_id;
        assert!(!t.packet(&syn).expect("again").first);
        t.ingest(&established_flow());
        let flow = t.packet(&syn).expect("the reported flow");
        assert!(!flow.first, "the first packet was already commented");
        assert_eq!(flow.flow.community_id, early_id, "same Community ID before and after");
    }

    #[test]
    fn snapshot_copies_the_live_flows() {
        let mut t = table();
        t.ingest(&established_flow());
        let snap = t.snapshot();
        assert_eq!(snap.live.len(), 1);
        assert_eq!(snap.stats.flows, 1);
        assert_eq!(snap.live[0].stats.initiator as usize, DIR_OUT);
    }
}
