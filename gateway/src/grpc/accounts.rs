//! `Accounts`: register, log in, refresh, who am I.

use confab_proto::group::v1 as group;
use confab_proto::v1::accounts_server::Accounts;
use confab_proto::v1::{
    AuthResponse, LoginRequest, MeRequest, RefreshRequest, RegisterRequest, User,
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
        let LoginRequest { username, password } = request.into_inner();
        let request = group::VerifyPasswordRequest { username, password };
        let user = self.gateway.groups.clone().verify_password(request).await?;
        Ok(Response::new(self.auth_response(user.into_inner())))
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
}
