//! One worker process of the connections scenario (the hidden subcommand
//! [`SUBCOMMAND`]): opens its share of the connections when the parent says
//! `go` on stdin, holds them with heartbeats, closes and opens them again as
//! the same users on `reopen`, and answers `stop` (or the end of stdin) with
//! how many it still holds. It reports on stdout, one [`Report`] line each.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use confab_proto::v1::{ClientFrame, Heartbeat, client_frame};
use futures::{SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Endpoint, Uri};

use super::{MAX_PER_WORKER, MAX_WORKERS, Report, SECRET_ENV};
use crate::client::{Servers, Transport, Ws, host_port, mint, open_on, open_ws_on, ws_url};

/// The hidden subcommand that runs a worker.
pub(crate) const SUBCOMMAND: &str = "connections-worker";

/// Loopback source addresses per /24: `.1` to `.250`.
const PER_SUBNET: usize = 250;

/// How often (in connections) a worker reports its progress.
const PROGRESS_EVERY: usize = 250;

/// Arguments of one worker, given by the parent.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// This worker's index: its source addresses are `127.(1+w).*.*`.
    #[arg(long)]
    worker: usize,
    /// The global index of this worker's first connection (users are named by it).
    #[arg(long)]
    first: usize,
    /// Connections this worker opens and holds.
    #[arg(long)]
    connections: usize,
    /// The run's id, shared by its workers (users are named by it).
    #[arg(long)]
    run_id: u32,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Seconds between heartbeats.
    #[arg(long)]
    heartbeat: u64,
    /// Connections of this worker being opened at the same time.
    #[arg(long)]
    concurrency: usize,
    #[arg(long, env = SECRET_ENV, hide_env_values = true)]
    external_secret: String,
}

/// Returns the source address of connection `i` of worker `worker`:
/// `127.(1+worker).(i / 250).(1 + i % 250)`, distinct for every pair in range
/// (the whole of 127.0.0.0/8 is loopback on Linux).
pub(crate) fn source_address(worker: usize, i: usize) -> Ipv4Addr {
    debug_assert!(worker < MAX_WORKERS && i < PER_SUBNET * 256);
    Ipv4Addr::new(
        127,
        (1 + worker) as u8,
        (i / PER_SUBNET) as u8,
        (1 + i % PER_SUBNET) as u8,
    )
}

/// Returns whether connections to `addr` should bind a loopback source
/// address of their own: only when the server is on a 127.x address.
fn binds_source(addr: SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback())
}

/// One server as a worker connects to it.
#[derive(Debug, Clone)]
struct Target {
    /// The gRPC URL, as given.
    url: String,
    /// The WebSocket URL of the same gateway.
    ws_url: String,
    /// The address its host resolved to.
    addr: SocketAddr,
}

impl Target {
    async fn resolve(url: &str) -> anyhow::Result<Self> {
        let (host, port) = host_port(url)?;
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {url}"))?
            .next()
            .with_context(|| format!("{url} resolves to no address"))?;
        Ok(Self {
            url: url.to_owned(),
            ws_url: ws_url(url).unwrap_or_default(),
            addr,
        })
    }
}

/// Connects to `server` with TCP_NODELAY, from `source` (port chosen by the
/// kernel) when given.
async fn tcp_connect(server: SocketAddr, source: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::from((source, 0)))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(server).await
}

/// A held connection: its task ends when the connection does.
type Held = JoinHandle<()>;

/// The heartbeat every connection sends.
fn heartbeat() -> ClientFrame {
    ClientFrame {
        r#ref: 0,
        kind: Some(client_frame::Kind::Heartbeat(Heartbeat {})),
    }
}

/// Opens a gRPC `Edge.Stream` from `source`, waits for `Synced`, and holds it.
async fn open_grpc(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    every: Duration,
) -> anyhow::Result<Held> {
    let addr = target.addr;
    let connector = tower::service_fn(move |_: Uri| async move {
        tcp_connect(addr, source).await.map(TokioIo::new)
    });
    let channel = Endpoint::from_shared(target.url.clone())?
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("connecting to {}", target.url))?;
    let (out, inbound) = open_on(channel, token).await?;
    Ok(tokio::spawn(hold_grpc(out, inbound, every)))
}

/// Keeps one gRPC connection open: a heartbeat on every tick, every frame read.
async fn hold_grpc(
    out: tokio::sync::mpsc::Sender<ClientFrame>,
    mut inbound: crate::client::Inbound,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if out.send(heartbeat()).await.is_err() {
                    return;
                }
            }
            frame = inbound.next() => {
                if !matches!(frame, Some(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// Opens a WebSocket from `source` with the token in the upgrade, says
/// `Hello` in a binary frame, waits for `Synced`, and holds it.
async fn open_ws(
    target: &Target,
    token: &str,
    source: Option<Ipv4Addr>,
    every: Duration,
) -> anyhow::Result<Held> {
    let stream = tcp_connect(target.addr, source)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let socket = open_ws_on(stream, &target.ws_url, token).await?;
    Ok(tokio::spawn(hold_ws(socket, every)))
}

/// Keeps one WebSocket open: a binary heartbeat on every tick, every frame read
/// (reading answers the server's pings).
async fn hold_ws(mut socket: Ws, every: Duration) {
    let beat = Message::Binary(heartbeat().encode_to_vec().into());
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if socket.send(beat.clone()).await.is_err() {
                    return;
                }
            }
            message = socket.next() => {
                if !matches!(message, Some(Ok(ref message)) if !message.is_close()) {
                    return;
                }
            }
        }
    }
}

/// Prints one report line for the parent.
fn report(report: Report) {
    println!("{}", report.line());
}

/// Opens this worker's share (the users of the run, the same each time),
/// reporting progress, and returns the held connections' tasks.
async fn open_all(args: &WorkerArgs, targets: &[Target]) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let every = Duration::from_secs(args.heartbeat.max(1));
    let worker = args.worker;
    let transport = args.transport;
    let mut opening = futures::stream::iter(0..args.connections)
        .map(|i| {
            let global = args.first + i;
            let token = mint(
                &args.external_secret,
                &format!("c{:08x}u{global}", args.run_id),
            );
            // Connection `global` goes to server `global % n`, as `Servers::nth`.
            let target = &targets[global % targets.len()];
            let source = binds_source(target.addr).then(|| source_address(worker, i));
            async move {
                let token = token?;
                let held = match transport {
                    Transport::Grpc => open_grpc(target, &token, source, every).await,
                    Transport::Ws => open_ws(target, &token, source, every).await,
                };
                held.with_context(|| {
                    format!("worker {worker}: connection {global} (from {source:?})")
                })
                .map(|held| (held, source))
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut held = Vec::with_capacity(args.connections);
    let mut sources = HashSet::new();
    while let Some(opened) = opening.next().await {
        let (connection, source) = opened?;
        held.push(connection);
        sources.extend(source);
        if held.len() % PROGRESS_EVERY == 0 {
            report(Report::Opened(held.len()));
        }
    }
    drop(opening);
    report(Report::Open {
        connections: held.len(),
        source_addresses: sources.len(),
    });
    Ok(held)
}

/// Runs one worker: see the module's documentation.
pub(crate) async fn run(servers: &Servers, args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.worker < MAX_WORKERS && args.connections <= MAX_PER_WORKER,
        "worker {} asked for {} connections: at most {MAX_PER_WORKER} each, {MAX_WORKERS} workers",
        args.worker,
        args.connections
    );
    servers.check(args.transport)?;
    let mut targets = Vec::with_capacity(servers.urls().len());
    for url in servers.urls() {
        targets.push(Target::resolve(url).await?);
    }
    let mut orders = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    report(Report::Ready);
    match orders.next_line().await? {
        Some(order) if order.trim() == "go" => {}
        other => anyhow::bail!("worker {}: expected go, got {other:?}", args.worker),
    }

    let mut held = open_all(&args, &targets).await?;

    // Hold until the parent says stop (or goes away); reopen when told.
    loop {
        match orders.next_line().await? {
            Some(order) if order.trim() == "stop" => break,
            Some(order) if order.trim() == "reopen" => {
                for connection in &held {
                    connection.abort();
                }
                // Each socket is closed once its task has ended.
                for connection in held {
                    let _ = connection.await;
                }
                held = open_all(&args, &targets).await?;
            }
            Some(_) => {}
            None => break,
        }
    }
    let alive = held.iter().filter(|held| !held.is_finished()).count();
    report(Report::Held {
        alive,
        of: held.len(),
    });
    for connection in held {
        connection.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_of_every_worker_has_its_own_loopback_source() {
        assert_eq!(source_address(0, 0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_address(0, 249), Ipv4Addr::new(127, 1, 0, 250));
        assert_eq!(source_address(0, 250), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_address(1, 8_999), Ipv4Addr::new(127, 2, 35, 250));
        assert_eq!(
            source_address(MAX_WORKERS - 1, 0),
            Ipv4Addr::new(127, 254, 0, 1)
        );
        let mut seen = HashSet::new();
        for worker in [0, 1, 2, MAX_WORKERS - 1] {
            for i in 0..MAX_PER_WORKER {
                let address = source_address(worker, i);
                assert!(address.is_loopback(), "{address}");
                // Never the server's usual 127.0.0.1, never .0 or .255 hosts.
                assert_ne!(address.octets()[1], 0, "{address}");
                assert!((1..=250).contains(&address.octets()[3]), "{address}");
                assert!(seen.insert(address), "{address} twice");
            }
        }
    }

    #[test]
    fn only_a_server_on_a_127_address_gets_bound_sources() {
        assert!(binds_source("127.0.0.1:7600".parse().unwrap()));
        assert!(binds_source("127.9.8.7:1".parse().unwrap()));
        assert!(!binds_source("10.0.0.1:7600".parse().unwrap()));
        assert!(!binds_source("[::1]:7600".parse().unwrap()));
    }

    #[tokio::test]
    async fn targets_resolve_with_the_default_port() {
        let target = Target::resolve("http://127.0.0.1").await.unwrap();
        assert_eq!(target.addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(target.ws_url, "ws://127.0.0.1/v1/ws");
        let target = Target::resolve("http://[::1]:7600").await.unwrap();
        assert_eq!(target.addr, "[::1]:7600".parse().unwrap());
    }
}
