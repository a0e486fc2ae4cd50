//! `cargo xtask bench rootful --prog-run [OBJECT...]`: the CPU cost of childflow's packet
//! programs per packet type, measured with `BPF_PROG_TEST_RUN` (`repeat`), which does not
//! depend on the machine's load the way `bpf_stats` under real traffic does.
//!
//! Each object (default: the newest `childflow.bpf.o` under `target/`) is loaded the way
//! childflow loads it (`CONFIG` with capture off and `FILTER` empty, both written and frozen
//! before the programs are verified), and `cf_tc` (once per direction, see [`PROGRAMS`]) and
//! `cf_skb_egress` run [`REPEAT`] times on each packet of [`packets`]: the first run creates
//! the flow, the rest are packets of an existing flow. Objects are run interleaved, in
//! [`ROUNDS`] rounds (order reversed every other round); the table has the medians in ns per
//! run. The kernel's test-run loop costs ~31 ns per run on the dev VM by itself (an empty
//! classifier, `r0 = -1; exit`, measured with `bpftool prog run`), so the numbers are the
//! program plus that floor. Nothing here measures cache misses of real traffic (the
//! packet and the flow entry stay hot in the loop): confirm with the `bpf_stats` rows.
//!
//! Each object's table also shows, per program, the instructions the verifier processed
//! (`verified_insns`), the translated and JIT-compiled sizes in bytes, and the load time.
//!
//! `--check` instead runs [`CHECK_FLOWS`] flows (more than the kernel's `SLOT_COUNT`
//! places, so some flows keep their counters in their `FLOWS` entry), each a different
//! number of packets each way, through the TC programs and checks every flow's counters as
//! read back the way childflow reads them (an object with a `SLOTS` map: entry or slot).
//!
//! With `CF_CAPTURE=1` every object is loaded as for a capture with a one-term filter.
//!
//! `--load-only` stops there: only those figures, no test runs. `--verifier` instead prints
//! the verifier's statistics per program (see the `verifier` module).
//!
//! `--pair` instead runs the data segment through `cf_tc` out of the command on CPU 0 and
//! the ACK of the same flow into it on CPU 1 at once: what sharing one flow entry between
//! two CPUs costs.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::Program,
};
use childflow_common::{
    event::{CAPTURE_MAX, CaptureConfig},
    filter,
};

const ROUNDS: usize = 9;
const REPEAT: u32 = 500_000;
/// What runs: (row, program, `ingress_ifindex` of the test packets). A test run cannot set
/// the `tc_classid` by which `cf_tc` tells the directions apart on its filters, so it reads
/// the direction from `ingress_ifindex` there: set, out of the command; 0, into it
/// (`direction` in childflow-ebpf's tc.rs).
const PROGRAMS: [(&str, &str, u32); 3] =
    [("cf_tc out", "cf_tc", 1), ("cf_tc in", "cf_tc", 0), ("cf_skb_egress", "cf_skb_egress", 0)];

/// The `ingress_ifindex` that row `label`'s test packets carry.
fn ingress_of(label: &str) -> u32 {
    PROGRAMS.iter().find(|(l, _, _)| *l == label).map_or(0, |(_, _, i)| *i)
}

/// Writes `v` into slot 0 of array map `name` and freezes the map (`BPF_MAP_FREEZE`).
fn freeze<V: aya::Pod>(ebpf: &mut Ebpf, name: &str, v: V) -> Result<()> {
    let map = ebpf.map_mut(name).with_context(|| format!("no map {name}"))?;
    let mut array: Array<&mut MapData, V> = Array::try_from(map)?;
    array.set(0, v, 0)?;
    let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
        bail!("map {name} is not an array");
    };
    // BPF_MAP_FREEZE (22): attr is the map fd.
    let attr = [data.fd().as_fd().as_raw_fd() as u32, 0u32];
    // SAFETY: a valid bpf_attr prefix for BPF_MAP_FREEZE, 8 bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 22, attr.as_ptr(), 8) };
    if rc != 0 {
        bail!("failed to freeze map {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// An Ethernet + IPv4 frame from 10.77.0.2:40000 (the command's side) to
/// 198.18.250.2:5201, TCP with `flags` or UDP, with `payload` zero bytes.
fn packet(proto: u8, flags: u8, payload: usize) -> Vec<u8> {
    let l4 = if proto == 6 { 20 } else { 8 };
    let mut pkt = vec![0u8; 14 + 20 + l4 + payload];
    pkt[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    pkt[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    pkt[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut pkt[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4 + payload) as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&[10, 77, 0, 2]);
    ip[16..20].copy_from_slice(&[198, 18, 250, 2]);
    let t = &mut pkt[34..34 + l4];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    if proto == 6 {
        t[12] = 5 << 4;
        t[13] = flags;
    } else {
        t[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    }
    pkt
}

/// The same frame in the other direction (addresses and ports swapped).
fn reversed(mut p: Vec<u8>) -> Vec<u8> {
    let (src, dst) = (p[26..30].to_vec(), p[30..34].to_vec());
    p[26..30].copy_from_slice(&dst);
    p[30..34].copy_from_slice(&src);
    let (sp, dp) = (p[34..36].to_vec(), p[36..38].to_vec());
    p[34..36].copy_from_slice(&dp);
    p[36..38].copy_from_slice(&sp);
    p
}

/// The packet types of the table: a bulk TCP data segment (1448 bytes of payload), a pure
/// ACK, a 64-byte UDP datagram (IP length), a SYN.
fn packets() -> [(&'static str, Vec<u8>); 4] {
    [
        ("bulk TCP", packet(6, 0x10, 1448)),
        ("pure ACK", packet(6, 0x10, 0)),
        ("UDP 64", packet(17, 0, 36)),
        ("SYN", packet(6, 0x02, 0)),
    ]
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (include/uapi/linux/bpf.h, `test`).
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Average ns per run of program `fd` on `pkt` arriving on `ingress_ifindex` (0: none),
/// over `repeat` runs (the kernel's figure).
fn test_run(fd: i32, ingress_ifindex: u32, pkt: &[u8], repeat: u32) -> Result<u32> {
    let mut out = vec![0u8; pkt.len() + 256];
    // The head of a `struct __sk_buff` up to `ingress_ifindex` (the 10th word); the kernel
    // zeroes the rest.
    let mut ctx = [0u32; 10];
    ctx[9] = ingress_ifindex;
    let mut attr = TestRun {
        ctx_size_in: if ingress_ifindex != 0 { size_of_val(&ctx) as u32 } else { 0 },
        ctx_in: if ingress_ifindex != 0 { ctx.as_mut_ptr() as u64 } else { 0 },
        prog_fd: fd as u32,
        data_size_in: pkt.len() as u32,
        data_size_out: out.len() as u32,
        data_in: pkt.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: BPF_PROG_TEST_RUN (10) with a complete attr whose buffers outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, 10, &mut attr as *mut TestRun, size_of::<TestRun>())
    };
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN failed: {}", std::io::Error::last_os_error());
    }
    Ok(attr.duration)
}

fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("failed to pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A loaded object: its programs' fds by name (the `Ebpf` keeps them open).
pub(crate) struct Loaded {
    pub(crate) path: String,
    pub(crate) ebpf: Ebpf,
    fds: Vec<(&'static str, i32)>,
    /// Per program: instructions the verifier processed, translated and JIT-compiled
    /// bytes, and how long its load (verification) took.
    stats: Vec<(u32, u32, u32, f64)>,
    ids: Vec<u32>,
}

/// The object at `path` with its maps created and `CONFIG` and `FILTER` written and frozen
/// as childflow does it, no program loaded yet.
pub(crate) fn load_maps_only(path: &str) -> Result<Ebpf> {
    load_maps(path, EbpfLoader::new())
}

fn load_maps(path: &str, mut loader: EbpfLoader) -> Result<Ebpf> {
    let obj = std::fs::read(path).with_context(|| format!("failed to read {path}"))?;
    loader.btf(None);
    let mut ebpf = loader.load(&obj).with_context(|| format!("failed to load {path}"))?;
    // CF_CAPTURE=1: loaded as for a capture with a filter (one predicate), the programs'
    // other configuration and the one whose verification costs most.
    let capture = std::env::var_os("CF_CAPTURE").is_some();
    freeze(
        &mut ebpf,
        "CONFIG",
        CaptureConfig { capture_all: capture as u32, snaplen: CAPTURE_MAX, clone_ifindex: 0 },
    )?;
    let mut program = filter::Program::default();
    if capture {
        program.len = 1;
        program.insns[0].op = filter::op::PRED;
        program.insns[0].field = filter::field::PROTO;
        program.insns[0].proto = 6;
    }
    freeze(&mut ebpf, "FILTER", program)?;
    Ok(ebpf)
}

pub(crate) fn load(path: &str) -> Result<Loaded> {
    let mut loader = EbpfLoader::new();
    // CF_VERIFIER_LOG=FILE: on a load failure, the verifier's log (with the per-instruction
    // walk and its statistics) goes to FILE. A program that fails only after the walk (too
    // much stack across calls, say) shows where the verifier spends its instructions.
    // (With `--verifier`, CF_VERIFIER_LOG=DIR gets the log of a successful load.)
    let log_file = std::env::var_os("CF_VERIFIER_LOG");
    if log_file.is_some() {
        loader.verifier_log_level(aya::VerifierLogLevel::DEBUG | aya::VerifierLogLevel::STATS);
    }
    let mut ebpf = load_maps(path, loader)?;
    let mut fds: Vec<(&'static str, i32)> = Vec::new();
    let mut stats: Vec<(u32, u32, u32, f64)> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    for (label, name, _) in PROGRAMS {
        if let Some(i) = PROGRAMS.iter().position(|(_, n, _)| *n == name)
            && PROGRAMS[i].0 != label
        {
            // Loaded for an earlier row: the same program and figures.
            let (fd, stat, id) = (fds[i].1, stats[i], ids[i]);
            fds.push((label, fd));
            stats.push(stat);
            ids.push(id);
            continue;
        }
        let prog = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
        let started = std::time::Instant::now();
        let keep_log = |e: aya::programs::ProgramError| {
            if let (Some(file), aya::programs::ProgramError::LoadError { verifier_log, .. }) =
                (&log_file, &e)
            {
                let _ = std::fs::write(file, verifier_log.to_string());
            }
            e
        };
        let (fd, info) = match prog {
            Program::SchedClassifier(p) => {
                p.load().map_err(keep_log)?;
                (p.fd()?.as_fd().as_raw_fd(), p.info()?)
            }
            Program::CgroupSkb(p) => {
                p.load()?;
                (p.fd()?.as_fd().as_raw_fd(), p.info()?)
            }
            _ => bail!("{name} is not a TC or cgroup_skb program"),
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        stats.push((
            info.verified_instruction_count().unwrap_or(0),
            info.size_translated().unwrap_or(0),
            info.size_jitted(),
            ms,
        ));
        ids.push(info.id());
        fds.push((label, fd));
    }
    // Loaded too for `bench rootful --costs-ab`, which attaches the cgroup programs: without
    // it no socket has an owner and `cf_skb_egress` takes its slow path on every packet.
    match ebpf.program_mut("cf_sock_create") {
        Some(Program::CgroupSock(p)) => p.load()?,
        _ => bail!("no cgroup/sock_create program cf_sock_create"),
    }
    Ok(Loaded { path: path.to_owned(), ebpf, fds, stats, ids })
}

/// The newest `childflow.bpf.o` a build left under `target/`.
fn newest_object() -> Result<String> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for profile in ["debug", "release"] {
        let Ok(dirs) = std::fs::read_dir(crate::root().join("target").join(profile).join("build"))
        else {
            continue;
        };
        for dir in dirs.flatten() {
            let obj = dir.path().join("out/childflow.bpf.o");
            if let Ok(modified) = obj.metadata().and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(t, _)| modified > *t)
            {
                best = Some((modified, obj));
            }
        }
    }
    let (_, obj) = best.context("no childflow.bpf.o under target/: build childflow first")?;
    Ok(obj.to_str().context("object path is not UTF-8")?.to_owned())
}

pub(crate) fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

pub fn run(args: &[String]) -> Result<()> {
    let pair = args.iter().any(|a| a == "--pair");
    let mut objects: Vec<String> = args.iter().filter(|a| !a.starts_with("--")).cloned().collect();
    if objects.is_empty() {
        objects.push(newest_object()?);
    }
    if args.iter().any(|a| a == "--verifier") {
        return crate::verifier::run(&objects);
    }
    let loaded = objects.iter().map(|o| load(o)).collect::<Result<Vec<_>>>()?;
    println!(
        "BPF_PROG_TEST_RUN, {REPEAT} runs per figure, median of {ROUNDS} interleaved rounds, ns \
         per run (test-run floor ~31 ns included); load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    if pair {
        return run_pair(&loaded);
    }
    if args.iter().any(|a| a == "--check") {
        return check(&loaded);
    }
    if args.iter().any(|a| a == "--load-only") {
        for l in &loaded {
            println!("{}", l.path);
            for ((name, _), (verified, xlated, jited, ms)) in l.fds.iter().zip(&l.stats) {
                println!(
                    "  {name:<16} verified {verified:>6}  xlated {xlated:>6}  jited {jited:>5}  load {ms:>6.1} ms"
                );
            }
            // CF_DUMP=DIR: each program's translated code (`bpftool prog dump xlated`) to
            // DIR/<object>.<program>.xlated, to see what the verifier and JIT were given.
            if let Some(dir) = std::env::var_os("CF_DUMP") {
                let stem = std::path::Path::new(&l.path).file_stem().unwrap_or_default();
                for ((name, _), id) in l.fds.iter().zip(&l.ids) {
                    let out = crate::bench_rootful::sh_pub(&[
                        "bpftool",
                        "prog",
                        "dump",
                        "xlated",
                        "id",
                        &id.to_string(),
                    ])?;
                    let file = std::path::Path::new(&dir)
                        .join(format!("{}.{name}.xlated", stem.to_string_lossy()));
                    std::fs::write(file, out)?;
                }
            }
        }
        return Ok(());
    }
    let pkts = packets();
    // ns[object][program][packet]: one figure per round.
    let mut ns = vec![vec![vec![Vec::new(); pkts.len()]; PROGRAMS.len()]; loaded.len()];
    for round in 0..ROUNDS {
        for i in 0..loaded.len() {
            let k = if round % 2 == 0 { i } else { loaded.len() - 1 - i };
            for (p, (label, fd)) in loaded[k].fds.iter().enumerate() {
                for (q, (_, pkt)) in pkts.iter().enumerate() {
                    ns[k][p][q].push(test_run(*fd, ingress_of(label), pkt, REPEAT)?);
                }
            }
        }
    }
    for (k, l) in loaded.iter().enumerate() {
        println!("\n{}", l.path);
        print!("{:<16}", "");
        for (name, _) in &pkts {
            print!("{name:>10}");
        }
        println!("  verified  xlated  jited  load ms");
        for (p, (name, _)) in l.fds.iter().enumerate() {
            print!("{name:<16}");
            for runs in &ns[k][p] {
                print!("{:>10}", median(runs.clone()));
            }
            let (verified, xlated, jited, ms) = l.stats[p];
            println!("  {verified:>8}  {xlated:>6}  {jited:>5}  {ms:>7.1}");
        }
    }
    println!(
        "\nload average after: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    Ok(())
}

/// See the module doc (`--pair`).
fn run_pair(loaded: &[Loaded]) -> Result<()> {
    let data = packet(6, 0x10, 1448);
    let ack = reversed(packet(6, 0x10, 0));
    let mut ns = vec![(Vec::new(), Vec::new()); loaded.len()];
    for round in 0..ROUNDS {
        for i in 0..loaded.len() {
            let k = if round % 2 == 0 { i } else { loaded.len() - 1 - i };
            let fd = |n: &str| loaded[k].fds.iter().find(|(m, _)| *m == n).map(|(_, fd)| *fd);
            let (out, into) = (fd("cf_tc out").unwrap(), fd("cf_tc in").unwrap());
            let (d, a) = (data.clone(), ack.clone());
            let t0 = std::thread::spawn(move || {
                pin_to(0).and_then(|()| test_run(out, ingress_of("cf_tc out"), &d, REPEAT))
            });
            let t1 = std::thread::spawn(move || {
                pin_to(1).and_then(|()| test_run(into, ingress_of("cf_tc in"), &a, REPEAT))
            });
            ns[k].0.push(t0.join().map_err(|_| anyhow::anyhow!("test-run thread panicked"))??);
            ns[k].1.push(t1.join().map_err(|_| anyhow::anyhow!("test-run thread panicked"))??);
        }
    }
    for (l, (i, e)) in loaded.iter().zip(ns) {
        println!(
            "{}: at once, cf_tc out (data, CPU 0) {} ns, cf_tc in (ACK, CPU 1) {} ns",
            l.path,
            median(i),
            median(e)
        );
    }
    Ok(())
}

/// Flows of `--check`.
const CHECK_FLOWS: u16 = 6000;

/// See the module doc (`--check`).
fn check(loaded: &[Loaded]) -> Result<()> {
    use childflow_common::flow::{FlowEntry, FlowKey, FlowSlot, FlowStats, NO_SLOT};
    for l in loaded {
        let fd = |n: &str| l.fds.iter().find(|(m, _)| *m == n).map(|(_, fd)| *fd).unwrap();
        let (tc_out, tc_in) = (fd("cf_tc out"), fd("cf_tc in"));
        let (mut sent, mut bytes) = (0u64, 0u64);
        for i in 0..CHECK_FLOWS {
            let mut p = packet(17, 0, 10 + (i as usize % 50));
            p[34..36].copy_from_slice(&(10000 + i).to_be_bytes());
            let (out, back) = (1 + (i as u32 % 3), 1 + (i as u32 % 2));
            for _ in 0..out {
                test_run(tc_out, ingress_of("cf_tc out"), &p, 1)?;
            }
            for _ in 0..back {
                test_run(tc_in, ingress_of("cf_tc in"), &reversed(p.clone()), 1)?;
            }
            sent += (out + back) as u64;
            bytes += (out + back) as u64 * (p.len() as u64 - 14);
        }
        let flows: Vec<(FlowKey, FlowStats)> = if let Some(slots) = l.ebpf.map("SLOTS") {
            let slots: aya::maps::Array<&MapData, FlowSlot> = aya::maps::Array::try_from(slots)?;
            let map: aya::maps::HashMap<&MapData, FlowKey, FlowEntry> =
                aya::maps::HashMap::try_from(l.ebpf.map("FLOWS").context("no FLOWS")?)?;
            map.iter()
                .flatten()
                .map(|(k, e)| match e.slot {
                    NO_SLOT => Ok((k, e.stats)),
                    s => Ok((k, slots.get(&s, 0)?.stats())),
                })
                .collect::<Result<_>>()?
        } else {
            let map: aya::maps::HashMap<&MapData, FlowKey, FlowStats> =
                aya::maps::HashMap::try_from(l.ebpf.map("FLOWS").context("no FLOWS")?)?;
            map.iter().flatten().collect()
        };
        let mut bad = 0;
        for (k, st) in &flows {
            let i = k.local_port - 10000;
            let want = [1 + (i as u64 % 3), 1 + (i as u64 % 2)];
            let len = 20 + 8 + 10 + (i as u64 % 50);
            if st.packets != want || st.bytes != [want[0] * len, want[1] * len] {
                bad += 1;
            }
        }
        let total: u64 = flows.iter().map(|(_, s)| s.packets[0] + s.packets[1]).sum();
        let total_bytes: u64 = flows.iter().map(|(_, s)| s.bytes[0] + s.bytes[1]).sum();
        println!(
            "{}: {} flows (want {CHECK_FLOWS}), {total} packets (want {sent}), {total_bytes} bytes \
             (want {bytes}), {bad} flows with wrong counters",
            l.path,
            flows.len()
        );
        if flows.len() != CHECK_FLOWS as usize || total != sent || total_bytes != bytes || bad > 0 {
            bail!("{}: the counters are wrong", l.path);
        }
    }
    Ok(())
}
