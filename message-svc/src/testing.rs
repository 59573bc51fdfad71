//! Test doubles shared by the unit tests: the real group-svc served in process
//! with a fixture of users and conversations, a recording live bus, and a
//! service opened on a SQLite file in a temporary directory.

use std::sync::Arc;

use confab_common::bus::{LiveBus, LiveEvent};
use confab_common::channel::{GrpcChannel, in_process};
use confab_group_svc::{GroupLimits, GroupService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::group::v1::{
    AddMembersRequest, CreateConversationRequest, JoinRequest, MembershipChange, OpenDirectRequest,
    RemoveMemberRequest, SetRoleRequest,
};
use confab_proto::v1::{ConversationKind, Role};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::{Request, Status};

use crate::{MessageConfig, MessageService};

/// The real group-svc on an in-memory SQLite database, with the default
/// fixture: users 0 to 9 and four conversations created through its RPCs.
#[derive(Debug, Clone)]
pub(crate) struct GroupSvc {
    /// `u[n]` is the user the tests call n; ids increase with n.
    pub(crate) u: [i64; 10],
    /// The direct conversation of users 1 and 2.
    pub(crate) direct: i64,
    /// A group of users 1, 2 and 3, 1 the owner.
    pub(crate) trio: i64,
    /// A group of users 1 to 4, 1 the owner.
    pub(crate) group: i64,
    /// A channel: 1 owner, 2 admin, 3 and 4 subscribers.
    pub(crate) channel: i64,
    /// In process, as the message service calls it.
    client: GroupsClient<GrpcChannel>,
    /// group-svc's database, kept to take it down ([`GroupSvc::database_down`]).
    pool: sqlx::SqlitePool,
}

impl GroupSvc {
    /// Opens group-svc on a fresh database and creates the fixture.
    pub(crate) async fn open() -> Self {
        let pool = confab_common::db::open_sqlite_memory()
            .await
            .expect("group-svc database");
        let service = GroupService::from_pool(pool.clone(), 1, GroupLimits::default())
            .await
            .expect("open group-svc");
        let mut client = GroupsClient::new(in_process(GroupsServer::new(service)));
        let u = confab_common::testkit::ensure_users(&mut client).await;
        let direct = OpenDirectRequest {
            user_a: u[1],
            user_b: u[2],
        };
        let direct = client.open_direct(direct).await.expect("open direct");
        let mut groups = Self {
            u,
            direct: direct.into_inner().id,
            trio: 0,
            group: 0,
            channel: 0,
            client,
            pool,
        };
        groups.trio = id_of(&groups.create(u[1], &[u[2], u[3]]).await);
        groups.group = id_of(&groups.create(u[1], &[u[2], u[3], u[4]]).await);
        groups.channel = groups.open_channel().await;
        groups
    }

    /// Creates the fixture's channel and returns its id.
    async fn open_channel(&self) -> i64 {
        let mut client = self.client.clone();
        let request = CreateConversationRequest {
            kind: ConversationKind::Channel.into(),
            creator_id: self.u[1],
            name: "channel".into(),
            ..CreateConversationRequest::default()
        };
        let created = client.create_conversation(request).await;
        let channel = id_of(&created.expect("create channel").into_inner());
        for user_id in [self.u[2], self.u[3], self.u[4]] {
            let join = JoinRequest {
                conversation_id: channel,
                user_id,
            };
            client.join(join).await.expect("join channel");
        }
        let admin = SetRoleRequest {
            conversation_id: channel,
            actor_id: self.u[1],
            user_id: self.u[2],
            role: Role::Admin.into(),
        };
        client.set_role(admin).await.expect("make an admin");
        channel
    }

    /// Returns a client, for the message service.
    pub(crate) fn client(&self) -> GroupsClient<GrpcChannel> {
        self.client.clone()
    }

    /// `creator_id` creates a group with `member_ids`; returns the change the
    /// gateway hands to `AppendNotice`.
    pub(crate) async fn create(&self, creator_id: i64, member_ids: &[i64]) -> MembershipChange {
        let request = CreateConversationRequest {
            kind: ConversationKind::Group.into(),
            creator_id,
            name: "group".into(),
            member_ids: member_ids.to_vec(),
            ..CreateConversationRequest::default()
        };
        let change = self.client.clone().create_conversation(request).await;
        change.expect("create group").into_inner()
    }

    /// `actor_id` removes `user_id` (or leaves, when they are the same).
    pub(crate) async fn remove(
        &self,
        conversation_id: i64,
        actor_id: i64,
        user_id: i64,
    ) -> MembershipChange {
        let request = RemoveMemberRequest {
            conversation_id,
            actor_id,
            user_id,
        };
        let change = self.client.clone().remove_member(request).await;
        change.expect("remove member").into_inner()
    }

    /// `actor_id` adds `user_ids` as members.
    pub(crate) async fn add_members(
        &self,
        conversation_id: i64,
        actor_id: i64,
        user_ids: &[i64],
    ) -> MembershipChange {
        let request = AddMembersRequest {
            conversation_id,
            actor_id,
            user_ids: user_ids.to_vec(),
        };
        let change = self.client.clone().add_members(request).await;
        change.expect("add members").into_inner()
    }

    /// Closes group-svc's database: every later lookup fails, as when the
    /// database is down.
    pub(crate) async fn database_down(&self) {
        self.pool.close().await;
    }
}

/// Returns the id of the conversation a change is about.
pub(crate) fn id_of(change: &MembershipChange) -> i64 {
    change
        .conversation
        .as_ref()
        .expect("changed conversation")
        .id
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

/// Opens group-svc with the default fixture, and a service on `dir` calling
/// it.
pub(crate) async fn open_service(
    dir: &tempfile::TempDir,
    bus: Arc<RecordingBus>,
) -> (MessageService, GroupSvc) {
    let groups = GroupSvc::open().await;
    (open_service_with(dir, bus, &groups).await, groups)
}

/// Opens a service on `dir` calling `groups` (again, for a restart).
pub(crate) async fn open_service_with(
    dir: &tempfile::TempDir,
    bus: Arc<RecordingBus>,
    groups: &GroupSvc,
) -> MessageService {
    MessageService::open(config(dir), groups.client(), bus)
        .await
        .expect("open message service")
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
