//! uid/gid maps for the rootless sandbox's user namespace.
//!
//! The command keeps the invoking user's ids inside the namespace (`id` prints what it
//! prints outside), so it looks like a normal system; `init` still holds every capability
//! in the namespace until it execs the command, which is what the setup needs.
//! An unprivileged process may map exactly its own uid and gid (after denying setgroups),
//! which needs no helper (user_namespaces(7), "Defining user and group ID mappings").

use std::fs;

use nix::unistd::{Gid, Pid, Uid};

/// Writes a one-to-one map of the caller's own uid and gid into `pid`'s user namespace.
pub fn map_self(pid: Pid) -> Result<(), String> {
    let uid = Uid::current().as_raw();
    let gid = Gid::current().as_raw();
    let proc = format!("/proc/{pid}");
    let write = |file: &str, content: String| {
        fs::write(format!("{proc}/{file}"), &content)
            .map_err(|e| format!("cannot write {proc}/{file} ({}): {e}", content.trim()))
    };
    write("setgroups", "deny\n".into())?;
    write("uid_map", format!("{uid} {uid} 1\n"))?;
    write("gid_map", format!("{gid} {gid} 1\n"))
}

/// Maps the caller's uid and gid into `pid`'s user namespace: directly ([`map_self`]) or,
/// where the kernel refuses that, with the setuid helpers `newuidmap`/`newgidmap` (package
/// `uidmap`), which consult `/etc/subuid` and `/etc/subgid`.
pub fn map_user(pid: Pid) -> Result<(), String> {
    let direct = match map_self(pid) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    map_with_helpers(pid).map_err(|helper| {
        format!(
            "{direct}; the newuidmap/newgidmap fallback failed too: {helper} \
             (install the `uidmap` package and give your user a range in /etc/subuid and /etc/subgid)"
        )
    })
}

fn map_with_helpers(pid: Pid) -> Result<(), String> {
    let uid = Uid::current().as_raw().to_string();
    let gid = Gid::current().as_raw().to_string();
    let pid = pid.to_string();
    for (helper, id) in [("newuidmap", &uid), ("newgidmap", &gid)] {
        let status = std::process::Command::new(helper)
            .args([pid.as_str(), id.as_str(), id.as_str(), "1"])
            .status()
            .map_err(|e| format!("cannot run {helper}: {e}"))?;
        if !status.success() {
            return Err(format!("{helper} {pid} {id} {id} 1 failed ({status})"));
        }
    }
    Ok(())
}
