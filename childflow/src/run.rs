//! Running childflow: dispatch subcommands, or start a backend on the command and turn its
//! events into the outputs the user asked for.

use anyhow::{Result, bail};

use crate::{
    backend,
    cli::{Args, Backend, Command, Config, SummaryFormat},
    collector::{Collector, FlowLogConsumer, RunEnd, RunInfo},
    event::{self, now_unix_nanos},
    exit,
    flow::TableConfig,
    report,
    sink::{FlowLog, Target},
};

/// Runs what `args` asks for and returns childflow's exit code.
pub fn main(args: Args) -> Result<i32> {
    match args.subcommand {
        Some(Command::Report(r)) => report::run(&r).map(|()| 0),
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

/// Runs the command of `config` under its backend; returns the command's exit code, or
/// [`exit::FAILURE`] if an output (the flow log) failed while the command ran.
///
/// The backend emits events into a bounded channel; the collector thread drains it into the
/// flow table and the outputs. Outputs are opened before the command starts, so a bad path
/// fails the run before anything happens.
pub fn run(config: &Config) -> Result<i32> {
    reject_unimplemented(config)?;
    let info = RunInfo {
        command: config.command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        backend: config.backend.to_string(),
        start: now_unix_nanos(),
    };
    let mut collector = Collector::new(table_config(config), info.clone());
    if let Some(path) = &config.flow_log {
        let log = FlowLog::create(Target::from_arg(path), config.flow_log_format)?;
        collector.add(Box::new(FlowLogConsumer::new(log, &info)?));
    }
    let (emitter, events) = event::channel(EVENT_QUEUE);
    collector.count_queue_drops(emitter.drop_counter());
    let collector = std::thread::Builder::new().name("collector".into()).spawn(move || {
        collector.drain(events);
        collector
    })?;
    let result = match config.backend {
        Backend::Rootless => backend::rootless::run(config, emitter),
        Backend::Rootful => {
            drop(emitter);
            Err(anyhow::anyhow!("--root is not implemented yet"))
        }
    };
    let end = now_unix_nanos();
    let collector =
        collector.join().map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
    tracing::debug!("{} events", collector.events());
    let outcome = collector.finish(RunEnd {
        end,
        status: result.as_ref().ok().copied(),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    });
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

/// Options that parse but whose feature has not landed yet fail loudly instead of being
/// silently ignored.
fn reject_unimplemented(config: &Config) -> Result<()> {
    let missing = [
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
