//! `AppendNotice`: a committed change of membership or metadata, written into the
//! conversation in order with its messages (DESIGN.md section 13, invariant 5).
//!
//! group-svc commits the change; the gateway then hands it here. The writer
//! installs the conversation's new snapshot, writes the notice as a message
//! (groups and direct conversations) to the members after the change and to
//! those it removed, and records each removed user's leave point: they keep
//! reading history up to the notice, nothing after it. Channels get no message
//! (their subscribers number in the tens of thousands), only leave points.

use std::sync::Arc;

use confab_proto::group::v1::MembershipChange;
use confab_proto::v1::notice;

use crate::MessageService;
use crate::error::MessageError;
use crate::members::Snapshot;
use crate::writer::{self, NoticeCommand, Sent};

impl MessageService {
    /// Writes `change` in order with the conversation's messages and returns the
    /// notice message (`None` when none was written). A retry of the same change
    /// (same conversation version) returns the original, marked duplicate.
    pub(crate) async fn append_notice(
        &self,
        change: MembershipChange,
    ) -> Result<Option<Sent>, MessageError> {
        let command = self.prepare_notice(change)?;
        writer::submit_notice(&self.writer()?, command).await
    }

    /// Forgets what the membership cache holds about the conversation and users
    /// `change` touches; returns the users it added.
    pub(crate) fn forget_change(&self, change: &MembershipChange) -> Vec<i64> {
        let Some(conversation) = change.conversation.as_ref() else {
            return Vec::new();
        };
        let added = match change.notice.as_ref().and_then(|n| n.kind.as_ref()) {
            Some(notice::Kind::MembersAdded(added)) => added.user_ids.clone(),
            _ => Vec::new(),
        };
        // Every user whose cached role the change may have made wrong.
        let mut touched: Vec<i64> = change
            .removed_user_ids
            .iter()
            .chain(&added)
            .copied()
            .collect();
        match change.notice.as_ref().and_then(|n| n.kind.as_ref()) {
            Some(notice::Kind::RoleChanged(changed)) => touched.push(changed.user_id),
            Some(notice::Kind::MemberLeft(_)) => {
                touched.extend(change.notice.as_ref().map(|n| n.actor_id));
            }
            _ => {}
        }
        self.inner.members.invalidate(conversation.id, &touched);
        added
    }

    /// Validates `change`, forgets what the membership cache holds about it, and
    /// returns the writer's command, not yet queued.
    pub(crate) fn prepare_notice(
        &self,
        change: MembershipChange,
    ) -> Result<NoticeCommand, MessageError> {
        // Before the writer: a lookup from now on reads group-svc, where the
        // change is committed already.
        let added = self.forget_change(&change);
        let conversation = change.conversation.ok_or(MessageError::InvalidArgument(
            "change.conversation is required",
        ))?;
        if conversation.id <= 0 {
            return Err(MessageError::InvalidArgument(
                "change.conversation.id is required",
            ));
        }
        if change.notice.is_none() && change.removed_user_ids.is_empty() {
            return Err(MessageError::InvalidArgument(
                "change has neither a notice nor removed users",
            ));
        }
        Ok(NoticeCommand {
            conversation_id: conversation.id,
            snapshot: Arc::new(Snapshot::of(&conversation)),
            notice: change.notice,
            removed: change.removed_user_ids,
            added,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use confab_common::bus::Audience;
    use confab_proto::message::v1::HistoryRequest;
    use confab_proto::message::v1::messages_server::Messages;
    use confab_proto::v1::event;
    use tonic::Code;

    use super::*;
    use crate::testing::{
        GroupSvc, RecordingBus, append, history_ids, id_of, message_ids_of, open_service, send,
    };
    use crate::writer::SendCommand;

    /// A removal notice is written in order: sends before it reach the removed
    /// member, sends after it do not; the removed member gets the notice; their
    /// later send is NOT_FOUND and stores nothing, also when the send path's
    /// snapshot still lists them; once added back they receive again.
    #[tokio::test]
    async fn removal_notice_ordered_with_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group) = (groups.u, groups.group);
        let before = send(&service, u[1], group, "before").await.unwrap();
        let stale_hint = service.inner.members.snapshot(group).await.unwrap();
        let removed = groups.remove(group, u[1], u[3]).await;
        let notice = append(&service, removed).await.unwrap();
        assert!(notice.text.is_empty() && notice.notice.is_some());
        assert_eq!(notice.sender_id, u[1]);
        let after = send(&service, u[2], group, "after").await.unwrap();

        assert_eq!(
            message_ids_of(&service, u[3]).await,
            vec![before.id, notice.id]
        );
        assert_eq!(
            message_ids_of(&service, u[4]).await,
            vec![before.id, notice.id, after.id]
        );

        let refused = send(&service, u[3], group, "late").await.unwrap_err();
        assert_eq!(
            (refused.code(), refused.message()),
            (Code::NotFound, "no such conversation")
        );
        // A send that passed the pre-check before the removal but reaches the
        // writer after it is refused at commit time.
        let raced = SendCommand {
            sender_id: u[3],
            sender_device: "phone".into(),
            conversation_id: group,
            client_msg_id: "raced".into(),
            text: "hi".into(),
            hint: stale_hint,
            accepted_at: Instant::now(),
        };
        let raced = writer::submit(&service.writer().unwrap(), raced).await;
        assert!(matches!(raced, Err(MessageError::ConversationNotFound)));
        assert_eq!(
            history_ids(&service, u[1], group).await.unwrap(),
            vec![after.id, notice.id, before.id],
            "nothing stored for the refused sends"
        );

        let added = groups.add_members(group, u[1], &[u[3]]).await;
        let added = append(&service, added).await.unwrap();
        let again = send(&service, u[2], group, "again").await.unwrap();
        assert_eq!(
            message_ids_of(&service, u[3]).await,
            vec![before.id, notice.id, added.id, again.id]
        );
        // A member again: the leave point is gone and the whole history readable.
        assert_eq!(history_ids(&service, u[3], group).await.unwrap().len(), 5);
    }

    /// A former member reads history up to their leave point (the notice of
    /// their removal), newest first and upwards from a cursor alike; a stranger
    /// gets NOT_FOUND.
    #[tokio::test]
    async fn former_member_history_stops_at_leave_point() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group) = (groups.u, groups.group);
        let first = send(&service, u[1], group, "first").await.unwrap();
        let left = groups.remove(group, u[4], u[4]).await;
        let left = append(&service, left).await.unwrap();
        send(&service, u[2], group, "after").await.unwrap();

        assert_eq!(
            history_ids(&service, u[4], group).await.unwrap(),
            vec![left.id, first.id]
        );
        let upwards = Messages::history(
            &service,
            tonic::Request::new(HistoryRequest {
                user_id: u[4],
                conversation_id: group,
                after: first.id,
                limit: 10,
                ..HistoryRequest::default()
            }),
        )
        .await
        .unwrap()
        .into_inner();
        let ids: Vec<i64> = upwards.messages.iter().map(|m| m.id).collect();
        assert_eq!((ids, upwards.has_more), (vec![left.id], false));
        let stranger = history_ids(&service, u[9], group).await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound);
        assert_eq!(history_ids(&service, u[1], group).await.unwrap().len(), 3);
    }

    /// AppendNotice retried with the same change returns the original notice
    /// and writes nothing more; the same version in another conversation by
    /// the same actor is a notice of its own.
    #[tokio::test]
    async fn append_notice_retry_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, group) = (groups.u, groups.group);
        let change = groups.remove(group, u[1], u[2]).await;
        let first = service
            .append_notice(change.clone())
            .await
            .unwrap()
            .unwrap();
        let retry = service.append_notice(change).await.unwrap().unwrap();
        assert!(!first.duplicate && retry.duplicate);
        assert_eq!(retry.message, first.message);
        assert_eq!(message_ids_of(&service, u[2]).await, vec![first.message.id]);
        assert_eq!(history_ids(&service, u[1], group).await.unwrap().len(), 1);

        // Two new groups of the same creator: both at version 1.
        let six = groups.create(u[1], &[u[2]]).await;
        let seven = groups.create(u[1], &[u[3]]).await;
        let seven_id = id_of(&seven);
        let six = append(&service, six).await.unwrap();
        let seven = append(&service, seven).await.unwrap();
        assert_ne!(six.id, seven.id);
        assert_eq!(seven.conversation_id, seven_id);
    }

    /// Channels fan out on read: an admin's post is one stored message, in
    /// nobody's sequence, and one live event for the channel; a subscriber's
    /// post is PERMISSION_DENIED and a stranger's NOT_FOUND; subscribers read
    /// history, and one who leaves reads only up to their leave point.
    #[tokio::test]
    async fn channel_posts_fan_out_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus.clone()).await;
        let &GroupSvc { u, channel, .. } = &groups;
        let post = send(&service, u[2], channel, "post").await.unwrap();
        {
            let events = bus.events.lock();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].audience, Audience::Channel(channel));
            assert_eq!(events[0].event.seq, 0);
            let Some(event::Kind::ChannelPost(posted)) = &events[0].event.kind else {
                panic!("not a channel post");
            };
            assert_eq!(posted.id, post.id);
        }
        for n in [1, 2, 3, 4] {
            assert!(message_ids_of(&service, u[n]).await.is_empty(), "user {n}");
        }
        let member = send(&service, u[3], channel, "nope").await.unwrap_err();
        assert_eq!(
            (member.code(), member.message()),
            (Code::PermissionDenied, "only admins post in a channel")
        );
        let stranger = send(&service, u[9], channel, "nope").await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound);
        assert_eq!(
            history_ids(&service, u[4], channel).await.unwrap(),
            vec![post.id]
        );
        assert_eq!(
            history_ids(&service, u[9], channel)
                .await
                .unwrap_err()
                .code(),
            Code::NotFound
        );

        // Cache the subscriber's role, then leave: the notice drops it.
        assert_eq!(history_ids(&service, u[4], channel).await.unwrap().len(), 1);
        let left = groups.remove(channel, u[4], u[4]).await;
        assert!(append(&service, left).await.is_none());
        let later = send(&service, u[1], channel, "later").await.unwrap();
        assert_eq!(
            history_ids(&service, u[4], channel).await.unwrap(),
            vec![post.id]
        );
        assert_eq!(
            history_ids(&service, u[3], channel).await.unwrap(),
            vec![later.id, post.id]
        );
        assert_eq!(bus.events.lock().len(), 2, "the leave published nothing");
        assert_eq!(
            history_ids(&service, u[1], channel).await.unwrap().len(),
            2,
            "no notice message in a channel"
        );
    }
}
