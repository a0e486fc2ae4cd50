//! The live views as a user meets them: the real binary with `--tui` in a real terminal
//! (tmux), read back with `capture-pane`; and `--events` read by a script.
//!
//! One test runs curl on the hermetic test network through the rootless backend and finds
//! its flow, DNS name and byte count on the screen. The others, which exercise the keys,
//! views, exit codes and attach, also use childflow's synthetic demo events
//! (`CHILDFLOW_DEMO_EVENTS=1`: a DNS lookup of example.test and a 1 MiB download from it)
//! so they do not depend on the network; everything else in them is the real thing.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use childflow_tests::{TestNet, bin::binary, childflow, is_root, skip, tool};

/// A tmux server of our own (its own socket, in a temporary directory), killed on drop.
struct Tmux {
    socket: String,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Starts `command` (a shell command line) in an 80×24 session; the shell prints
    /// `EXIT=<code>` when childflow ends and keeps the pane open.
    fn start(command: &str) -> Self {
        let dir =
            tempfile::Builder::new().prefix("cftui").tempdir().expect("a temporary directory");
        let socket = dir.path().join("tmux.sock").display().to_string();
        let script = format!("{command}; echo EXIT=$?; sleep 600");
        let status = tool("tmux")
            .args(["-S", &socket, "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24"])
            .args(["sh", "-c", &script])
            .env("TERM", "xterm-256color")
            .status()
            .expect("run tmux");
        assert!(status.success(), "tmux new-session failed");
        Self { socket, _dir: dir }
    }

    fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["-S", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["-S", &self.socket, "send-keys"])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Waits until the screen satisfies `pred`, or panics with the last screen.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-S", &self.socket, "kill-server"]).status();
    }
}

fn demo_command(args: &str) -> String {
    format!("env CHILDFLOW_DEMO_EVENTS=1 {} {args}", binary().display())
}

#[test]
fn the_dashboard_shows_flows_the_command_pane_and_stays_until_q() {
    let tmux = Tmux::start(&demo_command(
        "--tui -- sh -c 'echo hello-from-the-command; printf \"\\033[32mgreen\\033[0m\\n\"; sleep 1'",
    ));
    let screen = tmux.wait_for("the demo flow and the command's output", |s| {
        s.contains("example.test") && s.contains("hello-from-the-command") && s.contains("green")
    });
    assert!(screen.contains("PROTO") && screen.contains("REMOTE"), "{screen}");
    assert!(screen.contains("sort bytes rate time name"), "footer: {screen}");
    let screen = tmux.wait_for("the command's end", |s| s.contains("exit code 0"));
    assert!(!screen.contains("EXIT="), "the dashboard must stay until q:\n{screen}");
    assert!(screen.contains("flows 0/2"), "both demo flows ended: {screen}");

    // The selection follows its flow while rows re-sort, so go to the top row (the biggest
    // flow, sorted by bytes): its detail has the exact byte counts.
    tmux.keys(&["Home", "Enter"]);
    let screen = tmux.wait_for("the detail view", |s| s.contains("flow #"));
    assert!(screen.contains("198.18.0.2:80"), "{screen}");
    assert!(screen.contains("1,048,576 payload"), "the download's size: {screen}");
    assert!(screen.contains("curl (pid 2)"), "{screen}");

    tmux.keys(&["Escape", "2"]);
    tmux.wait_for("the process view", |s| s.contains("PROCESS (PID)") && s.contains("curl (2)"));
    tmux.keys(&["3"]);
    tmux.wait_for("the destination view", |s| s.contains("DESTINATION"));
    tmux.keys(&["?"]);
    tmux.wait_for("the help overlay", |s| s.contains("any key closes"));
    tmux.keys(&["x", "q"]);
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(
        screen.contains("hello-from-the-command"),
        "output replayed after the dashboard: {screen}"
    );
}

/// `1234567` as the detail view prints it: `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn a_real_download_shows_with_its_dns_name_and_byte_count_rootless() {
    real_download(false);
}

#[test]
fn a_real_download_shows_with_its_dns_name_and_byte_count_rootful() {
    real_download(true);
}

fn real_download(rootful: bool) {
    if skip(!is_root(), "building the test network needs root") {
        return;
    }
    let net = TestNet::new();
    let backend = if rootful {
        format!("--root --dns {}", net.server_v4())
    } else {
        // The engine's DNS relay forwards to the test server instead of the host's resolvers.
        String::new()
    };
    // curl reports what it received: the response headers and body are the TCP payload.
    let tmux = Tmux::start(&format!(
        "env -u SUDO_UID -u SUDO_GID CHILDFLOW_UPSTREAM_DNS={} {} --tui {backend} -- sh -c \
         \"curl -4 -sS --fail --max-time 20 -o /dev/null -w 'got %{{size_header}}+%{{size_download}} sent %{{size_request}}\\n' http://example.test/bytes/123456\"",
        net.server_v4(),
        binary().display()
    ));
    let screen = tmux.wait_for("curl's end", |s| s.contains("exit code") && s.contains("got "));
    assert!(screen.contains("exit code 0"), "{screen}");
    let numbers = |tag: &str| -> Vec<u64> {
        let rest = screen.split(tag).nth(1).expect("curl's report");
        let word = rest.split_whitespace().next().unwrap();
        word.split('+').map(|n| n.parse().expect("a number")).collect()
    };
    let received: u64 = numbers("got ").iter().sum();
    let sent: u64 = numbers(" sent ")[0];
    assert!(received > 123_456, "headers and body: {received}");
    let row = screen
        .lines()
        .find(|l| l.starts_with("tcp") && l.contains(":80"))
        .unwrap_or_else(|| panic!("no HTTP flow row:\n{screen}"));
    assert!(row.contains("example.test"), "the DNS name: {row}");
    // (No process column check: the rootless engine cannot see which process owns a socket.)
    assert!(row.contains(&format!("{}:80", net.server_v4())), "{row}");
    // Filter down to the HTTP flow, then open it.
    tmux.keys(&["/"]);
    tmux.keys(&["-l", ":80"]);
    tmux.keys(&["Enter", "Home", "Enter"]);
    let detail = tmux.wait_for("the detail view", |s| s.contains("flow #"));
    assert!(detail.contains("example.test"), "{detail}");
    assert!(
        detail.contains(&format!("({} payload)", grouped(received))),
        "bytes in equal to what curl received ({received}):\n{detail}"
    );
    assert!(
        detail.contains(&format!("({} payload)", grouped(sent))),
        "bytes out equal to curl's request ({sent}):\n{detail}"
    );
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
}

#[test]
fn tui_exit_leaves_with_the_commands_exit_code() {
    let tmux = Tmux::start(&format!("{} --tui --tui-exit -- sh -c 'exit 3'", binary().display()));
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=3"), "{screen}");
}

#[test]
fn keys_reach_an_interactive_command_when_its_pane_has_focus() {
    let tmux = Tmux::start(&format!(
        "{} --tui --tui-exit -- sh -c 'printf \"name? \"; read name; echo \"hello $name\"; sleep 1; exit 4'",
        binary().display()
    ));
    tmux.wait_for("the prompt", |s| s.contains("name?"));
    tmux.keys(&["Tab"]);
    tmux.wait_for("the focused pane", |s| s.contains("Ctrl-] leaves"));
    tmux.keys(&["-l", "world"]);
    tmux.keys(&["Enter"]);
    tmux.wait_for("the command's answer", |s| s.contains("hello world"));
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=4"), "{screen}");
}

#[test]
fn quitting_while_the_command_runs_asks_first_then_hangs_it_up() {
    let tmux = Tmux::start(&format!("{} --tui -- sleep 600", binary().display()));
    tmux.wait_for("the dashboard", |s| s.contains("running"));
    tmux.keys(&["q"]);
    tmux.wait_for("the confirmation", |s| s.contains("q again ends it"));
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=129"), "SIGHUP is 128+1: {screen}");
}

#[test]
fn closing_the_terminal_hangs_the_command_up_and_childflow_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let tmux = Tmux::start(&format!(
        "sh -c 'echo $$ > {}; exec {} --tui -- sleep 600'",
        pid_file.display(),
        binary().display()
    ));
    tmux.wait_for("the dashboard", |s| s.contains("running"));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    drop(tmux); // kill-server: the terminal goes away, childflow gets SIGHUP from the kernel
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("childflow (pid {pid}) kept running after its terminal closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_signal_to_childflow_ends_the_command_and_restores_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let tmux = Tmux::start(&format!(
        "sh -c 'echo $$ > {}; exec {} --tui -- sleep 600'",
        pid_file.display(),
        binary().display()
    ));
    tmux.wait_for("the dashboard", |s| s.contains("running"));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .expect("signal childflow");
    let screen = tmux.wait_for("childflow's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=143"), "the command's SIGTERM, 128+15: {screen}");
    assert!(!screen.contains("PROTO"), "the dashboard is gone: {screen}");
}

#[test]
fn attach_and_ps_show_a_run_started_elsewhere() {
    let runtime = tempfile::tempdir().unwrap();
    let mut run = childflow()
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("CHILDFLOW_DEMO_EVENTS", "1")
        .args(["--", "sh", "-c", "sleep 3; exit 6"])
        .spawn()
        .expect("start the run");
    let deadline = Instant::now() + Duration::from_secs(10);
    let listing = loop {
        let out = childflow().env("XDG_RUNTIME_DIR", runtime.path()).arg("ps").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("sleep 3") {
            break text;
        }
        assert!(Instant::now() < deadline, "ps never listed the run: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(listing.contains(&run.id().to_string()), "the run id is childflow's pid: {listing}");
    assert!(listing.contains("rootless"), "{listing}");

    let tmux = Tmux::start(&format!(
        "env XDG_RUNTIME_DIR={} {} attach {}",
        runtime.path().display(),
        binary().display(),
        run.id()
    ));
    tmux.wait_for("the attached dashboard", |s| s.contains("example.test") && s.contains("1.0M"));
    let screen = tmux.wait_for("the run's end", |s| s.contains("ended: exit code 6"));
    assert!(!screen.contains("command ·"), "no command pane when attached: {screen}");
    assert_eq!(run.wait().unwrap().code(), Some(6), "the run keeps its own exit code");
    tmux.keys(&["q"]);
    let screen = tmux.wait_for("attach's exit", |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    let left: Vec<_> = std::fs::read_dir(runtime.path().join("childflow")).unwrap().collect();
    assert!(left.is_empty(), "the run removed its socket: {left:?}");
}

#[test]
fn events_stream_json_lines_a_script_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let out = childflow()
        .env("CHILDFLOW_DEMO_EVENTS", "1")
        .arg("--events")
        .arg(&path)
        .args(["--", "true"])
        .output()
        .expect("run childflow");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = read_lines(&path);
    assert_eq!(lines.first().unwrap()["type"], "run");
    assert_eq!(lines.first().unwrap()["run"]["command"][0], "true");
    let end = lines.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["run"]["ended"]["code"], 0);
    let download = lines
        .iter()
        .rev()
        .find(|l| {
            l["type"] == "flow"
                && l["flow"]["name"] == "example.test"
                && l["flow"]["proto"] == "tcp"
        })
        .expect("a flow line for the download");
    assert_eq!(download["flow"]["payload_in"], 1 << 20);
    assert_eq!(download["flow"]["close_reason"], "fin");
    assert!(lines.iter().any(|l| l["type"] == "totals" && l["flows_total"] == 2));
}

#[test]
fn events_go_to_stdout_with_a_dash() {
    let out = childflow()
        .args(["--events", "-", "--", "sh", "-c", "exit 5"])
        .output()
        .expect("run childflow");
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8(out.stdout).unwrap();
    let types: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["type"].to_string()
        })
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("\"run\""));
    assert_eq!(types.last().map(String::as_str), Some("\"end\""));
}

#[test]
fn tui_without_a_terminal_fails_before_the_command_runs() {
    let out = childflow().args(["--tui", "--", "true"]).output().expect("run childflow");
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tui needs a terminal"), "{err}");
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}
