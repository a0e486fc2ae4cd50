//! Records the kernel programs write to ring buffers, and the drop counters they keep.
//!
//! Every record starts with a `u32` kind tag (`KIND_*`). Userspace reads the tag as an
//! integer, checks the length and copies the record out with `read_unaligned`
//! ([`decode`], behind the `user` feature); it never transmutes bytes into an enum.

use crate::flow::{FlowKey, FlowStats};

/// A [`FlowRecord`]: a flow started, was sampled, or ended.
pub const KIND_FLOW: u32 = 1;
/// A [`PacketHeader`] followed by `cap_len` bytes of the packet, from the link layer on.
pub const KIND_PACKET: u32 = 2;
/// A [`SockRecord`]: a process of the command tree used a socket.
pub const KIND_SOCK: u32 = 3;

/// [`FlowRecord::reason`]: the first packet of a flow was seen.
pub const FLOW_START: u32 = 1;
/// [`FlowRecord::reason`]: a periodic snapshot of a live flow's counters.
pub const FLOW_UPDATE: u32 = 2;
/// [`FlowRecord::reason`]: both sides sent FIN.
pub const FLOW_END_FIN: u32 = 3;
/// [`FlowRecord::reason`]: a RST ended the flow.
pub const FLOW_END_RST: u32 = 4;
/// [`FlowRecord::reason`]: no packet for the protocol's idle timeout.
pub const FLOW_END_IDLE: u32 = 5;

/// A flow's key and counters at one moment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowRecord {
    /// Always [`KIND_FLOW`].
    pub kind: u32,
    /// One of `FLOW_*`.
    pub reason: u32,
    pub key: FlowKey,
    pub stats: FlowStats,
}
const _: () = assert!(core::mem::size_of::<FlowRecord>() == 136);

/// The fixed part of a captured packet; `cap_len` bytes of packet data follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketHeader {
    /// Always [`KIND_PACKET`].
    pub kind: u32,
    /// `DIR_OUT` (sent by the command) or `DIR_IN`.
    pub direction: u32,
    /// The interface the packet was seen on.
    pub ifindex: u32,
    /// The packet's length on the wire.
    pub orig_len: u32,
    /// How many bytes of it follow this header (at most the snap length).
    pub cap_len: u32,
    /// `PACKET_*` bits.
    pub flags: u32,
    /// Kernel monotonic clock (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    /// The CPU that copied it: the records of one packet come from one program run, so
    /// they are consecutive among that CPU's records (not among all records).
    pub cpu: u32,
    /// Where in the packet this record's bytes start; 0 for a packet's first record.
    pub offset: u32,
    /// With [`PACKET_CLONED`]: the tag of the packet's clone on the capture tap, its VLAN
    /// TCI there: the CPU (below [`CLONE_CPUS`]) above the low [`CLONE_SEQ_BITS`] bits of
    /// that CPU's count of clones. A CPU's clones reach the tap in the order of its
    /// records, so the n-th record with a tag belongs to the n-th clone with it. Otherwise
    /// 0.
    pub clone_tag: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PacketHeader>() == 48);

/// [`PacketHeader::flags`]: the packet belongs in the capture (capture is on and the capture
/// filter, if any, matched it). Without it the packet was copied only because it is DNS,
/// for naming flows, and must not be written to the capture.
pub const PACKET_CAPTURE: u32 = 1;
/// [`PacketHeader::flags`]: more records of this packet follow (from the same CPU). The
/// current programs copy every packet into one record and never set it; [`Reassembly`]
/// still joins such records (a program copying through a per-CPU buffer, capped at 32 KiB
/// a value, had to split GSO packets).
pub const PACKET_MORE: u32 = 2;
/// [`PacketHeader::flags`]: the record carries no bytes (`cap_len` is 0; `orig_len` bytes are
/// the whole packet): the program handed a clone of the packet to the capture tap
/// ([`CaptureConfig::clone_ifindex`]) before it wrote the record, tagged with
/// [`PacketHeader::clone_tag`] as a VLAN tag, which the tap's reader strips. The clone
/// shares the packet's memory, so the packet is copied once, by the reader's `read`, on the
/// reader's CPU, not in the sender's softirq.
pub const PACKET_CLONED: u32 = 4;

/// [`SockRecord::hook`]: a process of the command tree created a socket (`key` is zero).
/// Sent at once (forced wake-up) so userspace can read `/proc/PID` while the process lives.
pub const SOCK_CREATE: u32 = 1;
/// [`SockRecord::hook`]: the first packet of flow `key` left a socket of the command tree;
/// the process fields are those of the socket's creator.
pub const SOCK_FLOW: u32 = 2;

/// A process of the command tree created a socket, or a socket of it sent a flow's first
/// packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRecord {
    /// Always [`KIND_SOCK`].
    pub kind: u32,
    /// Which hook saw it: [`SOCK_CREATE`] or [`SOCK_FLOW`].
    pub hook: u32,
    /// Thread group id (the process id users see).
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `bpf_get_socket_cookie`: joins this record with the packets of the socket.
    pub cookie: u64,
    /// What the hook knew of the flow (the local port may still be 0 before connect).
    pub key: FlowKey,
    /// `task->comm`, NUL padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SockRecord>() == 88);

/// The capture settings userspace writes into the kernel's one-entry config array.
///
/// DNS packets (UDP or TCP port 53) are copied whatever `capture_all` says (and whatever
/// the capture filter in the `FILTER` map says), so flows get names even without a capture;
/// [`PACKET_CAPTURE`] tells the two kinds of copies apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureConfig {
    /// Nonzero: copy every packet (capture on). Zero: only DNS.
    pub capture_all: u32,
    /// Copy at most this many bytes of a packet (also capped by [`CAPTURE_MAX`]).
    pub snaplen: u32,
    /// Nonzero: the capture tap, where large captured packets go as clones instead of being
    /// copied into the ring ([`PACKET_CLONED`]).
    pub clone_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 12);

/// Captured packets longer than this go to the capture tap as clones when there is one
/// ([`CaptureConfig::clone_ifindex`]): GSO super-packets, where the copy is what costs.
/// Shorter ones (ACKs, MTU-sized frames) are copied into the ring, which is cheaper per
/// packet than a clone, a queue and a `read` each.
pub const CLONE_MIN: u32 = 2048;
/// Longer packets are copied into the ring rather than cloned: the tap's reader reads
/// clones into 64 KiB buffers (childflow's packet arena slots). TCP's GSO packets stay
/// below it (its size goal leaves room for headers under the 64 KiB GSO limit).
pub const CLONE_MAX: u32 = 64 << 10;
/// Bits of a CPU's clone count in [`PacketHeader::clone_tag`].
pub const CLONE_SEQ_BITS: u32 = 10;
/// Only CPUs below this clone packets (their number fits the tag's other 6 bits); the rest
/// copy into the ring.
pub const CLONE_CPUS: u32 = 1 << (16 - CLONE_SEQ_BITS);

/// The most bytes of one packet the kernel copies, whatever the snap length: more than a
/// 64 KiB GSO super-packet and its Ethernet header. Longer packets (BIG TCP) are truncated
/// (their `orig_len` is kept). The programs copy a packet into one ring record, reserved in
/// the ring in one of a few sizes and loaded in place (childflow-ebpf `tc.rs`).
pub const CAPTURE_MAX: u32 = 80 * 1024;

/// Indexes into the kernel's drop-counter array map. Every loss is counted, never silent.
pub const DROP_FLOW_RINGBUF: u32 = 0;
pub const DROP_PACKET_RINGBUF: u32 = 1;
pub const DROP_FLOW_MAP_FULL: u32 = 2;
pub const DROP_SOCK_RINGBUF: u32 = 3;
pub const DROP_PARSE: u32 = 4;
/// Not a loss: packets the capture filter (the `FILTER` map) rejected in the kernel while
/// capture was on. They never reach userspace; this count lets the capture's statistics
/// (the ISB's filter counters, the exit summary) include them.
pub const COUNT_CAPTURE_FILTERED: u32 = 5;
/// Number of drop counters.
pub const DROP_COUNTERS: u32 = 8;

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::mem::size_of;

    /// A ring-buffer record, decoded.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Record<'a> {
        Flow(FlowRecord),
        Packet { header: PacketHeader, data: &'a [u8] },
        Sock(SockRecord),
    }

    /// Why a ring-buffer record could not be decoded.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum DecodeError {
        /// The record is shorter than its kind's fixed size.
        #[error("record of kind {kind} is {len} bytes, expected at least {want}")]
        Short { kind: u32, len: usize, want: usize },
        /// The kind tag is not one we know.
        #[error("unknown record kind {0}")]
        UnknownKind(u32),
    }

    fn read<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
        if bytes.len() < size_of::<T>() {
            return Err(DecodeError::Short { kind, len: bytes.len(), want: size_of::<T>() });
        }
        // SAFETY: the length is checked above, T is a #[repr(C)] plain-data type for which
        // every bit pattern is valid, and read_unaligned imposes no alignment requirement.
        Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// Decodes one ring-buffer record. Pure: no allocation, no I/O.
    pub fn decode(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
        let kind: u32 = read(bytes, 0)?;
        match kind {
            KIND_FLOW => Ok(Record::Flow(read(bytes, kind)?)),
            KIND_SOCK => Ok(Record::Sock(read(bytes, kind)?)),
            KIND_PACKET => {
                let header: PacketHeader = read(bytes, kind)?;
                let start = size_of::<PacketHeader>();
                let want = start + header.cap_len as usize;
                if bytes.len() < want {
                    return Err(DecodeError::Short { kind, len: bytes.len(), want });
                }
                Ok(Record::Packet { header, data: &bytes[start..want] })
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }

    /// Joins the ring records of packets copied in several chunks ([`PACKET_MORE`]).
    ///
    /// A packet's records come from one program run on one CPU, so they follow each other
    /// among that CPU's records: one packet at most is pending per CPU. A record that does
    /// not continue its CPU's pending packet (a chunk was lost to a full ring, which the
    /// kernel counted) completes that packet with the bytes that did arrive, so every
    /// packet still comes out once, shorter (`cap_len` is what its data holds).
    ///
    /// The join buffers are reused (one spare per CPU at most) and sized for the whole
    /// packet up front: at bulk rates (64 KiB GSO packets in 4–5 records, ~15k/s) a fresh
    /// buffer grown record by record was several allocations, copies and page faults each.
    #[derive(Debug, Default)]
    pub struct Reassembly {
        pending: std::collections::HashMap<u32, (PacketHeader, std::vec::Vec<u8>)>,
        spare: std::vec::Vec<std::vec::Vec<u8>>,
    }

    impl Reassembly {
        /// Feeds one packet record; `out` gets every packet it completes (with `cap_len`
        /// the length of the data, the `PACKET_MORE` flag cleared).
        pub fn push(
            &mut self,
            header: PacketHeader,
            data: &[u8],
            out: &mut impl FnMut(PacketHeader, &[u8]),
        ) {
            let more = header.flags & PACKET_MORE != 0;
            if header.offset > 0 {
                let continues = self.pending.get(&header.cpu).is_some_and(|(h, d)| {
                    d.len() == header.offset as usize && h.ts_ns == header.ts_ns
                });
                if continues {
                    let (_, d) = self.pending.get_mut(&header.cpu).expect("checked above");
                    d.extend_from_slice(data);
                    if !more {
                        let (h, d) = self.pending.remove(&header.cpu).expect("checked above");
                        emit(h, &d, out);
                        self.keep(d);
                    }
                    return;
                }
                // The start of this packet was lost: what remains cannot be placed.
                self.flush_cpu(header.cpu, out);
                return;
            }
            self.flush_cpu(header.cpu, out);
            if more {
                let mut d = self.spare.pop().unwrap_or_default();
                // The whole packet, as far as the kernel copies it (CAPTURE_MAX bounds it).
                d.reserve((header.orig_len as usize).clamp(data.len(), 1 << 20));
                d.extend_from_slice(data);
                self.pending.insert(header.cpu, (header, d));
            } else {
                emit(header, data, out);
            }
        }

        /// Completes every pending packet with what arrived of it (the run is over).
        pub fn finish(&mut self, out: &mut impl FnMut(PacketHeader, &[u8])) {
            let cpus: std::vec::Vec<u32> = self.pending.keys().copied().collect();
            for cpu in cpus {
                self.flush_cpu(cpu, out);
            }
        }

        fn flush_cpu(&mut self, cpu: u32, out: &mut impl FnMut(PacketHeader, &[u8])) {
            if let Some((h, d)) = self.pending.remove(&cpu) {
                emit(h, &d, out);
                self.keep(d);
            }
        }

        /// Keeps an emitted join buffer for the next packet, up to one per pending slot.
        fn keep(&mut self, mut d: std::vec::Vec<u8>) {
            if self.spare.len() <= self.pending.len() {
                d.clear();
                self.spare.push(d);
            }
        }
    }

    fn emit(mut header: PacketHeader, data: &[u8], out: &mut impl FnMut(PacketHeader, &[u8])) {
        header.cap_len = data.len() as u32;
        header.flags &= !PACKET_MORE;
        header.offset = 0;
        out(header, data);
    }

    // SAFETY: plain #[repr(C)] data with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for FlowRecord {}
    unsafe impl aya::Pod for SockRecord {}
    unsafe impl aya::Pod for PacketHeader {}
    unsafe impl aya::Pod for CaptureConfig {}
    unsafe impl aya::Pod for crate::flow::FlowKey {}
    unsafe impl aya::Pod for crate::flow::FlowStats {}
    unsafe impl aya::Pod for crate::flow::FlowEntry {}
    unsafe impl aya::Pod for crate::flow::FlowSlot {}

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::flow::{DIR_IN, PROTO_UDP};
        use std::vec::Vec;

        fn bytes_of<T>(v: &T) -> Vec<u8> {
            // SAFETY: reading the bytes of a plain #[repr(C)] value.
            unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
                .to_vec()
        }

        #[test]
        fn decodes_a_flow_record() {
            let mut rec =
                FlowRecord { kind: KIND_FLOW, reason: FLOW_END_FIN, ..Default::default() };
            rec.key.proto = PROTO_UDP;
            rec.stats.packets = [3, 4];
            assert_eq!(decode(&bytes_of(&rec)), Ok(Record::Flow(rec)));
        }

        #[test]
        fn decodes_a_packet_with_its_data_at_an_odd_offset() {
            let header = PacketHeader {
                kind: KIND_PACKET,
                direction: DIR_IN as u32,
                orig_len: 100,
                cap_len: 3,
                ..Default::default()
            };
            let mut buf = std::vec![0u8];
            buf.extend(bytes_of(&header));
            buf.extend([1, 2, 3, 9]);
            let got = decode(&buf[1..]).unwrap();
            assert_eq!(got, Record::Packet { header, data: &[1, 2, 3] });
        }

        #[test]
        fn chunks_of_packets_from_two_cpus_are_joined_and_a_lost_chunk_shortens_one() {
            let chunk = |cpu, ts_ns, offset, more: bool, data: &[u8]| {
                let h = PacketHeader {
                    kind: KIND_PACKET,
                    orig_len: 100,
                    cap_len: data.len() as u32,
                    flags: PACKET_CAPTURE | if more { PACKET_MORE } else { 0 },
                    ts_ns,
                    cpu,
                    offset,
                    ..Default::default()
                };
                (h, data.to_vec())
            };
            let records = [
                chunk(0, 1, 0, true, &[1, 2]),
                chunk(1, 2, 0, true, &[7]),
                chunk(0, 1, 2, true, &[3]),
                chunk(1, 2, 1, false, &[8, 9]),
                chunk(0, 1, 3, false, &[4]),
                // CPU 0's next packet loses its second chunk: the third is dropped and the
                // packet comes out with its first chunk when the next one starts.
                chunk(0, 3, 0, true, &[5]),
                chunk(0, 3, 2, false, &[6]),
                chunk(0, 4, 0, false, &[10]),
                // Pending at the end of the run.
                chunk(1, 5, 0, true, &[11]),
            ];
            let mut r = Reassembly::default();
            let mut got = Vec::new();
            let mut out = |h: PacketHeader, d: &[u8]| {
                assert_eq!(h.flags, PACKET_CAPTURE);
                assert_eq!(h.cap_len as usize, d.len());
                got.push((h.cpu, h.ts_ns, d.to_vec()));
            };
            for (h, d) in &records {
                r.push(*h, d, &mut out);
            }
            r.finish(&mut out);
            assert_eq!(
                got,
                [
                    (1, 2, std::vec![7, 8, 9]),
                    (0, 1, std::vec![1, 2, 3, 4]),
                    (0, 3, std::vec![5]),
                    (0, 4, std::vec![10]),
                    (1, 5, std::vec![11]),
                ]
            );
        }

        #[test]
        fn rejects_short_and_unknown_records() {
            assert_eq!(decode(&[1, 0, 0]), Err(DecodeError::Short { kind: 0, len: 3, want: 4 }));
            assert_eq!(
                decode(&[KIND_FLOW as u8, 0, 0, 0, 0]),
                Err(DecodeError::Short { kind: KIND_FLOW, len: 5, want: 136 })
            );
            assert_eq!(decode(&[99, 0, 0, 0]), Err(DecodeError::UnknownKind(99)));
            let header = PacketHeader { kind: KIND_PACKET, cap_len: 10, ..Default::default() };
            assert!(matches!(decode(&bytes_of(&header)), Err(DecodeError::Short { .. })));
        }
    }
}

#[cfg(feature = "user")]
pub use user::{DecodeError, Reassembly, Record, decode};
