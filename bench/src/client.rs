//! What every scenario's clients do: open a live connection and wait for the end
//! of catch-up.

use anyhow::Context as _;
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{ClientFrame, Hello, ServerFrame, client_frame, server_frame};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// The server's frames on one live connection.
pub(crate) type Inbound = tonic::Streaming<ServerFrame>;

/// Adds `authorization: Bearer <token>` to a request.
pub(crate) fn authorized<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Opens a live connection and waits until its catch-up is complete.
/// Each live connection gets its own TCP connection, as each real device has.
pub(crate) async fn open(
    server: &str,
    token: &str,
) -> anyhow::Result<(mpsc::Sender<ClientFrame>, Inbound)> {
    let channel = Channel::from_shared(server.to_owned())?.connect().await?;
    let (out, frames) = mpsc::channel(1024);
    out.send(ClientFrame {
        r#ref: 0,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "bench".into(),
            cursor: 0,
        })),
    })
    .await?;
    let request = authorized(ReceiverStream::new(frames), token)?;
    let mut inbound = EdgeClient::new(channel).stream(request).await?.into_inner();
    loop {
        let frame = inbound.next().await.context("stream ended before sync")??;
        if let Some(server_frame::Kind::Synced(_)) = frame.kind {
            return Ok((out, inbound));
        }
    }
}
