//! The native gRPC transport: one `Edge.Stream` call.

use anyhow::{Context, Result};
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{ClientFrame, ServerFrame};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::Streaming;

use crate::accounts::Bearer;
use crate::conn::{Closed, Conn, Incoming, Transport};
use crate::{Account, Server};

/// A device on the gRPC stream.
pub type GrpcConn = Conn<GrpcTransport>;

/// Frames queued towards the server before it reads them.
const OUTBOUND_QUEUE: usize = 256;

/// The response side of the call.
#[derive(Debug)]
enum Inbound {
    /// The call is under way: a server may answer headers only after the
    /// `Hello`, so the call runs in a task while the first frames are queued.
    Opening(JoinHandle<Result<Streaming<ServerFrame>, Status>>),
    /// Frames flow.
    Open(Box<Streaming<ServerFrame>>),
    /// The stream ended; nothing more comes.
    Ended,
}

/// One `Edge.Stream` call.
#[derive(Debug)]
pub struct GrpcTransport {
    /// Dropped to half-close the request stream.
    outbound: Option<mpsc::Sender<ClientFrame>>,
    inbound: Inbound,
}

impl GrpcTransport {
    /// Opens the stream with `token` in the metadata (none with `None`).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn open(server: &Server, token: Option<&str>) -> Result<Self> {
        let channel = server.channel().await?;
        let mut client = EdgeClient::with_interceptor(channel, Bearer(token.map(str::to_owned)));
        let (outbound, frames) = mpsc::channel(OUTBOUND_QUEUE);
        let call = tokio::spawn(async move {
            let response = client.stream(ReceiverStream::new(frames)).await?;
            Ok(response.into_inner())
        });
        Ok(Self {
            outbound: Some(outbound),
            inbound: Inbound::Opening(call),
        })
    }

    /// Half-closes the request stream (the client is done sending).
    pub fn close_send(&mut self) {
        self.outbound = None;
    }
}

impl Transport for GrpcTransport {
    async fn send_frame(&mut self, frame: ClientFrame) -> Result<()> {
        let outbound = self
            .outbound
            .as_ref()
            .context("request stream already closed")?;
        outbound.send(frame).await.context("the call has ended")
    }

    async fn recv(&mut self) -> Result<Incoming> {
        if let Inbound::Opening(call) = &mut self.inbound {
            match call.await? {
                Ok(streaming) => self.inbound = Inbound::Open(Box::new(streaming)),
                Err(status) => {
                    self.inbound = Inbound::Ended;
                    return Ok(Incoming::Closed(closed_by(&status)));
                }
            }
        }
        let Inbound::Open(streaming) = &mut self.inbound else {
            return Ok(Incoming::Closed(Closed {
                detail: "already ended".to_owned(),
                ..Closed::default()
            }));
        };
        match streaming.message().await {
            Ok(Some(frame)) => Ok(Incoming::Frame(frame)),
            Ok(None) => {
                self.inbound = Inbound::Ended;
                Ok(Incoming::Closed(Closed {
                    grpc_code: Some(tonic::Code::Ok),
                    ..Closed::default()
                }))
            }
            Err(status) => {
                self.inbound = Inbound::Ended;
                Ok(Incoming::Closed(closed_by(&status)))
            }
        }
    }
}

fn closed_by(status: &Status) -> Closed {
    Closed {
        ws_close_code: None,
        grpc_code: Some(status.code()),
        detail: status.message().to_owned(),
    }
}

impl Conn<GrpcTransport> {
    /// Ends the device cleanly: half-closes the request stream and waits for
    /// the server to end the call.
    ///
    /// The server ends the call only after it has retired the connection (hub,
    /// sessions, presence), so whatever the close causes has happened by then.
    ///
    /// # Errors
    ///
    /// Fails when the call does not end within [`crate::WAIT`], or ends with an
    /// error status.
    pub async fn close(mut self) -> Result<()> {
        self.transport_mut().close_send();
        let (_frames, closed) = self.expect_closed().await?;
        anyhow::ensure!(
            closed.grpc_code == Some(tonic::Code::Ok),
            "the call ended with {closed:?}"
        );
        Ok(())
    }
}

impl Server {
    /// Opens a gRPC stream as `account` (no hello yet).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn grpc(&self, account: &Account) -> Result<GrpcConn> {
        Ok(Conn::new(
            GrpcTransport::open(self, Some(&account.access_token)).await?,
        ))
    }

    /// Opens a gRPC stream as `account` and syncs from `cursor`.
    ///
    /// # Errors
    ///
    /// Fails when the hello is not answered as it should be.
    pub async fn grpc_synced(
        &self,
        account: &Account,
        device_id: &str,
        cursor: u64,
    ) -> Result<(GrpcConn, crate::Synced)> {
        let mut conn = self.grpc(account).await?;
        let synced = conn.sync(device_id, cursor).await?;
        Ok((conn, synced))
    }
}
