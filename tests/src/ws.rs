//! The WebSocket transport: binary protobuf frames or proto3 JSON text frames.

use anyhow::{Context, Result, bail};
use confab_proto::v1::{ClientFrame, ServerFrame};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::conn::{Closed, Conn, Incoming, Transport};
use crate::{Account, Server, json};

/// A device on the WebSocket.
pub type WsConn = Conn<WsTransport>;

/// How frames are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary frames of protobuf.
    Binary,
    /// Text frames of the proto3 JSON mapping.
    Json,
}

/// Where the upgrade request carries the token.
#[derive(Debug, Clone, Copy)]
pub enum WsAuth<'a> {
    /// `Authorization: Bearer <token>`.
    Header(&'a str),
    /// `?access_token=<token>`.
    Query(&'a str),
    /// Nowhere: the token goes in the `Hello`.
    None,
}

/// One WebSocket connection.
#[derive(Debug)]
pub struct WsTransport {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    encoding: Encoding,
}

impl WsTransport {
    /// Connects to `/v1/ws`.
    ///
    /// # Errors
    ///
    /// Fails when the upgrade is refused; [`upgrade_status`] tells the status.
    pub async fn connect(server: &Server, auth: WsAuth<'_>, encoding: Encoding) -> Result<Self> {
        let request = upgrade_request(server, auth)?;
        let (socket, _response) = tokio_tungstenite::connect_async(request)
            .await
            .context("websocket upgrade")?;
        Ok(Self { socket, encoding })
    }

    /// Sends a raw WebSocket message (malformed or oversized frames).
    ///
    /// # Errors
    ///
    /// Fails when the socket does.
    pub async fn send_raw(&mut self, message: Message) -> Result<()> {
        self.socket.send(message).await.context("websocket send")
    }
}

impl Transport for WsTransport {
    async fn send_frame(&mut self, frame: ClientFrame) -> Result<()> {
        let message = match self.encoding {
            Encoding::Binary => Message::Binary(frame.encode_to_vec().into()),
            Encoding::Json => Message::Text(json::client_frame(&frame).to_string().into()),
        };
        self.send_raw(message).await
    }

    async fn recv(&mut self) -> Result<Incoming> {
        loop {
            let Some(read) = self.socket.next().await else {
                return Ok(Incoming::Closed(closed(
                    "stream ended without a close frame",
                )));
            };
            let message = match read {
                Ok(message) => message,
                Err(error) => return Ok(Incoming::Closed(closed(&format!("read error: {error}")))),
            };
            match message {
                Message::Binary(bytes) => {
                    if self.encoding == Encoding::Json {
                        bail!("binary frame on a JSON connection");
                    }
                    let frame = ServerFrame::decode(bytes).context("decoding a server frame")?;
                    return Ok(Incoming::Frame(frame));
                }
                Message::Text(text) => {
                    if self.encoding == Encoding::Binary {
                        bail!("text frame on a binary connection: {}", text.as_str());
                    }
                    return Ok(Incoming::Frame(json::parse_server_frame(text.as_str())?));
                }
                Message::Close(frame) => {
                    return Ok(Incoming::Closed(Closed {
                        ws_close_code: frame.as_ref().map(|frame| u16::from(frame.code)),
                        grpc_code: None,
                        detail: frame
                            .map(|frame| frame.reason.to_string())
                            .unwrap_or_default(),
                    }));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }
}

fn closed(detail: &str) -> Closed {
    Closed {
        detail: detail.to_owned(),
        ..Closed::default()
    }
}

fn upgrade_request(
    server: &Server,
    auth: WsAuth<'_>,
) -> Result<tungstenite::handshake::client::Request> {
    let url = match auth {
        WsAuth::Query(token) => format!("{}?access_token={token}", server.ws_url()),
        WsAuth::Header(_) | WsAuth::None => server.ws_url(),
    };
    let mut request = url.into_client_request()?;
    if let WsAuth::Header(token) = auth {
        let value = format!("Bearer {token}")
            .parse()
            .context("token is not a header value")?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// Returns the HTTP status the server answers an upgrade with (101 on success).
///
/// # Errors
///
/// Fails when the server cannot be reached at all.
pub async fn upgrade_status(server: &Server, auth: WsAuth<'_>) -> Result<u16> {
    upgrade_status_from(server, auth, None).await
}

/// Returns the HTTP status of an upgrade sent as a browser page of `origin`
/// would send it (no `Origin` header with `None`, as native clients do).
///
/// # Errors
///
/// Fails when the server cannot be reached at all.
pub async fn upgrade_status_from(
    server: &Server,
    auth: WsAuth<'_>,
    origin: Option<&str>,
) -> Result<u16> {
    let mut request = upgrade_request(server, auth)?;
    if let Some(origin) = origin {
        let value = origin.parse().context("origin is not a header value")?;
        request.headers_mut().insert(http::header::ORIGIN, value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_socket, response)) => Ok(response.status().as_u16()),
        Err(tungstenite::Error::Http(response)) => Ok(response.status().as_u16()),
        Err(error) => Err(error).context("websocket upgrade"),
    }
}

impl Server {
    /// Opens a WebSocket as `account` (token in the header; no hello yet).
    ///
    /// # Errors
    ///
    /// Fails when the upgrade is refused.
    pub async fn ws(&self, account: &Account, encoding: Encoding) -> Result<WsConn> {
        let transport =
            WsTransport::connect(self, WsAuth::Header(&account.access_token), encoding).await?;
        Ok(Conn::new(transport))
    }

    /// Opens a WebSocket as `account` and syncs from `cursor`.
    ///
    /// # Errors
    ///
    /// Fails when the hello is not answered as it should be.
    pub async fn ws_synced(
        &self,
        account: &Account,
        encoding: Encoding,
        device_id: &str,
        cursor: u64,
    ) -> Result<(WsConn, crate::Synced)> {
        let mut conn = self.ws(account, encoding).await?;
        let synced = conn.sync(device_id, cursor).await?;
        Ok((conn, synced))
    }
}
