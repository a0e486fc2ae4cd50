//! `childflow attach [RUN]` and `childflow ps`: the dashboard and the list of live runs,
//! from another terminal, over each run's socket ([`super::socket`]).

use std::sync::Arc;

use anyhow::{Context, Result};

use super::{
    dashboard::{self, ExitWhen},
    format,
    model::{Snapshot, SnapshotCell},
    socket,
};
use crate::event::now_unix_nanos;

/// Opens the dashboard of run `run` (its id from `ps`), or of the newest run.
pub fn attach(run: Option<&str>) -> Result<i32> {
    dashboard::require_terminal()?;
    let dir = socket::runtime_dir();
    let entry = socket::find(&dir, run)?;
    let cell = SnapshotCell::new(Snapshot {
        ts: now_unix_nanos(),
        run: entry.run.clone(),
        ..Snapshot::default()
    });
    let follower = {
        let (cell, path) = (Arc::clone(&cell), entry.path.clone());
        std::thread::Builder::new()
            .name("attach".into())
            .spawn(move || socket::follow(&path, &cell))
            .context("failed to start the attach reader")?
    };
    // The run's end comes in its last snapshot; nothing else ends an attached dashboard.
    let (_never, ended) = crossbeam_channel::bounded(1);
    dashboard::run(cell, None, ended, ExitWhen::Quit)?;
    if follower.is_finished() {
        follower.join().map_err(|_| anyhow::anyhow!("the attach reader panicked"))??;
    }
    Ok(0)
}

/// Prints the live runs of this user.
pub fn ps() -> Result<i32> {
    let dir = socket::runtime_dir();
    let runs = socket::list(&dir);
    if runs.is_empty() {
        eprintln!("no live childflow runs (looked in {})", dir.display());
        return Ok(0);
    }
    println!("{:<8} {:<9} {:>8}  COMMAND", "RUN", "BACKEND", "ELAPSED");
    let now = now_unix_nanos();
    for r in runs {
        println!(
            "{:<8} {:<9} {:>8}  {}",
            r.id,
            r.run.backend,
            format::clock(now.saturating_sub(r.run.started)),
            r.run.command.join(" ")
        );
    }
    Ok(0)
}
