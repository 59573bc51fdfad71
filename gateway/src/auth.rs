//! Bearer tokens to callers, the same way for every transport.
//!
//! A token is first verified by [`TokenService`] (signature with the pinned
//! algorithm, key id, issuer, expiry with the leeway, type), then group-svc is
//! asked whether a logout revoked it (`CheckToken`: the user's watermark and
//! revoked sessions). That call is what makes a logout effective at once on
//! every gateway for new connections and unary calls; live connections are
//! closed through the hub (see `hub.rs`).

use confab_common::auth::{Subject, TokenService, Verified};
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::{CheckTokenRequest, EnsureUserRequest};
use tonic::Status;
use tonic::metadata::MetadataMap;

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
pub(crate) async fn caller(
    tokens: &TokenService,
    groups: &GroupsClient<GrpcChannel>,
    token: &str,
) -> Result<Caller, Status> {
    let verified = tokens.verify_access(token).map_err(|error| {
        tracing::debug!(%error, "token refused");
        Status::unauthenticated(REFUSED)
    })?;
    let user_id = match &verified.subject {
        Subject::User(id) => *id,
        Subject::External(username) => {
            let request = EnsureUserRequest {
                username: username.clone(),
            };
            let user = groups
                .clone()
                .ensure_user(request)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => Status::unauthenticated(REFUSED),
                    _ => status,
                })?;
            user.into_inner().id
        }
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
    tokens: &TokenService,
    groups: &GroupsClient<GrpcChannel>,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| Status::unauthenticated(REFUSED))?;
    caller(tokens, groups, token).await
}

#[cfg(test)]
mod tests {
    use super::bearer;

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
