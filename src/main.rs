//! llmproxyd entry point (startup): parse flags, hand over to `app::run`.

use clap::Parser;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    llmproxy::app::run(llmproxy::cli::Cli::parse())
}
