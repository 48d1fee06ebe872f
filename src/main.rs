//! The `holdclear` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// jemalloc instead of the system's allocator: the worker spent about 30 %
/// of its CPU in glibc's malloc and free (docs/performance.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match holdclear::cli::Cli::try_parse() {
        Ok(cli) => holdclear::cli::main(cli),
        // --help and --version print and exit 0; a bad command line exits 64.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = e.print();
            ExitCode::from(holdclear::cli::EXIT_USAGE)
        }
    }
}
