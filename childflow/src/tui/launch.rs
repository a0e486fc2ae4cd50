//! Starting the live views' threads only once the sandbox exists.
//!
//! `sandbox::spawn` forks with a raw `clone`: the child is a copy of this process taken at
//! that instant, with only the calling thread, and any lock another thread held then (the
//! allocator's, stdout's) stays locked in it forever. A dashboard drawing while the sandbox
//! is cloned hangs the sandbox's `init` on its first allocation (seen in testing: 2 runs
//! in 12 under load). So the views open their files, pty and socket before the command
//! starts, and queue their threads on a [`Launcher`] that runs right after the clone
//! (`sandbox::after_clone`).

use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

type Start = Box<dyn FnOnce() + Send>;

/// Threads waiting to be started. See the module documentation.
#[derive(Default)]
pub struct Launcher {
    pending: Vec<Start>,
}

/// A thread queued on a [`Launcher`]; it exists once the launcher ran.
pub struct Later<T> {
    slot: Arc<Mutex<Option<JoinHandle<T>>>>,
}

impl Launcher {
    /// Queues a thread named `name` running `f`.
    pub fn spawn<T, F>(&mut self, name: &str, f: F) -> Later<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let (name, filled) = (name.to_owned(), slot.clone());
        self.pending.push(Box::new(move || {
            match std::thread::Builder::new().name(name.clone()).spawn(f) {
                Ok(handle) => *filled.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
                Err(e) => tracing::warn!("failed to start the {name} thread: {e}"),
            }
        }));
        Later { slot }
    }

    /// Starts every queued thread.
    pub fn launch(self) {
        for start in self.pending {
            start();
        }
    }
}

impl<T> Later<T> {
    /// Waits for the thread; `None` if it never started (the command never did either).
    pub fn join(self) -> Option<std::thread::Result<T>> {
        let handle = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        handle.map(JoinHandle::join)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_run_only_once_launched() {
        let mut launcher = Launcher::default();
        let later = launcher.spawn("test", || 42);
        let never = Launcher::default().spawn("never", || 0);
        launcher.launch();
        assert_eq!(later.join().map(|r| r.unwrap()), Some(42));
        assert!(never.join().is_none());
    }
}
