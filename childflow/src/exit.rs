//! childflow's own exit codes (the command's code is passed through otherwise).
//!
//! Same convention as `env(1)`, `timeout(1)` and container runtimes, so scripts can tell
//! childflow's failures from the command's.

/// childflow itself failed: bad arguments, missing privileges or kernel features, an
/// unwritable output.
pub const FAILURE: i32 = 125;
/// The command was found but could not be executed.
pub const CANNOT_EXECUTE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;
