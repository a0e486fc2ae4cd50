//! The rootful backend end to end: the real binary with `--root` against the hermetic test
//! network, as root.
//!
//! What the backend emitted is read from `CHILDFLOW_RAW_EVENTS` (a JSON-lines dump of every
//! event, see `childflow/src/backend/rootful/mod.rs`). Accounting is compared with dumpcap
//! on the run's own veth (`cf<pid in hex>h`), read back with tshark, exactly.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use childflow_tests::{
    Dumpcap, TestNet, childflow, childflow_as_test_user, http_payload, is_root, skip, tool,
};
use serde_json::Value;

/// Skips (with the reason) when this machine cannot run `--root` tests.
fn unsupported() -> bool {
    if skip(!is_root(), "needs root for --root") {
        return true;
    }
    if let Err(e) = childflow::backend::rootful::preflight() {
        return skip(true, &format!("--root cannot run here: {e:#}"));
    }
    false
}

/// `childflow --root [--dns server] -- cmd`, dumping raw events into the net's directory.
fn rootful(net: &TestNet, name: &str, cmd: &[&str]) -> (Command, PathBuf) {
    rootful_with(net, name, &[], cmd)
}

/// Like [`rootful`], with more childflow `options` before the command.
fn rootful_with(
    net: &TestNet,
    name: &str,
    options: &[&std::ffi::OsStr],
    cmd: &[&str],
) -> (Command, PathBuf) {
    let events = net.dir.path().join(format!("{name}.events.jsonl"));
    let mut c = childflow();
    c.env("CHILDFLOW_RAW_EVENTS", &events)
        .env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .args(["--root", "--dns", &net.server_v4().to_string()])
        .args(options)
        .arg("--")
        .args(cmd);
    (c, events)
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("run childflow");
    assert!(
        out.status.code().is_some(),
        "childflow died by a signal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The records of a JSON Lines file (the raw events, a flow log).
fn json_lines(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).expect("a line is JSON")).collect()
}

/// The last flow event (the end, with final counters) for each flow key.
fn final_flows(events: &[Value]) -> Vec<&Value> {
    let mut out: Vec<&Value> = Vec::new();
    for ev in events.iter().filter(|e| e["type"] == "flow") {
        match out.iter_mut().find(|f| f["key"] == ev["key"]) {
            Some(slot) => *slot = ev,
            None => out.push(ev),
        }
    }
    out
}

fn flow_to<'a>(flows: &[&'a Value], proto: u8, remote: &[SocketAddr]) -> &'a Value {
    flows
        .iter()
        .find(|f| f["proto"] == proto && remote.iter().any(|r| f["remote"] == r.to_string()))
        .copied()
        .unwrap_or_else(|| panic!("no flow proto {proto} to {remote:?} in {flows:#?}"))
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "childflow failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn curl_http_and_https_by_name_with_dns_names_and_processes() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let ca = net.ca_pem();
    let (c, path) = rootful(
        &net,
        "curl",
        &[
            "curl",
            "-sS",
            "--cacert",
            ca.to_str().unwrap(),
            "http://example.test/",
            "-o",
            "/dev/null",
            "https://www.example.test/bytes/1000",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}\n",
        ],
    );
    let out = ok(&run(c));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("200 "), "{out}");
    assert_eq!(lines[1], "200 1000", "{out}");

    let evs = json_lines(&path);
    let dns: Vec<&Value> = evs.iter().filter(|e| e["type"] == "dns").collect();
    assert!(
        dns.iter().any(|d| d["query"] == "www.example.test" && d["rcode"] == 0),
        "no DNS answer for www.example.test: {dns:#?}"
    );
    let flows = final_flows(&evs);
    let servers = |port| {
        [
            SocketAddr::new(net.server_v4().into(), port),
            SocketAddr::new(net.server_v6().into(), port),
        ]
    };
    for port in [80, 443] {
        let f = flow_to(&flows, 6, &servers(port));
        assert_eq!(f["phase"], "end", "{f}");
        assert!(f["packets"][0].as_u64().unwrap() >= 3 && f["packets"][1].as_u64().unwrap() >= 3);
        let key = &f["key"];
        let p = evs
            .iter()
            .find(|e| e["type"] == "process" && e["key"] == *key)
            .unwrap_or_else(|| panic!("no process for {key}"));
        assert_eq!(p["process"]["comm"], "curl");
        assert!(p["process"]["exe"].as_str().unwrap_or_default().ends_with("curl"), "{p}");
    }
    let dns_flow = flow_to(&flows, 17, &[SocketAddr::new(net.server_v4().into(), 53)]);
    assert!(dns_flow["packets"][1].as_u64().unwrap() >= 1, "{dns_flow}");
}

#[test]
fn udp_echo_and_ping_v4_v6() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let script = format!(
        "echo hello | socat -t2 - UDP:{s4}:7 && ping -c2 -i0.2 -W2 {s4} >/dev/null && \
         ping -6 -c2 -i0.2 -W2 {s6} >/dev/null && echo all-ok",
        s4 = net.server_v4(),
        s6 = net.server_v6()
    );
    let (c, path) = rootful(&net, "udp", &["sh", "-c", &script]);
    let out = ok(&run(c));
    assert_eq!(out, "hello\nall-ok\n");
    let evs = json_lines(&path);
    let flows = final_flows(&evs);
    let udp = flow_to(&flows, 17, &[SocketAddr::new(net.server_v4().into(), 7)]);
    assert_eq!(udp["packets"], serde_json::json!([1, 1]), "{udp}");
    assert_eq!(udp["bytes"], serde_json::json!([34, 34]), "20 + 8 + 6 bytes each way: {udp}");
    let echo4 = flows.iter().find(|f| {
        f["proto"] == 1 && f["remote"].as_str().unwrap().starts_with(&net.server_v4().to_string())
    });
    let echo4 = echo4.unwrap_or_else(|| panic!("no ICMP flow: {flows:#?}"));
    assert_eq!(echo4["packets"], serde_json::json!([2, 2]), "{echo4}");
    let echo6 = flows
        .iter()
        .find(|f| {
            f["proto"] == 58 && f["key"].as_str().unwrap().contains(&net.server_v6().to_string())
        })
        .unwrap_or_else(|| panic!("no ICMPv6 echo flow: {flows:#?}"));
    assert_eq!(echo6["packets"], serde_json::json!([2, 2]), "{echo6}");
}

#[test]
fn exit_codes_and_the_invoking_user_without_capabilities() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let (c, _) = rootful(&net, "exit", &["sh", "-c", "exit 3"]);
    assert_eq!(run(c).status.code(), Some(3));
    let (c, _) = rootful(&net, "kill", &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(run(c).status.code(), Some(128 + 15));

    let user = nix::unistd::User::from_name("childflow-test").unwrap().expect("test user");
    let (mut c, _) = rootful(
        &net,
        "user",
        &["sh", "-c", "id -u; id -g; grep -E '^Cap(Eff|Prm)' /proc/self/status"],
    );
    c.env("SUDO_UID", user.uid.to_string()).env("SUDO_GID", user.gid.to_string()).current_dir("/");
    let out = ok(&run(c));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], user.uid.to_string(), "{out}");
    assert_eq!(lines[1], user.gid.to_string(), "{out}");
    assert!(lines[2..].iter().all(|l| l.ends_with("0000000000000000")), "capabilities: {out}");
}

#[test]
fn non_root_is_refused_with_a_hint() {
    if skip(!is_root(), "needs root to switch to the test user") {
        return;
    }
    let out = childflow_as_test_user().args(["--root", "--", "true"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("sudo") && err.contains("root"), "{err}");
}

/// A memory cgroup of the test's own with a limit, removed on drop: cgroup v1's memory
/// hierarchy, or the v2 root where the memory controller is enabled for its children.
struct MemoryLimit(PathBuf);

impl MemoryLimit {
    fn new(max: &str) -> Option<MemoryLimit> {
        let name = format!("childflow-test-mem-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            (v2.join(&name), "memory.max")
        } else {
            return None;
        };
        std::fs::create_dir(&dir).ok()?;
        let limit = MemoryLimit(dir);
        std::fs::write(limit.0.join(file), max).ok()?;
        Some(limit)
    }
}

impl Drop for MemoryLimit {
    /// Removes the cgroup once its last process is gone: childflow's reaper (forked into
    /// it) outlives childflow by a moment.
    fn drop(&mut self) {
        let started = Instant::now();
        while std::fs::remove_dir(&self.0).is_err() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `--capture-buffer` the kernel cannot allocate within the run's memory is refused with
/// a message that names the option, before the command runs.
#[test]
fn a_capture_buffer_beyond_the_memory_limit_is_refused_naming_the_option() {
    if unsupported() {
        return;
    }
    let Some(cgroup) = MemoryLimit::new("200M") else {
        skip(true, "no memory cgroup controller to limit the run with");
        return;
    };
    let dir = tempfile::Builder::new().prefix("childflow-ringmem").tempdir().unwrap();
    let (capture, ran) = (dir.path().join("c.pcapng"), dir.path().join("ran"));
    // childflow starts inside the limited cgroup, so the ring is charged to it.
    let procs = cgroup.0.join("cgroup.procs");
    let out = Command::new("sh")
        .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(&procs)
        .arg(childflow_tests::bin::binary())
        .args(["--root", "-c"])
        .arg(&capture)
        .args(["--capture-buffer", "1G", "--", "touch"])
        .arg(&ran)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if skip(out.status.success(), "the kernel does not charge eBPF maps to memory cgroups") {
        return;
    }
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("1024 MiB packet ring") && err.contains("smaller --capture-buffer"),
        "{err}"
    );
    assert!(!ran.exists(), "the command ran");
}

/// The run's host state, for run `id` (childflow's pid in hex), that still exists.
fn run_leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    // The veth's host end, and the capture tap of a run with a capture.
    for link in [format!("cf{id}h"), format!("cf{id}t")] {
        if Path::new("/sys/class/net").join(&link).exists() {
            left.push(format!("link {link}"));
        }
    }
    let tables = tool("nft").args(["list", "tables"]).output().unwrap();
    if String::from_utf8_lossy(&tables.stdout).contains(&format!("childflow_{id}")) {
        left.push(format!("nft table childflow_{id}"));
    }
    let cgroup = childflow::backend::rootful::cgroup::unified_root()
        .unwrap()
        .join(format!("childflow-{id}"));
    if cgroup.exists() {
        left.push(format!("cgroup {}", cgroup.display()));
    }
    let resolv = format!("/run/childflow-{id}.resolv.conf");
    if Path::new(&resolv).exists() {
        left.push(resolv);
    }
    left
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_of_childflow_leaves_nothing_within_two_seconds() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    // With a capture, so the capture tap is on the host too, and a download through it
    // (its large packets go to the file through the tap) before the kill.
    let capture = net.dir.path().join("killed.pcapng");
    let script = format!(
        "curl -sS --fail -o /dev/null http://{}/bytes/3000000 && echo started; exec sleep 60",
        net.server_v4()
    );
    let (mut c, _) =
        rootful_with(&net, "sigkill", &["-c".as_ref(), capture.as_ref()], &["sh", "-c", &script]);
    let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    let id = format!("{:x}", child.id());
    let state = run_leftovers(&id);
    assert_eq!(
        state.len(),
        4,
        "veth, capture tap, nft table and cgroup exist while it runs: {state:?}"
    );
    // The capture is flushed within 150 ms of a quiet link.
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    wait_for("the run's host state to disappear", Duration::from_secs(2), || {
        run_leftovers(&id).is_empty()
    });
    eprintln!("host state gone {:?} after SIGKILL", killed.elapsed());
    let info = tool("capinfos").arg(&capture).output().unwrap();
    assert!(info.status.success(), "{info:?}");
    let payload = http_payload(&capture);
    assert!(payload >= 3_000_000, "the download was captured whole: {payload} bytes");
}

#[test]
fn a_finished_run_leaves_nothing_within_two_seconds() {
    if unsupported() {
        return;
    }
    // childflow returns once the command's results are final; the kernel's teardown (the
    // nft table, the cgroup links) finishes behind it in a lingering process.
    let mut child = childflow().args(["--root", "--", "sleep", "1"]).spawn().unwrap();
    let id = format!("{:x}", child.id());
    // First the run's state must be seen, or its absence afterwards proves nothing.
    wait_for("the run's link, nft table and cgroup", Duration::from_secs(2), || {
        run_leftovers(&id).len() >= 3
    });
    assert!(child.wait().unwrap().success(), "childflow --root -- sleep 1 failed");
    let returned = Instant::now();
    wait_for("the run's host state to disappear", Duration::from_secs(2), || {
        run_leftovers(&id).is_empty()
    });
    eprintln!("host state gone {:?} after childflow returned", returned.elapsed());
}

/// (packets, IP bytes) per direction (0 = sent by `local`) that tshark saw matching
/// `filter`.
fn tshark_count(file: &Path, filter: &str, local: &str) -> [(u64, u64); 2] {
    let out = tool("tshark")
        .arg("-r")
        .arg(file)
        .args(["-n", "-T", "fields", "-E", "separator=/t"])
        .args(["-e", "ip.src", "-e", "ip.len", "-e", "ipv6.src", "-e", "ipv6.plen"])
        .args(["-Y", filter])
        .output()
        .unwrap();
    assert!(out.status.success(), "{filter}: {}", String::from_utf8_lossy(&out.stderr));
    let mut count = [(0, 0); 2];
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (src, len) = if !f[0].is_empty() {
            (f[0], f[1].split(',').next().unwrap().parse::<u64>().unwrap())
        } else {
            (f[2], f[3].split(',').next().unwrap().parse::<u64>().unwrap() + 40)
        };
        let dir = if src == local { 0 } else { 1 };
        count[dir].0 += 1;
        count[dir].1 += len;
    }
    count
}

fn counts(flow: &Value) -> [(u64, u64); 2] {
    let n = |v: &Value, i: usize| v[i].as_u64().unwrap();
    [(n(&flow["packets"], 0), n(&flow["bytes"], 0)), (n(&flow["packets"], 1), n(&flow["bytes"], 1))]
}

#[test]
fn accounting_matches_tshark_on_the_runs_veth_exactly() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let go = net.dir.path().join("go");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.02; done; \
         curl -sS -o /dev/null http://{s4}/bytes/3000000 && \
         curl -sS -o /dev/null http://[{s6}]/bytes/500000 && \
         echo hello | socat -t2 - UDP:{s4}:7 >/dev/null && \
         ping -c3 -i0.2 -W2 {s4} >/dev/null && ping -6 -c3 -i0.2 -W2 {s6} >/dev/null && \
         echo done; sleep 1",
        go = go.display(),
        s4 = net.server_v4(),
        s6 = net.server_v6()
    );
    let (mut c, path) = rootful(&net, "accounting", &["sh", "-c", &script]);
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let veth = format!("cf{:x}h", child.id());
    wait_for("the run's veth", Duration::from_secs(10), || {
        Path::new("/sys/class/net").join(&veth).exists()
    });
    let pcap = net.dir.path().join("run.pcapng");
    let dumpcap = Dumpcap::start(&veth, &pcap, None);
    std::fs::write(&go, "").unwrap();
    // The command sleeps a second after its traffic, so dumpcap has written every packet
    // before the run ends and takes the veth with it.
    let out = child.wait_with_output().unwrap();
    assert_eq!(ok(&out), "done\n");
    // The veth is gone with the run: dumpcap has ended or ends now.
    dumpcap.stop();

    let evs = json_lines(&path);
    let flows = final_flows(&evs);
    let mut checked = Vec::new();
    for f in &flows {
        let local: SocketAddr = f["local"].as_str().unwrap().parse().unwrap();
        let remote: SocketAddr = f["remote"].as_str().unwrap().parse().unwrap();
        let ip = local.ip().to_string();
        let filter = match f["proto"].as_u64().unwrap() {
            6 => format!("tcp.port == {} && tcp.port == {}", local.port(), remote.port()),
            17 => format!("udp.port == {} && udp.port == {}", local.port(), remote.port()),
            1 if remote.port() == 8 << 8 => {
                format!("icmp.ident == {} && (icmp.type == 0 || icmp.type == 8)", local.port())
            }
            58 if remote.port() == 128 << 8 => {
                format!(
                    "icmpv6.echo.identifier == {} && (icmpv6.type == 128 || icmpv6.type == 129)",
                    local.port()
                )
            }
            // Neighbour discovery and other ICMP messages: not part of this check.
            _ => continue,
        };
        let family = if local.is_ipv4() { "ip" } else { "ipv6" };
        let want = tshark_count(&pcap, &format!("({filter}) && {family}.addr == {ip}"), &ip);
        assert_eq!(counts(f), want, "flow {} (packets, bytes) per direction vs tshark", f["key"]);
        checked.push((f["proto"].as_u64().unwrap(), local.is_ipv4()));
    }
    checked.sort();
    assert_eq!(
        checked,
        [(1, true), (6, false), (6, true), (17, true), (58, false)],
        "TCP v4 and v6, UDP, ICMP and ICMPv6 echo were all compared: {flows:#?}"
    );
    let big = flow_to(&flows, 6, &[SocketAddr::new(net.server_v4().into(), 80)]);
    assert!(big["payload_bytes"][1].as_u64().unwrap() > 3_000_000, "{big}");
}

#[test]
fn each_flow_is_attributed_to_the_process_that_opened_it() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let script = format!(
        "curl -sS -o /dev/null http://{other}/ & echo hi | socat -t2 - UDP:{s4}:7 >/dev/null; wait",
        other = net.other_v4(),
        s4 = net.server_v4()
    );
    let (c, path) = rootful(&net, "tree", &["sh", "-c", &script]);
    ok(&run(c));
    let evs = json_lines(&path);
    let process_of = |proto: u8, remote: SocketAddr| {
        evs.iter()
            .find(|e| {
                e["type"] == "process" && e["proto"] == proto && e["remote"] == remote.to_string()
            })
            .unwrap_or_else(|| panic!("no process for {remote}: {evs:#?}"))["process"]
            .clone()
    };
    let curl = process_of(6, SocketAddr::new(net.other_v4().into(), 80));
    let socat = process_of(17, SocketAddr::new(net.server_v4().into(), 7));
    assert_eq!(curl["comm"], "curl");
    assert_eq!(socat["comm"], "socat");
    assert_ne!(curl["pid"], socat["pid"]);
    assert_eq!(curl["cmdline"][0], "curl", "{curl}");
}

#[test]
fn a_large_transfer_is_counted_whole() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    // 1 GiB takes about 4 s here (the test server runs in this debug-built test process).
    const SIZE: u64 = 1 << 30;
    let url = format!("http://{}/bytes/{SIZE}", net.server_v4());
    let (c, path) =
        rootful(&net, "large", &["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", &url]);
    let started = Instant::now();
    let out = ok(&run(c));
    eprintln!("{SIZE} bytes through childflow --root in {:?}", started.elapsed());
    assert_eq!(out, SIZE.to_string());
    let evs = json_lines(&path);
    let flows = final_flows(&evs);
    let f = flow_to(&flows, 6, &[SocketAddr::new(net.server_v4().into(), 80)]);
    let payload = f["payload_bytes"][1].as_u64().unwrap();
    // Every byte once, plus the response headers and any retransmissions (a few, at most).
    assert!(payload > SIZE && payload < SIZE + SIZE / 100, "payload {payload} for {SIZE}");
}

#[test]
fn flow_log_and_capture_through_the_collector() {
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let log = net.dir.path().join("flows.jsonl");
    let pcap = net.dir.path().join("run.pcapng");
    let url = "http://example.test/bytes/200000";
    let options = ["--flow-log".as_ref(), log.as_os_str(), "--capture".as_ref(), pcap.as_os_str()];
    let (c, raw) =
        rootful_with(&net, "collector", &options, &["curl", "-sS", "-4", "-o", "/dev/null", url]);
    ok(&run(c));
    let records = json_lines(&log);
    let http = records
        .iter()
        .find(|r| r["record"] == "flow" && r["event"] == "end" && r["id"]["resp_p"] == 80)
        .unwrap_or_else(|| panic!("no HTTP flow in the flow log: {records:#?}"));
    assert_eq!(http["id"]["resp_h"], net.server_v4().to_string());
    assert_eq!(
        http["dns"]["query"],
        "example.test",
        "{http}\nraw events: {}",
        std::fs::read_to_string(&raw).unwrap()
    );
    assert_eq!(http["process"]["comm"], "curl", "{http}");
    // The server's FIN may arrive after curl (and so the run) has ended: SF or S2.
    assert!(http["history"].as_str().unwrap().starts_with("ShAD"), "{http}");
    assert!(http["resp_bytes"].as_u64().unwrap() > 200_000, "{http}");
    // The capture holds exactly the packets the flow log counted.
    let port = http["id"]["orig_p"].as_u64().unwrap();
    let out = tool("tshark")
        .arg("-r")
        .arg(&pcap)
        .args(["-n", "-Y", &format!("tcp.port == {port}"), "-T", "fields", "-e", "frame.number"])
        .output()
        .unwrap();
    let captured = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
    let counted = http["orig_pkts"].as_u64().unwrap() + http["resp_pkts"].as_u64().unwrap();
    assert_eq!(captured, counted, "packets in the capture vs the flow log");
    // Whole packets, also the GSO super-packets the veth carries (longer than one 16 KiB
    // ring record): every frame is captured to its full length, and tshark reassembles
    // the HTTP body byte for byte.
    let out = tool("tshark")
        .arg("-r")
        .arg(&pcap)
        .args(["-n", "-T", "fields", "-e", "frame.len", "-e", "frame.cap_len"])
        .output()
        .unwrap();
    let frames: Vec<(u64, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (len, cap) = l.split_once('\t')?;
            Some((len.parse().ok()?, cap.parse().ok()?))
        })
        .collect();
    assert!(frames.iter().all(|(len, cap)| len == cap), "cut frames: {frames:?}");
    let largest = frames.iter().map(|f| f.0).max().unwrap_or(0);
    assert!(largest > 16 * 1024, "no frame over 16 KiB (largest {largest}): nothing to test");
    let objects = net.dir.path().join("objects");
    let out = tool("tshark")
        .arg("-r")
        .arg(&pcap)
        .args(["-n", "-q", "--export-objects"])
        .arg(format!("http,{}", objects.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
    let body = std::fs::read(objects.join("200000")).expect("tshark exported the HTTP body");
    assert!(body == childflow_tests::pattern(200_000), "the body read back differs");
}

#[test]
fn dns_answers_over_tcp_name_flows() {
    const URL: &str = "http://example.test/";
    if unsupported() {
        return;
    }
    let net = TestNet::new();
    let log = net.dir.path().join("flows.jsonl");
    // glibc's resolver takes `use-vc` (queries over TCP, RFC 1035 §4.2.2) from RES_OPTIONS.
    let cmd = ["env", "RES_OPTIONS=use-vc", "curl", "-sS", "-4", "-o", "/dev/null", URL];
    let (c, raw) = rootful_with(&net, "tcp-dns", &["--flow-log".as_ref(), log.as_os_str()], &cmd);
    ok(&run(c));
    let evs = json_lines(&raw);
    let dns: Vec<&Value> = evs.iter().filter(|e| e["type"] == "dns").collect();
    assert!(
        dns.iter().any(|d| d["query"] == "example.test" && d["transport"] == "tcp"),
        "no DNS answer over TCP for example.test: {dns:#?}"
    );
    let flows = final_flows(&evs);
    flow_to(&flows, 6, &[SocketAddr::new(net.server_v4().into(), 53)]);
    let records = json_lines(&log);
    let http = records
        .iter()
        .find(|r| r["record"] == "flow" && r["event"] == "end" && r["id"]["resp_p"] == 80)
        .unwrap_or_else(|| panic!("no HTTP flow in the flow log: {records:#?}"));
    assert_eq!(http["dns"]["query"], "example.test", "{http}");
}
