//! The load keeps going through a fault, and the invariants hold after recovery.

use super::*;

/// Partitions of the log (the binary's default).
const LOG_PARTITIONS: f64 = 16.0;

/// How long a killed process stays down, or PostgreSQL unreachable.
const DOWN: Duration = Duration::from_secs(2);

/// Starts a cluster and a load, waits until a quarter of the load is
/// acknowledged, runs `fault`, then lets the load finish and checks the
/// invariants; prints the counts and how long delivery stalled.
async fn through_fault(
    test: &str,
    fault: impl AsyncFnOnce(&mut Cluster) -> Result<()>,
) -> Result<Outcome> {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start().await?;
    let outcome = async {
        let load = Load::start(cluster.gateways(), LoadConfig::default()).await?;
        load.wait_acked(load.total_messages() / 4).await?;
        let mark = load.mark();
        fault(&mut cluster).await.context("injecting the fault")?;
        ensure!(
            load.acked() < load.total_messages(),
            "the load ended before the fault was over: make it longer"
        );
        finish_and_check(test, &cluster, load, Some(mark)).await
    }
    .await;
    cluster.with_logs(outcome)
}

/// A message process dies with SIGKILL mid-load and comes back: the other
/// takes its partitions, the restarted one takes its share back (partitions
/// are handed over under load), and no acknowledged message is lost, every
/// device gets everything once, in order.
#[tokio::test]
async fn sigkill_of_a_message_process() -> Result<()> {
    through_fault("sigkill_of_a_message_process", async |cluster| {
        let owner = cluster.await_fanout_owner(None).await?;
        let victim = (owner + 1) % cluster.count(Role::Message);
        cluster.kill9(Role::Message, victim).await?;
        tokio::time::sleep(DOWN).await;
        cluster.restart(Role::Message, victim).await?;
        let back = cluster
            .await_partitions(victim, |owned| owned > 0.0)
            .await?;
        println!(
            "message-{victim} owned partitions again {} ms after its restart",
            back.as_millis()
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// A gateway dies with SIGKILL mid-load and stays down: its devices reconnect
/// to the other gateway with their cursors and miss nothing.
#[tokio::test]
async fn sigkill_of_a_gateway_clients_resume_on_the_other() -> Result<()> {
    let outcome = through_fault(
        "sigkill_of_a_gateway_clients_resume_on_the_other",
        async |cluster| cluster.kill9(Role::Gateway, 0).await,
    )
    .await?;
    let moved = outcome
        .recording
        .devices
        .iter()
        .filter(|device| {
            let on_killed = device.sessions.iter().position(|s| s.gateway == 0);
            let on_other = device.sessions.iter().rposition(|s| s.gateway == 1);
            matches!((on_killed, on_other), (Some(first), Some(last)) if last > first)
        })
        .count();
    ensure!(
        moved > 0,
        "no device moved from the killed gateway to the other"
    );
    println!("{moved} devices resumed on the other gateway");
    Ok(())
}

/// The message process that owns the fan-out dies with SIGKILL mid-load: the
/// other takes the partitions over within about a lease TTL, and delivery
/// resumes without a loss, a gap or a duplicate.
#[tokio::test]
async fn sigkill_of_the_fanout_owner() -> Result<()> {
    through_fault("sigkill_of_the_fanout_owner", async |cluster| {
        let owner = cluster.await_fanout_owner(None).await?;
        let killed_at = tokio::time::Instant::now();
        cluster.kill9(Role::Message, owner).await?;
        let heir = (owner + 1) % cluster.count(Role::Message);
        cluster
            .await_partitions(heir, |owned| owned >= LOG_PARTITIONS)
            .await?;
        println!(
            "message-{heir} owned every partition {} ms after message-{owner} was killed",
            killed_at.elapsed().as_millis()
        );
        cluster.restart(Role::Message, owner).await
    })
    .await?;
    Ok(())
}

/// nats-server is killed (SIGKILL) and restarted on the same port and store
/// mid-load: every acknowledged message survives, delivery resumes.
#[tokio::test]
async fn nats_server_restart() -> Result<()> {
    through_fault("nats_server_restart", async |cluster| {
        cluster.nats_restart().await;
        Ok(())
    })
    .await?;
    Ok(())
}

/// PostgreSQL is unreachable for a moment mid-load (every connection cut,
/// new ones refused): sends wait or fail and are retried, nothing acknowledged
/// is lost, delivery resumes.
#[tokio::test]
async fn postgres_briefly_unreachable() -> Result<()> {
    through_fault("postgres_briefly_unreachable", async |cluster| {
        cluster.postgres_proxy().cut();
        tokio::time::sleep(DOWN).await;
        cluster.postgres_proxy().restore();
        Ok(())
    })
    .await?;
    Ok(())
}
