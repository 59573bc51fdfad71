//! The statements every backend spells alike, and the trait methods that are
//! nothing but one of them (`shared_reads!`, `shared_writes!`).

use std::marker::PhantomData;

use sqlx::{ColumnIndex, Database, Executor, IntoArguments, Pool, QueryBuilder};

use super::{
    SqlValue, event_from_row, message_from_row, page, seq_from_sql, seq_to_sql, watermarks_by_user,
};
use crate::store::{
    HistoryQuery, Page, ReceiptFacts, ReceiptQuery, StoreError, StoredMessage, SyncPage, Watermarks,
};

/// The statements every backend spells alike, on any database `DB` that binds
/// and reads their types (SQLite and PostgreSQL): sqlx binds `$N` parameters on
/// SQLite as on PostgreSQL, so each is one text here. Each takes the executor to
/// run on, a pool or a connection.
///
/// Never built: the type only names the database, so that the bounds every
/// statement needs are written once, and is inferred from the executor
/// (`Shared::history(&self.pool, query)`).
#[derive(Debug)]
pub(crate) struct Shared<DB>(PhantomData<DB>);

impl<DB> Shared<DB>
where
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'n> &'n str: ColumnIndex<DB::Row>,
    i16: SqlValue<DB>,
    i64: SqlValue<DB>,
    String: SqlValue<DB>,
    Vec<u8>: SqlValue<DB>,
{
    /// Returns a page of the conversation, newest first (see
    /// [`MessageStore::history`](super::MessageStore::history)).
    ///
    /// # Errors
    ///
    /// Fails when the statement fails or a row does not decode.
    pub(crate) async fn history<'e>(
        executor: impl Executor<'e, Database = DB>,
        query: HistoryQuery,
    ) -> Result<Page<StoredMessage>, StoreError> {
        // With only `after` the scan runs upwards from it; otherwise downwards from
        // `before`. Either way every bound is bound, the absent ones open.
        let upwards = query.after.is_some() && query.before.is_none();
        let sql = if upwards {
            select_messages!(
                "WHERE conversation_id = $1 AND id < $2 AND id > $3 AND id <= $4 \
                 ORDER BY id ASC LIMIT $5"
            )
        } else {
            select_messages!(
                "WHERE conversation_id = $1 AND id < $2 AND id > $3 AND id <= $4 \
                 ORDER BY id DESC LIMIT $5"
            )
        };
        // One row more than the page tells whether the scan has more.
        let rows = sqlx::query(sql)
            .bind(query.conversation_id)
            .bind(query.before.unwrap_or(i64::MAX))
            .bind(query.after.unwrap_or(i64::MIN))
            .bind(query.up_to.unwrap_or(i64::MAX))
            .bind(i64::from(query.limit) + 1)
            .fetch_all(executor)
            .await?;
        page(&rows, query.limit, upwards, message_from_row)
    }

    /// Returns up to `limit` events of `user_id` with `seq > after`, in seq
    /// order, and the user's head (see
    /// [`MessageStore::sync`](crate::store::MessageStore::sync)).
    ///
    /// `head_sql` is the backend's statement for the head: one nullable BIGINT
    /// of user `$1`, in one row or none. The head comes first and bounds the
    /// page, on one connection of `pool`: every seq up to a committed head is
    /// committed with it, so the two agree without a read transaction and the
    /// page is gap-free up to the head.
    ///
    /// # Errors
    ///
    /// Fails when a statement fails or a row does not decode.
    pub(crate) async fn sync(
        pool: &Pool<DB>,
        head_sql: &'static str,
        user_id: i64,
        after: u64,
        limit: u32,
    ) -> Result<SyncPage, StoreError>
    where
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    {
        let mut conn = pool.acquire().await?;
        let head: Option<Option<i64>> = sqlx::query_scalar(head_sql)
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
        let head = head.flatten().unwrap_or(0);
        // A left join: receipts and read states carry their payload and reference
        // no message.
        let rows = sqlx::query(concat!(
            "SELECT e.seq AS seq, e.kind AS kind, e.payload AS payload, ",
            message_columns!(),
            " FROM user_events e LEFT JOIN messages m \
             ON m.id = e.message_id AND e.kind = 1 \
             WHERE e.user_id = $1 AND e.seq > $2 AND e.seq <= $3 \
             ORDER BY e.seq ASC LIMIT $4"
        ))
        .bind(user_id)
        .bind(seq_to_sql(after))
        .bind(head)
        .bind(i64::from(limit) + 1)
        .fetch_all(&mut *conn)
        .await?;
        Ok(SyncPage {
            events: page(&rows, limit, false, event_from_row)?,
            head: seq_from_sql(head),
        })
    }

    /// Returns the message `message_id` if it is in `conversation_id`.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails or the row does not decode.
    pub(crate) async fn message<'e>(
        executor: impl Executor<'e, Database = DB>,
        conversation_id: i64,
        message_id: i64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let row = sqlx::query(select_messages!("WHERE id = $1 AND conversation_id = $2"))
            .bind(message_id)
            .bind(conversation_id)
            .fetch_optional(executor)
            .await?;
        row.as_ref().map(message_from_row).transpose()
    }

    /// Returns the leave point of a former member, if any.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails.
    pub(crate) async fn leave_point<'e>(
        executor: impl Executor<'e, Database = DB>,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Option<i64>, StoreError> {
        let last = sqlx::query_scalar(
            "SELECT last_visible_id FROM former_members \
             WHERE conversation_id = $1 AND user_id = $2",
        )
        .bind(conversation_id)
        .bind(user_id)
        .fetch_optional(executor)
        .await?;
        Ok(last)
    }

    /// Returns the watermarks of the users of a conversation other than `except`,
    /// by user id, at most `limit`.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails.
    pub(crate) async fn watermarks<'e>(
        executor: impl Executor<'e, Database = DB>,
        conversation_id: i64,
        except: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Watermarks)>, StoreError> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT user_id, delivered_up_to, read_up_to FROM receipts \
             WHERE conversation_id = $1 AND user_id <> $2 ORDER BY user_id LIMIT $3",
        )
        .bind(conversation_id)
        .bind(except)
        .bind(i64::from(limit))
        .fetch_all(executor)
        .await?;
        Ok(watermarks_by_user(rows))
    }

    /// Returns how many users other than `except` have delivered and read up to
    /// `message_id` or beyond.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails.
    pub(crate) async fn receipt_counts<'e>(
        executor: impl Executor<'e, Database = DB>,
        conversation_id: i64,
        message_id: i64,
        except: i64,
    ) -> Result<(u32, u32), StoreError> {
        let (delivered, read): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE delivered_up_to >= $2), \
             COUNT(*) FILTER (WHERE read_up_to >= $2) FROM receipts \
             WHERE conversation_id = $1 AND user_id <> $3",
        )
        .bind(conversation_id)
        .bind(message_id)
        .bind(except)
        .fetch_one(executor)
        .await?;
        Ok((
            count_from_sql(delivered, u32::MAX),
            count_from_sql(read, u32::MAX),
        ))
    }

    /// Counts the messages of a conversation after `after`, sent by others and not
    /// notices, reading at most `cap` index entries.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails.
    pub(crate) async fn count_unread<'e>(
        executor: impl Executor<'e, Database = DB>,
        conversation_id: i64,
        after: i64,
        user_id: i64,
        cap: u32,
    ) -> Result<u32, StoreError> {
        let count: i64 = sqlx::query_scalar(UNREAD_COUNT)
            .bind(conversation_id)
            .bind(after)
            .bind(user_id)
            .bind(i64::from(cap))
            .fetch_one(executor)
            .await?;
        Ok(count_from_sql(count, cap))
    }

    /// Answers `queries` in one statement (see
    /// [`LogWriter::receipt_facts`](crate::store::LogWriter::receipt_facts)).
    ///
    /// # Errors
    ///
    /// Fails when the statement fails.
    pub(crate) async fn receipt_facts<'e>(
        executor: impl Executor<'e, Database = DB>,
        queries: &[ReceiptQuery],
        cap: u32,
    ) -> Result<Vec<ReceiptFacts>, StoreError> {
        if !queries.iter().any(ReceiptQuery::asks) {
            return Ok(vec![ReceiptFacts::default(); queries.len()]);
        }
        let mut query = QueryBuilder::new("");
        push_receipt_facts(&mut query, queries, cap);
        let rows: Vec<(i64, i64, i64)> = query.build_query_as().fetch_all(executor).await?;
        Ok(receipt_facts_from_rows(queries.len(), rows, cap))
    }

    /// Commits the open transaction.
    ///
    /// # Errors
    ///
    /// Fails when the statement fails; the transaction may then be lost.
    pub(crate) async fn commit<'e>(
        executor: impl Executor<'e, Database = DB>,
    ) -> Result<(), StoreError> {
        sqlx::raw_sql("COMMIT").execute(executor).await?;
        Ok(())
    }
}

/// The count of [`Shared::count_unread`], parameters (conversation id, after,
/// user id, cap) in that order: also the SQLite writer's, which binds them by
/// position.
pub(crate) const UNREAD_COUNT: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM messages \
     WHERE conversation_id = $1 AND id > $2 AND sender_id <> $3 AND notice IS NULL \
     LIMIT $4) AS capped";

/// Counts as a `u32`, saturating.
pub(crate) fn count_from_sql(count: i64, cap: u32) -> u32 {
    u32::try_from(count).unwrap_or(cap)
}

/// Appends to `query` one SELECT answering `queries`, numbered from 0:
/// rows `(query number, 0, sender id)` for the senders asked for and one row
/// `(query number, 1, unread count)` for each count asked for; a UNION ALL of
/// at most two terms per query. Queries that ask for nothing add no term; at
/// least one must ask for something.
fn push_receipt_facts<DB>(query: &mut QueryBuilder<DB>, queries: &[ReceiptQuery], cap: u32)
where
    DB: Database,
    i64: SqlValue<DB>,
{
    let mut terms = 0;
    let mut union = |query: &mut QueryBuilder<DB>| {
        if terms > 0 {
            query.push(" UNION ALL ");
        }
        terms += 1;
    };
    for (i, q) in queries.iter().enumerate() {
        let number = i64::try_from(i).unwrap_or(i64::MAX);
        if let Some((after, up_to)) = q.senders {
            union(query);
            query
                .push("SELECT CAST(")
                .push_bind(number)
                .push(" AS BIGINT), CAST(0 AS BIGINT), sender_id FROM (SELECT DISTINCT sender_id FROM messages WHERE conversation_id = ")
                .push_bind(q.conversation_id)
                .push(" AND id > ")
                .push_bind(after)
                .push(" AND id <= ")
                .push_bind(up_to)
                .push(" AND sender_id <> ")
                .push_bind(q.user_id)
                .push(" AND notice IS NULL) AS s");
        }
        if let Some(after) = q.unread_after {
            union(query);
            // The count reads at most `cap` index entries.
            query
                .push("SELECT CAST(")
                .push_bind(number)
                .push(" AS BIGINT), CAST(1 AS BIGINT), COUNT(*) FROM (SELECT 1 FROM messages WHERE conversation_id = ")
                .push_bind(q.conversation_id)
                .push(" AND id > ")
                .push_bind(after)
                .push(" AND sender_id <> ")
                .push_bind(q.user_id)
                .push(" AND notice IS NULL LIMIT ")
                .push_bind(i64::from(cap))
                .push(") AS c");
        }
    }
}

/// Gathers the rows of [`push_receipt_facts`] statements into the facts of
/// `count` queries numbered from 0.
fn receipt_facts_from_rows(
    count: usize,
    rows: Vec<(i64, i64, i64)>,
    cap: u32,
) -> Vec<ReceiptFacts> {
    let mut facts = vec![ReceiptFacts::default(); count];
    for (number, kind, value) in rows {
        let Some(fact) = usize::try_from(number).ok().and_then(|i| facts.get_mut(i)) else {
            continue;
        };
        if kind == 0 {
            fact.senders.push(value);
        } else {
            fact.unread = count_from_sql(value, cap);
        }
    }
    facts
}

/// Implements the named [`MessageStore`](crate::store::MessageStore) methods,
/// each one [`Shared`] statement on `self.pool`, inside a backend's impl;
/// `sync = HEAD_SQL` names the backend's statement of a user's head (see
/// [`Shared::sync`]).
macro_rules! shared_reads {
    ($($method:ident $(= $arg:expr)?),+ $(,)?) => {
        $($crate::store::common::shared_reads!(@ $method $(= $arg)?);)+
    };
    (@ sync = $head_sql:expr) => {
        fn sync(
            &self,
            user_id: i64,
            after: u64,
            limit: u32,
        ) -> $crate::store::BoxFuture<'_, Result<$crate::store::SyncPage, $crate::store::StoreError>>
        {
            let pool = &self.pool;
            Box::pin($crate::store::common::Shared::sync(pool, $head_sql, user_id, after, limit))
        }
    };
    (@ history) => {
        fn history(
            &self,
            query: $crate::store::HistoryQuery,
        ) -> $crate::store::BoxFuture<
            '_,
            Result<$crate::store::Page<$crate::store::StoredMessage>, $crate::store::StoreError>,
        > {
            Box::pin($crate::store::common::Shared::history(&self.pool, query))
        }
    };
    (@ leave_point) => {
        fn leave_point(
            &self,
            conversation_id: i64,
            user_id: i64,
        ) -> $crate::store::BoxFuture<'_, Result<Option<i64>, $crate::store::StoreError>> {
            Box::pin($crate::store::common::Shared::leave_point(&self.pool, conversation_id, user_id))
        }
    };
    (@ message) => {
        fn message(
            &self,
            conversation_id: i64,
            message_id: i64,
        ) -> $crate::store::BoxFuture<
            '_,
            Result<Option<$crate::store::StoredMessage>, $crate::store::StoreError>,
        > {
            Box::pin($crate::store::common::Shared::message(&self.pool, conversation_id, message_id))
        }
    };
    (@ watermarks) => {
        fn watermarks(
            &self,
            conversation_id: i64,
            except: i64,
            limit: u32,
        ) -> $crate::store::BoxFuture<
            '_,
            Result<Vec<(i64, $crate::store::Watermarks)>, $crate::store::StoreError>,
        > {
            let executor = &self.pool;
            Box::pin($crate::store::common::Shared::watermarks(executor, conversation_id, except, limit))
        }
    };
    (@ receipt_counts) => {
        fn receipt_counts(
            &self,
            conversation_id: i64,
            message_id: i64,
            except: i64,
        ) -> $crate::store::BoxFuture<'_, Result<(u32, u32), $crate::store::StoreError>> {
            let executor = &self.pool;
            Box::pin($crate::store::common::Shared::receipt_counts(executor, conversation_id, message_id, except))
        }
    };
}
pub(crate) use shared_reads;

/// Implements the named [`LogWriter`](crate::store::LogWriter) methods, each
/// one [`Shared`] statement (or sqlx call) on the writer's connection
/// `self.conn`, inside a backend's impl.
macro_rules! shared_writes {
    ($($method:ident),+ $(,)?) => {
        $($crate::store::common::shared_writes!(@ $method);)+
    };
    (@ receipt_facts) => {
        fn receipt_facts<'a>(
            &'a mut self,
            queries: &'a [$crate::store::ReceiptQuery],
            cap: u32,
        ) -> $crate::store::BoxFuture<'a, Result<Vec<$crate::store::ReceiptFacts>, $crate::store::StoreError>> {
            let executor = &mut self.conn;
            Box::pin($crate::store::common::Shared::receipt_facts(executor, queries, cap))
        }
    };
    (@ commit) => {
        fn commit(&mut self) -> $crate::store::BoxFuture<'_, Result<(), $crate::store::StoreError>> {
            Box::pin($crate::store::common::Shared::commit(&mut self.conn))
        }
    };
    (@ close) => {
        fn close(
            self: Box<Self>,
        ) -> $crate::store::BoxFuture<'static, Result<(), $crate::store::StoreError>> {
            Box::pin(async move {
                sqlx::Connection::close(self.conn).await?;
                Ok(())
            })
        }
    };
}
pub(crate) use shared_writes;
