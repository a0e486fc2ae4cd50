//! Parsing a packet into a flow key, oriented from the command's side.
//!
//! The same parser serves the TC programs (Ethernet frames: the IP header at offset 14, the
//! EtherType in the frame) and `cgroup_skb` (the IP header at offset 0, the EtherType from
//! `skb->protocol`); the offset is a const generic so the verifier sees constant offsets.
//! All reads go through `SkBuff::load` (`bpf_skb_load_bytes`), which bounds-checks against
//! the packet, so a short or malformed packet yields `Err` and is counted as a parse drop by
//! the caller, never read out of bounds. IPv6 extension headers are followed for a bounded
//! number of steps (RFC 8200 §4).

use aya_ebpf::programs::sk_buff::SkBuff;
use childflow_common::flow::{
    DIR_OUT, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

/// Where the IP header starts in a TC program's Ethernet frame.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

/// What accounting needs from one packet. Lives in a per-CPU scratch map, not on the
/// 512-byte BPF stack.
#[repr(C)]
pub struct Parsed {
    pub key: FlowKey,
    /// IP header and everything after it.
    pub ip_len: u32,
    /// Transport payload (after the TCP/UDP/ICMP header).
    pub payload_len: u32,
    pub tcp_flags: u8,
}

/// Why a frame was not accounted.
pub enum NotParsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): nothing to account, not a loss.
    NotIp,
    /// An IP packet too short for the headers it claims.
    Malformed,
}

/// Parses the Ethernet frame in `ctx` into `out`. `dir` says whether the command sent it
/// (`DIR_OUT`: source is local) or receives it (`DIR_IN`: destination is local).
#[inline(always)]
pub fn parse_frame(ctx: &SkBuff, dir: usize, out: &mut Parsed) -> Result<(), NotParsed> {
    let eth_proto = u16::from_be(ctx.load::<u16>(12).map_err(|_| NotParsed::Malformed)?);
    parse::<ETH_HLEN>(ctx, eth_proto, dir, out)
}

/// Parses the IP packet starting at offset `L3` of `ctx`, of EtherType `eth_proto`.
#[inline(always)]
pub fn parse<const L3: usize>(
    ctx: &SkBuff,
    eth_proto: u16,
    dir: usize,
    out: &mut Parsed,
) -> Result<(), NotParsed> {
    const { assert!(L3 == 0 || L3 == ETH_HLEN) };
    let key = &mut out.key;
    *key = FlowKey::default();
    let (l4_off, ip_len, proto) = match eth_proto {
        ETH_P_IP => {
            let vihl: u8 = load(ctx, L3)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(NotParsed::Malformed);
            }
            let tot_len = u16::from_be(load::<u16>(ctx, L3 + 2)?) as u32;
            let frag = u16::from_be(load::<u16>(ctx, L3 + 6)?);
            let proto: u8 = load(ctx, L3 + 9)?;
            key.family = FAMILY_V4;
            load_addrs::<4>(ctx, key, dir, L3 + 12)?;
            // A non-first fragment carries no transport header: account it to the
            // protocol with zero ports rather than misreading payload as ports.
            let l4 = if frag & 0x1fff != 0 { None } else { Some(L3 + ihl) };
            (l4, tot_len, proto)
        }
        ETH_P_IPV6 => {
            let payload_len = u16::from_be(load::<u16>(ctx, L3 + 4)?) as u32;
            let mut next: u8 = load(ctx, L3 + 6)?;
            key.family = FAMILY_V6;
            load_addrs::<16>(ctx, key, dir, L3 + 8)?;
            let mut off = L3 + 40;
            let mut l4 = Some(off);
            let mut i = 0;
            while i < 4 {
                match next {
                    0 | 43 | 60 => {
                        let hdr: [u8; 2] = load(ctx, off)?;
                        next = hdr[0];
                        off += (hdr[1] as usize + 1) * 8;
                    }
                    44 => {
                        let hdr: [u8; 4] = load(ctx, off)?;
                        next = hdr[0];
                        if (u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8) != 0 {
                            l4 = None;
                        }
                        off += 8;
                    }
                    51 => {
                        let hdr: [u8; 2] = load(ctx, off)?;
                        next = hdr[0];
                        off += (hdr[1] as usize + 2) * 4;
                    }
                    _ => break,
                }
                i += 1;
            }
            if l4.is_some() {
                l4 = Some(off);
            }
            (l4, payload_len + 40, next)
        }
        _ => return Err(NotParsed::NotIp),
    };
    key.proto = proto;

    let key = &mut out.key;
    let mut payload_len = 0;
    let mut tcp_flags = 0;
    if let Some(off) = l4_off {
        let ip_hdr = (off - L3) as u32;
        let l4_len = ip_len.saturating_sub(ip_hdr);
        match proto {
            PROTO_TCP => {
                let ports: [u8; 4] = load(ctx, off)?;
                let doff_flags: [u8; 2] = load(ctx, off + 12)?;
                set_ports(key, dir, &ports);
                tcp_flags = doff_flags[1];
                payload_len = l4_len.saturating_sub(((doff_flags[0] >> 4) as u32) * 4);
            }
            PROTO_UDP => {
                let ports: [u8; 4] = load(ctx, off)?;
                set_ports(key, dir, &ports);
                payload_len = l4_len.saturating_sub(8);
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                let hdr: [u8; 6] = load(ctx, off)?;
                let id = u16::from_be_bytes([hdr[4], hdr[5]]);
                let (local, remote) = FlowKey::icmp_ports(key.family, hdr[0], hdr[1], id);
                key.local_port = local;
                key.remote_port = remote;
                payload_len = l4_len.saturating_sub(8);
            }
            _ => payload_len = l4_len,
        }
    }
    out.ip_len = ip_len;
    out.payload_len = payload_len;
    out.tcp_flags = tcp_flags;
    Ok(())
}

#[inline(always)]
fn load<T>(ctx: &SkBuff, off: usize) -> Result<T, NotParsed> {
    ctx.load::<T>(off).map_err(|_| NotParsed::Malformed)
}

/// Loads the source and destination addresses (`N` bytes each, adjacent at `off`) straight
/// into the key, local side first.
#[inline(always)]
fn load_addrs<const N: usize>(
    ctx: &SkBuff,
    key: &mut FlowKey,
    dir: usize,
    off: usize,
) -> Result<(), NotParsed> {
    let src: [u8; N] = load(ctx, off)?;
    let dst: [u8; N] = load(ctx, off + N)?;
    let (local, remote) = if dir == DIR_OUT { (&src, &dst) } else { (&dst, &src) };
    key.local_addr[..N].copy_from_slice(local);
    key.remote_addr[..N].copy_from_slice(remote);
    Ok(())
}

#[inline(always)]
fn set_ports(key: &mut FlowKey, dir: usize, ports: &[u8; 4]) {
    let src = u16::from_be_bytes([ports[0], ports[1]]);
    let dst = u16::from_be_bytes([ports[2], ports[3]]);
    if dir == DIR_OUT {
        key.local_port = src;
        key.remote_port = dst;
    } else {
        key.local_port = dst;
        key.remote_port = src;
    }
}
