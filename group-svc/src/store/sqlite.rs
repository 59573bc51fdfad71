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

mod change;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{QueryBuilder, SqlSafeStr, Sqlite, SqliteConnection, SqlitePool};

use super::{Conversation, ConversationKind, Member, Metadata, Role, User};
use crate::GroupError;

pub(crate) use change::Change;

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_group_svc_migrations";

/// Ids per `IN (...)` list: well under SQLite's limit on bound parameters.
const IDS_PER_QUERY: usize = 500;

/// SQLite's limit on the bound parameters of one statement (since 3.32).
const MAX_BOUND_PARAMETERS: usize = 32_766;

/// Rows per multi-row `INSERT INTO members`: four parameters each.
const MEMBER_ROWS_PER_INSERT: usize = MAX_BOUND_PARAMETERS / 4;

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

    /// Returns those of `others` who share a direct conversation or a group (not
    /// a channel) with `user_id`, ascending.
    pub(crate) async fn shared_with(
        &self,
        user_id: i64,
        others: &[i64],
    ) -> Result<Vec<i64>, GroupError> {
        let mut others = others.to_vec();
        others.sort_unstable();
        others.dedup();
        let mut shared = Vec::new();
        for chunk in others.chunks(IDS_PER_QUERY) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT DISTINCT theirs.user_id FROM members mine \
                 JOIN conversations c ON c.id = mine.conversation_id AND c.kind <> 'channel' \
                 JOIN members theirs ON theirs.conversation_id = mine.conversation_id \
                 WHERE mine.user_id = ",
            );
            query.push_bind(user_id).push(" AND theirs.user_id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            query.push(") ORDER BY theirs.user_id");
            let rows: Vec<(i64,)> = query.build_query_as().fetch_all(&self.pool).await?;
            shared.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(shared)
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
        insert_members(
            &mut tx,
            conversation_id,
            &[user_lo, user_hi],
            Role::Member,
            now_ms,
        )
        .await?;
        tx.commit().await?;
        Ok(conversation_id)
    }

    /// Creates a group or channel with version 1, `owner_id` as its owner and
    /// `member_ids` (distinct, without the owner, all existing users) as members, in
    /// one transaction, and returns it.
    pub(crate) async fn create_conversation(
        &self,
        new: NewConversation<'_>,
        owner_id: i64,
        member_ids: &[i64],
    ) -> Result<Conversation, GroupError> {
        debug_assert_ne!(new.kind, ConversationKind::Direct);
        debug_assert!(!member_ids.contains(&owner_id));
        let mut tx = self.pool.begin().await?;
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
        .execute(&mut *tx)
        .await?;
        insert_members(&mut tx, new.id, &[owner_id], Role::Owner, new.created_at_ms).await?;
        insert_members(&mut tx, new.id, member_ids, Role::Member, new.created_at_ms).await?;
        let conversation = read_conversation(&mut tx, new.id)
            .await?
            .ok_or(GroupError::Inconsistent("created conversation vanished"))?;
        tx.commit().await?;
        Ok(conversation)
    }

    /// Starts a change of conversation `id`: a transaction that first bumps its
    /// version, which takes the write lock (SQLite) or the row lock (PostgreSQL)
    /// before anything is read, so that concurrent changes of one conversation run
    /// one after the other. Returns `None` for an unknown conversation.
    ///
    /// Dropping the change without [`Change::commit`] rolls it back.
    pub(crate) async fn begin_change(&self, id: i64) -> Result<Option<Change>, GroupError> {
        let tx = self.pool.begin().await?;
        Change::begin(tx, id).await
    }

    /// Returns the conversation with this id, with its members unless it is a channel.
    pub(crate) async fn conversation(&self, id: i64) -> Result<Option<Conversation>, GroupError> {
        let mut connection = self.pool.acquire().await?;
        read_conversation(&mut connection, id).await
    }

    /// Returns every conversation `user_id` is a member of, with its members unless
    /// it is a channel, ordered by conversation id.
    pub(crate) async fn conversations_of(
        &self,
        user_id: i64,
    ) -> Result<Vec<Conversation>, GroupError> {
        // The join on all members skips channels: their members are never listed here.
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
        .fetch_all(&self.pool)
        .await?;
        fold_conversations(rows)
    }

    /// Returns whether conversation `id` exists.
    pub(crate) async fn conversation_exists(&self, id: i64) -> Result<bool, GroupError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM conversations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// Returns `user_id`'s membership of conversation `conversation_id`.
    pub(crate) async fn member(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Option<Member>, GroupError> {
        let mut connection = self.pool.acquire().await?;
        read_member(&mut connection, conversation_id, user_id).await
    }

    /// Returns up to `limit` members of the conversation with user ids above
    /// `after_user_id`, ascending.
    pub(crate) async fn members(
        &self,
        conversation_id: i64,
        after_user_id: i64,
        limit: u32,
    ) -> Result<Vec<Member>, GroupError> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT user_id, role, joined_at_ms FROM members \
             WHERE conversation_id = $1 AND user_id > $2 \
             ORDER BY user_id \
             LIMIT $3",
        )
        .bind(conversation_id)
        .bind(after_user_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(member_from_row).collect()
    }
}

/// A group or channel about to be created.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewConversation<'a> {
    /// Snowflake id.
    pub(crate) id: i64,
    /// Group or channel.
    pub(crate) kind: ConversationKind,
    /// Also the owner's and first members' `joined_at_ms`.
    pub(crate) created_at_ms: i64,
    pub(crate) metadata: &'a Metadata,
}

/// Inserts `user_ids` (none of them a member yet) as members with `role`, with
/// multi-row INSERTs, and counts them into `conversations.member_count`.
async fn insert_members(
    connection: &mut SqliteConnection,
    conversation_id: i64,
    user_ids: &[i64],
    role: Role,
    joined_at_ms: i64,
) -> Result<(), GroupError> {
    if user_ids.is_empty() {
        return Ok(());
    }
    for chunk in user_ids.chunks(MEMBER_ROWS_PER_INSERT) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO members (conversation_id, user_id, role, joined_at_ms) ",
        );
        query.push_values(chunk, |mut row, user_id| {
            row.push_bind(conversation_id)
                .push_bind(*user_id)
                .push_bind(role.as_db())
                .push_bind(joined_at_ms);
        });
        query.build().execute(&mut *connection).await?;
    }
    let added = i64::try_from(user_ids.len()).expect("slice length fits in i64");
    add_to_member_count(connection, conversation_id, added).await
}

/// Adds `delta` to the conversation's `member_count`, beside every insert into or
/// delete from `members`.
async fn add_to_member_count(
    connection: &mut SqliteConnection,
    conversation_id: i64,
    delta: i64,
) -> Result<(), GroupError> {
    sqlx::query("UPDATE conversations SET member_count = member_count + $2 WHERE id = $1")
        .bind(conversation_id)
        .bind(delta)
        .execute(connection)
        .await?;
    Ok(())
}

/// Where [`ids_in`] looks ids up.
#[derive(Debug, Clone, Copy)]
enum IdsOf {
    /// Existing users.
    Users,
    /// Members of this conversation.
    Members(i64),
}

/// Returns the ids among `ids` that `of` holds, deduplicated and ascending.
async fn ids_in(
    connection: &mut SqliteConnection,
    of: IdsOf,
    ids: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let mut query = match of {
            IdsOf::Users => QueryBuilder::<Sqlite>::new("SELECT id FROM users WHERE id IN ("),
            IdsOf::Members(conversation_id) => {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT user_id FROM members WHERE conversation_id = ",
                );
                query.push_bind(conversation_id).push(" AND user_id IN (");
                query
            }
        };
        let mut list = query.separated(", ");
        for id in chunk {
            list.push_bind(*id);
        }
        query.push(")");
        let rows: Vec<i64> = query
            .build_query_scalar()
            .fetch_all(&mut *connection)
            .await?;
        found.extend(rows);
    }
    found.sort_unstable();
    Ok(found)
}

/// Returns the conversation with this id, read in one statement (so that its
/// member ids and count agree), with its members unless it is a channel.
async fn read_conversation(
    connection: &mut SqliteConnection,
    id: i64,
) -> Result<Option<Conversation>, GroupError> {
    // LEFT JOIN: a conversation without members (a group everyone left) still exists.
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

/// Returns `user_id`'s membership of conversation `conversation_id`.
async fn read_member(
    connection: &mut SqliteConnection,
    conversation_id: i64,
    user_id: i64,
) -> Result<Option<Member>, GroupError> {
    let row: Option<(i64, String, i64)> = sqlx::query_as(
        "SELECT user_id, role, joined_at_ms FROM members \
         WHERE conversation_id = $1 AND user_id = $2",
    )
    .bind(conversation_id)
    .bind(user_id)
    .fetch_optional(connection)
    .await?;
    row.map(member_from_row).transpose()
}

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    let migrations = vec![
        Migration::new(
            1,
            "users conversations members".into(),
            MigrationType::Simple,
            include_str!("../../migrations/0001_init.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "groups and channels".into(),
            MigrationType::Simple,
            include_str!("../../migrations/0002_groups.sql").into_sql_str(),
            false,
        ),
    ];
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

fn member_from_row(
    (user_id, role, joined_at_ms): (i64, String, i64),
) -> Result<Member, GroupError> {
    let role = Role::from_db(&role).ok_or(GroupError::Inconsistent("unknown member role"))?;
    Ok(Member {
        user_id,
        role,
        joined_at_ms,
    })
}

/// A conversation's `(id, kind, created_at_ms, name, topic, avatar_url, member_count,
/// version)` and one member id (`None` for a channel or a conversation without members).
type ConversationRow = (
    i64,
    String,
    i64,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
);

/// Folds rows ordered by conversation and member into conversations.
fn fold_conversations(rows: Vec<ConversationRow>) -> Result<Vec<Conversation>, GroupError> {
    let mut conversations: BTreeMap<i64, Conversation> = BTreeMap::new();
    for (id, kind, created_at_ms, name, topic, avatar_url, member_count, version, member_id) in rows
    {
        let conversation = match conversations.entry(id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Conversation {
                id,
                kind: ConversationKind::from_db(&kind)
                    .ok_or(GroupError::Inconsistent("unknown conversation kind"))?,
                member_ids: Vec::new(),
                created_at_ms,
                metadata: Metadata {
                    name,
                    topic,
                    avatar_url,
                },
                member_count: u32::try_from(member_count)
                    .map_err(|_| GroupError::Inconsistent("member count out of range"))?,
                version,
            }),
        };
        conversation.member_ids.extend(member_id);
    }
    let conversations: Vec<Conversation> = conversations.into_values().collect();
    debug_assert!(conversations.iter().all(|c| c.member_ids.is_sorted()));
    debug_assert!(conversations.iter().all(|c| {
        c.kind == ConversationKind::Channel || c.member_ids.len() == c.member_count as usize
    }));
    Ok(conversations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 2 on a database with version 1 data: existing direct
    /// conversations get their member count, version 1 and empty metadata.
    #[tokio::test]
    async fn migration_2_backfills_member_counts() {
        let dir = tempfile::tempdir().unwrap();
        let pool = confab_common::db::open_sqlite(&dir.path().join("group.db"), 1)
            .await
            .unwrap();
        let first: Vec<Migration> = migrator().iter().take(1).cloned().collect();
        let mut v1 = Migrator::with_migrations(first);
        v1.dangerous_set_table_name(MIGRATIONS_TABLE);
        v1.run(&pool).await.unwrap();
        for (id, name) in [(1_i64, "ann"), (2, "ben")] {
            sqlx::query("INSERT INTO users (id, username, created_at_ms) VALUES ($1, $2, 0)")
                .bind(id)
                .bind(name)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO conversations (id, kind, created_at_ms) VALUES (9, 'direct', 5)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO members (conversation_id, user_id, role, joined_at_ms) \
             VALUES (9, 1, 'member', 5), (9, 2, 'member', 5)",
        )
        .execute(&pool)
        .await
        .unwrap();

        let store = SqliteStore::new(pool).await.unwrap();
        let conversation = store.conversation(9).await.unwrap().unwrap();
        assert_eq!(conversation.member_ids, vec![1, 2]);
        assert_eq!((conversation.member_count, conversation.version), (2, 1));
        assert_eq!(conversation.metadata, Metadata::default());
    }
}
