//! One device's live connection, whatever carries the frames.

use std::collections::VecDeque;
use std::future::Future;

use anyhow::{Context, Result, bail};
use confab_proto::v1::{
    ClientFrame, CloseChannel, Delivered, Error as ErrorFrame, Event, Heartbeat, Hello, MarkRead,
    Message, OpenChannel, Ping, Presence, ReadState, Receipt, SendAck, SendMessage, ServerFrame,
    Typing, TypingState, WatchPresence, Welcome, client_frame, event, server_frame,
};

use crate::WAIT;

/// How a connection ended.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    /// The WebSocket close code, when a close frame came.
    pub ws_close_code: Option<u16>,
    /// The gRPC status code the stream ended with (`Ok` for a clean end).
    pub grpc_code: Option<tonic::Code>,
    /// Whatever else is known, for failure messages.
    pub detail: String,
}

/// What a transport read.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded server frame.
    Frame(ServerFrame),
    /// The server ended the connection.
    Closed(Closed),
}

/// Carries frames: gRPC stream or WebSocket.
pub trait Transport: Send {
    /// Sends one frame.
    fn send_frame(&mut self, frame: ClientFrame) -> impl Future<Output = Result<()>> + Send;
    /// Reads the next frame or the end of the connection.
    fn recv(&mut self) -> impl Future<Output = Result<Incoming>> + Send;
}

/// The server's answer to a frame that wants one (`SendMessage`, `Delivered`,
/// `MarkRead`, `OpenChannel`, `CloseChannel`).
#[derive(Debug, Clone)]
pub enum Reply {
    /// Durable.
    Sent(SendAck),
    /// Carried out.
    Done,
    /// Refused.
    Error(ErrorFrame),
}

/// What a `Hello` brought: the welcome, the catch-up events and the sync point.
#[derive(Debug, Clone)]
pub struct Synced {
    /// The server's `Welcome`.
    pub welcome: Welcome,
    /// Every event after the cursor, in order.
    pub events: Vec<Event>,
    /// `SyncComplete.seq`.
    pub seq: u64,
}

/// A device's connection: correlates replies by `ref`, keeps frames that arrive
/// while waiting for a reply, and bounds every wait by [`WAIT`].
#[derive(Debug)]
pub struct Conn<T> {
    transport: T,
    /// Frames read while waiting for something else, handed out in order later.
    pending: VecDeque<ServerFrame>,
    /// The `ref` of the next client frame (0 means "no reply wanted").
    next_ref: u64,
}

impl<T: Transport> Conn<T> {
    /// Wraps a connected transport.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            pending: VecDeque::new(),
            next_ref: 1,
        }
    }

    /// The transport, for raw frames.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Sends a frame of `kind` with a fresh `ref` and returns that `ref`.
    ///
    /// # Errors
    ///
    /// Fails when the transport does.
    pub async fn send_kind(&mut self, kind: client_frame::Kind) -> Result<u64> {
        let r#ref = self.next_ref;
        self.next_ref += 1;
        let frame = ClientFrame {
            r#ref,
            kind: Some(kind),
        };
        self.transport.send_frame(frame).await?;
        Ok(r#ref)
    }

    /// Sends `Hello { token, device_id, cursor }` without waiting for an answer.
    ///
    /// # Errors
    ///
    /// Fails when the transport does.
    pub async fn send_hello(&mut self, token: &str, device_id: &str, cursor: u64) -> Result<()> {
        let hello = Hello {
            token: token.to_owned(),
            device_id: device_id.to_owned(),
            cursor,
        };
        self.send_kind(client_frame::Kind::Hello(hello)).await?;
        Ok(())
    }

    /// Says hello and returns the `Welcome`; later frames stay queued.
    ///
    /// # Errors
    ///
    /// Fails on any other first frame, or when the connection ends.
    pub async fn hello(&mut self, device_id: &str, cursor: u64) -> Result<Welcome> {
        self.send_hello("", device_id, cursor).await?;
        self.expect_welcome().await
    }

    /// Reads the `Welcome` that must come first.
    ///
    /// # Errors
    ///
    /// Fails on any other frame.
    pub async fn expect_welcome(&mut self) -> Result<Welcome> {
        match self.next_frame().await?.kind {
            Some(server_frame::Kind::Welcome(welcome)) => Ok(welcome),
            other => bail!("expected a welcome, got {other:?}"),
        }
    }

    /// Says hello and reads the catch-up up to `SyncComplete`.
    ///
    /// # Errors
    ///
    /// Fails on unexpected frames, or when the connection ends.
    pub async fn sync(&mut self, device_id: &str, cursor: u64) -> Result<Synced> {
        let welcome = self.hello(device_id, cursor).await?;
        let (events, seq) = self.read_catch_up().await?;
        Ok(Synced {
            welcome,
            events,
            seq,
        })
    }

    /// Reads events up to `SyncComplete` and returns them with its `seq`.
    ///
    /// # Errors
    ///
    /// Fails on unexpected frames, or when the connection ends.
    pub async fn read_catch_up(&mut self) -> Result<(Vec<Event>, u64)> {
        let mut events = Vec::new();
        loop {
            match self.next_frame().await?.kind {
                Some(server_frame::Kind::Event(event)) => events.push(event),
                Some(server_frame::Kind::Synced(synced)) => return Ok((events, synced.seq)),
                other => bail!("expected an event or sync-complete, got {other:?}"),
            }
        }
    }

    /// Sends a message and waits for its ack.
    ///
    /// # Errors
    ///
    /// Fails when the server answers with an error frame.
    pub async fn send(
        &mut self,
        conversation_id: i64,
        client_msg_id: &str,
        text: &str,
    ) -> Result<SendAck> {
        match self
            .send_reply(conversation_id, client_msg_id, text)
            .await?
        {
            Reply::Sent(ack) => Ok(ack),
            Reply::Error(error) => bail!("send refused: {error:?}"),
            Reply::Done => bail!("a send answered with done"),
        }
    }

    /// Sends a message and returns the server's reply, ack or error.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends first.
    pub async fn send_reply(
        &mut self,
        conversation_id: i64,
        client_msg_id: &str,
        text: &str,
    ) -> Result<Reply> {
        let r#ref = self
            .send_message(conversation_id, client_msg_id, text)
            .await?;
        self.reply_to(r#ref).await
    }

    /// Sends a message without waiting; returns the frame's `ref`.
    ///
    /// # Errors
    ///
    /// Fails when the transport does.
    pub async fn send_message(
        &mut self,
        conversation_id: i64,
        client_msg_id: &str,
        text: &str,
    ) -> Result<u64> {
        let send = SendMessage {
            conversation_id,
            client_msg_id: client_msg_id.to_owned(),
            text: text.to_owned(),
        };
        self.send_kind(client_frame::Kind::Send(send)).await
    }

    /// Waits for the ack or error answering `ref`; other frames stay queued.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends first.
    pub async fn reply_to(&mut self, r#ref: u64) -> Result<Reply> {
        if let Some(index) = self.pending.iter().position(|frame| is_reply(frame, r#ref)) {
            let frame = self
                .pending
                .remove(index)
                .context("queued reply vanished")?;
            return reply_of(frame);
        }
        loop {
            let frame = self.recv_frame().await?;
            if is_reply(&frame, r#ref) {
                return reply_of(frame);
            }
            self.pending.push_back(frame);
        }
    }

    /// Sends a frame of `kind` and waits for its answer (ack, done or error).
    ///
    /// # Errors
    ///
    /// Fails when the connection ends first.
    pub async fn request(&mut self, kind: client_frame::Kind) -> Result<Reply> {
        let r#ref = self.send_kind(kind).await?;
        self.reply_to(r#ref).await
    }

    /// Sends `kind` and fails unless the server answers `done`.
    async fn expect_done(&mut self, what: &str, kind: client_frame::Kind) -> Result<()> {
        match self.request(kind).await? {
            Reply::Done => Ok(()),
            other => bail!("{what}: expected done, got {other:?}"),
        }
    }

    /// `Delivered { conversation_id, up_to }`, answered with `done`.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn delivered(&mut self, conversation_id: i64, up_to: i64) -> Result<()> {
        let mark = Delivered {
            conversation_id,
            up_to,
        };
        self.expect_done("delivered", client_frame::Kind::Delivered(mark))
            .await
    }

    /// `MarkRead { conversation_id, up_to }`, answered with `done`.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn mark_read(&mut self, conversation_id: i64, up_to: i64) -> Result<()> {
        let mark = MarkRead {
            conversation_id,
            up_to,
        };
        self.expect_done("mark read", client_frame::Kind::MarkRead(mark))
            .await
    }

    /// `OpenChannel`, answered with `done`: live posts of the channel follow.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn open_channel(&mut self, conversation_id: i64) -> Result<()> {
        let open = OpenChannel { conversation_id };
        self.expect_done("open channel", client_frame::Kind::OpenChannel(open))
            .await
    }

    /// `CloseChannel`, answered with `done`.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn close_channel(&mut self, conversation_id: i64) -> Result<()> {
        let close = CloseChannel { conversation_id };
        self.expect_done("close channel", client_frame::Kind::CloseChannel(close))
            .await
    }

    /// `Heartbeat`, answered with `done`: keeps the user online.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn heartbeat(&mut self) -> Result<()> {
        self.expect_done("heartbeat", client_frame::Kind::Heartbeat(Heartbeat {}))
            .await
    }

    /// `WatchPresence { user_ids }` (replacing the previous list): returns the
    /// snapshot, the presence events that came before the `done` answering it.
    ///
    /// Frames of other kinds stay queued. A live change of a user watched
    /// before may arrive in the same window and is counted in as well; tests
    /// watch at quiet moments.
    ///
    /// # Errors
    ///
    /// Fails when the server answers with an error frame.
    pub async fn watch_presence(&mut self, user_ids: &[i64]) -> Result<Vec<Presence>> {
        let watch = WatchPresence {
            user_ids: user_ids.to_vec(),
        };
        let r#ref = self
            .send_kind(client_frame::Kind::WatchPresence(watch))
            .await?;
        let mut snapshot = Vec::new();
        loop {
            let frame = self.recv_frame().await?;
            if is_reply(&frame, r#ref) {
                return match reply_of(frame)? {
                    Reply::Done => Ok(snapshot),
                    other => bail!("watch presence: expected done, got {other:?}"),
                };
            }
            match frame.kind {
                Some(server_frame::Kind::Event(Event {
                    seq,
                    kind: Some(event::Kind::Presence(presence)),
                })) => {
                    anyhow::ensure!(seq == 0, "a presence event with seq {seq}: {presence:?}");
                    snapshot.push(presence);
                }
                _ => self.pending.push_back(frame),
            }
        }
    }

    /// `WatchPresence` of `user_ids` whose snapshot has `count` entries: the
    /// snapshot and `done` in whichever order they come. Over gRPC-web they
    /// come on two HTTP connections (the snapshot on the subscription, `done`
    /// as the `Submit` answer), so `done` may overtake the snapshot; over a
    /// stream, [`Self::watch_presence`] is exact.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise, or not within the wait.
    pub async fn watch_presence_expecting(
        &mut self,
        user_ids: &[i64],
        count: usize,
    ) -> Result<Vec<Presence>> {
        let mut snapshot = self.watch_presence(user_ids).await?;
        while snapshot.len() < count {
            let frame = self.recv_frame().await?;
            match frame.kind {
                Some(server_frame::Kind::Event(Event {
                    seq: 0,
                    kind: Some(event::Kind::Presence(presence)),
                })) => snapshot.push(presence),
                _ => self.pending.push_back(frame),
            }
        }
        Ok(snapshot)
    }

    /// `Typing { conversation_id, typing }`, answered with `done`.
    ///
    /// # Errors
    ///
    /// Fails when the server answers otherwise.
    pub async fn typing(&mut self, conversation_id: i64, typing: bool) -> Result<()> {
        match self.typing_reply(conversation_id, typing).await? {
            Reply::Done => Ok(()),
            other => bail!("typing: expected done, got {other:?}"),
        }
    }

    /// `Typing { conversation_id, typing }`; returns the server's answer.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends first.
    pub async fn typing_reply(&mut self, conversation_id: i64, typing: bool) -> Result<Reply> {
        let frame = Typing {
            conversation_id,
            typing,
        };
        self.request(client_frame::Kind::Typing(frame)).await
    }

    /// Returns the next presence event (seq 0); frames of other kinds are
    /// skipped but stay queued, in order.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends or no presence event comes within [`WAIT`].
    pub async fn next_presence(&mut self) -> Result<Presence> {
        let event = self
            .next_event_where("a presence event", |kind| {
                matches!(kind, event::Kind::Presence(_))
            })
            .await?;
        match event.kind {
            Some(event::Kind::Presence(presence)) if event.seq == 0 => Ok(presence),
            other => bail!(
                "event {} is not an ephemeral presence: {other:?}",
                event.seq
            ),
        }
    }

    /// Returns the next typing event (seq 0); frames of other kinds are skipped
    /// but stay queued, in order.
    ///
    /// # Errors
    ///
    /// Fails when the connection ends or no typing event comes within [`WAIT`].
    pub async fn next_typing(&mut self) -> Result<TypingState> {
        let event = self
            .next_event_where("a typing event", |kind| {
                matches!(kind, event::Kind::Typing(_))
            })
            .await?;
        match event.kind {
            Some(event::Kind::Typing(typing)) if event.seq == 0 => Ok(typing),
            other => bail!("event {} is not an ephemeral typing: {other:?}", event.seq),
        }
    }

    /// Returns the first event (queued or new) whose kind matches; every other
    /// frame stays queued.
    async fn next_event_where(
        &mut self,
        what: &str,
        wanted: impl Fn(&event::Kind) -> bool,
    ) -> Result<Event> {
        let matches = |frame: &ServerFrame| match &frame.kind {
            Some(server_frame::Kind::Event(Event {
                kind: Some(kind), ..
            })) => wanted(kind),
            _ => false,
        };
        let queued = self.pending.iter().position(&matches);
        let frame = match queued {
            Some(index) => self
                .pending
                .remove(index)
                .context("queued frame vanished")?,
            None => loop {
                let frame = self
                    .recv_frame()
                    .await
                    .with_context(|| format!("waiting for {what}"))?;
                if matches(&frame) {
                    break frame;
                }
                self.pending.push_back(frame);
            },
        };
        match frame.kind {
            Some(server_frame::Kind::Event(event)) => Ok(event),
            other => bail!("not an event: {other:?}"),
        }
    }

    /// Queues `frames` ahead of those queued already (handed back by a helper
    /// that read them first).
    pub(crate) fn queue_front(&mut self, frames: Vec<ServerFrame>) {
        for frame in frames.into_iter().rev() {
            self.pending.push_front(frame);
        }
    }

    /// Takes every frame queued so far (read while waiting for something else).
    pub fn take_queued(&mut self) -> Vec<ServerFrame> {
        self.pending.drain(..).collect()
    }

    /// Proves that nothing is on its way to this connection: a ping's pong comes
    /// back with no frame before it, and nothing is queued from earlier.
    ///
    /// Frames the server sent before it read the ping arrive before the pong, so
    /// once the event being checked has reached other connections, this sees it.
    ///
    /// # Errors
    ///
    /// Fails with the frames that came, or when no pong comes.
    pub async fn expect_quiet(&mut self, nonce: u64) -> Result<()> {
        self.ping(nonce).await?;
        let unexpected: Vec<ServerFrame> = self.pending.drain(..).collect();
        anyhow::ensure!(
            unexpected.is_empty(),
            "expected nothing, got {unexpected:?}"
        );
        Ok(())
    }

    /// Sends a ping and waits for its pong: proves the connection still works.
    ///
    /// # Errors
    ///
    /// Fails when no pong comes.
    pub async fn ping(&mut self, nonce: u64) -> Result<()> {
        self.send_kind(client_frame::Kind::Ping(Ping { nonce }))
            .await?;
        loop {
            let frame = self.recv_frame().await?;
            if let Some(server_frame::Kind::Pong(pong)) = &frame.kind {
                anyhow::ensure!(pong.nonce == nonce, "pong for {}, not {nonce}", pong.nonce);
                return Ok(());
            }
            self.pending.push_back(frame);
        }
    }

    /// Returns the next frame (queued ones first).
    ///
    /// # Errors
    ///
    /// Fails when the connection ends or nothing comes within [`WAIT`].
    pub async fn next_frame(&mut self) -> Result<ServerFrame> {
        match self.pending.pop_front() {
            Some(frame) => Ok(frame),
            None => self.recv_frame().await,
        }
    }

    /// Returns the next event; pongs are skipped, anything else fails.
    ///
    /// # Errors
    ///
    /// Fails on an error frame, the end of the connection, or after [`WAIT`].
    pub async fn next_event(&mut self) -> Result<Event> {
        loop {
            match self.next_frame().await?.kind {
                Some(server_frame::Kind::Event(event)) => return Ok(event),
                Some(server_frame::Kind::Pong(_)) => continue,
                other => bail!("expected an event, got {other:?}"),
            }
        }
    }

    /// Returns the next event with its message.
    ///
    /// # Errors
    ///
    /// Like [`Conn::next_event`], and when the event carries no message.
    pub async fn next_message(&mut self) -> Result<(u64, Message)> {
        let event = self.next_event().await?;
        message_of(event)
    }

    /// Returns the next event, which must be a receipt.
    ///
    /// # Errors
    ///
    /// Like [`Conn::next_event`], and when the event is of another kind.
    pub async fn next_receipt(&mut self) -> Result<(u64, Receipt)> {
        let event = self.next_event().await?;
        match event.kind {
            Some(event::Kind::Receipt(receipt)) => Ok((event.seq, receipt)),
            other => bail!("event {} is not a receipt: {other:?}", event.seq),
        }
    }

    /// Returns the next event, which must be a read state.
    ///
    /// # Errors
    ///
    /// Like [`Conn::next_event`], and when the event is of another kind.
    pub async fn next_read_state(&mut self) -> Result<(u64, ReadState)> {
        let event = self.next_event().await?;
        match event.kind {
            Some(event::Kind::ReadState(state)) => Ok((event.seq, state)),
            other => bail!("event {} is not a read state: {other:?}", event.seq),
        }
    }

    /// Returns the next event, which must be a channel post (seq 0).
    ///
    /// # Errors
    ///
    /// Like [`Conn::next_event`], and when the event is of another kind.
    pub async fn next_channel_post(&mut self) -> Result<Message> {
        let event = self.next_event().await?;
        match event.kind {
            Some(event::Kind::ChannelPost(post)) if event.seq == 0 => Ok(post),
            other => bail!("event {} is not a channel post: {other:?}", event.seq),
        }
    }

    /// Reads until the server ends the connection and returns how it ended;
    /// frames before the end are returned too.
    ///
    /// # Errors
    ///
    /// Fails when the connection is still open after [`WAIT`].
    pub async fn expect_closed(&mut self) -> Result<(Vec<ServerFrame>, Closed)> {
        let mut frames: Vec<ServerFrame> = self.pending.drain(..).collect();
        loop {
            match tokio::time::timeout(WAIT, self.transport.recv()).await {
                Err(_) => bail!("connection still open after {WAIT:?}; frames: {frames:?}"),
                Ok(Err(error)) => return Err(error),
                Ok(Ok(Incoming::Frame(frame))) => frames.push(frame),
                Ok(Ok(Incoming::Closed(closed))) => return Ok((frames, closed)),
            }
        }
    }

    async fn recv_frame(&mut self) -> Result<ServerFrame> {
        match tokio::time::timeout(WAIT, self.transport.recv()).await {
            Err(_) => bail!("no frame within {WAIT:?}"),
            Ok(Err(error)) => Err(error),
            Ok(Ok(Incoming::Frame(frame))) => Ok(frame),
            Ok(Ok(Incoming::Closed(closed))) => bail!("connection closed: {closed:?}"),
        }
    }
}

/// Returns the seq and message of a message event.
///
/// # Errors
///
/// Fails when the event is not a message.
pub fn message_of(event: Event) -> Result<(u64, Message)> {
    match event.kind {
        Some(event::Kind::Message(message)) => Ok((event.seq, message)),
        other => bail!("event {} is not a message: {other:?}", event.seq),
    }
}

fn is_reply(frame: &ServerFrame, r#ref: u64) -> bool {
    let answers = matches!(
        frame.kind,
        Some(
            server_frame::Kind::Sent(_)
                | server_frame::Kind::Done(_)
                | server_frame::Kind::Error(_)
        )
    );
    answers && frame.r#ref == r#ref
}

fn reply_of(frame: ServerFrame) -> Result<Reply> {
    match frame.kind {
        Some(server_frame::Kind::Sent(ack)) => Ok(Reply::Sent(ack)),
        Some(server_frame::Kind::Done(_)) => Ok(Reply::Done),
        Some(server_frame::Kind::Error(error)) => Ok(Reply::Error(error)),
        other => bail!("not a reply: {other:?}"),
    }
}
