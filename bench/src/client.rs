//! What every scenario's clients do: open a live connection (gRPC `Edge.Stream`
//! or WebSocket `/v1/ws`, see [`Transport`]) and wait for the end of catch-up.

use anyhow::Context as _;
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{
    ClientFrame, Hello, MeRequest, OpenDirectRequest, SendAck, SendMessage, ServerFrame,
    client_frame, server_frame,
};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tonic::transport::{Channel, Uri};

/// The servers one run drives: one server, or several gateways of one cluster
/// over which the clients spread (client `i` on server `i % n`).
#[derive(Debug, Clone)]
pub(crate) struct Servers(Vec<String>);

impl Servers {
    /// Wraps the URLs of `--server`.
    ///
    /// # Errors
    ///
    /// Fails when there is no URL or an empty one.
    pub(crate) fn new(urls: Vec<String>) -> anyhow::Result<Self> {
        let urls: Vec<String> = urls.iter().map(|url| url.trim().to_owned()).collect();
        anyhow::ensure!(
            !urls.is_empty() && urls.iter().all(|url| !url.is_empty()),
            "--server needs at least one URL and no empty one"
        );
        Ok(Self(urls))
    }

    /// The server of set-up calls (registrations, conversations): the first.
    pub(crate) fn first(&self) -> &str {
        self.nth(0)
    }

    /// The server of client `i`, round-robin.
    pub(crate) fn nth(&self, i: usize) -> &str {
        &self.0[i % self.0.len()]
    }

    /// Every URL, in the order given.
    pub(crate) fn urls(&self) -> &[String] {
        &self.0
    }

    /// Checks, before anyone registers, that every server can be reached over
    /// `transport` (a WebSocket URL for each).
    ///
    /// # Errors
    ///
    /// Fails as [`ws_url`] for the first server that has none.
    pub(crate) fn check(&self, transport: Transport) -> anyhow::Result<()> {
        if transport == Transport::Ws {
            for url in self.urls() {
                ws_url(url)?;
            }
        }
        Ok(())
    }
}

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
    open_on(channel, token).await
}

/// Opens a live connection on `channel` (a TCP connection of its own) and waits
/// until its catch-up is complete.
pub(crate) async fn open_on(
    channel: Channel,
    token: &str,
) -> anyhow::Result<(mpsc::Sender<ClientFrame>, Inbound)> {
    let (out, mut inbound) = stream_on(channel, token, "bench", 0).await?;
    loop {
        let frame = inbound.next().await.context("stream ended before sync")??;
        if let Some(server_frame::Kind::Synced(_)) = frame.kind {
            return Ok((out, inbound));
        }
    }
}

/// Opens a live connection for `device_id` that resumes after `cursor`, and
/// returns at once: the caller reads the catch-up events and the `Synced` frame.
pub(crate) async fn connect(
    server: &str,
    token: &str,
    device_id: &str,
    cursor: u64,
) -> anyhow::Result<(mpsc::Sender<ClientFrame>, Inbound)> {
    let channel = Channel::from_shared(server.to_owned())?.connect().await?;
    stream_on(channel, token, device_id, cursor).await
}

/// Starts `Edge.Stream` on `channel` with the `Hello` of `device_id` and `cursor`.
async fn stream_on(
    channel: Channel,
    token: &str,
    device_id: &str,
    cursor: u64,
) -> anyhow::Result<(mpsc::Sender<ClientFrame>, Inbound)> {
    let (out, frames) = mpsc::channel(1024);
    out.send(ClientFrame {
        r#ref: 0,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: device_id.into(),
            cursor,
        })),
    })
    .await?;
    let request = authorized(ReceiverStream::new(frames), token)?;
    let inbound = EdgeClient::new(channel).stream(request).await?.into_inner();
    Ok((out, inbound))
}

/// The live connection a scenario's clients hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// gRPC `Edge.Stream` (HTTP/2, one TCP connection per client).
    Grpc,
    /// WebSocket `GET /v1/ws` with binary protobuf frames.
    Ws,
}

impl Transport {
    /// The flag value, as the connections workers are given it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Ws => "ws",
        }
    }
}

/// Returns the host and port of the server URL `server` (by its scheme when it
/// names no port: 443 for https, else 80).
///
/// # Errors
///
/// Fails when `server` is not a URL with a host.
pub(crate) fn host_port(server: &str) -> anyhow::Result<(String, u16)> {
    let uri: Uri = server
        .parse()
        .with_context(|| format!("bad server URL {server:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("no host in {server:?}"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Ok((host.to_owned(), port))
}

/// Returns the WebSocket URL of the gateway whose gRPC URL is `server`:
/// `http://host:port` → `ws://host:port/v1/ws`.
///
/// # Errors
///
/// Fails when `server` is not an `http://` URL with a host.
pub(crate) fn ws_url(server: &str) -> anyhow::Result<String> {
    let uri: Uri = server
        .parse()
        .with_context(|| format!("bad server URL {server:?}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--transport ws needs an http:// server URL (no TLS here), not {server:?}"
    );
    let authority = uri
        .authority()
        .with_context(|| format!("no host in {server:?}"))?;
    Ok(format!("ws://{authority}/v1/ws"))
}

/// The WebSocket client's buffers: small, so that the generator stays lean
/// (tungstenite's default is 128 KiB each way per connection).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
}

/// One WebSocket live connection.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to the gateway of `server` on a TCP connection of its own
/// and waits until its catch-up is complete.
///
/// # Errors
///
/// Fails when `server` is no `http://` URL, or as [`open_ws_on`].
pub(crate) async fn open_ws(server: &str, token: &str) -> anyhow::Result<Ws> {
    let url = ws_url(server)?;
    let (host, port) = host_port(server)?;
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {server}"))?;
    // As tonic's channels do: frames go out when written.
    stream.set_nodelay(true)?;
    open_ws_on(stream, &url, token).await
}

/// Upgrades `stream` to a WebSocket at `url` with the token in the upgrade's
/// `Authorization` header, says `Hello` in a binary frame, and waits until its
/// catch-up is complete.
///
/// # Errors
///
/// Fails when the upgrade is refused, or the server ends the connection or
/// sends a fatal error before `Synced`.
pub(crate) async fn open_ws_on(stream: TcpStream, url: &str, token: &str) -> anyhow::Result<Ws> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("token is not a header value")?,
    );
    let (mut socket, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .with_context(|| format!("WebSocket upgrade at {url}"))?;
    let hello = ClientFrame {
        r#ref: 0,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "bench".into(),
            cursor: 0,
        })),
    };
    socket
        .send(Message::Binary(hello.encode_to_vec().into()))
        .await?;
    loop {
        let message = socket
            .next()
            .await
            .context("WebSocket ended before sync")?
            .context("WebSocket before sync")?;
        match message {
            Message::Binary(bytes) => match ServerFrame::decode(bytes)?.kind {
                Some(server_frame::Kind::Synced(_)) => return Ok(socket),
                Some(server_frame::Kind::Error(error)) if error.fatal => {
                    anyhow::bail!("refused before sync: {} ({})", error.message, error.reason)
                }
                _ => {}
            },
            Message::Close(close) => anyhow::bail!("WebSocket closed before sync: {close:?}"),
            _ => {}
        }
    }
}

/// One synced live connection over either transport, as a scenario drives it:
/// frames out, frames in.
#[derive(Debug)]
pub(crate) enum Live {
    /// `Edge.Stream`: frames out through the request stream's channel.
    Grpc {
        out: mpsc::Sender<ClientFrame>,
        inbound: Inbound,
    },
    /// `/v1/ws`: binary protobuf frames both ways.
    Ws(Ws),
}

impl Live {
    /// Opens a live connection to `server` over `transport`, on a TCP
    /// connection of its own, and waits until its catch-up is complete.
    ///
    /// # Errors
    ///
    /// Fails as [`open`] or [`open_ws`].
    pub(crate) async fn open(
        transport: Transport,
        server: &str,
        token: &str,
    ) -> anyhow::Result<Self> {
        Ok(match transport {
            Transport::Grpc => {
                let (out, inbound) = open(server, token).await?;
                Self::Grpc { out, inbound }
            }
            Transport::Ws => Self::Ws(open_ws(server, token).await?),
        })
    }

    /// Sends one frame.
    ///
    /// # Errors
    ///
    /// Fails when the connection is gone.
    pub(crate) async fn send(&mut self, frame: ClientFrame) -> anyhow::Result<()> {
        match self {
            Self::Grpc { out, .. } => out.send(frame).await.context("live connection closed")?,
            Self::Ws(socket) => {
                socket
                    .send(Message::Binary(frame.encode_to_vec().into()))
                    .await?
            }
        }
        Ok(())
    }

    /// Returns the server's next frame, or `None` once the connection ended.
    /// WebSocket control frames are skipped (reading answers pings). It is
    /// cancel-safe: it awaits nothing but the next frame, so a `select!` that
    /// drops it loses none.
    pub(crate) async fn next(&mut self) -> Option<anyhow::Result<ServerFrame>> {
        match self {
            Self::Grpc { inbound, .. } => Some(inbound.next().await?.map_err(Into::into)),
            Self::Ws(socket) => loop {
                match socket.next().await? {
                    Ok(Message::Binary(bytes)) => {
                        return Some(ServerFrame::decode(bytes).map_err(Into::into));
                    }
                    Ok(Message::Close(_)) => return None,
                    // Text frames come only to clients that send text.
                    Ok(_) => {}
                    Err(error) => return Some(Err(error.into())),
                }
            },
        }
    }

    /// Ends the connection as a client that is done: the end of the request
    /// stream, or a WebSocket close frame.
    pub(crate) async fn close(self) {
        if let Self::Ws(mut socket) = self {
            // The server may be gone already; there is nothing left to tell it.
            let _ = socket.close(None).await;
        }
    }
}

/// Returns an HS256 token for `subject`, as an app's identity provider would mint.
pub(crate) fn mint(secret: &str, subject: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({ "sub": subject, "exp": exp });
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Mints a token for an external user and returns it with the user's id
/// (the first authenticated call creates the user).
pub(crate) async fn external_user(
    channel: &Channel,
    secret: &str,
    subject: &str,
) -> anyhow::Result<(String, i64)> {
    let token = mint(secret, subject)?;
    let me = AccountsClient::new(channel.clone())
        .me(authorized(MeRequest {}, &token)?)
        .await?
        .into_inner();
    Ok((token, me.id))
}

/// Sends one message through the unary `Conversations.Send`; a refusal of the
/// server's per-user rate limit is retried after the wait it names (run the
/// server with raised `--send-per-second`/`--send-burst` to measure it, not them).
pub(crate) async fn send_unary(
    client: &mut ConversationsClient<Channel>,
    message: SendMessage,
    token: &str,
) -> anyhow::Result<SendAck> {
    loop {
        match client.send(authorized(message.clone(), token)?).await {
            Ok(ack) => return Ok(ack.into_inner()),
            Err(status) => {
                let wait_ms = status
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
                let Some(wait_ms) = wait_ms else {
                    return Err(status.into());
                };
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            }
        }
    }
}

/// Opens a direct conversation between two users and returns its id.
pub(crate) async fn direct(channel: &Channel, token: &str, peer_id: i64) -> anyhow::Result<i64> {
    let request = OpenDirectRequest {
        user_id: peer_id,
        username: String::new(),
    };
    let conversation = ConversationsClient::new(channel.clone())
        .open_direct(authorized(request, token)?)
        .await?
        .into_inner();
    Ok(conversation.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_spread_round_robin_over_the_servers() {
        let servers = Servers::new(vec!["http://a:1".into(), " http://b:2 ".into()]).unwrap();
        assert_eq!(servers.first(), "http://a:1");
        let picked: Vec<&str> = (0..5).map(|i| servers.nth(i)).collect();
        assert_eq!(
            picked,
            [
                "http://a:1",
                "http://b:2",
                "http://a:1",
                "http://b:2",
                "http://a:1"
            ]
        );
        let one = Servers::new(vec!["http://a:1".into()]).unwrap();
        assert!((0..3).all(|i| one.nth(i) == "http://a:1"));
    }

    #[test]
    fn no_server_or_an_empty_one_is_refused() {
        assert!(Servers::new(Vec::new()).is_err());
        assert!(Servers::new(vec!["http://a:1".into(), String::new()]).is_err());
    }

    #[test]
    fn transports_are_named_as_their_flag() {
        use clap::ValueEnum as _;
        for transport in Transport::value_variants() {
            let name = transport.to_possible_value().unwrap();
            assert_eq!(name.get_name(), transport.name());
            assert_eq!(
                serde_json::to_value(transport).unwrap(),
                serde_json::json!(transport.name())
            );
        }
    }

    #[test]
    fn the_websocket_url_is_on_the_grpc_host_and_port() {
        assert_eq!(
            ws_url("http://127.0.0.1:7600").unwrap(),
            "ws://127.0.0.1:7600/v1/ws"
        );
        assert_eq!(
            ws_url("http://chat.example:80/").unwrap(),
            "ws://chat.example:80/v1/ws"
        );
        assert_eq!(
            ws_url("http://[::1]:7600").unwrap(),
            "ws://[::1]:7600/v1/ws"
        );
        assert!(ws_url("https://chat.example").is_err());
        assert!(ws_url("127.0.0.1:7600").is_err());
    }

    #[test]
    fn the_port_defaults_by_scheme_and_brackets_leave_the_host() {
        let host_port = |url| host_port(url).unwrap();
        assert_eq!(host_port("http://a:1"), ("a".to_owned(), 1));
        assert_eq!(host_port("http://a"), ("a".to_owned(), 80));
        assert_eq!(host_port("https://a"), ("a".to_owned(), 443));
        assert_eq!(host_port("http://[::1]:7600"), ("::1".to_owned(), 7600));
        assert!(super::host_port("/no/host").is_err());
    }
}
