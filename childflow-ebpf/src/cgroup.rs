//! cgroup programs on the run's cgroup: which process opened each flow.
//!
//! `cf_sock_create` (`cgroup/sock_create`) runs in the creating process for every inet socket
//! of the command tree: it remembers the creator (tgid, pid, uid, gid, comm) under the
//! socket's cookie and tells userspace at once (forced wake-up: one record per socket, so
//! userspace can still read `/proc/PID` of short-lived processes).
//! `cf_skb_egress` (`cgroup_skb/egress`) sees every packet a socket of the tree sends, with the
//! socket attached: the first packet of each flow key joins the key with the socket's
//! creator and goes to userspace as a `SOCK_FLOW` record. Both always allow the packet.
//!
//! Flow keys are built by the same parser as the TC programs (IP header at offset 0 here),
//! from the child's side of the veth, before NAT, so they equal the TC programs' keys.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_skb, cgroup_sock, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockContext},
};
use childflow_common::{
    event::{DROP_PARSE, DROP_SOCK_RINGBUF, KIND_SOCK, SOCK_CREATE, SOCK_FLOW, SockRecord},
    flow::{DIR_OUT, FlowKey},
};

use crate::{
    parse::{NotParsed, Parsed, copy_key, parse_packet, parse_packet_direct, same_key},
    tc::count_drop,
};

/// Sockets (by cookie) and who created them. LRU: sockets close without telling us.
#[map]
static OWNERS: LruHashMap<u64, SockRecord> = LruHashMap::with_max_entries(4096, 0);

/// Flow keys already attributed, with the cookie of the socket they were attributed to.
#[map]
static ATTRIBUTED: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(16384, 0);

#[map]
static SOCK_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU scratch: the parsed packet, and the flow this CPU last found attributed.
#[repr(C)]
struct CgScratch {
    /// Key and socket cookie of the last packet this CPU found (or made) attributed in
    /// `ATTRIBUTED`: a packet with the same key from the same socket needs no lookup.
    last_key: FlowKey,
    last_cookie: u64,
    parsed: Parsed,
}

/// `N` words from `src` to `dst` (an aggregate copy becomes a `memcpy` call or byte copies).
///
/// SAFETY: both point at `N` valid, 8-aligned words.
#[inline(always)]
unsafe fn copy_words<const N: usize>(dst: *mut u64, src: *const u64) {
    let mut i = 0;
    while i < N {
        // SAFETY: see the function's contract.
        unsafe { dst.add(i).write(src.add(i).read()) };
        i += 1;
    }
}

/// Scratch of its own: a TC program may interrupt this one on the same CPU.
#[map]
static CG_SCRATCH: PerCpuArray<CgScratch> = PerCpuArray::with_max_entries(1, 0);

// `same_key` and `copy_key` read both keys as aligned words.
const _: () = assert!(core::mem::align_of::<CgScratch>() == 8);
const _: () = assert!(core::mem::offset_of!(CgScratch, parsed) % 8 == 0);

/// `1` lets the socket be created / the packet through.
const ALLOW: i32 = 1;

#[cgroup_sock(sock_create)]
pub fn cf_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: a helper valid in cgroup/sock_create, on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let rec = SockRecord {
        kind: KIND_SOCK,
        hook: SOCK_CREATE,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cookie,
        key: FlowKey::default(),
        comm: bpf_get_current_comm().unwrap_or_default(),
    };
    let _ = OWNERS.insert(&cookie, &rec, 0);
    if SOCK_EVENTS.output::<SockRecord>(&rec, BPF_RB_FORCE_WAKEUP as u64).is_err() {
        count_drop(DROP_SOCK_RINGBUF);
    }
    ALLOW
}

#[cgroup_skb(egress)]
pub fn cf_skb_egress(ctx: SkBuffContext) -> i32 {
    attribute(&ctx);
    ALLOW
}

/// Cost: on bulk TCP nearly every packet is one more of a flow this CPU has just seen from
/// the same socket, so the key and the socket cookie are compared with this CPU's last
/// attributed pair first (`CgScratch::last_key`) and only a different pair pays the
/// `ATTRIBUTED` lookup (jhash of the 40-byte key, the LRU's reference bit; each line of the
/// LRU map a cache miss on real traffic). The packet is parsed in place
/// ([`parse_packet_direct`]), falling back to the full parser.
///
/// What the per-CPU pair changes: a key attributed to socket A, then (another CPU) to
/// socket B sending the same 5-tuple (`SO_REUSEPORT`), is not attributed back to A when A
/// sends again on a CPU whose last pair is (key, A); without it, each alternation sent a
/// record. Every flow still gets its record from the first socket seen sending it.
///
/// Measured and dropped (2026-11-23): taking a TCP packet's key from its socket's 4-tuple
/// (`bpf_sk_fullsock`, `struct bpf_sock` fields) instead of parsing the packet made no
/// difference to `bpf_stats` on bulk TCP (4 interleaved pairs, 295–371 vs 326–445 ns at
/// load 2–4) and added a helper call to every other packet.
#[inline(always)]
fn attribute(ctx: &SkBuffContext) {
    let Some(scratch) = CG_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, this program run's own.
    let scratch = unsafe { &mut *scratch };
    let eth_proto = u16::from_be(ctx.skb.protocol() as u16);
    if !parse_packet_direct(&ctx.skb, eth_proto, DIR_OUT, &mut scratch.parsed) {
        core::hint::cold_path();
        match parse_packet(&ctx.skb, eth_proto, DIR_OUT, &mut scratch.parsed) {
            Ok(()) => {}
            Err(NotParsed::NotIp) => return,
            Err(NotParsed::Malformed) => {
                count_drop(DROP_PARSE);
                return;
            }
        }
    }
    // SAFETY: the skb is the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    if cookie == scratch.last_cookie && same_key(&scratch.last_key, &scratch.parsed.key) {
        return;
    }
    core::hint::cold_path();
    let key = &scratch.parsed.key;
    // SAFETY: plain lookups; the values are copied out at once.
    if unsafe { ATTRIBUTED.get(key) } != Some(&cookie) {
        let Some(owner) = (unsafe { OWNERS.get(&cookie) }) else {
            return;
        };
        let _ = ATTRIBUTED.insert(key, &cookie, 0);
        // Written in place into the ring, from the owner's record, not built on the stack
        // and copied (`output`): 88 bytes of stack the verifier tracked slot by slot in
        // every state it kept (`cf_skb_egress` stack 144 -> 64 bytes, 1.42 -> 1.34 ms to verify).
        match SOCK_EVENTS.reserve::<SockRecord>(0) {
            Some(mut entry) => {
                let rec = entry.as_mut_ptr();
                // SAFETY: `rec` points at reserved ring memory of a `SockRecord`'s size,
                // 8-aligned (ring records are), as is `owner` (a map value).
                unsafe {
                    copy_words::<{ core::mem::size_of::<SockRecord>() / 8 }>(
                        rec.cast(),
                        (owner as *const SockRecord).cast(),
                    );
                    (*rec).hook = SOCK_FLOW;
                    copy_key(&mut (*rec).key, key);
                }
                entry.submit(BPF_RB_FORCE_WAKEUP as u64);
            }
            None => count_drop(DROP_SOCK_RINGBUF),
        }
    }
    copy_key(&mut scratch.last_key, key);
    scratch.last_cookie = cookie;
}
