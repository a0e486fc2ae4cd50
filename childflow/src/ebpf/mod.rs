//! Loading childflow's kernel programs (built from `childflow-ebpf/` at build time) and
//! reading what they collect.
//!
//! Every attachment is owned: dropping the returned value detaches the programs and frees the
//! maps. If the process dies, the kernel does the same: cgroup links with their fds, the TC
//! filters with the interface they are on (see [`Accounting::attach_to`]); nothing is
//! pinned.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, LinkOrder, ProgramError,
        SchedClassifier, TcAttachType, tc::TcAttachOptions,
    },
};
use childflow_common::{
    event::{CaptureConfig, DROP_COUNTERS},
    flow::{FlowKey, FlowStats},
};

/// The object built from `childflow-ebpf/` by `build.rs`; `None` in a rootless-only build.
#[cfg(feature = "ebpf")]
pub const OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/childflow.bpf.o")));
#[cfg(not(feature = "ebpf"))]
pub const OBJECT: Option<&[u8]> = None;

/// Why the kernel programs could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// This binary was built without the `ebpf` feature.
    #[error(
        "this childflow was built without its eBPF programs (rootless-only); rebuild with \
         `cargo xtask setup && cargo build --release` to use --root"
    )]
    NotBuilt,
    /// A kernel feature the programs need is missing.
    #[error("the kernel lacks {what}: {fix}")]
    MissingFeature { what: &'static str, fix: &'static str },
    /// The object could not be parsed or its maps created.
    #[error("failed to load childflow's eBPF object")]
    Object(#[source] aya::EbpfError),
    /// The verifier (or the kernel) rejected a program.
    #[error("the kernel rejected eBPF program {program}{}", verifier_log(.source))]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching a program to an interface failed.
    #[error("failed to attach eBPF program {program} to {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    /// Attaching a program to the run's cgroup failed.
    #[error("failed to attach eBPF program {program} to the run's cgroup")]
    AttachCgroup {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Writing a map (the capture settings) failed.
    #[error("failed to write eBPF map {name}")]
    MapWrite {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A map could not be frozen after its settings were written.
    #[error("failed to freeze eBPF map {name}")]
    Freeze {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A map the object should contain is missing or has the wrong type.
    #[error("eBPF map {name} is missing or malformed")]
    Map {
        name: &'static str,
        #[source]
        source: Option<aya::maps::MapError>,
    },
}

fn verifier_log(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { verifier_log, .. } => format!("; verifier log:\n{verifier_log}"),
        _ => String::new(),
    }
}

/// Checks, before touching the host, that this kernel can run the TC programs.
pub fn preflight() -> Result<(), EbpfError> {
    if OBJECT.is_none() {
        return Err(EbpfError::NotBuilt);
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(EbpfError::MissingFeature {
            what: "BTF (/sys/kernel/btf/vmlinux)",
            fix: "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        });
    }
    use aya::util::KernelVersion;
    let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
    if !tcx {
        return Err(EbpfError::MissingFeature {
            what: "TCX links (Linux 6.6 or newer)",
            fix: "upgrade the kernel to 6.6 or newer, or run without --root",
        });
    }
    Ok(())
}

/// The per-flow accounting programs, attached to both directions of one interface.
///
/// The interface is meant to be the host end of the run's veth: what arrives on it (ingress)
/// was sent by the command, what leaves it (egress) goes to the command.
pub struct Accounting {
    /// Declared first: links are dropped (programs detached) before the object.
    links: Vec<OwnedLink>,
    ebpf: Ebpf,
}

impl Accounting {
    /// Loads the object and attaches `cf_tc_ingress`/`cf_tc_egress` to `iface` (TCX links,
    /// see [`Accounting::attach_to`]).
    /// Capture is off (only DNS packets are copied); no cgroup programs.
    pub fn attach(iface: &str) -> Result<Self, EbpfError> {
        Self::attach_with(iface, None, CaptureConfig::default())
    }

    /// Like [`Accounting::attach`], with the capture settings `capture` and, if `cgroup` is
    /// given (an open cgroup v2 directory), the attribution programs on that cgroup.
    pub fn attach_with(
        iface: &str,
        cgroup: Option<&std::fs::File>,
        capture: CaptureConfig,
    ) -> Result<Self, EbpfError> {
        let mut accounting = Self::load(capture, None)?;
        accounting.attach_to(iface, cgroup)?;
        Ok(accounting)
    }

    /// Loads the object and every program (the verifier runs here), with the capture
    /// settings `capture` and the capture filter `filter` (`None`: no filter, every packet
    /// matches), without attaching anything: a caller can do this while it creates the
    /// interface and the cgroup, then [`Accounting::attach_to`] them.
    ///
    /// The settings are fixed for the life of the programs: `CONFIG` and `FILTER` are
    /// declared read-only for programs (`BPF_F_RDONLY_PROG` in childflow-ebpf), written, then frozen
    /// (`BPF_MAP_FREEZE`) before any program is loaded. The verifier then reads their
    /// contents as constants (kernel/bpf/verifier.c, `bpf_map_is_rdonly` and
    /// `bpf_map_direct_read`) and skips the code a run cannot reach: with capture off, the
    /// filter interpreter is never verified. That is most of the verification time (on this
    /// kind of machine ~250 ms per TC program with it, a few ms without).
    pub fn load(
        capture: CaptureConfig,
        filter: Option<&childflow_common::filter::Program>,
    ) -> Result<Self, EbpfError> {
        preflight()?;
        let mut ebpf = loader_without_kernel_btf()
            .btf(None)
            .load(OBJECT.ok_or(EbpfError::NotBuilt)?)
            .map_err(EbpfError::Object)?;
        tracing::debug!("eBPF object parsed, maps created");
        write_and_freeze(&mut ebpf, "CONFIG", capture)?;
        write_and_freeze(&mut ebpf, "FILTER", filter.copied().unwrap_or_default())?;
        // Each program is verified on a thread of its own: the verifier runs without a
        // global lock for a privileged loader, so the verifications overlap on every core.
        let programs: Vec<(&str, &mut aya::programs::Program)> = ebpf.programs_mut().collect();
        std::thread::scope(|s| {
            let running: Vec<_> = programs
                .into_iter()
                .map(|(name, prog)| s.spawn(move || load_one(name, prog)))
                .collect();
            running
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<()>, _>>()
        })?;
        Ok(Accounting { links: Vec::new(), ebpf })
    }

    /// Attaches the loaded programs: `cf_tc_ingress`/`cf_tc_egress` to `iface` as TCX links,
    /// and the attribution programs to `cgroup` if given.
    ///
    /// TCX, not classic `clsact` filters, on purpose: a TCX link is owned by its fd (so by
    /// this process, or the lingering teardown process, see `rootful/linger.rs`), never
    /// collides with another tc user of the interface, and is what the design names. Its
    /// price is start-up time: attaching a TCX link waits for a full RCU grace period while
    /// holding RTNL (kernel/bpf/tcx.c, `tcx_entry_sync`), and the two directions serialize on
    /// RTNL: 25-35 ms of a run's start on this VM (median `--root -- true` 95 ms with TCX,
    /// 59 ms with clsact filters, 20 A/B pairs at load 5.5), where the first filter of a
    /// clsact qdisc waits only for an expedited grace period (net/sched/sch_generic.c,
    /// `mini_qdisc_pair_swap`).
    ///
    /// The capture settings were written at load, so the first packet already sees them.
    /// Every link is owned by this value (and so by this process's fds): nothing outlives
    /// it, not even a SIGKILL of the process. Each attachment waits for an RCU grace period
    /// in the kernel, so they are made in parallel, one thread each.
    pub fn attach_to(
        &mut self,
        iface: &str,
        cgroup: Option<&std::fs::File>,
    ) -> Result<(), EbpfError> {
        let programs: Vec<(&str, &mut aya::programs::Program)> = self
            .ebpf
            .programs_mut()
            .filter(|(name, _)| name.starts_with("cf_tc_") || cgroup.is_some())
            .collect();
        let links = std::thread::scope(|s| {
            let running: Vec<_> = programs
                .into_iter()
                .map(|(name, prog)| s.spawn(move || attach_one(name, prog, iface, cgroup)))
                .collect();
            running
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        self.links.extend(links.into_iter().flatten());
        Ok(())
    }

    /// Detaches every program, in parallel (each detach waits for the kernel); the maps
    /// stay readable, so a final read sees counters that no packet changes any more.
    /// Dropping the value detaches too, one link after the other.
    pub fn detach(&mut self) {
        let links = std::mem::take(&mut self.links);
        std::thread::scope(|s| {
            for link in links {
                s.spawn(move || drop(link));
            }
        });
    }

    /// Leaves the TC filters where they are instead of deleting them when this value is
    /// dropped: for an interface about to disappear (the run's veth dies with the command's
    /// namespace), deleting them first is netlink round trips for nothing.
    pub fn leave_tc_filters(&mut self) {
        for link in std::mem::take(&mut self.links) {
            if link.is::<aya::programs::tc::SchedClassifierLink>() {
                std::mem::forget(link);
            } else {
                self.links.push(link);
            }
        }
    }

    fn flow_map(&self) -> Result<HashMap<&MapData, FlowKey, FlowStats>, EbpfError> {
        let map = self.ebpf.map("FLOWS").ok_or(EbpfError::Map { name: "FLOWS", source: None })?;
        HashMap::try_from(map).map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })
    }

    /// Every flow in the kernel map with its counters now.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowStats)>, EbpfError> {
        let map = self.flow_map()?;
        // An entry deleted while we iterate is simply skipped.
        Ok(map.iter().flatten().collect())
    }

    /// Removes a flow (ended or idle) from the kernel map.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), EbpfError> {
        let map =
            self.ebpf.map_mut("FLOWS").ok_or(EbpfError::Map { name: "FLOWS", source: None })?;
        let mut map: HashMap<&mut MapData, FlowKey, FlowStats> = HashMap::try_from(map)
            .map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })?;
        map.remove(key).map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })
    }

    /// Takes the ring buffer of flow start/end records, for a reader to drain.
    pub fn take_flow_events(&mut self) -> Result<RingBuf<MapData>, EbpfError> {
        self.take_ring("FLOW_EVENTS")
    }

    /// Takes the ring buffer of captured packets (`PacketHeader` + data).
    pub fn take_packets(&mut self) -> Result<RingBuf<MapData>, EbpfError> {
        self.take_ring("PACKETS")
    }

    /// Takes the ring buffer of socket records (`SockRecord`) from the cgroup programs.
    pub fn take_sock_events(&mut self) -> Result<RingBuf<MapData>, EbpfError> {
        self.take_ring("SOCK_EVENTS")
    }

    fn take_ring(&mut self, name: &'static str) -> Result<RingBuf<MapData>, EbpfError> {
        let map = self.ebpf.take_map(name).ok_or(EbpfError::Map { name, source: None })?;
        RingBuf::try_from(map).map_err(|e| EbpfError::Map { name, source: Some(e) })
    }

    /// The kernel's drop counters (`childflow_common::event::DROP_*`), summed over CPUs.
    pub fn drops(&self) -> Result<[u64; DROP_COUNTERS as usize], EbpfError> {
        let map = self.ebpf.map("DROPS").ok_or(EbpfError::Map { name: "DROPS", source: None })?;
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)
            .map_err(|e| EbpfError::Map { name: "DROPS", source: Some(e) })?;
        let mut out = [0; DROP_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = map
                .get(&(i as u32), 0)
                .map_err(|e| EbpfError::Map { name: "DROPS", source: Some(e) })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

/// An `EbpfLoader` that never parsed the kernel's BTF.
///
/// The programs read only UAPI context fields (no CO-RE relocation), so they need no kernel
/// BTF, and `.btf(None)` tells aya so. But aya 0.14's `EbpfLoader::new()` parses
/// `/sys/kernel/btf/vmlinux` (5 MB here) before that option can be set, and it has no other
/// constructor: 40-150 ms of every start on this VM, more than everything else together.
/// So the loader is built on a short-lived thread with a mount namespace of its own
/// (`unshare(CLONE_NEWNS)` affects only the calling thread), in which `/dev/null` is
/// bind-mounted over that file: aya reads nothing, fails to parse, and moves on without
/// BTF. Propagation is cut first (`MS_SLAVE`), so the bind mount never reaches the host's
/// namespace; it disappears with the thread. If any step is refused, the loader is built
/// the slow way.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    let hidden = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare/mount with NUL-terminated strings, on this thread only.
            let hidden = unsafe {
                libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) == 0
                    && libc::mount(
                        c"/dev/null".as_ptr(),
                        c"/sys/kernel/btf/vmlinux".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) == 0
            };
            hidden.then(EbpfLoader::new)
        })
        .join()
        .ok()
        .flatten()
    });
    hidden.unwrap_or_else(|| {
        tracing::debug!("could not hide the kernel BTF from aya; parsing it");
        EbpfLoader::new()
    })
}

/// `BPF_MAP_FREEZE` (include/uapi/linux/bpf.h): no more writes from user space either.
const BPF_MAP_FREEZE: libc::c_long = 22;

/// Loads one program of the object (the verifier runs here). Programs of kinds childflow
/// does not load are left alone.
fn load_one(name: &str, prog: &mut aya::programs::Program) -> Result<(), EbpfError> {
    use aya::programs::Program as P;
    let program: &'static str = match name {
        "cf_tc_ingress" => "cf_tc_ingress",
        "cf_tc_egress" => "cf_tc_egress",
        "cf_sock_create" => "cf_sock_create",
        "cf_skb_egress" => "cf_skb_egress",
        _ => return Ok(()),
    };
    let started = std::time::Instant::now();
    let loaded = match prog {
        P::SchedClassifier(p) => p.load(),
        P::CgroupSock(p) => p.load(),
        P::CgroupSkb(p) => p.load(),
        _ => return Ok(()),
    };
    tracing::debug!("loaded {program} in {:?}", started.elapsed());
    loaded.map_err(|source| EbpfError::Load { program, source })
}

/// Writes `value` as entry 0 of the array map `name`, then freezes the map.
fn write_and_freeze<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    value: V,
) -> Result<(), EbpfError> {
    let map = ebpf.map_mut(name).ok_or(EbpfError::Map { name, source: None })?;
    let mut array: Array<&mut MapData, V> =
        Array::try_from(map).map_err(|e| EbpfError::Map { name, source: Some(e) })?;
    array.set(0, value, 0).map_err(|source| EbpfError::MapWrite { name, source })?;
    let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
        return Err(EbpfError::Map { name, source: None });
    };
    let fd = data.fd().as_fd().as_raw_fd();
    // union bpf_attr for BPF_MAP_FREEZE: only `map_fd`, the rest zero.
    let attr = [fd as u32, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes from a valid buffer; the fd is open.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, attr.as_ptr(), std::mem::size_of_val(&attr))
    };
    if rc != 0 {
        return Err(EbpfError::Freeze { name, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// A link owned by [`Accounting`]; dropping it detaches the program.
type OwnedLink = Box<dyn std::any::Any + Send>;

/// Attaches one loaded program (`name` from the object) and takes ownership of its link.
/// `None` for a program that is not attached in this configuration.
fn attach_one(
    name: &str,
    prog: &mut aya::programs::Program,
    iface: &str,
    cgroup: Option<&std::fs::File>,
) -> Result<Option<OwnedLink>, EbpfError> {
    let (program, tc) = match name {
        "cf_tc_ingress" => ("cf_tc_ingress", Some(TcAttachType::Ingress)),
        "cf_tc_egress" => ("cf_tc_egress", Some(TcAttachType::Egress)),
        "cf_sock_create" => ("cf_sock_create", None),
        "cf_skb_egress" => ("cf_skb_egress", None),
        _ => return Ok(None),
    };
    let load = |source| EbpfError::Load { program, source };
    let at_cgroup = |source| EbpfError::AttachCgroup { program, source };
    if let Some(attach_type) = tc {
        let prog: &mut SchedClassifier = prog.try_into().map_err(load)?;
        let id = prog
            .attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| EbpfError::Attach { program, iface: iface.to_owned(), source })?;
        return Ok(Some(Box::new(prog.take_link(id).map_err(load)?)));
    }
    let Some(cgroup) = cgroup else { return Ok(None) };
    if program == "cf_sock_create" {
        let prog: &mut CgroupSock = prog.try_into().map_err(load)?;
        let id = prog.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(at_cgroup)?;
        Ok(Some(Box::new(prog.take_link(id).map_err(load)?)))
    } else {
        let prog: &mut CgroupSkb = prog.try_into().map_err(load)?;
        let id = prog
            .attach(cgroup.as_fd(), CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(at_cgroup)?;
        Ok(Some(Box::new(prog.take_link(id).map_err(load)?)))
    }
}
