//! llmproxyd entry point (startup): parse flags, hand over to `app::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    llmproxy::app::run(llmproxy::cli::Cli::parse())
}
