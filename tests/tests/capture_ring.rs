//! The TC programs' packet ring, loaded from the embedded object onto a veth of the test
//! network: what is copied (capture on: everything, cut at the snap length; capture off:
//! DNS only; a capture filter: only what it matches, plus unmarked DNS), with which
//! direction and lengths.
//!
//! As in `accounting.rs`, the veth's host end stands in for a run's host veth: packets the
//! host sends into the upstream namespace leave it (`DIR_IN`, "to the command"), the echoes
//! arrive on it (`DIR_OUT`).

use std::{
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use childflow::{backend::rootful::ring::PacketRing, ebpf::Accounting, event::PacketData};
use childflow_common::{
    event::{COUNT_CAPTURE_FILTERED, CaptureConfig, PACKET_CAPTURE, Record, decode},
    flow::{DIR_IN, DIR_OUT},
};
use childflow_tests::{TestNet, is_root, pattern, skip};

/// (direction, orig_len, data) of every packet in the ring.
fn packets(ring: &PacketRing) -> Vec<(u32, u32, Vec<u8>)> {
    flagged_packets(ring).into_iter().map(|(_, p)| p).collect()
}

/// (flags, (direction, orig_len, data)) of every packet in the ring.
#[allow(clippy::type_complexity)]
fn flagged_packets(ring: &PacketRing) -> Vec<(u32, (u32, u32, Vec<u8>))> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        match decode(item).expect("a well-formed record") {
            Record::Packet { header, data } => {
                assert_eq!(header.cap_len as usize, data.len());
                out.push((header.flags, (header.direction, header.orig_len, data.to_vec())));
            }
            other => panic!("unexpected record {other:?}"),
        }
    }
    // The reader the rootful backend uses: space goes back once records are read.
    ring.release();
    assert!(!ring.holding(), "every record read was given back");
    out
}

fn udp_exchange(net: &TestNet, port: u16, sizes: &[usize], expect_reply: bool) {
    let sock = UdpSocket::bind((net.host_v4(), 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    for &size in sizes {
        sock.send_to(&pattern(size), (net.server_v4(), port)).unwrap();
        if expect_reply {
            let mut buf = [0u8; 2048];
            assert_eq!(sock.recv_from(&mut buf).expect("echo").0, size);
        }
    }
}

fn unsupported() -> bool {
    if skip(!is_root(), "needs root to load eBPF programs") {
        return true;
    }
    if let Err(e) = childflow::ebpf::preflight() {
        return skip(true, &format!("this kernel cannot run the TC programs: {e}"));
    }
    false
}

/// A record lent to the collector keeps its ring space, and its bytes, while records read
/// after it are released; its space goes back once the bytes are dropped.
#[test]
fn a_lent_record_holds_its_space_until_it_is_dropped() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let capture = CaptureConfig { capture_all: 1, snaplen: 65_535, clone_ifindex: 0 };
    let mut acc = Accounting::attach_with(&net.host_if, None, capture).expect("attach");
    let ring = PacketRing::new(acc.take_packet_map().unwrap()).unwrap();
    udp_exchange(&net, 7, &[1000, 1000], true);
    let record = ring.next().expect("a record");
    let copy = record.to_vec();
    let lent = PacketData::Lent(ring.lend(&record[8..]).expect("the record read last"));
    assert!(ring.lend(&copy).is_none(), "bytes outside the record read last are not lent");
    let mut later = 0;
    while ring.next().is_some() {
        later += 1;
    }
    assert!(later >= 3, "the other datagrams were read after it: {later}");
    ring.release();
    assert!(ring.holding(), "the lent record still holds its space");
    assert_eq!(lent, copy[8..].to_vec(), "its bytes are intact");
    lent.recycle();
    ring.release();
    assert!(!ring.holding(), "its space went back, and with it every record after it");
}

#[test]
fn capture_copies_every_packet_up_to_the_snap_length_with_its_direction() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let capture = CaptureConfig { capture_all: 1, snaplen: 100, clone_ifindex: 0 };
    let mut acc = Accounting::attach_with(&net.host_if, None, capture).expect("attach");
    let ring = PacketRing::new(acc.take_packet_map().unwrap()).unwrap();
    udp_exchange(&net, 7, &[50, 500], true);
    let udp: Vec<_> = packets(&ring)
        .into_iter()
        .filter(|(_, _, d)| d.len() > 23 && d[12..14] == [8, 0] && d[23] == 17)
        .collect();
    let frame = |payload: usize| (14 + 20 + 8 + payload) as u32;
    let summary: Vec<(u32, u32, usize)> =
        udp.iter().map(|(dir, orig, d)| (*dir, *orig, d.len())).collect();
    assert_eq!(
        summary,
        [
            (DIR_IN as u32, frame(50), frame(50) as usize),
            (DIR_OUT as u32, frame(50), frame(50) as usize),
            (DIR_IN as u32, frame(500), 100),
            (DIR_OUT as u32, frame(500), 100),
        ],
        "(direction, wire length, captured length) of the four datagrams"
    );
    // The data is the packet itself: the UDP payload starts at 42 in the frame.
    assert_eq!(&udp[0].2[42..], &pattern(50)[..]);
    assert_eq!(&udp[3].2[42..], &pattern(500)[..58]);
}

#[test]
fn without_capture_only_dns_is_copied() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let mut acc = Accounting::attach(&net.host_if).expect("attach");
    let ring = PacketRing::new(acc.take_packet_map().unwrap()).unwrap();
    udp_exchange(&net, 7, &[40], true);
    // Not a valid query: the server ignores it, the packet is still DNS by its port.
    udp_exchange(&net, 53, &[12], false);
    std::thread::sleep(Duration::from_millis(200));
    let udp: Vec<_> = packets(&ring)
        .into_iter()
        .filter(|(_, _, d)| d.len() > 23 && d[12..14] == [8, 0] && d[23] == 17)
        .collect();
    assert_eq!(udp.len(), 1, "only the port-53 datagram: {udp:?}");
    assert_eq!(u16::from_be_bytes([udp[0].2[36], udp[0].2[37]]), 53);
}

/// (IP protocol, source port, destination port) of an Ethernet/IPv4 frame with a TCP or
/// UDP header, else `None`.
fn v4_ports(d: &[u8]) -> Option<(u8, u16, u16)> {
    if d.len() < 38 || d[12..14] != [8, 0] || !matches!(d[23], 6 | 17) {
        return None;
    }
    let l4 = 14 + usize::from(d[14] & 0x0f) * 4;
    let port = |at: usize| u16::from_be_bytes([d[at], d[at + 1]]);
    Some((d[23], port(l4), port(l4 + 2)))
}

/// What one run with a kernel filter gave: the ring's TCP/UDP packets as (flags, protocol,
/// source port, destination port), the kernel's count of packets the filter rejected, and
/// the flow map's packet totals per IP protocol.
struct Filtered {
    packets: Vec<(u32, u8, u16, u16)>,
    rejected: u64,
    flow_packets: std::collections::HashMap<u8, u64>,
    /// Every record in the ring marked for the capture, of any protocol.
    marked: u64,
}

impl Filtered {
    /// Checks the kernel's rejected count: every packet the programs saw was either marked
    /// for the capture or rejected. The flow map counts every IP packet; frames that are
    /// not IP (ARP) are rejected too but not in the map: a few at most.
    fn check_rejected(&self) {
        let ip: u64 = self.flow_packets.values().sum();
        let seen = self.rejected + self.marked;
        assert!(
            seen >= ip && seen <= ip + 4,
            "rejected {} + marked {} vs {ip} IP packets {:?}",
            self.rejected,
            self.marked,
            self.flow_packets
        );
    }
}

/// Runs UDP echo (port 7), a TCP connection to the HTTP server (port 80) and a UDP datagram
/// to port 53 through a run with capture on and `filter` in the kernel.
fn filtered(filter: &str) -> Filtered {
    let net = TestNet::new();
    let program = childflow::capture::filter::Filter::parse(filter)
        .expect("a valid filter")
        .program
        .to_kernel()
        .expect("fits the kernel table");
    let capture = CaptureConfig { capture_all: 1, snaplen: 100, clone_ifindex: 0 };
    let mut acc = Accounting::load(capture, Some(&program)).expect("load");
    let ifindex = nix::net::if_::if_nametoindex(net.host_if.as_str()).expect("the veth's index");
    childflow::ebpf::add_clsact(ifindex).expect("add a clsact qdisc");
    acc.attach_tc(ifindex).expect("attach");
    let ring = PacketRing::new(acc.take_packet_map().unwrap()).unwrap();
    udp_exchange(&net, 7, &[40, 60], true);
    let mut tcp = TcpStream::connect((net.server_v4(), 80)).expect("connect to the HTTP server");
    tcp.write_all(b"GET / HTTP/1.0\r\nHost: example.test\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = tcp.read_to_end(&mut reply);
    drop(tcp);
    udp_exchange(&net, 53, &[12], false);
    std::thread::sleep(Duration::from_millis(200));
    childflow::ebpf::remove_clsact(ifindex).expect("detach");
    let all = flagged_packets(&ring);
    let marked = all.iter().filter(|(flags, _)| flags & PACKET_CAPTURE != 0).count() as u64;
    let packets = all
        .into_iter()
        .filter_map(|(flags, (_, _, d))| v4_ports(&d).map(|(p, s, t)| (flags, p, s, t)))
        .collect();
    let rejected = acc.drops().expect("read the counters")[COUNT_CAPTURE_FILTERED as usize];
    let mut flow_packets = std::collections::HashMap::new();
    for (key, stats) in acc.flows().expect("read the flow map") {
        *flow_packets.entry(key.proto).or_default() += stats.packets[0] + stats.packets[1];
    }
    Filtered { packets, rejected, flow_packets, marked }
}

#[test]
fn a_kernel_filter_keeps_only_matching_packets_and_unmarked_dns() {
    if unsupported() {
        return;
    }
    let port = |p: &(u32, u8, u16, u16)| p.2.min(p.3);
    let run = filtered("tcp port 80");
    assert_eq!(run.flow_packets[&17], 5, "echoes and DNS: {:?}", run.flow_packets);
    assert!(run.rejected >= 5, "every UDP packet was rejected: {}", run.rejected);
    run.check_rejected();
    let got = run.packets;
    let captured: Vec<_> = got.iter().filter(|p| p.0 & PACKET_CAPTURE != 0).collect();
    assert!(captured.len() >= 6, "a TCP handshake, request, answer and close: {got:?}");
    assert!(captured.iter().all(|p| p.1 == 6 && port(p) == 80), "{got:?}");
    let rest: Vec<_> = got.iter().filter(|p| p.0 & PACKET_CAPTURE == 0).collect();
    assert_eq!(rest.len(), 1, "only the DNS datagram, unmarked: {got:?}");
    assert_eq!((rest[0].1, rest[0].3), (17, 53));

    let run = filtered("udp and not port 53");
    let tcp = run.flow_packets[&6];
    assert!(run.rejected > tcp, "every TCP packet and the DNS datagram: {}", run.rejected);
    run.check_rejected();
    let got = run.packets;
    let captured: Vec<_> = got.iter().filter(|p| p.0 & PACKET_CAPTURE != 0).collect();
    assert_eq!(captured.len(), 4, "two echoes, both ways: {got:?}");
    assert!(captured.iter().all(|p| p.1 == 17 && port(p) == 7), "{got:?}");
    let rest: Vec<_> = got.iter().filter(|p| p.0 & PACKET_CAPTURE == 0).collect();
    assert_eq!(rest.len(), 1, "the DNS datagram is still copied for naming: {got:?}");
    assert_eq!((rest[0].1, rest[0].3), (17, 53));
}
