//! Which process of the command tree opened each flow, found the way `ss -p` and bandwhich
//! do it: the flow's command-side address names a socket in the command's network namespace,
//! the socket's inode names the process holding it (`/proc/<pid>/fd/* -> socket:[inode]`),
//! and `/proc/<pid>` tells its comm, uid, exe and command line.
//!
//! The socket is found with one sock_diag request for exactly that address pair
//! (sock_diag(7), `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`: a hash lookup in the kernel),
//! over a netlink socket the sandbox's init opened in the command's namespace and passed
//! out. `/proc/<init>/net/{tcp,udp}{,6}` would do too, but the kernel walks its whole
//! connection hash table for each read (4–8 ms each here), long enough for a quick `curl`
//! to be gone; it remains the fallback, and the only way for ping sockets
//! (`/proc/<init>/net/icmp{,6}`, a small table), which sock_diag does not cover. The
//! rootful backend learns the same from eBPF; both emit [`ProcessEvent`]s, so the flow table, logs, TUI and pcapng comments do not know which ran.
//!
//! Runs on a thread of its own, fed the key of every new flow by the engine at the flow's
//! first packet (for TCP the SYN, while the command is still blocked in connect(2), not the
//! flow's report after the upstream connect), so a slow `/proc` walk never stalls a packet. A TCP flow's bytes are relayed only once
//! its lookup is over (at most 20 ms), so a command waiting for an answer still holds the
//! socket when it is looked up, however late the lookup thread gets a CPU. What it learns is cached (socket inode → pid, pid →
//! process) and kept after the process exits. When the socket or the process is already
//! gone by the time of the lookup (a command that sends one datagram and exits at once), the
//! flow gets no process: nothing is guessed.
//!
//! The processes looked at are the descendants of the sandbox's init, found through
//! `/proc/<pid>/task/<tid>/children` (proc(5)): a handful of reads for a command tree, where
//! a walk of all of `/proc` takes long enough on a busy host for a short-lived `curl` to be
//! gone before its turn. Orphans are re-parented to init (pid 1 of the namespace), so the
//! walk still finds them.
//!
//! Invariants: `pid` is the host's view of the pid (this runs in childflow, outside the
//! command's pid namespace). No function here panics on the content of `/proc`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::PathBuf,
    thread::JoinHandle,
};

use childflow_common::flow::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crossbeam_channel::{Receiver, Sender};

use crate::event::{Emitter, Event, FlowKey, ProcessEvent, ProcessInfo};

/// A new flow to find the process of, and whom to tell when the lookup is over.
#[derive(Debug)]
pub struct Lookup {
    pub key: FlowKey,
    /// Completed (or dropped) once the lookup is over, found or not: a TCP flow's bytes are
    /// relayed only then (bounded), so a command waiting for an answer still has its
    /// socket open while it is looked up.
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the attribution thread for the command tree whose pid namespace `init` (a host
/// pid) leads. Returns the sender the engine gives each new flow's key to, and the thread,
/// which ends once every sender is dropped and its queue is done.
///
/// `diag` is a `NETLINK_SOCK_DIAG` socket opened in the command's network namespace.
pub fn spawn(
    init: u32,
    diag: Option<OwnedFd>,
    events: Emitter,
) -> std::io::Result<(Sender<Lookup>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let thread = std::thread::Builder::new().name("attribution".into()).spawn(move || {
        crate::event::yield_to_the_command();
        let mut procfs = Procfs::new(PathBuf::from("/proc"), init);
        procfs.diag = diag;
        run(procfs, &rx, &events)
    })?;
    Ok((tx, thread))
}

fn run(mut procfs: Procfs, rx: &Receiver<Lookup>, events: &Emitter) {
    let mut unknown = 0u64;
    for Lookup { key, done } in rx {
        let found = procfs.process_of(&key);
        // The flow table takes a process event before or after its flow, so the waiting
        // relay may start now, before the event is sent.
        if let Some(done) = done {
            let _ = done.send(());
        }
        match found {
            Some(process) => {
                if !events.emit(Event::Process(ProcessEvent { key, process })) {
                    return;
                }
            }
            None => unknown += 1,
        }
    }
    if unknown > 0 {
        tracing::debug!("{unknown} flows without a process (their socket or process was gone)");
    }
}

/// One socket of `/proc/net/*`: its addresses and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketEntry {
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
}

/// The procfs view of one command tree, with what it has learned so far.
struct Procfs {
    root: PathBuf,
    init: u32,
    /// A sock_diag socket in the command's network namespace.
    diag: Option<OwnedFd>,
    /// Socket inode → pid, from the fd scans so far.
    inodes: HashMap<u64, u32>,
    /// Where the latest sockets were found (pid, fd), newest last: a command that opens
    /// one connection after another usually gets the same fd number for each (the lowest
    /// free one), so one readlink(2) there replaces the walk of the tree and all its fds.
    recent: Vec<(u32, u32)>,
    /// Everything read about each process, kept after it exits.
    processes: HashMap<u32, ProcessInfo>,
}

impl Procfs {
    fn new(root: PathBuf, init: u32) -> Procfs {
        Procfs {
            root,
            init,
            diag: None,
            inodes: HashMap::new(),
            recent: Vec::new(),
            processes: HashMap::new(),
        }
    }

    /// The process holding the command-side socket of flow `key`, if it can still be told.
    fn process_of(&mut self, key: &FlowKey) -> Option<ProcessInfo> {
        let Some(inode) = self.socket_inode(key) else {
            tracing::debug!("{key}: no socket of the command has this address");
            return None;
        };
        let pid = match self.inodes.get(&inode).copied().or_else(|| self.recent_holder(inode)) {
            Some(pid) => pid,
            None => {
                self.scan_fds();
                let Some(&pid) = self.inodes.get(&inode) else {
                    tracing::debug!(
                        "{key}: no process of the command holds socket {inode} (tree {:?})",
                        self.tree()
                    );
                    return None;
                };
                pid
            }
        };
        // Read afresh: the pid may have exec'd since it was cached (a shell's fork runs
        // `curl`); what was read before stands in once it is gone.
        match read_process(&self.root, pid) {
            Some(info) => {
                self.processes.insert(pid, info.clone());
                Some(info)
            }
            None => self.processes.get(&pid).cloned(),
        }
    }

    /// The inode of the command's socket for `key`.
    fn socket_inode(&self, key: &FlowKey) -> Option<u64> {
        if let Some(diag) = &self.diag
            && (key.proto == PROTO_TCP || key.proto == PROTO_UDP)
        {
            match sock_diag_inode(diag.as_fd(), key) {
                Ok(found) => return found,
                Err(e) => tracing::debug!("{key}: sock_diag failed ({e}); reading /proc"),
            }
        }
        self.socket_inode_from_tables(key)
    }

    /// The inode of the command's socket for `key`, from the namespace's socket tables.
    fn socket_inode_from_tables(&self, key: &FlowKey) -> Option<u64> {
        let v4 = key.local_ip().is_ipv4();
        let table = match key.proto {
            PROTO_TCP => "tcp",
            PROTO_UDP => "udp",
            PROTO_ICMP | PROTO_ICMPV6 => "icmp",
            _ => return None,
        };
        // An IPv4 flow may come from an AF_INET6 socket (v4-mapped), so `*6` is read too.
        let files: &[&str] = if v4 { &["", "6"] } else { &["6"] };
        let mut best: Option<(u8, u64)> = None;
        for suffix in files {
            let path = self.root.join(format!("{}/net/{table}{suffix}", self.init));
            let Ok(text) = fs::read_to_string(path) else { continue };
            for entry in text.lines().skip(1).filter_map(parse_socket_line) {
                if let Some(score) = matches(key, &entry)
                    && entry.inode != 0
                    && best.is_none_or(|(s, _)| score > s)
                {
                    best = Some((score, entry.inode));
                }
            }
        }
        best.map(|(_, inode)| inode)
    }

    /// The pid holding socket `inode` at one of the [`Procfs::recent`] places, if any.
    fn recent_holder(&mut self, inode: u64) -> Option<u32> {
        let at = self.recent.iter().rposition(|&(pid, fd)| {
            fs::read_link(self.root.join(format!("{pid}/fd/{fd}")))
                .is_ok_and(|t| socket_inode_of_link(&t.to_string_lossy()) == Some(inode))
        })?;
        let (pid, fd) = self.recent.remove(at);
        self.found(inode, pid, fd);
        Some(pid)
    }

    /// Records that `pid` holds socket `inode` as `fd`.
    fn found(&mut self, inode: u64, pid: u32, fd: u32) {
        self.inodes.insert(inode, pid);
        self.recent.retain(|&place| place != (pid, fd));
        if self.recent.len() == RECENT {
            self.recent.remove(0);
        }
        self.recent.push((pid, fd));
    }

    /// Walks the fds of every process of the command tree, refreshing the inode → pid cache.
    fn scan_fds(&mut self) {
        for pid in self.tree() {
            let Ok(fds) = fs::read_dir(self.root.join(format!("{pid}/fd"))) else { continue };
            for fd in fds.flatten() {
                if let Ok(target) = fs::read_link(fd.path())
                    && let Some(inode) = socket_inode_of_link(&target.to_string_lossy())
                    && !self.inodes.contains_key(&inode)
                {
                    match fd.file_name().to_str().and_then(|n| n.parse().ok()) {
                        Some(fd) => self.found(inode, pid, fd),
                        None => {
                            self.inodes.insert(inode, pid);
                        }
                    }
                }
            }
        }
    }

    /// The live descendants of init (not init itself: childflow's own code, no sockets of
    /// the command).
    fn tree(&self) -> Vec<u32> {
        let mut found = Vec::new();
        let mut queue = vec![self.init];
        let mut seen = HashSet::new();
        while let Some(pid) = queue.pop() {
            let Ok(tasks) = fs::read_dir(self.root.join(format!("{pid}/task"))) else { continue };
            for task in tasks.flatten() {
                let Ok(children) = fs::read_to_string(task.path().join("children")) else {
                    continue;
                };
                for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                    if seen.insert(child) {
                        found.push(child);
                        queue.push(child);
                    }
                }
            }
        }
        found
    }
}

/// How many recent socket places [`Procfs::recent`] remembers.
const RECENT: usize = 8;

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE` (linux/inet_diag.h): match any socket.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// `sizeof(struct nlmsghdr)` + `sizeof(struct inet_diag_req_v2)`.
const DIAG_REQUEST_LEN: usize = 16 + 56;
/// Offset of `idiag_inode` in `struct inet_diag_msg` (family, state, timer, retrans, the
/// 48-byte `inet_diag_sockid`, expires, rqueue, wqueue, uid, then inode).
const DIAG_MSG_INODE: usize = 4 + 48 + 16;

/// Asks the kernel for the socket of `key` (sock_diag(7), one exact lookup). `Ok(None)`
/// when there is none. Tries the flow's own family, then (IPv4 flows) an `AF_INET6`
/// socket with v4-mapped addresses. TCP takes the pair as (local, remote); UDP as
/// (remote, local): `udp_dump_one` (net/ipv4/udp_diag.c) looks the socket up the way an
/// arriving datagram would, with the pair "swapped for historical reasons".
fn sock_diag_inode(diag: BorrowedFd, key: &FlowKey) -> std::io::Result<Option<u64>> {
    let (local, remote) = (key.local(), key.remote());
    let mut pairs = vec![(local, remote)];
    if let (IpAddr::V4(l), IpAddr::V4(r)) = (local.ip(), remote.ip()) {
        let mapped = |a: Ipv4Addr, port| SocketAddr::new(IpAddr::V6(a.to_ipv6_mapped()), port);
        pairs.push((mapped(l, local.port()), mapped(r, remote.port())));
    }
    for (l, r) in pairs {
        let (src, dst) = if key.proto == PROTO_UDP { (r, l) } else { (l, r) };
        if let Some(inode) = sock_diag_one(diag, key.proto, src, dst)? {
            return Ok(Some(inode));
        }
    }
    Ok(None)
}

/// One `SOCK_DIAG_BY_FAMILY` request for the socket `src` → `dst` of `proto`.
fn sock_diag_one(
    diag: BorrowedFd,
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
) -> std::io::Result<Option<u64>> {
    let mut req = [0u8; DIAG_REQUEST_LEN];
    req[0..4].copy_from_slice(&(DIAG_REQUEST_LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    let r = &mut req[16..];
    r[0] = if src.is_ipv4() { libc::AF_INET as u8 } else { libc::AF_INET6 as u8 };
    r[1] = proto;
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every TCP state
    let id = &mut r[8..];
    id[0..2].copy_from_slice(&src.port().to_be_bytes());
    id[2..4].copy_from_slice(&dst.port().to_be_bytes());
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => [&a.octets()[..], &[0; 12]].concat(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    id[4..20].copy_from_slice(&octets(src.ip()));
    id[20..36].copy_from_slice(&octets(dst.ip()));
    id[40..48].copy_from_slice(&NO_COOKIE);
    // SAFETY: send(2) on a netlink socket we own, from a buffer that outlives the call.
    let sent = unsafe { libc::send(diag.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = [0u64; 128];
    // SAFETY: recv(2) into a 1,024-byte buffer that outlives the call.
    let n = unsafe { libc::recv(diag.as_raw_fd(), buf.as_mut_ptr().cast(), 1024, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote n bytes into `buf`, which is 1,024 bytes long.
    let reply = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
    Ok(parse_diag_reply(reply))
}

/// The socket inode in a sock_diag reply; `None` for an error reply (`ENOENT`: no such
/// socket) or anything malformed.
fn parse_diag_reply(reply: &[u8]) -> Option<u64> {
    let msg_type = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if msg_type != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let at = 16 + DIAG_MSG_INODE;
    let inode = u32::from_ne_bytes(reply.get(at..at + 4)?.try_into().ok()?);
    (inode != 0).then_some(u64::from(inode))
}

/// Opens a sock_diag socket in the calling thread's network namespace (the sandbox's init
/// calls it, to pass it out).
pub fn open_diag_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `socket:[12345]` → 12345.
fn socket_inode_of_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// How well socket `entry` fits flow `key` (higher is better), or `None`. A connected
/// socket names both ends; an unconnected UDP socket (or a ping socket) only its own.
fn matches(key: &FlowKey, entry: &SocketEntry) -> Option<u8> {
    let same_ip = |a: IpAddr, b: IpAddr| a == b || to_v4(a).is_some_and(|a| IpAddr::V4(a) == b);
    let is_icmp = key.proto == PROTO_ICMP || key.proto == PROTO_ICMPV6;
    if entry.local.port() != key.local_port {
        return None;
    }
    let local_ok = entry.local.ip().is_unspecified() || same_ip(entry.local.ip(), key.local_ip());
    if !local_ok {
        return None;
    }
    let remote_ip = entry.remote.ip();
    if remote_ip.is_unspecified() || to_v4(remote_ip).is_some_and(|a| a.is_unspecified()) {
        return Some(1);
    }
    let port_ok = is_icmp || entry.remote.port() == key.remote_port;
    (same_ip(remote_ip, key.remote_ip()) && port_ok).then_some(2)
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for.
fn to_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

/// One line of `/proc/net/{tcp,udp,icmp}{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode`.
fn parse_socket_line(line: &str) -> Option<SocketEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = parse_hex_addr(fields.get(1)?)?;
    let remote = parse_hex_addr(fields.get(2)?)?;
    let inode = fields.get(9)?.parse().ok()?;
    Some(SocketEntry { local, remote, inode })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6). The kernel prints each
/// 32-bit word of the address as a host-order integer (`%08X` of the raw `__be32`), so the
/// word's native-endian bytes are the address bytes; the port is host order.
fn parse_hex_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// What `/proc/<pid>` tells of a live process; `None` once it is gone.
fn read_process(root: &std::path::Path, pid: u32) -> Option<ProcessInfo> {
    let dir = root.join(pid.to_string());
    let comm = fs::read_to_string(dir.join("comm")).ok()?.trim_end_matches('\n').to_owned();
    let status = fs::read_to_string(dir.join("status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    let exe = fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let cmdline = fs::read(dir.join("cmdline")).ok().filter(|c| !c.is_empty()).map(|c| {
        c.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    });
    Some(ProcessInfo { pid, uid, comm, exe, cmdline })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8, local: &str, remote: &str) -> FlowKey {
        FlowKey::new(proto, local.parse().unwrap(), remote.parse().unwrap())
    }

    #[test]
    fn parses_proc_net_lines_of_both_families() {
        let v4 = "   0: 6402000A:9C40 0212C6C6:0050 02 00000000:00000000 01:00000064 00000000  1000 \
                  0 4242 1 0000000000000000 100 0 0 10 0";
        let e = parse_socket_line(v4).expect("a tcp line parses");
        assert_eq!(e.local, "10.0.2.100:40000".parse().unwrap());
        assert_eq!(e.remote, "198.198.18.2:80".parse().unwrap());
        assert_eq!(e.inode, 4242);
        let v6 = "   1: CF0000FD000000000000000000010000:A000 B80D0120000001000000000002000000:0007 \
                  07 00000000:00000000 00:00000000 00000000  1000        0 77 2 0000000000000000 0";
        let e = parse_socket_line(v6).expect("a udp6 line parses");
        assert_eq!(e.local, "[fd00:cf::100]:40960".parse().unwrap());
        assert_eq!(e.remote, "[2001:db8:1::2]:7".parse().unwrap());
        assert_eq!(e.inode, 77);
        assert_eq!(parse_socket_line("  sl  local_address rem_address   st"), None, "header");
    }

    #[test]
    fn a_connected_socket_beats_an_unconnected_one_and_others_do_not_match() {
        let k = key(PROTO_UDP, "10.0.2.100:5000", "198.18.1.2:7");
        let e = |local: &str, remote: &str| SocketEntry {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            inode: 1,
        };
        assert_eq!(matches(&k, &e("10.0.2.100:5000", "198.18.1.2:7")), Some(2));
        assert_eq!(matches(&k, &e("0.0.0.0:5000", "0.0.0.0:0")), Some(1));
        assert_eq!(matches(&k, &e("[::]:5000", "[::]:0")), Some(1), "a dual-stack socket");
        assert_eq!(matches(&k, &e("[::ffff:10.0.2.100]:5000", "[::ffff:198.18.1.2]:7")), Some(2));
        assert_eq!(matches(&k, &e("10.0.2.100:5001", "198.18.1.2:7")), None, "another port");
        assert_eq!(matches(&k, &e("10.0.2.100:5000", "198.18.1.3:7")), None, "another peer");
    }

    #[test]
    fn a_socket_at_a_recent_place_is_found_with_one_readlink() {
        let inode_of = |fd: i32| {
            let link = fs::read_link(format!("/proc/self/fd/{fd}")).expect("our own fd");
            socket_inode_of_link(&link.to_string_lossy()).expect("a socket")
        };
        let first = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let second = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (me, fd) = (std::process::id(), second.as_raw_fd());
        // No command tree under pid 0: only the recent places can find anything.
        let mut procfs = Procfs::new(PathBuf::from("/proc"), 0);
        procfs.found(inode_of(first.as_raw_fd()), me, first.as_raw_fd() as u32);
        assert_eq!(procfs.recent_holder(inode_of(fd)), None, "not at a recent place yet");
        procfs.recent.push((me, fd as u32));
        assert_eq!(procfs.recent_holder(inode_of(fd)), Some(me));
        assert_eq!(procfs.inodes.get(&inode_of(fd)), Some(&me), "and it is cached");
        assert_eq!(procfs.recent.last(), Some(&(me, fd as u32)), "the newest place is last");
        for fd in 100..100 + RECENT as u32 {
            procfs.found(fd.into(), me, fd);
        }
        assert_eq!(procfs.recent.len(), RECENT, "only the latest places are kept");
    }

    #[test]
    fn finds_this_tests_own_socket_and_process() {
        // This test process stands in for init, and a python child of it for the command,
        // holding a connected UDP socket to a loopback port.
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let script = format!(
            "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.connect(('127.0.0.1',{}))\nprint(s.getsockname()[1],flush=True)\ntime.sleep(5)",
            peer.local_addr().unwrap().port()
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().expect("the child's port");
        let mut procfs = Procfs::new(PathBuf::from("/proc"), std::process::id());
        let local = SocketAddr::from(([127, 0, 0, 1], port));
        let flow = FlowKey::new(PROTO_UDP, local, peer.local_addr().unwrap());
        let info = procfs.process_of(&flow).expect("the child's connected socket is found");
        assert_eq!(info.pid, child.id());
        assert_eq!(info.comm, "python3");
        assert_eq!(info.cmdline.as_ref().map(|c| c[1].as_str()), Some("-c"));
        let unknown = key(PROTO_TCP, "127.0.0.1:1", "127.0.0.1:2");
        assert_eq!(procfs.process_of(&unknown), None, "no such socket: no guess");
        // The same through sock_diag, and both ways agree.
        let diag = open_diag_socket().expect("a sock_diag socket");
        let by_diag = sock_diag_inode(diag.as_fd(), &flow).expect("sock_diag answers");
        assert!(by_diag.is_some(), "sock_diag finds the socket");
        assert_eq!(by_diag, procfs.socket_inode_from_tables(&flow));
        assert_eq!(sock_diag_inode(diag.as_fd(), &unknown).unwrap(), None);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let tcp =
            FlowKey::new(PROTO_TCP, client.local_addr().unwrap(), client.peer_addr().unwrap());
        let by_diag = sock_diag_inode(diag.as_fd(), &tcp).unwrap();
        assert!(by_diag.is_some(), "a TCP connection too");
        assert_eq!(by_diag, procfs.socket_inode_from_tables(&tcp));
        let _ = child.kill();
        let _ = child.wait();
        // Gone: what was read stays.
        assert_eq!(procfs.process_of(&flow), None, "the socket is gone with its process");
        assert_eq!(procfs.processes.get(&info.pid), Some(&info), "kept after the exit");
    }
}
