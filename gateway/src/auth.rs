//! Bearer tokens to user ids, the same way for every transport.

use confab_common::auth::{Subject, TokenService};
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::EnsureUserRequest;
use confab_proto::group::v1::groups_client::GroupsClient;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The one terse message every refused token gets, whatever the cause: a client
/// learns nothing from it but that it must log in or refresh.
pub(crate) const REFUSED: &str = "invalid or expired token";

/// Returns the token of an `Authorization: Bearer <token>` value.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Returns the user an access token speaks for; subjects of a trusted external
/// identity provider are looked up (and created) by name.
///
/// # Errors
///
/// UNAUTHENTICATED for any token that is not a valid access token.
pub(crate) async fn user_id(
    tokens: &TokenService,
    groups: &GroupsClient<GrpcChannel>,
    token: &str,
) -> Result<i64, Status> {
    match tokens.verify_access(token) {
        Ok(Subject::User(id)) => Ok(id),
        Ok(Subject::External(username)) => {
            let user = groups
                .clone()
                .ensure_user(EnsureUserRequest { username })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => Status::unauthenticated(REFUSED),
                    _ => status,
                })?;
            Ok(user.into_inner().id)
        }
        Err(error) => {
            tracing::debug!(%error, "token refused");
            Err(Status::unauthenticated(REFUSED))
        }
    }
}

/// Returns the user of the request's `authorization` metadata.
///
/// # Errors
///
/// UNAUTHENTICATED when the metadata is missing or its token is not valid.
pub(crate) async fn from_metadata(
    tokens: &TokenService,
    groups: &GroupsClient<GrpcChannel>,
    metadata: &MetadataMap,
) -> Result<i64, Status> {
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| Status::unauthenticated(REFUSED))?;
    user_id(tokens, groups, token).await
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
