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
//! Measured per contender: one TCP flow command→destination (`up`) and destination→command
//! (`down`, iperf3 `-R`), and the median wall time of `CONTENDER -- true` (start-up cost).
//! Needs root (the namespace and veth); everything is removed again on exit, also on error.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const NETNS: &str = "cfbench";
const HOST_IF: &str = "cfbh0";
const PEER_IF: &str = "cfbu0";
const HOST_ADDR: &str = "198.18.251.1";
const SERVER: &str = "198.18.251.2";

/// Options of the rootless benchmark.
struct Options {
    seconds: u32,
    mtu: u32,
    bin: PathBuf,
    only: Option<String>,
    startup_runs: usize,
    /// uid and gid the rootless contenders run as (pasta refuses to run as root).
    user: Option<(u32, u32)>,
}

/// The unprivileged user of `cargo xtask setup`, which the rootless contenders run as.
const BENCH_USER: &str = "childflow-test";

fn lookup_user(name: &str) -> Option<(u32, u32)> {
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
            "--user" => {
                let name = value()?;
                o.user = Some(lookup_user(name).with_context(|| format!("no user {name}"))?);
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask bench rootless [--time SECONDS] [--mtu BYTES] \
                     [--bin PATH] [--only host|childflow|pasta|slirp4netns] [--startup-runs N] \
                     [--user NAME (default childflow-test)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (see --help)"),
        }
    }
    Ok(o)
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The destination namespace with its iperf3 server; removed on drop.
struct Destination {
    server: Option<Child>,
}

impl Destination {
    fn new() -> Result<Destination> {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
        let _ = Command::new("ip").args(["link", "del", HOST_IF]).output();
        let mut d = Destination { server: None };
        sh(&["ip", "netns", "add", NETNS])?;
        sh(&["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF])?;
        sh(&["ip", "link", "set", PEER_IF, "netns", NETNS])?;
        sh(&["ip", "addr", "add", &format!("{HOST_ADDR}/24"), "dev", HOST_IF])?;
        sh(&["ip", "link", "set", HOST_IF, "up"])?;
        let ns = |rest: &[&str]| {
            let mut v = vec!["ip", "-n", NETNS];
            v.extend_from_slice(rest);
            sh(&v)
        };
        ns(&["link", "set", "lo", "up"])?;
        ns(&["addr", "add", &format!("{SERVER}/24"), "dev", PEER_IF])?;
        ns(&["link", "set", PEER_IF, "up"])?;
        let server = Command::new("ip")
            .args(["netns", "exec", NETNS, "iperf3", "-s", "-B", SERVER])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start the iperf3 server")?;
        d.server = Some(server);
        std::thread::sleep(Duration::from_millis(300));
        Ok(d)
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", NETNS]).output();
        let _ = Command::new("ip").args(["link", "del", HOST_IF]).output();
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

/// Runs `inner` (argv) under `who`; returns its stdout.
fn run_under(who: Contender, o: &Options, inner: &[String]) -> Result<String> {
    let out = match who {
        Contender::Host => Command::new(&inner[0]).args(&inner[1..]).output()?,
        Contender::Childflow => contender_cmd(o, &o.bin.to_string_lossy())
            .args(["--mtu", &o.mtu.to_string(), "--"])
            .args(inner)
            .output()
            .with_context(|| format!("failed to run {}", o.bin.display()))?,
        Contender::Pasta => contender_cmd(o, "pasta")
            .args(["--config-net", "-q", "--mtu", &o.mtu.to_string(), "--"])
            .args(inner)
            .output()
            .context("failed to run pasta (Debian package passt)")?,
        Contender::Slirp => return run_under_slirp(o, inner),
    };
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}",
            who.name(),
            inner,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// slirp4netns needs a namespace to attach to: the command waits in `unshare -rn` until
/// slirp4netns has configured tap0, then runs.
fn run_under_slirp(o: &Options, inner: &[String]) -> Result<String> {
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
    let mut slirp = slirp
        .args(["--configure", "--mtu", &o.mtu.min(65520).to_string()])
        .arg(child.id().to_string())
        .arg("tap0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to run slirp4netns (Debian package slirp4netns)")?;
    let out = child.wait_with_output();
    let _ = slirp.kill();
    let _ = slirp.wait();
    let out = out?;
    if !out.status.success() {
        bail!("slirp4netns {:?} failed: {}", inner, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// `cargo xtask bench rootless [OPTIONS]`.
pub fn rootless(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds a network namespace: run it as root");
    }
    if !o.bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p childflow`",
            o.bin.display()
        );
    }
    // The bench user may not be able to reach the build tree: run a world-readable copy.
    let copy = tempfile_dir()?;
    let bin = copy.join("childflow");
    std::fs::copy(&o.bin, &bin).context("failed to copy childflow for the bench user")?;
    let o = Options { bin, ..o };
    let _dest = Destination::new()?;
    let all = [Contender::Host, Contender::Childflow, Contender::Pasta, Contender::Slirp];
    let chosen: Vec<Contender> = all
        .into_iter()
        .filter(|c| o.only.as_deref().is_none_or(|n| n == c.name() || *c == Contender::Host))
        .collect();
    println!(
        "one TCP flow to {SERVER} for {} s per direction, MTU {} (host: no MTU change)",
        o.seconds, o.mtu
    );
    let mut rows = Vec::new();
    for &c in &chosen {
        eprintln!("bench: {} ...", c.name());
        let up = throughput(c, &o, false);
        let down = throughput(c, &o, true);
        let start = if c == Contender::Host { Ok(Duration::ZERO) } else { startup(c, &o) };
        for (what, r) in [("up", &up), ("down", &down)] {
            if let Err(e) = r {
                eprintln!("{} {what}: {e:#}", c.name());
            }
        }
        if let Err(e) = &start {
            eprintln!("{} start-up: {e:#}", c.name());
        }
        rows.push((c, up.ok(), down.ok(), start.ok()));
    }
    let (host_up, host_down) = (rows[0].1, rows[0].2);
    let ratio = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    let gbit = |v: Option<f64>| v.map_or("failed".into(), |v| format!("{v:.2}"));
    println!(
        "\n{:<12} {:>12} {:>8} {:>12} {:>8} {:>12}",
        "", "up Gbit/s", "ratio", "down Gbit/s", "ratio", "`-- true`"
    );
    for (c, up, down, start) in rows {
        let start = match (c, start) {
            (Contender::Host, _) => "-".to_string(),
            (_, Some(d)) => format!("{:.1} ms", d.as_secs_f64() * 1e3),
            (_, None) => "failed".into(),
        };
        println!(
            "{:<12} {:>12} {:>8} {:>12} {:>8} {:>12}",
            c.name(),
            gbit(up),
            ratio(up, host_up),
            gbit(down),
            ratio(down, host_down),
            start
        );
    }
    let _ = std::fs::remove_dir_all(&copy);
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("childflow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
