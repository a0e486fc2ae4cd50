//! Running childflow: dispatch subcommands, or start a backend on the command and turn its
//! events into the outputs the user asked for.

use anyhow::{Result, bail};

use crate::{
    backend,
    cli::{Args, Backend, Command, Config},
    event, tui,
};

/// Runs what `args` asks for and returns childflow's exit code.
pub fn main(args: Args) -> Result<i32> {
    match args.subcommand {
        Some(Command::Report(_)) => bail!("`childflow report` is not implemented yet"),
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

/// Runs the command of `config` under its backend; returns the command's exit code.
///
/// The backend emits events into a bounded channel; the collector thread drains it.
pub fn run(config: &Config) -> Result<i32> {
    reject_unimplemented(config)?;
    let (emitter, events) = event::channel(EVENT_QUEUE);
    // The live views (--tui, --events, the socket for `attach`) are opened before the
    // command starts; with --tui the command gets the dashboard's pty as its terminal.
    let mut live = tui::live::Live::start(config, &emitter)?;
    let mut config = config.clone();
    config.terminal = live.take_terminal();
    // Placeholder collector: the flow table, logs and capture plug in here; the live views
    // take snapshots from it.
    let collector =
        std::thread::Builder::new().name("collector".into()).spawn(live.collector(events))?;
    let result = match config.backend {
        Backend::Rootless => backend::rootless::run(&config, emitter),
        Backend::Rootful => {
            drop(emitter);
            Err(anyhow::anyhow!("--root is not implemented yet"))
        }
    };
    let seen = collector.join().map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
    live.finish(result.as_ref().ok().copied())?;
    let status = result?;
    tracing::debug!("command ended: {status}; {seen} events");
    Ok(status.code())
}

/// Options that parse but whose feature has not landed yet fail loudly instead of being
/// silently ignored.
fn reject_unimplemented(config: &Config) -> Result<()> {
    let missing = [
        (config.flow_log.is_some(), "--flow-log"),
        (config.summary.is_some(), "--summary"),
        (config.capture.is_some(), "--capture"),
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
