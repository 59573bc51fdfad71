//! End-to-end tests of the distributed mode: each test starts a [`Cluster`]
//! (every role in its own process of the real binary, a private nats-server, a
//! fresh PostgreSQL database) and drives it through real clients on both
//! gateways; the fault tests run a [`Load`] through a fault and check the
//! invariants of DESIGN.md section 13 after recovery.
//!
//! They need nats-server 2.10+ and PostgreSQL: `scripts/test` provides both.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use confab_proto::v1::Message;
use confab_tests::conn::Transport;
use confab_tests::load::{FaultMark, Load, LoadConfig, Outcome};
use confab_tests::{Cluster, Conn, Encoding, Role, Server};

mod chat;
mod faults;
mod harness;
mod presence;

/// Held by every test that starts processes: this machine has few cores, and
/// a fault must not coincide with another test's start-up.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Returns the next message event that is not a notice (group creation and
/// membership changes come as notices).
async fn next_chat<T: Transport>(conn: &mut Conn<T>) -> Result<Message> {
    loop {
        let (_, message) = conn.next_message().await?;
        if message.notice.is_none() {
            return Ok(message);
        }
    }
}

/// Runs `load` to its end, checks the invariants and prints the counts (and,
/// after a fault, how long delivery stalled).
async fn finish_and_check(
    test: &str,
    cluster: &Cluster,
    load: Load,
    mark: Option<FaultMark>,
) -> Result<Outcome> {
    let outcome = load.finish(cluster.live_gateway()?).await?;
    let report = outcome.check()?;
    println!("{test}: {report}");
    if let Some(mark) = mark {
        println!("{test}: {}", outcome.stall(mark));
    }
    Ok(outcome)
}
