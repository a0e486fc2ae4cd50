//! `xtask bench-probe`: the small server and clients behind the latency, connect and
//! concurrency rows of `cargo xtask bench rootless`. The bench runs the server in its
//! destination namespace and each client under every contender (host, childflow, pasta,
//! slirp4netns), so all of them measure the same thing the same way.
//!
//! - `server ADDR`: echo on port [`ECHO_PORT`]; on [`HOLD_PORT`] accepts and keeps each
//!   connection until its peer closes it.
//! - `rr ADDR N`: N one-byte request/response round trips on one connection; prints the
//!   median in microseconds.
//! - `connect ADDR N`: N sequential TCP connects; prints the median connect time in µs.
//! - `hold ADDR N`: opens N connections, sends a few bytes on each, prints `ready`, and holds
//!   them until its stdin closes (the bench reads the contender's RSS meanwhile).
//! - `many ADDR N`: N connects in flight at once; prints `ok K` with K the number that
//!   succeeded within 60 s.
//!
//! - `flood ADDR SECONDS LEN PPS`: UDP datagrams of LEN bytes to [`FLOOD_PORT`] at PPS
//!   packets/s (0: as fast as it can), in `sendmmsg` batches; prints `sent N`.
//! - `rawflood ADDR SECONDS LEN PPS [THREADS]`: the same datagrams (IPv4), built here and
//!   sent through a packet socket on the route's interface to its next hop, past the qdisc
//!   (`PACKET_QDISC_BYPASS`): the sender's own UDP/IP output path, which alone capped
//!   `flood` at 130-160k packets/s on the 2-vCPU VM, drops out. THREADS (default 1)
//!   senders share PPS, each with a socket of its own: the receive path of every packet
//!   (and with `--root` the programs' capture) runs inline on its sender's CPU, so one
//!   sender tops out below 250k/s. Needs `CAP_NET_RAW` in its network namespace.
//! - `sink ADDR SECONDS`: counts the datagrams arriving on [`FLOOD_PORT`] (`recvmmsg`) until
//!   SECONDS have passed and the port has been quiet for half a second; prints `received N`.
//!
//! The clients take the hold port as an optional last argument (default [`HOLD_PORT`]).

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub const ECHO_PORT: u16 = 7001;
pub const HOLD_PORT: u16 = 7002;
/// The UDP port of `flood` and `sink` (the rootful bench's packet-rate rows).
pub const FLOOD_PORT: u16 = 7003;
/// Datagrams per `sendmmsg`/`recvmmsg` call.
const BATCH: usize = 64;
/// The hold server listens on this many ports from [`HOLD_PORT`]: each contender connects to
/// a port of its own, so the TIME-WAIT connections one leaves on the host (same 4-tuples)
/// do not slow down the kernel's port search for the next.
pub const HOLD_PORTS: u16 = 8;

/// Raises the soft open-files limit to the hard one (10,000 sockets need more than 1,024).
fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn run(args: &[String]) -> Result<()> {
    let (Some(cmd), Some(addr)) = (args.first(), args.get(1)) else {
        bail!("usage: xtask bench-probe server|rr|connect|hold|many ADDR [N]");
    };
    let ip: std::net::IpAddr = addr.parse().context("ADDR")?;
    let n: usize = args.get(2).map(|s| s.parse()).transpose().context("N")?.unwrap_or(1000);
    raise_nofile();
    let echo = SocketAddr::new(ip, ECHO_PORT);
    let port: u16 =
        args.get(3).map(|s| s.parse()).transpose().context("PORT")?.unwrap_or(HOLD_PORT);
    let hold = SocketAddr::new(ip, port);
    match cmd.as_str() {
        "server" => server(echo, ip),
        "rr" => {
            let mut s = TcpStream::connect(echo).context("connect to the echo port")?;
            s.set_nodelay(true)?;
            let mut times = Vec::with_capacity(n);
            let mut b = [0u8; 1];
            for i in 0..n + 100 {
                let t = Instant::now();
                s.write_all(b"x")?;
                s.read_exact(&mut b)?;
                if i >= 100 {
                    times.push(t.elapsed());
                }
            }
            println!("{}", median(times).as_secs_f64() * 1e6);
            Ok(())
        }
        "connect" => {
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let s = TcpStream::connect(hold).context("connect to the hold port")?;
                times.push(t.elapsed());
                drop(s);
            }
            println!("{}", median(times).as_secs_f64() * 1e6);
            Ok(())
        }
        "hold" => {
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                let mut s = TcpStream::connect(hold)
                    .with_context(|| format!("connection {i} of {n} failed"))?;
                s.write_all(&[0u8; 100])?;
                held.push(s);
            }
            println!("ready");
            std::io::stdout().flush()?;
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            Ok(())
        }
        "many" => many(hold, n),
        kind @ ("flood" | "rawflood") => {
            let arg = |i: usize, what: &str| -> Result<u64> {
                args.get(i).with_context(|| format!("{kind} needs {what}"))?.parse().context("N")
            };
            let (time, len, pps) =
                (Duration::from_secs(arg(2, "SECONDS")?), arg(3, "LEN")? as usize, arg(4, "PPS")?);
            let sent = match (kind, ip) {
                ("flood", _) => flood(SocketAddr::new(ip, FLOOD_PORT), time, len, pps)?,
                (_, std::net::IpAddr::V4(ip)) => {
                    let threads = args.get(5).map_or(Ok(1), |t| t.parse()).context("THREADS")?;
                    raw_flood_parallel(
                        std::net::SocketAddrV4::new(ip, FLOOD_PORT),
                        time,
                        len,
                        pps,
                        threads,
                    )?
                }
                _ => bail!("rawflood sends IPv4 only"),
            };
            println!("sent {sent}");
            Ok(())
        }
        "sink" => {
            let received = sink(SocketAddr::new(ip, FLOOD_PORT), Duration::from_secs(n as u64))?;
            println!("received {received}");
            Ok(())
        }
        other => bail!("unknown probe {other}"),
    }
}

/// Starts `n` non-blocking connects at once and waits for all of them.
fn many(to: SocketAddr, n: usize) -> Result<()> {
    use socket_fd::{nonblocking_connect, so_error};
    let mut socks = Vec::with_capacity(n);
    for _ in 0..n {
        socks.push(nonblocking_connect(to)?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: Vec<usize> = (0..n).collect();
    let mut ok = 0;
    while !pending.is_empty() && Instant::now() < deadline {
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|&i| libc::pollfd { fd: socks[i].as_raw_fd(), events: libc::POLLOUT, revents: 0 })
            .collect();
        // SAFETY: poll(2) on a slice of pollfds we own.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if r < 0 {
            bail!("poll: {}", std::io::Error::last_os_error());
        }
        let mut still = Vec::new();
        for (fd, &i) in fds.iter().zip(&pending) {
            if fd.revents == 0 {
                still.push(i);
            } else if so_error(&socks[i]) == 0 {
                ok += 1;
            }
        }
        pending = still;
    }
    println!("ok {ok}");
    Ok(())
}

mod socket_fd {
    use std::{
        net::SocketAddr,
        os::fd::{AsRawFd, FromRawFd, OwnedFd},
    };

    pub fn nonblocking_connect(to: SocketAddr) -> anyhow::Result<OwnedFd> {
        let SocketAddr::V4(v4) = to else { anyhow::bail!("IPv4 only") };
        // SAFETY: socket(2)/connect(2) with a sockaddr_in built here.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            if fd < 0 {
                anyhow::bail!("socket: {}", std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
                anyhow::bail!("connect: {}", std::io::Error::last_os_error());
            }
            Ok(fd)
        }
    }

    pub fn so_error(fd: &OwnedFd) -> i32 {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a local int.
        unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            );
        }
        err
    }
}

fn server(echo: SocketAddr, ip: std::net::IpAddr) -> Result<()> {
    let echo = TcpListener::bind(echo).context("bind the echo port")?;
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    // Accepting never waits for anything else; a reaper drops connections their peers
    // closed, once a second (a poll over every held socket is too slow per accept).
    let held: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>> = Default::default();
    let reaped = held.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let mut held = reaped.lock().expect("held sockets");
            let mut fds: Vec<libc::pollfd> = held
                .iter()
                .map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: poll(2) on a vector of pollfds we own; no waiting.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
            let mut keep = fds.iter().map(|fd| fd.revents == 0).collect::<Vec<_>>();
            for (i, k) in keep.iter_mut().enumerate() {
                if !*k {
                    *k = match held[i].read(&mut buf) {
                        Ok(n) => n > 0,
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    };
                }
            }
            let mut it = keep.into_iter();
            held.retain(|_| it.next().unwrap_or(true));
        }
    });
    let mut accepters = Vec::new();
    for port in HOLD_PORT..HOLD_PORT + HOLD_PORTS {
        let hold = listen_backlog(SocketAddr::new(ip, port), 16384)?;
        let held = held.clone();
        accepters.push(std::thread::spawn(move || {
            for s in hold.incoming().flatten() {
                let _ = s.set_nonblocking(true);
                held.lock().expect("held sockets").push(s);
            }
        }));
    }
    for a in accepters {
        let _ = a.join();
    }
    Ok(())
}

fn listen_backlog(addr: SocketAddr, backlog: i32) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).context("bind the hold port")?;
    // SAFETY: listen(2) again on a bound listening socket only changes its backlog.
    unsafe { libc::listen(l.as_raw_fd(), backlog) };
    Ok(l)
}

/// One `sendmmsg(2)`/`recvmmsg(2)` header per buffer of `iov`, without names or control
/// data. The headers point into `iov`, which must outlive their use.
fn mmsg_headers(iov: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .map(|v| {
            // SAFETY: mmsghdr is plain data; the zeroed fields mean "no name, no control data".
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

/// Sends `len`-byte datagrams to `to` for `time` at `pps` packets/s (0: unpaced), in
/// batches of [`BATCH`] per `sendmmsg(2)`; returns how many the kernel accepted.
fn flood(to: SocketAddr, time: Duration, len: usize, pps: u64) -> Result<u64> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = std::net::UdpSocket::bind(bind).context("bind the flood socket")?;
    sock.connect(to).context("connect the flood socket")?;
    let payload = vec![0x5au8; len];
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: len })
        .collect();
    let mut msgs = mmsg_headers(&mut iov);
    // SAFETY: `msgs` holds BATCH valid headers pointing at `iov` and `payload`, which
    // outlive the sends.
    Ok(unsafe { send_paced(sock.as_raw_fd(), &mut msgs, time, pps) })
}

/// Sends the batch `msgs` over and over with `sendmmsg(2)` for `time`, at `pps` packets/s
/// (0: unpaced); returns how many the kernel accepted.
///
/// # Safety
/// Every header in `msgs` must point at buffers (and names) that live until this returns.
unsafe fn send_paced(fd: i32, msgs: &mut [libc::mmsghdr], time: Duration, pps: u64) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < time {
        if pps > 0 {
            // Pace per batch: wait until this batch is due.
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // SAFETY: by the caller's promise the headers and what they point at are valid.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n > 0 {
            sent += n as u64;
        } else {
            // A full queue (ENOBUFS) or an ICMP error from a previous datagram: go on.
            std::thread::yield_now();
        }
    }
    sent
}

/// The interface and next hop towards `to`, from `/proc/net/route` (longest prefix).
fn route_to(to: std::net::Ipv4Addr) -> Result<(String, std::net::Ipv4Addr)> {
    let table = std::fs::read_to_string("/proc/net/route").context("read /proc/net/route")?;
    let hex = |s: &str| {
        u32::from_str_radix(s, 16).ok().map(|v| std::net::Ipv4Addr::from(v.to_le_bytes()))
    };
    let mut best: Option<(u32, String, std::net::Ipv4Addr)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dst), Some(gw), Some(mask)) = (
            f.get(1).and_then(|s| hex(s)),
            f.get(2).and_then(|s| hex(s)),
            f.get(7).and_then(|s| hex(s)),
        ) else {
            continue;
        };
        let (m, d) = (u32::from(mask), u32::from(dst));
        if u32::from(to) & m == d && best.as_ref().is_none_or(|b| m.count_ones() > b.0) {
            let hop = if gw.is_unspecified() { to } else { gw };
            best = Some((m.count_ones(), f[0].to_owned(), hop));
        }
    }
    best.map(|(_, i, h)| (i, h)).with_context(|| format!("no route to {to}"))
}

/// The MAC address of `hop` in the neighbour table, after one datagram through the
/// kernel's own path made it resolve it.
fn neighbour_mac(hop: std::net::Ipv4Addr, to: std::net::SocketAddrV4) -> Result<[u8; 6]> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("bind the priming socket")?;
    let _ = sock.send_to(b"x", to);
    for _ in 0..100 {
        let arp = std::fs::read_to_string("/proc/net/arp").context("read /proc/net/arp")?;
        for line in arp.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() == Some(&hop.to_string().as_str()) && f.get(2) == Some(&"0x2") {
                let mut mac = [0u8; 6];
                for (b, part) in mac.iter_mut().zip(f[3].split(':')) {
                    *b = u8::from_str_radix(part, 16)?;
                }
                return Ok(mac);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{hop} did not resolve (no neighbour entry)")
}

/// `rawflood` from `threads` threads at once, each sending its share of `pps` (0: each as
/// fast as it can) through a packet socket of its own; returns how many the kernel accepted
/// in all. One thread, whose every packet goes through the veth, the host's routing and
/// the rootful programs inline (one softirq on the sender's CPU), offered 230-240k/s here.
fn raw_flood_parallel(
    to: std::net::SocketAddrV4,
    time: Duration,
    len: usize,
    pps: u64,
    threads: u64,
) -> Result<u64> {
    if threads == 0 {
        bail!("rawflood needs at least one thread");
    }
    let share = pps.div_ceil(threads);
    std::thread::scope(|scope| {
        let senders: Vec<_> =
            (0..threads).map(|_| scope.spawn(move || raw_flood(to, time, len, share))).collect();
        senders.into_iter().map(|t| t.join().unwrap_or_else(|_| bail!("sender panicked"))).sum()
    })
}

/// `rawflood` (see the module documentation): `len`-byte UDP payloads to `to`, in IPv4
/// packets built here, through a packet socket; returns how many the kernel accepted.
fn raw_flood(to: std::net::SocketAddrV4, time: Duration, len: usize, pps: u64) -> Result<u64> {
    let (iface, hop) = route_to(*to.ip())?;
    let mac = neighbour_mac(hop, to)?;
    // The source address the kernel would use, from a connected UDP socket.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(to)?;
    let std::net::SocketAddr::V4(from) = probe.local_addr()? else { bail!("not IPv4") };
    let name = std::ffi::CString::new(iface.as_str())?;
    // SAFETY: if_nametoindex(3) reads the NUL-terminated name, which outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}");
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, (libc::ETH_P_IP as u16).to_be() as i32)
    };
    if fd < 0 {
        bail!("packet socket: {} (needs CAP_NET_RAW)", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_int_option(sock.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
    // IPv4 header (no options, DF, TTL 64, UDP) and UDP header (checksum 0: none, RFC 768).
    let total = 20 + 8 + len;
    let mut pkt = vec![0x5au8; total];
    pkt[..20]
        .copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    pkt[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    pkt[12..16].copy_from_slice(&from.ip().octets());
    pkt[16..20].copy_from_slice(&to.ip().octets());
    let sum = pkt[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    pkt[10..12].copy_from_slice(&sum.to_be_bytes());
    pkt[20..22].copy_from_slice(&from.port().to_be_bytes());
    pkt[22..24].copy_from_slice(&to.port().to_be_bytes());
    pkt[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    pkt[26..28].copy_from_slice(&[0, 0]);
    // SAFETY: sockaddr_ll is plain data; zeroed then filled.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&mac);
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec { iov_base: pkt.as_ptr() as *mut _, iov_len: total })
        .collect();
    let mut msgs = mmsg_headers(&mut iov);
    for m in &mut msgs {
        m.msg_hdr.msg_name = (&raw mut addr).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    }
    // SAFETY: `msgs` holds BATCH valid headers pointing at `iov`, `pkt` and `addr`, which
    // outlive the sends.
    Ok(unsafe { send_paced(sock.as_raw_fd(), &mut msgs, time, pps) })
}

/// `setsockopt(2)` of an `int` option; failure is ignored (the probe works without it).
fn set_int_option(fd: i32, level: i32, name: i32, value: libc::c_int) {
    // SAFETY: setsockopt(2) with a pointer to a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Counts datagrams arriving at `addr` until `time` has passed and none came for 500 ms.
fn sink(addr: SocketAddr, time: Duration) -> Result<u64> {
    let sock = std::net::UdpSocket::bind(addr).context("bind the sink port")?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    set_int_option(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
        .collect();
    let mut msgs = mmsg_headers(&mut iov);
    let start = Instant::now();
    let mut received = 0u64;
    loop {
        // SAFETY: `msgs` holds BATCH valid headers pointing at `bufs`, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received += n as u64;
        } else if start.elapsed() >= time {
            // Timed out with nothing arriving, after the run's time: done.
            break;
        }
    }
    Ok(received)
}
