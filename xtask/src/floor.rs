//! The least work a capture does, as a bench row of its own: a [`Floor`] runs beside a
//! transfer and does, for every byte the transfer moves, what any capture that writes the
//! packets from userspace must do at least, and nothing else.

use std::{
    os::unix::fs::{FileExt, OpenOptionsExt},
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
/// No packets, no metadata, no kernel path of the capture's own. What a row with a floor
/// costs a transfer is a floor under the cost of every capture of that transfer on that
/// machine, childflow's and tcpdump's alike.
pub struct Floor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

const SPAN: usize = 64 << 20;
const CHUNK: usize = 64 << 10;
const WRITE: usize = 4 << 20;
/// `O_DIRECT` wants page-aligned memory.
const PAGE: usize = 4096;

impl Floor {
    /// Starts the thread for the link `link` of this network namespace, writing to `file`
    /// if given (created; the caller deletes it).
    pub fn start(link: &str, copy: bool, file: Option<&str>) -> Result<Floor> {
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
                    .with_context(|| format!("cannot create {path}"))
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
            let (src, mut dst) = (vec![1u8; SPAN + PAGE], vec![0u8; SPAN + PAGE]);
            let aligned = |v: &[u8]| {
                let at = v.as_ptr().align_offset(PAGE);
                (at, at + SPAN)
            };
            let (s, d) = (aligned(&src), aligned(&dst));
            let (src, dst) = (&src[s.0..s.1], &mut dst[d.0..d.1]);
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
        Ok(Floor { stop, thread })
    }

    /// Stops the thread; its error, if it failed.
    pub fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the floor's thread panicked"))?
    }
}
