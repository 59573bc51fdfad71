//! The `confab` binary: `confab serve` runs the server, `confab client` talks to one.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The process's allocator, SQLite's included (`confab_common::db` routes
/// SQLite's allocations to it): mimalloc rather than the C library's, built
/// without transparent huge pages (`no_thp`), which took 2 MiB pages for its
/// arenas and cost idle connections twice the memory.
///
/// Measured with `confab-bench one-to-one` over WebSocket (200 pairs, fresh
/// store, one server per build, two rounds in alternating order, same bench
/// binary), glibc → mimalloc: server CPU per message at 12,000 msg/s
/// 86.0 / 86.8 → 79.9 / 77.3 µs; at 16,000 offered, 14,126 / 15,547 msg/s
/// delivered with p99 2,675 / 769 ms → 15,976 / 15,980 with p99 65 / 101 ms;
/// at 20,000 offered 15,238 / 13,924 → 18,130 / 18,662 msg/s. glibc's malloc
/// and free were a sixth of the message writer's samples and a tenth of the
/// tokio workers'. Idle WebSockets (`confab-bench connections`, 5,000): 7.6 /
/// 7.9 → 6.2 / 5.5 KB of RSS each. The fixed cost grows: 20 MB of RSS after
/// start → 41 MB (35 MB 15 s later: mimalloc gives freed memory, such as the
/// startup hash's 19 MiB, back to the system after a delay).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod client;
mod migrate;
mod serve;

/// Confab: a real-time chat backend.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the server (by default every role in one process, SQLite storage).
    Serve(serve::ServeArgs),
    /// A command-line chat client.
    Client(client::ClientArgs),
    /// Creates or updates the PostgreSQL schema of the distributed mode.
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("confab: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Client(args) => runtime.block_on(client::run(args)),
        Command::Migrate(args) => runtime.block_on(migrate::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("confab: {error:#}");
            ExitCode::FAILURE
        }
    }
}
