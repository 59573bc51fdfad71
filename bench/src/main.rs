//! `confab-bench`: drives a running Confab through its public gRPC API, the way
//! real clients do, and reports latency percentiles from HDR histograms.
//!
//! - [`one_to_one`]: pairs chatting at a scheduled rate (open loop).
//! - [`group`]: one group of G connected members; time until the last member
//!   has each message.
//! - [`client`]: live connections.

use clap::{Parser, Subcommand};

mod client;
mod group;
mod one_to_one;

/// Load generator for Confab.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's gRPC address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7600")]
    server: String,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Pairs of users exchanging messages at a target rate.
    OneToOne(one_to_one::Args),
    /// One group with every member connected: fan-out time of each message.
    Group(group::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::OneToOne(args) => one_to_one::run(&cli.server, args).await,
        Scenario::Group(args) => group::run(&cli.server, args).await,
    }
}
