//! Groups: fan-out to every member device, receipts, unread counts, membership
//! (invariant 5) and the size limits.

use std::sync::Arc;
use std::time::Instant;

use confab_proto::v1::{
    AddMembersRequest, ConversationKind, CreateGroupRequest, GetConversationRequest, JoinRequest,
    LeaveRequest, ListMembersRequest, MarkRead, Member, MemberReceipt, ReadState, Receipt,
    ReceiptsRequest, RemoveMemberRequest, Role, SetRoleRequest, UpdateConversationRequest, notice,
};
use tokio::sync::Barrier;

use super::*;

/// Every text message each device of the first test sends.
const PER_DEVICE: usize = 5;

/// One device's part in [`group_devices_agree_on_every_message_and_order`]:
/// sends [`PER_DEVICE`] messages at once with the others, then collects `total`
/// message events and proves nothing more comes.
async fn chatter<T: Transport>(
    mut conn: Conn<T>,
    conversation: i64,
    device: &'static str,
    start: Arc<Barrier>,
    total: usize,
) -> Result<(&'static str, Vec<(u64, Message)>, Vec<SendAck>)> {
    start.wait().await;
    let mut refs = Vec::with_capacity(PER_DEVICE);
    for i in 0..PER_DEVICE {
        let client_msg_id = format!("{device}-{i}");
        let text = format!("{device} says {i}");
        refs.push(
            conn.send_message(conversation, &client_msg_id, &text)
                .await?,
        );
    }
    let mut acks = Vec::with_capacity(PER_DEVICE);
    for r#ref in refs {
        match conn.reply_to(r#ref).await? {
            Reply::Sent(ack) => acks.push(ack),
            other => anyhow::bail!("{device}: send refused: {other:?}"),
        }
    }
    let mut seen = Vec::with_capacity(total);
    while seen.len() < total {
        seen.push(conn.next_message().await.context(device)?);
    }
    conn.expect_quiet(99).await.context(device)?;
    Ok((device, seen, acks))
}

/// The notice of a server-written message.
fn notice_of(message: &Message) -> &notice::Kind {
    message
        .notice
        .as_ref()
        .and_then(|notice| notice.kind.as_ref())
        .unwrap_or_else(|| panic!("not a notice: {message:?}"))
}

/// The status of a call that must be refused.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    match result {
        Ok(response) => panic!("{what}: expected a refusal, got {:?}", response.get_ref()),
        Err(status) => status,
    }
}

/// Asserts the refusal a non-member gets: the one for a conversation that does not exist.
fn assert_no_such_conversation(what: &str, status: &tonic::Status) {
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "no such conversation"),
        "{what}"
    );
}

/// Asserts that a stream send was refused as for a conversation that does not exist.
fn assert_send_not_found(what: &str, reply: &Reply) {
    let Reply::Error(error) = reply else {
        panic!("{what}: expected an error, got {reply:?}");
    };
    assert_eq!(
        (error.code, error.message.as_str()),
        (Code::NotFound as i32, "no such conversation"),
        "{what}: {error:?}"
    );
}

/// Asserts that `account`'s history of `conversation` ends at `last_id`, and
/// that nothing after it can be read.
async fn assert_history_ends_at(
    server: &Server,
    account: &Account,
    conversation: i64,
    last_id: i64,
) -> Result<()> {
    let page = server.history(account, conversation, 0, 0, 100).await?;
    let newest = page.messages.first().map(|message| message.id);
    assert_eq!(
        newest,
        Some(last_id),
        "history stops at the leave point: {page:?}"
    );
    match server.history(account, conversation, 0, last_id, 100).await {
        Ok(beyond) => assert!(
            beyond.messages.is_empty(),
            "beyond the leave point: {beyond:?}"
        ),
        Err(error) => assert_eq!(status_code(&error), Some(Code::NotFound), "{error:#}"),
    }
    Ok(())
}

/// Five devices of three group members on gRPC, binary and JSON WebSockets: while
/// every device sends at once and the owner renames the group, each device gets
/// every message and notice exactly once, all devices in the same order (ids
/// ascending), gap-free in each user's sequence, and history agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_devices_agree_on_every_message_and_order() -> Result<()> {
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    let (alice_grpc, _) = server.grpc_synced(&alice, "alice-grpc", 0).await?;
    let (alice_ws, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-ws", 0)
        .await?;
    let (bob_json, _) = server
        .ws_synced(&bob, Encoding::Json, "bob-json", 0)
        .await?;
    let (bob_grpc, _) = server.grpc_synced(&bob, "bob-grpc", 0).await?;
    let (carol_ws, _) = server
        .ws_synced(&carol, Encoding::Binary, "carol-ws", 0)
        .await?;

    let group = server
        .create_group(&alice, "five devices", &[bob.id(), carol.id()])
        .await?;
    assert_eq!(group.kind(), ConversationKind::Group);
    assert_eq!(group.member_ids, {
        let mut ids = vec![alice.id(), bob.id(), carol.id()];
        ids.sort_unstable();
        ids
    });
    // The created notice, 5 devices' texts, the rename notice.
    let total = 1 + 5 * PER_DEVICE + 1;
    let start = Arc::new(Barrier::new(6));
    let id = group.id;
    let tasks = vec![
        tokio::spawn(chatter(alice_grpc, id, "alice-grpc", start.clone(), total)),
        tokio::spawn(chatter(alice_ws, id, "alice-ws", start.clone(), total)),
        tokio::spawn(chatter(bob_json, id, "bob-json", start.clone(), total)),
        tokio::spawn(chatter(bob_grpc, id, "bob-grpc", start.clone(), total)),
        tokio::spawn(chatter(carol_ws, id, "carol-ws", start.clone(), total)),
    ];
    let mut owner = server.conversations(&alice).await?;
    start.wait().await;
    let rename = UpdateConversationRequest {
        conversation_id: id,
        name: Some("renamed meanwhile".into()),
        ..UpdateConversationRequest::default()
    };
    owner.update(rename).await?;

    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await??);
    }
    let acks: Vec<&SendAck> = logs.iter().flat_map(|(_, _, acks)| acks).collect();
    let reference: Vec<i64> = logs[0].1.iter().map(|(_, message)| message.id).collect();
    for (device, seen, _) in &logs {
        let ids: Vec<i64> = seen.iter().map(|(_, message)| message.id).collect();
        assert!(
            ids.windows(2).all(|pair| pair[0] < pair[1]),
            "{device}: arrival order is id order, each once: {ids:?}"
        );
        assert_eq!(ids, reference, "{device} and {} disagree", logs[0].0);
        let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<u64> = (1..=total as u64).collect();
        assert_eq!(seqs, expected, "{device}: gap-free sequence");
        let notices: Vec<&notice::Kind> = seen
            .iter()
            .filter(|(_, message)| message.notice.is_some())
            .map(|(_, message)| notice_of(message))
            .collect();
        assert!(
            matches!(notices.as_slice(), [
                notice::Kind::Created(_),
                notice::Kind::MetadataChanged(changed)
            ] if changed.name == "renamed meanwhile"),
            "{device}: notices {notices:?}"
        );
        assert!(
            matches!(&seen[0].1.notice, Some(n) if n.actor_id == alice.id()),
            "{device}: the created notice comes first, by alice: {:?}",
            seen[0]
        );
        for (_, message) in seen.iter().filter(|(_, message)| message.notice.is_none()) {
            let ack = acks
                .iter()
                .find(|ack| ack.message_id == message.id)
                .unwrap_or_else(|| panic!("{device}: unacknowledged message {message:?}"));
            assert_eq!(message.client_msg_id, ack.client_msg_id, "{device}");
            let sender_device = message.client_msg_id.rsplit_once('-').map(|(d, _)| d);
            assert_eq!(Some(message.sender_device.as_str()), sender_device);
        }
    }
    assert_eq!(acks.len(), 5 * PER_DEVICE);

    let history = server.history(&carol, id, 0, 0, 100).await?;
    let mut stored: Vec<i64> = history.messages.iter().map(|message| message.id).collect();
    stored.reverse();
    assert_eq!(
        stored, reference,
        "history holds the same messages in the same order"
    );
    Ok(())
}

/// Receipts are watermarks: bob's `Delivered` and carol's `MarkRead` reach both
/// of alice's devices as receipt events, `Receipts` aggregates them exactly, and
/// a direct conversation goes sent, delivered, read the same way.
#[tokio::test]
async fn receipts_flow_to_the_sender() -> Result<()> {
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    let group = server
        .create_group(&alice, "receipts", &[bob.id(), carol.id()])
        .await?;
    let (mut alice_phone, synced) = server.grpc_synced(&alice, "alice-phone", 0).await?;
    assert_eq!(synced.events.len(), 1, "the created notice: {synced:?}");
    let (mut alice_laptop, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-laptop", 0)
        .await?;
    let (mut bob_phone, _) = server.grpc_synced(&bob, "bob-phone", 0).await?;
    let (mut carol_phone, _) = server.grpc_synced(&carol, "carol-phone", 0).await?;

    let ack = alice_phone
        .send(group.id, "r-1", "did you get this?")
        .await?;
    let sent = ack.message_id;
    assert_eq!(alice_phone.next_message().await?.1.id, sent);
    assert_eq!(alice_laptop.next_message().await?.1.id, sent);
    assert_eq!(bob_phone.next_message().await?.1.id, sent);
    assert_eq!(carol_phone.next_message().await?.1.id, sent);

    bob_phone.delivered(group.id, sent).await?;
    let delivered = Receipt {
        conversation_id: group.id,
        user_id: bob.id(),
        delivered_up_to: sent,
        read_up_to: 0,
    };
    assert_eq!(alice_phone.next_receipt().await?.1, delivered, "two ticks");
    assert_eq!(alice_laptop.next_receipt().await?.1, delivered);

    carol_phone.mark_read(group.id, sent).await?;
    let read = Receipt {
        conversation_id: group.id,
        user_id: carol.id(),
        delivered_up_to: sent,
        read_up_to: sent,
    };
    assert_eq!(
        alice_phone.next_receipt().await?.1,
        read,
        "read implies delivered"
    );
    assert_eq!(alice_laptop.next_receipt().await?.1, read);
    alice_phone.expect_quiet(1).await?;
    alice_laptop.expect_quiet(2).await?;

    let mut alice_client = server.conversations(&alice).await?;
    let request = ReceiptsRequest {
        conversation_id: group.id,
        message_id: sent,
        per_member: true,
    };
    let receipts = alice_client.receipts(request).await?.into_inner();
    assert_eq!(
        (
            receipts.member_count,
            receipts.delivered_count,
            receipts.read_count
        ),
        (2, 2, 1),
        "delivered to 2 of 2, read by 1: {receipts:?}"
    );
    let mut members = receipts.members.clone();
    members.sort_by_key(|member| member.user_id);
    let mut expected = vec![
        MemberReceipt {
            user_id: bob.id(),
            delivered_up_to: sent,
            read_up_to: 0,
        },
        MemberReceipt {
            user_id: carol.id(),
            delivered_up_to: sent,
            read_up_to: sent,
        },
    ];
    expected.sort_by_key(|member| member.user_id);
    assert_eq!(members, expected, "per member");
    let request = ReceiptsRequest {
        per_member: false,
        ..request
    };
    let aggregate = alice_client.receipts(request).await?.into_inner();
    assert!(aggregate.members.is_empty(), "{aggregate:?}");
    assert_eq!(aggregate.delivered_count, 2);

    // One to one: one tick (the ack), two ticks, blue ticks.
    let direct = server.open_direct(&alice, &bob).await?;
    let ack = alice_phone.send(direct, "d-1", "psst").await?;
    let sent = ack.message_id;
    assert_eq!(alice_phone.next_message().await?.1.id, sent);
    assert_eq!(alice_laptop.next_message().await?.1.id, sent);
    assert_eq!(bob_phone.next_message().await?.1.id, sent);
    bob_phone.delivered(direct, sent).await?;
    let two_ticks = Receipt {
        conversation_id: direct,
        user_id: bob.id(),
        delivered_up_to: sent,
        read_up_to: 0,
    };
    assert_eq!(alice_phone.next_receipt().await?.1, two_ticks);
    assert_eq!(alice_laptop.next_receipt().await?.1, two_ticks);
    bob_phone.mark_read(direct, sent).await?;
    let blue = Receipt {
        read_up_to: sent,
        ..two_ticks
    };
    assert_eq!(alice_phone.next_receipt().await?.1, blue);
    assert_eq!(alice_laptop.next_receipt().await?.1, blue);
    let request = ReceiptsRequest {
        conversation_id: direct,
        message_id: sent,
        per_member: false,
    };
    let receipts = alice_client.receipts(request).await?.into_inner();
    assert_eq!(
        (
            receipts.member_count,
            receipts.delivered_count,
            receipts.read_count
        ),
        (1, 1, 1),
        "{receipts:?}"
    );
    Ok(())
}

/// Unread counts: `List` counts others' messages after the read watermark; marking
/// read on one device tells the user's other devices (`read_state`) and the list;
/// the watermark never moves back; own messages never count.
#[tokio::test]
async fn unread_counts_follow_the_read_watermark() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_phone, _) = server.grpc_synced(&bob, "bob-phone", 0).await?;
    let (mut bob_laptop, _) = server
        .ws_synced(&bob, Encoding::Json, "bob-laptop", 0)
        .await?;

    let mut alice_client = server.conversations(&alice).await?;
    let mut sent = Vec::new();
    for i in 0..3 {
        let request = SendMessage {
            conversation_id: conversation,
            client_msg_id: format!("u-{i}"),
            text: format!("unread {i}"),
        };
        sent.push(alice_client.send(request).await?.into_inner().message_id);
    }
    for device in [
        &mut messages(&mut bob_phone, 3).await?,
        &mut messages(&mut bob_laptop, 3).await?,
    ] {
        let ids: Vec<i64> = device.iter().map(|(_, message)| message.id).collect();
        assert_eq!(ids, sent);
    }

    let mut bob_client = server.conversations(&bob).await?;
    let summary = |listed: confab_proto::v1::ListConversationsResponse| {
        let found = listed
            .conversations
            .into_iter()
            .find(|summary| summary.conversation.as_ref().map(|c| c.id) == Some(conversation));
        found.context("the conversation is listed")
    };
    let listed = summary(
        bob_client
            .list(ListConversationsRequest::default())
            .await?
            .into_inner(),
    )?;
    assert_eq!(
        (listed.unread_count, listed.read_up_to),
        (3, 0),
        "{listed:?}"
    );

    bob_phone.mark_read(conversation, sent[0]).await?;
    let state = ReadState {
        conversation_id: conversation,
        read_up_to: sent[0],
        unread_count: 2,
    };
    assert_eq!(
        bob_laptop.next_read_state().await?.1,
        state,
        "the other device"
    );
    assert_eq!(
        bob_phone.next_read_state().await?.1,
        state,
        "every device of the user"
    );
    bob_phone.mark_read(conversation, sent[2]).await?;
    let state = ReadState {
        read_up_to: sent[2],
        unread_count: 0,
        ..state
    };
    assert_eq!(bob_laptop.next_read_state().await?.1, state);
    assert_eq!(bob_phone.next_read_state().await?.1, state);
    let listed = summary(
        bob_client
            .list(ListConversationsRequest::default())
            .await?
            .into_inner(),
    )?;
    assert_eq!(
        (listed.unread_count, listed.read_up_to),
        (0, sent[2]),
        "{listed:?}"
    );

    let back = MarkRead {
        conversation_id: conversation,
        up_to: sent[0],
    };
    let unary = bob_client.mark_read(back).await?.into_inner();
    assert_eq!(
        unary.read_up_to, sent[2],
        "the watermark never moves back: {unary:?}"
    );
    let listed = summary(
        bob_client
            .list(ListConversationsRequest::default())
            .await?
            .into_inner(),
    )?;
    assert_eq!(
        (listed.unread_count, listed.read_up_to),
        (0, sent[2]),
        "{listed:?}"
    );

    let reply = bob_laptop.send(conversation, "b-1", "all read").await?;
    let listed = summary(
        bob_client
            .list(ListConversationsRequest::default())
            .await?
            .into_inner(),
    )?;
    assert_eq!(
        listed.unread_count, 0,
        "own messages never count: {listed:?}"
    );
    let listed = summary(
        alice_client
            .list(ListConversationsRequest::default())
            .await?
            .into_inner(),
    )?;
    assert_eq!(
        (listed.unread_count, listed.read_up_to),
        (1, 0),
        "alice's own three do not count, bob's one does: {listed:?}"
    );
    let mark = MarkRead {
        conversation_id: conversation,
        up_to: reply.message_id,
    };
    let state = alice_client.mark_read(mark).await?.into_inner();
    assert_eq!(
        state,
        ReadState {
            conversation_id: conversation,
            read_up_to: reply.message_id,
            unread_count: 0,
        }
    );
    Ok(())
}

/// Membership and invariant 5: admins add (the new member gets the notice and what
/// follows), members cannot, strangers are told "no such conversation" like for an
/// unknown id, groups cannot be joined; a removed or leaving member gets the
/// notice and then nothing, cannot send, read beyond it or list members, and a
/// fresh device of theirs syncs exactly what they saw; metadata changes and roles
/// are for admins and the owner.
#[tokio::test]
async fn membership_changes_and_invariant_5() -> Result<()> {
    let (server, [alice, bob, carol, dave, erin]) =
        Server::start_with_users(["alice", "bob", "carol", "dave", "erin"]).await?;
    let group = server
        .create_group(&alice, "members", &[bob.id(), carol.id()])
        .await?;
    let id = group.id;
    let mut alice_client = server.conversations(&alice).await?;
    let mut bob_client = server.conversations(&bob).await?;
    let mut carol_client = server.conversations(&carol).await?;
    let mut dave_client = server.conversations(&dave).await?;
    let mut erin_client = server.conversations(&erin).await?;

    let promote = |user_id: i64, role: Role| SetRoleRequest {
        conversation_id: id,
        user_id,
        role: role.into(),
    };
    alice_client
        .set_role(promote(carol.id(), Role::Admin))
        .await?;
    let status = refused(
        "an admin sets a role",
        carol_client.set_role(promote(bob.id(), Role::Admin)).await,
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let (mut alice_phone, synced) = server.grpc_synced(&alice, "alice-phone", 0).await?;
    let kinds: Vec<&notice::Kind> = synced
        .events
        .iter()
        .map(|event| match &event.kind {
            Some(confab_proto::v1::event::Kind::Message(message)) => notice_of(message),
            other => panic!("not a notice: {other:?}"),
        })
        .collect();
    assert!(
        matches!(kinds.as_slice(), [
            notice::Kind::Created(_),
            notice::Kind::RoleChanged(changed)
        ] if changed.user_id == carol.id() && changed.role() == Role::Admin),
        "{kinds:?}"
    );
    let (mut bob_phone, _) = server
        .ws_synced(&bob, Encoding::Binary, "bob-phone", 2)
        .await?;
    let (mut dave_phone, synced) = server
        .ws_synced(&dave, Encoding::Json, "dave-phone", 0)
        .await?;
    assert!(synced.events.is_empty(), "{synced:?}");
    let (mut erin_phone, _) = server.grpc_synced(&erin, "erin-phone", 0).await?;

    // A stranger learns nothing: the same answer as for an id that does not exist.
    let unknown = id + 12_345;
    for conversation_id in [id, unknown] {
        let what = format!("stranger, conversation {conversation_id}");
        let get = GetConversationRequest { conversation_id };
        assert_no_such_conversation(&what, &refused(&what, erin_client.get(get).await));
        let list = ListMembersRequest {
            conversation_id,
            ..ListMembersRequest::default()
        };
        let status = refused(&what, erin_client.list_members(list).await);
        assert_no_such_conversation(&what, &status);
        let history = server.history(&erin, conversation_id, 0, 0, 10).await;
        let error = history.expect_err("a stranger read history");
        assert_eq!(
            status_code(&error),
            Some(Code::NotFound),
            "{what}: {error:#}"
        );
        let reply = erin_phone
            .send_reply(conversation_id, "e-1", "let me in")
            .await?;
        assert_send_not_found(&what, &reply);
    }
    // Nobody joins a group: not a stranger, not a member.
    let join = JoinRequest {
        conversation_id: id,
    };
    let status = refused("a stranger joins a group", erin_client.join(join).await);
    assert_eq!(
        (status.code(), status.message()),
        (Code::NotFound, "no such conversation"),
        "a stranger learns nothing of the group: {status:?}"
    );
    let status = refused("a member joins a group", bob_client.join(join).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let get = GetConversationRequest {
        conversation_id: id,
    };
    let after_join = alice_client.get(get).await?.into_inner();
    assert!(
        !after_join.member_ids.contains(&erin.id()),
        "{after_join:?}"
    );

    // Members do not add; admins do.
    let add = AddMembersRequest {
        conversation_id: id,
        user_ids: vec![dave.id()],
    };
    let status = refused("a member adds", bob_client.add_members(add.clone()).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let update = UpdateConversationRequest {
        conversation_id: id,
        topic: Some("bob's topic".into()),
        ..UpdateConversationRequest::default()
    };
    let status = refused("a member updates", bob_client.update(update).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let added = carol_client.add_members(add).await?.into_inner();
    assert!(added.member_ids.contains(&dave.id()), "{added:?}");
    let mut dave_saw = Vec::new();
    for (who, conn) in [
        ("alice", &mut alice_phone.next_message().await?),
        ("bob", &mut bob_phone.next_message().await?),
        ("dave", &mut dave_phone.next_message().await?),
    ] {
        let message = &conn.1;
        assert!(
            matches!(notice_of(message), notice::Kind::MembersAdded(added) if added.user_ids == [dave.id()]),
            "{who}: {message:?}"
        );
        assert_eq!(
            message.sender_id,
            carol.id(),
            "{who}: the actor sends the notice"
        );
        assert!(message.text.is_empty(), "{who}: {message:?}");
        if who == "dave" {
            dave_saw.push(conn.clone());
        }
    }
    let welcome = alice_phone.send(id, "a-1", "welcome dave").await?;
    let hello = dave_phone.send(id, "d-1", "hi all").await?;
    for (seq, message) in messages(&mut dave_phone, 2).await? {
        dave_saw.push((seq, message));
    }
    assert_eq!(
        dave_saw[1..].iter().map(|(_, m)| m.id).collect::<Vec<_>>(),
        [welcome.message_id, hello.message_id]
    );
    let members = ListMembersRequest {
        conversation_id: id,
        ..ListMembersRequest::default()
    };
    let listed = dave_client.list_members(members).await?.into_inner();
    let roles: Vec<(i64, Role)> = listed
        .members
        .iter()
        .map(|member: &Member| (member.user_id, member.role()))
        .collect();
    let mut expected = vec![
        (alice.id(), Role::Owner),
        (bob.id(), Role::Member),
        (carol.id(), Role::Admin),
        (dave.id(), Role::Member),
    ];
    expected.sort_unstable();
    assert_eq!(roles, expected, "{listed:?}");

    // Removal: dave gets the notice, then nothing.
    let remove = RemoveMemberRequest {
        conversation_id: id,
        user_id: dave.id(),
    };
    carol_client.remove_member(remove).await?;
    messages(&mut alice_phone, 2).await?;
    messages(&mut bob_phone, 2).await?;
    let removal = dave_phone.next_message().await?;
    assert!(
        matches!(notice_of(&removal.1), notice::Kind::MemberRemoved(removed) if removed.user_id == dave.id()),
        "{removal:?}"
    );
    assert_eq!(removal.1.sender_id, carol.id());
    assert_eq!(alice_phone.next_message().await?.1.id, removal.1.id);
    assert_eq!(bob_phone.next_message().await?.1.id, removal.1.id);
    dave_saw.push(removal.clone());

    let after = alice_phone.send(id, "a-2", "dave is gone").await?;
    assert_eq!(alice_phone.next_message().await?.1.id, after.message_id);
    assert_eq!(bob_phone.next_message().await?.1.id, after.message_id);
    dave_phone
        .expect_quiet(1)
        .await
        .context("nothing after the removal")?;
    let reply = dave_phone.send_reply(id, "d-2", "still here?").await?;
    assert_send_not_found("a removed member sends", &reply);
    bob_phone
        .expect_quiet(2)
        .await
        .context("the refused send reached nobody")?;
    assert_history_ends_at(&server, &dave, id, removal.1.id).await?;
    let newest = server.history(&alice, id, 0, 0, 1).await?;
    assert_eq!(
        newest.messages.first().map(|m| m.id),
        Some(after.message_id),
        "nothing stored from dave's refused send"
    );
    let list = ListMembersRequest {
        conversation_id: id,
        ..ListMembersRequest::default()
    };
    let status = refused(
        "a removed member lists",
        dave_client.list_members(list).await,
    );
    assert_no_such_conversation("removed, ListMembers", &status);
    let status = refused("a removed member gets", dave_client.get(get).await);
    assert_no_such_conversation("removed, Get", &status);
    drop(dave_phone);
    let (_, synced) = server.grpc_synced(&dave, "dave-laptop", 0).await?;
    let resynced: Vec<(u64, Message)> = synced
        .events
        .into_iter()
        .map(message_of)
        .collect::<Result<_>>()?;
    assert_eq!(
        resynced, dave_saw,
        "a new device syncs exactly what dave saw"
    );

    // Leaving works the same.
    bob_client
        .leave(LeaveRequest {
            conversation_id: id,
        })
        .await?;
    let left = bob_phone.next_message().await?;
    assert!(
        matches!(notice_of(&left.1), notice::Kind::MemberLeft(_)),
        "{left:?}"
    );
    assert_eq!(left.1.sender_id, bob.id(), "the leaver is the actor");
    assert_eq!(alice_phone.next_message().await?.1.id, left.1.id);
    let after = alice_phone.send(id, "a-3", "bob left").await?;
    assert_eq!(alice_phone.next_message().await?.1.id, after.message_id);
    bob_phone
        .expect_quiet(3)
        .await
        .context("nothing after leaving")?;
    let reply = bob_phone.send_reply(id, "b-1", "one more thing").await?;
    assert_send_not_found("a member who left sends", &reply);
    assert_history_ends_at(&server, &bob, id, left.1.id).await?;
    let status = refused("left, ListMembers", bob_client.list_members(list).await);
    assert_no_such_conversation("left, ListMembers", &status);

    // Metadata: an admin renames; members get it as a notice.
    let before = alice_client.get(get).await?.into_inner();
    let update = UpdateConversationRequest {
        conversation_id: id,
        name: Some("renamed".into()),
        topic: Some("a topic".into()),
        avatar_url: Some("https://example.com/avatar.png".into()),
    };
    let updated = carol_client.update(update).await?.into_inner();
    assert_eq!(
        (
            updated.name.as_str(),
            updated.topic.as_str(),
            updated.avatar_url.as_str()
        ),
        ("renamed", "a topic", "https://example.com/avatar.png")
    );
    assert!(
        updated.version > before.version,
        "{before:?} -> {updated:?}"
    );
    let changed = alice_phone.next_message().await?.1;
    assert!(
        matches!(notice_of(&changed), notice::Kind::MetadataChanged(m)
            if m.name == "renamed" && m.topic == "a topic" && m.avatar_url == "https://example.com/avatar.png"),
        "{changed:?}"
    );
    assert_eq!(changed.sender_id, carol.id());
    let got = alice_client.get(get).await?.into_inner();
    assert_eq!(
        (got.name.as_str(), got.member_count),
        ("renamed", 2),
        "{got:?}"
    );
    Ok(())
}

/// `--max-group-size 4`: creating or growing a group beyond 4 members is refused
/// with RESOURCE_EXHAUSTED and a message that says the limit, and changes nothing.
#[tokio::test]
async fn group_size_limit() -> Result<()> {
    const SECRET: &str = "e2e-group-size-secret-0123456789abcdef";
    let server =
        Server::start_with(&["--max-group-size", "4", "--external-jwt-secret", SECRET]).await?;
    let mut users = Vec::new();
    for name in ["owner", "user-1", "user-2", "user-3", "user-4"] {
        users.push(server.external_account(SECRET, name).await?);
    }
    let owner = &users[0];
    let others: Vec<i64> = users[1..].iter().map(Account::id).collect();
    let mut client = server.conversations(owner).await?;

    let request = CreateGroupRequest {
        name: "too big".into(),
        member_ids: others.clone(),
        ..CreateGroupRequest::default()
    };
    let status = refused("five members", client.create_group(request).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("at most 4"), "{status:?}");
    let listed = client
        .list(ListConversationsRequest::default())
        .await?
        .into_inner();
    assert!(
        listed.conversations.is_empty(),
        "nothing was created: {listed:?}"
    );

    let group = server.create_group(owner, "full", &others[..3]).await?;
    assert_eq!(group.member_count, 4);
    let add = AddMembersRequest {
        conversation_id: group.id,
        user_ids: vec![others[3]],
    };
    let status = refused("a fifth member", client.add_members(add.clone()).await);
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("at most 4"), "{status:?}");
    let get = GetConversationRequest {
        conversation_id: group.id,
    };
    let unchanged = client.get(get).await?.into_inner();
    assert_eq!(
        (unchanged.member_count, unchanged.version),
        (4, group.version),
        "{unchanged:?}"
    );

    let remove = RemoveMemberRequest {
        conversation_id: group.id,
        user_id: others[0],
    };
    client.remove_member(remove).await?;
    let grown = client.add_members(add).await?.into_inner();
    assert_eq!(
        grown.member_count, 4,
        "room again after a removal: {grown:?}"
    );
    Ok(())
}

/// A group of 1,024 members (the default limit), about 600 of them connected each
/// on its own gRPC connection: one message reaches every connected member live,
/// and members who were offline get it when they connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_1024_members() -> Result<()> {
    const SECRET: &str = "e2e-big-group-secret-0123456789abcdef";
    const MEMBERS: usize = 1024;
    const CONNECTED: usize = 600;
    const OFFLINE_CHECKED: usize = 8;
    let _big = BIG_TESTS.lock().await;
    let setup = Instant::now();
    let server = Server::start_with(&["--external-jwt-secret", SECRET]).await?;
    let subjects: Vec<String> = (0..MEMBERS).map(|i| format!("member-{i:04}")).collect();
    let users = server.external_accounts(SECRET, &subjects, 32).await?;
    let owner = &users[0];
    let ids: Vec<i64> = users[1..].iter().map(Account::id).collect();
    let group = server.create_group(owner, "everyone", &ids).await?;
    assert_eq!(group.member_count as usize, MEMBERS);

    let mut conns = connect_many(&server, &users[1..=CONNECTED], 64).await?;
    eprintln!(
        "group_of_1024_members: set-up {:?} ({} users, {} connections)",
        setup.elapsed(),
        MEMBERS,
        conns.len()
    );

    let mut client = server.conversations(owner).await?;
    let sent_at = Instant::now();
    let request = SendMessage {
        conversation_id: group.id,
        client_msg_id: "to-everyone".into(),
        text: "hello, all 1024 of you".into(),
    };
    let ack = client.send(request).await?.into_inner();
    let received =
        futures::future::join_all(conns.iter_mut().map(|conn| conn.next_message())).await;
    let fan_out = sent_at.elapsed();
    for (i, got) in received.into_iter().enumerate() {
        let (_, message) = got.with_context(|| format!("connected member {}", i + 1))?;
        assert_is(&message, &ack, owner, "hello, all 1024 of you");
    }
    eprintln!("group_of_1024_members: send to last of {CONNECTED} connected members: {fan_out:?}");

    for user in &users[MEMBERS - OFFLINE_CHECKED..] {
        let (_, synced) = server.grpc_synced(user, "late-device", 0).await?;
        let ids: Vec<i64> = synced
            .events
            .into_iter()
            .map(|event| message_of(event).map(|(_, message)| message.id))
            .collect::<Result<_>>()?;
        assert_eq!(
            ids.last(),
            Some(&ack.message_id),
            "an offline member syncs the message: {ids:?}"
        );
    }
    Ok(())
}

/// Connects every account on its own gRPC connection (`concurrency` at a time),
/// synced from 0 with the catch-up dropped.
pub(crate) async fn connect_many(
    server: &Server,
    accounts: &[Account],
    concurrency: usize,
) -> Result<Vec<confab_tests::GrpcConn>> {
    use futures::StreamExt as _;
    futures::stream::iter(accounts.iter().enumerate())
        .map(|(i, account)| async move {
            let (conn, _) = server
                .grpc_synced(account, &format!("device-{i}"), 0)
                .await?;
            Ok::<_, anyhow::Error>(conn)
        })
        .buffered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}
