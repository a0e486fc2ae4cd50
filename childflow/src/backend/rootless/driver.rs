//! The engine's I/O: the tap device and the host sockets, on one thread.
//!
//! One single-threaded tokio runtime with a `LocalSet` runs:
//! - the main loop: reads batches of frames from the tap into [`Engine::ingest`], calls
//!   [`Engine::poll`], starts the work of each [`Action`], lets the relays that poll woke
//!   run, then writes [`Engine::pop_out`] frames to the tap and only after them sends the
//!   engine's events (a send may wake the collector thread). Consecutive datagrams of a UDP
//!   session leave in one system call (UDP GSO for runs of equal size, else `sendmmsg`).
//!   After activity it keeps looking for [`SPIN`] before it sleeps, yielding the CPU to
//!   any other runnable thread on each look, so a quick answer (the upstream's reply, the
//!   command's next request) finds it awake instead of paying a wake-up;
//! - one task per TCP flow: connects upstream (with a timeout), tells the engine and writes
//!   its SYN-ACK to the tap at once, then relays bytes directly between the host socket and
//!   the smoltcp socket's buffers (no intermediate copy), woken by tokio readiness and
//!   smoltcp's socket wakers;
//! - one receive task per UDP session and per ICMP echo flow, and one task per DNS query
//!   relayed to the host's resolvers.
//!
//! Everything shares the engine through an `Rc<RefCell<_>>`; no borrow is ever held across
//! an `.await`, so tasks never contend. A task that fails ends its own flow only: the
//! engine, the main loop and every other flow carry on.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    future::poll_fn,
    io::{self, ErrorKind},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    rc::Rc,
    task::Poll,
    time::Duration as StdDuration,
};

use smoltcp::{socket::tcp, time::Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, unix::AsyncFd},
    net::{TcpStream, UdpSocket},
    sync::{Notify, oneshot},
    task::{AbortHandle, LocalSet},
};

use super::{
    dns,
    engine::{Action, ConnectFailure, Engine, EngineConfig, FlowId, RelayEnd, Target},
    packet::{Unreachable, unspecified_like},
    recverr,
};
use crate::event::Emitter;

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Where the DNS relay forwards (the host's resolvers).
    pub upstream_dns: Vec<SocketAddr>,
    /// How long an upstream TCP connect may take before the command gets "unreachable".
    pub connect_timeout: StdDuration,
    /// How long the relay waits for one resolver before trying the next.
    pub dns_timeout: StdDuration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            upstream_dns: Vec::new(),
            connect_timeout: StdDuration::from_secs(30),
            dns_timeout: StdDuration::from_secs(2),
        }
    }
}

/// Frames read from the tap before the engine polls (bounds the latency of a burst).
const READ_BATCH: usize = 64;

/// How long the main loop keeps looking for work after the last frame or host-socket event
/// before it sleeps in epoll (bounded busy polling). A request/response or a connect
/// crosses the engine twice; each time the engine sleeps, waking it costs an
/// inter-processor interrupt and, on a virtual machine whose idle vCPUs halt, a VM exit and
/// entry (tens of µs on the 2-vCPU test VM, as much as the rest of the round trip). Each
/// look is a reactor turn with a zero `epoll_wait(2)` timeout (the tap and every host
/// socket) and a `sched_yield(2)` ([`give_way`]). The window bounds the CPU spent when
/// nothing comes: an idle engine sleeps.
const SPIN: StdDuration = StdDuration::from_micros(50);

/// Lets any other runnable thread on this CPU go first while the engine polls. The thread
/// the engine's last tap write woke (the command, reading its answer) is usually queued
/// right here, since the write woke it from this CPU: perf sched showed it waiting out the
/// whole spin (70–90 µs) without this, which made connects twice as slow.
fn give_way() {
    // SAFETY: sched_yield(2) has no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
}

/// Datagrams of one UDP session handed to the kernel in one `sendmmsg(2)` at most; also
/// the most one UDP GSO send carries (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
const SEND_BATCH: usize = 64;

/// Largest datagram sent with UDP GSO: every segment must fit the path's MTU, which the
/// engine does not know (a larger one fails with EINVAL instead of being fragmented).
/// 1,232 bytes fit IPv6's minimum MTU (1,280 minus the IPv6 and UDP headers).
const GSO_MAX_DATAGRAM: usize = 1232;

enum UdpSession {
    /// `recverr`: ICMP errors arrive on the socket's error queue with the router's address
    /// ([`recverr`]); otherwise only as errnos.
    Socket {
        sock: Rc<UdpSocket>,
        task: AbortHandle,
        recverr: bool,
    },
    Dns,
}

/// An ICMP echo flow's socket, and the hop limit it sends with (0: the host's default).
struct PingSession {
    sock: Rc<UdpSocket>,
    task: AbortHandle,
    hops: Cell<u8>,
}

struct Ctx {
    engine: RefCell<Engine>,
    /// Wakes the main loop: a task changed the engine (data queued, socket state).
    wake: Notify,
    start: std::time::Instant,
    tokio_start: tokio::time::Instant,
    cfg: DriverConfig,
    udp: RefCell<HashMap<FlowId, UdpSession>>,
    pings: RefCell<HashMap<FlowId, PingSession>>,
    /// Hop limits for TCP connects about to start ([`Action::TcpHopLimit`]).
    tcp_hops: RefCell<HashMap<FlowId, u8>>,
    ping_unavailable: Cell<bool>,
    /// The tap's descriptor while the main loop runs (-1 before and after), for tasks that
    /// write the engine's answer at once instead of waiting for the main loop's next turn.
    tap_fd: Cell<i32>,
    /// Whether the host takes UDP GSO sends (cleared when the kernel refuses one).
    udp_gso: Cell<bool>,
    /// Unconnected TCP sockets made ahead ([`SpareSockets`]).
    spare: RefCell<SpareSockets>,
}

impl Ctx {
    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn to_tokio(&self, at: Instant) -> tokio::time::Instant {
        self.tokio_start + StdDuration::from_micros(at.total_micros().max(0) as u64)
    }

    fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Runs the engine on `tap` until `stop` fires (the command exited) or the tap goes away.
/// Every live flow is reported as ended before this returns.
pub fn run(
    tap: OwnedFd,
    engine_cfg: EngineConfig,
    cfg: DriverConfig,
    events: Emitter,
    stop: oneshot::Receiver<()>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let start = std::time::Instant::now();
        let ctx = Rc::new(Ctx {
            engine: RefCell::new(Engine::new(engine_cfg, events, Instant::from_micros(0))),
            wake: Notify::new(),
            start,
            tokio_start: tokio::time::Instant::from_std(start),
            cfg,
            udp: RefCell::new(HashMap::new()),
            pings: RefCell::new(HashMap::new()),
            tcp_hops: RefCell::new(HashMap::new()),
            ping_unavailable: Cell::new(false),
            tap_fd: Cell::new(-1),
            udp_gso: Cell::new(true),
            spare: RefCell::new(SpareSockets::default()),
        });
        ctx.engine.borrow_mut().defer_events();
        let result = main_loop(&ctx, tap, stop).await;
        ctx.engine.borrow_mut().shutdown();
        result
    })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn main_loop(ctx: &Rc<Ctx>, tap: OwnedFd, stop: oneshot::Receiver<()>) -> io::Result<()> {
    set_nonblocking(&tap)?;
    // SAFETY: `tap` is an open descriptor the AsyncFd owns until it is dropped.
    let tap = unsafe { AsyncFd::register_with_interest(tap, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))?;
    // The tap is persistent (see `tap::create`): dropping it at the end only detaches the
    // queue, instead of unregistering the device under RCU waits (~20 ms).
    ctx.tap_fd.set(tap.as_raw_fd());
    let result = relay_frames(ctx, &tap, stop).await;
    ctx.tap_fd.set(-1);
    result
}

async fn relay_frames(
    ctx: &Rc<Ctx>,
    tap: &AsyncFd<OwnedFd>,
    mut stop: oneshot::Receiver<()>,
) -> io::Result<()> {
    let fd = tap.as_raw_fd();
    let mut read_frames = false;
    // Busy polling ([`SPIN`]): until when the loop looks again instead of sleeping, and
    // whether the last look found nothing (then the engine has nothing new to do either).
    let mut spin_until: Option<std::time::Instant> = None;
    let mut empty_look = false;
    let mut deadline = tokio::time::Instant::now();
    loop {
        if !std::mem::take(&mut empty_look) || tokio::time::Instant::now() >= deadline {
            deadline = {
                let mut engine = ctx.engine.borrow_mut();
                let now = ctx.now();
                engine.poll(now);
                let at = engine.poll_at(ctx.now());
                ctx.to_tokio(at)
            };
            run_actions(ctx);
            if std::mem::take(&mut read_frames) {
                // Let the relays this poll woke (bytes from the command for their host
                // sockets) run before the tap is written: the bytes go upstream before the
                // engine spends a write (and the command's kernel its processing) on the ACK
                // for them.
                tokio::task::yield_now().await;
            }
            let mut engine = ctx.engine.borrow_mut();
            if !flush(&mut engine, fd, ctx.now()) {
                return Ok(());
            }
            // After the writes: sending may wake the collector thread (see
            // `Engine::defer_events`).
            engine.flush_events();
        }
        let spin = spin_until.is_some_and(|t| std::time::Instant::now() < t);
        // A capture that fell behind holds the tap (see `Engine::capture_backlogged`);
        // the loop looks again every millisecond.
        let held = ctx.engine.borrow().capture_backlogged();
        // Frames before the stop: the command's last packets (the FIN of a socket it closed
        // as it exited) are still queued on the tap when its exit is noticed.
        tokio::select! {
            biased;
            ready = tap.readable(), if !held => {
                if !read_tap(ctx, ready?, fd) {
                    return Ok(());
                }
                read_frames = true;
                spin_until = Some(std::time::Instant::now() + SPIN);
            }
            _ = &mut stop => {
                // The reactor may not have seen the tap's last frames yet: read what is
                // queued now, so the command's closing packets are still accounted.
                drain_tap(ctx, fd);
                return Ok(());
            }
            _ = ctx.wake.notified() => {
                spin_until = Some(std::time::Instant::now() + SPIN);
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(1)), if held => {}
            _ = tokio::time::sleep_until(deadline), if !spin => {}
            // The yield lets the reactor poll the tap and the host sockets without waiting
            // (tokio polls its driver with a zero timeout before running a yielded task).
            _ = tokio::task::yield_now(), if spin => {
                give_way();
                empty_look = true;
            }
        }
    }
}

/// Reads up to [`READ_BATCH`] frames from the tap into the engine. `false` when the tap is
/// gone (the command's namespace ended).
fn read_tap(
    ctx: &Rc<Ctx>,
    mut guard: tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    fd: i32,
) -> bool {
    let mut engine = ctx.engine.borrow_mut();
    for _ in 0..READ_BATCH {
        let mut buf = engine.take_buffer();
        let cap = buf.capacity();
        // SAFETY: read(2) into the buffer's spare capacity; the length is set to what the
        // kernel wrote.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), cap) };
        if n < 0 {
            let e = io::Error::last_os_error();
            engine.recycle(buf);
            if e.kind() == ErrorKind::WouldBlock {
                guard.clear_ready();
                break;
            }
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::debug!("tap read failed: {e}");
            return false;
        }
        // SAFETY: the kernel initialized n bytes.
        unsafe { buf.set_len(n as usize) };
        engine.ingest(buf, ctx.now());
    }
    true
}

/// Reads every frame queued on the tap right now (non-blocking) into the engine.
fn drain_tap(ctx: &Rc<Ctx>, fd: i32) {
    let mut engine = ctx.engine.borrow_mut();
    loop {
        let mut buf = engine.take_buffer();
        let cap = buf.capacity();
        // SAFETY: read(2) into the buffer's spare capacity; the length is set to what the
        // kernel wrote.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), cap) };
        if n <= 0 {
            engine.recycle(buf);
            break;
        }
        // SAFETY: the kernel initialized n bytes.
        unsafe { buf.set_len(n as usize) };
        engine.ingest(buf, ctx.now());
    }
    let now = ctx.now();
    engine.poll(now);
}

/// Writes the engine's frames to the tap. `false` when the tap is gone.
fn flush(engine: &mut Engine, fd: i32, now: Instant) -> bool {
    while let Some(frame) = engine.pop_out() {
        // SAFETY: write(2) from an initialized buffer.
        let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
        engine.sent(frame, now);
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The command's queue is full: the frame is lost like on a wire.
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EINVAL) => {}
                _ => {
                    tracing::debug!("tap write failed: {e}");
                    return false;
                }
            }
        }
    }
    true
}

/// Datagrams of one UDP session, sent together by [`send_batch`].
struct UdpBatch {
    id: FlowId,
    sock: Rc<UdpSocket>,
    /// The session's socket reports ICMP errors on its error queue (see [`UdpSession`]).
    recverr: bool,
    payloads: Vec<Vec<u8>>,
}

fn run_actions(ctx: &Rc<Ctx>) {
    // Consecutive datagrams of one session go out with one system call: at small packet
    // sizes the per-call cost (and the receiver woken per datagram) is most of the relay's.
    let mut batch: Option<UdpBatch> = None;
    loop {
        let Some(action) = ctx.engine.borrow_mut().pop_action() else { break };
        let Action::UdpSend { id, payload } = action else {
            if let Some(b) = batch.take() {
                send_batch(ctx, b);
            }
            run_action(ctx, action);
            continue;
        };
        if let Some(b) = &mut batch
            && b.id == id
            && b.payloads.len() < SEND_BATCH
        {
            b.payloads.push(payload);
            continue;
        }
        if let Some(b) = batch.take() {
            send_batch(ctx, b);
        }
        let sock = match ctx.udp.borrow().get(&id) {
            Some(UdpSession::Socket { sock, recverr, .. }) => Some((sock.clone(), *recverr)),
            _ => None,
        };
        match sock {
            Some((sock, recverr)) => {
                batch = Some(UdpBatch { id, sock, recverr, payloads: vec![payload] })
            }
            None => udp_send(ctx, id, payload),
        }
    }
    if let Some(b) = batch.take() {
        send_batch(ctx, b);
    }
}

fn run_action(ctx: &Rc<Ctx>, action: Action) {
    match action {
        Action::TcpConnect { id, target } => {
            // A plain connect starts here, in the main loop's turn, and when the upstream
            // answers at once (a local path: connect(2) returns after the whole handshake)
            // the SYN-ACK is written before the flow's task even exists.
            let begun = match target {
                Target::Direct(addr) if !ctx.tcp_hops.borrow().contains_key(&id) => {
                    let sock = ctx.spare.borrow_mut().take(addr.is_ipv6());
                    let begun = begin_connect(addr, sock);
                    if matches!(begun, Begun::Connected(_)) {
                        announce_connected(ctx, id);
                    }
                    // After the SYN-ACK: the next connect's socket is made while the
                    // command takes this one's answer.
                    ctx.spare.borrow_mut().refill(addr.is_ipv6());
                    Some(begun)
                }
                _ => None,
            };
            tokio::task::spawn_local(tcp_flow(ctx.clone(), id, target, begun));
        }
        Action::UdpOpen { id, target } => udp_open(ctx, id, target),
        Action::UdpSend { id, payload } => udp_send(ctx, id, payload),
        Action::Ping { id, remote, seq, hops, payload } => {
            ping(ctx, id, remote, seq, hops, &payload)
        }
        Action::TcpHopLimit { id, hops } => {
            ctx.tcp_hops.borrow_mut().insert(id, hops);
        }
        Action::SetHopLimit { id, hops } => {
            if let Some(UdpSession::Socket { sock, .. }) = ctx.udp.borrow().get(&id) {
                let v6 = sock.peer_addr().is_ok_and(|a| a.is_ipv6());
                if let Err(e) = recverr::set_hop_limit(sock.as_fd(), v6, hops) {
                    tracing::debug!("flow {id}: cannot set the hop limit to {hops}: {e}");
                }
            }
        }
        Action::Close { id } => {
            if let Some(UdpSession::Socket { task, .. }) = ctx.udp.borrow_mut().remove(&id) {
                task.abort();
            }
            if let Some(p) = ctx.pings.borrow_mut().remove(&id) {
                p.task.abort();
            }
        }
    }
}

/// Sends a batch of datagrams: runs of equal-sized ones as one UDP GSO send (`UDP_SEGMENT`,
/// udp(7): the kernel builds one buffer and cuts it into the datagrams at the last moment,
/// instead of running its whole output path per datagram), the rest with `sendmmsg(2)`.
/// The peer receives the same datagrams either way. A datagram the kernel refuses is sent
/// again alone, so its error is handled like any single send's (see [`udp_send`]); when
/// the host's send buffer is full, the rest of the batch is lost, as on a wire.
fn send_batch(ctx: &Rc<Ctx>, mut b: UdpBatch) {
    let n = b.payloads.len();
    let mut at = 0;
    while at < n {
        let run = if ctx.udp_gso.get() { gso_run(&b.payloads[at..]) } else { 0 };
        if run > 1 {
            match send_gso(&b.sock, &b.payloads[at..at + run]) {
                Ok(()) => {
                    at += run;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if let Some(why) = udp_error(&e) => {
                    // A pending ICMP error of the session failed the send (and is now
                    // cleared). With IP_RECVERR it was passed on, with its source, from the
                    // error queue; without, it is passed on here. The run is sent again.
                    if !b.recverr {
                        ctx.engine.borrow_mut().udp_unreachable(b.id, why, ctx.now());
                        ctx.poke();
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!("UDP GSO send failed ({e}); sending datagrams singly");
                    ctx.udp_gso.set(false);
                }
            }
        } else if n - at > 1 {
            at += send_many(&b.sock, &b.payloads[at..]);
            if at == n {
                break;
            }
        }
        // One datagram alone: the last of the batch, or the one sendmmsg stopped at. Its
        // error is handled like any single send's.
        udp_send(ctx, b.id, std::mem::take(&mut b.payloads[at]));
        at += 1;
    }
}

/// How many datagrams from the start of `payloads` one GSO send can carry: all of the
/// first one's size, and one shorter last one (the kernel's rule for segments), within
/// the 64 KiB of one UDP send.
fn gso_run(payloads: &[Vec<u8>]) -> usize {
    let size = payloads[0].len();
    if size == 0 || size > GSO_MAX_DATAGRAM {
        return 0;
    }
    let max = SEND_BATCH.min(65_000 / size);
    let mut run = 0;
    for p in payloads.iter().take(max) {
        if p.len() == size {
            run += 1;
        } else {
            if !p.is_empty() && p.len() < size {
                run += 1;
            }
            break;
        }
    }
    run
}

/// One `sendmsg(2)` of `payloads` (see [`gso_run`]) with `UDP_SEGMENT` set to the first
/// one's size, on the connected socket `sock`.
fn send_gso(sock: &UdpSocket, payloads: &[Vec<u8>]) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = payloads
        .iter()
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let size = payloads[0].len() as u16;
    // Room for one cmsghdr with a u16, 8-byte aligned as cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovs.as_mut_ptr();
    msg.msg_iovlen = iovs.len();
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one cmsghdr and its u16 (checked above); the
    // iovecs point at live payloads; the socket is connected, so no address is needed.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size);
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `sendmmsg(2)` of `payloads` on the connected socket `sock`; how many went out (0 on
/// an error, which the caller learns by sending the first datagram alone).
fn send_many(sock: &UdpSocket, payloads: &[Vec<u8>]) -> usize {
    let mut iovs: Vec<libc::iovec> = payloads
        .iter()
        .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: every header points at one iovec over a live payload; the socket is
    // connected, so no addresses are needed.
    let sent = unsafe {
        libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, libc::MSG_DONTWAIT)
    };
    usize::try_from(sent).unwrap_or(0)
}

fn classify(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        ErrorKind::PermissionDenied => ConnectFailure::Prohibited,
        _ => ConnectFailure::Unreachable,
    }
}

/// The longest a TCP flow's relay waits for its process lookup once the upstream has
/// connected: on a quiet machine the lookup (one sock_diag request, a readlink, a few
/// /proc reads) is over by the time the first bytes would cross; under heavy load it
/// bounds what a starved lookup thread costs a connection.
const ATTRIBUTION_WAIT: StdDuration = StdDuration::from_millis(20);

/// Tells the engine that flow `id`'s upstream connected and writes the SYN-ACK to the tap
/// at once, not on the main loop's next turn: the command's connect() waits for it.
/// Frames already waiting (other flows' ACKs, typically the previous connection's close)
/// go after the SYN-ACK: each tap write runs the command's receive path inline (5-8 µs).
fn announce_connected(ctx: &Ctx, id: FlowId) {
    let mut engine = ctx.engine.borrow_mut();
    let waiting = engine.out_len();
    engine.tcp_connected(id, ctx.now());
    engine.send_newest_first(waiting);
    let _ = flush(&mut engine, ctx.tap_fd.get(), ctx.now());
    engine.flush_events();
    drop(engine);
    ctx.poke();
}

async fn tcp_flow(ctx: Rc<Ctx>, id: FlowId, target: Target, begun: Option<Begun>) {
    let mut failure = ConnectFailure::Unreachable;
    let mut stream = None;
    let mut icmp = None;
    let announced = matches!(begun, Some(Begun::Connected(_)));
    let candidates = match target {
        Target::Direct(addr) => vec![addr],
        Target::DnsRelay => ctx.cfg.upstream_dns.clone(),
    };
    let hops = ctx.tcp_hops.borrow_mut().remove(&id);
    let mut begun = begun;
    for addr in candidates {
        // The main loop may have begun the first connect already (`run_action`).
        let begun = begun.take();
        let connect = async {
            match (begun, hops) {
                (Some(begun), _) => finish_connect(begun).await,
                (None, Some(hops)) => connect_with_hop_limit(addr, hops, &mut icmp).await,
                (None, None) => connect(addr).await,
            }
        };
        match tokio::time::timeout(ctx.cfg.connect_timeout, connect).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!("flow {id}: connect to {addr} failed: {e}");
                failure = classify(&e);
            }
            Err(_) => tracing::debug!("flow {id}: connect to {addr} timed out"),
        }
    }
    let Some(stream) = stream else {
        if announced {
            // Connected, but the socket could not join the reactor: the command sees a reset.
            ctx.engine.borrow_mut().tcp_relay_done(id, RelayEnd::UpstreamReset, ctx.now());
            ctx.poke();
            return;
        }
        let mut engine = ctx.engine.borrow_mut();
        match icmp {
            Some(q) => engine.tcp_connect_icmp_error(id, q.offender, q.error, ctx.now()),
            None => engine.tcp_connect_failed(id, failure, ctx.now()),
        }
        drop(engine);
        ctx.poke();
        return;
    };
    let _ = stream.set_nodelay(true);
    let dns = ctx.engine.borrow().flow_key(id).is_some_and(|k| k.remote_port == 53);
    if !announced {
        announce_connected(&ctx, id);
    }
    // The relay starts once the flow's process lookup is over (bounded): see
    // `Engine::attribution_of`. Usually it is over already.
    let attribution = ctx.engine.borrow_mut().attribution_of(id);
    if let Some(lookup) = attribution {
        let _ = tokio::time::timeout(ATTRIBUTION_WAIT, lookup).await;
    }
    let end = relay(&ctx, id, &stream, dns).await;
    if end == RelayEnd::ChildReset {
        // SO_LINGER 0: closing sends RST instead of FIN, so the peer sees the reset.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(StdDuration::ZERO));
    }
    drop(stream);
    ctx.engine.borrow_mut().tcp_relay_done(id, end, ctx.now());
    ctx.poke();
}

/// Connects to `addr` with the command's TTL / hop limit `hops` on the SYN, then goes back
/// to the host's default for the connection. When the connect fails because of an ICMP
/// error (a router's "time exceeded" aborts a connect in SYN-SENT: `tcp_v4_err` in
/// net/ipv4/tcp_ipv4.c), that error, with its source, is left in `icmp`.
async fn connect_with_hop_limit(
    addr: SocketAddr,
    hops: u8,
    icmp: &mut Option<recverr::QueuedError>,
) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = addr.is_ipv6();
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    recverr::enable(sock.as_fd(), v6)?;
    recverr::set_hop_limit(sock.as_fd(), v6, hops)?;
    // The connect consumes the socket; a duplicate descriptor reads its error queue after.
    let probe = sock.try_clone()?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match socket.connect(addr).await {
        Ok(stream) => {
            let _ = recverr::reset_hop_limit(stream.as_fd(), v6);
            Ok(stream)
        }
        Err(e) => {
            while let Ok(queued) = recverr::read_queued(probe.as_fd()) {
                if queued.is_some() {
                    *icmp = queued;
                }
            }
            Err(e)
        }
    }
}

/// A TCP connect begun with [`begin_connect`].
enum Begun {
    /// The handshake is complete and no error is pending.
    Connected(socket2::Socket),
    /// Still in progress, or failed with an error still to be read from the socket.
    InProgress(socket2::Socket),
    Failed(io::Error),
}

/// Starts a non-blocking connect to `addr`. Over a local path the handshake is usually
/// complete when connect(2) returns: a zero-timeout poll(2) finds that out without a turn
/// of the reactor (which sits in the command's connect time), and `POLLOUT` without
/// `POLLERR`/`POLLHUP` means connected, so no `SO_ERROR` read is needed either.
/// Uses `sock` if given (a fresh, unconnected TCP socket of `addr`'s family).
fn begin_connect(addr: SocketAddr, sock: Option<socket2::Socket>) -> Begun {
    let sock = match sock.map_or_else(|| new_tcp_socket(addr.is_ipv6()), Ok) {
        Ok(s) => s,
        Err(e) => return Begun::Failed(e),
    };
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Begun::Failed(e),
    }
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) } == 1;
    if ready && pfd.revents & (libc::POLLERR | libc::POLLHUP) == 0 {
        Begun::Connected(sock)
    } else {
        Begun::InProgress(sock)
    }
}

/// A non-blocking TCP socket, not yet bound or connected.
fn new_tcp_socket(v6: bool) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    Socket::new(domain, Type::STREAM.nonblocking(), None)
}

/// One unconnected TCP socket per address family, made ahead of the connect that uses it.
///
/// socket(2) is on a connect's critical path otherwise, between the command's SYN and the
/// upstream connect: 3-6 µs of a ~90 µs connect (ftrace, 2026-12-07), mostly the
/// allocation and accounting of the socket. A family gets a spare only once a connect used
/// it, so a run that never connects over IPv6 never holds an IPv6 socket.
#[derive(Default)]
struct SpareSockets {
    v4: Option<socket2::Socket>,
    v6: Option<socket2::Socket>,
}

impl SpareSockets {
    fn slot(&mut self, v6: bool) -> &mut Option<socket2::Socket> {
        if v6 { &mut self.v6 } else { &mut self.v4 }
    }

    fn take(&mut self, v6: bool) -> Option<socket2::Socket> {
        self.slot(v6).take()
    }

    fn refill(&mut self, v6: bool) {
        let slot = self.slot(v6);
        if slot.is_none() {
            *slot = new_tcp_socket(v6).ok();
        }
    }
}

/// Waits for a connect [`begin_connect`] started, on the reactor.
async fn finish_connect(begun: Begun) -> io::Result<TcpStream> {
    let (sock, connected) = match begun {
        Begun::Connected(sock) => (sock, true),
        Begun::InProgress(sock) => (sock, false),
        Begun::Failed(e) => return Err(e),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    if connected {
        return Ok(stream);
    }
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// Connects a TCP socket to `addr` (see [`begin_connect`]).
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    finish_connect(begin_connect(addr, None)).await
}

/// Whether the command has closed its sending side (FIN received and all data read).
fn child_finished(sock: &mut tcp::Socket<'static>) -> bool {
    !sock.can_recv() && matches!(sock.recv_slice(&mut []), Err(tcp::RecvError::Finished))
}

/// Moves bytes both ways between `stream` and the smoltcp socket of flow `id` until both
/// directions are closed or either side resets. Half-closes are passed on: the command's FIN
/// becomes `shutdown(SHUT_WR)` upstream, the upstream's EOF becomes a FIN to the command.
async fn relay(ctx: &Rc<Ctx>, id: FlowId, stream: &TcpStream, dns: bool) -> RelayEnd {
    let mut upstream_eof = false;
    let mut upstream_shut = false;
    // DNS over TCP (RFC 1035 §4.2.2): answers are length-prefixed; collect them to report.
    let mut dns_buf: Vec<u8> = Vec::new();
    poll_fn(|cx| {
        let mut engine = ctx.engine.borrow_mut();
        let mut touched = false;
        let mut answers = Vec::new();
        let result = 'relay: {
            let Some((sock, child_rst)) = engine.tcp_socket(id) else {
                break 'relay Poll::Ready(RelayEnd::ChildReset);
            };
            if child_rst {
                break 'relay Poll::Ready(RelayEnd::ChildReset);
            }
            // Command → upstream.
            while !upstream_shut {
                if sock.can_recv() {
                    match stream.poll_write_ready(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Err(_)) => {
                            break 'relay Poll::Ready(RelayEnd::UpstreamReset);
                        }
                        Poll::Ready(Ok(())) => {
                            let r = sock.recv(|buf| match stream.try_write(buf) {
                                Ok(n) => (n, Ok(n)),
                                Err(e) => (0, Err(e)),
                            });
                            touched = true;
                            match r {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => {}
                                Ok(Err(_)) => break 'relay Poll::Ready(RelayEnd::UpstreamReset),
                                Err(_) => break,
                            }
                        }
                    }
                } else if child_finished(sock) {
                    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
                    upstream_shut = true;
                } else {
                    sock.register_recv_waker(cx.waker());
                    break;
                }
            }
            // Upstream → command.
            while !upstream_eof {
                if !sock.can_send() {
                    sock.register_send_waker(cx.waker());
                    break;
                }
                match stream.poll_read_ready(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(_)) => break 'relay Poll::Ready(RelayEnd::UpstreamReset),
                    Poll::Ready(Ok(())) => {
                        let r = sock.send(|buf| match stream.try_read(buf) {
                            Ok(n) => {
                                if dns {
                                    dns_buf.extend_from_slice(&buf[..n]);
                                }
                                (n, Ok(n))
                            }
                            Err(e) => (0, Err(e)),
                        });
                        touched = true;
                        match r {
                            Ok(Ok(0)) => {
                                upstream_eof = true;
                                sock.close();
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => {}
                            Ok(Err(_)) => break 'relay Poll::Ready(RelayEnd::UpstreamReset),
                            Err(_) => break,
                        }
                    }
                }
            }
            if dns {
                while let Some(msg) = crate::backend::dns::take_tcp_message(&mut dns_buf) {
                    answers.push(msg);
                }
            }
            let state = sock.state();
            if upstream_eof && upstream_shut {
                break 'relay Poll::Ready(RelayEnd::Fin);
            }
            if state == tcp::State::Closed {
                // Reset by the command, or smoltcp gave up retransmitting to it.
                break 'relay Poll::Ready(RelayEnd::ChildReset);
            }
            Poll::Pending
        };
        let now = ctx.now();
        for answer in answers {
            engine.tcp_dns_answer(id, &answer, now);
        }
        if touched || result.is_ready() {
            ctx.poke();
        }
        result
    })
    .await
}

fn udp_open(ctx: &Rc<Ctx>, id: FlowId, target: Target) {
    let addr = match target {
        Target::DnsRelay => {
            ctx.udp.borrow_mut().insert(id, UdpSession::Dns);
            return;
        }
        Target::Direct(addr) => addr,
    };
    let open = || -> io::Result<UdpSocket> {
        let sock = std::net::UdpSocket::bind(SocketAddr::new(unspecified_like(addr.ip()), 0))?;
        sock.connect(addr)?;
        sock.set_nonblocking(true)?;
        UdpSocket::from_std(sock)
    };
    match open() {
        Ok(sock) => {
            let recverr = match recverr::enable(sock.as_fd(), addr.is_ipv6()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("flow {id}: no ICMP errors with their source: {e}");
                    false
                }
            };
            let sock = Rc::new(sock);
            let task =
                tokio::task::spawn_local(udp_receive(ctx.clone(), id, sock.clone(), recverr));
            let task = task.abort_handle();
            ctx.udp.borrow_mut().insert(id, UdpSession::Socket { sock, task, recverr });
        }
        Err(e) => {
            tracing::debug!("flow {id}: cannot open a UDP socket to {addr}: {e}");
            let why = if e.kind() == ErrorKind::PermissionDenied {
                Unreachable::Prohibited
            } else {
                Unreachable::Host
            };
            ctx.engine.borrow_mut().udp_unreachable(id, why, ctx.now());
            ctx.poke();
        }
    }
}

/// The ICMP error a failed UDP send or receive stands for.
fn udp_error(e: &io::Error) -> Option<Unreachable> {
    match e.kind() {
        ErrorKind::ConnectionRefused => Some(Unreachable::Port),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Some(Unreachable::Host),
        ErrorKind::PermissionDenied => Some(Unreachable::Prohibited),
        _ => None,
    }
}

fn udp_send(ctx: &Rc<Ctx>, id: FlowId, payload: Vec<u8>) {
    let (sock, recverr) = match ctx.udp.borrow().get(&id) {
        Some(UdpSession::Socket { sock, recverr, .. }) => (sock.clone(), *recverr),
        Some(UdpSession::Dns) => {
            tokio::task::spawn_local(dns_query(ctx.clone(), id, payload));
            return;
        }
        None => return,
    };
    let mut sent = send_now(&sock, &payload);
    if recverr && sent.as_ref().is_err_and(|e| udp_error(e).is_some()) {
        // The socket's pending error from an earlier ICMP message failed this send (and is
        // now cleared); that message is passed on from the error queue. Send again.
        sent = send_now(&sock, &payload);
    }
    if let Err(e) = sent {
        // WouldBlock: the host's send buffer is full; the datagram is lost as on a wire.
        if !recverr && let Some(why) = udp_error(&e) {
            ctx.engine.borrow_mut().udp_unreachable(id, why, ctx.now());
            ctx.poke();
        }
    }
}

/// Passes each ICMP error queued on `sock` to the engine (`on_error`) until the queue is
/// empty. Called when the socket reports an error condition.
fn drain_error_queue(sock: &UdpSocket, mut on_error: impl FnMut(recverr::QueuedError)) {
    loop {
        // Through try_io, so tokio clears the socket's error readiness once it is empty.
        match sock.try_io(tokio::io::Interest::ERROR, || recverr::read_queued(sock.as_fd())) {
            Ok(Some(queued)) => on_error(queued),
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

async fn udp_receive(ctx: Rc<Ctx>, id: FlowId, sock: Rc<UdpSocket>, recverr: bool) {
    use tokio::io::Interest;
    let mut buf = vec![0u8; 65536];
    loop {
        let ready = match sock.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("flow {id}: UDP socket failed: {e}");
                return;
            }
        };
        if ready.is_error() {
            // Also without `recverr`: draining clears tokio's error readiness (the queue is
            // empty then), which would otherwise wake this loop forever.
            drain_error_queue(&sock, |q| {
                ctx.engine.borrow_mut().udp_icmp_error(id, q.offender, q.error, ctx.now());
                ctx.poke();
            });
        }
        loop {
            match sock.try_recv(&mut buf) {
                Ok(n) => {
                    ctx.engine.borrow_mut().udp_reply(id, &buf[..n], ctx.now());
                    ctx.poke();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => match udp_error(&e) {
                    // Already passed on, with its source, from the error queue.
                    Some(_) if recverr => {}
                    Some(why) => {
                        ctx.engine.borrow_mut().udp_unreachable(id, why, ctx.now());
                        ctx.poke();
                    }
                    None => {
                        tracing::debug!("flow {id}: UDP receive failed: {e}");
                        return;
                    }
                },
            }
        }
    }
}

/// Forwards one query of the command to the host's resolvers, in order, and hands the
/// first answer back (over TCP when the UDP answer was truncated).
async fn dns_query(ctx: Rc<Ctx>, id: FlowId, query: Vec<u8>) {
    let Some(qid) = dns::message_id(&query) else { return };
    for &server in &ctx.cfg.upstream_dns {
        let answer = match udp_exchange(server, &query, qid, ctx.cfg.dns_timeout).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("DNS relay: {server} did not answer: {e}");
                continue;
            }
        };
        let answer = if dns::is_truncated(&answer) {
            tcp_exchange(server, &query, ctx.cfg.dns_timeout).await.unwrap_or(answer)
        } else {
            answer
        };
        ctx.engine.borrow_mut().udp_reply(id, &answer, ctx.now());
        ctx.poke();
        return;
    }
    tracing::warn!("DNS relay: no resolver of {:?} answered", ctx.cfg.upstream_dns);
    // Tell the command at once instead of letting it wait for its own timeouts.
    if let Some(fail) = dns::servfail_for(&query) {
        ctx.engine.borrow_mut().udp_reply(id, &fail, ctx.now());
        ctx.poke();
    }
}

async fn udp_exchange(
    server: SocketAddr,
    query: &[u8],
    qid: u16,
    timeout: StdDuration,
) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(SocketAddr::new(unspecified_like(server.ip()), 0)).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65536];
    tokio::time::timeout(timeout, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if dns::message_id(&buf[..n]) == Some(qid) {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(ErrorKind::TimedOut, "timed out"))?
}

async fn tcp_exchange(
    server: SocketAddr,
    query: &[u8],
    timeout: StdDuration,
) -> io::Result<Vec<u8>> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(server).await?;
        let len =
            u16::try_from(query.len()).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(query).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    })
    .await
    .map_err(|_| io::Error::new(ErrorKind::TimedOut, "timed out"))?
}

/// Sends one echo request of ICMP flow `id` through an unprivileged ICMP socket
/// (`SOCK_DGRAM`, `IPPROTO_ICMP`; icmp(7) "ping sockets"). The kernel picks the identifier;
/// the engine puts the command's back in the reply.
fn ping(ctx: &Rc<Ctx>, id: FlowId, remote: IpAddr, seq: u16, hops: u8, payload: &[u8]) {
    if ctx.ping_unavailable.get() {
        return;
    }
    let existing = ctx.pings.borrow().get(&id).map(|p| p.sock.clone());
    let sock = match existing {
        Some(s) => s,
        None => match open_ping_socket(remote) {
            Ok(sock) => {
                let sock = Rc::new(sock);
                let task = tokio::task::spawn_local(ping_receive(ctx.clone(), id, sock.clone()));
                let task = task.abort_handle();
                let session = PingSession { sock: sock.clone(), task, hops: Cell::new(0) };
                ctx.pings.borrow_mut().insert(id, session);
                sock
            }
            Err(e) => {
                ctx.ping_unavailable.set(true);
                let gid = nix::unistd::Gid::current();
                tracing::warn!(
                    "ping from the command will get no replies: this host does not allow \
                     unprivileged ICMP sockets ({e}); allow them with \
                     `sudo sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"` (your gid is {gid})"
                );
                return;
            }
        },
    };
    if let Some(p) = ctx.pings.borrow().get(&id)
        && p.hops.get() != hops
    {
        p.hops.set(hops);
        if let Err(e) = recverr::set_hop_limit(sock.as_fd(), remote.is_ipv6(), hops) {
            tracing::debug!("flow {id}: cannot set the hop limit to {hops}: {e}");
        }
    }
    let mut msg = Vec::with_capacity(8 + payload.len());
    msg.push(if remote.is_ipv4() { 8 } else { 128 });
    msg.extend_from_slice(&[0, 0, 0, 0, 0]);
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    let _ = send_now(&sock, &msg);
}

/// Sends a datagram with one `send(2)`, without waiting. Not `try_send`: tokio only tries
/// once the reactor has seen the socket writable, so a fresh socket's first datagram would
/// be dropped.
fn send_now(sock: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(sock).send(data)
}

fn open_ping_socket(remote: IpAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto) = match remote {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(proto))?;
    // Errors for our echo requests (time exceeded: `traceroute -I`, `ping -t`) with the
    // router's address; a socket without it still pings.
    if let Err(e) = recverr::enable(sock.as_fd(), remote.is_ipv6()) {
        tracing::debug!("ping socket to {remote}: no ICMP errors with their source: {e}");
    }
    sock.connect(&SocketAddr::new(remote, 0).into())?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(std::net::UdpSocket::from(sock))
}

async fn ping_receive(ctx: Rc<Ctx>, id: FlowId, sock: Rc<UdpSocket>) {
    use tokio::io::Interest;
    let mut buf = vec![0u8; 65536];
    loop {
        let ready = match sock.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) => r,
            Err(_) => return,
        };
        if ready.is_error() {
            drain_error_queue(&sock, |q| {
                // The error quotes our echo request: its sequence number is the command's.
                let Some(seq) = q.payload.get(6..8) else { return };
                let seq = u16::from_be_bytes([seq[0], seq[1]]);
                ctx.engine.borrow_mut().icmp_echo_error(id, seq, q.offender, q.error, ctx.now());
                ctx.poke();
            });
        }
        let n = match sock.try_recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            // An ICMP error for our echo: passed on from the error queue above.
            Err(e) if udp_error(&e).is_some() => continue,
            Err(_) => return,
        };
        let msg = &buf[..n];
        // Echo reply: type 0 (ICMPv4) or 129 (ICMPv6).
        if n < 8 || !matches!(msg[0], 0 | 129) {
            continue;
        }
        let seq = u16::from_be_bytes([msg[6], msg[7]]);
        ctx.engine.borrow_mut().icmp_echo_reply(id, seq, &msg[8..], ctx.now());
        ctx.poke();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiving socket on loopback and a sender connected to it.
    fn udp_pair() -> (std::net::UdpSocket, UdpSocket) {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the receiver");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind the sender");
        tx.connect(rx.local_addr().expect("receiver address")).expect("connect the sender");
        tx.set_nonblocking(true).expect("non-blocking sender");
        (rx, UdpSocket::from_std(tx).expect("register the sender"))
    }

    #[tokio::test]
    async fn a_batch_of_datagrams_leaves_in_order_with_one_call() {
        let (rx, tx) = udp_pair();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) + 1]).collect();
        assert_eq!(send_many(&tx, &payloads), payloads.len(), "sendmmsg sent every datagram");
        rx.set_read_timeout(Some(StdDuration::from_secs(5))).expect("receive timeout");
        let mut buf = [0u8; 256];
        for want in &payloads {
            let n = rx.recv(&mut buf).expect("every datagram arrives");
            assert_eq!(&buf[..n], &want[..], "datagrams keep their order and bounds");
        }
    }

    #[test]
    fn gso_runs_are_equal_sized_datagrams_and_one_shorter_last() {
        let sizes = |s: &[usize]| s.iter().map(|&n| vec![7u8; n]).collect::<Vec<_>>();
        assert_eq!(gso_run(&sizes(&[64, 64, 64])), 3);
        assert_eq!(gso_run(&sizes(&[64, 64, 10, 64])), 3, "a shorter one ends the run");
        assert_eq!(gso_run(&sizes(&[64, 100, 64])), 1, "a longer one cannot be a segment");
        assert_eq!(gso_run(&sizes(&[64, 0])), 1, "an empty datagram cannot be a segment");
        assert_eq!(gso_run(&sizes(&[0, 0])), 0);
        assert_eq!(gso_run(&sizes(&[1300, 1300])), 0, "above the safe segment size");
        assert_eq!(gso_run(&sizes(&[1200; 64])), 54, "within one 64 KiB send");
    }

    #[tokio::test]
    async fn a_gso_send_arrives_as_the_separate_datagrams() {
        let (rx, tx) = udp_pair();
        let mut payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 100]).collect();
        payloads.push(vec![99; 30]);
        send_gso(&tx, &payloads).expect("the kernel takes a UDP GSO send");
        rx.set_read_timeout(Some(StdDuration::from_secs(5))).expect("receive timeout");
        let mut buf = [0u8; 4096];
        for want in &payloads {
            let n = rx.recv(&mut buf).expect("every datagram arrives");
            assert_eq!(&buf[..n], &want[..], "the datagrams keep their order and bounds");
        }
    }

    #[tokio::test]
    async fn connect_reports_success_and_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
        let open = listener.local_addr().expect("listener address");
        let stream = connect(open).await.expect("a listening port accepts");
        assert_eq!(stream.peer_addr().expect("peer address"), open);
        drop(listener);
        let err = connect(open).await.expect_err("a closed port refuses");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    }
}
