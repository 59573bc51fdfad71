//! Membership cache: who is in a conversation, loaded from group-svc on a miss.
//!
//! Every send and every history read checks membership, so the member list of an
//! active conversation is kept in memory. Direct conversations never change
//! membership; for groups, whoever changes membership calls
//! [`MemberCache::invalidate`].

use std::collections::HashMap;
use std::sync::Arc;

use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::GetConversationRequest;
use confab_proto::group::v1::groups_client::GroupsClient;
use parking_lot::Mutex;

use crate::error::MessageError;

/// Most conversations kept; beyond it an arbitrary entry is evicted (the next
/// send there pays one group-svc call).
const MAX_ENTRIES: usize = 100_000;

/// Member lists by conversation id.
#[derive(Debug)]
pub(crate) struct MemberCache {
    /// Source of truth on a miss.
    groups: GroupsClient<GrpcChannel>,
    state: Mutex<CacheState>,
    max_entries: usize,
}

#[derive(Debug, Default)]
struct CacheState {
    /// Sorted member ids per conversation.
    members: HashMap<i64, Arc<[i64]>>,
    /// Bumped by every invalidation, so that a load that started before an
    /// invalidation does not put the stale list back.
    generation: u64,
}

impl MemberCache {
    /// Returns an empty cache loading from `groups`.
    pub(crate) fn new(groups: GroupsClient<GrpcChannel>) -> Self {
        Self::with_capacity(groups, MAX_ENTRIES)
    }

    fn with_capacity(groups: GroupsClient<GrpcChannel>, max_entries: usize) -> Self {
        Self {
            groups,
            state: Mutex::new(CacheState::default()),
            max_entries,
        }
    }

    /// Returns the members of `conversation_id`, sorted, if `user_id` is one of
    /// them.
    ///
    /// # Errors
    ///
    /// [`MessageError::ConversationNotFound`] both when the conversation does not
    /// exist and when `user_id` is not a member, so that nobody learns which
    /// conversations exist; [`MessageError::GroupsUnavailable`] when group-svc
    /// cannot answer.
    pub(crate) async fn members_for(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Arc<[i64]>, MessageError> {
        let members = self.get(conversation_id).await?;
        if members.binary_search(&user_id).is_err() {
            return Err(MessageError::ConversationNotFound);
        }
        Ok(members)
    }

    async fn get(&self, conversation_id: i64) -> Result<Arc<[i64]>, MessageError> {
        let generation = {
            let state = self.state.lock();
            if let Some(members) = state.members.get(&conversation_id) {
                return Ok(Arc::clone(members));
            }
            state.generation
        };
        let members = self.load(conversation_id).await?;
        let mut state = self.state.lock();
        if state.generation == generation {
            if state.members.len() >= self.max_entries {
                let victim = state.members.keys().next().copied();
                if let Some(victim) = victim {
                    state.members.remove(&victim);
                }
            }
            state.members.insert(conversation_id, Arc::clone(&members));
        }
        Ok(members)
    }

    async fn load(&self, conversation_id: i64) -> Result<Arc<[i64]>, MessageError> {
        let request = GetConversationRequest { conversation_id };
        let conversation = match self.groups.clone().get_conversation(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(MessageError::ConversationNotFound);
            }
            Err(status) => return Err(MessageError::GroupsUnavailable(status)),
        };
        let mut members = conversation.member_ids;
        // The contract promises ascending order; sorting keeps binary_search
        // correct even if a backend forgets.
        members.sort_unstable();
        members.dedup();
        Ok(members.into())
    }

    /// Forgets the members of `conversation_id`; the next lookup asks group-svc.
    pub(crate) fn invalidate(&self, conversation_id: i64) {
        let mut state = self.state.lock();
        state.members.remove(&conversation_id);
        state.generation += 1;
    }
}
