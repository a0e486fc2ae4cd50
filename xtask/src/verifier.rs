//! `cargo xtask bench rootful --prog-run --verifier [OBJECT...]`: what the verifier does with
//! each of childflow's programs, loaded as childflow loads them (maps created by aya, `CONFIG`
//! and `FILTER` written and frozen first; `CF_CAPTURE=1` as for a capture with a filter).
//!
//! aya keeps the verifier's log only when a load fails, so each program is loaded here a
//! second time with a raw `BPF_PROG_LOAD` on the same maps: the object parsed and relocated
//! with `aya-obj` exactly as aya does it (BTF fixed up and loaded, `Object::relocate_maps`,
//! `relocate_calls`, each program with its function and line information). Printed per
//! program: the
//! verifier's statistics (`BPF_LOG_STATS`: processed instructions, states, peak states,
//! stack depth, and the kernel's own verification time), as the median of [`ROUNDS`]
//! interleaved loads of the objects given. `CF_VERIFIER_LOG=DIR` also writes each
//! program's full log (level 2: every instruction with its register state) to
//! `DIR/<object>.<program>.log`.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, bail};
use aya::maps::Map;

/// Loads per object and program; the figures are medians (the verification time also its
/// minimum: the least disturbed by other work on the machine). `CF_ROUNDS=N` overrides.
const ROUNDS: usize = 11;

/// Programs and their types (`BPF_PROG_TYPE_*`, `BPF_CGROUP_*` from include/uapi/linux/bpf.h).
const PROGRAMS: [(&str, u32, u32); 3] = [
    ("cf_tc", 3 /* SCHED_CLS */, 0),
    ("cf_skb_egress", 8 /* CGROUP_SKB */, 1 /* BPF_CGROUP_INET_EGRESS */),
    ("cf_sock_create", 9 /* CGROUP_SOCK */, 2 /* BPF_CGROUP_INET_SOCK_CREATE */),
];

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    /// Named so that it is zeroed: the kernel reads it (padding would be garbage).
    attach_btf_id: u32,
}

/// `union bpf_attr` for `BPF_BTF_LOAD`.
#[repr(C)]
#[derive(Default)]
struct BtfLoad {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    /// Named so that it is zeroed (see `ProgLoad::attach_btf_id`).
    btf_log_true_size: u32,
}

/// One program, relocated: its instructions and, if the object has BTF, its function and
/// line information (what aya passes: with it the verifier knows which subprograms are
/// global, and verifies those once on their own).
struct Prog {
    name: &'static str,
    ty: u32,
    attach: u32,
    function: aya_obj::Function,
}

/// One object with its maps created and each program's relocated instructions.
struct Prepared {
    path: String,
    /// Keeps the maps open.
    _ebpf: aya::Ebpf,
    /// The object's BTF, loaded into the kernel (closed with the process).
    btf_fd: Option<i32>,
    progs: Vec<Prog>,
}

/// Loads the object's BTF as aya does (fixed up for this kernel's features).
fn load_btf(obj: &mut aya_obj::Object) -> Result<Option<i32>> {
    let Some(features) = aya::features().btf() else { return Ok(None) };
    let Some(btf) = obj.fixup_and_sanitize_btf(features).context("fixing up the BTF")? else {
        return Ok(None);
    };
    let bytes = btf.to_bytes();
    let attr =
        BtfLoad { btf: bytes.as_ptr() as u64, btf_size: bytes.len() as u32, ..Default::default() };
    // SAFETY: BPF_BTF_LOAD (18) with an attr whose buffer outlives the call.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, 18, &attr as *const BtfLoad, size_of::<BtfLoad>()) };
    if fd < 0 {
        bail!("BTF_LOAD failed: {}", std::io::Error::last_os_error());
    }
    Ok(Some(fd as i32))
}

fn map_fd(map: &Map) -> Option<i32> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

fn prepare(path: &str) -> Result<Prepared> {
    // Maps as `--prog-run` (and childflow) make them.
    let loaded = crate::bench_progrun::load_maps_only(path)?;
    let bytes = std::fs::read(path).with_context(|| format!("failed to read {path}"))?;
    let mut obj = aya_obj::Object::parse(&bytes).context("failed to parse the object")?;
    let btf_fd = load_btf(&mut obj)?;
    let maps: Vec<(String, aya_obj::Map)> =
        obj.maps.iter().map(|(n, m)| (n.clone(), m.clone())).collect();
    let mut with_fds = Vec::new();
    for (name, m) in &maps {
        let map = loaded.map(name).with_context(|| format!("aya made no map {name}"))?;
        let fd = map_fd(map).with_context(|| format!("map {name}: unexpected type"))?;
        with_fds.push((name.as_str(), fd, m));
    }
    let text = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(with_fds.into_iter(), &text).context("relocating maps")?;
    obj.relocate_calls(&text).context("relocating calls")?;
    let mut progs = Vec::new();
    for (name, ty, attach) in PROGRAMS {
        let prog = obj.programs.get(name).with_context(|| format!("no program {name}"))?;
        let function = obj.functions[&prog.function_key()].clone();
        progs.push(Prog { name, ty, attach, function });
    }
    Ok(Prepared { path: path.to_owned(), _ebpf: loaded, btf_fd, progs })
}

/// Loads `insns` with the verifier's log at `level`; returns the log (the program is
/// closed at once).
fn load_logged(prog: &Prog, btf_fd: Option<i32>, level: u32) -> Result<String> {
    let Prog { name, ty, attach, function: f } = prog;
    let insns = &f.instructions;
    let mut log = vec![0u8; if level & 3 != 0 { 1 << 28 } else { 1 << 16 }];
    let license = c"Dual MIT/GPL";
    let mut attr = ProgLoad {
        prog_type: *ty,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: level,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: *attach,
        ..Default::default()
    };
    if let Some(btf_fd) = btf_fd {
        attr.prog_btf_fd = btf_fd as u32;
        let (func, line) = (&f.func_info.func_info, &f.line_info.line_info);
        if !func.is_empty() {
            attr.func_info_rec_size = f.func_info_rec_size as u32;
            attr.func_info = func.as_ptr() as u64;
            attr.func_info_cnt = func.len() as u32;
        }
        if !line.is_empty() {
            attr.line_info_rec_size = f.line_info_rec_size as u32;
            attr.line_info = line.as_ptr() as u64;
            attr.line_info_cnt = line.len() as u32;
        }
    }
    let n = name.len().min(15);
    attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: BPF_PROG_LOAD (5) with an attr whose buffers outlive the call; the kernel
    // zero-fills the rest of its union.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 5, &mut attr as *mut ProgLoad, size_of::<ProgLoad>())
    };
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).into_owned();
    if fd < 0 {
        let tail = &text[text.len().saturating_sub(3000)..];
        bail!("{name} failed to load: {}\n...{tail}", std::io::Error::last_os_error());
    }
    // SAFETY: a program fd the kernel just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok(text)
}

/// A number after `key` in the statistics lines (`processed 6477 insns`, `total_states 3`).
fn stat(log: &str, key: &str) -> Option<u64> {
    let at = log.rfind(key)? + key.len();
    log[at..].split_whitespace().next()?.parse().ok()
}

pub fn run(objects: &[String]) -> Result<()> {
    let prepared = objects.iter().map(|o| prepare(o)).collect::<Result<Vec<_>>>()?;
    let rounds = std::env::var("CF_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    println!(
        "verifier statistics (BPF_LOG_STATS), median of {rounds} interleaved loads; load \
         average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    // What childflow's loader thread does before any program is verified: aya parses the
    // object, loads its BTF and creates the maps (aya's feature probes, once per process,
    // are done by now: `prepare` loaded every object once).
    let mut aya_ms = vec![Vec::new(); prepared.len()];
    let bytes: Vec<Vec<u8>> =
        prepared.iter().map(|p| std::fs::read(&p.path)).collect::<Result<_, _>>()?;
    for round in 0..rounds {
        for i in 0..prepared.len() {
            let k = if round % 2 == 0 { i } else { prepared.len() - 1 - i };
            // `EbpfLoader::new` parses the kernel's BTF (childflow avoids that, see its
            // `loader_without_kernel_btf`): not timed. The packet ring as without capture.
            let mut loader = aya::EbpfLoader::new();
            loader.btf(None).map_max_entries("PACKETS", 1 << 20);
            let started = std::time::Instant::now();
            let ebpf = loader.load(&bytes[k])?;
            aya_ms[k].push((started.elapsed().as_secs_f64() * 1e6) as u32);
            drop(ebpf);
        }
    }
    // [object][program][round] -> log
    let mut logs = vec![vec![Vec::new(); PROGRAMS.len()]; prepared.len()];
    for round in 0..rounds {
        for i in 0..prepared.len() {
            let k = if round % 2 == 0 { i } else { prepared.len() - 1 - i };
            for (p, prog) in prepared[k].progs.iter().enumerate() {
                logs[k][p].push(load_logged(prog, prepared[k].btf_fd, 4)?);
            }
        }
    }
    let keys = [
        ("min us", "verification time"),
        ("verify us", "verification time"),
        ("processed", "processed"),
        ("states", "total_states"),
        ("peak", "peak_states"),
        ("max/insn", "max_states_per_insn"),
        ("mark_read", "mark_read"),
    ];
    for (k, prep) in prepared.iter().enumerate() {
        println!("\n{}", prep.path);
        println!(
            "aya load (parse, BTF, maps): median {} us, min {} us",
            crate::bench_progrun::median(aya_ms[k].clone()),
            aya_ms[k].iter().min().copied().unwrap_or(0)
        );
        print!("{:<16}{:>6}", "", "insns");
        for (label, _) in keys {
            print!("{label:>11}");
        }
        println!("  stack");
        for (p, prog) in prep.progs.iter().enumerate() {
            print!("{:<16}{:>6}", prog.name, prog.function.instructions.len());
            for (label, key) in keys {
                let v: Vec<u32> =
                    logs[k][p].iter().map(|l| stat(l, key).unwrap_or(0) as u32).collect();
                let figure = if label == "min us" {
                    v.iter().copied().min().unwrap_or(0)
                } else {
                    crate::bench_progrun::median(v)
                };
                print!("{figure:>11}");
            }
            let last = &logs[k][p][0];
            let stack = last
                .lines()
                .find(|l| l.starts_with("stack depth"))
                .map_or("", |l| l.trim_start_matches("stack depth "));
            println!("  {stack}");
        }
        if let Some(dir) = std::env::var_os("CF_VERIFIER_LOG") {
            let stem = std::path::Path::new(&prep.path).file_stem().unwrap_or_default();
            for prog in &prep.progs {
                let log = load_logged(
                    prog,
                    prep.btf_fd,
                    std::env::var("CF_LOG_LEVEL").ok().and_then(|l| l.parse().ok()).unwrap_or(2),
                )?;
                let file = std::path::Path::new(&dir).join(format!(
                    "{}.{}.log",
                    stem.to_string_lossy(),
                    prog.name
                ));
                std::fs::write(&file, log)
                    .with_context(|| format!("failed to write {}", file.display()))?;
            }
        }
    }
    println!(
        "\nload average after: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    Ok(())
}
