//! `cargo xtask bench rootful --tcx-floor`: what the kernel itself charges for attaching a
//! TC program to a fresh veth, without childflow: the floor under the rootful start-up.
//!
//! An empty `SCHED_CLS` program (`r0 = TC_ACT_UNSPEC; exit`, loaded with raw `bpf(2)`) is
//! attached to a fresh veth pair (`cftcx0`/`cftcx1`, on the host, no address, removed at
//! the end) in [`ROUNDS`] rounds, each on a new pair:
//! - TCX ingress then TCX egress (`BPF_LINK_CREATE`, one after the other), each timed;
//! - TCX ingress and egress from two threads at once (wall time of both);
//! - replacing the program of both links (`BPF_LINK_UPDATE`, in place: no grace period);
//! - closing the links (detach) of the serial pair;
//! - for comparison, classic `clsact` + one `bpf da` filter per direction through `tc`
//!   (wall time of the `tc` processes, minus a `tc qdisc show` of the same device: process
//!   start-up is not the kernel's).
//!
//! Each TCX attach waits for a full RCU grace period under RTNL (kernel/bpf/tcx.c,
//! `tcx_link_prog_attach` → `tcx_entry_sync` → `synchronize_rcu()`), so the two directions
//! serialize on RTNL whatever the caller does. With `--expedited`, a second set of rounds
//! runs with `/sys/kernel/rcu_expedited` set to 1 (restored afterwards), which turns every
//! `synchronize_rcu()` into an expedited one: the difference is the grace period's cost.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::bench::sh;

const ROUNDS: usize = 20;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// Loads `r0 = -1 (TC_ACT_UNSPEC); exit` as a SCHED_CLS program.
fn load_empty() -> Result<OwnedFd> {
    // struct bpf_insn: code, dst:4|src:4, off, imm.
    let insns: [u64; 2] = [
        0xb7 | ((-1i32 as u32 as u64) << 32), // BPF_ALU64 | BPF_MOV | BPF_K, r0 = -1
        0x95,                                 // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, (rest zero).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: bpf(2) reads `attr` and the buffers it points to, all alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_LOAD of an empty program");
    }
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_CREATE` of `prog` as a TCX link on `ifindex`.
fn tcx_attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // union bpf_attr, link_create: prog_fd, target_ifindex, attach_type, flags, tcx {...}.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    // SAFETY: as in `load_empty`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_LINK_CREATE (TCX)");
    }
    // SAFETY: as in `load_empty`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: `link` runs `prog` from now on.
fn link_update(link: &OwnedFd, prog: &OwnedFd) -> Result<()> {
    use std::os::fd::AsRawFd;
    // union bpf_attr, link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as in `load_empty`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_LINK_UPDATE (TCX)");
    }
    Ok(())
}

/// A veth pair `cftcx0`/`cftcx1`, up, deleted when dropped.
struct Veth(u32);

impl Veth {
    fn new() -> Result<Veth> {
        let _ = sh(&["ip", "link", "del", "cftcx0"]);
        sh(&["ip", "link", "add", "cftcx0", "type", "veth", "peer", "name", "cftcx1"])?;
        // From here on, the guard deletes the pair whatever fails.
        let mut veth = Veth(0);
        sh(&["ip", "link", "set", "cftcx0", "up"])?;
        let index = std::fs::read_to_string("/sys/class/net/cftcx0/ifindex")?;
        veth.0 = index.trim().parse().context("ifindex of cftcx0")?;
        Ok(veth)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", "cftcx0"]);
    }
}

/// Sets `/sys/kernel/rcu_expedited` to 1 and restores the old value when dropped.
struct Expedited(String);

impl Expedited {
    const PATH: &str = "/sys/kernel/rcu_expedited";
    fn enable() -> Result<Expedited> {
        let old = std::fs::read_to_string(Self::PATH).context("reading rcu_expedited")?;
        std::fs::write(Self::PATH, "1").context("setting rcu_expedited")?;
        Ok(Expedited(old.trim().to_owned()))
    }
}

impl Drop for Expedited {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Wall time of `tc args…` in ms.
fn tc_ms(args: &[&str]) -> Result<f64> {
    let started = Instant::now();
    let mut all = vec!["tc"];
    all.extend_from_slice(args);
    sh(&all)?;
    Ok(ms(started))
}

/// One set of [`ROUNDS`] rounds; prints one line per measured step.
fn rounds(label: &str, obj: &str) -> Result<()> {
    let prog = load_empty()?;
    let other = load_empty()?;
    let (mut ingress, mut egress, mut both, mut parallel, mut close, mut update) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut qdisc, mut filter_in, mut filter_out, mut show) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        {
            let veth = Veth::new()?;
            let t = Instant::now();
            let a = tcx_attach(&prog, veth.0, BPF_TCX_INGRESS)?;
            ingress.push(ms(t));
            let t2 = Instant::now();
            let b = tcx_attach(&prog, veth.0, BPF_TCX_EGRESS)?;
            egress.push(ms(t2));
            both.push(ms(t));
            let t = Instant::now();
            link_update(&a, &other)?;
            link_update(&b, &other)?;
            update.push(ms(t));
            let t = Instant::now();
            drop((a, b));
            close.push(ms(t));
        }
        {
            let veth = Veth::new()?;
            let t = Instant::now();
            let links = std::thread::scope(|s| {
                let i = s.spawn(|| tcx_attach(&prog, veth.0, BPF_TCX_INGRESS));
                let e = s.spawn(|| tcx_attach(&prog, veth.0, BPF_TCX_EGRESS));
                (i.join(), e.join())
            });
            parallel.push(ms(t));
            let (Ok(i), Ok(e)) = links else { bail!("an attach thread panicked") };
            drop((i?, e?));
        }
        {
            let _veth = Veth::new()?;
            show.push(tc_ms(&["qdisc", "show", "dev", "cftcx0"])?);
            qdisc.push(tc_ms(&["qdisc", "add", "dev", "cftcx0", "clsact"])?);
            for (dir, v) in [("ingress", &mut filter_in), ("egress", &mut filter_out)] {
                v.push(tc_ms(&[
                    "filter", "add", "dev", "cftcx0", dir, "bpf", "da", "obj", obj, "sec", "tc",
                ])?);
            }
        }
    }
    let show = median(show);
    println!("{label}: {ROUNDS} rounds, a fresh veth each; median (min)");
    let row = |what: &str, v: Vec<f64>, minus: f64| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min) - minus;
        println!("  {what:<44} {:>6.1} ms  ({min:.1})", median(v) - minus);
    };
    row("TCX ingress attach (first link)", ingress, 0.0);
    row("TCX egress attach (after ingress)", egress, 0.0);
    row("TCX ingress + egress, serial", both, 0.0);
    row("TCX ingress + egress, two threads (wall)", parallel, 0.0);
    row("BPF_LINK_UPDATE of both links (new program)", update, 0.0);
    row("close both TCX links (detach)", close, 0.0);
    println!("  (tc process start-up, `tc qdisc show`: {show:.1} ms, subtracted below)");
    row("tc qdisc add clsact", qdisc, show);
    row("tc filter add ingress bpf da (incl. load)", filter_in, show);
    row("tc filter add egress bpf da (incl. load)", filter_out, show);
    Ok(())
}

pub fn run(expedited: bool) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("cfbench-tcx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let obj = crate::bench_rootful::assemble_empty(&dir)?;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("TCX attach floor; load average {}", load().trim());
    let result = rounds("rcu_expedited as is", &obj).and_then(|()| {
        if expedited {
            let _expedited = Expedited::enable()?;
            rounds("rcu_expedited=1 (restored after)", &obj)
        } else {
            Ok(())
        }
    });
    println!("load average after: {}", load().trim());
    let _ = std::fs::remove_dir_all(&dir);
    result
}
