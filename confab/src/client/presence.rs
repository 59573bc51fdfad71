//! `presence USER...` and `privacy [everyone|contacts|nobody]`, and the lines
//! `chat` prints for presence and typing.

use std::process::ExitCode;

use anyhow::bail;
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::{
    GetPresenceRequest, GetPrivacyRequest, LastSeenVisibility, Presence, Privacy,
};
use tonic::Status;

use super::session::{Authed, Session};
use super::show;

/// Who may see your last seen, as `privacy` takes it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum Visibility {
    /// Anyone who asks.
    Everyone,
    /// People who share a direct conversation or a group with you (the default).
    Contacts,
    /// Nobody.
    Nobody,
}

impl From<Visibility> for LastSeenVisibility {
    fn from(visibility: Visibility) -> Self {
        match visibility {
            Visibility::Everyone => Self::Everyone,
            Visibility::Contacts => Self::Contacts,
            Visibility::Nobody => Self::Nobody,
        }
    }
}

/// Prints `name: online`, `name: last seen HH:MM:SS` (UTC), `name: offline`
/// (last seen hidden) or `name: nothing to see` for each user.
pub(super) async fn presence(session: &mut Session, users: &[String]) -> anyhow::Result<ExitCode> {
    session.learn_names().await?;
    let mut ids = Vec::with_capacity(users.len());
    for user in users {
        ids.push(resolve(session, user)?);
    }
    let request = GetPresenceRequest {
        user_ids: ids.clone(),
    };
    let answer = call_accounts(session, "cannot read presence", async |mut client| {
        client.get_presence(request.clone()).await
    })
    .await?;
    for (user, id) in users.iter().zip(ids) {
        let found = answer.presences.iter().find(|p| p.user_id == id);
        let what = found.map_or_else(|| "nothing to see".to_owned(), state_text);
        println!("{}: {what}", show::one_line(user));
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets who may see your last seen, or prints it when `setting` is `None`.
pub(super) async fn privacy(
    session: &mut Session,
    setting: Option<Visibility>,
) -> anyhow::Result<ExitCode> {
    let privacy = match setting {
        Some(setting) => {
            let request = Privacy {
                last_seen: LastSeenVisibility::from(setting) as i32,
            };
            call_accounts(session, "cannot set privacy", async |mut client| {
                client.set_privacy(request).await
            })
            .await?
        }
        None => {
            call_accounts(session, "cannot read privacy", async |mut client| {
                client.get_privacy(GetPrivacyRequest {}).await
            })
            .await?
        }
    };
    let who = match privacy.last_seen() {
        LastSeenVisibility::Everyone => "everyone",
        LastSeenVisibility::Contacts | LastSeenVisibility::Unspecified => "contacts",
        LastSeenVisibility::Nobody => "nobody",
    };
    println!("last seen visible to: {who}");
    Ok(ExitCode::SUCCESS)
}

/// `online`, `last seen HH:MM:SS` or `offline` (last seen hidden or unknown).
pub(super) fn state_text(presence: &Presence) -> String {
    if presence.online {
        return "online".to_owned();
    }
    if presence.last_seen_ms == 0 {
        return "offline".to_owned();
    }
    format!("last seen {}", show::time_of_day(presence.last_seen_ms))
}

/// The line `chat` prints when the peer's presence changes:
/// `— bob is online`, `— bob was last seen HH:MM:SS`, `— bob is offline`.
pub(super) fn chat_line(name: &str, presence: &Presence) -> String {
    let name = show::one_line(name);
    if presence.online {
        return format!("— {name} is online");
    }
    if presence.last_seen_ms == 0 {
        return format!("— {name} is offline");
    }
    format!(
        "— {name} was last seen {}",
        show::time_of_day(presence.last_seen_ms)
    )
}

/// A user id from a known name (learnt from the conversation list) or a
/// number. Unknown names are refused rather than looked up with `OpenDirect`,
/// which would create a conversation and so change who may see whom.
fn resolve(session: &Session, user: &str) -> anyhow::Result<i64> {
    if let Some(id) = session.known_user_id(user) {
        return Ok(id);
    }
    if let Ok(id) = user.parse::<i64>() {
        return Ok(id);
    }
    bail!(
        "unknown user {:?}: chat with them first, or give their user id",
        show::one_line(user)
    )
}

/// Runs an `Accounts` call with the token; on UNAUTHENTICATED refreshes once
/// and retries.
async fn call_accounts<T>(
    session: &mut Session,
    what: &str,
    mut op: impl AsyncFnMut(AccountsClient<Authed>) -> Result<tonic::Response<T>, Status>,
) -> anyhow::Result<T> {
    let client = AccountsClient::with_interceptor(session.channel(), session.bearer()?);
    match op(client).await {
        Ok(response) => return Ok(response.into_inner()),
        Err(status) if !session.may_refresh(&status) => {
            return Err(show::status_error(what, &status));
        }
        Err(_) => session.refresh().await?,
    }
    let client = AccountsClient::with_interceptor(session.channel(), session.bearer()?);
    let response = op(client)
        .await
        .map_err(|status| show::status_error(what, &status))?;
    Ok(response.into_inner())
}
