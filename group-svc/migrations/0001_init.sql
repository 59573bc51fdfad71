-- group-svc schema, version 1: users, conversations and membership.
--
-- Portable SQL: it runs unchanged on SQLite and PostgreSQL. Ids are Snowflake ids made
-- by the application (never AUTOINCREMENT or SERIAL); timestamps are BIGINT milliseconds
-- since the Unix epoch.

CREATE TABLE users (
    id            BIGINT NOT NULL PRIMARY KEY,
    -- Lowercase, 3-32 characters of [a-z0-9_.-].
    username      TEXT   NOT NULL,
    -- Argon2id PHC string; NULL for a passwordless user of an external identity provider.
    password_hash TEXT,
    created_at_ms BIGINT NOT NULL
);

-- One account per name; CreateUser and EnsureUser resolve races through this index.
CREATE UNIQUE INDEX users_username ON users (username);

CREATE TABLE conversations (
    id            BIGINT NOT NULL PRIMARY KEY,
    -- 'direct' (exactly two members, one conversation per pair); 'group' comes later.
    kind          TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE members (
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    user_id         BIGINT NOT NULL REFERENCES users (id),
    -- 'member' in direct conversations; groups add 'owner' and 'admin'.
    role            TEXT   NOT NULL,
    joined_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);

-- ListConversations: the conversations of one user.
CREATE INDEX members_user_id ON members (user_id);

-- The one direct conversation of each unordered pair of users. The primary key makes
-- concurrent OpenDirect calls on one pair agree on a single conversation.
CREATE TABLE direct_pairs (
    user_lo         BIGINT NOT NULL REFERENCES users (id),
    user_hi         BIGINT NOT NULL REFERENCES users (id),
    conversation_id BIGINT NOT NULL REFERENCES conversations (id),
    PRIMARY KEY (user_lo, user_hi),
    CHECK (user_lo < user_hi)
);
