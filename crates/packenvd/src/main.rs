//! The `packenvd` binary: parses the command line and hands it to the library
//! ([`packenvd::cli::main`]), which loads the configuration, sets up logging and runs the
//! command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    packenvd::cli::main(packenvd::cli::Cli::parse())
}
