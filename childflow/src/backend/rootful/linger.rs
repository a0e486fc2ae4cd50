//! Kernel-side teardown behind childflow's back, so a finished run returns at once.
//!
//! Deleting the run's owned nftables table unregisters its hooks, which waits for an RCU
//! grace period (`synchronize_net` outside RTNL); the cgroup links' release is handed over
//! with it. Up to tens of ms on this kind of machine, longer than the rest of a
//! `--root -- true` run. None of it
//! changes what the run reports: by then the command is gone, its link is down and the last
//! counters are read.
//!
//! So at the end of a run, [`hand_over`] forks a **lingerer** that holds a duplicate of each
//! descriptor whose release is slow (the BPF links and the nft socket) and closes every other
//! one, its stdio included, so no caller's pipe stays open through it. It waits until
//! childflow itself has exited (EOF on a pipe only childflow holds), then exits: the kernel
//! releases the duplicates in the lingerer's exit path, when childflow's own closes were not
//! the last references and cost nothing. Nobody waits for the lingerer: it is in a session
//! of its own and is reaped by whoever inherits it.
//!
//! The guarantee stays the kernel's: every piece of state still dies with the last
//! descriptor, whichever process holds it; a killed lingerer releases it the same way.
//! What changes is *when* the host is clean after a normal exit: not when childflow
//! returns, but when the lingerer's exit has run (see the module doc of the backend for
//! the numbers and the decision).

use std::{
    fs::File,
    os::fd::{AsRawFd, IntoRawFd, RawFd},
};

/// The descriptors of this process that are BPF links (see [`is_bpf_link`]): aya does not
/// expose their numbers, the kernel does.
pub fn bpf_links() -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    dir.flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| is_bpf_link(t.as_os_str())))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether a `/proc/self/fd` link target is a BPF link. The kernel names the anon inode
/// `bpf_link` (kernel/bpf/syscall.c, `bpf_link_prime`; `anon_inode:bpf_link` on 6.18);
/// `bpf-link` is accepted too, like `bpf-map`/`bpf-prog`. Matching only `bpf-link` once
/// left every link with childflow, whose exit then released them itself (with the TCX links
/// of the time, two grace periods, 8-20 ms, between its last line and its exit).
fn is_bpf_link(target: &std::ffi::OsStr) -> bool {
    target == "anon_inode:bpf_link" || target == "anon_inode:bpf-link"
}

/// The ranges `[lo, hi]` of descriptors from 3 up that are not in `keep`.
fn close_ranges(keep: &[RawFd]) -> Vec<(u32, u32)> {
    let mut keep: Vec<u32> = keep.iter().filter(|&&fd| fd > 2).map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut out = Vec::with_capacity(keep.len() + 1);
    let mut next = 3u32;
    for fd in keep {
        if fd > next {
            out.push((next, fd - 1));
        }
        next = fd + 1;
    }
    out.push((next, u32::MAX));
    out
}

/// Forks the lingerer holding `keep` (see the module doc). Best effort: if it cannot be
/// forked, childflow releases everything itself on exit, as before, only slower.
///
/// The child makes only raw system calls (everything it needs is prepared before the
/// fork), so forking from this multi-threaded process is safe.
pub fn hand_over(keep: &[RawFd]) {
    let Ok(devnull) = File::options().read(true).write(true).open("/dev/null") else { return };
    let Ok((parent_gone, parent_alive)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return;
    };
    let (null, gone) = (devnull.as_raw_fd(), parent_gone.as_raw_fd());
    let mut keep = keep.to_vec();
    keep.push(gone);
    let ranges = close_ranges(&keep);
    // SAFETY: the child below only makes async-signal-safe system calls, then exits.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: raw system calls on descriptors this process owns; no allocation.
            unsafe {
                libc::setsid();
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                for &(lo, hi) in &ranges {
                    libc::syscall(libc::SYS_close_range, lo, hi, 0);
                }
                let mut byte = 0u8;
                while libc::read(gone, (&raw mut byte).cast(), 1) != 0 {
                    if *libc::__errno_location() != libc::EINTR {
                        break;
                    }
                }
                libc::_exit(0);
            }
        }
        pid if pid > 0 => {
            // Held until childflow exits: that EOF is the lingerer's signal.
            let _ = parent_alive.into_raw_fd();
            drop(parent_gone);
            tracing::debug!("teardown handed to process {pid}");
        }
        _ => tracing::debug!("cannot fork the teardown process; tearing down in place"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_links_are_recognised_by_either_spelling_of_their_inode() {
        use std::ffi::OsStr;
        assert!(is_bpf_link(OsStr::new("anon_inode:bpf_link")));
        assert!(is_bpf_link(OsStr::new("anon_inode:bpf-link")));
        assert!(!is_bpf_link(OsStr::new("anon_inode:bpf-map")));
        assert!(!is_bpf_link(OsStr::new("anon_inode:bpf-prog")));
    }

    #[test]
    fn close_ranges_skip_stdio_and_the_kept_descriptors() {
        assert_eq!(close_ranges(&[]), [(3, u32::MAX)]);
        assert_eq!(close_ranges(&[9, 5, 6, 1]), [(3, 4), (7, 8), (10, u32::MAX)]);
        assert_eq!(close_ranges(&[3, 3, 4]), [(5, u32::MAX)]);
    }
}
