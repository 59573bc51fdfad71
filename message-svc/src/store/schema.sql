-- message-svc schema. Idempotent: run at every open. Kept portable to PostgreSQL:
-- ids are BIGINTs the application generates (Snowflake), no AUTOINCREMENT.
-- Each table is one B-tree: `messages.id` is the rowid (INTEGER PRIMARY KEY, not
-- BIGINT, which would add an index beside the rowid), the others are WITHOUT
-- ROWID tables clustered on their key. A file created before this layout keeps
-- its tables (IF NOT EXISTS); every statement works on both.
-- Columns added after the first release are added to older files by
-- `sqlite::migrate` (SQLite has no ADD COLUMN IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS messages (
    id             INTEGER PRIMARY KEY,
    conversation_id BIGINT NOT NULL,
    sender_id      BIGINT NOT NULL,
    sender_device  TEXT   NOT NULL,
    client_msg_id  TEXT   NOT NULL,
    sent_at_ms     BIGINT NOT NULL,
    text           TEXT   NOT NULL,
    -- prost-encoded confab.v1.Notice on what the server writes for a change of
    -- membership or metadata; NULL on messages.
    notice         BLOB
);

-- Dedup holds forever: a retry returns the original id however late it comes.
CREATE UNIQUE INDEX IF NOT EXISTS messages_sender_client_msg_id
    ON messages (sender_id, client_msg_id);

-- History pages and the newest message of a conversation are one range read.
CREATE INDEX IF NOT EXISTS messages_conversation_id
    ON messages (conversation_id, id);

-- Each user's event sequence (DESIGN.md section 5). kind 1 = new message
-- (message_id), 2 = receipt, 3 = read state (payload: the prost-encoded
-- confab.v1.Receipt or ReadState, message_id 0).
CREATE TABLE IF NOT EXISTS user_events (
    user_id    BIGINT   NOT NULL,
    seq        BIGINT   NOT NULL,
    kind       SMALLINT NOT NULL DEFAULT 1,
    message_id BIGINT   NOT NULL,
    payload    BLOB,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;

-- Delivered and read watermarks per member (DESIGN.md section 6).
CREATE TABLE IF NOT EXISTS receipts (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    delivered_up_to BIGINT NOT NULL,
    read_up_to      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;

-- Where a former member's view of a conversation ends: they read history up to
-- last_visible_id (the notice of their removal), nothing after it. Deleted when
-- they are added back.
CREATE TABLE IF NOT EXISTS former_members (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    last_visible_id BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
