//! Finding and running the real `childflow` binary, as root or as the non-root test user.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The non-root user `cargo xtask setup` creates for the rootless tests.
pub const TEST_USER: &str = "childflow-test";

/// The binary under test: `$CHILDFLOW_BIN` (set by `cargo xtask test`), else the debug
/// binary next to this test executable.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHILDFLOW_BIN") {
        return PathBuf::from(path);
    }
    // target/debug/deps/<test>-<hash> → target/debug/childflow
    let exe = std::env::current_exe().expect("current_exe");
    let path = exe.parent().and_then(Path::parent).expect("test exe in target/debug/deps");
    let bin = path.join("childflow");
    assert!(
        bin.exists(),
        "{} does not exist: build it with `cargo build -p childflow` (or run `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// A `Command` for the childflow binary, run as the current user.
pub fn childflow() -> Command {
    Command::new(binary())
}

/// A `Command` for the childflow binary run as the unprivileged test user.
///
/// The binary is copied once into a world-readable temporary directory, since the user may
/// not be able to traverse the build tree.
pub fn childflow_as_test_user() -> Command {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    let bin = COPY.get_or_init(user_readable_copy);
    let user = nix::unistd::User::from_name(TEST_USER)
        .expect("look up test user")
        .unwrap_or_else(|| panic!("user {TEST_USER} is missing: run `cargo xtask setup`"));
    let mut cmd = Command::new(bin);
    cmd.uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .env("HOME", "/")
        // root's PATH may name directories the user cannot search (execvp then says EACCES).
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("USER", TEST_USER);
    // std drops root's supplementary groups itself when it switches uid from root.
    cmd
}

/// A copy of the binary the test user can run: one per build (named by size and mtime) in
/// a fixed directory, made atomically, so repeated and parallel test runs share it instead
/// of leaving a copy each. Copies of other builds are removed only once they are an hour
/// old: another suite (a developer's second worktree) may still be starting commands from
/// its copy, and a path removed under it fails its next exec.
fn user_readable_copy() -> PathBuf {
    let src = binary();
    let meta = std::fs::metadata(&src).expect("stat childflow");
    let mtime = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap();
    let dir = std::env::temp_dir().join("childflow-test-bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join(format!("childflow-{}-{}", meta.len(), mtime.as_nanos()));
    if !copy.exists() {
        let stale = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for old in std::fs::read_dir(&dir).unwrap().flatten() {
            if old.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < stale) {
                let _ = std::fs::remove_file(old.path());
            }
        }
        let tmp = dir.join(format!(".partial-{}", std::process::id()));
        std::fs::copy(&src, &tmp).expect("copy childflow for the test user");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &copy).unwrap();
    }
    copy
}

/// A `Command` for a tool the tests need, failing clearly when setup has not installed it.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
        .unwrap_or(false);
    assert!(found, "{name} is not installed: run `cargo xtask setup`");
    Command::new(name)
}
