//! Community ID flow hashing, version 1 (<https://github.com/corelight/community-id-spec>),
//! so a flow in childflow's log can be joined with the same flow in Zeek, Suricata or
//! Wireshark output.
//!
//! [`of_key`] hashes on the stack and returns an inline [`CommunityId`]: it runs once per new
//! flow, and the `community-id` crate's three heap strings (plus the copy into an `Arc<str>`)
//! were a fifth of the cost of a new flow in the flow table benchmark. [`compute`] keeps
//! the crate's implementation; a test checks both agree on every kind of key.
//!
//! The spec maps a [`FlowKey`] onto its inputs as follows. For ICMP the spec puts the message
//! type where the source port goes and the code where the destination port goes (it then
//! pairs request and reply types itself). Our ICMP keys keep `type << 8 | code` of the
//! request in `remote_port` (see [`FlowKey`]).
//! The tests below check every vector the specification publishes, with seed 0 and seed 1.

use std::{fmt, net::IpAddr, ops::Deref};

use base64::Engine as _;
use childflow_common::flow::{FAMILY_V4, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use sha1::{Digest, Sha1};

use crate::{event::FlowKey, flow::is_icmp};

/// `1:` and the base64 of a 20-byte SHA-1: always 30 ASCII bytes.
const LEN: usize = 30;

/// A Community ID v1 string (`1:` + base64 of a SHA-1), stored inline so a flow carries
/// it without a heap allocation. Reads as a `&str` (empty for keys no backend produces).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CommunityId {
    /// 0 (empty) or [`LEN`].
    len: u8,
    bytes: [u8; LEN],
}

impl CommunityId {
    pub fn as_str(&self) -> &str {
        // Only ever filled with "1:" and base64 output, which is ASCII.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl Deref for CommunityId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for CommunityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CommunityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for CommunityId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for CommunityId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The counterpart of a paired ICMP type (request ↔ reply), as the spec lists them; `None`
/// for one-way types.
fn icmp_counterpart(proto: u8, icmp_type: u16) -> Option<u16> {
    let pairs: &[(u16, u16)] = if proto == PROTO_ICMPV6 {
        // echo, MLD query/report, router sol/adv, neighbor sol/adv, WRU, HAAD.
        &[(128, 129), (130, 131), (133, 134), (135, 136), (139, 140), (144, 145)]
    } else {
        // echo, router adv/sol, timestamp, info, address mask.
        &[(8, 0), (9, 10), (13, 14), (15, 16), (17, 18)]
    };
    pairs.iter().find_map(|&(a, b)| match icmp_type {
        t if t == a => Some(b),
        t if t == b => Some(a),
        _ => None,
    })
}

/// Whether the spec hashes ports (or ICMP type and code) for `proto`: TCP, UDP, SCTP, ICMP
/// and ICMPv6. Other protocols hash the addresses only.
fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) || is_icmp(proto)
}

/// SCTP's protocol number (IANA "Assigned Internet Protocol Numbers").
const PROTO_SCTP: u8 = 132;

/// The Community ID of `key` as seen from the originator's side. One-way ICMP types hash
/// differently depending on which side sent them, so the originator matters there; for
/// everything else the value is the same either way.
///
/// Empty only for keys no backend produces (ICMPv6 over IPv4), rather than failing the flow.
pub fn of_key(key: &FlowKey, local_orig: bool, seed: u16) -> CommunityId {
    let v4 = key.family == FAMILY_V4;
    if v4 && key.proto == PROTO_ICMPV6 {
        tracing::debug!("no community id for {key}: icmpv6 over ipv4");
        return CommunityId::default();
    }
    let alen = if v4 { 4 } else { 16 };
    let (local, remote) = (&key.local_addr[..alen], &key.remote_addr[..alen]);
    // An ICMP key's type is the one the originator sent; for echo and the other paired types
    // the spec orders the sides itself, so the address order only matters for one-way types.
    let (mut src, mut dst) = if local_orig { (local, remote) } else { (remote, local) };
    let (mut sport, mut dport, one_way) = if is_icmp(key.proto) {
        let icmp_type = key.remote_port >> 8;
        match icmp_counterpart(key.proto, icmp_type) {
            Some(other) => (icmp_type, other, false),
            None => (icmp_type, key.remote_port & 0xff, true),
        }
    } else if local_orig {
        (key.local_port, key.remote_port, false)
    } else {
        (key.remote_port, key.local_port, false)
    };
    // The spec's ordering: the smaller address (then port) first, so both directions agree.
    if !(one_way || src < dst || (src == dst && sport < dport)) {
        std::mem::swap(&mut src, &mut dst);
        std::mem::swap(&mut sport, &mut dport);
    }
    // seed, saddr, daddr, proto, padding, then sport and dport for the protocols that have
    // ports in the spec's sense (all network byte order).
    let mut input = [0u8; 2 + 16 + 16 + 2 + 4];
    let mut n = 0;
    for part in [&seed.to_be_bytes()[..], src, dst, &[key.proto, 0]] {
        input[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    if has_ports(key.proto) {
        input[n..n + 2].copy_from_slice(&sport.to_be_bytes());
        input[n + 2..n + 4].copy_from_slice(&dport.to_be_bytes());
        n += 4;
    }
    let digest = Sha1::digest(&input[..n]);
    let mut id = CommunityId { len: LEN as u8, bytes: [0; LEN] };
    id.bytes[..2].copy_from_slice(b"1:");
    match base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut id.bytes[2..]) {
        Ok(written) if written == LEN - 2 => id,
        _ => CommunityId::default(),
    }
}

/// The Community ID v1 string (`1:` + base64) of one packet's or flow's fields. Ports are
/// `None` for protocols without them.
pub fn compute(
    seed: u16,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: Option<u16>,
    dport: Option<u16>,
) -> Result<String, &'static str> {
    community_id::calculate_community_id(seed, src, dst, sport, dport, proto, false)
}

#[cfg(test)]
mod tests {
    use childflow_common::flow::{ICMP_ECHO_REQUEST, PROTO_ICMP};

    use super::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        proto: u8,
        saddr: IpAddr,
        daddr: IpAddr,
        sport: Option<u16>,
        dport: Option<u16>,
        communityid: String,
    }

    fn check_vectors(seed: u16, json: &str) {
        let vectors: Vec<Vector> = serde_json::from_str(json).expect("vector file parses");
        assert!(vectors.len() > 20, "expected the spec's full vector set");
        for v in vectors {
            let got = compute(seed, v.proto, v.saddr, v.daddr, v.sport, v.dport)
                .unwrap_or_else(|e| panic!("proto {} {} -> {}: {e}", v.proto, v.saddr, v.daddr));
            assert_eq!(
                got, v.communityid,
                "seed {seed} proto {} {}:{:?} -> {}:{:?}",
                v.proto, v.saddr, v.sport, v.daddr, v.dport
            );
            // The same flow as a key the command originated, through the fast path.
            let (local_port, remote_port) = if is_icmp(v.proto) {
                (0, v.sport.unwrap_or(0) << 8 | v.dport.unwrap_or(0))
            } else {
                (v.sport.unwrap_or(0), v.dport.unwrap_or(0))
            };
            let key = FlowKey::new(
                v.proto,
                std::net::SocketAddr::new(v.saddr, local_port),
                std::net::SocketAddr::new(v.daddr, remote_port),
            );
            assert_eq!(of_key(&key, true, seed), v.communityid.as_str(), "of_key of {key}");
        }
    }

    /// What `of_key` computed before it hashed on the stack: through the crate.
    fn of_key_via_crate(key: &FlowKey, local_orig: bool, seed: u16) -> String {
        let (local, remote) = (key.local_ip(), key.remote_ip());
        let (sport, dport) = if is_icmp(key.proto) {
            (key.remote_port >> 8, key.remote_port & 0xff)
        } else if local_orig {
            (key.local_port, key.remote_port)
        } else {
            (key.remote_port, key.local_port)
        };
        let ports = has_ports(key.proto);
        let (src, dst) = if local_orig { (local, remote) } else { (remote, local) };
        compute(seed, key.proto, src, dst, ports.then_some(sport), ports.then_some(dport))
            .unwrap_or_default()
    }

    #[test]
    fn the_stack_hash_agrees_with_the_community_id_crate_on_every_kind_of_key() {
        let addrs: [(&str, &str); 4] = [
            ("198.18.0.1", "198.18.0.2"),
            ("198.18.0.2", "198.18.0.1"),
            ("198.18.0.7", "198.18.0.7"),
            ("2001:db8::1", "2001:db8::2"),
        ];
        let mut checked = 0;
        for (a, b) in addrs {
            let (a, b): (IpAddr, IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
            for proto in [PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP, PROTO_ICMPV6, 47] {
                let ports: Vec<(u16, u16)> = if is_icmp(proto) {
                    (0..=255u16).flat_map(|t| [(7, t << 8), (0, t << 8 | 3)]).collect()
                } else {
                    vec![(1024, 443), (443, 1024), (53, 53), (0, 0)]
                };
                for (lp, rp) in ports {
                    let key = FlowKey::new(
                        proto,
                        std::net::SocketAddr::new(a, lp),
                        std::net::SocketAddr::new(b, rp),
                    );
                    for local_orig in [true, false] {
                        for seed in [0, 1, 0xbeef] {
                            let want = of_key_via_crate(&key, local_orig, seed);
                            let got = of_key(&key, local_orig, seed);
                            assert_eq!(got, want.as_str(), "{key} local_orig {local_orig}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000, "checked {checked}");
    }

    #[test]
    fn icmpv6_over_ipv4_has_no_community_id() {
        let key = FlowKey::new(
            PROTO_ICMPV6,
            "198.18.0.1:0".parse().unwrap(),
            "198.18.0.2:32768".parse().unwrap(),
        );
        assert_eq!(of_key(&key, true, 0), "");
        assert!(of_key(&key, true, 0).is_empty());
    }

    #[test]
    fn matches_the_specifications_published_vectors_with_seed_0() {
        check_vectors(0, include_str!("testdata/community_id_baseline_deflt.json"));
    }

    #[test]
    fn matches_the_specifications_published_vectors_with_seed_1() {
        check_vectors(1, include_str!("testdata/community_id_baseline_seed1.json"));
    }

    #[test]
    fn a_flow_key_hashes_like_its_packets_in_either_orientation() {
        // The spec's HTTP vector, as a flow the command opened and as one the peer opened.
        let key = FlowKey::new(
            PROTO_TCP,
            "128.232.110.120:34855".parse().unwrap(),
            "66.35.250.204:80".parse().unwrap(),
        );
        assert_eq!(&*of_key(&key, true, 0), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        assert_eq!(&*of_key(&key, false, 0), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        assert_eq!(&*of_key(&key, true, 1), "1:3V71V58M3Ksw/yuFALMcW0LAHvc=");
    }

    #[test]
    fn an_icmp_echo_key_hashes_like_the_specs_echo_vector() {
        let (id, type_code) = FlowKey::icmp_ports(FAMILY_V4, ICMP_ECHO_REQUEST, 0, 7);
        let key = FlowKey::new(
            PROTO_ICMP,
            format!("192.168.0.89:{id}").parse().unwrap(),
            format!("192.168.0.1:{type_code}").parse().unwrap(),
        );
        assert_eq!(&*of_key(&key, true, 0), "1:X0snYXpgwiv9TZtqg64sgzUn6Dk=");
    }
}
