//! Test doubles shared by the unit tests: a fake group-svc, a recording live
//! bus, and services opened on the in-memory, the SQLite or the NATS KV store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use confab_common::bus::{Audience, LiveBus, LiveEvent};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::{Groups, GroupsServer};
use confab_proto::group::v1::*;
use confab_proto::v1::event::Kind;
use confab_proto::v1::{Conversation, ConversationKind, Member, Presence, TypingState, User};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use crate::store::memory::MemoryStore;
use crate::{PresenceConfig, PresenceService};

/// A direct conversation of the default fixture: {1, 2}.
pub(crate) const DIRECT: i64 = 10;
/// A group of the default fixture: {1, 3, 4}.
pub(crate) const GROUP: i64 = 11;
/// A channel of the default fixture: {1, 2, 5}; sharing a channel is not
/// sharing a conversation.
pub(crate) const CHANNEL: i64 = 12;
/// User 9 shares nothing with anyone.
pub(crate) const STRANGER: i64 = 9;

/// A group-svc that knows a few conversations.
#[derive(Debug, Default)]
pub(crate) struct FakeGroups {
    /// Kind and sorted members by conversation id.
    conversations: Mutex<HashMap<i64, (ConversationKind, Vec<i64>)>>,
    /// `GetConversation` calls answered, to check the cache.
    pub(crate) conversation_calls: AtomicUsize,
    /// `SharedWith` calls answered.
    pub(crate) shared_with_calls: AtomicUsize,
}

impl FakeGroups {
    /// Returns the default fixture: [`DIRECT`], [`GROUP`], [`CHANNEL`].
    pub(crate) fn fixture() -> Self {
        let fake = Self::default();
        fake.add(DIRECT, ConversationKind::Direct, &[1, 2]);
        fake.add(GROUP, ConversationKind::Group, &[1, 3, 4]);
        fake.add(CHANNEL, ConversationKind::Channel, &[1, 2, 5]);
        fake
    }

    /// Adds (or replaces) a conversation.
    pub(crate) fn add(&self, id: i64, kind: ConversationKind, members: &[i64]) {
        let mut members = members.to_vec();
        members.sort_unstable();
        self.conversations.lock().insert(id, (kind, members));
    }
}

#[tonic::async_trait]
impl Groups for FakeGroups {
    async fn create_user(&self, _: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn verify_password(
        &self,
        _: Request<VerifyPasswordRequest>,
    ) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn ensure_user(&self, _: Request<EnsureUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_user(&self, _: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_users(
        &self,
        _: Request<GetUsersRequest>,
    ) -> Result<Response<GetUsersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn open_direct(
        &self,
        _: Request<OpenDirectRequest>,
    ) -> Result<Response<Conversation>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        self.conversation_calls.fetch_add(1, Ordering::Relaxed);
        let id = request.into_inner().conversation_id;
        let conversations = self.conversations.lock();
        let (kind, members) = conversations
            .get(&id)
            .ok_or_else(|| Status::not_found("no such conversation"))?;
        let member_ids = if *kind == ConversationKind::Channel {
            Vec::new()
        } else {
            members.clone()
        };
        Ok(Response::new(Conversation {
            id,
            kind: (*kind).into(),
            member_ids,
            member_count: members.len() as u32,
            version: 1,
            ..Conversation::default()
        }))
    }
    async fn list_conversations(
        &self,
        _: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_conversation(
        &self,
        _: Request<CreateConversationRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn add_members(
        &self,
        _: Request<AddMembersRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_role(
        &self,
        _: Request<SetRoleRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update_conversation(
        &self,
        _: Request<UpdateConversationRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_member(&self, _: Request<GetMemberRequest>) -> Result<Response<Member>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn shared_with(
        &self,
        request: Request<SharedWithRequest>,
    ) -> Result<Response<SharedWithResponse>, Status> {
        self.shared_with_calls.fetch_add(1, Ordering::Relaxed);
        let SharedWithRequest { user_id, other_ids } = request.into_inner();
        let conversations = self.conversations.lock();
        let user_ids = other_ids
            .into_iter()
            .filter(|other| {
                conversations.values().any(|(kind, members)| {
                    *kind != ConversationKind::Channel
                        && members.contains(&user_id)
                        && members.contains(other)
                })
            })
            .collect();
        Ok(Response::new(SharedWithResponse { user_ids }))
    }
    async fn check_token(
        &self,
        _: Request<confab_proto::group::v1::CheckTokenRequest>,
    ) -> Result<Response<confab_proto::v1::User>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_tokens(
        &self,
        _: Request<confab_proto::group::v1::RevokeTokensRequest>,
    ) -> Result<Response<confab_proto::group::v1::RevokeTokensResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Returns an in-process client of `fake`.
pub(crate) fn groups_client(
    fake: Arc<FakeGroups>,
) -> GroupsClient<confab_common::channel::GrpcChannel> {
    GroupsClient::new(confab_common::channel::in_process(GroupsServer::from_arc(
        fake,
    )))
}

/// A live bus that records every published event.
#[derive(Debug, Default)]
pub(crate) struct RecordingBus {
    events: Mutex<Vec<Arc<LiveEvent>>>,
}

impl RecordingBus {
    /// Returns and forgets the presence events so far, as (watched user,
    /// online, last seen).
    pub(crate) fn take_presence(&self) -> Vec<(i64, bool, i64)> {
        self.take()
            .into_iter()
            .filter_map(|event| match (&event.audience, &event.event.kind) {
                (Audience::Watchers(user), Some(Kind::Presence(p))) => {
                    assert_eq!((event.event.seq, p.user_id), (0, *user));
                    let Presence {
                        online,
                        last_seen_ms,
                        ..
                    } = *p;
                    Some((*user, online, last_seen_ms))
                }
                _ => None,
            })
            .collect()
    }

    /// Returns and forgets the typing events so far, as (recipient,
    /// conversation, typist, typing), sorted.
    pub(crate) fn take_typing(&self) -> Vec<(i64, i64, i64, bool)> {
        let mut typing: Vec<_> = self
            .take()
            .into_iter()
            .filter_map(|event| match (&event.audience, &event.event.kind) {
                (Audience::User(member), Some(Kind::Typing(t))) => {
                    assert_eq!(event.event.seq, 0);
                    let TypingState {
                        conversation_id,
                        user_id,
                        typing,
                    } = *t;
                    Some((*member, conversation_id, user_id, typing))
                }
                _ => None,
            })
            .collect();
        typing.sort_unstable();
        typing
    }

    fn take(&self) -> Vec<Arc<LiveEvent>> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl LiveBus for RecordingBus {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        self.events.lock().extend(events.iter().cloned());
    }
}

/// The test configuration: the defaults (15 s window, 6 s typing, 60 per
/// minute) on a file in `dir` (unused by the in-memory store).
pub(crate) fn config(dir: &std::path::Path) -> PresenceConfig {
    PresenceConfig {
        db_path: dir.join("presence.db"),
        ..PresenceConfig::default()
    }
}

/// The window of [`config`].
pub(crate) const WINDOW: Duration = Duration::from_secs(15);

/// What a test works with.
#[derive(Debug)]
pub(crate) struct Fixture {
    pub(crate) service: PresenceService,
    pub(crate) bus: Arc<RecordingBus>,
    pub(crate) groups: Arc<FakeGroups>,
}

/// Opens a service on the in-memory store (for tests with a paused clock).
pub(crate) fn in_memory() -> Fixture {
    let bus = Arc::new(RecordingBus::default());
    let groups = Arc::new(FakeGroups::fixture());
    let service = PresenceService::with_store(
        config(std::path::Path::new(".")),
        groups_client(Arc::clone(&groups)),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
        Arc::new(MemoryStore::default()),
    );
    Fixture {
        service,
        bus,
        groups,
    }
}

/// Opens a service on the SQLite file in `dir`.
pub(crate) async fn on_sqlite(dir: &std::path::Path) -> Fixture {
    let bus = Arc::new(RecordingBus::default());
    let groups = Arc::new(FakeGroups::fixture());
    let service = PresenceService::open(
        config(dir),
        groups_client(Arc::clone(&groups)),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
    )
    .await
    .expect("open presence service");
    Fixture {
        service,
        bus,
        groups,
    }
}

/// Opens a service on the NATS KV buckets of the server at `nats_url`, with
/// a window of `window`.
pub(crate) async fn on_nats(nats_url: &str, window: Duration) -> Fixture {
    let bus = Arc::new(RecordingBus::default());
    let groups = Arc::new(FakeGroups::fixture());
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    let config = PresenceConfig {
        window,
        ..config(std::path::Path::new("unused"))
    };
    let service = PresenceService::open_nats(
        config,
        async_nats::jetstream::new(client),
        groups_client(Arc::clone(&groups)),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
    )
    .await
    .expect("open presence service on nats");
    Fixture {
        service,
        bus,
        groups,
    }
}

/// Polls `check` until it returns `Some`, and returns that; fails the test
/// after 10 s. For waits on real servers, whose clocks cannot be paused.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets spawned tasks (the sweeper) run what became ready, without sleeping.
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Advances the paused clock by `by`, then lets the sweeper run.
pub(crate) async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    settle().await;
}
