//! End-to-end harness: runs the real `confab` binary and talks to it through real
//! clients, the way apps do.
//!
//! - [`server`]: [`Server`] spawns `confab serve` on port 0 with its own data dir,
//!   reads the bound address from its stdout, and can `kill9` and `restart` it.
//! - [`accounts`]: registering users, external-token users (cheap, for big
//!   groups), groups, and authenticated gRPC clients.
//! - [`conn`]: [`Conn`], one device's live connection over any transport:
//!   `hello`, `sync`, `send`, `delivered`, `mark_read`, `open_channel`,
//!   `next_event` (and `next_receipt`, `next_read_state`, `next_channel_post`),
//!   `expect_quiet` (a ping round trip with nothing before the pong), each
//!   bounded by a timeout.
//!   Presence and typing: `heartbeat`, `watch_presence` (the snapshot),
//!   `typing`, `next_presence`, `next_typing`.
//! - [`heartbeat`]: a connection that heartbeats on a timer while the test reads.
//! - [`grpc`]: the gRPC `Edge.Stream` transport; `close` ends a device cleanly.
//! - [`ws`]: the WebSocket transport, binary protobuf or proto3 JSON text.
//! - [`json`]: the proto3 JSON mapping of the frames, written by hand so that it
//!   checks the server's mapping instead of sharing it.
//! - [`http`]: a tiny HTTP/1.1 GET for `/metrics` and `/healthz`.
//! - [`cli`]: runs `confab client` processes with piped stdin and stdout.
//! - [`cluster`]: [`Cluster`], the distributed mode: every role in its own
//!   process, with a private nats-server and a fresh PostgreSQL database behind
//!   a [`proxy`]; `kill9`, `restart`, `nats_restart`, metrics, the fan-out owner.
//! - [`proxy`]: a TCP proxy a test can `cut` and `restore`.
//! - [`raw`]: raw TCP clients for attacks below HTTP (trickled headers, a
//!   half-sent upgrade, silence, a bare h2c preface).
//! - [`load`]: a bounded chat load of many devices that retry and resume, and
//!   record every ack and event.
//! - [`invariants`]: checks DESIGN.md section 13 over what a load recorded and
//!   the history read back.
//!
//! Waiting is always on an event (a line, a frame); timeouts only bound failures.

pub mod accounts;
pub mod cli;
pub mod cluster;
pub mod conn;
pub mod grpc;
pub mod grpc_web;
pub mod heartbeat;
pub mod http;
pub mod invariants;
pub mod json;
pub mod load;
pub mod proxy;
pub mod raw;
pub mod server;
pub mod ws;

use std::future::Future;
use std::time::Duration;

pub use accounts::{Account, PASSWORD};
pub use cluster::{Cluster, Role};
pub use conn::{Closed, Conn, Reply, Synced};
pub use grpc::GrpcConn;
pub use grpc_web::WebConn;
pub use heartbeat::Heartbeating;
pub use server::Server;
pub use ws::{Encoding, WsAuth, WsConn};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Runs `check` until it returns `Ok(true)`, at most for [`WAIT`].
///
/// For state that has no event to wait on (a metric being scraped); between
/// tries it yields for a few milliseconds.
///
/// # Errors
///
/// Fails with the last error, or when the condition never held.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let outcome = check().await;
        if let Ok(true) = outcome {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return match outcome {
                Err(error) => Err(error.context(format!("never true: {what}"))),
                Ok(_) => Err(anyhow::anyhow!("never true: {what}")),
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
