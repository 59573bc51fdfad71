//! Membership cache: who is in a conversation, loaded from group-svc on a miss.
//!
//! Every send and every history read checks membership, so the snapshot of an
//! active conversation (kind, version, member ids) is kept in memory, and so is
//! the role of each channel subscriber asked about (channels have no member list:
//! group-svc answers `GetMember` per user). This is the send path's fast
//! pre-check; the writer holds the authoritative snapshot at commit time
//! (`writer`). `AppendNotice` invalidates the entries a change touches.

use std::collections::HashMap;
use std::sync::Arc;

use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::{GetConversationRequest, GetMemberRequest};
use confab_proto::v1::{Conversation, ConversationKind, Role};
use parking_lot::Mutex;

use crate::error::MessageError;

/// Most conversations, and most channel roles, kept; beyond it an arbitrary
/// entry is evicted (the next lookup pays one group-svc call).
const MAX_ENTRIES: usize = 100_000;

/// A conversation's membership at one version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    /// `Conversation.version`: a snapshot replaces another only if newer.
    pub(crate) version: i64,
    pub(crate) kind: ConversationKind,
    /// Sorted member ids; empty for channels.
    pub(crate) members: Arc<[i64]>,
    /// How many members group-svc counted (channels have no list to count).
    pub(crate) member_count: u32,
}

impl Snapshot {
    /// Returns the snapshot of `conversation` as group-svc describes it.
    pub(crate) fn of(conversation: &Conversation) -> Self {
        let mut members = conversation.member_ids.clone();
        // The contract promises ascending order; sorting keeps binary_search
        // correct even if a backend forgets.
        members.sort_unstable();
        members.dedup();
        Self {
            version: conversation.version,
            kind: conversation.kind(),
            members: members.into(),
            member_count: conversation.member_count,
        }
    }

    /// Returns whether this is a channel (fan-out on read, no member list).
    pub(crate) fn is_channel(&self) -> bool {
        self.kind == ConversationKind::Channel
    }

    /// Returns whether `user_id` is in the member list (never, for channels).
    pub(crate) fn has_member(&self, user_id: i64) -> bool {
        self.members.binary_search(&user_id).is_ok()
    }
}

/// Snapshots by conversation id, and channel roles by (conversation, user).
#[derive(Debug)]
pub(crate) struct MemberCache {
    /// Source of truth on a miss.
    groups: GroupsClient<GrpcChannel>,
    state: Mutex<CacheState>,
    max_entries: usize,
}

#[derive(Debug, Default)]
struct CacheState {
    snapshots: HashMap<i64, Arc<Snapshot>>,
    /// A channel subscriber's role; `None` caches "not a member".
    roles: HashMap<(i64, i64), Option<Role>>,
    /// Bumped by every invalidation, so that a load that started before an
    /// invalidation does not put a stale entry back.
    generation: u64,
}

/// Inserts into a bounded map, evicting an arbitrary entry when full.
fn insert_bounded<K, V>(map: &mut HashMap<K, V>, max: usize, key: K, value: V)
where
    K: std::hash::Hash + Eq + Copy,
{
    if map.len() >= max && !map.contains_key(&key) {
        let victim = map.keys().next().copied();
        if let Some(victim) = victim {
            map.remove(&victim);
        }
    }
    map.insert(key, value);
}

impl MemberCache {
    /// Returns an empty cache loading from `groups`.
    pub(crate) fn new(groups: GroupsClient<GrpcChannel>) -> Self {
        Self {
            groups,
            state: Mutex::new(CacheState::default()),
            max_entries: MAX_ENTRIES,
        }
    }

    /// Returns the snapshot of `conversation_id` if `user_id` is a member (for a
    /// channel: has any role).
    ///
    /// # Errors
    ///
    /// [`MessageError::ConversationNotFound`] both when the conversation does not
    /// exist and when `user_id` is not a member, so that nobody learns which
    /// conversations exist; [`MessageError::GroupsUnavailable`] when group-svc
    /// cannot answer.
    pub(crate) async fn check_member(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Arc<Snapshot>, MessageError> {
        let snapshot = self.snapshot(conversation_id).await?;
        let member = if snapshot.is_channel() {
            self.role(conversation_id, user_id).await?.is_some()
        } else {
            snapshot.has_member(user_id)
        };
        if !member {
            return Err(MessageError::ConversationNotFound);
        }
        Ok(snapshot)
    }

    /// Returns the cached snapshot of `conversation_id`, loading it on a miss.
    ///
    /// # Errors
    ///
    /// As [`check_member`](Self::check_member).
    pub(crate) async fn snapshot(
        &self,
        conversation_id: i64,
    ) -> Result<Arc<Snapshot>, MessageError> {
        let generation = {
            let state = self.state.lock();
            if let Some(snapshot) = state.snapshots.get(&conversation_id) {
                return Ok(Arc::clone(snapshot));
            }
            state.generation
        };
        let request = GetConversationRequest { conversation_id };
        let conversation = match self.groups.clone().get_conversation(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(MessageError::ConversationNotFound);
            }
            Err(status) => return Err(MessageError::GroupsUnavailable(status)),
        };
        let snapshot = Arc::new(Snapshot::of(&conversation));
        let mut state = self.state.lock();
        if state.generation == generation {
            let max = self.max_entries;
            insert_bounded(
                &mut state.snapshots,
                max,
                conversation_id,
                Arc::clone(&snapshot),
            );
        }
        Ok(snapshot)
    }

    /// Returns the role of `user_id` in the channel `conversation_id`, `None`
    /// when they are not a member; cached until a notice touches the user.
    ///
    /// # Errors
    ///
    /// [`MessageError::GroupsUnavailable`] when group-svc cannot answer.
    pub(crate) async fn role(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> Result<Option<Role>, MessageError> {
        let key = (conversation_id, user_id);
        let generation = {
            let state = self.state.lock();
            if let Some(role) = state.roles.get(&key) {
                return Ok(*role);
            }
            state.generation
        };
        let request = GetMemberRequest {
            conversation_id,
            user_id,
        };
        let role = match self.groups.clone().get_member(request).await {
            Ok(response) => Some(response.into_inner().role()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => return Err(MessageError::GroupsUnavailable(status)),
        };
        let mut state = self.state.lock();
        if state.generation == generation {
            let max = self.max_entries;
            insert_bounded(&mut state.roles, max, key, role);
        }
        Ok(role)
    }

    /// Forgets the snapshot of `conversation_id` and the cached roles of
    /// `user_ids` there; the next lookups ask group-svc.
    pub(crate) fn invalidate(&self, conversation_id: i64, user_ids: &[i64]) {
        let mut state = self.state.lock();
        state.snapshots.remove(&conversation_id);
        for &user_id in user_ids {
            state.roles.remove(&(conversation_id, user_id));
        }
        state.generation += 1;
    }
}
