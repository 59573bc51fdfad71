-- group-svc schema, version 2: groups and channels.
--
-- Portable SQL, like version 1: one column per ALTER TABLE (SQLite adds one at a time),
-- and every new NOT NULL column has a default so existing rows stay valid.

-- Display metadata of groups and channels; empty for direct conversations.
ALTER TABLE conversations ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN topic TEXT NOT NULL DEFAULT '';
ALTER TABLE conversations ADD COLUMN avatar_url TEXT NOT NULL DEFAULT '';

-- Increases by one with every change of membership or metadata. Every change starts
-- by bumping it, so that it takes the conversation's row lock before it reads anything.
ALTER TABLE conversations ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- The number of rows in members for this conversation, kept in the same transaction as
-- every insert and delete there: a channel may have a million members, too many to
-- count on every read or size check.
ALTER TABLE conversations ADD COLUMN member_count BIGINT NOT NULL DEFAULT 0;

UPDATE conversations
SET member_count = (SELECT COUNT(*) FROM members m WHERE m.conversation_id = conversations.id);

-- The successor of an owner who leaves: the longest-standing admin, else member, found
-- with an index seek instead of sorting every member of a large channel.
CREATE INDEX members_seniority ON members (conversation_id, role, joined_at_ms, user_id);
