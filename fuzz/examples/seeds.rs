//! Writes the seed corpora, `corpus/<target>/seed-*`: a few valid frames of
//! every kind, in both encodings, WebSocket sessions mixing them with control
//! frames, and tokens (own, external, and near misses of both).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds` (from the root).
//! Rerun it when the frames change; tokens it mints are valid for 60 years.

use std::fs;
use std::path::Path;

use confab_common::auth::TokenType;
use confab_fuzz::{
    EXTERNAL_AUDIENCE, EXTERNAL_ISSUER, EXTERNAL_PRIVATE_KEY, client_frame_json, encode_web_call,
    encode_ws_messages, own_tokens, tokens_with_external,
};
use confab_gateway::fuzzing::{self, WebMethod, WsMessage};
use confab_proto::v1::{
    ClientFrame, CloseChannel, Delivered, Heartbeat, Hello, MarkRead, OpenChannel, Ping,
    Reauthenticate, RegisterRequest, SendMessage, SubmitRequest, Typing, WatchPresence,
    client_frame::Kind,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message as _;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let own = own_tokens();
    let access = own.mint_in_session(42, TokenType::Access, "s1").token;

    let frames = frames(&access);
    let json: Vec<String> = frames.iter().map(client_frame_json).collect();
    for (frame, text) in frames.iter().zip(&json) {
        // Every seed is a valid frame: the fuzzer starts from accepted input.
        assert_eq!(&fuzzing::decode_ws_text(text).expect("seed decodes"), frame);
    }
    write(
        &corpus.join("client_frame_binary"),
        frames.iter().map(ClientFrame::encode_to_vec),
    )?;
    write(
        &corpus.join("client_frame_json"),
        json.iter().map(|text| text.as_bytes().to_vec()),
    )?;

    let binary: Vec<Vec<u8>> = frames.iter().map(ClientFrame::encode_to_vec).collect();
    let sessions = [
        // A JSON client: hello, send, ping, a malformed frame, close.
        vec![
            WsMessage::Text(&json[0]),
            WsMessage::Text(&json[1]),
            WsMessage::Ping(b"p"),
            WsMessage::Text("{\"send\":"),
            WsMessage::Close,
        ],
        // A binary client that switches to text and back.
        vec![
            WsMessage::Binary(&binary[0]),
            WsMessage::Pong(&[]),
            WsMessage::Text(&json[2]),
            WsMessage::Binary(&[0xff, 0xff, 0xff]),
            WsMessage::Binary(&binary[3]),
        ],
        // Every frame kind in binary.
        binary
            .iter()
            .map(|bytes| WsMessage::Binary(bytes))
            .collect(),
    ];
    write(
        &corpus.join("ws_dispatch"),
        sessions.iter().map(|session| encode_ws_messages(session)),
    )?;

    write(&corpus.join("token_verify"), tokens(&access).into_iter())?;
    write(&corpus.join("grpc_web"), web_calls(&frames).into_iter())?;
    Ok(())
}

/// Returns one client frame of every kind.
fn frames(token: &str) -> Vec<ClientFrame> {
    let conversation_id = 1 << 40;
    let kinds = [
        Kind::Hello(Hello {
            token: token.to_owned(),
            device_id: "d1".into(),
            cursor: 42,
        }),
        Kind::Send(SendMessage {
            conversation_id,
            client_msg_id: "m-1".into(),
            text: "héllo 👋".into(),
        }),
        Kind::Ping(Ping { nonce: 7 }),
        Kind::Delivered(Delivered {
            conversation_id,
            up_to: 9_007_199_254_740_993,
        }),
        Kind::MarkRead(MarkRead {
            conversation_id,
            up_to: 5,
        }),
        Kind::OpenChannel(OpenChannel { conversation_id }),
        Kind::CloseChannel(CloseChannel { conversation_id }),
        Kind::Heartbeat(Heartbeat {}),
        Kind::WatchPresence(WatchPresence {
            user_ids: vec![1, 2, -3],
        }),
        Kind::Typing(Typing {
            conversation_id,
            typing: true,
        }),
        Kind::Reauthenticate(Reauthenticate {
            token: token.to_owned(),
        }),
    ];
    kinds
        .into_iter()
        .zip(1..)
        .map(|(kind, r#ref)| ClientFrame {
            r#ref,
            kind: Some(kind),
        })
        .collect()
}

/// Returns tokens the fuzz targets' services accept, and near misses.
fn tokens(access: &str) -> Vec<Vec<u8>> {
    let own = own_tokens();
    let refresh = own.mint_in_session(42, TokenType::Refresh, "s1").token;
    let legacy = own.mint(7, TokenType::Access).token;
    let external_key =
        EncodingKey::from_ed_pem(EXTERNAL_PRIVATE_KEY.as_bytes()).expect("the fuzz key parses");
    let external = |claims: serde_json::Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &external_key)
            .expect("ed25519 signing works")
    };
    let good_external = external(serde_json::json!({
        "sub": "carol", "exp": 4_000_000_000u64, "iat": 5,
        "iss": EXTERNAL_ISSUER, "aud": EXTERNAL_AUDIENCE,
    }));
    let wrong_audience = external(serde_json::json!({
        "sub": "carol", "exp": 4_000_000_000u64, "iss": EXTERNAL_ISSUER, "aud": "other",
    }));
    let expired = external(serde_json::json!({
        "sub": "carol", "exp": 1_000, "iss": EXTERNAL_ISSUER, "aud": EXTERNAL_AUDIENCE,
    }));
    let with_external = tokens_with_external();
    for accepted in [access, &legacy, &good_external] {
        with_external
            .verify_access(accepted)
            .expect("seed token verifies");
    }
    // alg none, with the claims of a valid token.
    let claims = access.split('.').nth(1).expect("a jwt has claims");
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    [
        access.to_owned(),
        refresh,
        legacy,
        good_external,
        wrong_audience,
        expired,
        unsigned,
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// Returns a valid call of every `grpc_web` method, in both modes.
fn web_calls(frames: &[ClientFrame]) -> Vec<Vec<u8>> {
    let hello = match &frames[0].kind {
        Some(Kind::Hello(hello)) => hello.clone(),
        _ => unreachable!("the first frame is the hello"),
    };
    let submit = SubmitRequest {
        device_id: "d1".into(),
        frame: Some(frames[2].clone()),
    };
    let register = RegisterRequest {
        username: "webby".into(),
        password: "correct horse battery staple".into(),
    };
    let send = match &frames[1].kind {
        Some(Kind::Send(send)) => send.clone(),
        _ => unreachable!("the second frame is a send"),
    };
    let calls = [
        (WebMethod::Subscribe, hello.encode_to_vec()),
        (WebMethod::Submit, submit.encode_to_vec()),
        (WebMethod::Register, register.encode_to_vec()),
        (WebMethod::Send, send.encode_to_vec()),
    ];
    [false, true]
        .into_iter()
        .flat_map(|text| {
            calls
                .iter()
                .map(move |(method, message)| encode_web_call(*method, text, message))
        })
        .collect()
}

/// Replaces the seeds of one corpus with `seeds` (inputs the fuzzer found stay).
fn write(dir: &Path, seeds: impl Iterator<Item = Vec<u8>>) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_seed = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("seed-"));
        if is_seed {
            fs::remove_file(path)?;
        }
    }
    for (n, seed) in seeds.enumerate() {
        fs::write(dir.join(format!("seed-{n:02}")), seed)?;
    }
    Ok(())
}
