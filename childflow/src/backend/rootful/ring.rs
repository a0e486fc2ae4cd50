//! The packet ring (`PACKETS`), read in place: large captured packets are lent to the
//! collector straight from the ring's pages ([`crate::event::Lent`]) instead of copied out,
//! and their ring space is given back to the kernel once the collector is done with them.
//!
//! The ring's layout is the kernel's (kernel/bpf/ringbuf.c, `ringbuf_map_mmap_user`): a
//! consumer page userspace writes (the consumer position), then a producer page (the
//! producer position) and the data pages, mapped read-only and twice in a row, so a
//! record that wraps around the end is contiguous in memory. Every record starts with an
//! 8-byte header (`BPF_RINGBUF_HDR_SZ`: its length with the busy and discard bits, and a
//! page offset) and takes its length plus the header, rounded up to 8.
//!
//! Why not aya's `RingBuf`: it lends one record at a time and gives its space back when
//! that record is dropped, so anything kept beyond must be copied. Here records are read
//! ahead of the consumer position ([`PacketRing::next`]), and the position moves past a
//! record only when it and every record before it are done ([`PacketRing::release`]).
//! The kernel's producer only ever looks at the consumer position to find free space, so a
//! record that is read but not released is simply still "in the ring".
//!
//! The kernel's wake-ups count the data between the two positions (`BPF_RB_AVAIL_DATA`),
//! lent records included, so they say nothing while records are held: the drain loop
//! comes back on a short timer then ([`PacketRing::holding`]).
//!
//! Why the pages can go to a device: they are ordinary kernel pages inserted into the
//! mapping (`remap_vmalloc_range`), which `O_DIRECT` pins like any other user memory
//! (checked on this kernel: a `pwrite(2)` with `O_DIRECT` from the data pages, also across
//! the wrap, writes them). Pinning takes the slow path (`gup_fast_folio_allowed` in
//! mm/gup.c sends order-0 folios without a `mapping` there), ~2% of all samples of a bulk
//! capture to disk, against the 7.5% the copy out of the ring cost.
//!
//! Invariants: `read` is at or ahead of the consumer position; `held` lists, in ring order,
//! the end of every record read since the consumer position, with the loan of the ones
//! still lent; the consumer position is only ever moved to the end of a record whose loan
//! and all earlier ones were returned.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    os::fd::{AsFd, AsRawFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use aya::maps::MapData;

use crate::event::{Lent, Loan};

/// `BPF_RINGBUF_BUSY_BIT`: the record is still being written.
const BUSY: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`: the producer discarded the record; skip it.
const DISCARD: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`.
const HDR: u64 = 8;

/// The ring's mappings; unmapped when the last lent record and the reader are gone.
struct Mapping {
    consumer: NonNull<u8>,
    producer: NonNull<u8>,
    /// Bytes of the producer mapping (its page and the data, twice).
    producer_len: usize,
    page: usize,
}

// SAFETY: the mappings are shared memory the kernel also writes; they are only accessed
// through atomics (positions, headers) and shared reads of committed records.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: both were mapped by `PacketRing::new` with these lengths, and nothing
        // refers to them any more (every `Lent` holds this mapping alive).
        unsafe {
            libc::munmap(self.consumer.as_ptr().cast(), self.page);
            libc::munmap(self.producer.as_ptr().cast(), self.producer_len);
        }
    }
}

/// See the module documentation.
pub struct PacketRing {
    map: MapData,
    mapping: Arc<Mapping>,
    data: NonNull<u8>,
    mask: u64,
    /// Where the next record starts.
    read: Cell<u64>,
    /// Records read since the consumer position: their ends, with their loans if lent.
    held: RefCell<VecDeque<(u64, Option<Arc<Loan>>)>>,
    /// The bytes of the record read last (address range), which [`PacketRing::lend`] can
    /// lend.
    last: Cell<(usize, usize)>,
}

// SAFETY: `data` points into `mapping`, which is `Send`; the reader (not `Sync`) is used by
// one thread at a time.
unsafe impl Send for PacketRing {}

impl PacketRing {
    /// Maps the ring of `map` (a `BPF_MAP_TYPE_RINGBUF`).
    pub fn new(map: MapData) -> std::io::Result<PacketRing> {
        let size = map.info().map_err(std::io::Error::other)?.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        let mmap = |len: usize, prot: i32, offset: usize| {
            // SAFETY: a new shared mapping of the map's pages; the kernel checks the
            // offsets and protections (`ringbuf_map_mmap_user`).
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset as i64)
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap gave null"))
        };
        let consumer = mmap(page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer_len = page + 2 * size;
        let producer = match mmap(producer_len, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: just mapped with this length.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        let mapping = Arc::new(Mapping { consumer, producer, producer_len, page });
        // SAFETY: the data pages follow the producer page in the same mapping.
        let data = unsafe { producer.add(page) };
        let ring = PacketRing {
            map,
            mapping,
            data,
            mask: size as u64 - 1,
            read: Cell::new(0),
            held: RefCell::new(VecDeque::new()),
            last: Cell::new((0, 0)),
        };
        ring.read.set(ring.consumer_pos().load(Ordering::Acquire));
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the 8-byte aligned consumer position.
        unsafe { self.mapping.consumer.cast::<AtomicU64>().as_ref() }
    }

    fn producer_pos(&self) -> u64 {
        // SAFETY: the producer page starts with the producer position; the kernel writes
        // it with release semantics after the record headers.
        unsafe { self.mapping.producer.cast::<AtomicU64>().as_ref() }.load(Ordering::Acquire)
    }

    /// The next committed record's bytes (without the kernel's header), or `None` if there
    /// is none yet. The record stays in the ring: [`PacketRing::lend`] its bytes before the
    /// next call, or its space goes back with the next [`PacketRing::release`].
    pub fn next(&self) -> Option<&[u8]> {
        loop {
            let read = self.read.get();
            if read >= self.producer_pos() {
                return None;
            }
            let at = (read & self.mask) as usize;
            // SAFETY: `at` is within the data pages and 8-byte aligned (records are).
            let header = unsafe { self.data.add(at).cast::<AtomicU32>().as_ref() };
            // Pairs with the kernel's commit (an `xchg` that clears the busy bit).
            let len = header.load(Ordering::Acquire);
            if len & BUSY != 0 {
                return None;
            }
            let bytes = (len & !(BUSY | DISCARD)) as usize;
            let end = read + (bytes as u64 + HDR).next_multiple_of(8);
            self.read.set(end);
            self.held.borrow_mut().push_back((end, None));
            if len & DISCARD == 0 {
                // SAFETY: a committed record of `bytes` bytes after its header, contiguous
                // thanks to the double mapping; the kernel does not write it again before
                // the consumer position passes it.
                let record = unsafe {
                    std::slice::from_raw_parts(self.data.add(at + HDR as usize).as_ptr(), bytes)
                };
                self.last.set((record.as_ptr() as usize, bytes));
                return Some(record);
            }
        }
    }

    /// Undoes the last [`PacketRing::next`]: the next call returns the same record again.
    pub fn put_back(&self) {
        let mut held = self.held.borrow_mut();
        held.pop_back();
        let start =
            held.back().map_or_else(|| self.consumer_pos().load(Ordering::Acquire), |h| h.0);
        self.read.set(start);
        self.last.set((0, 0));
    }

    /// Lends `bytes` if they lie in the record [`PacketRing::next`] returned last (else
    /// `None`): that record's space stays taken until the returned bytes are dropped.
    pub fn lend(&self, bytes: &[u8]) -> Option<Lent> {
        let (start, len) = self.last.get();
        let addr = bytes.as_ptr() as usize;
        if addr < start || addr + bytes.len() > start + len {
            return None;
        }
        let loan = Loan::new(self.mapping.clone());
        let mut held = self.held.borrow_mut();
        let last = held.back_mut()?;
        last.1 = Some(loan.clone());
        // SAFETY: `bytes` lie in the data pages of `mapping` (the record read last), which
        // `loan` keeps mapped; the kernel does not write the record again before the
        // consumer position passes it, which `release` does only once `loan` is returned.
        Some(unsafe { Lent::new(NonNull::from(bytes).cast(), bytes.len(), loan) })
    }

    /// Gives the kernel back the space of every record read, up to the first one still
    /// lent.
    pub fn release(&self) {
        let mut held = self.held.borrow_mut();
        let mut end = None;
        while let Some((at, loan)) = held.front() {
            if loan.as_ref().is_some_and(|l| !l.returned()) {
                break;
            }
            end = Some(*at);
            held.pop_front();
        }
        if let Some(end) = end {
            // Pairs with the kernel's acquire read of the consumer position when it
            // reserves: our reads of these records happen before their space is reused.
            self.consumer_pos().store(end, Ordering::Release);
        }
    }

    /// Whether records read still hold their ring space (lent, or not yet released).
    pub fn holding(&self) -> bool {
        !self.held.borrow().is_empty()
    }
}

impl AsRawFd for PacketRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
