//! The client's state file: `<state dir>/state.json`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// What the client remembers between runs.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct State {
    /// Chosen once per state dir: the server tells this installation's
    /// connections apart by it.
    pub(super) device_id: String,
    /// Absent until `register` or `login`.
    #[serde(default)]
    pub(super) login: Option<Login>,
    /// Usernames learnt so far, by user id, for display (the server names
    /// users only in some answers).
    #[serde(default)]
    pub(super) names: BTreeMap<i64, String>,
}

/// A logged-in user: tokens and the sync position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Login {
    /// The user's id.
    pub(super) user_id: i64,
    /// The user's name, for display.
    pub(super) username: String,
    /// Sent as `authorization: Bearer ...`.
    pub(super) access_token: String,
    /// When the access token expires (ms since the Unix epoch).
    pub(super) access_expires_at_ms: i64,
    /// Swapped for a new pair when the access token has expired.
    pub(super) refresh_token: String,
    /// The last event sequence number this device has processed.
    #[serde(default)]
    pub(super) cursor: u64,
}

/// The state file of one state dir.
#[derive(Debug, Clone)]
pub(super) struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The state file in `dir`.
    pub(super) fn in_dir(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Reads the state; a missing file yields a fresh state with a new device id.
    pub(super) fn load(&self) -> anyhow::Result<State> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(fresh_state()),
            Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Writes the state atomically (temporary file, then rename), readable by
    /// the owner only: it holds tokens.
    pub(super) fn save(&self, state: &State) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.path();
        let temporary = self.dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(state)?;
        write_private(&temporary, text.as_bytes())
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))
    }
}

fn fresh_state() -> State {
    State {
        device_id: format!("cli-{:016x}", rand::random::<u64>()),
        login: None,
        names: BTreeMap::new(),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
