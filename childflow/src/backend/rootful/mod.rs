//! The rootful backend (`--root`): the command in its own network namespace joined to the
//! host by a veth pair, NAT to the host's uplinks, and eBPF programs that account, attribute
//! and capture its traffic.
//!
//! ```text
//!  childflow (root) ─ sandbox init (pid 1 of new pid+net+mount ns, in cgroup childflow-<id>)
//!                        └─ the command, as SUDO_UID/SUDO_GID, no capabilities
//!  host: cf<id>h ══ veth ══ cf<id>c (child)     TC program on cf<id>h (accounting)
//!        nft table childflow_<id> (masquerade)  cgroup programs on childflow-<id> (attribution)
//! ```
//!
//! Order of set-up, arranged so the slow parts overlap (timings with `-vv`, or on stderr
//! with `CHILDFLOW_TRACE_STARTUP=1`, see [`startup`]): preflight (root, BTF, kernel
//! version, cgroup v2) before touching anything; the cgroup and its reaper ([`cgroup`]); the sandbox,
//! cloned straight into the cgroup (`CLONE_INTO_CGROUP`) and waiting (no thread may exist
//! before this clone); then at once, on threads of their own, the programs
//! ([`crate::ebpf`]: aya's feature probes, object, maps, verification of each program in
//! parallel, each attribution program attached to the cgroup as soon as it is verified)
//! and the NAT table ([`nft`], which matches the veth by its name), while this thread
//! creates the veth, addresses and routes and a `clsact` qdisc on the host end ([`net`]).
//! When the verifier is done, the TC program goes on both directions of the host end as
//! two `clsact` filters (no RCU grace period to wait for, unlike TCX links, see
//! [`crate::ebpf::Accounting::attach_tc`]) and the sandbox is released: the command
//! starts only once every program sees its traffic (`init` has forked it long before, and
//! it waits for the release with its credentials dropped and its program found, so only
//! the exec is left, see [`crate::sandbox`]). No start-up thread is niced: all of their
//! work must be done before the release. While it runs, the kernel's ring
//! buffers are drained through `AsyncFd` and the flow map is sampled every second
//! ([`flows`]); every event goes to the [`Emitter`] without blocking. Large captured
//! packets are not copied out of the packet ring but lent to the collector from it
//! ([`ring`]), which gives their space back once written.
//!
//! Every piece of host state has a lifetime the kernel enforces, so a SIGKILL of childflow
//! leaves nothing behind: the sandbox's init dies with childflow (PDEATHSIG), taking the
//! pid namespace, hence the network namespace, hence the veth pair; the nft table is owned
//! by childflow's netlink socket; the TC filters die with the veth, cgroup links and maps
//! with their fds; the
//! cgroup directory is removed by the reaper process.
//!
//! A normal exit relies on the same lifetimes, off the critical path: when the command
//! has ended, the host end of the veth goes down (nothing crosses it any more), the last
//! records and counters are read, and the remaining teardown, which is all kernel waits
//! (the nft table's hooks, the cgroup links, the namespace), is handed to
//! a lingering process ([`linger`]) that releases it after childflow has exited. Decision:
//! childflow returns when the run's *results* are final, not when the host is clean; the
//! host is clean shortly after (median 11-33 ms, max 47-62 ms, measured by `cargo xtask
//! bench rootful --startup` at load 3-7; 14-16 ms, max 22-34 ms at load ~1; tests allow
//! the same 2 s as for SIGKILL). Waiting for it would add that to every run.
//!
//! Raw events: when `CHILDFLOW_RAW_EVENTS=PATH` is set, every event is also written to PATH
//! as one JSON object per line ([`raw`]); tests use it to check what the backend emits
//! before the flow log exists. It is a debugging aid, not a stable format.

pub mod cgroup;
pub mod dns;
pub mod flows;
mod linger;
pub mod net;
pub mod nft;
mod raw;
pub mod ring;
pub(crate) mod startup;
pub mod tap;

use std::{
    ffi::{CStr, CString},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use childflow_common::{
    event::{
        CAPTURE_MAX, CLONE_MIN, COUNT_CAPTURE_FILTERED, CaptureConfig, DROP_FLOW_MAP_FULL,
        DROP_FLOW_RINGBUF, DROP_PACKET_RINGBUF, DROP_PARSE, DROP_SOCK_RINGBUF, PACKET_CAPTURE,
        PACKET_CLONED, PacketHeader, Reassembly, Record, decode,
    },
    flow::DIR_OUT,
};
use tokio::io::unix::AsyncFd;

use self::startup::phase;
use crate::{
    cli::{Config, DEFAULT_CAPTURE_BUFFER},
    ebpf::Accounting,
    event::{Direction, DropReport, Emitter, Event, PacketData, PacketEvent},
    sandbox::{self, Credentials, ExitStatus, Namespaces, Spec},
};

/// Where the command's resolv.conf is written for the moment it takes to bind-mount it.
const RESOLV_DIR: &str = "/run";

/// How often the flow map is sampled for updates and idle flows.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often the rings are drained even without a wake-up (the programs batch wake-ups).
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// Captured packets at least this long are lent to the collector from the packet ring
/// rather than copied out of it ([`ring`]): the sizes the capture writes from a packet's own
/// memory (to a direct file, [`crate::capture::direct::ZERO_COPY_MIN`]; to a plain file,
/// [`crate::capture::GATHER_MIN`]). A smaller packet is copied into the file's buffer
/// anyway, so lending it would only hold its ring space longer.
const LEND_MIN: usize = crate::capture::direct::ZERO_COPY_MIN;
/// How long the last drain waits for the collector to take packets before it gives up on
/// the rest of the ring (a healthy collector takes the whole budget in milliseconds).
const FINAL_DRAIN_WAIT: Duration = Duration::from_secs(5);

/// Checks, before touching the host, that `--root` can work here.
pub fn preflight() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "--root needs root privileges (to create a veth pair, NAT rules, a cgroup and \
             eBPF programs): run it through sudo, e.g. `sudo childflow --root -- CMD`, or \
             drop --root to use the rootless backend"
        );
    }
    crate::ebpf::preflight().context("--root cannot run on this kernel")?;
    cgroup::unified_root()?;
    Ok(())
}

/// Who the command runs as: the user who invoked sudo, else childflow's own user.
///
/// Childflow's own user keeps childflow's own supplementary groups (`getgroups`), as a
/// child process would: no user database lookup. That lookup (NSS: `nsswitch.conf`, then
/// `libnss_files`/`libnss_systemd` loaded and the group file scanned) took ~1 ms of every
/// start-up, before the sandbox could be cloned. Through sudo the groups are the invoking
/// user's, which only the user database knows.
pub fn invoking_user() -> Result<Credentials> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let (uid, gid) = match (var("SUDO_UID"), var("SUDO_GID")) {
        (Some(uid), Some(gid)) => (uid, gid),
        _ => {
            let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
            return Ok(Credentials { uid, gid, groups: own_groups().unwrap_or_else(|| vec![gid]) });
        }
    };
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten();
    let groups = match &user {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_bytes()).context("user name")?;
            nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid])
        }
        None => vec![gid],
    };
    Ok(Credentials { uid, gid, groups })
}

/// This process's supplementary groups. Not `nix::unistd::getgroups`, which sizes its
/// buffer by reading `/proc/sys/kernel/ngroups_max`: the kernel says how many there are.
fn own_groups() -> Option<Vec<u32>> {
    // SAFETY: getgroups(0, NULL) only counts; the second call writes at most `n` entries
    // into a buffer of `n`.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        let mut groups = vec![0; usize::try_from(n).ok()?];
        let got = libc::getgroups(n, groups.as_mut_ptr());
        groups.truncate(usize::try_from(got).ok()?);
        Some(groups)
    }
}

/// Writes the command's resolv.conf to `path`, world-readable (the command reads it as
/// the invoking user). `init` bind-mounts it and unlinks it at once; the reaper removes it
/// too if childflow dies before that.
fn write_resolv_conf(config: &Config, path: &Path) -> Result<()> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (text, skipped) = dns::resolv_conf(&host, config.dns);
    if !skipped.is_empty() {
        tracing::warn!(
            "the host's nameserver(s) {skipped:?} are on loopback, which the command cannot \
             reach; pass --dns IP to choose a resolver"
        );
    }
    std::fs::write(path, text)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
        .with_context(|| format!("failed to write the command's resolv.conf {}", path.display()))
}

/// In `init` (real root, in the new mount and network namespaces): the resolv.conf bind
/// mount and the namespace's own sysctls.
fn child_setup(resolv: &CStr) -> Result<(), String> {
    // SAFETY: mount(2) with NUL-terminated strings that outlive the calls.
    unsafe {
        // Private first, so the bind mount never propagates to the host.
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!("cannot make / private: {}", nix::errno::Errno::last()));
        }
        let mounted = libc::mount(
            resolv.as_ptr(),
            c"/etc/resolv.conf".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        );
        // The mount holds the inode; the name is not needed any more.
        libc::unlink(resolv.as_ptr());
        if mounted != 0 {
            return Err(format!(
                "cannot bind-mount the command's resolv.conf over /etc/resolv.conf: {}",
                nix::errno::Errno::last()
            ));
        }
    }
    // Unprivileged ICMP echo sockets for everyone, as in the host's default on most
    // distributions: `ping` then needs no capability (this namespace only).
    let _ = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
    Ok(())
}

/// The kernel's drop counters and what each one counts, as the user reads it.
const DROP_SOURCES: [(u32, &str); 5] = [
    (DROP_FLOW_RINGBUF, "kernel flow ring buffer full"),
    (DROP_PACKET_RINGBUF, "kernel packet ring buffer full"),
    (DROP_FLOW_MAP_FULL, "kernel flow map full"),
    (DROP_SOCK_RINGBUF, "kernel socket ring buffer full"),
    (DROP_PARSE, "malformed packets"),
];

/// The rings the drain loop reads.
struct Rings {
    flows: AsyncFd<RingBuf<MapData>>,
    packets: AsyncFd<ring::PacketRing>,
    socks: AsyncFd<RingBuf<MapData>>,
}

/// Everything the drain loop keeps between wake-ups.
struct Drain {
    emitter: Emitter,
    raw: Option<raw::RawEvents>,
    tracker: flows::FlowTracker,
    processes: flows::Processes,
    clock: flows::Clock,
    drops_seen: [u64; childflow_common::event::DROP_COUNTERS as usize],
    /// `COUNT_CAPTURE_FILTERED` as last reported.
    filtered_seen: u64,
    /// DNS answers (UDP, and TCP streams being reassembled).
    answers: dns::Answers,
    /// Packets copied in several ring records, being joined.
    reassembly: Reassembly,
    /// Where the large packets of a capture are, as clones (`PACKET_CLONED` records).
    tap: Option<tap::CaptureTap>,
    out: Vec<Event>,
}

impl Drain {
    fn flush(&mut self) {
        for ev in self.out.drain(..) {
            if let Some(raw) = &mut self.raw {
                raw.write(&ev);
            }
            self.emitter.emit(ev);
        }
    }

    /// One whole captured packet: DNS answers out of it, and the packet itself if it
    /// belongs in the capture: lent from `ring` when it lies there and is large enough to
    /// go to the file as it is (see [`LEND_MIN`]), else copied.
    fn packet(&mut self, header: PacketHeader, data: &[u8], ring: Option<&ring::PacketRing>) {
        let ts = self.clock.to_unix(header.ts_ns);
        if header.direction != DIR_OUT as u32 {
            let mut answers = Vec::new();
            self.answers.frame(ts, data, &mut answers);
            self.out.extend(answers.into_iter().map(Event::Dns));
        }
        // DNS is copied for naming whatever the capture filter says; only the marked
        // copies belong in the capture.
        if header.flags & PACKET_CAPTURE != 0 {
            let data = match ring.filter(|_| data.len() >= LEND_MIN).and_then(|r| r.lend(data)) {
                Some(lent) => PacketData::Lent(lent),
                None => crate::event::packet_bytes(data).into(),
            };
            self.captured(&header, ts, data);
        }
    }

    /// A captured packet whose bytes went to the capture tap ([`PACKET_CLONED`]): taken
    /// from there, or counted lost.
    fn cloned(&mut self, header: &PacketHeader) {
        match self.tap.as_mut().and_then(|tap| tap.take(header.clone_tag as u16)) {
            Some(frame) => {
                let ts = self.clock.to_unix(header.ts_ns);
                self.captured(header, ts, PacketData::Owned(frame));
            }
            None => self.emitter.count_lost(),
        }
    }

    fn captured(&mut self, header: &PacketHeader, ts: crate::event::UnixNanos, data: PacketData) {
        self.out.push(Event::Packet(PacketEvent {
            ts,
            direction: if header.direction == DIR_OUT as u32 {
                Direction::Out
            } else {
                Direction::In
            },
            orig_len: header.orig_len,
            data,
        }));
    }

    /// Packets still waiting for records that will not come (the programs are detached).
    fn finish_packets(&mut self) {
        let mut reassembly = std::mem::take(&mut self.reassembly);
        reassembly.finish(&mut |h, d| self.packet(h, d, None));
        if let Some(tap) = &mut self.tap {
            tap.finish();
        }
        self.flush();
    }

    /// Reads what waits in the rings. Returns `true` if packets were left in the packet
    /// ring because the collector has the whole [`crate::event::PACKET_BUDGET`] waiting:
    /// the ring holds them meanwhile, and the caller comes back for them shortly.
    fn drain_rings(&mut self, rings: &mut Rings) -> bool {
        // Causes before effects: a DNS answer (packet ring) and the socket's owner (socket
        // ring) are written before the flow's first packet. So the flow ring is read first,
        // then the other two (which by then hold everything those flows depend on), and the
        // flow records are applied last: the flow table knows the name and the process
        // when the flow starts.
        let mut flow_records = Vec::new();
        while let Some(item) = rings.flows.get_mut().next() {
            match decode(&item) {
                Ok(Record::Flow(rec)) => flow_records.push(rec),
                other => tracing::debug!("unexpected flow ring record: {other:?}"),
            }
        }
        // A packet copied in several records is joined first (`Reassembly`).
        let mut reassembly = std::mem::take(&mut self.reassembly);
        // Packet bytes read in this pass (emitted at its end).
        let (mut held, mut left) = (0, false);
        let packets = rings.packets.get_ref();
        // Space of records the collector is done with goes back first.
        packets.release();
        while let Some(item) = packets.next() {
            let record = decode(item);
            // A clone's bytes are not in its record, but go to the collector all the same.
            let bytes = match &record {
                Ok(Record::Packet { header, .. }) if header.flags & PACKET_CLONED != 0 => {
                    item.len() + header.orig_len as usize
                }
                _ => item.len(),
            };
            if !self.emitter.has_packet_room(held + bytes) {
                // Not consumed: the next `next` returns this record again.
                packets.put_back();
                left = true;
                break;
            }
            held += bytes;
            let Ok(Record::Packet { header, data }) = record else { continue };
            if header.flags & PACKET_CLONED != 0 {
                self.cloned(&header);
                continue;
            }
            reassembly.push(header, data, &mut |h, d| self.packet(h, d, Some(packets)));
        }
        packets.release();
        self.reassembly = reassembly;
        while let Some(item) = rings.socks.get_mut().next() {
            match decode(&item) {
                Ok(Record::Sock(rec)) => self.processes.on_record(
                    &rec,
                    |r| flows::proc_info(r.tgid, r.uid, &r.comm),
                    &mut self.out,
                ),
                other => tracing::debug!("unexpected socket ring record: {other:?}"),
            }
        }
        for rec in flow_records {
            self.tracker.on_record(&rec, &mut self.out);
        }
        self.flush();
        left
    }

    /// Drains the rings to the end, waiting for the collector when the packet budget is
    /// spent (bounded: a collector that takes nothing for [`FINAL_DRAIN_WAIT`] loses the
    /// rest, counted).
    fn drain_all(&mut self, rings: &mut Rings) {
        let start = Instant::now();
        while self.drain_rings(rings) {
            if start.elapsed() > FINAL_DRAIN_WAIT {
                while rings.packets.get_ref().next().is_some() {
                    self.emitter.count_lost();
                }
                rings.packets.get_ref().release();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn sample(&mut self, accounting: &mut Accounting) {
        let sample = accounting.flows().unwrap_or_default();
        let remove = self.tracker.on_sample(&sample, flows::monotonic_ns(), &mut self.out);
        for key in remove {
            let _ = accounting.remove_flow(&key);
        }
        self.report_drops(accounting);
        self.flush();
    }

    /// Says on stderr what the kernel programs lost, whatever the outputs show.
    fn warn_kernel_drops(&self) {
        for (index, count) in self.drops_seen.iter().enumerate() {
            if *count > 0 {
                let source = DROP_SOURCES.iter().find(|(i, _)| *i as usize == index);
                let source = source.map_or("kernel", |(_, s)| s);
                tracing::warn!("lost to {source}: {count}");
            }
        }
    }

    fn report_drops(&mut self, accounting: &Accounting) {
        let Ok(drops) = accounting.drops() else { return };
        for (index, source) in DROP_SOURCES {
            let (now, seen) = (drops[index as usize], &mut self.drops_seen[index as usize]);
            if now != *seen {
                *seen = now;
                self.out.push(Event::Drops(DropReport { source, count: now }));
            }
        }
        let filtered = drops[COUNT_CAPTURE_FILTERED as usize];
        flows::filtered_packets(filtered.saturating_sub(self.filtered_seen), &mut self.out);
        self.filtered_seen = self.filtered_seen.max(filtered);
    }
}

/// Runs the command of `config` under the rootful backend, reporting to `events`; returns
/// how the command ended once it has and every event is emitted.
pub fn run(config: &Config, events: Emitter) -> Result<ExitStatus> {
    phase!("rootful backend entered");
    preflight()?;
    let run_id = format!("{:x}", std::process::id());
    let credentials = invoking_user()?;
    let raw = match std::env::var_os("CHILDFLOW_RAW_EVENTS") {
        Some(path) => Some(raw::RawEvents::create(&path)?),
        None => None,
    };

    phase!("preflight done");
    let mut capture = config
        .capture
        .as_ref()
        .map_or(CaptureConfig { capture_all: 0, snaplen: CAPTURE_MAX, clone_ifindex: 0 }, |c| {
            CaptureConfig { capture_all: 1, snaplen: c.snaplen.min(CAPTURE_MAX), clone_ifindex: 0 }
        });
    // The packet ring's size (`--capture-buffer`), which also sizes the capture tap.
    let ring = config.capture.as_ref().map_or(DEFAULT_CAPTURE_BUFFER, |c| c.buffer);
    // A capture that may want packets longer than CLONE_MIN whole takes them from a tap
    // (see `tap`). CHILDFLOW_CAPTURE_TAP=0 copies them into the ring instead (for A/B
    // measurements, `cargo xtask bench rootful --capture`).
    let tap = if capture.capture_all != 0
        && capture.snaplen > CLONE_MIN
        && std::env::var_os("CHILDFLOW_CAPTURE_TAP").is_none_or(|v| v != "0")
    {
        let name = CString::new(format!("cf{run_id}t")).context("capture tap name")?;
        let queue = tap::queue_len(ring);
        // Without it (no tun driver, say) the capture is whole all the same, only costlier.
        match tap::CaptureTap::create(&name, queue) {
            Ok(tap) => {
                capture.clone_ifindex = tap.ifindex();
                phase!("capture tap created");
                Some(tap)
            }
            Err(e) => {
                tracing::debug!("{e:#}; large packets are copied into the packet ring");
                None
            }
        }
    } else {
        None
    };
    // The capture filter runs in the TC programs, so what it rejects never takes ring space.
    // The capture writer filters again: it is the authority (for both backends) and sees
    // only what the kernel let through, so the second pass is cheap.
    let kernel_filter = match config.capture.as_ref().and_then(|c| c.filter.as_deref()) {
        Some(expr) => {
            let filter = crate::capture::filter::Filter::parse(expr)
                .with_context(|| format!("invalid --capture-filter `{expr}`"))?;
            Some(filter.program.to_kernel().context("the capture filter is too long")?)
        }
        None => None,
    };
    // Forks first, while as little as possible exists.
    let cgroup_root = cgroup::unified_root()?;
    let cgroup_path = cgroup_root.join(format!("childflow-{run_id}"));
    let resolv_path = Path::new(RESOLV_DIR).join(format!("childflow-{run_id}.resolv.conf"));
    let reaper = cgroup::Reaper::spawn(&cgroup_path, &resolv_path)?;
    let cg = cgroup::Cgroup::create(&cgroup_root, &run_id)?;
    write_resolv_conf(config, &resolv_path)?;
    let resolv = CString::new(resolv_path.as_os_str().as_bytes()).context("resolv.conf path")?;
    let spec = Spec {
        namespaces: Namespaces { user: false },
        argv: config.command.clone(),
        env: config.command_env.clone(),
        credentials: Some(credentials),
        terminal: config.terminal.clone(),
        cgroup: Some(std::sync::Arc::new(cg.open()?.into())),
        setup_before_release: true,
    };
    phase!("reaper, cgroup and resolv.conf ready");
    let mut sandbox = sandbox::spawn(&spec, move || child_setup(&resolv))?;
    phase!("sandbox cloned");
    // The verifier and map creation take a while: run them while netlink sets up the veth.
    // The attribution programs go on the cgroup (which exists) as soon as each is verified.
    let cgroup_dir = cg.open()?;
    let loader = std::thread::Builder::new()
        .name("ebpf-load".into())
        .spawn(move || {
            Accounting::load_with(capture, kernel_filter.as_ref(), Some(&cgroup_dir), ring)
        })
        .context("failed to start the eBPF loader thread")?;
    // The NAT table matches the veth by name, which is known now, before the veth exists.
    // Its creation often waits for locks other netlink users hold (RTNL, taken when the
    // first masquerade rule registers its netdevice notifiers): 5-50 ms here, overlapped.
    let nat_thread = {
        let (run_id, host_if) = (run_id.clone(), net::Addressing::new(&run_id, 0).host_if);
        std::thread::Builder::new()
            .name("nft".into())
            .spawn(move || nft::NatTable::create(&run_id, &host_if))
            .context("failed to start the nftables thread")?
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let init_pid = sandbox.pid().as_raw();
    let (host, host_index, addressing) = runtime.block_on(async {
        let host = net::host_handle()?;
        let used = net::host_addresses(&host).await?;
        let addressing = net::Addressing::pick(&run_id, std::process::id(), &used)?;
        let child = net::netns_handle(init_pid)?;
        phase!("netlink sockets open, host addresses read");
        let host_index = net::create(&host, &child, &addressing, init_pid).await?;
        phase!("veth created and configured");
        crate::ebpf::add_clsact(host_index)?;
        phase!("clsact qdisc added");
        net::enable_forwarding(&addressing.host_if)?;
        anyhow::Ok((host, host_index, addressing))
    })?;
    phase!("veth and routes ready");
    let nat = nat_thread.join().map_err(|_| anyhow::anyhow!("the nftables thread panicked"))??;
    phase!("nft table ready");
    tracing::debug!(
        "run {run_id}: {} {} / {}, nft table {}, cgroup {}",
        addressing.host_if,
        addressing.child_v4,
        addressing.child_v6,
        nat.name(),
        cg.path().display()
    );
    let mut accounting =
        loader.join().map_err(|_| anyhow::anyhow!("the eBPF loader thread panicked"))??;
    phase!("eBPF programs loaded");
    accounting.attach_tc(host_index)?;
    phase!("eBPF programs attached");
    let clock = flows::Clock::now();
    let mut drain = Drain {
        emitter: events,
        raw,
        tracker: flows::FlowTracker::new(clock),
        processes: flows::Processes::default(),
        clock,
        drops_seen: Default::default(),
        filtered_seen: 0,
        answers: dns::Answers::default(),
        reassembly: Reassembly::default(),
        tap,
        out: Vec::new(),
    };
    let mut rings = runtime.block_on(async {
        // SAFETY (of `register`): each fd is owned by the RingBuf the AsyncFd owns, so it
        // stays open exactly as long as its registration.
        let register = |ring| unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from);
        let packets = ring::PacketRing::new(accounting.take_packet_map()?)
            .context("failed to map the packet ring")?;
        anyhow::Ok(Rings {
            flows: register(accounting.take_flow_events()?)?,
            // SAFETY: as above, the fd is owned by the PacketRing.
            packets: unsafe { AsyncFd::register(packets) }.map_err(std::io::Error::from)?,
            socks: register(accounting.take_sock_events()?)?,
        })
    })?;

    let released = sandbox.release();
    phase!("command started");
    let _ = std::fs::remove_file(&resolv_path);
    released?;
    sandbox::signals::forward_to(sandbox.pid(), |_| {})
        .context("failed to start the signal forwarder")?;
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("wait".into())
        .spawn(move || {
            let status = sandbox.wait();
            let _ = done_tx.send((status, sandbox));
        })
        .context("failed to start the waiter thread")?;

    let status = runtime.block_on(async {
        let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
        let mut sample_tick = tokio::time::interval(SAMPLE_EVERY);
        // Packets left in the ring for want of budget: not woken by the ring meanwhile
        // (it would wake the loop at every packet), back after a millisecond. The same
        // while the ring's space is held by packets lent to the collector: the kernel's
        // wake-ups count that space as unread data (see `ring`), and its return is noticed
        // only here.
        let mut left = false;
        loop {
            tokio::select! {
                done = &mut done_rx => break done,
                r = rings.flows.readable_mut() => { if let Ok(mut g) = r { g.clear_ready(); } }
                r = rings.socks.readable_mut() => { if let Ok(mut g) = r { g.clear_ready(); } }
                r = rings.packets.readable_mut(), if !left => {
                    if let Ok(mut g) = r { g.clear_ready(); }
                }
                _ = tokio::time::sleep(Duration::from_millis(1)), if left => {}
                _ = drain_tick.tick() => {}
                _ = sample_tick.tick() => {
                    // Records waiting in the rings come before what the sample adds.
                    drain.drain_rings(&mut rings);
                    drain.sample(&mut accounting);
                }
            }
            left = drain.drain_rings(&mut rings) || rings.packets.get_ref().holding();
        }
    });
    let (status, _sandbox) = status.context("the waiter thread ended without a status")?;
    let status = status.context("failed to wait for the command")?;

    // The command is gone: kill what is left of its tree, take the last records, end
    // every flow with its final counters.
    cg.kill();
    // Stop the traffic first, so the last drain and the final counters agree with each
    // other (and with a capture) to the packet: with the host end down nothing crosses the
    // link any more, and the kernel has waited for packets in flight (`dev_close` →
    // `synchronize_net`, an expedited grace period under RTNL). Removing the filters
    // would do the same at a higher cost.
    if let Err(e) = runtime.block_on(net::set_down(&host, host_index, &addressing.host_if)) {
        tracing::debug!("{e:#}; removing the TC filters instead");
        let _ = crate::ebpf::remove_clsact(host_index);
    }
    drain.drain_all(&mut rings);
    drain.finish_packets();
    let last = accounting.flows().unwrap_or_default();
    drain.tracker.finish(&last, &mut drain.out);
    drain.report_drops(&accounting);
    drain.flush();
    let lost = drain.emitter.dropped();
    if lost > 0 {
        tracing::warn!("{lost} events were dropped because the collector fell behind");
    }
    drain.warn_kernel_drops();
    phase!("command ended, events flushed");

    // What is left is the kernel's teardown, slow (RCU grace periods) and invisible in the
    // results: hand it to a lingering process (see [`linger`]) and return. The veth dies
    // with the command's network namespace once the last reference to it (our netlink
    // socket there) is gone; the reaper removes the cgroup and the resolv.conf file when
    // childflow exits.
    let mut keep = accounting.link_fds();
    keep.push(nat.as_raw_fd());
    // Unregistering the tap waits for grace periods too.
    keep.extend(drain.tap.as_ref().map(|t| t.as_raw_fd()));
    linger::hand_over(&keep);
    drop((rings, accounting, nat, host, runtime));
    cg.leave_to_reaper();
    drop(reaper);
    phase!("teardown handed over");
    Ok(status)
}
