//! The generated `Groups` gRPC trait on top of [`GroupService`]: converts between
//! protobuf and domain types and maps errors to statuses, nothing else.

use confab_proto::group::v1::groups_server::Groups;
use confab_proto::group::v1::{
    AddMembersRequest, CheckTokenRequest, CreateConversationRequest, CreateUserRequest,
    EnsureUserRequest, GetConversationRequest, GetMemberRequest, GetUserRequest, GetUsersRequest,
    GetUsersResponse, JoinRequest, ListConversationsRequest, ListConversationsResponse,
    ListMembersRequest, ListMembersResponse, MembershipChange as ProtoMembershipChange,
    OpenDirectRequest, RemoveMemberRequest, RevokeTokensRequest, RevokeTokensResponse,
    SetRoleRequest, SharedWithRequest, SharedWithResponse, UpdateConversationRequest,
    VerifyPasswordRequest,
};
use confab_proto::v1 as proto;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::groups::MetadataUpdate;
use crate::membership::{MembershipChange, Notice, NoticeKind};
use crate::store::{Conversation, ConversationKind, Member, Metadata, Role, User};
use crate::{GroupError, GroupService};

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

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn check_token(
        &self,
        request: Request<CheckTokenRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let CheckTokenRequest {
            user_id,
            session_id,
            issued_at_ms,
        } = request.into_inner();
        let user = self.check_token(user_id, &session_id, issued_at_ms).await?;
        Ok(Response::new(user.into()))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn revoke_tokens(
        &self,
        request: Request<RevokeTokensRequest>,
    ) -> Result<Response<RevokeTokensResponse>, Status> {
        let RevokeTokensRequest {
            user_id,
            session_id,
            before_ms,
            keep_until_ms,
        } = request.into_inner();
        self.revoke_tokens(user_id, &session_id, before_ms, keep_until_ms)
            .await?;
        Ok(Response::new(RevokeTokensResponse {}))
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

    #[instrument(skip_all, fields(creator_id = request.get_ref().creator_id))]
    async fn create_conversation(
        &self,
        request: Request<CreateConversationRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let CreateConversationRequest {
            kind,
            creator_id,
            name,
            topic,
            avatar_url,
            member_ids,
        } = request.into_inner();
        // Unspecified and unknown kinds: the domain refuses Direct the same way.
        let kind = match proto::ConversationKind::try_from(kind) {
            Ok(proto::ConversationKind::Group) => ConversationKind::Group,
            Ok(proto::ConversationKind::Channel) => ConversationKind::Channel,
            _ => return Err(GroupError::InvalidKind.into()),
        };
        let metadata = Metadata {
            name,
            topic,
            avatar_url,
        };
        let change = self
            .create_conversation(kind, creator_id, metadata, &member_ids)
            .await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, actor_id = request.get_ref().actor_id, count = request.get_ref().user_ids.len()))]
    async fn add_members(
        &self,
        request: Request<AddMembersRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let AddMembersRequest {
            conversation_id,
            actor_id,
            user_ids,
        } = request.into_inner();
        let change = self
            .add_members(conversation_id, actor_id, &user_ids)
            .await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, actor_id = request.get_ref().actor_id, user_id = request.get_ref().user_id))]
    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let RemoveMemberRequest {
            conversation_id,
            actor_id,
            user_id,
        } = request.into_inner();
        let change = self
            .remove_member(conversation_id, actor_id, user_id)
            .await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, user_id = request.get_ref().user_id))]
    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let JoinRequest {
            conversation_id,
            user_id,
        } = request.into_inner();
        let change = self.join(conversation_id, user_id).await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, actor_id = request.get_ref().actor_id, user_id = request.get_ref().user_id))]
    async fn set_role(
        &self,
        request: Request<SetRoleRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let SetRoleRequest {
            conversation_id,
            actor_id,
            user_id,
            role,
        } = request.into_inner();
        // Unspecified and unknown roles: the domain refuses Owner the same way.
        let role = match proto::Role::try_from(role) {
            Ok(proto::Role::Admin) => Role::Admin,
            Ok(proto::Role::Member) => Role::Member,
            _ => return Err(GroupError::InvalidRole.into()),
        };
        let change = self
            .set_role(conversation_id, actor_id, user_id, role)
            .await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, actor_id = request.get_ref().actor_id))]
    async fn update_conversation(
        &self,
        request: Request<UpdateConversationRequest>,
    ) -> Result<Response<ProtoMembershipChange>, Status> {
        let UpdateConversationRequest {
            conversation_id,
            actor_id,
            name,
            topic,
            avatar_url,
        } = request.into_inner();
        let update = MetadataUpdate {
            name,
            topic,
            avatar_url,
        };
        let change = self
            .update_conversation(conversation_id, actor_id, update)
            .await?;
        Ok(Response::new(change.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id, user_id = request.get_ref().user_id))]
    async fn get_member(
        &self,
        request: Request<GetMemberRequest>,
    ) -> Result<Response<proto::Member>, Status> {
        let GetMemberRequest {
            conversation_id,
            user_id,
        } = request.into_inner();
        let member = self.get_member(conversation_id, user_id).await?;
        Ok(Response::new(member.into()))
    }

    #[instrument(skip_all, fields(conversation_id = request.get_ref().conversation_id))]
    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let ListMembersRequest {
            conversation_id,
            after_user_id,
            limit,
        } = request.into_inner();
        let (members, has_more) = self
            .list_members(conversation_id, after_user_id, limit)
            .await?;
        let members = members.into_iter().map(proto::Member::from).collect();
        Ok(Response::new(ListMembersResponse { members, has_more }))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn shared_with(
        &self,
        request: Request<SharedWithRequest>,
    ) -> Result<Response<SharedWithResponse>, Status> {
        let SharedWithRequest { user_id, other_ids } = request.into_inner();
        let user_ids = self.shared_with(user_id, &other_ids).await?;
        Ok(Response::new(SharedWithResponse { user_ids }))
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
            ConversationKind::Group => Self::Group,
            ConversationKind::Channel => Self::Channel,
        }
    }
}

impl From<Conversation> for proto::Conversation {
    fn from(conversation: Conversation) -> Self {
        let Metadata {
            name,
            topic,
            avatar_url,
        } = conversation.metadata;
        Self {
            id: conversation.id,
            kind: proto::ConversationKind::from(conversation.kind).into(),
            member_ids: conversation.member_ids,
            created_at_ms: conversation.created_at_ms,
            name,
            topic,
            avatar_url,
            member_count: conversation.member_count,
            version: conversation.version,
        }
    }
}

impl From<Role> for proto::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Member => Self::Member,
            Role::Admin => Self::Admin,
            Role::Owner => Self::Owner,
        }
    }
}

impl From<Member> for proto::Member {
    fn from(member: Member) -> Self {
        Self {
            user_id: member.user_id,
            role: proto::Role::from(member.role).into(),
            joined_at_ms: member.joined_at_ms,
        }
    }
}

impl From<Notice> for proto::Notice {
    fn from(notice: Notice) -> Self {
        use proto::notice::Kind;
        let kind = match notice.kind {
            NoticeKind::Created => Kind::Created(proto::Created {}),
            NoticeKind::MembersAdded(user_ids) => {
                Kind::MembersAdded(proto::MembersAdded { user_ids })
            }
            NoticeKind::MemberRemoved(user_id) => {
                Kind::MemberRemoved(proto::MemberRemoved { user_id })
            }
            NoticeKind::MemberLeft => Kind::MemberLeft(proto::MemberLeft {}),
            NoticeKind::MetadataChanged(Metadata {
                name,
                topic,
                avatar_url,
            }) => Kind::MetadataChanged(proto::MetadataChanged {
                name,
                topic,
                avatar_url,
            }),
            NoticeKind::RoleChanged { user_id, role } => Kind::RoleChanged(proto::RoleChanged {
                user_id,
                role: proto::Role::from(role).into(),
            }),
        };
        Self {
            actor_id: notice.actor_id,
            kind: Some(kind),
        }
    }
}

impl From<MembershipChange> for ProtoMembershipChange {
    fn from(change: MembershipChange) -> Self {
        Self {
            conversation: Some(change.conversation.into()),
            notice: change.notice.map(proto::Notice::from),
            removed_user_ids: change.removed_user_ids,
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

    /// The group RPCs answer MembershipChange with the conversation's new fields
    /// and the notice, and their refusals reach the client with their codes:
    /// INVALID_ARGUMENT for an unspecified kind or role, NOT_FOUND for a
    /// non-member, PERMISSION_DENIED, RESOURCE_EXHAUSTED with the limit.
    #[tokio::test]
    async fn group_rpcs_convert_and_map_errors() {
        let service = crate::test_support::memory_service_with(crate::GroupLimits {
            max_group_size: 2,
            max_channel_size: 10,
        })
        .await;
        let mut ids = Vec::new();
        for name in ["ann", "ben", "cat"] {
            let request = Request::new(EnsureUserRequest {
                username: name.into(),
            });
            ids.push(
                Groups::ensure_user(&service, request)
                    .await
                    .unwrap()
                    .into_inner()
                    .id,
            );
        }
        let create = |kind: proto::ConversationKind, member_ids: Vec<i64>| {
            Request::new(CreateConversationRequest {
                kind: kind.into(),
                creator_id: ids[0],
                name: "team".into(),
                topic: String::new(),
                avatar_url: String::new(),
                member_ids,
            })
        };
        let change = Groups::create_conversation(
            &service,
            create(proto::ConversationKind::Group, vec![ids[1]]),
        )
        .await
        .unwrap()
        .into_inner();
        let conversation = change.conversation.unwrap();
        assert_eq!(conversation.kind(), proto::ConversationKind::Group);
        assert_eq!((conversation.member_count, conversation.version), (2, 1));
        assert_eq!(conversation.name, "team");
        let notice = change.notice.unwrap();
        assert_eq!(notice.actor_id, ids[0]);
        assert_eq!(
            notice.kind,
            Some(proto::notice::Kind::Created(proto::Created {}))
        );

        let status = |result: Result<Response<ProtoMembershipChange>, Status>| {
            let status = result.unwrap_err();
            (status.code(), status.message().to_owned())
        };
        let unspecified = Groups::create_conversation(
            &service,
            create(proto::ConversationKind::Unspecified, vec![]),
        )
        .await;
        assert_eq!(
            status(unspecified),
            (
                Code::InvalidArgument,
                "kind must be group or channel".into()
            )
        );
        let too_big = Groups::create_conversation(
            &service,
            create(proto::ConversationKind::Group, vec![ids[1], ids[2]]),
        )
        .await;
        assert_eq!(
            status(too_big),
            (
                Code::ResourceExhausted,
                "a group holds at most 2 members".into()
            )
        );

        let add = |actor_id: i64| {
            Request::new(AddMembersRequest {
                conversation_id: conversation.id,
                actor_id,
                user_ids: vec![ids[2]],
            })
        };
        assert_eq!(
            status(Groups::add_members(&service, add(ids[2])).await),
            (Code::NotFound, "no such conversation".into())
        );
        assert_eq!(
            status(Groups::add_members(&service, add(ids[1])).await),
            (Code::PermissionDenied, "only admins add members".into())
        );
        let role = |role: proto::Role| {
            Request::new(SetRoleRequest {
                conversation_id: conversation.id,
                actor_id: ids[0],
                user_id: ids[1],
                role: role.into(),
            })
        };
        assert_eq!(
            status(Groups::set_role(&service, role(proto::Role::Unspecified)).await),
            (Code::InvalidArgument, "role must be admin or member".into())
        );
        let promoted = Groups::set_role(&service, role(proto::Role::Admin))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(promoted.conversation.unwrap().version, 2);

        let member = Groups::get_member(
            &service,
            Request::new(GetMemberRequest {
                conversation_id: conversation.id,
                user_id: ids[1],
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(member.role(), proto::Role::Admin);
        let listed = Groups::list_members(
            &service,
            Request::new(ListMembersRequest {
                conversation_id: conversation.id,
                after_user_id: 0,
                limit: 1,
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!((listed.members.len(), listed.has_more), (1, true));

        let left = Groups::remove_member(
            &service,
            Request::new(RemoveMemberRequest {
                conversation_id: conversation.id,
                actor_id: ids[1],
                user_id: ids[1],
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(left.removed_user_ids, vec![ids[1]]);
        assert_eq!(
            left.notice.unwrap().kind,
            Some(proto::notice::Kind::MemberLeft(proto::MemberLeft {}))
        );
    }
}
