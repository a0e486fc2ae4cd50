//! The pcapng capture (`-c/--capture`): turns the backends' [`PacketEvent`]s into pcapng
//! files that Wireshark, tshark and capinfos read without a warning, with the metadata an
//! analyst needs to pivot from the flow log to the packets.
//!
//! What goes into a file (draft-ietf-opsawg-pcapng; docs/capture.md for users):
//! - a Section Header Block naming the hardware, OS and childflow (and the command, as a
//!   comment); one Interface Description Block per capture point with its name, a
//!   description of whose view the directions take, nanosecond timestamps and the snap
//!   length;
//! - an Enhanced Packet Block per packet with its direction in `epb_flags` (inbound =
//!   received by the command, outbound = sent by it), `epb_processid_threadid` and a
//!   `process …` comment when the backend knows the process, and a `community_id …` comment
//!   on the first packet of each flow;
//! - Name Resolution Blocks with the names the command resolved ([`Capture::names`]);
//! - Decryption Secrets Blocks with the TLS key log lines of `--tls-keylog`;
//! - an Interface Statistics Block per interface at the end of each file (counts and drops).
//!
//! Why our own block writer ([`pcapng`]) and not the `pcap-file` crate: pcap-file 2.0 (and
//! 3.0-rc) has no Decryption Secrets Block (only an untyped "unknown block" we would have to
//! encode by hand anyway) and builds every block as an owned value with a `Vec` of options
//! before serializing it, an allocation per packet on the path that must sustain 250k
//! packets/s. The format is simple and the subset we write is small (six block types, a
//! dozen options), encoded into one reusable buffer; every block is checked against tshark
//! and capinfos in the tests.
//!
//! Invariants:
//! - Blocks are only ever written whole, and the buffer is flushed ([`Capture::flush`]; the
//!   collector calls [`Capture::flush_due`] after each batch of events and on its ticks, so
//!   at least every [`FLUSH_INTERVAL`] while packets come; a buffer is also written out
//!   whenever it holds [`FLUSH_AT`] bytes), so a file cut by a kill is valid up to the last
//!   flush.
//! - Each packet is copied at most once on its way to the file: straight into the aligned
//!   stage of a direct file ([`direct::Stage`], via [`pcapng::Out`]), or into `buf` for any
//!   other file (then written from there). Packets of [`direct::ZERO_COPY_MIN`] or more
//!   whose buffer the capture may keep ([`Capture::take_packet`]) are not copied to a
//!   direct file: the device reads their pages where they are (for the rootful backend
//!   the kernel's packet ring itself, [`crate::event::PacketData::Lent`])
//!   ([`direct::DirectFile::encode_from`]), behind a padding block that readers skip; nor
//!   to a plain file when of [`GATHER_MIN`] or more (`writev(2)` around `buf`). With
//!   `--tls-keylog` packets wait in `buf` (below), so a direct file then gets them from
//!   `buf`, one copy more.
//! - The key log is read at every flush *before* the buffered packets are written, and new
//!   lines go into a DSB ahead of them: a TLS library writes a secret before it sends the
//!   packets that use it, so every buffered packet's secrets are in the file by then. With a
//!   key log, packets also wait [`KEYLOG_HOLD`] in the buffer, for the secrets of packets
//!   the command received before it could log them (a TLS 1.3 server's first flight).
//!   Without one, a flush writes everything.
//! - Every file of a ring starts with the SHB, the IDBs, every name and every secret seen so
//!   far, so each one decrypts and resolves names on its own.
//! - A write error (e.g. a full disk) stops the capture and is returned once; later packets
//!   are counted as lost and nothing else of the run is affected.

pub mod direct;
pub mod filter;
pub mod keylog;
pub mod pcapng;

use std::{
    collections::{BTreeMap, VecDeque},
    fs::File,
    io::{self, Write},
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use crate::{
    cli::CaptureConfig,
    event::{Direction, DnsData, DnsEvent, PacketEvent, ProcessInfo, UnixNanos, now_unix_nanos},
};
use filter::{Fields, Filter, FilterError};
use keylog::{Keylog, KeylogError};
use pcapng::{InterfaceInfo, InterfaceStats, PacketOptions, SectionInfo};

/// Packets at least this long go to a plain file (tmpfs, a pipe) with the buffer around
/// them in one `writev(2)` rather than copied into the buffer (see [`pcapng::Gather`]): at
/// this size the copy costs more than the system call.
pub const GATHER_MIN: usize = 16 << 10;

/// The buffer is written out once it holds this much, even within a batch (a direct
/// file's stage writes itself out as it fills instead).
pub const FLUSH_AT: usize = 1 << 20;

/// [`Capture::flush_due`] flushes at most this often.
///
/// Why not after every batch of events: a flush of a direct file ends with its unaligned
/// tail written through the page cache, and the next direct write over that page must
/// first write it back and drop it (`kiocb_invalidate_pages`); each direct write also
/// notifies the virtual disk (a VM exit, `iowrite16`). With a flush per batch (hundreds a
/// second at bulk rates) `perf record` of a rootless bulk capture showed the collector in
/// `pwrite` for half of its samples; the copies were the other half.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// With `--tls-keylog`, how long packets wait in the buffer for secrets that may still be
/// logged for them (see `Capture::write_out_with`).
pub const KEYLOG_HOLD: std::time::Duration = std::time::Duration::from_millis(500);

/// Held packets are written anyway once this many bytes wait.
const HOLD_MAX: usize = 32 << 20;

/// Errors of the capture. A write error ends the capture, never the run.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// `--capture-filter` did not parse.
    #[error("invalid --capture-filter `{expr}`: {source}")]
    Filter {
        expr: String,
        #[source]
        source: FilterError,
    },
    /// Rotation options with a capture to stdout.
    #[error("--capture-max-size cannot rotate a capture written to stdout (`-c -`)")]
    RotateStdout,
    /// The capture file could not be created.
    #[error("failed to create capture file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing to the capture file failed (disk full, I/O error); the capture stopped.
    #[error("failed to write capture file {path}; the capture stopped here")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The oldest file of the ring could not be removed.
    #[error("failed to remove old capture file {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `--tls-keylog` could not be set up.
    #[error(transparent)]
    Keylog(#[from] KeylogError),
}

/// A capture point, as its Interface Description Block describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// `if_name`, e.g. "tap0" or "cfh1234".
    pub name: String,
    /// `if_description`: the backend and whose view the directions take.
    pub description: String,
}

/// What the backend and the run tell the capture when it opens.
#[derive(Clone, Debug, Default)]
pub struct CaptureSetup {
    /// The capture points, in the order of [`PacketMeta::interface`]; at least one.
    pub interfaces: Vec<Interface>,
    /// The command line, recorded as the section's comment.
    pub command: Option<String>,
    /// Owner (uid, gid) of the key log, when the command runs as another user than
    /// childflow.
    pub keylog_owner: Option<(u32, u32)>,
    /// Where the key log's private directory goes; the system temp dir if `None`.
    pub keylog_parent: Option<PathBuf>,
}

/// What the flow table knows about a packet.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketMeta<'a> {
    /// Index into [`CaptureSetup::interfaces`].
    pub interface: u32,
    /// The Community ID of the packet's flow.
    pub community_id: Option<&'a str>,
    /// The packet opened its flow: the community ID goes into its comment.
    pub first_of_flow: bool,
    /// The process of the command tree that owns the flow, when known.
    pub process: Option<&'a ProcessInfo>,
}

/// What a capture did, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Packets handed to the capture.
    pub received: u64,
    /// Packets the capture filter left out.
    pub filtered_out: u64,
    /// Packets written.
    pub written: u64,
    /// Packets lost before the writer (backend rings, the event queue), as reported at close.
    pub dropped: u64,
    /// Packets not written because the capture had stopped on an error.
    pub lost_after_error: u64,
    /// Bytes written, over all files.
    pub bytes: u64,
    /// Key log lines embedded.
    pub secrets: u64,
    /// The files that exist at the end (a ring keeps only the newest).
    pub files: Vec<PathBuf>,
    /// Why the capture stopped early, if it did.
    pub error: Option<String>,
}

/// Per-interface counters for the ISB.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    received: u64,
    accepted: u64,
    written: u64,
}

/// An open capture: the current file, the write buffer and what each new file must repeat.
pub struct Capture {
    base: PathBuf,
    to_stdout: bool,
    max_size: Option<u64>,
    max_files: Option<u32>,
    snaplen: u32,
    filter: Option<Filter>,
    section: SectionInfo,
    interfaces: Vec<InterfaceInfo>,
    keylog: Option<Keylog>,
    /// Every key log line seen, for the head of each new ring file.
    secrets: Vec<u8>,
    /// Every (address → names) seen, for the head of each new ring file.
    names: BTreeMap<IpAddr, Vec<String>>,
    file: Option<Output>,
    path: PathBuf,
    /// Bytes already written to the current file.
    file_bytes: u64,
    packets_in_file: u64,
    file_index: u32,
    files: VecDeque<PathBuf>,
    /// Blocks waiting for the next flush, unless they go straight into a direct file's
    /// stage (see [`Capture::sink`]).
    buf: Vec<u8>,
    /// Packets encoded into a direct file's stage since the last flush (lost on an error).
    unflushed: u64,
    /// (when, buffer length then) at each flush, to know what has waited `keylog_hold`.
    marks: VecDeque<(std::time::Instant, usize)>,
    /// How long packets wait for their TLS secrets; zero in tests that check block order.
    pub(crate) keylog_hold: std::time::Duration,
    /// `process …` comment of the last process seen, reused while it stays the same.
    process_comment: (u32, String),
    flow_comment: String,
    counters: Vec<Counters>,
    /// When [`Capture::flush`] last ran (see [`Capture::flush_due`]).
    last_flush: std::time::Instant,
    stats: CaptureStats,
    start_ns: UnixNanos,
    failed: bool,
}

impl Capture {
    /// Creates the (first) capture file and writes its header, and the key log when asked.
    pub fn open(config: &CaptureConfig, setup: CaptureSetup) -> Result<Capture, CaptureError> {
        let filter = match &config.filter {
            Some(expr) => Some(
                Filter::parse(expr)
                    .map_err(|source| CaptureError::Filter { expr: expr.clone(), source })?,
            ),
            None => None,
        };
        let to_stdout = config.path.as_os_str() == "-";
        if to_stdout && config.max_size.is_some() {
            return Err(CaptureError::RotateStdout);
        }
        let keylog = if config.tls_keylog {
            let parent = setup.keylog_parent.clone().unwrap_or_else(std::env::temp_dir);
            Some(Keylog::create(&parent, setup.keylog_owner)?)
        } else {
            None
        };
        let mut interfaces: Vec<InterfaceInfo> = setup
            .interfaces
            .iter()
            .map(|i| InterfaceInfo {
                name: i.name.clone(),
                description: i.description.clone(),
                comment: config.filter.as_ref().map(|f| format!("capture filter: {f}")),
                snaplen: config.snaplen,
            })
            .collect();
        if interfaces.is_empty() {
            interfaces.push(InterfaceInfo {
                name: "childflow".into(),
                description: "childflow capture point".into(),
                comment: None,
                snaplen: config.snaplen,
            });
        }
        let mut capture = Capture {
            base: config.path.clone(),
            to_stdout,
            max_size: config.max_size,
            max_files: config.max_size.and(config.files),
            snaplen: config.snaplen,
            filter,
            section: section_info(setup.command),
            counters: vec![Counters::default(); interfaces.len()],
            interfaces,
            keylog,
            secrets: Vec::new(),
            names: BTreeMap::new(),
            file: None,
            path: PathBuf::new(),
            file_bytes: 0,
            packets_in_file: 0,
            file_index: 0,
            files: VecDeque::new(),
            buf: Vec::new(),
            unflushed: 0,
            marks: VecDeque::new(),
            keylog_hold: KEYLOG_HOLD,
            process_comment: (0, String::new()),
            flow_comment: String::new(),
            stats: CaptureStats::default(),
            last_flush: std::time::Instant::now(),
            start_ns: now_unix_nanos(),
            failed: false,
        };
        capture.next_file()?;
        capture.write_out()?;
        Ok(capture)
    }

    /// The file to give the command as `SSLKEYLOGFILE`, with `--tls-keylog`.
    pub fn keylog_path(&self) -> Option<&Path> {
        self.keylog.as_ref().map(|k| k.path())
    }

    /// The parsed capture filter, e.g. for a backend that can evaluate it earlier.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }

    /// Adds one packet. Returns an error once, when the capture stops on it; after that
    /// packets are only counted.
    pub fn packet(&mut self, pkt: &PacketEvent, meta: &PacketMeta<'_>) -> Result<(), CaptureError> {
        self.add(pkt, Bytes::Shared(&pkt.data), meta)
    }

    /// [`Capture::packet`], free to take the packet's buffer (leaving `pkt.data` empty): a
    /// large packet written to a direct file goes to the file from that buffer, which is
    /// kept until it is written and then goes back to the packet pool
    /// ([`crate::event::PacketData::recycle`]).
    pub fn take_packet(
        &mut self,
        pkt: &mut PacketEvent,
        meta: &PacketMeta<'_>,
    ) -> Result<(), CaptureError> {
        let head = PacketEvent { data: Default::default(), ..*pkt };
        self.add(&head, Bytes::Owned(&mut pkt.data), meta)
    }

    /// Counts, filters and writes one packet: `head` without its data, which is `bytes`.
    fn add(
        &mut self,
        head: &PacketEvent,
        bytes: Bytes<'_>,
        meta: &PacketMeta<'_>,
    ) -> Result<(), CaptureError> {
        self.stats.received += 1;
        let iface = (meta.interface as usize).min(self.counters.len() - 1);
        self.counters[iface].received += 1;
        if self.failed {
            self.stats.lost_after_error += 1;
            return Ok(());
        }
        // An empty packet was already filtered out by the backend (`PacketEvent::data`).
        let data = bytes.as_slice();
        let backend_filtered = data.is_empty() && head.orig_len > 0;
        if backend_filtered
            || self
                .filter
                .as_ref()
                .is_some_and(|filter| !filter.matches(&Fields::from_ethernet(data, head.direction)))
        {
            self.stats.filtered_out += 1;
            return Ok(());
        }
        self.counters[iface].accepted += 1;
        let result = self.write_packet(iface, head, bytes, meta);
        self.check(result)
    }

    fn write_packet(
        &mut self,
        iface: usize,
        pkt: &PacketEvent,
        mut bytes: Bytes<'_>,
        meta: &PacketMeta<'_>,
    ) -> Result<(), CaptureError> {
        let len = bytes.as_slice().len().min(self.snaplen as usize);
        if let Some(p) = meta.process
            && (self.process_comment.0 != p.pid || self.process_comment.1.is_empty())
        {
            self.process_comment =
                (p.pid, format!("process {} (pid {}, uid {})", p.comm, p.pid, p.uid));
        }
        let flow = match meta.community_id {
            Some(id) if meta.first_of_flow => {
                self.flow_comment.clear();
                self.flow_comment.push_str("community_id ");
                self.flow_comment.push_str(id);
                true
            }
            _ => false,
        };
        let comments_len = meta.process.map_or(0, |_| self.process_comment.1.len() + 8)
            + if flow { self.flow_comment.len() + 8 } else { 0 };
        // At least the block's size: 28 bytes of header and 4 of trailer, data padded to
        // 32 bits, flags (8), process (12), the comments and the end of options (4); and
        // the padding block ahead of a packet that may stay in its buffer.
        let mut estimate = 64 + len + comments_len;
        if matches!(bytes, Bytes::Owned(_)) && len >= direct::ZERO_COPY_MIN {
            estimate += direct::ALIGN + pcapng::MIN_BLOCK;
        }
        if let Some(max) = self.max_size
            && self.packets_in_file > 0
            && self.file_len() + estimate as u64 > max
        {
            self.rotate()?;
        }
        let direct = self.is_direct();
        if direct {
            self.make_room(estimate)?;
        }
        let mut slots: [&str; 2] = [""; 2];
        let mut n = 0;
        if meta.process.is_some() {
            slots[n] = &self.process_comment.1;
            n += 1;
        }
        if flow {
            slots[n] = &self.flow_comment;
            n += 1;
        }
        let options = PacketOptions {
            flags: match pkt.direction {
                Direction::In => pcapng::EPB_FLAG_INBOUND,
                Direction::Out => pcapng::EPB_FLAG_OUTBOUND,
            },
            process: meta.process.map(|p| (p.pid, 0)),
            comments: &slots[..n],
        };
        let (ts, orig_len) = (pkt.ts, pkt.orig_len);
        let gather = !direct
            && len >= GATHER_MIN
            && self.keylog.is_none()
            && matches!(self.file, Some(Output::Plain(_)));
        let block_start = self.buf.len();
        let mut hole = None;
        if gather {
            let mut out = pcapng::Gather { buf: &mut self.buf, hole: None };
            let data = &bytes.as_slice()[..len];
            pcapng::enhanced_packet(&mut out, iface as u32, ts, data, orig_len, &options);
            hole = out.hole;
        } else if let (true, Some(Output::Direct(f)), Bytes::Owned(owner)) =
            (direct, self.file.as_mut(), &mut bytes)
            && let Some(pad) = f.padding_for(&owner[..len])
        {
            // Out of its own buffer (see `direct::DirectFile::encode_from`).
            pcapng::padding(f.stage(), pad);
            f.encode_from(owner, len, |out, data| {
                pcapng::enhanced_packet(out, iface as u32, ts, data, orig_len, &options);
            });
        } else {
            let out = sink(&mut self.file, &mut self.buf, direct);
            let data = &bytes.as_slice()[..len];
            pcapng::enhanced_packet(out, iface as u32, ts, data, orig_len, &options);
        }
        self.packets_in_file += 1;
        self.counters[iface].written += 1;
        self.stats.written += 1;
        if let Some((at, _)) = hole {
            self.write_gathered(block_start, at, &bytes.as_slice()[..len])?;
        } else if direct {
            self.unflushed += 1;
        } else if self.buf.len() >= FLUSH_AT {
            self.write_out_with(false)?;
        }
        Ok(())
    }

    /// Whether blocks are encoded straight into the direct file's aligned stage: one copy
    /// of each packet (into memory the device reads) instead of two (into `buf`, then into
    /// the stage). Not with a key log: its packets wait in `buf` so that secrets logged
    /// later can still go into the file ahead of them.
    fn is_direct(&self) -> bool {
        self.keylog.is_none() && matches!(self.file, Some(Output::Direct(_)))
    }

    /// Makes room in the direct file's stage for a block of `need` bytes: a full stage
    /// writes its whole aligned chunks out.
    fn make_room(&mut self, need: usize) -> Result<(), CaptureError> {
        let Some(Output::Direct(f)) = self.file.as_mut() else { return Ok(()) };
        if let Err(source) = f.make_room(need) {
            self.keep_after_failed_write(0);
            return Err(CaptureError::Write { path: self.path.clone(), source });
        }
        Ok(())
    }

    /// After a failed write: keeps the whole blocks that reached the file since the last
    /// flush, cuts what follows them, and counts the kept bytes as written. Returns the
    /// bytes and the packets kept; the caller takes them off what it has pending. A pipe
    /// cannot be cut or read back: nothing is kept then.
    fn keep_whole_blocks(&mut self) -> (u64, u64) {
        let Some(file) = self.file.as_ref() else { return (0, 0) };
        let (bytes, packets) =
            file.keep_whole_blocks(&self.path, self.file_bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "could not cut {} back to its last whole block: {e}",
                    self.path.display()
                );
                (0, 0)
            });
        self.file_bytes += bytes;
        self.stats.bytes += bytes;
        (bytes, packets)
    }

    /// After a failed write of `head` ++ the buffer (or of the direct file's stage): what
    /// got out is no longer pending. Packets encoded into the stage are `unflushed`; a
    /// buffer's whole blocks that got out go from its front (at most one of the two is
    /// non-zero or non-empty).
    fn keep_after_failed_write(&mut self, head: usize) {
        let (bytes, packets) = self.keep_whole_blocks();
        self.unflushed = self.unflushed.saturating_sub(packets);
        let from_buf = (bytes as usize).saturating_sub(head).min(self.buf.len());
        self.buf.drain(..from_buf);
    }

    /// Where blocks go now (see [`sink`]).
    fn block_sink(&mut self) -> &mut dyn pcapng::Out {
        let direct = self.is_direct();
        sink(&mut self.file, &mut self.buf, direct)
    }

    /// Bytes of the current file, written or waiting.
    fn file_len(&self) -> u64 {
        match &self.file {
            Some(Output::Direct(f)) => f.size() + self.buf.len() as u64,
            _ => self.file_bytes + self.buf.len() as u64,
        }
    }

    /// Records the names in a DNS response the command received, as a Name Resolution Block
    /// (only names not recorded yet).
    pub fn names(&mut self, dns: &DnsEvent) {
        if self.failed {
            return;
        }
        let mut new: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for answer in &dns.answers {
            let DnsData::Addr(addr) = answer.data else { continue };
            let known = self.names.entry(addr).or_default();
            for name in [&answer.name, &dns.query] {
                let name = name.trim_end_matches('.');
                if !name.is_empty() && !known.iter().any(|k| k.eq_ignore_ascii_case(name)) {
                    known.push(name.to_string());
                    new.entry(addr).or_default().push(name.to_string());
                }
            }
        }
        if !new.is_empty() {
            pcapng::name_resolution(self.block_sink(), new.iter().map(|(a, n)| (*a, &n[..])));
        }
    }

    /// Writes everything buffered to the file (after any new TLS secrets). The collector
    /// calls this after each batch of events.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        if self.failed {
            return Ok(());
        }
        self.last_flush = std::time::Instant::now();
        let result = self.write_out_with(false);
        self.check(result)
    }

    /// [`Capture::flush`] if the last one was [`FLUSH_INTERVAL`] ago or more. The collector
    /// calls this after each batch of events and on its clock ticks (at least every 100 ms,
    /// events or not), so the file is complete up to at most ~150 ms ago.
    pub fn flush_due(&mut self) -> Result<(), CaptureError> {
        if self.last_flush.elapsed() < FLUSH_INTERVAL {
            return Ok(());
        }
        self.flush()
    }

    /// Finishes the capture: the last secrets, an ISB per interface with `dropped` (packets
    /// the backend and the event queue lost) on the first, and a final flush. No fsync: the
    /// file is complete for every reader once written (as with tcpdump and dumpcap), and
    /// syncing gigabytes would hold up the command's exit.
    pub fn close(mut self, dropped: u64) -> Result<CaptureStats, CaptureError> {
        self.stats.dropped = dropped;
        if !self.failed {
            let result = self.finish_file();
            self.check(result)?;
        }
        self.file = None;
        self.stats.files = self.files.iter().cloned().collect();
        Ok(std::mem::take(&mut self.stats))
    }

    /// Stops the capture on an error, returning it the one time.
    fn check(&mut self, result: Result<(), CaptureError>) -> Result<(), CaptureError> {
        if let Err(e) = &result {
            self.failed = true;
            self.file = None;
            self.stats.error = Some(chain(e));
            self.stats.lost_after_error += self.packets_pending();
            self.buf.clear();
            self.unflushed = 0;
        }
        result
    }

    /// Packets counted as written that were still in the buffer or the stage (lost with
    /// it on error).
    fn packets_pending(&self) -> u64 {
        let buffered =
            pcapng::blocks(&self.buf).filter(|b| b.block_type == pcapng::BLOCK_EPB).count();
        buffered as u64 + self.unflushed
    }

    /// Writes new key log lines (as a DSB), then the buffer: all of it if `all` or without a
    /// key log, else only what has waited `keylog_hold`.
    ///
    /// Why the wait: in a TLS 1.3 handshake the server's first flight is already encrypted,
    /// and the client can only log the handshake secrets after that flight arrived. Held
    /// back a moment, those packets still go into the file after the DSB with their secrets,
    /// which Wireshark needs in one pass (it gives up on a session whose handshake it could
    /// not decrypt).
    fn write_out_with(&mut self, all: bool) -> Result<(), CaptureError> {
        let fresh = match self.keylog.as_mut().map(|k| k.poll()) {
            Some(Ok(lines)) => lines,
            Some(Err(e)) => {
                tracing::warn!("stopped following the TLS key log: {e}");
                self.keylog = None;
                Vec::new()
            }
            None => Vec::new(),
        };
        let mut head = Vec::new();
        if !fresh.is_empty() {
            pcapng::decryption_secrets(&mut head, pcapng::SECRETS_TLS_KEY_LOG, &fresh);
            self.stats.secrets += fresh.iter().filter(|&&b| b == b'\n').count() as u64;
            self.secrets.extend_from_slice(&fresh);
        }
        let now = std::time::Instant::now();
        // New secrets do not release held packets: more lines of the same handshake may
        // still be on their way (a TLS library logs them one at a time).
        let cut = if all
            || self.keylog.is_none()
            || self.keylog_hold.is_zero()
            || self.buf.len() > HOLD_MAX
        {
            self.buf.len()
        } else {
            // Marks record how much of the buffer existed at each earlier flush.
            self.marks.push_back((now, self.buf.len()));
            self.marks
                .iter()
                .take_while(|(at, _)| now.duration_since(*at) >= self.keylog_hold)
                .last()
                .map_or(0, |&(_, end)| end)
        };
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let before = self.file_bytes;
        let written = [&head[..], &self.buf[..cut]]
            .into_iter()
            .filter(|chunk| !chunk.is_empty())
            .try_for_each(|chunk| file.write_all(chunk))
            .and_then(|()| file.flush());
        if let Err(source) = written {
            self.keep_after_failed_write(head.len());
            return Err(CaptureError::Write { path: self.path.clone(), source });
        }
        // A direct file also holds what was encoded into its stage since the last flush.
        let len = match file {
            Output::Direct(f) => f.size() - before,
            Output::Plain(_) => (head.len() + cut) as u64,
        };
        self.unflushed = 0;
        self.file_bytes += len;
        self.stats.bytes += len;
        self.buf.drain(..cut);
        self.marks.retain_mut(|(_, end)| {
            *end = end.saturating_sub(cut);
            *end > 0
        });
        Ok(())
    }

    /// Writes the buffer with `data` in the hole at `at` (see [`pcapng::Gather`]): all
    /// that waits, then the packet's block, in one `writev(2)`. `block_start` is where the
    /// packet's block begins in the buffer.
    fn write_gathered(
        &mut self,
        block_start: usize,
        at: usize,
        data: &[u8],
    ) -> Result<(), CaptureError> {
        let Some(Output::Plain(file)) = self.file.as_mut() else { return Ok(()) };
        let (head, tail) = self.buf.split_at(at);
        let mut parts = [io::IoSlice::new(head), io::IoSlice::new(data), io::IoSlice::new(tail)];
        let mut rest = &mut parts[..];
        let total = (head.len() + data.len() + tail.len()) as u64;
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "the file took no bytes");
                    return Err(self.gather_failed(block_start, e));
                }
                Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.gather_failed(block_start, e)),
            }
        }
        self.file_bytes += total;
        self.stats.bytes += total;
        self.buf.clear();
        Ok(())
    }

    /// After a failed [`Capture::write_gathered`]: keeps the whole blocks that got out and
    /// counts the packets that did not as lost (the buffer is cleared: its last block has
    /// a hole in it).
    fn gather_failed(&mut self, block_start: usize, source: io::Error) -> CaptureError {
        let waiting = pcapng::blocks(&self.buf[..block_start])
            .filter(|b| b.block_type == pcapng::BLOCK_EPB)
            .count() as u64
            + 1;
        let (_, kept) = self.keep_whole_blocks();
        self.stats.lost_after_error += waiting.saturating_sub(kept);
        self.buf.clear();
        CaptureError::Write { path: self.path.clone(), source }
    }

    /// Writes out everything buffered.
    fn write_out(&mut self) -> Result<(), CaptureError> {
        self.write_out_with(true)
    }

    /// Closes the current file with its statistics.
    fn finish_file(&mut self) -> Result<(), CaptureError> {
        let end_ns = now_unix_nanos();
        let direct = self.is_direct();
        let out = sink(&mut self.file, &mut self.buf, direct);
        for (i, c) in self.counters.iter().enumerate() {
            let stats = InterfaceStats {
                start_ns: self.start_ns,
                end_ns,
                received: c.received,
                dropped: if i == 0 { self.stats.dropped } else { 0 },
                filter_accepted: c.accepted,
                delivered: c.written,
            };
            pcapng::interface_statistics(out, i as u32, &stats);
        }
        self.write_out()
    }

    fn rotate(&mut self) -> Result<(), CaptureError> {
        self.finish_file()?;
        self.file = None;
        self.next_file()
    }

    /// Opens the next file (removing the oldest of a full ring) and buffers its header.
    fn next_file(&mut self) -> Result<(), CaptureError> {
        self.file_index += 1;
        let path = if self.to_stdout {
            PathBuf::from("-")
        } else if self.max_size.is_some() {
            numbered(&self.base, self.file_index)
        } else {
            self.base.clone()
        };
        if let Some(n) = self.max_files {
            while self.files.len() >= n as usize {
                let Some(old) = self.files.pop_front() else { break };
                std::fs::remove_file(&old)
                    .map_err(|source| CaptureError::Remove { path: old.clone(), source })?;
            }
        }
        let file = if self.to_stdout {
            io::stdout().as_fd().try_clone_to_owned().map(|f| Output::Plain(File::from(f)))
        } else {
            Output::create(&path)
        }
        .map_err(|source| CaptureError::Create { path: path.clone(), source })?;
        self.file = Some(file);
        self.files.push_back(path.clone());
        self.path = path;
        self.file_bytes = 0;
        self.packets_in_file = 0;
        // The header blocks go where this file's blocks go (`block_sink`); encoded into a
        // scratch buffer first, as they read fields of `self`.
        let mut head = Vec::new();
        pcapng::section_header(&mut head, &self.section);
        for iface in &self.interfaces {
            pcapng::interface_description(&mut head, iface, &self.section.os);
        }
        pcapng::name_resolution(&mut head, self.names.iter().map(|(a, n)| (*a, &n[..])));
        if !self.secrets.is_empty() {
            pcapng::decryption_secrets(&mut head, pcapng::SECRETS_TLS_KEY_LOG, &self.secrets);
        }
        self.block_sink().put(&head);
        Ok(())
    }
}

/// A packet's bytes as the capture gets them: borrowed, or in a buffer it may keep
/// ([`Capture::take_packet`]).
enum Bytes<'a> {
    Shared(&'a [u8]),
    Owned(&'a mut crate::event::PacketData),
}

impl Bytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Shared(b) => b,
            Bytes::Owned(b) => b,
        }
    }
}

/// Where the next blocks go: the direct file's aligned stage when `direct` (see
/// [`Capture::is_direct`]; the caller made room first, else the stage grows), or `buf`.
fn sink<'a>(
    file: &'a mut Option<Output>,
    buf: &'a mut Vec<u8>,
    direct: bool,
) -> &'a mut dyn pcapng::Out {
    match file {
        Some(Output::Direct(f)) if direct => f.stage(),
        _ => buf,
    }
}

/// The open capture file.
enum Output {
    /// Written through the page cache: tmpfs, pipes (`-c -`), and file systems that refuse
    /// `O_DIRECT`.
    Plain(File),
    /// A file on a block device, written around the page cache ([`direct`]).
    Direct(direct::DirectFile),
}

impl Output {
    fn create(path: &Path) -> io::Result<Self> {
        Ok(match direct::DirectFile::create(path)? {
            Some(f) => Output::Direct(f),
            None => Output::Plain(File::create(path)?),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Output::Plain(f) => f.write_all(bytes),
            Output::Direct(f) => f.write_all(bytes),
        }
    }

    /// Puts everything written so far into the file.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Plain(_) => Ok(()),
            Output::Direct(f) => f.flush(),
        }
    }

    /// Reads the file back from `from` (the end of the last complete write), keeps the
    /// whole blocks found there and cuts whatever follows them: returns the bytes and the
    /// packets (EPBs) kept. Only for regular files; a pipe keeps what it took.
    fn keep_whole_blocks(&self, path: &Path, from: u64) -> io::Result<(u64, u64)> {
        let written = match self {
            Output::Plain(f) => f,
            Output::Direct(f) => f.plain(),
        };
        let meta = written.metadata()?;
        if !meta.file_type().is_file() || meta.len() <= from {
            return Ok((0, 0));
        }
        // Opened for writing only; read it back through a descriptor of its own.
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let mut tail = vec![0; (meta.len() - from) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, from)?;
        let (mut bytes, mut packets) = (0u64, 0u64);
        for block in pcapng::blocks(&tail) {
            bytes += block.body.len() as u64 + 12;
            packets += u64::from(block.block_type == pcapng::BLOCK_EPB);
        }
        file.set_len(from + bytes)?;
        Ok((bytes, packets))
    }
}

impl Drop for Capture {
    /// A capture dropped without [`Capture::close`] (an early error in the run) still
    /// leaves its buffered packets on disk.
    fn drop(&mut self) {
        if !self.failed && self.file.is_some() {
            let _ = self.write_out();
        }
    }
}

/// `out.pcapng` → `out_00003.pcapng` (dumpcap's numbering without its timestamp), so the
/// files of a ring sort in capture order.
fn numbered(base: &Path, index: u32) -> PathBuf {
    let stem = base.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}_{index:05}.{}", ext.to_string_lossy()),
        None => format!("{stem}_{index:05}"),
    };
    base.with_file_name(name)
}

/// `e` and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The SHB's description of this machine and program.
fn section_info(command: Option<String>) -> SectionInfo {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
    let os = match (read("/proc/sys/kernel/ostype"), read("/proc/sys/kernel/osrelease")) {
        (Some(t), Some(r)) => format!("{t} {r}"),
        _ => std::env::consts::OS.to_string(),
    };
    let cpu = read("/proc/cpuinfo").and_then(|info| {
        info.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let hardware = match cpu {
        Some(cpu) => format!("{} ({cpu})", std::env::consts::ARCH),
        None => std::env::consts::ARCH.to_string(),
    };
    SectionInfo {
        hardware,
        os,
        application: format!("childflow {}", env!("CARGO_PKG_VERSION")),
        comment: command.map(|c| format!("command: {c}")),
    }
}

#[cfg(test)]
mod tests;
