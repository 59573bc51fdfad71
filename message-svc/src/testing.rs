//! Test doubles shared by the unit tests: a fake group-svc, a recording live bus,
//! and a service opened on a SQLite file in a temporary directory.

use std::collections::HashMap;
use std::sync::Arc;

use confab_common::bus::{LiveBus, LiveEvent};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::{Groups, GroupsServer};
use confab_proto::group::v1::*;
use confab_proto::v1::{Conversation, ConversationKind, User};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::{MessageConfig, MessageService};

/// Conversation id whose lookup fails with UNAVAILABLE.
pub(crate) const BROKEN_CONVERSATION: i64 = 666;

/// A group-svc that knows a fixed set of conversations.
#[derive(Debug, Default)]
pub(crate) struct FakeGroups {
    conversations: HashMap<i64, Vec<i64>>,
}

impl FakeGroups {
    pub(crate) fn new(conversations: &[(i64, &[i64])]) -> Self {
        Self {
            conversations: conversations
                .iter()
                .map(|(id, members)| (*id, members.to_vec()))
                .collect(),
        }
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
        let members = self
            .conversations
            .get(&id)
            .ok_or_else(|| Status::not_found("no such conversation"))?;
        Ok(Response::new(Conversation {
            id,
            kind: ConversationKind::Direct.into(),
            member_ids: members.clone(),
            created_at_ms: 0,
        }))
    }
    async fn list_conversations(
        &self,
        _: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Returns an in-process client of `fake`.
pub(crate) fn groups_client(fake: FakeGroups) -> GroupsClient<confab_common::channel::GrpcChannel> {
    GroupsClient::new(confab_common::channel::in_process(GroupsServer::new(fake)))
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

/// Opens a service on `dir` with conversations 1 = {1, 2} and 2 = {1, 2, 3}.
pub(crate) async fn open_service(
    dir: &tempfile::TempDir,
    bus: Arc<RecordingBus>,
) -> MessageService {
    let groups = groups_client(FakeGroups::new(&[(1, &[1, 2]), (2, &[1, 2, 3])]));
    MessageService::open(config(dir), groups, bus)
        .await
        .expect("open message service")
}
