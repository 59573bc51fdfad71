//! What every scenario's clients do: open a live connection and wait for the end
//! of catch-up.

use anyhow::Context as _;
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{
    ClientFrame, Hello, MeRequest, OpenDirectRequest, SendAck, SendMessage, ServerFrame,
    client_frame, server_frame,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

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
}
