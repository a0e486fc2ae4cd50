//! `--tls-keylog`: a private key log file the command's TLS libraries append to (through
//! `SSLKEYLOGFILE`), followed by childflow so the secrets can go into Decryption Secrets
//! Blocks.
//!
//! Owns the file and its private directory (mode 0700, removed on drop: the secrets end up
//! in the capture, not lying around in /tmp). Invariants: [`Keylog::poll`] only ever returns
//! whole lines (a TLS library writing a line in two `write`s is not split into two DSBs with
//! half a line each); a file that shrinks (the command truncated it) is read again from the
//! start.

use std::{
    fs::{self, File},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Errors setting up the key log.
#[derive(Debug, thiserror::Error)]
pub enum KeylogError {
    /// The private directory could not be created.
    #[error("failed to create the TLS key log directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The key log file could not be created or handed to the command's user.
    #[error("failed to create the TLS key log {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The key log file and how far it has been read.
#[derive(Debug)]
pub struct Keylog {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Bytes read from the file so far, including `partial`.
    offset: u64,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
}

impl Keylog {
    /// Creates an empty key log in a fresh private directory under `parent`, owned by
    /// `owner` (uid, gid) when given, so a command that runs as another user can write it.
    pub fn create(parent: &Path, owner: Option<(u32, u32)>) -> Result<Keylog, KeylogError> {
        let unique = format!(
            "childflow-keylog-{}-{}",
            std::process::id(),
            crate::event::now_unix_nanos() % 1_000_000_000
        );
        let dir = parent.join(unique);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| KeylogError::Dir { path: dir.clone(), source })?;
        let path = dir.join("sslkeylog.txt");
        let made = (|| {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
            Ok(file)
        })();
        match made {
            Ok(file) => Ok(Keylog { dir, path, file, offset: 0, partial: Vec::new() }),
            Err(source) => {
                let _ = fs::remove_dir_all(&dir);
                Err(KeylogError::File { path, source })
            }
        }
    }

    /// The file to give the command as `SSLKEYLOGFILE`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the whole lines appended since the last call (empty if none). A read error is
    /// returned; the key log then simply yields nothing more.
    pub fn poll(&mut self) -> io::Result<Vec<u8>> {
        let len = self.file.metadata()?.len();
        if len < self.offset {
            // Truncated (a program that opened it without O_APPEND): start over.
            self.offset = 0;
            self.partial.clear();
            self.file.seek(SeekFrom::Start(0))?;
        }
        if len == self.offset {
            return Ok(Vec::new());
        }
        let mut data = std::mem::take(&mut self.partial);
        let before = data.len();
        (&self.file).take(len - self.offset).read_to_end(&mut data)?;
        self.offset += (data.len() - before) as u64;
        match data.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                self.partial = data.split_off(end + 1);
                Ok(data)
            }
            None => {
                self.partial = data;
                Ok(Vec::new())
            }
        }
    }
}

impl Drop for Keylog {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = fs::OpenOptions::new().append(true).open(path).expect("open key log");
        f.write_all(bytes).expect("append to key log");
    }

    #[test]
    fn poll_returns_only_whole_new_lines() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut log = Keylog::create(tmp.path(), None).expect("create key log");
        assert_eq!(log.poll().unwrap(), b"");
        append(log.path(), b"CLIENT_RANDOM aa bb\nSERVER_HANDSHAKE_TRAFFIC_SECRET c");
        assert_eq!(log.poll().unwrap(), b"CLIENT_RANDOM aa bb\n");
        assert_eq!(log.poll().unwrap(), b"");
        append(log.path(), b"c dd\n");
        assert_eq!(log.poll().unwrap(), b"SERVER_HANDSHAKE_TRAFFIC_SECRET cc dd\n");
    }

    #[test]
    fn a_truncated_log_is_read_again_from_the_start() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut log = Keylog::create(tmp.path(), None).expect("create key log");
        append(log.path(), b"A 1 2\nB 3 4\n");
        assert_eq!(log.poll().unwrap(), b"A 1 2\nB 3 4\n");
        fs::write(log.path(), b"C 5\n").expect("truncate key log");
        assert_eq!(log.poll().unwrap(), b"C 5\n");
    }

    #[test]
    fn the_directory_is_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        let log = Keylog::create(tmp.path(), None).expect("create key log");
        let dir = log.path().parent().unwrap().to_path_buf();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(log);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
