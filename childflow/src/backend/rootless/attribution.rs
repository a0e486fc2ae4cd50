//! Which process of the command tree opened each flow, found in procfs the way `ss -p` and
//! bandwhich do it: the flow's command-side address names a socket in the command's network
//! namespace (`/proc/<init>/net/{tcp,udp,icmp}{,6}`, proc(5)), the socket's inode names the
//! process holding it (`/proc/<pid>/fd/* -> socket:[inode]`), and `/proc/<pid>` tells its
//! comm, uid, exe and command line. The rootful backend learns the same from eBPF; both emit
//! [`ProcessEvent`]s, so the flow table, logs, TUI and pcapng comments do not know which ran.
//!
//! Runs on a thread of its own, fed the key of every new flow by the engine, so a slow
//! `/proc` walk never stalls a packet. What it learns is cached (socket inode → pid, pid →
//! process) and kept after the process exits. When the socket or the process is already
//! gone by the time of the lookup (a command that sends one datagram and exits at once), the
//! flow gets no process: nothing is guessed.
//!
//! Invariants: only processes in the command's pid namespace are looked at (same
//! `/proc/<pid>/ns/pid` as its init), and `pid` is the host's view of the pid (this runs in
//! childflow, outside that namespace). No function here panics on the content of `/proc`.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    thread::JoinHandle,
};

use childflow_common::flow::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use crossbeam_channel::{Receiver, Sender};

use crate::event::{Emitter, Event, FlowKey, ProcessEvent, ProcessInfo};

/// Starts the attribution thread for the command tree whose pid namespace `init` (a host
/// pid) leads. Returns the sender the engine gives each new flow's key to, and the thread,
/// which ends once every sender is dropped and its queue is done.
pub fn spawn(init: u32, events: Emitter) -> std::io::Result<(Sender<FlowKey>, JoinHandle<()>)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let thread = std::thread::Builder::new()
        .name("attribution".into())
        .spawn(move || run(Procfs::new(PathBuf::from("/proc"), init), &rx, &events))?;
    Ok((tx, thread))
}

fn run(mut procfs: Procfs, rx: &Receiver<FlowKey>, events: &Emitter) {
    let mut unknown = 0u64;
    for key in rx {
        match procfs.process_of(&key) {
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
    /// `/proc/<init>/ns/pid`'s link text, which every process of the tree shares.
    pid_ns: Option<PathBuf>,
    /// Socket inode → pid, from the last fd scan.
    inodes: HashMap<u64, u32>,
    /// Pids found outside the namespace (or unreadable): not looked at again.
    foreign: HashSet<u32>,
    /// Everything read about each process, kept after it exits.
    processes: HashMap<u32, ProcessInfo>,
}

impl Procfs {
    fn new(root: PathBuf, init: u32) -> Procfs {
        let pid_ns = fs::read_link(root.join(format!("{init}/ns/pid"))).ok();
        Procfs {
            root,
            init,
            pid_ns,
            inodes: HashMap::new(),
            foreign: HashSet::new(),
            processes: HashMap::new(),
        }
    }

    /// The process holding the command-side socket of flow `key`, if it can still be told.
    fn process_of(&mut self, key: &FlowKey) -> Option<ProcessInfo> {
        let inode = self.socket_inode(key)?;
        let pid = match self.inodes.get(&inode) {
            Some(&pid) => pid,
            None => {
                self.scan_fds();
                *self.inodes.get(&inode)?
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

    /// The inode of the command's socket for `key`, from the namespace's socket tables.
    fn socket_inode(&self, key: &FlowKey) -> Option<u64> {
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

    /// Walks the fds of every process of the namespace, refreshing the inode → pid cache.
    fn scan_fds(&mut self) {
        let Ok(dir) = fs::read_dir(&self.root) else { return };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.init || self.foreign.contains(&pid) {
                continue;
            }
            let ns = fs::read_link(entry.path().join("ns/pid")).ok();
            if ns.is_none() || ns != self.pid_ns {
                self.foreign.insert(pid);
                continue;
            }
            let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
            for fd in fds.flatten() {
                if let Ok(target) = fs::read_link(fd.path())
                    && let Some(inode) = socket_inode_of_link(&target.to_string_lossy())
                {
                    self.inodes.insert(inode, pid);
                }
            }
        }
    }
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
    fn finds_this_tests_own_socket_and_process() {
        // This process stands in for the command tree: its own /proc, its own pid namespace.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        // Another process as init: its netns and pid ns are ours too, and it is skipped in
        // the fd scan (childflow's init holds no sockets of the command).
        let mut init = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let mut procfs = Procfs::new(PathBuf::from("/proc"), init.id());
        let info = procfs
            .process_of(&FlowKey::new(PROTO_TCP, local, remote))
            .expect("the test's connected socket is found");
        assert_eq!(info.pid, std::process::id());
        assert!(info.cmdline.is_some_and(|c| !c.is_empty()));
        let unknown = key(PROTO_TCP, "127.0.0.1:1", "127.0.0.1:2");
        assert_eq!(procfs.process_of(&unknown), None, "no such socket: no guess");
        let _ = init.kill();
        let _ = init.wait();
    }
}
