//! The rootless backend: user + net + mount + pid namespaces, no privileges needed.
//!
//! So far the command gets only a loopback interface; the userspace network engine behind a
//! tap device is the next step (issue "Rootless backend").

use anyhow::{Context, Result};

use crate::{
    cli::Config,
    event::Emitter,
    sandbox::{self, ExitStatus, Namespaces, Spec, userns},
};

/// Runs the command of `config`, reporting what it does on the network to `events`, and
/// returns how it ended. Returns once the command has ended and every event is emitted
/// (dropping `events`).
pub fn run(config: &Config, events: Emitter) -> Result<ExitStatus> {
    let _ = &events;
    let spec = Spec {
        namespaces: Namespaces { user: true },
        argv: config.command.clone(),
        env: Vec::new(),
        credentials: None,
        terminal: config.terminal.clone(),
    };
    let mut sandbox = sandbox::spawn(&spec, bring_up_loopback)?;
    userns::map_self(sandbox.pid())
        .map_err(sandbox::SpawnError::Setup)
        .context("failed to map the user into the sandbox")?;
    sandbox.release()?;
    let init = sandbox.pid();
    sandbox::signals::forward_to(init, |_| {}).context("failed to start the signal forwarder")?;
    sandbox.wait().context("failed to wait for the command")
}

/// Sets `lo` up in the new network namespace (SIOCSIFFLAGS; no netlink needed for this).
fn bring_up_loopback() -> Result<(), String> {
    // SAFETY: a plain socket + ioctl on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", nix::errno::Errno::last()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        let err = nix::errno::Errno::last();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("cannot bring up lo: {err}"));
        }
    }
    Ok(())
}
