//! Starting the command tree in namespaces of its own, and waiting for it.
//!
//! Process layout:
//! ```text
//! childflow ──clone(NEWPID|NEWNET|NEWNS[|NEWUSER])──► init (pid 1 of the new pid namespace)
//!                                                      └─fork──► the command (execvp)
//! ```
//! `init` is childflow's own code. It dies with childflow (`PR_SET_PDEATHSIG`), and when it
//! dies the kernel kills every process of the pid namespace, which frees the network
//! namespace and everything in it: a SIGKILLed childflow leaves no command tree behind.
//! `init` reaps orphans, forwards signals to the command, and exits with the command's
//! status (128+N for a signal), also reporting the raw status to the parent.
//!
//! Start-up handshake over pipes: the parent does its side of the setup once the child
//! exists (uid maps, veth), then [`Sandbox::release`]s it; `init` runs the backend's
//! in-namespace setup, forks and execs the command, and reports `started` or the error
//! ([`SpawnError`]), so "command not found" is exit code 127 with a clear message.
//!
//! [`spawn`] must be called while the process is single-threaded (it forks with the raw
//! `clone` syscall); signals must already be blocked with [`signals::block`].

pub mod fdpass;
pub mod signals;
pub mod userns;

use std::{
    ffi::{CString, OsString},
    fs::File,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    sync::Arc,
};

use nix::{
    errno::Errno,
    sys::wait::{WaitPidFlag, WaitStatus, waitpid},
    unistd::{Pid, pipe2},
};

/// Which namespaces the child gets besides its own pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespaces {
    /// A user namespace (rootless). Without it the caller must be root.
    pub user: bool,
}

/// The identity the command runs as (rootful: the user who invoked sudo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub namespaces: Namespaces,
    /// argv; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<OsString>,
    /// Extra environment for the command (added to childflow's own).
    pub env: Vec<(OsString, OsString)>,
    /// Drop to these credentials before exec (rootful). `None`: keep the mapped user.
    pub credentials: Option<Credentials>,
    /// A terminal (pty slave) to be the command's stdin, stdout, stderr and controlling
    /// terminal, in a session of its own (`--tui`). `None`: inherit childflow's stdio.
    pub terminal: Option<Arc<OwnedFd>>,
    /// An open cgroup v2 directory for `init` (and so the whole tree) to start in
    /// (`CLONE_INTO_CGROUP`, Linux 5.7). Starting there costs nothing, where moving a
    /// running process (writing `cgroup.procs`) takes the cgroup threadgroup rwsem for
    /// writing, which waits for an RCU grace period (~10-15 ms here). `None`: childflow's.
    pub cgroup: Option<Arc<OwnedFd>>,
    /// Run the backend's setup in `init` at once instead of after [`Sandbox::release`], so
    /// it overlaps the parent's work. Only for a setup that needs nothing the parent does
    /// after the clone (rootful: mounts and sysctls of the new namespaces; not rootless,
    /// whose setup needs the uid maps the parent writes). The command still starts only
    /// after the release.
    pub setup_before_release: bool,
}

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128+N for signal N.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    fn from_raw(raw: i32) -> Self {
        if libc::WIFSIGNALED(raw) {
            ExitStatus::Signaled(libc::WTERMSIG(raw))
        } else {
            ExitStatus::Exited(libc::WEXITSTATUS(raw))
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => {
                let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "killed by signal {s} ({name})")
            }
        }
    }
}

/// Why the command could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `clone` failed; for a user namespace this usually means they are disabled.
    #[error("failed to create the command's namespaces{hint}")]
    Clone {
        hint: &'static str,
        #[source]
        source: Errno,
    },
    /// A pipe for the start-up handshake could not be made.
    #[error("failed to create a pipe")]
    Pipe(#[source] Errno),
    /// The backend's setup inside the namespaces failed.
    #[error("setting up the command's namespaces failed: {0}")]
    Setup(String),
    /// The command does not exist (exit code 127).
    #[error("command not found: {0}")]
    NotFound(String),
    /// The command exists but could not be executed (exit code 126).
    #[error("cannot execute {command}")]
    Exec { command: String, source: Errno },
    /// The child vanished during start-up.
    #[error("the sandbox's init process died during start-up")]
    Died,
}

impl SpawnError {
    /// The exit code childflow should return for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::NotFound(_) => crate::exit::NOT_FOUND,
            SpawnError::Exec { .. } => crate::exit::CANNOT_EXECUTE,
            _ => crate::exit::FAILURE,
        }
    }
}

/// Messages `init` sends the parent over the report pipe (one tag byte, then data).
const MSG_STARTED: u8 = b'S';
const MSG_SETUP_ERROR: u8 = b'E';
const MSG_EXEC_ERROR: u8 = b'X';
const MSG_STATUS: u8 = b'W';

/// The running sandbox, seen from the parent.
pub struct Sandbox {
    init: Pid,
    go: Option<File>,
    report: File,
    status: Option<ExitStatus>,
}

impl Sandbox {
    /// The pid of `init` in childflow's pid namespace (use it for `/proc/PID/ns/*`).
    pub fn pid(&self) -> Pid {
        self.init
    }

    /// Lets `init` proceed with its setup and start the command, then waits until the command
    /// has been exec'd (or failed to be).
    pub fn release(&mut self) -> Result<(), SpawnError> {
        if let Some(mut go) = self.go.take() {
            // A failed early setup has ended `init` already: its report says why.
            let _ = go.write_all(&[1]);
        }
        let mut tag = [0u8; 1];
        if self.report.read_exact(&mut tag).is_err() {
            return Err(SpawnError::Died);
        }
        let mut rest = Vec::new();
        match tag[0] {
            MSG_STARTED => Ok(()),
            MSG_SETUP_ERROR => {
                let _ = self.report.read_to_end(&mut rest);
                Err(SpawnError::Setup(String::from_utf8_lossy(&rest).into_owned()))
            }
            MSG_EXEC_ERROR => {
                let _ = self.report.read_to_end(&mut rest);
                let errno = rest.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                let command =
                    String::from_utf8_lossy(rest.get(4..).unwrap_or_default()).into_owned();
                Err(match Errno::from_raw(errno) {
                    Errno::ENOENT => SpawnError::NotFound(command),
                    source => SpawnError::Exec { command, source },
                })
            }
            _ => Err(SpawnError::Died),
        }
    }

    /// Waits for the command to end (reaping `init`).
    pub fn wait(&mut self) -> Result<ExitStatus, Errno> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let init_status = loop {
            match waitpid(self.init, None) {
                Ok(WaitStatus::Exited(_, code)) => break ExitStatus::Exited(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => break ExitStatus::Signaled(sig as i32),
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        };
        let status = self.read_reported_status().unwrap_or(init_status);
        self.status = Some(status);
        Ok(status)
    }

    /// Non-blocking [`Sandbox::wait`]: `None` while the command runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Errno> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        match waitpid(self.init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => Ok(None),
            Ok(WaitStatus::Exited(_, code)) => {
                let status = self.read_reported_status().unwrap_or(ExitStatus::Exited(code));
                self.status = Some(status);
                Ok(Some(status))
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                let status = ExitStatus::Signaled(sig as i32);
                self.status = Some(status);
                Ok(Some(status))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_reported_status(&mut self) -> Option<ExitStatus> {
        let mut msg = [0u8; 5];
        self.report.read_exact(&mut msg).ok()?;
        (msg[0] == MSG_STATUS)
            .then(|| ExitStatus::from_raw(i32::from_ne_bytes(msg[1..5].try_into().unwrap())))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.status.is_none() {
            // init's death takes the whole pid namespace with it.
            let _ = nix::sys::signal::kill(self.init, nix::sys::signal::Signal::SIGKILL);
            let _ = self.wait();
        }
    }
}

/// Work queued for right after the next clone, see [`after_clone`].
type Hook = Box<dyn FnOnce() + Send>;
static AFTER_CLONE: std::sync::Mutex<Vec<Hook>> = std::sync::Mutex::new(Vec::new());

/// Runs `f` in the parent right after the next [`spawn`] cloned the child. Threads must be
/// started there rather than before: the child is a copy of the process at the clone, and a
/// lock a running thread holds at that instant (the allocator's) would never be released
/// in it.
pub fn after_clone(f: impl FnOnce() + Send + 'static) {
    AFTER_CLONE.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(f));
}

/// Runs the queued [`after_clone`] work now. [`spawn`] does so right after its clone; a
/// caller whose run failed before any clone calls it so the queued work still happens
/// (e.g. a collector thread that must drain and finish).
pub fn run_after_clone_hooks() {
    let hooks = std::mem::take(&mut *AFTER_CLONE.lock().unwrap_or_else(|e| e.into_inner()));
    for hook in hooks {
        hook();
    }
}

/// Clones `init` into new namespaces. It waits for [`Sandbox::release`], runs `setup` inside
/// the namespaces (as root of the new user namespace, or real root), then starts the command.
///
/// # Safety of the fork
/// The caller must be single-threaded: the child is a copy of this process with only the
/// calling thread, so a lock held by another thread would never be released.
pub fn spawn<F>(spec: &Spec, setup: F) -> Result<Sandbox, SpawnError>
where
    F: FnOnce() -> Result<(), String>,
{
    let (go_rx, go_tx) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    let (report_rx, report_tx) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    // Prepared before the fork so the child allocates as little as possible.
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| CString::new("?").unwrap()))
        .collect();

    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWNS;
    if spec.namespaces.user {
        flags |= libc::CLONE_NEWUSER;
    }
    let ret = match &spec.cgroup {
        // SAFETY: clone3 without a stack behaves like fork(2) (clone(2), "clone3"); the
        // caller guarantees the process is single-threaded; `args` outlives the call.
        Some(cgroup) => unsafe {
            let args = CloneArgs {
                flags: flags as u64 | CLONE_INTO_CGROUP,
                exit_signal: libc::SIGCHLD as u64,
                cgroup: cgroup.as_raw_fd() as u64,
                ..CloneArgs::default()
            };
            libc::syscall(libc::SYS_clone3, &args, std::mem::size_of::<CloneArgs>())
        },
        // SAFETY: raw clone without a new stack behaves like fork(2); the caller guarantees
        // the process is single-threaded.
        None => unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_int>(),
                std::ptr::null_mut::<libc::c_int>(),
                0 as libc::c_ulong,
            )
        },
    };
    if ret < 0 {
        let errno = Errno::last();
        let hint = match (errno, spec.namespaces.user) {
            (Errno::EPERM | Errno::ENOSPC | Errno::EINVAL, true) => {
                ": unprivileged user namespaces look disabled; enable them with \
                 `sysctl -w kernel.unprivileged_userns_clone=1` (Debian) or \
                 `sysctl -w user.max_user_namespaces=15000`, or run with --root"
            }
            (Errno::EPERM, false) => ": --root needs root (run it through sudo)",
            _ => "",
        };
        return Err(SpawnError::Clone { hint, source: errno });
    }
    if ret == 0 {
        drop(go_tx);
        drop(report_rx);
        let code = init_main(go_rx, report_tx, spec, &argv, setup);
        // SAFETY: leave without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    drop(go_rx);
    drop(report_tx);
    run_after_clone_hooks();
    Ok(Sandbox {
        init: Pid::from_raw(ret as i32),
        go: Some(File::from(go_tx)),
        report: File::from(report_rx),
        status: None,
    })
}

/// `CLONE_INTO_CGROUP` (include/uapi/linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, include/uapi/linux/sched.h).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// `init`: runs in the child, never returns to the caller's code paths.
fn init_main<F>(go: OwnedFd, report: OwnedFd, spec: &Spec, argv: &[CString], setup: F) -> i32
where
    F: FnOnce() -> Result<(), String>,
{
    let mut report = File::from(report);
    // SAFETY: a plain prctl call.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // getppid() is 0 in a new pid namespace, so a parent that died before the prctl is
    // noticed here instead: its end of the `go` pipe is closed.
    let mut setup = Some(setup);
    let mut run_setup =
        |report: &mut File| match setup.take().map(|f| f().and_then(|()| remount_proc())) {
            Some(Err(msg)) => {
                let _ = report.write_all(&[MSG_SETUP_ERROR]);
                let _ = report.write_all(msg.as_bytes());
                false
            }
            _ => true,
        };
    // Early: the setup overlaps the parent's (veth, programs). It runs before the parent
    // has seen the child, so only setup that needs nothing from the parent may ask for it.
    // Then the command's process is forked at once too, and made ready to exec (see
    // `exec_command`): it waits for the release itself, so all that is left after it is
    // the exec.
    let mut go = Some(go);
    if spec.setup_before_release && !run_setup(&mut report) {
        return crate::exit::FAILURE;
    }
    if !spec.setup_before_release {
        let mut byte = [0u8; 1];
        if go.take().is_some_and(|go| File::from(go).read_exact(&mut byte).is_err()) {
            return crate::exit::FAILURE;
        }
        if !run_setup(&mut report) {
            return crate::exit::FAILURE;
        }
    }
    let (exec_rx, exec_tx) = match pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(report, "{}pipe: {e}", MSG_SETUP_ERROR as char);
            return crate::exit::FAILURE;
        }
    };
    // SAFETY: init is single-threaded.
    let command = unsafe { libc::fork() };
    if command < 0 {
        let _ = write!(report, "{}fork: {}", MSG_SETUP_ERROR as char, Errno::last());
        return crate::exit::FAILURE;
    }
    if command == 0 {
        drop(exec_rx);
        let errno = exec_command(spec, argv, go);
        let mut tx = File::from(exec_tx);
        let _ = tx.write_all(&errno.to_ne_bytes());
        // SAFETY: as above.
        unsafe { libc::_exit(if errno == libc::ENOENT { 127 } else { 126 }) };
    }
    drop((exec_tx, go));
    let mut errno = [0u8; 4];
    match File::from(exec_rx).read_exact(&mut errno) {
        // EOF: the pipe closed on a successful exec.
        Err(_) => {
            let _ = report.write_all(&[MSG_STARTED]);
        }
        Ok(()) => {
            let _ = report.write_all(&[MSG_EXEC_ERROR]);
            let _ = report.write_all(&errno);
            let _ = report.write_all(argv[0].as_bytes());
            let _ = waitpid(Pid::from_raw(command), None);
            return if i32::from_ne_bytes(errno) == libc::ENOENT { 127 } else { 126 };
        }
    }
    let raw = signals::init_loop(command);
    let _ = report.write_all(&[MSG_STATUS]);
    let _ = report.write_all(&raw.to_ne_bytes());
    ExitStatus::from_raw(raw).code()
}

/// A fresh /proc for the new pid namespace, so `ps` and `/proc/$$` agree with the command's
/// view of pids. Best effort: a host that masks parts of /proc refuses the mount, and the
/// command then sees the host's /proc, which only matters to tools that read it.
fn remount_proc() -> Result<(), String> {
    // SAFETY: mount(2) with static, NUL-terminated strings.
    unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC) as libc::c_ulong,
            std::ptr::null(),
        );
    }
    Ok(())
}

/// Makes every mount of the new mount namespace private, so nothing mounted for the command
/// (e.g. its resolv.conf) propagates back to the host (mount_namespaces(7), "Shared
/// subtrees"). Call it in `init`'s setup before the first mount.
pub fn make_mounts_private() -> Result<(), String> {
    // SAFETY: mount(2) with static, NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!("cannot make the mounts private: {}", Errno::last()));
    }
    Ok(())
}

/// Bind-mounts the file `src` over `dst` in the current mount namespace (the command's
/// view of `dst`; the host's is untouched).
pub fn bind_file(src: &std::ffi::CStr, dst: &std::ffi::CStr) -> Result<(), String> {
    // SAFETY: mount(2) with NUL-terminated paths.
    let rc = unsafe {
        libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
    };
    if rc != 0 {
        return Err(format!("cannot bind-mount {src:?} over {dst:?}: {}", Errno::last()));
    }
    Ok(())
}

/// In the command's process: drop credentials, restore signals, exec. Returns the errno on
/// failure.
///
/// With `go` (the command forked before the release, see `init_main`), everything but the
/// exec is done first, the program is looked up in `PATH` ([`resolve`]), and only then
/// does the process wait for the release on `go`: the fork, the credentials and the `PATH`
/// walk (an `execve` per directory before the right one: 0.25 ms for `true` with a usual
/// root `PATH`) are off the start-up's critical path. If the parent is gone instead, the
/// process exits without exec.
fn exec_command(spec: &Spec, argv: &[CString], go: Option<OwnedFd>) -> i32 {
    if go.is_none() {
        signals::reset_for_exec();
    }
    if let Some(terminal) = &spec.terminal {
        let fd = terminal.as_raw_fd();
        // SAFETY: plain syscalls on a descriptor we own, in the single-threaded child. A new
        // session makes the pty its controlling terminal (TIOCSCTTY), so ^C typed into it
        // signals the command, and programs opening /dev/tty get the pty.
        unsafe {
            if libc::setsid() < 0
                || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0
                || libc::dup2(fd, 0) < 0
                || libc::dup2(fd, 1) < 0
                || libc::dup2(fd, 2) < 0
            {
                return Errno::last_raw();
            }
            // The pty was opened by root (rootful): the user must be able to reopen it as
            // /dev/tty, as with a login terminal.
            if let Some(creds) = &spec.credentials {
                libc::fchown(fd, creds.uid, creds.gid);
            }
        }
    }
    if let Some(creds) = &spec.credentials {
        let groups: Vec<libc::gid_t> = creds.groups.clone();
        // SAFETY: plain credential syscalls; order matters (groups and gid before uid).
        unsafe {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(creds.gid, creds.gid, creds.gid) != 0
                || libc::setresuid(creds.uid, creds.uid, creds.uid) != 0
            {
                return Errno::last_raw();
            }
        }
    }
    for (k, v) in &spec.env {
        // SAFETY: single-threaded child before exec.
        unsafe { std::env::set_var(k, v) };
    }
    let Some(program) = argv.first() else { return libc::ENOENT };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    if let Some(go) = go {
        let path = resolve(program);
        let mut byte = [0u8; 1];
        if File::from(go).read_exact(&mut byte).is_err() {
            // SAFETY: leave the forked copy without running anything of the parent's.
            unsafe { libc::_exit(crate::exit::FAILURE) };
        }
        signals::reset_for_exec();
        if let Some(path) = path {
            // SAFETY: as below. On failure (a script without `#!`, say), execvp below
            // decides, as it would have without the lookup.
            unsafe { libc::execv(path.as_ptr(), ptrs.as_ptr()) };
        }
    }
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call.
    unsafe { libc::execvp(program.as_ptr(), ptrs.as_ptr()) };
    Errno::last_raw()
}

/// Where `execvp` would find `program`: the first `PATH` entry (glibc's default
/// `/bin:/usr/bin` without one) holding a regular file this process may execute. `None`
/// for a name with a `/` (executed as it is) or when there is no such file (`execvp` then
/// says why).
fn resolve(program: &std::ffi::CStr) -> Option<CString> {
    use std::os::unix::fs::MetadataExt;
    let name = program.to_bytes();
    if name.is_empty() || name.contains(&b'/') {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    path.as_bytes().split(|&b| b == b':').find_map(|dir| {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let candidate = CString::new([dir, b"/", name].concat()).ok()?;
        let meta = std::fs::metadata(std::ffi::OsStr::from_bytes(candidate.to_bytes())).ok()?;
        // SAFETY: access check on a NUL-terminated path, with this process's effective ids
        // (the command's, after the credentials above).
        let executable = unsafe {
            libc::faccessat(libc::AT_FDCWD, candidate.as_ptr(), libc::X_OK, libc::AT_EACCESS)
        } == 0;
        (meta.file_type().is_file() && meta.mode() & 0o111 != 0 && executable).then_some(candidate)
    })
}
