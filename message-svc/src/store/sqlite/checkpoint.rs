//! Checkpoints of the message store's WAL, off the writer's path.
//!
//! SQLite checkpoints by default in the commit that takes the WAL past 1,000
//! pages: that commit then also copies the WAL's pages into the database file
//! and flushes the file, and every send of the group commit waits for it (under
//! one-to-one load, every few commits). The writer's connection turns that
//! off (`wal_autocheckpoint = 0`); this thread checkpoints instead, on a
//! connection of its own, while the writer goes on appending:
//! a `PASSIVE` checkpoint never blocks the writer, and the writer starts the WAL
//! over once a checkpoint has copied all of it. Checkpoints at most every
//! [`INTERVAL`] let a page written by many commits be copied once.
//!
//! Under a steady stream of commits a checkpoint never copies all of the WAL:
//! the writer appends while it copies, and the WAL only starts over when a
//! transaction begins with every frame copied. It would grow without bound,
//! and writing into fresh regions of a file costs the kernel more than
//! rewriting cached ones (under one-to-one load at 10,000 messages/s the
//! writer's thread spent a third of its time zeroing new page-cache pages).
//! So once a checkpoint has copied more than [`CATCH_UP_FRAMES`], the writer
//! copies the few frames appended meanwhile itself, before its next
//! transaction ([`Checkpoints::catch_up_due`], [`catch_up`]); that transaction
//! then starts the WAL over.
//!
//! A WAL that still cannot start over (readers holding old snapshots) is
//! bounded: beyond [`RESTART_FRAMES`] a `RESTART` checkpoint makes the writer
//! wait until it can.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::watch;

/// The shortest time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(100);

/// WAL frames (pages) beyond which the writer finishes a checkpoint itself so
/// that the WAL starts over: 16,384 frames, 32 MiB of 2 KiB pages (64 MiB in a
/// file of 4 KiB pages; counted in frames, as what a checkpoint saves is the
/// frames that repeat a page). Under one-to-one
/// load (200 pairs, 14,000 messages/s offered) 16,384 delivered 11,663 /
/// 11,931 messages/s where 8,192 did 10,314 / 10,873 and 2,048 about 10,550:
/// a page written by many commits is copied once per checkpoint.
const CATCH_UP_FRAMES: i64 = 16_384;

/// WAL frames (pages) beyond which a checkpoint waits for the writer rather than
/// letting the WAL grow: 32,768 frames, 64 MiB of 2 KiB pages.
const RESTART_FRAMES: i64 = 32_768;

/// The writer's side: tells the checkpointer that the WAL has new frames.
#[derive(Debug)]
pub(super) struct Checkpoints {
    commits: mpsc::SyncSender<()>,
    /// Set when a checkpoint found more than [`CATCH_UP_FRAMES`] in the WAL.
    catch_up: Arc<AtomicBool>,
    /// Checkpoints completed; the tests wait on it.
    #[cfg_attr(not(test), allow(dead_code))]
    done: watch::Receiver<u64>,
}

impl Checkpoints {
    /// Starts the checkpointer on `conn` (a connection of its own to the
    /// store's file), on a thread of its own (`confab-checkpoint`); it stops
    /// when this handle is dropped.
    ///
    /// # Errors
    ///
    /// Fails when the thread cannot be started.
    pub(super) fn start(conn: Connection) -> std::io::Result<Self> {
        Self::start_with(conn, CATCH_UP_FRAMES)
    }

    /// As [`Self::start`], asking for a catch-up past `catch_up_frames`.
    fn start_with(conn: Connection, catch_up_frames: i64) -> std::io::Result<Self> {
        let (commits, wake) = mpsc::sync_channel(1);
        let (done_tx, done) = watch::channel(0);
        let catch_up = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&catch_up);
        std::thread::Builder::new()
            .name("confab-checkpoint".to_owned())
            .spawn(move || run(&conn, &wake, catch_up_frames, &flag, &done_tx))?;
        Ok(Self {
            commits,
            catch_up,
            done,
        })
    }

    /// Whether the writer should [`catch_up`] before its next transaction;
    /// true once per checkpoint that asked for it.
    pub(super) fn catch_up_due(&self) -> bool {
        self.catch_up.swap(false, Ordering::Relaxed)
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

/// Checkpoints after each wake-up, at most every [`INTERVAL`], until the
/// writer's handle is dropped; the connection then closes (the last one to
/// close checkpoints what is left).
fn run(
    conn: &Connection,
    wake: &mpsc::Receiver<()>,
    catch_up_frames: i64,
    catch_up: &AtomicBool,
    done: &watch::Sender<u64>,
) {
    while wake.recv().is_ok() {
        match checkpoint(conn, RESTART_FRAMES) {
            Ok(frames) => {
                metrics::gauge!("confab_message_wal_frames").set(frames as f64);
                if frames > catch_up_frames {
                    catch_up.store(true, Ordering::Relaxed);
                }
                done.send_modify(|count| *count += 1);
            }
            Err(error) => tracing::warn!(%error, "checkpoint of the message store failed"),
        }
        // A pause, not a wait for an event: checkpoints are spaced so that a
        // page written by many commits is copied once.
        std::thread::sleep(INTERVAL);
    }
}

/// Copies the WAL into the database file, waiting for the writer when the WAL
/// holds more than `restart_frames`; returns the frames the WAL held.
fn checkpoint(conn: &Connection, restart_frames: i64) -> rusqlite::Result<i64> {
    let frames = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))?;
    if frames > restart_frames {
        // Counted, not logged: under a sustained overload this is every
        // checkpoint.
        metrics::counter!("confab_message_wal_restarts_total").increment(1);
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(frames)
}

/// Copies what the checkpointer left in the WAL, on the writer's connection
/// between two transactions: when it copies everything, the next transaction
/// starts the WAL over. Never waits: a `PASSIVE` checkpoint that meets the
/// checkpointer's leaves the rest to the next one.
///
/// # Errors
///
/// Fails when the checkpoint fails; nothing is lost, the WAL only stays longer.
pub(super) fn catch_up(conn: &Connection) -> rusqlite::Result<()> {
    metrics::counter!("confab_message_wal_catch_ups_total").increment(1);
    let started = std::time::Instant::now();
    let copied = checkpoint(conn, i64::MAX).map(drop);
    // The writer's pause: every batch behind it waits this long.
    metrics::histogram!("confab_message_wal_catch_up_seconds")
        .record(started.elapsed().as_secs_f64());
    copied
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// The path of a database in `dir`, and a connection to it that writes as
    /// the message writer's does (no checkpoints of its own), with a table `t`.
    fn writer(dir: &tempfile::TempDir) -> (PathBuf, Connection) {
        let path = dir.path().join("w.db");
        let writer = confab_common::db::sqlite_connection(&path).unwrap();
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x INTEGER)")
            .unwrap();
        (path, writer)
    }

    /// A connection to the database at `path`.
    fn open(path: &Path) -> Connection {
        confab_common::db::sqlite_connection(path).unwrap()
    }

    const INSERT: &str = "INSERT INTO t VALUES (1)";

    /// A complete checkpoint lets the next write start the WAL over; past the
    /// limit the checkpoint is a RESTART one, after which the same holds.
    #[test]
    fn the_wal_starts_over_after_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = writer(&dir);
        for _ in 0..3 {
            writer.execute(INSERT, []).unwrap();
        }
        let checkpointer = open(&path);
        let frames = checkpoint(&checkpointer, i64::MAX).unwrap();
        assert!(frames >= 3, "{frames} frames");
        writer.execute(INSERT, []).unwrap();
        assert_eq!(checkpoint(&checkpointer, 0).unwrap(), 1);
        writer.execute(INSERT, []).unwrap();
        assert_eq!(checkpoint(&checkpointer, i64::MAX).unwrap(), 1);
        let rows: i64 = checkpointer
            .query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 5);
    }

    /// A checkpoint of a WAL past the limit asks the writer, once, to catch
    /// up; after the writer's catch-up its next transaction starts the WAL
    /// over, though frames were appended after the checkpoint.
    #[tokio::test]
    async fn a_catch_up_lets_the_writer_start_the_wal_over() {
        let dir = tempfile::tempdir().unwrap();
        let (path, writer) = writer(&dir);
        let mut checkpoints = Checkpoints::start_with(open(&path), 100).unwrap();
        checkpoints.committed();
        checkpoints.completed(1).await;
        assert!(
            !checkpoints.catch_up_due(),
            "a short WAL is under the limit"
        );

        let mut checkpoints = Checkpoints::start_with(open(&path), 2).unwrap();
        for _ in 0..3 {
            writer.execute(INSERT, []).unwrap();
        }
        checkpoints.committed();
        checkpoints.completed(1).await;
        assert!(checkpoints.catch_up_due());
        assert!(!checkpoints.catch_up_due(), "asked once per checkpoint");

        // Appended after the checkpoint, as during one under load: frames it
        // did not copy.
        for _ in 0..3 {
            writer.execute(INSERT, []).unwrap();
        }
        catch_up(&writer).unwrap();
        writer.execute(INSERT, []).unwrap();
        assert_eq!(checkpoint(&open(&path), i64::MAX).unwrap(), 1);
    }
}
