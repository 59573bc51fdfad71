-- group-svc schema, version 3: revocation of tokens (logout).
--
-- Portable SQL, like versions 1 and 2; migrations-postgres/0002 is the same.

-- Tokens of the user minted before this moment (ms since the Unix epoch) are
-- refused: "log out from all devices". 0: none.
ALTER TABLE users ADD COLUMN tokens_valid_after_ms BIGINT NOT NULL DEFAULT 0;

-- Logged-out sessions: their tokens are refused. A row is kept until no token of
-- the session can still be valid (`expires_at_ms`), then deleted.
CREATE TABLE revoked_sessions (
    user_id       BIGINT NOT NULL REFERENCES users (id),
    session_id    TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, session_id)
);

-- The sweep of rows that outlived their tokens.
CREATE INDEX revoked_sessions_expires_at_ms ON revoked_sessions (expires_at_ms);
