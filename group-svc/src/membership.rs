//! Membership of groups and channels: adding, removing, leaving, joining, roles,
//! and member lookups; and [`MembershipChange`], what every change returns.
//!
//! Every change runs in one store transaction ([`Change`]) that first bumps the
//! conversation's version, so that concurrent changes of one conversation are
//! serialised and each real change adds exactly one to the version. A change that
//! changes nothing rolls back: no notice, version unchanged.
//!
//! A caller who is not a member of the conversation gets
//! [`GroupError::NoSuchConversation`], exactly as for an unknown id, so that
//! non-members cannot probe which conversations exist.

use confab_common::now_ms;

use crate::store::{Change, Conversation, ConversationKind, Member, Metadata, Role};
use crate::{GroupError, GroupService};

/// Page size of [`GroupService::list_members`] when none is asked for.
const DEFAULT_MEMBERS_PAGE: u32 = 100;
/// Largest page of [`GroupService::list_members`].
const MAX_MEMBERS_PAGE: u32 = 1000;

/// A committed change of a conversation's membership or metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MembershipChange {
    /// The conversation after the change.
    pub(crate) conversation: Conversation,
    /// What to write into the conversation for its members; `None` when the call
    /// changed nothing.
    pub(crate) notice: Option<Notice>,
    /// Users who stopped being members with this change.
    pub(crate) removed_user_ids: Vec<i64>,
}

impl MembershipChange {
    /// Returns the answer to a call that changed nothing.
    pub(crate) fn nothing(conversation: Conversation) -> Self {
        Self {
            conversation,
            notice: None,
            removed_user_ids: Vec::new(),
        }
    }
}

/// What changed, by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    /// Who made the change.
    pub(crate) actor_id: i64,
    pub(crate) kind: NoticeKind,
}

/// The kinds of change a notice reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoticeKind {
    Created,
    /// These users became members (ascending).
    MembersAdded(Vec<i64>),
    /// The actor removed this member.
    MemberRemoved(i64),
    /// The actor left.
    MemberLeft,
    /// The metadata after the change.
    MetadataChanged(Metadata),
    RoleChanged {
        user_id: i64,
        role: Role,
    },
}

impl GroupService {
    /// Starts a change of a group or channel by one of its members, and returns the
    /// change and the actor's membership.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`] for an unknown conversation and for a
    /// non-member alike; [`GroupError::DirectIsFixed`] for a direct conversation.
    pub(crate) async fn begin_as_member(
        &self,
        conversation_id: i64,
        actor_id: i64,
    ) -> Result<(Change, Member), GroupError> {
        let mut change = self
            .inner
            .store
            .begin_change(conversation_id)
            .await?
            .ok_or(GroupError::NoSuchConversation)?;
        let actor = change
            .member(actor_id)
            .await?
            .ok_or(GroupError::NoSuchConversation)?;
        if change.kind() == ConversationKind::Direct {
            return Err(GroupError::DirectIsFixed);
        }
        Ok((change, actor))
    }

    /// Adds users to a group or channel as members.
    ///
    /// - The actor must be an admin or the owner.
    /// - Every user must exist; users who are members already are skipped. When
    ///   nobody is new, the notice is unset and the version stays (so a retried
    ///   call is harmless).
    /// - The conversation may not grow past its kind's size limit; concurrent adds
    ///   are counted one after the other, under the conversation's lock.
    /// - The notice is `MembersAdded` with the new members, ascending.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`] (unknown, or the actor is not a member),
    /// [`GroupError::DirectIsFixed`], [`GroupError::Forbidden`] for a plain member,
    /// [`GroupError::NoSuchUser`], [`GroupError::TooManyMembers`], or an internal
    /// error.
    pub(crate) async fn add_members(
        &self,
        conversation_id: i64,
        actor_id: i64,
        user_ids: &[i64],
    ) -> Result<MembershipChange, GroupError> {
        let (mut change, actor) = self.begin_as_member(conversation_id, actor_id).await?;
        if !actor.role.is_admin() {
            return Err(GroupError::Forbidden("only admins add members"));
        }
        let mut requested = user_ids.to_vec();
        requested.sort_unstable();
        requested.dedup();
        // More distinct users than the limit cannot all be members already: refuse
        // before looking any of them up.
        self.inner.limits.check(change.kind(), requested.len())?;
        if change.existing_users(&requested).await?.len() != requested.len() {
            return Err(GroupError::NoSuchUser);
        }
        let already = change.members_among(&requested).await?;
        let new: Vec<i64> = requested
            .into_iter()
            .filter(|id| already.binary_search(id).is_err())
            .collect();
        if new.is_empty() {
            return Ok(MembershipChange::nothing(change.unchanged().await?));
        }
        let size = change.member_count() as usize + new.len();
        self.inner.limits.check(change.kind(), size)?;
        change.insert_members(&new, Role::Member, now_ms()).await?;
        Ok(MembershipChange {
            conversation: change.commit().await?,
            notice: Some(Notice {
                actor_id,
                kind: NoticeKind::MembersAdded(new),
            }),
            removed_user_ids: Vec::new(),
        })
    }

    /// Removes a member from a group or channel, or, when `user_id` is the actor,
    /// lets the actor leave.
    ///
    /// Leaving (any member):
    /// - The notice is `MemberLeft` by the leaver.
    /// - An owner who leaves hands ownership to the longest-standing admin, or, with
    ///   no admin, the longest-standing member (earliest `joined_at_ms`, then lowest
    ///   user id). The notice does not report the new owner.
    /// - The last member may leave: the conversation stays, empty.
    ///
    /// Removing someone else:
    /// - The actor must be an admin or the owner, and the user a member.
    /// - Nobody removes the owner; only the owner removes admins.
    /// - The notice is `MemberRemoved` with the user, by the actor.
    ///
    /// Either way `removed_user_ids` is `[user_id]`.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`] (unknown, or the actor is not a member),
    /// [`GroupError::DirectIsFixed`], [`GroupError::Forbidden`],
    /// [`GroupError::NotAMember`] for a target who is not a member, or an internal
    /// error.
    pub(crate) async fn remove_member(
        &self,
        conversation_id: i64,
        actor_id: i64,
        user_id: i64,
    ) -> Result<MembershipChange, GroupError> {
        let (mut change, actor) = self.begin_as_member(conversation_id, actor_id).await?;
        let kind = if user_id == actor_id {
            change.delete_member(actor_id).await?;
            if actor.role == Role::Owner {
                let successor = match change.senior_member(Role::Admin).await? {
                    Some(admin) => Some(admin),
                    None => change.senior_member(Role::Member).await?,
                };
                if let Some(successor) = successor {
                    change.set_role(successor, Role::Owner).await?;
                }
            }
            NoticeKind::MemberLeft
        } else {
            if !actor.role.is_admin() {
                return Err(GroupError::Forbidden("only admins remove members"));
            }
            let target = change
                .member(user_id)
                .await?
                .ok_or(GroupError::NotAMember)?;
            match target.role {
                Role::Owner => return Err(GroupError::Forbidden("the owner cannot be removed")),
                Role::Admin if actor.role != Role::Owner => {
                    return Err(GroupError::Forbidden("only the owner removes admins"));
                }
                Role::Admin | Role::Member => {}
            }
            change.delete_member(user_id).await?;
            NoticeKind::MemberRemoved(user_id)
        };
        Ok(MembershipChange {
            conversation: change.commit().await?,
            notice: Some(Notice { actor_id, kind }),
            removed_user_ids: vec![user_id],
        })
    }

    /// Makes `user_id` a member of a channel, by themselves.
    ///
    /// - Channels only: groups are joined by invitation (an admin adds).
    /// - Idempotent: for a member already, the notice is unset and the version stays.
    /// - The channel may not grow past the channel size limit.
    /// - The notice is `MembersAdded` with the user, by the user.
    ///
    /// A direct conversation answers a non-member as if it did not exist, and a
    /// member with [`GroupError::DirectIsFixed`].
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`] (also for a group or direct conversation
    /// the user is not in), [`GroupError::Forbidden`] for a member of a group,
    /// [`GroupError::DirectIsFixed`], [`GroupError::NoSuchUser`],
    /// [`GroupError::TooManyMembers`], or an internal error.
    pub(crate) async fn join(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<MembershipChange, GroupError> {
        let mut change = self
            .inner
            .store
            .begin_change(conversation_id)
            .await?
            .ok_or(GroupError::NoSuchConversation)?;
        let membership = change.member(user_id).await?;
        match change.kind() {
            ConversationKind::Channel => {}
            // A non-member learns nothing about a group, not even that it exists.
            ConversationKind::Group | ConversationKind::Direct if membership.is_none() => {
                return Err(GroupError::NoSuchConversation);
            }
            ConversationKind::Group => {
                return Err(GroupError::Forbidden("groups are joined by invitation"));
            }
            ConversationKind::Direct => return Err(GroupError::DirectIsFixed),
        }
        if membership.is_some() {
            return Ok(MembershipChange::nothing(change.unchanged().await?));
        }
        if change.existing_users(&[user_id]).await?.is_empty() {
            return Err(GroupError::NoSuchUser);
        }
        let size = change.member_count() as usize + 1;
        self.inner.limits.check(change.kind(), size)?;
        change
            .insert_members(&[user_id], Role::Member, now_ms())
            .await?;
        Ok(MembershipChange {
            conversation: change.commit().await?,
            notice: Some(Notice {
                actor_id: user_id,
                kind: NoticeKind::MembersAdded(vec![user_id]),
            }),
            removed_user_ids: Vec::new(),
        })
    }

    /// Makes a member of a group or channel an admin, or an admin a plain member.
    ///
    /// - `role` is [`Role::Admin`] or [`Role::Member`]: ownership is not transferred
    ///   this way.
    /// - The actor must be the owner; the user must be a member other than the
    ///   owner (the owner's role never changes here).
    /// - The notice is `RoleChanged` with the user and the role, by the owner. When
    ///   the user has that role already, the notice is unset and the version stays.
    ///
    /// # Errors
    ///
    /// [`GroupError::InvalidRole`], [`GroupError::NoSuchConversation`] (unknown, or
    /// the actor is not a member), [`GroupError::DirectIsFixed`],
    /// [`GroupError::Forbidden`] for an actor who is not the owner,
    /// [`GroupError::NotAMember`], [`GroupError::OwnerRoleFixed`], or an internal
    /// error.
    pub(crate) async fn set_role(
        &self,
        conversation_id: i64,
        actor_id: i64,
        user_id: i64,
        role: Role,
    ) -> Result<MembershipChange, GroupError> {
        if role == Role::Owner {
            return Err(GroupError::InvalidRole);
        }
        let (mut change, actor) = self.begin_as_member(conversation_id, actor_id).await?;
        if actor.role != Role::Owner {
            return Err(GroupError::Forbidden("only the owner sets roles"));
        }
        let target = change
            .member(user_id)
            .await?
            .ok_or(GroupError::NotAMember)?;
        if target.role == Role::Owner {
            return Err(GroupError::OwnerRoleFixed);
        }
        if target.role == role {
            return Ok(MembershipChange::nothing(change.unchanged().await?));
        }
        change.set_role(user_id, role).await?;
        Ok(MembershipChange {
            conversation: change.commit().await?,
            notice: Some(Notice {
                actor_id,
                kind: NoticeKind::RoleChanged { user_id, role },
            }),
            removed_user_ids: Vec::new(),
        })
    }

    /// Returns `user_id`'s membership of the conversation: role and join time.
    ///
    /// # Errors
    ///
    /// [`GroupError::NotAMember`] (also for an unknown conversation), or an
    /// internal error.
    pub(crate) async fn get_member(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Member, GroupError> {
        self.inner
            .store
            .member(conversation_id, user_id)
            .await?
            .ok_or(GroupError::NotAMember)
    }

    /// Returns a page of the conversation's members with user ids above
    /// `after_user_id`, ascending, and whether more follow.
    ///
    /// `limit` 0 means 100; larger limits are capped at 1000. Whether the caller
    /// may see the members is the gateway's decision.
    ///
    /// # Errors
    ///
    /// [`GroupError::NoSuchConversation`], or an internal error.
    pub(crate) async fn list_members(
        &self,
        conversation_id: i64,
        after_user_id: i64,
        limit: u32,
    ) -> Result<(Vec<Member>, bool), GroupError> {
        let limit = match limit {
            0 => DEFAULT_MEMBERS_PAGE,
            limit => limit.min(MAX_MEMBERS_PAGE),
        };
        let store = &self.inner.store;
        if !store.conversation_exists(conversation_id).await? {
            return Err(GroupError::NoSuchConversation);
        }
        // One more than the page: its presence says whether more follow.
        let mut members = store
            .members(conversation_id, after_user_id, limit + 1)
            .await?;
        let has_more = members.len() > limit as usize;
        members.truncate(limit as usize);
        Ok((members, has_more))
    }
}

#[cfg(test)]
mod tests;
