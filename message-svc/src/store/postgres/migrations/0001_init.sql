-- message-svc schema on PostgreSQL, version 1. Applied once by sqlx's migrator
-- (recorded in _message_svc_migrations); a change is a new numbered file, never
-- an edit of this one (the migrator checks the checksums of applied files).
-- Ids are BIGINTs the application generates (Snowflake); protobuf payloads are
-- prost-encoded BYTEA.

CREATE TABLE messages (
    id              BIGINT PRIMARY KEY,
    conversation_id BIGINT NOT NULL,
    sender_id       BIGINT NOT NULL,
    sender_device   TEXT   NOT NULL,
    client_msg_id   TEXT   NOT NULL,
    sent_at_ms      BIGINT NOT NULL,
    text            TEXT   NOT NULL,
    -- confab.v1.Notice on what the server writes for a change of membership or
    -- metadata; NULL on messages.
    notice          BYTEA
);

-- Dedup holds forever: a retry returns the original id however late it comes.
CREATE UNIQUE INDEX messages_sender_client_msg_id
    ON messages (sender_id, client_msg_id);

-- History pages (newest first), the newest message of a conversation and the
-- capped unread counts are one range read each.
CREATE INDEX messages_conversation_id
    ON messages (conversation_id, id DESC);

-- Each user's event sequence (DESIGN.md section 5). kind 1 = new message
-- (message_id), 2 = receipt, 3 = read state (payload: the prost-encoded
-- confab.v1.Receipt or ReadState, message_id 0). The primary key is the index
-- sync reads.
CREATE TABLE user_events (
    user_id    BIGINT   NOT NULL,
    seq        BIGINT   NOT NULL,
    kind       SMALLINT NOT NULL DEFAULT 1,
    message_id BIGINT   NOT NULL,
    payload    BYTEA,
    PRIMARY KEY (user_id, seq)
);

-- The last assigned sequence number of each user. Several message processes
-- number the same users: a writer locks the rows of the users it numbers
-- (SELECT ... FOR UPDATE, in user_id order) and moves them forward in the same
-- transaction as the events, so every sequence stays gap-free and unique. Sync
-- reads its head here.
CREATE TABLE user_heads (
    user_id BIGINT PRIMARY KEY,
    head    BIGINT NOT NULL DEFAULT 0
);

-- Delivered and read watermarks per member (DESIGN.md section 6).
CREATE TABLE receipts (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    delivered_up_to BIGINT NOT NULL,
    read_up_to      BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

-- Where a former member's view of a conversation ends: they read history up to
-- last_visible_id (the notice of their removal), nothing after it. Deleted when
-- they are added back.
CREATE TABLE former_members (
    conversation_id BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    last_visible_id BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
