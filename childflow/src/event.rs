//! The one event model both backends emit, and the channel that carries it.
//!
//! The rootful backend (eBPF ring buffers and map samples) and the rootless engine (frames at
//! its tap) both turn what they see into [`Event`]s and hand them to an [`Emitter`]. One
//! collector drains the channel into the flow table, which feeds the flow logs, the pcapng
//! writer and the dashboard. Nothing downstream knows which backend ran.
//!
//! Invariants every backend keeps:
//! - Flow keys are oriented from the command's side ([`FlowKey`]: `local` is the command).
//! - [`FlowUpdate::stats`] is cumulative (never a delta) and its `first_ns`/`last_ns` are
//!   nanoseconds since the UNIX epoch (backends convert their monotonic clocks once).
//! - Every timestamp in an event is nanoseconds since the UNIX epoch.
//! - Emitting never blocks the backend: when the channel is full the event is dropped and
//!   counted ([`Emitter::dropped`]), and the count is shown to the user.
//! - Large packet copies come from [`packet_bytes`] (or are filled by the backend in a
//!   [`packet_buffer`]: the rootless engine hands over the tap frames its sockets consumed)
//!   and go back with [`recycle_packet_bytes`] once the collector is done with them (see
//!   [`packet_bytes`] for why).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

pub use childflow_common::flow::{FlowKey, FlowStats};
use crossbeam_channel::{Receiver, Sender};

/// Nanoseconds since the UNIX epoch.
pub type UnixNanos = u64;

/// The current wall-clock time as [`UnixNanos`].
pub fn now_unix_nanos() -> UnixNanos {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Which way a packet went, relative to the command tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Sent by the command tree.
    Out,
    /// Received by the command tree.
    In,
}

impl Direction {
    /// The index used by [`FlowStats`]' per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::Out => childflow_common::flow::DIR_OUT,
            Direction::In => childflow_common::flow::DIR_IN,
        }
    }
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Both sides sent FIN.
    Fin,
    /// A RST ended it.
    Rst,
    /// No packet for the protocol's idle timeout.
    IdleTimeout,
    /// The command exited while the flow was still live.
    CommandExit,
    /// The flow table was full and dropped it (`--max-flows`).
    Evicted,
    /// The backend could not open or keep the flow (e.g. the upstream refused it).
    Failed,
}

/// Where a flow is in its life, as a backend reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowPhase {
    /// First sighting of the flow.
    Start,
    /// A periodic snapshot of a live flow.
    Update,
    /// The flow is over; no further events for this key until it starts again.
    End(CloseReason),
}

/// A flow's cumulative counters at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowUpdate {
    pub key: FlowKey,
    /// Cumulative; `first_ns`/`last_ns` in [`UnixNanos`].
    pub stats: FlowStats,
    pub phase: FlowPhase,
}

/// One packet at the capture point (the host veth, or the rootless tap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketEvent {
    pub ts: UnixNanos,
    pub direction: Direction,
    /// The packet's length on the wire; `data` may be shorter (snap length).
    pub orig_len: u32,
    /// The captured bytes, starting with the Ethernet header. Empty (with `orig_len > 0`)
    /// when the backend's capture filter rejected the frame: the capture counts it as
    /// filtered out without the backend copying it.
    pub data: PacketData,
}

/// [`PacketEvent::data`]: the bytes in a buffer of their own, or lent by the backend from
/// memory it shares with the kernel (the rootful backend's packet ring), where they stay
/// until the last reader drops them.
///
/// Why lent bytes: in a rootful bulk capture to disk, copying each 64 KiB super-packet out
/// of the ring was the backend thread's largest cost (`memmove`: 7.5% of all CPU samples of
/// `perf record -a`, 2026-12-07), while a direct file can hand the ring's pages to the
/// device as they are (`capture/direct.rs`).
pub enum PacketData {
    Owned(Vec<u8>),
    Lent(Lent),
}

impl PacketData {
    /// Gives the bytes back: a buffer to the pool ([`recycle_packet_bytes`]), lent bytes to
    /// their lender.
    pub fn recycle(self) {
        match self {
            PacketData::Owned(buf) => recycle_packet_bytes(buf),
            PacketData::Lent(lent) => drop(lent),
        }
    }
}

impl Default for PacketData {
    fn default() -> Self {
        PacketData::Owned(Vec::new())
    }
}

impl From<Vec<u8>> for PacketData {
    fn from(buf: Vec<u8>) -> Self {
        PacketData::Owned(buf)
    }
}

impl std::ops::Deref for PacketData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            PacketData::Owned(buf) => buf,
            PacketData::Lent(lent) => lent.bytes(),
        }
    }
}

/// A copy: lent bytes are copied into a buffer of their own.
impl Clone for PacketData {
    fn clone(&self) -> Self {
        PacketData::Owned(self.to_vec())
    }
}

impl std::fmt::Debug for PacketData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl PartialEq for PacketData {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for PacketData {}

impl PartialEq<Vec<u8>> for PacketData {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl PartialEq<PacketData> for Vec<u8> {
    fn eq(&self, other: &PacketData) -> bool {
        self[..] == **other
    }
}

/// Bytes lent by a backend ([`PacketData::Lent`]): valid and unchanged until dropped, which
/// tells the lender (through the [`Loan`]) that it may reuse them.
pub struct Lent {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    loan: Arc<Loan>,
}

// SAFETY: the bytes are only read, and stay valid and unchanged while the `Lent` lives
// (`Lent::new`'s contract), from any thread.
unsafe impl Send for Lent {}
// SAFETY: as above; `&Lent` only reads.
unsafe impl Sync for Lent {}

impl Lent {
    /// Lends `len` bytes at `ptr` under `loan`.
    ///
    /// # Safety
    /// The bytes must stay valid for reads and unchanged until [`Loan::returned`] says so,
    /// and the memory must stay mapped while `loan.memory` lives.
    pub unsafe fn new(ptr: std::ptr::NonNull<u8>, len: usize, loan: Arc<Loan>) -> Lent {
        Lent { ptr, len, loan }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Lent::new`'s contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.loan.returned.store(true, Ordering::Release);
    }
}

/// The lender's side of a [`Lent`]: whether it was dropped, and what keeps its memory.
pub struct Loan {
    returned: std::sync::atomic::AtomicBool,
    /// Keeps the memory mapped (the lender's mapping), whoever drops last.
    _memory: Arc<dyn Send + Sync>,
}

impl Loan {
    pub fn new(memory: Arc<dyn Send + Sync>) -> Arc<Loan> {
        Arc::new(Loan { returned: Default::default(), _memory: memory })
    }

    /// Whether the [`Lent`] bytes were dropped (its reads happen before this returns true).
    pub fn returned(&self) -> bool {
        self.returned.load(Ordering::Acquire)
    }
}

/// Packets at least this long are copied into pooled buffers ([`packet_bytes`]); shorter
/// ones are cheap for the allocator (its small bins never go back to the kernel).
pub const POOLED_PACKET_MIN: usize = 2048;

/// Spare buffers kept for packet copies: enough for the packets in flight while the
/// collector waits for the disk (a direct write of a 4 MiB stage takes a few ms, 64 tap
/// frames' worth at bulk rates) or for a CPU, small enough to bound the memory held (at
/// most 256 × ~64 KiB = 16 MiB with MTU 65520).
///
/// With 64, `perf record` of a rootless bulk capture to disk showed `packet_bytes` in page
/// faults (fresh buffers, zeroed by the kernel) for a quarter of childflow's samples: the
/// pool ran dry whenever the collector fell behind, and the buffers freed beyond it went
/// back to the kernel.
const POOL_MAX: usize = 256;

/// Spare packet buffers, taken by the backend thread and returned by the collector thread.
static POOL: Pool = Pool(Mutex::new(Vec::new()));

/// A copy of `bytes` for [`PacketEvent::data`], in a reused buffer when it is large.
///
/// Why a pool: the backend allocates each packet's copy and the collector, on another
/// thread, frees it. With bulk TCP through the rootless engine (64 KiB frames at ~15k/s)
/// the copies kept faulting in fresh zeroed pages (glibc gives freed memory at the top of a
/// thread's heap back to the kernel): `perf record -a` of a capture run showed the engine
/// in `clear_page_erms` for 9.5% of all CPU samples, more than its `memmove` (5.8%); with
/// the pool 0.5%. A reused buffer is already mapped (and often still in cache).
pub fn packet_bytes(bytes: &[u8]) -> Vec<u8> {
    POOL.copy(bytes)
}

/// An empty buffer of at least `capacity` bytes from the pool (or a new one), for a backend
/// that fills it itself and hands it over as [`PacketEvent::data`].
pub fn packet_buffer(capacity: usize) -> Vec<u8> {
    POOL.take(capacity)
}

/// Gives a [`PacketEvent::data`] buffer back for [`packet_bytes`] to reuse (or frees it if
/// it is small or the pool is full).
pub fn recycle_packet_bytes(buf: Vec<u8>) {
    POOL.put(buf);
}

/// A LIFO stack of spare buffers (the most recently returned one is the warmest in cache).
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn copy(&self, bytes: &[u8]) -> Vec<u8> {
        if bytes.len() < POOLED_PACKET_MIN {
            return bytes.to_vec();
        }
        let mut buf = self.take(bytes.len());
        buf.extend_from_slice(bytes);
        buf
    }

    fn take(&self, capacity: usize) -> Vec<u8> {
        let spare = self.0.lock().ok().and_then(|mut pool| {
            let at = pool.iter().rposition(|b| b.capacity() >= capacity)?;
            Some(pool.swap_remove(at))
        });
        // New buffers come from the packet arena (huge pages; see `crate::arena`).
        let mut buf =
            spare.unwrap_or_else(|| crate::arena::with_arena(|| Vec::with_capacity(capacity)));
        buf.clear();
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < POOLED_PACKET_MIN {
            return;
        }
        if let Ok(mut pool) = self.0.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(buf);
        }
    }
}

/// DNS transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTransport {
    Udp,
    Tcp,
}

/// The data of one answer record.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsData {
    /// A or AAAA.
    Addr(IpAddr),
    /// CNAME (and other records naming a host).
    Name(String),
    /// Anything else, in presentation format.
    Other(String),
}

/// One answer record of a DNS response.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsAnswer {
    /// The owner name, without the trailing dot.
    pub name: String,
    /// RR type number (1 = A, 28 = AAAA, 5 = CNAME, ...).
    pub rtype: u16,
    pub ttl: u32,
    pub data: DnsData,
}

/// A DNS response the command received (through childflow's relay or any port-53 server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    pub ts: UnixNanos,
    /// The resolver that answered.
    pub server: SocketAddr,
    pub transport: DnsTransport,
    pub id: u16,
    /// The question name, without the trailing dot.
    pub query: String,
    /// The question's RR type number.
    pub qtype: u16,
    /// Response code (0 = NOERROR, 3 = NXDOMAIN, ...).
    pub rcode: u16,
    pub answers: Vec<DnsAnswer>,
}

/// A process of the command tree, as the backend saw it use a socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    /// Process id (thread group id) in the host's pid namespace.
    pub pid: u32,
    pub uid: u32,
    /// `task->comm`.
    pub comm: String,
    /// `/proc/PID/exe`, when the process was still alive to read it.
    pub exe: Option<String>,
    /// `/proc/PID/cmdline`, when the process was still alive to read it.
    pub cmdline: Option<Vec<String>>,
}

/// The flow `key` was opened by `process`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub key: FlowKey,
    pub process: ProcessInfo,
}

/// Losses a backend counted, cumulative since the start of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropReport {
    /// What lost something, e.g. `"kernel flow ring buffer"`, `"flow map full"`.
    pub source: &'static str,
    pub count: u64,
}

/// Everything a backend reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Flow(FlowUpdate),
    Packet(PacketEvent),
    Dns(DnsEvent),
    Process(ProcessEvent),
    Drops(DropReport),
}

/// Bytes of packet data a backend that can leave packets where they are (the rootful
/// one, in the kernel's ring) lets wait for the collector (see [`PacketBudget`]): as many
/// as [`POOL_MAX`] bulk-TCP packets, so that it copies into pooled buffers only.
pub const PACKET_BUDGET: usize = 16 << 20;

/// Bytes of packet data the channel takes at most: beyond, packets are dropped (and
/// counted). Larger than [`PACKET_BUDGET`] because the rootless engine has no ring to
/// leave its frames in: this is its slack for a collector waiting on the disk.
pub const PACKET_LIMIT: usize = 4 * PACKET_BUDGET;

/// The packet bytes on their way to the collector: a backend that can wait asks for
/// [`PACKET_BUDGET`] of room ([`Emitter::has_packet_room`]), and the channel drops packets
/// past [`PACKET_LIMIT`].
///
/// Why bytes and not only events: the channel holds up to 65,536 events, which for 64 KiB
/// packets is 4 GiB. In a rootful bulk capture the collector fell behind, every packet the
/// backend copied went into fresh memory (page faults were a third of its time) and most of
/// those copies were dropped at the queue anyway. With a byte budget the rootful backend
/// stops reading the kernel's packet ring while the budget is spent: the ring holds the
/// packets meanwhile, and what it cannot hold is lost there, without a copy.
#[derive(Default)]
pub struct PacketBudget {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Set once a collector returns packets ([`Emitter::packet_budget`]); until then (unit
    /// tests reading the channel themselves) the budget is not enforced.
    enforced: std::sync::atomic::AtomicBool,
}

impl PacketBudget {
    /// Whether `len` more bytes fit (a packet is at most [`CAPTURE_MAX`] bytes, far less
    /// than the budget).
    ///
    /// [`CAPTURE_MAX`]: childflow_common::event::CAPTURE_MAX
    pub fn has_room(&self, len: usize) -> bool {
        self.fits(len, PACKET_BUDGET)
    }

    fn fits(&self, len: usize, limit: usize) -> bool {
        self.in_flight.load(Ordering::Relaxed) + len <= limit
            || !self.enforced.load(Ordering::Relaxed)
    }

    /// The collector is done with a packet of `len` bytes.
    pub fn release(&self, len: usize) {
        self.in_flight.fetch_sub(len, Ordering::Relaxed);
    }
}

/// The sending side of the event channel. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct Emitter {
    tx: Sender<Event>,
    /// Never sent on: disconnects [`Events::coalesce`] once every emitter is gone.
    _alive: Sender<()>,
    capacity: usize,
    dropped: Arc<AtomicU64>,
    budget: Arc<PacketBudget>,
}

impl Emitter {
    /// Hands `event` to the collector, or counts it as dropped if the channel is full (or,
    /// for a packet, [`PACKET_LIMIT`] bytes wait). Returns `false` once the collector is
    /// gone.
    pub fn emit(&self, event: Event) -> bool {
        let packet_len = match &event {
            Event::Packet(p) => p.data.len(),
            _ => 0,
        };
        if self.tx.len() >= self.capacity || !self.budget.fits(packet_len, PACKET_LIMIT) {
            // Full (a gone collector is noticed at the next send that finds room).
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if let Event::Packet(p) = event {
                p.data.recycle();
            }
            return true;
        }
        self.budget.in_flight.fetch_add(packet_len, Ordering::Relaxed);
        self.tx.try_send(event).is_ok()
    }

    /// Whether a packet of `len` bytes would be taken now: a backend that can leave packets
    /// where they are (the kernel's ring) asks before it copies one.
    pub fn has_packet_room(&self, len: usize) -> bool {
        self.budget.has_room(len)
    }

    /// The budget, for the collector to return packets' bytes to; from then on it is
    /// enforced.
    pub fn packet_budget(&self) -> Arc<PacketBudget> {
        self.budget.enforced.store(true, Ordering::Relaxed);
        Arc::clone(&self.budget)
    }

    /// Counts one event the backend lost on its own side (as [`Emitter::dropped`] shows).
    pub fn count_lost(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Events lost because the collector fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A handle on the [`Emitter::dropped`] count that does not keep the channel open, for
    /// the collector to read at the end.
    pub fn drop_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }
}

/// A bounded event channel: backends emit into the [`Emitter`], the collector reads the
/// [`Events`].
///
/// Bounded by a length check on an unbounded (linked-block) channel rather than by
/// crossbeam's array channel, which allocates and writes every slot up front: at 65,536
/// events of ~750 bytes that was 49 MB touched and a third of a `childflow -- true` run.
pub fn channel(capacity: usize) -> (Emitter, Events) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (alive, senders) = crossbeam_channel::bounded(0);
    let budget = Arc::new(PacketBudget::default());
    let emitter =
        Emitter { tx, _alive: alive, capacity, dropped: Arc::new(AtomicU64::new(0)), budget };
    (emitter, Events { rx, senders })
}

/// How long the collector lets events gather after it has handled all there were
/// ([`Events::coalesce`]).
pub const COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

/// The receiving side of the event channel: a [`Receiver`] (through `Deref`) that can also
/// wait without being woken by every event.
pub struct Events {
    rx: Receiver<Event>,
    /// Disconnected once every [`Emitter`] is dropped; nothing is ever sent on it.
    senders: Receiver<()>,
}

impl Events {
    /// Waits [`COALESCE`], or less if every emitter is gone meanwhile, while events gather
    /// in the channel unseen.
    ///
    /// Why: a collector blocked in `recv` is woken by each event a backend emits, a futex
    /// wake-up in the backend's thread and an inter-processor interrupt (on the test VM a
    /// VM exit on each side) every time. A command that connects in a loop made the
    /// rootless engine emit a few events per connection, and the collector's wake-ups took
    /// the command's CPU from it at every connect. Sleeping here after each drained batch
    /// turns tens of thousands of wake-ups a second into at most a thousand, and the events
    /// are still handled within about a millisecond.
    pub fn coalesce(&self) {
        let _ = self.senders.recv_timeout(COALESCE);
    }
}

/// Makes the calling thread `SCHED_BATCH`: it keeps its fair share of the CPU, but waking it
/// never preempts the thread that is running (sched(7); `check_preempt_wakeup_fair` in
/// kernel/sched/fair.c returns early for a woken task whose policy is not
/// `SCHED_NORMAL`).
///
/// For childflow's own helper threads (the collector, rootless attribution): on a machine
/// with few CPUs their wake-ups otherwise took the CPU from the command exactly when it had
/// work (the command's connect returns, and the next one starts, while the collector handles
/// that connection's events). Failure is harmless (the thread stays `SCHED_OTHER`).
pub fn yield_to_the_command() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid parameter.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
}

impl std::ops::Deref for Events {
    type Target = Receiver<Event>;

    fn deref(&self) -> &Receiver<Event> {
        &self.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drops(count: u64) -> Event {
        Event::Drops(DropReport { source: "test", count })
    }

    #[test]
    fn lent_bytes_read_like_owned_ones_and_tell_the_lender_when_dropped() {
        let memory: Arc<Vec<u8>> = Arc::new((0..100).collect());
        let loan = Loan::new(memory.clone());
        let bytes = &memory[10..20];
        // SAFETY: `memory` is never written and `loan` keeps it alive.
        let lent =
            unsafe { Lent::new(std::ptr::NonNull::from(bytes).cast(), bytes.len(), loan.clone()) };
        let data = PacketData::Lent(lent);
        assert_eq!(data, (10..20).collect::<Vec<u8>>(), "lent bytes read as the memory holds them");
        let copy = data.clone();
        assert!(matches!(copy, PacketData::Owned(_)), "a clone is a copy of its own");
        assert!(!loan.returned(), "not returned while the packet holds the bytes");
        data.recycle();
        assert!(loan.returned(), "returned once the packet is recycled");
        assert_eq!(copy, bytes.to_vec(), "the copy outlives the loan");
    }

    #[test]
    fn events_emitted_while_the_collector_coalesces_wait_for_it_and_the_end_ends_the_wait() {
        let (emitter, rx) = channel(16);
        let second = emitter.clone();
        let sender = std::thread::spawn(move || {
            for i in 0..5 {
                assert!(second.emit(drops(i)));
            }
        });
        rx.coalesce();
        sender.join().unwrap();
        let got: Vec<u64> = rx
            .try_iter()
            .map(|e| match e {
                Event::Drops(d) => d.count,
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4], "nothing emitted meanwhile is lost or reordered");
        drop(emitter);
        // Every emitter is gone: the wait ends (a collector's last coalesce does not hold up
        // the end of the run) and the channel reports the end.
        rx.coalesce();
        assert!(matches!(rx.recv(), Err(crossbeam_channel::RecvError)));
    }

    #[test]
    fn a_full_channel_counts_drops_instead_of_blocking() {
        let (emitter, rx) = channel(2);
        assert!(emitter.emit(drops(1)));
        assert!(emitter.emit(drops(2)));
        assert!(emitter.emit(drops(3)));
        assert_eq!(emitter.dropped(), 1);
        assert_eq!(rx.try_recv().unwrap(), drops(1));
    }

    #[test]
    fn large_packet_buffers_are_reused_and_small_ones_are_not_pooled() {
        let pool = Pool(Mutex::new(Vec::new()));
        let big = vec![7u8; POOLED_PACKET_MIN * 4];
        let first = pool.copy(&big);
        assert_eq!(first, big, "the copy holds the packet");
        let ptr = first.as_ptr();
        pool.put(first);
        let again = pool.copy(&big[..POOLED_PACKET_MIN]);
        assert_eq!(again.as_ptr(), ptr, "a returned buffer is handed out again");
        assert_eq!(again[..], big[..POOLED_PACKET_MIN], "the reused copy is exact");
        let small = pool.copy(&[1, 2, 3]);
        assert_eq!(small, [1, 2, 3]);
        pool.put(small);
        assert!(pool.0.lock().unwrap().is_empty(), "small buffers are not kept");
        for _ in 0..POOL_MAX + 5 {
            pool.put(vec![0; POOLED_PACKET_MIN]);
        }
        assert_eq!(pool.0.lock().unwrap().len(), POOL_MAX, "the pool is bounded");
    }

    fn packet(len: usize) -> Event {
        Event::Packet(PacketEvent {
            ts: 0,
            direction: Direction::In,
            orig_len: len as u32,
            data: vec![0; len].into(),
        })
    }

    #[test]
    fn packet_bytes_waiting_are_bounded_once_a_collector_returns_them() {
        let (emitter, rx) = channel(1 << 20);
        let chunk = PACKET_BUDGET / 4;
        // Not enforced before a collector takes the budget.
        assert!(emitter.has_packet_room(2 * PACKET_LIMIT));
        let budget = emitter.packet_budget();
        for _ in 0..4 {
            assert!(emitter.has_packet_room(chunk));
            emitter.emit(packet(chunk));
        }
        // The backend that can wait is asked to; the channel still takes packets up to
        // the limit, then drops them.
        assert!(!emitter.has_packet_room(1));
        for _ in 4..16 {
            emitter.emit(packet(chunk));
        }
        assert_eq!(emitter.dropped(), 0);
        emitter.emit(packet(chunk));
        assert_eq!((emitter.dropped(), rx.len()), (1, 16));
        // Handled packets give their bytes back.
        for event in rx.try_iter() {
            let Event::Packet(p) = event else { unreachable!() };
            budget.release(p.data.len());
        }
        assert!(emitter.has_packet_room(PACKET_BUDGET));
    }

    #[test]
    fn emit_reports_a_gone_collector() {
        let (emitter, rx) = channel(1);
        drop(rx);
        assert!(!emitter.emit(drops(1)));
    }
}
