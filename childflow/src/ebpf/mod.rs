//! Loading childflow's kernel programs (built from `childflow-ebpf/` at build time) and
//! reading what they collect.
//!
//! The attribution programs' cgroup links are owned: dropping the returned value detaches
//! them and frees the maps, and if the process dies, the kernel does the same with the fds.
//! The TC program goes on an interface as `clsact` filters ([`Accounting::attach_tc`]),
//! which hold it until they or the interface go. Nothing is pinned.

use std::{
    io::{Read, Write},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::{backend::rootful::startup::phase, cli::DEFAULT_CAPTURE_BUFFER};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier},
};
use childflow_common::{
    event::{CaptureConfig, DROP_COUNTERS},
    flow::{
        FlowEntry, FlowKey, FlowSlot, FlowStats, NO_SLOT, TC_CLASSID_EGRESS, TC_CLASSID_INGRESS,
    },
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
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
    /// The loader thread could not return to the root directory after hiding the kernel
    /// BTF from aya (see `loader_without_kernel_btf`).
    #[error("failed to restore the eBPF loader thread's root directory")]
    Loader(#[source] std::io::Error),
    /// The object could not be parsed or its maps created.
    #[error("failed to load childflow's eBPF object")]
    Object(#[source] aya::EbpfError),
    /// The kernel could not allocate the capture's packet ring (all of it is allocated when
    /// the run starts, charged to the memory cgroup childflow runs in).
    #[error(
        "the kernel could not allocate the capture's {} MiB packet ring: give the run more memory, or a smaller --capture-buffer (4M at least)",
        .bytes >> 20
    )]
    PacketRing {
        bytes: u32,
        #[source]
        source: std::io::Error,
    },
    /// The verifier (or the kernel) rejected a program.
    #[error("the kernel rejected eBPF program {program}{}", verifier_log(.source))]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A netlink request for the TC program's qdisc or filters failed.
    #[error("failed to {what} of interface {ifindex}")]
    Tc {
        what: &'static str,
        ifindex: u32,
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
    let ringbuf = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 8, 0));
    if !ringbuf {
        return Err(EbpfError::MissingFeature {
            what: "BPF ring buffers (Linux 5.8 or newer)",
            fix: "upgrade the kernel to 5.8 or newer, or run without --root",
        });
    }
    Ok(())
}

/// The per-flow accounting program and the attribution programs, with their maps.
///
/// The TC program goes on both directions of the host end of the run's veth
/// ([`Accounting::attach_tc`]): what arrives on it (ingress) was sent by the command, what
/// leaves it (egress) goes to the command.
pub struct Accounting {
    /// The cgroup programs' links (see [`attach_cgroup`]). Declared first: dropped
    /// (programs detached) before the object.
    links: Vec<OwnedFd>,
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
    /// Loads the object and puts `cf_tc` on both directions of `iface` (a `clsact` qdisc is
    /// added, see [`add_clsact`]). Capture is off (only DNS packets are copied); no cgroup
    /// programs.
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
        let accounting = Self::load_with(capture, None, cgroup, DEFAULT_CAPTURE_BUFFER)?;
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| EbpfError::Tc {
            what: "find",
            ifindex: 0,
            source: e.into(),
        })?;
        add_clsact(ifindex)?;
        accounting.attach_tc(ifindex)?;
        Ok(accounting)
    }

    /// Loads the object and every program (the verifier runs here), with the capture
    /// settings `capture` and the capture filter `filter` (`None`: no filter, every packet
    /// matches), without attaching anything: a caller can do this while it creates the
    /// interface, then [`Accounting::attach_tc`] (the cgroup: [`Accounting::load_with`]).
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
        Self::load_with(capture, filter, None, DEFAULT_CAPTURE_BUFFER)
    }

    /// Like [`Accounting::load`], and if `cgroup` is given (an open cgroup v2 directory),
    /// attaches each attribution program to it as soon as that program is verified, while
    /// the TC programs are still being verified: a cgroup attachment takes milliseconds
    /// (the first one of a kind flips a static key, kernel/bpf/cgroup.c), which then stay
    /// off the start-up's critical path. `packet_ring`: the packet ring's size in bytes
    /// when capturing (a power of two, [`crate::cli::CaptureConfig::buffer`]).
    pub fn load_with(
        capture: CaptureConfig,
        filter: Option<&childflow_common::filter::Program>,
        cgroup: Option<&std::fs::File>,
        packet_ring: u32,
    ) -> Result<Self, EbpfError> {
        preflight()?;
        // aya probes the kernel's features once per process (a dozen tiny program loads
        // and a perf link, ~1 ms) the first time a loader needs them: here on a thread of
        // its own, while the ELF is parsed and the kernel BTF is hidden on this one. At the
        // normal priority, as is all of the start-up's work (see below): `load` waits for
        // the probes right after parsing.
        let probe = std::thread::spawn(|| {
            let _ = aya::features();
            phase!("aya feature probes done");
        });
        let mut loader = loader_without_kernel_btf()?;
        // The packet ring carries whole packets only when capturing; otherwise DNS alone.
        let ring_bytes = packet_ring_bytes(&capture, packet_ring);
        loader.map_max_entries("PACKETS", ring_bytes);
        phase!("eBPF loader ready");
        let loaded = loader.btf(None).load(OBJECT.ok_or(EbpfError::NotBuilt)?);
        let _ = probe.join();
        let mut ebpf = loaded.map_err(|e| match e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error })
                if name == "PACKETS" && io_error.raw_os_error() == Some(libc::ENOMEM) =>
            {
                EbpfError::PacketRing { bytes: ring_bytes, source: io_error }
            }
            e => EbpfError::Object(e),
        })?;
        phase!("eBPF object parsed, maps created");
        write_and_freeze(&mut ebpf, "CONFIG", capture)?;
        write_and_freeze(&mut ebpf, "FILTER", filter.copied().unwrap_or_default())?;
        // Each program is verified on a thread of its own: the verifier runs without a
        // global lock for a privileged loader, so the verifications overlap on every core.
        //
        // None of these threads (nor the NAT table's) is niced any more, though only
        // `cf_tc`'s verification is the critical path on a quiet machine: everything else
        // must be done before the command starts too, and on a busy one a niced thread got
        // a tenth of a CPU beside a process at the normal priority, so the join below
        // waited for it (CHILDFLOW_TRACE_STARTUP beside one CPU hog: `cf_tc` verified at
        // 13.9 ms, the programs loaded at 17.0). 30 alternating runs of `--root -- true`
        // beside `yes >/dev/null`: 22.0 ms median niced, 21.0 not; without the hog 14.8
        // and 14.9 ms.
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

    /// Puts `cf_tc` on both directions of interface `ifindex`, which has a `clsact` qdisc
    /// ([`add_clsact`]): one direct-action `bpf` filter on its ingress and one on its egress,
    /// each with the classid that tells the program its direction (`TC_CLASSID_INGRESS`,
    /// `TC_CLASSID_EGRESS`, read back as `tc_classid`). The filters hold the program from
    /// then on, until they or the interface go.
    ///
    /// Classic `clsact` filters, not TCX links: creating a TCX link waits for a full RCU grace
    /// period under RTNL (kernel/bpf/tcx.c, `tcx_link_prog_attach` → `tcx_entry_sync` →
    /// `synchronize_rcu()`), and the two directions serialize on RTNL: 20-40 ms of the
    /// start-up here, whose goal is 20 ms in all (`cargo xtask bench rootful --tcx-floor`;
    /// `CHILDFLOW_TRACE_STARTUP=1` showed the egress link done at 25-41 ms with the verifier
    /// long finished). The two filters take ~0.2 ms: no normal grace period, at most an
    /// expedited one per direction for its first filter (see [`add_clsact`]). What TCX
    /// offered is not needed here: the veth is the run's own, so no other tc user shares it,
    /// and the filters die with it, which dies with the command's network namespace, so the
    /// kernel still cleans up after a SIGKILL.
    pub fn attach_tc(&self, ifindex: u32) -> Result<(), EbpfError> {
        let program = "cf_tc";
        let load = |source| EbpfError::Load { program, source };
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or(EbpfError::Load { program, source: ProgramError::NotLoaded })?
            .try_into()
            .map_err(load)?;
        let fd = prog.fd().map_err(load)?.as_fd();
        for (what, minor, classid) in [
            ("add the ingress TC filter", TcHandle::MIN_INGRESS, TC_CLASSID_INGRESS),
            ("add the egress TC filter", TcHandle::MIN_EGRESS, TC_CLASSID_EGRESS),
        ] {
            let mut msg = TcMessage::with_index(ifindex as i32);
            msg.header.parent = TcHandle { major: TcHandle::CLSACT.major, minor };
            // Priority 1, every protocol (ETH_P_ALL, in network order).
            msg.header.info =
                u32::from(TcHandle { major: 1, minor: (libc::ETH_P_ALL as u16).to_be() });
            msg.attributes.push(TcAttribute::Kind(TcFilterBpf::KIND.into()));
            msg.attributes.push(TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgFd(fd.as_raw_fd() as u32)),
                TcOption::Bpf(TcFilterBpfOption::ProgName(program.into())),
                TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
                TcOption::Bpf(TcFilterBpfOption::ClassId(TcHandle { major: 0, minor: classid })),
            ]));
            route_request(RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_CREATE | NLM_F_EXCL)
                .map_err(|source| EbpfError::Tc { what, ifindex, source })?;
        }
        phase!("{program} on both directions");
        Ok(())
    }

    /// The descriptors of the cgroup programs' links, for a process that takes over their
    /// release (`backend::rootful::linger`).
    pub fn link_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.links.iter().map(|l| l.as_raw_fd()).collect()
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

    /// Takes the ring buffer of captured packets (`PacketHeader` + data) as the map
    /// itself: it is read in place ([`crate::backend::rootful::ring::PacketRing`]).
    pub fn take_packet_map(&mut self) -> Result<MapData, EbpfError> {
        let name = "PACKETS";
        match self.ebpf.take_map(name) {
            Some(aya::maps::Map::RingBuf(map)) => Ok(map),
            _ => Err(EbpfError::Map { name, source: None }),
        }
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

/// Size of the `PACKETS` ring for a run with `capture`: `asked` (`--capture-buffer`, or
/// [`DEFAULT_CAPTURE_BUFFER`]) when capturing.
///
/// A capture of bulk TCP fills it at about a gigabyte a second, so the ring must absorb
/// the collector's scheduling delays and the disk's on a busy machine: 8 MiB (7 ms of such
/// traffic) lost thousands of records per bulk run in `cargo xtask bench rootful`'s
/// capture row; 64 MiB still lost some in four of nine 4-second runs (to the disk and to
/// /dev/shm), 256 MiB none in nine (but the kernel clears every page of it at map
/// creation: 64 MiB takes ~20 ms, 256 MiB 60-150 ms, hence the option rather than a
/// larger default). Without capture only DNS packets go through it, for which 1 MiB is
/// plenty.
///
fn packet_ring_bytes(capture: &CaptureConfig, asked: u32) -> u32 {
    if capture.capture_all != 0 { asked } else { 1 << 20 }
}

/// An `EbpfLoader` that never parsed the kernel's BTF. Call it on a thread of childflow's
/// own (the loader thread): it changes the thread's root directory for a moment.
///
/// The programs read only UAPI context fields (no CO-RE relocation), so they need no kernel
/// BTF, and `.btf(None)` tells aya so. But aya 0.14's `EbpfLoader::new()` parses
/// `/sys/kernel/btf/vmlinux` (5 MB here) before that option can be set, and it has no other
/// constructor: 40-150 ms of every start on this VM, more than everything else together.
/// So the loader is built while this thread's root directory is elsewhere: the thread
/// unshares its filesystem attributes (`unshare(CLONE_FS)`: root and working directory,
/// for this thread only) and `chroot`s to `/proc/self/fdinfo`, where no
/// `sys/kernel/btf/vmlinux` exists; aya finds nothing and moves on without BTF. Then it goes
/// back to the real root and working directory, through descriptors opened before. The rest
/// of the process is untouched.
///
/// Before, a short-lived thread of its own did this (its root went with it): its start,
/// join and exit (a stack unmapped: a TLB shootdown) were ~0.5 ms on the start-up's
/// critical path. Before that, the thread hid the file with a bind mount in a mount
/// namespace of its own: the namespace's copy cost milliseconds, and so did its teardown at
/// the thread's exit (an expedited RCU grace period in `namespace_unlock`). If any step is
/// refused, the loader is built the slow way.
fn loader_without_kernel_btf() -> Result<EbpfLoader<'static>, EbpfError> {
    let open_dir = |path: &std::ffi::CStr| {
        // SAFETY: open(2) with a NUL-terminated path; the fd is owned at once.
        let fd = unsafe {
            libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        };
        // SAFETY: a new descriptor the kernel just returned to us.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let (Some(root), Some(cwd)) = (open_dir(c"/"), open_dir(c".")) else {
        tracing::debug!("could not hide the kernel BTF from aya; parsing it");
        return Ok(EbpfLoader::new());
    };
    // SAFETY: unshare/chroot with a NUL-terminated string, on this thread only.
    let hidden = unsafe {
        libc::unshare(libc::CLONE_FS) == 0 && libc::chroot(c"/proc/self/fdinfo".as_ptr()) == 0
    };
    let loader = EbpfLoader::new();
    if !hidden {
        tracing::debug!("could not hide the kernel BTF from aya; parsed it");
        return Ok(loader);
    }
    // SAFETY: fchdir/chroot on descriptors and a NUL-terminated string, on this thread only.
    let back = unsafe {
        libc::fchdir(root.as_raw_fd()) == 0
            && libc::chroot(c".".as_ptr()) == 0
            && libc::fchdir(cwd.as_raw_fd()) == 0
    };
    if !back {
        return Err(EbpfError::Loader(std::io::Error::last_os_error()));
    }
    Ok(loader)
}

/// `BPF_MAP_FREEZE` (include/uapi/linux/bpf.h): no more writes from user space either.
const BPF_MAP_FREEZE: libc::c_long = 22;

/// Loads one program of the object (the verifier runs here). Programs of kinds childflow
/// does not load are left alone.
fn load_one(name: &str, prog: &mut aya::programs::Program) -> Result<(), EbpfError> {
    use aya::programs::Program as P;
    let program: &'static str = match name {
        "cf_tc" => "cf_tc",
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

/// `BPF_LINK_CREATE` and the cgroup attach types (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;

/// Attaches one loaded cgroup program (`name` from the object) to `cgroup` with a BPF link
/// of its own (`BPF_LINK_CREATE`, no `BPF_F_ALLOW_MULTI`: what aya's `attach` with
/// `CgroupAttachMode::Single` does) and returns the link's descriptor: closing its last copy
/// detaches the program. `None` for a program that is not a cgroup program.
///
/// Made here rather than through aya, which keeps the descriptor to itself: the end of a
/// run hands the links to the lingering process (`backend::rootful::linger`), and without
/// their numbers it had to find them in `/proc/self/fd`, a `readlink` per descriptor
/// (~0.4 ms of every run's end).
fn attach_cgroup(
    name: &str,
    prog: &aya::programs::Program,
    cgroup: &std::fs::File,
) -> Result<Option<OwnedFd>, EbpfError> {
    use aya::programs::Program as P;
    let (program, attach_type, prog_fd) = match (name, prog) {
        ("cf_sock_create", P::CgroupSock(p)) => {
            ("cf_sock_create", BPF_CGROUP_INET_SOCK_CREATE, p.fd())
        }
        ("cf_skb_egress", P::CgroupSkb(p)) => ("cf_skb_egress", BPF_CGROUP_INET_EGRESS, p.fd()),
        _ => return Ok(None),
    };
    let prog_fd = prog_fd.map_err(|source| EbpfError::Load { program, source })?;
    // union bpf_attr for BPF_LINK_CREATE: prog_fd, target_fd, attach_type, flags; the rest
    // zero.
    let attr =
        [prog_fd.as_fd().as_raw_fd() as u32, cgroup.as_raw_fd() as u32, attach_type, 0, 0, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes from a valid buffer; both fds are open.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, attr.as_ptr(), std::mem::size_of_val(&attr))
    };
    if fd < 0 {
        let io_error = std::io::Error::last_os_error();
        let source = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error,
        });
        return Err(EbpfError::AttachCgroup { program, source });
    }
    phase!("{program} attached to the cgroup");
    // SAFETY: a new descriptor the kernel just returned to us.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Adds a `clsact` qdisc to interface `ifindex`, for [`Accounting::attach_tc`].
///
/// Best made as soon as the interface exists, well before the filters: each direction's
/// first filter swaps in the qdisc's filter list (net/sched/sch_generic.c,
/// `mini_qdisc_pair_swap`), which waits for an expedited RCU grace period unless a grace
/// period has passed since the qdisc was made.
pub fn add_clsact(ifindex: u32) -> Result<(), EbpfError> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle { major: TcHandle::CLSACT.major, minor: 0 };
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    route_request(RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(|source| EbpfError::Tc { what: "add a clsact qdisc", ifindex, source })
}

/// Gives interface `ifindex` the `noqueue` root qdisc: a packet sent to it goes straight to
/// its driver, and a driver that drops it says so to the sender (for the capture tap: the
/// program learns at once whether its clone is queued, see `backend::rootful::tap`).
pub fn set_noqueue(ifindex: u32) -> Result<(), EbpfError> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::ROOT;
    msg.attributes.push(TcAttribute::Kind("noqueue".into()));
    route_request(RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_CREATE | NLM_F_REPLACE)
        .map_err(|source| EbpfError::Tc { what: "give the capture tap no queue", ifindex, source })
}

/// Removes the `clsact` qdisc of interface `ifindex`, and with it the TC filters.
pub fn remove_clsact(ifindex: u32) -> Result<(), EbpfError> {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle { major: TcHandle::CLSACT.major, minor: 0 };
    route_request(RouteNetlinkMessage::DelQueueDiscipline(msg), 0).map_err(|source| EbpfError::Tc {
        what: "remove the clsact qdisc",
        ifindex,
        source,
    })
}

/// Sends one rtnetlink request (with `NLM_F_REQUEST | NLM_F_ACK | flags`) on a socket of its
/// own in this thread's network namespace, and waits for the kernel's answer: blocking, as
/// the answer comes at once.
fn route_request(msg: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned to us.
    let socket = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // To the kernel (a zeroed `sockaddr_nl` needs no `sendto` address: `write` will do).
    (&socket).write_all(&buf)?;
    let mut answer = vec![0; 8192];
    let n = (&socket).read(&mut answer)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(std::io::Error::other(format!("unexpected netlink answer {other:?}"))),
    }
}
