//! The gRPC edge services: the `Edge` stream and the unary `Accounts` and
//! `Conversations` calls. They authenticate, call the internal services through
//! their generated clients, and convert; no domain logic lives here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use confab_common::auth::TokenType;
use confab_proto::group::v1 as group;
use confab_proto::message::v1 as message;
use confab_proto::v1::accounts_server::Accounts;
use confab_proto::v1::conversations_server::Conversations;
use confab_proto::v1::edge_server::Edge;
use confab_proto::v1::{
    AuthResponse, ClientFrame, Conversation, ConversationSummary, HistoryRequest, HistoryResponse,
    ListConversationsRequest, ListConversationsResponse, LoginRequest, MeRequest,
    OpenDirectRequest, RefreshRequest, RegisterRequest, SendAck, SendMessage, ServerFrame, User,
};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Gateway;
use crate::engine::{self, End, FrameSink, Inbound};

/// Implements the three edge services over one [`Gateway`].
#[derive(Debug, Clone)]
pub(crate) struct EdgeApi {
    gateway: Arc<Gateway>,
    closing: CancellationToken,
}

impl EdgeApi {
    pub(crate) fn new(gateway: Arc<Gateway>, closing: CancellationToken) -> Self {
        Self { gateway, closing }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<i64, Status> {
        crate::auth::from_metadata(
            &self.gateway.tokens,
            &self.gateway.groups,
            request.metadata(),
        )
        .await
    }

    async fn user(&self, id: i64) -> Result<User, Status> {
        let request = group::GetUserRequest {
            id,
            username: String::new(),
        };
        Ok(self
            .gateway
            .groups
            .clone()
            .get_user(request)
            .await?
            .into_inner())
    }

    fn auth_response(&self, user: User) -> AuthResponse {
        let access = self.gateway.tokens.mint(user.id, TokenType::Access);
        let refresh = self.gateway.tokens.mint(user.id, TokenType::Refresh);
        AuthResponse {
            user: Some(user),
            access_token: access.token,
            access_expires_at_ms: access.expires_at_ms,
            refresh_token: refresh.token,
        }
    }
}

/// The gRPC side of a live connection: frames go into the response stream.
struct GrpcSink(mpsc::Sender<Result<ServerFrame, Status>>);

impl FrameSink for GrpcSink {
    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        self.0.send(Ok(frame)).await.map_err(|_| ())
    }
}

#[tonic::async_trait]
impl Edge for EdgeApi {
    type StreamStream = ReceiverStream<Result<ServerFrame, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let user_id = self.caller(&request).await?;
        let inbound = request
            .into_inner()
            .take_while(|item| std::future::ready(!matches!(item, Err(s) if is_end(s))))
            .map(|item| match item {
                Ok(frame) => Inbound::Frame(frame),
                Err(status)
                    if matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange) =>
                {
                    Inbound::TooLarge
                }
                // A decode error of a well-framed message: the bytes were not a ClientFrame.
                Err(status) => Inbound::Malformed(status.message().to_owned()),
            })
            .boxed();
        let (sender, receiver) = mpsc::channel(self.gateway.config.outbound_queue);
        let gateway = self.gateway.clone();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let mut sink = GrpcSink(sender);
            let end = engine::run(gateway, closing, Some(user_id), inbound, &mut sink).await;
            let status = match end {
                End::TooLarge => Some(Status::resource_exhausted("frame too large")),
                End::Shutdown => Some(Status::unavailable("server shutting down")),
                _ => None,
            };
            if let Some(status) = status {
                let _ = sink.0.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Returns whether a stream error means the client is gone (rather than one bad
/// frame the engine should answer).
fn is_end(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::ResourceExhausted | Code::OutOfRange | Code::Internal
    )
}

#[tonic::async_trait]
impl Accounts for EdgeApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let RegisterRequest { username, password } = request.into_inner();
        let request = group::CreateUserRequest { username, password };
        let user = self.gateway.groups.clone().create_user(request).await?;
        Ok(Response::new(self.auth_response(user.into_inner())))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let LoginRequest { username, password } = request.into_inner();
        let request = group::VerifyPasswordRequest { username, password };
        let user = self.gateway.groups.clone().verify_password(request).await?;
        Ok(Response::new(self.auth_response(user.into_inner())))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let token = request.into_inner().refresh_token;
        let user_id = self
            .gateway
            .tokens
            .verify_refresh(&token)
            .map_err(|_| Status::unauthenticated(crate::auth::REFUSED))?;
        // A refresh token of a user that no longer exists is as good as none.
        let user = self
            .user(user_id)
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => Status::unauthenticated(crate::auth::REFUSED),
                _ => status,
            })?;
        Ok(Response::new(self.auth_response(user)))
    }

    async fn me(&self, request: Request<MeRequest>) -> Result<Response<User>, Status> {
        let user_id = self.caller(&request).await?;
        Ok(Response::new(self.user(user_id).await?))
    }
}

#[tonic::async_trait]
impl Conversations for EdgeApi {
    async fn open_direct(
        &self,
        request: Request<OpenDirectRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let user_id = self.caller(&request).await?;
        let OpenDirectRequest {
            user_id: other,
            username,
        } = request.into_inner();
        if (other == 0) == username.is_empty() {
            return Err(Status::invalid_argument(
                "give exactly one of user_id and username",
            ));
        }
        let mut groups = self.gateway.groups.clone();
        let peer = groups
            .get_user(group::GetUserRequest {
                id: other,
                username,
            })
            .await?
            .into_inner();
        groups
            .open_direct(group::OpenDirectRequest {
                user_a: user_id,
                user_b: peer.id,
            })
            .await
    }

    async fn list(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let user_id = self.caller(&request).await?;
        let mut groups = self.gateway.groups.clone();
        let conversations = groups
            .list_conversations(group::ListConversationsRequest { user_id })
            .await?
            .into_inner()
            .conversations;
        let ids: Vec<i64> = conversations.iter().map(|c| c.id).collect();
        let mut last: HashMap<i64, confab_proto::v1::Message> = self
            .gateway
            .messages
            .clone()
            .last_messages(message::LastMessagesRequest {
                conversation_ids: ids,
            })
            .await?
            .into_inner()
            .messages
            .into_iter()
            .map(|m| (m.conversation_id, m))
            .collect();
        let member_ids: HashSet<i64> = conversations
            .iter()
            .flat_map(|c| c.member_ids.iter().copied())
            .collect();
        let names: HashMap<i64, String> = groups
            .get_users(group::GetUsersRequest {
                ids: member_ids.into_iter().collect(),
            })
            .await?
            .into_inner()
            .users
            .into_iter()
            .map(|u| (u.id, u.username))
            .collect();
        let mut summaries: Vec<ConversationSummary> = conversations
            .into_iter()
            .map(|conversation| ConversationSummary {
                last_message: last.remove(&conversation.id),
                member_names: conversation
                    .member_ids
                    .iter()
                    .filter_map(|id| names.get(id).map(|name| (*id, name.clone())))
                    .collect(),
                conversation: Some(conversation),
            })
            .collect();
        // Most recent activity first: message ids and conversation ids are both
        // Snowflakes, so they compare as times.
        summaries.sort_by_key(|s| {
            let activity = s.last_message.as_ref().map(|m| m.id);
            let created = s.conversation.as_ref().map_or(0, |c| c.id);
            std::cmp::Reverse(activity.unwrap_or(created))
        });
        Ok(Response::new(ListConversationsResponse {
            conversations: summaries,
        }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let user_id = self.caller(&request).await?;
        let HistoryRequest {
            conversation_id,
            before,
            after,
            limit,
        } = request.into_inner();
        let page = self
            .gateway
            .messages
            .clone()
            .history(message::HistoryRequest {
                user_id,
                conversation_id,
                before,
                after,
                limit,
            })
            .await?
            .into_inner();
        Ok(Response::new(HistoryResponse {
            messages: page.messages,
            has_more: page.has_more,
        }))
    }

    async fn send(&self, request: Request<SendMessage>) -> Result<Response<SendAck>, Status> {
        let user_id = self.caller(&request).await?;
        let SendMessage {
            conversation_id,
            client_msg_id,
            text,
        } = request.into_inner();
        let response = self
            .gateway
            .messages
            .clone()
            .send(message::SendRequest {
                sender_id: user_id,
                // Unary sends have no live connection; they count as one device.
                sender_device: "api".to_owned(),
                conversation_id,
                client_msg_id,
                text,
            })
            .await?
            .into_inner();
        Ok(Response::new(engine::send_ack(response)))
    }
}
