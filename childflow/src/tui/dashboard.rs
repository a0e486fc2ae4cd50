//! The dashboard's runtime: owns the real terminal, the command's pty and the clock, turns
//! terminal events, snapshots and the command's end into [`Action`]s, carries out the
//! [`Effect`]s, and draws at most [`FRAME`]-often.
//!
//! Invariants:
//! - The terminal is restored on every way out: normal return, error, panic (ratatui's
//!   panic hook, installed by `ratatui::try_init`) and signals (a forwarded SIGTERM ends the
//!   command, and the dashboard then leaves without waiting for `q`).
//! - The collector is never waited on: each frame takes the newest snapshot if its sequence
//!   number moved, so a slow frame skips snapshots instead of queueing them.

use std::{
    io::{IsTerminal, Write},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, Sender};
use crossterm::event::{self, Event};
use ratatui::layout::Rect;

use super::{
    app::{Action, App, Effect, Layout},
    keys,
    launch::{Later, Launcher},
    model::{RunEnd, SnapshotCell},
    pty::{Pty, Screen},
};
use crate::event::now_unix_nanos;

/// The shortest time between two frames: at most 10 redraws a second.
pub const FRAME: Duration = Duration::from_millis(100);

/// What leaves the dashboard besides the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitWhen {
    /// Stay until `q`.
    Quit,
    /// Leave as soon as the command ends (`--tui-exit`).
    CommandEnds,
}

/// A running dashboard (its own thread) with the command's pty.
pub struct Dashboard {
    thread: Later<Result<()>>,
    ended: Sender<(RunEnd, bool)>,
    terminal: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Fails unless both stdin and stdout are terminals.
pub fn require_terminal() -> Result<()> {
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        bail!("--tui needs a terminal on stdin and stdout; for scripts use --events PATH");
    }
    Ok(())
}

impl Dashboard {
    /// Opens the command's pty sized for the pane; the thread that takes over the terminal
    /// and draws snapshots from `cell` is queued on `launcher`.
    pub fn start(cell: Arc<SnapshotCell>, exit: ExitWhen, launcher: &mut Launcher) -> Result<Self> {
        require_terminal()?;
        let (cols, rows) =
            crossterm::terminal::size().context("failed to read the terminal size")?;
        let layout = Layout::new(Rect::new(0, 0, cols, rows), true, false);
        let (prow, pcol) = layout.command_inner().unwrap_or((rows, cols));
        let mut pty = Pty::open(prow, pcol, launcher)?;
        let terminal = pty.take_slave();
        let (ended_tx, ended_rx) = crossbeam_channel::bounded(1);
        let thread = launcher.spawn("dashboard", move || run(cell, Some(pty), ended_rx, exit));
        Ok(Self { thread, ended: ended_tx, terminal })
    }

    /// The pty slave for the sandbox (`Spec::terminal`); `None` after the first call.
    pub fn take_terminal(&mut self) -> Option<Arc<std::os::fd::OwnedFd>> {
        self.terminal.take()
    }

    /// Tells the dashboard the command ended and waits until the user leaves it (at once
    /// with [`ExitWhen::CommandEnds`] or `leave`, e.g. when childflow itself failed).
    pub fn finish(self, end: RunEnd, leave: bool) -> Result<()> {
        let _ = self.ended.send((end, leave));
        drop(self.terminal);
        match self.thread.join() {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the dashboard thread panicked (the terminal was restored)"),
        }
    }
}

/// Runs the dashboard on the current thread until the user quits (or the command ends, per
/// `exit`). With `pty`, the command's pane is shown.
pub fn run(
    cell: Arc<SnapshotCell>,
    pty: Option<Pty>,
    ended: Receiver<(RunEnd, bool)>,
    exit: ExitWhen,
) -> Result<()> {
    let mut terminal = ratatui::try_init().context("failed to set up the terminal")?;
    let result = event_loop(&mut terminal, cell, pty.as_ref(), ended, exit);
    ratatui::restore();
    if let Ok(Left::CommandRunning) = result
        && let Some(pty) = &pty
    {
        pty.hang_up();
        eprintln!(
            "childflow: dashboard closed; the command was hung up (SIGHUP), waiting for it to end"
        );
    }
    let result = result.map(drop);
    // The command's output, replayed where it would have gone without --tui.
    if let Some(pty) = &pty {
        let screen = pty.screen.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(screen.replay());
        let _ = out.write_all(b"\x1b[0m");
        let _ = out.flush();
    }
    drop(pty);
    result
}

fn lock(screen: &Mutex<Screen>) -> std::sync::MutexGuard<'_, Screen> {
    screen.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the event loop ended.
enum Left {
    CommandEnded,
    CommandRunning,
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    cell: Arc<SnapshotCell>,
    pty: Option<&Pty>,
    ended: Receiver<(RunEnd, bool)>,
    exit: ExitWhen,
) -> Result<Left> {
    let mut app = App::new(cell.latest(), pty.is_some());
    let mut seen = cell.seq();
    let size = terminal.size().context("failed to read the terminal size")?;
    let mut effects = vec![app.update(Action::Resize(size.width, size.height))];
    let mut last_frame: Option<Instant> = None;
    let mut command_ended = false;
    loop {
        for effect in effects.drain(..) {
            match effect {
                Effect::None => {}
                Effect::Quit if command_ended => return Ok(Left::CommandEnded),
                Effect::Quit => return Ok(Left::CommandRunning),
                Effect::WriteKey(key) => {
                    if let Some(pty) = pty {
                        let app_cursor = lock(&pty.screen).parser.screen().application_cursor();
                        let bytes = keys::encode(key, app_cursor);
                        // The command may be gone; its keys then go nowhere, as in a terminal.
                        let _ = pty.write(&bytes);
                    }
                }
                Effect::ResizeCommand(rows, cols) => {
                    if let Some(pty) = pty {
                        pty.resize(rows, cols)?;
                    }
                }
            }
        }
        let next = last_frame.map_or(Duration::ZERO, |t| FRAME.saturating_sub(t.elapsed()));
        if wait_for_input(next)? {
            // Bounded, so a terminal that always reports input cannot keep us from drawing.
            for _ in 0..256 {
                if !event::poll(Duration::ZERO)? {
                    break;
                }
                let action = match event::read().context("failed to read terminal events")? {
                    Event::Key(key) => app.key_action(key),
                    Event::Resize(w, h) => Some(Action::Resize(w, h)),
                    _ => None,
                };
                if let Some(action) = action {
                    effects.push(app.update(action));
                }
            }
        }
        if last_frame.is_some_and(|t| t.elapsed() < FRAME) {
            continue;
        }
        // A frame: newest snapshot, the command's end, the clock; then draw.
        if cell.seq() != seen {
            seen = cell.seq();
            app.update(Action::Snapshot(cell.latest()));
        }
        if !command_ended && let Ok((end, leave)) = ended.try_recv() {
            command_ended = true;
            app.update(Action::CommandEnded(end));
            let signalled = crate::sandbox::signals::received().is_some();
            if leave || exit == ExitWhen::CommandEnds || signalled {
                // Draw the final state once, so a recording of the screen has it.
                draw(terminal, &mut app, pty)?;
                return Ok(Left::CommandEnded);
            }
        }
        app.update(Action::Tick(now_unix_nanos()));
        draw(terminal, &mut app, pty)?;
        last_frame = Some(Instant::now());
    }
}

/// Waits up to `timeout` for terminal input (crossterm reads stdin when it is a terminal,
/// which `--tui` requires). Fails once the terminal is gone: crossterm's reader spins
/// forever on a hung-up tty (EOF and EIO are neither data nor "would block"), so it must
/// never be called on one. A hang-up between this check and crossterm's read is not
/// caught; that window is a few microseconds per frame.
fn wait_for_input(timeout: Duration) -> Result<bool> {
    let mut fds = [libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll(2) on one valid pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err).context("failed to wait for terminal input");
    }
    if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        bail!("the terminal went away");
    }
    // Resizes arrive through crossterm's signal pipe, not stdin: look every frame.
    Ok(n > 0 || event::poll(Duration::ZERO).context("failed to read terminal events")?)
}

fn draw(terminal: &mut ratatui::DefaultTerminal, app: &mut App, pty: Option<&Pty>) -> Result<()> {
    let mut guard = pty.map(|p| lock(&p.screen));
    if let Some(screen) = guard.as_mut() {
        screen.unseen = 0;
        let wanted = app.command_scroll;
        screen.parser.screen_mut().set_scrollback(wanted);
        let got = screen.parser.screen().scrollback();
        if got != wanted {
            app.update(Action::ScrollCommand(got as isize - wanted as isize));
        }
    }
    let screen = guard.as_ref().map(|s| s.parser.screen());
    terminal.draw(|frame| app.render(frame, screen)).context("failed to draw the dashboard")?;
    Ok(())
}
