//! The userspace network engine: the command's side of every flow, behind its tap device.
//!
//! The engine is sans-IO. It never touches a file descriptor and never reads the clock: the
//! driver ([`super::driver`]) hands it frames read from the tap ([`Engine::ingest`]), calls
//! [`Engine::poll`] with the current time, writes the frames it gets from
//! [`Engine::pop_out`] to the tap, and carries out the [`Action`]s it gets from
//! [`Engine::pop_action`] with host sockets, reporting back (`tcp_connected`, `udp_reply`,
//! ...). Tests drive it the same way with a virtual clock and no tap.
//!
//! What it owns:
//! - TCP: smoltcp terminates each connection. A SYN from the command is *held* (not given to
//!   smoltcp) until the driver's upstream connect succeeds ([`Engine::tcp_connected`]); only
//!   then a listening smoltcp socket is created for exactly that destination and the SYN is
//!   fed to it, so the command sees SYN-ACK only for a peer that accepted. A refused connect
//!   is answered with RST, an unreachable or timed-out one with ICMP destination unreachable
//!   ([`Engine::tcp_connect_failed`]). The relay of bytes is the driver's; it reaches the
//!   socket through [`Engine::tcp_socket`].
//! - UDP and ICMP echo: handled without smoltcp sockets (smoltcp binds by port, we need
//!   per-flow sessions to any address): datagrams become [`Action::UdpSend`]/[`Action::Ping`],
//!   replies are framed here. Idle flows end after a timeout. The command's TTL / hop limit
//!   goes to the host socket ([`Action::SetHopLimit`], [`Action::TcpHopLimit`] for a SYN),
//!   and the ICMP errors the host socket gets come back from the router that sent them
//!   ([`Engine::udp_icmp_error`], [`Engine::icmp_echo_error`],
//!   [`Engine::tcp_connect_icmp_error`]; see [`super::recverr`]): traceroute works.
//! - IP fragments from the command are reassembled before anything else looks at them, and
//!   datagrams for it larger than the tap's MTU are fragmented ([`super::frag`]); every
//!   fragment is counted as the packet it is on the wire.
//! - New flows' keys go to [`super::attribution`] (when configured), which reports the
//!   process behind each.
//! - ARP, NDP and everything else go to smoltcp, which answers for the gateway and resolver
//!   addresses (`any_ip`).
//! - Accounting: every frame in either direction is counted to its flow and reported as a
//!   [`PacketEvent`]; flows are reported when they start, every `flow_update_interval`, and
//!   when they end ([`FlowUpdate`]).
//!
//! Each TCP connection's smoltcp socket lives in a socket set of its own ([`Conn`]): smoltcp
//! visits every socket of the set it polls (ingress searches for the socket that accepts a
//! segment; egress and `poll_at` scan them all), so with one shared set every frame cost
//! O(open connections), which made connects slow once a few hundred were open and starved
//! the engine with thousands. The engine already knows each segment's flow: it hands the
//! segment to that flow's set, and polls only the connections that received something,
//! were touched by their relay ([`Engine::tcp_socket`]), or have a timer due (a heap of
//! their `poll_at` deadlines).
//!
//! Invariants: a flow's socket set holds exactly its one socket, so a SYN can never be
//! accepted by another flow's socket. No function here panics on bytes from the command:
//! frames are parsed with checked reads ([`super::packet::parse`]) and smoltcp's checked
//! parsers.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use childflow_common::flow::{
    DIR_IN, DIR_OUT, FAMILY_V4, FAMILY_V6, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN,
};
use smoltcp::{
    iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet},
    phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium},
    socket::tcp,
    time::{Duration, Instant},
    wire::{EthernetAddress, HardwareAddress, IpCidr, IpListenEndpoint},
};

use super::{
    frag,
    packet::{self, Builder, ETH_HEADER_LEN, Headers, IcmpError, Mac, Unreachable},
};
use crate::backend::dns;
use crate::capture::filter::{Fields, Program};
use crate::event::{
    CloseReason, DnsTransport, Emitter, Event, FlowKey, FlowPhase, FlowStats, FlowUpdate,
    PacketEvent, UnixNanos,
};

/// The addresses of the command's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    pub child_v4: Ipv4Addr,
    pub gateway_v4: Ipv4Addr,
    pub dns_v4: Ipv4Addr,
    pub prefix_v4: u8,
    pub child_v6: Ipv6Addr,
    pub gateway_v6: Ipv6Addr,
    pub dns_v6: Ipv6Addr,
    pub prefix_v6: u8,
    /// The engine's MAC (the gateway's, as the command sees it).
    pub gateway_mac: Mac,
}

impl Default for Addressing {
    /// slirp's well-known layout (10.0.2.0/24, gateway .2, resolver .3), and a ULA /64
    /// (RFC 4193) for IPv6.
    fn default() -> Self {
        Addressing {
            child_v4: Ipv4Addr::new(10, 0, 2, 100),
            gateway_v4: Ipv4Addr::new(10, 0, 2, 2),
            dns_v4: Ipv4Addr::new(10, 0, 2, 3),
            prefix_v4: 24,
            child_v6: Ipv6Addr::new(0xfd00, 0xcf, 0, 0, 0, 0, 0, 0x100),
            gateway_v6: Ipv6Addr::new(0xfd00, 0xcf, 0, 0, 0, 0, 0, 2),
            dns_v6: Ipv6Addr::new(0xfd00, 0xcf, 0, 0, 0, 0, 0, 3),
            prefix_v6: 64,
            gateway_mac: [0x02, 0x63, 0x66, 0x00, 0x00, 0x02],
        }
    }
}

impl Addressing {
    fn is_gateway(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.gateway_v4) || ip == IpAddr::V6(self.gateway_v6)
    }

    fn is_resolver(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.dns_v4) || ip == IpAddr::V6(self.dns_v6)
    }

    /// Inside the command's own subnets (where nothing but the gateway and resolver exist).
    fn is_on_link(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_v4)).unwrap_or(0);
                u32::from(a) & mask == u32::from(self.child_v4) & mask
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_v6)).unwrap_or(0);
                u128::from(a) & mask == u128::from(self.child_v6) & mask
                    || a.is_unicast_link_local()
            }
        }
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub net: Addressing,
    /// The tap's MTU (IP packet size; frames are 14 bytes longer).
    pub mtu: usize,
    pub allow_host_loopback: bool,
    /// How many bytes of each frame a [`PacketEvent`] carries; `None`: no packet events at
    /// all (nothing consumes them, and a channel send per frame is a large share of the
    /// engine's time at full speed).
    pub snaplen: Option<usize>,
    /// `--capture-filter`, compiled: frames it rejects are reported without their bytes
    /// (see [`PacketEvent::data`]), so the engine neither copies nor sends them in full.
    pub capture_filter: Option<Program>,
    pub flow_update_interval: Duration,
    /// Size of each TCP socket's receive and send buffers.
    pub tcp_buffer: usize,
    pub udp_idle: Duration,
    pub icmp_idle: Duration,
    /// How long a closing TCP flow may wait for the command's last ACK or FIN.
    pub tcp_linger: Duration,
    /// Wall-clock time ([`UnixNanos`]) at `Instant::ZERO` of the engine's clock.
    pub unix_base_ns: UnixNanos,
    /// Where the key of every new flow goes, to find its process
    /// ([`super::attribution`]); never blocks.
    pub new_flows: Option<crossbeam_channel::Sender<super::attribution::Lookup>>,
}

impl EngineConfig {
    pub fn new(mtu: usize, unix_base_ns: UnixNanos) -> Self {
        EngineConfig {
            net: Addressing::default(),
            mtu,
            allow_host_loopback: false,
            snaplen: Some(128),
            capture_filter: None,
            flow_update_interval: Duration::from_secs(5),
            tcp_buffer: 4 << 20,
            udp_idle: Duration::from_secs(60),
            icmp_idle: Duration::from_secs(10),
            tcp_linger: Duration::from_secs(30),
            unix_base_ns,
            new_flows: None,
        }
    }
}

/// An engine-wide flow number, never reused.
pub type FlowId = u64;

/// Where a flow's upstream socket should connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A host socket to this address.
    Direct(SocketAddr),
    /// The DNS relay: the host's resolvers.
    DnsRelay,
}

/// Work for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Connect a host TCP socket; answer with `tcp_connected` or `tcp_connect_failed`.
    TcpConnect { id: FlowId, target: Target },
    /// Open a UDP session; later datagrams come as `UdpSend`.
    UdpOpen { id: FlowId, target: Target },
    /// Send one datagram of the session.
    UdpSend { id: FlowId, payload: Vec<u8> },
    /// Send one ICMP echo request to `remote` with TTL / hop limit `hops` (the command's);
    /// answer with `icmp_echo_reply` or `icmp_echo_error`.
    Ping { id: FlowId, remote: IpAddr, seq: u16, hops: u8, payload: Vec<u8> },
    /// Send the UDP session's next datagrams with TTL / hop limit `hops`: the command
    /// changed it (traceroute), or the session is new. Errors the host socket receives come
    /// back through `udp_icmp_error`.
    SetHopLimit { id: FlowId, hops: u8 },
    /// The command's SYN for the `TcpConnect` that follows has TTL / hop limit `hops`, not
    /// the usual [`DEFAULT_HOPS`] (`traceroute -T`): connect with it, and report an ICMP
    /// error for the SYN with `tcp_connect_icmp_error`.
    TcpHopLimit { id: FlowId, hops: u8 },
    /// The UDP or ICMP flow ended: drop its sockets.
    Close { id: FlowId },
}

/// Why an upstream TCP connect failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The peer answered with RST: the command gets a RST.
    Refused,
    /// No route, no answer, or timed out: the command gets ICMP host unreachable.
    Unreachable,
    /// The host refused to let us connect (firewall, EACCES): ICMP administratively
    /// prohibited.
    Prohibited,
}

/// A relay's report of how its connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions were closed with FIN.
    Fin,
    /// The upstream reset (or failed): the engine resets the command's side.
    UpstreamReset,
    /// The command's side reset or timed out: the relay already reset the upstream.
    ChildReset,
}

/// The engine's part of a flow's life.
enum FlowState {
    /// TCP: the command's SYN is held while the upstream connect runs.
    TcpConnecting { syn: Vec<u8> },
    /// TCP: a smoltcp socket terminates the connection.
    TcpOpen { handle: SocketHandle, child_rst: bool, end: Option<(CloseReason, Instant)> },
    /// UDP session. `last_out` is the start of the last datagram the command sent (quoted
    /// in ICMP errors); `hops` the TTL / hop limit the host socket sends with (0: not set).
    Udp { last_out: Vec<u8>, hops: u8 },
    /// ICMP echo: the start of the command's last few requests, by sequence number (quoted
    /// when one of them draws an ICMP error, e.g. `traceroute -I`).
    Icmp { sent: VecDeque<(u16, Vec<u8>)> },
}

impl fmt::Display for FlowState {
    /// RFC 9293 state names for TCP, as the command's peer (the engine) sees them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowState::TcpConnecting { .. } => f.write_str("SYN-RECEIVED (connecting upstream)"),
            FlowState::TcpOpen { end: None, .. } => f.write_str("ESTABLISHED"),
            FlowState::TcpOpen { end: Some(_), .. } => f.write_str("CLOSING"),
            FlowState::Udp { .. } => f.write_str("UDP"),
            FlowState::Icmp { .. } => f.write_str("ICMP"),
        }
    }
}

struct Flow {
    key: FlowKey,
    stats: FlowStats,
    state: FlowState,
    last_seen: Instant,
    next_update: Instant,
    packets_reported: u64,
}

/// A held packet event waiting for its frame (see [`Engine::claim_frame`]).
struct Claim {
    /// Index of the event in `Engine::deferred`.
    index: usize,
    /// The address of the frame's buffer, to find it among the consumed ones.
    frame: usize,
    /// Bytes of it the capture keeps.
    snap: usize,
}

/// The in-memory device smoltcp drives: frames in, frames out.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    /// Frames smoltcp has consumed, on their way back to `pool`.
    spent: Vec<Vec<u8>>,
    mtu: usize,
}

/// Buffers kept for reuse; beyond this they are freed.
const POOL_MAX: usize = 256;

impl Queues {
    fn new(mtu: usize) -> Queues {
        Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            spent: Vec::new(),
            mtu,
        }
    }

    /// A buffer for a frame: a spare of ours, else one from the packet pool, where the
    /// frames handed to the capture come back ([`Engine::claim_frame`]).
    fn take(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| crate::event::packet_buffer(self.mtu + ETH_HEADER_LEN))
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX && buf.capacity() >= self.mtu + ETH_HEADER_LEN {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// Returns the frames smoltcp consumed to the pool.
    fn reclaim(&mut self) {
        while let Some(buf) = self.spent.pop() {
            self.recycle(buf);
        }
    }
}

/// Returns its frame to `spent` (not straight to the pool, which the transmit token of the
/// same pair borrows); [`Queues::reclaim`] moves them over after each poll.
struct RxToken<'a> {
    frame: Vec<u8>,
    spent: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.frame);
        self.spent.push(self.frame);
        r
    }
}

/// Takes its buffer from the pool only when smoltcp really sends: smoltcp asks for a
/// transmit token with every received frame but uses few of them, and a pooled buffer
/// dropped with an unused token would be freed and allocated again (page faults at 64 KiB).
struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    pool: &'a mut Vec<Vec<u8>>,
    capacity: usize,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.pool.pop().unwrap_or_else(|| crate::event::packet_buffer(self.capacity));
        // `resize` only zeroes bytes beyond the old length; pooled buffers are cleared,
        // so this writes `len` bytes once, which smoltcp then overwrites.
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        let capacity = self.mtu + ETH_HEADER_LEN;
        let rx = RxToken { frame, spent: &mut self.spent };
        Some((rx, TxToken { tx: &mut self.tx, pool: &mut self.pool, capacity }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        let capacity = self.mtu + ETH_HEADER_LEN;
        Some(TxToken { tx: &mut self.tx, pool: &mut self.pool, capacity })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HEADER_LEN;
        // The queue is unbounded: no burst limit, so smoltcp does not shrink its window.
        caps.max_burst_size = None;
        // The command's kernel checksummed what it sent; smoltcp need not check it again.
        // What smoltcp sends is checked by that kernel, so it must be right.
        let mut csum = ChecksumCapabilities::default();
        csum.ipv4 = Checksum::Tx;
        csum.tcp = Checksum::Tx;
        csum.udp = Checksum::Tx;
        csum.icmpv4 = Checksum::Tx;
        csum.icmpv6 = Checksum::Tx;
        caps.checksum = csum;
        caps
    }
}

/// The TTL / hop limit Linux sends with by default (`net.ipv4.ip_default_ttl`,
/// `net.ipv6.conf.*.hop_limit`): a SYN with any other asks for [`Action::TcpHopLimit`].
pub const DEFAULT_HOPS: u8 = 64;

/// Echo requests per ICMP flow whose start is kept to quote in an ICMP error about them.
const ICMP_QUOTES_KEPT: usize = 16;

/// One TCP connection's smoltcp socket, in a set of its own (see the module documentation).
struct Conn {
    set: SocketSet<'static>,
    /// Listed in [`Engine::dirty`] for the next poll's egress.
    dirty: bool,
    /// The socket's deadline as last armed in [`Engine::timers`] (older entries there for
    /// this connection are stale and skipped).
    poll_at: Option<Instant>,
    /// The socket's receive and send buffers, lent from the [`BufferPool`].
    lent: Option<Lent>,
}

impl Conn {
    /// Drops the socket, then takes back the buffers it borrowed.
    fn into_buffers(mut self) -> Option<[SocketBuf; 2]> {
        let lent = self.lent.take()?;
        self.set = SocketSet::new(Vec::new());
        // SAFETY: the only socket that borrowed the buffers was in the set just dropped.
        Some(unsafe { lent.reclaim() })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(lent) = self.lent.take() {
            self.set = SocketSet::new(Vec::new());
            // SAFETY: as in `into_buffers`: the borrowing socket is gone.
            drop(unsafe { lent.reclaim() });
        }
    }
}

/// One TCP socket buffer: an anonymous mapping of its own.
///
/// Why not `vec![0; size]`: glibc serves a 4 MiB `calloc` from its heap once a freed chunk
/// of that size has raised its dynamic mmap threshold, and then clears all of it with
/// `memset`, faulting in every page: with more connections alive than the pool holds (a
/// command that connects and closes in a loop), perf put 64% of the engine's CPU in those
/// page faults and connects took 400-550 µs. A fresh mapping is zero without being
/// touched, and a connection faults in only the pages its bytes pass through.
struct SocketBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// How far from the start the buffer may have been written (its resident part): each
    /// socket writes its ring buffer from offset 0, so this is the most bytes any one
    /// connection moved through it, up to `len`.
    touched: usize,
}

impl SocketBuf {
    fn new(len: usize) -> SocketBuf {
        match crate::arena::map_anonymous(len, libc::MAP_NORESERVE) {
            Some(ptr) => SocketBuf { ptr, len, touched: 0 },
            None => std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len, 4096)
                    .unwrap_or_else(|_| std::alloc::Layout::new::<u8>()),
            ),
        }
    }

    /// Gives the pages back to the kernel; the buffer reads as zeros again.
    fn release_pages(&mut self) {
        // SAFETY: the range is this buffer's own mapping, borrowed by nothing (it is not
        // lent out while in the pool).
        unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED) };
        self.touched = 0;
    }

    /// The whole buffer as a slice that a socket may hold for as long as it likes.
    ///
    /// # Safety
    /// Nothing else may access the buffer until that slice is gone (see [`Lent`]).
    unsafe fn lend(&mut self) -> &'static mut [u8] {
        // SAFETY: `len` bytes of readable and writable memory, and by the caller's promise
        // the slice is the only access to them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SocketBuf {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no slice of it is alive (see `Lent`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: a `SocketBuf` owns its mapping exclusively, like a `Box<[u8]>`.
unsafe impl Send for SocketBuf {}

/// Buffers of a TCP socket lent out as `'static` slices. Invariant: the slices handed out
/// by [`BufferPool::lend`] are the only references into them, and they live in one
/// connection's socket.
struct Lent([SocketBuf; 2]);

impl Lent {
    /// # Safety
    /// The slices lent out must no longer be reachable (their socket was dropped).
    unsafe fn reclaim(self) -> [SocketBuf; 2] {
        self.0
    }
}

/// TCP socket buffers, reused from connection to connection.
///
/// smoltcp's sockets own their buffers and never give them back, so each connection used to
/// allocate two fresh buffers of [`EngineConfig::tcp_buffer`] bytes and free them at its
/// end: a mapping and an unmapping each (the latter a TLB shootdown on the CPUs the process
/// ran on) and a page fault for every page first touched. perf put that at about a third of
/// the engine's CPU time per connect, on the path between the command's SYN and the
/// SYN-ACK. Lent as `'static` slices instead, the buffers come back when their socket has
/// been dropped ([`Conn::into_buffers`]).
///
/// Bounds: at most [`BufferPool::KEEP`] buffers are kept, enough for a command that
/// opens and closes connections in a loop while hundreds of earlier ones are still closing
/// (a buffer that does not fit is unmapped, which with its TLB shootdown and VMA split cost
/// about an eighth of the engine's CPU per connect when the pool held only 64). Keeping an
/// untouched buffer costs address space only (`MAP_NORESERVE`). Resident memory is bounded
/// by bytes instead: a returning buffer that a connection filled beyond
/// [`BufferPool::KEEP_TOUCHED`], or whose pages would take the pool's resident total past
/// [`BufferPool::RESIDENT_BUDGET`], gives its pages back first (`MADV_DONTNEED`, no
/// unmapping), so the pool never holds more than 16 MiB of memory whatever went through it.
struct BufferPool {
    free: Vec<SocketBuf>,
    size: usize,
    /// Sum of `touched` over `free`: an upper bound of the pool's resident bytes.
    resident: usize,
}

impl BufferPool {
    /// Buffers kept for reuse (1024 connections' worth).
    const KEEP: usize = 2048;
    /// A returning buffer with more than this resident gives its pages back.
    const KEEP_TOUCHED: usize = 256 << 10;
    /// Resident bytes the pool may hold in all.
    const RESIDENT_BUDGET: usize = 16 << 20;

    fn new(size: usize) -> BufferPool {
        BufferPool { free: Vec::new(), size, resident: 0 }
    }

    /// A receive and a send buffer for a new socket, and the record to take them back.
    fn lend(&mut self) -> (Lent, [&'static mut [u8]; 2]) {
        let mut take = || match self.free.pop() {
            Some(b) => {
                self.resident -= b.touched;
                b
            }
            None => SocketBuf::new(self.size),
        };
        let mut bufs = [take(), take()];
        // SAFETY: each buffer is lent once, to the one socket built from these slices;
        // `Lent::reclaim` hands the buffers back only after that socket is gone.
        let slices = [unsafe { bufs[0].lend() }, unsafe { bufs[1].lend() }];
        (Lent(bufs), slices)
    }

    /// Takes back a connection's buffers, through which at most `moved` bytes went in
    /// either direction.
    fn give_back(&mut self, bufs: [SocketBuf; 2], moved: u64) {
        for mut b in bufs {
            if self.free.len() >= Self::KEEP || b.len != self.size {
                continue;
            }
            b.touched = b.touched.max(usize::try_from(moved).unwrap_or(usize::MAX).min(b.len));
            if b.touched > Self::KEEP_TOUCHED || self.resident + b.touched > Self::RESIDENT_BUDGET {
                b.release_pages();
            }
            self.resident += b.touched;
            self.free.push(b);
        }
    }
}

/// How often idle timeouts and periodic flow updates are checked.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

/// The engine. See the module documentation.
pub struct Engine {
    cfg: EngineConfig,
    iface: Interface,
    dev: Queues,
    /// No sockets: smoltcp answers ARP, NDP, pings to its addresses and segments of
    /// unknown connections (RST) with it.
    sockets: SocketSet<'static>,
    /// The smoltcp side of each open TCP flow.
    conns: HashMap<FlowId, Conn>,
    /// Connections to poll for egress at the next [`Engine::poll`].
    dirty: Vec<FlowId>,
    /// Connections' `poll_at` deadlines (retransmissions, keep-alives, TIME-WAIT).
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    flows: HashMap<FlowId, Flow>,
    by_key: HashMap<FlowKey, FlowId>,
    next_id: FlowId,
    actions: VecDeque<Action>,
    out: VecDeque<Vec<u8>>,
    /// TCP flows whose relay ended; removed once their socket is closed.
    closing: Vec<FlowId>,
    events: Emitter,
    /// Events held back until [`Engine::flush_events`] (see [`Engine::defer_events`]).
    deferred: Option<Vec<Event>>,
    /// New flows' lookups for the attribution thread, held back like the events.
    deferred_keys: Vec<super::attribution::Lookup>,
    /// The held packet event that gets the frame being ingested once smoltcp is done with
    /// it (see [`Engine::claim_frame`]).
    claim: Option<Claim>,
    /// TCP flows whose process is being looked up: done once the lookup is over (see
    /// [`Engine::attribution_of`]).
    attributing: HashMap<FlowId, tokio::sync::oneshot::Receiver<()>>,
    /// TCP sockets' buffers.
    buffers: BufferPool,
    peer_mac: Option<Mac>,
    next_housekeeping: Instant,
    /// Datagrams the command sent in fragments, being put back together.
    frags: frag::Reassembler,
    /// Identification of the next datagram the engine fragments towards the command.
    next_frag_ident: u32,
}

impl Engine {
    pub fn new(cfg: EngineConfig, events: Emitter, now: Instant) -> Engine {
        let mut dev = Queues::new(cfg.mtu);
        let mut iface_cfg =
            IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(cfg.net.gateway_mac)));
        iface_cfg.random_seed = cfg.unix_base_ns ^ 0x9e37_79b9_7f4a_7c15;
        let mut iface = Interface::new(iface_cfg, &mut dev, now);
        let net = cfg.net;
        iface.update_ip_addrs(|addrs| {
            // Four addresses fit: the workspace enables smoltcp's iface-max-addr-count-4.
            for cidr in [
                IpCidr::new(net.gateway_v4.into(), net.prefix_v4),
                IpCidr::new(net.dns_v4.into(), net.prefix_v4),
                IpCidr::new(net.gateway_v6.into(), net.prefix_v6),
                IpCidr::new(net.dns_v6.into(), net.prefix_v6),
            ] {
                let _ = addrs.push(cidr);
            }
        });
        // Accept segments to any destination: every connection of the command ends here.
        iface.set_any_ip(true);
        let buffers = BufferPool::new(cfg.tcp_buffer);
        Engine {
            cfg,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            conns: HashMap::new(),
            dirty: Vec::new(),
            timers: BinaryHeap::new(),
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            actions: VecDeque::new(),
            out: VecDeque::new(),
            closing: Vec::new(),
            events,
            deferred: None,
            deferred_keys: Vec::new(),
            claim: None,
            attributing: HashMap::new(),
            buffers,
            peer_mac: None,
            next_housekeeping: now,
            frags: frag::Reassembler::default(),
            next_frag_ident: 1,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Whether the collector has [`crate::event::PACKET_BUDGET`] bytes of captured frames
    /// waiting: the driver then stops reading the tap until it has taken some. That holds
    /// the command's TCP back (its segments, and the ACKs that open smoltcp's window for
    /// downloads, wait in the tap queue) instead of losing captured frames, and bounds the
    /// memory they take.
    pub fn capture_backlogged(&self) -> bool {
        !self.events.has_packet_room(self.cfg.mtu + ETH_HEADER_LEN)
    }

    /// A buffer to read the next frame into (capacity: MTU + Ethernet header).
    pub fn take_buffer(&mut self) -> Vec<u8> {
        self.dev.take()
    }

    /// Returns a buffer from [`Engine::take_buffer`] for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.dev.recycle(buf);
    }

    /// The next frame to write to the tap; once written (or refused by a full tap), it goes
    /// back through [`Engine::sent`].
    pub fn pop_out(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// A frame of [`Engine::pop_out`] the driver has written to the tap: its packet event
    /// goes out now, stamped now, the time it crossed the tap (every frame the engine sends
    /// is captured, also one a full tap refused, as the flow's counters count it). A large
    /// frame goes to the capture in its own buffer.
    ///
    /// Why here and not when the frame is made: a bulk download is a stream of 64 KiB frames
    /// towards the command, and the copy for the capture cost the engine (the critical
    /// path) ~30–85 ms of CPU per GB (its thread's CPU time, interleaved runs with and
    /// without `-c`); after the write the buffer is free to hand over.
    pub fn sent(&mut self, mut frame: Vec<u8>, now: Instant) {
        let direction = crate::event::Direction::In;
        let Some(snap) = self.capture_snap(&frame, direction) else {
            self.dev.recycle(frame);
            return;
        };
        let orig_len = frame.len() as u32;
        let data = if snap >= crate::capture::direct::ZERO_COPY_MIN {
            frame.truncate(snap);
            frame
        } else {
            let copy = crate::event::packet_bytes(&frame[..snap]);
            self.dev.recycle(frame);
            copy
        };
        let ts = self.unix(now);
        self.emit(Event::Packet(PacketEvent { ts, direction, orig_len, data: data.into() }));
    }

    /// Frames waiting for the tap.
    pub fn out_len(&self) -> usize {
        self.out.len()
    }

    /// Moves the first `n` waiting frames behind the others: frames queued since
    /// [`Engine::out_len`] read `n` go to the tap first. Only for frames of different flows
    /// (a flow's own frames keep their order).
    pub fn send_newest_first(&mut self, n: usize) {
        self.out.rotate_left(n.min(self.out.len()));
    }

    /// The next piece of work for the driver.
    pub fn pop_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Live flows (for tests and diagnostics).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The key of flow `id`.
    pub fn flow_key(&self, id: FlowId) -> Option<FlowKey> {
        self.flows.get(&id).map(|f| f.key)
    }

    /// When [`Engine::poll`] must run next at the latest.
    pub fn poll_at(&mut self, now: Instant) -> Instant {
        if !self.dirty.is_empty() {
            return now;
        }
        let smol = self.iface.poll_at(now, &self.sockets).unwrap_or(self.next_housekeeping);
        let timer = self.timers.peek().map_or(self.next_housekeeping, |Reverse((at, _))| *at);
        smol.min(timer).min(self.next_housekeeping)
    }

    /// Lists connection `id` for the next poll's egress.
    fn mark_dirty(&mut self, id: FlowId) {
        if let Some(conn) = self.conns.get_mut(&id)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Lets connection `id` send everything it has to send now, and re-arms its timer.
    fn egress(&mut self, id: FlowId, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        conn.dirty = false;
        // One segment per round: smoltcp dispatches each socket once per call.
        while self.iface.poll_egress(now, &mut self.dev, &mut conn.set)
            == PollResult::SocketStateChanged
        {}
        let at = self.iface.poll_at(now, &conn.set);
        if at != conn.poll_at {
            conn.poll_at = at;
            if let Some(at) = at {
                self.timers.push(Reverse((at, id)));
            }
        }
    }

    /// Hands one segment of connection `id` straight to its socket.
    fn conn_ingress(&mut self, id: FlowId, frame: Vec<u8>, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else {
            // No socket (cannot happen for an open flow): smoltcp answers it with RST.
            self.dev.rx.push_back(frame);
            return;
        };
        // The front of the queue, so this call processes exactly this frame.
        self.dev.rx.push_front(frame);
        self.iface.poll_ingress_single(now, &mut self.dev, &mut conn.set);
        self.claim_frame();
        self.mark_dirty(id);
    }

    fn unix(&self, now: Instant) -> UnixNanos {
        self.cfg.unix_base_ns + now.total_micros() as u64 * 1000
    }

    fn builder(&self) -> Option<Builder> {
        Some(Builder { our_mac: self.cfg.net.gateway_mac, peer_mac: self.peer_mac? })
    }

    /// Holds events back until [`Engine::flush_events`] instead of sending each at once.
    /// The driver flushes them after its writes to the tap: a send can wake the collector
    /// thread (a futex wake, and on a busy machine a context switch), which must not sit
    /// between a frame of the command and the engine's answer to it (a SYN and its SYN-ACK).
    pub fn defer_events(&mut self) {
        self.deferred.get_or_insert_with(Vec::new);
    }

    /// Sends the events held back since the last flush (see [`Engine::defer_events`]).
    pub fn flush_events(&mut self) {
        if let Some(tx) = &self.cfg.new_flows {
            for key in self.deferred_keys.drain(..) {
                let _ = tx.send(key);
            }
        }
        if let Some(held) = &mut self.deferred {
            for ev in held.drain(..) {
                self.events.emit(ev);
            }
        }
    }

    fn emit(&mut self, ev: Event) {
        match &mut self.deferred {
            Some(held) => held.push(ev),
            None => {
                self.events.emit(ev);
            }
        }
    }

    /// Reports a frame of the command (outbound) as a packet event with a copy of its bytes; with
    /// `claimable`, a frame the caller knows an open connection's socket consumes before
    /// this call's events are sent gets no copy: its event is held without bytes and takes
    /// the frame itself afterwards ([`Engine::claim_frame`]). (Frames towards the command
    /// go through [`Engine::sent`].)
    ///
    /// Why: bulk TCP from the command is a stream of 64 KiB tap frames, and the copy for the
    /// capture (`packet_bytes`) was a tenth of the engine's samples in `perf record`.
    fn emit_packet_claimable(&mut self, frame: &[u8], now: Instant, claimable: bool) {
        let dir = crate::event::Direction::Out;
        let Some(snap) = self.capture_snap(frame, dir) else { return };
        let ts = self.unix(now);
        let event = |data: Vec<u8>| {
            let orig_len = frame.len() as u32;
            Event::Packet(PacketEvent { ts, direction: dir, orig_len, data: data.into() })
        };
        match &mut self.deferred {
            Some(held) if claimable && snap > 0 => {
                held.push(event(Vec::new()));
                let frame = frame.as_ptr() as usize;
                self.claim = Some(Claim { index: held.len() - 1, frame, snap });
            }
            _ => {
                let ev = event(crate::event::packet_bytes(&frame[..snap]));
                self.emit(ev);
            }
        }
    }

    /// How many bytes of `frame` its packet event carries: `None` without a capture, 0 for
    /// a frame the capture filter rejects (still reported, so the capture counts it as
    /// received and filtered out), else up to the snap length.
    fn capture_snap(&self, frame: &[u8], dir: crate::event::Direction) -> Option<usize> {
        let snaplen = self.cfg.snaplen?;
        let rejected = self
            .cfg
            .capture_filter
            .as_ref()
            .is_some_and(|filter| !filter.eval(&Fields::from_ethernet(frame, dir)));
        Some(if rejected { 0 } else { frame.len().min(snaplen) })
    }

    /// Whether a frame of the command with headers `h` goes to an open connection's socket,
    /// which consumes it at once (`Engine::conn_ingress`): the path `ingest` takes for it.
    fn reaches_open_conn(&self, h: &Headers) -> bool {
        if h.fragment || h.proto != PROTO_TCP {
            return false;
        }
        let key = FlowKey::new(PROTO_TCP, h.src_addr(), h.dst_addr());
        self.by_key.get(&key).is_some_and(|id| {
            self.conns.contains_key(id)
                && self.flows.get(id).is_some_and(|f| matches!(f.state, FlowState::TcpOpen { .. }))
        })
    }

    /// Moves the frame smoltcp just consumed into the packet event that claimed it
    /// ([`Engine::emit_packet_claimable`]).
    fn claim_frame(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        let Some(held) = self.deferred.as_mut() else { return };
        let at = self.dev.spent.iter().rposition(|f| f.as_ptr() as usize == claim.frame);
        match (at, held.get_mut(claim.index)) {
            (Some(at), Some(Event::Packet(p))) => {
                let mut frame = self.dev.spent.swap_remove(at);
                frame.truncate(claim.snap);
                p.data = frame.into();
            }
            _ => {
                // smoltcp always consumes the frame it is given (`poll_ingress_single`), so
                // this cannot happen; if it did, the packet is lost and counted as such.
                debug_assert!(false, "claimed frame not consumed");
                if claim.index < held.len() {
                    held.remove(claim.index);
                }
                self.events.count_lost();
            }
        }
    }

    fn emit_flow(&mut self, id: FlowId, phase: FlowPhase) {
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.packets_reported = flow.stats.packets[0] + flow.stats.packets[1];
            let ev = Event::Flow(FlowUpdate { key: flow.key, stats: flow.stats, phase });
            self.emit(ev);
        }
    }

    fn new_flow(&mut self, key: FlowKey, state: FlowState, now: Instant) -> FlowId {
        let id = self.next_id;
        self.next_id += 1;
        let stats = FlowStats::new(DIR_OUT, self.unix(now));
        let next_update = now + self.cfg.flow_update_interval;
        self.flows.insert(
            id,
            Flow { key, stats, state, last_seen: now, next_update, packets_reported: 0 },
        );
        self.by_key.insert(key, id);
        // Attribution starts at the flow's first packet, not at its report: a TCP flow is
        // reported only after the upstream connect, and a short-lived command may be gone
        // by then, while at its SYN it is still blocked in connect(2). The flow table takes
        // a process event before or after its flow. With events deferred, the key waits for
        // the same flush: waking the attribution thread (a futex wake, and CPU time it takes
        // from the command's and the engine's) must not delay the SYN-ACK either.
        if let Some(tx) = &self.cfg.new_flows {
            let done = (key.proto == PROTO_TCP).then(|| {
                let (done, wait) = tokio::sync::oneshot::channel();
                self.attributing.insert(id, wait);
                done
            });
            let lookup = super::attribution::Lookup { key, done };
            if self.deferred.is_some() {
                self.deferred_keys.push(lookup);
            } else {
                let _ = tx.send(lookup);
            }
        }
        id
    }

    /// For TCP flow `id`, what completes once the attribution thread has looked up its
    /// process (or gave up). The driver starts relaying the flow's bytes only then, for a
    /// bounded time: a command that waits for an answer (a `curl`) cannot be gone before
    /// its lookup, however late a starved lookup thread gets a CPU. Holding the SYN-ACK
    /// instead would do the same for commands that never read, but would put the lookup
    /// (~100-250 µs) into every connect(2).
    pub fn attribution_of(&mut self, id: FlowId) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.attributing.remove(&id)
    }

    /// Ends flow `id`: reports it and forgets it.
    fn end_flow(&mut self, id: FlowId, reason: CloseReason) {
        self.attributing.remove(&id);
        self.emit_flow(id, FlowPhase::End(reason));
        if let Some(flow) = self.flows.remove(&id) {
            if self.by_key.get(&flow.key) == Some(&id) {
                self.by_key.remove(&flow.key);
            }
            if let Some(bufs) = self.conns.remove(&id).and_then(Conn::into_buffers) {
                let moved = flow.stats.bytes[0].max(flow.stats.bytes[1]);
                self.buffers.give_back(bufs, moved);
            }
        }
    }

    fn account(&mut self, id: FlowId, dir: usize, h: &Headers, now: Instant) {
        let ns = self.unix(now);
        if let Some(flow) = self.flows.get_mut(&id) {
            let flags = if h.proto == PROTO_TCP { h.tcp_flags } else { 0 };
            flow.stats.account(dir, h.ip_len, h.payload_len, flags, ns);
            flow.last_seen = now;
        }
    }

    /// Queues a frame for the command, counting it to flow `id` (or, if `None`, to the flow
    /// its headers name).
    fn send_frame(&mut self, frame: Vec<u8>, id: Option<FlowId>, now: Instant) {
        if let Some(h) = packet::parse(&frame) {
            let id = id.or_else(|| self.flow_of_inbound(&h));
            if let Some(id) = id {
                self.account(id, DIR_IN, &h, now);
            }
        }
        self.out.push_back(frame);
    }

    /// The flow a frame towards the command belongs to.
    fn flow_of_inbound(&self, h: &Headers) -> Option<FlowId> {
        let key = match h.proto {
            PROTO_TCP | PROTO_UDP => FlowKey::new(h.proto, h.dst_addr(), h.src_addr()),
            _ => return None,
        };
        self.by_key.get(&key).copied()
    }

    /// Handles one frame the command sent.
    pub fn ingest(&mut self, frame: Vec<u8>, now: Instant) {
        let parsed = packet::parse(&frame);
        let claimable = parsed.as_ref().is_some_and(|h| self.reaches_open_conn(h));
        self.emit_packet_claimable(&frame, now, claimable);
        self.handle_frame(frame, parsed, now);
        // `reaches_open_conn` predicted where the frame went; had it not got there, its
        // event would be left without bytes: counted as lost instead.
        debug_assert!(self.claim.is_none(), "a claimed frame did not reach its socket");
        self.claim_frame();
    }

    /// [`Engine::ingest`] of a frame whose packet event is out, with its headers.
    fn handle_frame(&mut self, frame: Vec<u8>, parsed: Option<Headers>, now: Instant) {
        let Some(h) = parsed else {
            // ARP, and anything we do not parse: smoltcp's business.
            self.dev.rx.push_back(frame);
            return;
        };
        if self.peer_mac.is_none() || h.src_mac != self.peer_mac.unwrap_or_default() {
            self.peer_mac = Some(h.src_mac);
        }
        if h.fragment {
            let whole = self.frags.push(&frame, &h, now);
            self.dev.recycle(frame);
            let Some(whole) = whole else { return };
            let Some(h) = packet::parse(&whole.frame) else { return };
            self.dispatch(whole.frame, &h, now);
            // The datagram was counted as one packet; each further fragment is one more,
            // and adds its headers to the bytes on the wire.
            if let Some(id) = self.flow_of_outbound(&h) {
                for &extra in &whole.extra_headers {
                    self.account_headers(id, DIR_OUT, extra, now);
                }
            }
            return;
        }
        self.dispatch(frame, &h, now);
    }

    /// Hands one whole packet from the command to the handler of its protocol.
    fn dispatch(&mut self, frame: Vec<u8>, h: &Headers, now: Instant) {
        let h = *h;
        match h.proto {
            PROTO_TCP => self.ingest_tcp(frame, &h, now),
            PROTO_UDP => self.ingest_udp(frame, &h, now),
            PROTO_ICMP if h.icmp_type == ICMP_ECHO_REQUEST => self.ingest_ping(frame, &h, now),
            PROTO_ICMPV6 if h.icmp_type == ICMPV6_ECHO_REQUEST => self.ingest_ping(frame, &h, now),
            _ => self.dev.rx.push_back(frame),
        }
    }

    /// The flow a packet from the command belongs to.
    fn flow_of_outbound(&self, h: &Headers) -> Option<FlowId> {
        let key = match h.proto {
            PROTO_TCP | PROTO_UDP => FlowKey::new(h.proto, h.src_addr(), h.dst_addr()),
            PROTO_ICMP | PROTO_ICMPV6 => {
                let family = if h.src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
                let (local, remote) =
                    FlowKey::icmp_ports(family, h.icmp_type, h.icmp_code, h.src_port);
                FlowKey::new(h.proto, SocketAddr::new(h.src, local), SocketAddr::new(h.dst, remote))
            }
            _ => return None,
        };
        self.by_key.get(&key).copied()
    }

    /// Counts one more packet of `ip_bytes` header bytes and no payload to flow `id`: a
    /// fragment after the first of a datagram already counted whole.
    fn account_headers(&mut self, id: FlowId, dir: usize, ip_bytes: u32, now: Instant) {
        let ns = self.unix(now);
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.stats.account(dir, ip_bytes, 0, 0, ns);
        }
    }

    /// Queues the whole IP packet `frame` (built by the engine) for the command, in
    /// fragments if it does not fit the tap's MTU, counted to flow `id`.
    fn send_datagram(&mut self, frame: Vec<u8>, id: FlowId, now: Instant) {
        if frame.len() <= self.cfg.mtu + ETH_HEADER_LEN {
            self.send_frame(frame, Some(id), now);
            return;
        }
        let Some(h) = packet::parse(&frame) else { return };
        let ident = self.next_frag_ident;
        self.next_frag_ident = self.next_frag_ident.wrapping_add(1);
        let pieces = frag::fragment(&frame, self.cfg.mtu, ident);
        self.dev.recycle(frame);
        self.account(id, DIR_IN, &h, now);
        let wire = pieces.iter().map(|p| p.len() - ETH_HEADER_LEN).sum();
        for extra in frag::extra_header_bytes(wire, h.ip_len as usize, pieces.len()) {
            self.account_headers(id, DIR_IN, extra, now);
        }
        self.out.extend(pieces);
    }

    /// Where a new flow to `dst` goes, or why it may not.
    fn route(&self, proto: u8, dst: SocketAddr) -> Result<Target, Unreachable> {
        let net = &self.cfg.net;
        let ip = dst.ip();
        if net.is_resolver(ip) {
            return if dst.port() == 53 { Ok(Target::DnsRelay) } else { Err(Unreachable::Port) };
        }
        if net.is_gateway(ip) {
            if !self.cfg.allow_host_loopback {
                return Err(Unreachable::Prohibited);
            }
            let lo = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            return Ok(Target::Direct(SocketAddr::new(lo, dst.port())));
        }
        if packet::is_host_loopback(ip) {
            return Err(Unreachable::Prohibited);
        }
        if net.is_on_link(ip) || ip.is_multicast() || ip.is_unspecified() || is_broadcast(ip) {
            return Err(Unreachable::Host);
        }
        let _ = proto;
        Ok(Target::Direct(dst))
    }

    fn ingest_tcp(&mut self, frame: Vec<u8>, h: &Headers, now: Instant) {
        let key = FlowKey::new(PROTO_TCP, h.src_addr(), h.dst_addr());
        if let Some(&id) = self.by_key.get(&key) {
            self.account(id, DIR_OUT, h, now);
            let Some(flow) = self.flows.get_mut(&id) else { return };
            match &mut flow.state {
                FlowState::TcpConnecting { syn } => {
                    if h.tcp_flags & TCP_SYN != 0 {
                        // A retransmitted SYN replaces the held one.
                        *syn = frame;
                    }
                }
                FlowState::TcpOpen { child_rst, .. } => {
                    if h.tcp_flags & TCP_RST != 0 {
                        *child_rst = true;
                    }
                    self.conn_ingress(id, frame, now);
                }
                _ => self.dev.rx.push_back(frame),
            }
            return;
        }
        if h.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
            // Not a new connection: smoltcp answers segments of unknown ones with RST.
            self.dev.rx.push_back(frame);
            return;
        }
        match self.route(PROTO_TCP, h.dst_addr()) {
            Ok(target) => {
                let id = self.new_flow(key, FlowState::TcpConnecting { syn: frame }, now);
                self.account(id, DIR_OUT, h, now);
                self.emit_flow(id, FlowPhase::Start);
                if h.ttl != DEFAULT_HOPS {
                    self.actions.push_back(Action::TcpHopLimit { id, hops: h.ttl });
                }
                self.actions.push_back(Action::TcpConnect { id, target });
            }
            Err(why) => {
                let id = self.new_flow(key, FlowState::TcpConnecting { syn: Vec::new() }, now);
                self.account(id, DIR_OUT, h, now);
                self.emit_flow(id, FlowPhase::Start);
                self.reject(id, h, &frame, why, now);
                self.end_flow(id, CloseReason::Failed);
            }
        }
    }

    /// Answers the packet `frame` of flow `id` with an RST (TCP, refused) or an ICMP error.
    fn reject(&mut self, id: FlowId, h: &Headers, frame: &[u8], why: Unreachable, now: Instant) {
        let Some(b) = self.builder() else { return };
        let mut out = self.dev.take();
        if h.proto == PROTO_TCP && why == Unreachable::Port {
            b.rst_for_syn(h, &mut out);
        } else {
            let from = match h.dst {
                IpAddr::V4(_) => IpAddr::V4(self.cfg.net.gateway_v4),
                IpAddr::V6(_) => IpAddr::V6(self.cfg.net.gateway_v6),
            };
            b.unreachable(from, h, frame, why, &mut out);
        }
        if let Some(r) = packet::parse(&out) {
            self.account(id, DIR_IN, &r, now);
        }
        self.out.push_back(out);
    }

    fn ingest_udp(&mut self, frame: Vec<u8>, h: &Headers, now: Instant) {
        let key = FlowKey::new(PROTO_UDP, h.src_addr(), h.dst_addr());
        let payload = h.payload(&frame).to_vec();
        let id = match self.by_key.get(&key) {
            Some(&id) => {
                self.account(id, DIR_OUT, h, now);
                id
            }
            None => {
                let dst = h.dst;
                if dst.is_multicast() || is_broadcast(dst) || dst.is_unspecified() {
                    // mDNS, SSDP and friends: nothing upstream to relay them to.
                    self.dev.recycle(frame);
                    return;
                }
                let route = self.route(PROTO_UDP, h.dst_addr());
                let id = self.new_flow(key, FlowState::Udp { last_out: Vec::new(), hops: 0 }, now);
                self.account(id, DIR_OUT, h, now);
                self.emit_flow(id, FlowPhase::Start);
                match route {
                    Ok(target) => {
                        self.actions.push_back(Action::UdpOpen { id, target });
                        id
                    }
                    Err(why) => {
                        self.reject(id, h, &frame, why, now);
                        self.end_flow(id, CloseReason::Failed);
                        self.dev.recycle(frame);
                        return;
                    }
                }
            }
        };
        if let Some(Flow { state: FlowState::Udp { last_out, hops }, .. }) = self.flows.get_mut(&id)
        {
            // Enough of the datagram for an ICMP error to quote (IP header + 8 bytes).
            last_out.clear();
            last_out.extend_from_slice(&frame[..frame.len().min(h.payload_offset + 8)]);
            if *hops != h.ttl {
                *hops = h.ttl;
                self.actions.push_back(Action::SetHopLimit { id, hops: h.ttl });
            }
        }
        self.actions.push_back(Action::UdpSend { id, payload });
        self.dev.recycle(frame);
    }

    fn ingest_ping(&mut self, frame: Vec<u8>, h: &Headers, now: Instant) {
        let net = &self.cfg.net;
        if net.is_gateway(h.dst) || net.is_resolver(h.dst) {
            // smoltcp answers pings to its own addresses.
            self.dev.rx.push_back(frame);
            return;
        }
        let family = if h.src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
        let (local_port, remote_port) =
            FlowKey::icmp_ports(family, h.icmp_type, h.icmp_code, h.src_port);
        let key = FlowKey::new(
            h.proto,
            SocketAddr::new(h.src, local_port),
            SocketAddr::new(h.dst, remote_port),
        );
        let id = match self.by_key.get(&key) {
            Some(&id) => {
                self.account(id, DIR_OUT, h, now);
                id
            }
            None => {
                if self.route(h.proto, h.dst_addr()).is_err() {
                    self.dev.recycle(frame);
                    return;
                }
                let id = self.new_flow(key, FlowState::Icmp { sent: VecDeque::new() }, now);
                self.account(id, DIR_OUT, h, now);
                self.emit_flow(id, FlowPhase::Start);
                id
            }
        };
        if let Some(Flow { state: FlowState::Icmp { sent }, .. }) = self.flows.get_mut(&id) {
            if sent.len() == ICMP_QUOTES_KEPT {
                sent.pop_front();
            }
            sent.push_back((h.icmp_seq, frame[..frame.len().min(h.payload_offset)].to_vec()));
        }
        let payload = h.payload(&frame).to_vec();
        let (remote, seq, hops) = (h.dst, h.icmp_seq, h.ttl);
        self.actions.push_back(Action::Ping { id, remote, seq, hops, payload });
        self.dev.recycle(frame);
    }

    /// The upstream of TCP flow `id` accepted: let the command's SYN through.
    pub fn tcp_connected(&mut self, id: FlowId, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let FlowState::TcpConnecting { syn } = &mut flow.state else { return };
        let syn = std::mem::take(syn);
        let key = flow.key;
        let (lent, [rx, tx]) = self.buffers.lend();
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
        // ACK at once: a delayed ACK only slows the command's sender down (the 10 ms
        // default shows up as a stall on every window-limited round trip).
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        let endpoint =
            IpListenEndpoint { addr: Some(key.remote_ip().into()), port: key.remote_port };
        let mut set = SocketSet::new(Vec::new());
        let listening = socket.listen(endpoint).is_ok();
        let handle = set.add(socket);
        let conn = Conn { set, dirty: false, poll_at: None, lent: Some(lent) };
        if !listening {
            if let Some(bufs) = conn.into_buffers() {
                self.buffers.give_back(bufs, 0);
            }
            self.end_flow(id, CloseReason::Failed);
            return;
        }
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.state = FlowState::TcpOpen { handle, child_rst: false, end: None };
        }
        self.conns.insert(id, conn);
        // The held SYN, then the SYN-ACK at once (the command's connect waits for it).
        self.conn_ingress(id, syn, now);
        self.egress(id, now);
        self.collect_tx(now);
    }

    /// The upstream connect of TCP flow `id` failed.
    pub fn tcp_connect_failed(&mut self, id: FlowId, why: ConnectFailure, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let FlowState::TcpConnecting { syn } = &mut flow.state else { return };
        let syn = std::mem::take(syn);
        if let Some(h) = packet::parse(&syn) {
            let why = match why {
                ConnectFailure::Refused => Unreachable::Port,
                ConnectFailure::Unreachable => Unreachable::Host,
                ConnectFailure::Prohibited => Unreachable::Prohibited,
            };
            self.reject(id, &h, &syn, why, now);
        }
        self.end_flow(id, CloseReason::Failed);
    }

    /// The upstream connect of TCP flow `id` drew ICMP error `err` from `from` (a router,
    /// when the command's SYN had a small TTL): the command gets that error, quoting its SYN.
    pub fn tcp_connect_icmp_error(
        &mut self,
        id: FlowId,
        from: Option<IpAddr>,
        err: IcmpError,
        now: Instant,
    ) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let FlowState::TcpConnecting { syn } = &mut flow.state else { return };
        let syn = std::mem::take(syn);
        let from = from.unwrap_or(flow.key.remote_ip());
        self.forward_icmp_error(id, from, &syn, err, now);
        self.end_flow(id, CloseReason::Failed);
    }

    /// The smoltcp socket of TCP flow `id`, and whether the command reset it.
    pub fn tcp_socket(&mut self, id: FlowId) -> Option<(&mut tcp::Socket<'static>, bool)> {
        let flow = self.flows.get(&id)?;
        let FlowState::TcpOpen { handle, child_rst, .. } = flow.state else { return None };
        // The relay may queue data or read (opening the window): poll it next time.
        self.mark_dirty(id);
        let conn = self.conns.get_mut(&id)?;
        Some((conn.set.get_mut::<tcp::Socket>(handle), child_rst))
    }

    /// The relay of TCP flow `id` is over.
    pub fn tcp_relay_done(&mut self, id: FlowId, how: RelayEnd, now: Instant) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        let FlowState::TcpOpen { handle, end, child_rst } = &mut flow.state else { return };
        let reason = match how {
            RelayEnd::Fin => CloseReason::Fin,
            RelayEnd::UpstreamReset | RelayEnd::ChildReset => CloseReason::Rst,
        };
        let abort = how == RelayEnd::UpstreamReset && !*child_rst;
        let handle = *handle;
        *end = Some((reason, now + self.cfg.tcp_linger));
        if abort && let Some(conn) = self.conns.get_mut(&id) {
            conn.set.get_mut::<tcp::Socket>(handle).abort();
        }
        self.mark_dirty(id);
        self.closing.push(id);
    }

    /// A datagram from the upstream of UDP flow `id`, for the command.
    pub fn udp_reply(&mut self, id: FlowId, payload: &[u8], now: Instant) {
        let Some(flow) = self.flows.get(&id) else { return };
        if !matches!(flow.state, FlowState::Udp { .. }) {
            return;
        }
        let (from, to) = (flow.key.remote(), flow.key.local());
        let Some(b) = self.builder() else { return };
        if from.port() == 53
            && let Some(ev) = dns::parse_response(payload, from, DnsTransport::Udp, self.unix(now))
        {
            self.emit(Event::Dns(ev));
        }
        let mut out = self.dev.take();
        b.udp(from, to, payload, &mut out);
        self.send_datagram(out, id, now);
    }

    /// A DNS response the command received over TCP on flow `id` (already delimited).
    pub fn tcp_dns_answer(&mut self, id: FlowId, message: &[u8], now: Instant) {
        let Some(flow) = self.flows.get(&id) else { return };
        if let Some(ev) =
            dns::parse_response(message, flow.key.remote(), DnsTransport::Tcp, self.unix(now))
        {
            self.emit(Event::Dns(ev));
        }
    }

    /// The upstream of UDP flow `id` is unreachable (ICMP error on the host socket).
    pub fn udp_unreachable(&mut self, id: FlowId, why: Unreachable, now: Instant) {
        let Some(Flow { state: FlowState::Udp { last_out, .. }, .. }) = self.flows.get(&id) else {
            return;
        };
        let original = last_out.clone();
        if let Some(h) = packet::parse_prefix(&original) {
            self.reject(id, &h, &original, why, now);
        }
    }

    /// The host socket of UDP flow `id` received ICMP error `err` from `from` (a router on
    /// the path, or the destination; `None`: the destination): the command gets the same
    /// error from the same address, quoting its last datagram.
    pub fn udp_icmp_error(
        &mut self,
        id: FlowId,
        from: Option<IpAddr>,
        err: IcmpError,
        now: Instant,
    ) {
        let Some(Flow { state: FlowState::Udp { last_out, .. }, key, .. }) = self.flows.get(&id)
        else {
            return;
        };
        let (original, from) = (last_out.clone(), from.unwrap_or(key.remote_ip()));
        self.forward_icmp_error(id, from, &original, err, now);
    }

    /// Echo request `seq` of ICMP flow `id` drew ICMP error `err` from `from`.
    pub fn icmp_echo_error(
        &mut self,
        id: FlowId,
        seq: u16,
        from: Option<IpAddr>,
        err: IcmpError,
        now: Instant,
    ) {
        let Some(Flow { state: FlowState::Icmp { sent }, key, .. }) = self.flows.get(&id) else {
            return;
        };
        let Some((_, original)) = sent.iter().rev().find(|(s, _)| *s == seq) else { return };
        let (original, from) = (original.clone(), from.unwrap_or(key.remote_ip()));
        self.forward_icmp_error(id, from, &original, err, now);
    }

    /// Sends the command ICMP error `err` from `from` about `original` (a stored prefix of
    /// a frame it sent), counted to flow `id`.
    fn forward_icmp_error(
        &mut self,
        id: FlowId,
        from: IpAddr,
        original: &[u8],
        err: IcmpError,
        now: Instant,
    ) {
        let (Some(b), Some(h)) = (self.builder(), packet::parse_prefix(original)) else { return };
        if from.is_ipv4() != h.src.is_ipv4() {
            return;
        }
        let mut out = self.dev.take();
        b.icmp_error(from, &h, original, err, &mut out);
        self.send_frame(out, Some(id), now);
    }

    /// An echo reply to ICMP flow `id`.
    pub fn icmp_echo_reply(&mut self, id: FlowId, seq: u16, payload: &[u8], now: Instant) {
        let Some(flow) = self.flows.get(&id) else { return };
        let (from, to, ident) = (flow.key.remote_ip(), flow.key.local_ip(), flow.key.local_port);
        let Some(b) = self.builder() else { return };
        let mut out = self.dev.take();
        b.echo_reply(from, to, ident, seq, payload, &mut out);
        self.send_datagram(out, id, now);
    }

    /// Runs smoltcp, collects what it sends, and does the periodic work.
    pub fn poll(&mut self, now: Instant) {
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(conn) = self.conns.get_mut(&id)
                && conn.poll_at == Some(at)
            {
                conn.poll_at = None;
                self.mark_dirty(id);
            }
        }
        for id in std::mem::take(&mut self.dirty) {
            self.egress(id, now);
        }
        self.collect_tx(now);
        self.reap_closing(now);
        if now >= self.next_housekeeping {
            self.housekeeping(now);
            self.next_housekeeping = now + HOUSEKEEPING;
        }
    }

    /// Moves smoltcp's frames to the output queue, counting each to its flow.
    fn collect_tx(&mut self, now: Instant) {
        self.dev.reclaim();
        while let Some(frame) = self.dev.tx.pop_front() {
            self.send_frame(frame, None, now);
        }
    }

    fn reap_closing(&mut self, now: Instant) {
        if self.closing.is_empty() {
            return;
        }
        let closing = std::mem::take(&mut self.closing);
        for id in closing {
            let Some(flow) = self.flows.get(&id) else { continue };
            let FlowState::TcpOpen { handle, end: Some((reason, deadline)), .. } = flow.state
            else {
                continue;
            };
            let Some(conn) = self.conns.get_mut(&id) else {
                self.end_flow(id, reason);
                continue;
            };
            let socket = conn.set.get_mut::<tcp::Socket>(handle);
            let done = matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait);
            if done || now >= deadline {
                if !done {
                    socket.abort();
                    self.egress(id, now);
                    self.collect_tx(now);
                }
                self.end_flow(id, reason);
            } else {
                self.closing.push(id);
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        self.frags.expire(now);
        let mut idle = Vec::new();
        let mut updates = Vec::new();
        for (&id, flow) in &self.flows {
            let timeout = match flow.state {
                FlowState::Udp { .. } => Some(self.cfg.udp_idle),
                FlowState::Icmp { .. } => Some(self.cfg.icmp_idle),
                _ => None,
            };
            if timeout.is_some_and(|t| now >= flow.last_seen + t) {
                idle.push(id);
            } else if now >= flow.next_update
                && flow.stats.packets[0] + flow.stats.packets[1] != flow.packets_reported
            {
                updates.push(id);
            }
        }
        for id in updates {
            self.emit_flow(id, FlowPhase::Update);
            if let Some(flow) = self.flows.get_mut(&id) {
                flow.next_update = now + self.cfg.flow_update_interval;
            }
        }
        for id in idle {
            self.end_flow(id, CloseReason::IdleTimeout);
            self.actions.push_back(Action::Close { id });
        }
    }

    /// The command exited: every live flow ends.
    pub fn shutdown(&mut self) {
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            self.end_flow(id, CloseReason::CommandExit);
        }
        self.flush_events();
    }

    /// The state of flow `id`, for diagnostics (`SYN-RECEIVED (connecting upstream)`, ...).
    pub fn flow_state(&self, id: FlowId) -> Option<String> {
        self.flows.get(&id).map(|f| f.state.to_string())
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if a.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        backend::rootless::packet::tests::{CHILD_MAC, tcp_from_child, udp_from_child},
        event::{self, Direction},
    };
    use childflow_common::flow::{PROTO_ICMP, TCP_FIN};
    use crossbeam_channel::Receiver;
    use smoltcp::{
        iface::{Config as IfaceConfig, Interface, SocketSet},
        wire::{IpAddress, Ipv4Address},
    };

    fn t(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    fn engine_with(f: impl FnOnce(&mut EngineConfig)) -> (Engine, crate::event::Events) {
        let (emitter, rx) = event::channel(100_000);
        let mut cfg = EngineConfig::new(1500, 1_000_000_000);
        cfg.tcp_buffer = 64 * 1024;
        f(&mut cfg);
        (Engine::new(cfg, emitter, t(0)), rx)
    }

    fn engine() -> (Engine, crate::event::Events) {
        engine_with(|_| {})
    }

    fn outputs(e: &mut Engine) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| e.pop_out()).collect()
    }

    /// The driver's part: writes (here: drops) the frames for the tap and reports them sent.
    fn write_out(e: &mut Engine, now: Instant) {
        while let Some(frame) = e.pop_out() {
            e.sent(frame, now);
        }
    }

    fn actions(e: &mut Engine) -> Vec<Action> {
        std::iter::from_fn(|| e.pop_action()).collect()
    }

    fn flow_events(rx: &Receiver<Event>) -> Vec<FlowUpdate> {
        rx.try_iter()
            .filter_map(|e| match e {
                Event::Flow(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn connect_id(actions: &[Action]) -> FlowId {
        match actions {
            [Action::TcpConnect { id, .. }] => *id,
            other => panic!("expected one TcpConnect, got {other:?}"),
        }
    }

    #[test]
    fn a_syn_is_answered_only_after_the_upstream_connect_succeeds() {
        let (mut e, rx) = engine();
        let mut child = Child::new();
        let buf = || tcp::SocketBuffer::new(vec![0u8; 4096]);
        let mut client = tcp::Socket::new(buf(), buf());
        client.connect(child.iface.context(), (IpAddress::v4(198, 18, 0, 1), 80), 40_000).unwrap();
        let c = child.sockets.add(client);
        child.exchange(&mut e, t(0), |_| {});
        assert_eq!(
            actions(&mut e),
            [Action::TcpConnect {
                id: 1,
                target: Target::Direct("198.18.0.1:80".parse().unwrap())
            }]
        );
        assert_eq!(e.flow_state(1).as_deref(), Some("SYN-RECEIVED (connecting upstream)"));
        // The command retransmits its SYN meanwhile; still no answer.
        child.exchange(&mut e, t(1500), |_| {});
        assert_eq!(child.sockets.get::<tcp::Socket>(c).state(), tcp::State::SynSent);
        e.tcp_connected(1, t(1600));
        child.exchange(&mut e, t(1600), |_| {});
        assert_eq!(child.sockets.get::<tcp::Socket>(c).state(), tcp::State::Established);
        assert_eq!(e.flow_state(1).as_deref(), Some("ESTABLISHED"));
        let flows = flow_events(&rx);
        assert_eq!(flows[0].phase, FlowPhase::Start);
        assert_eq!(flows[0].key.to_string(), "tcp 10.0.2.100:40000 -> 198.18.0.1:80");
    }

    #[test]
    fn a_refused_upstream_becomes_a_rst_and_a_failed_flow() {
        let (mut e, rx) = engine();
        e.ingest(tcp_from_child("10.0.2.100:40001", "198.18.0.1:81", 7, true, b""), t(0));
        let id = connect_id(&actions(&mut e));
        e.tcp_connect_failed(id, ConnectFailure::Refused, t(1));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!(h.tcp_flags, TCP_RST | TCP_ACK);
        let flows = flow_events(&rx);
        let end = flows.last().unwrap();
        assert_eq!(end.phase, FlowPhase::End(CloseReason::Failed));
        assert_eq!(end.stats.packets, [1, 1], "the SYN and the RST are counted");
        assert_eq!(e.flow_count(), 0);
        // The engine carries on: the same port again opens a new flow.
        e.ingest(tcp_from_child("10.0.2.100:40001", "198.18.0.1:81", 9, true, b""), t(2));
        assert_eq!(connect_id(&actions(&mut e)), id + 1);
    }

    #[test]
    fn an_unreachable_upstream_becomes_icmp_host_unreachable() {
        let (mut e, _rx) = engine();
        e.ingest(tcp_from_child("[fd00:cf::100]:40002", "[2001:db8::9]:80", 7, true, b""), t(0));
        let id = connect_id(&actions(&mut e));
        e.tcp_connect_failed(id, ConnectFailure::Unreachable, t(1));
        let h = packet::parse(&outputs(&mut e)[0]).unwrap();
        assert_eq!((h.proto, h.icmp_type, h.icmp_code), (PROTO_ICMPV6, 1, 3));
        assert_eq!(h.src, IpAddr::V6(Addressing::default().gateway_v6));
    }

    #[test]
    fn host_loopback_needs_the_flag() {
        let (mut e, _rx) = engine();
        e.ingest(tcp_from_child("10.0.2.100:40003", "10.0.2.2:22", 7, true, b""), t(0));
        assert!(actions(&mut e).is_empty());
        let h = packet::parse(&outputs(&mut e)[0]).unwrap();
        assert_eq!((h.proto, h.icmp_type, h.icmp_code), (PROTO_ICMP, 3, 10), "host prohibited");

        let (mut e, _rx) = engine_with(|c| c.allow_host_loopback = true);
        e.ingest(tcp_from_child("10.0.2.100:40003", "10.0.2.2:22", 7, true, b""), t(0));
        assert_eq!(
            actions(&mut e),
            [Action::TcpConnect { id: 1, target: Target::Direct("127.0.0.1:22".parse().unwrap()) }]
        );
    }

    #[test]
    fn udp_sessions_relay_replies_and_end_when_idle() {
        let (mut e, rx) = engine();
        e.ingest(udp_from_child("10.0.2.100:5000", "198.18.0.2:7", b"ping"), t(0));
        e.ingest(udp_from_child("10.0.2.100:5000", "198.18.0.2:7", b"ping2"), t(1));
        let acts = actions(&mut e);
        assert_eq!(
            acts,
            [
                Action::UdpOpen { id: 1, target: Target::Direct("198.18.0.2:7".parse().unwrap()) },
                Action::SetHopLimit { id: 1, hops: 64 },
                Action::UdpSend { id: 1, payload: b"ping".to_vec() },
                Action::UdpSend { id: 1, payload: b"ping2".to_vec() },
            ]
        );
        e.udp_reply(1, b"pong", t(2));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!(h.src_addr(), "198.18.0.2:7".parse().unwrap());
        assert_eq!(h.dst_addr(), "10.0.2.100:5000".parse().unwrap());
        assert_eq!(h.payload(&out[0]), b"pong");
        assert_eq!(&out[0][..6], &CHILD_MAC, "sent to the MAC the command used");

        e.poll(t(59_000));
        assert!(actions(&mut e).is_empty(), "not idle yet");
        e.poll(t(62_100));
        assert_eq!(actions(&mut e), [Action::Close { id: 1 }]);
        let flows = flow_events(&rx);
        let end = flows.last().unwrap();
        assert_eq!(end.phase, FlowPhase::End(CloseReason::IdleTimeout));
        assert_eq!(end.stats.packets, [2, 1]);
        assert_eq!(end.stats.payload_bytes, [9, 4]);
        assert!(flows.iter().any(|f| f.phase == FlowPhase::Update), "a periodic update");
    }

    #[test]
    fn udp_errors_become_icmp_port_unreachable() {
        let (mut e, _rx) = engine();
        e.ingest(udp_from_child("10.0.2.100:5001", "198.18.0.2:9", &[1; 300]), t(0));
        let _ = actions(&mut e);
        e.udp_unreachable(1, Unreachable::Port, t(1));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!((h.icmp_type, h.icmp_code), (3, 3));
        // The quote holds the original destination port.
        let quote = h.payload(&out[0]);
        assert_eq!(&quote[22..24], &9u16.to_be_bytes());
    }

    #[test]
    fn a_udp_probe_takes_the_commands_ttl_and_its_time_exceeded_comes_from_the_router() {
        let (mut e, rx) = engine();
        let mut probe = udp_from_child("10.0.2.100:40000", "198.19.0.2:33434", &[0; 32]);
        probe[14 + 8] = 1; // TTL 1, as traceroute's first probe
        let probe = fix_ipv4_checksum(probe);
        e.ingest(probe.clone(), t(0));
        let acts = actions(&mut e);
        assert_eq!(acts[1], Action::SetHopLimit { id: 1, hops: 1 }, "before the datagram");
        assert!(matches!(acts[2], Action::UdpSend { id: 1, .. }));
        let router: IpAddr = "198.18.0.2".parse().unwrap();
        e.udp_icmp_error(1, Some(router), IcmpError::time_exceeded(true), t(1));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).expect("the ICMP error parses");
        assert_eq!((h.proto, h.icmp_type, h.icmp_code), (PROTO_ICMP, 11, 0));
        assert_eq!(h.src, router, "from the router, not the gateway");
        assert_eq!(h.dst, IpAddr::V4(Addressing::default().child_v4));
        let quote = &out[0][h.l4_offset + 8..];
        assert_eq!(quote, &probe[14..14 + 28], "the probe's IP header and UDP header");
        let flows = flow_events(&rx);
        assert_eq!(flows[0].phase, FlowPhase::Start);
        // A second probe with the same TTL sets nothing; another TTL sets it again.
        e.ingest(udp_from_child("10.0.2.100:40000", "198.19.0.2:33434", &[0; 32]), t(2));
        assert_eq!(actions(&mut e)[0], Action::SetHopLimit { id: 1, hops: 64 });
    }

    #[test]
    fn a_syn_with_a_small_ttl_connects_with_it_and_gets_the_routers_time_exceeded() {
        let (mut e, rx) = engine();
        let mut syn = tcp_from_child("10.0.2.100:40000", "198.19.0.2:80", 7, true, b"");
        syn[14 + 8] = 2;
        let syn = fix_ipv4_checksum(syn);
        e.ingest(syn.clone(), t(0));
        let acts = actions(&mut e);
        assert_eq!(acts[0], Action::TcpHopLimit { id: 1, hops: 2 });
        assert!(matches!(acts[1], Action::TcpConnect { id: 1, .. }));
        let router: IpAddr = "198.18.0.2".parse().unwrap();
        e.tcp_connect_icmp_error(1, Some(router), IcmpError::time_exceeded(true), t(1));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!((h.icmp_type, h.src), (11, router));
        assert_eq!(&out[0][h.l4_offset + 8..], &syn[14..14 + 28], "quotes the SYN");
        assert_eq!(flow_events(&rx).last().unwrap().phase, FlowPhase::End(CloseReason::Failed));
        // The usual TTL asks for nothing special.
        e.ingest(tcp_from_child("10.0.2.100:40001", "198.19.0.2:80", 7, true, b""), t(2));
        assert!(matches!(actions(&mut e)[..], [Action::TcpConnect { .. }]));
    }

    #[test]
    fn a_v6_port_unreachable_comes_from_the_destination() {
        let (mut e, _rx) = engine();
        e.ingest(udp_from_child("[fd00:cf::100]:40000", "[2001:db8:1:1::2]:33434", b"x"), t(0));
        let _ = actions(&mut e);
        e.udp_icmp_error(1, None, IcmpError { icmp_type: 1, code: 4 }, t(1));
        let h = packet::parse(&outputs(&mut e)[0]).unwrap();
        assert_eq!((h.proto, h.icmp_type, h.icmp_code), (PROTO_ICMPV6, 1, 4));
        assert_eq!(h.src, "2001:db8:1:1::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn an_echo_requests_time_exceeded_quotes_that_request() {
        let (mut e, _rx) = engine();
        for seq in [1, 2] {
            let mut req = Vec::new();
            etherparse::PacketBuilder::ethernet2(CHILD_MAC, Addressing::default().gateway_mac)
                .ipv4([10, 0, 2, 100], [198, 19, 0, 2], seq as u8)
                .icmpv4_echo_request(0x77, seq)
                .write(&mut req, b"abc")
                .unwrap();
            e.ingest(req, t(0));
        }
        let acts = actions(&mut e);
        assert!(matches!(acts[1], Action::Ping { seq: 2, hops: 2, .. }), "{acts:?}");
        let router: IpAddr = "198.18.0.2".parse().unwrap();
        e.icmp_echo_error(1, 1, Some(router), IcmpError::time_exceeded(true), t(1));
        e.icmp_echo_error(1, 9, Some(router), IcmpError::time_exceeded(true), t(1));
        let out = outputs(&mut e);
        assert_eq!(out.len(), 1, "an unknown sequence number draws nothing");
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!((h.icmp_type, h.src), (11, router));
        let quote = &out[0][h.l4_offset + 8..];
        assert_eq!(quote[8], 1, "the quoted TTL is request 1's");
        assert_eq!(&quote[20..28], &[8, 0, quote[22], quote[23], 0, 0x77, 0, 1]);
    }

    #[test]
    fn fragmented_datagrams_are_relayed_whole_and_replies_fragmented() {
        for (from, to) in
            [("10.0.2.100:5000", "198.18.0.2:7"), ("[fd00:cf::100]:5000", "[2001:db8::2]:7")]
        {
            let (mut e, rx) = engine();
            let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
            let whole = udp_from_child(from, to, &payload);
            let frags = frag::fragment(&whole, 1500, 42);
            assert_eq!(frags.len(), 3);
            let wire: u64 = frags.iter().map(|f| (f.len() - ETH_HEADER_LEN) as u64).sum();
            for f in frags {
                e.ingest(f, t(0));
            }
            let acts = actions(&mut e);
            let sent: Vec<&Vec<u8>> = acts
                .iter()
                .filter_map(|a| match a {
                    Action::UdpSend { payload, .. } => Some(payload),
                    _ => None,
                })
                .collect();
            assert_eq!(sent, [&payload], "{from}: one datagram, whole");
            e.udp_reply(1, &payload, t(1));
            let out = outputs(&mut e);
            assert_eq!(out.len(), 3, "{from}: the reply in fragments");
            let mut r = frag::Reassembler::default();
            let back = out
                .iter()
                .filter_map(|f| {
                    assert!(f.len() <= 1500 + ETH_HEADER_LEN, "fits the tap");
                    r.push(f, &packet::parse(f).unwrap(), t(1))
                })
                .next()
                .expect("the command can reassemble the reply");
            let h = packet::parse(&back.frame).unwrap();
            assert_eq!(h.payload(&back.frame), &payload[..]);
            e.shutdown();
            let end = flow_events(&rx).pop().unwrap();
            assert_eq!(end.stats.packets, [3, 3], "{from}: each fragment is a packet");
            assert_eq!(end.stats.bytes[0], wire, "{from}: IP bytes as on the wire");
            assert_eq!(end.stats.payload_bytes, [4000, 4000]);
        }
    }

    fn fix_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
        let ip = &mut frame[14..34];
        ip[10] = 0;
        ip[11] = 0;
        let sum = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        frame
    }

    #[test]
    fn dns_answers_through_the_relay_are_reported() {
        use hickory_proto::{
            op::{Message, OpCode, Query},
            rr::{Name, RData, Record, RecordType, rdata::A},
        };
        let (mut e, rx) = engine();
        e.ingest(udp_from_child("10.0.2.100:5353", "10.0.2.3:53", b"\x12\x34query"), t(0));
        let acts = actions(&mut e);
        assert_eq!(acts[0], Action::UdpOpen { id: 1, target: Target::DnsRelay });
        let mut msg = Message::response(0x1234, OpCode::Query);
        let name = Name::from_ascii("www.example.test.").unwrap();
        msg.queries.push(Query::query(name.clone(), RecordType::A));
        msg.answers.push(Record::from_rdata(
            name,
            60,
            RData::A(A::from(Ipv4Address::new(198, 18, 1, 2))),
        ));
        e.udp_reply(1, &msg.to_vec().unwrap(), t(3));
        let dns: Vec<_> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Dns(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(dns.len(), 1);
        assert_eq!(dns[0].query, "www.example.test");
        assert_eq!(dns[0].server, "10.0.2.3:53".parse().unwrap());
        assert_eq!(packet::parse(&outputs(&mut e)[0]).unwrap().src_port, 53);
    }

    #[test]
    fn pings_become_actions_and_replies_keep_the_commands_identifier() {
        let (mut e, _rx) = engine();
        let mut req = Vec::new();
        etherparse::PacketBuilder::ethernet2(CHILD_MAC, Addressing::default().gateway_mac)
            .ipv4([10, 0, 2, 100], [198, 18, 0, 2], 64)
            .icmpv4_echo_request(0x77, 3)
            .write(&mut req, b"abc")
            .unwrap();
        e.ingest(req, t(0));
        assert_eq!(
            actions(&mut e),
            [Action::Ping {
                id: 1,
                remote: "198.18.0.2".parse().unwrap(),
                seq: 3,
                hops: 64,
                payload: b"abc".to_vec()
            }]
        );
        e.icmp_echo_reply(1, 3, b"abc", t(1));
        let out = outputs(&mut e);
        let h = packet::parse(&out[0]).unwrap();
        assert_eq!((h.icmp_type, h.src_port, h.icmp_seq), (0, 0x77, 3));
        assert_eq!(h.payload(&out[0]), b"abc");
    }

    #[test]
    fn garbage_frames_do_not_disturb_the_engine() {
        let (mut e, _rx) = engine();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let frame: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            e.ingest(frame, t(len as i64));
            e.poll(t(len as i64));
        }
        let mut frame = tcp_from_child("10.0.2.100:1", "198.18.0.1:80", 1, true, b"");
        frame[14] = 0x4f; // IHL beyond the packet
        e.ingest(frame, t(500));
        e.poll(t(500));
        e.ingest(tcp_from_child("10.0.2.100:2", "198.18.0.1:80", 1, true, b""), t(501));
        assert_eq!(actions(&mut e).len(), 1, "a well-formed SYN still works");
    }

    /// The command's side, simulated with a second smoltcp interface wired to the engine
    /// by in-memory frames: a deterministic, lossless link.
    struct Child {
        iface: Interface,
        dev: Queues,
        sockets: SocketSet<'static>,
    }

    impl Child {
        fn new() -> Child {
            let mut dev = Queues::new(1500);
            let cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(CHILD_MAC)));
            let mut iface = Interface::new(cfg, &mut dev, t(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 100), 24));
            });
            iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(10, 0, 2, 2)).unwrap();
            Child { iface, dev, sockets: SocketSet::new(Vec::new()) }
        }

        /// Moves frames both ways until nothing moves, running the engine's relay step
        /// `relay` (standing in for the driver's upstream side) each round.
        fn exchange(&mut self, e: &mut Engine, now: Instant, mut relay: impl FnMut(&mut Engine)) {
            for _ in 0..1000 {
                self.iface.poll(now, &mut self.dev, &mut self.sockets);
                let mut moved = false;
                while let Some(f) = self.dev.tx.pop_front() {
                    e.ingest(f, now);
                    moved = true;
                }
                relay(e);
                e.poll(now);
                while let Some(f) = e.pop_out() {
                    self.dev.rx.push_back(f);
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
            panic!("the link never went quiet");
        }
    }

    #[test]
    fn a_connection_carries_data_both_ways_and_half_closes() {
        let (mut e, rx) = engine();
        let mut child = Child::new();
        let buf = || tcp::SocketBuffer::new(vec![0u8; 256 * 1024]);
        let mut client = tcp::Socket::new(buf(), buf());
        client.connect(child.iface.context(), (IpAddress::v4(198, 18, 0, 1), 80), 40_000).unwrap();
        let c = child.sockets.add(client);
        child.exchange(&mut e, t(0), |_| {});
        let id = connect_id(&actions(&mut e));
        assert_eq!(
            child.sockets.get::<tcp::Socket>(c).state(),
            tcp::State::SynSent,
            "no SYN-ACK while connecting"
        );
        e.tcp_connected(id, t(1));
        child.exchange(&mut e, t(1), |_| {});
        assert_eq!(child.sockets.get::<tcp::Socket>(c).state(), tcp::State::Established);

        // 100 KB from the command, 200 KB to it (more than the engine's 64 KB buffers).
        let upload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let download: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let (mut sent_up, mut got_up, mut sent_down) = (0, Vec::new(), 0);
        let mut got_down = Vec::new();
        for round in 0..200 {
            let s = child.sockets.get_mut::<tcp::Socket>(c);
            if sent_up < upload.len() {
                sent_up += s.send_slice(&upload[sent_up..]).unwrap();
            } else if s.may_send() {
                s.close(); // half-close from the command
            }
            while s.can_recv() {
                let mut chunk = [0u8; 8192];
                let n = s.recv_slice(&mut chunk).unwrap();
                got_down.extend_from_slice(&chunk[..n]);
            }
            child.exchange(&mut e, t(2 + round), |e| {
                let Some((sock, _)) = e.tcp_socket(id) else { return };
                while sock.can_recv() {
                    let mut chunk = [0u8; 8192];
                    let n = sock.recv_slice(&mut chunk).unwrap();
                    got_up.extend_from_slice(&chunk[..n]);
                }
                if sent_down < download.len() && sock.can_send() {
                    sent_down += sock.send_slice(&download[sent_down..]).unwrap();
                }
            });
            if got_down.len() == download.len() && got_up.len() == upload.len() {
                break;
            }
        }
        assert_eq!(got_up, upload, "the upload arrives intact");
        assert_eq!(got_down, download, "the download arrives intact");
        let (sock, _) = e.tcp_socket(id).unwrap();
        assert!(
            matches!(sock.recv_slice(&mut []), Err(tcp::RecvError::Finished)),
            "the command's FIN reached the engine while the download went on"
        );
        sock.close();
        e.tcp_relay_done(id, RelayEnd::Fin, t(300));
        child.exchange(&mut e, t(300), |_| {});
        assert_eq!(e.flow_count(), 0, "the flow ends once both sides closed");
        let flows = flow_events(&rx);
        let end = flows.last().unwrap();
        assert_eq!(end.phase, FlowPhase::End(CloseReason::Fin));
        assert_eq!(end.stats.payload_bytes, [100_000, 200_000]);
        assert_eq!(end.stats.tcp_flags[0] & TCP_FIN, TCP_FIN);
        // First occurrences on this lossless link: the engine's ACKs ride on its data until
        // the command's FIN, which it acknowledges alone.
        assert_eq!(end.stats.history(), b"ShADdFaf");
        let packets = rx.try_iter().count();
        assert_eq!(packets, 0, "events were drained above");
    }

    #[test]
    fn a_closed_connections_buffers_serve_the_next_one() {
        let (mut e, _rx) = engine();
        let mut child = Child::new();
        for (round, port) in [40_001u16, 40_002].into_iter().enumerate() {
            let now = t(1000 * round as i64);
            let buf = || tcp::SocketBuffer::new(vec![0u8; 4096]);
            let mut client = tcp::Socket::new(buf(), buf());
            client
                .connect(child.iface.context(), (IpAddress::v4(198, 18, 0, 1), 80), port)
                .unwrap();
            let c = child.sockets.add(client);
            child.exchange(&mut e, now, |_| {});
            let id = connect_id(&actions(&mut e));
            e.tcp_connected(id, now);
            assert!(e.buffers.free.is_empty(), "round {round}: the socket took the free buffers");
            child.exchange(&mut e, now, |_| {});
            let msg = format!("hello {round}");
            child.sockets.get_mut::<tcp::Socket>(c).send_slice(msg.as_bytes()).unwrap();
            let mut got = Vec::new();
            child.exchange(&mut e, now, |e| {
                let Some((sock, _)) = e.tcp_socket(id) else { return };
                while sock.can_recv() {
                    let mut chunk = [0u8; 64];
                    let n = sock.recv_slice(&mut chunk).unwrap();
                    got.extend_from_slice(&chunk[..n]);
                }
            });
            assert_eq!(got, msg.as_bytes(), "round {round}: the bytes arrive, and only they");
            child.sockets.get_mut::<tcp::Socket>(c).close();
            e.tcp_socket(id).expect("the connection is open").0.close();
            e.tcp_relay_done(id, RelayEnd::Fin, now);
            child.exchange(&mut e, now, |_| {});
            assert_eq!(e.flow_count(), 0, "round {round}: the flow ended");
            assert_eq!(e.buffers.free.len(), 2, "round {round}: both buffers came back");
            child.sockets.remove(c);
        }
    }

    #[test]
    fn the_pool_keeps_at_most_keep_buffers() {
        let mut pool = BufferPool::new(1024);
        let lent: Vec<Lent> = (0..BufferPool::KEEP).map(|_| pool.lend().0).collect();
        for l in lent {
            // SAFETY: the slices `lend` returned were dropped at once.
            pool.give_back(unsafe { l.reclaim() }, 0);
        }
        assert_eq!(pool.free.len(), BufferPool::KEEP);
    }

    #[test]
    fn a_filled_buffer_gives_its_pages_back_before_it_is_kept() {
        let size = 2 * BufferPool::KEEP_TOUCHED;
        let mut pool = BufferPool::new(size);
        let (l, [rx, tx]) = pool.lend();
        assert!(rx.iter().chain(tx.iter()).all(|&b| b == 0), "a new buffer reads as zeros");
        rx.fill(7);
        tx[..100].fill(7);
        // SAFETY: `rx` and `tx` are not used again.
        pool.give_back(unsafe { l.reclaim() }, size as u64);
        let (l, [rx, tx]) = pool.lend();
        assert!(
            rx.iter().chain(tx.iter()).all(|&b| b == 0),
            "a buffer a connection filled comes back without its pages"
        );
        rx[..100].fill(9);
        // SAFETY: as above.
        pool.give_back(unsafe { l.reclaim() }, 100);
        let (_l, [rx, tx]) = pool.lend();
        assert!(
            rx[..100].iter().chain(tx[..100].iter()).any(|&b| b == 9),
            "a lightly used buffer keeps its pages (no system call, no page faults)"
        );
    }

    #[test]
    fn the_pool_keeps_at_most_its_budget_resident() {
        let size = BufferPool::KEEP_TOUCHED;
        let mut pool = BufferPool::new(size);
        let n = 2 * BufferPool::RESIDENT_BUDGET / size + 2;
        let lent: Vec<Lent> = (0..n)
            .map(|_| {
                let (l, [rx, tx]) = pool.lend();
                rx.fill(7);
                tx.fill(7);
                l
            })
            .collect();
        for l in lent {
            // SAFETY: the slices were dropped above.
            pool.give_back(unsafe { l.reclaim() }, size as u64);
        }
        assert_eq!(pool.free.len(), 2 * n, "every buffer is kept");
        // What the memory holds, not the pool's own count: a buffer that kept its pages
        // still reads 7, one that gave them back reads zeros.
        // SAFETY: the pool's buffers are not lent, and nothing writes them meanwhile.
        let bytes = |b: &SocketBuf| unsafe { std::slice::from_raw_parts(b.ptr.as_ptr(), b.len) };
        let kept = pool.free.iter().filter(|b| bytes(b).iter().step_by(4096).all(|&x| x == 7));
        let kept = kept.count();
        let released = pool.free.iter().filter(|b| bytes(b).iter().all(|&x| x == 0)).count();
        assert_eq!(kept + released, 2 * n, "each buffer is either whole or given back");
        assert_eq!(kept, BufferPool::RESIDENT_BUDGET / size, "kept up to the budget");
        assert!(pool.resident <= BufferPool::RESIDENT_BUDGET, "{} bytes", pool.resident);
        let lent: Vec<Lent> = (0..n).map(|_| pool.lend().0).collect();
        assert_eq!(pool.resident, 0, "all lent out again");
        drop(lent);
    }

    #[test]
    fn deferred_flows_reach_the_attribution_thread_at_the_flush() {
        let (tx, keys) = crossbeam_channel::unbounded();
        let (mut e, _rx) = engine_with(|c| c.new_flows = Some(tx));
        e.defer_events();
        e.ingest(tcp_from_child("10.0.2.100:40000", "198.18.0.1:80", 1, true, b""), t(0));
        assert!(keys.try_recv().is_err(), "nothing before the flush (the SYN-ACK comes first)");
        e.flush_events();
        let lookup = keys.try_recv().expect("the SYN's flow goes to attribution at the flush");
        assert_eq!(lookup.key.to_string(), "tcp 10.0.2.100:40000 -> 198.18.0.1:80");
        let mut wait = e.attribution_of(1).expect("a TCP flow's relay waits for its lookup");
        assert!(wait.try_recv().is_err(), "not over before the lookup");
        lookup.done.expect("a TCP lookup says when it is over").send(()).unwrap();
        assert!(wait.try_recv().is_ok());
    }

    #[test]
    fn an_open_connections_frames_reach_the_capture_intact_without_a_copy() {
        let (mut e, rx) = engine_with(|c| c.snaplen = Some(262_144));
        e.defer_events();
        let mut child = Child::new();
        let buf = || tcp::SocketBuffer::new(vec![0u8; 64 * 1024]);
        let mut client = tcp::Socket::new(buf(), buf());
        client.connect(child.iface.context(), (IpAddress::v4(198, 18, 0, 1), 80), 40_000).unwrap();
        let c = child.sockets.add(client);
        let (mut sent, mut buffers) = (Vec::new(), std::collections::HashSet::new());
        let mut step = |e: &mut Engine, child: &mut Child, now: Instant| {
            for _ in 0..1000 {
                child.iface.poll(now, &mut child.dev, &mut child.sockets);
                let mut moved = false;
                while let Some(f) = child.dev.tx.pop_front() {
                    sent.push(f.clone());
                    buffers.insert(f.as_ptr() as usize);
                    e.ingest(f, now);
                    moved = true;
                }
                if let Some((sock, _)) = e.tcp_socket(1) {
                    while sock.can_recv() {
                        let _ = sock.recv(|b| (b.len(), ()));
                    }
                }
                e.poll(now);
                while let Some(f) = e.pop_out() {
                    child.dev.rx.push_back(f);
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
        };
        step(&mut e, &mut child, t(0));
        let id = connect_id(&actions(&mut e));
        e.tcp_connected(id, t(1));
        step(&mut e, &mut child, t(1));
        let upload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut up = 0;
        for round in 0..100 {
            up += child.sockets.get_mut::<tcp::Socket>(c).send_slice(&upload[up..]).unwrap();
            step(&mut e, &mut child, t(2 + round));
            if up == upload.len() {
                break;
            }
        }
        e.flush_events();
        // Handed over, an event's bytes are the ingested frame's own buffer.
        let out: Vec<Vec<u8>> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Packet(p) if p.direction == Direction::Out => Some(p.data.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(out.len(), sent.len(), "one packet event per frame of the command");
        assert!(out == sent, "each event holds its frame's bytes, in order");
        let claimed = out.iter().filter(|d| buffers.contains(&(d.as_ptr() as usize))).count();
        assert!(claimed > 10, "the data frames went to the capture without a copy: {claimed}");
    }

    #[test]
    fn every_frame_is_reported_as_a_packet_event() {
        let (mut e, rx) = engine();
        e.ingest(udp_from_child("10.0.2.100:5000", "198.18.0.2:7", b"x"), t(0));
        e.udp_reply(1, b"y", t(1));
        write_out(&mut e, t(1));
        let dirs: Vec<Direction> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Packet(p) => Some(p.direction),
                _ => None,
            })
            .collect();
        assert_eq!(dirs, [Direction::Out, Direction::In]);
    }

    #[test]
    fn a_large_frame_to_the_command_goes_to_the_capture_in_its_own_buffer() {
        let (emitter, rx) = event::channel(1000);
        let mut cfg = EngineConfig::new(65_520, 1_000_000_000);
        cfg.snaplen = Some(262_144);
        let mut e = Engine::new(cfg, emitter, t(0));
        e.ingest(udp_from_child("10.0.2.100:5000", "198.18.0.2:7", b"x"), t(0));
        e.udp_reply(1, &[7; 20_000], t(1));
        let frames = outputs(&mut e);
        assert_eq!(frames.len(), 1, "one frame at this MTU");
        let (at, bytes) = (frames[0].as_ptr() as usize, frames[0].clone());
        for frame in frames {
            e.sent(frame, t(2));
        }
        let inbound: Vec<PacketEvent> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Packet(p) if p.direction == Direction::In => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(inbound.len(), 1);
        assert_eq!(inbound[0].data, bytes, "the event holds the frame as written");
        assert_eq!(inbound[0].data.as_ptr() as usize, at, "in the frame's own buffer");
        assert_eq!(inbound[0].ts, 1_000_000_000 + 2_000_000, "stamped when it was written");
    }

    #[test]
    fn deferred_events_wait_for_the_flush_in_order() {
        let (mut e, rx) = engine();
        e.defer_events();
        e.ingest(udp_from_child("10.0.2.100:5000", "198.18.0.2:7", b"x"), t(0));
        e.udp_reply(1, b"y", t(1));
        write_out(&mut e, t(1));
        assert_eq!(rx.try_iter().count(), 0, "nothing is sent before the flush");
        e.flush_events();
        let kinds: Vec<&str> = rx
            .try_iter()
            .map(|e| match e {
                Event::Packet(p) if p.direction == Direction::Out => "out",
                Event::Packet(_) => "in",
                Event::Flow(_) => "flow",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["out", "flow", "in"], "the events keep their order");
        e.shutdown();
        assert!(
            matches!(rx.try_iter().last(), Some(Event::Flow(f)) if f.phase == FlowPhase::End(CloseReason::CommandExit)),
            "shutdown flushes the flows' ends"
        );
    }

    #[test]
    fn frames_the_capture_filter_rejects_are_reported_without_their_bytes() {
        let filter = crate::capture::filter::Filter::parse("udp and dst port 53")
            .expect("the test filter parses");
        let (mut e, rx) = engine_with(|c| {
            c.snaplen = Some(65535);
            c.capture_filter = Some(filter.program);
        });
        let kept = udp_from_child("10.0.2.100:5000", "198.18.0.2:53", b"kept");
        let skipped = udp_from_child("10.0.2.100:5001", "198.18.0.2:7", b"skipped");
        let (kept_len, skipped_len) = (kept.len(), skipped.len());
        e.ingest(kept.clone(), t(0));
        e.ingest(skipped, t(1));
        let packets: Vec<PacketEvent> = rx
            .try_iter()
            .filter_map(|e| match e {
                Event::Packet(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(packets.len(), 2, "both frames are reported (the capture counts them)");
        assert_eq!(packets[0].data, kept, "a matching frame carries its bytes");
        assert_eq!(packets[0].orig_len as usize, kept_len);
        assert!(packets[1].data.is_empty(), "a rejected frame is not copied");
        assert_eq!(packets[1].orig_len as usize, skipped_len, "but its length is known");
    }
}
