//! A distributed Confab on this machine: every role in its own OS process of
//! the real binary, joined by a private nats-server and a fresh PostgreSQL
//! database, which the processes reach through a [`Proxy`] that a test can cut.
//!
//! The layout is fixed: 1 group, 1 session, 1 presence, 2 message and 2 gateway
//! processes, each on ports picked once and kept across restarts, so that a
//! restarted process is found where the others expect it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confab_common::testkit::{self, NatsServer, PgDatabase};
use tempfile::TempDir;
use tokio::process::Child;

use crate::proxy::Proxy;
use crate::server::{confab_command, log_tail, raised_limits, spawn_until};
use crate::{Server, WAIT, http};

/// The line every process prints on stdout once all its roles serve.
const READY_LINE: &str = "confab ready";

/// How long a process may take to print [`READY_LINE`]: a cold debug binary
/// connecting to NATS and PostgreSQL takes longer than the embedded server.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines of each log a failure shows.
const LOG_TAIL_LINES: usize = 25;

/// The gauge of log partitions a message process owns (its fan-out share).
pub const PARTITIONS_OWNED: &str = "confab_log_partitions_owned";

/// The secret that signs tokens: the same on every gateway, so that a token
/// from one is good on the other.
const JWT_SECRET: &str = "confab-cluster-test-secret-0123456789";

/// A role of the distributed mode, as `--roles` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Users, conversations, membership (PostgreSQL).
    Group,
    /// Device registry and node-id leases.
    Session,
    /// Online, last seen, typing.
    Presence,
    /// Send path, log, fan-out, history (JetStream and PostgreSQL).
    Message,
    /// The edge: gRPC and WebSocket clients.
    Gateway,
}

impl Role {
    /// The name `--roles` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Session => "session",
            Self::Presence => "presence",
            Self::Message => "message",
            Self::Gateway => "gateway",
        }
    }

    /// Whether the role keeps metadata or messages in PostgreSQL.
    fn uses_postgres(self) -> bool {
        matches!(self, Self::Group | Self::Message)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many processes of each role the cluster runs, in start order.
const LAYOUT: [(Role, usize); 5] = [
    (Role::Group, 1),
    (Role::Session, 1),
    (Role::Presence, 1),
    (Role::Message, 2),
    (Role::Gateway, 2),
];

/// One process of the cluster.
#[derive(Debug)]
struct Process {
    role: Role,
    /// Its number among the processes of its role.
    index: usize,
    /// `--node`, unique in the cluster.
    node: String,
    /// Where the process serves: the gateway edge (`--listen`) for gateways,
    /// else the internal gRPC, `/healthz` and `/metrics` (`--internal-listen`).
    addr: SocketAddr,
    /// Every `confab serve` flag, kept for restarts.
    args: Vec<String>,
    /// `None` between `kill9` and `restart`.
    child: Option<Child>,
    /// Holds the data dir and one stderr log per start.
    dir: PathBuf,
    /// How many times it was started: names the log files.
    starts: u32,
}

impl Process {
    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("stderr-{}.log", self.starts))
    }

    /// Starts the process and waits for its ready line.
    async fn spawn(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is running already", self.node);
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let mut command = confab_command()?;
        command.arg("serve").args(&self.args);
        let started = spawn_until(command, log, START_TIMEOUT, |line| {
            (line.trim() == READY_LINE).then_some(())
        })
        .await;
        match started {
            Ok((child, ())) => {
                self.child = Some(child);
                Ok(())
            }
            Err(error) => bail!(
                "{} did not start: {error:#}; its log:\n{}",
                self.node,
                log_tail(&self.log_path(), LOG_TAIL_LINES)
            ),
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // tokio's `Child::kill` sends SIGKILL on Unix and waits for the exit.
            child
                .kill()
                .await
                .with_context(|| format!("killing {}", self.node))?;
        }
        Ok(())
    }
}

/// A running cluster; every process, the nats-server and the proxy stop when it
/// drops, and the database is dropped (best effort).
#[derive(Debug)]
pub struct Cluster {
    /// The processes, in [`LAYOUT`] order.
    processes: Vec<Process>,
    /// JetStream: the durable log and the live bus.
    nats: NatsServer,
    /// This cluster's own database; taken by the teardown.
    database: Option<PgDatabase>,
    /// Between the processes and PostgreSQL: `cut` makes it unreachable.
    postgres: Proxy,
    /// Client handles on the gateways, in gateway order (their ports never change).
    gateways: Vec<Server>,
    /// Data dirs and logs of every process.
    root: TempDir,
}

impl Cluster {
    /// Starts nats-server, a fresh database with its schema (`confab migrate`),
    /// the proxy, and every process of the layout, and waits until each has
    /// printed `confab ready`.
    ///
    /// # Errors
    ///
    /// Fails when a process cannot start; the error carries its log.
    ///
    /// # Panics
    ///
    /// When nats-server or PostgreSQL are not there (see `scripts/test`).
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`Cluster::start`], with `extra` flags given to every process (for
    /// example a short `--presence-window-ms`).
    ///
    /// # Errors
    ///
    /// As [`Cluster::start`].
    ///
    /// # Panics
    ///
    /// As [`Cluster::start`].
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("confab-cluster-")
            .tempdir()?;
        let nats = NatsServer::start().await;
        let database = PgDatabase::create().await;
        let (upstream, proxied_url) = postgres_authority(&database.url)?;
        let postgres = Proxy::start(resolve(&upstream).await?).await?;
        let proxied_url = proxied_url(&postgres.addr().to_string());
        let migrate_url = database.url.clone();
        // From here on, a failure drops the cluster, and with it the database.
        let mut cluster = Self {
            processes: Vec::new(),
            nats,
            database: Some(database),
            postgres,
            gateways: Vec::new(),
            root,
        };
        migrate(&migrate_url, &cluster.root).await?;
        cluster.processes = plan(&cluster.root, &cluster.nats.url(), &proxied_url, extra)?;
        cluster.gateways = cluster
            .processes
            .iter()
            .filter(|process| process.role == Role::Gateway)
            .map(|process| Server::attach(process.addr))
            .collect::<Result<Vec<_>>>()?;
        // All at once: a process may wait for the roles it calls before it is
        // ready, so starting them one by one could wait forever.
        let starts = cluster.processes.iter_mut().map(Process::spawn);
        futures::future::try_join_all(starts).await?;
        Ok(cluster)
    }

    /// Client handles on the gateways: `register`, `grpc_synced`, `ws_synced`,
    /// `history`, ... work through them as with a [`Server`].
    pub fn gateways(&self) -> &[Server] {
        &self.gateways
    }

    /// A client handle on gateway `index`.
    ///
    /// # Panics
    ///
    /// When there is no such gateway.
    pub fn gateway(&self, index: usize) -> &Server {
        &self.gateways[index]
    }

    /// The gRPC URLs of the gateways, `http://127.0.0.1:PORT`.
    pub fn gateway_urls(&self) -> Vec<String> {
        self.gateways.iter().map(Server::url).collect()
    }

    /// The WebSocket URLs of the gateways, `ws://127.0.0.1:PORT/v1/ws`.
    pub fn gateway_ws_urls(&self) -> Vec<String> {
        self.gateways.iter().map(Server::ws_url).collect()
    }

    /// The edge addresses of the gateways.
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        self.gateways.iter().map(Server::addr).collect()
    }

    /// The first gateway whose process runs (for reading history after a fault).
    ///
    /// # Errors
    ///
    /// Fails when every gateway is down.
    pub fn live_gateway(&self) -> Result<&Server> {
        (0..self.gateways.len())
            .find(|&index| self.is_running(Role::Gateway, index))
            .map(|index| &self.gateways[index])
            .context("no gateway runs")
    }

    /// Whether process `index` of `role` runs (was not killed).
    pub fn is_running(&self, role: Role, index: usize) -> bool {
        self.find(role, index)
            .is_ok_and(|process| process.child.is_some())
    }

    /// How many processes of `role` the cluster has.
    pub fn count(&self, role: Role) -> usize {
        self.processes
            .iter()
            .filter(|process| process.role == role)
            .count()
    }

    /// Where process `index` of `role` serves `/metrics` and `/healthz`: the
    /// edge for a gateway, else the internal listener.
    ///
    /// # Errors
    ///
    /// Fails when there is no such process.
    pub fn addr(&self, role: Role, index: usize) -> Result<SocketAddr> {
        Ok(self.find(role, index)?.addr)
    }

    /// The nats-server URL.
    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The URL of this cluster's database, through the proxy.
    ///
    /// # Errors
    ///
    /// Fails when the database was dropped.
    pub fn postgres_url(&self) -> Result<String> {
        let database = self.database.as_ref().context("the database is dropped")?;
        let (_, proxied) = postgres_authority(&database.url)?;
        Ok(proxied(&self.postgres.addr().to_string()))
    }

    /// The proxy in front of PostgreSQL: `cut()` makes the database unreachable
    /// for every process, `restore()` reachable again.
    pub fn postgres_proxy(&self) -> &Proxy {
        &self.postgres
    }

    /// Kills process `index` of `role` with SIGKILL.
    ///
    /// # Errors
    ///
    /// Fails when there is no such process or it cannot be killed.
    pub async fn kill9(&mut self, role: Role, index: usize) -> Result<()> {
        self.find_mut(role, index)?.kill9().await
    }

    /// Starts process `index` of `role` again with the same ports, flags and
    /// data dir (killing it first if it runs), and waits until it is ready.
    ///
    /// # Errors
    ///
    /// Fails when the process does not start; the error carries its log.
    pub async fn restart(&mut self, role: Role, index: usize) -> Result<()> {
        let process = self.find_mut(role, index)?;
        process.kill9().await?;
        process.spawn().await
    }

    /// Kills nats-server with SIGKILL and starts it again on the same port and
    /// store directory; returns once it serves JetStream again.
    pub async fn nats_restart(&mut self) {
        self.nats.restart().await;
    }

    /// Returns the `/metrics` text of process `index` of `role`.
    ///
    /// # Errors
    ///
    /// Fails when the process does not answer 200.
    pub async fn metrics(&self, role: Role, index: usize) -> Result<String> {
        let addr = self.addr(role, index)?;
        let response = http::get(addr, "/metrics").await?;
        if response.status != 200 {
            bail!("{role}-{index} /metrics answered {}", response.status);
        }
        Ok(response.body)
    }

    /// Returns the sum of metric `name` of process `index` of `role` (0 when absent).
    ///
    /// # Errors
    ///
    /// Fails when the process does not answer.
    pub async fn metric(&self, role: Role, index: usize, name: &str) -> Result<f64> {
        let text = self.metrics(role, index).await?;
        Ok(http::metric_sum(&text, name).unwrap_or(0.0))
    }

    /// Returns the index of the message process that owns log partitions
    /// ([`PARTITIONS_OWNED`] > 0; the one owning most if several do), or `None`
    /// when no running message process owns any right now.
    ///
    /// # Errors
    ///
    /// Fails when a running message process does not answer `/metrics`.
    pub async fn fanout_owner(&self) -> Result<Option<usize>> {
        let mut best: Option<(usize, f64)> = None;
        for index in 0..self.count(Role::Message) {
            if !self.is_running(Role::Message, index) {
                continue;
            }
            let owned = self.metric(Role::Message, index, PARTITIONS_OWNED).await?;
            if owned > 0.0 && best.is_none_or(|(_, most)| owned > most) {
                best = Some((index, owned));
            }
        }
        Ok(best.map(|(index, _)| index))
    }

    /// Waits until message process `index` owns a number of log partitions that
    /// satisfies `wanted`; returns how long that took.
    ///
    /// # Errors
    ///
    /// Fails after the usual wait without it.
    pub async fn await_partitions(
        &self,
        index: usize,
        wanted: impl Fn(f64) -> bool,
    ) -> Result<Duration> {
        let started = tokio::time::Instant::now();
        let deadline = started + 2 * WAIT;
        loop {
            let owned = self.metric(Role::Message, index, PARTITIONS_OWNED).await;
            if let Ok(owned) = owned
                && wanted(owned)
            {
                return Ok(started.elapsed());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("message-{index} never owned the partitions wanted (last: {owned:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a running message process other than `not` owns log
    /// partitions (`not` may be `None`), and returns its index. Ownership moves
    /// within about a lease TTL, so this waits longer than [`WAIT`].
    ///
    /// # Errors
    ///
    /// Fails when no such owner shows up in time.
    pub async fn await_fanout_owner(&self, not: Option<usize>) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + 2 * WAIT;
        loop {
            let owner = self.fanout_owner().await;
            if let Ok(Some(index)) = owner
                && Some(index) != not
            {
                return Ok(index);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no message process other than {not:?} owns log partitions (last: {owner:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns the last lines of every process's current log, and of
    /// nats-server's, each under a header: for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for process in &self.processes {
            let state = if process.child.is_some() {
                "running"
            } else {
                "killed"
            };
            out.push_str(&format!(
                "--- {} ({state}, start {}) ---\n{}\n",
                process.node,
                process.starts,
                log_tail(&process.log_path(), LOG_TAIL_LINES)
            ));
        }
        let nats_log = self.nats.store_dir().join("nats.log");
        out.push_str(&format!(
            "--- nats-server ---\n{}\n",
            log_tail(&nats_log, LOG_TAIL_LINES)
        ));
        out
    }

    /// Returns `outcome`, with every log tail added to the error if it failed.
    ///
    /// # Errors
    ///
    /// `outcome`'s error, with the logs as context.
    pub fn with_logs<T>(&self, outcome: Result<T>) -> Result<T> {
        outcome.map_err(|error| error.context(format!("cluster logs:\n{}", self.log_tails())))
    }

    /// Where the data dirs and logs are (kept until the cluster drops).
    pub fn root(&self) -> &std::path::Path {
        self.root.path()
    }

    /// Stops every process and drops the database, waiting for both.
    pub async fn shutdown(mut self) {
        self.kill_all().await;
        if let Some(database) = self.database.take() {
            database.drop_database().await;
        }
    }

    async fn kill_all(&mut self) {
        for process in &mut self.processes {
            let _ = process.kill9().await;
        }
    }

    fn find(&self, role: Role, index: usize) -> Result<&Process> {
        self.processes
            .iter()
            .find(|process| process.role == role && process.index == index)
            .with_context(|| format!("the cluster has no {role}-{index}"))
    }

    fn find_mut(&mut self, role: Role, index: usize) -> Result<&mut Process> {
        self.processes
            .iter_mut()
            .find(|process| process.role == role && process.index == index)
            .with_context(|| format!("the cluster has no {role}-{index}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- cluster logs (tails) ---\n{}", self.log_tails());
        }
        for process in &mut self.processes {
            if let Some(child) = process.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let Some(database) = self.database.take() else {
            return;
        };
        // Drop cannot await: a thread with a runtime of its own drops the
        // database (WITH (FORCE) ends the killed processes' sessions).
        let dropper = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(database.drop_database());
            }
        });
        let _ = dropper.join();
    }
}

/// Runs `confab migrate` against `url` and waits for it to succeed.
async fn migrate(url: &str, root: &TempDir) -> Result<()> {
    let log_path = root.path().join("migrate.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = confab_command()?;
    let status = command
        .args(["migrate", "--postgres-url", url])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(START_TIMEOUT, status)
        .await
        .context("confab migrate did not finish")?
        .context("running confab migrate")?;
    if !status.success() {
        bail!(
            "confab migrate failed ({status}):\n{}",
            log_tail(&log_path, LOG_TAIL_LINES)
        );
    }
    Ok(())
}

/// Picks the ports and flags of every process of [`LAYOUT`].
fn plan(
    root: &TempDir,
    nats_url: &str,
    postgres_url: &str,
    extra: &[&str],
) -> Result<Vec<Process>> {
    let mut processes = Vec::new();
    for (role, count) in LAYOUT {
        for index in 0..count {
            let node = format!("{role}-{index}");
            let dir = root.path().join(&node);
            std::fs::create_dir_all(dir.join("data"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
            processes.push(Process {
                role,
                index,
                node,
                addr,
                args: Vec::new(),
                child: None,
                dir,
                starts: 0,
            });
        }
    }
    let url_of = |role: Role| -> String {
        processes
            .iter()
            .filter(|process| process.role == role)
            .map(|process| format!("http://{}", process.addr))
            .collect::<Vec<_>>()
            .join(",")
    };
    let peers: Vec<(Role, &str, String)> = vec![
        (Role::Group, "--group-addr", url_of(Role::Group)),
        (Role::Session, "--session-addr", url_of(Role::Session)),
        (Role::Presence, "--presence-addr", url_of(Role::Presence)),
        (Role::Message, "--message-addr", url_of(Role::Message)),
    ];
    let mut all_args = Vec::new();
    for process in &processes {
        let mut args: Vec<String> = vec![
            "--roles".into(),
            process.role.as_str().into(),
            "--node".into(),
            process.node.clone(),
            "--nats-url".into(),
            nats_url.into(),
            "--jwt-secret".into(),
            JWT_SECRET.into(),
            "--data-dir".into(),
            process.dir.join("data").display().to_string(),
        ];
        if process.role == Role::Gateway {
            args.extend(["--listen".into(), process.addr.to_string()]);
        } else {
            args.extend(["--internal-listen".into(), process.addr.to_string()]);
        }
        if process.role.uses_postgres() {
            args.extend(["--postgres-url".into(), postgres_url.into()]);
        }
        // Every role this process does not run itself is reached at its address.
        for (role, flag, url) in &peers {
            if *role != process.role {
                args.extend([(*flag).into(), url.clone()]);
            }
        }
        args.extend(raised_limits(&args).into_iter().map(str::to_owned));
        args.extend(extra.iter().map(|flag| (*flag).to_owned()));
        all_args.push(args);
    }
    for (process, args) in processes.iter_mut().zip(all_args) {
        process.args = args;
    }
    Ok(processes)
}

/// Splits a PostgreSQL URL into its `host:port` (5432 when the URL names no
/// port) and a function that rebuilds the URL with another `host:port`.
///
/// # Errors
///
/// Fails when the URL has no `scheme://` or no host.
pub fn postgres_authority(url: &str) -> Result<(String, impl Fn(&str) -> String + use<>)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("no scheme in {url:?}"))?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (format!("{userinfo}@"), host_port),
        None => (String::new(), authority),
    };
    if host_port.is_empty() {
        bail!("no host in {url:?}");
    }
    // A bracketed IPv6 host keeps its colons inside the brackets.
    let has_port = if host_port.starts_with('[') {
        host_port.contains("]:")
    } else {
        host_port.contains(':')
    };
    let host_port = if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let (scheme, tail) = (scheme.to_owned(), tail.to_owned());
    let rebuild = move |new_host_port: &str| format!("{scheme}://{userinfo}{new_host_port}{tail}");
    Ok((host_port, rebuild))
}

/// Resolves `host:port` to one socket address (`localhost` included).
async fn resolve(host_port: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy's URL keeps user, database and query, and swaps only the
    /// host and port; a URL without a port means 5432.
    #[test]
    fn postgres_urls_are_rewritten_around_the_authority() -> Result<()> {
        let (upstream, rebuild) = postgres_authority(
            "postgres://postgres:pw@db.local:6543/confab_test_1?sslmode=disable",
        )?;
        assert_eq!(upstream, "db.local:6543");
        assert_eq!(
            rebuild("127.0.0.1:9999"),
            "postgres://postgres:pw@127.0.0.1:9999/confab_test_1?sslmode=disable"
        );
        let (upstream, rebuild) = postgres_authority("postgres://127.0.0.1/x")?;
        assert_eq!(upstream, "127.0.0.1:5432");
        assert_eq!(rebuild("127.0.0.1:1"), "postgres://127.0.0.1:1/x");
        let (upstream, _) = postgres_authority("postgresql://u@[::1]:5433/x")?;
        assert_eq!(upstream, "[::1]:5433");
        let (upstream, _) = postgres_authority("postgresql://u@[::1]/x")?;
        assert_eq!(upstream, "[::1]:5432");
        assert!(postgres_authority("no-scheme").is_err());
        Ok(())
    }
}
