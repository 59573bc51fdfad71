//! The generated `Sessions` gRPC trait on top of [`SessionService`]: converts
//! between protobuf and domain types and maps errors to statuses, nothing else.

use confab_proto::session::v1::sessions_server::Sessions;
use confab_proto::session::v1::{
    self as proto, AcquireNodeIdRequest, AcquireNodeIdResponse, LookupUsersRequest,
    LookupUsersResponse, RegisterDeviceRequest, RegisterDeviceResponse, UnregisterDeviceRequest,
    UnregisterDeviceResponse,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::SessionService;
use crate::registry::LiveDevice;

#[tonic::async_trait]
impl Sessions for SessionService {
    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn register_device(
        &self,
        request: Request<RegisterDeviceRequest>,
    ) -> Result<Response<RegisterDeviceResponse>, Status> {
        let RegisterDeviceRequest {
            user_id,
            device_id,
            node,
            connection_id,
        } = request.into_inner();
        let device = LiveDevice {
            user_id,
            device_id,
            node,
        };
        self.register(device, connection_id).await?;
        Ok(Response::new(RegisterDeviceResponse {}))
    }

    #[instrument(skip_all, fields(user_id = request.get_ref().user_id))]
    async fn unregister_device(
        &self,
        request: Request<UnregisterDeviceRequest>,
    ) -> Result<Response<UnregisterDeviceResponse>, Status> {
        let UnregisterDeviceRequest {
            user_id,
            device_id,
            node,
            connection_id,
        } = request.into_inner();
        let device = LiveDevice {
            user_id,
            device_id,
            node,
        };
        // Not removing a stale connection is success: the caller's connection is gone.
        self.unregister(&device, connection_id).await?;
        Ok(Response::new(UnregisterDeviceResponse {}))
    }

    #[instrument(skip_all, fields(count = request.get_ref().user_ids.len()))]
    async fn lookup_users(
        &self,
        request: Request<LookupUsersRequest>,
    ) -> Result<Response<LookupUsersResponse>, Status> {
        let found = self.lookup(&request.into_inner().user_ids);
        let devices = found.into_iter().map(proto::LiveDevice::from).collect();
        Ok(Response::new(LookupUsersResponse { devices }))
    }

    #[instrument(skip_all)]
    async fn acquire_node_id(
        &self,
        request: Request<AcquireNodeIdRequest>,
    ) -> Result<Response<AcquireNodeIdResponse>, Status> {
        let node_id = self.lease_node_id(&request.into_inner().holder)?;
        Ok(Response::new(AcquireNodeIdResponse {
            node_id: u32::from(node_id),
        }))
    }
}

impl From<LiveDevice> for proto::LiveDevice {
    fn from(device: LiveDevice) -> Self {
        Self {
            user_id: device.user_id,
            device_id: device.device_id,
            node: device.node,
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn register(device_id: &str, node: &str, connection_id: u64) -> Request<RegisterDeviceRequest> {
        Request::new(RegisterDeviceRequest {
            user_id: 7,
            device_id: device_id.into(),
            node: node.into(),
            connection_id,
        })
    }

    /// Register, lookup and a stale unregister work end to end through the gRPC
    /// trait; an empty device id is INVALID_ARGUMENT.
    #[tokio::test]
    async fn register_lookup_unregister() {
        let service = SessionService::new();
        service
            .register_device(register("phone", "gw-a", 1))
            .await
            .unwrap();
        service
            .register_device(register("phone", "gw-b", 2))
            .await
            .unwrap();
        let stale = UnregisterDeviceRequest {
            user_id: 7,
            device_id: "phone".into(),
            node: "gw-a".into(),
            connection_id: 1,
        };
        service
            .unregister_device(Request::new(stale))
            .await
            .unwrap();

        let lookup = LookupUsersRequest { user_ids: vec![7] };
        let devices = service
            .lookup_users(Request::new(lookup))
            .await
            .unwrap()
            .into_inner()
            .devices;
        let expected = proto::LiveDevice {
            user_id: 7,
            device_id: "phone".into(),
            node: "gw-b".into(),
        };
        assert_eq!(devices, vec![expected]);

        let status = service
            .register_device(register("", "gw-a", 3))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "device id must not be empty");
    }

    /// AcquireNodeId hands out distinct ids, the lowest first; clones of the service
    /// share the leases; the 1025th call is RESOURCE_EXHAUSTED.
    #[tokio::test]
    async fn acquire_node_id_unique_then_exhausted() {
        let service = SessionService::default();
        let clone = service.clone();
        let mut ids = Vec::new();
        for i in 0..1024 {
            let on = if i % 2 == 0 { &service } else { &clone };
            let request = Request::new(AcquireNodeIdRequest {
                holder: format!("node-{i}"),
            });
            ids.push(
                on.acquire_node_id(request)
                    .await
                    .unwrap()
                    .into_inner()
                    .node_id,
            );
        }
        assert_eq!(ids, (0..1024).collect::<Vec<u32>>());
        let request = Request::new(AcquireNodeIdRequest {
            holder: "late".into(),
        });
        let status = service.acquire_node_id(request).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
