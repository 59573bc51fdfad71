//! Presence in the distributed mode: online state in NATS KV, across gateways
//! and across a restart of the presence process.

use super::*;

/// The online window of these tests (ms): short, so that going offline is
/// quick to see.
const WINDOW_MS: &str = "2000";

/// A user connected to one gateway is online for a contact on the other; the
/// presence process dies with SIGKILL and comes back, and the user is still
/// online (the state is in NATS KV, not in the dead process); when the user's
/// connection closes, the contact sees them offline with a last seen, which
/// survives another restart of the presence process; a user whose gateway
/// dies with SIGKILL goes offline within the window.
#[tokio::test]
async fn presence_across_gateways_survives_a_presence_restart() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_with(&["--presence-window-ms", WINDOW_MS]).await?;
    let outcome = presence(&mut cluster).await;
    cluster.with_logs(outcome)
}

async fn presence(cluster: &mut Cluster) -> Result<()> {
    let (gw0, gw1) = (cluster.gateway(0), cluster.gateway(1));
    let alice = gw0.register("alice").await?;
    let bob = gw1.register("bob").await?;
    gw0.open_direct(&alice, &bob).await?;
    let (mut bob_grpc, _) = gw1.grpc_synced(&bob, "bob-phone", 0).await?;
    bob_grpc.heartbeat().await?;
    let online =
        |presence: &[confab_proto::v1::Presence]| presence.first().is_some_and(|p| p.online);
    wait_presence(cluster, &alice, bob.id(), "online", online).await?;

    cluster.kill9(Role::Presence, 0).await?;
    cluster.restart(Role::Presence, 0).await?;
    // Before bob's next heartbeat: the restarted process knows from KV.
    let seen = cluster.gateway(0).get_presence(&alice, &[bob.id()]).await?;
    ensure!(online(&seen), "bob online after the restart: {seen:?}");

    bob_grpc.close().await?;
    let offline = |presence: &[confab_proto::v1::Presence]| {
        presence
            .first()
            .is_some_and(|p| !p.online && p.last_seen_ms > 0)
    };
    wait_presence(
        cluster,
        &alice,
        bob.id(),
        "offline with a last seen",
        offline,
    )
    .await?;
    let before = cluster.gateway(0).get_presence(&alice, &[bob.id()]).await?;
    // The process crashes once bob's last seen is in NATS KV: it is written
    // when the lease of the dead predecessor is found expired, up to a window
    // after bob shows offline.
    await_last_seen_stored(cluster, bob.id()).await?;

    cluster.kill9(Role::Presence, 0).await?;
    cluster.restart(Role::Presence, 0).await?;
    let after = cluster.gateway(1).get_presence(&alice, &[bob.id()]).await?;
    ensure!(
        after == before,
        "last seen after a restart: {after:?}, before: {before:?}"
    );

    // A gateway that dies without a word: its users go offline within the
    // window (their heartbeats stop), with a last seen.
    let carol = cluster.gateway(1).register("carol").await?;
    cluster.gateway(0).open_direct(&alice, &carol).await?;
    let (mut carol_grpc, _) = cluster
        .gateway(1)
        .grpc_synced(&carol, "carol-phone", 0)
        .await?;
    carol_grpc.heartbeat().await?;
    wait_presence(cluster, &alice, carol.id(), "online", online).await?;
    cluster.kill9(Role::Gateway, 1).await?;
    wait_presence(
        cluster,
        &alice,
        carol.id(),
        "offline after her gateway died",
        offline,
    )
    .await?;
    Ok(())
}

/// Waits until `user`'s last seen is in the KV bucket presence-svc keeps it in.
async fn await_last_seen_stored(cluster: &Cluster, user: i64) -> Result<()> {
    let client = async_nats::connect(cluster.nats_url()).await?;
    let js = async_nats::jetstream::new(client);
    let last_seen = js
        .get_key_value("confab_last_seen")
        .await
        .context("last-seen bucket")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if last_seen.get(user.to_string()).await?.is_some() {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "user {user}'s last seen never reached NATS KV"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks gateway 0 for `user`'s presence, as `viewer`, until `wanted` holds.
async fn wait_presence(
    cluster: &Cluster,
    viewer: &confab_tests::Account,
    user: i64,
    what: &str,
    wanted: impl Fn(&[confab_proto::v1::Presence]) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let presence = cluster.gateway(0).get_presence(viewer, &[user]).await;
        if let Ok(presence) = &presence
            && wanted(presence)
        {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "user {user} never {what}: {presence:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
