//! The PostgreSQL backend, for the distributed mode: the pool for
//! [`MessageStore`], one dedicated connection for [`LogWriter`].
//!
//! Several message processes write one database at once. Each owns its own
//! conversations, but users are shared, so per-user event sequences are guarded
//! by `user_heads`: [`LogWriter::last_seqs`] locks the heads of the users a
//! writer numbers (in `user_id` order, so that two writers never deadlock over
//! them), and [`LogWriter::insert_events`] moves them forward in the same
//! transaction, refusing events that would not continue a head gap-free.
//!
//! Every batch method is a fixed number of statements whatever the batch size:
//! the rows travel as arrays (`= ANY($1)`, `UNNEST`), so each statement has one
//! text, prepared once per connection.
//!
//! The schema is versioned with sqlx's [`Migrator`], built at run time from the
//! files of `postgres/migrations/` embedded with `include_str!` (the `migrate!`
//! macro would need sqlx's `macros` feature), and recorded in its own table,
//! [`MIGRATIONS_TABLE`], so that other services may share the database. The
//! migrator holds an advisory lock while it runs: processes starting together
//! apply each version once.

use confab_proto::v1::ReadState;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;

use super::common::{self, message_columns, message_from_row};
use super::{BoxFuture, MessageStore, StoreError, StoredMessage, UNREAD_CAP};

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_message_svc_migrations";

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    confab_common::db::embedded_migrator(
        MIGRATIONS_TABLE,
        &[(
            1,
            "messages events heads receipts leaves",
            include_str!("postgres/migrations/0001_init.sql"),
        )],
    )
}

/// Creates or updates the schema. Idempotent, and safe when several processes
/// run it at once.
///
/// # Errors
///
/// Fails when the database cannot be reached, a migration fails, or an applied
/// migration differs from the one embedded here.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    migrator().run(pool).await?;
    Ok(())
}

/// Returns the read side (on `pool`) and the write side (on a connection of its
/// own). Does not migrate: call [`migrate`] first.
///
/// # Errors
///
/// Fails when no connection can be opened.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) async fn open(pool: PgPool) -> Result<(PgStore, PgLogWriter), StoreError> {
    let mut conn = pool.acquire().await?.detach();
    let synchronous_commit: String =
        sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
            .fetch_one(&mut conn)
            .await?;
    if synchronous_commit == "off" {
        tracing::warn!(
            synchronous_commit,
            "postgresql acknowledges message commits before they are durable"
        );
    }
    let store = PgStore { pool: pool.clone() };
    Ok((store, PgLogWriter { pool, conn }))
}

/// The read side, on the shared connection pool.
#[derive(Debug, Clone)]
pub(crate) struct PgStore {
    /// Every read takes a connection from here; reads never wait for the writer.
    pool: PgPool,
}

/// The write side, on its own connection.
#[derive(Debug)]
pub(crate) struct PgLogWriter {
    /// Where a replacement connection comes from when the current one breaks.
    pool: PgPool,
    /// Every write transaction runs here. Detached from the pool, so the writer
    /// never takes the place of a reader and readers never starve it.
    conn: PgConnection,
}

/// The head of a user's event sequence ([`common::Shared::sync`]): the row of
/// `user_heads` the writers lock and move forward with the events.
const SEQ_HEAD: &str = "SELECT head FROM user_heads WHERE user_id = $1";

impl MessageStore for PgStore {
    common::shared_reads!(
        history,
        sync = SEQ_HEAD,
        leave_point,
        message,
        watermarks,
        receipt_counts,
    );

    fn last_messages<'a>(
        &'a self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            // One backward index seek per conversation, in one statement, in the
            // order asked.
            let rows = sqlx::query(concat!(
                "SELECT ",
                message_columns!(),
                " FROM UNNEST($1::BIGINT[]) WITH ORDINALITY AS c(conversation_id, ord) \
                 CROSS JOIN LATERAL (SELECT * FROM messages \
                 WHERE conversation_id = c.conversation_id ORDER BY id DESC LIMIT 1) AS m \
                 ORDER BY c.ord"
            ))
            .bind(conversation_ids)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(message_from_row).collect()
        })
    }

    fn unread_counts<'a>(
        &'a self,
        user_id: i64,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<ReadState>, StoreError>> {
        Box::pin(async move {
            // Per conversation, in the order asked: the watermark's key lookup and
            // a range count that stops at the cap, all in one statement.
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT c.conversation_id, COALESCE(r.read_up_to, 0), \
                 (SELECT COUNT(*) FROM (SELECT 1 FROM messages m \
                  WHERE m.conversation_id = c.conversation_id \
                  AND m.id > COALESCE(r.read_up_to, 0) \
                  AND m.sender_id <> $1 AND m.notice IS NULL LIMIT $3) AS capped) \
                 FROM UNNEST($2::BIGINT[]) WITH ORDINALITY AS c(conversation_id, ord) \
                 LEFT JOIN receipts r \
                 ON r.conversation_id = c.conversation_id AND r.user_id = $1 \
                 ORDER BY c.ord",
            )
            .bind(user_id)
            .bind(conversation_ids)
            .bind(i64::from(UNREAD_CAP))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(conversation_id, read_up_to, unread)| ReadState {
                    conversation_id,
                    read_up_to,
                    unread_count: u32::try_from(unread).unwrap_or(UNREAD_CAP),
                })
                .collect())
        })
    }
}

mod log;

#[cfg(test)]
mod tests;
