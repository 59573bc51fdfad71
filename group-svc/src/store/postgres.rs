//! The PostgreSQL backend of the store: the statements whose SQL is PostgreSQL's
//! own, and the schema.
//!
//! Lists of ids are bound as one `BIGINT[]` array (`= ANY($1)`, `UNNEST($2)`), so
//! that every statement has a fixed text and a fixed number of parameters, whatever
//! the number of ids.
//!
//! The schema in `migrations-postgres/` is versioned with sqlx's [`Migrator`] in its
//! own table, [`MIGRATIONS_TABLE`], as on SQLite; its versions are counted apart
//! from SQLite's. [`migrate`] runs it; opening the store does not, so that one
//! deployment step (not every process start) changes the schema.
//!
//! Every write transaction is correct under READ COMMITTED: unique keys decide
//! races on usernames and direct pairs (`ON CONFLICT DO NOTHING` waits for the
//! other insert), and a change of an existing conversation first updates its row,
//! which holds the row lock to the end (see `bump_version`).

use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool};

use super::portable::portable_statements;
use super::rows::{UserRow, user_from_row};
use super::{Role, User};
use crate::GroupError;

portable_statements!(sqlx::PgConnection);

/// The table in which this service's applied schema versions are recorded.
const MIGRATIONS_TABLE: &str = "_group_svc_migrations";

/// Brings the schema on `pool` up to date; does nothing when it is.
///
/// sqlx holds an advisory lock while it migrates, so that processes starting
/// together do not migrate twice.
///
/// # Errors
///
/// Fails when a migration fails, or when the database holds a version this binary
/// does not know or a changed one.
pub(crate) async fn migrate(pool: &PgPool) -> Result<(), GroupError> {
    migrator().run(pool).await?;
    Ok(())
}

/// Returns the users among `ids` (distinct, ascending) that exist, ordered by id.
pub(super) async fn users_by_ids(
    connection: &mut PgConnection,
    ids: &[i64],
) -> Result<Vec<User>, GroupError> {
    let rows: Vec<UserRow> = sqlx::query_as(
        "SELECT id, username, created_at_ms FROM users WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(connection)
    .await?;
    Ok(rows.into_iter().map(user_from_row).collect())
}

/// Returns those of `others` (distinct, ascending) who share a direct conversation
/// or a group (not a channel) with `user_id`, ascending.
pub(super) async fn shared_with(
    connection: &mut PgConnection,
    user_id: i64,
    others: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let shared = sqlx::query_scalar(
        "SELECT DISTINCT theirs.user_id FROM members mine \
         JOIN conversations c ON c.id = mine.conversation_id AND c.kind <> 'channel' \
         JOIN members theirs ON theirs.conversation_id = mine.conversation_id \
         WHERE mine.user_id = $1 AND theirs.user_id = ANY($2) \
         ORDER BY theirs.user_id",
    )
    .bind(user_id)
    .bind(others)
    .fetch_all(connection)
    .await?;
    Ok(shared)
}

/// Returns the ids among `ids` (distinct, ascending) that are users, ascending.
pub(super) async fn existing_users(
    connection: &mut PgConnection,
    ids: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let found = sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1) ORDER BY id")
        .bind(ids)
        .fetch_all(connection)
        .await?;
    Ok(found)
}

/// Returns the ids among `ids` (distinct, ascending) that are members of the
/// conversation, ascending.
pub(super) async fn members_among(
    connection: &mut PgConnection,
    conversation_id: i64,
    ids: &[i64],
) -> Result<Vec<i64>, GroupError> {
    let found = sqlx::query_scalar(
        "SELECT user_id FROM members \
         WHERE conversation_id = $1 AND user_id = ANY($2) \
         ORDER BY user_id",
    )
    .bind(conversation_id)
    .bind(ids)
    .fetch_all(connection)
    .await?;
    Ok(found)
}

/// Inserts `user_ids` (none of them a member yet) as members with `role`, in one
/// statement; the caller counts them into `member_count`.
pub(super) async fn insert_member_rows(
    connection: &mut PgConnection,
    conversation_id: i64,
    user_ids: &[i64],
    role: Role,
    joined_at_ms: i64,
) -> Result<(), GroupError> {
    sqlx::query(
        "INSERT INTO members (conversation_id, user_id, role, joined_at_ms) \
         SELECT $1, user_id, $3, $4 FROM UNNEST($2::BIGINT[]) AS new (user_id)",
    )
    .bind(conversation_id)
    .bind(user_ids)
    .bind(role.as_db())
    .bind(joined_at_ms)
    .execute(connection)
    .await?;
    Ok(())
}

/// Returns the migrations of this service, embedded in the binary.
fn migrator() -> Migrator {
    confab_common::db::embedded_migrator(
        MIGRATIONS_TABLE,
        &[
            (
                1,
                "users conversations members groups",
                include_str!("../../migrations-postgres/0001_init.sql"),
            ),
            (
                2,
                "token revocation",
                include_str!("../../migrations-postgres/0002_token_revocation.sql"),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use confab_common::testkit::PgDatabase;

    use super::*;

    /// Migrating creates the schema on an empty database and records every version in
    /// `_group_svc_migrations`; migrating again, also from two pools at once, changes
    /// nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrate_is_idempotent() {
        let database = PgDatabase::create().await;
        let pool = PgPool::connect(&database.url).await.unwrap();
        let other = PgPool::connect(&database.url).await.unwrap();
        let (first, second) = tokio::join!(migrate(&pool), migrate(&other));
        let again = migrate(&pool).await;
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _group_svc_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public' \
             AND table_name IN ('users', 'conversations', 'members', 'direct_pairs')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        other.close().await;
        database.drop_database().await;

        first.unwrap();
        second.unwrap();
        again.unwrap();
        assert_eq!(versions, vec![1, 2]);
        assert_eq!(tables, 4);
    }
}
