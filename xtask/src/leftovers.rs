//! The leftover check: host state that childflow or its tests create, found still present.
//!
//! Everything of ours is named so it can be recognised here: network namespaces and links
//! start with `cf` (or `childflow`), nftables tables and cgroups contain `childflow`, kernel
//! programs start with `cf_`, pins (the benches' passing ones) under `/sys/fs/bpf/cf`.

use std::{fs, path::Path, process::Command};

/// Every piece of our host state that exists now, as "kind: name" lines.
pub fn scan() -> Vec<String> {
    let mut found = Vec::new();
    for ns in lines("ip", &["netns", "list"]) {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if ours(name) {
            found.push(format!("netns: {name}"));
        }
    }
    for link in lines("ip", &["-o", "link", "show"]) {
        // "7: cfh1@if6: <...>"
        let name = link.split(": ").nth(1).unwrap_or_default();
        let name = name.split('@').next().unwrap_or_default();
        if ours(name) {
            found.push(format!("link: {name}"));
        }
    }
    for table in lines("nft", &["list", "tables"]) {
        if table.contains("childflow") {
            found.push(format!("nftables: {table}"));
        }
    }
    find_dirs(Path::new("/sys/fs/cgroup"), 4, &mut found);
    for prog in lines("bpftool", &["prog", "show"]) {
        // "42: sched_cls  name cf_tc  tag ..."
        let mut words = prog.split_whitespace();
        if let Some(name) = words.by_ref().skip_while(|w| *w != "name").nth(1)
            && name.starts_with("cf_")
        {
            found.push(format!("bpf program: {}", prog.trim()));
        }
    }
    if let Ok(dir) = fs::read_dir("/sys/fs/bpf") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                found.push(format!("bpffs pin: /sys/fs/bpf/{name}"));
            }
        }
    }
    found
}

fn ours(name: &str) -> bool {
    name.starts_with("cf") || name.starts_with("childflow")
}

fn lines(cmd: &str, args: &[&str]) -> Vec<String> {
    match Command::new(cmd).args(args).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

fn find_dirs(dir: &Path, depth: u32, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        if !kind.is_dir() {
            continue;
        }
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains("childflow") {
            found.push(format!("cgroup: {}", path.display()));
        } else if depth > 1 {
            find_dirs(&path, depth - 1, found);
        }
    }
}
