-- group-svc schema on PostgreSQL, version 1: users, conversations, membership, groups
-- and channels.
--
-- The same tables, columns and indexes as the SQLite schema (migrations/ 0001 and 0002
-- together), in PostgreSQL's own terms: one CREATE TABLE each, named constraints, and
-- CHECKs that the SQLite schema leaves to the application. Ids are Snowflake ids made by
-- the application (never SERIAL or IDENTITY); timestamps are BIGINT milliseconds since
-- the Unix epoch.

CREATE TABLE users (
    id            BIGINT NOT NULL PRIMARY KEY,
    -- Lowercase, 3-32 characters of [a-z0-9_.-].
    username      TEXT   NOT NULL,
    -- Argon2id PHC string; NULL for a passwordless user of an external identity provider.
    password_hash TEXT,
    created_at_ms BIGINT NOT NULL,
    -- One account per name; CreateUser and EnsureUser resolve races through it
    -- (INSERT ... ON CONFLICT (username) DO NOTHING).
    CONSTRAINT users_username UNIQUE (username)
);

CREATE TABLE conversations (
    id            BIGINT NOT NULL PRIMARY KEY,
    kind          TEXT   NOT NULL CHECK (kind IN ('direct', 'group', 'channel')),
    created_at_ms BIGINT NOT NULL,
    -- Display metadata of groups and channels; empty for direct conversations.
    name          TEXT   NOT NULL DEFAULT '',
    topic         TEXT   NOT NULL DEFAULT '',
    avatar_url    TEXT   NOT NULL DEFAULT '',
    -- Increases by one with every change of membership or metadata. Every change starts
    -- by bumping it, so that it holds the row's lock before it reads anything.
    version       BIGINT NOT NULL DEFAULT 1 CHECK (version >= 1),
    -- The number of rows in members for this conversation, kept in the same transaction
    -- as every insert and delete there: a channel may have a million members, too many
    -- to count on every read or size check.
    member_count  BIGINT NOT NULL DEFAULT 0 CHECK (member_count >= 0)
);

CREATE TABLE members (
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    user_id         BIGINT NOT NULL REFERENCES users (id),
    role            TEXT   NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

-- ListConversations: the conversations of one user.
CREATE INDEX members_user_id ON members (user_id);

-- The successor of an owner who leaves: the longest-standing admin, else member, found
-- with an index seek instead of sorting every member of a large channel.
CREATE INDEX members_seniority ON members (conversation_id, role, joined_at_ms, user_id);

-- At most one owner per conversation: an owner who leaves is deleted before the
-- successor is promoted, in the same transaction.
CREATE UNIQUE INDEX members_one_owner ON members (conversation_id) WHERE role = 'owner';

-- The one direct conversation of each unordered pair of users. The primary key makes
-- concurrent OpenDirect calls on one pair agree on a single conversation.
CREATE TABLE direct_pairs (
    user_lo         BIGINT NOT NULL REFERENCES users (id),
    user_hi         BIGINT NOT NULL REFERENCES users (id),
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (user_lo, user_hi),
    CHECK (user_lo < user_hi)
);
