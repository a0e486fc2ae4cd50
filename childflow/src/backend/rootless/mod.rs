//! The rootless backend: user + net + mount + pid namespaces, a tap device, and a userspace
//! network engine in childflow relaying everything through ordinary host sockets.
//!
//! ```text
//!  command ── tap0 (10.0.2.100/24, fd00:cf::100/64; gateway .2 / ::2, resolver .3 / ::3)
//!               │ tap fd, created by init in the command's namespaces, passed back
//!               ▼
//!  childflow: engine thread (smoltcp + flow table)  ──►  host TCP/UDP/ICMP sockets
//! ```
//! Start-up order matters: the sandbox is cloned while childflow is still single-threaded;
//! uid/gid maps are written; `init` creates and configures `tap0`, sends its descriptor over
//! a socket pair, bind-mounts the command's `resolv.conf`, and execs the command; only then
//! does childflow start the engine thread on the descriptor. The command's first frames wait
//! in the tap's queue meanwhile.

pub mod attribution;
pub mod dns;
pub mod driver;
pub mod engine;
pub mod frag;
pub mod packet;
pub mod recverr;
pub mod tap;

use std::{
    ffi::CString,
    io::Write,
    net::IpAddr,
    os::{fd::AsFd, fd::AsRawFd, unix::ffi::OsStrExt},
    path::Path,
};

use anyhow::{Context, Result, bail};

use self::{
    driver::DriverConfig,
    engine::{Addressing, EngineConfig},
};
use crate::{
    cli::Config,
    event::{Emitter, now_unix_nanos},
    sandbox::{self, ExitStatus, Namespaces, Spec, fdpass, userns},
};

/// The host's resolver configuration, read for the relay's upstreams and search domains.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Runs the command of `config`, reporting what it does on the network to `events`, and
/// returns how it ended. Returns once the command has ended and every event is emitted
/// (dropping `events`).
pub fn run(config: &Config, events: Emitter) -> Result<ExitStatus> {
    preflight()?;
    let net = Addressing::default();
    let upstream_dns = dns::upstream_resolvers(Path::new(HOST_RESOLV_CONF))
        .map_err(anyhow::Error::msg)
        .context("failed to find the resolvers for the DNS relay")?;
    let resolv = command_resolv_conf(&net, config.dns)?;
    let resolv_path = CString::new(resolv.path().as_os_str().as_bytes())
        .context("the temporary directory's path contains a NUL byte")?;
    let (parent_end, child_end) = fdpass::pair()?;
    let mtu = config.mtu;

    let spec = Spec {
        namespaces: Namespaces { user: true },
        argv: config.command.clone(),
        env: config.command_env.clone(),
        credentials: None,
        terminal: config.terminal.clone(),
        cgroup: None,
        setup_before_release: false,
    };
    let setup = move || -> Result<(), String> {
        tap::bring_up_loopback()?;
        let tap = tap::create(&net, mtu)?;
        fdpass::send(child_end.as_fd(), tap.as_raw_fd()).map_err(|e| e.to_string())?;
        drop(tap);
        // For process attribution: a netlink socket stays in the namespace it was made in.
        let diag = attribution::open_diag_socket()
            .map_err(|e| format!("failed to open a sock_diag socket: {e}"))?;
        fdpass::send(child_end.as_fd(), diag.as_raw_fd()).map_err(|e| e.to_string())?;
        drop(diag);
        drop(child_end);
        sandbox::make_mounts_private()?;
        sandbox::bind_file(&resolv_path, c"/etc/resolv.conf")
            .map_err(|e| format!("{e} (the command's resolv.conf)"))
    };
    let mut sandbox = sandbox::spawn(&spec, setup)?;
    userns::map_user(sandbox.pid())
        .map_err(sandbox::SpawnError::Setup)
        .context("failed to map the user into the sandbox")?;
    sandbox.release()?;
    // The bind mount keeps the file alive for the command; nothing is left in /tmp.
    drop(resolv);
    let tap = fdpass::recv(parent_end.as_fd()).context("failed to set up the command's network")?;
    let diag = fdpass::recv(parent_end.as_fd())
        .context("failed to receive the command's sock_diag socket")?;
    drop(parent_end);

    let mut engine_cfg = EngineConfig::new(mtu as usize, now_unix_nanos());
    engine_cfg.net = net;
    engine_cfg.allow_host_loopback = config.allow_host_loopback;
    engine_cfg.flow_update_interval =
        smoltcp::time::Duration::from_micros(config.flow_update_interval.as_micros() as u64);
    // Only the capture consumes packet events; without one the engine emits none.
    engine_cfg.snaplen = config.capture.as_ref().map(|c| c.snaplen as usize);
    // The filter already parsed when the configuration was checked; the engine runs its
    // compiled form on each frame before copying it.
    engine_cfg.capture_filter = match config.capture.as_ref().and_then(|c| c.filter.as_deref()) {
        Some(expr) => Some(
            crate::capture::filter::Filter::parse(expr)
                .map_err(|e| anyhow::anyhow!("invalid --capture-filter `{expr}`: {e}"))?
                .program,
        ),
        None => None,
    };
    // Which process opened each flow, looked up in /proc off the engine's thread.
    let (new_flows, attribution) =
        attribution::spawn(sandbox.pid().as_raw() as u32, Some(diag), events.clone())
            .context("failed to start the process attribution thread")?;
    engine_cfg.new_flows = Some(new_flows);
    let driver_cfg = DriverConfig { upstream_dns, ..DriverConfig::default() };
    // Every connection of the command is a host socket here. Raised only now, after the
    // command was forked: its own limits stay what the user set.
    raise_open_files_limit();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || driver::run(tap, engine_cfg, driver_cfg, events, stop_rx))
        .context("failed to start the engine thread")?;

    let init = sandbox.pid();
    sandbox::signals::forward_to(init, |_| {}).context("failed to start the signal forwarder")?;
    let status = sandbox.wait().context("failed to wait for the command")?;
    let _ = stop_tx.send(());
    match engine.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("the network engine failed: {e}"),
        Err(_) => tracing::warn!("the network engine panicked"),
    }
    // The engine's end dropped the sender: the thread finishes its queue and stops.
    if attribution.join().is_err() {
        tracing::warn!("the process attribution thread panicked");
    }
    Ok(status)
}

/// Raises the soft limit on open files to the hard one (commonly 1,024 → 524,288), so the
/// engine can hold as many host sockets as the command opens connections.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::debug!("cannot raise the open files limit from {soft} to {hard}: {e}");
    }
}

/// Checks what the rootless backend needs before anything is created, so a missing piece
/// is reported with its fix instead of as a failed system call.
fn preflight() -> Result<()> {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let root = nix::unistd::Uid::current().is_root();
    if !root && read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        bail!(
            "unprivileged user namespaces are disabled on this host; enable them with \
             `sudo sysctl -w kernel.unprivileged_userns_clone=1`, or use --root"
        );
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        bail!(
            "user namespaces are disabled on this host (user.max_user_namespaces is 0); \
             enable them with `sudo sysctl -w user.max_user_namespaces=15000`, or use --root"
        );
    }
    let tun = Path::new("/dev/net/tun");
    if !tun.exists() {
        bail!("/dev/net/tun does not exist; load the tun driver with `sudo modprobe tun`");
    }
    if nix::unistd::access(tun, nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK)
        .is_err()
    {
        bail!(
            "/dev/net/tun is not readable and writable by you; allow it with \
             `sudo chmod 0666 /dev/net/tun` (most distributions ship it that way), or use --root"
        );
    }
    Ok(())
}

/// The command's resolv.conf: childflow's relay (or `--dns`), plus the host's search
/// domains and options. Written to a temporary file that `init` bind-mounts.
fn command_resolv_conf(net: &Addressing, dns: Option<IpAddr>) -> Result<tempfile::NamedTempFile> {
    let host = std::fs::read_to_string(HOST_RESOLV_CONF).unwrap_or_default();
    let mut text = String::from("# written by childflow for the command it runs\n");
    match dns {
        Some(ip) => text.push_str(&format!("nameserver {ip}\n")),
        None => text.push_str(&format!("nameserver {}\nnameserver {}\n", net.dns_v4, net.dns_v6)),
    }
    text.push_str(&crate::backend::dns::kept_lines(&host));
    let mut file = tempfile::Builder::new()
        .prefix("childflow-resolv.")
        .tempfile()
        .context("failed to create the command's resolv.conf")?;
    file.write_all(text.as_bytes()).context("failed to write the command's resolv.conf")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o644))
        .context("failed to make the command's resolv.conf readable")?;
    Ok(file)
}
