-- presence-svc schema. Idempotent: run at every open. Kept portable to
-- PostgreSQL (BIGINT user ids from group-svc, plain INTEGER codes).

-- One row per user who was ever seen or set a privacy choice.
-- last_seen_ms: wall-clock ms of the user's last heartbeat before they went
--   offline (refreshed at most once per window while they stay online); 0 =
--   never seen.
-- last_seen_visibility: 1 = everyone, 2 = contacts (the default), 3 = nobody.
CREATE TABLE IF NOT EXISTS presence (
    user_id              BIGINT  PRIMARY KEY,
    last_seen_ms         BIGINT  NOT NULL DEFAULT 0,
    last_seen_visibility INTEGER NOT NULL DEFAULT 2
);
