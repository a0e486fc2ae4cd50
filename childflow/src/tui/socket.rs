//! The run's socket, for `childflow attach` and `childflow ps`.
//!
//! Each run listens on `<dir>/<pid>.sock`, where `<dir>` is `$XDG_RUNTIME_DIR/childflow`, else
//! `/run/user/<uid>/childflow`, else `/tmp/childflow-<uid>`: a directory of mode 0700 owned by
//! the user, so only they can connect (and a peer of another uid is refused all the same,
//! checked with `SO_PEERCRED`). The stream is JSON lines:
//! 1. `{"type":"hello","version":1,"run":{...}}` (all `ps` reads);
//! 2. `{"type":"snapshot","snapshot":{...}}` at most every [`SEND_EVERY`] while the snapshot
//!    changes, the last one with `run.ended` set.
//!
//! Every client has a thread of its own that reads the snapshot cell; a slow client only
//! delays its own stream, never the collector or the other views.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{DirBuilderExt, MetadataExt, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    launch::Launcher,
    model::{RunInfo, Snapshot, SnapshotCell},
};

/// Version of the stream's format.
pub const VERSION: u32 = 1;
/// The shortest time between two snapshots sent to one client.
pub const SEND_EVERY: Duration = Duration::from_millis(250);

/// Errors of the run socket and its clients.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The runtime directory could not be made or is not private.
    #[error("failed to prepare the run directory {path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    /// `bind` or `listen` failed.
    #[error("failed to listen on {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    /// No live run to attach to.
    #[error("no live childflow run of this user (looked in {0})")]
    NoRuns(PathBuf),
    /// The named run does not exist.
    #[error("no live run `{run}` (see `childflow ps`; looked in {dir})")]
    NoSuchRun { run: String, dir: PathBuf },
    /// Connecting or reading failed.
    #[error("failed to read run {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The stream is not what a run sends.
    #[error("run {path} sent something unexpected: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

/// One line of the stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello { version: u32, run: RunInfo },
    Snapshot { snapshot: Snapshot },
}

/// The directory of this user's run sockets (not created).
pub fn runtime_dir() -> PathBuf {
    let uid = nix::unistd::getuid().as_raw();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("childflow");
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    if run_user.is_dir() {
        return run_user.join("childflow");
    }
    PathBuf::from(format!("/tmp/childflow-{uid}"))
}

/// Creates `dir` (0700) if needed and checks that it is ours, private and not a symlink:
/// in `/tmp` another user could have made it first.
fn private_dir(dir: &Path) -> Result<(), SocketError> {
    let err = |reason: String| SocketError::Dir { path: dir.to_owned(), reason };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    if meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(err(format!("owned by uid {}, not by us", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// A run's listening socket; removes its file when dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Listens on `<dir>/<pid>.sock`; the thread serving `cell` to every client is queued
    /// on `launcher`.
    pub fn start(
        dir: &Path,
        cell: Arc<SnapshotCell>,
        launcher: &mut Launcher,
    ) -> Result<Self, SocketError> {
        private_dir(dir)?;
        let path = dir.join(format!("{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path); // a stale socket of a recycled pid
        let listener = UnixListener::bind(&path)
            .map_err(|source| SocketError::Bind { path: path.clone(), source })?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let (stop2, clients2) = (stop.clone(), clients.clone());
        // Detached: it blocks in accept until the process exits.
        let _ = launcher.spawn("run-socket", move || {
            let me = nix::unistd::getuid().as_raw();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let peer =
                    nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials);
                if !peer.is_ok_and(|c| c.uid() == me || c.uid() == 0) {
                    continue;
                }
                let (cell, stop) = (cell.clone(), stop2.clone());
                if let Ok(handle) =
                    std::thread::Builder::new().name("run-socket-client".into()).spawn(move || {
                        let _ = serve(conn, &cell, &stop);
                    })
                {
                    clients2.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
                }
            }
        });
        Ok(Self { path, stop, clients })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets every client receive the last snapshot, removes the socket.
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
        self.stop.store(true, Ordering::Relaxed);
        let clients = std::mem::take(&mut *self.clients.lock().unwrap_or_else(|e| e.into_inner()));
        for client in clients {
            let _ = client.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send(out: &mut impl Write, msg: &Message) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, msg)?;
    out.write_all(b"\n")?;
    out.flush()
}

fn serve(conn: UnixStream, cell: &SnapshotCell, stop: &AtomicBool) -> std::io::Result<()> {
    // A client that stops reading is dropped rather than holding up the end of the run.
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut out = std::io::BufWriter::new(conn);
    send(&mut out, &Message::Hello { version: VERSION, run: cell.latest().run.clone() })?;
    let mut sent = None;
    loop {
        // Read the flag before the snapshot: the final snapshot is published before `stop`.
        let stopping = stop.load(Ordering::Relaxed);
        if sent != Some(cell.seq()) {
            sent = Some(cell.seq());
            let snapshot = (*cell.latest()).clone();
            let ended = snapshot.run.ended.is_some();
            send(&mut out, &Message::Snapshot { snapshot })?;
            if ended {
                return Ok(());
            }
        }
        if stopping {
            return Ok(());
        }
        std::thread::sleep(SEND_EVERY);
    }
}

/// A live run, as `ps` lists it.
#[derive(Debug)]
pub struct RunEntry {
    pub id: String,
    pub path: PathBuf,
    pub run: RunInfo,
}

/// The live runs in `dir`, oldest first. Sockets nobody listens on any more (a run that
/// was killed) are removed.
pub fn list(dir: &Path) -> Vec<RunEntry> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut runs: Vec<RunEntry> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let id = path.file_name()?.to_str()?.strip_suffix(".sock")?.to_owned();
            match hello(&path) {
                Ok(run) => Some(RunEntry { id, path, run }),
                Err(SocketError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    let _ = std::fs::remove_file(&path);
                    None
                }
                Err(_) => None,
            }
        })
        .collect();
    runs.sort_by_key(|r| r.run.started);
    runs
}

fn connect(path: &Path) -> Result<BufReader<UnixStream>, SocketError> {
    let conn = UnixStream::connect(path)
        .map_err(|source| SocketError::Read { path: path.to_owned(), source })?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    Ok(BufReader::new(conn))
}

fn read_message(reader: &mut impl BufRead, path: &Path) -> Result<Option<Message>, SocketError> {
    let mut line = String::new();
    let n = reader
        .read_line(&mut line)
        .map_err(|source| SocketError::Read { path: path.to_owned(), source })?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| SocketError::Protocol { path: path.to_owned(), reason: e.to_string() })
}

/// The run behind the socket at `path`.
pub fn hello(path: &Path) -> Result<RunInfo, SocketError> {
    let mut reader = connect(path)?;
    match read_message(&mut reader, path)? {
        Some(Message::Hello { version: VERSION, run }) => Ok(run),
        other => Err(SocketError::Protocol {
            path: path.to_owned(),
            reason: format!("expected hello, got {other:?}"),
        }),
    }
}

/// Picks the run to attach to: by id (pid), or the newest.
pub fn find(dir: &Path, run: Option<&str>) -> Result<RunEntry, SocketError> {
    let mut runs = list(dir);
    match run {
        Some(id) => runs
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| SocketError::NoSuchRun { run: id.to_owned(), dir: dir.to_owned() }),
        None => runs.pop().ok_or_else(|| SocketError::NoRuns(dir.to_owned())),
    }
}

/// Follows the run at `path`, publishing what it sends into `cell` until the run ends or
/// the connection closes.
pub fn follow(path: &Path, cell: &SnapshotCell) -> Result<(), SocketError> {
    let mut reader = connect(path)?;
    // The run may be idle for long: no read timeout once connected.
    let _ = reader.get_ref().set_read_timeout(None);
    while let Some(msg) = read_message(&mut reader, path)? {
        match msg {
            Message::Hello { version, .. } if version != VERSION => {
                return Err(SocketError::Protocol {
                    path: path.to_owned(),
                    reason: format!("stream version {version}, this childflow reads {VERSION}"),
                });
            }
            Message::Hello { .. } => {}
            Message::Snapshot { snapshot } => {
                let ended = snapshot.run.ended.is_some();
                cell.publish(snapshot);
                if ended {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tui::model::{RunEnd, fixtures::*};

    #[test]
    fn a_client_gets_hello_snapshots_and_the_end_and_ps_lists_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("childflow");
        let cell = SnapshotCell::new(snapshot(1, vec![established_flow(1)]));
        let mut launcher = Launcher::default();
        let server = Server::start(&runs, cell.clone(), &mut launcher).expect("listen");
        launcher.launch();
        let mode = std::fs::metadata(&runs).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700, "the run directory is private");

        let listed = list(&runs);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, std::process::id().to_string());
        assert_eq!(listed[0].run.backend, "rootless");

        let mut last = snapshot(2, vec![grown(established_flow(1), 2)]);
        last.run.ended = Some(RunEnd { ts: T0 + 2 * SEC, code: 0, status: "exit code 0".into() });
        cell.publish(last);
        let local = SnapshotCell::new(Snapshot::default());
        follow(server.path(), &local).expect("follow the run");
        assert!(local.latest().run.ended.is_some());
        assert_eq!(local.latest().flows[0].bytes_in, 40_000);

        let path = server.path().to_owned();
        server.finish();
        assert!(!path.exists(), "the socket is removed at the end");
        assert!(matches!(find(&runs, None), Err(SocketError::NoRuns(_))));
    }

    #[test]
    fn a_stale_socket_is_removed_by_ps() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("4242.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        assert!(list(dir.path()).is_empty());
        assert!(!stale.exists());
    }
}
