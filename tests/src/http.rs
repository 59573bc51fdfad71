//! A tiny HTTP/1.1 client: enough for `GET /metrics` and `GET /healthz`.

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
    tokio::time::timeout(WAIT, exchange(addr, path))
        .await
        .with_context(|| format!("GET {path} timed out"))?
}

async fn exchange(addr: SocketAddr, path: &str) -> Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("response is not utf-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = head
        .lines()
        .any(|line| line.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut body = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").context("truncated chunk")?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("chunk size {size_line:?}"))?;
        if size == 0 {
            return Ok(body);
        }
        let Some(chunk) = after.get(..size) else {
            bail!("chunk shorter than {size}");
        };
        body.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
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
