//! Tests of the PostgreSQL backend, each on a fresh database of the server the
//! testkit names: the conformance suite of the store traits (`store::tests`),
//! then what only a shared store has (several writers, locks, retryable errors,
//! the migrator, a lost connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_common::testkit::PgDatabase;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Barrier;

use super::*;
use crate::store::tests::{Log, Store, event_row, message};
use crate::store::{EventPayload, EventRow, LogWriter};

/// Creates a database and a small pool on it (tests run in parallel against one
/// server), with the schema.
async fn fresh_pool() -> (PgPool, PgDatabase) {
    let database = PgDatabase::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database.url)
        .await
        .unwrap();
    migrate(&pool).await.unwrap();
    (pool, database)
}

/// Opens the store of a fresh database; the guard drops it in [`finish`].
async fn open_fresh() -> (Store, Log, (PgPool, PgDatabase)) {
    let (pool, database) = fresh_pool().await;
    let (store, log) = open(pool.clone()).await.unwrap();
    (Box::new(store), Box::new(log), (pool, database))
}

/// Closes the pool and drops the database.
async fn finish((pool, database): (PgPool, PgDatabase)) {
    pool.close().await;
    database.drop_database().await;
}

crate::store::tests::conformance_suite!(open = open_fresh, finish = finish);

/// Waits until a session of the pool's database waits for a lock.
async fn until_a_session_waits_for_a_lock(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no session waits for a lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The PostgreSQL writer says the store is shared; SQLite's does not.
#[tokio::test]
async fn only_postgres_is_shared() {
    let (store, log, guard) = open_fresh().await;
    assert!(log.shared());
    drop((store, log));
    finish(guard).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, sqlite_log) = crate::store::sqlite::open(&dir.path().join("m.db"))
        .await
        .unwrap();
    assert!(!sqlite_log.shared());
}

/// Migrating is idempotent, also when several processes start at once: each
/// version is applied once, recorded in the service's own table.
#[tokio::test]
async fn migrate_idempotent_and_concurrent() {
    let database = PgDatabase::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect(&database.url)
        .await
        .unwrap();
    let (first, second) = tokio::join!(migrate(&pool), migrate(&pool));
    first.unwrap();
    second.unwrap();
    migrate(&pool).await.unwrap();
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _message_svc_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied, vec![(1, true)]);
    pool.close().await;
    database.drop_database().await;
}

/// While one writer holds a user's head (from `last_seqs` to its commit), a
/// second writer asking for the same user waits, and then sees the new head:
/// whether the first writer created the head or found it.
#[tokio::test]
async fn second_writer_waits_for_a_locked_head() {
    let (pool, database) = fresh_pool().await;
    let (store, mut first) = open(pool.clone()).await.unwrap();
    let (_, mut second) = open(pool.clone()).await.unwrap();
    for round in 1..=2_u64 {
        first.begin().await.unwrap();
        let before = first.last_seqs(&[1]).await.unwrap();
        assert_eq!(before.get(&1).copied().unwrap_or(0), round - 1);

        let waiter = tokio::spawn(async move {
            second.begin().await.unwrap();
            let seqs = second.last_seqs(&[1]).await.unwrap();
            second.commit().await.unwrap();
            (second, seqs)
        });
        until_a_session_waits_for_a_lock(&pool).await;
        let id = round as i64;
        first.insert_messages(&[message(id, 7)]).await.unwrap();
        first
            .insert_events(&[event_row(1, round, id)])
            .await
            .unwrap();
        first.commit().await.unwrap();

        let (returned, seqs) = waiter.await.unwrap();
        second = returned;
        assert_eq!(seqs, HashMap::from([(1, round)]));
    }
    assert_eq!(store.sync(1, 0, 10).await.unwrap().head, 2);
    pool.close().await;
    database.drop_database().await;
}

/// Numbers one batch for `shared_user` and `own_user` on `log`: one message
/// and one event each, numbered from the locked heads.
async fn number_one_batch(
    log: &mut PgLogWriter,
    shared_user: i64,
    own_user: i64,
    id: i64,
) -> Result<(), StoreError> {
    log.begin().await?;
    let last = log.last_seqs(&[own_user, shared_user]).await?;
    let next = |user| last.get(&user).copied().unwrap_or(0) + 1;
    let sent = StoredMessage {
        sender_id: own_user,
        ..message(id, own_user)
    };
    log.insert_messages(&[sent]).await?;
    let events = [
        event_row(shared_user, next(shared_user), id),
        event_row(own_user, next(own_user), id),
    ];
    log.insert_events(&events).await?;
    log.commit().await
}

/// Two writers (two processes' worth) numbering events of the same user at
/// once both commit every batch, without a deadlock, and the user's sequence
/// stays gap-free and unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_a_sequence_gap_free() {
    const BATCHES: i64 = 50;
    const SHARED_USER: i64 = 1;
    let (pool, database) = fresh_pool().await;
    let (store, _) = open(pool.clone()).await.unwrap();
    // Both writers start together, so that their batches interleave.
    let start = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for own_user in [2_i64, 3] {
        let (_, mut log) = open(pool.clone()).await.unwrap();
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for batch in 0..BATCHES {
                let id = own_user * 1_000 + batch;
                if let Err(error) = number_one_batch(&mut log, SHARED_USER, own_user, id).await {
                    panic!("batch {batch} of writer {own_user} failed: {error:?}");
                }
            }
            Box::new(log).close().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    let page = store.sync(SHARED_USER, 0, 1_000).await.unwrap();
    let seqs: Vec<u64> = page.events.items.iter().map(|e| e.seq).collect();
    let total = 2 * BATCHES as u64;
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert_eq!((page.head, page.events.has_more), (total, false));
    let mut ids: Vec<i64> = page.events.items.iter().map(|e| e.message().id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), seqs.len(), "every message once");
    for own_user in [2, 3] {
        assert_eq!(
            store.sync(own_user, 0, 1).await.unwrap().head,
            BATCHES as u64
        );
    }
    pool.close().await;
    database.drop_database().await;
}

/// Two writers locking two users in opposite orders across calls deadlock;
/// PostgreSQL aborts one, and its error is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlock_is_retryable() {
    let (pool, database) = fresh_pool().await;
    // Both locks first, then both second requests.
    let mut holders = Vec::new();
    for (first, then) in [(1_i64, 2_i64), (2, 1)] {
        let (_, mut log) = open(pool.clone()).await.unwrap();
        log.begin().await.unwrap();
        log.last_seqs(&[first]).await.unwrap();
        holders.push((log, then));
    }
    let tasks: Vec<_> = holders
        .into_iter()
        .map(|(mut log, then)| {
            tokio::spawn(async move {
                let result = log.last_seqs(&[then]).await;
                // The victim's locks go with its transaction; the other one
                // then gets its lock.
                log.rollback().await.unwrap();
                result.map(|_| ())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        if let Err(error) = task.await.unwrap() {
            errors.push(error);
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].is_retryable(), "{:?}", errors[0]);
    pool.close().await;
    database.drop_database().await;
}

/// A read-state event of `user_id` (it references no message).
fn read_event(user_id: i64, seq: u64, _: i64) -> EventRow {
    EventRow {
        user_id,
        seq,
        message_id: 0,
        payload: EventPayload::ReadState(ReadState::default()),
    }
}

/// Events that would leave a gap in a user's sequence, or repeat a number, are
/// refused, and nothing of their transaction is kept.
#[tokio::test]
async fn broken_sequences_refused() {
    let (pool, database) = fresh_pool().await;
    let (store, mut log) = open(pool.clone()).await.unwrap();
    log.begin().await.unwrap();
    log.insert_events(&[read_event(1, 1, 0), read_event(1, 2, 0)])
        .await
        .unwrap();
    log.commit().await.unwrap();

    for events in [
        vec![read_event(1, 4, 0)],
        vec![read_event(1, 3, 0), read_event(1, 5, 0)],
        vec![read_event(2, 1, 0), read_event(1, 2, 0)],
    ] {
        log.begin().await.unwrap();
        let error = log.insert_events(&events).await.unwrap_err();
        assert!(!error.is_retryable(), "{error:?}");
        log.rollback().await.unwrap();
    }
    log.begin().await.unwrap();
    let error = log.insert_events(&[read_event(1, 4, 0)]).await.unwrap_err();
    assert!(
        matches!(error, StoreError::SequenceBroken { user_id: 1 }),
        "{error:?}"
    );
    log.rollback().await.unwrap();
    assert_eq!(store.sync(1, 0, 10).await.unwrap().head, 2);
    assert_eq!(store.sync(2, 0, 10).await.unwrap().head, 0);
    pool.close().await;
    database.drop_database().await;
}

/// A writer whose connection was closed by the server opens a new one at the
/// next `begin`, and writes on.
#[tokio::test]
async fn writer_reconnects_after_losing_its_connection() {
    let (pool, database) = fresh_pool().await;
    let (store, mut log) = open(pool.clone()).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut log.conn)
        .await
        .unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(terminated);

    log.begin().await.unwrap();
    log.insert_messages(&[message(1, 7)]).await.unwrap();
    log.commit().await.unwrap();
    assert_eq!(store.message(7, 1).await.unwrap(), Some(message(1, 7)));
    pool.close().await;
    database.drop_database().await;
}
