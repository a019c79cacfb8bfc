//! The `sessiond` binary: parse the command line, set up logging, hand over to
//! the library, and turn the result into an exit code.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sessiond::cli::Cli::parse();
    sessiond::tls::install_default_provider();
    // The demo prints a line per pass of its own; its logs default to warnings.
    let default_filter = if matches!(cli.command, sessiond::cli::Command::Demo(_)) { "warn" } else { "info" };
    sessiond::logging::init_with_default(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessiond: cannot start the async runtime: {e}");
            return ExitCode::from(sessiond::cli::EXIT_FAILED);
        }
    };
    runtime.block_on(sessiond::cli::dispatch(cli))
}
