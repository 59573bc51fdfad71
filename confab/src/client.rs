//! `confab client`: a command-line chat client over gRPC.
//!
//! - [`state`]: the JSON file in the state dir (device id, tokens, cursor).
//! - [`session`]: a channel to the server with the stored tokens, refreshed once
//!   when the access token has expired.
//! - [`listing`]: `conversations` (with unread counts) and `history`.
//! - [`groups`]: `group create/add/remove/leave/members/info`.
//! - [`chat`]: `chat <peer>` or `chat --conversation <id>`: catch-up and live
//!   messages over `Edge.Stream`, receipts both ways.
//! - [`presence`]: `presence USER...`, `privacy [everyone|contacts|nobody]`,
//!   and the presence and typing lines of `chat`.
//! - [`show`]: how messages, times and errors are printed.

mod chat;
mod groups;
mod listing;
mod presence;
mod session;
mod show;
mod state;

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::{AuthResponse, LoginRequest, RegisterRequest};

use self::session::Session;
use self::state::{Login, StateFile};

/// Arguments of `confab client`.
#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    /// Server URL.
    #[arg(
        long,
        env = "CONFAB_SERVER",
        default_value = "http://127.0.0.1:7600",
        global = true
    )]
    server: String,
    /// Where the client keeps its device id, tokens and cursor (one per user);
    /// default `~/.confab-client`.
    #[arg(long, env = "CONFAB_CLIENT_STATE", global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: ClientCommand,
}

/// What `confab client` does.
#[derive(Debug, clap::Subcommand)]
enum ClientCommand {
    /// Creates an account and logs in.
    Register(Credentials),
    /// Logs in to an existing account.
    Login(Credentials),
    /// Lists conversations with their last message and unread count.
    Conversations,
    /// Prints one page of the conversation with a user, oldest to newest.
    History {
        /// The other user's name.
        peer: String,
        /// Messages per page (at most 200).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only messages older than this message id (to page back).
        #[arg(long)]
        before: Option<i64>,
    },
    /// Chats with a user or in a group: prints what was missed, then live
    /// messages, receipts, who is typing and (with a user) their presence;
    /// every stdin line is sent; ends at end of input.
    Chat {
        /// The other user's name.
        #[arg(required_unless_present = "conversation")]
        peer: Option<String>,
        /// A conversation (group, channel) by id instead of a user.
        #[arg(long, conflicts_with = "peer")]
        conversation: Option<i64>,
    },
    /// Groups: create, add, remove, leave, members, info.
    #[command(subcommand)]
    Group(groups::GroupCommand),
    /// Prints whether users are online, or when they were last seen, as far
    /// as they let you see it.
    Presence {
        /// User names (of people you have a conversation with) or user ids.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Sets who may see when you were last online; shows it without an argument.
    Privacy {
        /// everyone, contacts (the default) or nobody.
        #[arg(value_enum)]
        last_seen: Option<presence::Visibility>,
    },
}

/// A username and where its password comes from.
#[derive(Debug, clap::Args)]
struct Credentials {
    /// The account's name.
    username: String,
    /// The password; read as one line from stdin when not given.
    #[arg(long, env = "CONFAB_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

/// Runs the client.
pub(crate) async fn run(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let state_file = StateFile::in_dir(state_dir(args.state_dir)?);
    match args.command {
        ClientCommand::Register(credentials) => {
            authenticate(&args.server, &state_file, credentials, true).await
        }
        ClientCommand::Login(credentials) => {
            authenticate(&args.server, &state_file, credentials, false).await
        }
        ClientCommand::Conversations => {
            let mut session = Session::open(&args.server, state_file).await?;
            listing::conversations(&mut session).await
        }
        ClientCommand::History {
            peer,
            limit,
            before,
        } => {
            let mut session = Session::open(&args.server, state_file).await?;
            listing::history(&mut session, &peer, limit, before.unwrap_or(0)).await
        }
        ClientCommand::Chat { peer, conversation } => {
            let mut session = Session::open(&args.server, state_file).await?;
            let target = match (peer, conversation) {
                (_, Some(id)) => chat::Target::Conversation(id),
                (Some(peer), None) => chat::Target::Peer(peer),
                (None, None) => bail!("give a user name or --conversation ID"),
            };
            chat::run(&mut session, target).await
        }
        ClientCommand::Group(command) => {
            let mut session = Session::open(&args.server, state_file).await?;
            groups::run(&mut session, command).await
        }
        ClientCommand::Presence { users } => {
            let mut session = Session::open(&args.server, state_file).await?;
            presence::presence(&mut session, &users).await
        }
        ClientCommand::Privacy { last_seen } => {
            let mut session = Session::open(&args.server, state_file).await?;
            presence::privacy(&mut session, last_seen).await
        }
    }
}

/// Returns the state dir: the flag, else `~/.confab-client`.
fn state_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    let home = std::env::var_os("HOME").context("no --state-dir given and HOME is not set")?;
    Ok(PathBuf::from(home).join(".confab-client"))
}

/// Registers or logs in, and stores the tokens.
async fn authenticate(
    server: &str,
    state_file: &StateFile,
    credentials: Credentials,
    register: bool,
) -> anyhow::Result<ExitCode> {
    let password = match credentials.password {
        Some(password) => password,
        None => read_password()?,
    };
    let channel = session::connect(server).await?;
    let mut accounts = AccountsClient::new(channel);
    let username = credentials.username;
    let response = if register {
        let request = RegisterRequest { username, password };
        accounts
            .register(request)
            .await
            .map_err(|s| show::status_error("cannot register", &s))?
    } else {
        let request = LoginRequest { username, password };
        accounts
            .login(request)
            .await
            .map_err(|s| show::status_error("cannot log in", &s))?
    };
    let login = store_login(state_file, response.into_inner())?;
    let verb = if register {
        "registered and logged in"
    } else {
        "logged in"
    };
    println!("{verb} as {} (user {})", login.username, login.user_id);
    Ok(ExitCode::SUCCESS)
}

/// Keeps the new tokens; the cursor survives only a login as the same user.
fn store_login(state_file: &StateFile, auth: AuthResponse) -> anyhow::Result<Login> {
    let user = auth.user.context("the server sent no user")?;
    let mut state = state_file.load()?;
    let cursor = match &state.login {
        Some(previous) if previous.user_id == user.id => previous.cursor,
        _ => 0,
    };
    let login = Login {
        user_id: user.id,
        username: user.username,
        access_token: auth.access_token,
        access_expires_at_ms: auth.access_expires_at_ms,
        refresh_token: auth.refresh_token,
        cursor,
    };
    state.login = Some(login.clone());
    state_file.save(&state)?;
    Ok(login)
}

/// Reads the password as one line from stdin.
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("no password: give --password, CONFAB_PASSWORD or one line on stdin");
    }
    Ok(password.to_owned())
}
