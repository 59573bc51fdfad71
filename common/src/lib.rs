//! What every Confab service shares.
//!
//! - [`ids`]: Snowflake id generation (message, user and conversation ids).
//! - [`auth`]: JWT access and refresh tokens: minting ours, verifying ours and
//!   external ones.
//! - [`error`]: the small [`ErrorCode`] enum mapped to gRPC codes and HTTP statuses.
//! - [`bus`]: the live bus through which message-svc hands committed events to the
//!   gateway nodes that hold the recipients' devices.
//! - [`channel`]: the one channel type every internal gRPC client uses, in process
//!   or over a socket.
//! - [`nats_bus`]: the live bus of the distributed mode, over NATS (publisher
//!   and the gateway node's subscription).
//! - [`db`]: opening SQLite databases with the pragmas durability needs.
//! - [`telemetry`]: tracing subscriber and Prometheus recorder set-up.
//! - `testkit` (feature `testkit`): real nats-server and PostgreSQL for tests.

pub mod auth;
pub mod bus;
pub mod channel;
pub mod db;
pub mod error;
pub mod ids;
pub mod nats_bus;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::ErrorCode;

/// Returns the current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
