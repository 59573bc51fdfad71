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

use confab_proto::v1::{Notice, ReadState};
use prost::Message as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{PgPool, Row as _, SqlSafeStr as _};

use super::{
    BoxFuture, HistoryQuery, MessageStore, Page, StoreError, StoredMessage, SyncPage, UNREAD_CAP,
    UserEvent, UserEventKind, Watermarks,
};

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_message_svc_migrations";

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    let migrations = vec![Migration::new(
        1,
        "messages events heads receipts leaves".into(),
        MigrationType::Simple,
        include_str!("postgres/migrations/0001_init.sql").into_sql_str(),
        false,
    )];
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
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

/// Returns a literal `SELECT` of the columns [`message_from_row`] reads from
/// `messages`, followed by `$rest` (a literal, so that the statement stays one
/// audited string).
macro_rules! select_messages {
    ($rest:literal) => {
        concat!(
            "SELECT id, conversation_id, sender_id, sender_device, client_msg_id, \
             sent_at_ms, text, notice FROM messages ",
            $rest
        )
    };
}

fn message_from_row(row: &PgRow) -> Result<StoredMessage, StoreError> {
    let notice: Option<Vec<u8>> = row.try_get("notice")?;
    Ok(StoredMessage {
        id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        sender_id: row.try_get("sender_id")?,
        sender_device: row.try_get("sender_device")?,
        client_msg_id: row.try_get("client_msg_id")?,
        sent_at_ms: row.try_get("sent_at_ms")?,
        text: row.try_get("text")?,
        notice: notice
            .map(|bytes| Notice::decode(bytes.as_slice()))
            .transpose()?,
    })
}

/// Reads one row of `user_events` joined (left) to its message.
fn event_from_row(row: &PgRow) -> Result<UserEvent, StoreError> {
    let seq = seq_from_sql(row.try_get("seq")?);
    let kind: i16 = row.try_get("kind")?;
    let payload: Option<Vec<u8>> = row.try_get("payload")?;
    let payload = payload.unwrap_or_default();
    let kind = match kind {
        EVENT_KIND_RECEIPT => UserEventKind::Receipt(prost::Message::decode(payload.as_slice())?),
        EVENT_KIND_READ_STATE => {
            UserEventKind::ReadState(prost::Message::decode(payload.as_slice())?)
        }
        _ => UserEventKind::Message(message_from_row(row)?),
    };
    Ok(UserEvent { seq, kind })
}

/// Converts a sequence number for a BIGINT column; sequences never come near
/// `i64::MAX`, and a client's cursor beyond it matches nothing either way.
fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// `user_events.kind` of each event kind (migrations/0001_init.sql).
const EVENT_KIND_MESSAGE: i16 = 1;
const EVENT_KIND_RECEIPT: i16 = 2;
const EVENT_KIND_READ_STATE: i16 = 3;

impl MessageStore for PgStore {
    fn history(
        &self,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Page<StoredMessage>, StoreError>> {
        Box::pin(async move {
            // One row more than the page tells whether the scan has more.
            let fetch = i64::from(query.limit) + 1;
            let upwards = query.after.is_some() && query.before.is_none();
            let rows = if upwards {
                sqlx::query(select_messages!(
                    "WHERE conversation_id = $1 AND id > $2 AND id <= $3 \
                     ORDER BY id ASC LIMIT $4"
                ))
                .bind(query.conversation_id)
                .bind(query.after.unwrap_or(i64::MIN))
                .bind(query.up_to.unwrap_or(i64::MAX))
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            } else {
                sqlx::query(select_messages!(
                    "WHERE conversation_id = $1 AND id < $2 AND id > $3 AND id <= $4 \
                     ORDER BY id DESC LIMIT $5"
                ))
                .bind(query.conversation_id)
                .bind(query.before.unwrap_or(i64::MAX))
                .bind(query.after.unwrap_or(i64::MIN))
                .bind(query.up_to.unwrap_or(i64::MAX))
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            };
            let has_more = rows.len() > query.limit as usize;
            let mut items = rows
                .iter()
                .take(query.limit as usize)
                .map(message_from_row)
                .collect::<Result<Vec<_>, StoreError>>()?;
            if upwards {
                items.reverse();
            }
            Ok(Page { items, has_more })
        })
    }

    fn sync(
        &self,
        user_id: i64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<SyncPage, StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await?;
            // The head first, and the page bounded by it: the two agree without a
            // read transaction, since a head and the events up to it are
            // committed together.
            let head: Option<i64> =
                sqlx::query_scalar("SELECT head FROM user_heads WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let head = head.unwrap_or(0);
            // A left join: receipts and read states carry their payload and
            // reference no message.
            let rows = sqlx::query(
                "SELECT e.seq AS seq, e.kind AS kind, e.payload AS payload, m.id AS id, \
                 m.conversation_id AS conversation_id, m.sender_id AS sender_id, \
                 m.sender_device AS sender_device, m.client_msg_id AS client_msg_id, \
                 m.sent_at_ms AS sent_at_ms, m.text AS text, m.notice AS notice \
                 FROM user_events e LEFT JOIN messages m \
                 ON m.id = e.message_id AND e.kind = 1 \
                 WHERE e.user_id = $1 AND e.seq > $2 AND e.seq <= $3 \
                 ORDER BY e.seq ASC LIMIT $4",
            )
            .bind(user_id)
            .bind(seq_to_sql(after))
            .bind(head)
            .bind(i64::from(limit) + 1)
            .fetch_all(&mut *conn)
            .await?;
            let has_more = rows.len() > limit as usize;
            let items = rows
                .iter()
                .take(limit as usize)
                .map(event_from_row)
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(SyncPage {
                events: Page { items, has_more },
                head: seq_from_sql(head),
            })
        })
    }

    fn last_messages<'a>(
        &'a self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            // One backward index seek per conversation, in one statement, in the
            // order asked.
            let rows = sqlx::query(
                "SELECT m.id, m.conversation_id, m.sender_id, m.sender_device, \
                 m.client_msg_id, m.sent_at_ms, m.text, m.notice \
                 FROM UNNEST($1::BIGINT[]) WITH ORDINALITY AS c(conversation_id, ord) \
                 CROSS JOIN LATERAL (SELECT * FROM messages \
                 WHERE conversation_id = c.conversation_id ORDER BY id DESC LIMIT 1) AS m \
                 ORDER BY c.ord",
            )
            .bind(conversation_ids)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(message_from_row).collect()
        })
    }

    fn leave_point(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        Box::pin(async move {
            let last = sqlx::query_scalar(
                "SELECT last_visible_id FROM former_members \
                 WHERE conversation_id = $1 AND user_id = $2",
            )
            .bind(conversation_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(last)
        })
    }

    fn message(
        &self,
        conversation_id: i64,
        message_id: i64,
    ) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(select_messages!("WHERE id = $1 AND conversation_id = $2"))
                .bind(message_id)
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(message_from_row).transpose()
        })
    }

    fn watermarks(
        &self,
        conversation_id: i64,
        except: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(i64, Watermarks)>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT user_id, delivered_up_to, read_up_to FROM receipts \
                 WHERE conversation_id = $1 AND user_id <> $2 ORDER BY user_id LIMIT $3",
            )
            .bind(conversation_id)
            .bind(except)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(user_id, delivered_up_to, read_up_to)| {
                    let marks = Watermarks {
                        delivered_up_to,
                        read_up_to,
                    };
                    (user_id, marks)
                })
                .collect())
        })
    }

    fn receipt_counts(
        &self,
        conversation_id: i64,
        message_id: i64,
        except: i64,
    ) -> BoxFuture<'_, Result<(u32, u32), StoreError>> {
        Box::pin(async move {
            let (delivered, read): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*) FILTER (WHERE delivered_up_to >= $2), \
                 COUNT(*) FILTER (WHERE read_up_to >= $2) FROM receipts \
                 WHERE conversation_id = $1 AND user_id <> $3",
            )
            .bind(conversation_id)
            .bind(message_id)
            .bind(except)
            .fetch_one(&self.pool)
            .await?;
            let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
            Ok((count(delivered), count(read)))
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
