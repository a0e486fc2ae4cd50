//! Parsing a packet into a flow key, oriented from the command's side.
//!
//! The same parser serves the TC programs (Ethernet frames: the IP header at offset 14, the
//! EtherType in the frame) and `cgroup_skb` (the IP header at offset 0, the EtherType from
//! `skb->protocol`); the offset is a const generic so the verifier sees constant offsets.
//!
//! Cost: the first [`HDR_MAX`] bytes of the packet are copied into [`Parsed::hdr`] with ONE
//! `bpf_skb_load_bytes` call and parsed there. Each helper call costs tens of nanoseconds on
//! this hardware (call and return through the SRSO/retpoline thunks, then
//! `skb_header_pointer`); one load per header field, as before, was about a quarter of the
//! program's run time. Every read from the copy is bounds-checked against the bytes actually
//! copied (and its index masked, so the verifier sees it in range); only headers reaching
//! past `HDR_MAX` bytes (IPv6 extension header chains) fall back to a helper load, which
//! bounds-checks against the packet. So a short or malformed packet yields `Err` and is
//! counted as a parse drop by the caller, never read out of bounds. IPv6 extension headers
//! are followed for a bounded number of steps (RFC 8200 §4).

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::sk_buff::SkBuff};
use childflow_common::flow::{
    DIR_OUT, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

/// Where the IP header starts in a TC program's Ethernet frame.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// How many bytes of each packet are copied for parsing: Ethernet, IPv4 with the longest
/// options (60) and TCP up to its flags fit (88), as do IPv6 and TCP with up to 60 bytes of
/// extension headers. A power of two: indexes are masked with `HDR_MAX - 1`.
pub const HDR_MAX: usize = 128;

/// What accounting needs from one packet. Lives in a per-CPU scratch map, not on the
/// 512-byte BPF stack. 8-aligned so the key can be cleared with whole-word stores.
#[repr(C, align(8))]
pub struct Parsed {
    pub key: FlowKey,
    /// IP header and everything after it.
    pub ip_len: u32,
    /// Transport payload (after the TCP/UDP/ICMP header).
    pub payload_len: u32,
    pub tcp_flags: u8,
    /// 1 if `key` holds real TCP/UDP ports (not a non-first fragment), else 0. The capture
    /// filter's port terms match only then, as in userspace.
    pub has_ports: u8,
    /// The IPv6 extension-header loop's next header and whether a fragment header said
    /// "not the first fragment", between its steps (see `ipv6_extension_headers`).
    pub ext_next: u8,
    pub ext_not_first: u8,
    /// Where the transport header starts (`u32::MAX`: none, a non-first fragment), passed
    /// through here between the IP and the transport parsers (and the offset of the next
    /// extension header between the loop's steps); see `parse_ip`.
    pub l4_off: u32,
    /// How many bytes of `hdr` were copied (see `copy_head`).
    pub head_len: u32,
    /// The packet's first bytes (at most [`HDR_MAX`]), as copied for parsing.
    pub hdr: [u8; HDR_MAX],
}

/// Why a frame was not accounted.
pub enum NotParsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): nothing to account, not a loss.
    NotIp,
    /// An IP packet too short for the headers it claims.
    Malformed,
}

/// The copied head of a packet: `n` valid bytes of `hdr`, all `len` bytes in `skb`.
struct Head<'a> {
    skb: &'a SkBuff,
    hdr: &'a [u8; HDR_MAX],
    n: usize,
    len: usize,
}

impl Head<'_> {
    /// The byte at `at`, which the caller has checked is below `n`.
    #[inline(always)]
    fn b(&self, at: usize) -> u8 {
        self.hdr[at & (HDR_MAX - 1)]
    }

    /// `N` bytes at `off`: from the copy if they are in it, else from the packet.
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Result<[u8; N], NotParsed> {
        if off + N <= self.n {
            let mut out = [0u8; N];
            let mut i = 0;
            while i < N {
                out[i] = self.b(off + i);
                i += 1;
            }
            return Ok(out);
        }
        if off + N > self.len {
            return Err(NotParsed::Malformed);
        }
        self.skb.load::<[u8; N]>(off).map_err(|_| NotParsed::Malformed)
    }
}

/// Copies the packet's first bytes into `out.hdr`; returns how many: up to `HDR_MAX`, but
/// only the linear part of the packet if that holds at least `L3 + 40` bytes (every IP
/// header's fixed part). A TCP GSO packet from the local stack has little more than its
/// headers in the linear part; copying past it would walk the page fragments
/// (`skb_copy_bits`) for bytes the parser does not need, and what it does need beyond the
/// copy (a transport header after long IPv6 extension headers) is read with [`Head::read`].
#[inline(always)]
fn copy_head<const L3: usize>(skb: &SkBuff, out: &mut Parsed) -> Result<usize, NotParsed> {
    let len = skb.len() as usize;
    // SAFETY: reading fields of the program's own context; the difference of the two
    // packet pointers is the linear length (a scalar to the verifier; nothing is
    // dereferenced through them).
    let linear = unsafe { ((*skb.skb).data_end as usize).wrapping_sub((*skb.skb).data as usize) };
    let mut n = if len < HDR_MAX { len } else { HDR_MAX };
    if linear < n && linear >= L3 + 40 {
        n = linear;
    }
    if n == 0 || n > HDR_MAX {
        return Err(NotParsed::Malformed);
    }
    // SAFETY: `hdr` has HDR_MAX bytes and 0 < n <= HDR_MAX; the helper bounds-checks the
    // packet side itself.
    let ret = unsafe {
        bpf_skb_load_bytes(skb.skb as *const _, 0, out.hdr.as_mut_ptr().cast(), n as u32)
    };
    if ret != 0 {
        return Err(NotParsed::Malformed);
    }
    // Through map memory (volatile), which the verifier does not track: each way of
    // choosing `n` above leaves it in another exact range (the helper's size argument must
    // be exact), and the parser after it would be walked once per range. Every later read
    // of the copy checks its offset against `n` and masks its index, so "some length" is
    // all the parser needs to know.
    // SAFETY (both): a field of `out`, exclusively borrowed.
    unsafe {
        (&raw mut out.head_len).write_volatile(n as u32);
        Ok((&raw const out.head_len).read_volatile() as usize)
    }
}

/// Parses the Ethernet frame in `ctx` into `out`. `dir` says whether the command sent it
/// (`DIR_OUT`: source is local) or receives it (`DIR_IN`: destination is local).
#[inline(always)]
pub fn parse_frame(ctx: &SkBuff, dir: usize, out: &mut Parsed) -> Result<(), NotParsed> {
    let n = copy_head::<ETH_HLEN>(ctx, out)?;
    if n < ETH_HLEN {
        return Err(NotParsed::Malformed);
    }
    let eth_proto = u16::from_be_bytes([out.hdr[12], out.hdr[13]]);
    parse_ip::<ETH_HLEN>(ctx, n, eth_proto, dir, out)
}

/// Parses the IP packet at offset 0 of `ctx` (a `cgroup_skb` packet), of EtherType
/// `eth_proto`.
#[inline(always)]
pub fn parse_packet(
    ctx: &SkBuff,
    eth_proto: u16,
    dir: usize,
    out: &mut Parsed,
) -> Result<(), NotParsed> {
    if eth_proto != ETH_P_IP && eth_proto != ETH_P_IPV6 {
        return Err(NotParsed::NotIp);
    }
    let n = copy_head::<0>(ctx, out)?;
    parse_ip::<0>(ctx, n, eth_proto, dir, out)
}

/// Parses the common packet straight from its linear data (direct packet access): IPv4
/// without options and not a fragment, or IPv6 without extension headers, carrying TCP or
/// UDP, with the IP header and the transport header's first 14 (TCP) or 4 (UDP) bytes in
/// the linear part. Fills `out` exactly as [`parse_frame`] would and returns true; returns
/// false, having written nothing that matters, for anything else, which the caller hands to
/// [`parse_frame`].
///
/// Why: [`copy_head`]'s `bpf_skb_load_bytes` is a helper call (the call and the return
/// through the SRSO safe-RET thunk, then `skb_header_pointer` and a `memcpy` call) and
/// writes two cache lines of scratch that are read back at once; a packet's headers are in
/// the linear part at this hook (the stack built or just parsed them), so reading them in
/// place costs neither.
#[inline(always)]
pub fn parse_frame_direct(skb: &SkBuff, dir: usize, out: &mut Parsed) -> bool {
    // SAFETY: reading fields of the program's own context.
    let (data, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    if data + ETH_HLEN > end {
        return false;
    }
    // SAFETY: in the linear data, checked just above.
    let eth_proto = u16::from_be(unsafe { pkt::<u16>(data + 12) });
    parse_ip_direct::<ETH_HLEN>(data, end, eth_proto, dir, out)
}

/// [`parse_frame_direct`] for a `cgroup_skb` packet (the IP header at offset 0, EtherType
/// `eth_proto` from `skb->protocol`); the fallback is [`parse_packet`].
#[inline(always)]
pub fn parse_packet_direct(skb: &SkBuff, eth_proto: u16, dir: usize, out: &mut Parsed) -> bool {
    // SAFETY: reading fields of the program's own context.
    let (data, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    parse_ip_direct::<0>(data, end, eth_proto, dir, out)
}

/// A `T` read with one load of its width from the packet at `at`.
///
/// SAFETY: the caller has checked `at + size_of::<T>() <= data_end`. The address may be
/// unaligned (an IPv4 address at an Ethernet frame's offset 26): the verifier refuses
/// unaligned packet loads only under strict alignment, which kernels with efficient
/// unaligned access (x86-64, arm64) do not impose, and the JIT emits a plain load. Not
/// `read_unaligned`: for the bpf target LLVM splits that into byte loads.
#[inline(always)]
unsafe fn pkt<T: Copy>(at: usize) -> T {
    // SAFETY: see the function's contract.
    unsafe { core::ptr::read_volatile(at as *const T) }
}

/// See [`parse_frame_direct`]: the IP packet at `data + L3`, linear data up to `end`.
#[inline(always)]
fn parse_ip_direct<const L3: usize>(
    data: usize,
    end: usize,
    eth_proto: u16,
    dir: usize,
    out: &mut Parsed,
) -> bool {
    let ip = data + L3;
    let key = (&raw mut out.key).cast::<u32>();
    let (l4, ip_len, ip_hdr, proto, family);
    if eth_proto == ETH_P_IP {
        // IPv4 header (20) and a TCP header's first 14 bytes: UDP needs only 4, but a UDP
        // packet of fewer than 10 payload bytes in the linear part can take the long way.
        if ip + 34 > end {
            return false;
        }
        // SAFETY (every `pkt` in this branch): within `ip + 34 <= end`.
        let (ver_ihl, frag) = unsafe { (pkt::<u8>(ip), u16::from_be(pkt::<u16>(ip + 6))) };
        proto = unsafe { pkt::<u8>(ip + 9) };
        // No options, not a fragment (offset or MF set; DF may be).
        if ver_ihl != 0x45 || frag & 0x3fff != 0 || (proto != PROTO_TCP && proto != PROTO_UDP) {
            return false;
        }
        ip_len = u16::from_be(unsafe { pkt::<u16>(ip + 2) }) as u32;
        let (src, dst) = unsafe { (pkt::<u32>(ip + 12), pkt::<u32>(ip + 16)) };
        let (local, remote) = if dir == DIR_OUT { (src, dst) } else { (dst, src) };
        // SAFETY (all four): `key` is the 8-aligned 40-byte key; addresses in network
        // order in their first 4 bytes, the rest zero.
        unsafe {
            key.write(local);
            key.add(1).write(0);
            key.cast::<u64>().add(1).write(0);
            key.add(4).write(remote);
            key.add(5).write(0);
            key.cast::<u64>().add(3).write(0);
        }
        (l4, ip_hdr, family) = (ip + 20, 20, FAMILY_V4);
    } else if eth_proto == ETH_P_IPV6 {
        if ip + 54 > end {
            return false;
        }
        // SAFETY (every `pkt` in this branch): within `ip + 54 <= end`.
        proto = unsafe { pkt::<u8>(ip + 6) };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return false;
        }
        ip_len = u16::from_be(unsafe { pkt::<u16>(ip + 4) }) as u32 + 40;
        let (src, dst) = if dir == DIR_OUT { (ip + 8, ip + 24) } else { (ip + 24, ip + 8) };
        let key = key.cast::<u64>();
        // SAFETY: as above; both addresses are 16 bytes within the checked range.
        unsafe {
            key.write(pkt::<u64>(src));
            key.add(1).write(pkt::<u64>(src + 8));
            key.add(2).write(pkt::<u64>(dst));
            key.add(3).write(pkt::<u64>(dst + 8));
        }
        (l4, ip_hdr, family) = (ip + 40, 40, FAMILY_V6);
    } else {
        return false;
    }
    // SAFETY: `l4 + 14 <= end` by the checks above.
    let (sport, dport) = unsafe { (pkt::<u16>(l4), pkt::<u16>(l4 + 2)) };
    let (sport, dport) = (u16::from_be(sport), u16::from_be(dport));
    let (local_port, remote_port) = if dir == DIR_OUT { (sport, dport) } else { (dport, sport) };
    let l4_len = ip_len.saturating_sub(ip_hdr);
    let (tcp_flags, payload_len) = if proto == PROTO_TCP {
        // SAFETY: as above.
        let (off, flags) = unsafe { (pkt::<u8>(l4 + 12), pkt::<u8>(l4 + 13)) };
        (flags, l4_len.saturating_sub(((off >> 4) as u32) * 4))
    } else {
        (0, l4_len.saturating_sub(8))
    };
    out.key.local_port = local_port;
    out.key.remote_port = remote_port;
    out.key.proto = proto;
    out.key.family = family;
    out.key._pad = [0; 2];
    out.ip_len = ip_len;
    out.payload_len = payload_len;
    out.tcp_flags = tcp_flags;
    out.has_ports = 1;
    true
}

/// Zeroes the key with five word stores (an aggregate assignment becomes a call to a
/// `memset` subprogram).
#[inline(always)]
fn clear_key(out: &mut Parsed) {
    const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
    let words = (&raw mut out.key).cast::<u64>();
    let mut i = 0;
    while i < 5 {
        // SAFETY: `key` is the first field of the 8-aligned `Parsed`, 40 bytes long.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// Parses the IP packet starting at offset `L3` of the copied head (`n` bytes), of
/// EtherType `eth_proto`.
///
/// Verification cost: this parser takes the rare packets, but the verifier walks it on
/// every load, so what varies between its paths goes through map memory (`out`, volatile),
/// which the verifier does not track: the IPv6 extension-header loop's next header, offset
/// and fragment flag between steps, and the IP part's results (family, protocol, length,
/// transport offset) before the transport part. Read back, each is "some value", and the
/// paths merge: the transport part and everything after it are walked once, not once per
/// IP version, extension-header path and protocol (with the copy's length, see
/// `copy_head`: `cf_tc` 6,477 → ~5,500 instructions processed, `cf_skb_egress` 3,153 →
/// 1,608; `cargo xtask bench rootful --prog-run --verifier`).
#[inline(always)]
fn parse_ip<const L3: usize>(
    skb: &SkBuff,
    n: usize,
    eth_proto: u16,
    dir: usize,
    out: &mut Parsed,
) -> Result<(), NotParsed> {
    const { assert!(L3 == 0 || L3 == ETH_HLEN) };
    out.has_ports = 0;
    clear_key(out);
    // The transport header's offset, `u32::MAX` for none (a non-first fragment).
    let (family, l4_off, ip_len, proto) = match eth_proto {
        ETH_P_IP => {
            if n < L3 + 20 {
                return Err(NotParsed::Malformed);
            }
            let h = &out.hdr;
            let ihl = ((h[L3] & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(NotParsed::Malformed);
            }
            let tot_len = u16::from_be_bytes([h[L3 + 2], h[L3 + 3]]) as u32;
            let frag = u16::from_be_bytes([h[L3 + 6], h[L3 + 7]]);
            let proto = h[L3 + 9];
            let (src, dst) = (L3 + 12, L3 + 16);
            let (local, remote) = if dir == DIR_OUT { (src, dst) } else { (dst, src) };
            let mut i = 0;
            while i < 4 {
                out.key.local_addr[i] = out.hdr[local + i];
                out.key.remote_addr[i] = out.hdr[remote + i];
                i += 1;
            }
            // A non-first fragment carries no transport header: account it to the
            // protocol with zero ports rather than misreading payload as ports.
            let l4 = if frag & 0x1fff != 0 { u32::MAX } else { (L3 + ihl) as u32 };
            (FAMILY_V4, l4, tot_len, proto)
        }
        ETH_P_IPV6 => {
            if n < L3 + 40 {
                return Err(NotParsed::Malformed);
            }
            let h = &out.hdr;
            let payload_len = u16::from_be_bytes([h[L3 + 4], h[L3 + 5]]) as u32;
            let next = h[L3 + 6];
            let (src, dst) = (L3 + 8, L3 + 24);
            let (local, remote) = if dir == DIR_OUT { (src, dst) } else { (dst, src) };
            let mut i = 0;
            while i < 16 {
                out.key.local_addr[i] = out.hdr[local + i];
                out.key.remote_addr[i] = out.hdr[remote + i];
                i += 1;
            }
            let (l4, next) = ipv6_extension_headers::<L3>(skb, next, out)?;
            (FAMILY_V6, l4, payload_len + 40, next)
        }
        _ => return Err(NotParsed::NotIp),
    };
    // SAFETY (all): fields of `out`, exclusively borrowed; written, then read back volatile
    // (see the function's doc).
    let (family, proto, ip_len, l4_off) = unsafe {
        (&raw mut out.key.family).write_volatile(family);
        (&raw mut out.key.proto).write_volatile(proto);
        (&raw mut out.ip_len).write_volatile(ip_len);
        (&raw mut out.l4_off).write_volatile(l4_off);
        (
            (&raw const out.key.family).read_volatile(),
            (&raw const out.key.proto).read_volatile(),
            (&raw const out.ip_len).read_volatile(),
            (&raw const out.l4_off).read_volatile(),
        )
    };

    let head = Head { skb, hdr: &out.hdr, n, len: skb.len() as usize };
    let mut has_ports = 0;
    let mut payload_len = 0;
    let mut tcp_flags = 0;
    let (mut local_port, mut remote_port) = (0, 0);
    if l4_off != u32::MAX {
        let off = l4_off as usize;
        let ip_hdr = l4_off.wrapping_sub(L3 as u32);
        let l4_len = ip_len.saturating_sub(ip_hdr);
        match proto {
            PROTO_TCP => {
                let h: [u8; 14] = head.read(off)?;
                (local_port, remote_port) = ports(dir, &h);
                has_ports = 1;
                tcp_flags = h[13];
                payload_len = l4_len.saturating_sub(((h[12] >> 4) as u32) * 4);
            }
            PROTO_UDP => {
                let h: [u8; 4] = head.read(off)?;
                (local_port, remote_port) = ports(dir, &h);
                has_ports = 1;
                payload_len = l4_len.saturating_sub(8);
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let h: [u8; 6] = head.read(off)?;
                let id = u16::from_be_bytes([h[4], h[5]]);
                (local_port, remote_port) = FlowKey::icmp_ports(family, h[0], h[1], id);
                payload_len = l4_len.saturating_sub(8);
            }
            _ => payload_len = l4_len,
        }
    }
    out.key.local_port = local_port;
    out.key.remote_port = remote_port;
    out.payload_len = payload_len;
    out.tcp_flags = tcp_flags;
    out.has_ports = has_ports;
    Ok(())
}

/// Follows up to four IPv6 extension headers (RFC 8200 §4) from the one after the fixed
/// header (`next`); returns the transport header's offset (`u32::MAX` in a non-first
/// fragment) and the transport protocol.
///
/// The headers are read from the packet with the helper, not from the copy: they are rare
/// (the loop ends at once without them), and a copy-or-helper choice at each step
/// multiplied the paths the verifier walks. The loop's state (next header, offset, whether
/// a fragment header said "not the first") lives in `out` between steps, volatile: the
/// verifier does not track map memory, so every step starts from one state whatever header
/// the step before took (in registers, each combination was a path of its own).
#[inline(always)]
fn ipv6_extension_headers<const L3: usize>(
    skb: &SkBuff,
    next: u8,
    out: &mut Parsed,
) -> Result<(u32, u8), NotParsed> {
    let (p_next, p_off, p_frag) =
        (&raw mut out.ext_next, &raw mut out.l4_off, &raw mut out.ext_not_first);
    // SAFETY (of every volatile access here): fields of `out`, exclusively borrowed.
    unsafe {
        p_next.write_volatile(next);
        p_off.write_volatile((L3 + 40) as u32);
        p_frag.write_volatile(0);
    }
    let mut i = 0;
    while i < 4 {
        let (next, off) = unsafe { (p_next.read_volatile(), p_off.read_volatile()) };
        let at = off as usize;
        let (next, len, not_first) = match next {
            0 | 43 | 60 => {
                let hdr: [u8; 2] = load(skb, at)?;
                (hdr[0], (hdr[1] as u32 + 1) * 8, 0)
            }
            44 => {
                let hdr: [u8; 4] = load(skb, at)?;
                (hdr[0], 8, (u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0) as u8)
            }
            51 => {
                let hdr: [u8; 2] = load(skb, at)?;
                (hdr[0], (hdr[1] as u32 + 2) * 4, 0)
            }
            _ => break,
        };
        unsafe {
            p_next.write_volatile(next);
            p_off.write_volatile(off + len);
            p_frag.write_volatile(p_frag.read_volatile() | not_first);
        }
        i += 1;
    }
    let (next, off, frag) =
        unsafe { (p_next.read_volatile(), p_off.read_volatile(), p_frag.read_volatile()) };
    // No transport header after a "not the first fragment": `u32::MAX`, without a branch
    // (`frag` is 0 or 1).
    Ok((off | 0u32.wrapping_sub(frag as u32), next))
}

/// `N` bytes at `off` of the packet, through the helper (bounds-checked by the kernel).
#[inline(always)]
fn load<const N: usize>(skb: &SkBuff, off: usize) -> Result<[u8; N], NotParsed> {
    skb.load::<[u8; N]>(off).map_err(|_| NotParsed::Malformed)
}

/// `(local, remote)` ports from a TCP/UDP header's first four bytes.
#[inline(always)]
fn ports<const N: usize>(dir: usize, h: &[u8; N]) -> (u16, u16) {
    let src = u16::from_be_bytes([h[0], h[1]]);
    let dst = u16::from_be_bytes([h[2], h[3]]);
    if dir == DIR_OUT { (src, dst) } else { (dst, src) }
}

/// Whether two keys are equal, compared as five words (`==` on the struct compares field
/// by field, byte arrays byte by byte). Both must be 8-aligned (`FlowKey` itself is only
/// 2-aligned): every key the programs keep is, in a scratch struct or a map value.
#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
    let (a, b) = ((a as *const FlowKey).cast::<u64>(), (b as *const FlowKey).cast::<u64>());
    let mut diff = 0;
    let mut i = 0;
    while i < 5 {
        // SAFETY: both keys are 40 bytes and, by the callers' contract, 8-aligned.
        // Aligned word loads: for the bpf target LLVM splits `read_unaligned` into bytes.
        diff |= unsafe { a.add(i).read() ^ b.add(i).read() };
        i += 1;
    }
    diff == 0
}

/// `*dst = *src` with five word copies (an aggregate copy becomes a `memcpy` call).
#[inline(always)]
pub fn copy_key(dst: &mut FlowKey, src: &FlowKey) {
    let (d, s) = ((dst as *mut FlowKey).cast::<u64>(), (src as *const FlowKey).cast::<u64>());
    let mut i = 0;
    while i < 5 {
        // SAFETY: as in `same_key`.
        unsafe { d.add(i).write(s.add(i).read()) };
        i += 1;
    }
}
