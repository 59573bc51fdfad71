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
    use confab_proto::v1::{ConversationKind, Created, Notice, Role, event};
    use tonic::Code;

    use super::*;
    use crate::testing::{
        CHANNEL, GROUP, RecordingBus, append, history_ids, message_ids_of,
        open_service_with_groups, send,
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
        let (service, groups) = open_service_with_groups(&dir, bus).await;
        let before = send(&service, 1, GROUP, "before").await.unwrap();
        let stale_hint = service.inner.members.snapshot(GROUP).await.unwrap();
        let notice = append(&service, groups.remove(GROUP, 1, 3)).await.unwrap();
        assert!(notice.text.is_empty() && notice.notice.is_some());
        assert_eq!(notice.sender_id, 1);
        let after = send(&service, 2, GROUP, "after").await.unwrap();

        assert_eq!(
            message_ids_of(&service, 3).await,
            vec![before.id, notice.id]
        );
        assert_eq!(
            message_ids_of(&service, 4).await,
            vec![before.id, notice.id, after.id]
        );

        let refused = send(&service, 3, GROUP, "late").await.unwrap_err();
        assert_eq!(
            (refused.code(), refused.message()),
            (Code::NotFound, "no such conversation")
        );
        // A send that passed the pre-check before the removal but reaches the
        // writer after it is refused at commit time.
        let raced = SendCommand {
            sender_id: 3,
            sender_device: "phone".into(),
            conversation_id: GROUP,
            client_msg_id: "raced".into(),
            text: "hi".into(),
            hint: stale_hint,
            accepted_at: Instant::now(),
        };
        let raced = writer::submit(&service.writer().unwrap(), raced).await;
        assert!(matches!(raced, Err(MessageError::ConversationNotFound)));
        assert_eq!(
            history_ids(&service, 1, GROUP).await.unwrap(),
            vec![after.id, notice.id, before.id],
            "nothing stored for the refused sends"
        );

        let added = append(&service, groups.add_members(GROUP, 1, &[3]))
            .await
            .unwrap();
        let again = send(&service, 2, GROUP, "again").await.unwrap();
        assert_eq!(
            message_ids_of(&service, 3).await,
            vec![before.id, notice.id, added.id, again.id]
        );
        // A member again: the leave point is gone and the whole history readable.
        assert_eq!(history_ids(&service, 3, GROUP).await.unwrap().len(), 5);
    }

    /// A former member reads history up to their leave point (the notice of
    /// their removal), newest first and upwards from a cursor alike; a stranger
    /// gets NOT_FOUND.
    #[tokio::test]
    async fn former_member_history_stops_at_leave_point() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service_with_groups(&dir, bus).await;
        let first = send(&service, 1, GROUP, "first").await.unwrap();
        let left = append(&service, groups.remove(GROUP, 4, 4)).await.unwrap();
        send(&service, 2, GROUP, "after").await.unwrap();

        assert_eq!(
            history_ids(&service, 4, GROUP).await.unwrap(),
            vec![left.id, first.id]
        );
        let upwards = Messages::history(
            &service,
            tonic::Request::new(HistoryRequest {
                user_id: 4,
                conversation_id: GROUP,
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
        let stranger = history_ids(&service, 9, GROUP).await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound);
        assert_eq!(history_ids(&service, 1, GROUP).await.unwrap().len(), 3);
    }

    /// AppendNotice retried with the same change returns the original notice
    /// and writes nothing more; the same version in another conversation by
    /// the same actor is a notice of its own.
    #[tokio::test]
    async fn append_notice_retry_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service_with_groups(&dir, bus).await;
        let change = groups.remove(GROUP, 1, 2);
        let first = service
            .append_notice(change.clone())
            .await
            .unwrap()
            .unwrap();
        let retry = service.append_notice(change).await.unwrap().unwrap();
        assert!(!first.duplicate && retry.duplicate);
        assert_eq!(retry.message, first.message);
        assert_eq!(message_ids_of(&service, 2).await, vec![first.message.id]);
        assert_eq!(history_ids(&service, 1, GROUP).await.unwrap().len(), 1);

        groups.add(
            6,
            ConversationKind::Group,
            &[(1, Role::Owner), (2, Role::Member)],
        );
        let created = |id| MembershipChange {
            conversation: groups.conversation(id),
            notice: Some(Notice {
                actor_id: 1,
                kind: Some(notice::Kind::Created(Created {})),
            }),
            removed_user_ids: Vec::new(),
        };
        groups.add(
            7,
            ConversationKind::Group,
            &[(1, Role::Owner), (3, Role::Member)],
        );
        let six = append(&service, created(6)).await.unwrap();
        let seven = append(&service, created(7)).await.unwrap();
        assert_ne!(six.id, seven.id);
        assert_eq!(seven.conversation_id, 7);
    }

    /// Channels fan out on read: an admin's post is one stored message, in
    /// nobody's sequence, and one live event for the channel; a subscriber's
    /// post is PERMISSION_DENIED and a stranger's NOT_FOUND; subscribers read
    /// history, and one who leaves reads only up to their leave point.
    #[tokio::test]
    async fn channel_posts_fan_out_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service_with_groups(&dir, bus.clone()).await;
        let post = send(&service, 2, CHANNEL, "post").await.unwrap();
        {
            let events = bus.events.lock();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].audience, Audience::Channel(CHANNEL));
            assert_eq!(events[0].event.seq, 0);
            let Some(event::Kind::ChannelPost(posted)) = &events[0].event.kind else {
                panic!("not a channel post");
            };
            assert_eq!(posted.id, post.id);
        }
        for user in 1..=4 {
            assert!(
                message_ids_of(&service, user).await.is_empty(),
                "user {user}"
            );
        }
        let member = send(&service, 3, CHANNEL, "nope").await.unwrap_err();
        assert_eq!(
            (member.code(), member.message()),
            (Code::PermissionDenied, "only admins post in a channel")
        );
        let stranger = send(&service, 9, CHANNEL, "nope").await.unwrap_err();
        assert_eq!(stranger.code(), Code::NotFound);
        assert_eq!(
            history_ids(&service, 4, CHANNEL).await.unwrap(),
            vec![post.id]
        );
        assert_eq!(
            history_ids(&service, 9, CHANNEL).await.unwrap_err().code(),
            Code::NotFound
        );

        // Cache the subscriber's role, then leave: the notice drops it.
        assert_eq!(history_ids(&service, 4, CHANNEL).await.unwrap().len(), 1);
        assert!(
            append(&service, groups.remove(CHANNEL, 4, 4))
                .await
                .is_none()
        );
        let later = send(&service, 1, CHANNEL, "later").await.unwrap();
        assert_eq!(
            history_ids(&service, 4, CHANNEL).await.unwrap(),
            vec![post.id]
        );
        assert_eq!(
            history_ids(&service, 3, CHANNEL).await.unwrap(),
            vec![later.id, post.id]
        );
        assert_eq!(bus.events.lock().len(), 2, "the leave published nothing");
        assert_eq!(
            history_ids(&service, 1, CHANNEL).await.unwrap().len(),
            2,
            "no notice message in a channel"
        );
    }
}
