//! What the fuzz targets in `fuzz_targets/` share: the properties they check,
//! the token services they verify against, and the framing that turns one
//! fuzz input into a sequence of WebSocket messages.
//!
//! - [`check_frame`]: a decoded client frame survives both encodings.
//! - [`check_token`]: token verification, own and external, agrees with itself.
//! - [`ws_messages`] / [`encode_ws_messages`]: the input format of `ws_dispatch`.
//! - [`web_call`] / [`encode_web_call`]: the input format of `grpc_web`.
//!
//! `examples/seeds.rs` writes the seed corpora with the same keys.

use std::sync::LazyLock;
use std::time::Duration;

use confab_common::auth::{ExternalIssuer, Subject, TokenService};
use confab_gateway::fuzzing::{self, WebMethod, WsMessage};
use confab_proto::v1::ClientFrame;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

/// The HS256 secret of the token service under test (fuzzing only).
pub const OWN_SECRET: &[u8] = b"confab-fuzz-secret-not-used-anywhere-else";

/// An Ed25519 key pair generated for the fuzz targets (openssl genpkey), used
/// nowhere else: the external identity provider's public key.
pub const EXTERNAL_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA3Xw//In/2Uf4e46tQj43P9nFUGIJOnRZm62A5YlEoNw=\n-----END PUBLIC KEY-----\n";
/// The private half of [`EXTERNAL_PUBLIC_KEY`], for the seed tokens.
pub const EXTERNAL_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJQSTdg0duFBP6arKtPVWGb+pl5Onrb6f/hkW/l+JceR\n-----END PRIVATE KEY-----\n";
/// The issuer and audience the external provider is pinned to.
pub const EXTERNAL_ISSUER: &str = "fuzz-idp";
/// See [`EXTERNAL_ISSUER`].
pub const EXTERNAL_AUDIENCE: &str = "confab";

/// Lifetime of the seed tokens: long enough that the corpus never expires.
pub const SEED_TTL: Duration = Duration::from_secs(60 * 365 * 24 * 3600);

/// Returns Confab's own token service, HS256 with [`OWN_SECRET`].
pub fn own_tokens() -> TokenService {
    TokenService::new(OWN_SECRET, SEED_TTL, SEED_TTL).expect("the fuzz secret is usable")
}

/// Returns [`own_tokens`] that also trusts the external Ed25519 provider.
pub fn tokens_with_external() -> TokenService {
    let external = ExternalIssuer::public_key(
        EXTERNAL_PUBLIC_KEY.as_bytes(),
        Some(EXTERNAL_ISSUER),
        Some(EXTERNAL_AUDIENCE),
    )
    .expect("the fuzz public key is usable");
    own_tokens().with_external(external)
}

static OWN: LazyLock<TokenService> = LazyLock::new(own_tokens);
static WITH_EXTERNAL: LazyLock<TokenService> = LazyLock::new(tokens_with_external);

/// Verifies `token` as an access and as a refresh token, with and without the
/// external provider. None may panic; a token Confab's own service accepts is
/// accepted the same way when an external provider is configured too (own
/// tokens are tried first), and whatever only the external provider accepts
/// names an external subject.
pub fn check_token(token: &str) {
    let own = OWN.verify_access(token);
    let with_external = WITH_EXTERNAL.verify_access(token);
    match (&own, &with_external) {
        (Ok(own), with_external) => {
            assert!(matches!(own.subject, Subject::User(_)), "{own:?}");
            assert_eq!(with_external.as_ref().ok(), Some(own));
        }
        (Err(_), Ok(external)) => {
            assert!(
                matches!(external.subject, Subject::External(_)),
                "{external:?}"
            );
        }
        (Err(_), Err(_)) => {}
    }
    let refresh = OWN.verify_refresh(token);
    assert!(
        !(own.is_ok() && refresh.is_ok()),
        "a token is both an access and a refresh token"
    );
    // External providers mint no refresh tokens.
    assert_eq!(WITH_EXTERNAL.verify_refresh(token).is_ok(), refresh.is_ok());
}

/// Checks what a decoded client frame must satisfy: its protobuf encoding
/// decodes back to it, and so does its proto3 JSON rendering (what a
/// WebSocket client is told to send is what the server reads).
pub fn check_frame(frame: &ClientFrame) {
    let bytes = frame.encode_to_vec();
    let binary = fuzzing::decode_ws_binary(&bytes).expect("a re-encoded frame decodes");
    assert_eq!(&binary, frame, "binary round trip");
    let json = client_frame_json(frame);
    let text = fuzzing::decode_ws_text(&json)
        .unwrap_or_else(|why| panic!("the json of a frame decodes: {why}: {json}"));
    assert_eq!(&text, frame, "json round trip through {json}");
}

static CLIENT_FRAME: LazyLock<MessageDescriptor> = LazyLock::new(|| {
    DescriptorPool::decode(confab_proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes")
        .get_message_by_name("confab.v1.ClientFrame")
        .expect("ClientFrame is in the embedded descriptor set")
});

/// Renders `frame` in its proto3 JSON form, as a client library would.
pub fn client_frame_json(frame: &ClientFrame) -> String {
    let mut message = DynamicMessage::new(CLIENT_FRAME.clone());
    message
        .transcode_from(frame)
        .expect("a ClientFrame transcodes to its own descriptor");
    serde_json::to_string(&message).expect("a dynamic message serializes to json")
}

/// Splits a fuzz input into WebSocket messages: each is a kind byte (modulo 5:
/// binary, text, ping, pong, close), a big-endian `u16` length, then that many
/// bytes of payload (fewer at the end of the input). A text payload that is not
/// UTF-8 ends the sequence, as the WebSocket layer closes such a connection
/// (1007) before anything is dispatched.
pub fn ws_messages(mut data: &[u8]) -> Vec<WsMessage<'_>> {
    let mut messages = Vec::new();
    while let Some((&kind, rest)) = data.split_first() {
        let (len, rest) = match rest {
            [high, low, rest @ ..] => (usize::from(u16::from_be_bytes([*high, *low])), rest),
            _ => (rest.len(), &[][..]),
        };
        let (payload, rest) = rest.split_at(len.min(rest.len()));
        data = rest;
        messages.push(match kind % 5 {
            0 => WsMessage::Binary(payload),
            1 => match std::str::from_utf8(payload) {
                Ok(text) => WsMessage::Text(text),
                Err(_) => break,
            },
            2 => WsMessage::Ping(payload),
            3 => WsMessage::Pong(payload),
            _ => WsMessage::Close,
        });
    }
    messages
}

/// Encodes `messages` in the input format [`ws_messages`] reads.
///
/// # Panics
///
/// Panics on a payload longer than 65,535 bytes.
pub fn encode_ws_messages(messages: &[WsMessage<'_>]) -> Vec<u8> {
    let mut data = Vec::new();
    for message in messages {
        let (kind, payload): (u8, &[u8]) = match message {
            WsMessage::Binary(bytes) => (0, bytes),
            WsMessage::Text(text) => (1, text.as_bytes()),
            WsMessage::Ping(bytes) => (2, bytes),
            WsMessage::Pong(bytes) => (3, bytes),
            WsMessage::Close => (4, &[]),
        };
        let len = u16::try_from(payload.len()).expect("a seed payload fits a u16");
        data.push(kind);
        data.extend_from_slice(&len.to_be_bytes());
        data.extend_from_slice(payload);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed encoding reads back as the messages it encodes.
    #[test]
    fn ws_framing_round_trips() {
        let messages = [
            WsMessage::Text("{}"),
            WsMessage::Binary(&[1, 2, 3]),
            WsMessage::Ping(&[]),
            WsMessage::Close,
        ];
        let data = encode_ws_messages(&messages);
        let read = ws_messages(&data);
        assert_eq!(format!("{read:?}"), format!("{messages:?}"));
    }
}

/// Splits one `grpc_web` input: the first byte picks the method (its low two
/// bits) and the mode (bit 2: base64 text), the rest is the request body.
pub fn web_call(data: &[u8]) -> Option<(WebMethod, bool, &[u8])> {
    let (&head, body) = data.split_first()?;
    let method = WebMethod::ALL[usize::from(head & 3)];
    Some((method, head & 4 != 0, body))
}

/// The `grpc_web` input that posts `message` (one gRPC-web frame) to `method`,
/// base64-encoded when `text`.
pub fn encode_web_call(method: WebMethod, text: bool, message: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let index = WebMethod::ALL
        .iter()
        .position(|m| *m == method)
        .expect("a known method");
    let mut frame = vec![0];
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .expect("a small message")
            .to_be_bytes(),
    );
    frame.extend_from_slice(message);
    let body = if text {
        base64::engine::general_purpose::STANDARD
            .encode(frame)
            .into_bytes()
    } else {
        frame
    };
    let mut input = vec![u8::try_from(index).expect("four methods") | (u8::from(text) << 2)];
    input.extend(body);
    input
}
