//! The live dashboard (`--tui`, `attach`) and the live JSON-lines stream (`--events`).
//!
//! Shape (ratatui's Elm architecture): [`model::Snapshot`]s come in from the collector
//! through a [`model::SnapshotCell`]; [`app::App`] is the dashboard's whole state, changed
//! only by [`app::App::update`] with an [`app::Action`]; [`ui`] draws an `App` without
//! changing it. The runtime around them owns the terminal, the command's pty and the
//! clock, and is the only part that does I/O.
//!
//! The dashboard never slows the command: it reads the newest snapshot at most ten times a
//! second and skips whatever it missed; the collector never waits for it.

pub mod app;
pub mod attach;
pub mod dashboard;
pub mod demo;
pub mod events;
pub mod feed;
pub mod format;
pub mod history;
pub mod keys;
pub mod launch;
pub mod live;
pub mod model;
pub mod pty;
pub mod socket;
pub mod ui;
