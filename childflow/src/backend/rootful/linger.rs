//! Kernel-side teardown behind childflow's back, so a finished run returns at once.
//!
//! Deleting the run's owned nftables table unregisters its hooks, which waits for an RCU
//! grace period (`synchronize_net` outside RTNL); the cgroup links' release is handed over
//! with it. Up to tens of ms on this kind of machine, longer than the rest of a
//! `--root -- true` run. None of it
//! changes what the run reports: by then the command is gone, its link is down and the last
//! counters are read.
//!
//! So at the end of a run, [`hand_over`] starts a **lingerer** that holds a duplicate of each
//! descriptor whose release is slow (the BPF links and the nft socket) and closes every other
//! one, its stdio included, so no caller's pipe stays open through it. It waits until
//! childflow itself has exited (EOF on a pipe only childflow holds), then exits: the kernel
//! releases the duplicates in the lingerer's exit path, when childflow's own closes were not
//! the last references and cost nothing. Nobody waits for the lingerer: it is in a session
//! of its own and is reaped by whoever inherits it.
//!
//! The lingerer shares childflow's address space (`clone(CLONE_VM)`, not `fork`): starting
//! it copies no page tables (a `fork` took 0.3-0.4 ms), and childflow's exit leaves the
//! address space's teardown to it too (`exit_mmap` runs in the last exiting user of a
//! memory map). Such a child must not touch what childflow may change meanwhile: it runs on
//! a stack of its own, reads only a plan that childflow never frees, and makes raw system
//! calls (no `errno`, which lives in the thread-local storage it would share). On
//! architectures without those raw calls here, it is forked as before.
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

/// Starts the lingerer holding `keep` (see the module doc). Best effort: if it cannot be
/// started, childflow releases everything itself on exit, as before, only slower.
///
/// The child makes only raw system calls (everything it needs is prepared before), so
/// starting it from this multi-threaded process is safe.
pub fn hand_over(keep: &[RawFd]) {
    let Ok(devnull) = File::options().read(true).write(true).open("/dev/null") else { return };
    let Ok((parent_gone, parent_alive)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return;
    };
    let (null, gone) = (devnull.as_raw_fd(), parent_gone.as_raw_fd());
    let mut keep = keep.to_vec();
    keep.push(gone);
    let ranges = close_ranges(&keep);
    if let Some(pid) = shared::spawn(null, gone, ranges.clone()) {
        // Held until childflow exits: that EOF is the lingerer's signal.
        let _ = parent_alive.into_raw_fd();
        drop(parent_gone);
        tracing::debug!("teardown handed to process {pid}");
        return;
    }
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

/// The lingerer as a clone sharing childflow's memory (see the module doc).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod shared {
    use std::os::fd::RawFd;

    /// What the lingerer does, in memory childflow never frees or changes (leaked).
    struct Plan {
        null: RawFd,
        gone: RawFd,
        ranges: &'static [(u32, u32)],
    }

    /// Its stack: childflow never unmaps it (the address space goes with the last of the
    /// two to exit).
    const STACK: usize = 64 * 1024;

    /// Starts the lingerer; its pid, or `None` if it could not be started.
    pub fn spawn(null: RawFd, gone: RawFd, ranges: Vec<(u32, u32)>) -> Option<i32> {
        let plan = Box::leak(Box::new(Plan { null, gone, ranges: ranges.leak() }));
        // Never unmapped.
        let stack = crate::arena::map_anonymous(STACK, libc::MAP_STACK)?;
        // SAFETY: `lingerer` runs on its own stack (top of the mapping, 16-aligned) with a
        // plan that stays valid forever, and touches nothing else of this process's memory
        // (see its doc). SIGCHLD, as for a fork: whoever inherits it reaps it.
        let pid = unsafe {
            libc::clone(
                lingerer,
                stack.as_ptr().add(STACK).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                (plan as *mut Plan).cast(),
            )
        };
        (pid > 0).then_some(pid)
    }

    /// The lingerer: a session of its own, /dev/null as stdio, every descriptor but the
    /// kept ones closed, then it waits for EOF on `gone` and exits. Raw system calls only:
    /// it shares childflow's memory, including the thread-local `errno` libc would write.
    extern "C" fn lingerer(plan: *mut libc::c_void) -> libc::c_int {
        // SAFETY: the leaked plan `spawn` passed; raw system calls on this process's own
        // descriptors, with a byte of this stack as the read buffer.
        unsafe {
            let plan = &*plan.cast::<Plan>();
            syscall3(libc::SYS_setsid, 0, 0, 0);
            for fd in 0..3 {
                syscall3(libc::SYS_dup3, plan.null as usize, fd, 0);
            }
            for &(lo, hi) in plan.ranges {
                syscall3(libc::SYS_close_range, lo as usize, hi as usize, 0);
            }
            let mut byte = 0u8;
            while syscall3(libc::SYS_read, plan.gone as usize, (&raw mut byte) as usize, 1)
                == -(libc::EINTR as isize)
            {}
            loop {
                syscall3(libc::SYS_exit, 0, 0, 0);
            }
        }
    }

    /// A system call with up to three arguments; the result, or `-errno`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn syscall3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the x86-64 Linux system call convention (the kernel clobbers rcx, r11).
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a,
                in("rsi") b,
                in("rdx") c,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    /// A system call with up to three arguments; the result, or `-errno`.
    #[cfg(target_arch = "aarch64")]
    unsafe fn syscall3(n: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        let ret: isize;
        // SAFETY: the arm64 Linux system call convention.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") n,
                inlateout("x0") a as isize => ret,
                in("x1") b,
                in("x2") c,
                options(nostack),
            );
        }
        ret
    }
}

/// Without the raw system calls: always fork.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod shared {
    pub fn spawn(_: std::os::fd::RawFd, _: std::os::fd::RawFd, _: Vec<(u32, u32)>) -> Option<i32> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ranges_skip_stdio_and_the_kept_descriptors() {
        assert_eq!(close_ranges(&[]), [(3, u32::MAX)]);
        assert_eq!(close_ranges(&[9, 5, 6, 1]), [(3, 4), (7, 8), (10, u32::MAX)]);
        assert_eq!(close_ranges(&[3, 3, 4]), [(5, u32::MAX)]);
    }
}
