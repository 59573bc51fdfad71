//! One change of a conversation's membership or metadata, as a transaction.

use sqlx::{Sqlite, Transaction};

use super::{IdsOf, add_to_member_count, ids_in, insert_members, read_conversation, read_member};
use crate::GroupError;
use crate::store::{Conversation, ConversationKind, Member, Metadata, Role};

/// A change of one conversation in progress: a transaction whose first statement
/// bumped the conversation's version, so it holds the write lock throughout and
/// what it reads cannot change under it.
///
/// [`Change::commit`] keeps the change and its new version; [`Change::unchanged`],
/// an error (`?`) or a drop roll everything back, the version bump included.
#[derive(Debug)]
pub(crate) struct Change {
    /// Open until `commit` or `unchanged`; rolls back on drop.
    tx: Transaction<'static, Sqlite>,
    conversation_id: i64,
    kind: ConversationKind,
    /// As of this change: adjusted by its own inserts and deletes.
    member_count: u32,
    /// As before this change.
    metadata: Metadata,
}

impl Change {
    /// Bumps the version of conversation `id` inside `tx`; `None` when there is no
    /// such conversation.
    pub(super) async fn begin(
        mut tx: Transaction<'static, Sqlite>,
        id: i64,
    ) -> Result<Option<Self>, GroupError> {
        // The UPDATE comes first so that the lock is taken before anything is read:
        // SQLite's writer lock (no read-then-upgrade failures), PostgreSQL's row lock.
        let row: Option<(String, i64, String, String, String)> = sqlx::query_as(
            "UPDATE conversations SET version = version + 1 WHERE id = $1 \
             RETURNING kind, member_count, name, topic, avatar_url",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((kind, member_count, name, topic, avatar_url)) = row else {
            return Ok(None);
        };
        Ok(Some(Self {
            tx,
            conversation_id: id,
            kind: ConversationKind::from_db(&kind)
                .ok_or(GroupError::Inconsistent("unknown conversation kind"))?,
            member_count: u32::try_from(member_count)
                .map_err(|_| GroupError::Inconsistent("member count out of range"))?,
            metadata: Metadata {
                name,
                topic,
                avatar_url,
            },
        }))
    }

    pub(crate) fn kind(&self) -> ConversationKind {
        self.kind
    }

    /// Returns the number of members, the changes so far included.
    pub(crate) fn member_count(&self) -> u32 {
        self.member_count
    }

    /// Returns the metadata as it was before this change.
    pub(crate) fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Returns `user_id`'s membership.
    pub(crate) async fn member(&mut self, user_id: i64) -> Result<Option<Member>, GroupError> {
        read_member(&mut self.tx, self.conversation_id, user_id).await
    }

    /// Returns the ids among `ids` that are users, deduplicated and ascending.
    pub(crate) async fn existing_users(&mut self, ids: &[i64]) -> Result<Vec<i64>, GroupError> {
        ids_in(&mut self.tx, IdsOf::Users, ids).await
    }

    /// Returns the ids among `ids` that are members, deduplicated and ascending.
    pub(crate) async fn members_among(&mut self, ids: &[i64]) -> Result<Vec<i64>, GroupError> {
        ids_in(&mut self.tx, IdsOf::Members(self.conversation_id), ids).await
    }

    /// Adds `user_ids` (distinct existing users, none a member) with `role`.
    pub(crate) async fn insert_members(
        &mut self,
        user_ids: &[i64],
        role: Role,
        joined_at_ms: i64,
    ) -> Result<(), GroupError> {
        insert_members(
            &mut self.tx,
            self.conversation_id,
            user_ids,
            role,
            joined_at_ms,
        )
        .await?;
        let added = u32::try_from(user_ids.len()).expect("checked against the size limit");
        self.member_count += added;
        Ok(())
    }

    /// Removes member `user_id`.
    pub(crate) async fn delete_member(&mut self, user_id: i64) -> Result<(), GroupError> {
        let deleted =
            sqlx::query("DELETE FROM members WHERE conversation_id = $1 AND user_id = $2")
                .bind(self.conversation_id)
                .bind(user_id)
                .execute(&mut *self.tx)
                .await?
                .rows_affected();
        if deleted != 1 {
            return Err(GroupError::Inconsistent("deleted member was not a member"));
        }
        add_to_member_count(&mut self.tx, self.conversation_id, -1).await?;
        self.member_count -= 1;
        Ok(())
    }

    /// Sets member `user_id`'s role.
    pub(crate) async fn set_role(&mut self, user_id: i64, role: Role) -> Result<(), GroupError> {
        sqlx::query("UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2")
            .bind(self.conversation_id)
            .bind(user_id)
            .bind(role.as_db())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Returns the longest-standing member with `role`: earliest `joined_at_ms`,
    /// then lowest user id.
    pub(crate) async fn senior_member(&mut self, role: Role) -> Result<Option<i64>, GroupError> {
        // An index seek on members_seniority, even in a channel of a million members.
        let user_id = sqlx::query_scalar(
            "SELECT user_id FROM members WHERE conversation_id = $1 AND role = $2 \
             ORDER BY joined_at_ms, user_id \
             LIMIT 1",
        )
        .bind(self.conversation_id)
        .bind(role.as_db())
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(user_id)
    }

    /// Replaces the name, topic and avatar URL.
    pub(crate) async fn set_metadata(&mut self, metadata: &Metadata) -> Result<(), GroupError> {
        sqlx::query(
            "UPDATE conversations SET name = $2, topic = $3, avatar_url = $4 WHERE id = $1",
        )
        .bind(self.conversation_id)
        .bind(&metadata.name)
        .bind(&metadata.topic)
        .bind(&metadata.avatar_url)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Commits the change and returns the conversation after it, with its new version.
    pub(crate) async fn commit(mut self) -> Result<Conversation, GroupError> {
        let conversation = self.read().await?;
        self.tx.commit().await?;
        Ok(conversation)
    }

    /// Rolls back a change that turned out to change nothing, and returns the
    /// conversation with its version as before.
    pub(crate) async fn unchanged(mut self) -> Result<Conversation, GroupError> {
        let mut conversation = self.read().await?;
        self.tx.rollback().await?;
        // Read under the lock: the stored version is the bumped one.
        conversation.version -= 1;
        Ok(conversation)
    }

    async fn read(&mut self) -> Result<Conversation, GroupError> {
        let conversation = read_conversation(&mut self.tx, self.conversation_id)
            .await?
            .ok_or(GroupError::Inconsistent("changed conversation vanished"))?;
        debug_assert_eq!(conversation.member_count, self.member_count);
        Ok(conversation)
    }
}
