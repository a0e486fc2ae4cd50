use std::process::ExitCode;

use childflow::{cli, exit, run, sandbox};
use clap::Parser;

/// Large packet buffers from a huge-page arena (see `childflow::arena` for why).
#[global_allocator]
static ALLOCATOR: childflow::arena::Allocator = childflow::arena::Allocator;

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask (see sandbox::signals).
    if let Err(e) = sandbox::signals::block() {
        eprintln!("childflow: cannot block signals: {e}");
        return ExitCode::from(exit::FAILURE as u8);
    }
    let args = match cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { exit::FAILURE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let code = match run::main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("childflow: error: {e:#}");
            e.downcast_ref::<sandbox::SpawnError>().map_or(exit::FAILURE, |e| e.exit_code())
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
