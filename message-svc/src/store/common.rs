//! What the SQL backends share: the logic around their statements (paging, row
//! decoding, the prost payloads, event kinds, sequence numbers, watermark rows)
//! and the statements both dialects spell alike.
//!
//! sqlx binds `$N` parameters on SQLite as on PostgreSQL, so a statement both
//! dialects understand is one text, run by one generic function on either
//! backend's executor ([`statements`]). What only one dialect can say stays in the backend's own
//! file: PostgreSQL's arrays (`= ANY($1)`, `UNNEST`, one statement per batch),
//! SQLite's multi-row `VALUES` in chunks of bounded parameter counts, and each
//! backend's source of a user's sequence head.

use std::collections::HashMap;

use confab_proto::v1::Notice;
use prost::Message as _;
use sqlx::{ColumnIndex, Database, Decode, Encode, Row, Type};

use super::{
    EventPayload, Page, StoreError, StoredMessage, UserEvent, UserEventKind, WatermarkMap,
    Watermarks,
};

/// Returns the literal list of the columns [`message_from_row`] reads, taken
/// from the `messages` table aliased `m`.
macro_rules! message_columns {
    () => {
        "m.id AS id, m.conversation_id AS conversation_id, m.sender_id AS sender_id, \
         m.sender_device AS sender_device, m.client_msg_id AS client_msg_id, \
         m.sent_at_ms AS sent_at_ms, m.text AS text, m.notice AS notice"
    };
}
pub(super) use message_columns;

/// Returns a literal `SELECT` of the columns [`message_from_row`] reads from
/// `messages` (aliased `m`), followed by `$rest` (a literal, so that the
/// statement stays one audited string).
macro_rules! select_messages {
    ($rest:literal) => {
        concat!(
            "SELECT ",
            $crate::store::common::message_columns!(),
            " FROM messages m ",
            $rest
        )
    };
}
pub(super) use select_messages;

// After the macros above, which its statements use.
mod statements;
pub(super) use statements::{Shared, UNREAD_COUNT, count_from_sql, shared_reads, shared_writes};

/// `user_events.kind` of each event kind (schema.sql,
/// postgres/migrations/0001_init.sql).
const EVENT_KIND_MESSAGE: i16 = 1;
const EVENT_KIND_RECEIPT: i16 = 2;
const EVENT_KIND_READ_STATE: i16 = 3;

/// Converts a sequence number for a BIGINT column; sequences never come near
/// `i64::MAX`, and a client's cursor beyond it matches nothing either way.
pub(super) fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Converts a sequence number read from a BIGINT column.
pub(super) fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// Returns the `notice` column of a message: the prost-encoded notice, or NULL.
pub(super) fn notice_to_sql(message: &StoredMessage) -> Option<Vec<u8>> {
    message.notice.as_ref().map(Notice::encode_to_vec)
}

/// Returns the `kind` and `payload` columns of an event row.
pub(super) fn event_to_sql(payload: &EventPayload) -> (i16, Option<Vec<u8>>) {
    match payload {
        EventPayload::Message => (EVENT_KIND_MESSAGE, None),
        EventPayload::Receipt(receipt) => (EVENT_KIND_RECEIPT, Some(receipt.encode_to_vec())),
        EventPayload::ReadState(state) => (EVENT_KIND_READ_STATE, Some(state.encode_to_vec())),
    }
}

/// A value a shared statement binds or reads on database `DB`.
pub(super) trait SqlValue<DB: Database>:
    for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> + Send
{
}

impl<DB: Database, T> SqlValue<DB> for T where
    T: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> + Send
{
}

/// Reads a message from the columns of [`select_messages!`].
///
/// # Errors
///
/// Fails when a column is missing or its notice does not decode.
pub(super) fn message_from_row<R: Row>(row: &R) -> Result<StoredMessage, StoreError>
where
    for<'n> &'n str: ColumnIndex<R>,
    i64: SqlValue<R::Database>,
    String: SqlValue<R::Database>,
    Vec<u8>: SqlValue<R::Database>,
{
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

/// Reads one row of `user_events` joined (left) to its message, as
/// [`Shared::sync`] selects it.
///
/// # Errors
///
/// Fails when a column is missing or a payload does not decode.
pub(super) fn event_from_row<R: Row>(row: &R) -> Result<UserEvent, StoreError>
where
    for<'n> &'n str: ColumnIndex<R>,
    i16: SqlValue<R::Database>,
    i64: SqlValue<R::Database>,
    String: SqlValue<R::Database>,
    Vec<u8>: SqlValue<R::Database>,
{
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

/// Returns the page of the first `limit` of `rows` decoded, reversed when
/// `reverse`; `rows` were fetched with a limit of one more, so a row beyond
/// `limit` tells that the scan has more.
///
/// # Errors
///
/// Fails when a row does not decode.
pub(super) fn page<R, T>(
    rows: &[R],
    limit: u32,
    reverse: bool,
    decode: impl FnMut(&R) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let limit = limit as usize;
    let has_more = rows.len() > limit;
    let mut items = rows
        .iter()
        .take(limit)
        .map(decode)
        .collect::<Result<Vec<_>, StoreError>>()?;
    if reverse {
        items.reverse();
    }
    Ok(Page { items, has_more })
}

/// Returns watermark rows `(user id, delivered, read)` by user id.
pub(super) fn watermarks_by_user(rows: Vec<(i64, i64, i64)>) -> Vec<(i64, Watermarks)> {
    rows.into_iter()
        .map(|(user_id, delivered_up_to, read_up_to)| {
            let marks = Watermarks {
                delivered_up_to,
                read_up_to,
            };
            (user_id, marks)
        })
        .collect()
}

/// Adds watermark rows `(conversation id, user id, delivered, read)` to `map`.
pub(super) fn extend_watermarks(map: &mut WatermarkMap, rows: Vec<(i64, i64, i64, i64)>) {
    for (conversation_id, user_id, delivered_up_to, read_up_to) in rows {
        let marks = Watermarks {
            delivered_up_to,
            read_up_to,
        };
        map.insert((conversation_id, user_id), marks);
    }
}

/// Adds the rows `(key, value)` of `rows` that have a value to `map`: the
/// answer of a correlated `MAX` per key, NULL where the key has no row.
pub(super) fn extend_present<V>(
    map: &mut HashMap<i64, V>,
    rows: impl IntoIterator<Item = (i64, Option<V>)>,
) {
    map.extend(
        rows.into_iter()
            .filter_map(|(key, value)| Some((key, value?))),
    );
}
