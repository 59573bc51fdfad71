//! The conversion of result rows, the same on both backends, into records.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use super::{Conversation, ConversationKind, Member, Metadata, Role, User};
use crate::GroupError;

/// A user's `(id, username, created_at_ms)`.
pub(super) type UserRow = (i64, String, i64);

/// A member's `(user_id, role, joined_at_ms)`.
pub(super) type MemberRow = (i64, String, i64);

/// A conversation's `(id, kind, created_at_ms, name, topic, avatar_url, member_count,
/// version)` and one member id (`None` for a channel or a conversation without members).
pub(super) type ConversationRow = (
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

/// What a change reads of its conversation while it bumps the version: `(kind,
/// member_count, name, topic, avatar_url)`.
pub(super) type ChangeRow = (String, i64, String, String, String);

/// What a change knows of its conversation from the start.
#[derive(Debug)]
pub(super) struct ChangeHead {
    /// The conversation's kind, which never changes.
    pub(super) kind: ConversationKind,
    /// The number of members before the change.
    pub(super) member_count: u32,
    /// The metadata before the change.
    pub(super) metadata: Metadata,
}

/// Returns the user of a [`UserRow`].
pub(super) fn user_from_row((id, username, created_at_ms): UserRow) -> User {
    User {
        id,
        username,
        created_at_ms,
    }
}

/// Returns the member of a [`MemberRow`]; an unknown role is an inconsistency.
pub(super) fn member_from_row(
    (user_id, role, joined_at_ms): MemberRow,
) -> Result<Member, GroupError> {
    let role = Role::from_db(&role).ok_or(GroupError::Inconsistent("unknown member role"))?;
    Ok(Member {
        user_id,
        role,
        joined_at_ms,
    })
}

/// Returns what a change knows of its conversation, from a [`ChangeRow`].
pub(super) fn change_head_from_row(
    (kind, member_count, name, topic, avatar_url): ChangeRow,
) -> Result<ChangeHead, GroupError> {
    Ok(ChangeHead {
        kind: kind_from_db(&kind)?,
        member_count: member_count_from_db(member_count)?,
        metadata: Metadata {
            name,
            topic,
            avatar_url,
        },
    })
}

/// Parses a stored `conversations.kind`; an unknown kind is an inconsistency.
fn kind_from_db(kind: &str) -> Result<ConversationKind, GroupError> {
    ConversationKind::from_db(kind).ok_or(GroupError::Inconsistent("unknown conversation kind"))
}

/// Checks a stored `conversations.member_count` against the range of a count.
fn member_count_from_db(member_count: i64) -> Result<u32, GroupError> {
    u32::try_from(member_count).map_err(|_| GroupError::Inconsistent("member count out of range"))
}

/// Folds rows ordered by conversation and member into conversations.
pub(super) fn fold_conversations(
    rows: Vec<ConversationRow>,
) -> Result<Vec<Conversation>, GroupError> {
    let mut conversations: BTreeMap<i64, Conversation> = BTreeMap::new();
    for (id, kind, created_at_ms, name, topic, avatar_url, member_count, version, member_id) in rows
    {
        let conversation = match conversations.entry(id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Conversation {
                id,
                kind: kind_from_db(&kind)?,
                member_ids: Vec::new(),
                created_at_ms,
                metadata: Metadata {
                    name,
                    topic,
                    avatar_url,
                },
                member_count: member_count_from_db(member_count)?,
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
