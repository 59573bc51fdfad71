//! One change of a conversation's membership or metadata, as a transaction.

use super::backend::{Tx, distinct, run};
use super::{Conversation, ConversationKind, Member, Metadata, Role};
use crate::GroupError;

/// A change of one conversation in progress: a transaction whose first statement
/// bumped the conversation's version, so it holds the lock throughout (SQLite's
/// write lock, PostgreSQL's row lock) and the conversation cannot change under it.
///
/// The member count it checks limits against is read under that lock, and every
/// insert into or delete from the members of an existing conversation runs inside a
/// change; so concurrent adds are counted one after the other on both backends.
///
/// [`Change::commit`] keeps the change and its new version; [`Change::unchanged`],
/// an error (`?`) or a drop roll everything back, the version bump included.
#[derive(Debug)]
pub(crate) struct Change {
    /// Open until `commit` or `unchanged`; rolls back on drop.
    tx: Tx,
    /// The conversation being changed.
    conversation_id: i64,
    /// Its kind, which never changes.
    kind: ConversationKind,
    /// As of this change: adjusted by its own inserts and deletes.
    member_count: u32,
    /// As before this change.
    metadata: Metadata,
}

impl Change {
    /// Bumps the version of conversation `id` inside `tx`; `None` when there is no
    /// such conversation.
    pub(super) async fn begin(mut tx: Tx, id: i64) -> Result<Option<Self>, GroupError> {
        let Some(head) = run!(&mut tx, bump_version(id))? else {
            return Ok(None);
        };
        Ok(Some(Self {
            tx,
            conversation_id: id,
            kind: head.kind,
            member_count: head.member_count,
            metadata: head.metadata,
        }))
    }

    /// Returns the kind of the conversation.
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
        run!(&mut self.tx, read_member(self.conversation_id, user_id))
    }

    /// Returns the ids among `ids` that are users, deduplicated and ascending.
    pub(crate) async fn existing_users(&mut self, ids: &[i64]) -> Result<Vec<i64>, GroupError> {
        let ids = distinct(ids);
        run!(&mut self.tx, existing_users(&ids))
    }

    /// Returns the ids among `ids` that are members, deduplicated and ascending.
    pub(crate) async fn members_among(&mut self, ids: &[i64]) -> Result<Vec<i64>, GroupError> {
        let ids = distinct(ids);
        run!(&mut self.tx, members_among(self.conversation_id, &ids))
    }

    /// Adds `user_ids` (distinct existing users, none a member) with `role`.
    pub(crate) async fn insert_members(
        &mut self,
        user_ids: &[i64],
        role: Role,
        joined_at_ms: i64,
    ) -> Result<(), GroupError> {
        self.tx
            .insert_members(self.conversation_id, user_ids, role, joined_at_ms)
            .await?;
        let added = u32::try_from(user_ids.len()).expect("checked against the size limit");
        self.member_count += added;
        Ok(())
    }

    /// Removes member `user_id`.
    pub(crate) async fn delete_member(&mut self, user_id: i64) -> Result<(), GroupError> {
        if !run!(&mut self.tx, delete_member(self.conversation_id, user_id))? {
            return Err(GroupError::Inconsistent("deleted member was not a member"));
        }
        run!(&mut self.tx, add_to_member_count(self.conversation_id, -1))?;
        self.member_count -= 1;
        Ok(())
    }

    /// Sets member `user_id`'s role.
    pub(crate) async fn set_role(&mut self, user_id: i64, role: Role) -> Result<(), GroupError> {
        run!(&mut self.tx, set_role(self.conversation_id, user_id, role))
    }

    /// Returns the longest-standing member with `role`: earliest `joined_at_ms`,
    /// then lowest user id.
    pub(crate) async fn senior_member(&mut self, role: Role) -> Result<Option<i64>, GroupError> {
        run!(&mut self.tx, senior_member(self.conversation_id, role))
    }

    /// Replaces the name, topic and avatar URL.
    pub(crate) async fn set_metadata(&mut self, metadata: &Metadata) -> Result<(), GroupError> {
        run!(&mut self.tx, set_metadata(self.conversation_id, metadata))
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

    /// Returns the conversation as this change sees it.
    async fn read(&mut self) -> Result<Conversation, GroupError> {
        let conversation = run!(&mut self.tx, read_conversation(self.conversation_id))?
            .ok_or(GroupError::Inconsistent("changed conversation vanished"))?;
        debug_assert_eq!(conversation.member_count, self.member_count);
        Ok(conversation)
    }
}
