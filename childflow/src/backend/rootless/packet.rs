//! Reading the headers of frames that cross the tap, and building the few frames the engine
//! writes itself (UDP and ICMP replies, RSTs for refused connections, ICMP errors).
//!
//! Parsing is a bounds-checked walk over the Ethernet, IPv4 (RFC 791) / IPv6 (RFC 8200) and
//! TCP (RFC 9293) / UDP (RFC 768) / ICMP (RFC 792, RFC 4443) headers: every read goes
//! through `get`, so malformed or truncated frames from the command give `None`, never a
//! panic. Nothing here verifies checksums: the frames come from the kernel of the command's
//! namespace, which computed them. Frames are built with etherparse, which computes the
//! checksums the command's kernel checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use childflow_common::flow::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use etherparse::PacketBuilder;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETH_HEADER_LEN: usize = 14;

/// A MAC address.
pub type Mac = [u8; 6];

/// The headers of one IP packet in an Ethernet frame, as far as the engine needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src_mac: Mac,
    /// IP protocol number of the transport header (`PROTO_*`).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports for TCP/UDP; for ICMP echo, the identifier as `src_port` and 0.
    pub src_port: u16,
    pub dst_port: u16,
    /// The IP packet's length (header and everything after it).
    pub ip_len: u32,
    /// Offset of the IP header in the frame.
    pub ip_offset: usize,
    /// Offset of the transport header in the frame.
    pub l4_offset: usize,
    /// Offset of the transport payload in the frame.
    pub payload_offset: usize,
    /// Length of the transport payload.
    pub payload_len: u32,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// TCP sequence number (0 for other protocols).
    pub tcp_seq: u32,
    /// ICMP type and code (0 for other protocols).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// ICMP echo sequence number.
    pub icmp_seq: u16,
    /// An IPv4 fragment or an IPv6 packet with a Fragment header (RFC 8200 §4.5): the
    /// transport fields are unset (0) and the engine reassembles it ([`super::frag`]).
    pub fragment: bool,
    /// The IPv4 TTL or IPv6 hop limit the command sent the packet with.
    pub ttl: u8,
}

impl Headers {
    pub fn src_addr(&self) -> SocketAddr {
        SocketAddr::new(self.src, self.src_port)
    }

    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(self.dst, self.dst_port)
    }

    /// The transport payload within `frame`.
    pub fn payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        let end = self.payload_offset + self.payload_len as usize;
        frame.get(self.payload_offset..end).unwrap_or_default()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The EtherType of `frame`, if it is long enough to have one.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    u16_at(frame, 12)
}

/// Parses the IP and transport headers of an Ethernet frame. `None` for anything that is
/// not a well-formed IPv4/IPv6 packet (ARP, NDP with extension headers, truncated frames).
pub fn parse(frame: &[u8]) -> Option<Headers> {
    parse_inner(frame, false)
}

/// Like [`parse`], for a stored prefix of a frame: the headers must be complete, the
/// payload may be cut short (`payload_len` still says how long it was).
pub fn parse_prefix(frame: &[u8]) -> Option<Headers> {
    parse_inner(frame, true)
}

fn parse_inner(frame: &[u8], prefix: bool) -> Option<Headers> {
    let src_mac: Mac = frame.get(6..12)?.try_into().ok()?;
    let ip = ETH_HEADER_LEN;
    let (proto, src, dst, ip_len, l4, fragment, ttl) = match ethertype(frame)? {
        ETHERTYPE_IPV4 => {
            let vihl = *frame.get(ip)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = usize::from(u16_at(frame, ip + 2)?);
            if total < ihl || (!prefix && frame.len() < ip + total) {
                return None;
            }
            let frag = u16_at(frame, ip + 6)?;
            let fragment = frag & 0x3fff != 0;
            let src: [u8; 4] = frame.get(ip + 12..ip + 16)?.try_into().ok()?;
            let dst: [u8; 4] = frame.get(ip + 16..ip + 20)?.try_into().ok()?;
            let ttl = *frame.get(ip + 8)?;
            let proto = *frame.get(ip + 9)?;
            (proto, IpAddr::from(src), IpAddr::from(dst), total, ip + ihl, fragment, ttl)
        }
        ETHERTYPE_IPV6 => {
            if frame.get(ip)? >> 4 != 6 {
                return None;
            }
            let total = 40 + usize::from(u16_at(frame, ip + 4)?);
            if !prefix && frame.len() < ip + total {
                return None;
            }
            let src: [u8; 16] = frame.get(ip + 8..ip + 24)?.try_into().ok()?;
            let dst: [u8; 16] = frame.get(ip + 24..ip + 40)?.try_into().ok()?;
            let chain = ipv6_chain(frame, ip, ip + total)?;
            let ttl = *frame.get(ip + 7)?;
            let fragment = chain.fragment.is_some_and(|f| f.offset != 0 || f.more);
            (chain.proto, IpAddr::from(src), IpAddr::from(dst), total, chain.l4, fragment, ttl)
        }
        _ => return None,
    };
    let end = ip + ip_len;
    let mut h = Headers {
        src_mac,
        proto,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        ip_len: ip_len as u32,
        ip_offset: ip,
        l4_offset: l4,
        payload_offset: l4,
        payload_len: (end - l4) as u32,
        tcp_flags: 0,
        tcp_seq: 0,
        icmp_type: 0,
        icmp_code: 0,
        icmp_seq: 0,
        fragment,
        ttl,
    };
    if fragment {
        return Some(h);
    }
    let header_len = match proto {
        PROTO_TCP => {
            h.src_port = u16_at(frame, l4)?;
            h.dst_port = u16_at(frame, l4 + 2)?;
            h.tcp_seq = u32_at(frame, l4 + 4)?;
            h.tcp_flags = *frame.get(l4 + 13)?;
            usize::from(frame.get(l4 + 12)? >> 4) * 4
        }
        PROTO_UDP => {
            h.src_port = u16_at(frame, l4)?;
            h.dst_port = u16_at(frame, l4 + 2)?;
            8
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            h.icmp_type = *frame.get(l4)?;
            h.icmp_code = *frame.get(l4 + 1)?;
            h.src_port = u16_at(frame, l4 + 4)?;
            h.icmp_seq = u16_at(frame, l4 + 6)?;
            8
        }
        _ => 0,
    };
    if l4 + header_len > end {
        return None;
    }
    h.payload_offset = l4 + header_len;
    h.payload_len = (end - h.payload_offset) as u32;
    Some(h)
}

/// IPv6 extension headers that sit between the fixed header and the transport header
/// and are skipped to reach it (RFC 8200 §4): Hop-by-Hop Options, Routing, Destination
/// Options (all `(len + 1) * 8` bytes), Fragment (8 bytes) and Authentication (RFC 4302,
/// `(len + 2) * 4` bytes).
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// More extension headers than any sane packet carries: a chain longer than this is
/// treated as malformed rather than walked.
const IPV6_MAX_EXT_HEADERS: usize = 8;

/// What a Fragment header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Fragment {
    /// Offset of the Fragment header in the frame.
    pub header_offset: usize,
    /// Offset of the Next Header byte that names the Fragment header (in the IPv6 header
    /// or the extension header before it), which reassembly rewrites.
    pub named_at: usize,
    /// Offset of the fragment's data, in bytes from the start of the fragmentable part.
    pub offset: usize,
    /// The M flag: more fragments follow.
    pub more: bool,
    pub ident: u32,
}

/// The end of an IPv6 header chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Chain {
    /// The upper-layer protocol (or the Fragment header's next header for a fragment).
    pub proto: u8,
    /// Offset of the upper-layer header (for a fragment: of the fragment's data).
    pub l4: usize,
    pub fragment: Option<Ipv6Fragment>,
}

/// Walks the extension headers of the IPv6 packet at `ip` (ending at `end`) to its
/// upper-layer header.
pub fn ipv6_chain(frame: &[u8], ip: usize, end: usize) -> Option<Ipv6Chain> {
    let mut next_header_at = ip + 6;
    let mut next = *frame.get(next_header_at)?;
    let mut at = ip + 40;
    let mut fragment = None;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                (usize::from(*frame.get(at + 1)?) + 1) * 8
            }
            IPV6_AUTH => (usize::from(*frame.get(at + 1)?) + 2) * 4,
            IPV6_FRAGMENT => {
                let field = u16_at(frame, at + 2)?;
                fragment = Some(Ipv6Fragment {
                    header_offset: at,
                    named_at: next_header_at,
                    offset: usize::from(field & 0xfff8),
                    more: field & 1 != 0,
                    ident: u32_at(frame, at + 4)?,
                });
                8
            }
            _ => {
                if at > end {
                    return None;
                }
                return Some(Ipv6Chain { proto: next, l4: at, fragment });
            }
        };
        if at + len > end {
            return None;
        }
        next_header_at = at;
        next = *frame.get(at)?;
        at += len;
        if fragment.is_some_and(|f| f.offset != 0 || f.more) {
            // The rest of the chain may be in the first fragment only.
            return Some(Ipv6Chain { proto: next, l4: at, fragment });
        }
    }
    None
}

/// Frame builders. Each appends one complete Ethernet frame to `out` (cleared first).
pub struct Builder {
    /// The engine's (gateway's) MAC: the source of every frame it builds.
    pub our_mac: Mac,
    /// The command's MAC, learned from its frames.
    pub peer_mac: Mac,
}

/// Hop limit of the frames the engine builds: they look like they came from one hop away.
const HOP_LIMIT: u8 = 64;

fn ipv4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
    }
}

fn ipv6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// Why an ICMP destination-unreachable is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// No route to, or no answer from, the host.
    Host,
    /// Nothing listens on the UDP port.
    Port,
    /// Policy forbids it (host loopback without `--allow-host-loopback`).
    Prohibited,
}

/// An ICMP error message for the command: type and code in the family of the packet it
/// answers (ICMPv4 for IPv4, ICMPv6 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub icmp_type: u8,
    pub code: u8,
}

impl IcmpError {
    /// ICMP time exceeded in transit (RFC 792) / hop limit exceeded (RFC 4443 §3.3).
    pub fn time_exceeded(v4: bool) -> IcmpError {
        IcmpError { icmp_type: if v4 { 11 } else { 3 }, code: 0 }
    }
}

impl Builder {
    fn eth(&self) -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
        PacketBuilder::ethernet2(self.our_mac, self.peer_mac)
    }

    /// A UDP datagram from `from` to the command's `to`.
    pub fn udp(&self, from: SocketAddr, to: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let step = match (from.ip(), to.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                self.eth().ipv4(ipv4(from.ip()), ipv4(to.ip()), HOP_LIMIT)
            }
            _ => self.eth().ipv6(ipv6(from.ip()), ipv6(to.ip()), HOP_LIMIT),
        };
        let b = step.udp(from.port(), to.port());
        out.reserve(b.size(payload.len()));
        // Writing into a Vec cannot fail short of a payload too large for the IP length
        // field, which the callers' MTU checks exclude.
        let _ = b.write(out, payload);
    }

    /// A RST|ACK answering the SYN described by `syn` (RFC 9293 §3.10.7.1: a SYN to a
    /// closed port is answered with `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`).
    pub fn rst_for_syn(&self, syn: &Headers, out: &mut Vec<u8>) {
        out.clear();
        // SYN occupies one sequence number.
        let ack = syn.tcp_seq.wrapping_add(syn.payload_len).wrapping_add(1);
        let step = match (syn.dst, syn.src) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                self.eth().ipv4(ipv4(syn.dst), ipv4(syn.src), HOP_LIMIT)
            }
            _ => self.eth().ipv6(ipv6(syn.dst), ipv6(syn.src), HOP_LIMIT),
        };
        let b = step.tcp(syn.dst_port, syn.src_port, 0, 0).rst().ack(ack);
        let _ = b.write(out, &[]);
    }

    /// An ICMP destination-unreachable from `from` about the packet `original` (a whole
    /// frame from the command, whose headers are `h`).
    pub fn unreachable(
        &self,
        from: IpAddr,
        h: &Headers,
        original: &[u8],
        why: Unreachable,
        out: &mut Vec<u8>,
    ) {
        let v4 = h.src.is_ipv4();
        let err = match why {
            // RFC 792: host unreachable; RFC 4443 §3.1: address unreachable.
            Unreachable::Host if v4 => IcmpError { icmp_type: 3, code: 1 },
            Unreachable::Host => IcmpError { icmp_type: 1, code: 3 },
            Unreachable::Port if v4 => IcmpError { icmp_type: 3, code: 3 },
            Unreachable::Port => IcmpError { icmp_type: 1, code: 4 },
            // RFC 1812 §5.2.7.1: communication with destination host administratively
            // prohibited; RFC 4443: communication with destination administratively prohibited.
            Unreachable::Prohibited if v4 => IcmpError { icmp_type: 3, code: 10 },
            Unreachable::Prohibited => IcmpError { icmp_type: 1, code: 1 },
        };
        self.icmp_error(from, h, original, err, out);
    }

    /// An ICMP error `err` (of the packet's family) from `from` about the packet `original`
    /// (a frame from the command, or a stored prefix of one, whose headers are `h`),
    /// quoting as much of it as RFC 792 (IP header + 64 bits) or RFC 4443 §2.4 (as much as
    /// fits in 1280 bytes) asks. Bytes 5–8 of the ICMP header are zero, which is what
    /// destination unreachable (other than "fragmentation needed"), time exceeded and
    /// their ICMPv6 counterparts carry.
    pub fn icmp_error(
        &self,
        from: IpAddr,
        h: &Headers,
        original: &[u8],
        err: IcmpError,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        let end = (h.ip_offset + h.ip_len as usize).min(original.len());
        let ip_packet = original.get(h.ip_offset..end).unwrap_or_default();
        match h.src {
            IpAddr::V4(_) => {
                let quote =
                    &ip_packet[..ip_packet.len().min(h.l4_offset.saturating_sub(h.ip_offset) + 8)];
                let b = self.eth().ipv4(ipv4(from), ipv4(h.src), HOP_LIMIT).icmpv4(
                    etherparse::Icmpv4Type::Unknown {
                        type_u8: err.icmp_type,
                        code_u8: err.code,
                        bytes5to8: [0; 4],
                    },
                );
                let _ = b.write(out, quote);
            }
            IpAddr::V6(_) => {
                // 1280 minus the IPv6 (40) and ICMPv6 (8) headers.
                let quote = &ip_packet[..ip_packet.len().min(1232)];
                let b = self.eth().ipv6(ipv6(from), ipv6(h.src), HOP_LIMIT).icmpv6(
                    etherparse::Icmpv6Type::Unknown {
                        type_u8: err.icmp_type,
                        code_u8: err.code,
                        bytes5to8: [0; 4],
                    },
                );
                let _ = b.write(out, quote);
            }
        }
    }

    /// An ICMP echo reply from `from` to the command's `to`.
    pub fn echo_reply(
        &self,
        from: IpAddr,
        to: IpAddr,
        ident: u16,
        seq: u16,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.clear();
        match (from, to) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let b =
                    self.eth().ipv4(ipv4(from), ipv4(to), HOP_LIMIT).icmpv4_echo_reply(ident, seq);
                let _ = b.write(out, payload);
            }
            _ => {
                let b =
                    self.eth().ipv6(ipv6(from), ipv6(to), HOP_LIMIT).icmpv6_echo_reply(ident, seq);
                let _ = b.write(out, payload);
            }
        }
    }
}

/// Loopback addresses of the host (127.0.0.0/8, ::1, and IPv4-mapped 127/8).
pub fn is_host_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

/// The unspecified address of `ip`'s family.
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const CHILD_MAC: Mac = [0x02, 0, 0, 0, 0, 0x64];
    pub const GW_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];

    fn builder() -> Builder {
        // Frames "from the command" are built by swapping roles.
        Builder { our_mac: CHILD_MAC, peer_mac: GW_MAC }
    }

    /// A UDP datagram sent by the command.
    pub fn udp_from_child(from: &str, to: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        builder().udp(from.parse().unwrap(), to.parse().unwrap(), payload, &mut out);
        out
    }

    /// A TCP segment sent by the command, with raw flags.
    pub fn tcp_from_child(from: &str, to: &str, seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let from: SocketAddr = from.parse().unwrap();
        let to: SocketAddr = to.parse().unwrap();
        let step = match (from.ip(), to.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                PacketBuilder::ethernet2(CHILD_MAC, GW_MAC).ipv4(ipv4(from.ip()), ipv4(to.ip()), 64)
            }
            _ => {
                PacketBuilder::ethernet2(CHILD_MAC, GW_MAC).ipv6(ipv6(from.ip()), ipv6(to.ip()), 64)
            }
        };
        let mut b = step.tcp(from.port(), to.port(), seq, 65535);
        if syn {
            b = b.syn();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn parses_udp_and_finds_the_payload() {
        let f = udp_from_child("10.0.2.100:5000", "198.18.0.1:53", b"hello");
        let h = parse(&f).expect("a UDP frame parses");
        assert_eq!(h.proto, PROTO_UDP);
        assert_eq!(h.src_addr(), "10.0.2.100:5000".parse().unwrap());
        assert_eq!(h.dst_addr(), "198.18.0.1:53".parse().unwrap());
        assert_eq!(h.payload(&f), b"hello");
        assert_eq!(h.ip_len, 20 + 8 + 5);
        assert_eq!(h.src_mac, CHILD_MAC);
    }

    #[test]
    fn parses_a_v6_syn() {
        let f = tcp_from_child("[fd00:cf::100]:4000", "[2001:db8::1]:80", 77, true, b"");
        let h = parse(&f).expect("a TCP frame parses");
        assert_eq!(h.proto, PROTO_TCP);
        assert_eq!(h.tcp_flags & childflow_common::flow::TCP_SYN, childflow_common::flow::TCP_SYN);
        assert_eq!(h.tcp_seq, 77);
        assert_eq!(h.payload_len, 0);
    }

    /// `frame` (an IPv6 frame without extension headers) with `ext` (whose first byte, the
    /// Next Header, is filled in) inserted after the fixed header as header type `kind`.
    fn with_ipv6_ext(frame: &[u8], kind: u8, mut ext: Vec<u8>) -> Vec<u8> {
        let ip = ETH_HEADER_LEN;
        let mut out = frame[..ip + 40].to_vec();
        ext[0] = out[ip + 6];
        out[ip + 6] = kind;
        let payload = u16::from_be_bytes([out[ip + 4], out[ip + 5]]) + ext.len() as u16;
        out[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&ext);
        out.extend_from_slice(&frame[ip + 40..]);
        out
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_transport_header() {
        let f = udp_from_child("[fd00:cf::100]:5000", "[2001:db8::1]:53", b"hello");
        // Hop-by-Hop with a PadN option (8 bytes), then Destination Options (16 bytes).
        let f = with_ipv6_ext(
            &f,
            IPV6_DEST_OPTS,
            vec![0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let f = with_ipv6_ext(&f, IPV6_HOP_BY_HOP, vec![0, 0, 1, 4, 0, 0, 0, 0]);
        let h = parse(&f).expect("parses through the extension headers");
        assert_eq!((h.proto, h.dst_port, h.fragment), (PROTO_UDP, 53, false));
        assert_eq!(h.payload(&f), b"hello");
        assert_eq!(h.ip_len as usize, 40 + 8 + 16 + 8 + 5);
        // A chain that runs past the packet does not parse.
        let mut bad = f.clone();
        bad[ETH_HEADER_LEN + 40 + 1] = 200;
        assert!(parse(&bad).is_none());
        // An atomic fragment (offset 0, no more fragments) is a whole packet.
        let atomic = with_ipv6_ext(&f, IPV6_FRAGMENT, vec![0, 0, 0, 0, 0, 0, 0, 9]);
        let h = parse(&atomic).expect("an atomic fragment parses");
        assert_eq!((h.proto, h.fragment), (PROTO_UDP, false));
        assert_eq!(h.payload(&atomic), b"hello");
        assert_eq!(h.ttl, 64);
    }

    #[test]
    fn truncated_frames_do_not_parse() {
        let f = udp_from_child("10.0.2.100:5000", "198.18.0.1:53", b"hello");
        for len in 0..f.len() {
            assert!(parse(&f[..len]).is_none(), "a frame cut at {len} bytes parsed");
        }
    }

    #[test]
    fn rst_acknowledges_the_syn() {
        let syn = tcp_from_child("10.0.2.100:4000", "198.18.0.1:81", 1000, true, b"");
        let h = parse(&syn).unwrap();
        let mut out = Vec::new();
        Builder { our_mac: GW_MAC, peer_mac: CHILD_MAC }.rst_for_syn(&h, &mut out);
        let r = parse(&out).expect("the RST parses");
        assert_eq!(r.src_addr(), h.dst_addr());
        assert_eq!(r.dst_addr(), h.src_addr());
        assert_eq!(r.tcp_flags, childflow_common::flow::TCP_RST | childflow_common::flow::TCP_ACK);
        assert_eq!(u32_at(&out, r.l4_offset + 8), Some(1001));
    }

    #[test]
    fn unreachable_quotes_the_original_header() {
        let f = udp_from_child("10.0.2.100:5000", "198.18.0.1:9", &[7; 100]);
        let h = parse(&f).unwrap();
        let mut out = Vec::new();
        Builder { our_mac: GW_MAC, peer_mac: CHILD_MAC }.unreachable(
            "10.0.2.2".parse().unwrap(),
            &h,
            &f,
            Unreachable::Port,
            &mut out,
        );
        let r = parse(&out).expect("the ICMP error parses");
        assert_eq!((r.proto, r.icmp_type, r.icmp_code), (PROTO_ICMP, 3, 3));
        assert_eq!(r.payload_len, 20 + 8, "quotes the IP header and 8 bytes");
    }
}
