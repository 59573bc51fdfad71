//! `chat <peer>`: prints the catch-up and live messages of one conversation,
//! sends every stdin line, ends at end of input once every send is answered.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{
    ClientFrame, Event, Hello, SendAck, SendMessage, ServerFrame, client_frame, event, server_frame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use super::session::Session;
use super::show;

/// How long the end of input waits for outstanding acks and echoes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Frames queued towards the server.
const OUTBOUND_QUEUE: usize = 64;

/// Runs the chat with `peer` until stdin ends.
pub(super) async fn run(session: &mut Session, peer: &str) -> anyhow::Result<ExitCode> {
    let conversation = session.open_direct(peer).await?;
    let me = session.login().user_id;
    let peer_id = conversation
        .member_ids
        .iter()
        .copied()
        .find(|id| *id != me)
        .unwrap_or(me);
    let (outbound, inbound) = open_stream(session).await?;
    let mut chat = Chat {
        conversation_id: conversation.id,
        me,
        my_name: session.login().username.clone(),
        peer_id,
        peer_name: peer.to_owned(),
        cursor: session.login().cursor,
        next_ref: 1,
        unanswered: HashMap::new(),
        unechoed: HashSet::new(),
        echoed: HashSet::new(),
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
    me: i64,
    my_name: String,
    peer_id: i64,
    peer_name: String,
    /// The last event processed; saved after every event.
    cursor: u64,
    /// The `ref` of the next send.
    next_ref: u64,
    /// Sends not answered yet, by `ref`: their text, for error lines.
    unanswered: HashMap<u64, String>,
    /// Own messages acknowledged but not yet seen as events.
    unechoed: HashSet<i64>,
    /// Own messages seen as events (an event may come before its ack).
    echoed: HashSet<i64>,
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
        loop {
            if !input_open && self.settled() {
                return Ok(());
            }
            tokio::select! {
                received = inbound.message() => {
                    let frame = received.map_err(|status| show::status_error("connection lost", &status))?;
                    let Some(frame) = frame else { bail!("the server closed the connection") };
                    self.on_frame(session, frame)?;
                }
                line = lines.recv(), if input_open => match line {
                    Some(line) => self.send_line(&outbound, line).await?,
                    None => {
                        input_open = false;
                        drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                },
                () = &mut drain_deadline => {
                    bail!("{} message(s) not confirmed by the server", self.unanswered.len() + self.unechoed.len());
                }
            }
        }
    }

    /// True when every send was answered and every own message came back.
    fn settled(&self) -> bool {
        self.unanswered.is_empty() && self.unechoed.is_empty()
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
        let r#ref = self.next_ref;
        self.next_ref += 1;
        let send = SendMessage {
            conversation_id: self.conversation_id,
            client_msg_id: format!("{:032x}", rand::random::<u128>()),
            text: text.to_owned(),
        };
        let frame = ClientFrame {
            r#ref,
            kind: Some(client_frame::Kind::Send(send)),
        };
        outbound
            .send(frame)
            .await
            .context("the connection has ended")?;
        self.unanswered.insert(r#ref, text.to_owned());
        Ok(())
    }

    fn on_frame(&mut self, session: &mut Session, frame: ServerFrame) -> anyhow::Result<()> {
        match frame.kind {
            Some(server_frame::Kind::Event(event)) => self.on_event(session, event)?,
            Some(server_frame::Kind::Sent(ack)) => self.on_ack(frame.r#ref, &ack),
            Some(server_frame::Kind::Synced(_)) => {
                eprintln!(
                    "-- chatting with {}: type a line to send it, end input to quit --",
                    self.peer_name
                );
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

    /// Prints a message of this conversation and advances the saved cursor;
    /// events already processed (seq not above the cursor) are skipped.
    fn on_event(&mut self, session: &mut Session, event: Event) -> anyhow::Result<()> {
        if event.seq <= self.cursor {
            return Ok(());
        }
        if let Some(event::Kind::Message(message)) = &event.kind
            && message.conversation_id == self.conversation_id
        {
            println!(
                "{}",
                show::message_line(message, self.name_of(message.sender_id))
            );
            if message.sender_id == self.me {
                self.unechoed.remove(&message.id);
                self.echoed.insert(message.id);
            }
        }
        self.cursor = event.seq;
        session.save_cursor(event.seq)
    }

    fn on_ack(&mut self, r#ref: u64, ack: &SendAck) {
        if self.unanswered.remove(&r#ref).is_none() {
            return;
        }
        if !ack.duplicate && !self.echoed.contains(&ack.message_id) {
            self.unechoed.insert(ack.message_id);
        }
        println!("✓ sent #{}", ack.message_id);
    }

    fn name_of(&self, user_id: i64) -> &str {
        match user_id {
            id if id == self.me => &self.my_name,
            id if id == self.peer_id => &self.peer_name,
            _ => "someone else",
        }
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
