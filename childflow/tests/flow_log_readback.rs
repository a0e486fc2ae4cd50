//! Flow logs written by the real collector and sinks from synthetic backend events, read
//! back by independent tools: `jq` for JSONL, Python's `csv` module for CSV, and the
//! `childflow report` binary. No namespaces or root needed.
//!
//! A tool that is not installed makes its test print why and return early (counted as
//! skipped in the output, never silently passed): see `tool()`.

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use childflow::{
    cli::FlowLogFormat,
    collector::{Collector, FlowLogConsumer, RunEnd, RunInfo},
    event::{
        CloseReason, DnsAnswer, DnsData, DnsEvent, DnsTransport, DropReport, Event, FlowKey,
        FlowPhase, FlowStats, FlowUpdate, ProcessEvent, ProcessInfo,
    },
    flow::TableConfig,
    sandbox::ExitStatus,
    sink::{FlowLog, Target},
};
use childflow_common::flow::{
    DIR_IN, DIR_OUT, FAMILY_V4, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_ACK,
    TCP_FIN, TCP_PSH, TCP_SYN,
};

const T0: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;

fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: `{name}` is not installed");
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn http_stats(t0: u64, body: u32) -> FlowStats {
    let mut s = FlowStats::new(DIR_OUT, t0);
    s.account(DIR_OUT, 60, 0, TCP_SYN, t0);
    s.account(DIR_IN, 60, 0, TCP_SYN | TCP_ACK, t0 + MS);
    s.account(DIR_OUT, 52, 0, TCP_ACK, t0 + 2 * MS);
    s.account(DIR_OUT, 152, 100, TCP_ACK | TCP_PSH, t0 + 3 * MS);
    s.account(DIR_IN, 52 + body, body, TCP_ACK | TCP_PSH, t0 + 4 * MS);
    s.account(DIR_OUT, 52, 0, TCP_ACK | TCP_FIN, t0 + 5 * MS);
    s.account(DIR_IN, 52, 0, TCP_ACK | TCP_FIN, t0 + 6 * MS);
    s
}

fn dns(query: &str, answers: &[(&str, DnsData)]) -> Event {
    Event::Dns(DnsEvent {
        ts: T0,
        server: "198.18.0.53:53".parse().unwrap(),
        transport: DnsTransport::Udp,
        id: 7,
        query: query.into(),
        qtype: 1,
        rcode: 0,
        answers: answers
            .iter()
            .map(|(name, data)| DnsAnswer {
                name: (*name).into(),
                rtype: if matches!(data, DnsData::Name(_)) { 5 } else { 1 },
                ttl: 60,
                data: data.clone(),
            })
            .collect(),
    })
}

/// The events of a run that resolves two names, fetches over HTTP and HTTPS, sends UDP and
/// pings, as a backend would emit them.
fn synthetic_run() -> Vec<Event> {
    let local = "10.0.2.100";
    let http = FlowKey::new(
        PROTO_TCP,
        format!("{local}:40000").parse().unwrap(),
        "198.18.0.1:80".parse().unwrap(),
    );
    let https = FlowKey::new(
        PROTO_TCP,
        format!("{local}:40001").parse().unwrap(),
        "198.18.0.2:443".parse().unwrap(),
    );
    let udp = FlowKey::new(
        PROTO_UDP,
        format!("{local}:5000").parse().unwrap(),
        "198.18.0.7:7".parse().unwrap(),
    );
    let (id, tc) = FlowKey::icmp_ports(FAMILY_V4, ICMP_ECHO_REQUEST, 0, 42);
    let ping = FlowKey::new(
        PROTO_ICMP,
        format!("{local}:{id}").parse().unwrap(),
        format!("198.18.0.1:{tc}").parse().unwrap(),
    );
    let curl = ProcessInfo {
        pid: 4242,
        uid: 1000,
        comm: "curl".into(),
        exe: Some("/usr/bin/curl".into()),
        cmdline: Some(vec!["curl".into(), "--data".into(), "a,b \"c\"".into()]),
    };
    let mut udp_stats = FlowStats::new(DIR_OUT, T0);
    udp_stats.account(DIR_OUT, 33, 5, 0, T0);
    udp_stats.account(DIR_IN, 33, 5, 0, T0 + MS);
    let mut ping_stats = FlowStats::new(DIR_OUT, T0);
    ping_stats.account(DIR_OUT, 84, 56, 0, T0);
    ping_stats.account(DIR_IN, 84, 56, 0, T0 + MS);
    vec![
        dns("example.test", &[("example.test", DnsData::Addr("198.18.0.1".parse().unwrap()))]),
        dns(
            "www.example.test",
            &[
                ("www.example.test", DnsData::Name("cdn.example.test".into())),
                ("cdn.example.test", DnsData::Addr("198.18.0.2".parse().unwrap())),
            ],
        ),
        Event::Process(ProcessEvent { key: http, process: curl.clone() }),
        Event::Process(ProcessEvent { key: https, process: curl }),
        Event::Flow(FlowUpdate { key: http, stats: http_stats(T0, 1000), phase: FlowPhase::Start }),
        Event::Flow(FlowUpdate {
            key: http,
            stats: http_stats(T0, 1000),
            phase: FlowPhase::End(CloseReason::Fin),
        }),
        Event::Flow(FlowUpdate {
            key: https,
            stats: http_stats(T0, 5000),
            phase: FlowPhase::End(CloseReason::Fin),
        }),
        Event::Flow(FlowUpdate { key: udp, stats: udp_stats, phase: FlowPhase::Start }),
        Event::Flow(FlowUpdate { key: ping, stats: ping_stats, phase: FlowPhase::Start }),
        Event::Drops(DropReport { source: "flow ring buffer", count: 2 }),
    ]
}

/// Runs the synthetic events through the real collector into a log at `path`.
fn write_log(path: &Path, format: FlowLogFormat) {
    let info = RunInfo {
        command: vec!["sh".into(), "-c".into(), "curl …".into()],
        backend: "rootless".into(),
        start: T0,
    };
    let config =
        TableConfig { update_interval: Some(Duration::from_secs(5)), ..TableConfig::default() };
    let mut collector = Collector::new(config, info.clone());
    let log = FlowLog::create(Target::File(path.to_path_buf()), format).expect("create log");
    collector.add(Box::new(FlowLogConsumer::new(log, &info).expect("header")));
    for e in synthetic_run() {
        collector.handle(e);
    }
    let outcome = collector.finish(RunEnd {
        end: T0 + 2_000 * MS,
        status: Some(ExitStatus::Exited(0)),
        error: None,
    });
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
}

#[test]
fn jq_reads_every_jsonl_record() {
    if !tool("jq") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flows.jsonl");
    write_log(&path, FlowLogFormat::Jsonl);
    let out = run(Command::new("jq").args(["-r", "-s", r#"
        [ (.[0].record), (.[0].version | tostring),
          (map(select(.record == "dns")) | length | tostring),
          (map(select(.record == "flow" and .event == "end")) | length | tostring),
          (map(select(.record == "flow")) | map(.id.resp_h + ":" + (.id.resp_p|tostring) + "/" + .proto + "/" + .conn_state + "/" + .close_reason) | join(",")),
          (map(select(.record == "flow" and .id.resp_p == 443)) | .[0] | .dns.query + " " + (.dns.names | join(" ")) + " " + (.resp_bytes|tostring) + " " + .process.comm),
          (.[-1].record + " " + (.[-1].exit_code|tostring) + " " + (.[-1].totals.flows|tostring) + " " + (.[-1].drops["flow ring buffer"]|tostring)),
          (map(select(.record == "flow")) | map(.community_id | startswith("1:")) | all | tostring)
        ] | .[]"#]).arg(&path));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "header",
            "1",
            "2",
            "4",
            "198.18.0.1:80/tcp/SF/fin,198.18.0.2:443/tcp/SF/fin,198.18.0.7:7/udp/SF/command_exit,198.18.0.1:0/icmp/SF/command_exit",
            "www.example.test www.example.test cdn.example.test 5000 curl",
            "run 0 4 2",
            "true",
        ],
        "{text}"
    );
}

#[test]
fn python_csv_reads_the_csv_log() {
    if !tool("python3") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flows.csv");
    write_log(&path, FlowLogFormat::Csv);
    let script = r#"
import csv, sys
with open(sys.argv[1], newline="") as f:
    rows = list(csv.DictReader(f))
assert len(rows) == 4, rows
by_port = {r["id.resp_p"]: r for r in rows}
https = by_port["443"]
assert https["proto"] == "tcp" and https["conn_state"] == "SF", https
assert int(https["resp_bytes"]) == 5000 and int(https["orig_ip_bytes"]) == 316, https
assert https["dns.names"] == "www.example.test cdn.example.test", https
assert https["process.cmdline"] == 'curl --data a,b "c"', https
assert https["community_id"].startswith("1:"), https
assert by_port["0"]["icmp_id"] == "42" and by_port["0"]["tcp_state"] == "", by_port["0"]
assert float(https["duration"]) == 0.006, https
print(len(rows[0]), "columns")
"#;
    let out = run(Command::new("python3").arg("-c").arg(script).arg(&path));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "35 columns");
}

#[test]
fn report_reads_the_log_in_every_format_and_rejects_a_bad_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("flows.jsonl");
    write_log(&path, FlowLogFormat::Jsonl);
    let bin = env!("CARGO_BIN_EXE_childflow");
    let text = String::from_utf8(run(Command::new(bin).arg("report").arg(&path)).stdout).unwrap();
    assert!(text.contains("4 flows: sent"), "{text}");
    assert!(
        text.contains("198.18.0.2 (www.example.test, cdn.example.test) tcp port 443"),
        "{text}"
    );
    assert!(text.contains("flow ring buffer: 2"), "{text}");
    let md = String::from_utf8(
        run(Command::new(bin).args(["report", "--format", "markdown"]).arg(&path)).stdout,
    )
    .unwrap();
    assert!(md.contains("### Top destinations"), "{md}");
    let json = run(Command::new(bin).args(["report", "--format", "json"]).arg(&path)).stdout;
    let v: serde_json::Value = serde_json::from_slice(&json).expect("report json");
    assert_eq!(v["totals"]["flows"], 4);
    assert_eq!(v["top_dns_names"].as_array().map(Vec::len), Some(2));

    let mut log = std::fs::read_to_string(&path).unwrap();
    log.insert_str(log.find('\n').unwrap() + 1, "{not json}\n");
    std::fs::write(&path, log).unwrap();
    let out = Command::new(bin).arg("report").arg(&path).output().expect("run report");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flows.jsonl:2: not a childflow flow log record"), "{err}");
}
