//! The collector: the one consumer of the backend's event channel. It feeds every event to
//! the flow table, turns what the table emits into flow log records, and hands events and
//! records to the outputs ([`Consumer`]s: the flow log, and next to it the capture writer
//! and the dashboard).
//!
//! Invariants:
//! - Consumers see events in channel order, each after the table took it in, with the flow
//!   it belongs to (for packets: found by the packet's key).
//! - Every flow gets exactly one end record: the table ends flows as they close or go idle,
//!   and [`Collector::finish`] ends the rest with `command_exit` before the run record.
//! - A consumer that fails (full disk, closed pipe) is reported on stderr at once and
//!   dropped; the others and the command carry on, and the error is returned at the end so
//!   childflow can fail the run instead of leaving the user with a silently short log.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use crossbeam_channel::RecvTimeoutError;

use crate::{
    event::{Event, Events, UnixNanos, now_unix_nanos},
    flow::{FlowTable, Output, PacketFlow, TableConfig},
    sandbox::ExitStatus,
    sink::{
        FlowLog,
        schema::{
            DnsRecord, FlowRecord, FlowRecordKind, HeaderRecord, RunRecord, SCHEMA_NAME,
            SCHEMA_VERSION, epoch_secs,
        },
    },
    summary::{Summary, SummaryBuilder},
};

/// The drop source name of the backend-to-collector channel.
pub const QUEUE_DROPS: &str = "event queue";

/// An output of the collector. Every method has a no-op default, so a consumer implements
/// only what it needs.
pub trait Consumer: Send {
    /// What this consumer is, for error messages (`flow log`, `capture`).
    fn name(&self) -> String;

    /// Every event, after the flow table took it in. `flow` is the flow it concerns when the
    /// table knows it; for packets `first` says whether this is the flow's first packet.
    ///
    /// A consumer may take a packet's bytes (`PacketEvent::data`, then left empty) to keep
    /// them past the event: the capture writes large packets to a direct file straight from
    /// their buffers. Consumers after it see the packet without its bytes; none needs them.
    fn event(&mut self, _event: &mut Event, _flow: Option<PacketFlow<'_>>) -> Result<()> {
        Ok(())
    }

    /// A flow record: a periodic update or the end of a flow.
    fn flow(&mut self, _record: &FlowRecord) -> Result<()> {
        Ok(())
    }

    /// A DNS response the command received.
    fn dns(&mut self, _record: &DnsRecord) -> Result<()> {
        Ok(())
    }

    /// After each batch of events and on every clock tick: flush, or copy what the table
    /// holds ([`FlowTable::snapshot`]) for a live view.
    fn tick(&mut self, _table: &FlowTable) -> Result<()> {
        Ok(())
    }

    /// Once, after every flow ended.
    fn finish(&mut self, _run: &RunRecord) -> Result<()> {
        Ok(())
    }
}

/// What the run was, for the header and the run record.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub command: Vec<String>,
    pub backend: String,
    pub start: UnixNanos,
}

impl RunInfo {
    pub fn header(&self) -> HeaderRecord {
        HeaderRecord {
            schema: SCHEMA_NAME.into(),
            version: SCHEMA_VERSION,
            childflow: crate::VERSION.into(),
            command: self.command.clone(),
            backend: self.backend.clone(),
            ts: epoch_secs(self.start),
        }
    }
}

/// How the run ended, for the run record.
#[derive(Clone, Debug)]
pub struct RunEnd {
    pub end: UnixNanos,
    /// `None` if the command never ran or the backend failed.
    pub status: Option<ExitStatus>,
    /// The backend's failure, with its causes.
    pub error: Option<String>,
}

/// What the collector produced.
pub struct Outcome {
    pub run: RunRecord,
    pub summary: Summary,
    /// Failures of consumers, each already reported once on stderr.
    pub errors: Vec<anyhow::Error>,
}

/// How often idle timeouts and update records are checked.
const TICK: Duration = Duration::from_millis(250);
/// Consumers are ticked (flushed) at least this often, even when no event comes: the
/// capture holds packets for late TLS secrets and must write them out on a quiet link.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// At most this many events are handled between two consumer ticks (flushes).
const BATCH: usize = 1024;

/// See the module documentation.
pub struct Collector {
    table: FlowTable,
    consumers: Vec<Box<dyn Consumer>>,
    errors: Vec<anyhow::Error>,
    summary: SummaryBuilder,
    run: RunInfo,
    queue_drops: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Where packets' bytes go back once handled ([`Collector::return_packets_to`]).
    packet_budget: Option<std::sync::Arc<crate::event::PacketBudget>>,
    events: u64,
}

impl Collector {
    pub fn new(config: TableConfig, run: RunInfo) -> Self {
        Collector {
            table: FlowTable::new(config),
            consumers: Vec::new(),
            errors: Vec::new(),
            summary: SummaryBuilder::new(),
            run,
            queue_drops: None,
            packet_budget: None,
            events: 0,
        }
    }

    pub fn add(&mut self, consumer: Box<dyn Consumer>) {
        self.consumers.push(consumer);
    }

    /// The backend's [`crate::event::Emitter::drop_counter`], read into the run record.
    pub fn count_queue_drops(&mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.queue_drops = Some(counter);
    }

    /// The backend's [`crate::event::Emitter::packet_budget`], which gets each packet's
    /// bytes back once the consumers are done with it.
    pub fn return_packets_to(&mut self, budget: std::sync::Arc<crate::event::PacketBudget>) {
        self.packet_budget = Some(budget);
    }

    pub fn table(&self) -> &FlowTable {
        &self.table
    }

    /// Events handled so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Handles events until every sender of `events` is gone, ticking on the wall clock.
    ///
    /// After a batch that emptied the channel it lets events gather for a moment
    /// ([`Events::coalesce`]) instead of being woken by the next one.
    pub fn drain(&mut self, events: Events) {
        let mut next_tick = now_unix_nanos() + TICK.as_nanos() as u64;
        loop {
            let mut drained = false;
            match events.recv_timeout(FLUSH_EVERY) {
                Ok(first) => {
                    self.handle(first);
                    let mut handled = 1;
                    for event in events.try_iter().take(BATCH - 1) {
                        self.handle(event);
                        handled += 1;
                    }
                    drained = handled < BATCH;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = now_unix_nanos();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK.as_nanos() as u64;
            } else {
                self.for_each_consumer(|c, table| c.tick(table));
            }
            if drained {
                events.coalesce();
            }
        }
    }

    /// Takes in one event.
    pub fn handle(&mut self, mut event: Event) {
        self.events += 1;
        // Before a consumer may take the bytes (`Consumer::event`).
        let packet_len = match &event {
            Event::Packet(p) => p.data.len(),
            _ => 0,
        };
        let mut failed = Vec::new();
        let flow = match &event {
            Event::Packet(p) => self.table.packet(p),
            other => self.table.ingest(other).map(|flow| PacketFlow { flow, first: false }),
        };
        for (i, c) in self.consumers.iter_mut().enumerate() {
            if let Err(e) = c.event(&mut event, flow) {
                failed.push((i, e));
            }
        }
        // Highest index first, so earlier indexes stay valid while removing.
        for (i, e) in failed.into_iter().rev() {
            self.fail(i, e);
        }
        if let Event::Dns(d) = &event {
            let record = DnsRecord::from_event(d);
            self.summary.add_dns(&record);
            self.for_each_consumer(|c, _| c.dns(&record));
        }
        self.write_output();
        if let Event::Packet(p) = event {
            if let Some(budget) = &self.packet_budget {
                budget.release(packet_len);
            }
            p.data.recycle();
        }
    }

    /// Ends idle flows, emits due update records, and lets consumers tick, as of `now`.
    pub fn tick(&mut self, now: UnixNanos) {
        self.table.tick(now);
        self.write_output();
        self.for_each_consumer(|c, table| c.tick(table));
    }

    /// Ends every live flow (`command_exit`), writes the run record and finishes every
    /// consumer.
    pub fn finish(mut self, end: RunEnd) -> Outcome {
        self.table.finish();
        self.write_output();
        let mut drops: BTreeMap<String, u64> =
            self.table.stats().drops.iter().map(|(s, n)| (s.to_string(), *n)).collect();
        let queue =
            self.queue_drops.as_ref().map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed));
        drops.insert(QUEUE_DROPS.into(), queue);
        let run = RunRecord {
            command: self.run.command.clone(),
            backend: self.run.backend.clone(),
            exit_code: end.status.map(ExitStatus::code),
            status: match (&end.status, &end.error) {
                (Some(s), _) => s.to_string(),
                (None, Some(_)) => "childflow failed".into(),
                (None, None) => "unknown".into(),
            },
            error: end.error,
            ts: epoch_secs(self.run.start),
            end_ts: epoch_secs(end.end),
            duration: RunRecord::duration_from(self.run.start, end.end),
            totals: self.summary.totals().clone(),
            drops,
            evictions: self.table.stats().evictions,
        };
        self.for_each_consumer(|c, table| c.tick(table));
        let mut consumers = std::mem::take(&mut self.consumers);
        for c in consumers.iter_mut() {
            if let Err(e) = c.finish(&run) {
                let e = e.context(format!("{} failed", c.name()));
                eprintln!("childflow: error: {e:#}");
                self.errors.push(e);
            }
        }
        let summary = self.summary.finish(&run);
        Outcome { run, summary, errors: self.errors }
    }

    fn write_output(&mut self) {
        let outputs: Vec<Output> = self.table.drain_output().collect();
        for out in outputs {
            let record = match &out {
                Output::Update(f) => FlowRecord::from_flow(f, FlowRecordKind::Update),
                Output::End(f) => FlowRecord::from_flow(f, FlowRecordKind::End),
            };
            self.summary.add_flow(&record);
            self.for_each_consumer(|c, _| c.flow(&record));
        }
    }

    fn for_each_consumer(
        &mut self,
        mut f: impl FnMut(&mut dyn Consumer, &FlowTable) -> Result<()>,
    ) {
        let mut i = 0;
        while i < self.consumers.len() {
            match f(self.consumers[i].as_mut(), &self.table) {
                Ok(()) => i += 1,
                Err(e) => self.fail(i, e),
            }
        }
    }

    /// Reports a consumer's failure once and drops the consumer.
    fn fail(&mut self, i: usize, e: anyhow::Error) {
        let c = self.consumers.remove(i);
        let e = e.context(format!("{} stopped", c.name()));
        eprintln!("childflow: error: {e:#}; the command keeps running");
        self.errors.push(e);
    }
}

/// The `--flow-log` output.
pub struct FlowLogConsumer {
    log: FlowLog,
}

impl FlowLogConsumer {
    /// Writes the header record (JSONL) and returns the consumer.
    pub fn new(mut log: FlowLog, run: &RunInfo) -> Result<Self> {
        log.header(&run.header())?;
        Ok(FlowLogConsumer { log })
    }
}

impl Consumer for FlowLogConsumer {
    fn name(&self) -> String {
        format!("flow log {}", self.log.target())
    }

    fn flow(&mut self, record: &FlowRecord) -> Result<()> {
        Ok(self.log.flow(record)?)
    }

    fn dns(&mut self, record: &DnsRecord) -> Result<()> {
        Ok(self.log.dns(record)?)
    }

    fn finish(&mut self, run: &RunRecord) -> Result<()> {
        Ok(self.log.run(run)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::event::{CloseReason, Direction, FlowPhase, PacketEvent};
    use crate::flow::{fixtures::*, packet::tests::ipv4_frame};

    /// Records what it is given, in a log the test keeps a handle on.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        fail_on_flow: bool,
    }

    impl Consumer for Recorder {
        fn name(&self) -> String {
            "recorder".into()
        }

        fn event(&mut self, event: &mut Event, flow: Option<PacketFlow<'_>>) -> Result<()> {
            if let Event::Packet(_) = event {
                let f = flow.map(|f| format!("uid {} first {}", f.flow.uid, f.first));
                self.log.lock().unwrap().push(format!("packet {f:?}"));
            }
            Ok(())
        }

        fn flow(&mut self, record: &FlowRecord) -> Result<()> {
            if self.fail_on_flow {
                anyhow::bail!("disk full");
            }
            let line = format!("{:?} {} {:?}", record.event, record.uid, record.close_reason);
            self.log.lock().unwrap().push(line);
            Ok(())
        }

        fn finish(&mut self, run: &RunRecord) -> Result<()> {
            self.log.lock().unwrap().push(format!("run {:?} {}", run.exit_code, run.totals.flows));
            Ok(())
        }
    }

    fn collector() -> Collector {
        let info = RunInfo { command: vec!["true".into()], backend: "rootless".into(), start: T0 };
        Collector::new(TableConfig::default(), info)
    }

    fn end() -> RunEnd {
        RunEnd { end: T0 + 1_000 * MS, status: Some(ExitStatus::Exited(0)), error: None }
    }

    #[test]
    fn every_flow_ends_once_and_the_run_record_comes_last() {
        let mut c = collector();
        let rec = Recorder::default();
        c.add(Box::new(rec.clone()));
        c.handle(established_flow());
        let udp = udp_key(5000, "198.18.0.7:7");
        c.handle(flow_event(udp, udp_exchange_stats(T0), FlowPhase::End(CloseReason::IdleTimeout)));
        let outcome = c.finish(end());
        assert!(outcome.errors.is_empty());
        assert_eq!(
            *rec.log.lock().unwrap(),
            ["End 2 Some(IdleTimeout)", "End 1 Some(CommandExit)", "run Some(0) 2"]
        );
        assert_eq!(outcome.summary.totals.flows, 2);
        assert_eq!(outcome.run.drops.get(QUEUE_DROPS), Some(&0));
    }

    #[test]
    fn packets_reach_consumers_with_their_flow() {
        let mut c = collector();
        let rec = Recorder::default();
        c.add(Box::new(rec.clone()));
        c.handle(established_flow());
        let mut l4 = 40000u16.to_be_bytes().to_vec();
        l4.extend(80u16.to_be_bytes());
        l4.extend([0; 16]);
        let data = ipv4_frame(6, [10, 0, 2, 100], [198, 18, 0, 1], &l4);
        let p = PacketEvent { ts: T0, direction: Direction::Out, orig_len: 54, data: data.into() };
        c.handle(Event::Packet(p.clone()));
        c.handle(Event::Packet(p));
        assert_eq!(
            *rec.log.lock().unwrap(),
            [r#"packet Some("uid 1 first true")"#, r#"packet Some("uid 1 first false")"#]
        );
    }

    #[test]
    fn a_failing_consumer_is_dropped_and_reported_while_the_others_go_on() {
        let mut c = collector();
        let good = Recorder::default();
        c.add(Box::new(Recorder { fail_on_flow: true, ..Recorder::default() }));
        c.add(Box::new(good.clone()));
        c.handle(established_flow());
        let outcome = c.finish(end());
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(format!("{:#}", outcome.errors[0]), "recorder stopped: disk full");
        assert_eq!(*good.log.lock().unwrap(), ["End 1 Some(CommandExit)", "run Some(0) 1"]);
    }

    #[test]
    fn ticks_end_idle_flows_on_the_given_clock() {
        let mut c = collector();
        let rec = Recorder::default();
        c.add(Box::new(rec.clone()));
        c.handle(flow_event(
            udp_key(5000, "198.18.0.7:7"),
            udp_exchange_stats(T0),
            FlowPhase::Start,
        ));
        c.tick(T0 + 30 * 1_000 * MS);
        assert!(rec.log.lock().unwrap().is_empty());
        c.tick(T0 + 61 * 1_000 * MS);
        assert_eq!(*rec.log.lock().unwrap(), ["End 1 Some(IdleTimeout)"]);
    }
}
