//! The generated `Presences` gRPC trait on top of [`PresenceService`]: converts
//! between protobuf and domain types and maps errors to statuses, nothing else.

use confab_proto::presence::v1::presences_server::Presences;
use confab_proto::presence::v1::{
    DisconnectRequest, DisconnectResponse, GetPrivacyRequest, HeartbeatRequest, HeartbeatResponse,
    PrivacyResponse, QueryRequest, QueryResponse, SetPrivacyRequest, TypingRequest, TypingResponse,
};
use confab_proto::v1::{LastSeenVisibility, Presence};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::PresenceService;
use crate::error::PresenceError;
use crate::store::Visibility;

#[tonic::async_trait]
impl Presences for PresenceService {
    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        // The device id is not needed: (node, connection_id) names the
        // connection, and presence is per user.
        let HeartbeatRequest {
            user_id,
            connection_id,
            node,
            ..
        } = request.into_inner();
        PresenceService::heartbeat(self, user_id, &node, connection_id).await?;
        Ok(Response::new(HeartbeatResponse {}))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        let DisconnectRequest {
            user_id,
            connection_id,
            node,
            ..
        } = request.into_inner();
        PresenceService::disconnect(self, user_id, &node, connection_id).await;
        Ok(Response::new(DisconnectResponse {}))
    }

    #[instrument(skip_all, fields(watcher_id = request.get_ref().watcher_id, count = request.get_ref().user_ids.len()))]
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let QueryRequest {
            watcher_id,
            user_ids,
        } = request.into_inner();
        let result = PresenceService::query(self, watcher_id, &user_ids).await?;
        let presences = result
            .presences
            .into_iter()
            .map(|(user_id, online, last_seen_ms)| Presence {
                user_id,
                online,
                last_seen_ms,
            })
            .collect();
        Ok(Response::new(QueryResponse {
            presences,
            watchable_ids: result.watchable_ids,
        }))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id, conversation_id = request.get_ref().conversation_id))]
    async fn typing(
        &self,
        request: Request<TypingRequest>,
    ) -> Result<Response<TypingResponse>, Status> {
        let TypingRequest {
            user_id,
            conversation_id,
            typing,
        } = request.into_inner();
        PresenceService::typing(self, user_id, conversation_id, typing).await?;
        Ok(Response::new(TypingResponse {}))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn set_privacy(
        &self,
        request: Request<SetPrivacyRequest>,
    ) -> Result<Response<PrivacyResponse>, Status> {
        let SetPrivacyRequest { user_id, last_seen } = request.into_inner();
        let visibility = match LastSeenVisibility::try_from(last_seen) {
            Ok(LastSeenVisibility::Everyone) => Visibility::Everyone,
            Ok(LastSeenVisibility::Unspecified | LastSeenVisibility::Contacts) => {
                Visibility::Contacts
            }
            Ok(LastSeenVisibility::Nobody) => Visibility::Nobody,
            Err(_) => {
                return Err(PresenceError::InvalidArgument("unknown last-seen visibility").into());
            }
        };
        PresenceService::set_privacy(self, user_id, visibility).await?;
        Ok(Response::new(privacy_response(visibility)))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn get_privacy(
        &self,
        request: Request<GetPrivacyRequest>,
    ) -> Result<Response<PrivacyResponse>, Status> {
        let user_id = request.into_inner().user_id;
        let visibility = PresenceService::privacy(self, user_id).await?;
        Ok(Response::new(privacy_response(visibility)))
    }
}

fn privacy_response(visibility: Visibility) -> PrivacyResponse {
    let last_seen = match visibility {
        Visibility::Everyone => LastSeenVisibility::Everyone,
        Visibility::Contacts => LastSeenVisibility::Contacts,
        Visibility::Nobody => LastSeenVisibility::Nobody,
    };
    PrivacyResponse {
        last_seen: last_seen.into(),
    }
}
