//! Helpers of this crate's tests against a real nats-server.

use std::time::Duration;

use tokio::time::Instant;

/// Returns a JetStream context on a new connection to `server`.
pub(crate) async fn jetstream(
    server: &confab_common::testkit::NatsServer,
) -> async_nats::jetstream::Context {
    let client = async_nats::connect(server.url())
        .await
        .expect("connect to the test nats-server");
    async_nats::jetstream::new(client)
}

/// Polls `condition` every 20 ms until it holds; fails the test after 10 s.
pub(crate) async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
