//! Test doubles shared by the unit tests: a fake group-svc, a recording live bus,
//! and a service opened on a SQLite file in a temporary directory.

use std::collections::HashMap;
use std::sync::Arc;

use confab_common::bus::{LiveBus, LiveEvent};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::{Groups, GroupsServer};
use confab_proto::group::v1::*;
use confab_proto::v1::{Conversation, ConversationKind, Member, Notice, Role, User, notice};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::{MessageConfig, MessageService};

/// Conversation id whose lookup fails with UNAVAILABLE.
pub(crate) const BROKEN_CONVERSATION: i64 = 666;

/// A group conversation of the default fixture: {1, 2, 3, 4}, 1 the owner.
pub(crate) const GROUP: i64 = 4;
/// A channel of the default fixture: 1 owner, 2 admin, 3 and 4 subscribers.
pub(crate) const CHANNEL: i64 = 5;

/// One conversation of the fake.
#[derive(Debug, Clone)]
struct FakeConversation {
    kind: ConversationKind,
    version: i64,
    /// Members and their roles, by user id.
    members: Vec<(i64, Role)>,
}

/// A group-svc that knows a set of conversations, changed by the tests.
#[derive(Debug, Default)]
pub(crate) struct FakeGroups {
    conversations: Mutex<HashMap<i64, FakeConversation>>,
}

impl FakeGroups {
    /// Returns a fake with direct conversations of the given members.
    pub(crate) fn new(conversations: &[(i64, &[i64])]) -> Self {
        let fake = Self::default();
        for &(id, members) in conversations {
            let members: Vec<(i64, Role)> = members.iter().map(|&u| (u, Role::Member)).collect();
            fake.add(id, ConversationKind::Direct, &members);
        }
        fake
    }

    /// Adds a conversation at version 1.
    pub(crate) fn add(&self, id: i64, kind: ConversationKind, members: &[(i64, Role)]) {
        let mut members = members.to_vec();
        members.sort_unstable_by_key(|&(user_id, _)| user_id);
        let conversation = FakeConversation {
            kind,
            version: 1,
            members,
        };
        self.conversations.lock().insert(id, conversation);
    }

    /// Returns the conversation as group-svc's `GetConversation` does.
    pub(crate) fn conversation(&self, id: i64) -> Option<Conversation> {
        let conversations = self.conversations.lock();
        let fake = conversations.get(&id)?;
        let member_ids = if fake.kind == ConversationKind::Channel {
            Vec::new()
        } else {
            fake.members.iter().map(|&(user_id, _)| user_id).collect()
        };
        Some(Conversation {
            id,
            kind: fake.kind.into(),
            member_ids,
            member_count: fake.members.len() as u32,
            version: fake.version,
            ..Conversation::default()
        })
    }

    /// Commits a change like group-svc (bumps the version) and returns the
    /// change the gateway hands to `AppendNotice`.
    fn change(
        &self,
        id: i64,
        notice: Notice,
        removed: Vec<i64>,
        edit: impl FnOnce(&mut Vec<(i64, Role)>),
    ) -> MembershipChange {
        {
            let mut conversations = self.conversations.lock();
            let fake = conversations.get_mut(&id).expect("known conversation");
            edit(&mut fake.members);
            fake.members.sort_unstable_by_key(|&(user_id, _)| user_id);
            fake.version += 1;
        }
        MembershipChange {
            conversation: self.conversation(id),
            notice: Some(notice),
            removed_user_ids: removed,
        }
    }

    /// `actor` removes `user_id` (or leaves, when they are the same).
    pub(crate) fn remove(&self, id: i64, actor_id: i64, user_id: i64) -> MembershipChange {
        let kind = if actor_id == user_id {
            notice::Kind::MemberLeft(confab_proto::v1::MemberLeft {})
        } else {
            notice::Kind::MemberRemoved(confab_proto::v1::MemberRemoved { user_id })
        };
        let notice = Notice {
            actor_id,
            kind: Some(kind),
        };
        self.change(id, notice, vec![user_id], |members| {
            members.retain(|&(member, _)| member != user_id);
        })
    }

    /// `actor` adds `user_ids` as members.
    pub(crate) fn add_members(&self, id: i64, actor_id: i64, user_ids: &[i64]) -> MembershipChange {
        let notice = Notice {
            actor_id,
            kind: Some(notice::Kind::MembersAdded(confab_proto::v1::MembersAdded {
                user_ids: user_ids.to_vec(),
            })),
        };
        self.change(id, notice, Vec::new(), |members| {
            members.extend(user_ids.iter().map(|&user_id| (user_id, Role::Member)));
        })
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
        let id = request.into_inner().conversation_id;
        if id == BROKEN_CONVERSATION {
            return Err(Status::unavailable("database is down"));
        }
        let conversation = self
            .conversation(id)
            .ok_or_else(|| Status::not_found("no such conversation"))?;
        Ok(Response::new(conversation))
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
    async fn get_member(
        &self,
        request: Request<GetMemberRequest>,
    ) -> Result<Response<Member>, Status> {
        let request = request.into_inner();
        let conversations = self.conversations.lock();
        let role = conversations
            .get(&request.conversation_id)
            .and_then(|fake| {
                fake.members
                    .iter()
                    .find(|&&(user_id, _)| user_id == request.user_id)
            })
            .map(|&(_, role)| role)
            .ok_or_else(|| Status::not_found("not a member"))?;
        Ok(Response::new(Member {
            user_id: request.user_id,
            role: role.into(),
            joined_at_ms: 0,
        }))
    }
    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn shared_with(
        &self,
        _: Request<SharedWithRequest>,
    ) -> Result<Response<SharedWithResponse>, Status> {
        Err(Status::unimplemented("fake"))
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

/// A live bus that records every published event and forwards it to a channel.
#[derive(Debug)]
pub(crate) struct RecordingBus {
    pub(crate) events: Mutex<Vec<Arc<LiveEvent>>>,
    forward: mpsc::UnboundedSender<Arc<LiveEvent>>,
}

impl RecordingBus {
    pub(crate) fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Arc<LiveEvent>>) {
        let (forward, rx) = mpsc::unbounded_channel();
        let bus = Arc::new(Self {
            events: Mutex::new(Vec::new()),
            forward,
        });
        (bus, rx)
    }
}

impl LiveBus for RecordingBus {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        self.events.lock().extend(events.iter().cloned());
        for event in events {
            let _ = self.forward.send(Arc::clone(event));
        }
    }
}

/// Returns a config on `dir/messages.db`.
pub(crate) fn config(dir: &tempfile::TempDir) -> MessageConfig {
    MessageConfig {
        db_path: dir.path().join("messages.db"),
        node_id: 1,
        ..MessageConfig::default()
    }
}

/// Opens a service on `dir` with conversations 1 = {1, 2}, 2 = {1, 2, 3},
/// [`GROUP`] and [`CHANNEL`].
pub(crate) async fn open_service(
    dir: &tempfile::TempDir,
    bus: Arc<RecordingBus>,
) -> MessageService {
    open_service_with_groups(dir, bus).await.0
}

/// As [`open_service`], and returns the fake group-svc for the test to change.
pub(crate) async fn open_service_with_groups(
    dir: &tempfile::TempDir,
    bus: Arc<RecordingBus>,
) -> (MessageService, Arc<FakeGroups>) {
    let fake = Arc::new(FakeGroups::new(&[(1, &[1, 2]), (2, &[1, 2, 3])]));
    let group = [
        (1, Role::Owner),
        (2, Role::Member),
        (3, Role::Member),
        (4, Role::Member),
    ];
    fake.add(GROUP, ConversationKind::Group, &group);
    let channel = [
        (1, Role::Owner),
        (2, Role::Admin),
        (3, Role::Member),
        (4, Role::Member),
    ];
    fake.add(CHANNEL, ConversationKind::Channel, &channel);
    let service = MessageService::open(config(dir), groups_client(Arc::clone(&fake)), bus)
        .await
        .expect("open message service");
    (service, fake)
}

/// Sends `text` as `sender_id` from device "phone" and returns the stored
/// message.
pub(crate) async fn send(
    service: &MessageService,
    sender_id: i64,
    conversation_id: i64,
    client_msg_id: &str,
) -> Result<confab_proto::v1::Message, Status> {
    use confab_proto::message::v1::SendRequest;
    use confab_proto::message::v1::messages_server::Messages;
    let request = Request::new(SendRequest {
        sender_id,
        sender_device: "phone".into(),
        conversation_id,
        client_msg_id: client_msg_id.into(),
        text: format!("{client_msg_id} from {sender_id}"),
    });
    let response = Messages::send(service, request).await?.into_inner();
    Ok(response.message.expect("send answers with the message"))
}

/// Returns every event of `user_id`'s sequence, in order.
pub(crate) async fn events_of(
    service: &MessageService,
    user_id: i64,
) -> Vec<confab_proto::v1::event::Kind> {
    use confab_proto::message::v1::SyncRequest;
    use confab_proto::message::v1::messages_server::Messages;
    let request = Request::new(SyncRequest {
        user_id,
        after: 0,
        limit: 1000,
    });
    let events = Messages::sync(service, request)
        .await
        .expect("sync")
        .into_inner()
        .events;
    events
        .into_iter()
        .map(|event| event.kind.expect("event kind"))
        .collect()
}

/// Returns the ids of the message events of `user_id`'s sequence, in order.
pub(crate) async fn message_ids_of(service: &MessageService, user_id: i64) -> Vec<i64> {
    use confab_proto::v1::event::Kind;
    events_of(service, user_id)
        .await
        .into_iter()
        .filter_map(|kind| match kind {
            Kind::Message(message) => Some(message.id),
            _ => None,
        })
        .collect()
}

/// Returns the ids of a conversation's history as `user_id` reads it, newest
/// first (one page of up to 200).
pub(crate) async fn history_ids(
    service: &MessageService,
    user_id: i64,
    conversation_id: i64,
) -> Result<Vec<i64>, Status> {
    use confab_proto::message::v1::HistoryRequest;
    use confab_proto::message::v1::messages_server::Messages;
    let request = Request::new(HistoryRequest {
        user_id,
        conversation_id,
        limit: 200,
        ..HistoryRequest::default()
    });
    let messages = Messages::history(service, request)
        .await?
        .into_inner()
        .messages;
    Ok(messages.iter().map(|m| m.id).collect())
}

/// Hands `change` to `AppendNotice` and returns the notice message, if any.
pub(crate) async fn append(
    service: &MessageService,
    change: MembershipChange,
) -> Option<confab_proto::v1::Message> {
    use confab_proto::message::v1::AppendNoticeRequest;
    use confab_proto::message::v1::messages_server::Messages;
    let request = Request::new(AppendNoticeRequest {
        change: Some(change),
    });
    Messages::append_notice(service, request)
        .await
        .expect("append notice")
        .into_inner()
        .message
}
