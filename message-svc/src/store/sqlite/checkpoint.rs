//! Checkpoints of the message store's WAL, off the writer's path.
//!
//! SQLite checkpoints by default in the commit that takes the WAL past 1,000
//! pages: that commit then also copies the WAL's pages into the database file
//! and flushes the file, and every send of the group commit waits for it (under
//! one-to-one load, every few commits). The writer's connection turns that
//! off (`wal_autocheckpoint = 0`); this task checkpoints instead, on a
//! connection (and so a thread) of its own, while the writer goes on appending:
//! a `PASSIVE` checkpoint never blocks the writer, and the writer starts the WAL
//! over once a checkpoint has copied all of it. Checkpoints at most every
//! [`INTERVAL`] let a page written by many commits be copied once.
//!
//! A WAL that a passive checkpoint cannot catch up with (readers holding old
//! snapshots, a writer faster than the copy) is bounded: beyond [`RESTART_FRAMES`]
//! a `RESTART` checkpoint makes the writer wait until the WAL can start over.

use std::time::Duration;

use sqlx::sqlite::SqliteConnection;
use tokio::sync::{mpsc, watch};

/// The shortest time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(100);

/// WAL frames (pages) beyond which a checkpoint waits for the writer rather than
/// letting the WAL grow: 32,768 frames of 4 KiB, 128 MiB.
const RESTART_FRAMES: i64 = 32_768;

/// The writer's side: tells the checkpointer that the WAL has new frames.
#[derive(Debug)]
pub(super) struct Checkpoints {
    commits: mpsc::Sender<()>,
    /// Checkpoints completed; the tests wait on it.
    #[cfg_attr(not(test), allow(dead_code))]
    done: watch::Receiver<u64>,
}

impl Checkpoints {
    /// Starts the checkpointer on `conn` (a connection of its own to the
    /// store's file); it stops when this handle is dropped.
    pub(super) fn start(conn: SqliteConnection) -> Self {
        let (commits, wake) = mpsc::channel(1);
        let (done_tx, done) = watch::channel(0);
        tokio::spawn(run(conn, wake, done_tx));
        Self { commits, done }
    }

    /// Called after each commit; costs nothing when a checkpoint is due anyway.
    pub(super) fn committed(&self) {
        let _ = self.commits.try_send(());
    }

    /// Waits until `count` checkpoints have completed.
    #[cfg(test)]
    pub(super) async fn completed(&mut self, count: u64) {
        let _ = self.done.wait_for(|done| *done >= count).await;
    }
}

async fn run(mut conn: SqliteConnection, mut wake: mpsc::Receiver<()>, done: watch::Sender<u64>) {
    while wake.recv().await.is_some() {
        match checkpoint(&mut conn, RESTART_FRAMES).await {
            Ok(frames) => {
                metrics::gauge!("confab_message_wal_frames").set(frames as f64);
                done.send_modify(|count| *count += 1);
            }
            Err(error) => tracing::warn!(%error, "checkpoint of the message store failed"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
    // The last connection to close checkpoints what is left.
    let _ = sqlx::Connection::close(conn).await;
}

/// Copies the WAL into the database file, waiting for the writer when the WAL
/// holds more than `restart_frames`; returns the frames the WAL held.
async fn checkpoint(conn: &mut SqliteConnection, restart_frames: i64) -> Result<i64, sqlx::Error> {
    let (_busy, frames, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut *conn)
            .await?;
    if frames > restart_frames {
        // Counted, not logged: under a sustained overload this is every
        // checkpoint.
        metrics::counter!("confab_message_wal_restarts_total").increment(1);
        sqlx::query("PRAGMA wal_checkpoint(RESTART)")
            .execute(&mut *conn)
            .await?;
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use sqlx::ConnectOptions as _;

    use super::*;

    /// A complete checkpoint lets the next write start the WAL over; past the
    /// limit the checkpoint is a RESTART one, after which the same holds.
    #[tokio::test]
    async fn the_wal_starts_over_after_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let options = confab_common::db::sqlite_options(&dir.path().join("w.db"));
        let mut writer = options.connect().await.unwrap();
        sqlx::raw_sql("PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x INTEGER)")
            .execute(&mut writer)
            .await
            .unwrap();
        let insert = "INSERT INTO t VALUES (1)";
        for _ in 0..3 {
            sqlx::raw_sql(insert).execute(&mut writer).await.unwrap();
        }
        let mut checkpointer = options.connect().await.unwrap();
        let frames = checkpoint(&mut checkpointer, i64::MAX).await.unwrap();
        assert!(frames >= 3, "{frames} frames");
        sqlx::raw_sql(insert).execute(&mut writer).await.unwrap();
        assert_eq!(checkpoint(&mut checkpointer, 0).await.unwrap(), 1);
        sqlx::raw_sql(insert).execute(&mut writer).await.unwrap();
        assert_eq!(checkpoint(&mut checkpointer, i64::MAX).await.unwrap(), 1);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut checkpointer)
            .await
            .unwrap();
        assert_eq!(rows, 5);
    }
}
