//! Running childflow: dispatch subcommands, or start a backend on the command and turn its
//! events into the outputs the user asked for.
//!
//! The outputs are [`Consumer`]s of the [`Collector`], which feeds every event through the
//! flow table first: the flow log and summary get flow records, the capture gets packets
//! tagged with their flow's Community ID and process.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

use crate::{
    backend,
    capture::{Capture, CaptureSetup, CaptureStats, Interface, PacketMeta},
    cli::{Args, Backend, Command, Config, SummaryFormat},
    collector::{Collector, Consumer, FlowLogConsumer, QUEUE_DROPS, RunEnd, RunInfo},
    event::{self, Event, now_unix_nanos},
    exit,
    flow::{FlowTable, PacketFlow, TableConfig},
    report,
    sandbox::{self, ExitStatus, SpawnError},
    sink::{FlowLog, Target, schema::RunRecord},
    tui,
};

/// Runs what `args` asks for and returns childflow's exit code.
pub fn main(args: Args) -> Result<i32> {
    match args.subcommand {
        Some(Command::Report(r)) => report::run(&r).map(|()| 0),
        Some(Command::Attach(a)) => tui::attach::attach(a.run.as_deref()),
        Some(Command::Ps) => tui::attach::ps(),
        None => {
            let config = args.run.into_config()?;
            init_logging(config.verbose);
            run(&config)
        }
    }
}

/// How many events may wait for the collector before backends start dropping (and
/// counting) them.
const EVENT_QUEUE: usize = 65_536;

/// Runs the command of `config` under its backend; returns the command's exit code, or
/// [`exit::FAILURE`] if the flow log failed while the command ran.
///
/// The backend emits events into a bounded channel; the collector thread drains it into the
/// flow table and the outputs. Outputs are opened before the command starts, so a bad path
/// fails the run before anything happens.
pub fn run(config: &Config) -> Result<i32> {
    let mut config = config.clone();
    let info = RunInfo {
        command: config.command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        backend: config.backend.to_string(),
        start: now_unix_nanos(),
    };
    let mut collector = Collector::new(table_config(&config), info.clone());
    if let Some(path) = &config.flow_log {
        let log = FlowLog::create(Target::from_arg(path), config.flow_log_format)?;
        collector.add(Box::new(FlowLogConsumer::new(log, &info)?));
    }
    let capture = open_capture(&config)?;
    if let Some(keylog) = capture.as_ref().and_then(|c| c.keylog_path()) {
        config.command_env.push(("SSLKEYLOGFILE".into(), keylog.into()));
    }
    let capture_stats = Arc::new(Mutex::new(None));
    if let Some(capture) = capture {
        collector.add(Box::new(CaptureConsumer::new(capture, capture_stats.clone())));
    }
    let (emitter, events) = event::channel(EVENT_QUEUE);
    collector.count_queue_drops(emitter.drop_counter());
    collector.return_packets_to(emitter.packet_budget());
    // The live views (--tui, --events, the socket for `attach`); with --tui the command gets
    // the dashboard's pty as its terminal.
    let mut live = tui::live::Live::start(&config, &emitter)?;
    config.terminal = live.take_terminal();
    collector.add(Box::new(live.consumer(emitter.drop_counter())));
    // The collector thread starts right after the sandbox's clone, like every other thread:
    // a thread alive at the clone could leave a lock (the allocator's) held in the child.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    sandbox::after_clone(move || {
        let thread = std::thread::Builder::new().name("collector".into()).spawn(move || {
            event::yield_to_the_command();
            collector.drain(events);
            collector
        });
        let _ = started_tx.send(thread);
    });
    let result = match config.backend {
        Backend::Rootless => backend::rootless::run(&config, emitter),
        Backend::Rootful => backend::rootful::run(&config, emitter),
    };
    // A run that failed before its clone has not started the collector yet.
    sandbox::run_after_clone_hooks();
    let collector = started_rx.recv().context("the collector was never started")??;
    let end = now_unix_nanos();
    let collector =
        collector.join().map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
    tracing::debug!("{} events", collector.events());
    // A command that could not be started still gets the shell's 126/127 in the run record.
    let spawn_code = |e: &anyhow::Error| {
        e.downcast_ref::<SpawnError>()
            .map(SpawnError::exit_code)
            .filter(|&c| c != exit::FAILURE)
            .map(ExitStatus::Exited)
    };
    let outcome = collector.finish(RunEnd {
        end,
        status: result.as_ref().map_or_else(spawn_code, |s| Some(*s)),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    });
    live.finish(result.as_ref().ok().copied())?;
    if let Some(stats) = capture_stats.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.as_ref() {
        report_capture(stats, &config);
    }
    match config.summary {
        Some(SummaryFormat::Text) => eprint!("{}", outcome.summary.to_text()),
        Some(SummaryFormat::Json) => eprint!("{}", outcome.summary.to_json()),
        None => {}
    }
    let status = result?;
    tracing::debug!("command ended: {status}");
    if !outcome.errors.is_empty() {
        eprintln!(
            "childflow: error: {} output(s) failed during the run (see above); the command ended with {status}",
            outcome.errors.len()
        );
        return Ok(exit::FAILURE);
    }
    Ok(status.code())
}

/// The flow table's settings from the command line.
fn table_config(config: &Config) -> TableConfig {
    TableConfig {
        max_flows: config.max_flows,
        update_interval: Some(config.flow_update_interval),
        community_id_seed: config.community_id_seed,
        ..TableConfig::default()
    }
}

/// Opens `--capture`, describing the backend's capture point.
fn open_capture(config: &Config) -> Result<Option<Capture>> {
    let Some(capture) = &config.capture else { return Ok(None) };
    let interface = match config.backend {
        Backend::Rootless => Interface {
            name: "tap0".into(),
            description: "childflow rootless: the command's tap device; directions are the \
                          command's (outbound = sent by the command)"
                .into(),
        },
        Backend::Rootful => Interface {
            name: "veth".into(),
            description: "childflow rootful: the host end of the command's veth pair; \
                          directions are the command's (outbound = sent by the command)"
                .into(),
        },
    };
    let command: Vec<String> =
        config.command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let setup = CaptureSetup {
        interfaces: vec![interface],
        command: Some(command.join(" ")),
        keylog_owner: sudo_user(),
        keylog_parent: None,
    };
    Capture::open(capture, setup)
        .map(Some)
        .with_context(|| format!("failed to start the capture to {}", capture.path.display()))
}

/// The invoking user when childflow was started through sudo (the command runs as them, so
/// they must be able to write the TLS key log).
fn sudo_user() -> Option<(u32, u32)> {
    let id = |var| std::env::var(var).ok()?.parse::<u32>().ok();
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// The `--capture` output: packets tagged with their flow's Community ID and process.
///
/// After a write error the capture only counts what it loses and the run goes on with the
/// command's exit status (the capture's own policy: it says how many packets it lost).
pub struct CaptureConsumer {
    capture: Option<Capture>,
    stats: Arc<Mutex<Option<CaptureStats>>>,
}

impl CaptureConsumer {
    /// `stats` receives the capture's statistics when it closes.
    pub fn new(capture: Capture, stats: Arc<Mutex<Option<CaptureStats>>>) -> Self {
        CaptureConsumer { capture: Some(capture), stats }
    }
}

fn capture_stopped(e: crate::capture::CaptureError) {
    eprintln!("childflow: {:#}", anyhow::Error::from(e));
}

impl Consumer for CaptureConsumer {
    fn name(&self) -> String {
        "capture".into()
    }

    fn event(&mut self, event: &mut Event, flow: Option<PacketFlow<'_>>) -> Result<()> {
        let Some(c) = self.capture.as_mut() else { return Ok(()) };
        match event {
            Event::Packet(packet) => {
                let meta = PacketMeta {
                    interface: 0,
                    community_id: flow.map(|f| &*f.flow.community_id).filter(|c| !c.is_empty()),
                    first_of_flow: flow.is_some_and(|f| f.first),
                    process: flow.and_then(|f| f.flow.process.as_deref()),
                };
                if let Err(e) = c.take_packet(packet, &meta) {
                    capture_stopped(e);
                }
            }
            Event::Dns(dns) => c.names(dns),
            Event::Flow(_) | Event::Process(_) | Event::Drops(_) => {}
        }
        Ok(())
    }

    fn tick(&mut self, _table: &FlowTable) -> Result<()> {
        if let Some(c) = self.capture.as_mut()
            && let Err(e) = c.flush_due()
        {
            capture_stopped(e);
        }
        Ok(())
    }

    fn finish(&mut self, run: &RunRecord) -> Result<()> {
        let Some(c) = self.capture.take() else { return Ok(()) };
        // Packets lost before the writer: the backends' packet drops and the event queue's.
        let dropped: u64 = run
            .drops
            .iter()
            .filter(|(source, _)| source.contains("packet") || *source == QUEUE_DROPS)
            .map(|(_, n)| n)
            .sum();
        let stats = c.close(dropped).unwrap_or_else(|e| {
            capture_stopped(e);
            CaptureStats { dropped, ..CaptureStats::default() }
        });
        if let Ok(mut slot) = self.stats.lock() {
            *slot = Some(stats);
        }
        Ok(())
    }
}

/// Tells the user about a capture that lost packets or stopped early, and for a rootful
/// one whose writer fell behind, how to give it more room.
fn report_capture(stats: &CaptureStats, config: &Config) {
    let files: Vec<String> = stats.files.iter().map(|p| p.display().to_string()).collect();
    tracing::info!(
        "capture: {} packets written to {} ({} filtered out)",
        stats.written,
        files.join(", "),
        stats.filtered_out
    );
    if stats.dropped > 0 || stats.lost_after_error > 0 {
        eprintln!(
            "childflow: capture lost packets: {} dropped before the writer, {} after it stopped",
            stats.dropped, stats.lost_after_error
        );
    }
    if stats.dropped > 0
        && config.backend == Backend::Rootful
        && let Some(capture) = &config.capture
    {
        eprintln!(
            "childflow: the writer fell behind the traffic; a larger --capture-buffer (this run \
             had {} MiB) lets it catch up without losing packets, or capture less \
             (--capture-filter, --snaplen)",
            capture.buffer >> 20
        );
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHILDFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("childflow={level}")));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::filter::tests::udp4,
        cli::CaptureConfig,
        event::{Direction, DropReport, FlowKey, FlowPhase, FlowStats, FlowUpdate, PacketEvent},
    };
    use childflow_common::flow::{DIR_OUT, PROTO_UDP};

    fn run_info() -> RunInfo {
        RunInfo { command: vec!["true".into()], backend: "rootless".into(), start: 0 }
    }

    #[test]
    fn the_collector_writes_packet_events_to_the_capture_and_counts_drops() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let path = tmp.path().join("c.pcapng");
        let config = CaptureConfig {
            path: path.clone(),
            filter: None,
            snaplen: 65_535,
            max_size: None,
            files: None,
            tls_keylog: false,
            buffer: crate::cli::DEFAULT_CAPTURE_BUFFER,
        };
        let capture = Capture::open(&config, CaptureSetup::default()).expect("open capture");
        let stats = Arc::new(Mutex::new(None));
        let mut collector = Collector::new(TableConfig::default(), run_info());
        collector.add(Box::new(CaptureConsumer::new(capture, stats.clone())));
        let (emitter, events) = event::channel(16);
        // The packets' flow is known to the table: they get its Community ID.
        let key = FlowKey::new(
            PROTO_UDP,
            "198.18.0.2:1".parse().unwrap(),
            "198.19.0.1:2".parse().unwrap(),
        );
        let mut flow_stats = FlowStats::new(DIR_OUT, 0);
        flow_stats.account(DIR_OUT, 29, 1, 0, 0);
        emitter.emit(Event::Flow(FlowUpdate { key, stats: flow_stats, phase: FlowPhase::Start }));
        let frame = udp4("198.18.0.2", 1, "198.19.0.1", 2, b"x");
        for i in 0..3 {
            let p = PacketEvent {
                ts: i,
                direction: Direction::Out,
                orig_len: frame.len() as u32,
                data: frame.clone().into(),
            };
            assert!(emitter.emit(Event::Packet(p)));
        }
        emitter.emit(Event::Drops(DropReport { source: "kernel packet ring buffer", count: 2 }));
        emitter.emit(Event::Drops(DropReport { source: "kernel packet ring buffer", count: 4 }));
        emitter.emit(Event::Drops(DropReport { source: "flow map full", count: 9 }));
        collector.count_queue_drops(emitter.drop_counter());
        drop(emitter);
        collector.drain(events);
        assert_eq!(collector.events(), 7);
        let community_id = collector.table().iter().next().expect("live flow").community_id;
        let outcome =
            collector.finish(RunEnd { end: 1, status: Some(ExitStatus::Exited(0)), error: None });
        assert!(outcome.errors.is_empty());
        let stats = stats.lock().unwrap().clone().expect("capture stats");
        assert_eq!((stats.written, stats.dropped), (3, 4));
        let bytes = std::fs::read(&path).expect("read capture");
        let epbs = crate::capture::pcapng::blocks(&bytes)
            .filter(|b| b.block_type == crate::capture::pcapng::BLOCK_EPB)
            .count();
        assert_eq!(epbs, 3);
        let needle = format!("community_id {community_id}");
        assert!(
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the first packet's comment names its flow's Community ID"
        );
    }
}
