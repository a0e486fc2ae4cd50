//! `cargo xtask bench rootless`: the rootless engine against host networking, pasta and
//! slirp4netns, side by side on one destination, in one invocation.
//!
//! The destination is an iperf3 server in a network namespace of its own (`cfbench`), joined
//! to the host by a veth pair (`cfbh0`/`cfbu0`, 198.18.251.0/24 from the benchmarking range
//! of RFC 2544). Every contender runs the same iperf3 client against it:
//! - `host`: iperf3 straight from the host namespace (the ceiling: the kernel's own path);
//! - `childflow`: `childflow -- iperf3 ...` (the rootless engine);
//! - `pasta`: `pasta --config-net -- iperf3 ...` (passt's tap path);
//! - `slirp4netns`: iperf3 in `unshare -rn`, with slirp4netns attached to its namespace.
//!
//! Measured per contender (each can be picked with `--tests`):
//! - `up`, `down`: one TCP flow command→destination and destination→command (iperf3 `-R`);
//! - `rr`: median request/response round trip (1 byte each way, one connection); the host
//!   row is the plain veth the others are compared with;
//! - `connect`: median TCP connect time;
//! - (`rr` and `connect` run in `--rounds` rounds interleaved across the contenders, each
//!   round's numbers and the load average printed; the table has the median of the rounds)
//! - `start`: median wall time of `CONTENDER -- true`;
//! - `rss`: the resident memory of the contender's own process (childflow, pasta,
//!   slirp4netns) while the command holds 1,000 open connections;
//! - `many`: how many of 10,000 connects in flight at once succeed;
//! - `udp`: 64-byte UDP datagrams per second that reach the destination (`iperf3 -u -b 0
//!   -l 64`, the small-packet rate of each relay; the sender is not paced, so every
//!   contender is offered more than it can carry).
//!
//! The latency and connection rows use `xtask bench-probe` ([`crate::probe`]) as server
//! (in the destination namespace) and client (under each contender).
//! Needs root (the namespace and veth); everything is removed again on exit, also on error.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A destination network for a benchmark: a namespace joined to the host by a veth pair.
pub(crate) struct BenchNet {
    pub netns: &'static str,
    pub host_if: &'static str,
    pub peer_if: &'static str,
    pub host_addr: &'static str,
    /// The iperf3 (and probe) server's address, in `netns`.
    pub server: &'static str,
}

const NET: BenchNet = BenchNet {
    netns: "cfbench",
    host_if: "cfbh0",
    peer_if: "cfbu0",
    host_addr: "198.18.251.1",
    server: "198.18.251.2",
};
const SERVER: &str = NET.server;
const ALL_TESTS: [&str; 8] = ["up", "down", "rr", "connect", "start", "rss", "many", "udp"];

/// Options of the rootless benchmark.
struct Options {
    seconds: u32,
    mtu: u32,
    bin: PathBuf,
    only: Option<String>,
    startup_runs: usize,
    /// Which measurements to run (`up,down,rr,connect,start,rss,many,udp`).
    tests: Vec<String>,
    /// Rounds of the `rr` and `connect` rows, interleaved across the contenders.
    rounds: usize,
    /// Connections held for the `rss` row, and in flight for the `many` row.
    flows: usize,
    conns: usize,
    /// The bench's own probe binary (a world-readable copy of xtask).
    probe: PathBuf,
    /// uid and gid the rootless contenders run as (pasta refuses to run as root).
    user: Option<(u32, u32)>,
}

/// The unprivileged user of `cargo xtask setup`, which the rootless contenders run as.
pub(crate) const BENCH_USER: &str = "childflow-test";

pub(crate) fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seconds: 5,
        mtu: 65520,
        bin: crate::root().join("target/release/childflow"),
        only: None,
        startup_runs: 21,
        tests: ALL_TESTS.iter().map(|t| t.to_string()).collect(),
        rounds: 7,
        flows: 1000,
        conns: 10_000,
        probe: PathBuf::new(),
        user: lookup_user(BENCH_USER),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--time" => o.seconds = value()?.parse().context("--time SECONDS")?,
            "--mtu" => o.mtu = value()?.parse().context("--mtu BYTES")?,
            "--bin" => o.bin = PathBuf::from(value()?),
            "--only" => o.only = Some(value()?.clone()),
            "--startup-runs" => o.startup_runs = value()?.parse().context("--startup-runs N")?,
            "--tests" => o.tests = value()?.split(',').map(String::from).collect(),
            "--flows" => o.flows = value()?.parse().context("--flows N")?,
            "--rounds" => o.rounds = value()?.parse().context("--rounds N")?,
            "--conns" => o.conns = value()?.parse().context("--conns N")?,
            "--user" => {
                let name = value()?;
                o.user = Some(lookup_user(name).with_context(|| format!("no user {name}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask bench rootless [--time SECONDS] [--mtu BYTES] \
                     [--bin PATH] [--only host|childflow|pasta|slirp4netns] [--startup-runs N] \
                     [--user NAME (default childflow-test)] \
                     [--tests up,down,rr,connect,start,rss,many,udp] [--flows N] [--conns N] \
                     [--rounds N (rr and connect, default 7)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(o)
}

pub(crate) fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The destination namespace with its iperf3 server (and the probe server, if given);
/// removed on drop.
pub(crate) struct Destination {
    net: &'static BenchNet,
    server: Option<Child>,
    probe: Option<Child>,
}

impl Destination {
    pub(crate) fn new(net: &'static BenchNet, probe: Option<&std::path::Path>) -> Result<Self> {
        let BenchNet { netns, host_if, peer_if, host_addr, server } = *net;
        let _ = Command::new("ip").args(["netns", "del", netns]).output();
        let _ = Command::new("ip").args(["link", "del", host_if]).output();
        let mut d = Destination { net, server: None, probe: None };
        sh(&["ip", "netns", "add", netns])?;
        sh(&["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if])?;
        sh(&["ip", "link", "set", peer_if, "netns", netns])?;
        sh(&["ip", "addr", "add", &format!("{host_addr}/24"), "dev", host_if])?;
        sh(&["ip", "link", "set", host_if, "up"])?;
        let ns = |rest: &[&str]| {
            let mut v = vec!["ip", "-n", netns];
            v.extend_from_slice(rest);
            sh(&v)
        };
        ns(&["link", "set", "lo", "up"])?;
        ns(&["addr", "add", &format!("{server}/24"), "dev", peer_if])?;
        ns(&["link", "set", peer_if, "up"])?;
        let iperf = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s", "-B", server])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start the iperf3 server")?;
        d.server = Some(iperf);
        if let Some(probe) = probe {
            let probe = Command::new("ip")
                .args(["netns", "exec", netns])
                .arg(probe)
                .args(["bench-probe", "server", server])
                .stdout(Stdio::null())
                .spawn()
                .context("failed to start the probe server")?;
            d.probe = Some(probe);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(d)
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        for mut s in [self.server.take(), self.probe.take()].into_iter().flatten() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", self.net.netns]).output();
        let _ = Command::new("ip").args(["link", "del", self.net.host_if]).output();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    Host,
    Childflow,
    Pasta,
    Slirp,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Host => "host",
            Contender::Childflow => "childflow",
            Contender::Pasta => "pasta",
            Contender::Slirp => "slirp4netns",
        }
    }
}

/// A command for a rootless contender: as the bench user, killed if it overruns.
fn contender_cmd(o: &Options, program: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &(o.seconds + 60).to_string(), program]).current_dir("/");
    if let Some((uid, gid)) = o.user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid).env("HOME", "/");
    }
    cmd
}

/// A contender running a command: the command's process, and slirp4netns beside it.
struct Running {
    who: Contender,
    main: Child,
    helper: Option<Child>,
}

impl Running {
    /// Waits for the command; returns its stdout, or fails with its stderr.
    fn finish(mut self, inner: &[String]) -> Result<String> {
        let out = self.main.wait_with_output();
        if let Some(mut h) = self.helper.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let out = out?;
        if !out.status.success() {
            bail!(
                "{} {:?} failed ({}): {}",
                self.who.name(),
                inner,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Starts `inner` (argv) under `who`, with stdin, stdout and stderr piped.
fn start(who: Contender, o: &Options, inner: &[String]) -> Result<Running> {
    let piped = |mut cmd: Command| {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let main = match who {
        Contender::Host => {
            let mut c = Command::new(&inner[0]);
            c.args(&inner[1..]);
            piped(c).spawn()?
        }
        Contender::Childflow => {
            let mut c = contender_cmd(o, &o.bin.to_string_lossy());
            c.args(["--mtu", &o.mtu.to_string(), "--"]).args(inner);
            piped(c).spawn().with_context(|| format!("failed to run {}", o.bin.display()))?
        }
        Contender::Pasta => {
            let mut c = contender_cmd(o, "pasta");
            c.args(["--config-net", "-q", "--mtu", &o.mtu.to_string(), "--"]).args(inner);
            piped(c).spawn().context("failed to run pasta (Debian package passt)")?
        }
        Contender::Slirp => return start_slirp(o, inner),
    };
    Ok(Running { who, main, helper: None })
}

/// Runs `inner` (argv) under `who`; returns its stdout.
fn run_under(who: Contender, o: &Options, inner: &[String]) -> Result<String> {
    let mut r = start(who, o, inner)?;
    drop(r.main.stdin.take());
    r.finish(inner)
}

/// slirp4netns needs a namespace to attach to: the command waits in `unshare -rn` until
/// slirp4netns has configured tap0, then runs.
fn start_slirp(o: &Options, inner: &[String]) -> Result<Running> {
    let quoted: Vec<String> = inner.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "while ! ip -4 addr show tap0 2>/dev/null | grep -q inet; do sleep 0.01; done; exec {}",
        quoted.join(" ")
    );
    let user = |cmd: &mut Command| {
        if let Some((uid, gid)) = o.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid).env("HOME", "/").current_dir("/");
        }
    };
    let mut unshare = Command::new("unshare");
    user(&mut unshare);
    let child = unshare
        .args(["--user", "--map-root-user", "--net", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to run unshare")?;
    // slirp4netns must join the new namespace, not the host's: wait for unshare to make it.
    let ours = std::fs::read_link("/proc/self/ns/net")?;
    let theirs = format!("/proc/{}/ns/net", child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(&theirs).is_ok_and(|l| l == ours) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut slirp = Command::new("slirp4netns");
    user(&mut slirp);
    let slirp = slirp
        .args(["--configure", "--mtu", &o.mtu.min(65520).to_string()])
        .arg(child.id().to_string())
        .arg("tap0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to run slirp4netns (Debian package slirp4netns)")?;
    Ok(Running { who: Contender::Slirp, main: child, helper: Some(slirp) })
}

/// Gbit/s of one iperf3 TCP flow (`reverse`: destination → command).
fn throughput(who: Contender, o: &Options, reverse: bool) -> Result<f64> {
    let mut argv: Vec<String> =
        ["iperf3", "-c", SERVER, "-J", "-t", &o.seconds.to_string()].map(String::from).to_vec();
    if reverse {
        argv.push("-R".into());
    }
    let json = run_under(who, o, &argv)?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("iperf3 under {} printed no JSON: {json}", who.name()))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3 output under {}", who.name()))?;
    Ok(bps / 1e9)
}

/// Length of the datagrams of the `udp` row (UDP payload bytes).
const SMALL_UDP_LEN: u32 = 64;

/// Datagrams per second that reach the destination when the command sends 64-byte UDP
/// datagrams as fast as it can (iperf3's receiver count over its run).
fn small_udp(who: Contender, o: &Options) -> Result<f64> {
    let argv: Vec<String> = [
        "iperf3",
        "-c",
        SERVER,
        "-J",
        "-t",
        &o.seconds.to_string(),
        "-u",
        "-b",
        "0",
        "-l",
        &SMALL_UDP_LEN.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let json = run_under(who, o, &argv)?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("iperf3 under {} printed no JSON: {json}", who.name()))?;
    let received = &v["end"]["sum_received"];
    let (Some(bytes), Some(seconds)) = (received["bytes"].as_f64(), received["seconds"].as_f64())
    else {
        bail!("no end.sum_received in iperf3 output under {}", who.name());
    };
    if seconds <= 0.0 {
        bail!("iperf3 under {} ran for no time", who.name());
    }
    Ok(bytes / f64::from(SMALL_UDP_LEN) / seconds)
}

/// Median wall time of `who -- true`.
fn startup(who: Contender, o: &Options) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..o.startup_runs {
        let started = Instant::now();
        run_under(who, o, &["true".to_string()])?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The probe's argv for `kind` with `n`, for contender `who` (each has a hold port of its
/// own; see [`crate::probe::HOLD_PORTS`]).
fn probe_argv(who: Contender, o: &Options, kind: &str, n: usize) -> Vec<String> {
    let port = crate::probe::HOLD_PORT + who as u16;
    vec![
        o.probe.to_string_lossy().into_owned(),
        "bench-probe".into(),
        kind.into(),
        SERVER.into(),
        n.to_string(),
        port.to_string(),
    ]
}

/// A number the probe printed (a median in µs, or `ok K`).
fn probe_number(who: Contender, o: &Options, kind: &str, n: usize) -> Result<f64> {
    let argv = probe_argv(who, o, kind, n);
    let out = run_under(who, o, &argv)?;
    let word = out.split_whitespace().last().unwrap_or("");
    word.parse().with_context(|| format!("probe {kind} under {} printed {out:?}", who.name()))
}

/// Every descendant of `pid`, from /proc.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return all };
    let entries: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // The field after the `(comm)` that may hold spaces: state, then ppid.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &entries {
            if pp == parent {
                all.push(p);
                frontier.push(p);
            }
        }
    }
    all
}

/// Resident set size of `pid` in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub(crate) fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

/// MiB resident in the contender's own process while the command holds `o.flows`
/// connections.
fn rss_with_flows(who: Contender, o: &Options) -> Result<f64> {
    use std::io::{BufRead, BufReader};
    let argv = probe_argv(who, o, "hold", o.flows);
    let mut r = start(who, o, &argv)?;
    let mut stdout = BufReader::new(r.main.stdout.take().context("no stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let rss = if line.trim() == "ready" {
        // Let the engine settle (flow updates, buffers) before reading.
        std::thread::sleep(Duration::from_millis(300));
        let own = match who {
            Contender::Childflow => "childflow",
            // Debian's pasta execs `passt.avx2` (or `passt`) under the name pasta.
            Contender::Pasta => "passt",
            Contender::Slirp => "slirp4netns",
            Contender::Host => "",
        };
        let mut pids = children_of(r.main.id());
        if let Some(h) = &r.helper {
            pids.push(h.id());
        }
        pids.into_iter().filter(|&p| comm(p).starts_with(own)).filter_map(rss_mib).reduce(f64::max)
    } else {
        None
    };
    drop(r.main.stdin.take());
    let out = r.finish(&argv);
    match rss {
        Some(v) => Ok(v),
        None => {
            bail!("no RSS measured under {} (probe said {line:?}; {:?})", who.name(), out.err())
        }
    }
}

/// `cargo xtask bench rootless [OPTIONS]`.
pub fn rootless(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let (copy, bin) = prepare(&o.bin)?;
    let probe = copy.join("cfprobe");
    std::fs::copy(std::env::current_exe()?, &probe).context("failed to copy the probe")?;
    let o = Options { bin, probe, ..o };
    let result = bench_all(&o);
    let _ = std::fs::remove_dir_all(&copy);
    result
}

type Measured<T> = Option<Result<T>>;

struct Row {
    who: Contender,
    up: Measured<f64>,
    down: Measured<f64>,
    rr: Measured<f64>,
    connect: Measured<f64>,
    start: Measured<Duration>,
    rss: Measured<f64>,
    many: Measured<f64>,
    udp: Measured<f64>,
}

fn bench_all(o: &Options) -> Result<()> {
    let _dest = Destination::new(&NET, Some(&o.probe))?;
    let all = [Contender::Host, Contender::Childflow, Contender::Pasta, Contender::Slirp];
    let chosen: Vec<Contender> = all
        .into_iter()
        .filter(|c| o.only.as_deref().is_none_or(|n| n == c.name() || *c == Contender::Host))
        .collect();
    println!(
        "one TCP flow to {SERVER} for {} s per direction, MTU {} (host: no MTU change); \
         rss with {} connections held, many: {} connects at once",
        o.seconds, o.mtu, o.flows, o.conns
    );
    let want = |t: &str| o.tests.iter().any(|x| x == t);
    let mut latency = latency_rounds(&chosen, o, want("rr"), want("connect"));
    let mut rows = Vec::new();
    for &c in &chosen {
        eprintln!("bench: {} ...", c.name());
        let measure = |t: &str, f: &dyn Fn() -> Result<f64>| -> Measured<f64> {
            if !want(t) {
                return None;
            }
            let r = f();
            if let Err(e) = &r {
                eprintln!("{} {t}: {e:#}", c.name());
            }
            Some(r)
        };
        let host = c == Contender::Host;
        let row = Row {
            who: c,
            up: measure("up", &|| throughput(c, o, false)),
            down: measure("down", &|| throughput(c, o, true)),
            rr: want("rr").then(|| latency.next_median(c, "rr")),
            connect: want("connect").then(|| latency.next_median(c, "connect")),
            start: if want("start") && !host {
                let r = startup(c, o);
                if let Err(e) = &r {
                    eprintln!("{} start: {e:#}", c.name());
                }
                Some(r)
            } else {
                None
            },
            rss: if host { None } else { measure("rss", &|| rss_with_flows(c, o)) },
            many: measure("many", &|| probe_number(c, o, "many", o.conns)),
            udp: measure("udp", &|| small_udp(c, o)),
        };
        rows.push(row);
    }
    print_table(&rows, o);
    Ok(())
}

/// Each round's medians of the `rr` and `connect` probes, per contender.
struct Latency(Vec<(Contender, &'static str, Vec<f64>)>);

impl Latency {
    /// The median over the rounds of contender `c`'s `kind` probe.
    fn next_median(&mut self, c: Contender, kind: &str) -> Result<f64> {
        let (_, _, v) = self
            .0
            .iter_mut()
            .find(|(w, k, _)| *w == c && *k == kind)
            .with_context(|| format!("no {kind} rounds for {}", c.name()))?;
        if v.is_empty() {
            bail!("every {kind} round of {} failed", c.name());
        }
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    }
}

/// Runs the `rr` and `connect` probes in rounds, each round every contender in turn, and
/// prints each round's numbers with the load average. A single run per contender is not
/// enough: the round trip depends on where the scheduler puts the threads and whether the
/// other vCPU was idle (halted) when woken, which drifts over seconds, so the host row
/// alone swung 15..68 µs between sessions. Interleaving spreads that drift over every
/// contender alike; the table shows the median of the rounds.
fn latency_rounds(chosen: &[Contender], o: &Options, rr: bool, connect: bool) -> Latency {
    let kinds: Vec<(&'static str, usize)> = [("rr", rr, 2000), ("connect", connect, 300)]
        .into_iter()
        .filter(|k| k.1)
        .map(|(k, _, n)| (k, n))
        .collect();
    let mut all = Vec::new();
    for &c in chosen {
        for &(k, _) in &kinds {
            all.push((c, k, Vec::new()));
        }
    }
    if kinds.is_empty() {
        return Latency(all);
    }
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("bench: rr/connect, {} interleaved rounds; load {}", o.rounds, load().trim());
    for round in 0..o.rounds {
        let mut line = format!("round {round}:");
        for (c, k, v) in all.iter_mut() {
            let n = kinds.iter().find(|(kind, _)| kind == k).map_or(0, |(_, n)| *n);
            match probe_number(*c, o, k, n) {
                Ok(x) => {
                    line += &format!(" {} {k} {x:.0}", c.name());
                    v.push(x);
                }
                Err(e) => eprintln!("{} {k}: {e:#}", c.name()),
            }
        }
        eprintln!("{line}");
    }
    eprintln!("bench: rr/connect done; load {}", load().trim());
    Latency(all)
}

fn print_table(rows: &[Row], o: &Options) {
    let val = |m: &Measured<f64>| m.as_ref().and_then(|r| r.as_ref().ok()).copied();
    let cell = |m: &Measured<f64>, fmt: &dyn Fn(f64) -> String| match m {
        None => "-".to_string(),
        Some(Err(_)) => "failed".to_string(),
        Some(Ok(v)) => fmt(*v),
    };
    let host = &rows[0];
    let ratio = |m: &Measured<f64>, base: &Measured<f64>| match (val(m), val(base)) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    let delta = |m: &Measured<f64>, base: &Measured<f64>| match (val(m), val(base)) {
        (Some(v), Some(b)) => format!("{:+.0}", v - b),
        _ => "-".into(),
    };
    println!(
        "\n{:<12} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>9} {:>9} {:>11} {:>10} {:>6}",
        "",
        "up Gb/s",
        "ratio",
        "down Gb/s",
        "ratio",
        "rr µs",
        "Δveth",
        "conn µs",
        "-- true",
        "RSS MiB",
        format!("{}k conns", o.conns / 1000),
        format!("udp{SMALL_UDP_LEN} kpps"),
        "ratio",
    );
    for r in rows {
        let start = match &r.start {
            None => "-".to_string(),
            Some(Err(_)) => "failed".into(),
            Some(Ok(d)) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
        };
        println!(
            "{:<12} {:>9} {:>6} {:>9} {:>6} {:>8} {:>6} {:>8} {:>9} {:>9} {:>11} {:>10} {:>6}",
            r.who.name(),
            cell(&r.up, &|v| format!("{v:.2}")),
            ratio(&r.up, &host.up),
            cell(&r.down, &|v| format!("{v:.2}")),
            ratio(&r.down, &host.down),
            cell(&r.rr, &|v| format!("{v:.0}")),
            delta(&r.rr, &host.rr),
            cell(&r.connect, &|v| format!("{v:.0}")),
            start,
            cell(&r.rss, &|v| format!("{v:.1}")),
            cell(&r.many, &|v| format!("{v:.0}/{}", o.conns)),
            cell(&r.udp, &|v| format!("{:.0}", v / 1e3)),
            ratio(&r.udp, &host.udp),
        );
    }
}

/// Checks that a bench can run (root, a built binary) and copies the binary into a
/// world-readable directory, since the bench user may not reach the build tree. Returns the
/// directory and the copy.
pub(crate) fn prepare(built: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces: run it as root");
    }
    if !built.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p childflow`",
            built.display()
        );
    }
    let dir = tempfile_dir()?;
    let bin = dir.join("childflow");
    std::fs::copy(built, &bin).context("failed to copy childflow for the bench user")?;
    Ok((dir, bin))
}

fn tempfile_dir() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("childflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
