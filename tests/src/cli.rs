//! `confab client` processes, driven through their stdin and stdout.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::server::confab_bin;
use crate::{Server, WAIT};

/// One CLI user: a server URL and a state dir of its own.
#[derive(Debug, Clone)]
pub struct CliUser {
    url: String,
    state_dir: PathBuf,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    /// The exit status.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl CliUser {
    /// A user of `server` keeping its state in `state_dir`.
    pub fn new(server: &Server, state_dir: &Path) -> Self {
        Self {
            url: server.url(),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Points the user at `server` again (after a restart the port changes).
    pub fn reconnect(&mut self, server: &Server) {
        self.url = server.url();
    }

    /// `confab client --server URL --state-dir DIR ARGS...`, environment cleared
    /// of `CONFAB_*` so that the flags alone decide.
    fn command(&self, args: &[&str]) -> Result<Command> {
        let mut command = Command::new(confab_bin()?);
        command
            .arg("client")
            .arg("--server")
            .arg(&self.url)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .env_remove("CONFAB_PASSWORD")
            .env_remove("CONFAB_SERVER")
            .env_remove("CONFAB_CLIENT_STATE")
            .kill_on_drop(true);
        Ok(command)
    }

    /// Runs a command to its end with `stdin` as input.
    ///
    /// # Errors
    ///
    /// Fails when it cannot run or takes longer than [`WAIT`].
    pub async fn run(&self, args: &[&str], stdin: &str) -> Result<Finished> {
        let mut child = self
            .command(args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut input = child.stdin.take().context("no stdin pipe")?;
        input.write_all(stdin.as_bytes()).await?;
        drop(input);
        let output = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .with_context(|| format!("`confab client {args:?}` still running after {WAIT:?}"))??;
        Ok(Finished {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs a command that must succeed and returns its stdout.
    ///
    /// # Errors
    ///
    /// Fails when it exits with an error.
    pub async fn run_ok(&self, args: &[&str]) -> Result<String> {
        let finished = self.run(args, "").await?;
        if !finished.status.success() {
            bail!(
                "`confab client {args:?}` failed: {}{}",
                finished.stderr,
                finished.stdout
            );
        }
        Ok(finished.stdout)
    }

    /// Starts `chat <peer>` with piped stdin and stdout.
    ///
    /// # Errors
    ///
    /// Fails when it cannot be spawned.
    pub fn chat(&self, peer: &str) -> Result<Chat> {
        self.spawn_chat(&["chat", peer])
    }

    /// Starts `chat --conversation <id>` (a group) with piped stdin and stdout.
    ///
    /// # Errors
    ///
    /// Fails when it cannot be spawned.
    pub fn chat_in(&self, conversation_id: i64) -> Result<Chat> {
        self.spawn_chat(&["chat", "--conversation", &conversation_id.to_string()])
    }

    fn spawn_chat(&self, args: &[&str]) -> Result<Chat> {
        let mut child = self
            .command(args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        Ok(Chat {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        })
    }
}

/// A running `confab client chat`.
#[derive(Debug)]
pub struct Chat {
    child: Child,
    /// Dropped to signal EOF.
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Every stdout line read so far.
    seen: Vec<String>,
}

impl Chat {
    /// Types one line.
    ///
    /// # Errors
    ///
    /// Fails when stdin is closed.
    pub async fn say(&mut self, text: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(format!("{text}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Reads stdout until a line contains `needle` and returns that line.
    ///
    /// # Errors
    ///
    /// Fails when stdout ends or no such line comes within [`WAIT`].
    pub async fn expect_line(&mut self, needle: &str) -> Result<String> {
        let waited = tokio::time::timeout(WAIT, self.read_until(needle)).await;
        match waited {
            Ok(found) => found,
            Err(_) => bail!(
                "no line with {needle:?} within {WAIT:?}; seen: {:#?}",
                self.seen
            ),
        }
    }

    async fn read_until(&mut self, needle: &str) -> Result<String> {
        while let Some(line) = self.stdout.next_line().await? {
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Ok(line);
            }
        }
        bail!(
            "stdout ended before a line with {needle:?}; seen: {:#?}",
            self.seen
        )
    }

    /// Every stdout line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Closes stdin and waits for a clean exit; returns the remaining stdout lines.
    ///
    /// # Errors
    ///
    /// Fails when it does not exit within [`WAIT`] or exits with an error.
    pub async fn quit(mut self) -> Result<Vec<String>> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let drained = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.stdout.next_line().await? {
                rest.push(line);
            }
            self.child.wait().await
        })
        .await;
        let status = match drained {
            Ok(status) => status?,
            Err(_) => bail!(
                "chat did not exit within {WAIT:?} after EOF; seen: {:#?}",
                self.seen
            ),
        };
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                use tokio::io::AsyncReadExt as _;
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            bail!(
                "chat exited with {status}: {stderr}; stdout: {:#?} {rest:#?}",
                self.seen
            );
        }
        Ok(rest)
    }
}
