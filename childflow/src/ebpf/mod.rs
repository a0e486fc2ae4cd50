//! Loading childflow's kernel programs (built from `childflow-ebpf/` at build time) and
//! reading what they collect.
//!
//! Every attachment is owned: dropping the returned value detaches the programs and frees the
//! maps (the kernel does the same if the process dies, since nothing is pinned).

use std::{os::fd::AsFd, path::Path};

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
    /// Loads the object and attaches `cf_tc_ingress`/`cf_tc_egress` to `iface` with TCX links.
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
        let mut accounting = Self::load(capture)?;
        accounting.attach_to(iface, cgroup)?;
        Ok(accounting)
    }

    /// Loads the object and every program (the verifier runs here) and writes the capture
    /// settings, without attaching anything: a caller can do this while it creates the
    /// interface and the cgroup, then [`Accounting::attach_to`] them.
    pub fn load(capture: CaptureConfig) -> Result<Self, EbpfError> {
        preflight()?;
        let object = OBJECT.ok_or(EbpfError::NotBuilt)?;
        // No kernel BTF: the programs read only UAPI context fields (no CO-RE relocation),
        // and parsing /sys/kernel/btf/vmlinux (megabytes) would cost every start ~10 ms.
        let mut ebpf = EbpfLoader::new().btf(None).load(object).map_err(EbpfError::Object)?;
        {
            let map =
                ebpf.map_mut("CONFIG").ok_or(EbpfError::Map { name: "CONFIG", source: None })?;
            let mut config: Array<&mut MapData, CaptureConfig> = Array::try_from(map)
                .map_err(|e| EbpfError::Map { name: "CONFIG", source: Some(e) })?;
            config
                .set(0, capture, 0)
                .map_err(|source| EbpfError::MapWrite { name: "CONFIG", source })?;
        }
        let program = "cf_sock_create";
        let prog: &mut CgroupSock = ebpf
            .program_mut(program)
            .ok_or(EbpfError::Map { name: program, source: None })?
            .try_into()
            .map_err(|source| EbpfError::Load { program, source })?;
        prog.load().map_err(|source| EbpfError::Load { program, source })?;
        let program = "cf_skb_egress";
        let prog: &mut CgroupSkb = ebpf
            .program_mut(program)
            .ok_or(EbpfError::Map { name: program, source: None })?
            .try_into()
            .map_err(|source| EbpfError::Load { program, source })?;
        prog.load().map_err(|source| EbpfError::Load { program, source })?;
        for program in ["cf_tc_ingress", "cf_tc_egress"] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(program)
                .ok_or(EbpfError::Map { name: program, source: None })?
                .try_into()
                .map_err(|source| EbpfError::Load { program, source })?;
            prog.load().map_err(|source| EbpfError::Load { program, source })?;
        }
        Ok(Accounting { links: Vec::new(), ebpf })
    }

    /// Attaches the loaded programs: `cf_tc_ingress`/`cf_tc_egress` to `iface` with TCX
    /// links, and the attribution programs to `cgroup` if given.
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
