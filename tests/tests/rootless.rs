//! The rootless backend end to end: the real binary, run as root and as the unprivileged
//! test user, against the hermetic test network. The engine's DNS relay is pointed at the
//! test DNS server with `CHILDFLOW_UPSTREAM_DNS`, so no real resolver is ever asked.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use childflow_tests::{
    TestNet, childflow, childflow_as_test_user, is_root, leftovers, pattern, pattern_sha256_hex,
    sha256_hex, skip, write_pattern,
};

/// Who runs childflow.
#[derive(Clone, Copy, Debug)]
enum As {
    Root,
    TestUser,
}

const BOTH: [As; 2] = [As::Root, As::TestUser];

/// The interpreter the test scripts use (the system one, which the test user can run).
const PYTHON: &str = "/usr/bin/python3";

/// A childflow command as `who`, relaying DNS to the test net's server.
fn cf(net: &TestNet, who: As) -> Command {
    let mut cmd = match who {
        As::Root => childflow(),
        As::TestUser => childflow_as_test_user(),
    };
    cmd.env("CHILDFLOW_UPSTREAM_DNS", net.server_v4().to_string());
    cmd
}

/// Runs `cmd` with a deadline, killing it if it overruns.
fn run(mut cmd: Command, secs: u64) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(secs)).is_err() {
            // SAFETY: kill(2) on the pid of our own child that has not been waited for.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().expect("wait for childflow");
    let _ = tx.send(());
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `sh -c script` under childflow; asserts success and returns stdout.
fn sh_ok(net: &TestNet, who: As, script: &str, secs: u64) -> String {
    let mut cmd = cf(net, who);
    cmd.args(["--", "sh", "-c", script]);
    let out = run(cmd, secs);
    assert!(
        out.status.success(),
        "{who:?}: `{script}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A world-readable directory for files the test user's command reads.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("childflow-rl").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn shared_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

/// A file of `pattern(len)` that the test user can read.
fn shared_pattern_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let path = dir.join(name);
    write_pattern(&path, len);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

fn assert_no_leftovers() {
    let ours: Vec<String> = leftovers().into_iter().filter(|l| !l.contains("cfnet")).collect();
    let ours: Vec<String> = ours
        .into_iter()
        .filter(|l| !l.starts_with("link cfh") && !l.starts_with("link cfu"))
        .collect();
    assert!(ours.is_empty(), "childflow left host state behind: {ours:?}");
}

#[test]
fn curl_by_name_over_http_and_https() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let dir = shared_dir();
    let ca = shared_file(dir.path(), "ca.pem", &std::fs::read(net.ca_pem()).unwrap());
    let v4 = net.server_v4();
    for who in BOTH {
        let out = sh_ok(&net, who, "curl -4 -sS --fail --max-time 20 http://www.example.test/", 60);
        assert_eq!(out, format!("hello from {v4}\n"), "{who:?}");
        let script = format!(
            "curl -sS --fail --max-time 20 --cacert {} https://www.example.test/bytes/100000 | sha256sum",
            ca.display()
        );
        let out = sh_ok(&net, who, &script, 60);
        assert!(out.starts_with(&sha256_hex(&pattern(100_000))), "{who:?}: {out}");
        let out =
            sh_ok(&net, who, "curl -6 -sS --fail --max-time 20 http://other.example.test/", 60);
        assert_eq!(out, format!("hello from {}\n", net.other_v6()), "{who:?} over IPv6");
    }
    assert_no_leftovers();
}

/// The size of the big transfers (bytes; `CHILDFLOW_TEST_BIG` overrides).
fn big() -> usize {
    std::env::var("CHILDFLOW_TEST_BIG").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 30)
}

#[test]
fn large_download_and_upload_arrive_intact() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let size = big();
    let want = pattern_sha256_hex(size);
    let dir = shared_dir();
    let upload = shared_pattern_file(dir.path(), "up.bin", size);
    let v4 = net.server_v4();
    let v6 = net.server_v6();
    for who in BOTH {
        let started = Instant::now();
        // openssl's SHA-256 uses the CPU's SHA instructions; coreutils' sha256sum is 5x slower.
        let get = format!("curl -sS --fail http://{v4}/bytes/{size} | openssl dgst -sha256 -r");
        let out = sh_ok(&net, who, &get, 600);
        assert!(out.starts_with(&want), "{who:?} download: {out}");
        let down = started.elapsed();
        let started = Instant::now();
        let out = sh_ok(
            &net,
            who,
            &format!("curl -sS --fail -T {} 'http://[{v6}]/upload'", upload.display()),
            600,
        );
        assert_eq!(out.trim(), want, "{who:?} upload");
        eprintln!(
            "{who:?}: {} MiB down in {down:.2?}, up in {:.2?}",
            size >> 20,
            started.elapsed()
        );
    }
}

#[test]
fn ping_and_ping6() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for who in BOTH {
        let out = sh_ok(
            &net,
            who,
            &format!(
                "ping -n -c 2 -i 0.2 -W 3 {} && ping -6 -n -c 2 -i 0.2 -W 3 {}",
                net.server_v4(),
                net.server_v6()
            ),
            60,
        );
        assert!(out.matches(" 0% packet loss").count() == 2, "{who:?}: {out}");
    }
}

/// A Python script that sends one datagram of each size to `addr` port 7 and checks the
/// echo; prints `ok N` for N echoed.
const UDP_ECHO: &str = r#"
import socket, sys
host = sys.argv[1]
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
sizes = [0, 1, 2, 100, 512, 1200, 1472, 1500, 4000, 8192, 20000, 32768, 65000]
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((host, 7))
n = 0
for size in sizes:
    data = bytes((i * 7 + size) % 256 for i in range(size))
    for attempt in range(3):
        s.send(data)
        try:
            got = s.recv(70000)
        except socket.timeout:
            continue
        if got == data:
            n += 1
            break
print("ok", n, "of", len(sizes))
"#;

#[test]
fn udp_echo_of_many_sizes() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    udp_echo_through(&TestNet::new(), &[]);
}

/// Runs [`UDP_ECHO`] through childflow (with `options`) as both users to both of the
/// server's addresses; every size must come back whole.
fn udp_echo_through(net: &TestNet, options: &[&str]) {
    let dir = shared_dir();
    let script = shared_file(dir.path(), "udp.py", UDP_ECHO.as_bytes());
    for who in BOTH {
        for host in [net.server_v4().to_string(), net.server_v6().to_string()] {
            let mut cmd = cf(net, who);
            cmd.args(options).args(["--", PYTHON, &script.display().to_string(), &host]);
            let out = run(cmd, 120);
            assert!(out.status.success(), "{who:?} to {host}: {}", text(&out.stderr));
            assert_eq!(text(&out.stdout).trim(), "ok 13 of 13", "{who:?} to {host}");
        }
    }
}

/// Opens N TCP connections to the echo port at once, then talks on each.
const PARALLEL: &str = r#"
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection((host, 7), timeout=20)
    socks.append(s)
for i, s in enumerate(socks):
    s.sendall(b"conn %d\n" % i)
ok = 0
for i, s in enumerate(socks):
    want = b"conn %d\n" % i
    got = b""
    while len(got) < len(want):
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    ok += got == want
    s.close()
print("ok", ok)
"#;

#[test]
fn two_hundred_parallel_connections() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let dir = shared_dir();
    let script = shared_file(dir.path(), "par.py", PARALLEL.as_bytes());
    for who in BOTH {
        let out = sh_ok(
            &net,
            who,
            &format!("{PYTHON} {} {} 200", script.display(), net.server_v4()),
            120,
        );
        assert_eq!(out.trim(), "ok 200", "{who:?}");
    }
}

#[test]
fn a_refused_port_then_successful_connections() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let v4 = net.server_v4();
    for who in BOTH {
        let script = format!(
            "started=$(date +%s%N); \
             curl -sS --max-time 10 http://{v4}:81/; rc=$?; \
             echo refused-rc=$rc took-ms=$(( ($(date +%s%N) - started) / 1000000 )); \
             curl -sS --fail --max-time 10 http://{v4}/ && curl -sS --fail --max-time 10 http://{v4}/"
        );
        let out = sh_ok(&net, who, &script, 60);
        let first = out.lines().next().unwrap_or_default();
        // 7: "Failed to connect" — a RST, not a timeout (28).
        assert!(first.starts_with("refused-rc=7 "), "{who:?}: {out}");
        let ms: u64 = first.rsplit('=').next().unwrap().parse().unwrap();
        assert!(ms < 2000, "{who:?}: the refusal took {ms} ms");
        assert_eq!(out.matches("hello from").count(), 2, "{who:?}: {out}");
    }
}

#[test]
fn a_dns_upstream_that_does_not_answer_then_one_that_does() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for who in BOTH {
        // Only the silent server: resolution fails, the engine survives.
        let mut cmd = cf(&net, who);
        cmd.env("CHILDFLOW_UPSTREAM_DNS", net.silent_dns().to_string()).args([
            "--",
            "sh",
            "-c",
            "curl -sS --max-time 30 http://www.example.test/; echo rc=$?",
        ]);
        let started = Instant::now();
        let out = run(cmd, 60);
        // glibc asks each of the two relay addresses twice; each gets SERVFAIL after the
        // relay's 2 s per-upstream timeout, well before glibc's own 5 s timeouts.
        assert!(started.elapsed() < Duration::from_secs(15), "{who:?}: {:?}", started.elapsed());
        // 6: "could not resolve" — the relay answers SERVFAIL instead of leaving the
        // command to time out.
        assert!(text(&out.stdout).contains("rc=6"), "{who:?}: {}", text(&out.stdout));
        // The silent server first, then the real one: the relay moves on to the next.
        let mut cmd = cf(&net, who);
        cmd.env("CHILDFLOW_UPSTREAM_DNS", format!("{},{}", net.silent_dns(), net.server_v4()))
            .args([
                "--",
                "curl",
                "-4",
                "-sS",
                "--fail",
                "--max-time",
                "20",
                "http://www.example.test/",
            ]);
        let out = run(cmd, 60);
        assert!(out.status.success(), "{who:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("hello from {}\n", net.server_v4()));
    }
}

#[test]
fn dns_flag_points_the_command_at_another_resolver() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for who in BOTH {
        let mut cmd = cf(&net, who);
        // The relay's upstream is the silent server: only --dns can make this work.
        cmd.env("CHILDFLOW_UPSTREAM_DNS", net.silent_dns().to_string()).args([
            "--dns",
            &net.server_v4().to_string(),
            "--",
            "sh",
            "-c",
            "grep nameserver /etc/resolv.conf; curl -4 -sS --fail --max-time 20 http://www.example.test/",
        ]);
        let out = run(cmd, 60);
        assert!(out.status.success(), "{who:?}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("nameserver {0}\nhello from {0}\n", net.server_v4()),
            "{who:?}"
        );
    }
}

#[test]
fn host_loopback_is_closed_unless_allowed() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            use std::io::Write;
            let _ = (&s).write_all(b"loopback\n");
        }
    });
    let script = format!(
        "import socket\ntry:\n    s = socket.create_connection(('10.0.2.2', {port}), timeout=5)\n    print(s.recv(100).decode().strip())\nexcept OSError as e:\n    print('error', e.errno)\n"
    );
    for who in BOTH {
        let mut cmd = cf(&net, who);
        cmd.args(["--", PYTHON, "-c", &script]);
        let out = run(cmd, 30);
        assert!(text(&out.stdout).starts_with("error"), "{who:?}: {}", text(&out.stdout));
        let mut cmd = cf(&net, who);
        cmd.args(["--allow-host-loopback", "--", PYTHON, "-c", &script]);
        let out = run(cmd, 30);
        assert_eq!(text(&out.stdout), "loopback\n", "{who:?}: {}", text(&out.stderr));
    }
}

#[test]
fn exit_codes_and_signals_pass_through() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for who in BOTH {
        let code = |args: &[&str]| {
            let mut cmd = cf(&net, who);
            cmd.args(args);
            run(cmd, 30).status.code()
        };
        assert_eq!(code(&["--", "true"]), Some(0), "{who:?}");
        assert_eq!(code(&["--", "sh", "-c", "exit 3"]), Some(3), "{who:?}");
        assert_eq!(code(&["--", "sh", "-c", "kill -KILL $$"]), Some(128 + 9), "{who:?}");
        assert_eq!(code(&["--", "no-such-command-childflow"]), Some(127), "{who:?}");

        // SIGTERM to childflow reaches the command.
        let mut cmd = cf(&net, who);
        cmd.args(["--", "sleep", "30"]).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + 15), "{who:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{who:?}: SIGTERM was not passed on");
    }
    assert_no_leftovers();
}

/// A tool from a system directory the test user's PATH may not have (`/usr/sbin`).
fn system_tool(name: &str) -> String {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| panic!("{name} is not installed: run `cargo xtask setup`"))
}

#[test]
fn traceroute_and_tracepath_see_the_router_hop() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let (traceroute, tracepath) = (system_tool("traceroute"), system_tool("tracepath"));
    let cases: [(&str, std::net::IpAddr, std::net::IpAddr); 2] = [
        ("-4", net.server_v4().into(), net.far_v4().into()),
        ("-6", net.server_v6().into(), net.far_v6().into()),
    ];
    for who in BOTH {
        for (flag, router, far) in cases {
            // UDP probes with TTL 1, 2, …: "time exceeded" from the upstream namespace's
            // router, then "port unreachable" from the far address.
            let out = sh_ok(&net, who, &format!("{traceroute} {flag} -n -m 5 -w 3 {far}"), 60);
            let want = [vec![router], vec![far]];
            assert_eq!(childflow_tests::trace_hops(&out), want, "{who:?} traceroute:\n{out}");
            let out = sh_ok(&net, who, &format!("{tracepath} {flag} -n -m 5 {far}"), 60);
            assert_eq!(childflow_tests::trace_hops(&out), want, "{who:?} tracepath:\n{out}");
            if matches!(who, As::Root) {
                // TCP SYN probes (a raw socket: root in the sandbox only). The far address
                // answers the last one with RST.
                let tcp = format!("{traceroute} {flag} -T -p 80 -n -m 5 -w 3 {far}");
                let out = sh_ok(&net, who, &tcp, 60);
                assert_eq!(
                    childflow_tests::trace_hops(&out),
                    want,
                    "{who:?} traceroute -T:\n{out}"
                );
                // ICMP echo probes: through the engine's ping sockets, TTL and all.
                let icmp = format!("{traceroute} {flag} -I -n -m 5 -w 3 {far}");
                let out = sh_ok(&net, who, &icmp, 60);
                let hops = childflow_tests::trace_hops(&out);
                assert_eq!(hops, want, "{who:?} traceroute -I:\n{out}");
            }
        }
    }
}

#[test]
fn each_flow_in_the_flow_log_names_its_own_process() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    for who in BOTH {
        let dir = tempfile::Builder::new().prefix("childflow-rl").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let log = dir.path().join("flows.jsonl");
        let script = format!(
            "curl -sS --fail -o /dev/null http://{}/ && echo hello | socat -T2 - UDP:{}:7",
            net.other_v4(),
            net.server_v4()
        );
        let mut cmd = cf(&net, who);
        cmd.arg("--flow-log").arg(&log).args(["--", "sh", "-c", &script]);
        let out = run(cmd, 60);
        assert!(out.status.success(), "{who:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hello\n", "{who:?}: the echo came back");
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .expect("read the flow log")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let process_of = |proto: &str, port: u16| {
            let flow = records
                .iter()
                .find(|r| {
                    r["record"] == "flow"
                        && r["event"] == "end"
                        && r["proto"] == proto
                        && r["id"]["resp_p"] == port
                })
                .unwrap_or_else(|| panic!("{who:?}: no {proto}/{port} flow in {records:#?}"));
            flow["process"].clone()
        };
        let curl = process_of("tcp", 80);
        let socat = process_of("udp", 7);
        assert_eq!(curl["comm"], "curl", "{who:?}: {curl}");
        assert!(curl["exe"].as_str().is_some_and(|e| e.ends_with("/curl")), "{who:?}: {curl}");
        assert_eq!(curl["cmdline"][0], "curl", "{who:?}: {curl}");
        assert_eq!(socat["comm"], "socat", "{who:?}: {socat}");
        assert_ne!(curl["pid"], socat["pid"], "{who:?}: two processes");
    }
}

#[test]
fn udp_echo_through_ip_fragments_at_mtu_1500() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    // Datagrams up to 65,000 bytes leave the command's tap in fragments and come back in
    // fragments.
    udp_echo_through(&TestNet::new(), &["--mtu", "1500"]);
}
