//! The `packenvd` binary: parses the command line and hands it to the library
//! ([`packenvd::cli::main`]), which loads the configuration, sets up logging and runs the
//! command. `packenvd __supervise ...` is the step supervisor the daemon starts for every
//! installer step ([`packenv_core::supervise`]); it is answered before anything else, so a
//! step pays for no configuration or logging set-up.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "__supervise") {
        packenv_core::supervise::main(&args[2..]);
    }
    packenvd::cli::main(packenvd::cli::Cli::parse())
}
