//! Raw TCP clients for attacks below HTTP: a client that trickles its request
//! headers, one that stops half way, one that sends nothing, a hand-written
//! WebSocket upgrade.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

use crate::WAIT;

/// The HTTP/2 client preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One raw TCP connection to the server.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    /// When the connection was made: how long the server kept it is measured
    /// from here.
    connected: Instant,
}

impl RawClient {
    /// Connects to `addr`.
    ///
    /// # Errors
    ///
    /// Fails when the server does not accept.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        Ok(Self {
            stream,
            connected: Instant::now(),
        })
    }

    /// Sends `bytes`.
    ///
    /// # Errors
    ///
    /// Fails when the socket does.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await.context("sending")
    }

    /// Reads until the server closes the connection (end of stream or reset)
    /// and returns how long after the connect that was, and what it sent.
    ///
    /// # Errors
    ///
    /// Fails when the connection is still open after [`WAIT`].
    pub async fn closed_by_server(&mut self) -> Result<(Duration, Vec<u8>)> {
        let mut received = Vec::new();
        let read = tokio::time::timeout(WAIT, async {
            let mut chunk = [0_u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                }
            }
        });
        read.await
            .context("the server never closed the connection")?;
        Ok((self.connected.elapsed(), received))
    }

    /// Sends `bytes` one at a time, one every `every`, and keeps reading, until
    /// the server closes the connection; returns how long after the connect that
    /// was and how many bytes went out. Once `bytes` are all sent it only reads.
    ///
    /// # Errors
    ///
    /// Fails when the connection is still open after [`WAIT`].
    pub async fn trickle_until_closed(
        &mut self,
        bytes: &[u8],
        every: Duration,
    ) -> Result<(Duration, usize)> {
        let deadline = self.connected + WAIT;
        let mut sent = 0;
        let mut next = Instant::now();
        let mut chunk = [0_u8; 4096];
        loop {
            let write_due = sent < bytes.len();
            tokio::select! {
                read = self.stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => return Ok((self.connected.elapsed(), sent)),
                    Ok(_) => {}
                },
                () = tokio::time::sleep_until(next), if write_due => {
                    if self.stream.write_all(&bytes[sent..=sent]).await.is_err() {
                        return Ok((self.connected.elapsed(), sent));
                    }
                    sent += 1;
                    next += every;
                }
                () = tokio::time::sleep_until(deadline) => {
                    bail!("the server never closed the trickling connection ({sent} bytes sent)")
                }
            }
        }
    }

    /// Reads one HTTP/2 frame and returns its type, flags and payload.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends inside a frame.
    pub async fn read_h2_frame(&mut self) -> Result<(u8, u8, Vec<u8>)> {
        let mut header = [0_u8; 9];
        self.stream
            .read_exact(&mut header)
            .await
            .context("reading a frame header")?;
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0_u8; length];
        self.stream
            .read_exact(&mut payload)
            .await
            .context("reading a frame payload")?;
        Ok((header[3], header[4], payload))
    }

    /// Returns what one read of the socket gives (up to 64 KiB): the bytes the
    /// server wrote together arrive together on loopback.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends or nothing comes within [`WAIT`].
    pub async fn read_once(&mut self) -> Result<Vec<u8>> {
        let mut chunk = vec![0_u8; 64 * 1024];
        let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await;
        let n = read.context("nothing to read")?.context("reading")?;
        if n == 0 {
            bail!("the connection ended");
        }
        chunk.truncate(n);
        Ok(chunk)
    }

    /// Reads an HTTP/1.1 response head (up to the empty line) and returns it.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends first or nothing comes within [`WAIT`].
    pub async fn read_head(&mut self) -> Result<String> {
        let mut head = Vec::new();
        let read = tokio::time::timeout(WAIT, async {
            let mut byte = [0_u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if self.stream.read(&mut byte).await? == 0 {
                    bail!("the connection ended inside the response head");
                }
                head.push(byte[0]);
            }
            Ok(())
        });
        read.await.context("no response head")??;
        String::from_utf8(head).context("response head is not utf-8")
    }
}

/// Returns a WebSocket upgrade request for `/v1/ws` on `addr` with `extra`
/// header lines (each ending in `\r\n`); with `finished` false the final empty
/// line is left out, so the headers never end.
pub fn ws_upgrade_request(addr: SocketAddr, extra: &str, finished: bool) -> String {
    let end = if finished { "\r\n" } else { "" };
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}{end}"
    )
}

/// Returns a client's WebSocket binary message of `payload` in one frame,
/// masked as RFC 6455 asks of clients.
///
/// # Panics
///
/// Never: the frame is written to memory.
#[must_use]
pub fn ws_client_binary(payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Binary),
        mask: Some([0x37, 0xfa, 0x21, 0x3d]),
        ..FrameHeader::default()
    };
    let mut bytes = Vec::new();
    Frame::from_payload(header, payload.to_vec().into())
        .format(&mut bytes)
        .expect("writing to a vector");
    bytes
}

/// Splits `bytes` read from a server into its WebSocket frames' payloads.
///
/// # Errors
///
/// Fails when the bytes end inside a frame or hold something else.
pub fn ws_server_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut cursor = std::io::Cursor::new(bytes);
    let mut payloads = Vec::new();
    while usize::try_from(cursor.position())? < bytes.len() {
        let Some((header, length)) = FrameHeader::parse(&mut cursor)? else {
            bail!("the bytes end inside a frame header");
        };
        if header.mask.is_some() {
            bail!("a server frame is masked");
        }
        let start = usize::try_from(cursor.position())?;
        let end = start + usize::try_from(length)?;
        let Some(payload) = bytes.get(start..end) else {
            bail!("the bytes end inside a frame of {length} bytes");
        };
        payloads.push(payload.to_vec());
        cursor.set_position(u64::try_from(end)?);
    }
    Ok(payloads)
}
