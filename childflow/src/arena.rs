//! The packet arena: large packet buffers ([`crate::event::packet_buffer`]) in one
//! 2 MiB-aligned region of memory backed by transparent huge pages, through the process's
//! global allocator ([`Allocator`], installed by `main.rs`).
//!
//! Why: a bulk capture (`-c`) hands every 64 KiB tap frame to the collector, which
//! writes it to the file straight from its buffer (`capture::direct`), so the engine
//! cycles through a few hundred frame buffers instead of a few warm ones. `perf record -a`
//! of a rootless bulk capture to the root disk showed the engine (the critical path) in its
//! tap `read` (`_copy_to_iter`) for 379 samples per GB moved, against 104 without
//! capture, and the collector's largest cost was pinning the pages of each direct write
//! (`gup_fast_fallback`, 16 pages per frame). With the frames in huge pages: 131 against
//! 88, and the pinning fell from 289 to 41 samples (one folio per 2 MiB); in interleaved
//! runs the capture's throughput cost fell from 19-28% to 9-17% (median of 5 rounds, load
//! 1.6-2.6). Most likely the TLB: the frames spanned some 4,000 small pages, and a TLB
//! miss in this VM is a two-dimensional page walk.
//!
//! Why through the global allocator: the buffers travel as `Vec<u8>`
//! ([`crate::event::PacketEvent::data`], both backends, the capture, the pool), and a
//! `Vec` frees and grows its memory through the global allocator. Serving them from the
//! arena there keeps every `Vec` operation sound (a slot freed anywhere goes back to the
//! arena; one grown past its slot moves to the system allocator) without changing the type
//! every backend and sink uses.
//!
//! Invariants: only allocations made while [`with_arena`] runs on the current thread, of
//! at most [`SLOT`] bytes and alignment, come from the arena (everything else goes to the
//! system allocator, also when the arena is full or cannot be mapped); a slot is in use
//! exactly while its bit in `FREE` is clear; the arena is mapped once, never unmapped, and
//! not inherited by forked processes (`MADV_DONTFORK`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    ptr,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
};

/// Size (and alignment) of one slot: a tap frame at the largest MTU (65520 + the Ethernet
/// header) fits, and every slot starts on a page, which a direct write wants.
pub const SLOT: usize = 64 << 10;

/// Slots in the arena: the packet pool (256), the engine's spare frames (up to 256) and
/// frames in flight to the collector. Reserved as address space only: memory is used
/// where slots are handed out, lowest first, in 2 MiB steps.
const SLOTS: usize = 1024;

/// Bytes of the arena (64 MiB).
const SIZE: usize = SLOT * SLOTS;

/// The huge page size THP uses on x86-64 and arm64 with 4 KiB pages.
const HUGE: usize = 2 << 20;

/// The arena's base address: 0 before the first use, 1 if it could not be mapped.
static BASE: AtomicUsize = AtomicUsize::new(0);

/// One bit per slot, set while the slot is free.
static FREE: [AtomicU64; SLOTS / 64] = [const { AtomicU64::new(u64::MAX) }; SLOTS / 64];

thread_local! {
    /// Set while [`with_arena`] runs: the allocations to serve from the arena.
    static WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the allocations it makes (of at most [`SLOT`] bytes) served from the
/// arena, when the arena's allocator is the global one.
pub fn with_arena<T>(f: impl FnOnce() -> T) -> T {
    let before = WANTED.replace(true);
    let out = f();
    WANTED.set(before);
    out
}

/// A new private anonymous read-write mapping of `len` bytes, with `flags` besides
/// `MAP_PRIVATE | MAP_ANONYMOUS`; `None` if the kernel refuses it. The memory reads as
/// zeros and is only backed where it is touched.
pub fn map_anonymous(len: usize, flags: libc::c_int) -> Option<ptr::NonNull<u8>> {
    // SAFETY: a new mapping at an address of the kernel's choice; no existing memory is
    // affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED { None } else { ptr::NonNull::new(p.cast()) }
}

/// The arena's base address, mapping it on first use; `None` if it cannot be mapped.
fn base() -> Option<usize> {
    match BASE.load(Ordering::Acquire) {
        0 => {}
        1 => return None,
        b => return Some(b),
    }
    let raw = map_anonymous(SIZE + HUGE, libc::MAP_NORESERVE);
    let mapped = match raw {
        None => 1,
        Some(raw) => {
            let start = raw.as_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE);
            // Huge pages where available; without THP (or with it off) the arena still works,
            // with small pages. The unaligned ends are not used but stay mapped: unmapping
            // them saves nothing (never touched) and `aligned` is all that is kept.
            // SAFETY: a range inside the mapping just made.
            unsafe { libc::madvise(aligned as *mut libc::c_void, SIZE, libc::MADV_HUGEPAGE) };
            // Not inherited by forked processes (the sandbox's init is a fork that lives as
            // long as the run): huge pages shared copy-on-write with it are split into small
            // pages at the engine's first write (`do_huge_pmd_wp_page` in mm/huge_memory.c
            // copies one small page). With 16 MiB of the arena faulted in before the fork
            // (tried, to spare the engine the zeroing), the capture cost a median 35% against
            // 26% (6 interleaved rounds, load 1.7-2.3). No fork of childflow uses packet
            // buffers (init and the command's process only wait or exec).
            // SAFETY: as above.
            unsafe { libc::madvise(aligned as *mut libc::c_void, SIZE, libc::MADV_DONTFORK) };
            aligned
        }
    };
    match BASE.compare_exchange(0, mapped, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => (mapped != 1).then_some(mapped),
        Err(other) => {
            if let Some(raw) = raw {
                // Another thread mapped it first.
                // SAFETY: our own mapping, never handed out.
                unsafe { libc::munmap(raw.as_ptr().cast(), SIZE + HUGE) };
            }
            (other != 1).then_some(other)
        }
    }
}

/// A free slot's address, marked used; `None` when all are used.
fn take_slot(base: usize) -> Option<usize> {
    for (word, bits) in FREE.iter().enumerate() {
        let mut cur = bits.load(Ordering::Relaxed);
        while cur != 0 {
            let bit = cur.trailing_zeros() as usize;
            match bits.compare_exchange_weak(
                cur,
                cur & !(1 << bit),
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(base + (word * 64 + bit) * SLOT),
                Err(now) => cur = now,
            }
        }
    }
    None
}

/// The slot index of `addr` if it lies in the arena.
fn slot_of(addr: usize) -> Option<usize> {
    let base = BASE.load(Ordering::Relaxed);
    (base > 1 && addr >= base && addr < base + SIZE).then(|| (addr - base) / SLOT)
}

fn put_slot(slot: usize) {
    FREE[slot / 64].fetch_or(1 << (slot % 64), Ordering::Release);
}

/// A slot for `layout` if the current thread asked for the arena and one is free.
fn arena_alloc(layout: Layout) -> Option<*mut u8> {
    if layout.size() > SLOT || layout.align() > SLOT || !WANTED.try_with(Cell::get).unwrap_or(false)
    {
        return None;
    }
    base().and_then(take_slot).map(|addr| addr as *mut u8)
}

/// The global allocator: the system allocator, with allocations made inside
/// [`with_arena`] served from the arena (see the module documentation).
pub struct Allocator;

// SAFETY: arena slots are handed out at most once until freed (atomic bitmap), are SLOT
// bytes and SLOT-aligned (satisfying any layout of at most SLOT size and alignment), and
// are only freed or resized here; everything else is the system allocator's.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match arena_alloc(layout) {
            Some(p) => p,
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match slot_of(p as usize) {
            Some(slot) => put_slot(slot),
            // SAFETY: not an arena slot, so the system allocator's, with this layout.
            None => unsafe { System.dealloc(p, layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match arena_alloc(layout) {
            Some(p) => {
                // Slots are reused without being cleared.
                // SAFETY: a slot of at least layout.size() bytes, ours.
                unsafe { p.write_bytes(0, layout.size()) };
                p
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if slot_of(p as usize).is_none() {
            // SAFETY: the system allocator's memory, forwarded with the caller's guarantees.
            return unsafe { System.realloc(p, layout, new_size) };
        }
        if new_size <= SLOT {
            // It still fits its slot.
            return p;
        }
        // SAFETY: `new_size` is non-zero (larger than SLOT) and the layout's alignment was
        // valid, so this layout is too.
        let new =
            unsafe { System.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
        if !new.is_null() {
            // SAFETY: both hold at least layout.size() bytes and do not overlap.
            unsafe { ptr::copy_nonoverlapping(p, new, layout.size()) };
            // SAFETY: an arena slot, given back once.
            unsafe { self.dealloc(p, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator's own methods (the test binary keeps the system allocator as its
    /// global one): slots are handed out inside `with_arena` only, freed, reused, grown
    /// out of the arena with their bytes, and lie on huge-page-aligned memory.
    #[test]
    fn slots_come_from_the_arena_only_when_asked_and_go_back() {
        let a = Allocator;
        let layout = Layout::from_size_align(65534, 1).expect("layout");
        // SAFETY: every pointer is used within its layout and freed once, with it.
        unsafe {
            let outside = a.alloc(layout);
            assert!(slot_of(outside as usize).is_none(), "not asked: system memory");
            a.dealloc(outside, layout);
            let p = with_arena(|| a.alloc(layout));
            let slot = slot_of(p as usize).expect("asked: an arena slot");
            let base = base().expect("the arena is mapped");
            assert_eq!(base % HUGE, 0, "the arena is huge-page aligned");
            assert!((p as usize) >= base && (p as usize) < base + SIZE);
            assert_eq!(p as usize % SLOT, 0, "slots are slot-aligned");
            p.write_bytes(0xab, layout.size());
            let big = Layout::from_size_align(2 * SLOT, 1).expect("layout");
            let large = with_arena(|| a.alloc(big));
            assert!(slot_of(large as usize).is_none(), "larger than a slot: system memory");
            a.dealloc(large, big);
            let same = a.realloc(p, layout, SLOT);
            assert_eq!(same, p, "growing within the slot stays in place");
            let grown = a.realloc(p, Layout::from_size_align(SLOT, 1).expect("l"), 3 * SLOT);
            assert!(slot_of(grown as usize).is_none(), "grown past a slot: system memory");
            assert!(std::slice::from_raw_parts(grown, layout.size()).iter().all(|&b| b == 0xab));
            a.dealloc(grown, Layout::from_size_align(3 * SLOT, 1).expect("l"));
            // The slot went back when it moved out: it is handed out again.
            let again = with_arena(|| a.alloc(layout));
            assert_eq!(slot_of(again as usize), Some(slot), "the lowest free slot is reused");
            a.dealloc(again, layout);
        }
    }
}
