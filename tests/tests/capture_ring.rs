//! The TC programs' packet ring, loaded from the embedded object onto a veth of the test
//! network: what is copied (capture on: everything, cut at the snap length; capture off:
//! DNS only), with which direction and lengths.
//!
//! As in `accounting.rs`, the veth's host end stands in for a run's host veth: packets the
//! host sends into the upstream namespace leave it (`DIR_IN`, "to the command"), the echoes
//! arrive on it (`DIR_OUT`).

use std::{net::UdpSocket, time::Duration};

use childflow::ebpf::Accounting;
use childflow_common::{
    event::{CaptureConfig, Record, decode},
    flow::{DIR_IN, DIR_OUT},
};
use childflow_tests::{TestNet, is_root, pattern, skip};

/// (direction, orig_len, data) of every packet in the ring.
fn packets(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        match decode(&item).expect("a well-formed record") {
            Record::Packet { header, data } => {
                assert_eq!(header.cap_len as usize, data.len());
                out.push((header.direction, header.orig_len, data.to_vec()));
            }
            other => panic!("unexpected record {other:?}"),
        }
    }
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

#[test]
fn capture_copies_every_packet_up_to_the_snap_length_with_its_direction() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let capture = CaptureConfig { capture_all: 1, snaplen: 100 };
    let mut acc = Accounting::attach_with(&net.host_if, None, capture).expect("attach");
    let mut ring = acc.take_packets().unwrap();
    udp_exchange(&net, 7, &[50, 500], true);
    let udp: Vec<_> = packets(&mut ring)
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
    let mut ring = acc.take_packets().unwrap();
    udp_exchange(&net, 7, &[40], true);
    // Not a valid query: the server ignores it, the packet is still DNS by its port.
    udp_exchange(&net, 53, &[12], false);
    std::thread::sleep(Duration::from_millis(200));
    let udp: Vec<_> = packets(&mut ring)
        .into_iter()
        .filter(|(_, _, d)| d.len() > 23 && d[12..14] == [8, 0] && d[23] == 17)
        .collect();
    assert_eq!(udp.len(), 1, "only the port-53 datagram: {udp:?}");
    assert_eq!(u16::from_be_bytes([udp[0].2[36], udp[0].2[37]]), 53);
}
