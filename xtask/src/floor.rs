//! The least work a capture does, as a bench row of its own: a [`Floor`] runs beside a
//! transfer and does, for every byte the transfer moves, what any capture that writes the
//! packets from userspace must do at least, and nothing else.

use std::{
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, OpenOptionsExt},
    },
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
/// A floor is only a floor while its writes keep up with the link: it never slows the
/// transfer, so on a disk slower than the transfer it falls behind instead (a capture that
/// keeps every packet cannot: its backend waits for it, or drops). [`Floor::stop`] says by
/// how much, and [`write_rate`] measures what the disk takes.
///
/// It stops, and its file is deleted, when it is dropped (also on an early return of the
/// run it measures); [`Floor::stop`] stops it and reports the thread's error.
pub struct Floor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Option<f64>>>>,
    file: Option<PathBuf>,
}

const SPAN: usize = 64 << 20;
const CHUNK: usize = 64 << 10;
/// Bytes of one write of the floor's (and of [`write_rate`]'s).
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
        let out = file.map(create).transpose()?;
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
                // Not past the stop: a floor that fell behind would catch up after the
                // transfer, and hide how far behind it was.
                while written + WRITE as u64 <= done && !flag.load(Ordering::Relaxed) {
                    let at = (written % SPAN as u64) as usize;
                    let from = if copy { &dst[at..at + WRITE] } else { &src[at..at + WRITE] };
                    out.write_all_at(from, written)?;
                    written += WRITE as u64;
                }
            }
            // What the writes had left to do when the transfer ended, of all it moved.
            let due = moved()?.saturating_sub(start);
            Ok(out.map(|_| due.saturating_sub(written) as f64 / due.max(1) as f64))
        });
        Ok(Floor { stop, thread: Some(thread), file: file.map(Path::to_path_buf) })
    }

    /// Stops the thread. With a file: the share of the bytes the link moved that the writes
    /// had not caught up with (0 when they kept up). The thread's error, if it failed.
    pub fn stop(mut self) -> Result<Option<f64>> {
        self.join()
    }

    fn join(&mut self) -> Result<Option<f64>> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else { return Ok(None) };
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

/// Creates (truncates) `path` for the floor's writes: `O_DIRECT`, as childflow writes
/// captures to a disk, and buffered on tmpfs, as childflow decides it
/// (`childflow/src/capture/direct.rs`: `fstatfs(2)` of the file, not its path).
fn create(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    /// `statfs(2)` magic of tmpfs (`include/uapi/linux/magic.h`).
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: an all-zero statfs is valid; fstatfs fills it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs(2) on an open descriptor into a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("statfs {}", path.display()));
    }
    if fs.f_type as i64 == TMPFS_MAGIC {
        return Ok(file);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("cannot open {} with O_DIRECT", path.display()))
}

/// Gbit/s that `dir` takes in the floor's writes ([`WRITE`]s, `O_DIRECT` as childflow's
/// capture writes on a disk), writing for `seconds` to a file that is deleted after. Queue
/// depth does not change it on this machine's disk (fio, 4 MiB `O_DIRECT` writes appended
/// or into preallocated space, depth 1 to 8: 1.2–1.9 GB/s every way), so one writer
/// measures it.
pub fn write_rate(dir: &Path, seconds: f64) -> Result<f64> {
    let path = dir.join(format!(".cfbench-disk-{}", std::process::id()));
    let out = create(&path);
    let rate = out.and_then(|out| {
        let mut buf = Huge::new()?;
        buf.bytes().fill(1);
        let start = std::time::Instant::now();
        let mut written = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            let at = (written % SPAN as u64) as usize;
            out.write_all_at(&buf.bytes()[at..at + WRITE], written)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written += WRITE as u64;
        }
        Ok(written as f64 * 8.0 / 1e9 / start.elapsed().as_secs_f64())
    });
    let _ = std::fs::remove_file(&path);
    rate
}

/// What a capture directory took ([`write_rate`], Gbit/s) before and after a bench's rows:
/// a shared disk's rate moves.
///
/// A capture that keeps every packet of a transfer writes as many bytes as the transfer
/// moves (and a little more), so on a disk slower than the transfer it must slow the
/// transfer down to the disk's rate: that share of its cost no capture can avoid.
pub struct DiskRate {
    pub before: f64,
    pub after: f64,
}

impl DiskRate {
    /// The cost the disk forces on any capture keeping every byte of a transfer of `gbit`
    /// Gbit/s (negative), taking the faster of its two rates; `None` when that is not
    /// slower than the transfer.
    pub fn bound(&self, gbit: f64) -> Option<f64> {
        let most = self.before.max(self.after);
        (most < gbit).then(|| most / gbit - 1.0)
    }

    /// One line for a bench: the rates of `dir`, and what they mean for a capture of a
    /// transfer of `gbit` Gbit/s.
    pub fn describe(&self, dir: &Path, gbit: f64) -> String {
        let meaning = match self.bound(gbit) {
            Some(cost) => format!(
                "it bounds any capture that keeps every byte of the {gbit:.2} Gbit/s to a \
                 cost of {:+.1}% or more",
                cost * 100.0
            ),
            None => format!("more than the {gbit:.2} Gbit/s moved: it does not bound the cost"),
        };
        format!(
            "{}: sequential {} MiB writes at {:.2} Gbit/s before the rounds and {:.2} after; \
             {meaning}",
            dir.display(),
            WRITE >> 20,
            self.before,
            self.after
        )
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

/// Issue 6's goal: a capture of bulk TCP costs it at most this share of its throughput.
pub const GOAL: f64 = 0.10;

/// Whether a writing floor fell behind the transfer ([`Floor::stop`]'s share, more than
/// 1%): then it did less than a capture keeping every byte must.
pub fn fell_behind(behind: Option<f64>) -> bool {
    behind.is_some_and(|b| b > 0.01)
}

/// One line for a bench: a capture's cost against [`GOAL`], and what the floor says of the
/// goal on this machine. All costs are negative shares (−0.2: 20% slower).
///
/// The least a capture that keeps every byte can cost is the more of the floor row's cost
/// (`floor`, that row's name `floor_name`) and the disk's bound ([`DiskRate::bound`]). A
/// floor whose writes fell behind ([`fell_behind`]) did less than such a capture must: its
/// cost is still a lower bound, but a cost below the goal then shows nothing, nor does a
/// disk bound below the goal (a bound, not a run that kept every byte).
pub fn verdict(
    capture: f64,
    floor_name: &str,
    floor: f64,
    behind: Option<f64>,
    disk: Option<f64>,
) -> String {
    let pct = |c: f64| format!("{:+.1}%", c * 100.0);
    let fell_behind = fell_behind(behind);
    let (least, by) = match disk {
        Some(d) if d < floor => (d, format!("the disk's rate, {}", pct(d))),
        _ => (
            floor,
            format!(
                "{}, {}{}",
                floor_name.trim(),
                pct(floor),
                if fell_behind { " (it fell behind)" } else { "" }
            ),
        ),
    };
    let said = if capture >= -GOAL {
        format!("met in this run; the least any capture costs here: {by}")
    } else if least < -GOAL {
        format!(
            "not met, and no capture that keeps every byte meets it on this machine: the \
             least any costs here is {by}"
        )
    } else if fell_behind {
        format!("not met; this run does not show the least any capture costs here: {by}")
    } else {
        format!("not met, though within a capture's reach here: the least any costs is {by}")
    };
    format!("goal ≤{:.0}%: childflow's capture {}: {said}", GOAL * 100.0, pct(capture))
}

#[cfg(test)]
mod tests {
    use super::{create, verdict};
    use std::os::fd::AsRawFd;

    /// O_DIRECT on a disk, buffered on tmpfs, wherever the tmpfs is mounted.
    #[test]
    fn floor_files_are_direct_except_on_tmpfs() {
        let direct = |dir: &str| {
            let path =
                std::path::Path::new(dir).join(format!(".cf-floor-test-{}", std::process::id()));
            let file = create(&path).unwrap();
            // SAFETY: F_GETFL on an open descriptor.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            std::fs::remove_file(&path).unwrap();
            flags & libc::O_DIRECT != 0
        };
        assert!(!direct("/dev/shm"), "tmpfs takes buffered writes");
        assert!(direct(env!("CARGO_MANIFEST_DIR")), "the checkout's disk takes O_DIRECT");
    }

    #[test]
    fn verdict_takes_the_larger_of_floor_and_disk() {
        let line = verdict(-0.177, "  floor: copy + write", -0.23, Some(0.03), None);
        assert!(line.contains("-17.7%: not met, and no capture"), "{line}");
        assert!(line.ends_with("floor: copy + write, -23.0% (it fell behind)"), "{line}");

        let line = verdict(-0.15, "floor: write", -0.04, Some(0.0), Some(-0.12));
        assert!(
            line.ends_with(
                "meets it on this machine: the least any costs here is the disk's rate, -12.0%"
            ),
            "{line}"
        );

        let line = verdict(-0.185, "floor: copy + write", -0.088, Some(0.31), None);
        assert!(line.contains("not met; this run does not show"), "{line}");
        // A disk bound below the goal does not make a floor that fell behind show it either.
        let line = verdict(-0.185, "floor: write", -0.088, Some(0.31), Some(-0.02));
        assert!(line.contains("not met; this run does not show"), "{line}");

        let line = verdict(-0.22, "floor: write", -0.06, None, Some(-0.01));
        assert!(line.contains("-22.0%: not met, though within a capture's reach"), "{line}");

        let line = verdict(-0.089, "floor: copy + write", -0.152, None, None);
        assert!(line.contains("-8.9%: met in this run"), "{line}");
    }
}
