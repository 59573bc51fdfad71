//! [`Store`], the storage contract: its logic written once, each statement run by
//! the backend module of the store's pool.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};

use super::{
    Change, Conversation, ConversationKind, Member, Metadata, NewConversation, Role, User, sqlite,
};
use crate::GroupError;

/// One thing per backend: a pool, a connection or a transaction, of SQLite or of
/// PostgreSQL.
#[derive(Debug, Clone)]
pub(crate) enum Backend<S, P> {
    /// The embedded mode: one SQLite file per service.
    Sqlite(S),
    /// The distributed mode: a PostgreSQL server.
    Postgres(P),
}

/// Rows of one [`Store::insert_users`]: three bound values each, well below
/// SQLite's 32,766 and PostgreSQL's 65,535 per statement.
pub(crate) const MAX_USERS_PER_INSERT: usize = 1_000;

/// Users, conversations and membership, in either backend.
pub(crate) type Store = Backend<SqlitePool, PgPool>;

/// A connection taken from the store's pool.
type Pooled = Backend<PoolConnection<Sqlite>, PoolConnection<Postgres>>;

/// A transaction; dropping it without [`Tx::commit`] rolls it back.
pub(super) type Tx = Backend<Transaction<'static, Sqlite>, Transaction<'static, Postgres>>;

/// Awaits `$function(connection, arguments...)` of the backend module that matches
/// `$connection`, a `&mut` [`Pooled`] or [`Tx`] (both dereference to the backend's
/// connection type).
macro_rules! run {
    ($connection:expr, $function:ident($($argument:expr),* $(,)?)) => {
        match $connection {
            $crate::store::backend::Backend::Sqlite(connection) => {
                $crate::store::sqlite::$function(connection, $($argument),*).await
            }
            $crate::store::backend::Backend::Postgres(connection) => {
                $crate::store::postgres::$function(connection, $($argument),*).await
            }
        }
    };
}

pub(super) use run;

impl Store {
    /// Returns the store on a SQLite pool, after bringing its schema up to date.
    ///
    /// # Errors
    ///
    /// Fails when a migration fails, or when the database holds a version this
    /// binary does not know or a changed one.
    pub(crate) async fn sqlite(pool: SqlitePool) -> Result<Self, GroupError> {
        sqlite::migrate(&pool).await?;
        Ok(Self::Sqlite(pool))
    }

    /// Returns the store on a PostgreSQL pool whose schema is up to date
    /// (`migrate_postgres`).
    pub(crate) fn postgres(pool: PgPool) -> Self {
        Self::Postgres(pool)
    }

    /// Takes a connection from the pool, for reads outside a transaction.
    async fn acquire(&self) -> Result<Pooled, GroupError> {
        Ok(match self {
            Self::Sqlite(pool) => Backend::Sqlite(pool.acquire().await?),
            Self::Postgres(pool) => Backend::Postgres(pool.acquire().await?),
        })
    }

    /// Starts a transaction (on PostgreSQL, at the server's default isolation level,
    /// READ COMMITTED unless configured otherwise).
    async fn begin(&self) -> Result<Tx, GroupError> {
        Ok(match self {
            Self::Sqlite(pool) => Backend::Sqlite(pool.begin().await?),
            Self::Postgres(pool) => Backend::Postgres(pool.begin().await?),
        })
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
        run!(&mut self.acquire().await?, insert_user(user, password_hash))
    }

    /// Inserts passwordless users in one statement (at most
    /// [`MAX_USERS_PER_INSERT`]), skipping those whose username is taken.
    pub(crate) async fn insert_users(&self, users: &[User]) -> Result<(), GroupError> {
        run!(&mut self.acquire().await?, insert_users(users))
    }

    /// Returns the user with this id.
    pub(crate) async fn user_by_id(&self, id: i64) -> Result<Option<User>, GroupError> {
        run!(&mut self.acquire().await?, user_by_id(id))
    }

    /// Returns the user with this id, the moment (ms) before which their tokens
    /// are refused (0: none), and whether their session `session_id` is revoked.
    pub(crate) async fn token_state(
        &self,
        user_id: i64,
        session_id: &str,
    ) -> Result<Option<(User, i64, bool)>, GroupError> {
        run!(&mut self.acquire().await?, token_state(user_id, session_id))
    }

    /// Refuses every token of `user_id` minted before `before_ms`; returns
    /// `false` when there is no such user.
    pub(crate) async fn revoke_tokens_before(
        &self,
        user_id: i64,
        before_ms: i64,
    ) -> Result<bool, GroupError> {
        run!(
            &mut self.acquire().await?,
            revoke_tokens_before(user_id, before_ms)
        )
    }

    /// Refuses the tokens of one session of `user_id` until `expires_at_ms`, and
    /// forgets revoked sessions whose tokens have all expired by `now_ms`.
    pub(crate) async fn revoke_session(
        &self,
        user_id: i64,
        session_id: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        let mut tx = self.begin().await?;
        run!(&mut tx, sweep_revoked_sessions(now_ms))?;
        run!(
            &mut tx,
            insert_revoked_session(user_id, session_id, expires_at_ms)
        )?;
        tx.commit().await
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
        run!(&mut self.acquire().await?, credentials(username))
    }

    /// Returns the users among `ids` that exist, ordered by id.
    pub(crate) async fn users_by_ids(&self, ids: &[i64]) -> Result<Vec<User>, GroupError> {
        let ids = distinct(ids);
        run!(&mut self.acquire().await?, users_by_ids(&ids))
    }

    /// Returns those of `others` who share a direct conversation or a group (not
    /// a channel) with `user_id`, ascending.
    pub(crate) async fn shared_with(
        &self,
        user_id: i64,
        others: &[i64],
    ) -> Result<Vec<i64>, GroupError> {
        let others = distinct(others);
        run!(&mut self.acquire().await?, shared_with(user_id, &others))
    }

    /// Returns the id of the direct conversation of `user_lo < user_hi`, if any.
    pub(crate) async fn direct_conversation(
        &self,
        user_lo: i64,
        user_hi: i64,
    ) -> Result<Option<i64>, GroupError> {
        debug_assert!(user_lo < user_hi);
        run!(
            &mut self.acquire().await?,
            direct_conversation(user_lo, user_hi)
        )
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
        let mut tx = self.begin().await?;
        let new = NewConversation {
            id: conversation_id,
            kind: ConversationKind::Direct,
            created_at_ms: now_ms,
            metadata: &Metadata::default(),
        };
        // A write first: SQLite then takes the write lock at once (waiting under the
        // busy timeout), instead of failing a read transaction that tries to upgrade.
        run!(&mut tx, insert_conversation(new))?;
        let claimed = run!(
            &mut tx,
            claim_direct_pair(user_lo, user_hi, conversation_id)
        )?;
        if !claimed {
            // Another call created the pair's conversation first.
            tx.rollback().await?;
            return self
                .direct_conversation(user_lo, user_hi)
                .await?
                .ok_or(GroupError::Inconsistent("direct pair vanished"));
        }
        tx.insert_members(conversation_id, &[user_lo, user_hi], Role::Member, now_ms)
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
        let mut tx = self.begin().await?;
        run!(&mut tx, insert_conversation(new))?;
        tx.insert_members(new.id, &[owner_id], Role::Owner, new.created_at_ms)
            .await?;
        tx.insert_members(new.id, member_ids, Role::Member, new.created_at_ms)
            .await?;
        let conversation = run!(&mut tx, read_conversation(new.id))?
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
        let tx = self.begin().await?;
        Change::begin(tx, id).await
    }

    /// Returns the conversation with this id, with its members unless it is a channel.
    pub(crate) async fn conversation(&self, id: i64) -> Result<Option<Conversation>, GroupError> {
        run!(&mut self.acquire().await?, read_conversation(id))
    }

    /// Returns every conversation `user_id` is a member of, with its members unless
    /// it is a channel, ordered by conversation id.
    pub(crate) async fn conversations_of(
        &self,
        user_id: i64,
    ) -> Result<Vec<Conversation>, GroupError> {
        run!(&mut self.acquire().await?, conversations_of(user_id))
    }

    /// Returns whether conversation `id` exists.
    pub(crate) async fn conversation_exists(&self, id: i64) -> Result<bool, GroupError> {
        run!(&mut self.acquire().await?, conversation_exists(id))
    }

    /// Returns `user_id`'s membership of conversation `conversation_id`.
    pub(crate) async fn member(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Option<Member>, GroupError> {
        run!(
            &mut self.acquire().await?,
            read_member(conversation_id, user_id)
        )
    }

    /// Returns up to `limit` members of the conversation with user ids above
    /// `after_user_id`, ascending.
    pub(crate) async fn members(
        &self,
        conversation_id: i64,
        after_user_id: i64,
        limit: u32,
    ) -> Result<Vec<Member>, GroupError> {
        run!(
            &mut self.acquire().await?,
            members(conversation_id, after_user_id, limit)
        )
    }
}

impl Tx {
    /// Inserts `user_ids` (distinct existing users, none of them a member yet) as
    /// members with `role`, and counts them into `conversations.member_count`.
    pub(super) async fn insert_members(
        &mut self,
        conversation_id: i64,
        user_ids: &[i64],
        role: Role,
        joined_at_ms: i64,
    ) -> Result<(), GroupError> {
        if user_ids.is_empty() {
            return Ok(());
        }
        run!(
            &mut *self,
            insert_member_rows(conversation_id, user_ids, role, joined_at_ms)
        )?;
        let added = i64::try_from(user_ids.len()).expect("slice length fits in i64");
        run!(&mut *self, add_to_member_count(conversation_id, added))
    }

    /// Commits the transaction.
    pub(super) async fn commit(self) -> Result<(), GroupError> {
        match self {
            Self::Sqlite(tx) => tx.commit().await?,
            Self::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls the transaction back.
    pub(super) async fn rollback(self) -> Result<(), GroupError> {
        match self {
            Self::Sqlite(tx) => tx.rollback().await?,
            Self::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// Returns `ids` deduplicated and ascending, as the backends' id-list statements
/// take them.
pub(super) fn distinct(ids: &[i64]) -> Vec<i64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
impl Store {
    /// Runs `sql`, with `parameters` bound to `$1`, `$2`, ... in order, and returns
    /// the number of rows it changed; for tests that change tables directly.
    pub(crate) async fn execute_for_tests(&self, sql: &'static str, parameters: &[i64]) -> u64 {
        match self {
            Self::Sqlite(pool) => {
                let mut query = sqlx::query(sql);
                for parameter in parameters {
                    query = query.bind(*parameter);
                }
                query.execute(pool).await.unwrap().rows_affected()
            }
            Self::Postgres(pool) => {
                let mut query = sqlx::query(sql);
                for parameter in parameters {
                    query = query.bind(*parameter);
                }
                query.execute(pool).await.unwrap().rows_affected()
            }
        }
    }

    /// Returns the one BIGINT that `sql` selects, with `parameters` bound to `$1`,
    /// `$2`, ... in order; for tests that inspect tables directly.
    pub(crate) async fn scalar_for_tests(&self, sql: &'static str, parameters: &[i64]) -> i64 {
        match self {
            Self::Sqlite(pool) => {
                let mut query = sqlx::query_scalar(sql);
                for parameter in parameters {
                    query = query.bind(*parameter);
                }
                query.fetch_one(pool).await.unwrap()
            }
            Self::Postgres(pool) => {
                let mut query = sqlx::query_scalar(sql);
                for parameter in parameters {
                    query = query.bind(*parameter);
                }
                query.fetch_one(pool).await.unwrap()
            }
        }
    }
}
