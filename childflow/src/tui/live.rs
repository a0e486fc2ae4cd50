//! The live views of one run, started and stopped from `run` with a few calls: the
//! snapshot cell fed from the event channel, the dashboard (`--tui`), the JSON-lines stream
//! (`--events`), the run's socket for `attach`/`ps`, and the demo events (test-only).

use std::{
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use anyhow::{Result, bail};

use super::{
    dashboard::{Dashboard, ExitWhen},
    demo, events,
    feed::LiveConsumer,
    launch::{Later, Launcher},
    model::{RunEnd, RunInfo, Snapshot, SnapshotCell},
    socket,
};
use crate::{
    cli::Config,
    event::{Emitter, now_unix_nanos},
    sandbox::ExitStatus,
};

/// See the module documentation.
pub struct Live {
    cell: Arc<SnapshotCell>,
    run: RunInfo,
    dashboard: Option<Dashboard>,
    events: Option<events::Writer>,
    demo: Option<Later<()>>,
    socket: Option<socket::Server>,
    launched: Arc<AtomicBool>,
}

impl Live {
    /// Opens the outputs `config` asks for. Fails before the command starts if one cannot
    /// be opened (no terminal for `--tui`, a bad `--events` path). Their threads start right
    /// after the sandbox is cloned ([`super::launch`]); `emitter` feeds the demo events.
    pub fn start(config: &Config, emitter: &Emitter) -> Result<Self> {
        let to_stdout = config.events.as_deref().is_some_and(|p| p.as_os_str() == "-");
        if config.tui && to_stdout {
            bail!("--tui and --events - both need the terminal; send --events to a file");
        }
        let run = RunInfo {
            command: config.command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
            backend: config.backend.to_string(),
            pid: std::process::id(),
            started: now_unix_nanos(),
            ended: None,
        };
        let cell = SnapshotCell::new(Snapshot {
            ts: run.started,
            run: run.clone(),
            ..Snapshot::default()
        });
        let mut launcher = Launcher::default();
        let events = match &config.events {
            Some(path) => Some(events::Writer::start(path, cell.clone(), &mut launcher)?),
            None => None,
        };
        let dashboard = if config.tui {
            let exit = if config.tui_exit { ExitWhen::CommandEnds } else { ExitWhen::Quit };
            Some(Dashboard::start(cell.clone(), exit, &mut launcher)?)
        } else {
            None
        };
        // `attach` is a convenience: a run without its socket still runs.
        let socket = socket::Server::start(&socket::runtime_dir(), cell.clone(), &mut launcher)
            .map_err(|e| tracing::warn!("`childflow attach` will not find this run: {e}"))
            .ok();
        let demo = demo::enabled().then(|| demo::start(emitter.clone(), &mut launcher));
        let launched = Arc::new(AtomicBool::new(false));
        let flag = launched.clone();
        crate::sandbox::after_clone(move || {
            launcher.launch();
            flag.store(true, Ordering::Relaxed);
        });
        Ok(Self { cell, run, dashboard, events, demo, socket, launched })
    }

    /// The pty the command must get as its terminal (`--tui`).
    pub fn take_terminal(&mut self) -> Option<Arc<OwnedFd>> {
        self.dashboard.as_mut().and_then(Dashboard::take_terminal)
    }

    /// The collector's consumer that publishes snapshots for every live view.
    /// `queue_drops` is the emitter's counter of events the channel dropped.
    pub fn consumer(&self, queue_drops: Arc<AtomicU64>) -> LiveConsumer {
        LiveConsumer::new(self.cell.clone(), self.run.clone(), self.launched.clone(), queue_drops)
    }

    /// Records how the command ended (`None`: the backend failed), lets the dashboard show
    /// it until the user leaves, and closes the stream. Call after the collector is done.
    pub fn finish(self, status: Option<ExitStatus>) -> Result<()> {
        if let Some(demo) = self.demo {
            demo.join();
        }
        let end = RunEnd {
            ts: now_unix_nanos(),
            code: status.map_or(crate::exit::FAILURE, ExitStatus::code),
            status: status.map_or_else(|| "childflow failed".into(), |s| s.to_string()),
        };
        let mut last = (*self.cell.latest()).clone();
        last.ts = last.ts.max(end.ts);
        last.run.ended = Some(end.clone());
        self.cell.publish(last);
        let shown = self.dashboard.map(|d| d.finish(end, status.is_none()));
        let written = self.events.map(events::Writer::finish);
        if let Some(socket) = self.socket {
            socket.finish();
        }
        shown.transpose()?;
        written.transpose()?;
        Ok(())
    }
}
