//! Flow logs, summary and report through the real binary.
//!
//! What runs end to end today: the log's lifecycle around a real command (header first, run
//! record last, complete after the command fails or childflow gets SIGTERM), the errors for
//! unwritable paths, `--summary`, and `childflow report` on the log. Per-flow contents from
//! real traffic need a backend that relays the command's traffic; until one lands these
//! tests check the records of a run without network flows (the unit and readback tests in
//! `childflow/` cover flow records from synthetic backend events).

use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
};

use childflow_tests::{childflow, childflow_as_test_user, is_root, skip, tool};
use serde_json::Value;

fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}: {l}", i + 1))
        })
        .collect()
}

/// A temp dir the unprivileged test user can write into too.
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("childflow-flows").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod temp dir");
    dir
}

fn log_has_header_and_run_record(mut cmd: Command, dir: &Path) {
    let log = dir.join("flows.jsonl");
    cmd.arg("--flow-log").arg(&log).args(["--summary-format", "json", "--", "sh", "-c", "exit 3"]);
    let out = cmd.output().expect("run childflow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let recs = records(&log);
    assert_eq!(recs[0]["record"], "header", "{recs:?}");
    assert_eq!(recs[0]["schema"], "childflow.flow-log");
    assert_eq!(recs[0]["version"], 1);
    assert_eq!(recs[0]["command"], serde_json::json!(["sh", "-c", "exit 3"]));
    let run = recs.last().expect("records");
    assert_eq!(run["record"], "run", "{recs:?}");
    assert_eq!(run["exit_code"], 3);
    assert_eq!(run["backend"], "rootless");
    assert!(run["drops"]["event queue"].is_u64(), "{run}");
    let summary: Value = serde_json::from_str(&stderr).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(summary["exit_code"], 3);
    assert_eq!(summary["totals"]["flows"], run["totals"]["flows"]);

    let report = childflow().arg("report").arg(&log).output().expect("run report");
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(text.starts_with("childflow summary: sh -c exit 3 (rootless): exit code 3"), "{text}");
}

#[test]
fn a_flow_log_starts_with_a_header_and_ends_with_the_run_record() {
    let dir = shared_tempdir();
    log_has_header_and_run_record(childflow(), dir.path());
}

#[test]
fn a_flow_log_starts_with_a_header_and_ends_with_the_run_record_as_an_ordinary_user() {
    if skip(!is_root(), "needs root to switch to the test user") {
        return;
    }
    let dir = shared_tempdir();
    log_has_header_and_run_record(childflow_as_test_user(), dir.path());
}

#[test]
fn the_log_is_complete_after_sigterm_to_childflow() {
    let dir = shared_tempdir();
    let log = dir.path().join("flows.jsonl");
    let mut child = childflow()
        .arg("--flow-log")
        .arg(&log)
        .args(["--", "sh", "-c", "echo ready; while :; do sleep 0.05; done"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn childflow");
    let mut ready = [0u8; 6];
    child.stdout.take().expect("stdout").read_exact(&mut ready).expect("command started");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(128 + 15));
    let recs = records(&log);
    let run = recs.last().expect("records");
    assert_eq!(run["record"], "run");
    assert_eq!(run["exit_code"], 143);
    assert_eq!(run["status"], "killed by signal 15 (SIGTERM)");
}

#[test]
fn a_command_that_cannot_start_gets_its_shell_exit_code_in_the_run_record() {
    let dir = shared_tempdir();
    let log = dir.path().join("flows.jsonl");
    let out = childflow()
        .arg("--flow-log")
        .arg(&log)
        .args(["--", "/nonexistent/command"])
        .output()
        .expect("run childflow");
    assert_eq!(out.status.code(), Some(127));
    let recs = records(&log);
    let run = recs.last().expect("records");
    assert_eq!(run["exit_code"], 127, "{run}");
    assert_eq!(run["error"], "command not found: /nonexistent/command", "{run}");
}

#[test]
fn an_unwritable_flow_log_fails_before_the_command_runs() {
    let dir = shared_tempdir();
    let marker = dir.path().join("ran");
    for (path, why) in [
        ("/nonexistent/flows.jsonl", "No such file or directory"),
        ("/dev/full", "No space left on device"),
    ] {
        let out = childflow()
            .args(["--flow-log", path, "--", "touch"])
            .arg(&marker)
            .output()
            .expect("run childflow");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(&format!("flow log {path}: {why}")), "{err}");
        assert!(!marker.exists(), "the command ran without its log");
    }
}

#[test]
fn csv_flow_log_has_its_header_row_even_without_flows() {
    let dir = shared_tempdir();
    let log = dir.path().join("flows.csv");
    let out = childflow()
        .arg("--flow-log")
        .arg(&log)
        .args(["--flow-log-format", "csv", "--", "true"])
        .output()
        .expect("run childflow");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = "import csv,sys; r=csv.reader(open(sys.argv[1])); h=next(r); \
                  print(h[0], h[5], len(h), len(list(r)))";
    let got = tool("python3").arg("-c").arg(script).arg(&log).output().expect("python3");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "uid id.orig_h 35 0");
}

#[test]
fn flow_log_to_stdout_is_jsonl_after_the_commands_own_output() {
    let out = childflow()
        .args(["--flow-log", "-", "--", "echo", "hello"])
        .stdout(Stdio::piped())
        .output()
        .expect("run childflow");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    assert!(text.contains("hello\n"), "{text}");
    assert_eq!(json.len(), 2, "header and run: {text}");
    let mut jq = tool("jq")
        .args(["-r", "-s", "map(.record) | join(\",\")"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("jq");
    std::io::Write::write_all(&mut jq.stdin.take().expect("stdin"), json.join("\n").as_bytes())
        .expect("feed jq");
    let got = jq.wait_with_output().expect("jq output");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "header,run");
}
