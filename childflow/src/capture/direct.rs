//! A capture file written with `O_DIRECT` (no page cache), for files on block devices.
//!
//! Why: a bulk capture writes about a gigabyte a second. Through the page cache every byte
//! is copied into freshly allocated cache pages, then written back by kworkers, and the
//! writer is throttled in `balance_dirty_pages` once the disk lags: on the project's VM a
//! buffered `dd` to the root disk managed 353 MB/s against 1.7 GB/s with `oflag=direct`.
//! With `O_DIRECT` the device reads our memory (virtio DMA). The capture encodes its blocks
//! straight into an aligned staging buffer ([`Stage`], [`DirectFile::stage`]), and large
//! packets are not copied at all ([`DirectFile::encode_from`]): their pages go to the
//! device from the buffer the backend filled, between the staged bytes, in one
//! `pwritev(2)`.
//!
//! `O_DIRECT` needs buffer addresses, file offsets and lengths aligned to the device's
//! block size ([`ALIGN`] covers every common one). So:
//! - whole aligned chunks go out with `O_DIRECT` and the unaligned tail stays staged;
//!   [`DirectFile::flush`] also writes that tail through a second, buffered descriptor, so
//!   the file on disk is complete up to the last flush (the next direct write of the same
//!   offsets replaces it: the kernel writes back and drops the cached tail page first,
//!   `filemap_write_and_wait_range` in `mm/filemap.c` `kiocb_invalidate_pages`);
//! - a large packet's data is written from its own buffer only from its first page
//!   boundary to its last ([`Hole`]); the bytes around are copied into the stage, and a
//!   padding block ([`pcapng::padding`], which readers skip) ahead of its Enhanced Packet
//!   Block moves the data to a file offset with the same alignment as its address
//!   ([`DirectFile::padding_for`]).
//!
//! Why whole pages (4096) and not the device's 512-byte sectors, which is all `O_DIRECT`
//! asks for here (`statx` `STATX_DIOALIGN`): `pwritev(2)` of 4 MiB in 64 KiB pieces to
//! the project's VM disk ran at 2.0 GB/s with the pieces page-aligned and at 1.2 GB/s with
//! them 512-aligned inside their pages (a contiguous buffer: 2.5 GB/s); the copies around
//! the pages cost less (about 4 KiB of a 64 KiB frame).
//!
//! Not used for tmpfs (no device to DMA to; `O_DIRECT` there would still copy), anything
//! but regular files (FIFOs, devices), or filesystems that refuse `O_DIRECT` (the open
//! fails with `EINVAL`): those keep the plain buffered file.
//!
//! Invariants: the pending bytes (the stage with its holes, in order) start at file offset
//! `direct_end`, a multiple of [`ALIGN`]; every byte before `direct_end` was written with
//! `O_DIRECT`; every hole starts at an aligned stage offset, and its length and the
//! address of its first byte are aligned, so every piece of a write is; after `flush`
//! the file's bytes equal everything ever given.

use super::pcapng::{self, Out as _};
use std::{
    alloc::{Layout, alloc, dealloc, realloc},
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::Path,
};

/// Alignment of buffer, offsets and lengths: the page size, a multiple of every logical
/// block size of the devices we meet (512 or 4096).
pub const ALIGN: usize = 4096;

/// Size of the staging buffer: large writes keep the device busy with few syscalls.
pub const STAGE: usize = 4 << 20;

/// Packet data at least this long goes to the file from the buffer it came in, when that
/// lines up ([`DirectFile::padding_for`]): below, the copy costs less than the padding
/// block, the extra `pwritev(2)` segments and holding the buffer.
pub const ZERO_COPY_MIN: usize = 16 << 10;

/// Packet buffers waiting for a write at most: each is two segments of one `pwritev(2)`,
/// which takes 1024 (`IOV_MAX`).
const MAX_HOLES: usize = 256;

/// `statfs(2)` magic of tmpfs (`include/uapi/linux/magic.h`).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The staging buffer: [`ALIGN`]ed memory of [`STAGE`] bytes (more only if one block does not
/// fit), into which the capture encodes its blocks directly ([`pcapng::Out`]).
pub struct Stage {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: `Stage` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for Stage {}

impl Stage {
    fn layout(cap: usize) -> Layout {
        // ALIGN is a power of two and every capacity a multiple of it: this cannot fail.
        Layout::from_size_align(cap, ALIGN).unwrap_or_else(|_| unreachable!())
    }

    fn new() -> io::Result<Self> {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(Self::layout(STAGE)) };
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // Touched once here, so the first packets do not pay the page faults.
        // SAFETY: the allocation is STAGE bytes.
        unsafe { ptr.as_ptr().write_bytes(0, STAGE) };
        Ok(Stage { ptr, cap: STAGE, len: 0 })
    }

    /// The bytes held.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the allocation are initialized (written by `put`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Moves the bytes from `from` on to the front.
    fn shift(&mut self, from: usize) {
        let rest = self.len - from;
        // SAFETY: both ranges lie within the first `len` bytes; `copy` allows overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(from), self.ptr.as_ptr(), rest) };
        self.len = rest;
    }

    /// Room for `need` more bytes. Only reached by a block larger than the stage's free
    /// space after a write-out (an EPB of more than ~4 MiB, which no snap length allows).
    fn grow(&mut self, need: usize) {
        let cap = (self.len + need).max(self.cap * 2).next_multiple_of(ALIGN);
        // SAFETY: `ptr` was allocated with `layout(self.cap)`; `cap` is non-zero and a
        // multiple of ALIGN, so the new layout is valid with the same alignment.
        let ptr = unsafe { realloc(self.ptr.as_ptr(), Self::layout(self.cap), cap) };
        match std::ptr::NonNull::new(ptr) {
            Some(ptr) => (self.ptr, self.cap) = (ptr, cap),
            None => std::alloc::handle_alloc_error(Self::layout(cap)),
        }
    }
}

impl pcapng::Out for Stage {
    fn len(&self) -> usize {
        self.len
    }

    fn put(&mut self, bytes: &[u8]) {
        if self.cap - self.len < bytes.len() {
            self.grow(bytes.len());
        }
        // SAFETY: `cap - len >= bytes.len()` (just ensured), and `bytes` cannot overlap the
        // stage (it is borrowed shared while the stage is borrowed mutably).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                bytes.len(),
            )
        };
        self.len += bytes.len();
    }

    fn patch(&mut self, at: usize, bytes: [u8; 4]) {
        if at + 4 <= self.len {
            // SAFETY: within the first `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.as_ptr().add(at), 4) };
        }
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // SAFETY: allocated (or reallocated) with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) };
    }
}

/// Packet data written to the file from the buffer it arrived in rather than from the
/// stage: the file holds `buf[from..from + len]` where the stage's offset `at` is (the
/// stage's bytes around it go before and after). `at`, `len` and the address of
/// `buf[from]` are multiples of [`ALIGN`].
struct Hole {
    at: usize,
    buf: crate::event::PacketData,
    from: usize,
    len: usize,
}

/// See the module documentation.
pub struct DirectFile {
    direct: File,
    buffered: File,
    stage: Stage,
    /// Packet data to write from its own buffers, in stage order.
    holes: Vec<Hole>,
    /// Their lengths, summed.
    hole_bytes: usize,
    /// Where the pending bytes go: everything before was written with `O_DIRECT`.
    direct_end: u64,
    /// [`Self::pending`] at the last tail write: nothing new to write if unchanged.
    tail_written: usize,
}

impl DirectFile {
    /// Creates (truncates) `path` for direct writes; `Ok(None)` when the file system has no
    /// use for them (tmpfs) or refuses them: the caller then writes a plain file.
    pub fn create(path: &Path) -> io::Result<Option<Self>> {
        let buffered = File::create(path)?;
        // Only regular files: on a FIFO O_DIRECT means packet mode (pipe(7)), and devices
        // (`-c /dev/null`) have nothing to gain.
        if !buffered.metadata()?.file_type().is_file() {
            return Ok(None);
        }
        // SAFETY: an all-zero statfs is valid; fstatfs fills it.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs(2) on an open descriptor into a valid out-pointer.
        if unsafe { libc::fstatfs(buffered.as_raw_fd(), &mut fs) } != 0 {
            return Ok(None);
        }
        if fs.f_type as i64 == TMPFS_MAGIC {
            return Ok(None);
        }
        let direct = match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        let stage = Stage::new()?;
        Ok(Some(DirectFile {
            direct,
            buffered,
            stage,
            holes: Vec::new(),
            hole_bytes: 0,
            direct_end: 0,
            tail_written: 0,
        }))
    }

    /// Stages `bytes`, writing whole stages out as they fill.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(STAGE.saturating_sub(self.stage.len).max(1));
            self.stage.put(&bytes[..n]);
            bytes = &bytes[n..];
            if self.stage.len >= STAGE {
                self.write_aligned()?;
            }
        }
        Ok(())
    }

    /// Makes room in the stage for `need` more bytes, writing its whole chunks out if they
    /// would not fit, so that the next block can be encoded whole into [`Self::stage`]
    /// (nothing moves in the stage between two calls of this). Also writes out once
    /// [`MAX_HOLES`] packet buffers wait: each is a segment of the `pwritev(2)`.
    pub fn make_room(&mut self, need: usize) -> io::Result<()> {
        if self.pending() + need > STAGE || self.holes.len() >= MAX_HOLES {
            self.write_aligned()?;
        }
        Ok(())
    }

    /// The stage, to encode blocks into directly (after [`Self::make_room`]).
    pub fn stage(&mut self) -> &mut Stage {
        &mut self.stage
    }

    /// Bytes given to the file so far (written, staged or waiting in packet buffers).
    pub fn size(&self) -> u64 {
        self.direct_end + self.pending() as u64
    }

    /// The [`pcapng::padding`] block to put before the Enhanced Packet Block of `data`,
    /// so that the data can go out from its own memory ([`Self::encode_from`]): its
    /// length (0: none needed), or `None` when `data` is shorter than [`ZERO_COPY_MIN`]
    /// or its address cannot line up.
    ///
    /// The device reads the data where it is if its whole pages sit at file offsets of the
    /// same alignment ([`ALIGN`]); the bytes before its first page boundary and after its
    /// last are copied.
    pub fn padding_for(&self, data: &[u8]) -> Option<usize> {
        let addr = data.as_ptr() as usize;
        if data.len() < ZERO_COPY_MIN || !addr.is_multiple_of(4) {
            return None;
        }
        let head = (ALIGN - addr % ALIGN) % ALIGN;
        let end = self.size() as usize + pcapng::EPB_DATA_OFFSET + head;
        let pad = (ALIGN - end % ALIGN) % ALIGN;
        // A block is at least 12 bytes: a 4 or 8 byte gap takes a page more.
        Some(if pad == 0 || pad >= pcapng::MIN_BLOCK { pad } else { pad + ALIGN })
    }

    /// Encodes blocks with `encode`, which gets the stage and `owner[..len]`; packet data
    /// it puts from those bytes ([`pcapng::Out::put_data`]) is written from `owner` itself
    /// (except its unaligned ends) when it lines up ([`Self::padding_for`]): `owner` is
    /// then taken (left empty) and kept until written. Returns whether it was taken.
    pub fn encode_from(
        &mut self,
        owner: &mut crate::event::PacketData,
        len: usize,
        encode: impl FnOnce(&mut dyn pcapng::Out, &[u8]),
    ) -> bool {
        let data = &owner[..len.min(owner.len())];
        let mut out = Encoder { stage: &mut self.stage, owner: data.as_ptr_range(), hole: None };
        encode(&mut out, data);
        let Some((at, from, len)) = out.hole else { return false };
        self.holes.push(Hole { at, buf: std::mem::take(owner), from, len });
        self.hole_bytes += len;
        true
    }

    /// Writes everything given so far: the aligned part with `O_DIRECT`, the tail
    /// buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_aligned()?;
        let pending = self.pending();
        if pending > 0 && pending != self.tail_written {
            let parts = segments(self.stage.bytes(), &self.holes, pending);
            write_all_at(&self.buffered, parts, self.direct_end)?;
            self.tail_written = pending;
        }
        Ok(())
    }

    /// The file opened without `O_DIRECT`: to read back and cut after a failed write.
    pub fn plain(&self) -> &File {
        &self.buffered
    }

    /// Bytes given but not yet written with `O_DIRECT`: staged or in packet buffers.
    fn pending(&self) -> usize {
        self.stage.len + self.hole_bytes
    }

    /// Writes the whole [`ALIGN`]ed chunks of what is pending with `O_DIRECT` (one
    /// `pwritev(2)` of stage pieces and packet buffers): the packet buffers written go
    /// back to the pool, the rest of the stage (less than a chunk) moves to its front.
    ///
    /// Why whole chunks of [`ALIGN`]: a direct write that ends inside a file system block
    /// costs ext4 a zeroed partial block and an unaligned (serialized) write next time;
    /// `dd oflag=direct` to the project's VM disk ran at 2.2 GB/s with `bs=4M` and at
    /// 1.1 GB/s with `bs=4M+512`, with twice the system time.
    ///
    /// Why here and not on a thread of its own: with the writes on a writer thread (while
    /// the capture filled a second stage) a bulk capture cost as much as before (-22 to
    /// -40% throughput over 9 runs, against -14 to -27% over 5 runs written here): two
    /// writes' worth of packet buffers out of the backend's hands instead of one, and a
    /// third busy thread on two CPUs.
    fn write_aligned(&mut self) -> io::Result<()> {
        let (stage_len, holes, len) = self.cut(self.pending() / ALIGN * ALIGN);
        if len == 0 {
            return Ok(());
        }
        let parts = segments(self.stage.bytes(), &self.holes[..holes], len);
        write_all_at(&self.direct, parts, self.direct_end)?;
        self.direct_end += len as u64;
        for hole in self.holes.drain(..holes) {
            self.hole_bytes -= hole.len;
            hole.buf.recycle();
        }
        for hole in &mut self.holes {
            hole.at -= stage_len;
        }
        self.stage.shift(stage_len);
        // The tail now sits at a new offset: it has not been written there.
        self.tail_written = 0;
        Ok(())
    }

    /// The first `len` pending bytes as (stage bytes, packet buffers) they are made of,
    /// and their length: `len`, or less so as not to cut a packet buffer (which cannot
    /// happen when `len` is a multiple of [`ALIGN`]: so are the buffers' ends).
    fn cut(&self, len: usize) -> (usize, usize, usize) {
        let (mut stage, mut done) = (0, 0);
        for (i, hole) in self.holes.iter().enumerate() {
            let before = hole.at - stage;
            if done + before >= len {
                return (stage + len - done, i, len);
            }
            (stage, done) = (hole.at, done + before);
            if done + hole.len > len {
                return (stage, i, done);
            }
            done += hole.len;
        }
        (stage + len - done, self.holes.len(), len)
    }
}

/// The first `end` bytes of `stage` with `holes`, as the pieces of the stage and of
/// packet buffers they are made of, in file order.
fn segments<'a>(stage: &'a [u8], holes: &'a [Hole], end: usize) -> Vec<io::IoSlice<'a>> {
    let mut out = Vec::with_capacity(2 * holes.len() + 1);
    let (mut pos, mut done) = (0, 0);
    for hole in holes {
        let take = (hole.at - pos).min(end - done);
        if take > 0 {
            out.push(io::IoSlice::new(&stage[pos..pos + take]));
        }
        (pos, done) = (pos + take, done + take);
        let take = hole.len.min(end - done);
        if take > 0 {
            out.push(io::IoSlice::new(&hole.buf[hole.from..hole.from + take]));
        }
        done += take;
        if done == end {
            return out;
        }
    }
    if end > done {
        out.push(io::IoSlice::new(&stage[pos..pos + (end - done)]));
    }
    out
}

impl Drop for DirectFile {
    fn drop(&mut self) {
        for hole in self.holes.drain(..) {
            hole.buf.recycle();
        }
    }
}

/// The stage as a [`pcapng::Out`] for blocks whose packet data may stay in its own buffer
/// (see [`DirectFile::encode_from`]).
struct Encoder<'a> {
    stage: &'a mut Stage,
    /// The memory of the buffer that can be kept.
    owner: std::ops::Range<*const u8>,
    /// (stage offset, offset in the owner's buffer, length) of the data left there.
    hole: Option<(usize, usize, usize)>,
}

impl Encoder<'_> {
    fn hole_len(&self) -> usize {
        self.hole.map_or(0, |(_, _, len)| len)
    }
}

impl pcapng::Out for Encoder<'_> {
    fn len(&self) -> usize {
        self.stage.len + self.hole_len()
    }

    fn put(&mut self, bytes: &[u8]) {
        self.stage.put(bytes);
    }

    /// Copies the data up to its first page-aligned address, leaves its whole pages from
    /// there in the owner's buffer (if they start at an aligned stage offset, so at an
    /// aligned file offset), and copies the rest.
    fn put_data(&mut self, bytes: &[u8]) {
        let g = ALIGN;
        let range = bytes.as_ptr_range();
        let addr = range.start as usize;
        let head = (g - addr % g) % g;
        let at = self.stage.len + head;
        let owned = self.owner.start <= range.start && range.end <= self.owner.end;
        if !owned || self.hole.is_some() || !at.is_multiple_of(g) || bytes.len() < head + g {
            self.stage.put(bytes);
            return;
        }
        let len = (bytes.len() - head) / g * g;
        self.stage.put(&bytes[..head]);
        let from = addr + head - self.owner.start as usize;
        self.hole = Some((at, from, len));
        self.stage.put(&bytes[head + len..]);
    }

    fn patch(&mut self, at: usize, bytes: [u8; 4]) {
        let at = match self.hole {
            Some((hole, _, len)) if at >= hole => at - len,
            _ => at,
        };
        self.stage.patch(at, bytes);
    }

    fn truncate(&mut self, len: usize) {
        match self.hole {
            Some((hole, _, _)) if len <= hole => {
                self.hole = None;
                self.stage.truncate(len);
            }
            _ => {
                let len = len - self.hole_len();
                self.stage.truncate(len);
            }
        }
    }
}

/// Writes all of `segments` at `offset`, going on after short writes.
fn write_all_at(
    file: &File,
    mut segments: Vec<io::IoSlice<'_>>,
    mut offset: u64,
) -> io::Result<()> {
    let mut rest = &mut segments[..];
    while !rest.is_empty() {
        match nix::sys::uio::pwritev(file, rest, offset as libc::off_t) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "the file took no bytes"));
            }
            Ok(n) => {
                io::IoSlice::advance_slices(&mut rest, n);
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory on the disk the tests build on (target/), not tmpfs; `None` if the file
    /// system refuses O_DIRECT.
    fn disk_file(name: &str) -> (tempfile::TempDir, Option<DirectFile>, std::path::PathBuf) {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        let dir = tempfile::Builder::new()
            .prefix(&format!("cf-direct-{name}-"))
            .tempdir_in(base)
            .expect("create the scratch directory");
        let path = dir.path().join("capture.pcapng");
        let f = DirectFile::create(&path).expect("create the direct file");
        (dir, f, path)
    }

    #[test]
    fn the_file_holds_every_byte_after_each_flush() {
        let (_dir, f, path) = disk_file("bytes");
        let Some(mut f) = f else {
            eprintln!("skipped: the file system under target/ refuses O_DIRECT");
            return;
        };
        let mut want = Vec::new();
        // Odd sizes across the alignment and the stage size, flushed at odd moments.
        for (i, len) in
            [1usize, 4095, 4097, 100_000, STAGE - 3, 7, STAGE * 2 + 11].into_iter().enumerate()
        {
            let chunk: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
            f.write_all(&chunk).expect("write");
            want.extend_from_slice(&chunk);
            if i % 2 == 0 {
                f.flush().expect("flush");
                let got = std::fs::read(&path).expect("read back");
                assert_eq!(got.len(), want.len(), "file length after flush {i}");
                assert!(got == want, "file bytes after flush {i}");
            }
        }
        f.flush().expect("last flush");
        f.flush().expect("a flush with nothing new");
        assert!(std::fs::read(&path).expect("read back") == want, "final bytes");
    }

    #[test]
    fn blocks_encoded_into_the_stage_reach_the_file_even_past_its_size() {
        use pcapng::Out as _;
        let (_dir, f, path) = disk_file("stage");
        let Some(mut f) = f else {
            eprintln!("skipped: the file system under target/ refuses O_DIRECT");
            return;
        };
        let mut want = Vec::new();
        // Small pieces that fill the stage, then one larger than it (the stage grows).
        for (i, len) in [100usize, STAGE - 7, 13, STAGE + 4097, 5].into_iter().enumerate() {
            let chunk: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
            f.make_room(len).expect("make room");
            let before = f.size();
            f.stage().put(&chunk);
            assert_eq!(f.size(), before + len as u64, "size after piece {i}");
            want.extend_from_slice(&chunk);
        }
        f.flush().expect("flush");
        assert!(std::fs::read(&path).expect("read back") == want, "file bytes");
    }

    /// Packets of sizes around the zero-copy threshold, each in a buffer of its own (at
    /// whatever address the allocator gives), as the capture encodes them: large ones written from their buffers
    /// (behind a padding block), small ones copied. After each flush the file holds
    /// exactly the blocks a `Vec` gets for the same calls, and every packet reads back
    /// whole from the Enhanced Packet Blocks.
    #[test]
    fn packets_written_from_their_own_buffers_read_back_whole() {
        let (_dir, f, path) = disk_file("zero-copy");
        let Some(mut f) = f else {
            eprintln!("skipped: the file system under target/ refuses O_DIRECT");
            return;
        };
        let mut want = Vec::new();
        let mut sent = Vec::new();
        let mut taken = 0;
        let options =
            pcapng::PacketOptions { flags: pcapng::EPB_FLAG_OUTBOUND, ..Default::default() };
        for i in 0..400usize {
            let len = match i % 5 {
                0 => 60 + i,
                1 => ZERO_COPY_MIN - 1,
                2 => ZERO_COPY_MIN + i * 13,
                3 => 65_534,
                _ => 2 * ALIGN + 4 + (i * 997) % (3 * ALIGN),
            };
            let packet: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let mut owner = crate::event::PacketData::from(packet.clone());
            let pad = f.padding_for(&owner);
            assert_eq!(pad.is_some(), len >= ZERO_COPY_MIN, "packet {i} of {len} bytes");
            // Data at an address that is not 32-bit aligned never lines up.
            assert_eq!(f.padding_for(&owner[1..]), None);
            f.make_room(len + 2 * ALIGN + 64).expect("make room");
            if let Some(pad) = pad {
                pcapng::padding(f.stage(), pad);
                pcapng::padding(&mut want, pad);
            }
            let kept = f.encode_from(&mut owner, len, |out, data| {
                pcapng::enhanced_packet(out, 0, i as u64, data, len as u32, &options);
            });
            pcapng::enhanced_packet(&mut want, 0, i as u64, &packet, len as u32, &options);
            // Padded, it lines up; unpadded, it may still by chance.
            assert!(kept || pad.is_none(), "packet {i} of {len} bytes left in its buffer");
            assert_eq!(owner.is_empty(), kept, "a kept buffer is taken");
            taken += usize::from(kept);
            assert_eq!(f.size(), want.len() as u64, "size after packet {i}");
            sent.push(packet);
            if i % 37 == 36 {
                f.flush().expect("flush");
                assert!(std::fs::read(&path).expect("read back") == want, "bytes after packet {i}");
            }
        }
        f.flush().expect("last flush");
        drop(f);
        let got = std::fs::read(&path).expect("read back");
        assert!(got == want, "final bytes");
        assert!(taken > 150, "only {taken} packets went out from their buffers");
        let epbs: Vec<&[u8]> = pcapng::blocks(&got)
            .filter(|b| b.block_type == pcapng::BLOCK_EPB)
            .map(|b| {
                let len = u32::from_ne_bytes(b.body[12..16].try_into().expect("length"));
                &b.body[20..20 + len as usize]
            })
            .collect();
        assert_eq!(epbs.len(), sent.len());
        for (i, (got, sent)) in epbs.iter().zip(&sent).enumerate() {
            assert!(got == sent, "packet {i} differs");
        }
    }

    #[test]
    fn devices_get_no_direct_file() {
        let f = DirectFile::create(Path::new("/dev/null")).expect("open /dev/null");
        assert!(f.is_none(), "only regular files are written around the page cache");
    }

    #[test]
    fn tmpfs_gets_no_direct_file() {
        let dir = std::path::Path::new("/dev/shm");
        if !dir.is_dir() {
            return;
        }
        let path = dir.join(format!("cf-direct-test-{}", std::process::id()));
        let f = DirectFile::create(&path).expect("create on tmpfs");
        let _ = std::fs::remove_file(&path);
        assert!(f.is_none(), "tmpfs is written through the page cache");
    }
}
