//! Receipts as watermarks (DESIGN.md section 6): each member's `delivered_up_to`
//! and `read_up_to` per conversation, moved forward by the writer in order with
//! the sends; aggregates of one message; unread counts.

use std::collections::HashMap;

use confab_proto::v1::{MemberReceipt, ReadState, ReceiptsResponse};

use crate::MessageService;
use crate::error::MessageError;
use crate::store::Watermarks;
use crate::writer::{self, ReceiptCommand, ReceiptsMoved};

/// Most conversations one `UnreadCounts` call may name.
const UNREAD_COUNTS_MAX_IDS: usize = 1000;

/// Most per-member rows listed for a channel message.
const CHANNEL_RECEIPTS_MAX_MEMBERS: u32 = 1000;

impl MessageService {
    /// Moves `user_id`'s watermarks in a conversation forward (0: unchanged),
    /// never beyond its newest message; reading implies delivery. The senders of
    /// the newly covered messages get a receipt event (not in channels), and the
    /// user's own devices a read state when the read watermark moved.
    pub(crate) async fn update_receipts(
        &self,
        user_id: i64,
        conversation_id: i64,
        delivered_up_to: i64,
        read_up_to: i64,
    ) -> Result<ReceiptsMoved, MessageError> {
        let command = self
            .prepare_receipts(user_id, conversation_id, delivered_up_to, read_up_to)
            .await?;
        writer::submit_receipts(&self.writer()?, command).await
    }

    /// Validates a watermark move and checks membership: the writer's command,
    /// not yet queued.
    pub(crate) async fn prepare_receipts(
        &self,
        user_id: i64,
        conversation_id: i64,
        delivered_up_to: i64,
        read_up_to: i64,
    ) -> Result<ReceiptCommand, MessageError> {
        if delivered_up_to < 0 || read_up_to < 0 {
            return Err(MessageError::InvalidArgument(
                "watermarks must not be negative",
            ));
        }
        // For channels this is the only membership check (they have no member
        // list); for the others the writer checks again at commit time.
        let hint = self
            .inner
            .members
            .check_member(conversation_id, user_id)
            .await?;
        Ok(ReceiptCommand {
            user_id,
            conversation_id,
            delivered_up_to,
            read_up_to,
            hint,
        })
    }

    /// Returns how far `message_id` got among the current members other than
    /// its sender, to a member: counts, and every member's watermarks when
    /// `per_member` (for channels at most 1,000, and only members with a row).
    pub(crate) async fn receipts(
        &self,
        user_id: i64,
        conversation_id: i64,
        message_id: i64,
        per_member: bool,
    ) -> Result<ReceiptsResponse, MessageError> {
        let members = &self.inner.members;
        let snapshot = members.check_member(conversation_id, user_id).await?;
        let store = &self.inner.store;
        let message = store
            .message(conversation_id, message_id)
            .await?
            .ok_or(MessageError::MessageNotFound)?;
        let sender = message.sender_id;
        let to_receipt = |(user_id, marks): (i64, Watermarks)| MemberReceipt {
            user_id,
            delivered_up_to: marks.delivered_up_to,
            read_up_to: marks.read_up_to,
        };

        if snapshot.is_channel() {
            // No member list to walk: counts in SQL over the watermarks, which
            // only current subscribers have (a leave drops the row).
            let (delivered_count, read_count) = store
                .receipt_counts(conversation_id, message_id, sender)
                .await?;
            let sender_counted = members.role(conversation_id, sender).await?.is_some();
            let members = if per_member {
                store
                    .watermarks(conversation_id, sender, CHANNEL_RECEIPTS_MAX_MEMBERS)
                    .await?
                    .into_iter()
                    .map(to_receipt)
                    .collect()
            } else {
                Vec::new()
            };
            return Ok(ReceiptsResponse {
                member_count: snapshot
                    .member_count
                    .saturating_sub(u32::from(sender_counted)),
                delivered_count,
                read_count,
                members,
            });
        }

        let marks: HashMap<i64, Watermarks> = store
            .watermarks(conversation_id, sender, u32::MAX)
            .await?
            .into_iter()
            .collect();
        let others: Vec<(i64, Watermarks)> = snapshot
            .members
            .iter()
            .filter(|&&member| member != sender)
            .map(|&member| (member, marks.get(&member).copied().unwrap_or_default()))
            .collect();
        let count = |reached: fn(&Watermarks) -> i64| {
            let n = others
                .iter()
                .filter(|(_, marks)| reached(marks) >= message_id)
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        Ok(ReceiptsResponse {
            member_count: u32::try_from(others.len()).unwrap_or(u32::MAX),
            delivered_count: count(|marks| marks.delivered_up_to),
            read_count: count(|marks| marks.read_up_to),
            members: if per_member {
                others.into_iter().map(to_receipt).collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Returns `user_id`'s read watermark and unread count (messages of others
    /// after it, notices left out, at most 10,000) in each named conversation.
    ///
    /// Membership is not checked: the gateway passes only conversations the user
    /// is a member of (it takes them from group-svc's `ListConversations`), and
    /// a count reveals nothing of a conversation's content.
    pub(crate) async fn unread_counts(
        &self,
        user_id: i64,
        mut conversation_ids: Vec<i64>,
    ) -> Result<Vec<ReadState>, MessageError> {
        if conversation_ids.len() > UNREAD_COUNTS_MAX_IDS {
            return Err(MessageError::InvalidArgument(
                "at most 1000 conversation ids per call",
            ));
        }
        conversation_ids.sort_unstable();
        conversation_ids.dedup();
        Ok(self
            .inner
            .store
            .unread_counts(user_id, &conversation_ids)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use confab_proto::message::v1::messages_server::Messages;
    use confab_proto::message::v1::{ReceiptsRequest, UnreadCountsRequest, UpdateReceiptsRequest};
    use confab_proto::v1::Receipt;
    use confab_proto::v1::event::Kind;
    use tonic::{Code, Request};

    use super::*;
    use crate::testing::{RecordingBus, append, events_of, open_service, send};

    async fn mark(
        service: &MessageService,
        user_id: i64,
        conversation_id: i64,
        delivered_up_to: i64,
        read_up_to: i64,
    ) -> Result<(i64, Option<ReadState>), tonic::Status> {
        let request = Request::new(UpdateReceiptsRequest {
            user_id,
            conversation_id,
            delivered_up_to,
            read_up_to,
        });
        let response = Messages::update_receipts(service, request)
            .await?
            .into_inner();
        Ok((response.delivered_up_to, response.read_state))
    }

    async fn receipts_of(service: &MessageService, user_id: i64) -> Vec<Receipt> {
        events_of(service, user_id)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                Kind::Receipt(receipt) => Some(receipt),
                _ => None,
            })
            .collect()
    }

    async fn read_states_of(service: &MessageService, user_id: i64) -> Vec<ReadState> {
        events_of(service, user_id)
            .await
            .into_iter()
            .filter_map(|kind| match kind {
                Kind::ReadState(state) => Some(state),
                _ => None,
            })
            .collect()
    }

    fn state(conversation_id: i64, read_up_to: i64, unread_count: u32) -> ReadState {
        ReadState {
            conversation_id,
            read_up_to,
            unread_count,
        }
    }

    /// Watermarks only move forward, reading implies delivery, and both stop at
    /// the newest message; Receipt events go to the senders of the newly covered
    /// messages only, ReadState events to the reader's own sequence.
    #[tokio::test]
    async fn watermarks_move_forward_and_notify_senders() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group) = (groups.u, groups.group);
        let m1 = send(&service, u[1], group, "m1").await.unwrap().id;
        let m2 = send(&service, u[2], group, "m2").await.unwrap().id;
        let m3 = send(&service, u[1], group, "m3").await.unwrap().id;

        // A delivery leaves what is unread as it is: no read state.
        let delivered = mark(&service, u[3], group, m1, 0).await.unwrap();
        assert_eq!(delivered, (m1, None));
        let read = mark(&service, u[3], group, 0, m2).await.unwrap();
        let expected = (m2, Some(state(group, m2, 1)));
        assert_eq!(read, expected, "read implies delivered");
        let back = mark(&service, u[3], group, m1, m1).await.unwrap();
        assert_eq!(back, (m2, Some(state(group, m2, 1))), "never back");
        let beyond = mark(&service, u[3], group, 0, i64::MAX).await.unwrap();
        let expected = (m3, Some(state(group, m3, 0)));
        assert_eq!(beyond, expected, "clamped to the newest");

        let receipt = |delivered_up_to, read_up_to| Receipt {
            conversation_id: group,
            user_id: u[3],
            delivered_up_to,
            read_up_to,
        };
        assert_eq!(
            receipts_of(&service, u[1]).await,
            vec![receipt(m1, 0), receipt(m2, m2), receipt(m3, m3)]
        );
        assert_eq!(receipts_of(&service, u[2]).await, vec![receipt(m2, m2)]);
        assert!(receipts_of(&service, u[3]).await.is_empty());
        assert!(receipts_of(&service, u[4]).await.is_empty());
        assert_eq!(
            read_states_of(&service, u[3]).await,
            vec![state(group, m2, 1), state(group, m3, 0)]
        );
        assert!(read_states_of(&service, u[1]).await.is_empty());

        let stranger = mark(&service, u[9], group, m1, m1).await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound);
    }

    /// The aggregate of a group message counts the members other than its
    /// sender (4 members: delivered to 2 of 3, read by 1), and the per-member
    /// list is exact, watermarks 0 for members without a row; a non-member
    /// asking gets NOT_FOUND.
    #[tokio::test]
    async fn group_aggregate_and_per_member() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group) = (groups.u, groups.group);
        let m = send(&service, u[1], group, "m").await.unwrap().id;
        mark(&service, u[2], group, m, 0).await.unwrap();
        mark(&service, u[3], group, 0, m).await.unwrap();
        let ask = |user_id, per_member| {
            Messages::receipts(
                &service,
                Request::new(ReceiptsRequest {
                    user_id,
                    conversation_id: group,
                    message_id: m,
                    per_member,
                }),
            )
        };
        let summary = ask(u[1], false).await.unwrap().into_inner();
        assert_eq!(
            (
                summary.member_count,
                summary.delivered_count,
                summary.read_count,
                summary.members.len()
            ),
            (3, 2, 1, 0)
        );
        let detail = ask(u[4], true).await.unwrap().into_inner();
        let members: Vec<(i64, i64, i64)> = detail
            .members
            .iter()
            .map(|r| (r.user_id, r.delivered_up_to, r.read_up_to))
            .collect();
        assert_eq!(members, vec![(u[2], m, 0), (u[3], m, m), (u[4], 0, 0)]);
        assert_eq!(ask(u[9], false).await.unwrap_err().code(), Code::NotFound);
    }

    /// In a channel, receipts move without Receipt events (the reader still
    /// gets their ReadState) and the aggregate is counted over the subscribers'
    /// rows; a leave drops the leaver's row.
    #[tokio::test]
    async fn channel_receipts_counted_in_sql() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, channel) = (groups.u, groups.channel);
        let post = send(&service, u[2], channel, "post").await.unwrap().id;
        mark(&service, u[3], channel, 0, post).await.unwrap();
        mark(&service, u[4], channel, post, 0).await.unwrap();
        assert!(receipts_of(&service, u[2]).await.is_empty());
        assert_eq!(
            read_states_of(&service, u[3]).await,
            vec![state(channel, post, 0)]
        );
        let ask = || service.receipts(u[1], channel, post, true);
        let summary = ask().await.unwrap();
        assert_eq!(
            (
                summary.member_count,
                summary.delivered_count,
                summary.read_count
            ),
            (3, 2, 1)
        );
        assert_eq!(summary.members.len(), 2);
        append(&service, groups.remove(channel, u[4], u[4]).await).await;
        let summary = ask().await.unwrap();
        assert_eq!(
            (
                summary.member_count,
                summary.delivered_count,
                summary.read_count
            ),
            (2, 1, 1)
        );
        assert_eq!(
            mark(&service, u[4], channel, post, post)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );
    }

    /// Unread counts leave out the user's own messages and notices, drop to 0
    /// once the user marks the newest message read, and refuse more than 1000
    /// ids.
    #[tokio::test]
    async fn unread_counts_exclude_own_and_notices() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group, direct) = (groups.u, groups.group, groups.direct);
        send(&service, u[1], group, "a").await.unwrap();
        send(&service, u[1], group, "b").await.unwrap();
        send(&service, u[3], group, "c").await.unwrap();
        let added = groups.add_members(group, u[1], &[u[5]]).await;
        let notice = append(&service, added).await.unwrap();
        send(&service, u[1], direct, "direct").await.unwrap();
        let counts = |user_id| {
            let request = Request::new(UnreadCountsRequest {
                user_id,
                conversation_ids: vec![group, direct, group],
            });
            let service = service.clone();
            async move {
                Messages::unread_counts(&service, request)
                    .await
                    .unwrap()
                    .into_inner()
                    .states
            }
        };
        assert_eq!(
            counts(u[3]).await,
            vec![state(direct, 0, 1), state(group, 0, 2)]
        );
        assert_eq!(
            counts(u[2]).await,
            vec![state(direct, 0, 1), state(group, 0, 3)]
        );
        mark(&service, u[2], group, 0, notice.id).await.unwrap();
        assert_eq!(
            counts(u[2]).await,
            vec![state(direct, 0, 1), state(group, notice.id, 0)]
        );
        let too_many = Request::new(UnreadCountsRequest {
            user_id: u[2],
            conversation_ids: (0..1001).collect(),
        });
        let status = Messages::unread_counts(&service, too_many)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
