//! The harness checks itself where it can without the distributed mode.

use super::*;

/// The load and the checker agree with the embedded server (two handles on one
/// process stand for the two gateways): the harness finds no violation where
/// there is none.
#[tokio::test]
async fn the_load_holds_the_invariants_on_the_embedded_server() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await?;
    let gateways = [
        Server::attach(server.addr())?,
        Server::attach(server.addr())?,
    ];
    let config = LoadConfig {
        messages_per_device: 40,
        name: "embedded".to_owned(),
        ..LoadConfig::default()
    };
    let load = Load::start(&gateways, config).await?;
    let outcome = load.finish(&gateways[0]).await?;
    let report = outcome.check()?;
    println!("embedded: {report}");
    ensure!(report.messages_acknowledged == 20 * 40, "{report}");
    ensure!((report.lost, report.missed) == (0, 0), "{report}");
    Ok(())
}

/// A cluster starts with every role, answers `/healthz` and `/metrics` on each
/// process, and names a fan-out owner.
#[tokio::test]
async fn a_cluster_starts_and_reports_its_fanout_owner() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await?;
    let outcome = async {
        for (role, count) in [
            (Role::Group, 1),
            (Role::Session, 1),
            (Role::Presence, 1),
            (Role::Message, 2),
            (Role::Gateway, 2),
        ] {
            ensure!(cluster.count(role) == count, "{count} {role} processes");
            for index in 0..count {
                let addr = cluster.addr(role, index)?;
                let health = confab_tests::http::get(addr, "/healthz").await?;
                ensure!(health.status == 200, "{role}-{index} /healthz: {health:?}");
                cluster.metrics(role, index).await?;
            }
        }
        cluster.await_fanout_owner(None).await?;
        Ok(())
    }
    .await;
    cluster.with_logs(outcome)
}
