//! A focused pcapng block encoder: appends whole blocks, in host byte order, to a `Vec<u8>`
//! or straight into the aligned stage of a direct file ([`Out`]).
//!
//! Follows the PCAP Next Generation file format (draft-ietf-opsawg-pcapng): §3.1 the block
//! layout (type, total length, body padded to 32 bits, total length again), §3.5 options
//! (code, length, value padded to 32 bits, closed by `opt_endofopt` when any is present),
//! §4.1–§4.7 the blocks we write. The byte-order magic in the section header lets readers
//! detect our (native) byte order, so nothing is byte-swapped here.
//!
//! Invariants: every function appends exactly one complete, well-formed block or nothing
//! (the caller's buffer only ever holds whole blocks, which is what makes a file that was cut
//! after a flush still readable); nothing here allocates except by growing `out`; nothing
//! panics.

use std::net::IpAddr;

/// Section Header Block (§4.1).
pub const BLOCK_SHB: u32 = 0x0A0D_0D0A;
/// Interface Description Block (§4.2).
pub const BLOCK_IDB: u32 = 0x0000_0001;
/// Name Resolution Block (§4.5).
pub const BLOCK_NRB: u32 = 0x0000_0004;
/// Interface Statistics Block (§4.6).
pub const BLOCK_ISB: u32 = 0x0000_0005;
/// Enhanced Packet Block (§4.3).
pub const BLOCK_EPB: u32 = 0x0000_0006;
/// Decryption Secrets Block (§4.7).
pub const BLOCK_DSB: u32 = 0x0000_000A;
/// A block of zeros that only moves the next block to a chosen file offset ([`padding`]).
/// Its type is one §10.1 reserves for local use (bit 31 set): readers skip block types they
/// do not know (§3.1), silently: Wireshark's `pcapng_read_block` skips it as an unknown
/// block (a debug message only) and libpcap's reader ignores it.
pub const BLOCK_PADDING: u32 = 0x8C1F_0A11;

/// Where an Enhanced Packet Block's packet data starts, from the start of the block: type,
/// length, interface, timestamp (2), captured and original length (§4.3).
pub const EPB_DATA_OFFSET: usize = 28;

/// The smallest block: type and the two lengths (§3.1).
pub const MIN_BLOCK: usize = 12;

/// Written in native order; a reader of the other endianness sees 0x4D3C2B1A and swaps.
pub const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

/// LINKTYPE_ETHERNET (the tcpdump.org link-layer header type registry).
pub const LINKTYPE_ETHERNET: u16 = 1;

/// DSB secrets type: a NSS key log file ("TLSK").
pub const SECRETS_TLS_KEY_LOG: u32 = 0x544C_534B;

/// Option codes (§3.5 and the per-block option tables).
pub mod opt {
    pub const ENDOFOPT: u16 = 0;
    pub const COMMENT: u16 = 1;
    pub const SHB_HARDWARE: u16 = 2;
    pub const SHB_OS: u16 = 3;
    pub const SHB_USERAPPL: u16 = 4;
    pub const IF_NAME: u16 = 2;
    pub const IF_DESCRIPTION: u16 = 3;
    pub const IF_TSRESOL: u16 = 9;
    pub const IF_OS: u16 = 12;
    pub const EPB_FLAGS: u16 = 2;
    /// Two `u32`: process id, thread id (0 when unknown).
    pub const EPB_PROCESSID_THREADID: u16 = 8;
    pub const NRB_RECORD_END: u16 = 0;
    pub const NRB_RECORD_IPV4: u16 = 1;
    pub const NRB_RECORD_IPV6: u16 = 2;
    pub const ISB_STARTTIME: u16 = 2;
    pub const ISB_ENDTIME: u16 = 3;
    pub const ISB_IFRECV: u16 = 4;
    pub const ISB_IFDROP: u16 = 5;
    pub const ISB_FILTERACCEPT: u16 = 6;
    pub const ISB_USRDELIV: u16 = 8;
}

/// `epb_flags` bits 0–1 (§4.3.1): the packet came in on the interface.
pub const EPB_FLAG_INBOUND: u32 = 0b01;
/// `epb_flags` bits 0–1 (§4.3.1): the packet went out of the interface.
pub const EPB_FLAG_OUTBOUND: u32 = 0b10;

/// `if_tsresol` value meaning 10^-9 s: timestamps are nanoseconds.
pub const TSRESOL_NANOS: u8 = 9;

/// Bytes of padding that bring `len` to a multiple of 4.
const fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Where blocks are appended: a growable byte buffer. Implemented by `Vec<u8>` and by the
/// staging buffer of a direct file (`super::direct::Stage`), so a packet's bytes are copied
/// once, into the memory the device reads, rather than into a `Vec` and then again.
pub trait Out {
    /// Bytes held.
    fn len(&self) -> usize;
    /// Whether nothing is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `bytes` (growing if needed).
    fn put(&mut self, bytes: &[u8]);
    /// Appends a packet's data: [`Gather`] leaves a hole for it instead of copying it.
    fn put_data(&mut self, bytes: &[u8]) {
        self.put(bytes);
    }
    /// Overwrites the 4 bytes at `at` (within what is held).
    fn patch(&mut self, at: usize, bytes: [u8; 4]);
    /// Drops everything from `len` on.
    fn truncate(&mut self, len: usize);
}

/// Blocks encoded into `buf` except for one packet's data, which gets a hole of its
/// length: the caller writes `buf` around it with one `writev(2)`, so a large packet is not
/// copied into the buffer first.
pub struct Gather<'b> {
    pub buf: &'b mut Vec<u8>,
    /// Where in the bytes the data goes, and its length.
    pub hole: Option<(usize, usize)>,
}

impl Gather<'_> {
    fn hole_len(&self) -> usize {
        self.hole.map_or(0, |(_, len)| len)
    }
}

impl Out for Gather<'_> {
    fn len(&self) -> usize {
        self.buf.len() + self.hole_len()
    }
    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
    fn put_data(&mut self, bytes: &[u8]) {
        if self.hole.is_some() {
            // One hole only: another packet's data is copied.
            self.buf.extend_from_slice(bytes);
        } else {
            self.hole = Some((self.buf.len(), bytes.len()));
        }
    }
    fn patch(&mut self, at: usize, bytes: [u8; 4]) {
        let at = match self.hole {
            Some((hole, len)) if at >= hole => at - len,
            _ => at,
        };
        self.buf.patch(at, bytes);
    }
    fn truncate(&mut self, len: usize) {
        match self.hole {
            Some((hole, _)) if len <= hole => {
                self.hole = None;
                self.buf.truncate(len);
            }
            _ => {
                let len = len - self.hole_len();
                self.buf.truncate(len);
            }
        }
    }
}

impl Out for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn patch(&mut self, at: usize, bytes: [u8; 4]) {
        if let Some(dst) = self.get_mut(at..at + 4) {
            dst.copy_from_slice(&bytes);
        }
    }
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }
}

/// One block under construction at the end of `out`. `finish` pads and closes it; a block
/// that is dropped without `finish` is removed again, so `out` never holds half a block.
struct Block<'a, O: Out + ?Sized> {
    out: &'a mut O,
    start: usize,
    options: bool,
    done: bool,
}

impl<'a, O: Out + ?Sized> Block<'a, O> {
    fn begin(out: &'a mut O, block_type: u32) -> Self {
        let start = out.len();
        out.put(&block_type.to_ne_bytes());
        out.put(&0u32.to_ne_bytes()); // total length, patched by `finish`
        Block { out, start, options: false, done: false }
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.out.put(&v.to_ne_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.out.put(&v.to_ne_bytes());
        self
    }

    /// A 64-bit timestamp as the high and low 32-bit words (§4.3: not one `u64`, so the
    /// word order is the same in either byte order).
    fn timestamp(&mut self, ts: u64) -> &mut Self {
        self.u32((ts >> 32) as u32).u32(ts as u32)
    }

    fn padded(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.put(bytes);
        self.out.put(&[0; 3][..pad4(bytes.len())]);
        self
    }

    /// One option; values longer than an option can hold (64 KiB) are cut, which only a
    /// pathological comment could reach.
    fn option(&mut self, code: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(usize::from(u16::MAX) - 3)];
        self.options = true;
        self.u16(code).u16(value.len() as u16).padded(value)
    }

    fn option_u64(&mut self, code: u16, v: u64) -> &mut Self {
        self.option(code, &v.to_ne_bytes())
    }

    fn finish(mut self) -> usize {
        if self.options {
            self.u16(opt::ENDOFOPT).u16(0);
        }
        let total = (self.out.len() - self.start + 4) as u32;
        self.u32(total);
        self.out.patch(self.start + 4, total.to_ne_bytes());
        self.done = true;
        total as usize
    }
}

impl<O: Out + ?Sized> Drop for Block<'_, O> {
    fn drop(&mut self) {
        if !self.done {
            self.out.truncate(self.start);
        }
    }
}

/// What the section header says about who wrote the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SectionInfo {
    /// `shb_hardware`, e.g. "x86_64 (AMD EPYC 7763)".
    pub hardware: String,
    /// `shb_os`, e.g. "Linux 6.18.0".
    pub os: String,
    /// `shb_userappl`, e.g. "childflow 0.1.0".
    pub application: String,
    /// `opt_comment`, e.g. the command that was run.
    pub comment: Option<String>,
}

/// Appends a Section Header Block of unknown section length (§4.1: -1, we stream).
pub fn section_header<O: Out + ?Sized>(out: &mut O, info: &SectionInfo) -> usize {
    let mut b = Block::begin(out, BLOCK_SHB);
    b.u32(BYTE_ORDER_MAGIC).u16(1).u16(0);
    b.out.put(&(-1i64).to_ne_bytes());
    for (code, value) in [
        (opt::SHB_HARDWARE, &info.hardware),
        (opt::SHB_OS, &info.os),
        (opt::SHB_USERAPPL, &info.application),
    ] {
        if !value.is_empty() {
            b.option(code, value.as_bytes());
        }
    }
    if let Some(comment) = &info.comment {
        b.option(opt::COMMENT, comment.as_bytes());
    }
    b.finish()
}

/// One capture point, described by an Interface Description Block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// `if_name`, e.g. "tap0".
    pub name: String,
    /// `if_description`: the backend and whose view the directions take.
    pub description: String,
    /// `opt_comment`, e.g. the capture filter in force.
    pub comment: Option<String>,
    /// The most bytes of a packet that are kept.
    pub snaplen: u32,
}

/// Appends an Ethernet Interface Description Block with nanosecond timestamps (§4.2).
pub fn interface_description<O: Out + ?Sized>(
    out: &mut O,
    iface: &InterfaceInfo,
    os: &str,
) -> usize {
    let mut b = Block::begin(out, BLOCK_IDB);
    b.u16(LINKTYPE_ETHERNET).u16(0).u32(iface.snaplen);
    b.option(opt::IF_NAME, iface.name.as_bytes());
    b.option(opt::IF_DESCRIPTION, iface.description.as_bytes());
    b.option(opt::IF_TSRESOL, &[TSRESOL_NANOS]);
    if !os.is_empty() {
        b.option(opt::IF_OS, os.as_bytes());
    }
    if let Some(comment) = &iface.comment {
        b.option(opt::COMMENT, comment.as_bytes());
    }
    b.finish()
}

/// The options of one Enhanced Packet Block.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketOptions<'a> {
    /// `epb_flags`; 0 is not written.
    pub flags: u32,
    /// `epb_processid_threadid`: (pid, tid), tid 0 when unknown.
    pub process: Option<(u32, u32)>,
    /// `opt_comment`s, each one option.
    pub comments: &'a [&'a str],
}

/// Appends an Enhanced Packet Block (§4.3) holding `data`, a packet that was `orig_len`
/// bytes on the wire, seen at `ts_ns` (nanoseconds since the epoch, as `if_tsresol` 9 says).
pub fn enhanced_packet<O: Out + ?Sized>(
    out: &mut O,
    interface: u32,
    ts_ns: u64,
    data: &[u8],
    orig_len: u32,
    options: &PacketOptions<'_>,
) -> usize {
    let mut b = Block::begin(out, BLOCK_EPB);
    b.u32(interface).timestamp(ts_ns).u32(data.len() as u32).u32(orig_len.max(data.len() as u32));
    b.out.put_data(data);
    b.out.put(&[0; 3][..pad4(data.len())]);
    if options.flags != 0 {
        b.option(opt::EPB_FLAGS, &options.flags.to_ne_bytes());
    }
    if let Some((pid, tid)) = options.process {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&pid.to_ne_bytes());
        v[4..].copy_from_slice(&tid.to_ne_bytes());
        b.option(opt::EPB_PROCESSID_THREADID, &v);
    }
    for comment in options.comments {
        b.option(opt::COMMENT, comment.as_bytes());
    }
    b.finish()
}

/// Appends a Name Resolution Block (§4.5) with one record per address, each naming every
/// name in its list; nothing if `records` is empty (an NRB without records is legal but
/// useless).
pub fn name_resolution<'n, O: Out + ?Sized>(
    out: &mut O,
    records: impl IntoIterator<Item = (IpAddr, &'n [String])>,
) -> usize {
    let mut b = Block::begin(out, BLOCK_NRB);
    let body_start = b.out.len();
    for (addr, names) in records {
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).filter(|n| valid_name(n)).collect();
        if names.is_empty() {
            continue;
        }
        let (code, addr_bytes): (u16, &[u8]) = match &addr {
            IpAddr::V4(a) => (opt::NRB_RECORD_IPV4, &a.octets()),
            IpAddr::V6(a) => (opt::NRB_RECORD_IPV6, &a.octets()),
        };
        let mut value = addr_bytes.to_vec();
        for name in names {
            value.extend_from_slice(name.as_bytes());
            value.push(0);
        }
        if value.len() > usize::from(u16::MAX) {
            continue;
        }
        b.u16(code).u16(value.len() as u16).padded(&value);
    }
    if b.out.len() == body_start {
        return 0; // dropped without `finish`: removed
    }
    b.u16(opt::NRB_RECORD_END).u16(0);
    b.finish()
}

/// A name we can put in an NRB record: non-empty, without the NUL that ends it.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('\0')
}

/// Counters for an Interface Statistics Block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InterfaceStats {
    /// When the capture started, ns since the epoch.
    pub start_ns: u64,
    /// When these counters were taken, ns since the epoch.
    pub end_ns: u64,
    /// Packets the capture point saw (`isb_ifrecv`).
    pub received: u64,
    /// Packets lost before they reached the writer (`isb_ifdrop`).
    pub dropped: u64,
    /// Packets the capture filter accepted (`isb_filteraccept`).
    pub filter_accepted: u64,
    /// Packets written to the file(s) (`isb_usrdeliv`).
    pub delivered: u64,
}

/// Appends an Interface Statistics Block (§4.6) for `interface`, timestamped `stats.end_ns`.
pub fn interface_statistics<O: Out + ?Sized>(
    out: &mut O,
    interface: u32,
    stats: &InterfaceStats,
) -> usize {
    let mut b = Block::begin(out, BLOCK_ISB);
    b.u32(interface).timestamp(stats.end_ns);
    // isb_starttime/endtime are timestamps in the interface's resolution, high word first.
    let split = |ts: u64| {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&((ts >> 32) as u32).to_ne_bytes());
        v[4..].copy_from_slice(&(ts as u32).to_ne_bytes());
        v
    };
    b.option(opt::ISB_STARTTIME, &split(stats.start_ns));
    b.option(opt::ISB_ENDTIME, &split(stats.end_ns));
    b.option_u64(opt::ISB_IFRECV, stats.received);
    b.option_u64(opt::ISB_IFDROP, stats.dropped);
    b.option_u64(opt::ISB_FILTERACCEPT, stats.filter_accepted);
    b.option_u64(opt::ISB_USRDELIV, stats.delivered);
    b.finish()
}

/// Appends a Decryption Secrets Block (§4.7) carrying `secrets` of `secrets_type`.
pub fn decryption_secrets<O: Out + ?Sized>(
    out: &mut O,
    secrets_type: u32,
    secrets: &[u8],
) -> usize {
    let mut b = Block::begin(out, BLOCK_DSB);
    b.u32(secrets_type).u32(secrets.len() as u32).padded(secrets);
    b.finish()
}

/// Appends a padding block ([`BLOCK_PADDING`]) of `len` bytes in all: zeros between the
/// block's two lengths. `len` is a multiple of 4 and at least [`MIN_BLOCK`]; anything else
/// appends nothing (and returns 0).
///
/// Why: a direct capture file writes a large packet's data straight from the packet's own
/// memory (`super::direct`), which needs that data at a file offset of the same alignment
/// as its address; this moves the packet's block there.
pub fn padding<O: Out + ?Sized>(out: &mut O, len: usize) -> usize {
    if len < MIN_BLOCK || !len.is_multiple_of(4) || len > u32::MAX as usize {
        return 0;
    }
    const ZEROS: [u8; 256] = [0; 256];
    let b = Block::begin(out, BLOCK_PADDING);
    let mut rest = len - MIN_BLOCK;
    while rest > 0 {
        let n = rest.min(ZEROS.len());
        b.out.put(&ZEROS[..n]);
        rest -= n;
    }
    b.finish()
}

/// A block read back by [`blocks`]: its type and body (between the two length fields).
#[derive(Debug, PartialEq, Eq)]
pub struct RawBlock<'a> {
    pub block_type: u32,
    pub body: &'a [u8],
}

/// Walks the complete native-order blocks at the start of `bytes`, stopping at the first
/// incomplete or malformed one. Used by tests and to check what a flush left on disk.
pub fn blocks(mut bytes: &[u8]) -> impl Iterator<Item = RawBlock<'_>> {
    std::iter::from_fn(move || {
        let head = bytes.get(..8)?;
        let block_type = u32::from_ne_bytes(head[..4].try_into().ok()?);
        let len = u32::from_ne_bytes(head[4..8].try_into().ok()?) as usize;
        if len < 12 || !len.is_multiple_of(4) || bytes.len() < len {
            return None;
        }
        let trailer = u32::from_ne_bytes(bytes[len - 4..len].try_into().ok()?) as usize;
        if trailer != len {
            return None;
        }
        let block = RawBlock { block_type, body: &bytes[8..len - 4] };
        bytes = &bytes[len..];
        Some(block)
    })
}

/// Reads the options in `bytes` (an options field) as `(code, value)` pairs, up to
/// `opt_endofopt`.
pub fn options(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let code = u16::from_ne_bytes(bytes.get(..2)?.try_into().ok()?);
        let len = usize::from(u16::from_ne_bytes(bytes.get(2..4)?.try_into().ok()?));
        if code == opt::ENDOFOPT {
            return None;
        }
        let value = bytes.get(4..4 + len)?;
        bytes = bytes.get(4 + len + pad4(len)..).unwrap_or_default();
        Some((code, value))
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn one_block(out: &[u8]) -> RawBlock<'_> {
        let all: Vec<_> = blocks(out).collect();
        assert_eq!(all.len(), 1, "expected exactly one block in {out:02x?}");
        let total: usize = 8 + all[0].body.len() + 4;
        assert_eq!(total, out.len(), "trailing bytes after the block");
        blocks(out).next().unwrap()
    }

    #[test]
    fn section_header_has_magic_version_unknown_length_and_options() {
        let mut out = Vec::new();
        let info = SectionInfo {
            hardware: "x86_64".into(),
            os: "Linux 6.18".into(),
            application: "childflow 0.1.0".into(),
            comment: Some("curl".into()),
        };
        let len = section_header(&mut out, &info);
        assert_eq!(len, out.len());
        let b = one_block(&out);
        assert_eq!(b.block_type, BLOCK_SHB);
        assert_eq!(u32_at(b.body, 0), BYTE_ORDER_MAGIC);
        assert_eq!(&b.body[4..8], [1u16.to_ne_bytes(), 0u16.to_ne_bytes()].concat());
        assert_eq!(&b.body[8..16], &[0xff; 8]);
        let opts: Vec<_> = options(&b.body[16..]).collect();
        assert_eq!(
            opts,
            [
                (opt::SHB_HARDWARE, &b"x86_64"[..]),
                (opt::SHB_OS, b"Linux 6.18"),
                (opt::SHB_USERAPPL, b"childflow 0.1.0"),
                (opt::COMMENT, b"curl"),
            ]
        );
    }

    #[test]
    fn enhanced_packet_pads_data_and_carries_flags_process_and_comments() {
        let mut out = Vec::new();
        let data = [0xAAu8; 13];
        let opts = PacketOptions {
            flags: EPB_FLAG_OUTBOUND,
            process: Some((4242, 0)),
            comments: &["pid 4242 (curl)", "community_id 1:abc="],
        };
        enhanced_packet(&mut out, 0, 0x1_0000_0002, &data, 1500, &opts);
        assert_eq!(out.len() % 4, 0);
        let b = one_block(&out);
        assert_eq!(b.block_type, BLOCK_EPB);
        assert_eq!(u32_at(b.body, 0), 0, "interface id");
        assert_eq!((u32_at(b.body, 4), u32_at(b.body, 8)), (1, 2), "timestamp high, low");
        assert_eq!((u32_at(b.body, 12), u32_at(b.body, 16)), (13, 1500), "caplen, origlen");
        assert_eq!(&b.body[20..33], &data);
        assert_eq!(&b.body[33..36], &[0, 0, 0], "padding");
        let opts: Vec<_> = options(&b.body[36..]).collect();
        let mut pidtid = 4242u32.to_ne_bytes().to_vec();
        pidtid.extend_from_slice(&[0; 4]);
        assert_eq!(opts[0], (opt::EPB_FLAGS, &EPB_FLAG_OUTBOUND.to_ne_bytes()[..]));
        assert_eq!(opts[1], (opt::EPB_PROCESSID_THREADID, &pidtid[..]));
        assert_eq!(opts[2], (opt::COMMENT, &b"pid 4242 (curl)"[..]));
        assert_eq!(opts[3], (opt::COMMENT, &b"community_id 1:abc="[..]));
    }

    #[test]
    fn a_packet_without_options_has_no_end_of_options() {
        let mut out = Vec::new();
        enhanced_packet(&mut out, 3, 7, &[1, 2, 3, 4], 4, &PacketOptions::default());
        assert_eq!(out.len(), 8 + 20 + 4 + 4);
    }

    #[test]
    fn name_resolution_lists_records_and_ends_with_an_end_record() {
        let mut out = Vec::new();
        let v4 = ["example.test".to_string(), "www.example.test".to_string()];
        let v6 = ["example.test".to_string()];
        let records = [
            (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), &v4[..]),
            (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), &v6[..]),
        ];
        name_resolution(&mut out, records);
        let b = one_block(&out);
        assert_eq!(b.block_type, BLOCK_NRB);
        let recs: Vec<_> = options(b.body).collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].0, opt::NRB_RECORD_IPV4);
        assert_eq!(&recs[0].1[..4], &[198, 18, 0, 1]);
        assert_eq!(&recs[0].1[4..], b"example.test\0www.example.test\0");
        assert_eq!(recs[1].0, opt::NRB_RECORD_IPV6);
        assert_eq!(&recs[1].1[16..], b"example.test\0");
        assert_eq!(&b.body[b.body.len() - 4..], &[0; 4], "nrb_record_end");
    }

    #[test]
    fn name_resolution_without_usable_records_writes_nothing() {
        let mut out = vec![9];
        let empty: Vec<String> = vec![String::new()];
        assert_eq!(name_resolution(&mut out, [(IpAddr::V4(Ipv4Addr::LOCALHOST), &empty[..])]), 0);
        assert_eq!(out, [9]);
    }

    #[test]
    fn interface_blocks_and_statistics_round_trip() {
        let mut out = Vec::new();
        let iface = InterfaceInfo {
            name: "tap0".into(),
            description: "rootless".into(),
            comment: None,
            snaplen: 262_144,
        };
        interface_description(&mut out, &iface, "Linux");
        let stats = InterfaceStats {
            start_ns: 1,
            end_ns: 2,
            received: 10,
            dropped: 3,
            filter_accepted: 7,
            delivered: 7,
        };
        interface_statistics(&mut out, 0, &stats);
        let all: Vec<_> = blocks(&out).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(u32_at(all[0].body, 4), 262_144);
        let idb: Vec<_> = options(&all[0].body[8..]).collect();
        assert!(idb.contains(&(opt::IF_TSRESOL, &[TSRESOL_NANOS][..])));
        let isb: Vec<_> = options(&all[1].body[12..]).collect();
        assert!(isb.contains(&(opt::ISB_IFDROP, &3u64.to_ne_bytes()[..])));
    }

    #[test]
    fn decryption_secrets_carries_the_key_log() {
        let mut out = Vec::new();
        let secrets = b"CLIENT_RANDOM 00 11\n";
        decryption_secrets(&mut out, SECRETS_TLS_KEY_LOG, secrets);
        let b = one_block(&out);
        assert_eq!(b.block_type, BLOCK_DSB);
        assert_eq!(u32_at(b.body, 0), SECRETS_TLS_KEY_LOG);
        assert_eq!(u32_at(b.body, 4) as usize, secrets.len());
        assert_eq!(&b.body[8..8 + secrets.len()], secrets);
    }

    #[test]
    fn blocks_stops_at_a_cut_block() {
        let mut out = Vec::new();
        enhanced_packet(&mut out, 0, 1, &[1; 60], 60, &PacketOptions::default());
        let whole = out.len();
        enhanced_packet(&mut out, 0, 2, &[2; 60], 60, &PacketOptions::default());
        assert_eq!(blocks(&out[..whole + 30]).count(), 1);
        assert_eq!(blocks(&out).count(), 2);
    }
}
