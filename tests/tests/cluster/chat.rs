//! Clients on different gateways talk as they would on one server.

use super::*;

/// Users on different gateways chat one to one and in a group: every message
/// reaches every member device on either gateway, in one order; a retry
/// through the other gateway gets the original id; a short load holds the
/// invariants.
#[tokio::test]
async fn two_gateways_chat_one_to_one_and_in_groups() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let outcome = chat(&cluster).await;
    cluster.with_logs(outcome)
}

async fn chat(cluster: &Cluster) -> Result<()> {
    let (gw0, gw1) = (cluster.gateway(0), cluster.gateway(1));
    let alice = gw0.register("alice").await?;
    let bob = gw1.register("bob").await?;
    let carol = gw1.register("carol").await?;
    let direct = gw0.open_direct(&alice, &bob).await?;
    ensure!(
        gw1.open_direct(&bob, &alice).await? == direct,
        "the two gateways disagree on the direct conversation"
    );

    let (mut alice_grpc, _) = gw0.grpc_synced(&alice, "alice-phone", 0).await?;
    let (mut bob_ws, _) = gw1
        .ws_synced(&bob, Encoding::Binary, "bob-laptop", 0)
        .await?;
    let hello = alice_grpc.send(direct, "a-1", "hi bob").await?;
    let got = next_chat(&mut bob_ws).await?;
    ensure!(
        got.id == hello.message_id && got.text == "hi bob",
        "{got:?}"
    );
    let own = next_chat(&mut alice_grpc).await?;
    ensure!(own.id == hello.message_id, "alice's own copy: {own:?}");
    let reply = bob_ws.send(direct, "b-1", "hi alice").await?;
    let got = next_chat(&mut alice_grpc).await?;
    ensure!(got.id == reply.message_id, "{got:?}");
    let own = next_chat(&mut bob_ws).await?;
    ensure!(own.id == reply.message_id, "bob's own copy: {own:?}");
    ensure!(
        reply.message_id > hello.message_id,
        "ids follow the order of the log"
    );

    // The same client_msg_id through the other gateway: the original message.
    let (mut alice_again, _) = gw1
        .ws_synced(&alice, Encoding::Json, "alice-tablet", u64::MAX / 2)
        .await?;
    let retry = alice_again.send(direct, "a-1", "hi bob").await?;
    ensure!(
        retry.duplicate && retry.message_id == hello.message_id,
        "a retry on the other gateway: {retry:?}"
    );

    let group = gw1
        .create_group(&carol, "trio", &[alice.id(), bob.id()])
        .await?
        .id;
    let (mut carol_grpc, _) = gw0.grpc_synced(&carol, "carol-desk", 0).await?;
    let mut sent = Vec::new();
    sent.push(carol_grpc.send(group, "c-1", "welcome").await?.message_id);
    sent.push(alice_grpc.send(group, "a-2", "thanks").await?.message_id);
    sent.push(bob_ws.send(group, "b-2", "hello all").await?.message_id);
    for (who, seen) in [
        ("alice", three(&mut alice_grpc).await?),
        ("bob", three(&mut bob_ws).await?),
        ("carol", three(&mut carol_grpc).await?),
    ] {
        ensure!(seen == sent, "{who} saw {seen:?}, the log has {sent:?}");
    }
    let history = gw1.history(&alice, group, 0, 0, 50).await?;
    let mut stored: Vec<i64> = history
        .messages
        .iter()
        .filter(|message| message.notice.is_none())
        .map(|message| message.id)
        .collect();
    stored.reverse();
    ensure!(stored == sent, "history {stored:?}, sent {sent:?}");

    let config = LoadConfig {
        users: 6,
        messages_per_device: 30,
        name: "chat".to_owned(),
        ..LoadConfig::default()
    };
    let load = Load::start(cluster.gateways(), config).await?;
    finish_and_check("two_gateways_chat", cluster, load, None).await?;
    Ok(())
}

/// Reads the next three chat messages and returns their ids.
async fn three<T: Transport>(conn: &mut Conn<T>) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(next_chat(conn).await.context("a group message")?.id);
    }
    Ok(ids)
}

/// Invariants 5 and 6 across gateways: a stranger learns nothing of a group and
/// cannot post to it; a member removed through one gateway gets nothing sent
/// through the other after the removal notice, and their history ends there;
/// oversized and malformed sends are refused and change nothing.
#[tokio::test]
async fn members_only_and_bad_input_across_gateways() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let outcome = members_only(&cluster).await;
    cluster.with_logs(outcome)
}

async fn members_only(cluster: &Cluster) -> Result<()> {
    use confab_proto::v1::RemoveMemberRequest;

    let (gw0, gw1) = (cluster.gateway(0), cluster.gateway(1));
    let alice = gw0.register("alice").await?;
    let bob = gw1.register("bob").await?;
    let dave = gw1.register("dave").await?;
    let mallory = gw0.register("mallory").await?;
    let group = gw0
        .create_group(&alice, "team", &[bob.id(), dave.id()])
        .await?
        .id;
    let (mut bob_ws, _) = gw1
        .ws_synced(&bob, Encoding::Binary, "bob-laptop", 0)
        .await?;
    let (mut dave_grpc, _) = gw1.grpc_synced(&dave, "dave-phone", 0).await?;
    let (mut mallory_grpc, _) = gw0.grpc_synced(&mallory, "mallory-phone", 0).await?;
    let first = bob_ws.send(group, "b-1", "before").await?;
    ensure!(
        next_chat(&mut dave_grpc).await?.id == first.message_id,
        "dave gets it"
    );

    // A stranger: the same answer as for a conversation that does not exist.
    let stranger = gw0.history(&mallory, group, 0, 0, 50).await;
    let missing = gw0.history(&mallory, 424_242, 0, 0, 50).await;
    ensure!(
        confab_tests::accounts::status_code(
            stranger.as_ref().err().context("history to a stranger")?
        ) == Some(tonic::Code::NotFound)
            && confab_tests::accounts::status_code(
                missing.as_ref().err().context("history of nothing")?
            ) == Some(tonic::Code::NotFound),
        "stranger {stranger:?}, missing {missing:?}"
    );
    let posted = mallory_grpc.send_reply(group, "m-1", "let me in").await?;
    let nowhere = mallory_grpc.send_reply(424_242, "m-2", "anyone?").await?;
    ensure!(
        matches!((&posted, &nowhere), (confab_tests::Reply::Error(a), confab_tests::Reply::Error(b)) if a.code == b.code),
        "a stranger's send {posted:?} must look like a send to nothing {nowhere:?}"
    );

    // Bad input through the other gateway: refused, nothing stored.
    let huge = "x".repeat(20_000);
    let oversized = bob_ws.send_reply(group, "b-big", &huge).await?;
    let nameless = bob_ws.send_reply(group, "", "no client_msg_id").await?;
    ensure!(
        matches!(oversized, confab_tests::Reply::Error(_))
            && matches!(nameless, confab_tests::Reply::Error(_)),
        "oversized {oversized:?}, nameless {nameless:?}"
    );

    // Removal through gateway 0; a send through gateway 1 afterwards.
    let mut alice_client = gw0.conversations(&alice).await?;
    alice_client
        .remove_member(RemoveMemberRequest {
            conversation_id: group,
            user_id: dave.id(),
        })
        .await?;
    let (_, removal) = dave_grpc.next_message().await?;
    ensure!(
        removal.notice.is_some(),
        "dave gets the removal notice: {removal:?}"
    );
    let after = bob_ws.send(group, "b-2", "dave is gone").await?;
    dave_grpc
        .expect_quiet(7)
        .await
        .context("nothing reaches dave after his removal")?;
    let refused = dave_grpc.send_reply(group, "d-1", "still here?").await?;
    ensure!(
        matches!(refused, confab_tests::Reply::Error(_)),
        "{refused:?}"
    );
    let seen = gw0.history(&dave, group, 0, 0, 50).await?;
    ensure!(
        seen.messages.first().map(|m| m.id) == Some(removal.id),
        "dave's history ends at his removal: {:?}",
        seen.messages.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    let all = gw1.history(&bob, group, 0, 0, 50).await?;
    let texts: Vec<&str> = all.messages.iter().map(|m| m.text.as_str()).collect();
    ensure!(
        all.messages.first().map(|m| m.id) == Some(after.message_id)
            && !texts
                .iter()
                .any(|t| t.len() > 16_384 || *t == "still here?" || *t == "let me in"),
        "history holds only what was accepted: {texts:?}"
    );
    Ok(())
}

/// A browser on gRPC-web (`Edge.Subscribe` plus one `Edge.Submit` per frame,
/// over HTTP/1.1) on gateway 0 chats with an app on native gRPC on gateway 1:
/// the browser's send is acknowledged by its `Submit` and reaches the app, the
/// reply reaches the browser's subscription, the browser's delivered and read
/// marks reach the app as receipts; a `Submit` for the browser's device sent to
/// the other gateway is refused with FAILED_PRECONDITION and stores nothing,
/// and history on either gateway holds exactly the two messages.
#[tokio::test]
async fn browser_on_grpc_web_chats_across_gateways() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let outcome = browser_across_gateways(&cluster).await;
    cluster.with_logs(outcome)
}

async fn browser_across_gateways(cluster: &Cluster) -> Result<()> {
    use confab_proto::v1::{
        ClientFrame, ReadState, Receipt, SendMessage, SubmitRequest, client_frame,
    };
    use confab_tests::grpc_web::web_edge;

    const BROWSER: &str = "alice-browser";
    let (gw0, gw1) = (cluster.gateway(0), cluster.gateway(1));
    let alice = gw0.register("alice").await?;
    let bob = gw1.register("bob").await?;
    let direct = gw0.open_direct(&alice, &bob).await?;
    let (mut browser, synced) = gw0.grpc_web_synced(&alice, BROWSER, 0).await?;
    ensure!(
        synced.welcome.user_id == alice.id() && synced.welcome.device_id == BROWSER,
        "the browser's welcome: {:?}",
        synced.welcome
    );
    let (mut bob_grpc, _) = gw1.grpc_synced(&bob, "bob-phone", 0).await?;

    // The browser's send: its Submit answers with the ack, the message goes
    // to bob on the other gateway and to the browser's own subscription.
    let hello = browser.send(direct, "web-1", "hi from a browser").await?;
    ensure!(
        !hello.duplicate && hello.conversation_id == direct,
        "the browser's ack: {hello:?}"
    );
    let got = next_chat(&mut bob_grpc).await?;
    ensure!(
        got.id == hello.message_id
            && got.sender_id == alice.id()
            && got.text == "hi from a browser",
        "bob got {got:?}"
    );
    let own = next_chat(&mut browser).await?;
    ensure!(
        own.id == hello.message_id,
        "the browser's own copy: {own:?}"
    );

    // Bob's reply comes on the browser's subscription.
    let reply = bob_grpc.send(direct, "b-1", "hi from an app").await?;
    let got = next_chat(&mut browser).await?;
    ensure!(
        got.id == reply.message_id && got.sender_id == bob.id() && got.text == "hi from an app",
        "the browser got {got:?}"
    );
    let own = next_chat(&mut bob_grpc).await?;
    ensure!(own.id == reply.message_id, "bob's own copy: {own:?}");
    ensure!(
        reply.message_id > hello.message_id,
        "ids follow the order of the log"
    );

    // The browser's marks, each a Submit answered `done`, reach bob as receipts;
    // the read state comes back on the browser's own subscription.
    browser.delivered(direct, reply.message_id).await?;
    let (_, delivered) = bob_grpc.next_receipt().await?;
    let expected = Receipt {
        conversation_id: direct,
        user_id: alice.id(),
        delivered_up_to: reply.message_id,
        read_up_to: 0,
    };
    ensure!(
        delivered == expected,
        "bob's delivered receipt: {delivered:?}"
    );
    browser.mark_read(direct, reply.message_id).await?;
    let (_, read) = bob_grpc.next_receipt().await?;
    let expected = Receipt {
        read_up_to: reply.message_id,
        ..expected
    };
    ensure!(read == expected, "bob's read receipt: {read:?}");
    let (_, state) = browser.next_read_state().await?;
    let expected = ReadState {
        conversation_id: direct,
        read_up_to: reply.message_id,
        unread_count: 0,
    };
    ensure!(state == expected, "the browser's read state: {state:?}");

    // A Submit for the browser's device on the gateway that does not hold its
    // subscription: refused, with a token good on every gateway.
    let mut wrong_gateway = web_edge(gw1, Some(&alice.access_token))?;
    let stray = SubmitRequest {
        device_id: BROWSER.to_owned(),
        frame: Some(ClientFrame {
            r#ref: 99,
            kind: Some(client_frame::Kind::Send(SendMessage {
                conversation_id: direct,
                client_msg_id: "web-stray".to_owned(),
                text: "through the wrong gateway".to_owned(),
            })),
        }),
    };
    match wrong_gateway.submit(stray).await {
        Ok(answer) => {
            anyhow::bail!("gateway 1 answered a submit for gateway 0's browser: {answer:?}")
        }
        Err(status) => ensure!(
            status.code() == tonic::Code::FailedPrecondition,
            "a submit on the wrong gateway: {status:?}"
        ),
    }
    // Nothing of it went anywhere; the browser's subscription goes on.
    bob_grpc
        .expect_quiet(1)
        .await
        .context("nothing reaches bob from the refused submit")?;
    browser
        .expect_quiet(2)
        .await
        .context("the browser's subscription after the refusal")?;

    for (index, gateway) in [(0, gw0), (1, gw1)] {
        for (who, account) in [("alice", &alice), ("bob", &bob)] {
            let history = gateway.history(account, direct, 0, 0, 50).await?;
            let stored: Vec<(i64, i64, &str)> = history
                .messages
                .iter()
                .map(|message| (message.id, message.sender_id, message.text.as_str()))
                .collect();
            let expected = vec![
                (reply.message_id, bob.id(), "hi from an app"),
                (hello.message_id, alice.id(), "hi from a browser"),
            ];
            ensure!(
                stored == expected,
                "{who}'s history on gateway {index}: {stored:?}"
            );
        }
    }
    Ok(())
}
