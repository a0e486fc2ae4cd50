//! Signals: childflow forwards what is sent to it to the command, and `init` forwards to the
//! command and reaps orphans.
//!
//! The forwarded signals are blocked in every thread (call [`block`] first thing in `main`,
//! before any thread exists) and read from a `signalfd`, which also tells who sent them:
//! a signal the terminal generated (`SI_KERNEL`, e.g. Ctrl-C) already reached the command,
//! which shares childflow's foreground process group, so it is not sent a second time.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::{
    sys::{
        signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask},
        signalfd::{SfdFlags, SignalFd},
    },
    unistd::Pid,
};

/// Signals passed on to the command.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Blocks the forwarded signals and SIGCHLD in the calling thread (and every thread it
/// starts afterwards).
pub fn block() -> nix::Result<()> {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set()), None)
}

/// Restores an empty signal mask, for a process about to exec.
pub fn reset_for_exec() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// `si_code` of a signal the kernel generated (e.g. from the terminal).
const SI_KERNEL: i32 = 0x80;

/// The last signal [`forward_to`] received, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The last signal sent to childflow (and forwarded), so the dashboard can leave on its own
/// once the command ended because of it.
pub fn received() -> Option<Signal> {
    Signal::try_from(RECEIVED.load(Ordering::Relaxed)).ok()
}

/// Starts a thread that forwards signals sent to childflow to `target` (the sandbox's init).
/// `on_signal` is told about each one (to note that the run was interrupted).
pub fn forward_to(
    target: Pid,
    on_signal: impl Fn(Signal) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut only_forwarded = SigSet::empty();
    for s in FORWARDED {
        only_forwarded.add(s);
    }
    let fd = SignalFd::with_flags(&only_forwarded, SfdFlags::SFD_CLOEXEC)?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(Some(info)) = fd.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else { continue };
            RECEIVED.store(sig as i32, Ordering::Relaxed);
            on_signal(sig);
            if info.ssi_code != SI_KERNEL {
                let _ = kill(target, sig);
            }
        }
    })
}

/// `init`'s main loop: forward signals to `command`, reap every child, and return the
/// command's raw wait status when it ends.
pub fn init_loop(command: libc::pid_t) -> i32 {
    let fd = match SignalFd::with_flags(&set(), SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => fd,
        // Without a signalfd we can still wait for the command; signals stay blocked.
        Err(_) => return wait_raw(command),
    };
    loop {
        if let Some(raw) = reap(command) {
            return raw;
        }
        let Ok(Some(info)) = fd.read_signal() else { return wait_raw(command) };
        if info.ssi_signo as i32 == libc::SIGCHLD {
            continue;
        }
        if info.ssi_code != SI_KERNEL
            && let Ok(sig) = Signal::try_from(info.ssi_signo as i32)
        {
            let _ = kill(Pid::from_raw(command), sig);
        }
    }
}

/// Reaps every exited child; returns the command's raw status if it was among them.
fn reap(command: libc::pid_t) -> Option<i32> {
    let mut found = None;
    loop {
        let mut raw = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return found;
        }
        if pid == command {
            found = Some(raw);
        }
    }
}

fn wait_raw(command: libc::pid_t) -> i32 {
    loop {
        let mut raw = 0;
        // SAFETY: as above.
        let pid = unsafe { libc::waitpid(command, &mut raw, 0) };
        if pid == command {
            return raw;
        }
        if pid < 0 && nix::errno::Errno::last() != nix::errno::Errno::EINTR {
            return 0;
        }
    }
}
