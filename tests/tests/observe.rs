//! What a user reads after a run, end to end through the rootless backend: the flow log
//! (read back with jq and `childflow report`) and the pcapng capture (read back with tshark
//! and capinfos), both checked against an independent capture that dumpcap takes on the
//! command's own tap device (entered from the host with nsenter).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use childflow_tests::{TestNet, childflow, is_root, skip, tool};

/// The command's address on its tap device (the rootless backend's fixed plan).
const CHILD_V4: &str = "10.0.2.100";

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// dumpcap on `iface` inside the network namespace of process `pid`.
fn independent_capture(pid: u32, iface: &str, file: &Path) -> Child {
    let mut child = tool("nsenter")
        .args(["-t", &pid.to_string(), "-n", "dumpcap", "-i", iface, "-q", "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Capturing on") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "dumpcap ended before capturing");
    }
    // dumpcap says so slightly before its socket sees packets.
    std::thread::sleep(Duration::from_millis(500));
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    child
}

/// The host pid of a process whose command line contains `marker` and which lives in
/// another network namespace than ours (childflow's own command line has the marker too).
fn pid_of(marker: &str) -> u32 {
    let out = tool("pgrep").args(["-f", marker]).output().unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns != ours))
        .expect("the command's pid")
}

/// `tshark -r file -Y filter -T fields -e ...`, one Vec per packet.
fn tshark_fields(file: &Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = tool("tshark");
    cmd.arg("-r").arg(file).args(["-n", "-Y", filter, "-T", "fields"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "tshark: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// Per flow (proto, remote ip, remote port, local port; ports empty for ICMP), (packets, ip
/// bytes) sent and received by the command, counted from a capture of the tap.
type Counts = BTreeMap<(String, String, String, String), [(u64, u64); 2]>;

fn count_capture(file: &Path) -> Counts {
    let mut counts = Counts::new();
    let rows = tshark_fields(
        file,
        "ip && !icmp.type==3",
        &[
            "ip.src",
            "ip.dst",
            "ip.proto",
            "ip.len",
            "tcp.srcport",
            "tcp.dstport",
            "udp.srcport",
            "udp.dstport",
        ],
    );
    for r in rows {
        let out = r[0] == CHILD_V4;
        let remote = if out { &r[1] } else { &r[0] };
        let (sport, dport) = if !r[4].is_empty() { (&r[4], &r[5]) } else { (&r[6], &r[7]) };
        let (port, local) = if out { (dport, sport) } else { (sport, dport) };
        let proto = match r[2].as_str() {
            "6" => "tcp",
            "17" => "udp",
            "1" => "icmp",
            other => other,
        };
        let key = (proto.into(), remote.clone(), port.clone(), local.clone());
        let entry = counts.entry(key).or_default();
        let dir = usize::from(!out);
        entry[dir].0 += 1;
        entry[dir].1 += r[3].parse::<u64>().unwrap();
    }
    counts
}

fn jq(file: &Path, filter: &str) -> Vec<serde_json::Value> {
    let out = tool("jq").args(["-c", filter]).arg(file).output().unwrap();
    assert!(out.status.success(), "jq {filter}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

struct Run {
    dir: tempfile::TempDir,
    flows: PathBuf,
    capture: PathBuf,
    independent: PathBuf,
    status: std::process::ExitStatus,
}

/// Runs `traffic` under childflow (rootless, as root) with a flow log and a capture, while
/// dumpcap captures the command's tap independently.
fn observed_run(net: &TestNet, traffic: &str, extra: &[&str]) -> Run {
    let dir = tempfile::Builder::new().prefix("childflow-observe").tempdir().unwrap();
    let d = dir.path();
    let (flows, capture, independent) =
        (d.join("flows.jsonl"), d.join("run.pcapng"), d.join("independent.pcapng"));
    let marker = format!("cf-observe-{}-{}", std::process::id(), net.n);
    let script = format!(
        "touch {d}/ready; while [ ! -e {d}/go ]; do sleep 0.02; done; {traffic}; \
         touch {d}/done; while [ ! -e {d}/end ]; do sleep 0.02; done",
        d = d.display()
    );
    let mut cf = childflow()
        .env("CHILDFLOW_UPSTREAM_DNS", net.server_v4().to_string())
        .arg("--flow-log")
        .arg(&flows)
        .arg("-c")
        .arg(&capture)
        .args(extra)
        .args(["--", "sh", "-c", &script, &marker])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&d.join("ready"), "the command to start");
    let dumpcap = independent_capture(pid_of(&marker), "tap0", &independent);
    std::fs::write(d.join("go"), "").unwrap();
    wait_for(&d.join("done"), "the traffic to finish");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dumpcap.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut dumpcap = dumpcap;
    dumpcap.wait().unwrap();
    std::fs::write(d.join("end"), "").unwrap();
    let status = cf.wait().unwrap();
    Run { dir, flows, capture, independent, status }
}

#[test]
fn flow_log_and_capture_match_an_independent_capture() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let ca = net.ca_pem();
    let (v4, other) = (net.server_v4(), net.other_v4());
    let traffic = format!(
        "curl -sS --fail -o /dev/null http://example.test/bytes/200000 && \
         curl -sS --fail -o /dev/null --cacert {ca} https://other.example.test/bytes/1234 && \
         printf 'one' | socat -t1 - UDP4:{v4}:7 >/dev/null && \
         ping -c 2 -W 2 {v4} >/dev/null",
        ca = ca.display()
    );
    let run = observed_run(&net, &traffic, &["--tls-keylog"]);
    assert!(run.status.success(), "childflow: {:?}", run.status);

    // The flow log, read with jq: one end record per flow, names from the command's DNS.
    let ends = jq(&run.flows, r#"select(.record == "flow" and .event == "end")"#);
    let flow_to = |proto: &str, ip: &str, port: u64| {
        ends.iter()
            .find(|f| f["proto"] == proto && f["id"]["resp_h"] == ip && f["id"]["resp_p"] == port)
            .unwrap_or_else(|| panic!("no {proto} flow to {ip}:{port} in {ends:#?}"))
    };
    let http = flow_to("tcp", &v4.to_string(), 80);
    let https = flow_to("tcp", &other.to_string(), 443);
    let names = |f: &serde_json::Value| f["dns"].to_string();
    assert!(names(http).contains("example.test"), "HTTP flow names: {}", names(http));
    assert!(names(https).contains("other.example.test"), "HTTPS names: {}", names(https));
    assert_eq!(http["conn_state"], "SF");
    assert!(http["resp_bytes"].as_u64().unwrap() > 200_000);

    // Per-flow packets and IP bytes each way equal the independent capture's, exactly.
    let independent = count_capture(&run.independent);
    for f in &ends {
        let proto = f["proto"].as_str().unwrap();
        let (port, local) = if proto == "icmp" {
            Default::default()
        } else {
            (f["id"]["resp_p"].to_string(), f["id"]["orig_p"].to_string())
        };
        let key = (proto.to_owned(), f["id"]["resp_h"].as_str().unwrap().to_owned(), port, local);
        let Some(want) = independent.get(&key) else {
            panic!("flow {key:?} of the log is not in the independent capture {independent:?}")
        };
        let got = [
            (f["orig_pkts"].as_u64().unwrap(), f["orig_ip_bytes"].as_u64().unwrap()),
            (f["resp_pkts"].as_u64().unwrap(), f["resp_ip_bytes"].as_u64().unwrap()),
        ];
        assert_eq!(&got, want, "flow {key:?}: (packets, ip bytes) sent, received");
    }
    let udp_echo = independent.keys().filter(|k| k.0 == "udp" && k.2 == "7").count();
    let dns = independent.keys().filter(|k| k.0 == "udp" && k.2 == "53").count();
    assert!(udp_echo == 1 && dns >= 2, "traffic seen: {independent:?}");
    assert!(ends.len() >= independent.len(), "every flow is logged: {ends:#?}");

    // The capture: the same packets as the independent one, with direction flags,
    // names, the Community ID on each flow's first packet, and TLS decrypted.
    assert_eq!(count_capture(&run.capture), independent, "childflow's capture vs dumpcap's");
    let capinfos = tool("capinfos").arg(&run.capture).output().unwrap();
    assert!(capinfos.status.success() && capinfos.stderr.is_empty(), "{capinfos:?}");
    let dirs = tshark_fields(&run.capture, "ip", &["ip.src", "frame.packet_flags_direction"]);
    for d in &dirs {
        let want = if d[0] == CHILD_V4 { "0x00000002" } else { "0x00000001" };
        assert_eq!(d[1], want, "direction flag of a packet from {}", d[0]);
    }
    let comments = tshark_fields(&run.capture, "frame.comment", &["frame.comment"]);
    let http_id = http["community_id"].as_str().unwrap();
    assert!(
        comments.iter().any(|c| c[0].contains(http_id)),
        "no packet comment carries the HTTP flow's {http_id}: {comments:?}"
    );
    let uris = tshark_fields(&run.capture, "http.request", &["http.host", "http.request.uri"]);
    assert!(
        uris.iter().any(|u| u[0] == "other.example.test" && u[1] == "/bytes/1234"),
        "the HTTPS request is decrypted with the key log: {uris:?}"
    );
    let hosts = tool("tshark").arg("-r").arg(&run.capture).args(["-q", "-z", "hosts"]).output();
    let hosts = String::from_utf8(hosts.unwrap().stdout).unwrap();
    assert!(hosts.contains("example.test"), "name resolution block: {hosts}");

    // `childflow report` reads the log back and names the destinations.
    let report = childflow().arg("report").arg(&run.flows).output().unwrap();
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    assert!(text.contains("example.test"), "report: {text}");
    drop(run.dir);
}

#[test]
fn a_capture_filter_keeps_only_its_port() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let v4 = net.server_v4();
    let traffic = format!(
        "curl -sS --fail -o /dev/null http://{v4}/bytes/3000000 && \
         printf 'x' | socat -t1 - UDP4:{v4}:7 >/dev/null"
    );
    let run = observed_run(&net, &traffic, &["--capture-filter", "tcp port 80"]);
    assert!(run.status.success());
    let all = tshark_fields(&run.capture, "", &["tcp.port", "udp.port"]);
    assert!(all.len() > 10, "the HTTP transfer is captured: {} packets", all.len());
    assert!(all.iter().all(|p| p[0].contains("80") && p[1].is_empty()), "{all:?}");
    // The flow log still has every flow: the filter is for the capture only.
    let ends = jq(&run.flows, r#"select(.record == "flow" and .proto == "udp")"#);
    assert!(!ends.is_empty(), "the UDP flow is logged");
}

#[test]
fn rotation_keeps_a_ring_of_readable_files() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let traffic = format!("curl -sS --fail -o /dev/null http://{}/bytes/2000000", net.server_v4());
    let run = observed_run(&net, &traffic, &["--capture-max-size", "256K", "--capture-files", "3"]);
    assert!(run.status.success());
    let mut files: Vec<PathBuf> = std::fs::read_dir(run.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("run_"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "a ring of 3 files: {files:?}");
    for f in &files {
        let info = tool("capinfos").arg(f).output().unwrap();
        assert!(info.status.success() && info.stderr.is_empty(), "{f:?}: {info:?}");
        assert!(std::fs::metadata(f).unwrap().len() <= 300 * 1024, "{f:?} exceeds the size");
    }
}

#[test]
fn a_killed_run_leaves_readable_logs() {
    if skip(!is_root(), "needs root to build the test network") {
        return;
    }
    let net = TestNet::new();
    let dir = tempfile::Builder::new().prefix("childflow-killed").tempdir().unwrap();
    let (flows, capture) = (dir.path().join("flows.jsonl"), dir.path().join("run.pcapng"));
    let done = dir.path().join("done");
    let script = format!(
        "curl -sS --fail -o /dev/null http://{}/bytes/1000000 && touch {} && sleep 30",
        net.server_v4(),
        done.display()
    );
    let mut cf = childflow()
        .arg("--flow-log")
        .arg(&flows)
        .arg("-c")
        .arg(&capture)
        .args(["--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_for(&done, "the download");
    std::thread::sleep(Duration::from_millis(1500));
    cf.kill().unwrap();
    cf.wait().unwrap();
    let info = tool("capinfos").arg(&capture).output().unwrap();
    assert!(info.status.success(), "{info:?}");
    let packets = tshark_fields(&capture, "tcp.port == 80", &["frame.number"]).len();
    assert!(packets > 20, "the download's packets were flushed before the kill: {packets}");
    // Every line written is a whole JSON record.
    let records = jq(&flows, ".record");
    assert_eq!(records[0], "header");
}
