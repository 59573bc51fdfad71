//! Conversation members for typing, cached briefly.
//!
//! A typing event needs the conversation's member list (to check the typist and
//! to address the others). Typing comes in bursts in the same few
//! conversations, so each list is kept for [`TTL`] and fetched from group-svc
//! on a miss. A member added or removed is seen within the ttl: a typing
//! indicator shown to a just-removed member for a few seconds is harmless, and
//! no invalidation channel is needed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::GetConversationRequest;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::v1::ConversationKind;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::error::PresenceError;

/// How long a member list is trusted.
pub(crate) const TTL: Duration = Duration::from_secs(30);

/// A conversation as typing needs it.
#[derive(Debug)]
pub(crate) struct Members {
    /// Channels have no typing (and no member list).
    pub(crate) is_channel: bool,
    /// Sorted member ids.
    pub(crate) ids: Arc<[i64]>,
}

impl Members {
    /// Returns whether `user_id` is a member.
    pub(crate) fn contains(&self, user_id: i64) -> bool {
        self.ids.binary_search(&user_id).is_ok()
    }

    /// Returns the members other than `user_id`.
    pub(crate) fn others(&self, user_id: i64) -> Arc<[i64]> {
        self.ids
            .iter()
            .copied()
            .filter(|&id| id != user_id)
            .collect()
    }
}

/// Member lists by conversation id, each with the time it was fetched.
#[derive(Debug)]
pub(crate) struct MemberCache {
    /// Source of truth on a miss.
    groups: GroupsClient<GrpcChannel>,
    entries: Mutex<HashMap<i64, (Instant, Arc<Members>)>>,
}

impl MemberCache {
    /// Returns an empty cache loading from `groups`.
    pub(crate) fn new(groups: GroupsClient<GrpcChannel>) -> Self {
        Self {
            groups,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the members of `conversation_id`, from the cache if fetched less
    /// than [`TTL`] ago.
    ///
    /// # Errors
    ///
    /// [`PresenceError::ConversationNotFound`] when it does not exist,
    /// [`PresenceError::GroupsUnavailable`] when group-svc cannot answer.
    pub(crate) async fn get(&self, conversation_id: i64) -> Result<Arc<Members>, PresenceError> {
        let now = Instant::now();
        if let Some((fetched, members)) = self.entries.lock().get(&conversation_id)
            && now.saturating_duration_since(*fetched) < TTL
        {
            return Ok(Arc::clone(members));
        }
        let request = GetConversationRequest { conversation_id };
        let conversation = match self.groups.clone().get_conversation(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(PresenceError::ConversationNotFound);
            }
            Err(status) => return Err(PresenceError::GroupsUnavailable(status)),
        };
        let mut ids = conversation.member_ids.clone();
        // The contract promises ascending order; sorting keeps binary_search
        // correct even if a backend forgets.
        ids.sort_unstable();
        ids.dedup();
        let members = Arc::new(Members {
            is_channel: conversation.kind() == ConversationKind::Channel,
            ids: ids.into(),
        });
        self.entries
            .lock()
            .insert(conversation_id, (now, Arc::clone(&members)));
        Ok(members)
    }

    /// Returns whether `user_id` belongs to `conversation_id`, asking group-svc
    /// (for channels, whose member list is not loaded).
    ///
    /// # Errors
    ///
    /// [`PresenceError::GroupsUnavailable`] when group-svc cannot answer.
    pub(crate) async fn is_member(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<bool, PresenceError> {
        let request = confab_proto::group::v1::GetMemberRequest {
            conversation_id,
            user_id,
        };
        match self.groups.clone().get_member(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Err(status) => Err(PresenceError::GroupsUnavailable(status)),
        }
    }

    /// Drops the lists older than [`TTL`], so that the cache holds only the
    /// conversations typed in lately.
    pub(crate) fn trim(&self, now: Instant) {
        self.entries
            .lock()
            .retain(|_, (fetched, _)| now.saturating_duration_since(*fetched) < TTL);
    }
}
