//! Community ID flow hashing, version 1 (<https://github.com/corelight/community-id-spec>),
//! so a flow in childflow's log can be joined with the same flow in Zeek, Suricata or
//! Wireshark output.
//!
//! The hashing itself is the `community-id` crate's; this module maps a [`FlowKey`] onto the
//! spec's inputs. For ICMP the spec puts the message type where the source port goes and the
//! code where the destination port goes (it then pairs request and reply types itself).
//! Our ICMP keys keep `type << 8 | code` of the request in `remote_port` (see [`FlowKey`]).
//! The test below checks every vector the specification publishes, with seed 0 and seed 1.

use std::{net::IpAddr, sync::Arc};

use crate::{event::FlowKey, flow::is_icmp};

/// The Community ID of `key` as seen from the originator's side. One-way ICMP types hash
/// differently depending on which side sent them, so the originator matters there; for
/// everything else the value is the same either way.
///
/// Returns an empty string only for keys no backend produces (ICMPv6 over IPv4 and the
/// like), rather than failing the flow.
pub fn of_key(key: &FlowKey, local_orig: bool, seed: u16) -> Arc<str> {
    let (local, remote) = (key.local_ip(), key.remote_ip());
    let (sport, dport) = if is_icmp(key.proto) {
        (Some(key.remote_port >> 8), Some(key.remote_port & 0xff))
    } else if local_orig {
        (Some(key.local_port), Some(key.remote_port))
    } else {
        (Some(key.remote_port), Some(key.local_port))
    };
    // An ICMP key's type is the one the originator sent; for echo and the other paired types
    // the spec orders the sides itself, so the address order only matters for one-way types.
    let (src, dst) = if local_orig { (local, remote) } else { (remote, local) };
    compute(seed, key.proto, src, dst, sport, dport).map(Arc::from).unwrap_or_else(|e| {
        tracing::debug!("no community id for {key}: {e}");
        Arc::from("")
    })
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
    use childflow_common::flow::{FAMILY_V4, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_TCP};

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
        }
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
