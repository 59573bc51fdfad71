//! Users and authenticated gRPC clients.

use anyhow::{Context, Result};
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{
    AuthResponse, Conversation, CreateGroupRequest, GetPresenceRequest, GetPrivacyRequest,
    HistoryRequest, HistoryResponse, LastSeenVisibility, LoginRequest, MeRequest,
    OpenDirectRequest, Presence, Privacy, RegisterRequest, User,
};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::Server;

/// The password every test user gets unless a test picks another.
pub const PASSWORD: &str = "correct horse battery staple";

/// A registered user and a token pair.
#[derive(Debug, Clone)]
pub struct Account {
    /// As the server returned it.
    pub user: User,
    /// Sent as `authorization: Bearer ...`.
    pub access_token: String,
    /// Exchanged for a new pair with `Accounts.Refresh`.
    pub refresh_token: String,
}

impl Account {
    /// The user id.
    pub fn id(&self) -> i64 {
        self.user.id
    }

    fn from_auth(auth: AuthResponse) -> Result<Self> {
        let user = auth.user.context("auth response without a user")?;
        Ok(Self {
            user,
            access_token: auth.access_token,
            refresh_token: auth.refresh_token,
        })
    }
}

/// Adds `authorization: Bearer <token>` to every call; with `None`, adds nothing.
#[derive(Debug, Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| tonic::Status::invalid_argument("token is not ascii"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A gRPC channel that carries a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

impl Server {
    /// Returns an `Accounts` client (its calls need no token).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn accounts(&self) -> Result<AccountsClient<Channel>> {
        Ok(AccountsClient::new(self.channel().await?))
    }

    /// Returns a `Conversations` client that sends `token` (none with `None`).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn conversations_with(
        &self,
        token: Option<&str>,
    ) -> Result<ConversationsClient<Authed>> {
        let bearer = Bearer(token.map(str::to_owned));
        Ok(ConversationsClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// Returns a `Conversations` client acting as `account`.
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn conversations(&self, account: &Account) -> Result<ConversationsClient<Authed>> {
        self.conversations_with(Some(&account.access_token)).await
    }

    /// Starts a server (as [`Server::start`]) and registers `usernames` on it
    /// with [`PASSWORD`], in order: the cast of most tests.
    ///
    /// # Errors
    ///
    /// Fails when the server does not start or refuses a registration.
    pub async fn start_with_users<const N: usize>(
        usernames: [&str; N],
    ) -> Result<(Self, [Account; N])> {
        let server = Self::start().await?;
        let mut accounts = Vec::with_capacity(N);
        for username in usernames {
            accounts.push(server.register(username).await?);
        }
        let accounts = accounts
            .try_into()
            .map_err(|_| anyhow::anyhow!("one account per username"))?;
        Ok((server, accounts))
    }

    /// Registers `username` with [`PASSWORD`].
    ///
    /// # Errors
    ///
    /// Fails when the server refuses.
    pub async fn register(&self, username: &str) -> Result<Account> {
        let request = RegisterRequest {
            username: username.to_owned(),
            password: PASSWORD.to_owned(),
        };
        let auth = self.accounts().await?.register(request).await?.into_inner();
        Account::from_auth(auth)
    }

    /// Logs `username` in with `password`.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn login(&self, username: &str, password: &str) -> Result<Account> {
        let request = LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        };
        let auth = self.accounts().await?.login(request).await?.into_inner();
        Account::from_auth(auth)
    }

    /// Returns the id of the direct conversation of `a` and `b`.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses.
    pub async fn open_direct(&self, a: &Account, b: &Account) -> Result<i64> {
        let request = OpenDirectRequest {
            user_id: b.id(),
            username: String::new(),
        };
        let conversation = self
            .conversations(a)
            .await?
            .open_direct(request)
            .await?
            .into_inner();
        Ok(conversation.id)
    }

    /// Reads one page of history as `account`.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn history(
        &self,
        account: &Account,
        conversation_id: i64,
        before: i64,
        after: i64,
        limit: u32,
    ) -> Result<HistoryResponse> {
        let request = HistoryRequest {
            conversation_id,
            before,
            after,
            limit,
        };
        let mut client = self.conversations(account).await?;
        Ok(client.history(request).await?.into_inner())
    }
}

impl Server {
    /// Creates a group owned by `owner` with `member_ids` besides the owner.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn create_group(
        &self,
        owner: &Account,
        name: &str,
        member_ids: &[i64],
    ) -> Result<Conversation> {
        let request = CreateGroupRequest {
            name: name.to_owned(),
            member_ids: member_ids.to_vec(),
            ..CreateGroupRequest::default()
        };
        let mut client = self.conversations(owner).await?;
        Ok(client.create_group(request).await?.into_inner())
    }

    /// Returns the user a token speaks for (`Accounts.Me`); an external token's
    /// subject becomes a user on first use.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses the token.
    pub async fn me(&self, token: &str) -> Result<User> {
        let channel = self.channel().await?;
        let mut client = AccountsClient::with_interceptor(channel, Bearer(Some(token.to_owned())));
        Ok(client.me(MeRequest {}).await?.into_inner())
    }

    /// Makes an [`Account`] of an external identity provider's user: mints an
    /// HS256 token for `subject` with `secret` (the server's
    /// `--external-jwt-secret`) and asks `Accounts.Me` who that is. No password
    /// hashing: cheap enough for thousands of users.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses the token.
    pub async fn external_account(&self, secret: &str, subject: &str) -> Result<Account> {
        let access_token = mint_external(secret, subject)?;
        let user = self.me(&access_token).await?;
        Ok(Account {
            user,
            access_token,
            refresh_token: String::new(),
        })
    }

    /// [`Server::external_account`] for many subjects over one connection,
    /// `concurrency` calls at a time; accounts in the order of `subjects`.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses any token.
    pub async fn external_accounts(
        &self,
        secret: &str,
        subjects: &[String],
        concurrency: usize,
    ) -> Result<Vec<Account>> {
        use futures::StreamExt as _;
        let channel = self.channel().await?;
        futures::stream::iter(subjects)
            .map(|subject| {
                let channel = channel.clone();
                async move {
                    let access_token = mint_external(secret, subject)?;
                    let bearer = Bearer(Some(access_token.clone()));
                    let mut client = AccountsClient::with_interceptor(channel, bearer);
                    let user = client
                        .me(MeRequest {})
                        .await
                        .with_context(|| format!("Me as {subject}"))?
                        .into_inner();
                    Ok(Account {
                        user,
                        access_token,
                        refresh_token: String::new(),
                    })
                }
            })
            .buffered(concurrency)
            .collect::<Vec<Result<Account>>>()
            .await
            .into_iter()
            .collect()
    }
}

impl Server {
    /// Returns an `Accounts` client acting as `account` (for the calls that
    /// need a token: `Me`, privacy, presence).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn accounts_as(&self, account: &Account) -> Result<AccountsClient<Authed>> {
        let bearer = Bearer(Some(account.access_token.clone()));
        Ok(AccountsClient::with_interceptor(
            self.channel().await?,
            bearer,
        ))
    }

    /// Sets who may see `account`'s last seen; returns the setting the server
    /// answers with.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn set_privacy(
        &self,
        account: &Account,
        last_seen: LastSeenVisibility,
    ) -> Result<LastSeenVisibility> {
        let privacy = Privacy {
            last_seen: last_seen as i32,
        };
        let mut client = self.accounts_as(account).await?;
        Ok(client.set_privacy(privacy).await?.into_inner().last_seen())
    }

    /// Returns who may see `account`'s last seen.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn get_privacy(&self, account: &Account) -> Result<LastSeenVisibility> {
        let mut client = self.accounts_as(account).await?;
        let privacy = client.get_privacy(GetPrivacyRequest {}).await?;
        Ok(privacy.into_inner().last_seen())
    }

    /// `Accounts.GetPresence` as `account`: the presences it may see.
    ///
    /// # Errors
    ///
    /// Fails when the server refuses; the status is in the error chain.
    pub async fn get_presence(&self, account: &Account, user_ids: &[i64]) -> Result<Vec<Presence>> {
        let request = GetPresenceRequest {
            user_ids: user_ids.to_vec(),
        };
        let mut client = self.accounts_as(account).await?;
        Ok(client.get_presence(request).await?.into_inner().presences)
    }
}

/// An HS256 token of an external identity provider for `subject`, valid for an hour.
///
/// # Errors
///
/// Fails when signing does.
pub fn mint_external(secret: &str, subject: &str) -> Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({ "sub": subject, "iat": now, "exp": now + 3600 });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Returns the gRPC code of a failed call's error, if it came from a status.
pub fn status_code(error: &anyhow::Error) -> Option<tonic::Code> {
    error
        .downcast_ref::<tonic::Status>()
        .map(tonic::Status::code)
}
