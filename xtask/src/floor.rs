//! The least work a capture does, as a bench row of its own: a [`Floor`] runs beside a
//! transfer and does, for every byte the transfer moves, what any capture that writes the
//! packets from userspace must do at least, and nothing else.

use std::{
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

/// A thread that reads a link's byte counters (both ways) every millisecond and, for as
/// many bytes as the link moved meanwhile:
/// - with `copy`, copies them once, in [`CHUNK`]s, between two buffers of [`SPAN`] (as cold
///   as a capture's buffers, which the disk reads long after they were filled): what a
///   capture in a kernel-to-user copy path does (the rootful backend, tcpdump);
/// - with a file, writes them to it in [`WRITE`]s, `O_DIRECT` as childflow writes captures
///   to a disk (buffered on tmpfs): the rootless backend's floor, whose engine holds every
///   frame in its memory already.
///
/// Both buffers are transparent huge pages, as childflow's packet buffers are
/// (`childflow/src/arena.rs`): `O_DIRECT` from small pages costs several times the CPU.
///
/// No packets, no metadata, no kernel path of the capture's own. What a row with a floor
/// costs a transfer is a floor under the cost of every capture of that transfer on that
/// machine, childflow's and tcpdump's alike.
///
/// It stops, and its file is deleted, when it is dropped (also on an early return of the
/// run it measures); [`Floor::stop`] stops it and reports the thread's error.
pub struct Floor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    file: Option<PathBuf>,
}

const SPAN: usize = 64 << 20;
const CHUNK: usize = 64 << 10;
const WRITE: usize = 4 << 20;
/// The huge page size of transparent huge pages on x86-64.
const HUGE: usize = 2 << 20;

impl Floor {
    /// Starts the thread for the link `link` of this network namespace, writing to `file`
    /// if given (created, and deleted when the floor is dropped).
    pub fn start(link: &str, copy: bool, file: Option<&Path>) -> Result<Floor> {
        let counter = |c: &str| {
            let path = format!("/sys/class/net/{link}/statistics/{c}");
            std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))
        };
        let (tx, rx) = (counter("tx_bytes")?, counter("rx_bytes")?);
        let out = file
            .map(|path| {
                let tmpfs = path.starts_with("/dev/shm");
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(if tmpfs { 0 } else { libc::O_DIRECT })
                    .open(path)
                    .with_context(|| format!("cannot create {}", path.display()))
            })
            .transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let moved = || -> Result<u64> {
                let mut sum = 0;
                for f in [&tx, &rx] {
                    let mut buf = [0u8; 32];
                    let n = f.read_at(&mut buf, 0)?;
                    sum += std::str::from_utf8(&buf[..n])?.trim().parse::<u64>()?;
                }
                Ok(sum)
            };
            let (mut src, mut dst) = (Huge::new()?, Huge::new()?);
            src.bytes().fill(1);
            let (src, dst) = (&*src.bytes(), dst.bytes());
            let start = moved()?;
            let (mut done, mut written) = (0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                let due = moved()?.saturating_sub(start);
                while done + CHUNK as u64 <= due {
                    let at = (done % SPAN as u64) as usize;
                    if copy {
                        dst[at..at + CHUNK].copy_from_slice(&src[at..at + CHUNK]);
                    }
                    done += CHUNK as u64;
                }
                let Some(out) = &out else { continue };
                while written + WRITE as u64 <= done {
                    let at = (written % SPAN as u64) as usize;
                    let from = if copy { &dst[at..at + WRITE] } else { &src[at..at + WRITE] };
                    out.write_all_at(from, written)?;
                    written += WRITE as u64;
                }
            }
            Ok(())
        });
        Ok(Floor { stop, thread: Some(thread), file: file.map(Path::to_path_buf) })
    }

    /// Stops the thread; its error, if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else { return Ok(()) };
        thread.join().map_err(|_| anyhow::anyhow!("the floor's thread panicked"))?
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.join();
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// [`SPAN`] bytes of anonymous memory, 2 MiB-aligned and advised into transparent huge
/// pages (this machine's THP mode is `madvise`), zeroed by the kernel.
struct Huge {
    map: *mut libc::c_void,
    len: usize,
    at: usize,
}

// SAFETY: `Huge` owns its mapping exclusively, like a `Box<[u8]>`.
unsafe impl Send for Huge {}

impl Huge {
    fn new() -> Result<Huge> {
        let len = SPAN + HUGE;
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the floor's buffer");
        }
        let at = map.cast::<u8>().align_offset(HUGE);
        // SAFETY: `at + SPAN <= len`, inside the mapping just made; advice only.
        unsafe { libc::madvise(map.cast::<u8>().add(at).cast(), SPAN, libc::MADV_HUGEPAGE) };
        Ok(Huge { map, len, at })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `SPAN` bytes from `at` lie in the mapping, which lives as long as `self`
        // and is initialized (anonymous memory reads as zeroes).
        unsafe { std::slice::from_raw_parts_mut(self.map.cast::<u8>().add(self.at), SPAN) }
    }
}

impl Drop for Huge {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.map, self.len) };
    }
}
