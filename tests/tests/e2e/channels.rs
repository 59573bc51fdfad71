//! Channels: admins post, subscribers read with `History`; live posts go only to
//! connections that have the channel open; one stored copy per post.

use std::time::Instant;

use confab_proto::v1::{
    AddMembersRequest, ConversationKind, CreateChannelRequest, JoinRequest, client_frame,
};

use super::groups::connect_many;
use super::*;

/// The counter of per-user sequence events written (fan-out on write).
const EVENTS_METRIC: &str = "confab_message_events_total";

/// A channel's life on a few connections: subscribers `Join`; a post reaches the
/// connections that opened the channel (seq 0), not the others and not after
/// `CloseChannel`; history holds it; subscribers cannot post; strangers cannot
/// open it, and a group cannot be opened as a channel.
#[tokio::test]
async fn channel_posts_reach_open_viewers_only() -> Result<()> {
    let (server, [owner, bob, carol]) = Server::start_with_users(["owner", "bob", "carol"]).await?;
    let mut owner_client = server.conversations(&owner).await?;
    let request = CreateChannelRequest {
        name: "news".into(),
        ..CreateChannelRequest::default()
    };
    let channel = owner_client.create_channel(request).await?.into_inner();
    assert_eq!(channel.kind(), ConversationKind::Channel);
    let id = channel.id;
    let mut bob_client = server.conversations(&bob).await?;
    let joined = bob_client
        .join(JoinRequest {
            conversation_id: id,
        })
        .await?
        .into_inner();
    assert_eq!(joined.member_count, 2, "{joined:?}");
    assert!(
        joined.member_ids.is_empty(),
        "channels list no members: {joined:?}"
    );

    let (mut bob_viewer, _) = server.grpc_synced(&bob, "bob-viewer", 0).await?;
    let (mut bob_idle, _) = server
        .ws_synced(&bob, Encoding::Binary, "bob-idle", 0)
        .await?;
    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol", 0).await?;
    bob_viewer.open_channel(id).await?;
    let open = client_frame::Kind::OpenChannel(confab_proto::v1::OpenChannel {
        conversation_id: id,
    });
    let Reply::Error(error) = carol_conn.request(open).await? else {
        panic!("a stranger opened the channel");
    };
    assert_eq!(
        (error.code, error.message.as_str()),
        (Code::NotFound as i32, "no such conversation")
    );
    let group = server
        .create_group(&owner, "not a channel", &[bob.id()])
        .await?;
    let open = client_frame::Kind::OpenChannel(confab_proto::v1::OpenChannel {
        conversation_id: group.id,
    });
    let Reply::Error(error) = bob_viewer.request(open).await? else {
        panic!("a group opened as a channel");
    };
    assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
    // The group's created notice is a sequence event of bob's.
    assert!(bob_viewer.next_message().await?.1.notice.is_some());
    assert!(bob_idle.next_message().await?.1.notice.is_some());

    let post = SendMessage {
        conversation_id: id,
        client_msg_id: "p-1".into(),
        text: "first post".into(),
    };
    let ack = owner_client.send(post).await?.into_inner();
    let live = bob_viewer.next_channel_post().await?;
    assert_is(&live, &ack, &owner, "first post");
    bob_idle.expect_quiet(1).await.context("not open here")?;
    carol_conn.expect_quiet(2).await.context("not subscribed")?;

    let refused = bob_client
        .send(SendMessage {
            conversation_id: id,
            client_msg_id: "b-1".into(),
            text: "me too".into(),
        })
        .await
        .expect_err("a subscriber posted");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    bob_viewer.close_channel(id).await?;
    let post = SendMessage {
        conversation_id: id,
        client_msg_id: "p-2".into(),
        text: "second post".into(),
    };
    let second = owner_client.send(post).await?.into_inner();
    let (mut owner_viewer, _) = server.grpc_synced(&owner, "owner-viewer", 0).await?;
    owner_viewer.open_channel(id).await?;
    let post = SendMessage {
        conversation_id: id,
        client_msg_id: "p-3".into(),
        text: "third post".into(),
    };
    let third = owner_client.send(post).await?.into_inner();
    assert_eq!(owner_viewer.next_channel_post().await?.id, third.message_id);
    bob_viewer.expect_quiet(3).await.context("closed")?;

    let page = server.history(&bob, id, 0, 0, 10).await?;
    let texts: Vec<(i64, &str)> = page
        .messages
        .iter()
        .filter(|message| message.notice.is_none())
        .map(|message| (message.id, message.text.as_str()))
        .collect();
    assert_eq!(
        texts,
        [
            (third.message_id, "third post"),
            (second.message_id, "second post"),
            (ack.message_id, "first post")
        ],
        "history, newest first"
    );
    let error = server
        .history(&carol, id, 0, 0, 10)
        .await
        .expect_err("a stranger read the channel");
    assert_eq!(status_code(&error), Some(Code::NotFound), "{error:#}");
    Ok(())
}

/// A channel of 20,000 subscribers (added in batches of 1,000), ~300 of them
/// connected with the channel open and 60 connected without: one post reaches
/// every viewer live and no one else, subscribers read it with `History`, a
/// subscriber cannot post, and the post writes no per-user events (one copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_of_20000_subscribers() -> Result<()> {
    const SECRET: &str = "e2e-big-channel-secret-0123456789abcdef";
    const SUBSCRIBERS: usize = 20_000;
    const VIEWERS: usize = 300;
    const IDLE: usize = 60;
    const BATCH: usize = 1_000;
    let _big = BIG_TESTS.lock().await;
    let setup = Instant::now();
    let server = Server::start_with(&["--external-jwt-secret", SECRET]).await?;
    let owner = server.external_account(SECRET, "channel-owner").await?;
    let mut owner_client = server.conversations(&owner).await?;
    let request = CreateChannelRequest {
        name: "big news".into(),
        ..CreateChannelRequest::default()
    };
    let channel = owner_client.create_channel(request).await?.into_inner();
    let id = channel.id;

    let subjects: Vec<String> = (0..SUBSCRIBERS).map(|i| format!("sub-{i:05}")).collect();
    let users = server.external_accounts(SECRET, &subjects, 32).await?;
    let created = setup.elapsed();
    for batch in users.chunks(BATCH) {
        let request = AddMembersRequest {
            conversation_id: id,
            user_ids: batch.iter().map(Account::id).collect(),
        };
        owner_client.add_members(request).await?;
    }
    let get = confab_proto::v1::GetConversationRequest {
        conversation_id: id,
    };
    let got = owner_client.get(get).await?.into_inner();
    assert_eq!(got.member_count as usize, SUBSCRIBERS + 1, "{got:?}");
    let added = setup.elapsed();

    let mut viewers = connect_many(&server, &users[..VIEWERS], 64).await?;
    let opened =
        futures::future::join_all(viewers.iter_mut().map(|conn| conn.open_channel(id))).await;
    opened.into_iter().collect::<Result<Vec<()>>>()?;
    let mut idle = connect_many(&server, &users[VIEWERS..VIEWERS + IDLE], 64).await?;
    eprintln!(
        "channel_of_20000_subscribers: set-up {:?} (users {created:?}, adding {:?}, connecting {:?})",
        setup.elapsed(),
        added - created,
        setup.elapsed() - added
    );

    // The metric counts: a direct message writes two events (sender and recipient).
    let control_before = http::metric(server.addr(), EVENTS_METRIC).await?;
    let direct = server.open_direct(&owner, &users[2]).await?;
    let request = SendMessage {
        conversation_id: direct,
        client_msg_id: "control".into(),
        text: "control".into(),
    };
    owner_client.send(request).await?;
    eventually("the events metric counts a direct message", || async {
        let now = http::metric(server.addr(), EVENTS_METRIC).await?;
        Ok(now >= control_before + 2.0)
    })
    .await
    .with_context(|| format!("{EVENTS_METRIC} is not exported, or does not count"))?;
    viewers[2]
        .next_message()
        .await
        .context("the control message")?;
    let events_before = http::metric(server.addr(), EVENTS_METRIC).await?;
    let sent_at = Instant::now();
    let post = SendMessage {
        conversation_id: id,
        client_msg_id: "big-post".into(),
        text: "to 20,000 subscribers".into(),
    };
    let ack = owner_client.send(post).await?.into_inner();
    let received =
        futures::future::join_all(viewers.iter_mut().map(|conn| conn.next_channel_post())).await;
    let fan_out = sent_at.elapsed();
    for (i, got) in received.into_iter().enumerate() {
        let post = got.with_context(|| format!("viewer {i}"))?;
        assert_is(&post, &ack, &owner, "to 20,000 subscribers");
    }
    eprintln!("channel_of_20000_subscribers: post to last of {VIEWERS} viewers: {fan_out:?}");
    let quiet = futures::future::join_all(idle.iter_mut().map(|conn| conn.expect_quiet(7))).await;
    for (i, checked) in quiet.into_iter().enumerate() {
        checked.with_context(|| format!("idle subscriber {i} got something"))?;
    }
    let quiet =
        futures::future::join_all(viewers.iter_mut().map(|conn| conn.expect_quiet(8))).await;
    for (i, checked) in quiet.into_iter().enumerate() {
        checked.with_context(|| format!("viewer {i} got more than the post"))?;
    }
    let events_after = http::metric(server.addr(), EVENTS_METRIC).await?;
    assert!(
        (events_after - events_before).abs() < f64::EPSILON,
        "{EVENTS_METRIC} grew from {events_before} to {events_after}: a channel post must be one copy"
    );

    for reader in [&users[0], &users[VIEWERS], &users[SUBSCRIBERS - 1]] {
        let page = server.history(reader, id, 0, 0, 1).await?;
        assert_eq!(
            page.messages.first().map(|message| message.id),
            Some(ack.message_id),
            "{page:?}"
        );
    }
    let mut subscriber_client = server.conversations(&users[1]).await?;
    let refused = subscriber_client
        .send(SendMessage {
            conversation_id: id,
            client_msg_id: "sub-post".into(),
            text: "can I?".into(),
        })
        .await
        .expect_err("a subscriber posted");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    Ok(())
}
