//! The browser's transport: gRPC-web over HTTP/1.1, through tonic-web's client
//! layer on a plain hyper HTTP/1.1 client (no HTTP/2 at all, as a browser's
//! `fetch` to a gateway without TLS). The live connection is an
//! `Edge.Subscribe` call opened with the hello; every other frame is an
//! `Edge.Submit` call, one after the other in the order sent (a browser client
//! awaits each), whose answer joins the subscription's frames.

use anyhow::{Context, Result};
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{ClientFrame, Error as ErrorFrame, ServerFrame, SubmitRequest};
use confab_proto::v1::{client_frame, server_frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic_web::{GrpcWebCall, GrpcWebClientLayer, GrpcWebClientService};

use crate::accounts::Bearer;
use crate::conn::{Closed, Conn, Incoming, Transport};
use crate::{Account, Server};

/// The generated `Edge` client over gRPC-web on HTTP/1.1, with a token.
pub type WebEdge = EdgeClient<
    InterceptedService<
        GrpcWebClientService<Client<HttpConnector, GrpcWebCall<tonic::body::Body>>>,
        Bearer,
    >,
>;

/// A device in a browser.
pub type WebConn = Conn<GrpcWebTransport>;

/// Returns an `Edge` client that speaks gRPC-web over HTTP/1.1 to `server`.
///
/// # Errors
///
/// Fails when the server's URL is not one.
pub fn web_edge(server: &Server, token: Option<&str>) -> Result<WebEdge> {
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let web = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http1);
    let origin = server.url().parse().context("server url")?;
    Ok(EdgeClient::with_origin(
        InterceptedService::new(web, Bearer(token.map(str::to_owned))),
        origin,
    ))
}

/// One browser device: its subscription and the calls that carry its frames.
#[derive(Debug)]
pub struct GrpcWebTransport {
    edge: WebEdge,
    /// Frames after the hello, to the task that submits them in order.
    submits: Option<mpsc::UnboundedSender<ClientFrame>>,
    /// What the subscription and the submit answers bring.
    incoming_tx: mpsc::UnboundedSender<Incoming>,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    /// The subscription's and the submitter's tasks, aborted on drop: the
    /// browser tab closes, its HTTP connections with it.
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for GrpcWebTransport {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl GrpcWebTransport {
    /// Prepares a device with `token` in every call's metadata (none with
    /// `None`); nothing is sent before the hello.
    ///
    /// # Errors
    ///
    /// Fails when the server's URL is not one.
    pub fn new(server: &Server, token: Option<&str>) -> Result<Self> {
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        Ok(Self {
            edge: web_edge(server, token)?,
            submits: None,
            incoming_tx,
            incoming,
            tasks: Vec::new(),
        })
    }

    /// Opens the subscription with `hello`, and the task that submits the
    /// device's later frames.
    fn subscribe(&mut self, hello: confab_proto::v1::Hello) {
        let device_id = hello.device_id.clone();
        let mut edge = self.edge.clone();
        let incoming = self.incoming_tx.clone();
        let subscription = tokio::spawn(async move {
            let mut frames = match edge.subscribe(hello).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    let _ = incoming.send(Incoming::Closed(closed_by(&status)));
                    return;
                }
            };
            let end = loop {
                match frames.message().await {
                    Ok(Some(frame)) => {
                        if incoming.send(Incoming::Frame(frame)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break Closed::ended_ok(),
                    Err(status) => break closed_by(&status),
                }
            };
            let _ = incoming.send(Incoming::Closed(end));
        });
        let (submits, mut queue) = mpsc::unbounded_channel::<ClientFrame>();
        let mut edge = self.edge.clone();
        let incoming = self.incoming_tx.clone();
        let submitter = tokio::spawn(async move {
            while let Some(frame) = queue.recv().await {
                let reference = frame.r#ref;
                let request = SubmitRequest {
                    device_id: device_id.clone(),
                    frame: Some(frame),
                };
                let answer = match edge.submit(request).await {
                    Ok(answer) => answer.into_inner(),
                    // The call itself failed: shown as a non-fatal error frame
                    // of reason `submit`, so that the test sees its code.
                    Err(status) => ServerFrame {
                        r#ref: reference,
                        kind: Some(server_frame::Kind::Error(ErrorFrame {
                            code: status.code() as i32,
                            reason: "submit".to_owned(),
                            message: status.message().to_owned(),
                            fatal: false,
                        })),
                    },
                };
                if incoming.send(Incoming::Frame(answer)).is_err() {
                    return;
                }
            }
        });
        self.submits = Some(submits);
        self.tasks.extend([subscription, submitter]);
    }
}

impl Transport for GrpcWebTransport {
    async fn send_frame(&mut self, frame: ClientFrame) -> Result<()> {
        if let Some(client_frame::Kind::Hello(hello)) = frame.kind {
            self.subscribe(hello);
            return Ok(());
        }
        let submits = self
            .submits
            .as_ref()
            .context("no subscription yet: send the hello first")?;
        submits.send(frame).context("the submitting task has ended")
    }

    async fn recv(&mut self) -> Result<Incoming> {
        self.incoming
            .recv()
            .await
            .context("the transport's tasks have ended")
    }
}

fn closed_by(status: &Status) -> Closed {
    Closed {
        ws_close_code: None,
        grpc_code: Some(status.code()),
        detail: status.message().to_owned(),
    }
}

impl Closed {
    /// A call that ended with status OK.
    fn ended_ok() -> Self {
        Self {
            grpc_code: Some(tonic::Code::Ok),
            ..Self::default()
        }
    }
}

impl Server {
    /// Prepares a browser device as `account` (no hello yet).
    ///
    /// # Errors
    ///
    /// Fails when the server's URL is not one.
    pub fn grpc_web(&self, account: &Account) -> Result<WebConn> {
        Ok(Conn::new(GrpcWebTransport::new(
            self,
            Some(&account.access_token),
        )?))
    }

    /// Opens a browser device's subscription as `account` from `cursor`.
    ///
    /// # Errors
    ///
    /// Fails when the hello is not answered as it should be.
    pub async fn grpc_web_synced(
        &self,
        account: &Account,
        device_id: &str,
        cursor: u64,
    ) -> Result<(WebConn, crate::Synced)> {
        let mut conn = self.grpc_web(account)?;
        let synced = conn.sync(device_id, cursor).await?;
        Ok((conn, synced))
    }
}

/// What a hand-written gRPC-web call got back.
#[derive(Debug, Clone)]
pub struct RawWebResponse {
    /// The HTTP status.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The messages of the body, decoded (base64 undone in text mode).
    pub messages: Vec<Vec<u8>>,
    /// The trailers frame's fields (names lower case), or the headers' for a
    /// trailers-only answer.
    pub trailers: Vec<(String, String)>,
}

impl RawWebResponse {
    /// The value of header `name`.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::http::field(&self.headers, name)
    }

    /// The call's `grpc-status`, from the trailers or a trailers-only answer.
    #[must_use]
    pub fn grpc_status(&self) -> Option<i32> {
        crate::http::field(&self.trailers, "grpc-status")
            .or_else(|| self.header("grpc-status"))
            .and_then(|code| code.parse().ok())
    }
}

/// Header or trailer fields: names (lower case) and values.
type Fields = Vec<(String, String)>;

/// The body of a gRPC-web request holding `message` (one frame: flag 0, length,
/// bytes), base64-encoded when `text`.
#[must_use]
pub fn web_body(message: &[u8], text: bool) -> Vec<u8> {
    web_body_declaring(message, message.len(), text)
}

/// Like [`web_body`], with a length prefix that says `declared` whatever the
/// message's real length.
#[must_use]
pub fn web_body_declaring(message: &[u8], declared: usize, text: bool) -> Vec<u8> {
    use base64::Engine as _;
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(declared).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(message);
    if text {
        base64::engine::general_purpose::STANDARD
            .encode(frame)
            .into_bytes()
    } else {
        frame
    }
}

/// Sends one gRPC-web call (or, with `OPTIONS`, its CORS preflight) by hand
/// over HTTP/1.1, as a browser's `fetch` puts it on the wire, and reads the
/// whole answer: base64 undone in the text mode, the body split into its
/// messages and trailers.
///
/// # Errors
///
/// Fails when the server does not answer within [`crate::WAIT`] or answers
/// something that is not HTTP/1.1 with a gRPC-web body.
pub async fn raw_web_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<RawWebResponse> {
    let raw = crate::http::request(addr, method, path, headers, body).await?;
    let content_type = raw.header("content-type").unwrap_or_default();
    let body = if content_type.starts_with("application/grpc-web-text") {
        decode_text(&raw.body)?
    } else {
        raw.body.clone()
    };
    // Anything else (a refusal before gRPC, a preflight) has no frames.
    let (messages, trailers) = if content_type.starts_with("application/grpc-web") {
        web_frames(&body)?
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(RawWebResponse {
        status: raw.status,
        headers: raw.headers,
        messages,
        trailers,
    })
}

/// Decodes a grpc-web-text body: base64 pieces, each padded on its own (the
/// server encodes every frame separately), so four characters at a time.
fn decode_text(body: &[u8]) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for quad in body.chunks(4) {
        out.extend(base64::engine::general_purpose::STANDARD.decode(quad)?);
    }
    Ok(out)
}

/// Splits a gRPC-web body into its messages and its trailers frame (flag bit 7).
fn web_frames(mut body: &[u8]) -> Result<(Vec<Vec<u8>>, Fields)> {
    let mut messages = Vec::new();
    let mut trailers = Vec::new();
    while !body.is_empty() {
        anyhow::ensure!(body.len() >= 5, "truncated frame header");
        let flag = body[0];
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        anyhow::ensure!(body.len() >= 5 + length, "truncated frame");
        let payload = &body[5..5 + length];
        if flag & 0x80 == 0 {
            messages.push(payload.to_vec());
        } else {
            trailers.extend(
                std::str::from_utf8(payload)?
                    .split("\r\n")
                    .filter_map(|line| line.split_once(':'))
                    .map(|(name, value)| {
                        (name.trim().to_ascii_lowercase(), value.trim().to_owned())
                    }),
            );
        }
        body = &body[5 + length..];
    }
    Ok((messages, trailers))
}
