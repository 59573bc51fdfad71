//! The statements whose SQL is the same on SQLite and PostgreSQL.
//!
//! They are written once, as the body of `portable_statements!`, and expanded in
//! `sqlite.rs` and in `postgres.rs` with that backend's connection type. Code
//! generic over `sqlx::Database` would need a bound for every type it binds or
//! reads, repeated on every function; the macro keeps each statement as plain as the
//! code it expands to. Every statement uses `$n` placeholders, which both accept.

/// Defines the portable statements, each a function on `&mut $Connection`, in a
/// module `portable` re-exported into the invoking backend module. `$Connection`
/// is a full path, as it is resolved inside that module.
macro_rules! portable_statements {
    ($Connection:ty) => {
        /// The portable statements on this backend's connection type.
        mod portable {
            use super::super::rows::{
                ChangeHead, ChangeRow, ConversationRow, MemberRow, UserRow, change_head_from_row,
                fold_conversations, member_from_row, user_from_row,
            };
            use super::super::{Conversation, Member, Metadata, NewConversation, Role, User};
            use crate::GroupError;

            /// The connection every statement runs on.
            type Connection = $Connection;

            /// Inserts a user; returns `false`, changing nothing, when the username is
            /// taken.
            ///
            /// The unique index on `users.username` decides, so two concurrent inserts of
            /// one name cannot both succeed.
            pub(in crate::store) async fn insert_user(
                connection: &mut Connection,
                user: &User,
                password_hash: Option<&str>,
            ) -> Result<bool, GroupError> {
                let result = sqlx::query(
                    "INSERT INTO users (id, username, password_hash, created_at_ms) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (username) DO NOTHING",
                )
                .bind(user.id)
                .bind(&user.username)
                .bind(password_hash)
                .bind(user.created_at_ms)
                .execute(connection)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            /// Inserts passwordless users in one statement, skipping those whose
            /// username is taken (by an existing user or an earlier row).
            pub(in crate::store) async fn insert_users(
                connection: &mut Connection,
                users: &[User],
            ) -> Result<(), GroupError> {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO users (id, username, password_hash, created_at_ms) ",
                );
                query.push_values(users, |mut row, user| {
                    row.push_bind(user.id)
                        .push_bind(user.username.as_str())
                        .push("NULL")
                        .push_bind(user.created_at_ms);
                });
                query.push(" ON CONFLICT (username) DO NOTHING");
                query.build().execute(connection).await?;
                Ok(())
            }

            /// Returns the user with this id.
            pub(in crate::store) async fn user_by_id(
                connection: &mut Connection,
                id: i64,
            ) -> Result<Option<User>, GroupError> {
                let row: Option<UserRow> =
                    sqlx::query_as("SELECT id, username, created_at_ms FROM users WHERE id = $1")
                        .bind(id)
                        .fetch_optional(connection)
                        .await?;
                Ok(row.map(user_from_row))
            }

            /// Returns the user with this id, the moment before which their tokens
            /// are refused, and whether `session_id` is revoked.
            pub(in crate::store) async fn token_state(
                connection: &mut Connection,
                user_id: i64,
                session_id: &str,
            ) -> Result<Option<(User, i64, bool)>, GroupError> {
                let row: Option<(i64, String, i64, i64, bool)> = sqlx::query_as(
                    "SELECT id, username, created_at_ms, tokens_valid_after_ms, \
                     EXISTS (SELECT 1 FROM revoked_sessions \
                             WHERE user_id = $1 AND session_id = $2) \
                     FROM users WHERE id = $1",
                )
                .bind(user_id)
                .bind(session_id)
                .fetch_optional(connection)
                .await?;
                Ok(row.map(|(id, username, created_at_ms, valid_after, revoked)| {
                    (user_from_row((id, username, created_at_ms)), valid_after, revoked)
                }))
            }

            /// Refuses the user's tokens minted before `before_ms` from now on (a
            /// moment earlier than the one recorded changes nothing); returns
            /// `false` when there is no such user.
            pub(in crate::store) async fn revoke_tokens_before(
                connection: &mut Connection,
                user_id: i64,
                before_ms: i64,
            ) -> Result<bool, GroupError> {
                let result = sqlx::query(
                    "UPDATE users SET tokens_valid_after_ms = \
                     CASE WHEN tokens_valid_after_ms < $2 THEN $2 \
                     ELSE tokens_valid_after_ms END \
                     WHERE id = $1",
                )
                .bind(user_id)
                .bind(before_ms)
                .execute(connection)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            /// Records `session_id` of `user_id` as revoked until `expires_at_ms`
            /// (a later expiry of a session revoked already wins).
            pub(in crate::store) async fn insert_revoked_session(
                connection: &mut Connection,
                user_id: i64,
                session_id: &str,
                expires_at_ms: i64,
            ) -> Result<(), GroupError> {
                sqlx::query(
                    "INSERT INTO revoked_sessions (user_id, session_id, expires_at_ms) \
                     VALUES ($1, $2, $3) \
                     ON CONFLICT (user_id, session_id) DO UPDATE SET expires_at_ms = \
                     CASE WHEN revoked_sessions.expires_at_ms < excluded.expires_at_ms \
                     THEN excluded.expires_at_ms ELSE revoked_sessions.expires_at_ms END",
                )
                .bind(user_id)
                .bind(session_id)
                .bind(expires_at_ms)
                .execute(connection)
                .await?;
                Ok(())
            }

            /// Deletes revoked sessions whose tokens have all expired by `now_ms`.
            pub(in crate::store) async fn sweep_revoked_sessions(
                connection: &mut Connection,
                now_ms: i64,
            ) -> Result<(), GroupError> {
                sqlx::query("DELETE FROM revoked_sessions WHERE expires_at_ms < $1")
                    .bind(now_ms)
                    .execute(connection)
                    .await?;
                Ok(())
            }

            /// Returns the user with this username and their password hash, if they have
            /// one.
            pub(in crate::store) async fn credentials(
                connection: &mut Connection,
                username: &str,
            ) -> Result<Option<(User, Option<String>)>, GroupError> {
                let row: Option<(i64, String, i64, Option<String>)> = sqlx::query_as(
                    "SELECT id, username, created_at_ms, password_hash FROM users \
                     WHERE username = $1",
                )
                .bind(username)
                .fetch_optional(connection)
                .await?;
                Ok(row.map(|(id, username, created_at_ms, hash)| {
                    let user = user_from_row((id, username, created_at_ms));
                    (user, hash)
                }))
            }

            /// Returns the id of the direct conversation of `user_lo < user_hi`, if any.
            pub(in crate::store) async fn direct_conversation(
                connection: &mut Connection,
                user_lo: i64,
                user_hi: i64,
            ) -> Result<Option<i64>, GroupError> {
                let id = sqlx::query_scalar(
                    "SELECT conversation_id FROM direct_pairs WHERE user_lo = $1 AND user_hi = $2",
                )
                .bind(user_lo)
                .bind(user_hi)
                .fetch_optional(connection)
                .await?;
                Ok(id)
            }

            /// Inserts a conversation with version 1 and no members yet.
            pub(in crate::store) async fn insert_conversation(
                connection: &mut Connection,
                new: NewConversation<'_>,
            ) -> Result<(), GroupError> {
                sqlx::query(
                    "INSERT INTO conversations \
                     (id, kind, created_at_ms, name, topic, avatar_url, version, member_count) \
                     VALUES ($1, $2, $3, $4, $5, $6, 1, 0)",
                )
                .bind(new.id)
                .bind(new.kind.as_db())
                .bind(new.created_at_ms)
                .bind(&new.metadata.name)
                .bind(&new.metadata.topic)
                .bind(&new.metadata.avatar_url)
                .execute(connection)
                .await?;
                Ok(())
            }

            /// Registers `conversation_id` as the direct conversation of `user_lo <
            /// user_hi`; returns `false`, changing nothing, when the pair has one already.
            ///
            /// The primary key of `direct_pairs` decides: on PostgreSQL an insert of a
            /// pair another transaction is inserting waits for that one to end.
            pub(in crate::store) async fn claim_direct_pair(
                connection: &mut Connection,
                user_lo: i64,
                user_hi: i64,
                conversation_id: i64,
            ) -> Result<bool, GroupError> {
                let result = sqlx::query(
                    "INSERT INTO direct_pairs (user_lo, user_hi, conversation_id) \
                     VALUES ($1, $2, $3) \
                     ON CONFLICT (user_lo, user_hi) DO NOTHING",
                )
                .bind(user_lo)
                .bind(user_hi)
                .bind(conversation_id)
                .execute(connection)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            /// Adds `delta` to the conversation's `member_count`, beside every insert
            /// into or delete from `members`.
            pub(in crate::store) async fn add_to_member_count(
                connection: &mut Connection,
                conversation_id: i64,
                delta: i64,
            ) -> Result<(), GroupError> {
                sqlx::query(
                    "UPDATE conversations SET member_count = member_count + $2 WHERE id = $1",
                )
                .bind(conversation_id)
                .bind(delta)
                .execute(connection)
                .await?;
                Ok(())
            }

            /// Returns the conversation with this id, read in one statement (so that its
            /// member ids and count agree), with its members unless it is a channel.
            pub(in crate::store) async fn read_conversation(
                connection: &mut Connection,
                id: i64,
            ) -> Result<Option<Conversation>, GroupError> {
                // LEFT JOIN: a conversation without members (a group everyone left) still
                // exists.
                let rows: Vec<ConversationRow> = sqlx::query_as(
                    "SELECT c.id, c.kind, c.created_at_ms, c.name, c.topic, c.avatar_url, \
                            c.member_count, c.version, m.user_id \
                     FROM conversations c \
                     LEFT JOIN members m ON m.conversation_id = c.id AND c.kind <> 'channel' \
                     WHERE c.id = $1 \
                     ORDER BY m.user_id",
                )
                .bind(id)
                .fetch_all(connection)
                .await?;
                Ok(fold_conversations(rows)?.pop())
            }

            /// Returns every conversation `user_id` is a member of, with its members
            /// unless it is a channel, ordered by conversation id.
            pub(in crate::store) async fn conversations_of(
                connection: &mut Connection,
                user_id: i64,
            ) -> Result<Vec<Conversation>, GroupError> {
                // The join on all members skips channels: their members are never listed
                // here.
                let rows: Vec<ConversationRow> = sqlx::query_as(
                    "SELECT c.id, c.kind, c.created_at_ms, c.name, c.topic, c.avatar_url, \
                            c.member_count, c.version, m.user_id \
                     FROM members mine \
                     JOIN conversations c ON c.id = mine.conversation_id \
                     LEFT JOIN members m ON m.conversation_id = c.id AND c.kind <> 'channel' \
                     WHERE mine.user_id = $1 \
                     ORDER BY c.id, m.user_id",
                )
                .bind(user_id)
                .fetch_all(connection)
                .await?;
                fold_conversations(rows)
            }

            /// Returns whether conversation `id` exists.
            pub(in crate::store) async fn conversation_exists(
                connection: &mut Connection,
                id: i64,
            ) -> Result<bool, GroupError> {
                let found: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1")
                        .bind(id)
                        .fetch_optional(connection)
                        .await?;
                Ok(found.is_some())
            }

            /// Returns `user_id`'s membership of conversation `conversation_id`.
            pub(in crate::store) async fn read_member(
                connection: &mut Connection,
                conversation_id: i64,
                user_id: i64,
            ) -> Result<Option<Member>, GroupError> {
                let row: Option<MemberRow> = sqlx::query_as(
                    "SELECT user_id, role, joined_at_ms FROM members \
                     WHERE conversation_id = $1 AND user_id = $2",
                )
                .bind(conversation_id)
                .bind(user_id)
                .fetch_optional(connection)
                .await?;
                row.map(member_from_row).transpose()
            }

            /// Returns up to `limit` members of the conversation with user ids above
            /// `after_user_id`, ascending.
            pub(in crate::store) async fn members(
                connection: &mut Connection,
                conversation_id: i64,
                after_user_id: i64,
                limit: u32,
            ) -> Result<Vec<Member>, GroupError> {
                let rows: Vec<MemberRow> = sqlx::query_as(
                    "SELECT user_id, role, joined_at_ms FROM members \
                     WHERE conversation_id = $1 AND user_id > $2 \
                     ORDER BY user_id \
                     LIMIT $3",
                )
                .bind(conversation_id)
                .bind(after_user_id)
                .bind(i64::from(limit))
                .fetch_all(connection)
                .await?;
                rows.into_iter().map(member_from_row).collect()
            }

            /// Bumps the version of conversation `id` and returns what a change needs
            /// of it; `None` when there is no such conversation.
            ///
            /// The UPDATE takes the lock before anything is read: SQLite's writer lock
            /// (no read-then-upgrade failures), PostgreSQL's row lock (as `SELECT ...
            /// FOR UPDATE` would; a concurrent change waits for it, and then reads the
            /// row as this one committed it, even under READ COMMITTED).
            pub(in crate::store) async fn bump_version(
                connection: &mut Connection,
                id: i64,
            ) -> Result<Option<ChangeHead>, GroupError> {
                let row: Option<ChangeRow> = sqlx::query_as(
                    "UPDATE conversations SET version = version + 1 WHERE id = $1 \
                     RETURNING kind, member_count, name, topic, avatar_url",
                )
                .bind(id)
                .fetch_optional(connection)
                .await?;
                row.map(change_head_from_row).transpose()
            }

            /// Removes member `user_id`; returns whether they were a member.
            pub(in crate::store) async fn delete_member(
                connection: &mut Connection,
                conversation_id: i64,
                user_id: i64,
            ) -> Result<bool, GroupError> {
                let result =
                    sqlx::query("DELETE FROM members WHERE conversation_id = $1 AND user_id = $2")
                        .bind(conversation_id)
                        .bind(user_id)
                        .execute(connection)
                        .await?;
                Ok(result.rows_affected() == 1)
            }

            /// Sets member `user_id`'s role.
            pub(in crate::store) async fn set_role(
                connection: &mut Connection,
                conversation_id: i64,
                user_id: i64,
                role: Role,
            ) -> Result<(), GroupError> {
                sqlx::query(
                    "UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2",
                )
                .bind(conversation_id)
                .bind(user_id)
                .bind(role.as_db())
                .execute(connection)
                .await?;
                Ok(())
            }

            /// Returns the longest-standing member with `role`: earliest `joined_at_ms`,
            /// then lowest user id.
            pub(in crate::store) async fn senior_member(
                connection: &mut Connection,
                conversation_id: i64,
                role: Role,
            ) -> Result<Option<i64>, GroupError> {
                // An index seek on members_seniority, even in a channel of a million
                // members.
                let user_id = sqlx::query_scalar(
                    "SELECT user_id FROM members WHERE conversation_id = $1 AND role = $2 \
                     ORDER BY joined_at_ms, user_id \
                     LIMIT 1",
                )
                .bind(conversation_id)
                .bind(role.as_db())
                .fetch_optional(connection)
                .await?;
                Ok(user_id)
            }

            /// Replaces the name, topic and avatar URL.
            pub(in crate::store) async fn set_metadata(
                connection: &mut Connection,
                conversation_id: i64,
                metadata: &Metadata,
            ) -> Result<(), GroupError> {
                sqlx::query(
                    "UPDATE conversations SET name = $2, topic = $3, avatar_url = $4 WHERE id = $1",
                )
                .bind(conversation_id)
                .bind(&metadata.name)
                .bind(&metadata.topic)
                .bind(&metadata.avatar_url)
                .execute(connection)
                .await?;
                Ok(())
            }
        }

        pub(super) use portable::*;
    };
}

pub(super) use portable_statements;
