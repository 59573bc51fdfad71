//! `chat <peer>` / `chat --conversation <id>`: prints the catch-up and live
//! messages of one conversation, sends every stdin line, ends at end of input
//! once every send is answered.
//!
//! Messages it prints are acknowledged as delivered and, the chat being in the
//! foreground, as read; receipts for your own messages print as `✓✓` lines.
//!
//! While it runs the app is in the foreground: it heartbeats every
//! [`HEARTBEAT_PERIOD`]. In a direct chat it watches the peer's presence and
//! prints `— bob is online` / `— bob was last seen HH:MM:SS` on changes; in any
//! chat it prints `bob is typing…` when a member starts typing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{
    ClientFrame, ConversationKind, Delivered, Event, Heartbeat, Hello, MarkRead, Message,
    OpenChannel, Presence, Receipt, SendAck, SendMessage, ServerFrame, TypingState, WatchPresence,
    client_frame, event, server_frame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use super::session::Session;
use super::show;

/// How long the end of input waits for outstanding acks and echoes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a running chat tells the server the user is still here.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(5);

/// Frames queued towards the server.
const OUTBOUND_QUEUE: usize = 64;

/// Whom `chat` talks to.
#[derive(Debug, Clone)]
pub(super) enum Target {
    /// The direct conversation with this user.
    Peer(String),
    /// A conversation by id (a group or a channel).
    Conversation(i64),
}

/// Runs the chat until stdin ends.
pub(super) async fn run(session: &mut Session, target: Target) -> anyhow::Result<ExitCode> {
    let (conversation, title) = match &target {
        Target::Peer(peer) => (session.open_direct(peer).await?, peer.clone()),
        Target::Conversation(id) => {
            let conversation = super::groups::get(session, *id).await?;
            let title = format!("{} #{id}", show::one_line(&conversation.name));
            (conversation, title)
        }
    };
    let me = session.login().user_id;
    let mut peer_id = None;
    if let Target::Peer(peer) = &target {
        peer_id = conversation.member_ids.iter().copied().find(|id| *id != me);
        if let Some(peer_id) = peer_id {
            session.remember(peer_id, peer)?;
        }
    }
    session.learn_names().await?;
    let (outbound, inbound) = open_stream(session).await?;
    let mut chat = Chat {
        conversation_id: conversation.id,
        channel: conversation.kind() == ConversationKind::Channel,
        me,
        title,
        cursor: session.login().cursor,
        synced: false,
        next_ref: 1,
        unanswered: HashMap::new(),
        marks: HashSet::new(),
        unechoed: HashSet::new(),
        echoed: HashSet::new(),
        to_mark: None,
        mine: BTreeSet::new(),
        watermarks: HashMap::new(),
        asked_names: HashSet::new(),
        peer_id,
        peer_presence: None,
        typing: HashSet::new(),
        background: HashSet::new(),
    };
    chat.run(session, outbound, inbound).await?;
    Ok(ExitCode::SUCCESS)
}

/// Opens `Edge.Stream`, says hello with the stored cursor and reads the
/// `Welcome`; on UNAUTHENTICATED refreshes once and tries again.
async fn open_stream(
    session: &mut Session,
) -> anyhow::Result<(mpsc::Sender<ClientFrame>, Streaming<ServerFrame>)> {
    loop {
        let (outbound, frames) = mpsc::channel(OUTBOUND_QUEUE);
        let hello = Hello {
            token: String::new(),
            device_id: session.device_id().to_owned(),
            cursor: session.login().cursor,
        };
        // Queued before the call: a server may answer headers only after the hello.
        let frame = ClientFrame {
            r#ref: 0,
            kind: Some(client_frame::Kind::Hello(hello)),
        };
        outbound.send(frame).await.context("queueing the hello")?;
        let mut client = EdgeClient::with_interceptor(session.channel(), session.bearer()?);
        let welcomed = match client.stream(ReceiverStream::new(frames)).await {
            Ok(response) => {
                let mut inbound = response.into_inner();
                inbound.message().await.map(|first| (inbound, first))
            }
            Err(status) => Err(status),
        };
        match welcomed {
            Ok((
                inbound,
                Some(ServerFrame {
                    kind: Some(server_frame::Kind::Welcome(_)),
                    ..
                }),
            )) => {
                return Ok((outbound, inbound));
            }
            Ok((_, Some(frame))) => bail!(
                "the server did not welcome this device: {}",
                describe(&frame)
            ),
            Ok((_, None)) => bail!("the server closed the connection"),
            Err(status) if session.may_refresh(&status) => session.refresh().await?,
            Err(status) => return Err(show::status_error("cannot connect", &status)),
        }
    }
}

/// The state of a running chat.
#[derive(Debug)]
struct Chat {
    conversation_id: i64,
    /// A channel: live posts come only while it is open.
    channel: bool,
    me: i64,
    /// The peer's name or the group's, for the banner.
    title: String,
    /// The last event processed; saved after every event.
    cursor: u64,
    /// Whether the catch-up is over.
    synced: bool,
    /// The `ref` of the next frame.
    next_ref: u64,
    /// Sends not answered yet, by `ref`: their text, for error lines.
    unanswered: HashMap<u64, String>,
    /// `Delivered`/`MarkRead`/`OpenChannel` frames not answered yet, by `ref`.
    marks: HashSet<u64>,
    /// The newest message of others printed and not yet acknowledged.
    to_mark: Option<i64>,
    /// Own messages of this conversation, for receipt lines.
    mine: BTreeSet<i64>,
    /// Each other member's (delivered, read) watermarks seen so far.
    watermarks: HashMap<i64, (i64, i64)>,
    /// Users whose names were looked up already (once each).
    asked_names: HashSet<i64>,
    /// Own messages acknowledged but not yet seen as events.
    unechoed: HashSet<i64>,
    /// Own messages seen as events (an event may come before its ack).
    echoed: HashSet<i64>,
    /// The other user of a direct chat, whose presence is watched.
    peer_id: Option<i64>,
    /// The peer's presence as last printed, to print changes only.
    peer_presence: Option<(bool, i64)>,
    /// Members shown as typing, so that a repeated "typing" prints once.
    typing: HashSet<i64>,
    /// `Heartbeat` and `WatchPresence` frames not answered yet: the end of
    /// input does not wait for them.
    background: HashSet<u64>,
}

impl Chat {
    async fn run(
        &mut self,
        session: &mut Session,
        outbound: mpsc::Sender<ClientFrame>,
        mut inbound: Streaming<ServerFrame>,
    ) -> anyhow::Result<()> {
        let mut lines = stdin_lines();
        let mut input_open = true;
        let drain_deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(drain_deadline);
        // Opening the connection counted as the first heartbeat.
        let start = tokio::time::Instant::now() + HEARTBEAT_PERIOD;
        let mut heartbeats = tokio::time::interval_at(start, HEARTBEAT_PERIOD);
        loop {
            if !input_open && self.settled() {
                return Ok(());
            }
            tokio::select! {
                received = inbound.message() => {
                    let frame = received.map_err(|status| show::status_error("connection lost", &status))?;
                    let Some(frame) = frame else { bail!("the server closed the connection") };
                    self.on_frame(session, &outbound, frame).await?;
                    self.flush_marks(&outbound).await?;
                }
                line = lines.recv(), if input_open => match line {
                    Some(line) => self.send_line(&outbound, line).await?,
                    None => {
                        input_open = false;
                        drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                },
                _ = heartbeats.tick() => {
                    let beat = client_frame::Kind::Heartbeat(Heartbeat {});
                    let r#ref = self.send_frame(&outbound, beat).await?;
                    self.background.insert(r#ref);
                }
                () = &mut drain_deadline => {
                    bail!("{} message(s) not confirmed by the server", self.unanswered.len() + self.unechoed.len());
                }
            }
        }
    }

    /// True when every send was answered and every own message came back.
    fn settled(&self) -> bool {
        self.unanswered.is_empty() && self.unechoed.is_empty() && self.marks.is_empty()
    }

    /// Sends one frame that wants an answer and returns its `ref`.
    async fn send_frame(
        &mut self,
        outbound: &mpsc::Sender<ClientFrame>,
        kind: client_frame::Kind,
    ) -> anyhow::Result<u64> {
        let r#ref = self.next_ref;
        self.next_ref += 1;
        let frame = ClientFrame {
            r#ref,
            kind: Some(kind),
        };
        outbound
            .send(frame)
            .await
            .context("the connection has ended")?;
        Ok(r#ref)
    }

    /// Once caught up, acknowledges what was printed: delivered, and read
    /// (the chat is in the foreground).
    async fn flush_marks(&mut self, outbound: &mpsc::Sender<ClientFrame>) -> anyhow::Result<()> {
        if !self.synced {
            return Ok(());
        }
        let Some(up_to) = self.to_mark.take() else {
            return Ok(());
        };
        let conversation_id = self.conversation_id;
        let delivered = client_frame::Kind::Delivered(Delivered {
            conversation_id,
            up_to,
        });
        let r#ref = self.send_frame(outbound, delivered).await?;
        self.marks.insert(r#ref);
        let read = client_frame::Kind::MarkRead(MarkRead {
            conversation_id,
            up_to,
        });
        let r#ref = self.send_frame(outbound, read).await?;
        self.marks.insert(r#ref);
        Ok(())
    }

    async fn send_line(
        &mut self,
        outbound: &mpsc::Sender<ClientFrame>,
        line: String,
    ) -> anyhow::Result<()> {
        let text = line.trim_end_matches('\r');
        if text.trim().is_empty() {
            return Ok(());
        }
        let send = SendMessage {
            conversation_id: self.conversation_id,
            client_msg_id: format!("{:032x}", rand::random::<u128>()),
            text: text.to_owned(),
        };
        let r#ref = self
            .send_frame(outbound, client_frame::Kind::Send(send))
            .await?;
        self.unanswered.insert(r#ref, text.to_owned());
        Ok(())
    }

    async fn on_frame(
        &mut self,
        session: &mut Session,
        outbound: &mpsc::Sender<ClientFrame>,
        frame: ServerFrame,
    ) -> anyhow::Result<()> {
        match frame.kind {
            Some(server_frame::Kind::Event(event)) => self.on_event(session, event).await?,
            Some(server_frame::Kind::Sent(ack)) => self.on_ack(frame.r#ref, &ack),
            Some(server_frame::Kind::Synced(_)) => {
                self.synced = true;
                if self.channel {
                    let open = client_frame::Kind::OpenChannel(OpenChannel {
                        conversation_id: self.conversation_id,
                    });
                    let r#ref = self.send_frame(outbound, open).await?;
                    self.marks.insert(r#ref);
                }
                if let Some(peer_id) = self.peer_id {
                    let watch = client_frame::Kind::WatchPresence(WatchPresence {
                        user_ids: vec![peer_id],
                    });
                    let r#ref = self.send_frame(outbound, watch).await?;
                    self.background.insert(r#ref);
                }
                eprintln!(
                    "-- chatting with {}: type a line to send it, end input to quit --",
                    self.title
                );
            }
            Some(server_frame::Kind::Done(_)) => {
                self.marks.remove(&frame.r#ref);
                self.background.remove(&frame.r#ref);
            }
            Some(server_frame::Kind::Error(error)) if self.background.remove(&frame.r#ref) => {
                eprintln!("presence not updated: {}", show::one_line(&error.message));
            }
            Some(server_frame::Kind::Error(error)) if self.marks.remove(&frame.r#ref) => {
                eprintln!("receipt not sent: {}", show::one_line(&error.message));
            }
            Some(server_frame::Kind::Error(error)) => {
                let text = self.unanswered.remove(&frame.r#ref);
                if error.fatal {
                    bail!(
                        "the server ended the connection: {}",
                        show::one_line(&error.message)
                    );
                }
                let what =
                    text.map_or_else(String::new, |text| format!(" {:?}", show::one_line(&text)));
                eprintln!(
                    "not sent{what}: {} ({})",
                    show::one_line(&error.message),
                    show::one_line(&error.reason)
                );
            }
            Some(server_frame::Kind::Welcome(_) | server_frame::Kind::Pong(_)) | None => {}
        }
        Ok(())
    }

    /// Prints a message of this conversation, or the receipts it brings, and
    /// advances the saved cursor; events already processed (seq not above the
    /// cursor) are skipped. Channel posts (seq 0) are printed only.
    async fn on_event(&mut self, session: &mut Session, event: Event) -> anyhow::Result<()> {
        if event.seq != 0 && event.seq <= self.cursor {
            return Ok(());
        }
        match &event.kind {
            Some(event::Kind::Message(message) | event::Kind::ChannelPost(message))
                if message.conversation_id == self.conversation_id =>
            {
                self.print(session, message).await?;
            }
            Some(event::Kind::Receipt(receipt))
                if receipt.conversation_id == self.conversation_id =>
            {
                self.on_receipt(session, receipt);
            }
            Some(event::Kind::Presence(presence)) => self.on_presence(session, presence),
            Some(event::Kind::Typing(typing)) if typing.conversation_id == self.conversation_id => {
                self.on_typing(session, typing);
            }
            _ => {}
        }
        if event.seq == 0 {
            return Ok(());
        }
        self.cursor = event.seq;
        session.save_cursor(event.seq)
    }

    async fn print(&mut self, session: &mut Session, message: &Message) -> anyhow::Result<()> {
        let mut people = vec![message.sender_id];
        if let Some(notice) = &message.notice {
            people.push(notice.actor_id);
        }
        let unknown = people
            .into_iter()
            .any(|id| !session.knows(id) && self.asked_names.insert(id));
        if unknown {
            // The conversation list names the sender of each last message.
            session.learn_names().await?;
        }
        println!(
            "{}",
            show::any_message_line(message, &|id| session.name_of(id))
        );
        if message.sender_id == self.me {
            self.unechoed.remove(&message.id);
            self.echoed.insert(message.id);
            if message.notice.is_none() {
                self.mine.insert(message.id);
            }
        } else {
            self.to_mark = Some(self.to_mark.map_or(message.id, |id| id.max(message.id)));
        }
        Ok(())
    }

    /// Prints the peer's presence when it differs from what was printed last.
    fn on_presence(&mut self, session: &Session, presence: &Presence) {
        if Some(presence.user_id) != self.peer_id {
            return;
        }
        let state = (presence.online, presence.last_seen_ms);
        if self.peer_presence.replace(state) == Some(state) {
            return;
        }
        let name = session.name_of(presence.user_id);
        println!("{}", super::presence::chat_line(&name, presence));
    }

    /// Prints `bob is typing…` when a member starts typing (once until they stop).
    fn on_typing(&mut self, session: &Session, typing: &TypingState) {
        if typing.user_id == self.me {
            return;
        }
        if !typing.typing {
            self.typing.remove(&typing.user_id);
            return;
        }
        if self.typing.insert(typing.user_id) {
            let name = show::one_line(&session.name_of(typing.user_id));
            println!("{name} is typing…");
        }
    }

    /// Prints `  ✓✓ #id delivered to bob` / `  ✓✓ #id read by bob` for each own
    /// message a member's watermarks moved past.
    fn on_receipt(&mut self, session: &Session, receipt: &Receipt) {
        let (delivered, read) = self
            .watermarks
            .get(&receipt.user_id)
            .copied()
            .unwrap_or_default();
        let name = show::one_line(&session.name_of(receipt.user_id));
        // A range whose start is past its end would panic.
        if receipt.delivered_up_to > delivered {
            for id in self.mine.range(delivered + 1..=receipt.delivered_up_to) {
                if *id > read.max(receipt.read_up_to) {
                    println!("  ✓✓ #{id} delivered to {name}");
                }
            }
        }
        if receipt.read_up_to > read {
            for id in self.mine.range(read + 1..=receipt.read_up_to) {
                println!("  ✓✓ #{id} read by {name}");
            }
        }
        self.watermarks.insert(
            receipt.user_id,
            (
                delivered.max(receipt.delivered_up_to),
                read.max(receipt.read_up_to),
            ),
        );
    }

    fn on_ack(&mut self, r#ref: u64, ack: &SendAck) {
        if self.unanswered.remove(&r#ref).is_none() {
            return;
        }
        if !ack.duplicate && !self.echoed.contains(&ack.message_id) {
            self.unechoed.insert(ack.message_id);
        }
        self.mine.insert(ack.message_id);
        println!("✓ sent #{}", ack.message_id);
    }
}

/// Reads stdin lines on a plain thread: a blocked read never holds up the end
/// of the program (a runtime's blocking pool would be waited for).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel(OUTBOUND_QUEUE);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if sender.blocking_send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// A short description of an unexpected frame.
fn describe(frame: &ServerFrame) -> String {
    match &frame.kind {
        Some(server_frame::Kind::Error(error)) => show::one_line(&error.message),
        other => format!("unexpected {other:?}"),
    }
}
