//! `Accounts`: register, log in, refresh, log out, who am I; privacy and
//! presence queries.
//!
//! **Logout.** group-svc records the revocation first (the session, or the
//! user's "tokens minted before now are invalid" watermark), so that from then
//! on every gateway refuses those tokens at connect, on unary calls and on
//! refresh; then the hub closes the live connections that used them, here at
//! once and on the other gateways through the live bus.

use confab_proto::group::v1 as group;
use confab_proto::presence::v1 as presence;
use confab_proto::v1::accounts_server::Accounts;
use confab_proto::v1::{
    AuthResponse, GetPresenceRequest, GetPresenceResponse, GetPrivacyRequest, LoginRequest,
    LogoutRequest, LogoutResponse, MeRequest, Privacy, RefreshRequest, RegisterRequest, Revocation,
    User,
};
use tonic::{Code, Request, Response, Status};

use confab_common::auth::Subject;

use super::EdgeApi;

#[tonic::async_trait]
impl Accounts for EdgeApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let RegisterRequest { username, password } = request.into_inner();
        let request = group::CreateUserRequest { username, password };
        let user = self
            .gateway
            .groups
            .clone()
            .create_user(request)
            .await?
            .into_inner();
        let session = self.gateway.tokens.new_session(user.id);
        Ok(Response::new(self.auth_response(user, &session)))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let address = super::peer(&request);
        let LoginRequest { username, password } = request.into_inner();
        // Checked before the password: once throttled, even the right one waits.
        self.limits.login_allowed(&username, address)?;
        let request = group::VerifyPasswordRequest {
            username: username.clone(),
            password,
        };
        match self.gateway.groups.clone().verify_password(request).await {
            Ok(user) => {
                let user = user.into_inner();
                let session = self.gateway.tokens.new_session(user.id);
                Ok(Response::new(self.auth_response(user, &session)))
            }
            Err(status) => {
                if matches!(status.code(), Code::Unauthenticated | Code::NotFound) {
                    self.limits.login_failed(&username, address);
                }
                Err(status)
            }
        }
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let token = request.into_inner().refresh_token;
        let verified = self
            .gateway
            .tokens
            .verify_refresh(&token)
            .map_err(|_| Status::unauthenticated(crate::auth::REFUSED))?;
        let Subject::User(user_id) = verified.subject else {
            return Err(Status::unauthenticated(crate::auth::REFUSED));
        };
        // A logged-out session, or a user who no longer exists, is refused.
        let user = crate::auth::check_not_revoked(&self.gateway.groups, user_id, &verified).await?;
        // The new pair stays in the session, so that logging out ends it too.
        Ok(Response::new(self.auth_response(user, &verified.session)))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let caller = self.authenticated(&request).await?;
        let tokens = &self.gateway.tokens;
        let before_ms = confab_common::now_ms();
        // A token without a session (minted before sessions existed) can only be
        // revoked with every other token of the user.
        let all_devices = request.into_inner().all_devices || caller.session.is_empty();
        let session_id = if all_devices {
            String::new()
        } else {
            caller.session.clone()
        };
        // No token of the session outlives this: the refresh token of a pair
        // minted now, or the presented (external) token itself.
        let lifetime = i64::try_from(tokens.refresh_ttl().as_millis()).unwrap_or(i64::MAX);
        let leeway = i64::try_from(tokens.leeway().as_millis()).unwrap_or(0);
        let keep_until_ms = before_ms
            .saturating_add(lifetime)
            .max(caller.expires_at_ms)
            .saturating_add(leeway);
        let request = group::RevokeTokensRequest {
            user_id: caller.user_id,
            session_id: session_id.clone(),
            before_ms,
            keep_until_ms,
        };
        self.gateway.groups.clone().revoke_tokens(request).await?;
        let revocation = Revocation {
            session_id,
            before_ms,
        };
        self.gateway.hub.revoke(caller.user_id, revocation);
        tracing::info!(user_id = caller.user_id, all_devices, "logged out");
        Ok(Response::new(LogoutResponse {}))
    }

    async fn me(&self, request: Request<MeRequest>) -> Result<Response<User>, Status> {
        let user_id = self.caller(&request).await?;
        Ok(Response::new(self.user(user_id).await?))
    }

    async fn set_privacy(&self, request: Request<Privacy>) -> Result<Response<Privacy>, Status> {
        let user_id = self.caller(&request).await?;
        let request = presence::SetPrivacyRequest {
            user_id,
            last_seen: request.into_inner().last_seen,
        };
        let answer = self.gateway.presence.clone().set_privacy(request).await?;
        Ok(Response::new(Privacy {
            last_seen: answer.into_inner().last_seen,
        }))
    }

    async fn get_privacy(
        &self,
        request: Request<GetPrivacyRequest>,
    ) -> Result<Response<Privacy>, Status> {
        let user_id = self.caller(&request).await?;
        let request = presence::GetPrivacyRequest { user_id };
        let answer = self.gateway.presence.clone().get_privacy(request).await?;
        Ok(Response::new(Privacy {
            last_seen: answer.into_inner().last_seen,
        }))
    }

    async fn get_presence(
        &self,
        request: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        let watcher_id = self.caller(&request).await?;
        let request = presence::QueryRequest {
            watcher_id,
            user_ids: request.into_inner().user_ids,
        };
        let answer = self.gateway.presence.clone().query(request).await?;
        Ok(Response::new(GetPresenceResponse {
            presences: answer.into_inner().presences,
        }))
    }
}
