//! The `confab client` command-line client.

use super::*;

/// Two `confab client chat` processes exchange messages; one quits, and what was
/// sent meanwhile shows when it chats again; `history` and `conversations` print it.
#[tokio::test]
async fn cli_chat_history_and_catch_up() -> Result<()> {
    let server = Server::start().await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let alice = CliUser::new(&server, dirs.0.path());
    let bob = CliUser::new(&server, dirs.1.path());
    alice
        .run_ok(&["register", "alice", "--password", "alice-password"])
        .await?;
    let finished = bob.run(&["register", "bob"], "bob-password\n").await?;
    assert!(
        finished.status.success(),
        "password from stdin: {finished:?}"
    );

    let mut bob_chat = bob.chat("alice")?;
    let mut alice_chat = alice.chat("bob")?;
    alice_chat.say("hello bob").await?;
    alice_chat.expect_line("✓").await?;
    bob_chat.expect_line("alice: hello bob").await?;
    bob_chat.say("hi alice").await?;
    alice_chat.expect_line("bob: hi alice").await?;
    bob_chat.expect_line("✓").await?;
    bob_chat.quit().await?;

    alice_chat.say("are you there?").await?;
    alice_chat.expect_line("✓").await?;
    alice_chat.say("second").await?;
    alice_chat.expect_line("✓").await?;
    alice_chat.quit().await?;

    let mut bob_chat = bob.chat("alice")?;
    bob_chat.expect_line("alice: are you there?").await?;
    bob_chat.expect_line("alice: second").await?;
    let seen = bob_chat.seen().join("\n");
    assert!(
        !seen.contains("hello bob"),
        "the saved cursor skips what was shown: {seen}"
    );
    assert!(
        seen.contains(" alice: are you there?") && seen.contains("] "),
        "format [HH:MM:SS] name: text: {seen}"
    );
    bob_chat.say("back").await?;
    bob_chat.expect_line("✓").await?;
    bob_chat.quit().await?;

    let history = bob.run_ok(&["history", "alice"]).await?;
    let order = [
        "alice: hello bob",
        "bob: hi alice",
        "alice: are you there?",
        "alice: second",
        "bob: back",
    ];
    let positions: Vec<Option<usize>> = order.iter().map(|text| history.find(text)).collect();
    assert!(
        positions.iter().all(Option::is_some),
        "history lacks messages: {history}"
    );
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "history oldest to newest: {history}"
    );
    let page = bob.run_ok(&["history", "alice", "--limit", "2"]).await?;
    assert!(
        page.contains("bob: back") && !page.contains("hello bob"),
        "{page}"
    );

    let listed = alice.run_ok(&["conversations"]).await?;
    assert!(
        listed.contains("bob") && listed.contains("back"),
        "conversations: {listed}"
    );

    let refused = alice
        .run(&["login", "alice", "--password", "wrong"], "")
        .await?;
    assert!(
        !refused.status.success(),
        "wrong password accepted: {refused:?}"
    );
    assert_eq!(
        refused.stderr.trim().lines().count(),
        1,
        "one clear line: {:?}",
        refused.stderr
    );
    Ok(())
}

/// The CLI swaps an expired access token for a new pair once (unary calls and
/// the stream alike) and stores the new tokens.
#[tokio::test]
async fn cli_refreshes_an_expired_token() -> Result<()> {
    const SECRET: &str = "e2e-cli-secret-e2e-cli-secret-0123456789";
    let server = Server::start_with(&["--jwt-secret", SECRET]).await?;
    server.register("bob").await?;
    let dir = tempfile::tempdir()?;
    let alice = CliUser::new(&server, dir.path());
    alice
        .run_ok(&["register", "alice", "--password", "alice-password"])
        .await?;

    // The state file is the client's own format (confab/src/client/state.rs).
    let state_path = dir.path().join("state.json");
    let expire_stored_token = || -> Result<String> {
        let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&state_path)?)?;
        let token = state["login"]["access_token"]
            .as_str()
            .context("no access token")?;
        let expired = resign(token, SECRET, -3600)?;
        state["login"]["access_token"] = json!(expired);
        // Claims a long life, so that only the server's refusal can trigger the refresh.
        state["login"]["access_expires_at_ms"] = json!(i64::MAX / 2);
        std::fs::write(&state_path, serde_json::to_string(&state)?)?;
        Ok(expired)
    };

    let expired = expire_stored_token()?;
    alice
        .run_ok(&["conversations"])
        .await
        .context("unary call after expiry")?;
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&state_path)?)?;
    assert_ne!(
        stored["login"]["access_token"].as_str(),
        Some(expired.as_str()),
        "the new token is stored"
    );

    expire_stored_token()?;
    let mut chat = alice.chat("bob")?;
    chat.say("still me").await?;
    chat.expect_line("✓").await.context("stream after expiry")?;
    chat.quit().await?;
    Ok(())
}

/// Three `confab client` users in a group: `group create`, `chat --conversation`
/// with names, notices and receipts (`✓✓ ... read by`), `group members`,
/// `group info` ("delivered to 2 of 2, read by 2"), unread counts in
/// `conversations`, `group remove` and `group leave` seen as notices.
#[tokio::test]
async fn cli_group_chat() -> Result<()> {
    let server = Server::start().await?;
    let dirs = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let alice = CliUser::new(&server, dirs.0.path());
    let bob = CliUser::new(&server, dirs.1.path());
    let carol = CliUser::new(&server, dirs.2.path());
    for (user, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        user.run_ok(&["register", name, "--password", "a-password"])
            .await?;
    }
    let created = alice
        .run_ok(&["group", "create", "friends", "--members", "bob,carol"])
        .await?;
    let id: i64 = created
        .split('#')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("no #id in {created:?}"))?;
    assert!(created.contains("3 members"), "{created}");

    let mut bob_chat = bob.chat_in(id)?;
    bob_chat
        .expect_line("alice created the conversation")
        .await?;
    let mut carol_chat = carol.chat_in(id)?;
    carol_chat
        .expect_line("alice created the conversation")
        .await?;
    let mut alice_chat = alice.chat_in(id)?;
    alice_chat.say("hello friends").await?;
    let sent = alice_chat.expect_line("✓ sent #").await?;
    let message_id = sent.trim().trim_start_matches("✓ sent #").to_owned();
    bob_chat.expect_line("alice: hello friends").await?;
    carol_chat.expect_line("alice: hello friends").await?;
    // Bob's and carol's receipts come in either order.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let line = alice_chat
            .expect_line(&format!("✓✓ #{message_id} read by "))
            .await?;
        readers.push(line.rsplit(' ').next().unwrap_or_default().to_owned());
    }
    readers.sort();
    assert_eq!(readers, ["bob", "carol"], "{:#?}", alice_chat.seen());
    let info = alice.run_ok(&["group", "info", &id.to_string()]).await?;
    assert!(
        info.contains("friends") && info.contains("delivered to 2 of 2, read by 2"),
        "{info}"
    );

    carol_chat.say("hi everyone").await?;
    alice_chat.expect_line("carol: hi everyone").await?;
    bob_chat.expect_line("carol: hi everyone").await?;
    let members = bob.run_ok(&["group", "members", &id.to_string()]).await?;
    assert!(
        members.contains("alice (owner)") && members.contains("bob") && members.contains("carol"),
        "{members}"
    );

    bob_chat.quit().await?;
    alice_chat.say("where is bob?").await?;
    carol_chat.expect_line("alice: where is bob?").await?;
    let listed = bob.run_ok(&["conversations"]).await?;
    assert!(
        listed.contains("group friends") && listed.contains("1 unread"),
        "conversations: {listed}"
    );

    alice
        .run_ok(&["group", "remove", &id.to_string(), "carol"])
        .await?;
    carol_chat.expect_line("alice removed carol").await?;
    alice_chat.expect_line("alice removed carol").await?;
    bob.run_ok(&["group", "leave", &id.to_string()]).await?;
    alice_chat.expect_line("bob left").await?;
    let refused = carol
        .run(&["group", "members", &id.to_string()], "")
        .await?;
    assert!(
        !refused.status.success() && refused.stderr.contains("no such conversation"),
        "{refused:?}"
    );
    carol_chat.quit().await?;
    alice_chat.quit().await?;
    Ok(())
}

/// `presence` prints online / last seen, `privacy` sets and shows who may see
/// the last seen, and `chat` prints the peer's presence changes and who is typing.
#[tokio::test]
async fn cli_presence_privacy_and_typing() -> Result<()> {
    let server = Server::start().await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let alice = CliUser::new(&server, dirs.0.path());
    let bob = CliUser::new(&server, dirs.1.path());
    alice
        .run_ok(&["register", "alice", "--password", "alice-password"])
        .await?;
    bob.run_ok(&["register", "bob", "--password", "bob-password"])
        .await?;
    let bob_account = server.login("bob", "bob-password").await?;

    let shown = bob.run_ok(&["privacy"]).await?;
    assert_eq!(shown.trim(), "last seen visible to: contacts", "{shown}");
    let mut alice_chat = alice.chat("bob")?;
    alice_chat.expect_line("— bob is offline").await?;
    let bob_chat = bob.chat("alice")?;
    alice_chat.expect_line("— bob is online").await?;
    let listed = alice.run_ok(&["presence", "bob"]).await?;
    assert_eq!(listed.trim(), "bob: online", "{listed}");

    let (mut bob_conn, _) = server.grpc_synced(&bob_account, "typer", 0).await?;
    let direct = server
        .open_direct(
            &bob_account,
            &server.login("alice", "alice-password").await?,
        )
        .await?;
    bob_conn.typing(direct, true).await?;
    alice_chat.expect_line("bob is typing…").await?;
    bob_conn.typing(direct, false).await?;
    bob_conn.close().await?;

    bob_chat.quit().await?;
    let line = alice_chat.expect_line("— bob was last seen ").await?;
    let time = line.trim_start_matches("— bob was last seen ");
    assert!(
        time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':',
        "HH:MM:SS: {line:?}"
    );
    let listed = alice.run_ok(&["presence", "bob"]).await?;
    assert_eq!(listed.trim(), format!("bob: last seen {time}"), "{listed}");

    let set = bob.run_ok(&["privacy", "nobody"]).await?;
    assert_eq!(set.trim(), "last seen visible to: nobody", "{set}");
    let shown = bob.run_ok(&["privacy"]).await?;
    assert_eq!(shown.trim(), "last seen visible to: nobody", "{shown}");
    let listed = alice.run_ok(&["presence", "bob"]).await?;
    assert_eq!(listed.trim(), "bob: offline", "last seen hidden: {listed}");
    alice_chat.quit().await?;
    Ok(())
}
