//! The `confab` binary: `confab serve` runs the server, `confab client` talks to one.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
