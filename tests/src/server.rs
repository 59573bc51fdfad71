//! The server under test: the real `confab` binary in its own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::WAIT;

/// The line `confab serve` prints to stdout once it listens, before the address.
const LISTENING_PREFIX: &str = "confab listening on ";

/// How many lines of the server's log a failure shows.
const LOG_TAIL_LINES: usize = 40;

/// One `confab serve` process on `127.0.0.1:0` with a data dir of its own.
///
/// The process is killed (SIGKILL) when the value drops; if the test is
/// panicking, the tail of the server's stderr is printed first.
#[derive(Debug)]
pub struct Server {
    /// The running process; `None` between `kill9` and `restart`.
    child: Option<Child>,
    /// Where the current process listens (every start binds a new port).
    addr: SocketAddr,
    /// Holds `data/` and one stderr log per start; removed on drop.
    root: TempDir,
    /// Extra `confab serve` flags, kept for restarts.
    args: Vec<String>,
    /// Extra environment variables of the process (`RUST_LOG`), kept for restarts.
    env: Vec<(String, String)>,
    /// How many processes were started: names the log files.
    starts: u32,
    /// False for a handle on a process that something else runs
    /// ([`Server::attach`]): it has no log, and cannot be restarted.
    managed: bool,
}

impl Server {
    /// Starts a server with default flags.
    ///
    /// # Errors
    ///
    /// Fails when the binary cannot be spawned or never prints its address.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra `confab serve` flags, e.g. `["--jwt-secret", "s"]`.
    ///
    /// # Errors
    ///
    /// Fails when the binary cannot be spawned or never prints its address.
    pub async fn start_with(args: &[&str]) -> Result<Self> {
        Self::start_with_env(args, &[]).await
    }

    /// Starts a server with extra flags and environment variables, e.g.
    /// `[("RUST_LOG", "trace")]`.
    ///
    /// # Errors
    ///
    /// Fails when the binary cannot be spawned or never prints its address.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            root: tempfile::Builder::new().prefix("confab-e2e-").tempdir()?,
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env: env
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            starts: 0,
            managed: true,
        };
        std::fs::create_dir(server.data_dir())?;
        server.spawn().await?;
        Ok(server)
    }

    /// Returns a handle on a server that something else runs at `addr` (a
    /// gateway of a [`crate::cluster::Cluster`]): every client helper works
    /// through it, while `kill9` does nothing and `restart` fails.
    ///
    /// # Errors
    ///
    /// Fails when no temporary directory can be made.
    pub fn attach(addr: SocketAddr) -> Result<Self> {
        Ok(Self {
            child: None,
            addr,
            root: tempfile::Builder::new()
                .prefix("confab-attached-")
                .tempdir()?,
            args: Vec::new(),
            env: Vec::new(),
            starts: 0,
            managed: false,
        })
    }

    /// The address the server listens on now.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The WebSocket endpoint, `ws://127.0.0.1:PORT/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// The server's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Opens a new HTTP/2 connection for gRPC clients.
    ///
    /// # Errors
    ///
    /// Fails when the server does not accept the connection.
    pub async fn channel(&self) -> Result<Channel> {
        let endpoint = Channel::from_shared(self.url())?.connect_timeout(WAIT);
        endpoint.connect().await.context("connecting to the server")
    }

    /// Kills the server with SIGKILL and waits for it to be gone.
    ///
    /// # Errors
    ///
    /// Fails when the process cannot be killed.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // tokio's `Child::kill` sends SIGKILL on Unix and reaps the process.
            child.kill().await.context("killing the server")?;
        }
        Ok(())
    }

    /// Asks the server to shut down gracefully (SIGTERM) and returns its exit
    /// status once it is gone.
    ///
    /// # Errors
    ///
    /// Fails when no server runs, the signal cannot be sent, or the server is
    /// still running after `WAIT`.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("the server is not running")?;
        let pid = child.id().context("the server has exited already")?;
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(WAIT, child.wait())
            .await
            .context("the server did not exit after SIGTERM")?
            .context("waiting for the server")
    }

    /// Starts the server again on the same data dir (killing it first if it runs).
    /// The port changes: clients must connect again.
    ///
    /// # Errors
    ///
    /// Fails like [`Server::start`].
    pub async fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.managed, "an attached server cannot be restarted");
        self.kill9().await?;
        self.spawn().await
    }

    /// Returns the last lines of the current process's stderr.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path(), LOG_TAIL_LINES)
    }

    /// Returns the whole stderr of the current process so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join(format!("server-{}.log", self.starts))
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())?;
        let mut command = confab_command()?;
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.data_dir())
            .args(&self.args)
            .args(raised_limits(&self.args))
            .envs(self.env.iter().map(|(key, value)| (key, value)));
        let started = spawn_until(command, log, WAIT, |line| {
            line.strip_prefix(LISTENING_PREFIX)
                .map(|addr| addr.trim().parse::<SocketAddr>())
        })
        .await;
        let (child, addr) = match started {
            Ok(started) => started,
            Err(error) => bail!("{error:#}; server log:\n{}", self.log_tail()),
        };
        self.child = Some(child);
        self.addr = addr.context("parsing the listening address")?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.managed && std::thread::panicking() {
            eprintln!("--- confab serve log (tail) ---\n{}", self.log_tail());
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Spawns `command` with stdout piped and stderr into `log`, and reads stdout
/// until `wanted` recognises a line; returns the child (killed when dropped)
/// and what `wanted` made of that line. Stdout keeps being drained afterwards,
/// so that the process never blocks on a full pipe.
///
/// # Errors
///
/// Fails when the process cannot be spawned, exits first, or prints no such
/// line within `timeout`.
pub(crate) async fn spawn_until<T>(
    mut command: Command,
    log: std::fs::File,
    timeout: Duration,
    mut wanted: impl FnMut(&str) -> Option<T>,
) -> Result<(Child, T)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawning the process")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(found) = wanted(&line) {
                return Ok(found);
            }
        }
        bail!("the process exited before printing the line it was expected to print")
    };
    let found = match tokio::time::timeout(timeout, read).await {
        Ok(found) => found?,
        Err(_) => bail!("the process printed no expected line within {timeout:?}"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, found))
}

/// Returns the last `count` lines of the file at `path` (empty when unreadable).
pub(crate) fn log_tail(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("\n")
}

/// Returns a command running the `confab` binary that the flags alone
/// configure: no `CONFAB_*` variable of the caller's shell reaches it.
///
/// # Errors
///
/// Fails like [`confab_bin`].
pub fn confab_command() -> Result<Command> {
    let mut command = Command::new(confab_bin()?);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CONFAB_") {
            command.env_remove(key);
        }
    }
    Ok(command)
}

/// Returns the `confab` binary: `CONFAB_BIN`, else `target/debug/confab` beside
/// this test executable (`target/debug/deps/e2e-...`).
///
/// # Errors
///
/// Fails when the binary does not exist.
pub fn confab_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CONFAB_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe()?;
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("odd test path")?;
    let bin = target_dir.join("confab");
    if !bin.exists() {
        bail!(
            "{} missing: build with `cargo build --workspace --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Rate limits every test server gets raised unless the test sets its own: the
/// functional tests send and invite at machine speed, far beyond a person's
/// rate; `security.rs` pins the limits themselves with small values.
const RAISED_LIMITS: [(&str, &str); 3] = [
    ("--send-burst", "1000000"),
    ("--send-per-second", "1000000"),
    ("--invitations-per-minute", "100000000"),
];

/// Returns the [`RAISED_LIMITS`] flags that `args` does not set.
pub(crate) fn raised_limits(args: &[String]) -> Vec<&'static str> {
    RAISED_LIMITS
        .iter()
        .filter(|(flag, _)| !args.iter().any(|arg| arg == flag))
        .flat_map(|(flag, value)| [*flag, *value])
        .collect()
}
