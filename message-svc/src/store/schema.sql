-- message-svc schema. Idempotent: run at every open. Kept portable to PostgreSQL:
-- ids are BIGINTs the application generates (Snowflake), no AUTOINCREMENT.

CREATE TABLE IF NOT EXISTS messages (
    id             BIGINT PRIMARY KEY,
    conversation_id BIGINT NOT NULL,
    sender_id      BIGINT NOT NULL,
    sender_device  TEXT   NOT NULL,
    client_msg_id  TEXT   NOT NULL,
    sent_at_ms     BIGINT NOT NULL,
    text           TEXT   NOT NULL
);

-- Dedup holds forever: a retry returns the original id however late it comes.
CREATE UNIQUE INDEX IF NOT EXISTS messages_sender_client_msg_id
    ON messages (sender_id, client_msg_id);

-- History pages and the newest message of a conversation are one range read.
CREATE INDEX IF NOT EXISTS messages_conversation_id
    ON messages (conversation_id, id);

-- Each user's event sequence (DESIGN.md section 5). kind 1 = new message; other
-- event kinds (receipts, edits, membership) will reference other tables.
CREATE TABLE IF NOT EXISTS user_events (
    user_id    BIGINT   NOT NULL,
    seq        BIGINT   NOT NULL,
    kind       SMALLINT NOT NULL DEFAULT 1,
    message_id BIGINT   NOT NULL,
    PRIMARY KEY (user_id, seq)
);
