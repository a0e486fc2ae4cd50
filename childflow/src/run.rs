//! Running childflow: dispatch subcommands, or start a backend on the command and turn its
//! events into the outputs the user asked for.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::{
    backend,
    capture::{Capture, CaptureSetup, CaptureStats, Interface, PacketMeta},
    cli::{Args, Backend, Command, Config},
    event::{self, Event},
};

/// Runs what `args` asks for and returns childflow's exit code.
pub fn main(args: Args) -> Result<i32> {
    match args.subcommand {
        Some(Command::Report(_)) => bail!("`childflow report` is not implemented yet"),
        Some(Command::Attach(_)) => bail!("`childflow attach` is not implemented yet"),
        Some(Command::Ps) => bail!("`childflow ps` is not implemented yet"),
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

/// Runs the command of `config` under its backend; returns the command's exit code.
///
/// The backend emits events into a bounded channel; the collector thread drains it.
pub fn run(config: &Config) -> Result<i32> {
    reject_unimplemented(config)?;
    let mut config = config.clone();
    let capture = open_capture(&config)?;
    if let Some(keylog) = capture.as_ref().and_then(|c| c.keylog_path()) {
        config.command_env.push(("SSLKEYLOGFILE".into(), keylog.into()));
    }
    let (emitter, events) = event::channel(EVENT_QUEUE);
    let queue_drops = emitter.drop_counter();
    let collector = std::thread::Builder::new()
        .name("collector".into())
        .spawn(move || collect(events, capture, &queue_drops))?;
    let status = match config.backend {
        Backend::Rootless => backend::rootless::run(&config, emitter)?,
        Backend::Rootful => bail!("--root is not implemented yet"),
    };
    let report = collector.join().map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
    tracing::debug!("command ended: {status}; {} events", report.events);
    if let Some(stats) = &report.capture {
        report_capture(stats);
    }
    Ok(status.code())
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

/// What the collector saw, for the end of the run.
#[derive(Debug, Default)]
pub struct CollectorReport {
    pub events: u64,
    pub capture: Option<CaptureStats>,
}

/// At most this many events are handled between two flushes of the outputs.
const BATCH: usize = 1024;

/// The outputs are flushed at least this often, even when no event comes.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Drains `events` until every backend sender is gone, feeding the outputs; flushes them
/// after each batch so a killed run leaves files valid up to the last batch.
///
/// A failing output (e.g. the capture's disk is full) is reported once and stops; the
/// others and the command go on.
pub fn collect(
    events: Receiver<Event>,
    mut capture: Option<Capture>,
    queue_drops: &Arc<AtomicU64>,
) -> CollectorReport {
    let mut report = CollectorReport::default();
    // Cumulative drop counts per source, as the backends report them.
    let mut drops: HashMap<&'static str, u64> = HashMap::new();
    // After an error the capture only counts what it loses; the run goes on.
    let capture_stopped =
        |e: crate::capture::CaptureError| eprintln!("childflow: {:#}", anyhow::Error::from(e));
    loop {
        let first = match events.recv_timeout(FLUSH_EVERY) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                // Quiet: still write out what waited (e.g. packets held for TLS secrets).
                if let Some(c) = capture.as_mut()
                    && let Err(e) = c.flush()
                {
                    capture_stopped(e);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        for event in std::iter::once(first).chain(events.try_iter().take(BATCH - 1)) {
            report.events += 1;
            match &event {
                // The flow table (another change) fills in the community ID and process.
                Event::Packet(packet) => {
                    if let Some(c) = capture.as_mut()
                        && let Err(e) = c.packet(packet, &PacketMeta::default())
                    {
                        capture_stopped(e);
                    }
                }
                Event::Dns(dns) => {
                    if let Some(c) = capture.as_mut() {
                        c.names(dns);
                    }
                }
                Event::Drops(d) => {
                    drops.insert(d.source, d.count);
                }
                Event::Flow(_) | Event::Process(_) => {}
            }
        }
        if let Some(c) = capture.as_mut()
            && let Err(e) = c.flush()
        {
            capture_stopped(e);
        }
    }
    let packet_drops: u64 =
        drops.iter().filter(|(source, _)| source.contains("packet")).map(|(_, n)| n).sum();
    let dropped = packet_drops + queue_drops.load(Ordering::Relaxed);
    report.capture = capture.map(|c| {
        c.close(dropped).unwrap_or_else(|e| {
            eprintln!("childflow: {:#}", anyhow::Error::from(e));
            CaptureStats { dropped, ..CaptureStats::default() }
        })
    });
    report
}

/// Tells the user about a capture that lost packets or stopped early.
fn report_capture(stats: &CaptureStats) {
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
}

/// Options that parse but whose feature has not landed yet fail loudly instead of being
/// silently ignored.
fn reject_unimplemented(config: &Config) -> Result<()> {
    let missing = [
        (config.flow_log.is_some(), "--flow-log"),
        (config.summary.is_some(), "--summary"),
        (config.capture.is_some(), "--capture"),
        (config.tui, "--tui"),
        (config.events.is_some(), "--events"),
        (config.dns.is_some(), "--dns"),
        (config.allow_host_loopback, "--allow-host-loopback"),
    ];
    if let Some((_, flag)) = missing.iter().find(|(set, _)| *set) {
        bail!("{flag} is not implemented yet");
    }
    Ok(())
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
        event::{Direction, DropReport, PacketEvent},
    };

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
        };
        let capture = Capture::open(&config, CaptureSetup::default()).expect("open capture");
        let (emitter, events) = event::channel(16);
        let frame = udp4("198.18.0.2", 1, "198.19.0.1", 2, b"x");
        for i in 0..3 {
            let p = PacketEvent {
                ts: i,
                direction: Direction::Out,
                orig_len: frame.len() as u32,
                data: frame.clone(),
            };
            assert!(emitter.emit(Event::Packet(p)));
        }
        emitter.emit(Event::Drops(DropReport { source: "kernel packet ring buffer", count: 2 }));
        emitter.emit(Event::Drops(DropReport { source: "kernel packet ring buffer", count: 4 }));
        emitter.emit(Event::Drops(DropReport { source: "flow map full", count: 9 }));
        let counter = emitter.drop_counter();
        drop(emitter);
        let report = collect(events, Some(capture), &counter);
        let stats = report.capture.expect("capture stats");
        assert_eq!(report.events, 6);
        assert_eq!((stats.written, stats.dropped), (3, 4));
        let bytes = std::fs::read(&path).expect("read capture");
        let epbs = crate::capture::pcapng::blocks(&bytes)
            .filter(|b| b.block_type == crate::capture::pcapng::BLOCK_EPB)
            .count();
        assert_eq!(epbs, 3);
    }
}
