//! The `holdclear` binary: parses the command line and hands over to the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = holdclear::cli::Cli::parse();
    holdclear::cli::main(cli)
}
