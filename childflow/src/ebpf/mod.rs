//! Loading childflow's kernel programs (built from `childflow-ebpf/` at build time) and
//! reading what they collect.
//!
//! Every attachment is owned: dropping the returned value detaches the programs and frees the
//! maps. If the process dies, the kernel does the same: cgroup and TCX links with their fds
//! (see [`TcxLinks`]), and the links with the interface they are on; nothing is pinned.

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::backend::rootful::startup::phase;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError, SchedClassifier,
    },
};
use childflow_common::{
    event::{CaptureConfig, DROP_COUNTERS},
    flow::{FlowEntry, FlowKey, FlowSlot, FlowStats, NO_SLOT},
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
    /// Attaching a TCX link to an interface failed.
    #[error("failed to attach a TCX {direction} link to {iface}")]
    Attach {
        direction: &'static str,
        iface: String,
        #[source]
        source: std::io::Error,
    },
    /// The interface to attach to does not exist.
    #[error("failed to find interface {iface}")]
    NoInterface {
        iface: String,
        #[source]
        source: nix::Error,
    },
    /// Loading the placeholder program of the TCX links failed.
    #[error("failed to load the placeholder TC program")]
    Placeholder(#[source] std::io::Error),
    /// Putting a loaded program on its TCX link (`BPF_LINK_UPDATE`) failed.
    #[error("failed to put eBPF program {program} on its TCX link")]
    Update {
        program: &'static str,
        #[source]
        source: std::io::Error,
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
    /// Places in `SLOTS` of flows removed from the flow map, with when: in quarantine (see
    /// [`Accounting::remove_flow`]).
    retired: Vec<(u32, std::time::Instant)>,
}

/// How long a retired flow's place in `SLOTS` stays claimed: much longer than any program
/// run that may have found the place by the flow's key just before userspace zeroed it and
/// may still write to it (a run takes microseconds).
const SLOT_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(1);

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
        let mut accounting = Self::load_with(capture, None, cgroup)?;
        accounting.attach_to(iface)?;
        Ok(accounting)
    }

    /// Loads the object and every program (the verifier runs here), with the capture
    /// settings `capture` and the capture filter `filter` (`None`: no filter, every packet
    /// matches), without attaching anything: a caller can do this while it creates the
    /// interface, then [`Accounting::attach_to`] it (the cgroup: [`Accounting::load_with`]).
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
        Self::load_with(capture, filter, None)
    }

    /// Like [`Accounting::load`], and if `cgroup` is given (an open cgroup v2 directory),
    /// attaches each attribution program to it as soon as that program is verified, while
    /// the TC programs are still being verified: a cgroup attachment takes milliseconds
    /// (the first one of a kind flips a static key, kernel/bpf/cgroup.c), which then stay
    /// off the start-up's critical path.
    pub fn load_with(
        capture: CaptureConfig,
        filter: Option<&childflow_common::filter::Program>,
        cgroup: Option<&std::fs::File>,
    ) -> Result<Self, EbpfError> {
        preflight()?;
        // aya probes the kernel's features once per process (a dozen tiny program loads
        // and a perf link, several ms) the first time a loader needs them: here on a thread
        // of its own, while the ELF is parsed and the kernel BTF is hidden on others.
        let probe = std::thread::spawn(|| {
            let _ = aya::features();
            phase!("aya feature probes done");
        });
        let mut loader = loader_without_kernel_btf();
        // The packet ring carries whole packets only when capturing; otherwise DNS alone.
        loader.map_max_entries("PACKETS", packet_ring_bytes(&capture));
        phase!("eBPF loader ready");
        let loaded = loader.btf(None).load(OBJECT.ok_or(EbpfError::NotBuilt)?);
        let _ = probe.join();
        let mut ebpf = loaded.map_err(EbpfError::Object)?;
        phase!("eBPF object parsed, maps created");
        write_and_freeze(&mut ebpf, "CONFIG", capture)?;
        write_and_freeze(&mut ebpf, "FILTER", filter.copied().unwrap_or_default())?;
        // Each program is verified on a thread of its own: the verifier runs without a
        // global lock for a privileged loader, so the verifications overlap on every core.
        let programs: Vec<(&str, &mut aya::programs::Program)> = ebpf.programs_mut().collect();
        let links = std::thread::scope(|s| {
            let running: Vec<_> = programs
                .into_iter()
                .map(|(name, prog)| {
                    s.spawn(move || {
                        load_one(name, prog)?;
                        match cgroup {
                            Some(cgroup) => attach_cgroup(name, prog, cgroup),
                            None => Ok(None),
                        }
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(Accounting { links: links.into_iter().flatten().collect(), ebpf, retired: Vec::new() })
    }

    /// Attaches `cf_tc_ingress`/`cf_tc_egress` to `iface` as TCX links. Short for
    /// [`TcxLinks::attach`] then [`Accounting::attach_prepared`]; a caller that knows the
    /// interface before the programs are verified makes the links first, in parallel (see
    /// [`TcxLinks`]). The attribution programs go on a cgroup at load
    /// ([`Accounting::load_with`]).
    pub fn attach_to(&mut self, iface: &str) -> Result<(), EbpfError> {
        let links = TcxLinks::attach(iface)?;
        self.attach_prepared(links)
    }

    /// Puts `cf_tc_ingress`/`cf_tc_egress` on the TCX links `tcx` (which this value owns
    /// from now on).
    ///
    /// The programs are swapped in with `BPF_LINK_UPDATE`, which replaces a link's program
    /// in place (kernel/bpf/tcx.c, `tcx_link_update`: the same `bpf_mprog_entry`, no grace
    /// period; ~0.0 ms in `cargo xtask bench rootful --tcx-floor`). The capture settings were
    /// written at load, so the first packet already sees them. Every link is owned by this
    /// value (and so by this process's fds): nothing outlives it, not even a SIGKILL of the
    /// process.
    pub fn attach_prepared(&mut self, tcx: TcxLinks) -> Result<(), EbpfError> {
        let TcxLinks { ingress, egress, .. } = tcx;
        for (name, link) in [("cf_tc_ingress", &ingress), ("cf_tc_egress", &egress)] {
            let program = program_name(name).unwrap_or("cf_tc");
            let load = |source| EbpfError::Load { program, source };
            let prog: &SchedClassifier = self
                .ebpf
                .program(name)
                .ok_or(EbpfError::Load { program, source: ProgramError::NotLoaded })?
                .try_into()
                .map_err(load)?;
            let fd = prog.fd().map_err(load)?;
            link_update(link, fd.as_fd())
                .map_err(|source| EbpfError::Update { program, source })?;
            phase!("{program} on its TCX link");
        }
        self.links.push(Box::new(ingress));
        self.links.push(Box::new(egress));
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

    /// Leaves the TCX links open instead of closing them when this value is dropped: for
    /// an interface about to disappear (the run's veth dies with the command's namespace),
    /// or links another process holds duplicates of (`rootful/linger.rs`), closing them
    /// here is time for nothing. They close when the process exits.
    pub fn leave_tc_filters(&mut self) {
        for link in std::mem::take(&mut self.links) {
            if link.is::<TcxLink>() {
                std::mem::forget(link);
            } else {
                self.links.push(link);
            }
        }
    }

    fn flow_map(&self) -> Result<HashMap<&MapData, FlowKey, FlowEntry>, EbpfError> {
        let map = self.ebpf.map("FLOWS").ok_or(EbpfError::Map { name: "FLOWS", source: None })?;
        HashMap::try_from(map).map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })
    }

    fn slots(&self) -> Result<Array<&MapData, FlowSlot>, EbpfError> {
        let map = self.ebpf.map("SLOTS").ok_or(EbpfError::Map { name: "SLOTS", source: None })?;
        Array::try_from(map).map_err(|e| EbpfError::Map { name: "SLOTS", source: Some(e) })
    }

    /// Every flow in the kernel map with its counters now: in its entry, or in its place in
    /// `SLOTS` (childflow-ebpf `FLOWS`).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowStats)>, EbpfError> {
        let (map, slots) = (self.flow_map()?, self.slots()?);
        // An entry deleted while we iterate is simply skipped.
        Ok(map
            .iter()
            .flatten()
            .filter_map(|(key, entry)| match entry.slot {
                NO_SLOT => Some((key, entry.stats)),
                slot => slots.get(&slot, 0).ok().map(|s| (key, s.stats())),
            })
            .collect())
    }

    /// Removes a flow (ended or idle) from the kernel map.
    ///
    /// A flow with a place in `SLOTS` leaves it in this order: its `FLOWS` entry goes (a
    /// new packet then makes a new flow), then the place is zeroed (no packet finds it by
    /// the key any more), and only after [`SLOT_QUARANTINE`] is the place zeroed again,
    /// whatever a program still wrote to it, and given back (`CLAIMED`); until then a new
    /// flow hashed to it keeps its counters in its entry.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), EbpfError> {
        self.release_slots()?;
        let map =
            self.ebpf.map_mut("FLOWS").ok_or(EbpfError::Map { name: "FLOWS", source: None })?;
        let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> = HashMap::try_from(map)
            .map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })?;
        let slot = map.get(key, 0).map(|e| e.slot).unwrap_or(NO_SLOT);
        map.remove(key).map_err(|e| EbpfError::Map { name: "FLOWS", source: Some(e) })?;
        if slot != NO_SLOT {
            self.zero_slot(slot)?;
            self.retired.push((slot, std::time::Instant::now()));
        }
        Ok(())
    }

    /// Gives back the places in `SLOTS` whose quarantine is over.
    fn release_slots(&mut self) -> Result<(), EbpfError> {
        let now = std::time::Instant::now();
        while let Some(&(slot, at)) = self.retired.first() {
            if now.duration_since(at) < SLOT_QUARANTINE {
                break;
            }
            self.retired.remove(0);
            self.zero_slot(slot)?;
            let map = self
                .ebpf
                .map_mut("CLAIMED")
                .ok_or(EbpfError::Map { name: "CLAIMED", source: None })?;
            let mut claimed: HashMap<&mut MapData, u32, u32> = HashMap::try_from(map)
                .map_err(|e| EbpfError::Map { name: "CLAIMED", source: Some(e) })?;
            claimed
                .remove(&slot)
                .map_err(|e| EbpfError::Map { name: "CLAIMED", source: Some(e) })?;
        }
        Ok(())
    }

    fn zero_slot(&mut self, slot: u32) -> Result<(), EbpfError> {
        let map =
            self.ebpf.map_mut("SLOTS").ok_or(EbpfError::Map { name: "SLOTS", source: None })?;
        let mut slots: Array<&mut MapData, FlowSlot> =
            Array::try_from(map).map_err(|e| EbpfError::Map { name: "SLOTS", source: Some(e) })?;
        slots
            .set(slot, FlowSlot::default(), 0)
            .map_err(|e| EbpfError::Map { name: "SLOTS", source: Some(e) })
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

/// Size of the `PACKETS` ring for a run with `capture`.
///
/// A capture of bulk TCP fills it at about a gigabyte a second, so the ring must absorb
/// the collector's scheduling delays on a busy machine: 8 MiB (7 ms of such traffic) lost
/// thousands of records per bulk run in `cargo xtask bench rootful`'s capture row. Without
/// capture only DNS packets go through it, for which 1 MiB is plenty; a smaller ring is
/// also quicker to create (the kernel zeroes every page of it at map creation).
fn packet_ring_bytes(capture: &CaptureConfig) -> u32 {
    if capture.capture_all != 0 { 64 << 20 } else { 1 << 20 }
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
    phase!("{program} verified in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
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

/// The `&'static` name of one of childflow's programs, `None` for anything else.
fn program_name(name: &str) -> Option<&'static str> {
    ["cf_tc_ingress", "cf_tc_egress", "cf_sock_create", "cf_skb_egress"]
        .into_iter()
        .find(|p| *p == name)
}

/// Attaches one loaded cgroup program (`name` from the object) to `cgroup` and takes
/// ownership of its link. `None` for a program that is not a cgroup program.
fn attach_cgroup(
    name: &str,
    prog: &mut aya::programs::Program,
    cgroup: &std::fs::File,
) -> Result<Option<OwnedLink>, EbpfError> {
    let program = match name {
        "cf_sock_create" => "cf_sock_create",
        "cf_skb_egress" => "cf_skb_egress",
        _ => return Ok(None),
    };
    let load = |source| EbpfError::Load { program, source };
    let at_cgroup = |source| EbpfError::AttachCgroup { program, source };
    let link: OwnedLink = if program == "cf_sock_create" {
        let prog: &mut CgroupSock = prog.try_into().map_err(load)?;
        let id = prog.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(at_cgroup)?;
        Box::new(prog.take_link(id).map_err(load)?)
    } else {
        let prog: &mut CgroupSkb = prog.try_into().map_err(load)?;
        let id = prog
            .attach(cgroup.as_fd(), CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(at_cgroup)?;
        Box::new(prog.take_link(id).map_err(load)?)
    };
    phase!("{program} attached to the cgroup");
    Ok(Some(link))
}

/// One TCX link, owned by its fd: closing it detaches the program.
struct TcxLink(OwnedFd);

/// TCX links on both directions of an interface, made before childflow's programs are
/// verified, running a placeholder (`r0 = TC_ACT_UNSPEC; exit`: every packet passes, as
/// with no program) until [`Accounting::attach_prepared`] swaps the real ones in.
///
/// Why: creating a TCX link waits for a full RCU grace period while holding RTNL
/// (kernel/bpf/tcx.c, `tcx_link_prog_attach` → `tcx_entry_sync` → `synchronize_rcu()`), and
/// the two directions serialize on RTNL: 22-24 ms median here (HZ=250), 0.2 ms with
/// `rcu_expedited=1` (`cargo xtask bench rootful --tcx-floor`). Replacing a link's program
/// costs no grace period. So the waits run while the verifier works on the other cores,
/// instead of after it. TCX, not classic `clsact` filters, on purpose: a TCX link is owned
/// by its fd (so by this process, or the lingering teardown process, see
/// `rootful/linger.rs`), never collides with another tc user of the interface, and is what
/// the design names.
///
/// Dropping the value before that detaches the placeholder (closes the links).
pub struct TcxLinks {
    ingress: TcxLink,
    egress: TcxLink,
    /// Kept for the lifetime of the links only through them; dropped with this value.
    _placeholder: OwnedFd,
}

/// `BPF_PROG_LOAD`, `BPF_LINK_CREATE`, `BPF_LINK_UPDATE` (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

impl TcxLinks {
    /// Loads the placeholder and attaches it to both directions of `iface`, ingress first
    /// (each waits for a grace period; the kernel serializes them anyway).
    pub fn attach(iface: &str) -> Result<TcxLinks, EbpfError> {
        let index = nix::net::if_::if_nametoindex(iface)
            .map_err(|source| EbpfError::NoInterface { iface: iface.to_owned(), source })?;
        let placeholder = load_placeholder().map_err(EbpfError::Placeholder)?;
        let attach = |direction, attach_type| {
            let link = link_create(&placeholder, index, attach_type).map_err(|source| {
                EbpfError::Attach { direction, iface: iface.to_owned(), source }
            })?;
            phase!("TCX {direction} link on {iface}");
            Ok::<_, EbpfError>(TcxLink(link))
        };
        let ingress = attach("ingress", BPF_TCX_INGRESS)?;
        let egress = attach("egress", BPF_TCX_EGRESS)?;
        Ok(TcxLinks { ingress, egress, _placeholder: placeholder })
    }
}

/// `bpf(cmd, attr)`: the fd or 0 it returns, or the error.
fn bpf(cmd: libc::c_long, attr: &[u8]) -> std::io::Result<i32> {
    // SAFETY: bpf(2) reads `attr.len()` bytes of `attr` and the buffers it points to, which
    // the callers keep alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc as i32) }
}

/// Loads `r0 = -1 (TC_ACT_UNSPEC); exit` as a SCHED_CLS program (2 instructions: the
/// verifier takes microseconds).
fn load_placeholder() -> std::io::Result<OwnedFd> {
    // struct bpf_insn {code, dst_reg:4 src_reg:4, off, imm}, little-endian in a u64.
    let insns: [u64; 2] = [
        0xb7 | ((-1i32 as u32 as u64) << 32), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = -1
        0x95,                                 // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..64].copy_from_slice(b"cf_placeholder\0\0");
    let fd = bpf(BPF_PROG_LOAD, &attr)?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_CREATE` of `prog` as a TCX link of type `attach_type` on `ifindex`, appended
/// after any other TCX program there.
fn link_create(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    // union bpf_attr, link_create: prog_fd, target_ifindex, attach_type, flags, tcx {...}.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: a new fd the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_UPDATE`: `link` runs `prog` from now on.
fn link_update(link: &TcxLink, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    // union bpf_attr, link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(link.0.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}
