//! Configuration of the presence service, built by the binary (or a test).

use std::path::PathBuf;
use std::time::Duration;

/// Where last-seen times live and how presence and typing are timed.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// The SQLite file holding last-seen times and privacy choices (the
    /// embedded mode's `presence.db`).
    pub db_path: PathBuf,
    /// A user is online while one of their connections heartbeated within it
    /// (DESIGN.md section 7: clients heartbeat every 5 s, the window is 15 s, so
    /// two lost heartbeats are tolerated). Also the least time between two
    /// store writes of one user's last seen.
    pub window: Duration,
    /// A "typing" that is neither renewed nor stopped ends after it.
    pub typing_ttl: Duration,
    /// Typing events accepted per user per minute (a token bucket of this size,
    /// refilled at this rate).
    pub typing_per_minute: u32,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            db_path: PathBuf::from("presence.db"),
            window: Duration::from_secs(15),
            typing_ttl: Duration::from_secs(6),
            typing_per_minute: 60,
        }
    }
}

impl PresenceConfig {
    /// Returns the first problem of the configuration, if any.
    pub(crate) fn problem(&self) -> Option<&'static str> {
        if self.window.is_zero() {
            return Some("presence window must be positive");
        }
        if self.typing_ttl.is_zero() {
            return Some("typing ttl must be positive");
        }
        if self.typing_per_minute == 0 {
            return Some("typing rate must be at least 1 per minute");
        }
        None
    }

    /// Returns how often the sweeper runs: a fifth of the shorter timer, so
    /// that a silent connection or a forgotten "typing" outlives its deadline
    /// by at most a fifth; at least 100 ms, so that a tiny window does not
    /// busy-loop.
    pub(crate) fn sweep_period(&self) -> Duration {
        (self.window.min(self.typing_ttl) / 5).max(Duration::from_millis(100))
    }
}
