//! A logged-in connection to the server: the channel, the stored tokens, and
//! one refresh when the access token has expired.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{Conversation, ListConversationsRequest, OpenDirectRequest, RefreshRequest};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::show;
use super::state::{Login, State, StateFile};

/// A refresh happens this long before the access token's stated expiry.
const EXPIRY_MARGIN_MS: i64 = 10_000;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub(super) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel that carries the access token.
pub(super) type Authed = InterceptedService<Channel, Bearer>;

/// Opens a channel to `server`.
pub(super) async fn connect(server: &str) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(server.to_owned())
        .with_context(|| format!("bad server url {server:?}"))?;
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the server at {server}"))
}

/// The logged-in user's connection to the server.
#[derive(Debug)]
pub(super) struct Session {
    channel: Channel,
    state_file: StateFile,
    /// The stored state; `login` is always `Some` in a session.
    state: State,
    /// Set after the one refresh a run may do: a second expiry is an error.
    refreshed: bool,
}

impl Session {
    /// Connects with the stored login; refreshes first when the token is stale.
    pub(super) async fn open(server: &str, state_file: StateFile) -> anyhow::Result<Self> {
        let state = state_file.load()?;
        if state.login.is_none() {
            bail!("not logged in: run `confab client register <name>` or `login <name>` first");
        }
        let channel = connect(server).await?;
        let mut session = Self {
            channel,
            state_file,
            state,
            refreshed: false,
        };
        if session.login().access_expires_at_ms < now_ms() + EXPIRY_MARGIN_MS {
            session.refresh().await?;
        }
        Ok(session)
    }

    /// The logged-in user.
    pub(super) fn login(&self) -> &Login {
        // `open` refuses a state without a login, and nothing removes it.
        self.state
            .login
            .as_ref()
            .expect("a session always holds a login")
    }

    /// This installation's device id.
    pub(super) fn device_id(&self) -> &str {
        &self.state.device_id
    }

    /// The channel to the server.
    pub(super) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Adds the current access token to calls.
    pub(super) fn bearer(&self) -> anyhow::Result<Bearer> {
        let value = format!("Bearer {}", self.login().access_token);
        Ok(Bearer(
            value.parse().context("the stored token is not ascii")?,
        ))
    }

    /// A `Conversations` client with the current token.
    pub(super) fn conversations(&self) -> anyhow::Result<ConversationsClient<Authed>> {
        Ok(ConversationsClient::with_interceptor(
            self.channel(),
            self.bearer()?,
        ))
    }

    /// Runs a `Conversations` call; on UNAUTHENTICATED refreshes once and retries.
    pub(super) async fn call<T>(
        &mut self,
        what: &str,
        mut op: impl AsyncFnMut(ConversationsClient<Authed>) -> Result<tonic::Response<T>, Status>,
    ) -> anyhow::Result<T> {
        match op(self.conversations()?).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if !self.may_refresh(&status) => {
                return Err(show::status_error(what, &status));
            }
            Err(_) => self.refresh().await?,
        }
        let response = op(self.conversations()?)
            .await
            .map_err(|status| show::status_error(what, &status))?;
        Ok(response.into_inner())
    }

    /// Whether `status` calls for the one refresh of this run.
    pub(super) fn may_refresh(&self, status: &Status) -> bool {
        status.code() == Code::Unauthenticated && !self.refreshed
    }

    /// Swaps the refresh token for a new pair and stores it.
    pub(super) async fn refresh(&mut self) -> anyhow::Result<()> {
        self.refreshed = true;
        let request = RefreshRequest {
            refresh_token: self.login().refresh_token.clone(),
        };
        let response = AccountsClient::new(self.channel())
            .refresh(request)
            .await
            .map_err(|status| show::status_error("session expired, log in again", &status))?
            .into_inner();
        let login = self.state.login.as_mut().context("no login")?;
        login.access_token = response.access_token;
        login.access_expires_at_ms = response.access_expires_at_ms;
        login.refresh_token = response.refresh_token;
        self.state_file.save(&self.state)
    }

    /// Stores the sync cursor.
    pub(super) fn save_cursor(&mut self, cursor: u64) -> anyhow::Result<()> {
        let login = self.state.login.as_mut().context("no login")?;
        login.cursor = cursor;
        self.state_file.save(&self.state)
    }

    /// Opens (or creates) the direct conversation with `peer`.
    pub(super) async fn open_direct(&mut self, peer: &str) -> anyhow::Result<Conversation> {
        let what = format!("cannot open a conversation with {peer}");
        self.call(&what, async |mut client| {
            let request = OpenDirectRequest {
                user_id: 0,
                username: peer.to_owned(),
            };
            client.open_direct(request).await
        })
        .await
    }
}

impl Session {
    /// The display name of a user: the stored one, or `user <id>`.
    pub(super) fn name_of(&self, user_id: i64) -> String {
        if user_id == self.login().user_id {
            return self.login().username.clone();
        }
        self.state
            .names
            .get(&user_id)
            .cloned()
            .unwrap_or_else(|| format!("user {user_id}"))
    }

    /// Stores the name of `user_id`.
    pub(super) fn remember(&mut self, user_id: i64, username: &str) -> anyhow::Result<()> {
        if self.state.names.get(&user_id).map(String::as_str) == Some(username) {
            return Ok(());
        }
        self.state.names.insert(user_id, username.to_owned());
        self.state_file.save(&self.state)
    }

    /// The id of a user whose name is known already (no server call).
    pub(super) fn known_user_id(&self, username: &str) -> Option<i64> {
        if username == self.login().username {
            return Some(self.login().user_id);
        }
        self.state
            .names
            .iter()
            .find(|(_, name)| *name == username)
            .map(|(id, _)| *id)
    }

    /// Whether the name of `user_id` is known.
    pub(super) fn knows(&self, user_id: i64) -> bool {
        user_id == self.login().user_id || self.state.names.contains_key(&user_id)
    }

    /// Learns the names the conversation list carries (direct peers and the
    /// senders of last messages) and stores them.
    pub(super) async fn learn_names(&mut self) -> anyhow::Result<()> {
        let request = ListConversationsRequest {
            limit: 200,
            page_token: String::new(),
        };
        let listed = self
            .call("cannot list conversations", async |mut client| {
                client.list(request.clone()).await
            })
            .await?;
        let before = self.state.names.len();
        for summary in listed.conversations {
            self.state.names.extend(summary.member_names);
        }
        if self.state.names.len() != before {
            self.state_file.save(&self.state)?;
        }
        Ok(())
    }

    /// Returns the id of the user called `username`.
    ///
    /// The edge API has no user lookup: the direct conversation with the user
    /// (opened, or created on first use) names its members.
    pub(super) async fn user_id(&mut self, username: &str) -> anyhow::Result<i64> {
        if username == self.login().username {
            return Ok(self.login().user_id);
        }
        let known = self.state.names.iter().find(|(_, name)| *name == username);
        if let Some((id, _)) = known {
            return Ok(*id);
        }
        let me = self.login().user_id;
        let conversation = self.open_direct(username).await?;
        let id = conversation
            .member_ids
            .iter()
            .copied()
            .find(|id| *id != me)
            .with_context(|| format!("no user called {username:?}"))?;
        self.state.names.insert(id, username.to_owned());
        self.state_file.save(&self.state)?;
        Ok(id)
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
