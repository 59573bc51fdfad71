//! `Accounts`: register, log in, refresh, who am I; privacy and presence queries.

use confab_proto::group::v1 as group;
use confab_proto::presence::v1 as presence;
use confab_proto::v1::accounts_server::Accounts;
use confab_proto::v1::{
    AuthResponse, GetPresenceRequest, GetPresenceResponse, GetPrivacyRequest, LoginRequest,
    MeRequest, Privacy, RefreshRequest, RegisterRequest, User,
};
use tonic::{Code, Request, Response, Status};

use super::EdgeApi;

#[tonic::async_trait]
impl Accounts for EdgeApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<AuthResponse>, Status> {
        let RegisterRequest { username, password } = request.into_inner();
        let request = group::CreateUserRequest { username, password };
        let user = self.gateway.groups.clone().create_user(request).await?;
        Ok(Response::new(self.auth_response(user.into_inner())))
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
            Ok(user) => Ok(Response::new(self.auth_response(user.into_inner()))),
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
        let user_id = self
            .gateway
            .tokens
            .verify_refresh(&token)
            .map_err(|_| Status::unauthenticated(crate::auth::REFUSED))?;
        // A refresh token of a user that no longer exists is as good as none.
        let user = self
            .user(user_id)
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => Status::unauthenticated(crate::auth::REFUSED),
                _ => status,
            })?;
        Ok(Response::new(self.auth_response(user)))
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
