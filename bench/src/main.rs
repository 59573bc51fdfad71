//! `confab-bench`: drives a running Confab through its public gRPC API, the way
//! real clients do, and reports latency percentiles from HDR histograms.
//!
//! - [`one_to_one`]: pairs chatting at a scheduled rate (open loop).
//! - [`group`]: one group of G connected members; time until the last member
//!   has each message.
//! - [`history`]: pages of the newest 50 messages of a long conversation.
//! - [`reconnect`]: every receiver drops at once and resumes from its cursor
//!   while traffic goes on.
//! - [`connections`]: many idle, heartbeating connections; the server's memory
//!   per connection.
//! - [`client`]: live connections and external-token users.
//! - [`report`]: the JSON result and Markdown report every run writes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod client;
mod connections;
mod group;
mod history;
mod one_to_one;
mod reconnect;
mod report;

/// Load generator for Confab.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's gRPC address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7600")]
    server: String,
    /// Where each run writes its JSON result and appends to `report.md`.
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Pairs of users exchanging messages at a target rate.
    OneToOne(one_to_one::Args),
    /// One group with every member connected: fan-out time of each message.
    Group(group::Args),
    /// Pages of the newest 50 messages of one long conversation.
    History(history::Args),
    /// All receivers drop at once and resume from their cursors under traffic.
    Reconnect(reconnect::Args),
    /// Idle authenticated connections held with heartbeats: memory per connection.
    Connections(connections::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let server = cli.server.as_str();
    let result = match cli.scenario {
        Scenario::OneToOne(args) => one_to_one::run(server, args).await?,
        Scenario::Group(args) => group::run(server, args).await?,
        Scenario::History(args) => history::run(server, args).await?,
        Scenario::Reconnect(args) => reconnect::run(server, args).await?,
        Scenario::Connections(args) => connections::run(server, args).await?,
    };
    let path = result.write(&cli.out)?;
    eprintln!("result written to {}", path.display());
    Ok(())
}

/// Returns a progress bar over `total` steps, drawn on stderr (hidden when
/// stderr is not a terminal).
fn progress(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
