//! The command line as a user meets it: help, version, exit codes, signals, bad input.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use childflow_tests::{childflow, childflow_as_test_user, is_root, skip};

fn run(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run childflow");
    (
        out.status.code().expect("childflow exited by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_names_the_backends() {
    let (code, out, _) = run({
        let mut c = childflow();
        c.arg("--version");
        c
    });
    assert_eq!(code, 0);
    assert!(out.starts_with("childflow "), "{out}");
    assert!(out.contains("rootless") && out.contains("rootful"), "{out}");
}

#[test]
fn help_documents_every_flag() {
    let (code, out, _) = run({
        let mut c = childflow();
        c.arg("--help");
        c
    });
    assert_eq!(code, 0);
    for flag in ["--root", "--dns", "--flow-log", "--capture", "--summary", "--tui", "--mtu"] {
        assert!(out.contains(flag), "--help does not mention {flag}");
    }
    // Every option line is followed by a description.
    let undocumented: Vec<&str> = out
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].trim_start().starts_with("--") && w[1].trim().is_empty())
        .map(|w| w[0])
        .collect();
    assert!(undocumented.is_empty(), "flags without help text: {undocumented:?}");
}

#[test]
fn bad_input_fails_with_125_and_says_what_to_fix() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mtu", "12", "--", "true"], "mtu"),
        (&["--flow-update-interval", "soon", "--", "true"], "soon"),
        (&["--no-such-flag", "--", "true"], "--no-such-flag"),
        (&[], "COMMAND"),
    ];
    for (args, needle) in cases {
        let (code, _, err) = run({
            let mut c = childflow();
            c.args(*args);
            c
        });
        assert_eq!(code, 125, "childflow {args:?}: {err}");
        assert!(err.to_lowercase().contains(&needle.to_lowercase()), "childflow {args:?}: {err}");
    }
}

/// A file without execute permission, readable by everyone.
const NOT_EXECUTABLE: &str = "/tmp/childflow-test-not-executable";

/// The command's exit code becomes childflow's, and childflow's own failures are 126/127.
fn exit_codes(mut make: impl FnMut() -> Command) {
    let cases: &[(&[&str], i32)] = &[
        (&["true"], 0),
        (&["sh", "-c", "exit 3"], 3),
        (&["sh", "-c", "kill -TERM $$"], 128 + 15),
        (&["sh", "-c", "kill -KILL $$"], 128 + 9),
        (&["/nonexistent/command"], 127),
        (&[NOT_EXECUTABLE], 126),
    ];
    let _ = std::fs::write(NOT_EXECUTABLE, "not a program\n");
    for (cmd, want) in cases {
        let mut c = make();
        c.arg("--").args(*cmd);
        let (code, _, err) = run(c);
        assert_eq!(code, *want, "childflow -- {cmd:?}: {err}");
        if *want >= 126 && *want < 128 {
            assert!(err.contains("childflow:"), "no explanation for {cmd:?}: {err}");
        }
    }
}

#[test]
fn exit_codes_pass_through() {
    exit_codes(childflow);
}

#[test]
fn exit_codes_pass_through_as_an_ordinary_user() {
    if skip(!is_root(), "needs root to switch to the test user") {
        return;
    }
    exit_codes(childflow_as_test_user);
}

#[test]
fn the_command_runs_as_the_invoking_user_in_its_own_namespaces() {
    if skip(!is_root(), "needs root to switch to the test user") {
        return;
    }
    let mut c = childflow_as_test_user();
    c.args(["--", "sh", "-c", "id -u; readlink /proc/self/ns/net; echo $$"]);
    let (code, out, err) = run(c);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let user = nix::unistd::User::from_name("childflow-test").unwrap().unwrap();
    assert_eq!(lines[0], user.uid.to_string(), "uid inside");
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(lines[1], host_ns.to_str().unwrap(), "the command shares the host's netns");
}

#[test]
fn sigterm_to_childflow_reaches_the_command() {
    for mut c in [childflow(), childflow_as_test_user()] {
        if c.get_program() != childflow().get_program() && !is_root() {
            continue;
        }
        // The command traps TERM and exits 42: childflow must pass the signal, then the code.
        c.args(["--", "sh", "-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done"]);
        c.stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut out, &mut buf).unwrap();
        let started = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(42));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
