//! Configuration of the message service, built by the binary (or a test).

use std::path::PathBuf;

/// How the message service stores messages and batches commits.
#[derive(Debug, Clone)]
pub struct MessageConfig {
    /// The SQLite file holding messages and the per-user event sequences (the
    /// embedded mode's `messages.db`).
    pub db_path: PathBuf,
    /// Snowflake node id of this process, leased by the caller so that no two live
    /// processes share one (DESIGN.md section 3).
    pub node_id: u16,
    /// Largest accepted message text, in bytes of UTF-8.
    pub max_text_bytes: usize,
    /// Most sends committed in one transaction: bounds the latency one fsync adds
    /// to the last sender of a batch.
    pub max_batch: usize,
}

impl Default for MessageConfig {
    fn default() -> Self {
        Self {
            db_path: PathBuf::from("messages.db"),
            node_id: 0,
            max_text_bytes: 16 * 1024,
            max_batch: 512,
        }
    }
}
