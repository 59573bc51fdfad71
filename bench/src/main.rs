//! `confab-bench`: drives a running Confab through its public gRPC API, the way
//! real clients do, and reports latency percentiles from HDR histograms.
//!
//! - [`one_to_one`]: pairs chatting at a scheduled rate (open loop).
//! - [`group`]: one group of G connected members; time until the last member
//!   has each message.
//! - [`history`]: pages of the newest 50 messages of a long conversation.
//! - [`reconnect`]: every receiver drops at once and resumes from its cursor
//!   while traffic goes on.
//! - [`connections`]: many idle, heartbeating connections (gRPC or WebSocket,
//!   held by worker processes); the server's memory per connection.
//! - [`client`]: live connections, external-token users, and the servers
//!   (`--server` may name several gateways of one cluster).
//! - [`report`]: the JSON result and Markdown report every run writes.
//! - [`suite`]: the runs of one `--out` directory together: their table and
//!   charts ([`plot`]), redrawn after every run; `summary` writes them to
//!   `summary.md`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::client::Servers;

mod client;
mod connections;
mod group;
mod history;
mod one_to_one;
mod plot;
mod procfs;
mod reconnect;
mod report;
mod suite;

/// The load generator shares the machine with the server it measures, so it
/// allocates with mimalloc as the server does: one-to-one at 12,000 msg/s for
/// 20 s (200 pairs, set-up included) took 7.13 / 6.88 s of CPU with glibc's
/// malloc, 6.77 / 6.54 s with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for Confab.
#[derive(Debug, Parser)]
struct Cli {
    /// The server's gRPC address; several (comma-separated, or the flag
    /// repeated) are gateways of one cluster, and clients spread over them.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7600"
    )]
    server: Vec<String>,
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
    /// Not a scenario: one worker process of `connections --workers`, started by it.
    #[command(name = connections::worker::SUBCOMMAND, hide = true)]
    ConnectionsWorker(connections::worker::WorkerArgs),
    /// Not a scenario: writes `summary.md` (machine, one row per run, charts)
    /// from the results already in `--out`.
    Summary,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let servers = Servers::new(cli.server)?;
    let server = &servers;
    let result = match cli.scenario {
        Scenario::OneToOne(args) => one_to_one::run(server, args).await?,
        Scenario::Group(args) => group::run(server, args).await?,
        Scenario::History(args) => history::run(server, args).await?,
        Scenario::Reconnect(args) => reconnect::run(server, args).await?,
        Scenario::Connections(args) => connections::run(server, args).await?,
        Scenario::ConnectionsWorker(args) => {
            if let Err(error) = connections::worker::run(server, args).await {
                // In one write, so that the errors of several workers (on the
                // parent's stderr) do not interleave.
                let line = format!("Error: {error:#}\n");
                let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
                std::process::exit(1);
            }
            return Ok(());
        }
        Scenario::Summary => {
            let path = suite::write(&cli.out)?;
            println!("{}", std::fs::read_to_string(&path)?);
            eprintln!("summary written to {}", path.display());
            return Ok(());
        }
    };
    let path = result.with_servers(&servers).write(&cli.out)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(args: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(["confab-bench"].iter().chain(args)).unwrap();
        cli.server
    }

    #[test]
    fn the_connections_worker_is_a_hidden_subcommand() {
        use clap::CommandFactory as _;
        let cli = Cli::try_parse_from([
            "confab-bench",
            "--server",
            "http://a:1,http://b:2",
            connections::worker::SUBCOMMAND,
            "--worker",
            "1",
            "--first",
            "3",
            "--connections",
            "3",
            "--run-id",
            "42",
            "--transport",
            "ws",
            "--heartbeat",
            "5",
            "--concurrency",
            "32",
            "--external-secret",
            "s",
        ])
        .unwrap();
        assert!(matches!(cli.scenario, Scenario::ConnectionsWorker(_)));
        assert_eq!(cli.server, ["http://a:1", "http://b:2"]);
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("connections"), "{help}");
        assert!(!help.contains(connections::worker::SUBCOMMAND), "{help}");
    }

    #[test]
    fn one_server_by_default() {
        assert_eq!(servers(&["one-to-one"]), ["http://127.0.0.1:7600"]);
        assert_eq!(
            servers(&["--server", "http://a:1", "one-to-one"]),
            ["http://a:1"]
        );
    }

    #[test]
    fn several_servers_comma_separated_or_repeated_before_or_after_the_scenario() {
        let both = ["http://a:1", "http://b:2"];
        assert_eq!(
            servers(&["--server", "http://a:1,http://b:2", "one-to-one"]),
            both
        );
        assert_eq!(
            servers(&[
                "--server",
                "http://a:1",
                "--server",
                "http://b:2",
                "one-to-one"
            ]),
            both
        );
        assert_eq!(
            servers(&[
                "one-to-one",
                "--server",
                "http://a:1",
                "--server=http://b:2"
            ]),
            both
        );
    }
}
