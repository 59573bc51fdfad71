//! Issue 7's list of attacks, one test each where no other file has a focused
//! one (README.md "Security" maps every item of the list to its test). Each
//! tries the attack against the real binary, shows it refused, reads back that
//! nothing was stored, and shows the server still serving others.

use std::time::{Duration, Instant};

use confab_proto::v1::{
    AddMembersRequest, CreateChannelRequest, Delivered, Error as ErrorFrame,
    GetConversationRequest, JoinRequest, LeaveRequest, ListMembersRequest, MarkRead, OpenChannel,
    ReceiptsRequest, RemoveMemberRequest, Typing, notice,
};
use prost::encoding::{WireType, encode_key, encode_varint};

use super::*;

/// An id no conversation has.
const MISSING: i64 = 4_242_424_242;

/// The status of a unary call that must be refused.
fn refusal<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    match result {
        Ok(response) => panic!("{what}: expected a refusal, got {:?}", response.get_ref()),
        Err(status) => status,
    }
}

/// Asserts that a refusal about an existing conversation is NOT_FOUND and
/// reads exactly like the one about a conversation that does not exist.
fn assert_like_missing(what: &str, existing: &tonic::Status, missing: &tonic::Status) {
    assert_eq!(existing.code(), Code::NotFound, "{what}: {existing:?}");
    assert_eq!(
        (existing.code(), existing.message()),
        (missing.code(), missing.message()),
        "{what}: no existence oracle"
    );
}

/// The error frame a stream request must get.
fn error_of(what: &str, reply: Reply) -> ErrorFrame {
    match reply {
        Reply::Error(error) => error,
        other => panic!("{what}: expected an error frame, got {other:?}"),
    }
}

/// Asserts that a stream refusal about an existing conversation is a non-fatal
/// `not_found` that reads exactly like the one about a missing conversation.
fn assert_frame_like_missing(what: &str, existing: &ErrorFrame, missing: &ErrorFrame) {
    assert_eq!(
        (existing.code, existing.reason.as_str(), existing.fatal),
        (Code::NotFound as i32, "not_found", false),
        "{what}: {existing:?}"
    );
    assert_eq!(existing, missing, "{what}: no existence oracle");
}

/// The ids of `account`'s history of `conversation`, newest first.
/// Fails unless a new device of `account` syncs from 0 with no event at all:
/// nothing of the attack reached the user's sequence.
async fn assert_nothing_reached(server: &Server, account: &Account, device_id: &str) -> Result<()> {
    let (_, synced) = server.grpc_synced(account, device_id, 0).await?;
    anyhow::ensure!(
        synced.events.is_empty(),
        "events reached the user: {synced:?}"
    );
    Ok(())
}

async fn stored(server: &Server, account: &Account, conversation: i64) -> Result<Vec<i64>> {
    let page = server.history(account, conversation, 0, 0, 200).await?;
    Ok(page.messages.iter().map(|message| message.id).collect())
}

/// Reads `n` message events and returns their ids.
async fn message_ids<T: Transport>(conn: &mut Conn<T>, n: usize) -> Result<Vec<i64>> {
    Ok(messages(conn, n)
        .await?
        .into_iter()
        .map(|(_, message)| message.id)
        .collect())
}

/// Encodes a client frame by hand: `body` (an encoded message) as field
/// `field` of `ClientFrame`, with extra varint fields appended to the body:
/// what a client that makes up fields puts on the wire.
fn forged_frame(r#ref: u64, field: u32, body: &[u8], extra: &[(u32, u64)]) -> Vec<u8> {
    let mut inner = body.to_vec();
    for &(number, value) in extra {
        encode_key(number, WireType::Varint, &mut inner);
        encode_varint(value, &mut inner);
    }
    let mut frame = Vec::new();
    encode_key(1, WireType::Varint, &mut frame);
    encode_varint(r#ref, &mut frame);
    encode_key(field, WireType::LengthDelimited, &mut frame);
    encode_varint(inner.len() as u64, &mut frame);
    frame.extend_from_slice(&inner);
    frame
}

/// A stranger's `History` of a group and of a direct conversation, with any
/// bounds, and `Get`, are NOT_FOUND with the very status of an id that does not
/// exist; the conversations are unchanged and their members read on.
#[tokio::test]
async fn non_member_history_is_not_found_like_a_missing_conversation() -> Result<()> {
    let (server, [alice, bob, erin]) = Server::start_with_users(["alice", "bob", "erin"]).await?;
    let group = server
        .create_group(&alice, "private", &[bob.id()])
        .await?
        .id;
    let direct = server.open_direct(&alice, &bob).await?;
    let mut alice_client = server.conversations(&alice).await?;
    let mut last = 0;
    for conversation_id in [group, direct] {
        let send = SendMessage {
            conversation_id,
            client_msg_id: format!("secret-{conversation_id}"),
            text: "for members only".into(),
        };
        last = alice_client.send(send).await?.into_inner().message_id;
    }
    let before = (
        stored(&server, &bob, group).await?,
        stored(&server, &bob, direct).await?,
    );

    let mut erin_client = server.conversations(&erin).await?;
    for (before_id, after_id) in [(0, 0), (last + 1, 0), (0, 1), (i64::MAX, 0)] {
        let page = |conversation_id| confab_proto::v1::HistoryRequest {
            conversation_id,
            before: before_id,
            after: after_id,
            limit: 10,
        };
        let missing = refusal("missing", erin_client.history(page(MISSING)).await);
        for conversation_id in [group, direct] {
            let what = format!("history of {conversation_id} ({before_id}, {after_id})");
            let status = refusal(&what, erin_client.history(page(conversation_id)).await);
            assert_like_missing(&what, &status, &missing);
        }
    }
    let get = |conversation_id| GetConversationRequest { conversation_id };
    let missing = refusal("get missing", erin_client.get(get(MISSING)).await);
    for conversation_id in [group, direct] {
        let status = refusal("get", erin_client.get(get(conversation_id)).await);
        assert_like_missing("get", &status, &missing);
    }

    let listed = erin_client
        .list(ListConversationsRequest::default())
        .await?
        .into_inner();
    assert!(listed.conversations.is_empty(), "{listed:?}");
    let after = (
        stored(&server, &bob, group).await?,
        stored(&server, &bob, direct).await?,
    );
    assert_eq!(after, before, "members read the same history");
    Ok(())
}

/// A stranger's `Receipts` of a real message (and of a message of another
/// conversation, asked through one of their own) and `ListMembers` are
/// NOT_FOUND like a missing conversation: no member list, no watermarks leak.
#[tokio::test]
async fn non_member_receipts_and_members_are_not_found() -> Result<()> {
    let (server, [alice, bob, erin]) = Server::start_with_users(["alice", "bob", "erin"]).await?;
    let group = server
        .create_group(&alice, "private", &[bob.id()])
        .await?
        .id;
    let mut alice_client = server.conversations(&alice).await?;
    let send = SendMessage {
        conversation_id: group,
        client_msg_id: "m".into(),
        text: "receipted".into(),
    };
    let message = alice_client.send(send).await?.into_inner().message_id;
    let own = server.open_direct(&erin, &alice).await?;

    let mut erin_client = server.conversations(&erin).await?;
    let receipts = |conversation_id| ReceiptsRequest {
        conversation_id,
        message_id: message,
        per_member: true,
    };
    let missing = refusal("missing", erin_client.receipts(receipts(MISSING)).await);
    let status = refusal("receipts", erin_client.receipts(receipts(group)).await);
    assert_like_missing("receipts", &status, &missing);
    let status = refusal(
        "receipts of another conversation's message",
        erin_client.receipts(receipts(own)).await,
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let members = |conversation_id| ListMembersRequest {
        conversation_id,
        ..ListMembersRequest::default()
    };
    let missing = refusal("missing", erin_client.list_members(members(MISSING)).await);
    let status = refusal("members", erin_client.list_members(members(group)).await);
    assert_like_missing("list members", &status, &missing);

    let listed = alice_client
        .list_members(members(group))
        .await?
        .into_inner();
    assert_eq!(listed.members.len(), 2, "members still list: {listed:?}");
    let counts = alice_client.receipts(receipts(group)).await?.into_inner();
    assert_eq!(
        (counts.member_count, counts.read_count),
        (1, 0),
        "{counts:?}"
    );
    Ok(())
}

/// The live stream of a conversation (a channel's `OpenChannel`, a group's
/// typing) is refused to a stranger exactly as for a missing id, for a channel
/// and for a group alike (typing into a channel tells a subscriber there is no
/// typing there, a stranger nothing); posts and messages then do not reach the stranger.
#[tokio::test]
async fn non_member_live_stream_of_a_conversation_is_refused() -> Result<()> {
    let (server, [owner, bob, erin]) = Server::start_with_users(["owner", "bob", "erin"]).await?;
    let mut owner_client = server.conversations(&owner).await?;
    let request = CreateChannelRequest {
        name: "news".into(),
        ..CreateChannelRequest::default()
    };
    let channel = owner_client.create_channel(request).await?.into_inner().id;
    let group = server
        .create_group(&owner, "private", &[bob.id()])
        .await?
        .id;
    let (mut viewer, _) = server.grpc_synced(&owner, "owner-viewer", 0).await?;
    viewer.open_channel(channel).await?;
    let (mut erin_conn, _) = server.ws_synced(&erin, Encoding::Binary, "erin", 0).await?;

    let open = |conversation_id| client_frame::Kind::OpenChannel(OpenChannel { conversation_id });
    let missing = error_of("missing", erin_conn.request(open(MISSING)).await?);
    for (what, conversation_id) in [("channel", channel), ("group", group)] {
        let error = error_of(what, erin_conn.request(open(conversation_id)).await?);
        assert_frame_like_missing(&format!("open {what}"), &error, &missing);
    }
    let typing = |conversation_id| {
        client_frame::Kind::Typing(Typing {
            conversation_id,
            typing: true,
        })
    };
    let missing = error_of("typing missing", erin_conn.request(typing(MISSING)).await?);
    for (what, conversation_id) in [("group", group), ("channel", channel)] {
        let error = error_of("typing", erin_conn.request(typing(conversation_id)).await?);
        assert_frame_like_missing(&format!("typing into a {what}"), &error, &missing);
    }

    let post = SendMessage {
        conversation_id: channel,
        client_msg_id: "p-1".into(),
        text: "subscribers only".into(),
    };
    let ack = owner_client.send(post).await?.into_inner();
    assert_eq!(viewer.next_channel_post().await?.id, ack.message_id);
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let sent = bob_conn.send(group, "g-1", "members only").await?;
    assert_eq!(bob_conn.next_message().await?.1.id, sent.message_id);
    assert_eq!(viewer.next_message().await?.1.id, sent.message_id);
    erin_conn
        .expect_quiet(1)
        .await
        .context("nothing reaches the stranger")?;
    assert_nothing_reached(&server, &erin, "erin-2").await?;
    Ok(())
}

/// A stranger's `MarkRead` and `Delivered`, on the stream and unary, are
/// refused like a missing conversation; no receipt reaches the sender, the
/// watermarks stay where they were, and no read state is written.
#[tokio::test]
async fn non_member_cannot_mark_read() -> Result<()> {
    let (server, [alice, bob, erin]) = Server::start_with_users(["alice", "bob", "erin"]).await?;
    let direct = server.open_direct(&alice, &bob).await?;
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let sent = bob_conn.send(direct, "b-1", "hi alice").await?.message_id;
    assert_eq!(bob_conn.next_message().await?.1.id, sent);

    let (mut erin_conn, _) = server.ws_synced(&erin, Encoding::Json, "erin", 0).await?;
    let frame = |what: &str, conversation_id| match what {
        "mark read" => client_frame::Kind::MarkRead(MarkRead {
            conversation_id,
            up_to: sent,
        }),
        _ => client_frame::Kind::Delivered(Delivered {
            conversation_id,
            up_to: sent,
        }),
    };
    for what in ["mark read", "delivered"] {
        let missing = error_of(what, erin_conn.request(frame(what, MISSING)).await?);
        let error = error_of(what, erin_conn.request(frame(what, direct)).await?);
        assert_frame_like_missing(what, &error, &missing);
    }
    let mut erin_client = server.conversations(&erin).await?;
    let mark = |conversation_id| MarkRead {
        conversation_id,
        up_to: sent,
    };
    let missing = refusal("unary missing", erin_client.mark_read(mark(MISSING)).await);
    let status = refusal("unary mark read", erin_client.mark_read(mark(direct)).await);
    assert_like_missing("unary mark read", &status, &missing);

    bob_conn
        .expect_quiet(1)
        .await
        .context("no receipt reaches the sender")?;
    let request = ReceiptsRequest {
        conversation_id: direct,
        message_id: sent,
        per_member: true,
    };
    let receipts = server
        .conversations(&bob)
        .await?
        .receipts(request)
        .await?
        .into_inner();
    assert_eq!(
        (
            receipts.member_count,
            receipts.delivered_count,
            receipts.read_count
        ),
        (1, 0, 0),
        "{receipts:?}"
    );
    assert!(
        receipts.members.iter().all(|m| m.user_id == alice.id()),
        "{receipts:?}"
    );
    assert_nothing_reached(&server, &erin, "erin-2").await?;
    Ok(())
}

/// A stranger adding users to a group or a direct conversation gets NOT_FOUND
/// like a missing conversation, a plain member PERMISSION_DENIED; the members,
/// the history and the would-be invitee's sequence are unchanged.
#[tokio::test]
async fn non_member_cannot_add_members() -> Result<()> {
    let (server, [alice, bob, erin, frank]) =
        Server::start_with_users(["alice", "bob", "erin", "frank"]).await?;
    let group = server.create_group(&alice, "private", &[bob.id()]).await?;
    let direct = server.open_direct(&alice, &bob).await?;
    let history = stored(&server, &alice, group.id).await?;

    let add = |conversation_id| AddMembersRequest {
        conversation_id,
        user_ids: vec![frank.id()],
    };
    let mut erin_client = server.conversations(&erin).await?;
    let missing = refusal("missing", erin_client.add_members(add(MISSING)).await);
    for conversation_id in [group.id, direct] {
        let status = refusal(
            "a stranger adds",
            erin_client.add_members(add(conversation_id)).await,
        );
        assert_like_missing("a stranger adds", &status, &missing);
    }
    let mut bob_client = server.conversations(&bob).await?;
    let status = refusal("a member adds", bob_client.add_members(add(group.id)).await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let get = GetConversationRequest {
        conversation_id: group.id,
    };
    let now = server
        .conversations(&alice)
        .await?
        .get(get)
        .await?
        .into_inner();
    assert_eq!(
        (now.member_ids.clone(), now.version),
        (group.member_ids.clone(), group.version),
        "{now:?}"
    );
    assert_eq!(
        stored(&server, &alice, group.id).await?,
        history,
        "no notice"
    );
    assert_nothing_reached(&server, &frank, "frank").await?;
    let error = server
        .history(&frank, group.id, 0, 0, 10)
        .await
        .expect_err("frank reads");
    assert_eq!(status_code(&error), Some(Code::NotFound), "{error:#}");
    Ok(())
}

/// Nobody puts themselves into a group: a stranger's `Join` and `AddMembers`
/// of themselves are NOT_FOUND like a missing conversation (a direct
/// conversation's too), and the stranger is not a member afterwards.
#[tokio::test]
async fn nobody_adds_themselves_to_a_group() -> Result<()> {
    let (server, [alice, bob, erin]) = Server::start_with_users(["alice", "bob", "erin"]).await?;
    let group = server.create_group(&alice, "private", &[bob.id()]).await?;
    let direct = server.open_direct(&alice, &bob).await?;

    let mut erin_client = server.conversations(&erin).await?;
    let join = |conversation_id| JoinRequest { conversation_id };
    let missing = refusal("join missing", erin_client.join(join(MISSING)).await);
    let add_self = |conversation_id| AddMembersRequest {
        conversation_id,
        user_ids: vec![erin.id()],
    };
    let missing_add = refusal(
        "add missing",
        erin_client.add_members(add_self(MISSING)).await,
    );
    for conversation_id in [group.id, direct] {
        let status = refusal("join", erin_client.join(join(conversation_id)).await);
        assert_like_missing("join", &status, &missing);
        let status = refusal(
            "add self",
            erin_client.add_members(add_self(conversation_id)).await,
        );
        assert_like_missing("add self", &status, &missing_add);
    }

    let get = GetConversationRequest {
        conversation_id: group.id,
    };
    let now = server
        .conversations(&alice)
        .await?
        .get(get)
        .await?
        .into_inner();
    assert!(!now.member_ids.contains(&erin.id()), "{now:?}");
    assert_eq!(now.version, group.version, "{now:?}");
    let error = server
        .history(&erin, group.id, 0, 0, 10)
        .await
        .expect_err("erin reads");
    assert_eq!(status_code(&error), Some(Code::NotFound), "{error:#}");
    assert_nothing_reached(&server, &erin, "erin").await?;
    Ok(())
}

/// A removed member can neither `Join` again nor add themselves back (NOT_FOUND
/// like a missing conversation) nor send; only an admin adding them again lets
/// them in, and from that moment on they get what is sent.
#[tokio::test]
async fn removed_member_cannot_rejoin_without_being_added() -> Result<()> {
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    let group = server
        .create_group(&alice, "private", &[bob.id(), carol.id()])
        .await?
        .id;
    let mut alice_client = server.conversations(&alice).await?;
    let remove = RemoveMemberRequest {
        conversation_id: group,
        user_id: carol.id(),
    };
    alice_client.remove_member(remove).await?;
    let history = stored(&server, &alice, group).await?;

    let mut carol_client = server.conversations(&carol).await?;
    let join = |conversation_id| JoinRequest { conversation_id };
    let missing = refusal("join missing", carol_client.join(join(MISSING)).await);
    let status = refusal("rejoin", carol_client.join(join(group)).await);
    assert_like_missing("rejoin", &status, &missing);
    let add_self = |conversation_id| AddMembersRequest {
        conversation_id,
        user_ids: vec![carol.id()],
    };
    let missing = refusal(
        "add missing",
        carol_client.add_members(add_self(MISSING)).await,
    );
    let status = refusal(
        "add self back",
        carol_client.add_members(add_self(group)).await,
    );
    assert_like_missing("add self back", &status, &missing);
    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol", u64::MAX / 2).await?;
    let missing = error_of(
        "send missing",
        carol_conn.send_reply(MISSING, "c-0", "hi").await?,
    );
    let error = error_of(
        "send",
        carol_conn.send_reply(group, "c-1", "I'm back").await?,
    );
    assert_frame_like_missing("a removed member sends", &error, &missing);

    let get = GetConversationRequest {
        conversation_id: group,
    };
    let now = alice_client.get(get).await?.into_inner();
    assert_eq!(now.member_ids.len(), 2, "{now:?}");
    assert!(!now.member_ids.contains(&carol.id()), "{now:?}");
    assert_eq!(
        stored(&server, &alice, group).await?,
        history,
        "nothing stored"
    );

    // Added again by an admin: in from the notice on.
    alice_client.add_members(add_self(group)).await?;
    let (_, added) = carol_conn.next_message().await?;
    assert!(
        matches!(added.notice.as_ref().and_then(|n| n.kind.as_ref()),
            Some(notice::Kind::MembersAdded(m)) if m.user_ids == [carol.id()]),
        "{added:?}"
    );
    let ack = carol_conn.send(group, "c-2", "thanks").await?;
    assert_eq!(carol_conn.next_message().await?.1.id, ack.message_id);
    Ok(())
}

/// After `Leave`, the leaver's live connection gets their leave notice and then
/// nothing, from the very next message on; their history ends at the notice,
/// their sends are refused, and a fresh device syncs up to the notice only.
#[tokio::test]
async fn after_leaving_history_stops_at_the_leave_point_and_live_delivery_stops() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let group = server
        .create_group(&alice, "private", &[bob.id()])
        .await?
        .id;
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice", 0).await?;
    let (mut bob_conn, synced) = server.ws_synced(&bob, Encoding::Binary, "bob", 0).await?;
    let before = alice_conn.send(group, "a-1", "before").await?.message_id;
    assert_eq!(alice_conn.next_message().await?.1.id, before);
    assert_eq!(bob_conn.next_message().await?.1.id, before);

    let leave = LeaveRequest {
        conversation_id: group,
    };
    server.conversations(&bob).await?.leave(leave).await?;
    let after = alice_conn.send(group, "a-2", "after").await?.message_id;
    let (left_seq, left) = bob_conn.next_message().await?;
    assert!(
        matches!(
            left.notice.as_ref().and_then(|n| n.kind.as_ref()),
            Some(notice::Kind::MemberLeft(_))
        ),
        "{left:?}"
    );
    assert_eq!(message_ids(&mut alice_conn, 2).await?, [left.id, after]);
    bob_conn
        .expect_quiet(1)
        .await
        .context("live delivery stops at the leave")?;

    let page = stored(&server, &bob, group).await?;
    assert_eq!(
        page.first(),
        Some(&left.id),
        "history stops at the leave: {page:?}"
    );
    assert!(!page.contains(&after), "{page:?}");
    match server.history(&bob, group, 0, left.id, 10).await {
        Ok(beyond) => assert!(beyond.messages.is_empty(), "{beyond:?}"),
        Err(error) => assert_eq!(status_code(&error), Some(Code::NotFound), "{error:#}"),
    }
    let reply = bob_conn.send_reply(group, "b-1", "one more").await?;
    assert_eq!(error_of("send after leaving", reply).reason, "not_found");
    alice_conn
        .expect_quiet(2)
        .await
        .context("the refused send reached nobody")?;
    assert_eq!(stored(&server, &alice, group).await?.first(), Some(&after));

    let (_, resynced) = server.grpc_synced(&bob, "bob-laptop", synced.seq).await?;
    let ids: Vec<(u64, i64)> = resynced
        .events
        .into_iter()
        .map(|event| message_of(event).map(|(seq, m)| (seq, m.id)))
        .collect::<Result<_>>()?;
    assert_eq!(ids.last(), Some(&(left_seq, left.id)), "{ids:?}");
    assert!(ids.iter().all(|&(_, id)| id != after), "{ids:?}");
    Ok(())
}

/// Whatever a client puts in its frames, the server sets the sender, its
/// device, the time and the id of a message: a binary `SendMessage` carrying
/// made-up fields (another user's id everywhere) is stored as the caller's
/// with the server's values; the same over JSON is refused as malformed and
/// stores nothing. A `MarkRead` carrying another member's id moves only the
/// caller's watermark, never beyond the newest message.
#[tokio::test]
async fn spoofed_sender_time_and_id_are_set_by_the_server() -> Result<()> {
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    let group = server
        .create_group(&alice, "private", &[bob.id(), carol.id()])
        .await?
        .id;
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let bob_id = u64::try_from(bob.id())?;
    let mut alice_ws = server.ws(&alice, Encoding::Binary).await?;
    alice_ws.sync("alice-ws", u64::MAX / 2).await?;

    let send = SendMessage {
        conversation_id: group,
        client_msg_id: "forged".into(),
        text: "from bob, honest".into(),
    };
    let extra: Vec<(u32, u64)> = (4..=16).map(|number| (number, bob_id)).collect();
    let frame = forged_frame(41, 3, &send.encode_to_vec(), &extra);
    let started = i64::try_from(now_secs() * 1000)? - 1000;
    alice_ws
        .transport_mut()
        .send_raw(tungstenite::Message::Binary(frame.into()))
        .await?;
    let Reply::Sent(ack) = alice_ws.reply_to(41).await? else {
        panic!("the send with extra fields was refused");
    };
    let ended = i64::try_from(now_secs() * 1000)? + 1000;
    let (_, message) = bob_conn.next_message().await?;
    assert_is(&message, &ack, &alice, "from bob, honest");
    assert_eq!(message.sender_device, "alice-ws", "{message:?}");
    assert!(
        (started..=ended).contains(&message.sent_at_ms) && message.sent_at_ms == ack.sent_at_ms,
        "server time: {message:?}"
    );
    assert_ne!(message.id, bob.id(), "{message:?}");
    let page = server.history(&carol, group, 0, 0, 1).await?;
    assert_eq!(page.messages.first(), Some(&message), "history agrees");

    let mut alice_json = server.ws(&alice, Encoding::Json).await?;
    alice_json.sync("alice-json", u64::MAX / 2).await?;
    let forged = json!({
        "ref": "7",
        "send": {
            "conversationId": group.to_string(),
            "clientMsgId": "forged-json",
            "text": "from bob, honest",
            "senderId": bob.id().to_string(),
            "senderDevice": "bob",
            "sentAtMs": "1",
            "id": "42",
        }
    });
    alice_json
        .transport_mut()
        .send_raw(tungstenite::Message::Text(forged.to_string().into()))
        .await?;
    let frame = next_non_event(&mut alice_json).await?;
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("the JSON send with made-up fields was not refused: {frame:?}");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("malformed", false),
        "{error:?}"
    );
    alice_json.ping(1).await?;

    // Receipts: bob's MarkRead naming carol, up to beyond the newest message.
    let mark = MarkRead {
        conversation_id: group,
        up_to: i64::MAX,
    };
    let extra: Vec<(u32, u64)> = (3..=8)
        .map(|n| (n, u64::try_from(carol.id()).unwrap_or(0)))
        .collect();
    let frame = forged_frame(9, 6, &mark.encode_to_vec(), &extra);
    let mut bob_ws = server.ws(&bob, Encoding::Binary).await?;
    bob_ws.sync("bob-ws", u64::MAX / 2).await?;
    bob_ws
        .transport_mut()
        .send_raw(tungstenite::Message::Binary(frame.into()))
        .await?;
    assert!(
        matches!(bob_ws.reply_to(9).await?, Reply::Done),
        "mark read"
    );
    let receipt = loop {
        let event = alice_ws.next_event().await?;
        if let Some(confab_proto::v1::event::Kind::Receipt(receipt)) = event.kind {
            break receipt;
        }
    };
    assert_eq!(
        (receipt.user_id, receipt.read_up_to),
        (bob.id(), ack.message_id),
        "the caller's receipt, clamped to the newest message: {receipt:?}"
    );
    let request = ReceiptsRequest {
        conversation_id: group,
        message_id: ack.message_id,
        per_member: true,
    };
    let receipts = server
        .conversations(&alice)
        .await?
        .receipts(request)
        .await?
        .into_inner();
    assert_eq!(receipts.read_count, 1, "{receipts:?}");
    for member in &receipts.members {
        let expected = if member.user_id == bob.id() {
            ack.message_id
        } else {
            0
        };
        assert_eq!(member.read_up_to, expected, "{receipts:?}");
    }
    let stored_ids = stored(&server, &alice, group).await?;
    assert_eq!(
        stored_ids.first(),
        Some(&ack.message_id),
        "nothing else stored"
    );
    Ok(())
}

/// Beyond each limit (messages per user, typing, creations, invitations, text
/// size, frame size) the offender gets RESOURCE_EXHAUSTED (code 8) with "retry
/// in N ms" where waiting helps, and only what was accepted is stored; other
/// users stay connected and chat on throughout, and only an oversized frame
/// closes its own connection.
#[tokio::test]
async fn exceeded_limits_answer_with_a_retry_hint_and_others_stay_connected() -> Result<()> {
    let server = Server::start_with(&[
        "--send-burst",
        "3",
        "--send-per-second",
        "1",
        "--typing-per-minute",
        "2",
        "--creations-per-minute",
        "1",
        "--invitations-per-minute",
        "2",
        "--max-text-bytes",
        "100",
        "--max-frame-bytes",
        "4096",
    ])
    .await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    let others = server.open_direct(&bob, &carol).await?;
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let (mut carol_conn, _) = server
        .ws_synced(&carol, Encoding::Binary, "carol", 0)
        .await?;
    let zed = server.register("zed").await?;
    let direct = server.open_direct(&alice, &zed).await?;
    let mut alice_client = server.conversations(&alice).await?;
    let group = alice_client
        .create_group(confab_proto::v1::CreateGroupRequest {
            name: "mine".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .id;
    let (mut alice_conn, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice", u64::MAX / 2)
        .await?;

    // Sizes: no retry hint (waiting does not help); a frame over the limit
    // closes that connection only.
    let reply = alice_conn
        .send_reply(group, "big", &"x".repeat(101))
        .await?;
    let error = error_of("text over the limit", reply);
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (8, "too_large", false),
        "{error:?}"
    );
    assert!(!error.message.contains("retry in"), "{error:?}");
    alice_conn
        .ping(1)
        .await
        .context("the offender stays connected")?;
    let mut alice_big = server.ws(&alice, Encoding::Binary).await?;
    alice_big.sync("alice-big", u64::MAX / 2).await?;
    alice_big
        .transport_mut()
        .send_raw(tungstenite::Message::Binary(vec![0_u8; 8192].into()))
        .await?;
    let (_, closed) = alice_big.expect_closed().await?;
    assert_eq!(closed.ws_close_code, Some(1009), "{closed:?}");
    chat(others, &mut bob_conn, &mut carol_conn, 0).await?;
    alice_conn
        .ping(2)
        .await
        .context("the offender's other connection stays")?;

    // Messages per user.
    let mut refs = Vec::new();
    for i in 0..8 {
        refs.push((
            i,
            alice_conn
                .send_message(direct, &format!("f-{i}"), "flood")
                .await?,
        ));
    }
    let mut accepted = Vec::new();
    for (i, r#ref) in refs {
        match alice_conn.reply_to(r#ref).await? {
            Reply::Sent(ack) => accepted.push(ack.message_id),
            Reply::Error(error) => {
                assert_eq!(
                    (error.code, error.reason.as_str(), error.fatal),
                    (8, "rate_limited", false),
                    "send {i}: {error:?}"
                );
                assert!(error.message.contains("retry in"), "{error:?}");
            }
            Reply::Done => panic!("a send answered done"),
        }
    }
    assert!((2..8).contains(&accepted.len()), "{accepted:?}");
    chat(others, &mut bob_conn, &mut carol_conn, 1).await?;

    // Typing.
    let mut limited = None;
    for _ in 0..4 {
        if let Reply::Error(error) = alice_conn.typing_reply(group, true).await? {
            limited = Some(error);
        }
    }
    let error = limited.context("typing beyond the rate")?;
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (8, "rate_limited", false),
        "{error:?}"
    );
    assert!(error.message.contains("retry in"), "{error:?}");

    // Creations and invitations (unary: the hint is in the message and in
    // `retry-after-ms`).
    let assert_hint = |what: &str, status: &tonic::Status| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{what}: {status:?}");
        assert!(status.message().contains("retry in"), "{what}: {status:?}");
        assert!(
            status.metadata().contains_key("retry-after-ms"),
            "{what}: {status:?}"
        );
    };
    let request = CreateChannelRequest {
        name: "second".into(),
        ..CreateChannelRequest::default()
    };
    let status = refusal(
        "a second creation",
        alice_client.create_channel(request).await,
    );
    assert_hint("creation", &status);
    let invitees = [
        server.register("dave").await?.id(),
        server.register("erin").await?.id(),
        server.register("frank").await?.id(),
    ];
    for user_id in &invitees[..2] {
        let add = AddMembersRequest {
            conversation_id: group,
            user_ids: vec![*user_id],
        };
        alice_client.add_members(add).await?;
    }
    let add = AddMembersRequest {
        conversation_id: group,
        user_ids: vec![invitees[2]],
    };
    let status = refusal("a third invitation", alice_client.add_members(add).await);
    assert_hint("invitation", &status);
    chat(others, &mut bob_conn, &mut carol_conn, 2).await?;

    let mut stored_direct = stored(&server, &zed, direct).await?;
    stored_direct.reverse();
    assert_eq!(stored_direct, accepted, "only accepted messages are stored");
    let get = GetConversationRequest {
        conversation_id: group,
    };
    let now = alice_client.get(get).await?.into_inner();
    assert_eq!(now.member_count, 3, "two invitations passed: {now:?}");
    let page = server.history(&alice, group, 0, 0, 10).await?;
    assert!(
        page.messages.iter().all(|m| m.client_msg_id != "big"),
        "{page:?}"
    );
    let listed = alice_client
        .list(ListConversationsRequest::default())
        .await?
        .into_inner();
    assert_eq!(
        listed.conversations.len(),
        2,
        "no second creation: {listed:?}"
    );
    Ok(())
}

/// Bob sends to carol and both get it: the server serves others.
async fn chat(
    conversation: i64,
    bob: &mut confab_tests::GrpcConn,
    carol: &mut confab_tests::WsConn,
    n: usize,
) -> Result<()> {
    let ack = bob
        .send(conversation, &format!("bob-{n}"), "still here")
        .await?;
    assert_eq!(bob.next_message().await?.1.id, ack.message_id);
    assert_eq!(carol.next_message().await?.1.id, ack.message_id);
    Ok(())
}

/// A device that stops reading while messages pour in is disconnected once its
/// bounded live queue is full: it gets the queued events, then a fatal
/// `slow_consumer` error frame and a WebSocket close 1013 saying to resync from
/// its cursor; reconnecting with that cursor brings every later message exactly
/// once, while another user's connection is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_resync_and_resumes_from_its_cursor() -> Result<()> {
    const SENDERS: usize = 8;
    const BATCH: usize = 25;
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    let direct = server.open_direct(&alice, &bob).await?;
    let other = server.open_direct(&carol, &alice).await?;
    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol", 0).await?;
    let (mut slow, _) = server
        .ws_synced(&bob, Encoding::Binary, "bob-slow", 0)
        .await?;
    let text = "s".repeat(16_000);

    // Alice sends (unary, no device of hers to read) until the hub drops bob.
    let started = Instant::now();
    let mut acked: Vec<i64> = Vec::new();
    let mut round = 0;
    while !server.log().contains("disconnecting slow consumer") {
        ensure!(
            started.elapsed() < Duration::from_secs(25),
            "never dropped after {} messages",
            acked.len()
        );
        let mut tasks = tokio::task::JoinSet::new();
        for sender in 0..SENDERS {
            let mut client = server.conversations(&alice).await?;
            let text = text.clone();
            tasks.spawn(async move {
                let mut ids = Vec::with_capacity(BATCH);
                for i in 0..BATCH {
                    let send = SendMessage {
                        conversation_id: direct,
                        client_msg_id: format!("r{round}-s{sender}-{i}"),
                        text: text.clone(),
                    };
                    ids.push(client.send(send).await?.into_inner().message_id);
                }
                anyhow::Ok(ids)
            });
        }
        while let Some(ids) = tasks.join_next().await {
            acked.extend(ids??);
        }
        round += 1;
    }
    acked.sort_unstable();

    // Another user is served meanwhile.
    let ack = carol_conn.send(other, "c-1", "unaffected").await?;
    assert_eq!(carol_conn.next_message().await?.1.id, ack.message_id);

    let (frames, closed) = slow.expect_closed().await?;
    let mut got = Vec::new();
    let mut error = None;
    for frame in frames {
        match frame.kind {
            Some(server_frame::Kind::Event(event)) => got.push(message_of(event)?),
            Some(server_frame::Kind::Error(e)) => error = Some(e),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    let error = error.context("no error frame before the close")?;
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (8, "slow_consumer", true),
        "{error:?}"
    );
    assert_eq!(closed.ws_close_code, Some(1013), "{closed:?}");
    assert!(closed.detail.contains("resync"), "{closed:?}");
    let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "gap-free up to the drop");
    let cursor = seqs.last().copied().unwrap_or(0);
    assert!(
        got.len() < acked.len(),
        "dropped before the end: {} of {}",
        got.len(),
        acked.len()
    );

    let (_, resumed) = server
        .ws_synced(&bob, Encoding::Binary, "bob-slow", cursor)
        .await?;
    let mut all: Vec<i64> = got.iter().map(|(_, m)| m.id).collect();
    let mut seq = cursor;
    for event in resumed.events {
        let (next, message) = message_of(event)?;
        seq += 1;
        assert_eq!(next, seq, "catch-up continues the cursor");
        all.push(message.id);
    }
    assert_eq!(all, acked, "every message exactly once, in order");
    carol_conn.ping(1).await?;
    Ok(())
}

/// Passwords are stored as Argon2id PHC strings with at least OWASP's minimum
/// cost (19 MiB, 2 passes, 1 lane), never in clear: checked in the files of the
/// running server's data dir.
#[tokio::test]
async fn argon2id_parameters_are_sane() -> Result<()> {
    let server = Server::start().await?;
    server.register("alice").await?;
    server.login("alice", PASSWORD).await?;
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(server.data_dir())? {
        let path = entry?.path();
        if path.is_file() {
            bytes.extend(std::fs::read(&path)?);
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains(PASSWORD), "the password is stored in clear");
    let phc = text
        .split("$argon2id$")
        .nth(1)
        .context("no Argon2id hash in the data dir")?;
    let params = phc
        .strip_prefix("v=19$")
        .and_then(|rest| rest.split('$').next())
        .context("not Argon2 version 0x13")?;
    let value = |name: &str| -> Result<u32> {
        params
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .with_context(|| format!("{name} missing from {params}"))?
            .parse()
            .with_context(|| format!("{name} in {params}"))
    };
    assert!(value("m")? >= 19_456, "memory cost {params}");
    assert!(value("t")? >= 2, "passes {params}");
    assert!(value("p")? >= 1, "lanes {params}");
    Ok(())
}

/// Every other call naming a conversation answers a stranger exactly as for a
/// missing one, whatever its kind: `Leave`, `RemoveMember`, `SetRole`,
/// `Update`, `Send` and `MarkRead`, of a group and of a channel alike.
#[tokio::test]
async fn non_member_gets_not_found_from_every_call_on_a_conversation() -> Result<()> {
    use confab_proto::v1::{Role, SetRoleRequest, UpdateConversationRequest};
    let (server, [alice, bob, erin]) = Server::start_with_users(["alice", "bob", "erin"]).await?;
    let group = server.create_group(&alice, "private", &[bob.id()]).await?;
    let mut alice_client = server.conversations(&alice).await?;
    let request = CreateChannelRequest {
        name: "news".into(),
        ..CreateChannelRequest::default()
    };
    let channel = alice_client.create_channel(request).await?.into_inner();
    let mut erin_client = server.conversations(&erin).await?;

    for (kind, conversation_id) in [("group", group.id), ("channel", channel.id)] {
        let what = |call: &str| format!("{call} of a {kind}");
        let leave = |conversation_id| LeaveRequest { conversation_id };
        let missing = refusal("leave", erin_client.leave(leave(MISSING)).await);
        let status = refusal(
            &what("leave"),
            erin_client.leave(leave(conversation_id)).await,
        );
        assert_like_missing(&what("leave"), &status, &missing);
        let remove = |conversation_id| RemoveMemberRequest {
            conversation_id,
            user_id: bob.id(),
        };
        let missing = refusal("remove", erin_client.remove_member(remove(MISSING)).await);
        let status = refusal(
            &what("remove"),
            erin_client.remove_member(remove(conversation_id)).await,
        );
        assert_like_missing(&what("remove"), &status, &missing);
        let role = |conversation_id| SetRoleRequest {
            conversation_id,
            user_id: erin.id(),
            role: Role::Admin.into(),
        };
        let missing = refusal("set role", erin_client.set_role(role(MISSING)).await);
        let status = refusal(
            &what("set role"),
            erin_client.set_role(role(conversation_id)).await,
        );
        assert_like_missing(&what("set role"), &status, &missing);
        let update = |conversation_id| UpdateConversationRequest {
            conversation_id,
            name: Some("mine now".into()),
            ..UpdateConversationRequest::default()
        };
        let missing = refusal("update", erin_client.update(update(MISSING)).await);
        let status = refusal(
            &what("update"),
            erin_client.update(update(conversation_id)).await,
        );
        assert_like_missing(&what("update"), &status, &missing);
        let send = |conversation_id| SendMessage {
            conversation_id,
            client_msg_id: format!("e-{conversation_id}"),
            text: "let me in".into(),
        };
        let missing = refusal("send", erin_client.send(send(MISSING)).await);
        let status = refusal(&what("send"), erin_client.send(send(conversation_id)).await);
        assert_like_missing(&what("send"), &status, &missing);
        let mark = |conversation_id| MarkRead {
            conversation_id,
            up_to: 1,
        };
        let missing = refusal("mark read", erin_client.mark_read(mark(MISSING)).await);
        let status = refusal(
            &what("mark read"),
            erin_client.mark_read(mark(conversation_id)).await,
        );
        assert_like_missing(&what("mark read"), &status, &missing);
    }
    for (before, conversation_id) in [(&group, group.id), (&channel, channel.id)] {
        let get = GetConversationRequest { conversation_id };
        let now = alice_client.get(get).await?.into_inner();
        assert_eq!(
            (now.name.as_str(), now.version, now.member_count),
            (before.name.as_str(), before.version, before.member_count),
            "{now:?}"
        );
    }
    let page = server.history(&alice, channel.id, 0, 0, 10).await?;
    assert!(
        page.messages.iter().all(|m| m.sender_id != erin.id()),
        "{page:?}"
    );
    Ok(())
}
