//! Bearer tokens to callers, the same way for every transport.
//!
//! A token is first verified by [`TokenService`] (signature with the pinned
//! algorithm, key id, issuer, expiry with the leeway, type), then group-svc is
//! asked whether a logout revoked it (`CheckToken`: the user's watermark and
//! revoked sessions). That call is what makes a logout effective at once on
//! every gateway for new connections and unary calls; live connections are
//! closed through the hub (see `hub.rs`). The subject of an external
//! identity provider's token is first turned into its Confab user
//! (`EnsureUser`, kept in [`ExternalUsers`] once known).

use std::collections::HashMap;

use confab_common::auth::{Subject, Verified};
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::{CheckTokenRequest, EnsureUserRequest};
use parking_lot::Mutex;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::Gateway;

/// The one terse message every refused token gets, whatever the cause: a client
/// learns nothing from it but that it must log in or refresh.
pub(crate) const REFUSED: &str = "invalid or expired token";

/// Who a valid, unrevoked token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The Confab user.
    pub(crate) user_id: i64,
    /// The token's session (see [`Verified::session`]): what a logout of this
    /// device revokes, and which live connections it closes.
    pub(crate) session: String,
    /// When the token was minted (ms since the Unix epoch): a logout from all
    /// devices closes connections opened with tokens minted before it.
    pub(crate) issued_at_ms: i64,
    /// When the token expires (ms since the Unix epoch, leeway not added): a
    /// live connection is closed then unless it reauthenticates.
    pub(crate) expires_at_ms: i64,
}

/// Returns the token of an `Authorization: Bearer <token>` value.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Returns the caller an access token speaks for; subjects of a trusted external
/// identity provider are looked up (and created) by name.
///
/// # Errors
///
/// UNAUTHENTICATED with [`REFUSED`] for any token that is not a valid, unrevoked
/// access token of an existing user; UNAVAILABLE and the like when group-svc
/// cannot answer.
pub(crate) async fn caller(gateway: &Gateway, token: &str) -> Result<Caller, Status> {
    let groups = &gateway.groups;
    let verified = gateway.tokens.verify_access(token).map_err(|error| {
        tracing::debug!(%error, "token refused");
        Status::unauthenticated(REFUSED)
    })?;
    let user_id = match &verified.subject {
        Subject::User(id) => *id,
        Subject::External(username) => match gateway.external_users.get(username) {
            Some(id) => id,
            None => {
                let request = EnsureUserRequest {
                    username: username.clone(),
                };
                let user =
                    groups
                        .clone()
                        .ensure_user(request)
                        .await
                        .map_err(|status| match status.code() {
                            tonic::Code::InvalidArgument => Status::unauthenticated(REFUSED),
                            _ => status,
                        })?;
                let id = user.into_inner().id;
                gateway.external_users.insert(username, id);
                id
            }
        },
    };
    check_not_revoked(groups, user_id, &verified).await?;
    Ok(Caller {
        user_id,
        session: verified.session,
        issued_at_ms: verified.issued_at_ms,
        expires_at_ms: verified.expires_at_ms,
    })
}

/// Asks group-svc whether a logout revoked `verified` (a token of `user_id`).
///
/// # Errors
///
/// UNAUTHENTICATED with [`REFUSED`] when it did, or the user does not exist.
pub(crate) async fn check_not_revoked(
    groups: &GroupsClient<GrpcChannel>,
    user_id: i64,
    verified: &Verified,
) -> Result<confab_proto::v1::User, Status> {
    let request = CheckTokenRequest {
        user_id,
        session_id: verified.session.clone(),
        issued_at_ms: verified.issued_at_ms,
    };
    match groups.clone().check_token(request).await {
        Ok(user) => Ok(user.into_inner()),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::Unauthenticated | tonic::Code::NotFound
            ) =>
        {
            tracing::debug!(user_id, %status, "revoked token refused");
            Err(Status::unauthenticated(REFUSED))
        }
        Err(status) => Err(status),
    }
}

/// Returns the caller of the request's `authorization` metadata.
///
/// # Errors
///
/// UNAUTHENTICATED when the metadata is missing or its token is not valid.
pub(crate) async fn from_metadata(
    gateway: &Gateway,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| Status::unauthenticated(REFUSED))?;
    caller(gateway, token).await
}

/// The Confab user of each external subject this gateway has seen, so that a
/// token of an external identity provider costs one call to group-svc
/// (`CheckToken`) rather than two: every connection and every unary call asked
/// `EnsureUser` for the same answer. A subject's user never changes once made
/// (users are neither renamed nor deleted), so an entry never goes stale;
/// beyond `MAX_ENTRIES` the map starts over.
#[derive(Debug, Default)]
pub struct ExternalUsers {
    ids: Mutex<HashMap<String, i64>>,
}

impl ExternalUsers {
    /// Subjects kept (about 100 bytes each).
    const MAX_ENTRIES: usize = 100_000;

    fn get(&self, subject: &str) -> Option<i64> {
        self.ids.lock().get(subject).copied()
    }

    fn insert(&self, subject: &str, user_id: i64) {
        let mut ids = self.ids.lock();
        if ids.len() >= Self::MAX_ENTRIES {
            ids.clear();
        }
        ids.insert(subject.to_owned(), user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::{ExternalUsers, bearer};

    /// A subject's user is kept once seen; a full map starts over.
    #[test]
    fn external_users_are_kept_up_to_a_bound() {
        let users = ExternalUsers::default();
        assert_eq!(users.get("ann"), None);
        users.insert("ann", 7);
        assert_eq!(users.get("ann"), Some(7));
        for i in 1..ExternalUsers::MAX_ENTRIES {
            users.insert(&format!("u{i}"), 1);
        }
        assert_eq!(users.get("ann"), Some(7));
        users.insert("bob", 8);
        assert_eq!((users.get("ann"), users.get("bob")), (None, Some(8)));
        assert_eq!(users.ids.lock().len(), 1);
    }

    /// Only a non-empty bearer credential is taken.
    #[test]
    fn parses_bearer() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }
}
