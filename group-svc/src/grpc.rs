//! The generated `Groups` gRPC trait on top of [`GroupService`]: converts between
//! protobuf and domain types and maps errors to statuses, nothing else.

use confab_proto::group::v1::groups_server::Groups;
use confab_proto::group::v1::{
    CreateUserRequest, EnsureUserRequest, GetConversationRequest, GetUserRequest, GetUsersRequest,
    GetUsersResponse, ListConversationsRequest, ListConversationsResponse, OpenDirectRequest,
    VerifyPasswordRequest,
};
use confab_proto::v1 as proto;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::GroupService;
use crate::store::{Conversation, ConversationKind, User};

#[tonic::async_trait]
impl Groups for GroupService {
    #[instrument(skip_all)]
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let CreateUserRequest { username, password } = request.into_inner();
        let user = self.create_user(&username, password).await?;
        Ok(Response::new(user.into()))
    }

    #[instrument(skip_all)]
    async fn verify_password(
        &self,
        request: Request<VerifyPasswordRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let VerifyPasswordRequest { username, password } = request.into_inner();
        let user = self.verify_password(&username, password).await?;
        Ok(Response::new(user.into()))
    }

    #[instrument(skip_all)]
    async fn ensure_user(
        &self,
        request: Request<EnsureUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let user = self.ensure_user(&request.into_inner().username).await?;
        Ok(Response::new(user.into()))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().id))]
    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let GetUserRequest { id, username } = request.into_inner();
        let user = self.get_user(id, &username).await?;
        Ok(Response::new(user.into()))
    }

    #[instrument(skip_all, fields(count = request.get_ref().ids.len()))]
    async fn get_users(
        &self,
        request: Request<GetUsersRequest>,
    ) -> Result<Response<GetUsersResponse>, Status> {
        let users = self.get_users(&request.into_inner().ids).await?;
        let users = users.into_iter().map(proto::User::from).collect();
        Ok(Response::new(GetUsersResponse { users }))
    }

    #[instrument(skip_all, fields(user_a = request.get_ref().user_a, user_b = request.get_ref().user_b))]
    async fn open_direct(
        &self,
        request: Request<OpenDirectRequest>,
    ) -> Result<Response<proto::Conversation>, Status> {
        let OpenDirectRequest { user_a, user_b } = request.into_inner();
        let conversation = self.open_direct(user_a, user_b).await?;
        Ok(Response::new(conversation.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id))]
    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<proto::Conversation>, Status> {
        let conversation = self
            .get_conversation(request.into_inner().conversation_id)
            .await?;
        Ok(Response::new(conversation.into()))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let conversations = self
            .list_conversations(request.into_inner().user_id)
            .await?;
        let conversations = conversations
            .into_iter()
            .map(proto::Conversation::from)
            .collect();
        Ok(Response::new(ListConversationsResponse { conversations }))
    }
}

impl From<User> for proto::User {
    fn from(user: User) -> Self {
        Self {
            id: user.id,
            username: user.username,
            created_at_ms: user.created_at_ms,
        }
    }
}

impl From<ConversationKind> for proto::ConversationKind {
    fn from(kind: ConversationKind) -> Self {
        match kind {
            ConversationKind::Direct => Self::Direct,
        }
    }
}

impl From<Conversation> for proto::Conversation {
    fn from(conversation: Conversation) -> Self {
        Self {
            id: conversation.id,
            kind: proto::ConversationKind::from(conversation.kind).into(),
            member_ids: conversation.member_ids,
            created_at_ms: conversation.created_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::test_support::memory_service;

    fn create(username: &str, password: &str) -> Request<CreateUserRequest> {
        Request::new(CreateUserRequest {
            username: username.into(),
            password: password.into(),
        })
    }

    /// Each refusal reaches the client with its gRPC code and a clear message.
    #[tokio::test]
    async fn errors_map_to_codes_and_messages() {
        let service = memory_service().await;
        let cases = [
            (
                Groups::create_user(&service, create("a b", "password1")).await,
                Code::InvalidArgument,
                "invalid username: only letters a-z, digits, '_', '.' and '-' are allowed",
            ),
            (
                Groups::create_user(&service, create("abc", "short")).await,
                Code::InvalidArgument,
                "password must be 8 to 128 bytes",
            ),
            (
                Groups::create_user(&service, create("abc", "password1")).await,
                Code::Ok,
                "",
            ),
            (
                Groups::create_user(&service, create("ABC", "password1")).await,
                Code::AlreadyExists,
                "username taken",
            ),
        ];
        for (result, code, message) in cases {
            match result {
                Ok(_) => assert_eq!(code, Code::Ok),
                Err(status) => {
                    assert_eq!((status.code(), status.message()), (code, message));
                }
            }
        }

        let wrong = VerifyPasswordRequest {
            username: "abc".into(),
            password: "password2".into(),
        };
        let status = Groups::verify_password(&service, Request::new(wrong))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "wrong username or password");

        let missing = GetUserRequest {
            id: 99,
            username: String::new(),
        };
        let status = Groups::get_user(&service, Request::new(missing))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such user")
        );

        let missing = GetConversationRequest { conversation_id: 7 };
        let status = Groups::get_conversation(&service, Request::new(missing))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such conversation")
        );
    }

    /// OpenDirect answers a DIRECT conversation with ascending member ids.
    #[tokio::test]
    async fn open_direct_converts_to_proto() {
        let service = memory_service().await;
        let a = Groups::create_user(&service, create("ann", "password1"))
            .await
            .unwrap();
        let b = Groups::create_user(&service, create("ben", "password1"))
            .await
            .unwrap();
        let (a, b) = (a.into_inner().id, b.into_inner().id);
        let request = OpenDirectRequest {
            user_a: b,
            user_b: a,
        };
        let conversation = Groups::open_direct(&service, Request::new(request))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(conversation.kind(), proto::ConversationKind::Direct);
        assert_eq!(conversation.member_ids, vec![a.min(b), a.max(b)]);
        assert!(conversation.created_at_ms > 0);

        let same = OpenDirectRequest {
            user_a: a,
            user_b: a,
        };
        let status = Groups::open_direct(&service, Request::new(same))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
