//! Turning what the kernel programs report into [`Event`]s: flow lifecycles from the flow
//! ring and map samples, processes from socket records, DNS answers from the packet ring.
//!
//! Flow lifecycle, per key:
//! - a `FLOW_START` record (or a sample finding a key we have not seen, if the record was
//!   dropped) emits [`FlowPhase::Start`];
//! - each sample whose counters changed emits [`FlowPhase::Update`] (cumulative stats);
//! - a FIN/RST record only marks the flow as closing: the last ACK after the FINs still
//!   belongs to it, so the [`FlowPhase::End`] is emitted by the sample that finds it quiet
//!   for [`CLOSE_LINGER`], with the final counters, and the key is then removed from the
//!   kernel map; a flow quiet for its protocol's idle timeout ends the same way;
//! - when the command exits, every remaining flow ends ([`FlowTracker::finish`]).
//!
//! Kernel timestamps are `CLOCK_MONOTONIC`; [`Clock`] converts them to UNIX nanoseconds
//! once, so every event carries wall-clock time (event.rs invariant).

use std::collections::HashMap;

use childflow_common::{
    event::{
        FLOW_END_FIN, FLOW_END_RST, FLOW_START, FlowRecord, SOCK_CREATE, SOCK_FLOW, SockRecord,
    },
    flow::{FlowKey, FlowStats, PROTO_TCP, PROTO_UDP},
};

use crate::event::{
    CloseReason, Direction, Event, FlowPhase, FlowUpdate, PacketEvent, ProcessEvent, ProcessInfo,
    UnixNanos,
};

/// A closing flow (FIN from both sides, or RST) ends once quiet this long.
pub const CLOSE_LINGER_NS: u64 = 1_000_000_000;
const CLOSE_LINGER: u64 = CLOSE_LINGER_NS;

/// How long a flow may be quiet before it is considered over.
pub fn idle_timeout_ns(proto: u8) -> u64 {
    const S: u64 = 1_000_000_000;
    match proto {
        PROTO_TCP => 300 * S,
        PROTO_UDP => 60 * S,
        _ => 30 * S,
    }
}

/// Converts kernel `CLOCK_MONOTONIC` nanoseconds into [`UnixNanos`].
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// UNIX time minus monotonic time, in nanoseconds.
    offset: i128,
}

impl Clock {
    /// Samples both clocks now.
    pub fn now() -> Clock {
        Clock { offset: crate::event::now_unix_nanos() as i128 - monotonic_ns() as i128 }
    }

    /// A clock with a fixed offset (tests).
    pub fn with_offset(offset: i128) -> Clock {
        Clock { offset }
    }

    pub fn to_unix(self, mono_ns: u64) -> UnixNanos {
        (mono_ns as i128 + self.offset).max(0) as u64
    }

    fn stats(self, mut s: FlowStats) -> FlowStats {
        s.first_ns = self.to_unix(s.first_ns);
        s.last_ns = self.to_unix(s.last_ns);
        s
    }
}

/// `CLOCK_MONOTONIC` now, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime with a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug)]
struct Tracked {
    /// Counters as last emitted (monotonic timestamps).
    emitted: FlowStats,
    closing: Option<CloseReason>,
}

/// The flows the backend has reported, and what it has told about each.
#[derive(Debug)]
pub struct FlowTracker {
    clock: Clock,
    flows: HashMap<FlowKey, Tracked>,
}

fn flow(key: FlowKey, stats: FlowStats, phase: FlowPhase) -> Event {
    Event::Flow(FlowUpdate { key, stats, phase })
}

impl FlowTracker {
    pub fn new(clock: Clock) -> FlowTracker {
        FlowTracker { clock, flows: HashMap::new() }
    }

    /// A record from the flow ring.
    pub fn on_record(&mut self, rec: &FlowRecord, out: &mut Vec<Event>) {
        match rec.reason {
            FLOW_START => {
                self.start_if_new(rec.key, &rec.stats, out);
            }
            FLOW_END_FIN | FLOW_END_RST => {
                let reason =
                    if rec.reason == FLOW_END_FIN { CloseReason::Fin } else { CloseReason::Rst };
                let t = self.start_if_new(rec.key, &rec.stats, out);
                t.closing.get_or_insert(reason);
            }
            _ => {}
        }
    }

    fn start_if_new(
        &mut self,
        key: FlowKey,
        stats: &FlowStats,
        out: &mut Vec<Event>,
    ) -> &mut Tracked {
        let clock = self.clock;
        self.flows.entry(key).or_insert_with(|| {
            out.push(flow(key, clock.stats(*stats), FlowPhase::Start));
            Tracked { emitted: *stats, closing: None }
        })
    }

    /// A sample of the kernel map taken at monotonic time `now`: emits updates and ends,
    /// and returns the keys to delete from the kernel map.
    pub fn on_sample(
        &mut self,
        sample: &[(FlowKey, FlowStats)],
        now: u64,
        out: &mut Vec<Event>,
    ) -> Vec<FlowKey> {
        let mut remove = Vec::new();
        for (key, stats) in sample {
            let clock = self.clock;
            let t = self.start_if_new(*key, stats, out);
            let quiet = now.saturating_sub(stats.last_ns);
            let end = match t.closing {
                Some(reason) if quiet >= CLOSE_LINGER => Some(reason),
                _ if quiet >= idle_timeout_ns(key.proto) => Some(CloseReason::IdleTimeout),
                _ => None,
            };
            if let Some(reason) = end {
                out.push(flow(*key, clock.stats(*stats), FlowPhase::End(reason)));
                self.flows.remove(key);
                remove.push(*key);
            } else if t.emitted != *stats {
                t.emitted = *stats;
                out.push(flow(*key, clock.stats(*stats), FlowPhase::Update));
            }
        }
        remove
    }

    /// The command exited: ends every flow still in `sample` (the final map contents).
    pub fn finish(&mut self, sample: &[(FlowKey, FlowStats)], out: &mut Vec<Event>) {
        for (key, stats) in sample {
            let clock = self.clock;
            let t = self.start_if_new(*key, stats, out);
            let reason = t.closing.unwrap_or(CloseReason::CommandExit);
            out.push(flow(*key, clock.stats(*stats), FlowPhase::End(reason)));
            self.flows.remove(key);
        }
    }
}

/// Length-only packet events for `n` packets the kernel's capture filter rejected
/// (`COUNT_CAPTURE_FILTERED`): the capture counts them as filtered out (an empty
/// [`PacketEvent::data`]) so its statistics cover every packet the interface saw, without
/// the kernel copying a byte of them. Direction and length are not known; nothing reads
/// them for such a packet.
pub fn filtered_packets(n: u64, out: &mut Vec<Event>) {
    if n == 0 {
        return;
    }
    let ts = crate::event::now_unix_nanos();
    out.extend((0..n).map(|_| {
        Event::Packet(PacketEvent {
            ts,
            direction: Direction::Out,
            orig_len: 1,
            data: Default::default(),
        })
    }));
}

/// Reads what `/proc` still knows of a process.
pub fn proc_info(pid: u32, uid: u32, comm: &[u8; 16]) -> ProcessInfo {
    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let cmdline =
        std::fs::read(format!("/proc/{pid}/cmdline")).ok().filter(|c| !c.is_empty()).map(|c| {
            c.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        });
    ProcessInfo {
        pid,
        uid,
        comm: String::from_utf8_lossy(&comm[..comm_len]).into_owned(),
        exe,
        cmdline,
    }
}

/// Processes of the command tree, by pid, as first seen: kept after they exit.
#[derive(Default)]
pub struct Processes {
    known: HashMap<u32, ProcessInfo>,
}

impl Processes {
    /// A socket record: a creation caches the process (while `/proc` still has it), a flow
    /// record emits the flow's [`ProcessEvent`]. `read` looks the process up in `/proc`.
    pub fn on_record(
        &mut self,
        rec: &SockRecord,
        read: impl Fn(&SockRecord) -> ProcessInfo,
        out: &mut Vec<Event>,
    ) {
        let info = self.known.entry(rec.tgid).or_insert_with(|| read(rec));
        // A pid reused by a new program (exec changes comm): refresh.
        let comm_len = rec.comm.iter().position(|&b| b == 0).unwrap_or(16);
        if info.comm.as_bytes() != &rec.comm[..comm_len] {
            *info = read(rec);
        }
        match rec.hook {
            SOCK_CREATE => {}
            SOCK_FLOW => {
                out.push(Event::Process(ProcessEvent { key: rec.key, process: info.clone() }))
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use childflow_common::flow::{DIR_OUT, TCP_SYN};

    const S: u64 = 1_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey::new(PROTO_TCP, "10.77.0.2:40000".parse().unwrap(), ([198, 18, 1, 2], port).into())
    }

    fn stats(packets: u64, last: u64) -> FlowStats {
        let mut s = FlowStats::new(DIR_OUT, 10);
        s.account(DIR_OUT, 60, 0, TCP_SYN, 10);
        s.packets[DIR_OUT] = packets;
        s.last_ns = last;
        s
    }

    fn record(reason: u32, key: FlowKey, stats: FlowStats) -> FlowRecord {
        FlowRecord { kind: childflow_common::event::KIND_FLOW, reason, key, stats }
    }

    fn phases(events: &[Event]) -> Vec<FlowPhase> {
        events
            .iter()
            .map(|e| match e {
                Event::Flow(f) => f.phase,
                other => panic!("not a flow event: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_flow_starts_updates_and_ends_after_fin_once_quiet() {
        let mut t = FlowTracker::new(Clock::with_offset(1000));
        let mut out = Vec::new();
        t.on_record(&record(FLOW_START, key(80), stats(1, 10)), &mut out);
        assert!(t.on_sample(&[(key(80), stats(5, 2 * S))], 2 * S, &mut out).is_empty());
        t.on_record(&record(FLOW_END_FIN, key(80), stats(9, 3 * S)), &mut out);
        // The last ACK arrives after the FIN record: still the same flow.
        assert!(t.on_sample(&[(key(80), stats(10, 3 * S))], 3 * S, &mut out).is_empty());
        let removed = t.on_sample(&[(key(80), stats(10, 3 * S))], 4 * S, &mut out);
        assert_eq!(removed, [key(80)]);
        assert_eq!(
            phases(&out),
            [
                FlowPhase::Start,
                FlowPhase::Update,
                FlowPhase::Update,
                FlowPhase::End(CloseReason::Fin)
            ]
        );
        let Event::Flow(last) = out.last().unwrap() else { unreachable!() };
        assert_eq!(last.stats.packets[DIR_OUT], 10, "the end carries the final counters");
        assert_eq!(last.stats.last_ns, 3 * S + 1000, "timestamps are converted");
    }

    #[test]
    fn an_unchanged_flow_is_not_repeated_and_idle_flows_end() {
        let mut t = FlowTracker::new(Clock::with_offset(0));
        let mut out = Vec::new();
        // No START record (dropped): the sample starts it.
        t.on_sample(&[(key(81), stats(1, S))], S, &mut out);
        t.on_sample(&[(key(81), stats(1, S))], 2 * S, &mut out);
        let removed =
            t.on_sample(&[(key(81), stats(1, S))], S + idle_timeout_ns(PROTO_TCP), &mut out);
        assert_eq!(removed, [key(81)]);
        assert_eq!(phases(&out), [FlowPhase::Start, FlowPhase::End(CloseReason::IdleTimeout)]);
    }

    #[test]
    fn finish_ends_every_flow_with_the_right_reason() {
        let mut t = FlowTracker::new(Clock::with_offset(0));
        let mut out = Vec::new();
        t.on_record(&record(FLOW_START, key(1), stats(1, 1)), &mut out);
        t.on_record(&record(FLOW_END_RST, key(2), stats(2, 1)), &mut out);
        out.clear();
        t.finish(&[(key(1), stats(3, 2)), (key(2), stats(2, 1))], &mut out);
        assert_eq!(
            phases(&out),
            [FlowPhase::End(CloseReason::CommandExit), FlowPhase::End(CloseReason::Rst)]
        );
    }

    fn sock(hook: u32, tgid: u32, comm: &str, key: FlowKey) -> SockRecord {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        SockRecord { kind: 3, hook, tgid, pid: tgid, key, comm: c, ..Default::default() }
    }

    #[test]
    fn processes_are_remembered_from_socket_creation_and_attached_to_flows() {
        let mut p = Processes::default();
        let mut out = Vec::new();
        let read = |r: &SockRecord| ProcessInfo {
            pid: r.tgid,
            comm: "curl".into(),
            exe: Some("/usr/bin/curl".into()),
            ..Default::default()
        };
        p.on_record(&sock(SOCK_CREATE, 42, "curl", FlowKey::default()), read, &mut out);
        assert!(out.is_empty());
        // The process has exited by now: what was read at creation is kept.
        let gone = |r: &SockRecord| ProcessInfo { pid: r.tgid, ..Default::default() };
        p.on_record(&sock(SOCK_FLOW, 42, "curl", key(80)), gone, &mut out);
        let [Event::Process(ev)] = &out[..] else { panic!("{out:?}") };
        assert_eq!(ev.key, key(80));
        assert_eq!(ev.process.exe.as_deref(), Some("/usr/bin/curl"));
    }
}
