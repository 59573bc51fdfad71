//! `Conversations`: direct conversations, groups and channels, history, receipts.
//!
//! A change of membership or metadata is committed by group-svc first; the
//! gateway then hands it to message-svc, which writes its notice into the
//! conversation in order with the messages (and from then on fans out to the new
//! membership).

use std::collections::{HashMap, HashSet};

use confab_proto::group::v1 as group;
use confab_proto::message::v1 as message;
use confab_proto::v1::conversations_server::Conversations;
use confab_proto::v1::{
    AddMembersRequest, Conversation, ConversationKind, ConversationSummary, CreateChannelRequest,
    CreateGroupRequest, GetConversationRequest, HistoryRequest, HistoryResponse, JoinRequest,
    LeaveRequest, LeaveResponse, ListConversationsRequest, ListConversationsResponse,
    ListMembersRequest, ListMembersResponse, MarkRead, Member, OpenDirectRequest, ReadState,
    ReceiptsRequest, ReceiptsResponse, RemoveMemberRequest, SendAck, SendMessage, SetRoleRequest,
    UpdateConversationRequest,
};
use tonic::{Code, Request, Response, Status};

use super::EdgeApi;
use crate::engine;

/// Default and largest page of the conversation list.
const LIST_PAGE: (u32, u32) = (50, 200);

impl EdgeApi {
    /// Hands a committed membership change to message-svc (which writes its notice
    /// into the conversation) and stops channel pushes to users who left.
    async fn publish_change(
        &self,
        change: group::MembershipChange,
    ) -> Result<Conversation, Status> {
        let conversation = change.conversation.clone().unwrap_or_default();
        if change.notice.is_none() && change.removed_user_ids.is_empty() {
            return Ok(conversation);
        }
        for &user_id in &change.removed_user_ids {
            self.gateway
                .hub
                .close_channel_for_user(user_id, conversation.id);
        }
        let request = message::AppendNoticeRequest {
            change: Some(change),
        };
        self.gateway.messages.clone().append_notice(request).await?;
        Ok(conversation)
    }

    /// Returns the caller's membership; NOT_FOUND, as for a conversation that does
    /// not exist, when they are not a member.
    async fn require_member(&self, conversation_id: i64, user_id: i64) -> Result<Member, Status> {
        let request = group::GetMemberRequest {
            conversation_id,
            user_id,
        };
        match self.gateway.groups.clone().get_member(request).await {
            Ok(member) => Ok(member.into_inner()),
            Err(status) if status.code() == Code::NotFound => {
                Err(Status::not_found("no such conversation"))
            }
            Err(status) => Err(status),
        }
    }

    async fn create(
        &self,
        creator_id: i64,
        kind: ConversationKind,
        name: String,
        topic: String,
        avatar_url: String,
        member_ids: Vec<i64>,
    ) -> Result<Response<Conversation>, Status> {
        let request = group::CreateConversationRequest {
            kind: kind.into(),
            creator_id,
            name,
            topic,
            avatar_url,
            member_ids,
        };
        let change = self
            .gateway
            .groups
            .clone()
            .create_conversation(request)
            .await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }
}

/// A position in the conversation list: (activity id, conversation id) of the
/// last entry of the previous page. Both are Snowflakes, so they order by time.
fn parse_page_token(token: &str) -> Result<Option<(i64, i64)>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("malformed page_token");
    let (activity, id) = token.split_once('.').ok_or_else(bad)?;
    Ok(Some((
        activity.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    )))
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
        let ListConversationsRequest { limit, page_token } = request.into_inner();
        let after = parse_page_token(&page_token)?;
        let limit = match limit {
            0 => LIST_PAGE.0,
            n => n.min(LIST_PAGE.1),
        } as usize;

        let mut groups = self.gateway.groups.clone();
        let mut messages = self.gateway.messages.clone();
        let conversations = groups
            .list_conversations(group::ListConversationsRequest { user_id })
            .await?
            .into_inner()
            .conversations;
        let ids: Vec<i64> = conversations.iter().map(|c| c.id).collect();
        let mut last: HashMap<i64, confab_proto::v1::Message> = messages
            .last_messages(message::LastMessagesRequest {
                conversation_ids: ids,
            })
            .await?
            .into_inner()
            .messages
            .into_iter()
            .map(|m| (m.conversation_id, m))
            .collect();
        // Most recent activity first: the last message's id, or the conversation's
        // own id (its creation) when it has none.
        let mut ordered: Vec<((i64, i64), Conversation)> = conversations
            .into_iter()
            .map(|c| {
                let activity = last.get(&c.id).map_or(c.id, |m| m.id);
                ((activity, c.id), c)
            })
            .filter(|(key, _)| after.is_none_or(|after| *key < after))
            .collect();
        ordered.sort_unstable_by_key(|(key, _)| std::cmp::Reverse(*key));
        let next_page_token = match ordered.get(limit) {
            Some(_) => {
                let (activity, id) = ordered[limit - 1].0;
                format!("{activity}.{id}")
            }
            None => String::new(),
        };
        ordered.truncate(limit);

        let page_ids: Vec<i64> = ordered.iter().map(|(_, c)| c.id).collect();
        let mut states: HashMap<i64, ReadState> = messages
            .unread_counts(message::UnreadCountsRequest {
                user_id,
                conversation_ids: page_ids,
            })
            .await?
            .into_inner()
            .states
            .into_iter()
            .map(|s| (s.conversation_id, s))
            .collect();
        let named: HashSet<i64> = ordered
            .iter()
            .flat_map(|(_, c)| {
                let members: &[i64] = if c.kind() == ConversationKind::Direct {
                    &c.member_ids
                } else {
                    &[]
                };
                let sender = last.get(&c.id).map(|m| m.sender_id);
                members.iter().copied().chain(sender)
            })
            .collect();
        let names: HashMap<i64, String> = groups
            .get_users(group::GetUsersRequest {
                ids: named.into_iter().collect(),
            })
            .await?
            .into_inner()
            .users
            .into_iter()
            .map(|u| (u.id, u.username))
            .collect();
        let summaries = ordered
            .into_iter()
            .map(|(_, conversation)| {
                let last_message = last.remove(&conversation.id);
                let state = states.remove(&conversation.id).unwrap_or_default();
                let wanted: Vec<i64> = match conversation.kind() {
                    ConversationKind::Direct => conversation.member_ids.clone(),
                    _ => last_message.iter().map(|m| m.sender_id).collect(),
                };
                ConversationSummary {
                    member_names: wanted
                        .into_iter()
                        .filter_map(|id| names.get(&id).map(|name| (id, name.clone())))
                        .collect(),
                    last_message,
                    unread_count: state.unread_count,
                    read_up_to: state.read_up_to,
                    conversation: Some(conversation),
                }
            })
            .collect();
        Ok(Response::new(ListConversationsResponse {
            conversations: summaries,
            next_page_token,
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
        self.limits.send(user_id)?;
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

    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let user_id = self.caller(&request).await?;
        self.limits.creation(user_id)?;
        let CreateGroupRequest {
            name,
            member_ids,
            topic,
            avatar_url,
        } = request.into_inner();
        let kind = ConversationKind::Group;
        self.create(user_id, kind, name, topic, avatar_url, member_ids)
            .await
    }

    async fn create_channel(
        &self,
        request: Request<CreateChannelRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let user_id = self.caller(&request).await?;
        self.limits.creation(user_id)?;
        let CreateChannelRequest {
            name,
            topic,
            avatar_url,
        } = request.into_inner();
        let kind = ConversationKind::Channel;
        self.create(user_id, kind, name, topic, avatar_url, Vec::new())
            .await
    }

    async fn get(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let user_id = self.caller(&request).await?;
        let conversation_id = request.into_inner().conversation_id;
        self.require_member(conversation_id, user_id).await?;
        let request = group::GetConversationRequest { conversation_id };
        self.gateway.groups.clone().get_conversation(request).await
    }

    async fn add_members(
        &self,
        request: Request<AddMembersRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let actor_id = self.caller(&request).await?;
        let AddMembersRequest {
            conversation_id,
            user_ids,
        } = request.into_inner();
        self.limits.invitations(actor_id, user_ids.len())?;
        let request = group::AddMembersRequest {
            conversation_id,
            actor_id,
            user_ids,
        };
        let change = self.gateway.groups.clone().add_members(request).await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let actor_id = self.caller(&request).await?;
        let RemoveMemberRequest {
            conversation_id,
            user_id,
        } = request.into_inner();
        let request = group::RemoveMemberRequest {
            conversation_id,
            actor_id,
            user_id,
        };
        let change = self.gateway.groups.clone().remove_member(request).await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let user_id = self.caller(&request).await?;
        let conversation_id = request.into_inner().conversation_id;
        let request = group::RemoveMemberRequest {
            conversation_id,
            actor_id: user_id,
            user_id,
        };
        let change = self.gateway.groups.clone().remove_member(request).await?;
        self.publish_change(change.into_inner()).await?;
        Ok(Response::new(LeaveResponse {}))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Conversation>, Status> {
        let user_id = self.caller(&request).await?;
        let conversation_id = request.into_inner().conversation_id;
        let request = group::JoinRequest {
            conversation_id,
            user_id,
        };
        let change = self.gateway.groups.clone().join(request).await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }

    async fn set_role(
        &self,
        request: Request<SetRoleRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let actor_id = self.caller(&request).await?;
        let SetRoleRequest {
            conversation_id,
            user_id,
            role,
        } = request.into_inner();
        let request = group::SetRoleRequest {
            conversation_id,
            actor_id,
            user_id,
            role,
        };
        let change = self.gateway.groups.clone().set_role(request).await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }

    async fn update(
        &self,
        request: Request<UpdateConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        let actor_id = self.caller(&request).await?;
        let UpdateConversationRequest {
            conversation_id,
            name,
            topic,
            avatar_url,
        } = request.into_inner();
        let request = group::UpdateConversationRequest {
            conversation_id,
            actor_id,
            name,
            topic,
            avatar_url,
        };
        let change = self
            .gateway
            .groups
            .clone()
            .update_conversation(request)
            .await?;
        Ok(Response::new(
            self.publish_change(change.into_inner()).await?,
        ))
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        let user_id = self.caller(&request).await?;
        let ListMembersRequest {
            conversation_id,
            after_user_id,
            limit,
        } = request.into_inner();
        self.require_member(conversation_id, user_id).await?;
        let request = group::ListMembersRequest {
            conversation_id,
            after_user_id,
            limit,
        };
        let page = self.gateway.groups.clone().list_members(request).await?;
        let page = page.into_inner();
        Ok(Response::new(ListMembersResponse {
            members: page.members,
            has_more: page.has_more,
        }))
    }

    async fn receipts(
        &self,
        request: Request<ReceiptsRequest>,
    ) -> Result<Response<ReceiptsResponse>, Status> {
        let user_id = self.caller(&request).await?;
        let ReceiptsRequest {
            conversation_id,
            message_id,
            per_member,
        } = request.into_inner();
        let request = message::ReceiptsRequest {
            user_id,
            conversation_id,
            message_id,
            per_member,
        };
        self.gateway.messages.clone().receipts(request).await
    }

    async fn mark_read(&self, request: Request<MarkRead>) -> Result<Response<ReadState>, Status> {
        let user_id = self.caller(&request).await?;
        let MarkRead {
            conversation_id,
            up_to,
        } = request.into_inner();
        let request = message::UpdateReceiptsRequest {
            user_id,
            conversation_id,
            delivered_up_to: 0,
            read_up_to: up_to,
        };
        let response = self
            .gateway
            .messages
            .clone()
            .update_receipts(request)
            .await?;
        Ok(Response::new(
            response.into_inner().read_state.unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_page_token;

    /// Page tokens round-trip; malformed ones are refused, not panicked on.
    #[test]
    fn page_tokens() {
        assert_eq!(parse_page_token("").unwrap(), None);
        assert_eq!(parse_page_token("12.34").unwrap(), Some((12, 34)));
        for bad in ["12", ".", "a.b", "1.2.3", "99999999999999999999.1"] {
            assert!(parse_page_token(bad).is_err(), "{bad}");
        }
    }
}
