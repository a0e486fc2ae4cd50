//! The engine's I/O: the tap device and the host sockets, on one thread.
//!
//! One single-threaded tokio runtime with a `LocalSet` runs:
//! - the main loop: reads batches of frames from the tap into [`Engine::ingest`], calls
//!   [`Engine::poll`], writes [`Engine::pop_out`] frames to the tap, and starts the work of
//!   each [`Action`];
//! - one task per TCP flow: connects upstream (with a timeout), tells the engine, then relays
//!   bytes directly between the host socket and the smoltcp socket's buffers (no
//!   intermediate copy), woken by tokio readiness and smoltcp's socket wakers;
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
        });
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
    relay_frames(ctx, &tap, stop).await
}

async fn relay_frames(
    ctx: &Rc<Ctx>,
    tap: &AsyncFd<OwnedFd>,
    mut stop: oneshot::Receiver<()>,
) -> io::Result<()> {
    let fd = tap.as_raw_fd();
    loop {
        let deadline = {
            let mut engine = ctx.engine.borrow_mut();
            let now = ctx.now();
            engine.poll(now);
            if !flush(&mut engine, fd) {
                return Ok(());
            }
            let at = engine.poll_at(ctx.now());
            ctx.to_tokio(at)
        };
        run_actions(ctx);
        // Frames before the stop: the command's last packets (the FIN of a socket it closed
        // as it exited) are still queued on the tap when its exit is noticed.
        tokio::select! {
            biased;
            ready = tap.readable() => {
                let mut guard = ready?;
                let mut engine = ctx.engine.borrow_mut();
                for _ in 0..READ_BATCH {
                    let mut buf = engine.take_buffer();
                    let cap = buf.capacity();
                    // SAFETY: read(2) into the buffer's spare capacity; the length is set
                    // to what the kernel wrote.
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
                        // The namespace (and with it tap0) is gone: the command ended.
                        tracing::debug!("tap read failed: {e}");
                        return Ok(());
                    }
                    // SAFETY: the kernel initialized n bytes.
                    unsafe { buf.set_len(n as usize) };
                    engine.ingest(buf, ctx.now());
                }
            }
            _ = &mut stop => {
                // The reactor may not have seen the tap's last frames yet: read what is
                // queued now, so the command's closing packets are still accounted.
                drain_tap(ctx, fd);
                return Ok(());
            }
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
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
fn flush(engine: &mut Engine, fd: i32) -> bool {
    while let Some(frame) = engine.pop_out() {
        // SAFETY: write(2) from an initialized buffer.
        let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
        engine.recycle(frame);
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

fn run_actions(ctx: &Rc<Ctx>) {
    loop {
        let Some(action) = ctx.engine.borrow_mut().pop_action() else { return };
        match action {
            Action::TcpConnect { id, target } => {
                tokio::task::spawn_local(tcp_flow(ctx.clone(), id, target));
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
}

fn classify(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        ErrorKind::PermissionDenied => ConnectFailure::Prohibited,
        _ => ConnectFailure::Unreachable,
    }
}

async fn tcp_flow(ctx: Rc<Ctx>, id: FlowId, target: Target) {
    let candidates = match target {
        Target::Direct(addr) => vec![addr],
        Target::DnsRelay => ctx.cfg.upstream_dns.clone(),
    };
    let mut failure = ConnectFailure::Unreachable;
    let mut stream = None;
    let hops = ctx.tcp_hops.borrow_mut().remove(&id);
    let mut icmp = None;
    for addr in candidates {
        let connect = async {
            match hops {
                Some(hops) => connect_with_hop_limit(addr, hops, &mut icmp).await,
                None => TcpStream::connect(addr).await,
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
    ctx.engine.borrow_mut().tcp_connected(id, ctx.now());
    ctx.poke();
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
                while dns_buf.len() >= 2 {
                    let len = usize::from(u16::from_be_bytes([dns_buf[0], dns_buf[1]]));
                    if dns_buf.len() < 2 + len {
                        break;
                    }
                    answers.push(dns_buf[2..2 + len].to_vec());
                    dns_buf.drain(..2 + len);
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
