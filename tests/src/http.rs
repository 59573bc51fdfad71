//! A tiny HTTP/1.1 client: `GET /metrics` and `GET /healthz`, and any request
//! written by hand (a browser's gRPC-web call, its CORS preflight).

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

/// An HTTP response: status and body as text.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (chunked encoding undone).
    pub body: String,
}

/// Sends `GET path` with `Connection: close` and reads the whole response.
///
/// # Errors
///
/// Fails when the server does not answer within [`crate::WAIT`] or answers garbage.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    let raw = request(addr, "GET", path, &[], b"").await?;
    let body = String::from_utf8(raw.body).context("response is not utf-8")?;
    Ok(Response {
        status: raw.status,
        body,
    })
}

/// An HTTP response as bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name` (lower case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }
}

/// Returns the value of field `name` among `fields` (names lower case).
#[must_use]
pub fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Sends one request by hand (`Connection: close`, `Content-Length`, then
/// `headers` after `Host`) and reads the whole response.
///
/// # Errors
///
/// Fails when the server does not answer within [`crate::WAIT`] or answers
/// something that is not HTTP/1.1.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<RawResponse> {
    tokio::time::timeout(WAIT, exchange(addr, method, path, headers, body))
        .await
        .with_context(|| format!("{method} {path} timed out"))?
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<RawResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not utf-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if field(&headers, "transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Undoes HTTP/1.1 chunked transfer coding.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .context("truncated chunk")?;
        let size_line = std::str::from_utf8(&rest[..line_end])?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("chunk size {size_line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let Some(chunk) = rest.get(..size) else {
            bail!("chunk shorter than {size}");
        };
        body.extend_from_slice(chunk);
        rest = rest[size..]
            .strip_prefix(b"\r\n")
            .context("chunk without crlf")?;
    }
}

/// Returns the sum of every sample of metric `name` in a Prometheus text
/// exposition (all label sets), or `None` when there is no such sample.
pub fn metric_sum(exposition: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        total = Some(total.unwrap_or(0.0) + value);
    }
    total
}

/// Reads `/metrics` and returns [`metric_sum`] of `name` (0 when absent).
///
/// # Errors
///
/// Fails when `/metrics` does not answer 200.
pub async fn metric(addr: SocketAddr, name: &str) -> Result<f64> {
    let response = get(addr, "/metrics").await?;
    if response.status != 200 {
        bail!("/metrics answered {}", response.status);
    }
    Ok(metric_sum(&response.body, name).unwrap_or(0.0))
}
