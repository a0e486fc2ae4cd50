//! The first end-to-end proof: childflow's real TC programs, loaded from the embedded object
//! onto a veth of the test network, count exactly what crossed it.
//!
//! The veth's host end stands in for the host end of a rootful run's veth: traffic arriving
//! on it (from the upstream namespace) is "from the command", so flow keys have the upstream
//! server as their local side. The independent count is tshark on the same interface.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use childflow::ebpf::Accounting;
use childflow_common::{
    event::{FLOW_END_FIN, FLOW_START, Record, decode},
    flow::{DIR_IN, DIR_OUT, FlowKey, FlowStats, PROTO_TCP, PROTO_UDP},
};
use childflow_tests::{Dumpcap, TestNet, is_root, pattern, skip, tool};

/// Per direction (`DIR_OUT` = sent by `local`), packets and IP bytes that tshark saw for
/// the flow between `local` and `remote`.
fn independent_count(file: &std::path::Path, proto: &str, local: SocketAddr) -> [(u64, u64); 2] {
    let out = tool("tshark")
        .arg("-r")
        .arg(file)
        .args(["-n", "-T", "fields", "-e", "ip.src", "-e", "ip.len"])
        .args(["-Y", &format!("{proto}.port == {} && ip.addr == {}", local.port(), local.ip())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut count = [(0, 0); 2];
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (src, len) = line.split_once('\t').unwrap();
        let dir = if src == local.ip().to_string() { DIR_OUT } else { DIR_IN };
        count[dir].0 += 1;
        count[dir].1 += len.parse::<u64>().unwrap();
    }
    count
}

fn counts(stats: &FlowStats) -> [(u64, u64); 2] {
    [(stats.packets[DIR_OUT], stats.bytes[DIR_OUT]), (stats.packets[DIR_IN], stats.bytes[DIR_IN])]
}

#[test]
fn tc_programs_count_exactly_what_tshark_sees() {
    if skip(!is_root(), "needs root to load eBPF programs") {
        return;
    }
    if let Err(e) = childflow::ebpf::preflight() {
        skip(true, &format!("this kernel cannot run the TC programs: {e}"));
        return;
    }
    let net = TestNet::new();
    let mut accounting = Accounting::attach(&net.host_if).expect("attach the TC programs");
    let mut ring = accounting.take_flow_events().unwrap();
    let pcap = net.dir.path().join("independent.pcapng");
    let dumpcap = Dumpcap::start(&net.host_if, &pcap, None);

    // TCP: 300 kB echoed back, then an orderly close from both sides.
    let server = SocketAddr::new(net.server_v4().into(), 7);
    let mut tcp = TcpStream::connect(server).unwrap();
    let sent = pattern(300_000);
    let writer = {
        let mut tcp = tcp.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            tcp.write_all(&sent).unwrap();
            tcp.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    tcp.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_eq!(echoed, sent);
    drop(tcp);

    // UDP: 20 datagrams of mixed sizes, each echoed.
    let udp_server = SocketAddr::new(net.server_v4().into(), 7);
    let udp = UdpSocket::bind((net.host_v4(), 0)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..20 {
        udp.send_to(&pattern(100 + i * 50), udp_server).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(udp.recv_from(&mut buf).unwrap().0, 100 + i * 50);
    }
    dumpcap.stop();

    let flows: HashMap<FlowKey, FlowStats> = accounting.flows().unwrap().into_iter().collect();
    let tcp_key = flows
        .keys()
        .find(|k| k.proto == PROTO_TCP && k.local() == server)
        .expect("the TCP flow is in the kernel map");
    let udp_key = flows
        .keys()
        .find(|k| k.proto == PROTO_UDP && k.local() == udp_server)
        .expect("the UDP flow is in the kernel map");
    let tcp_want = independent_count(&pcap, "tcp", server);
    let udp_want = independent_count(&pcap, "udp", udp_server);
    assert!(tcp_want[DIR_IN].1 > 300_000, "tshark saw the TCP transfer: {tcp_want:?}");
    assert_eq!(counts(&flows[tcp_key]), tcp_want, "TCP (packets, bytes) per direction");
    assert_eq!(counts(&flows[udp_key]), udp_want, "UDP (packets, bytes) per direction");
    let udp_bytes: u64 = (0..20).map(|i| 28 + 100 + i * 50).sum();
    assert_eq!(udp_want, [(20, udp_bytes); 2], "tshark saw the 20 datagrams each way");
    let history = String::from_utf8_lossy(flows[tcp_key].history()).to_ascii_uppercase();
    for letter in ['S', 'H', 'A', 'D', 'F'] {
        assert!(history.contains(letter), "history {history} lacks {letter}");
    }

    // The ring buffer carried the start of both flows and the FIN end of the TCP one.
    let mut records = Vec::new();
    while let Some(item) = ring.next() {
        match decode(&item).expect("a well-formed record") {
            Record::Flow(r) => records.push((r.key, r.reason)),
            other => panic!("unexpected record {other:?}"),
        }
    }
    for (key, reason) in [(*tcp_key, FLOW_START), (*udp_key, FLOW_START), (*tcp_key, FLOW_END_FIN)]
    {
        assert!(records.contains(&(key, reason)), "no record {reason} for {key}: {records:?}");
    }
}
