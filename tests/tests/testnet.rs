//! The hermetic test network itself: its servers answer from the host namespace, and it
//! leaves nothing behind.

use std::{net::UdpSocket, time::Duration};

use childflow_tests::{TestNet, is_root, leftovers, pattern, sha256_hex, skip, tool, trace_hops};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RData, RecordType},
};

fn curl(args: &[&str]) -> Vec<u8> {
    let out = tool("curl").args(["-sS", "--fail", "--max-time", "20"]).args(args).output().unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn http_and_https_serve_from_the_upstream_namespace() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let v4 = net.server_v4();
    assert_eq!(curl(&[&format!("http://{v4}/")]), format!("hello from {v4}\n").as_bytes());
    let v6 = format!("http://[{}]/bytes/100000", net.server_v6());
    assert_eq!(curl(&[&v6]), pattern(100_000));
    let ca = net.ca_pem();
    let https = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("www.example.test:443:{v4}"),
        "https://www.example.test/bytes/3000000",
    ]);
    assert_eq!(sha256_hex(&https), sha256_hex(&pattern(3_000_000)));
    let upload = net.dir.path().join("up.bin");
    std::fs::write(&upload, pattern(1_000_001)).unwrap();
    let sum = curl(&["-T", upload.to_str().unwrap(), &format!("http://{v4}/upload")]);
    assert_eq!(String::from_utf8(sum).unwrap().trim(), sha256_hex(&pattern(1_000_001)));
}

fn lookup(server: std::net::IpAddr, name: &str, rtype: RecordType) -> Option<Message> {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    sock.send_to(&query.to_vec().unwrap(), (server, 53)).unwrap();
    let mut buf = [0u8; 1500];
    let (len, _) = sock.recv_from(&mut buf).ok()?;
    Some(Message::from_vec(&buf[..len]).unwrap())
}

#[test]
fn dns_answers_the_test_zone_and_the_silent_server_does_not() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let server = net.server_v4().into();
    let reply = lookup(server, "www.example.test.", RecordType::A).expect("an answer");
    let a: Vec<_> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(a, vec![net.server_v4()]);
    let reply = lookup(server, "other.example.test.", RecordType::AAAA).expect("an answer");
    assert!(matches!(&reply.answers[0].data, RData::AAAA(ip) if ip.0 == net.other_v6()));
    let reply = lookup(server, "nope.example.test.", RecordType::A).expect("an answer");
    assert_eq!(reply.metadata.response_code, hickory_proto::op::ResponseCode::NXDomain);
    assert!(lookup(net.silent_dns().into(), "example.test.", RecordType::A).is_none());
    assert_eq!(net.dns_queries.load(std::sync::atomic::Ordering::Relaxed), 3);
}

#[test]
fn udp_echo_and_ping() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let sock = UdpSocket::bind(("::", 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for size in [1, 512, 1472, 9000, 65000] {
        let data = pattern(size);
        sock.send_to(&data, (net.server_v6(), 7)).unwrap();
        let mut buf = vec![0u8; 65536];
        let (len, _) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], &data[..], "echo of {size} bytes");
    }
    for (flag, addr) in [("-4", net.server_v4().to_string()), ("-6", net.server_v6().to_string())] {
        let st = tool("ping").args([flag, "-c1", "-W2", &addr]).output().unwrap();
        assert!(st.status.success(), "ping {addr}");
    }
}

#[test]
fn dropping_the_net_removes_everything() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let (ns, hop, link) = (net.netns.clone(), net.hop_netns.clone(), net.host_if.clone());
    assert!(leftovers().contains(&format!("netns {ns}")));
    assert!(leftovers().contains(&format!("netns {hop}")));
    drop(net);
    let left = leftovers();
    for gone in [format!("netns {ns}"), format!("netns {hop}"), format!("link {link}")] {
        assert!(!left.contains(&gone), "{gone} is left: {left:?}");
    }
}

#[test]
fn the_far_address_is_one_router_hop_behind_the_server() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for (flag, router, far) in [
        ("-4", net.server_v4().into(), std::net::IpAddr::from(net.far_v4())),
        ("-6", net.server_v6().into(), net.far_v6().into()),
    ] {
        let out = tool("traceroute")
            .args([flag, "-n", "-m", "5", "-w", "2", &far.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "traceroute {far}: {text}");
        assert_eq!(trace_hops(&text), [vec![router], vec![far]], "traceroute {far}:\n{text}");
    }
}
