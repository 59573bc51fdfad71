//! The command-line chat client (being written).

use std::process::ExitCode;

/// Arguments of `confab client`.
#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {}

/// Runs the client.
pub(crate) async fn run(_args: ClientArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
