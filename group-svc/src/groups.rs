//! Groups and channels: their size limits, the rules of their metadata, creation,
//! and metadata updates.

use confab_common::now_ms;

use crate::membership::{MembershipChange, Notice, NoticeKind};
use crate::store::{ConversationKind, Metadata, NewConversation};
use crate::{GroupError, GroupService};

/// Longest name, in characters, after trimming.
const MAX_NAME_CHARS: usize = 100;
/// Longest topic, in characters.
const MAX_TOPIC_CHARS: usize = 500;
/// Longest avatar URL, in characters.
const MAX_AVATAR_URL_CHARS: usize = 2048;

/// How large conversations may grow; sizes count every member, the owner included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most members of a group: fan-out on write delivers to each of them
    /// (DESIGN.md section 4). Default 1024.
    pub max_group_size: u32,
    /// Most members of a channel: fan-out on read, so it may be much larger.
    /// Default 1,000,000.
    pub max_channel_size: u32,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            max_group_size: 1024,
            max_channel_size: 1_000_000,
        }
    }
}

impl GroupLimits {
    /// Checks that a conversation of `kind` may hold `members` members.
    ///
    /// # Errors
    ///
    /// [`GroupError::TooManyMembers`] beyond the limit of the kind.
    pub(crate) fn check(&self, kind: ConversationKind, members: usize) -> Result<(), GroupError> {
        let (kind, max) = match kind {
            ConversationKind::Direct => ("direct conversation", 2),
            ConversationKind::Group => ("group", self.max_group_size),
            ConversationKind::Channel => ("channel", self.max_channel_size),
        };
        let fits = u32::try_from(members).is_ok_and(|members| members <= max);
        if !fits {
            return Err(GroupError::TooManyMembers { kind, max });
        }
        Ok(())
    }
}

/// Returns the name trimmed, or why it is not a valid name: 1 to 100 characters
/// after trimming white space, no control characters.
pub(crate) fn validate_name(raw: &str) -> Result<String, GroupError> {
    let name = raw.trim();
    if !(1..=MAX_NAME_CHARS).contains(&name.chars().count()) {
        return Err(GroupError::InvalidName("must be 1 to 100 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(GroupError::InvalidName(
            "control characters are not allowed",
        ));
    }
    Ok(name.to_owned())
}

/// Returns the topic if it has at most 500 characters.
pub(crate) fn validate_topic(topic: String) -> Result<String, GroupError> {
    if topic.chars().count() > MAX_TOPIC_CHARS {
        return Err(GroupError::InvalidTopic);
    }
    Ok(topic)
}

/// Returns the avatar URL if it is empty, or an `http://` or `https://` URL with a
/// host, no white space or control characters, and at most 2048 characters.
///
/// The check is deliberately shallow: clients fetch the URL, this only keeps out
/// other schemes (`javascript:`, `file:`) and junk.
pub(crate) fn validate_avatar_url(url: String) -> Result<String, GroupError> {
    if url.is_empty() {
        return Ok(url);
    }
    let after_scheme = strip_prefix_ignore_case(&url, "https://")
        .or_else(|| strip_prefix_ignore_case(&url, "http://"));
    let has_host = after_scheme.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    let clean = !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if !has_host || !clean || url.chars().count() > MAX_AVATAR_URL_CHARS {
        return Err(GroupError::InvalidAvatarUrl);
    }
    Ok(url)
}

/// Returns what follows `prefix` (ASCII, any case) at the start of `text`.
fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Returns the metadata with each field validated (the name trimmed).
fn validate_metadata(metadata: Metadata) -> Result<Metadata, GroupError> {
    Ok(Metadata {
        name: validate_name(&metadata.name)?,
        topic: validate_topic(metadata.topic)?,
        avatar_url: validate_avatar_url(metadata.avatar_url)?,
    })
}

/// The fields an UpdateConversation sets; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MetadataUpdate {
    pub(crate) name: Option<String>,
    pub(crate) topic: Option<String>,
    pub(crate) avatar_url: Option<String>,
}

impl GroupService {
    /// Creates a group or channel owned by `creator_id`.
    ///
    /// - `kind` is [`ConversationKind::Group`] or [`ConversationKind::Channel`].
    /// - The name has 1 to 100 characters after trimming (it is stored trimmed) and no
    ///   control characters; the topic at most 500 characters; the avatar URL is
    ///   empty or an http(s) URL of at most 2048 characters.
    /// - `member_ids` are for groups only; each must be a user. Duplicates and the
    ///   creator are ignored. The creator becomes the owner, the others members,
    ///   all with `joined_at_ms` = `created_at_ms`.
    /// - Size: the creator and the members count against the kind's limit.
    /// - The conversation starts at version 1; the notice is `Created` by the creator.
    ///
    /// Everything is written in one transaction, members with multi-row INSERTs.
    ///
    /// # Errors
    ///
    /// [`GroupError::InvalidKind`], [`GroupError::InvalidName`],
    /// [`GroupError::InvalidTopic`], [`GroupError::InvalidAvatarUrl`],
    /// [`GroupError::ChannelMembers`], [`GroupError::TooManyMembers`],
    /// [`GroupError::NoSuchUser`] (the creator or a member), or an internal error.
    pub(crate) async fn create_conversation(
        &self,
        kind: ConversationKind,
        creator_id: i64,
        metadata: Metadata,
        member_ids: &[i64],
    ) -> Result<MembershipChange, GroupError> {
        if kind == ConversationKind::Direct {
            return Err(GroupError::InvalidKind);
        }
        let metadata = validate_metadata(metadata)?;
        if kind == ConversationKind::Channel && !member_ids.is_empty() {
            return Err(GroupError::ChannelMembers);
        }
        let mut others: Vec<i64> = member_ids
            .iter()
            .copied()
            .filter(|id| *id != creator_id)
            .collect();
        others.sort_unstable();
        others.dedup();
        self.inner.limits.check(kind, others.len() + 1)?;

        let store = &self.inner.store;
        let mut everyone = others.clone();
        everyone.push(creator_id);
        if store.users_by_ids(&everyone).await?.len() != everyone.len() {
            return Err(GroupError::NoSuchUser);
        }
        let new = NewConversation {
            id: self.inner.ids.next_id(),
            kind,
            created_at_ms: now_ms(),
            metadata: &metadata,
        };
        let conversation = store.create_conversation(new, creator_id, &others).await?;
        Ok(MembershipChange {
            conversation,
            notice: Some(Notice {
                actor_id: creator_id,
                kind: NoticeKind::Created,
            }),
            removed_user_ids: Vec::new(),
        })
    }

    /// Changes the name, topic or avatar URL of a group or channel.
    ///
    /// - Each field set in `update` is validated as at creation; unset fields keep
    ///   their value.
    /// - The actor must be an admin or the owner.
    /// - The notice is `MetadataChanged` with all three values after the change.
    ///   When nothing changes, the notice is unset and the version stays.
    ///
    /// # Errors
    ///
    /// The validation errors of [`GroupService::create_conversation`];
    /// [`GroupError::NoSuchConversation`] when there is no such conversation or the
    /// actor is not a member (the same answer, so that non-members learn nothing);
    /// [`GroupError::DirectIsFixed`]; [`GroupError::Forbidden`] for a plain member;
    /// or an internal error.
    pub(crate) async fn update_conversation(
        &self,
        conversation_id: i64,
        actor_id: i64,
        update: MetadataUpdate,
    ) -> Result<MembershipChange, GroupError> {
        let name = update.name.as_deref().map(validate_name).transpose()?;
        let topic = update.topic.map(validate_topic).transpose()?;
        let avatar_url = update.avatar_url.map(validate_avatar_url).transpose()?;

        let (mut change, actor) = self.begin_as_member(conversation_id, actor_id).await?;
        if !actor.role.is_admin() {
            return Err(GroupError::Forbidden(
                "only admins change the name, topic or avatar",
            ));
        }
        let before = change.metadata();
        let after = Metadata {
            name: name.unwrap_or_else(|| before.name.clone()),
            topic: topic.unwrap_or_else(|| before.topic.clone()),
            avatar_url: avatar_url.unwrap_or_else(|| before.avatar_url.clone()),
        };
        if after == *before {
            return Ok(MembershipChange::nothing(change.unchanged().await?));
        }
        change.set_metadata(&after).await?;
        Ok(MembershipChange {
            conversation: change.commit().await?,
            notice: Some(Notice {
                actor_id,
                kind: NoticeKind::MetadataChanged(after),
            }),
            removed_user_ids: Vec::new(),
        })
    }
}
