//! The distributed mode: `confab serve --roles gateway,message,...` runs some of
//! the roles in this process; the others are reached over gRPC at configured
//! addresses. NATS (JetStream, KV, subjects) joins the processes, PostgreSQL holds
//! metadata and messages (DESIGN.md sections 1, 4, 5, 11).
//!
//! Every process leases a Snowflake node id in NATS KV first (two live processes
//! never share one; a process that loses its lease stops). Then, in dependency
//! order: group-svc (PostgreSQL), session-svc (device registry in NATS KV),
//! message-svc (PostgreSQL store behind the JetStream log, `LogFront`),
//! presence-svc, and the gateway, whose live devices receive events on the
//! node's own NATS subject. The roles of this process serve each other in process
//! and serve other processes on `--internal-listen`.

use std::process::ExitCode;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::serve::ListenerExt as _;
use confab_common::bus::LiveBus;
use confab_common::channel::{GrpcChannel, balanced, in_process, remote};
use confab_common::nats_bus::{NatsBus, subscribe_node};
use confab_gateway::{Gateway, Hub};
use confab_group_svc::GroupService;
use confab_message_svc::{LogConfig, LogFront, MessageService};
use confab_presence_svc::PresenceService;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::message::v1::messages_client::MessagesClient;
use confab_proto::message::v1::messages_server::MessagesServer;
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::presence::v1::presences_server::PresencesServer;
use confab_proto::session::v1::sessions_client::SessionsClient;
use confab_proto::session::v1::sessions_server::SessionsServer;
use confab_session_svc::SessionService;
use confab_session_svc::lease::NodeLease;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::{EXIT_CONFIG, Role, ServeArgs};

/// Lifetime of a node-id lease without renewal (renewed every third of it).
const NODE_LEASE_TTL: Duration = Duration::from_secs(10);

/// Runs the roles of `args.cluster.roles` until SIGINT, SIGTERM or the loss of
/// the node-id lease.
pub(super) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cluster = &args.cluster;
    let has = |role: Role| cluster.roles.contains(&role);
    if let Err(problem) = validate(&args) {
        eprintln!("confab: bad configuration: {problem}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let metrics = confab_common::telemetry::init_metrics().ok();
    let nats_url = cluster.nats_url.clone().unwrap_or_default();

    // Events of the edge must not wait for the NATS connection to come back
    // unnoticed: a gateway resyncs every device after a reconnection, since
    // live events published meanwhile are lost (core NATS is at most once).
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let client = {
        let reconnected = Arc::clone(&reconnected);
        async_nats::ConnectOptions::new()
            .name(format!("confab-{}", args.node))
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let reconnected = Arc::clone(&reconnected);
                async move {
                    match event {
                        async_nats::Event::Connected => reconnected.notify_waiters(),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS connection lost; reconnecting");
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(&nats_url)
            .await
            .with_context(|| format!("cannot connect to NATS at {nats_url}"))?
    };
    let js = async_nats::jetstream::new(client.clone());
    let lease = NodeLease::acquire(js.clone(), &args.node, NODE_LEASE_TTL)
        .await
        .context("cannot lease a node id")?;
    let node_id = lease.node_id();
    tracing::info!(node = %args.node, node_id, roles = ?cluster.roles, "distributed mode");

    let pool = if has(Role::Group) || has(Role::Message) {
        let url = cluster.postgres_url.clone().unwrap_or_default();
        // Statements are prepared once per connection; a generic plan made
        // while a table was empty (a fresh deployment, before any ANALYZE) would
        // scan it whole forever after. Custom plans cost a planning per
        // execution and follow the data.
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .context("bad --postgres-url")?
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(cluster.postgres_max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        if cluster.migrate_on_start {
            crate::migrate::run_on(&pool).await?;
        }
        Some(pool)
    } else {
        None
    };

    let timeout = Duration::from_millis(cluster.rpc_timeout_ms);
    // Services of this process, also served on the internal listener.
    let mut internal = tonic::service::Routes::default();
    let mut local_roles = 0;

    let groups = if has(Role::Group) {
        let service = GroupService::open_postgres(
            pool.clone().context("group role without PostgreSQL")?,
            node_id,
            super::group_limits(&args),
        )
        .await
        .context("cannot open the metadata store")?;
        let server = GroupsServer::new(service);
        internal = internal.add_service(server.clone());
        local_roles += 1;
        GroupsClient::new(in_process(server))
    } else {
        GroupsClient::new(remote_channel(cluster.group_addr.as_deref(), timeout)?)
    };

    let sessions = if has(Role::Session) {
        let service = SessionService::with_nats(js.clone(), NODE_LEASE_TTL)
            .await
            .context("cannot open the session registry")?;
        let server = SessionsServer::new(service);
        internal = internal.add_service(server.clone());
        local_roles += 1;
        SessionsClient::new(in_process(server))
    } else {
        SessionsClient::new(remote_channel(cluster.session_addr.as_deref(), timeout)?)
    };

    let bus: Arc<dyn LiveBus> = NatsBus::new(client.clone(), sessions.clone());

    let mut message_parts = None;
    let messages = if has(Role::Message) {
        let config = confab_message_svc::MessageConfig {
            node_id,
            max_text_bytes: args.max_text_bytes,
            ..confab_message_svc::MessageConfig::default()
        };
        let service = MessageService::open_postgres(
            config,
            pool.clone().context("message role without PostgreSQL")?,
            groups.clone(),
            Arc::clone(&bus),
        )
        .await
        .context("cannot open the message store")?;
        let front = LogFront::start(
            service.clone(),
            client.clone(),
            node_id,
            &args.node,
            log_config(&args),
        )
        .await?;
        let server = MessagesServer::new(front.clone());
        internal = internal.add_service(server.clone());
        local_roles += 1;
        message_parts = Some((service, front));
        MessagesClient::new(in_process(server))
    } else {
        MessagesClient::new(balanced_channel(&cluster.message_addr, timeout)?)
    };

    let mut presence_service = None;
    let presence = if has(Role::Presence) {
        // Online state, last seen and privacy in NATS KV: the online keys
        // expire with the window when this process dies without a word.
        let service = PresenceService::open_nats(
            super::presence_config(&args),
            js.clone(),
            groups.clone(),
            bus.clone(),
        )
        .await
        .context("cannot open the presence buckets")?;
        let server = PresencesServer::new(service.clone());
        internal = internal.add_service(server.clone());
        local_roles += 1;
        presence_service = Some(service);
        PresencesClient::new(in_process(server))
    } else {
        PresencesClient::new(remote_channel(cluster.presence_addr.as_deref(), timeout)?)
    };

    let stop = CancellationToken::new();
    let mut internal_server = None;
    if local_roles > 0 {
        let addr = cluster
            .internal_listen
            .context("--internal-listen is required for roles other than gateway")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        internal_server = Some(tokio::spawn(serve_internal(
            listener,
            internal,
            metrics.clone(),
            stop.clone(),
        )));
    }

    // Stops everything on a signal, or when the node id is no longer ours.
    let shutdown = {
        let stop = stop.clone();
        let mut lost = lease.lost();
        async move {
            tokio::select! {
                () = super::shutdown_signal() => {}
                _ = lost.wait_for(|lost| *lost) => {
                    tracing::error!("node-id lease lost; stopping");
                }
            }
            stop.cancel();
        }
    };

    let gateway_task = if has(Role::Gateway) {
        let tokens = super::token_service(&args)?;
        let hub = Arc::new(Hub::new());
        // Logouts reach the other gateways' connections through the bus.
        hub.set_cluster_bus(Arc::clone(&bus));
        let local: Arc<dyn LiveBus> = hub.clone();
        let _subscription = subscribe_node(client.clone(), &args.node, local)
            .await
            .context("cannot subscribe to the node's subject")?;
        {
            let hub = Arc::clone(&hub);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = reconnected.notified() => hub.resync_all(),
                    }
                }
            });
        }
        let gateway = Gateway {
            config: super::gateway_config(&args),
            tokens,
            groups,
            external_users: Arc::default(),
            messages,
            sessions,
            presence,
            hub,
            metrics,
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        println!("confab listening on {local}");
        let stop = stop.clone();
        Some(tokio::spawn(async move {
            confab_gateway::serve(listener, gateway, async move { stop.cancelled().await }).await
        }))
    } else {
        None
    };

    println!("confab ready");
    tracing::info!(node = %args.node, node_id, "confab ready");
    shutdown.await;

    if let Some(gateway) = gateway_task {
        match gateway.await {
            Ok(Err(error)) => tracing::warn!(error = %error, "gateway stopped with an error"),
            Err(error) => tracing::warn!(error = %error, "gateway task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Some((service, front)) = message_parts {
        // Partitions go back once their in-flight records are committed.
        front.shutdown().await;
        service.shutdown().await;
    }
    if let Some(service) = presence_service {
        service.shutdown().await;
    }
    if let Some(server) = internal_server {
        let _ = server.await;
    }
    lease.release().await;
    tracing::info!("confab stopped");
    Ok(ExitCode::SUCCESS)
}

/// Checks what only the distributed mode needs.
fn validate(args: &ServeArgs) -> Result<(), String> {
    let cluster = &args.cluster;
    let has = |role: Role| cluster.roles.contains(&role);
    if cluster.roles.contains(&Role::All) {
        return Err("--roles all cannot be combined with other roles".into());
    }
    if has(Role::Notify) {
        return Err("the notify role is not built yet".into());
    }
    if cluster.nats_url.is_none() {
        return Err("--nats-url is required in the distributed mode".into());
    }
    if (has(Role::Group) || has(Role::Message)) && cluster.postgres_url.is_none() {
        return Err("--postgres-url is required for the group and message roles".into());
    }
    if !args
        .node
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || args.node.is_empty()
    {
        return Err("--node must be letters, digits, '-' or '_'".into());
    }
    let needs = |role: Role, addr: bool, flag: &str| -> Result<(), String> {
        if !has(role) && !addr {
            return Err(format!(
                "{flag} is required when this process has no {role:?} role"
            ));
        }
        Ok(())
    };
    let others = cluster.roles.iter().any(|r| *r != Role::Group);
    if others {
        needs(Role::Group, cluster.group_addr.is_some(), "--group-addr")?;
    }
    if has(Role::Gateway) || has(Role::Message) || has(Role::Presence) {
        needs(
            Role::Session,
            cluster.session_addr.is_some(),
            "--session-addr",
        )?;
    }
    if has(Role::Gateway) {
        needs(
            Role::Message,
            !cluster.message_addr.is_empty(),
            "--message-addr",
        )?;
        needs(
            Role::Presence,
            cluster.presence_addr.is_some(),
            "--presence-addr",
        )?;
        if args.jwt_secret.is_none() {
            return Err("--jwt-secret is required for gateways in the distributed mode (every gateway must share it)".into());
        }
    }
    if cluster.log_partitions == 0 {
        return Err("--log-partitions must be positive".into());
    }
    Ok(())
}

fn log_config(args: &ServeArgs) -> LogConfig {
    let cluster = &args.cluster;
    LogConfig {
        partitions: cluster.log_partitions,
        replicas: cluster.log_replicas,
        max_age: Duration::from_secs(cluster.log_max_age_secs),
        duplicate_window: Duration::from_secs(cluster.log_duplicate_window_secs),
        ack_wait: Duration::from_secs(cluster.log_ack_wait_secs),
        max_ack_pending: cluster.log_max_ack_pending,
        lease_ttl: Duration::from_millis(cluster.log_lease_ttl_ms),
        answer_timeout: Duration::from_millis(cluster.rpc_timeout_ms),
    }
}

/// A lazily connecting channel to one remote role: it reconnects by itself, so
/// the processes may start in any order.
fn remote_channel(addr: Option<&str>, timeout: Duration) -> anyhow::Result<GrpcChannel> {
    let Some(addr) = addr else {
        bail!("no address for a remote role");
    };
    Ok(remote(endpoint(addr, timeout)?.connect_lazy()))
}

/// A channel spreading calls over several processes of one role.
fn balanced_channel(addrs: &[String], timeout: Duration) -> anyhow::Result<GrpcChannel> {
    let endpoints = addrs
        .iter()
        .map(|addr| endpoint(addr, timeout))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(balanced(endpoints, timeout))
}

fn endpoint(addr: &str, timeout: Duration) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::from_shared(addr.to_owned())
        .with_context(|| format!("bad role address {addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Serves the roles of this process to the others, with `/healthz` and
/// `/metrics`, until `stop`.
async fn serve_internal(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) {
    let http = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { metrics.map(|m| m.render()).unwrap_or_default() }
            }),
        );
    let router = routes.into_axum_router().merge(http);
    tracing::info!(addr = ?listener.local_addr().ok(), "internal listener");
    // Answers are small frames: without TCP_NODELAY the last one of a call
    // waits for the peer's delayed ACK (~40 ms per internal call).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::warn!(error = %error, "internal listener failed");
    }
}
