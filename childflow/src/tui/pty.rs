//! The command's pseudo-terminal: childflow holds the master side, the command gets the
//! slave as its stdin, stdout, stderr and controlling terminal (see `sandbox::Spec::terminal`).
//!
//! A reader thread feeds everything the command writes into a terminal emulator
//! ([`vt100::Parser`]) that the dashboard draws, and keeps a bounded transcript of the raw
//! bytes so the output can be replayed on the real terminal when the dashboard closes: the
//! command's output is never lost. Keys typed into the pane are written to the master.
//!
//! Invariants: both descriptors are close-on-exec (the sandbox `dup2`s the slave onto the
//! command's stdio, which clears the flag there only); closing the master hangs the terminal
//! up, which sends SIGHUP to the command's session (POSIX "Modem Disconnect").

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, OwnedFd},
    sync::{Arc, Mutex},
};

use super::launch::Launcher;
use nix::{
    fcntl::{FcntlArg, FdFlag, fcntl},
    pty::{Winsize, openpty},
};

/// The emulated screen keeps this many lines of scrollback.
pub const SCROLLBACK: usize = 10_000;
/// The transcript keeps the last this many bytes of output.
pub const TRANSCRIPT: usize = 1 << 20;

/// Errors of the command's pty.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// `openpty` failed (e.g. /dev/pts not mounted or out of ptys).
    #[error("failed to open a pseudo-terminal for the command: {0}")]
    Open(#[source] nix::Error),
    /// Setting a descriptor flag failed.
    #[error("failed to set close-on-exec on the pty: {0}")]
    Cloexec(#[source] nix::Error),
    /// The reader thread could not start.
    #[error("failed to start the pty reader thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Writing keys to the command failed.
    #[error("failed to write to the command's terminal: {0}")]
    Write(#[source] std::io::Error),
    /// TIOCSWINSZ failed.
    #[error("failed to resize the command's terminal: {0}")]
    Resize(#[source] nix::Error),
}

/// What the reader thread shares with the dashboard.
pub struct Screen {
    pub parser: vt100::Parser,
    /// The last [`TRANSCRIPT`] bytes of raw output.
    pub transcript: Vec<u8>,
    /// Bytes read since the dashboard last looked (it redraws only if output came).
    pub unseen: usize,
    /// The command closed its side (every process holding the slave exited).
    pub closed: bool,
}

impl Screen {
    /// A blank screen of `rows`×`cols`.
    pub fn new(rows: u16, cols: u16) -> Self {
        Self {
            parser: vt100::Parser::new(rows, cols, SCROLLBACK),
            transcript: Vec::new(),
            unseen: 0,
            closed: false,
        }
    }

    /// Takes in output of the command.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.parser.process(bytes);
        self.transcript.extend_from_slice(bytes);
        // Trimmed in chunks so the copy is amortised.
        if self.transcript.len() > TRANSCRIPT * 2 {
            let cut = self.transcript.len() - TRANSCRIPT;
            self.transcript.drain(..cut);
        }
        self.unseen += bytes.len();
    }

    /// The transcript to replay on the real terminal: its last [`TRANSCRIPT`] bytes.
    pub fn replay(&self) -> &[u8] {
        &self.transcript[self.transcript.len().saturating_sub(TRANSCRIPT)..]
    }
}

/// The master side of the command's pty.
pub struct Pty {
    master: File,
    slave: Option<Arc<OwnedFd>>,
    pub screen: Arc<Mutex<Screen>>,
}

fn cloexec(fd: &OwnedFd) -> Result<(), PtyError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop).map_err(PtyError::Cloexec)
}

impl Pty {
    /// Opens a pty of `rows`×`cols`; the thread that reads it is queued on `launcher`.
    pub fn open(rows: u16, cols: u16, launcher: &mut Launcher) -> Result<Self, PtyError> {
        let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        let pair = openpty(Some(&size), None).map_err(PtyError::Open)?;
        cloexec(&pair.master)?;
        cloexec(&pair.slave)?;
        let master = File::from(pair.master);
        let screen = Arc::new(Mutex::new(Screen::new(rows, cols)));
        let reader = master.try_clone().map_err(PtyError::Thread)?;
        let shared = screen.clone();
        // Detached: it ends when the command's side closes (EIO).
        let _ = launcher.spawn("pty-reader", move || read_loop(reader, &shared));
        Ok(Self { master, slave: Some(Arc::new(pair.slave)), screen })
    }

    /// The slave side, for the sandbox. Hand it over once: keeping it open here would keep
    /// the terminal open after the command exits.
    pub fn take_slave(&mut self) -> Option<Arc<OwnedFd>> {
        self.slave.take()
    }

    /// Writes input for the command.
    pub fn write(&self, bytes: &[u8]) -> Result<(), PtyError> {
        (&self.master).write_all(bytes).map_err(PtyError::Write)
    }

    /// Hangs the terminal up the way the kernel does when the last master closes (SIGHUP
    /// and SIGCONT to the session leader and the foreground process group). Closing the
    /// master here would not do: the reader thread holds a duplicate of it until the
    /// command's side closes, and TIOCSIG only sends SIGINT, SIGQUIT and SIGTSTP.
    pub fn hang_up(&self) {
        let fd = self.master.as_raw_fd();
        let (mut sid, mut pgrp): (libc::pid_t, libc::pid_t) = (0, 0);
        // SAFETY: TIOCGSID/TIOCGPGRP write one pid_t. On a master they report the slave's
        // session and foreground group, as pids of our own pid namespace.
        unsafe {
            libc::ioctl(fd, libc::TIOCGSID, &mut sid);
            libc::ioctl(fd, libc::TIOCGPGRP, &mut pgrp);
        }
        for target in [sid, -pgrp] {
            // 0 means the ioctl failed; never signal init or "every process" (-1).
            if target.abs() > 1 {
                // SAFETY: plain kill(2).
                unsafe {
                    libc::kill(target, libc::SIGHUP);
                    libc::kill(target, libc::SIGCONT);
                }
            }
        }
    }

    /// Resizes the terminal (the kernel sends SIGWINCH to the foreground process group) and
    /// the emulator.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), PtyError> {
        let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `struct winsize` from a valid pointer.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(PtyError::Resize(nix::Error::last()));
        }
        let mut screen = self.screen.lock().unwrap_or_else(|e| e.into_inner());
        screen.parser.screen_mut().set_size(rows, cols);
        Ok(())
    }
}

fn read_loop(mut master: File, screen: &Mutex<Screen>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // EIO once every holder of the slave has closed it: the command is gone.
        let n = match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        screen.lock().unwrap_or_else(|e| e.into_inner()).feed(&buf[..n]);
    }
    screen.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_the_emulator_and_a_bounded_transcript() {
        let mut screen = Screen::new(5, 40);
        screen.feed(b"hello \x1b[31mred\x1b[0m\r\nloading 10%\rloading 99%");
        let text = screen.parser.screen().contents();
        assert_eq!(text, "hello red\nloading 99%");
        assert_eq!(screen.unseen, 43);
        let chunk = vec![b'x'; TRANSCRIPT];
        for _ in 0..3 {
            screen.feed(&chunk);
        }
        assert!(screen.transcript.len() <= 2 * TRANSCRIPT);
        assert_eq!(screen.replay().len(), TRANSCRIPT);
    }

    #[test]
    fn resizing_sets_the_terminal_size_the_command_sees() {
        let mut pty = Pty::open(5, 40, &mut Launcher::default()).expect("openpty");
        let slave = pty.take_slave().unwrap();
        pty.resize(10, 60).unwrap();
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one `struct winsize`.
        assert_eq!(unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) }, 0);
        assert_eq!((size.ws_row, size.ws_col), (10, 60));
        assert_eq!(pty.screen.lock().unwrap().parser.screen().size(), (10, 60));
    }
}
