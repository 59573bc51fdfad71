//! `confab serve`: composes the roles into one process.
//!
//! The embedded mode (`--roles all`, the default) runs every role here: group-svc
//! and message-svc on SQLite files in the data directory, session-svc in memory,
//! and the gateway on the one listening port. The services call each other
//! through their generated gRPC clients over in-process channels. Any other
//! `--roles` is the distributed mode ([`distributed`]).

mod distributed;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use confab_common::auth::{ExternalIssuer, TokenService};
use confab_common::bus::LiveBus;
use confab_common::channel::in_process;
use confab_gateway::{Gateway, GatewayConfig, Hub};
use confab_group_svc::{GroupLimits, GroupService};
use confab_message_svc::{MessageConfig, MessageService};
use confab_presence_svc::{PresenceConfig, PresenceService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::message::v1::messages_client::MessagesClient;
use confab_proto::message::v1::messages_server::MessagesServer;
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::presence::v1::presences_server::PresencesServer;
use confab_proto::session::v1::AcquireNodeIdRequest;
use confab_proto::session::v1::sessions_client::SessionsClient;
use confab_proto::session::v1::sessions_server::SessionsServer;
use confab_session_svc::SessionService;

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// A role a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Role {
    /// Every role in one process, on SQLite: the embedded mode.
    All,
    /// The edge: WebSocket, gRPC, live connections.
    Gateway,
    /// The send path, the log's partitions, history, sync, receipts.
    Message,
    /// The device registry (NATS KV).
    Session,
    /// Users, conversations, membership (PostgreSQL).
    Group,
    /// Heartbeats, online and last seen, typing.
    Presence,
    /// Push notifications (not built yet).
    Notify,
}

/// Arguments of `confab serve`; every one also reads a `CONFAB_*` variable.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address of the one listener: gRPC, WebSocket (/v1/ws), /metrics, /healthz.
    #[arg(long, env = "CONFAB_LISTEN", default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// Directory of the SQLite files and the token secret; created if missing.
    #[arg(long, env = "CONFAB_DATA_DIR", default_value = "confab-data")]
    data_dir: PathBuf,
    /// Name of this gateway node in the device registry.
    #[arg(long, env = "CONFAB_NODE", default_value = "local")]
    node: String,
    /// Largest message text, in bytes.
    #[arg(long, env = "CONFAB_MAX_TEXT_BYTES", default_value_t = 16 * 1024)]
    max_text_bytes: usize,
    /// Largest client frame (WebSocket message, gRPC message), in bytes.
    #[arg(long, env = "CONFAB_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
    /// Most members of a group, the owner included.
    #[arg(long, env = "CONFAB_MAX_GROUP_SIZE", default_value_t = 1024)]
    max_group_size: u32,
    /// Most subscribers of a channel, the owner included.
    #[arg(long, env = "CONFAB_MAX_CHANNEL_SIZE", default_value_t = 1_000_000)]
    max_channel_size: u32,
    /// A user is online while a device heartbeated within this window (ms).
    #[arg(long, env = "CONFAB_PRESENCE_WINDOW_MS", default_value_t = 15_000)]
    presence_window_ms: u64,
    /// A "typing" that is not stopped expires after this long (ms).
    #[arg(long, env = "CONFAB_TYPING_TTL_MS", default_value_t = 6_000)]
    typing_ttl_ms: u64,
    /// Typing events accepted per user per minute.
    #[arg(long, env = "CONFAB_TYPING_PER_MINUTE", default_value_t = 60)]
    typing_per_minute: u32,
    /// Lifetime of access tokens, in seconds.
    #[arg(long, env = "CONFAB_ACCESS_TTL_SECS", default_value_t = 15 * 60)]
    access_ttl_secs: u64,
    /// Lifetime of refresh tokens, in seconds.
    #[arg(long, env = "CONFAB_REFRESH_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    refresh_ttl_secs: u64,
    /// How long past its expiry a token is still accepted, in seconds (clock
    /// skew between the issuer and this server).
    #[arg(long, env = "CONFAB_TOKEN_LEEWAY_SECS", default_value_t = 30)]
    token_leeway_secs: u64,
    /// Secret that signs Confab's tokens; generated and kept in the data
    /// directory (`jwt-secret`) when not given.
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Also accept HS256 tokens of an external identity provider signed with this
    /// secret; their `sub` names the user.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_SECRET", hide_env_values = true)]
    external_jwt_secret: Option<String>,
    /// Also accept tokens signed by the holder of this PEM public key (RSA: RS256,
    /// EC P-256: ES256, Ed25519: EdDSA).
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_PUBLIC_KEY")]
    external_jwt_public_key: Option<PathBuf>,
    /// Required `iss` of external tokens.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_ISSUER")]
    external_jwt_issuer: Option<String>,
    /// Required `aud` of external tokens.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_AUDIENCE")]
    external_jwt_audience: Option<String>,
    /// How long shutdown waits for connections and calls to finish, in seconds.
    #[arg(long, env = "CONFAB_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Abuse limits; boxed, as the largest block, to keep the command enum small.
    #[command(flatten)]
    limits: Box<LimitArgs>,
    /// Roles and the distributed mode's connections; boxed like `limits`.
    #[command(flatten)]
    cluster: Box<ClusterArgs>,
}

/// Which roles run here and, in the distributed mode, how they reach NATS,
/// PostgreSQL and each other (issue 5).
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    /// Roles of this process, comma-separated: gateway, message, session, group,
    /// presence; `all` (the default) is the embedded mode.
    #[arg(
        long,
        env = "CONFAB_ROLES",
        default_value = "all",
        value_delimiter = ','
    )]
    roles: Vec<Role>,
    /// NATS server (JetStream enabled) of the distributed mode.
    #[arg(long, env = "CONFAB_NATS_URL")]
    nats_url: Option<String>,
    /// PostgreSQL database of the group and message roles.
    #[arg(long, env = "CONFAB_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// Most PostgreSQL connections of this process.
    #[arg(long, env = "CONFAB_POSTGRES_MAX_CONNECTIONS", default_value_t = 10)]
    postgres_max_connections: u32,
    /// Run `confab migrate` at start.
    #[arg(long, env = "CONFAB_MIGRATE_ON_START")]
    migrate_on_start: bool,
    /// Where the non-gateway roles of this process serve the others (gRPC,
    /// /healthz, /metrics).
    #[arg(long, env = "CONFAB_INTERNAL_LISTEN")]
    internal_listen: Option<SocketAddr>,
    /// group-svc, when not in this process (http://host:port).
    #[arg(long, env = "CONFAB_GROUP_ADDR")]
    group_addr: Option<String>,
    /// session-svc, when not in this process.
    #[arg(long, env = "CONFAB_SESSION_ADDR")]
    session_addr: Option<String>,
    /// presence-svc, when not in this process.
    #[arg(long, env = "CONFAB_PRESENCE_ADDR")]
    presence_addr: Option<String>,
    /// The message processes, when not in this process (comma-separated; calls
    /// are spread over them).
    #[arg(long, env = "CONFAB_MESSAGE_ADDR", value_delimiter = ',')]
    message_addr: Vec<String>,
    /// Deadline of a call to another role, in ms.
    #[arg(long, env = "CONFAB_RPC_TIMEOUT_MS", default_value_t = 10_000)]
    rpc_timeout_ms: u64,
    /// Partitions of the message log: the unit of ownership among message
    /// processes. Fixed for the life of a deployment.
    #[arg(long, env = "CONFAB_LOG_PARTITIONS", default_value_t = 16)]
    log_partitions: u32,
    /// JetStream replicas of the log (3 in a NATS cluster: an acknowledged record
    /// then survives the loss of a machine).
    #[arg(long, env = "CONFAB_LOG_REPLICAS", default_value_t = 1)]
    log_replicas: usize,
    /// How long records stay in the log, in seconds (history is in PostgreSQL).
    #[arg(long, env = "CONFAB_LOG_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    log_max_age_secs: u64,
    /// JetStream's duplicate window for Nats-Msg-Id, in seconds; Confab's own
    /// dedup by client_msg_id holds forever.
    #[arg(long, env = "CONFAB_LOG_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    log_duplicate_window_secs: u64,
    /// Seconds a record may stay unacknowledged before JetStream redelivers it.
    #[arg(long, env = "CONFAB_LOG_ACK_WAIT_SECS", default_value_t = 5)]
    log_ack_wait_secs: u64,
    /// Most unacknowledged records per log partition.
    #[arg(long, env = "CONFAB_LOG_MAX_ACK_PENDING", default_value_t = 10_000)]
    log_max_ack_pending: i64,
    /// Lifetime of a log-partition lease without renewal, in ms: how long the
    /// partitions of a dead message process wait for a new owner.
    #[arg(long, env = "CONFAB_LOG_LEASE_TTL_MS", default_value_t = 4_000)]
    log_lease_ttl_ms: u64,
}

/// Abuse limits of the edge (issue 7): rates, connections, origins, idle time.
#[derive(Debug, clap::Args)]
pub(crate) struct LimitArgs {
    /// Messages one user may send at once, over all their devices.
    #[arg(long, env = "CONFAB_SEND_BURST", default_value_t = 30)]
    send_burst: u32,
    /// Messages one user may send per second, sustained.
    #[arg(long, env = "CONFAB_SEND_PER_SECOND", default_value_t = 10)]
    send_per_second: u32,
    /// Live connections (WebSocket, gRPC stream) one user may hold.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    max_connections_per_user: usize,
    /// Live connections one remote IP address may hold.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    max_connections_per_ip: usize,
    /// Failed logins per username, and per address, within a minute before
    /// further attempts are refused until the minute has passed.
    #[arg(long, env = "CONFAB_LOGIN_FAILURES_PER_MINUTE", default_value_t = 10)]
    login_failures_per_minute: u32,
    /// Groups and channels one user may create per minute.
    #[arg(long, env = "CONFAB_CREATIONS_PER_MINUTE", default_value_t = 30)]
    creations_per_minute: u32,
    /// Users one user may add to conversations per minute.
    #[arg(long, env = "CONFAB_INVITATIONS_PER_MINUTE", default_value_t = 300)]
    invitations_per_minute: u32,
    /// Browser origins allowed to open a WebSocket or call through gRPC-web,
    /// comma-separated (`*`: any); requests without an Origin header (native
    /// clients) always pass. `--ws-allowed-origins` is its former name.
    #[arg(
        long,
        alias = "ws-allowed-origins",
        env = "CONFAB_ALLOWED_ORIGINS",
        default_value = "*",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// A WebSocket silent (no frame, no pong) this long is closed; the server
    /// pings after half of it. In seconds.
    #[arg(long, env = "CONFAB_WS_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    ws_idle_timeout_secs: u64,
    /// A new connection that has not sent its request headers (HTTP/1.1) or
    /// its preface and settings (h2c) after this long is closed. In seconds.
    #[arg(
        long,
        env = "CONFAB_HEADER_READ_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    header_read_timeout_secs: u64,
}

/// Runs the server until SIGINT or SIGTERM.
pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    confab_common::telemetry::init_tracing();
    if let Err(problem) = validate(&args) {
        eprintln!("confab: bad configuration: {problem}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if args.cluster.roles != [Role::All] {
        return distributed::run(args).await;
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let tokens = match token_service(&args) {
        Ok(tokens) => tokens,
        Err(problem) => {
            eprintln!("confab: bad configuration: {problem:#}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let metrics = confab_common::telemetry::init_metrics().ok();

    let sessions = SessionsClient::new(in_process(SessionsServer::new(SessionService::new())));
    let node_id = sessions
        .clone()
        .acquire_node_id(AcquireNodeIdRequest {
            holder: args.node.clone(),
        })
        .await
        .context("cannot lease a node id")?
        .into_inner()
        .node_id;
    let node_id = u16::try_from(node_id).context("node id out of range")?;

    let group_service =
        GroupService::open_sqlite(&args.data_dir.join("meta.db"), node_id, group_limits(&args))
            .await
            .context("cannot open the metadata store")?;
    let groups = GroupsClient::new(in_process(GroupsServer::new(group_service)));

    let hub = Arc::new(Hub::new());
    let message_config = MessageConfig {
        db_path: args.data_dir.join("messages.db"),
        node_id,
        max_text_bytes: args.max_text_bytes,
        ..MessageConfig::default()
    };
    let bus: Arc<dyn LiveBus> = hub.clone();
    let message_service = MessageService::open(message_config, groups.clone(), bus)
        .await
        .context("cannot open the message store")?;
    let messages = MessagesClient::new(in_process(MessagesServer::new(message_service.clone())));

    let presence_service =
        PresenceService::open(presence_config(&args), groups.clone(), hub.clone())
            .await
            .context("cannot open the presence store")?;
    let presence = PresencesClient::new(in_process(PresencesServer::new(presence_service.clone())));

    let gateway = Gateway {
        config: gateway_config(&args),
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
    // Scripts and tests read the bound address (port 0 picks a free one) here.
    println!("confab listening on {local}");
    tracing::info!(%local, data_dir = %args.data_dir.display(), "confab serving");

    confab_gateway::serve(listener, gateway, shutdown_signal()).await?;
    // The edge is closed: commit and acknowledge what is queued, keep everyone's
    // last seen, then stop.
    message_service.shutdown().await;
    presence_service.shutdown().await;
    tracing::info!("confab stopped");
    Ok(ExitCode::SUCCESS)
}

/// Size limits of groups and channels.
fn group_limits(args: &ServeArgs) -> GroupLimits {
    GroupLimits {
        max_group_size: args.max_group_size,
        max_channel_size: args.max_channel_size,
    }
}

/// presence-svc's settings; last seen is kept in the data directory.
fn presence_config(args: &ServeArgs) -> PresenceConfig {
    PresenceConfig {
        db_path: args.data_dir.join("presence.db"),
        window: Duration::from_millis(args.presence_window_ms),
        typing_ttl: Duration::from_millis(args.typing_ttl_ms),
        typing_per_minute: args.typing_per_minute,
    }
}

/// The edge's settings and limits.
fn gateway_config(args: &ServeArgs) -> GatewayConfig {
    GatewayConfig {
        node: args.node.clone(),
        max_frame_bytes: args.max_frame_bytes,
        grace: Duration::from_secs(args.shutdown_grace_secs),
        send_burst: args.limits.send_burst,
        send_per_second: args.limits.send_per_second,
        max_connections_per_user: args.limits.max_connections_per_user,
        max_connections_per_ip: args.limits.max_connections_per_ip,
        login_failures_per_minute: args.limits.login_failures_per_minute,
        creations_per_minute: args.limits.creations_per_minute,
        invitations_per_minute: args.limits.invitations_per_minute,
        allowed_origins: args.limits.allowed_origins.clone(),
        ws_idle_timeout: Duration::from_secs(args.limits.ws_idle_timeout_secs),
        header_read_timeout: Duration::from_secs(args.limits.header_read_timeout_secs),
        ..GatewayConfig::default()
    }
}

fn validate(args: &ServeArgs) -> Result<(), String> {
    if args.max_text_bytes == 0 {
        return Err("--max-text-bytes must be positive".into());
    }
    if args.max_frame_bytes < args.max_text_bytes + 1024 {
        return Err(format!(
            "--max-frame-bytes ({}) must exceed --max-text-bytes ({}) by at least 1024",
            args.max_frame_bytes, args.max_text_bytes
        ));
    }
    if args.max_group_size < 2 || args.max_channel_size < 2 {
        return Err("--max-group-size and --max-channel-size must be at least 2".into());
    }
    if args.presence_window_ms < 100 || args.typing_ttl_ms < 100 || args.typing_per_minute == 0 {
        return Err(
            "presence window and typing ttl must be at least 100 ms, the typing rate positive"
                .into(),
        );
    }
    if args.access_ttl_secs == 0 || args.refresh_ttl_secs < args.access_ttl_secs {
        return Err("token lifetimes must be positive, refresh at least as long as access".into());
    }
    if args.external_jwt_secret.is_some() && args.external_jwt_public_key.is_some() {
        return Err("give one of --external-jwt-secret and --external-jwt-public-key".into());
    }
    if args.limits.send_burst == 0 || args.limits.send_per_second == 0 {
        return Err("--send-burst and --send-per-second must be positive".into());
    }
    if args.limits.max_connections_per_user == 0 || args.limits.max_connections_per_ip == 0 {
        return Err(
            "--max-connections-per-user and --max-connections-per-ip must be positive".into(),
        );
    }
    if args.limits.login_failures_per_minute == 0
        || args.limits.creations_per_minute == 0
        || args.limits.invitations_per_minute == 0
    {
        return Err("login failures, creations and invitations per minute must be positive".into());
    }
    if args
        .limits
        .allowed_origins
        .iter()
        .any(|o| o.trim().is_empty())
    {
        return Err("--allowed-origins has an empty entry".into());
    }
    if args.limits.ws_idle_timeout_secs < 2 {
        return Err("--ws-idle-timeout-secs must be at least 2".into());
    }
    if args.jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
        return Err("--jwt-secret must be at least 16 bytes".into());
    }
    Ok(())
}

fn token_service(args: &ServeArgs) -> anyhow::Result<TokenService> {
    let secret = match &args.jwt_secret {
        Some(secret) => secret.as_bytes().to_vec(),
        None => stored_secret(&args.data_dir.join("jwt-secret"))?,
    };
    let tokens = TokenService::new(
        &secret,
        Duration::from_secs(args.access_ttl_secs),
        Duration::from_secs(args.refresh_ttl_secs),
    )?
    .with_leeway(Duration::from_secs(args.token_leeway_secs));
    let issuer = args.external_jwt_issuer.as_deref();
    let audience = args.external_jwt_audience.as_deref();
    let external = if let Some(secret) = &args.external_jwt_secret {
        Some(ExternalIssuer::shared_secret(
            secret.as_bytes(),
            issuer,
            audience,
        )?)
    } else if let Some(path) = &args.external_jwt_public_key {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Some(ExternalIssuer::public_key(&pem, issuer, audience)?)
    } else {
        None
    };
    Ok(match external {
        Some(external) => tokens.with_external(external),
        None => tokens,
    })
}

/// Returns the secret kept at `path`, creating it (32 random bytes, hex, readable
/// by the owner only) on first start, so that tokens survive restarts.
fn stored_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    if let Ok(secret) = std::fs::read_to_string(path) {
        return Ok(secret.trim().as_bytes().to_vec());
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    Ok(secret.into_bytes())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
