//! The run's cgroup v2 directory, `childflow-<runid>`, and the reaper that removes it.
//!
//! The command tree runs in this cgroup: the attribution programs attach to it, and
//! `cgroup.kill` ends whatever of the tree is left when the command exits.
//!
//! A cgroup directory is the one piece of host state the kernel does not remove by itself,
//! so a **reaper** does: a tiny process forked from childflow before anything else, blocked
//! reading a pipe whose only write end childflow holds. However childflow ends (return,
//! panic, SIGKILL), the kernel closes that end; the reaper's read returns, and it writes
//! `cgroup.kill` and removes the directory (retrying while the dying tree still populates
//! it), then exits. The reaper holds no other resource, ignores the signals a terminal sends
//! to the process group, and its stdio is /dev/null so it never keeps a pipe of the
//! caller open.
//!
//! The unified hierarchy is found in `/proc/self/mountinfo` (`cgroup2` mounts), never
//! assumed: it is `/sys/fs/cgroup` on pure v2 hosts and e.g. `/sys/fs/cgroup/unified` on
//! hybrid ones.

use std::{
    fs::File,
    io::Read,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Why the cgroup could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup v2 hierarchy is mounted (looked for a cgroup2 mount in /proc/self/mountinfo); \
         mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoUnified,
    /// A file or directory of the cgroup could not be created or written.
    #[error("failed to {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The reaper could not be started.
    #[error("failed to start the cgroup reaper")]
    Reaper(#[source] nix::Error),
}

/// The mount point of the cgroup v2 hierarchy, from mountinfo text (proc(5): field 5 is
/// the mount point, the filesystem type follows the ` - ` separator).
pub fn find_unified(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(unescape))?
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = std::str::from_utf8(&b[i + 1..i + 4]).map(|o| u8::from_str_radix(o, 8))
            && let Ok(v) = v
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// The unified hierarchy of this machine.
pub fn unified_root() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
        CgroupError::Io { op: "read", path: "/proc/self/mountinfo".into(), source }
    })?;
    find_unified(&text).ok_or(CgroupError::NoUnified)
}

/// The run's cgroup. Dropping it kills what is left in it and removes the directory.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<root>/childflow-<run_id>`.
    pub fn create(root: &Path, run_id: &str) -> Result<Cgroup, CgroupError> {
        let path = root.join(format!("childflow-{run_id}"));
        std::fs::create_dir(&path).map_err(|source| CgroupError::Io {
            op: "create cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory, opened for attaching programs.
    pub fn open(&self) -> Result<File, CgroupError> {
        File::open(&self.path).map_err(|source| CgroupError::Io {
            op: "open cgroup",
            path: self.path.clone(),
            source,
        })
    }

    /// Moves process `pid` (and so every child it starts afterwards) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.procs");
        std::fs::write(&path, pid.to_string()).map_err(|source| CgroupError::Io {
            op: "move the command into",
            path,
            source,
        })
    }

    /// Leaves the directory to the [`Reaper`], which removes it once childflow has exited,
    /// instead of removing it now.
    pub fn leave_to_reaper(self) {
        let _ = std::mem::ManuallyDrop::new(self);
    }

    /// Kills every process in the cgroup (`cgroup.kill`, Linux 5.14).
    pub fn kill(&self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove(&self.path, Duration::from_secs(2));
    }
}

/// Kills what is in the cgroup at `path` and removes it, retrying for up to `patience`
/// while dying processes still populate it. Returns whether it is gone.
fn remove(path: &Path, patience: Duration) -> bool {
    let started = Instant::now();
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) if started.elapsed() < patience => {
                let _ = std::fs::write(path.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", path.display());
                return false;
            }
        }
    }
}

/// The parent's end of the reaper's pipe. Dropping it (or dying) sets the reaper off.
pub struct Reaper {
    _alive: OwnedFd,
    pid: nix::unistd::Pid,
}

impl Reaper {
    /// Forks the reaper for the cgroup at `path` (which need not exist yet); it also
    /// removes the file `also` (a run file that may not exist by then).
    ///
    /// Call it early, with as few threads as possible: the child allocates only in plain
    /// std calls (glibc's malloc is fork-safe) and takes no lock of ours.
    pub fn spawn(path: &Path, also: &Path) -> Result<Reaper, CgroupError> {
        let (rx, tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(CgroupError::Reaper)?;
        let devnull = File::options().read(true).write(true).open("/dev/null").ok();
        // SAFETY: the caller guarantees a single-threaded process; the child only makes
        // plain syscalls and filesystem calls before _exit.
        match unsafe { nix::unistd::fork() }.map_err(CgroupError::Reaper)? {
            nix::unistd::ForkResult::Child => {
                drop(tx);
                // SAFETY: plain syscalls in the fresh child.
                unsafe {
                    if let Some(null) = &devnull {
                        for fd in 0..3 {
                            libc::dup2(null.as_raw_fd(), fd);
                        }
                    }
                    // Its own session: the terminal's SIGINT/SIGHUP go to childflow's group.
                    libc::setsid();
                }
                let mut byte = [0u8; 1];
                let mut rx = File::from(rx);
                // Returns on EOF: childflow is gone, or done and asks for a last check.
                while let Ok(1) = rx.read(&mut byte) {}
                let _ = std::fs::remove_file(also);
                let started = Instant::now();
                while std::fs::remove_dir(path)
                    .is_err_and(|e| e.kind() != std::io::ErrorKind::NotFound)
                    && started.elapsed() < Duration::from_secs(5)
                {
                    let _ = std::fs::write(path.join("cgroup.kill"), "1");
                    std::thread::sleep(Duration::from_millis(10));
                }
                // SAFETY: leave without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(rx);
                Ok(Reaper { _alive: tx, pid: child })
            }
        }
    }

    /// Lets the reaper finish (the cgroup is already gone on a normal exit) and reaps it.
    pub fn finish(self) {
        let pid = self.pid;
        drop(self);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// For tests: a reaper whose pipe end we can write to before closing.
#[cfg(test)]
fn write_all(fd: &OwnedFd, data: &[u8]) {
    use std::io::Write;
    let mut f = File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_hierarchy_on_hybrid_and_pure_hosts() {
        assert_eq!(find_unified(HYBRID), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_unified(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_unified("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_unified(line), Some(PathBuf::from("/mnt/my cgroups")));
    }

    #[test]
    fn the_reaper_removes_the_directory_once_the_pipe_closes() {
        // A plain directory stands in for the cgroup: the reaper only needs rmdir.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("childflow-test-cgroup");
        std::fs::create_dir(&target).unwrap();
        let file = dir.path().join("childflow-test.resolv.conf");
        std::fs::write(&file, "x").unwrap();
        let reaper = Reaper::spawn(&target, &file).unwrap();
        write_all(&reaper._alive, b"x");
        assert!(target.exists(), "the reaper waits while the pipe is open");
        reaper.finish();
        assert!(!target.exists(), "the reaper removed the directory");
        assert!(!file.exists(), "the reaper removed the run file");
    }
}
