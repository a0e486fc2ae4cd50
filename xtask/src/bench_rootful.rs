//! `cargo xtask bench rootful`: the rootful backend's cost, side by side with its peers, in
//! one run on this machine.
//!
//! Topology (all names `cf…`, addresses in 198.18.0.0/15, removed at the end):
//! ```text
//!  upstream netns cfbenchup: cfbu1 198.18.250.2  (iperf3 -s, the probe's sink)
//!        │ veth
//!  host: cfbh1 198.18.250.1 ── NAT ── baseline netns cfbenchb: cfbbc 10.78.0.2 (clients)
//!                            └─ childflow --root -- (the same clients)
//! ```
//! The baseline is what childflow builds minus the eBPF programs: a veth pair into a network
//! namespace and an nftables masquerade (made here with `ip`/`nft`, which a bench may use).
//! A bench on a shared 2-core VM is noisy, so every table runs its rows in [`ROUNDS`]
//! interleaved rounds (rotated and reversed every other round, see [`order`]) and prints
//! per row the median, the spread (min–max) and the change against the baseline as the
//! median of the per-round ratios; the load average is printed before and after.
//! - bulk TCP (iperf3, 3 s): baseline vs `childflow --root`, and the baseline with
//!   `tcpdump -w /dev/null` on its veth (the peer tool);
//! - 64-byte UDP packet rate: `xtask bench-probe flood` (unpaced `sendmmsg`) to the probe's
//!   sink, what the sink received per second, for the same three rows;
//! - capture at a fixed [`CAPTURE_PPS`] of 64-byte datagrams: `childflow --root -c` against
//!   `tcpdump -w` on the baseline veth, files on /dev/shm: packets written (capinfos) and
//!   each capture's own drop count; the sender is `xtask bench-probe rawflood` (a packet
//!   socket: `flood` through the kernel's UDP path could not offer more than 130-160k/s
//!   here, and one `rawflood` thread at 230-240k, so two share the rate); `--capture-rate
//!   [PPS]` runs only these rows (at PPS to find a ceiling);
//! - capture of bulk TCP: `childflow --root -c` (with the default ring, with
//!   `--capture-buffer 256M`, and with `CHILDFLOW_CAPTURE_TAP=0`: large packets copied into
//!   the ring instead of cloned to the capture tap) against `childflow --root`, and
//!   `tcpdump -w` on the baseline veth against the baseline, files on /dev/shm and then on
//!   the disk (the temp dir): the cost is the median of the per-round throughput ratios of
//!   each pair; and two floors against `childflow --root`: beside it, a thread that only
//!   copies every byte moved once, and one that also writes them to a file
//!   ([`crate::floor`]), the least any capture to userspace does (while its writes keep
//!   up: each run says how far they fell behind); and what the directory takes
//!   ([`crate::floor::write_rate`], before and after the rows), with the cost that forces
//!   on any capture keeping every byte when it is slower than the transfer;
//! - per-run cost of each program (`kernel.bpf_stats_enabled`, run_time_ns / run_cnt, read
//!   from `bpftool prog show` while childflow's programs are loaded), for bulk TCP and for
//!   64-byte packets, next to an empty classic-BPF classifier on the baseline veth under the
//!   same traffic: `bpf_stats` and calling any program cost tens of nanoseconds per run on
//!   this machine (two clock reads), and that floor is in every number;
//! - `childflow --root -- true` next to the rootless `childflow -- true`, median wall time
//!   of 20 runs each, and how long the rootful run's host state outlives its return
//!   (`--startup` runs only this row, `--costs` only the per-run costs;
//!   `CHILDFLOW_TRACE_STARTUP=1` makes childflow print its phases);
//! - `--tcx-floor [--expedited]` runs only the kernel's own TCX attach cost on a fresh veth,
//!   without childflow (see `bench_tcx.rs`).
//! - `--prog-run [--pair] [OBJECT...]` runs only the programs' CPU cost per packet type with
//!   `BPF_PROG_TEST_RUN`, insensitive to load, for A/B of program objects (see
//!   `bench_progrun.rs`); the `bpf_stats` rows above include real traffic's cache misses.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    bench_capture::{count_packets, stop_tcpdump},
    floor::{DiskRate, Floor},
};

/// Rounds of every row (so at least this many A/B pairs).
const ROUNDS: usize = 6;
const SECONDS: &str = "3";
/// The capture rows' packet rate (issue 6: at least 250,000 packets/s with no drops).
pub const CAPTURE_PPS: u64 = 250_000;
const UP_NS: &str = "cfbenchup";
const BASE_NS: &str = "cfbenchb";
const SERVER: &str = "198.18.250.2";
const TABLE: &str = "childflow_bench";

/// [`sh`], for the other benches.
pub(crate) fn sh_pub(args: &[&str]) -> Result<String> {
    sh(args)
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("failed to run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bench's network; dropping it removes everything it made.
struct Topology {
    server: Child,
}

impl Topology {
    fn new() -> Result<Topology> {
        teardown();
        for cmd in [
            "ip netns add cfbenchup",
            "ip netns add cfbenchb",
            "ip link add cfbh1 type veth peer name cfbu1 netns cfbenchup",
            "ip addr add 198.18.250.1/24 dev cfbh1",
            "ip link set cfbh1 up",
            "ip -n cfbenchup addr add 198.18.250.2/24 dev cfbu1",
            "ip -n cfbenchup link set cfbu1 up",
            "ip -n cfbenchup link set lo up",
            "ip link add cfbbh type veth peer name cfbbc netns cfbenchb",
            "ip addr add 10.78.0.1/30 dev cfbbh",
            "ip link set cfbbh up",
            "ip -n cfbenchb addr add 10.78.0.2/30 dev cfbbc",
            "ip -n cfbenchb link set cfbbc up",
            "ip -n cfbenchb link set lo up",
            "ip -n cfbenchb route add default via 10.78.0.1",
            "ip route add 198.18.250.3/32 via 198.18.250.2",
            "sysctl -qw net.ipv4.ip_forward=1",
        ] {
            sh(&cmd.split(' ').collect::<Vec<_>>())?;
        }
        sh(&["nft", "add", "table", "inet", TABLE])?;
        let chain = "{ type nat hook postrouting priority srcnat ; }";
        sh(&["nft", "add", "chain", "inet", TABLE, "post", chain])?;
        sh(&["nft", "add", "rule", "inet", TABLE, "post", "iifname", "cfbbh", "masquerade"])?;
        let server = Command::new("ip")
            .args(["netns", "exec", UP_NS, "iperf3", "-s", "-B", SERVER])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start iperf3 -s")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Topology { server })
    }
}

fn teardown() {
    let _ = Command::new("nft").args(["delete", "table", "inet", TABLE]).output();
    for ns in [UP_NS, BASE_NS] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    for link in ["cfbh1", "cfbbh"] {
        let _ = Command::new("ip").args(["link", "del", link]).stderr(Stdio::null()).output();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        teardown();
    }
}

/// iperf3 client arguments for bulk TCP.
fn iperf_args() -> Vec<&'static str> {
    vec!["iperf3", "-c", SERVER, "-t", SECONDS, "-J"]
}

/// Bits/s the receiver got, from iperf3's JSON.
fn parse_iperf(json: &str) -> Result<f64> {
    Ok(iperf_received(json)?.0)
}

/// Bits/s and bytes the receiver got, from iperf3's JSON.
fn iperf_received(json: &str) -> Result<(f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    let received = &v["end"]["sum_received"];
    Ok((
        received["bits_per_second"].as_f64().unwrap_or(0.0),
        received["bytes"].as_f64().unwrap_or(0.0),
    ))
}

/// Milliseconds all CPUs have spent busy (everything but idle and iowait) and, of that,
/// in softirq, from the `cpu` line of `/proc/stat` (in USER_HZ ticks of 10 ms).
fn cpu_ms() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("failed to read /proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let (idle, iowait, softirq) = (ticks[3], ticks[4], ticks[6]);
    Ok(((ticks.iter().sum::<u64>() - idle - iowait) * 10, softirq * 10))
}

/// The probe (this xtask binary) sending 64-byte datagrams to the sink at `pps` (0: as fast
/// as it can) for the run's time.
fn flood_args(probe: &str, pps: u64) -> Vec<String> {
    [probe, "bench-probe", "flood", SERVER, SECONDS, "64", &pps.to_string()]
        .map(String::from)
        .to_vec()
}

/// Where the capture-rate rows send: routed by the host to the upstream namespace, which
/// does not forward and drops each datagram as it arrives (no receiving process on the two
/// CPUs the sender and the capture need); [`VethCount`] counts them there.
const DISCARD: &str = "198.18.250.3";

/// [`flood_args`] to [`DISCARD`], through packet sockets (`bench-probe rawflood`) from two
/// threads: the sender's own UDP/IP output path, not the capture, capped `flood` at
/// 130-160k packets/s here, and one `rawflood` sender (the receive path and the programs
/// run inline on its CPU) at 230-240k.
fn rawflood_args(probe: &str, pps: u64) -> Vec<String> {
    [probe, "bench-probe", "rawflood", DISCARD, SECONDS, "64", &pps.to_string(), "2"]
        .map(String::from)
        .to_vec()
}

/// Packets that reached the upstream namespace's veth, counted by the kernel.
struct VethCount(u64);

impl VethCount {
    fn read() -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", UP_NS, "cat", "/sys/class/net/cfbu1/statistics/rx_packets"])
            .output()
            .context("read the upstream veth's counters")?;
        String::from_utf8_lossy(&out.stdout).trim().parse().context("rx_packets")
    }

    fn start() -> Result<VethCount> {
        Ok(VethCount(Self::read()?))
    }

    /// Packets that arrived since [`VethCount::start`] (a few ms after the sender ends).
    fn received(self) -> Result<u64> {
        std::thread::sleep(Duration::from_millis(100));
        Ok(Self::read()? - self.0)
    }
}

/// A datagram counter in the upstream namespace, started before the sender.
struct Sink(Child);

impl Sink {
    fn start(probe: &str) -> Result<Sink> {
        let child = Command::new("ip")
            .args(["netns", "exec", UP_NS, probe, "bench-probe", "sink", SERVER, SECONDS])
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start the sink")?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Sink(child))
    }

    /// Datagrams received, once the sink has seen the traffic end.
    fn received(self) -> Result<u64> {
        let out = self.0.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .strip_prefix("received ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("the sink printed {text:?}"))
    }
}

/// What one row runs: in the baseline namespace, or under `childflow --root` (with extra
/// childflow arguments, and variables for its environment), and whether `tcpdump -w FILE`
/// captures the baseline veth meanwhile.
#[derive(Clone)]
enum Contender {
    Baseline,
    Childflow(Vec<String>, Vec<(&'static str, &'static str)>),
    Tcpdump(String),
    /// `childflow --root` with no capture, beside a [`Floor`] that copies (and writes to this
    /// file, if any).
    CopyFloor(Option<String>),
}

impl Contender {
    /// Runs `cmd` as this contender; returns its stdout and its capture's losses: for
    /// tcpdump "dropped by kernel", for childflow the sum of the drop counters of its JSON
    /// summary (if it printed one), for a writing floor the share of the bytes its writes
    /// fell behind ([`Floor::stop`]).
    fn run(&self, bin: &str, cmd: &[String]) -> Result<(String, Option<u64>, Option<f64>)> {
        let mut dump = None;
        let mut argv: Vec<String> = match self {
            Contender::Baseline | Contender::Tcpdump(_) => {
                ["ip", "netns", "exec", BASE_NS].map(String::from).to_vec()
            }
            Contender::Childflow(extra, _) => {
                let mut a = vec![bin.to_owned(), "--root".into()];
                a.extend(extra.iter().cloned());
                a.push("--".into());
                a
            }
            Contender::CopyFloor(_) => vec![bin.to_owned(), "--root".into(), "--".into()],
        };
        let floor = match self {
            Contender::CopyFloor(file) => {
                Some(Floor::start("cfbh1", true, file.as_deref().map(Path::new))?)
            }
            _ => None,
        };
        if let Contender::Tcpdump(file) = self {
            dump = Some(
                Command::new("tcpdump")
                    .args(["-i", "cfbbh", "-s", "0", "-B", "65536", "-w", file])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("failed to start tcpdump")?,
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        argv.extend(cmd.iter().cloned());
        let env = match self {
            Contender::Childflow(_, env) => env.as_slice(),
            _ => &[],
        };
        let out = Command::new(&argv[0]).args(&argv[1..]).envs(env.iter().copied()).output();
        let behind = floor.map(Floor::stop).transpose()?.flatten();
        let dropped = dump.map(stop_tcpdump).transpose()?.map(|(_, dropped)| dropped);
        let out = out.with_context(|| format!("failed to run {}", argv.join(" ")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{} failed: {stderr}", argv.join(" "));
        }
        // The summary is pretty-printed JSON after any log lines.
        let summary_drops = stderr
            .match_indices('{')
            .filter(|(at, _)| *at == 0 || stderr.as_bytes()[at - 1] == b'\n')
            .find_map(|(at, _)| {
                let mut values = serde_json::Deserializer::from_str(&stderr[at..])
                    .into_iter::<serde_json::Value>();
                let v = values.next()?.ok()?;
                Some(v.get("drops")?.as_object()?.values().filter_map(|n| n.as_u64()).sum())
            });
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((stdout, dropped.or(summary_drops), behind))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The order of the rows in round `i`: rotated each round and reversed every other one, so
/// no row always runs first or right after another (drift and warm-up hit all alike).
fn order(rows: usize, i: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..rows).map(|r| (r + i) % rows).collect();
    if i % 2 == 1 {
        o.reverse();
    }
    o
}

/// Runs every row once per round, interleaved, `measure` giving each run's value; prints
/// per row the median, the spread (min–max) and the change against row 0 as the median of
/// the per-round ratios (each round's runs are close in time, so drift mostly cancels).
fn interleaved(
    what: &str,
    unit: &str,
    rows: &[(&str, Contender)],
    mut measure: impl FnMut(&Contender) -> Result<f64>,
) -> Result<()> {
    let mut values = vec![Vec::new(); rows.len()];
    for i in 0..ROUNDS {
        for r in order(rows.len(), i) {
            values[r].push(measure(&rows[r].1)?);
        }
    }
    for (r, (name, _)) in rows.iter().enumerate() {
        let v = &values[r];
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        let change = if r == 0 {
            String::new()
        } else {
            let ratios = v.iter().zip(&values[0]).map(|(x, b)| x / b - 1.0).collect();
            format!("{:+6.1}%", median(ratios) * 100.0)
        };
        println!(
            "{what:<12} {name:<28} {:>8.2} {unit}  ({lo:.2}–{hi:.2})  {change}",
            median(v.clone())
        );
    }
    Ok(())
}

/// Bulk TCP, and the 64-byte packet rate (unpaced sendmmsg to the sink), each with and
/// without childflow's programs and with tcpdump -w on the baseline veth.
fn rates(bin: &str, probe: &str) -> Result<()> {
    let rows = [
        ("veth+NAT (no eBPF)", Contender::Baseline),
        ("childflow --root", Contender::Childflow(Vec::new(), Vec::new())),
        ("veth+NAT + tcpdump -w", Contender::Tcpdump("/dev/null".into())),
    ];
    let iperf: Vec<String> = iperf_args().into_iter().map(String::from).collect();
    interleaved("bulk TCP", "Gbit/s", &rows, |c| Ok(parse_iperf(&c.run(bin, &iperf)?.0)? / 1e9))?;
    let flood = flood_args(probe, 0);
    let secs: f64 = SECONDS.parse()?;
    interleaved("64-byte UDP", "kpps", &rows, |c| {
        let sink = Sink::start(probe)?;
        c.run(bin, &flood)?;
        Ok(sink.received()? as f64 / secs / 1e3)
    })
}

/// The programs' cost on childflow's own plumbing: in each of [`ROUNDS`] runs of
/// `childflow --root`, the command measures once with the programs attached, then the bench
/// detaches them (`bpftool link detach`: the cgroup links of this run's `cf_*` programs;
/// `tc qdisc del`: the TC filters) and the command measures again on the same namespace,
/// veth and NAT. So the
/// pair differs only in the programs (the second run of a pair always comes second; the
/// baseline namespace above differs in more than that, e.g. it measured faster or slower
/// than childflow by 10–40 % from one bench run to the next).
fn same_plumbing(bin: &str, probe: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cfbench-ab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let iperf = iperf_args().join(" ");
        let flood = flood_args(probe, 0).join(" ");
        let secs: f64 = SECONDS.parse()?;
        for (what, unit, cmd, udp) in
            [("bulk TCP", "Gbit/s", iperf, false), ("64-byte UDP", "kpps", flood, true)]
        {
            let (mut on, mut off) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let (a, b) = pair(bin, probe, &dir, &cmd, udp)?;
                let value = |out: &str| -> Result<f64> {
                    Ok(if udp { out.parse::<f64>()? / secs / 1e3 } else { parse_iperf(out)? / 1e9 })
                };
                on.push(value(&a)?);
                off.push(value(&b)?);
            }
            let ratios = on.iter().zip(&off).map(|(a, b)| a / b - 1.0).collect();
            let spread =
                |v: &[f64]| v.iter().fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
            let ((al, ah), (bl, bh)) = (spread(&on), spread(&off));
            println!(
                "{what:<12} childflow --root, programs detached {:>8.2} {unit}  ({bl:.2}–{bh:.2})",
                median(off.clone())
            );
            println!(
                "{what:<12} childflow --root, programs attached {:>8.2} {unit}  ({al:.2}–{ah:.2})  \
                 {:+6.1}%  (per-pair {:?})",
                median(on.clone()),
                median(ratios) * 100.0,
                on.iter()
                    .zip(&off)
                    .map(|(a, b)| format!("{:+.1}", (a / b - 1.0) * 100.0))
                    .collect::<Vec<_>>()
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// One run of `childflow --root -- sh -c SCRIPT`: `cmd` with the programs attached, then
/// (once the bench has detached them) again. Returns both outputs (iperf3's JSON, or the
/// sink's count for the UDP flood).
fn pair(
    bin: &str,
    probe: &str,
    dir: &std::path::Path,
    cmd: &str,
    udp: bool,
) -> Result<(String, String)> {
    let (first, second, go) = (dir.join("first"), dir.join("second"), dir.join("go"));
    for f in [&first, &second, &go] {
        let _ = std::fs::remove_file(f);
    }
    let d = |p: &std::path::Path| p.display().to_string();
    let script = format!(
        "{cmd} > {f}.tmp && mv {f}.tmp {f} && while [ ! -e {go} ]; do sleep 0.05; done && \
         {cmd} > {s}.tmp && mv {s}.tmp {s}",
        f = d(&first),
        s = d(&second),
        go = d(&go)
    );
    let is_cf = |p: &serde_json::Value| p["name"].as_str().unwrap_or_default().starts_with("cf_");
    let before: Vec<u64> = programs(is_cf)?.into_iter().map(|(id, _)| id).collect();
    let mut sink = if udp { Some(Sink::start(probe)?) } else { None };
    let mut child = Command::new(bin)
        .args(["--root", "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start childflow")?;
    let wait_for = |f: &std::path::Path, child: &mut Child| -> Result<()> {
        let started = Instant::now();
        while !f.exists() {
            if child.try_wait()?.is_some() {
                bail!("the command ended before writing {}", f.display());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("no {} after 60 s", f.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    let outcome = (|| {
        wait_for(&first, &mut child)?;
        let a = match sink.take() {
            Some(s) => s.received()?.to_string(),
            None => std::fs::read_to_string(&first)?,
        };
        // This run's programs, and their links.
        let mine: Vec<u64> = programs(is_cf)?
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !before.contains(id))
            .collect();
        let links: serde_json::Value =
            serde_json::from_str(&sh(&["bpftool", "link", "show", "-j"])?)?;
        let ids: Vec<String> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| mine.contains(&l["prog_id"].as_u64().unwrap_or(0)))
            .filter_map(|l| Some(l["id"].as_u64()?.to_string()))
            .collect();
        if ids.len() < 2 {
            bail!("found {} links of this run's programs, expected 2: {links}", ids.len());
        }
        for id in &ids {
            sh(&["bpftool", "link", "detach", "id", id])?;
        }
        sh(&["tc", "qdisc", "del", "dev", &format!("cf{:x}h", child.id()), "clsact"])?;
        if udp {
            sink = Some(Sink::start(probe)?);
        }
        std::fs::write(&go, b"")?;
        wait_for(&second, &mut child)?;
        let b = match sink.take() {
            Some(s) => s.received()?.to_string(),
            None => std::fs::read_to_string(&second)?,
        };
        Ok((a, b))
    })();
    let _ = child.wait();
    outcome
}

/// Capture at a fixed 64-byte packet rate: `childflow --root -c` against `tcpdump -w` on the
/// baseline veth, both writing to /dev/shm (the shared disk is not what is measured).
fn capture_rate(bin: &str, probe: &str, pps: u64) -> Result<()> {
    let file = |name: &str| format!("/dev/shm/cfbench-{}-{name}", std::process::id());
    let (cf_file, dump_file) = (file("childflow.pcapng"), file("tcpdump.pcap"));
    let rows = [
        (
            "childflow --root -c",
            Contender::Childflow(
                ["-c", &cf_file, "--summary-format", "json"].map(String::from).to_vec(),
                Vec::new(),
            ),
        ),
        ("veth+NAT + tcpdump -w", Contender::Tcpdump(dump_file.clone())),
    ];
    let rate = match pps {
        0 => "unpaced (as fast as two senders go)".to_string(),
        _ => format!("paced at {} kpps", pps / 1000),
    };
    println!("\ncapture of 64-byte UDP {rate}, files on /dev/shm (median of {ROUNDS}):");
    let flood = rawflood_args(probe, pps);
    let secs: f64 = SECONDS.parse()?;
    let mut results = vec![Vec::new(); rows.len()];
    for i in 0..ROUNDS {
        for r in order(rows.len(), i) {
            let sink = VethCount::start()?;
            let (out, dump, _) = rows[r].1.run(bin, &flood)?;
            let received = sink.received()?;
            let sent: u64 = out
                .lines()
                .find_map(|l| l.strip_prefix("sent ")?.trim().parse().ok())
                .with_context(|| format!("the flood printed {out:?}"))?;
            let path = if r == 0 { &cf_file } else { &dump_file };
            let written = count_packets(Path::new(path))?;
            let _ = std::fs::remove_file(path);
            let drops = dump.context("no drop count (tcpdump's, or childflow's summary)")?;
            results[r].push((written as f64 / secs, sent, received, written, drops));
        }
    }
    for (r, (name, _)) in rows.iter().enumerate() {
        let mut v = results[r].clone();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (rate, sent, received, written, drops) = v[v.len() / 2];
        let all_drops: Vec<u64> = results[r].iter().map(|x| x.4).collect();
        println!(
            "{name:<24} written {:>7.1} kpps  (sent {sent}, at the sink {received}, written \
             {written}, capture drops {drops}; per run {all_drops:?})",
            rate / 1e3
        );
    }
    Ok(())
}

/// What capturing bulk TCP costs: `childflow --root -c` against `childflow --root`, and
/// `tcpdump -w` on the baseline veth against the bare baseline, interleaved, files in `dir`
/// (deleted after each run). The cost is the median of the per-round throughput ratios of
/// each pair (the two runs of a round are close in time, so drift mostly cancels); the
/// files' packet counts (capinfos) and each capture's drops are shown next to it, and
/// the CPU time the whole machine spent per GB moved (busy, and of that in softirq, where
/// the programs' copy into the ring runs), the median per row: the capture's CPU, less
/// disturbed by other load than throughput is.
fn capture_bulk(bin: &str, dir: &Path) -> Result<()> {
    let file = |name: &str| {
        dir.join(format!("cfbench-{}-{name}", std::process::id())).to_string_lossy().into_owned()
    };
    let (cf_file, dump_file) = (file("childflow.pcapng"), file("tcpdump.pcap"));
    let capture = |extra: &[&str], env: &[(&'static str, &'static str)]| {
        let mut args = vec!["-c", &cf_file, "--summary-format", "json"];
        args.extend_from_slice(extra);
        Contender::Childflow(args.into_iter().map(String::from).collect(), env.to_vec())
    };
    // Name, what runs, its capture file, and the row it is the capture of (for its cost).
    let rows = [
        ("childflow --root", Contender::Childflow(Vec::new(), Vec::new()), None, None),
        ("childflow --root -c", capture(&[], &[]), Some(&cf_file), Some(0)),
        (
            "  --capture-buffer 256M",
            capture(&["--capture-buffer", "256M"], &[]),
            Some(&cf_file),
            Some(0),
        ),
        // The large packets copied into the ring, as before the capture tap.
        (
            "  no tap (ring copy)",
            capture(&[], &[("CHILDFLOW_CAPTURE_TAP", "0")]),
            Some(&cf_file),
            Some(0),
        ),
        // One copy of every byte (and one write of it): floors of any capture to userspace.
        ("  floor: copy", Contender::CopyFloor(None), None, Some(0)),
        ("  floor: copy + write", Contender::CopyFloor(Some(file("floor"))), None, Some(0)),
        ("veth+NAT (no eBPF)", Contender::Baseline, None, None),
        ("veth+NAT + tcpdump -w", Contender::Tcpdump(dump_file.clone()), Some(&dump_file), Some(6)),
    ];
    // What the directory takes, before and after the rounds (a shared disk's rate moves).
    let before = crate::floor::write_rate(dir, 2.0)?;
    println!(
        "
capture of bulk TCP, files in {} (median of {ROUNDS}):",
        dir.display()
    );
    let iperf: Vec<String> = iperf_args().into_iter().map(String::from).collect();
    // Per row and round: (Gbit/s, packets written, capture drops, (busy, softirq) ms/GB,
    // the share a writing floor fell behind).
    let mut results = vec![Vec::new(); rows.len()];
    for i in 0..ROUNDS {
        for r in order(rows.len(), i) {
            let (contender, path) = (&rows[r].1, rows[r].2);
            let before = cpu_ms()?;
            let (out, drops, behind) = contender.run(bin, &iperf)?;
            let after = cpu_ms()?;
            let (bits, bytes) = iperf_received(&out)?;
            let (gbit, gbytes) = (bits / 1e9, (bytes / 1e9).max(1e-9));
            let per_gb =
                ((after.0 - before.0) as f64 / gbytes, (after.1 - before.1) as f64 / gbytes);
            let written = path.map(|p| count_packets(Path::new(p))).transpose()?;
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
            results[r].push((gbit, written, drops, per_gb, behind));
        }
    }
    // Per row: against the row it is the capture of, the median of the per-round ratios.
    let costs: Vec<Option<f64>> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            row.3.map(|base| {
                median(
                    results[r].iter().zip(&results[base]).map(|(x, b)| x.0 / b.0 - 1.0).collect(),
                )
            })
        })
        .collect();
    for (r, (name, _, path, _)) in rows.iter().enumerate() {
        let gbits: Vec<f64> = results[r].iter().map(|x| x.0).collect();
        let cost = costs[r].map_or(String::new(), |c| format!("cost {:+6.1}%", c * 100.0));
        let behind: Vec<String> =
            results[r].iter().filter_map(|x| x.4).map(|b| format!("{:.0}%", b * 100.0)).collect();
        let capture = if path.is_some() {
            let written: Vec<u64> = results[r].iter().filter_map(|x| x.1).collect();
            let drops: Vec<u64> = results[r].iter().filter_map(|x| x.2).collect();
            format!("written {written:?}, capture drops {drops:?}")
        } else if !behind.is_empty() {
            format!("writes behind the transfer at its end: [{}]", behind.join(", "))
        } else {
            String::new()
        };
        let busy = median(results[r].iter().map(|x| x.3.0).collect());
        let softirq = median(results[r].iter().map(|x| x.3.1).collect());
        println!(
            "{name:<24} {:>6.2} Gbit/s  {cost:<13} CPU {busy:>5.0} ms/GB (softirq {softirq:>4.0})  \
             {capture}",
            median(gbits)
        );
    }
    let disk = DiskRate { before, after: crate::floor::write_rate(dir, 2.0)? };
    let base = median(results[0].iter().map(|x| x.0).collect());
    println!("{}", disk.describe(dir, base));
    // The goal for childflow's default capture, against the floor that copies and writes.
    let floor = rows.iter().position(|r| matches!(r.1, Contender::CopyFloor(Some(_))));
    if let (Some(capture), Some(floor)) = (costs[1], floor)
        && let Some(least) = costs[floor]
    {
        let behind = results[floor].iter().filter_map(|x| x.4).reduce(f64::max);
        println!(
            "{}",
            crate::floor::verdict(capture, rows[floor].0, least, behind, disk.bound(base))
        );
    }
    Ok(())
}

/// Ids of the loaded programs `keep` selects, with their JSON.
fn programs(keep: impl Fn(&serde_json::Value) -> bool) -> Result<Vec<(u64, serde_json::Value)>> {
    let progs: serde_json::Value = serde_json::from_str(&sh(&["bpftool", "prog", "show", "-j"])?)?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| keep(p))
        .filter_map(|p| Some((p["id"].as_u64()?, p.clone())))
        .collect())
}

/// ns per run and runs of each program in `progs` that ran.
fn per_run(progs: &[(u64, serde_json::Value)]) -> Vec<(String, f64, u64)> {
    progs
        .iter()
        .filter_map(|(id, p)| {
            let cnt = p["run_cnt"].as_u64()?;
            let ns = p["run_time_ns"].as_u64()?;
            let name = p["name"].as_str().map_or_else(|| format!("id {id}"), str::to_owned);
            (cnt > 0).then(|| (name, ns as f64 / cnt as f64, cnt))
        })
        .collect()
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let old = sh(&["sysctl", "-n", "kernel.bpf_stats_enabled"])?.trim().to_owned();
        sh(&["sysctl", "-qw", "kernel.bpf_stats_enabled=1"])?;
        Ok(BpfStats(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = sh(&["sysctl", "-qw", &format!("kernel.bpf_stats_enabled={}", self.0)]);
    }
}

/// ns per run of each of childflow's programs while `cmd` runs under it.
fn program_cost(bin: &str, cmd: &[String]) -> Result<Vec<(String, f64, u64)>> {
    // bpftool here cannot name a program's owner (no `pids`): childflow's programs are the
    // `cf_*` ones that appear while it runs.
    let is_cf = |p: &serde_json::Value| p["name"].as_str().unwrap_or_default().starts_with("cf_");
    let before: Vec<u64> = programs(is_cf)?.into_iter().map(|(id, _)| id).collect();
    let _stats = BpfStats::enable()?;
    let mut child = Command::new(bin)
        .arg("--root")
        .arg("--")
        .args(cmd)
        .stdout(Stdio::null())
        .spawn()
        .context("failed to start childflow")?;
    // The latest sight of each program: at the end of a run the cgroup programs go (with
    // the cgroup) while the veth still holds the TC one, so the last snapshot alone would
    // miss them.
    let mut latest = std::collections::BTreeMap::new();
    while child.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(now) = programs(is_cf) else { continue };
        latest.extend(now.into_iter().filter(|(id, _)| !before.contains(id)));
    }
    Ok(per_run(&latest.into_iter().collect::<Vec<_>>()))
}

/// An empty TC program (`r0 = TC_ACT_UNSPEC; exit`) in BPF assembly, named `cf_empty`.
const EMPTY_PROGRAM: &str = "\t.section tc,\"ax\",@progbits
\t.globl cf_empty
\t.type cf_empty,@function
cf_empty:
\tr0 = -1
\texit
\t.size cf_empty, 16
\t.section license,\"aw\",@progbits
\t.globl _license
_license:
\t.asciz \"GPL\"
";

/// Assembles [`EMPTY_PROGRAM`] into `dir/empty.o` (section `tc`); returns that path.
pub(crate) fn assemble_empty(dir: &std::path::Path) -> Result<String> {
    let (src, obj) = (dir.join("empty.s"), dir.join("empty.o"));
    std::fs::write(&src, EMPTY_PROGRAM)?;
    let obj = obj.to_str().context("temp path")?.to_owned();
    sh(&[
        "/usr/lib/llvm-22/bin/llvm-mc",
        "-triple",
        "bpfel",
        "-filetype=obj",
        "-o",
        &obj,
        src.to_str().context("temp path")?,
    ])?;
    Ok(obj)
}

/// ns per run of an empty TC program (assembled with LLVM's `llvm-mc`, which setup installs
/// with llvm-22, and attached with `tc` to both directions of the baseline veth) while
/// `cmd` runs in the baseline namespace: what `bpf_stats` itself and calling any program
/// cost on this machine, the floor under the numbers of [`program_cost`].
fn empty_program_cost(cmd: &[String]) -> Result<Vec<(String, f64, u64)>> {
    let dir = std::env::temp_dir().join(format!("cfbench-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = assemble_empty(&dir).and_then(|obj| {
        sh(&["tc", "qdisc", "add", "dev", "cfbbh", "clsact"])?;
        let measured = (|| {
            for dir in ["ingress", "egress"] {
                sh(&[
                    "tc", "filter", "add", "dev", "cfbbh", dir, "bpf", "da", "obj", &obj, "sec",
                    "tc",
                ])?;
            }
            let is_empty = |p: &serde_json::Value| p["name"] == "cf_empty";
            let before = programs(is_empty)?;
            let _stats = BpfStats::enable()?;
            Contender::Baseline.run("", cmd)?;
            let after = programs(is_empty)?;
            // Only what ran during this run: another bench's empty programs stay out.
            let ran: Vec<(u64, serde_json::Value)> = after
                .into_iter()
                .map(|(id, mut p)| {
                    if let Some((_, b)) = before.iter().find(|(i, _)| *i == id) {
                        for field in ["run_cnt", "run_time_ns"] {
                            let delta =
                                p[field].as_u64().unwrap_or(0) - b[field].as_u64().unwrap_or(0);
                            p[field] = delta.into();
                        }
                    }
                    (id, p)
                })
                .collect();
            Ok(per_run(&ran))
        })();
        let _ = sh(&["tc", "qdisc", "del", "dev", "cfbbh", "clsact"]);
        measured
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `--costs-ab OBJECT...`: the `bpf_stats` cost of each object's programs under the same real
/// traffic, objects interleaved in [`AB_ROUNDS`] rounds, without rebuilding childflow: each
/// object is loaded as `--prog-run` loads it (capture off), its TC programs attached to both
/// directions of the baseline veth and its cgroup programs to a cgroup of the bench's own
/// that the baseline client runs in. The baseline veth is childflow's plumbing (a veth into
/// a namespace, masquerade) without childflow's userspace draining the rings, so the
/// figures are for A/B, not for the table above. Medians of the rounds, ns per run.
fn programs_ab(probe: &str, objects: &[String]) -> Result<()> {
    use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock};
    let cgroup = std::path::PathBuf::from(format!(
        "/sys/fs/cgroup/unified/cfbench-ab-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&cgroup).context("failed to create the bench cgroup")?;
    let result = (|| -> Result<()> {
        let _stats = BpfStats::enable()?;
        let iperf: Vec<String> = iperf_args().into_iter().map(String::from).collect();
        let traffic = [("bulk TCP", iperf), ("64-byte UDP", flood_args(probe, 0))];
        // ns[object][traffic][program]: one figure per round.
        let mut ns = vec![
            vec![std::collections::BTreeMap::<String, Vec<u32>>::new(); traffic.len()];
            objects.len()
        ];
        println!(
            "\nper-run program cost, A/B on the baseline veth (bpf_stats, median of {AB_ROUNDS} \
             interleaved rounds); load average {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
        for round in 0..AB_ROUNDS {
            for i in 0..objects.len() {
                let k = if round % 2 == 0 { i } else { objects.len() - 1 - i };
                for (t, (what, cmd)) in traffic.iter().enumerate() {
                    let mut l = crate::bench_progrun::load(&objects[k])?;
                    let cg = std::fs::File::open(&cgroup)?;
                    let tc = attach_tc(&mut l)?;
                    let p: &mut CgroupSkb = l
                        .ebpf
                        .program_mut("cf_skb_egress")
                        .context("no cf_skb_egress")?
                        .try_into()?;
                    p.attach(&cg, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
                    let p: &mut CgroupSock = l
                        .ebpf
                        .program_mut("cf_sock_create")
                        .context("no cf_sock_create")?
                        .try_into()?;
                    p.attach(&cg, CgroupAttachMode::Single)?;
                    let sink = if *what == "bulk TCP" { None } else { Some(Sink::start(probe)?) };
                    let procs = cgroup.join("cgroup.procs");
                    let script = format!(
                        "echo $$ > {} && exec ip netns exec {BASE_NS} \"$@\"",
                        procs.display()
                    );
                    let out = Command::new("sh")
                        .args(["-c", &script, "sh"])
                        .args(cmd)
                        .stdout(Stdio::null())
                        .output()
                        .context("failed to run the client")?;
                    if !out.status.success() {
                        bail!("the client failed: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    if let Some(s) = sink {
                        s.received()?;
                    }
                    for name in tc.iter().copied().chain(["cf_skb_egress"]) {
                        let info = match l.ebpf.program(name).context("no program")? {
                            aya::programs::Program::SchedClassifier(p) => p.info()?,
                            aya::programs::Program::CgroupSkb(p) => p.info()?,
                            _ => bail!("{name}: unexpected program type"),
                        };
                        let cnt = info.run_count().max(1);
                        let cost = (info.run_time().as_nanos() as u64 / cnt) as u32;
                        ns[k][t].entry(name.to_owned()).or_default().push(cost);
                    }
                    // The filters go with the qdisc; dropping `l` detaches the rest.
                    sh(&["tc", "qdisc", "del", "dev", "cfbbh", "clsact"])?;
                }
            }
        }
        for (k, obj) in objects.iter().enumerate() {
            println!("\n{obj}");
            for (t, (what, _)) in traffic.iter().enumerate() {
                for (name, runs) in &ns[k][t] {
                    let (lo, hi) =
                        (runs.iter().min().unwrap_or(&0), runs.iter().max().unwrap_or(&0));
                    println!(
                        "{what:<12} {name:<16} {:>5} ns  ({lo}–{hi})",
                        crate::bench_progrun::median(runs.clone())
                    );
                }
            }
        }
        println!(
            "\nload average after: {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir(&cgroup);
    result
}

/// Attaches the TC program(s) of `l` to both directions of the baseline veth as childflow
/// does (`clsact`, one direct-action filter per direction with the classid that tells
/// `cf_tc` the direction), through a pin that is removed as soon as the filter holds the
/// program. An object from before `cf_tc` has one program per direction. Returns the
/// programs' names; `tc qdisc del dev cfbbh clsact` detaches them.
fn attach_tc(l: &mut crate::bench_progrun::Loaded) -> Result<Vec<&'static str>> {
    use childflow_common::flow::{TC_CLASSID_EGRESS, TC_CLASSID_INGRESS};
    let two = l.ebpf.program("cf_tc").is_none();
    let filters = if two {
        [("cf_tc_ingress", "ingress", 0), ("cf_tc_egress", "egress", 0)]
    } else {
        [("cf_tc", "ingress", TC_CLASSID_INGRESS), ("cf_tc", "egress", TC_CLASSID_EGRESS)]
    };
    sh(&["tc", "qdisc", "add", "dev", "cfbbh", "clsact"])?;
    for (name, dir, classid) in filters {
        let pin = format!("/sys/fs/bpf/cfbench-ab-{}-{name}", std::process::id());
        let p: &mut aya::programs::SchedClassifier =
            l.ebpf.program_mut(name).context("no TC program")?.try_into()?;
        p.pin(&pin)?;
        let added = sh(&[
            "tc",
            "filter",
            "add",
            "dev",
            "cfbbh",
            dir,
            "bpf",
            "da",
            "pinned",
            &pin,
            "classid",
            &format!(":{classid:x}"),
        ]);
        let _ = std::fs::remove_file(&pin);
        added?;
    }
    Ok(if two { vec!["cf_tc_ingress", "cf_tc_egress"] } else { vec!["cf_tc"] })
}

/// Rounds of `--costs-ab`.
const AB_ROUNDS: usize = 5;

/// Which rows to run: all of them, or only one part.
#[derive(Clone, PartialEq, Eq)]
pub enum Only {
    All,
    /// `--startup`: the start-up row.
    Startup,
    /// `--costs`: the per-run program costs (`bpf_stats`).
    Costs,
    /// `--costs-ab OBJECT...`: see [`programs_ab`].
    CostsAb(Vec<String>),
    /// `--capture-rate [PPS]`: the paced 64-byte capture rows, at this rate.
    CaptureRate(u64),
}

pub fn run(bin: &str, only: Only) -> Result<()> {
    if only == Only::Startup {
        return startup(bin);
    }
    let _topology = Topology::new()?;
    let probe = std::env::current_exe().context("the xtask binary")?;
    let probe = probe.to_str().context("xtask path is not UTF-8")?;
    println!(
        "rootful bench: {ROUNDS} interleaved rounds of {SECONDS} s runs; median (min–max), \
         change vs the first row as the median of per-round ratios; load average {}\n",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    if only == Only::Costs {
        return program_costs(bin, probe);
    }
    if let Only::CostsAb(objects) = &only {
        return programs_ab(probe, objects);
    }
    if let Only::CaptureRate(pps) = only {
        return capture_rate(bin, probe, pps);
    }
    rates(bin, probe)?;
    println!("\nthe same, with and without the programs on childflow's own plumbing:");
    same_plumbing(bin, probe)?;
    capture_rate(bin, probe, CAPTURE_PPS)?;
    // Both: tmpfs takes the disk out, but the disk is where captures usually go (and
    // childflow writes it around the page cache, `capture/direct.rs`).
    capture_bulk(bin, Path::new("/dev/shm"))?;
    capture_bulk(bin, &std::env::temp_dir())?;
    program_costs(bin, probe)?;
    startup(bin)
}

/// `--capture`: only the bulk TCP capture rows (files on /dev/shm, then on the disk), with
/// the load average before and after.
pub fn capture_only(bin: &str) -> Result<()> {
    let _topology = Topology::new()?;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    println!("rootful capture bench ({bin}): {ROUNDS} interleaved rounds; load average {}", load());
    capture_bulk(bin, Path::new("/dev/shm"))?;
    capture_bulk(bin, &std::env::temp_dir())?;
    println!("\nload average after: {}", load());
    Ok(())
}

/// The per-run cost rows: each program of childflow's, then the empty program on the
/// baseline veth, under bulk TCP and under 64-byte UDP.
fn program_costs(bin: &str, probe: &str) -> Result<()> {
    println!("\nper-run program cost (bpf_stats run_time_ns / run_cnt):");
    let iperf: Vec<String> = iperf_args().into_iter().map(String::from).collect();
    for (what, cmd) in [("bulk TCP", iperf), ("64-byte UDP", flood_args(probe, 0))] {
        let sink = if what == "bulk TCP" { None } else { Some(Sink::start(probe)?) };
        let cost = program_cost(bin, &cmd)?;
        if let Some(s) = sink {
            s.received()?;
        }
        for (name, ns, cnt) in cost {
            println!("{what:<12} {name:<22} {ns:>7.0} ns  ({cnt} runs)");
        }
        let sink = if what == "bulk TCP" { None } else { Some(Sink::start(probe)?) };
        let floor = empty_program_cost(&cmd)?;
        if let Some(s) = sink {
            s.received()?;
        }
        for (name, ns, cnt) in floor {
            println!("{what:<12} {name:<22} {ns:>7.0} ns  ({cnt} runs, baseline veth)");
        }
    }
    println!(
        "\nload average after: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    Ok(())
}

/// The start-up row: `childflow --root -- true` and the rootless `childflow -- true`, 20
/// runs each, alternating (drift hits both alike), medians; and how long after a rootful
/// run returns its host state (veth, nft table, cgroup) is gone, since the kernel's
/// teardown finishes behind it (see `childflow/src/backend/rootful/linger.rs`).
fn startup(bin: &str) -> Result<()> {
    const RUNS: usize = 20;
    let timed = |args: &[&str]| -> Result<(f64, u32)> {
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .spawn()
            .with_context(|| format!("failed to start {bin}"))?;
        let pid = child.id();
        if !child.wait()?.success() {
            bail!("{bin} {} failed", args.join(" "));
        }
        Ok((started.elapsed().as_secs_f64() * 1e3, pid))
    };
    let host_state = |pid: u32| {
        let id = format!("{pid:x}");
        let tables = sh(&["nft", "list", "tables"]).unwrap_or_default();
        std::path::Path::new(&format!("/sys/class/net/cf{id}h")).exists()
            || tables.contains(&format!("childflow_{id}\n"))
            || std::path::Path::new(&format!("/sys/fs/cgroup/unified/childflow-{id}")).exists()
    };
    let (mut rootful, mut rootless, mut tails) = (Vec::new(), Vec::new(), Vec::new());
    // A rootful run's last work goes on in the kernel after its host state is gone (the
    // namespace's cleanup_net, its grace periods): a run started in the meantime waits
    // for it (creating a network namespace takes the same lock). Each run gets a quiet
    // start, so the rows say what one run costs, not what the other left behind.
    let settle = || std::thread::sleep(Duration::from_millis(150));
    let mut run_rootful = || -> Result<()> {
        let (ms, pid) = timed(&["--root", "--", "true"])?;
        rootful.push(ms);
        let returned = Instant::now();
        while host_state(pid) && returned.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
        tails.push(returned.elapsed().as_secs_f64() * 1e3);
        settle();
        Ok(())
    };
    for i in 0..RUNS {
        if i % 2 == 1 {
            run_rootful()?;
        }
        rootless.push(timed(&["--", "true"])?.0);
        settle();
        if i % 2 == 0 {
            run_rootful()?;
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!("\nstart-up, {RUNS} runs each, alternating (load average {})", load.join(" "));
    println!(
        "childflow --root -- true   median {:>6.1} ms  (min {:.1} ms)",
        median(rootful.clone()),
        min(&rootful)
    );
    println!(
        "childflow -- true          median {:>6.1} ms  (min {:.1} ms)  (rootless)",
        median(rootless.clone()),
        min(&rootless)
    );
    println!(
        "rootful host state gone    median {:>6.1} ms after childflow returned (max {:.1} ms)",
        median(tails.clone()),
        tails.iter().copied().fold(0.0, f64::max)
    );
    Ok(())
}
