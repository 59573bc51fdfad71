//! The SQLite backend of the store.
//!
//! The schema is versioned with sqlx's [`Migrator`], built at run time from the SQL
//! files embedded with `include_str!` (the `migrate!` macro would need sqlx's
//! `macros` feature). Applied versions are recorded in their own table,
//! [`MIGRATIONS_TABLE`], so that other services sharing the same SQLite file can
//! version their schemas independently.
//!
//! Every statement is portable SQL with `$n` placeholders, so the PostgreSQL backend
//! can reuse it.

use std::collections::BTreeMap;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{QueryBuilder, SqlSafeStr, Sqlite, SqlitePool};

use super::{Conversation, ConversationKind, Role, User};
use crate::GroupError;

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_group_svc_migrations";

/// Ids per `IN (...)` list: well under SQLite's limit on bound parameters.
const IDS_PER_QUERY: usize = 500;

/// Users, conversations and membership in one SQLite database.
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Returns the store on `pool`, after bringing its schema up to date.
    ///
    /// # Errors
    ///
    /// Fails when a migration fails, or when the database holds a version this
    /// binary does not know or a changed one.
    pub(crate) async fn new(pool: SqlitePool) -> Result<Self, GroupError> {
        migrator().run(&pool).await?;
        Ok(Self { pool })
    }

    /// Returns the pool, for tests that inspect tables directly.
    #[cfg(test)]
    pub(crate) fn pool_for_tests(&self) -> SqlitePool {
        self.pool.clone()
    }

    /// Inserts a user; returns `false`, changing nothing, when the username is taken.
    ///
    /// The unique index on `users.username` decides, so two concurrent inserts of one
    /// name cannot both succeed.
    pub(crate) async fn insert_user(
        &self,
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
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Returns the user with this id.
    pub(crate) async fn user_by_id(&self, id: i64) -> Result<Option<User>, GroupError> {
        let row: Option<(i64, String, i64)> =
            sqlx::query_as("SELECT id, username, created_at_ms FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(user_from_row))
    }

    /// Returns the user with this (already lowercased) username.
    pub(crate) async fn user_by_name(&self, username: &str) -> Result<Option<User>, GroupError> {
        Ok(self.credentials(username).await?.map(|(user, _)| user))
    }

    /// Returns the user with this username and their password hash, if they have one.
    pub(crate) async fn credentials(
        &self,
        username: &str,
    ) -> Result<Option<(User, Option<String>)>, GroupError> {
        let row: Option<(i64, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, username, created_at_ms, password_hash FROM users WHERE username = $1",
        )
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, username, created_at_ms, hash)| {
            (user_from_row((id, username, created_at_ms)), hash)
        }))
    }

    /// Returns the users among `ids` that exist, ordered by id.
    pub(crate) async fn users_by_ids(&self, ids: &[i64]) -> Result<Vec<User>, GroupError> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut users = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT id, username, created_at_ms FROM users WHERE id IN (",
            );
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            query.push(") ORDER BY id");
            let rows: Vec<(i64, String, i64)> =
                query.build_query_as().fetch_all(&self.pool).await?;
            users.extend(rows.into_iter().map(user_from_row));
        }
        Ok(users)
    }

    /// Returns the id of the direct conversation of `user_lo < user_hi`, if any.
    pub(crate) async fn direct_conversation(
        &self,
        user_lo: i64,
        user_hi: i64,
    ) -> Result<Option<i64>, GroupError> {
        debug_assert!(user_lo < user_hi);
        let id = sqlx::query_scalar(
            "SELECT conversation_id FROM direct_pairs WHERE user_lo = $1 AND user_hi = $2",
        )
        .bind(user_lo)
        .bind(user_hi)
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Creates the direct conversation `conversation_id` of `user_lo < user_hi`
    /// unless the pair has one already, and returns the pair's conversation id.
    ///
    /// Race-safe: the primary key of `direct_pairs` lets exactly one of several
    /// concurrent calls register its conversation; the others roll their
    /// conversation back and return the winner's.
    pub(crate) async fn create_direct(
        &self,
        conversation_id: i64,
        user_lo: i64,
        user_hi: i64,
        now_ms: i64,
    ) -> Result<i64, GroupError> {
        debug_assert!(user_lo < user_hi);
        let mut tx = self.pool.begin().await?;
        // A write first: SQLite then takes the write lock at once (waiting under the
        // busy timeout), instead of failing a read transaction that tries to upgrade.
        sqlx::query("INSERT INTO conversations (id, kind, created_at_ms) VALUES ($1, $2, $3)")
            .bind(conversation_id)
            .bind(ConversationKind::Direct.as_db())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        let claimed = sqlx::query(
            "INSERT INTO direct_pairs (user_lo, user_hi, conversation_id) VALUES ($1, $2, $3) \
             ON CONFLICT (user_lo, user_hi) DO NOTHING",
        )
        .bind(user_lo)
        .bind(user_hi)
        .bind(conversation_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !claimed {
            // Another call created the pair's conversation first.
            tx.rollback().await?;
            return self
                .direct_conversation(user_lo, user_hi)
                .await?
                .ok_or(GroupError::Inconsistent("direct pair vanished"));
        }
        for user_id in [user_lo, user_hi] {
            sqlx::query(
                "INSERT INTO members (conversation_id, user_id, role, joined_at_ms) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(conversation_id)
            .bind(user_id)
            .bind(Role::Member.as_db())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(conversation_id)
    }

    /// Returns the conversation with this id, with its members.
    pub(crate) async fn conversation(&self, id: i64) -> Result<Option<Conversation>, GroupError> {
        // LEFT JOIN: a conversation without members (a group everyone left) still exists.
        let rows: Vec<MemberRow> = sqlx::query_as(
            "SELECT c.id, c.kind, c.created_at_ms, m.user_id \
             FROM conversations c LEFT JOIN members m ON m.conversation_id = c.id \
             WHERE c.id = $1 \
             ORDER BY m.user_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(group_members(rows)?.pop())
    }

    /// Returns every conversation `user_id` is a member of, with its members, ordered
    /// by conversation id.
    pub(crate) async fn conversations_of(
        &self,
        user_id: i64,
    ) -> Result<Vec<Conversation>, GroupError> {
        let rows: Vec<MemberRow> = sqlx::query_as(
            "SELECT c.id, c.kind, c.created_at_ms, m.user_id \
             FROM members mine \
             JOIN conversations c ON c.id = mine.conversation_id \
             JOIN members m ON m.conversation_id = c.id \
             WHERE mine.user_id = $1 \
             ORDER BY c.id, m.user_id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        group_members(rows)
    }
}

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    let migrations = vec![Migration::new(
        1,
        "users conversations members".into(),
        MigrationType::Simple,
        include_str!("../../migrations/0001_init.sql").into_sql_str(),
        false,
    )];
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

fn user_from_row((id, username, created_at_ms): (i64, String, i64)) -> User {
    User {
        id,
        username,
        created_at_ms,
    }
}

/// A conversation's `(id, kind, created_at_ms)` and one member id (`None` for a
/// conversation without members).
type MemberRow = (i64, String, i64, Option<i64>);

/// Folds rows ordered by conversation and member into conversations.
fn group_members(rows: Vec<MemberRow>) -> Result<Vec<Conversation>, GroupError> {
    let mut conversations: BTreeMap<i64, Conversation> = BTreeMap::new();
    for (id, kind, created_at_ms, member_id) in rows {
        let kind = ConversationKind::from_db(&kind)
            .ok_or(GroupError::Inconsistent("unknown conversation kind"))?;
        let conversation = conversations.entry(id).or_insert_with(|| Conversation {
            id,
            kind,
            member_ids: Vec::new(),
            created_at_ms,
        });
        conversation.member_ids.extend(member_id);
    }
    let conversations: Vec<Conversation> = conversations.into_values().collect();
    debug_assert!(conversations.iter().all(|c| c.member_ids.is_sorted()));
    Ok(conversations)
}
