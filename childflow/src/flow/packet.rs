//! The [`FlowKey`] of a captured packet, so per-packet consumers (the pcapng writer) find
//! the packet's flow — and with it its Community ID and process — in the flow table.
//!
//! Parses only what the key needs: Ethernet (one optional 802.1Q tag), IPv4 (RFC 791) or
//! IPv6 (RFC 8200, no extension headers), and the first bytes of TCP, UDP, ICMP or ICMPv6.
//! Every access is bounds-checked; malformed or truncated input gives `None`, never a panic.

use childflow_common::flow::{
    FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

use crate::event::{Direction, FlowKey};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The key of the flow an Ethernet frame belongs to, oriented from the command's side
/// (`direction` says whether the command sent it).
pub fn key_of_frame(direction: Direction, frame: &[u8]) -> Option<FlowKey> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let ip = frame.get(l3..)?;
    let (family, proto, src, dst, l4) = match ethertype {
        ETHERTYPE_IPV4 => {
            if ip.first()? >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            // Only the first fragment carries the transport header.
            if be16(ip, 6)? & 0x1fff != 0 || ihl < 20 {
                return None;
            }
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(ip.get(12..16)?);
            dst[..4].copy_from_slice(ip.get(16..20)?);
            (FAMILY_V4, *ip.get(9)?, src, dst, ip.get(ihl..)?)
        }
        ETHERTYPE_IPV6 => {
            if ip.first()? >> 4 != 6 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (FAMILY_V6, *ip.get(6)?, src, dst, ip.get(40..)?)
        }
        _ => return None,
    };
    let (local_addr, remote_addr) = match direction {
        Direction::Out => (src, dst),
        Direction::In => (dst, src),
    };
    let (local_port, remote_port) = match proto {
        PROTO_TCP | PROTO_UDP => {
            let (sport, dport) = (be16(l4, 0)?, be16(l4, 2)?);
            match direction {
                Direction::Out => (sport, dport),
                Direction::In => (dport, sport),
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let (icmp_type, code) = (*l4.first()?, *l4.get(1)?);
            let id = be16(l4, 4).unwrap_or(0);
            FlowKey::icmp_ports(family, icmp_type, code, id)
        }
        _ => (0, 0),
    };
    Some(FlowKey { local_addr, remote_addr, local_port, remote_port, proto, family, _pad: [0; 2] })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet + IPv4 frame of `proto` from `src` to `dst` with `l4` as transport bytes.
    pub fn ipv4_frame(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend(ETHERTYPE_IPV4.to_be_bytes());
        let total = (20 + l4.len()) as u16;
        f.extend([0x45, 0]);
        f.extend(total.to_be_bytes());
        f.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
        f.extend(src);
        f.extend(dst);
        f.extend(l4);
        f
    }

    fn ports(sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = sport.to_be_bytes().to_vec();
        l4.extend(dport.to_be_bytes());
        l4.extend([0; 16]);
        l4
    }

    #[test]
    fn tcp_packets_both_ways_share_the_commands_key() {
        let out = ipv4_frame(PROTO_TCP, [10, 0, 2, 100], [198, 18, 0, 1], &ports(40000, 80));
        let back = ipv4_frame(PROTO_TCP, [198, 18, 0, 1], [10, 0, 2, 100], &ports(80, 40000));
        let want = FlowKey::new(
            PROTO_TCP,
            "10.0.2.100:40000".parse().unwrap(),
            "198.18.0.1:80".parse().unwrap(),
        );
        assert_eq!(key_of_frame(Direction::Out, &out), Some(want));
        assert_eq!(key_of_frame(Direction::In, &back), Some(want));
    }

    #[test]
    fn an_echo_reply_finds_its_requests_key() {
        let request =
            ipv4_frame(PROTO_ICMP, [10, 0, 2, 100], [198, 18, 0, 1], &[8, 0, 0, 0, 0, 7, 0, 1]);
        let reply =
            ipv4_frame(PROTO_ICMP, [198, 18, 0, 1], [10, 0, 2, 100], &[0, 0, 0, 0, 0, 7, 0, 1]);
        let k = key_of_frame(Direction::Out, &request).expect("request key");
        assert_eq!((k.local_port, k.remote_port), (7, 8 << 8));
        assert_eq!(key_of_frame(Direction::In, &reply), Some(k));
    }

    #[test]
    fn ipv6_udp() {
        let mut f = vec![0u8; 12];
        f.extend(ETHERTYPE_IPV6.to_be_bytes());
        f.extend([0x60, 0, 0, 0, 0, 8, PROTO_UDP, 64]);
        f.extend("2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend("2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend(ports(5353, 53));
        let k = key_of_frame(Direction::Out, &f).expect("v6 key");
        assert_eq!(k.to_string(), "udp [2001:db8::2]:5353 -> [2001:db8::1]:53");
    }

    #[test]
    fn truncated_and_foreign_frames_have_no_key() {
        let full = ipv4_frame(PROTO_TCP, [10, 0, 2, 100], [198, 18, 0, 1], &ports(1, 2));
        for len in 0..34 + 4 {
            assert_eq!(key_of_frame(Direction::Out, &full[..len]), None, "len {len}");
        }
        let mut arp = full.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(key_of_frame(Direction::Out, &arp), None);
    }
}
