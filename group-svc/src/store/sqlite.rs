//! The SQLite backend of the store: the statements whose SQL is SQLite's own, and
//! the schema.
//!
//! The schema is versioned with sqlx's [`Migrator`], built at run time from the SQL
//! files embedded with `include_str!` (the `migrate!` macro would need sqlx's
//! `macros` feature). Applied versions are recorded in their own table,
//! [`MIGRATIONS_TABLE`], so that other services sharing the same SQLite file can
//! version their schemas independently.
//!
//! Lists of ids are bound as `IN (...)` lists and members inserted with multi-row
//! INSERTs, in chunks that stay under SQLite's limit on bound parameters.

use sqlx::migrate::Migrator;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};

use super::portable::portable_statements;
use super::rows::{UserRow, user_from_row};
use super::{Role, User};
use crate::GroupError;

portable_statements!(sqlx::SqliteConnection);

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_group_svc_migrations";

/// Ids per `IN (...)` list: well under SQLite's limit on bound parameters.
const IDS_PER_QUERY: usize = 500;

/// SQLite's limit on the bound parameters of one statement (since 3.32).
const MAX_BOUND_PARAMETERS: usize = 32_766;

/// Rows per multi-row `INSERT INTO members`: four parameters each.
const MEMBER_ROWS_PER_INSERT: usize = MAX_BOUND_PARAMETERS / 4;

/// Brings the schema on `pool` up to date.
///
/// # Errors
///
/// Fails when a migration fails, or when the database holds a version this binary
/// does not know or a changed one.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), GroupError> {
    migrator().run(pool).await?;
    Ok(())
}

/// Returns the users among `ids` (distinct, ascending) that exist, ordered by id.
pub(super) async fn users_by_ids(
    connection: &mut SqliteConnection,
    ids: &[i64],
) -> Result<Vec<User>, GroupError> {
    let mut users = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT id, username, created_at_ms FROM users WHERE id IN (",
        );
        push_ids(&mut query, chunk);
        query.push(") ORDER BY id");
        let rows: Vec<UserRow> = query.build_query_as().fetch_all(&mut *connection).await?;
        users.extend(rows.into_iter().map(user_from_row));
    }
    Ok(users)
}

/// Returns those of `others` (distinct, ascending) who share a direct conversation
/// or a group (not a channel) with `user_id`, ascending.
pub(super) async fn shared_with(
    connection: &mut SqliteConnection,
    user_id: i64,
    others: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let mut shared = Vec::new();
    for chunk in others.chunks(IDS_PER_QUERY) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT DISTINCT theirs.user_id FROM members mine \
             JOIN conversations c ON c.id = mine.conversation_id AND c.kind <> 'channel' \
             JOIN members theirs ON theirs.conversation_id = mine.conversation_id \
             WHERE mine.user_id = ",
        );
        query.push_bind(user_id).push(" AND theirs.user_id IN (");
        push_ids(&mut query, chunk);
        query.push(") ORDER BY theirs.user_id");
        let rows: Vec<i64> = query
            .build_query_scalar()
            .fetch_all(&mut *connection)
            .await?;
        shared.extend(rows);
    }
    Ok(shared)
}

/// Returns the ids among `ids` (distinct, ascending) that are users, ascending.
pub(super) async fn existing_users(
    connection: &mut SqliteConnection,
    ids: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let mut query = QueryBuilder::<Sqlite>::new("SELECT id FROM users WHERE id IN (");
        push_ids(&mut query, chunk);
        query.push(") ORDER BY id");
        let rows: Vec<i64> = query
            .build_query_scalar()
            .fetch_all(&mut *connection)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Returns the ids among `ids` (distinct, ascending) that are members of the
/// conversation, ascending.
pub(super) async fn members_among(
    connection: &mut SqliteConnection,
    conversation_id: i64,
    ids: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let mut query =
            QueryBuilder::<Sqlite>::new("SELECT user_id FROM members WHERE conversation_id = ");
        query.push_bind(conversation_id).push(" AND user_id IN (");
        push_ids(&mut query, chunk);
        query.push(") ORDER BY user_id");
        let rows: Vec<i64> = query
            .build_query_scalar()
            .fetch_all(&mut *connection)
            .await?;
        found.extend(rows);
    }
    Ok(found)
}

/// Inserts `user_ids` (none of them a member yet) as members with `role`, with
/// multi-row INSERTs; the caller counts them into `member_count`.
pub(super) async fn insert_member_rows(
    connection: &mut SqliteConnection,
    conversation_id: i64,
    user_ids: &[i64],
    role: Role,
    joined_at_ms: i64,
) -> Result<(), GroupError> {
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
    Ok(())
}

/// Appends `ids` to `query` as the comma-separated bound items of an `IN` list.
fn push_ids(query: &mut QueryBuilder<Sqlite>, ids: &[i64]) {
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
}

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    confab_common::db::embedded_migrator(
        MIGRATIONS_TABLE,
        &[
            (
                1,
                "users conversations members",
                include_str!("../../migrations/0001_init.sql"),
            ),
            (
                2,
                "groups and channels",
                include_str!("../../migrations/0002_groups.sql"),
            ),
            (
                3,
                "token revocation",
                include_str!("../../migrations/0003_token_revocation.sql"),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Metadata, Store};

    /// Migration 2 on a database with version 1 data: existing direct
    /// conversations get their member count, version 1 and empty metadata.
    #[tokio::test]
    async fn migration_2_backfills_member_counts() {
        let dir = tempfile::tempdir().unwrap();
        let pool = confab_common::db::open_sqlite(&dir.path().join("group.db"), 1)
            .await
            .unwrap();
        let first: Vec<sqlx::migrate::Migration> = migrator().iter().take(1).cloned().collect();
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

        let store = Store::sqlite(pool).await.unwrap();
        let conversation = store.conversation(9).await.unwrap().unwrap();
        assert_eq!(conversation.member_ids, vec![1, 2]);
        assert_eq!((conversation.member_count, conversation.version), (2, 1));
        assert_eq!(conversation.metadata, Metadata::default());
    }
}
