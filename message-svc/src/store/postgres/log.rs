//! The write side of the PostgreSQL backend: the steps of one group commit on
//! the writer's own connection, each a fixed number of statements over arrays.

use std::collections::{BTreeMap, HashMap};

use super::PgLogWriter;
use crate::store::common::{
    self, event_to_sql, extend_present, extend_watermarks, message_from_row, notice_to_sql,
    select_messages, seq_from_sql, seq_to_sql,
};
use crate::store::{
    BoxFuture, EventRow, LogWriter, StoreError, StoredMessage, WatermarkMap, Watermarks,
};

impl PgLogWriter {
    /// Replaces a connection that failed (closed socket, server restart, session
    /// terminated) with a new one from the pool.
    async fn reconnect(&mut self, error: &sqlx::Error) -> Result<(), StoreError> {
        tracing::warn!(error = %error, "message store writer connection failed, reconnecting");
        self.conn = self.pool.acquire().await?.detach();
        Ok(())
    }
}

impl LogWriter for PgLogWriter {
    fn shared(&self) -> bool {
        true
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // BEGIN fails only when the connection is gone (the previous batch
            // failed on it, or the server closed it): nothing is open on it, so
            // a new connection starts afresh.
            if let Err(error) = sqlx::raw_sql("BEGIN").execute(&mut self.conn).await {
                self.reconnect(&error).await?;
                sqlx::raw_sql("BEGIN").execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let (senders, client_msg_ids): (Vec<i64>, Vec<&str>) = keys.iter().copied().unzip();
            // A semi-join on the unique index: each stored message once, however
            // often its key is asked for.
            let rows = sqlx::query(select_messages!(
                "WHERE (sender_id, client_msg_id) IN \
                 (SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[]))"
            ))
            .bind(&senders)
            .bind(&client_msg_ids)
            .fetch_all(&mut self.conn)
            .await?;
            rows.iter().map(message_from_row).collect()
        })
    }

    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>> {
        Box::pin(async move {
            if user_ids.is_empty() {
                return Ok(HashMap::new());
            }
            // Sorted: every writer creates and locks heads in user_id order, so
            // two writers wait for each other at most, and never in a circle.
            let mut ids = user_ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            // A missing head cannot be locked: create it first. A head another
            // writer is creating makes this wait for that writer's commit.
            sqlx::query(
                "INSERT INTO user_heads (user_id, head) \
                 SELECT user_id, 0 FROM UNNEST($1::BIGINT[]) AS u(user_id) ORDER BY user_id \
                 ON CONFLICT (user_id) DO NOTHING",
            )
            .bind(&ids)
            .execute(&mut self.conn)
            .await?;
            // Locked until COMMIT or ROLLBACK: no other writer numbers these users
            // meanwhile.
            let heads: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT user_id, head FROM user_heads WHERE user_id = ANY($1) \
                 ORDER BY user_id FOR UPDATE",
            )
            .bind(&ids)
            .fetch_all(&mut self.conn)
            .await?;
            Ok(heads
                .into_iter()
                .filter(|&(_, head)| head > 0)
                .map(|(user_id, head)| (user_id, seq_from_sql(head)))
                .collect())
        })
    }

    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(());
            }
            let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
            let conversations: Vec<i64> = messages.iter().map(|m| m.conversation_id).collect();
            let senders: Vec<i64> = messages.iter().map(|m| m.sender_id).collect();
            let devices: Vec<&str> = messages.iter().map(|m| m.sender_device.as_str()).collect();
            let client_msg_ids: Vec<&str> =
                messages.iter().map(|m| m.client_msg_id.as_str()).collect();
            let sent_at: Vec<i64> = messages.iter().map(|m| m.sent_at_ms).collect();
            let texts: Vec<&str> = messages.iter().map(|m| m.text.as_str()).collect();
            let notices: Vec<Option<Vec<u8>>> = messages.iter().map(notice_to_sql).collect();
            sqlx::query(
                "INSERT INTO messages (id, conversation_id, sender_id, sender_device, \
                 client_msg_id, sent_at_ms, text, notice) \
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], \
                 $5::TEXT[], $6::BIGINT[], $7::TEXT[], $8::BYTEA[])",
            )
            .bind(&ids)
            .bind(&conversations)
            .bind(&senders)
            .bind(&devices)
            .bind(&client_msg_ids)
            .bind(&sent_at)
            .bind(&texts)
            .bind(&notices)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            let users: Vec<i64> = events.iter().map(|e| e.user_id).collect();
            let seqs: Vec<i64> = events.iter().map(|e| seq_to_sql(e.seq)).collect();
            let message_ids: Vec<i64> = events.iter().map(|e| e.message_id).collect();
            let (kinds, payloads): (Vec<i16>, Vec<Option<Vec<u8>>>) = events
                .iter()
                .map(|event| event_to_sql(&event.payload))
                .unzip();
            sqlx::query(
                "INSERT INTO user_events (user_id, seq, kind, message_id, payload) \
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::SMALLINT[], \
                 $4::BIGINT[], $5::BYTEA[])",
            )
            .bind(&users)
            .bind(&seqs)
            .bind(&kinds)
            .bind(&message_ids)
            .bind(&payloads)
            .execute(&mut self.conn)
            .await?;
            // Moves each user's head to its new last event, and returns a user
            // whose new events do not run gap-free from the old head (`broken`
            // reads the heads as they were before `moved`: one snapshot). The
            // primary key of user_events already refused duplicates, so n
            // distinct numbers from head + 1 to head + n leave no gap.
            let broken: Option<i64> = sqlx::query_scalar(
                "WITH batch AS (\
                   SELECT user_id, MIN(seq) AS first, MAX(seq) AS last, COUNT(*) AS n \
                   FROM UNNEST($1::BIGINT[], $2::BIGINT[]) AS e(user_id, seq) \
                   GROUP BY user_id), \
                 broken AS (\
                   SELECT b.user_id FROM batch b LEFT JOIN user_heads h ON h.user_id = b.user_id \
                   WHERE b.first <> COALESCE(h.head, 0) + 1 \
                   OR b.last <> COALESCE(h.head, 0) + b.n), \
                 moved AS (\
                   INSERT INTO user_heads (user_id, head) \
                   SELECT user_id, last FROM batch ORDER BY user_id \
                   ON CONFLICT (user_id) DO UPDATE SET head = excluded.head) \
                 SELECT user_id FROM broken ORDER BY user_id LIMIT 1",
            )
            .bind(&users)
            .bind(&seqs)
            .fetch_optional(&mut self.conn)
            .await?;
            match broken {
                Some(user_id) => Err(StoreError::SequenceBroken { user_id }),
                None => Ok(()),
            }
        })
    }

    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>> {
        Box::pin(async move {
            if conversation_ids.is_empty() {
                return Ok(HashMap::new());
            }
            // A correlated MAX is one backward seek in each conversation's index
            // range.
            let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
                "SELECT c.conversation_id, \
                 (SELECT MAX(id) FROM messages m WHERE m.conversation_id = c.conversation_id) \
                 FROM UNNEST($1::BIGINT[]) AS c(conversation_id)",
            )
            .bind(conversation_ids)
            .fetch_all(&mut self.conn)
            .await?;
            let mut newest = HashMap::with_capacity(rows.len());
            extend_present(&mut newest, rows);
            Ok(newest)
        })
    }

    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<WatermarkMap, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(HashMap::new());
            }
            let (conversations, users): (Vec<i64>, Vec<i64>) = keys.iter().copied().unzip();
            let rows: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
                "SELECT conversation_id, user_id, delivered_up_to, read_up_to FROM receipts \
                 WHERE (conversation_id, user_id) IN \
                 (SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[]))",
            )
            .bind(&conversations)
            .bind(&users)
            .fetch_all(&mut self.conn)
            .await?;
            let mut found = HashMap::with_capacity(rows.len());
            extend_watermarks(&mut found, rows);
            Ok(found)
        })
    }

    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // One row per key, the last one given (ON CONFLICT DO UPDATE may not
            // touch a row twice in one statement), in key order.
            let latest: BTreeMap<(i64, i64), Watermarks> = rows
                .iter()
                .map(|&(conversation_id, user_id, marks)| ((conversation_id, user_id), marks))
                .collect();
            if latest.is_empty() {
                return Ok(());
            }
            let conversations: Vec<i64> = latest.keys().map(|&(c, _)| c).collect();
            let users: Vec<i64> = latest.keys().map(|&(_, u)| u).collect();
            let delivered: Vec<i64> = latest.values().map(|m| m.delivered_up_to).collect();
            let read: Vec<i64> = latest.values().map(|m| m.read_up_to).collect();
            sqlx::query(
                "INSERT INTO receipts (conversation_id, user_id, delivered_up_to, read_up_to) \
                 SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[]) \
                 ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
                 delivered_up_to = excluded.delivered_up_to, read_up_to = excluded.read_up_to",
            )
            .bind(&conversations)
            .bind(&users)
            .bind(&delivered)
            .bind(&read)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // One row per user, the last one given, in user order (as in
            // `save_watermarks`).
            let latest: BTreeMap<i64, i64> = leaves.iter().copied().collect();
            if latest.is_empty() {
                return Ok(());
            }
            let users: Vec<i64> = latest.keys().copied().collect();
            let last_visible: Vec<i64> = latest.values().copied().collect();
            sqlx::query(
                "INSERT INTO former_members (conversation_id, user_id, last_visible_id) \
                 SELECT $1, user_id, last_visible_id \
                 FROM UNNEST($2::BIGINT[], $3::BIGINT[]) AS l(user_id, last_visible_id) \
                 ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
                 last_visible_id = excluded.last_visible_id",
            )
            .bind(conversation_id)
            .bind(&users)
            .bind(&last_visible)
            .execute(&mut self.conn)
            .await?;
            if drop_receipts {
                sqlx::query(
                    "DELETE FROM receipts WHERE conversation_id = $1 AND user_id = ANY($2)",
                )
                .bind(conversation_id)
                .bind(&users)
                .execute(&mut self.conn)
                .await?;
            }
            Ok(())
        })
    }

    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if user_ids.is_empty() {
                return Ok(());
            }
            sqlx::query(
                "DELETE FROM former_members WHERE conversation_id = $1 AND user_id = ANY($2)",
            )
            .bind(conversation_id)
            .bind(user_ids)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    common::shared_writes!(receipt_facts, commit, close);

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // Without an open transaction PostgreSQL only warns.
            sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await?;
            Ok(())
        })
    }
}
