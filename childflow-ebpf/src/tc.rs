//! TC (TCX) programs on the host end of the run's veth: per-flow accounting.
//!
//! `cf_tc_ingress` sees what the command sends (host ingress = out of the child), `cf_tc_egress`
//! what it receives. Each packet updates its flow's [`FlowStats`] in `FLOWS`: counters with
//! atomic adds (two CPUs may handle one flow at once), history and flags with plain writes.
//! A flow's first packet and its FIN/RST go to `FLOW_EVENTS`; userspace samples the map
//! for periodic updates and retires idle flows, so the ring never carries one record per
//! packet. Wake-ups are batched: a record only wakes the reader once enough data waits.
//! Both programs return `TC_ACT_UNSPEC` (`TCX_NEXT`): they observe, never alter, traffic.
//!
//! Capture: when `CONFIG` says so, each packet is copied (up to the snap length and
//! `CAPTURE_MAX`) with its direction and timestamp into `PACKETS`, with the same batched
//! wake-ups; DNS packets (port 53) are always copied so userspace can name flows.
//! A full ring counts `DROP_PACKET_RINGBUF`.

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        TC_ACT_UNSPEC,
    },
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use childflow_common::{
    event::{
        CAPTURE_MAX, CaptureConfig, DROP_COUNTERS, DROP_FLOW_MAP_FULL, DROP_FLOW_RINGBUF,
        DROP_PACKET_RINGBUF, DROP_PARSE, FLOW_END_FIN, FLOW_END_RST, FLOW_START, FlowRecord,
        KIND_FLOW, KIND_PACKET, PacketHeader,
    },
    flow::{
        DIR_IN, DIR_OUT, FlowKey, FlowStats, PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, history_bits,
    },
};

use crate::parse::{NotParsed, Parsed, parse_frame};

/// Live flows of one run. Userspace removes ended and idle ones.
pub const MAX_FLOWS: u32 = 65536;
/// `-EEXIST` from `bpf_map_update_elem` with `BPF_NOEXIST`: the key is already there.
const EEXIST: i32 = -17;
/// Wake the reader once this much data is pending; it also drains on a short timer.
const WAKEUP_BYTES: u64 = 64 * 1024;

/// Not preallocated (`BPF_F_NO_PREALLOC`): preallocating 64 Ki entries costs milliseconds
/// at every start, and a run rarely has more than a few hundred flows.
#[map]
static FLOWS: HashMap<FlowKey, FlowStats> = HashMap::with_max_entries(MAX_FLOWS, BPF_F_NO_PREALLOC);

#[map]
static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU scratch space: the parsed packet and a new flow's first counters stay off the
/// 512-byte BPF stack.
#[repr(C)]
struct Scratch {
    parsed: Parsed,
    stats: FlowStats,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_COUNTERS, 0);

/// Capture settings, written by userspace before the programs see traffic.
#[map]
static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

#[map]
static PACKETS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// A captured packet being assembled: header and data contiguous, as they go to the ring.
#[repr(C)]
struct PacketBuf {
    header: PacketHeader,
    data: [u8; CAPTURE_MAX as usize],
}

#[map]
static PACKET_BUF: PerCpuArray<PacketBuf> = PerCpuArray::with_max_entries(1, 0);

const DNS_PORT: u16 = 53;

#[classifier]
pub fn cf_tc_ingress(ctx: TcContext) -> i32 {
    account(&ctx, DIR_OUT);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn cf_tc_egress(ctx: TcContext) -> i32 {
    account(&ctx, DIR_IN);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn account(ctx: &TcContext, dir: usize) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map slot; programs do not migrate CPUs while running.
    let scratch = unsafe { &mut *scratch };
    let dns = match parse_frame(&ctx.skb, dir, &mut scratch.parsed) {
        Ok(()) => {
            update(&scratch.parsed, &mut scratch.stats, dir);
            let key = &scratch.parsed.key;
            (key.proto == PROTO_UDP || key.proto == PROTO_TCP)
                && (key.remote_port == DNS_PORT || key.local_port == DNS_PORT)
        }
        Err(NotParsed::NotIp) => false,
        Err(NotParsed::Malformed) => {
            count_drop(DROP_PARSE);
            false
        }
    };
    capture(ctx, dir, dns);
}

/// Copies the packet into `PACKETS` if capture is on, or if it is DNS.
#[inline(always)]
fn capture(ctx: &TcContext, dir: usize, dns: bool) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.capture_all == 0 && !dns {
        return;
    }
    let Some(buf) = PACKET_BUF.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map slot, used only by this program run on this CPU.
    let buf = unsafe { &mut *buf };
    let orig_len = ctx.len();
    // DNS is copied whole (up to CAPTURE_MAX) so answers parse even with a short snaplen.
    let snap = if dns { CAPTURE_MAX } else { config.snaplen };
    let len = if orig_len < snap { orig_len } else { snap };
    if len == 0 || len > CAPTURE_MAX {
        return;
    }
    // SAFETY: `buf.data` has CAPTURE_MAX bytes and 0 < len <= CAPTURE_MAX, which the
    // verifier also checks against the map value size.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            buf.data.as_mut_ptr().cast(),
            len,
        )
    };
    if ret != 0 {
        return;
    }
    buf.header = PacketHeader {
        kind: KIND_PACKET,
        direction: dir as u32,
        // SAFETY: reading a field of the program's own context.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        orig_len,
        cap_len: len,
        _pad: 0,
        // SAFETY: no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    let total = core::mem::size_of::<PacketHeader>() + len as usize;
    // SAFETY: `total` is at most the size of `PacketBuf`.
    let bytes =
        unsafe { core::slice::from_raw_parts((buf as *const PacketBuf).cast::<u8>(), total) };
    if PACKETS.output::<[u8]>(bytes, wakeup_flags(&PACKETS)).is_err() {
        count_drop(DROP_PACKET_RINGBUF);
    }
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

#[inline(always)]
fn update(p: &Parsed, new: &mut FlowStats, dir: usize) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let bits = history_bits(p.tcp_flags, p.payload_len);
    match FLOWS.get_ptr_mut(&p.key) {
        Some(stats) => {
            // SAFETY: the pointer comes from a successful map lookup and stays valid for
            // this program run; fields are updated atomically or tolerate a lost race.
            let stats = unsafe { &mut *stats };
            add(&mut stats.packets[dir & 1], 1);
            add(&mut stats.bytes[dir & 1], p.ip_len as u64);
            add(&mut stats.payload_bytes[dir & 1], p.payload_len as u64);
            stats.last_ns = now;
            stats.tcp_flags[dir & 1] |= p.tcp_flags;
            stats.record_history(dir, bits);
            if p.tcp_flags & TCP_RST != 0 {
                emit(&p.key, stats, FLOW_END_RST);
            } else if p.tcp_flags & TCP_FIN != 0 && stats.tcp_flags[(dir ^ 1) & 1] & TCP_FIN != 0 {
                emit(&p.key, stats, FLOW_END_FIN);
            }
        }
        None => {
            *new = FlowStats::new(dir, now);
            new.account(dir, p.ip_len, p.payload_len, p.tcp_flags, now);
            match FLOWS.insert(&p.key, &*new, BPF_NOEXIST as u64) {
                Ok(()) => emit(&p.key, new, FLOW_START),
                // Another CPU created the flow between our lookup and insert: add to it.
                Err(EEXIST) => {
                    if let Some(existing) = FLOWS.get_ptr_mut(&p.key) {
                        // SAFETY: as above.
                        let existing = unsafe { &mut *existing };
                        add(&mut existing.packets[dir & 1], 1);
                        add(&mut existing.bytes[dir & 1], p.ip_len as u64);
                        add(&mut existing.payload_bytes[dir & 1], p.payload_len as u64);
                    }
                }
                Err(_) => count_drop(DROP_FLOW_MAP_FULL),
            }
        }
    }
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

#[inline(always)]
pub fn count_drop(index: u32) {
    if let Some(c) = DROPS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}
