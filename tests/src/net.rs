//! The upstream namespace, its veth link to the host, and the servers inside it.
//!
//! Addressing, for a net with number `n` (1..=250, unique among live nets on the host):
//! - link: host end `cfh<n>` 198.18.n.1/24, 2001:db8:n::1/64; upstream end `cfu<n>`;
//! - upstream: `server` 198.18.n.2 / 2001:db8:n::2 (every service), `other` 198.18.n.3 /
//!   2001:db8:n::3 (HTTP, a second name), `silent` 198.18.n.4 (a DNS server that never answers).
//! - one router hop further (for traceroute): the upstream namespace forwards 198.19.n.0/24
//!   and 2001:db8:n:1::/64 (routed there from the host) over a veth `cfr0`–`cfr1` to namespace
//!   `cfnet<n>hop`, which holds `far` 198.19.n.2 / 2001:db8:n:1::2 and no servers: a probe
//!   with TTL 1 gets "time exceeded" from 198.18.n.2, one with TTL 2 "port unreachable"
//!   from the far address. Both namespaces answer ICMP errors without rate limit.
//!
//! A number is claimed by creating its veth: creation fails if another net (another test
//! thread, or another test process) holds it, and the next number is tried.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use crate::{dns, http};

/// One hermetic upstream network with its servers. Dropping it removes everything.
pub struct TestNet {
    /// The number this net's names and addresses are built from.
    pub n: u8,
    /// The upstream network namespace (`ip netns` name).
    pub netns: String,
    /// The namespace one router hop behind it (`ip netns` name).
    pub hop_netns: String,
    /// The host end of the veth, where a capture or a TC program can watch the traffic.
    pub host_if: String,
    /// Directory with the test CA (`ca.pem`) and other files of this net.
    pub dir: tempfile::TempDir,
    /// DNS queries the test server answered (UDP and TCP).
    pub dns_queries: Arc<AtomicU32>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().expect("run ip")
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestNet {
    /// Builds the namespace, the link and the servers. Needs root. (No `Default`: building
    /// one changes the host, which a `default()` should not hide.)
    #[allow(clippy::new_without_default)]
    pub fn new() -> TestNet {
        assert!(crate::is_root(), "the test network needs root (run `cargo xtask test` as root)");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = std::process::id() % 250;
        let mut n = 0;
        for _ in 0..250 {
            let candidate = ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % 250 + 1) as u8;
            let out = sh(&[
                "ip",
                "link",
                "add",
                &format!("cfh{candidate}"),
                "type",
                "veth",
                "peer",
                "name",
                &format!("cfu{candidate}"),
            ]);
            if out.status.success() {
                n = candidate;
                break;
            }
        }
        assert!(n != 0, "no free test network number (are 250 test nets alive?)");
        let netns = format!("cfnet{n}");
        let host_if = format!("cfh{n}");
        // From here on the guard owns whatever exists, so a failing step still cleans up.
        let hop_netns = format!("{netns}hop");
        let mut net = TestNet {
            n,
            netns: netns.clone(),
            hop_netns: hop_netns.clone(),
            host_if: host_if.clone(),
            dir: tempfile::Builder::new().prefix("childflow-net").tempdir().unwrap(),
            dns_queries: Arc::new(AtomicU32::new(0)),
            runtime: None,
        };
        let up_if = format!("cfu{n}");
        let _ = sh(&["ip", "netns", "del", &netns]);
        must(&["ip", "netns", "add", &netns]);
        must(&["ip", "link", "set", &up_if, "netns", &netns]);
        must(&["ip", "addr", "add", &format!("198.18.{n}.1/24"), "dev", &host_if]);
        must(&["ip", "addr", "add", &format!("2001:db8:{n:x}::1/64"), "dev", &host_if, "nodad"]);
        must(&["ip", "link", "set", &host_if, "up"]);
        let ns = |args: &[&str]| {
            let mut full = vec!["ip", "-n", netns.as_str()];
            full.extend_from_slice(args);
            must(&full);
        };
        ns(&["link", "set", "lo", "up"]);
        for host in 2..=4 {
            ns(&["addr", "add", &format!("198.18.{n}.{host}/24"), "dev", &up_if]);
            let v6 = format!("2001:db8:{n:x}::{host}/64");
            // Only ::2 is preferred, so the namespace's own messages (ICMPv6 errors as a
            // router) come from it, like IPv4's primary .2; ::3 and ::4 still serve.
            let lft = if host == 2 { "forever" } else { "0" };
            ns(&["addr", "add", &v6, "dev", &up_if, "nodad", "preferred_lft", lft]);
        }
        ns(&["link", "set", &up_if, "up"]);
        net.add_far_hop();
        net.start_servers();
        net
    }

    /// The namespace one hop behind the upstream one, and the routes to it (see the module
    /// documentation). The host's routes go with `cfh<n>`; the veth with the namespaces.
    fn add_far_hop(&self) {
        let n = self.n;
        let (up, hop) = (self.netns.as_str(), self.hop_netns.as_str());
        let _ = sh(&["ip", "netns", "del", hop]);
        must(&["ip", "netns", "add", hop]);
        // Fixed MACs and permanent neighbour entries: no address resolution on this link,
        // which loses the first probes while the new veth's carrier comes up.
        let macs = ["02:cf:00:00:00:01", "02:cf:00:00:00:02"];
        let add = "link add cfr0 address MAC0 type veth peer name cfr1 address MAC1 netns HOP";
        let add = add.replace("MAC0", macs[0]).replace("MAC1", macs[1]).replace("HOP", hop);
        let mut args = vec!["ip", "-n", up];
        args.extend(add.split(' '));
        must(&args);
        let ends = [(up, "cfr0", 1, 2, macs[1]), (hop, "cfr1", 2, 1, macs[0])];
        for (ns, dev, host, peer, peer_mac) in ends {
            must(&["ip", "-n", ns, "addr", "add", &format!("198.19.{n}.{host}/24"), "dev", dev]);
            let v6 = format!("2001:db8:{n:x}:1::{host}/64");
            must(&["ip", "-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            for ip in [format!("198.19.{n}.{peer}"), format!("2001:db8:{n:x}:1::{peer}")] {
                let neigh = ["neigh", "replace", &ip, "lladdr", peer_mac, "dev", dev];
                let mut args = vec!["ip", "-n", ns];
                args.extend(neigh);
                args.extend(["nud", "permanent"]);
                must(&args);
            }
            let no_limit = ["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"];
            must(&["ip", "netns", "exec", ns, "sysctl", "-qw", no_limit[0], no_limit[1]]);
        }
        must(&["ip", "-n", hop, "link", "set", "lo", "up"]);
        must(&["ip", "-n", hop, "route", "add", "default", "via", &format!("198.19.{n}.1")]);
        let gw6 = format!("2001:db8:{n:x}:1::1");
        must(&["ip", "-n", hop, "-6", "route", "add", "default", "via", &gw6]);
        let forward = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"];
        must(&["ip", "netns", "exec", up, "sysctl", "-qw", forward[0], forward[1]]);
        let (gw4, gw6) = (self.server_v4().to_string(), self.server_v6().to_string());
        let host_if = self.host_if.as_str();
        must(&["ip", "route", "add", &format!("198.19.{n}.0/24"), "via", &gw4, "dev", host_if]);
        let far6 = format!("2001:db8:{n:x}:1::/64");
        must(&["ip", "-6", "route", "add", &far6, "via", &gw6, "dev", host_if]);
    }

    /// The address every service listens on.
    pub fn server_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.n, 2)
    }
    pub fn server_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.n as u16, 0, 0, 0, 0, 2)
    }
    /// An address one router hop behind the upstream namespace (nothing listens there).
    pub fn far_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.n, 2)
    }
    pub fn far_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.n as u16, 1, 0, 0, 0, 2)
    }
    /// The second HTTP server (`other.example.test`).
    pub fn other_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.n, 3)
    }
    pub fn other_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, self.n as u16, 0, 0, 0, 0, 3)
    }
    /// A DNS server address that receives queries and never answers.
    pub fn silent_dns(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.n, 4)
    }
    /// The host's own address on the link (what the upstream sees as the client).
    pub fn host_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.n, 1)
    }
    /// The test CA's certificate, for `curl --cacert`.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Runs `f` on a thread inside the upstream namespace: sockets it creates stay there.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/run/netns/{}", self.netns)).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the upstream namespace");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    fn start_servers(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("testnet")
            .build()
            .unwrap();
        let tls = http::tls_acceptor(self.dir.path(), &[self.server_v4(), self.other_v4()]);
        let zone = dns::Zone {
            v4: [self.server_v4(), self.other_v4()],
            v6: [self.server_v6(), self.other_v6()],
        };
        let (s4, s6, o4, o6, silent) = (
            self.server_v4(),
            self.server_v6(),
            self.other_v4(),
            self.other_v6(),
            self.silent_dns(),
        );
        let addr = |ip: IpAddr, port| SocketAddr::new(ip, port);
        let sockets = self.in_netns(|| {
            let tcp = |a| std::net::TcpListener::bind(a).expect("bind tcp");
            let udp = |a| std::net::UdpSocket::bind(a).expect("bind udp");
            let mut http = Vec::new();
            let mut https = Vec::new();
            for ip in [s4.into(), s6.into(), o4.into(), o6.into()] {
                http.push(tcp(addr(ip, 80)));
                https.push(tcp(addr(ip, 443)));
            }
            let dns_udp = vec![udp(addr(s4.into(), 53)), udp(addr(s6.into(), 53))];
            let dns_tcp = vec![tcp(addr(s4.into(), 53)), tcp(addr(s6.into(), 53))];
            let echo_udp = vec![udp(addr(s4.into(), 7)), udp(addr(s6.into(), 7))];
            let echo_tcp = vec![tcp(addr(s4.into(), 7)), tcp(addr(s6.into(), 7))];
            let silent = udp(addr(silent.into(), 53));
            (http, https, dns_udp, dns_tcp, echo_udp, echo_tcp, silent)
        });
        let (http_l, https_l, dns_udp, dns_tcp, echo_udp, echo_tcp, silent) = sockets;
        let _guard = runtime.enter();
        for l in http_l {
            runtime.spawn(http::serve(tokio_tcp(l), None));
        }
        for l in https_l {
            runtime.spawn(http::serve(tokio_tcp(l), Some(tls.clone())));
        }
        for s in dns_udp {
            runtime.spawn(dns::serve_udp(tokio_udp(s), zone.clone(), self.dns_queries.clone()));
        }
        for l in dns_tcp {
            runtime.spawn(dns::serve_tcp(tokio_tcp(l), zone.clone(), self.dns_queries.clone()));
        }
        for s in echo_udp {
            runtime.spawn(echo_udp_loop(tokio_udp(s)));
        }
        for l in echo_tcp {
            runtime.spawn(echo_tcp_loop(tokio_tcp(l)));
        }
        // Keep the silent server's socket open (queries queue and are never read).
        runtime.spawn(async move {
            let _keep = silent;
            std::future::pending::<()>().await
        });
        drop(_guard);
        self.runtime = Some(runtime);
    }
}

fn tokio_tcp(l: std::net::TcpListener) -> tokio::net::TcpListener {
    l.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
}

fn tokio_udp(s: std::net::UdpSocket) -> tokio::net::UdpSocket {
    s.set_nonblocking(true).unwrap();
    tokio::net::UdpSocket::from_std(s).unwrap()
}

async fn echo_udp_loop(sock: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((len, from)) = sock.recv_from(&mut buf).await {
        let _ = sock.send_to(&buf[..len], from).await;
    }
}

async fn echo_tcp_loop(listener: tokio::net::TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // Deleting the namespace destroys its veth end, which destroys the host end too.
        let _ = sh(&["ip", "netns", "del", &self.netns]);
        let _ = sh(&["ip", "netns", "del", &self.hop_netns]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        if std::thread::panicking() {
            return;
        }
        // Exact names: `cfh24` must not match another live net's `cfh247`.
        let mine = [
            format!("netns {}", self.netns),
            format!("netns {}", self.hop_netns),
            format!("link {}", self.host_if),
        ];
        let left: Vec<String> = leftovers().into_iter().filter(|l| mine.contains(l)).collect();
        assert!(left.is_empty(), "test network left host state behind: {left:?}");
    }
}

/// Network namespaces and links of ours on the host now (`cf…`/`childflow…` names).
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    let text = |args: &[&str]| String::from_utf8_lossy(&sh(args).stdout).into_owned();
    for line in text(&["ip", "netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with("cf") || name.starts_with("childflow") {
            found.push(format!("netns {name}"));
        }
    }
    for line in text(&["ip", "-o", "link", "show"]).lines() {
        let name = line.split(": ").nth(1).unwrap_or_default().split('@').next().unwrap();
        if name.starts_with("cf") || name.starts_with("childflow") {
            found.push(format!("link {name}"));
        }
    }
    found
}
