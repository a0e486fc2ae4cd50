//! The TC program on the host end of the run's veth: per-flow accounting.
//!
//! `cf_tc` runs on both directions (two `clsact` filters): on the ingress it sees what the
//! command sends (host ingress = out of the child), on the egress what it receives (see
//! `direction`). Each packet updates its flow's counters: in its place in `SLOTS`
//! (found by a hash of the key, see `FLOWS`), or in its `FLOWS` entry if that place was
//! taken; counters with atomic adds (two CPUs may handle one flow at once), history and
//! flags with plain writes.
//! A flow's first packet and its FIN/RST go to `FLOW_EVENTS`; userspace samples the map
//! for periodic updates and retires idle flows, so the ring never carries one record per
//! packet. Wake-ups are batched: a record only wakes the reader once enough data waits.
//! The program returns `TC_ACT_UNSPEC` (the next filter, or the default action: pass): it
//! observes, never alters, traffic.
//!
//! Capture: when `CONFIG` says so, each packet the capture filter in `FILTER` matches is
//! copied (up to the snap length and `CAPTURE_MAX`) with its direction and timestamp into
//! `PACKETS`, with batched wake-ups (once per MiB when capturing, see `wakeup_crossing`),
//! and marked `PACKET_CAPTURE`: one record per packet, reserved in the ring and loaded
//! straight into it (see `copy_packet`), so GSO super-packets (64 KiB on a veth) are
//! captured whole; packets the filter rejects cost no ring space. DNS packets (port 53)
//! are always copied so userspace can name flows, unmarked unless they belong in the
//! capture. A packet whose IP headers do not parse
//! is copied unfiltered (marked) and left to userspace's filter, which stays the authority.
//! A full ring counts `DROP_PACKET_RINGBUF`; a packet the filter rejects counts
//! `COUNT_CAPTURE_FILTERED` (per CPU), so the capture statistics still see it.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_clone_redirect, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_skb_vlan_pop, bpf_skb_vlan_push,
    },
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, sk_buff::SkBuff},
};
use childflow_common::{
    event::{
        CAPTURE_MAX, CLONE_CPUS, CLONE_MAX, CLONE_MIN, CLONE_SEQ_BITS, COUNT_CAPTURE_FILTERED,
        CaptureConfig, DROP_COUNTERS, DROP_FLOW_MAP_FULL, DROP_FLOW_RINGBUF, DROP_PACKET_RINGBUF,
        DROP_PARSE, FLOW_END_FIN, FLOW_END_RST, FLOW_START, FlowRecord, KIND_FLOW, KIND_PACKET,
        PACKET_CAPTURE, PACKET_CLONED, PacketHeader,
    },
    filter::{self, Insn, MAX_INSNS, SIDE_DST, SIDE_SRC, field, op},
    flow::{
        DIR_IN, DIR_OUT, FlowEntry, FlowKey, FlowSlot, FlowStats, NO_SLOT, PROTO_TCP, PROTO_UDP,
        SlotDir, TC_CLASSID_EGRESS, TC_CLASSID_INGRESS, TCP_FIN, TCP_RST, history_bits,
        record_history,
    },
};

use crate::parse::{NotParsed, Parsed, copy_key, parse_frame, parse_frame_direct, same_key};

/// Live flows of one run. Userspace removes ended and idle ones.
pub const MAX_FLOWS: u32 = 65536;
/// Places in `SLOTS`, a power of two. A run rarely has more than a few hundred flows at
/// once; a flow whose place is taken keeps its counters in its `FLOWS` entry instead.
pub const SLOT_COUNT: u32 = 4096;
/// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h): an array map whose values start on a page
/// (kernel/bpf/arraymap.c, `array_map_alloc`), so each 256-byte slot is four whole cache
/// lines; otherwise the values start 16 bytes into a line and every line is shared by two
/// of a slot's parts (`FlowSlot`).
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `-EEXIST` from `bpf_map_update_elem` with `BPF_NOEXIST`: the key is already there.
const EEXIST: i32 = -17;
/// Wake the reader once this much data is pending; it also drains on a short timer.
const WAKEUP_BYTES: u64 = 64 * 1024;
/// [`WAKEUP_BYTES`] of `PACKETS` when capturing (a ring of 64 MiB, see `packet_ring_bytes`
/// in childflow's `ebpf` module): a bulk capture fills it at a gigabyte a second, so at
/// 64 KiB (one GSO super-packet) the reader would be woken for nearly every packet. 1 MiB
/// is a millisecond of a bulk capture and 1/64 of the ring.
const CAPTURE_WAKEUP_BYTES: u64 = 1 << 20;
/// Bytes of the kernel's own header before every ring record (`BPF_RINGBUF_HDR_SZ`); a
/// record takes its length plus this, rounded up to 8 (kernel/bpf/ringbuf.c).
const RINGBUF_HDR: usize = 8;

/// Every live flow, and where its counters are ([`FlowEntry`]): in the entry, or in the
/// flow's place in `SLOTS`.
///
/// Why the slots: on real traffic a hash map lookup cost ~100–200 ns per packet (bulk TCP,
/// `bpf_stats` with and without it: the map's header, the bucket and three lines of the
/// element are cache misses between two packets of a flow, on top of the call and the
/// jhash of 40 bytes), most of the program's cost. A flow's place in `SLOTS` is a hash of
/// its key (`slot_of`): a packet reads it with an inlined array access, two cache lines
/// (the key's, its direction's), and checks the key there; only packets of flows without a place, and a flow's first,
/// pay the lookup here.
///
/// Not preallocated (`BPF_F_NO_PREALLOC`): preallocating 64 Ki entries costs milliseconds
/// at every start, and a run rarely has more than a few hundred flows.
#[map]
static FLOWS: HashMap<FlowKey, FlowEntry> = HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Flows' places (see `FLOWS`). A slot's key is written last when a flow takes it, after
/// its counters and its `FLOWS` entry; userspace retires a flow by deleting its entry, then
/// zeroing its slot (no packet finds it by the key any more), and frees the place in
/// `CLAIMED` only after a quarantine that outlasts any program run still writing to it.
#[map]
static SLOTS: Array<FlowSlot> = Array::with_max_entries(SLOT_COUNT, BPF_F_MMAPABLE);

/// The places in `SLOTS` that belong to a flow (or are in quarantine). A flow takes its
/// place by inserting it here with `BPF_NOEXIST`: the one atomic test-and-set the bpf
/// target has without compare-and-swap (`--cpu generic`).
#[map]
static CLAIMED: HashMap<u32, u32> = HashMap::with_max_entries(SLOT_COUNT, BPF_F_NO_PREALLOC);

#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU scratch space: the parsed packet and a new flow's first entry stay off the
/// 512-byte BPF stack. What every packet touches comes first.
#[repr(C)]
struct Scratch {
    clock: TickClock,
    parsed: Parsed,
    entry: FlowEntry,
    /// `OUTCOME_*` bits (see `account`).
    outcome: u32,
    /// The packet's direction (`DIR_*`), read back from here where it is needed (see
    /// `account`).
    dir: u32,
    /// This CPU's count of clones handed to the capture tap (see `clone_packet`).
    clone_seq: u32,
}

/// A per-CPU clock of tick resolution for "last seen": the time of this CPU's first packet
/// in the current jiffy. Reading the clock source (`bpf_ktime_get_ns`, a paravirtual clock
/// in a VM) on every packet cost ~40 ns, as did `bpf_ktime_get_coarse_ns` (a seqcount loop
/// and a timespec conversion); `bpf_jiffies64` is a plain load, so the precise clock is
/// read at most once per tick per CPU. The value lags the true time by less than a tick
/// (`CLOCK_MONOTONIC_COARSE` does too) and never runs ahead of it.
#[repr(C)]
struct TickClock {
    jiffies: u64,
    ns: u64,
}

impl TickClock {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        // SAFETY: neither helper has preconditions.
        let j = unsafe { bpf_jiffies64() };
        if j != self.jiffies {
            self.jiffies = j;
            self.ns = unsafe { bpf_ktime_get_ns() };
        }
        self.ns
    }
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_COUNTERS, 0);

/// `BPF_F_RDONLY_PROG` (include/uapi/linux/bpf.h): programs may only read the map. With the
/// map frozen by userspace before the programs load, the verifier reads its contents as
/// constants and skips the code a run cannot reach (kernel/bpf/verifier.c,
/// `bpf_map_is_rdonly`): with capture off, the filter interpreter is never verified.
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// Capture settings, written and frozen by userspace before the programs are loaded.
#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

/// The capture filter (see `childflow_common::filter`); a zero `len` matches everything.
#[map]
static FILTER: Array<filter::Program> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

/// The filter's bit stack and its depth, per CPU. Kept in map memory on purpose: the
/// verifier does not track what a map value holds, so every path through one step of the
/// filter loop ends in the same state and is pruned. In registers, each step's exact
/// stack would be a new state, and 64 steps exceed the verifier's million instructions.
#[map]
static FILTER_STACK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Captured packets and DNS. The loader sizes it per run (`packet_ring_bytes` in
/// childflow's `ebpf` module): large when capturing, small for DNS alone.
#[map]
static PACKETS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// A CPU's clones per forced wake-up of the ring's reader (see `clone_packet`).
const CLONE_WAKEUP: u32 = 16;

/// `ETH_P_8021Q` (include/uapi/linux/if_ether.h), the clone tag's VLAN protocol.
const ETH_P_8021Q: u16 = 0x8100;

/// Bytes of a `PacketHeader`, at the start of every packet record.
const HEADER: usize = core::mem::size_of::<PacketHeader>();

const DNS_PORT: u16 = 53;

/// The TC program, on both directions of the host end (one `clsact` filter each, see
/// childflow's `ebpf` module): one program to verify at start-up instead of one per
/// direction, and one copy of its code in the caches for both.
#[classifier]
pub fn cf_tc(ctx: TcContext) -> i32 {
    account(&ctx);
    TC_ACT_UNSPEC
}

/// Which way the packet goes: from the classid of the filter that runs the program, which
/// `cls_bpf` puts into the packet's `tc_classid` (the minor, a `u16`) before every run
/// (net/sched/cls_bpf.c, `cls_bpf_classify`): [`TC_CLASSID_INGRESS`] (1) → `DIR_OUT`,
/// [`TC_CLASSID_EGRESS`] (2) → `DIR_IN`. Unlike comparing `ingress_ifindex` with `ifindex`,
/// this holds for a packet forwarded back out of the interface it came in by.
///
/// A test run (`BPF_PROG_TEST_RUN`, `cargo xtask bench rootful --prog-run`) cannot set
/// `tc_classid` (it is 0 there, never on a filter): there, a packet with an ingress
/// interface goes out of the command, one without goes in.
///
/// Computed without a branch, and handed on through map memory (see `account`).
#[inline(always)]
fn direction(ctx: &TcContext) -> usize {
    const _: () = assert!(TC_CLASSID_INGRESS >> 1 == DIR_OUT as u16);
    const _: () = assert!(TC_CLASSID_EGRESS >> 1 == DIR_IN as u16);
    // SAFETY: reading fields of the program's own context.
    let (classid, ingress) =
        unsafe { ((*ctx.skb.skb).tc_classid as u64, (*ctx.skb.skb).ingress_ifindex as u64) };
    // 1 if `x` (a u32) is 0, else 0.
    let is_zero = |x: u64| x.wrapping_sub(1) >> 63;
    (((classid >> 1) & 1) | (is_zero(classid) & is_zero(ingress))) as usize
}

/// Turns the key of a packet parsed as if the command sent it (source = local) around if
/// the command receives it (`dir_mask` all ones): the addresses, and the ports if they are
/// ports (TCP, UDP; ICMP's are the same both ways). Arithmetic only, no branch on the
/// direction: after a branch the verifier would know the direction exactly on each side,
/// and walk everything after it once per direction (a TC program with the direction in a
/// register verified 14,563 instructions, against 6,237 for one fixed direction).
#[inline(always)]
fn orient(p: &mut Parsed, dir_mask: u64) {
    // The key as five words: local address (0, 1), remote address (2, 3), then the local
    // and the remote port in the low 32 bits of word 4 (little-endian).
    let w = (&raw mut p.key).cast::<u64>();
    let port_mask = dir_mask & 0u64.wrapping_sub(merged(&p.has_ports) as u64);
    // SAFETY: the 40-byte, 8-aligned key (in the scratch map value) as five words.
    unsafe {
        let mut i = 0;
        while i < 2 {
            let (a, b) = (w.add(i).read(), w.add(i + 2).read());
            let x = (a ^ b) & dir_mask;
            w.add(i).write(a ^ x);
            w.add(i + 2).write(b ^ x);
            i += 1;
        }
        let v = w.add(4).read();
        let x = ((v ^ (v >> 16)) & 0xffff) & port_mask;
        w.add(4).write(v ^ x ^ (x << 16));
    }
}

/// `Scratch::outcome` bits: the packet is DNS; it parsed (or is not IP: nothing to parse).
const OUTCOME_DNS: u32 = 1;
const OUTCOME_PARSED: u32 = 2;

/// The per-packet path. Laid out for a packet of a known flow, the common case: parse in
/// place, one `FLOWS` lookup, the counters, done; on real traffic the caches are cold
/// between two packets of a flow, and each cache line of code or data the program touches
/// is a miss. Everything else is marked cold (`cold_path`), so LLVM places it after the hot
/// path: the full parser ([`cf_parse_slow`]), a new flow ([`cf_new_flow`]), a FIN/RST
/// ([`end_reason`]), capture and DNS ([`cf_capture`]).
///
/// The full parser, a new flow and capture are *global* functions (BPF-to-BPF calls), see
/// [`cf_parse_slow`]. As static subprograms (plain `#[inline(never)]`) they cost more than
/// inline: the verifier walks a static subprogram once per caller state (7,088
/// instructions verified instead of 5,552, when there was a TC program per direction).
///
/// The direction goes through map memory (`Scratch::dir`): the verifier does not track what
/// map memory holds, so to it the direction is "0 or 1" everywhere, and no path is walked
/// once per direction. The packet is parsed as if the command sent it, then turned around
/// if it receives it ([`orient`]), both without a branch on the direction.
#[inline(always)]
fn account(ctx: &TcContext) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map slot; programs do not migrate CPUs while running.
    let scratch = unsafe { &mut *scratch };
    // SAFETY (both): a field of this CPU's scratch slot.
    unsafe { (&raw mut scratch.dir).write_volatile(direction(ctx) as u32) };
    let dir = (merged(&scratch.dir) & 1) as usize;
    let outcome = if parse_frame_direct(&ctx.skb, DIR_OUT, &mut scratch.parsed) {
        OUTCOME_PARSED
    } else {
        core::hint::cold_path();
        cf_parse_slow(ctx.skb.skb)
    };
    let mut dns = 0;
    // The slow parser zeroed the key of a packet that is not IP: family 0, not DNS.
    if outcome & OUTCOME_PARSED != 0 {
        orient(&mut scratch.parsed, 0u64.wrapping_sub(dir as u64));
        let p = &scratch.parsed;
        if merged(&p.key.family) != 0 {
            update(p, &mut scratch.clock, dir);
        }
        let proto = merged(&p.key.proto);
        if (proto == PROTO_UDP || proto == PROTO_TCP)
            && (merged(&p.key.remote_port) == DNS_PORT || merged(&p.key.local_port) == DNS_PORT)
        {
            dns = OUTCOME_DNS;
        }
    }
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.capture_all != 0 || dns != 0 {
        core::hint::cold_path();
        // SAFETY: a field of this CPU's scratch slot; read back volatile in there.
        unsafe { (&raw mut scratch.outcome).write_volatile(outcome | dns) };
        cf_capture(ctx.skb.skb, dir as u32);
    }
}

/// A field of the parsed packet, read back from map memory (volatile): the verifier does
/// not track what map memory holds, so what each parser path knows about the value (an
/// exact protocol, zero flags for UDP) is forgotten here and the paths merge into one walk
/// of the flow update; in a register, each would walk it on its own.
#[inline(always)]
fn merged<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid for reads.
    unsafe { (field as *const T).read_volatile() }
}

/// The full parser ([`parse_frame`]) into this CPU's scratch, for what
/// [`parse_frame_direct`] does not take: IPv4 options, fragments, IPv6 extension headers,
/// ICMP, other protocols, headers beyond the linear part, malformed packets, not IP.
/// Returns `OUTCOME_PARSED` if the packet parsed or is not IP (key zeroed), 0 if it is
/// malformed (counted as `DROP_PARSE`).
///
/// A global function, as are [`cf_new_flow`] and [`cf_capture`]: `no_mangle`, so its BTF
/// linkage is `global` (the object keeps its BTF for this, see childflow's `build.rs`),
/// its arguments scalars or the context. The verifier checks a global function once, on
/// its own, from its arguments' types alone (a `FUNC ... is safe for any args` line in its
/// log), where it walks inlined code once for each state that reaches it; and its liveness
/// analysis, which goes over all of a function's instructions after each branch it
/// explores, has smaller functions to go over. `cf_tc` with these three out of line:
/// 4,859 -> 4,380 instructions processed, 5.14 -> 3.88 ms to verify (min of 15, load 1;
/// `cargo xtask bench rootful --prog-run --verifier`); `--prog-run` ns per packet
/// unchanged, the calls being off the per-packet path. Made global as well and measured
/// worse: the whole cold part of [`update`] (4,584 processed).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cf_parse_slow(skb: *mut __sk_buff) -> u32 {
    let dir = DIR_OUT;
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU map slot, this program run's own.
    let scratch = unsafe { &mut *scratch };
    match parse_frame(&SkBuff::new(skb), dir, &mut scratch.parsed) {
        // `parse` zeroed the key first: family 0, which the filter reads as "not IP".
        Ok(()) | Err(NotParsed::NotIp) => OUTCOME_PARSED,
        Err(NotParsed::Malformed) => {
            count_drop(DROP_PARSE);
            0
        }
    }
}

/// The capture step, off the per-packet path: reached only when capturing or for DNS. A
/// global function (see [`cf_parse_slow`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cf_capture(skb: *mut __sk_buff, dir: u32) -> u32 {
    capture_out_of_line(skb, (dir & 1) as usize);
    0
}

#[inline(always)]
fn capture_out_of_line(skb: *mut __sk_buff, dir: usize) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map slot, this program run's own.
    let scratch = unsafe { &mut *scratch };
    // Through map memory, which the verifier does not track: every path through the parser
    // and the flow update reaches the capture code in the same state, so the verifier
    // walks the capture filter and the copy loop once, not once per parser path (this
    // took the load of each TC program from ~350 ms to a few ms).
    // SAFETY: a field of this CPU's scratch slot, written by `account`.
    let outcome = unsafe { (&raw const scratch.outcome).read_volatile() };
    let (dns, parsed) = (outcome & OUTCOME_DNS != 0, outcome & OUTCOME_PARSED != 0);
    capture(&TcContext::new(skb), dir, dns, parsed.then_some(&scratch.parsed));
}

/// Copies the packet into `PACKETS` if capture is on and the filter matches `parsed` (a
/// packet that did not parse, `None`, is not filtered here), or if it is DNS.
#[inline(always)]
fn capture(ctx: &TcContext, dir: usize, dns: bool, parsed: Option<&Parsed>) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    let wanted = config.capture_all != 0 && parsed.is_none_or(|p| filter_matches(p, dir));
    if config.capture_all != 0 && !wanted {
        count_drop(COUNT_CAPTURE_FILTERED);
    }
    if !wanted && !dns {
        return;
    }
    let orig_len = ctx.len();
    // DNS is copied whole (up to CAPTURE_MAX) so answers parse even with a short snaplen.
    let snap = if dns { CAPTURE_MAX } else { config.snaplen };
    let len = if orig_len < snap { orig_len } else { snap };
    if len == 0 || len > CAPTURE_MAX {
        return;
    }
    // SAFETY (both): no preconditions; reading a field of the program's own context.
    let (ts_ns, cpu) = unsafe { (bpf_ktime_get_ns(), bpf_get_smp_processor_id()) };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let header = PacketHeader {
        kind: KIND_PACKET,
        direction: dir as u32,
        ifindex,
        orig_len,
        cap_len: len,
        flags: if wanted { PACKET_CAPTURE } else { 0 },
        ts_ns,
        cpu,
        offset: 0,
        clone_tag: 0,
        _pad: 0,
    };
    let threshold = if config.capture_all != 0 { CAPTURE_WAKEUP_BYTES } else { WAKEUP_BYTES };
    // A large packet captured whole goes to the capture tap as a clone when there is one;
    // if that fails (the tap's queue is full, the packet already has a VLAN tag, or it is
    // a GSO packet the tap would have to segment) it is copied into the ring as usual.
    if wanted
        && !dns
        && config.clone_ifindex != 0
        && len == orig_len
        && len > CLONE_MIN
        && len <= CLONE_MAX
    {
        match clone_packet(ctx, &header, config.clone_ifindex, parsed, threshold) {
            Copied::Yes => return,
            Copied::RingFull => {
                count_drop(DROP_PACKET_RINGBUF);
                return;
            }
            Copied::Failed => {}
        }
    }
    // The smallest record that holds the packet: ACKs and small datagrams, MTU-sized
    // frames, then GSO super-packets up to 64 KiB (and the most a veth carries with BIG TCP
    // off), each a constant for `bpf_ringbuf_reserve`. A record's unused tail is never
    // written or read (`cap_len` says where the data ends); it only takes ring space.
    let copied = if len <= 216 {
        copy_packet::<216>(ctx, &header, threshold)
    } else if len <= 2008 {
        copy_packet::<2008>(ctx, &header, threshold)
    } else if len <= 16_384 {
        copy_packet::<16_384>(ctx, &header, threshold)
    } else if len <= 32_768 {
        copy_packet::<32_768>(ctx, &header, threshold)
    } else if len <= 65_792 {
        copy_packet::<65_792>(ctx, &header, threshold)
    } else {
        copy_packet::<{ CAPTURE_MAX as usize }>(ctx, &header, threshold)
    };
    if copied == Copied::RingFull {
        count_drop(DROP_PACKET_RINGBUF);
    }
}

#[derive(PartialEq, Eq)]
enum Copied {
    Yes,
    RingFull,
    Failed,
}

/// Copies the first `header.cap_len` (at most `CAP`) bytes of the packet into a ring record
/// of `HEADER + CAP` bytes, after `header`.
///
/// Reserved and loaded in place: `bpf_skb_load_bytes` writes straight into the reserved
/// record, so each byte is copied once in the kernel. Before, the packet went through a
/// per-CPU buffer (`bpf_skb_load_bytes`, then `bpf_ringbuf_output` copied it again), and in
/// 16 KiB chunks (per-CPU values are capped at 32 KiB) that userspace joined with a third
/// copy. `bpf_ringbuf_reserve` needs a constant size, hence one instantiation per record
/// size.
#[inline(always)]
fn copy_packet<const CAP: usize>(ctx: &TcContext, header: &PacketHeader, threshold: u64) -> Copied {
    // Through memory: LLVM knows the caller's bound and would drop the check below, which
    // the verifier needs to see before the helper's size argument.
    // SAFETY: reading a field of a reference.
    // In 64 bits: LLVM folds the two tests into one range test on `n - 1`, and a 32-bit
    // one zero-extends that difference, which loses the verifier the link to `n`.
    let n = u64::from(unsafe { core::ptr::read_volatile(&header.cap_len) });
    if n == 0 || n > CAP as u64 {
        return Copied::Failed;
    }
    let wakeup = wakeup_crossing(&PACKETS, (HEADER + CAP + RINGBUF_HDR) as u64, threshold);
    let Some(mut record) = PACKETS.reserve_bytes(HEADER + CAP, 0) else {
        return Copied::RingFull;
    };
    let base = record.as_mut_ptr();
    // SAFETY: the record has HEADER + CAP bytes and 0 < n <= CAP, which the verifier also
    // checks against the reserved size.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            base.add(HEADER).cast(),
            n as u32,
        )
    };
    if ret != 0 {
        record.discard(0);
        return Copied::Failed;
    }
    // SAFETY: the record starts with HEADER bytes for the header; ring records are 8-byte
    // aligned.
    unsafe { base.cast::<PacketHeader>().write(*header) };
    record.submit(wakeup);
    Copied::Yes
}

/// Hands a clone of the packet to the capture tap `ifindex`, tagged with the next clone
/// tag as its VLAN TCI, and writes a record of `header` without bytes ([`PACKET_CLONED`])
/// after it: by the time userspace reads the record, the clone is in the tap's queue
/// (the tap has no qdisc, so `bpf_clone_redirect` puts it there or fails, synchronously).
///
/// The tag is pushed on the packet itself just for the clone and popped again, so the
/// packet goes on unchanged; the clone shares the packet's data, so nothing is copied
/// here. Only plain packets and TCP (whose GSO the tap takes as it is, see childflow's
/// `backend::rootful::tap`) are cloned: anything else GSO would be segmented for the tap,
/// each segment with the same tag.
#[inline(always)]
fn clone_packet(
    ctx: &TcContext,
    header: &PacketHeader,
    ifindex: u32,
    parsed: Option<&Parsed>,
    threshold: u64,
) -> Copied {
    let skb = ctx.skb.skb;
    // SAFETY: reading fields of the program's own context.
    let (vlan, gso_size) = unsafe { ((*skb).vlan_present, (*skb).gso_size) };
    let tcp = parsed.is_some_and(|p| p.key.proto == PROTO_TCP);
    if vlan != 0 || (gso_size != 0 && !tcp) {
        return Copied::Failed;
    }
    let cpu = header.cpu;
    if cpu >= CLONE_CPUS {
        return Copied::Failed;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Copied::Failed;
    };
    let Some(mut record) = PACKETS.reserve::<PacketHeader>(0) else {
        return Copied::RingFull;
    };
    // SAFETY: this CPU's scratch slot, this program run's own.
    let seq = unsafe { &mut (*scratch).clone_seq };
    let tag = cpu << CLONE_SEQ_BITS | (*seq & ((1 << CLONE_SEQ_BITS) - 1));
    // The clones' bytes wait in the tap, not in the ring: the ring's batching by bytes
    // would let the reader sleep while the tap fills. Every CLONE_WAKEUP-th clone of a
    // CPU wakes it instead (about a MiB of GSO packets).
    let wakeup = if *seq % CLONE_WAKEUP == CLONE_WAKEUP - 1 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        wakeup_crossing(&PACKETS, (HEADER + RINGBUF_HDR) as u64, threshold)
    };
    *seq = seq.wrapping_add(1);
    // SAFETY (all three): helpers of a TC program on its own skb; the tag goes on as
    // hardware-accelerated metadata (no bytes move) and comes off the same way.
    let cloned = unsafe {
        if bpf_skb_vlan_push(skb, ETH_P_8021Q.to_be(), tag as u16) != 0 {
            record.discard(0);
            return Copied::Failed;
        }
        let ret = bpf_clone_redirect(skb, ifindex, 0);
        bpf_skb_vlan_pop(skb);
        ret == 0
    };
    if !cloned {
        record.discard(0);
        return Copied::Failed;
    }
    let rec =
        PacketHeader { cap_len: 0, flags: header.flags | PACKET_CLONED, clone_tag: tag, ..*header };
    // SAFETY: the record is a reserved PacketHeader.
    unsafe { record.as_mut_ptr().write(rec) };
    record.submit(wakeup);
    Copied::Yes
}

/// Runs the capture filter on the parsed packet: the postfix program of `FILTER` on a
/// stack of booleans in the bits of a `u64`, at most `MAX_INSNS` steps. Mirrors
/// `childflow::capture::filter::Program::eval`; a malformed program matches nothing.
#[inline(always)]
fn filter_matches(p: &Parsed, dir: usize) -> bool {
    let Some(prog) = FILTER.get(0) else {
        return true;
    };
    let len = prog.len as usize;
    if len == 0 {
        return true;
    }
    let Some(state) = FILTER_STACK.get_ptr_mut(0) else {
        return true;
    };
    // Volatile: the compiler must not keep the stack in registers across steps (see
    // `FILTER_STACK`).
    // SAFETY: per-CPU map slot, used only by this program run on this CPU.
    let (stack, depth) = unsafe { (&raw mut (*state)[0], &raw mut (*state)[1]) };
    // SAFETY (of every volatile access below): `stack` and `depth` point into the slot.
    unsafe {
        stack.write_volatile(0);
        depth.write_volatile(0);
    }
    let mut i = 0;
    while i < MAX_INSNS && i < len {
        let Some(insn) = prog.insns.get(i) else {
            return false;
        };
        let (s, d) = unsafe { (stack.read_volatile(), depth.read_volatile()) };
        let (pop, value) = match insn.op {
            op::PRED => (0, pred(insn, p, dir)),
            op::NOT if d >= 1 => (1, s & 1 == 0),
            op::AND if d >= 2 => (2, s & 0b11 == 0b11),
            op::OR if d >= 2 => (2, s & 0b11 != 0),
            _ => return false,
        };
        if d - pop >= 64 {
            return false;
        }
        unsafe {
            stack.write_volatile(((s >> pop) << 1) | value as u64);
            depth.write_volatile(d - pop + 1);
        }
        i += 1;
    }
    let (s, d) = unsafe { (stack.read_volatile(), depth.read_volatile()) };
    d == 1 && s & 1 == 1
}

/// One predicate of the filter on the parsed packet (addresses and ports are stored from the
/// command's side in the key; `dir` turns them back into source and destination).
#[inline(always)]
fn pred(insn: &Insn, p: &Parsed, dir: usize) -> bool {
    let key = &p.key;
    let family = key.family;
    match insn.field {
        field::DIRECTION => insn.arg as usize == dir,
        field::FAMILY => family != 0 && family == insn.arg,
        field::PROTO => {
            family != 0 && (insn.arg == 0 || insn.arg == family) && key.proto == insn.proto
        }
        field::NET => {
            if family == 0 || family != insn.arg {
                return false;
            }
            // Source and destination by offset, not by a branch on the direction (see
            // `orient`): the local address, then the remote one.
            let addrs = (&raw const key.local_addr).cast::<[u8; 16]>();
            // SAFETY: `local_addr` and `remote_addr` are adjacent in the key.
            let (src, dst) = unsafe { (&*addrs.add(dir & 1), &*addrs.add((dir ^ 1) & 1)) };
            (insn.side & SIDE_SRC != 0 && in_net(src, &insn.addr, insn.prefix))
                || (insn.side & SIDE_DST != 0 && in_net(dst, &insn.addr, insn.prefix))
        }
        field::PORT => {
            let transport = if insn.proto == 0 {
                key.proto == PROTO_TCP || key.proto == PROTO_UDP
            } else {
                key.proto == insn.proto
            };
            if !transport || family == 0 || p.has_ports == 0 {
                return false;
            }
            // By offset, as the addresses: the local port, then the remote one.
            let ports = (&raw const key.local_port).cast::<u16>();
            // SAFETY: `local_port` and `remote_port` are adjacent in the key.
            let (sp, dp) = unsafe { (*ports.add(dir & 1), *ports.add((dir ^ 1) & 1)) };
            (insn.side & SIDE_SRC != 0 && insn.lo <= sp && sp <= insn.hi)
                || (insn.side & SIDE_DST != 0 && insn.lo <= dp && dp <= insn.hi)
        }
        _ => false,
    }
}

/// Whether address `a` is in `net/prefix`, both 16 bytes in network order (IPv4 in the
/// first 4, the rest zero, `prefix` at most 32), compared one 32-bit word at a time.
#[inline(always)]
fn in_net(a: &[u8; 16], net: &[u8; 16], prefix: u8) -> bool {
    let mut w = 0;
    while w < 4 {
        let bits = prefix as i32 - 32 * w as i32;
        let mask = if bits <= 0 {
            0
        } else if bits >= 32 {
            u32::MAX
        } else {
            u32::MAX << (32 - bits)
        };
        let at = w * 4;
        let x = u32::from_be_bytes([a[at], a[at + 1], a[at + 2], a[at + 3]]);
        let y = u32::from_be_bytes([net[at], net[at + 1], net[at + 2], net[at + 3]]);
        if (x ^ y) & mask != 0 {
            return false;
        }
        w += 1;
    }
    true
}

/// Wakes the reader only once enough data waits: never one wake-up per packet.
#[inline(always)]
fn wakeup_flags(ring: &RingBuf) -> u64 {
    (if ring.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }) as u64
}

/// Wakes the reader only when the record of `bytes` (in the ring) takes the data waiting
/// from below `threshold` to at least `threshold`: once per batch, never per record.
///
/// Why not "at least `threshold` waits" ([`wakeup_flags`]): while the data stays above the
/// threshold (a reader that holds back for want of collector budget, or one that is
/// behind) every record would force a wake-up, and each is an `irq_work` self-IPI, an APIC
/// write that exits to the hypervisor in a VM. `perf record -a` of a bulk capture
/// (rootful, 64 KiB super-packets, file on /dev/shm, 2026-12-07) had 8.6% of all samples
/// in `native_write_msr` under `bpf_ringbuf_submit`; on the disk 11%. A reader that went to
/// sleep with more than the threshold waiting (it read the ring between this query and the
/// commit) is woken by the next crossing or the drain timer; nothing is lost.
#[inline(always)]
fn wakeup_crossing(ring: &RingBuf, bytes: u64, threshold: u64) -> u64 {
    let waiting = ring.query(BPF_RB_AVAIL_DATA as u64);
    (if waiting < threshold && waiting + bytes >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }) as u64
}

/// Cost. Warm (`--prog-run`, 2026-12-02, load ~4.5): ~75 ns per packet of a known flow
/// with its place in `SLOTS`, test-run floor (~31 ns) included; it was 170–186 ns with the
/// head copy and one `FLOWS` lookup per packet. On real traffic (`bpf_stats`, `--costs-ab`
/// with the program cut short at each step, bulk TCP, load ~4) the caches are cold and
/// every line is a miss (measured with one program per direction, before `cf_tc`): of the
/// egress program's ~450 ns, ~215 ns is the cost of calling any
/// program on this hook (an empty one), ~60 ns parsing (the scratch lines, the code),
/// ~90 ns the first read of the slot (its key's line: a miss to memory on the CPU that
/// sends the ACKs, which copies the received data in between), ~80 ns the rest (the
/// direction's line); the ingress program paid ~2 ns for the same read, its lines still
/// being in its cache. Before the slots, the `FLOWS` lookup alone cost 145–200 ns there.
///
/// Measured and dropped, as they changed nothing: skipping the zero payload add of pure
/// ACKs, and (with the counters in `FLOWS`) each direction's counters on their own cache
/// line. With the slots the second did matter: a slot laid out like `FlowStats`, both
/// directions' counters in shared lines, cost `--pair` 158/160 ns against 75/78 ns.
#[inline(always)]
fn update(p: &Parsed, clock: &mut TickClock, dir: usize) {
    if let Some(slot) = SLOTS.get_ptr_mut(slot_of(&p.key)) {
        // SAFETY: a pointer from a successful map lookup, valid for this program run; the
        // fields are updated atomically or tolerate a lost race (two CPUs may run this at
        // once).
        let slot = unsafe { &mut *slot };
        if same_key(&slot.key, &p.key) {
            update_slot(slot, p, clock, dir);
            return;
        }
    }
    core::hint::cold_path();
    let Some(entry) = FLOWS.get_ptr_mut(&p.key) else {
        cf_new_flow(dir as u32);
        return;
    };
    // SAFETY: as above.
    let entry = unsafe { &mut *entry };
    let slot = merged(&entry.slot);
    if slot != NO_SLOT {
        // The flow has a place, still being made on another CPU (its key is written last,
        // see `new_flow`): the counters only; the flags and the history of a flow's first
        // packets come from its first packet's CPU.
        if let Some(slot) = SLOTS.get_ptr_mut(slot) {
            // SAFETY: as above.
            add_dir_counts(unsafe { &mut (*slot).dirs[dir & 1] }, p);
        }
        return;
    }
    update_stats(&mut entry.stats, p, clock, dir);
}

/// One packet of a flow with a place in `SLOTS`: only the key's line is read and only the
/// packet's direction's line written (see `FlowSlot`), but for a new history letter.
#[inline(always)]
fn update_slot(slot: &mut FlowSlot, p: &Parsed, clock: &mut TickClock, dir: usize) {
    let (payload_len, tcp_flags) = (merged(&p.payload_len), merged(&p.tcp_flags));
    let d = &mut slot.dirs[dir & 1];
    add_dir_counts(d, p);
    // Last seen at tick resolution (see `TickClock`): stored only when it moves.
    let now = clock.now();
    if now > d.last_ns {
        d.last_ns = now;
    }
    if tcp_flags & !d.tcp_flags != 0 {
        d.tcp_flags |= tcp_flags;
    }
    let bits = history_bits(tcp_flags, payload_len);
    record_history(
        &mut slot.history,
        &mut slot.history_len,
        &mut d.history_seen,
        slot.initiator,
        dir,
        bits,
    );
    if tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        core::hint::cold_path();
        let reason = end_reason(tcp_flags, slot.dirs[(dir ^ 1) & 1].tcp_flags);
        if reason != 0 {
            emit_slot(slot, reason);
        }
    }
}

/// Whether a packet with `tcp_flags` ends its flow, and why: a RST does
/// ([`FLOW_END_RST`]), as does the second direction's FIN ([`FLOW_END_FIN`]; `other` is
/// the other direction's flags so far); 0 if it does not. One emit per caller after it,
/// not one per reason (each an inlined copy of the record's code).
#[inline(always)]
fn end_reason(tcp_flags: u8, other: u8) -> u32 {
    if tcp_flags & TCP_RST != 0 {
        FLOW_END_RST
    } else if tcp_flags & TCP_FIN != 0 && other & TCP_FIN != 0 {
        FLOW_END_FIN
    } else {
        0
    }
}

/// One packet's counts in a slot's direction.
#[inline(always)]
fn add_dir_counts(d: &mut SlotDir, p: &Parsed) {
    add(&mut d.packets, 1);
    add(&mut d.bytes, merged(&p.ip_len) as u64);
    add(&mut d.payload_bytes, merged(&p.payload_len) as u64);
}

/// One packet of a flow without a place: its counters are in its `FLOWS` entry.
#[inline(always)]
fn update_stats(stats: &mut FlowStats, p: &Parsed, clock: &mut TickClock, dir: usize) {
    let (payload_len, tcp_flags) = (merged(&p.payload_len), merged(&p.tcp_flags));
    add_counts(stats, p, dir);
    // Last seen at tick resolution (see `TickClock`). It may lag `first_ns` (read
    // precisely) by up to a tick, hence the max; stored only when it moves, so the line is
    // not dirtied for nothing.
    let now = clock.now();
    if now > stats.last_ns {
        stats.last_ns = now;
    }
    if tcp_flags & !stats.tcp_flags[dir & 1] != 0 {
        stats.tcp_flags[dir & 1] |= tcp_flags;
    }
    stats.record_history(dir, history_bits(tcp_flags, payload_len));
    if tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        let reason = end_reason(tcp_flags, stats.tcp_flags[(dir ^ 1) & 1]);
        if reason != 0 {
            emit(&p.key, stats, reason);
        }
    }
}

/// A flow's place in `SLOTS`: the key's five words folded and multiplied (Fibonacci
/// hashing), the top bits. Read through `merged`: as an array index the value must be
/// exact to the verifier, which would otherwise make each parser path's key precise and
/// walk the update once per path.
#[inline(always)]
fn slot_of(key: &FlowKey) -> u32 {
    const BITS: u32 = SLOT_COUNT.trailing_zeros();
    const _: () = assert!(SLOT_COUNT.is_power_of_two());
    let w = (key as *const FlowKey).cast::<u64>();
    // SAFETY: the 40-byte, 8-aligned key (in the scratch map value) as five words.
    let word = |i: usize| merged(unsafe { &*w.add(i) });
    let x = word(0)
        ^ word(1).rotate_left(16)
        ^ word(2).rotate_left(32)
        ^ word(3).rotate_left(48)
        ^ word(4);
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - BITS)) as u32
}

/// The first packet of a flow (as far as `FLOWS` knows): makes its entry, in its place in
/// `SLOTS` if that is free, and reports it.
///
/// Order, for whoever looks at the flow meanwhile: the place is claimed and its counters
/// written, then the `FLOWS` entry made (from then on a packet that looks the key up adds
/// to the place), then the place's key written (from then on a packet finds the place by
/// its key). Userspace reads the counters through the entry, so it never sees a half-made
/// flow. A global function (see [`cf_parse_slow`]); the packet is in this CPU's scratch.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cf_new_flow(dir: u32) -> u32 {
    new_flow((dir & 1) as usize);
    0
}

#[inline(always)]
fn new_flow(dir: usize) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map slot, this program run's own.
    let scratch = unsafe { &mut *scratch };
    let (p, entry) = (&scratch.parsed, &mut scratch.entry);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let place = slot_of(&p.key);
    let slot = match CLAIMED.insert(&place, &0, BPF_NOEXIST as u64) {
        Ok(()) => SLOTS.get_ptr_mut(place),
        Err(_) => None,
    };
    entry.slot = NO_SLOT;
    entry._pad = 0;
    if let Some(slot) = slot {
        // SAFETY: as in `update`; the place is ours since the claim, and nothing finds it
        // before the `FLOWS` entry exists, so plain stores.
        let slot = unsafe { &mut *slot };
        // A place given up by a `new_flow` that lost the race below keeps what it wrote.
        clear_words(slot);
        slot.first_ns = now;
        slot.initiator = dir as u8;
        let d = &mut slot.dirs[dir & 1];
        d.packets = 1;
        d.bytes = p.ip_len as u64;
        d.payload_bytes = p.payload_len as u64;
        d.last_ns = now;
        d.tcp_flags = p.tcp_flags;
        let bits = history_bits(p.tcp_flags, p.payload_len);
        record_history(
            &mut slot.history,
            &mut slot.history_len,
            &mut d.history_seen,
            slot.initiator,
            dir,
            bits,
        );
        reset_stats(&mut entry.stats, DIR_OUT, 0);
        entry.slot = place;
    } else {
        reset_stats(&mut entry.stats, dir, now);
        entry.stats.account(dir, p.ip_len, p.payload_len, p.tcp_flags, now);
    }
    match FLOWS.insert(&p.key, &*entry, BPF_NOEXIST as u64) {
        Ok(()) => {
            match slot {
                Some(slot) => {
                    // SAFETY: as above.
                    let slot = unsafe { &mut *slot };
                    copy_key(&mut slot.key, &p.key);
                    emit_slot(slot, FLOW_START);
                }
                None => emit(&p.key, &entry.stats, FLOW_START),
            }
            return;
        }
        // Another CPU made the flow between our lookup and insert: add to it.
        Err(EEXIST) => {
            if let Some(theirs) = FLOWS.get_ptr_mut(&p.key) {
                // SAFETY: as in `update`.
                let theirs = unsafe { &mut *theirs };
                match merged(&theirs.slot) {
                    NO_SLOT => add_counts(&mut theirs.stats, p, dir),
                    i => {
                        if let Some(s) = SLOTS.get_ptr_mut(i) {
                            // SAFETY: as in `update`.
                            add_dir_counts(unsafe { &mut (*s).dirs[dir & 1] }, p);
                        }
                    }
                }
            }
        }
        Err(_) => count_drop(DROP_FLOW_MAP_FULL),
    }
    // The place was not used after all (its key was never written).
    if slot.is_some() {
        let _ = CLAIMED.remove(&place);
    }
}

/// Zeroes a slot with 32 word stores (an aggregate assignment becomes a `memset` call).
#[inline(always)]
fn clear_words(slot: &mut FlowSlot) {
    const _: () = assert!(core::mem::size_of::<FlowSlot>() == 256);
    let words = (slot as *mut FlowSlot).cast::<u64>();
    let mut i = 0;
    while i < 32 {
        // SAFETY: `FlowSlot` is 256 bytes, 8-aligned.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// One packet's counts, without the flags, history and clock (see the callers).
#[inline(always)]
fn add_counts(stats: &mut FlowStats, p: &Parsed, dir: usize) {
    add(&mut stats.packets[dir & 1], 1);
    add(&mut stats.bytes[dir & 1], merged(&p.ip_len) as u64);
    add(&mut stats.payload_bytes[dir & 1], merged(&p.payload_len) as u64);
}

/// `*stats = FlowStats::new(dir, now)`, with eleven word stores: the aggregate assignment
/// compiles to two calls of a byte-at-a-time `memset` subprogram (40 and 24 bytes), which
/// the verifier walked byte by byte on every parser path that reaches a new flow: 19% of
/// each TC program's verification (12,269 → 9,992 `processed` insns in the verifier's
/// statistics).
#[inline(always)]
fn reset_stats(stats: &mut FlowStats, dir: usize, now: u64) {
    const _: () = assert!(core::mem::size_of::<FlowStats>() == 88);
    let words = (stats as *mut FlowStats).cast::<u64>();
    let mut i = 0;
    while i < 11 {
        // SAFETY: `FlowStats` is 88 bytes, 8-aligned (its first field is a u64).
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
    stats.first_ns = now;
    stats.last_ns = now;
    stats.initiator = dir as u8;
}

/// Adds `v` to a counter in a map value with one `BPF_ATOMIC_ADD`.
///
/// The bpf target declares no compare-and-swap, so `AtomicU64::fetch_add` does not exist
/// there; the intrinsic it is built on does, and lowers to the single instruction.
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn add(counter: &mut u64, v: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: `counter` is a valid, 8-byte aligned u64 inside a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, v) };
}

/// Host build (lints only): the same operation through the stable API.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
fn add(counter: &mut u64, v: u64) {
    use core::sync::atomic::{AtomicU64, Ordering};
    // SAFETY: `counter` is a valid, aligned, exclusively borrowed u64.
    unsafe { AtomicU64::from_ptr(counter) }.fetch_add(v, Ordering::Relaxed);
}

#[inline(always)]
fn emit(key: &FlowKey, stats: &FlowStats, reason: u32) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowRecord>(0) else {
        count_drop(DROP_FLOW_RINGBUF);
        return;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at reserved ring-buffer memory of FlowRecord's size; the fields
    // are written in place rather than built on the stack and copied.
    unsafe {
        (*rec).kind = KIND_FLOW;
        (*rec).reason = reason;
        core::ptr::copy_nonoverlapping(key, &mut (*rec).key, 1);
        core::ptr::copy_nonoverlapping(stats, &mut (*rec).stats, 1);
    }
    entry.submit(wakeup_flags(&FLOW_EVENTS));
}

/// [`emit`] for a flow with a place in `SLOTS`: its counters in the usual form
/// (`FlowSlot::stats`), written field by field into the reserved record.
#[inline(always)]
fn emit_slot(slot: &FlowSlot, reason: u32) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowRecord>(0) else {
        count_drop(DROP_FLOW_RINGBUF);
        return;
    };
    let rec = entry.as_mut_ptr();
    let [o, i] = &slot.dirs;
    // SAFETY: `rec` points at reserved ring-buffer memory of FlowRecord's size.
    unsafe {
        (*rec).kind = KIND_FLOW;
        (*rec).reason = reason;
        core::ptr::copy_nonoverlapping(&slot.key, &mut (*rec).key, 1);
        let s = &mut (*rec).stats;
        s.packets = [o.packets, i.packets];
        s.bytes = [o.bytes, i.bytes];
        s.payload_bytes = [o.payload_bytes, i.payload_bytes];
        s.first_ns = slot.first_ns;
        s.last_ns = if o.last_ns > i.last_ns { o.last_ns } else { i.last_ns };
        s.tcp_flags = [o.tcp_flags, i.tcp_flags];
        s.initiator = slot.initiator;
        s.history_len = slot.history_len;
        core::ptr::copy_nonoverlapping(&slot.history, &mut s.history, 1);
        s.history_seen = [o.history_seen, i.history_seen];
        s._pad = [0; 2];
    }
    entry.submit(wakeup_flags(&FLOW_EVENTS));
}

/// Adds one to counter `index` of `DROPS` (this CPU's slot).
#[inline(always)]
pub fn count_drop(index: u32) {
    if let Some(c) = DROPS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}
