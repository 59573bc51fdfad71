//! Scenario `group`: one group of G members, every member connected on its own
//! live connection (`--transport`: gRPC `Edge.Stream` or the WebSocket
//! `/v1/ws`) and TCP connection. One member posts M messages one after
//! another; for each, the time from the send until the *last* other member has
//! it is recorded, so the figure is the fan-out time of the whole group, not of
//! its fastest member.
//! With several servers (gateways of one cluster) member `i` connects to server
//! `i % n`; the sender is member 0.
//!
//! Members are users of an external identity provider (the server must run with
//! `--external-jwt-secret` equal to `--external-secret` here): the bench mints
//! their tokens itself, which skips 1,000 password hashings at set-up.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{
    ClientFrame, CreateGroupRequest, MeRequest, SendMessage, client_frame, event, server_frame,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::client::{Live, Servers, Transport, authorized, mint};
use crate::report::{Percentiles, RunResult};

/// Arguments of the group scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Members of the group, the sender included.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Messages sent, one after the other.
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// The live connection of every member: gRPC `Edge.Stream` or WebSocket
    /// `/v1/ws`.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// The server's `--external-jwt-secret`.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_SECRET")]
    #[serde(skip)]
    external_secret: String,
}

/// Runs the scenario against `servers`.
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    anyhow::ensure!(args.members >= 2, "a group needs two members");
    servers.check(args.transport)?;
    let channel = Channel::from_shared(servers.first().to_owned())?
        .connect()
        .await?;
    let run_id: u32 = rand::random();
    eprintln!("setting up {} members", args.members);
    let mut tokens = Vec::with_capacity(args.members);
    let mut ids = Vec::with_capacity(args.members);
    for i in 0..args.members {
        let token = mint(&args.external_secret, &format!("g{run_id:08x}m{i}"))?;
        let me = AccountsClient::new(channel.clone())
            .me(authorized(MeRequest {}, &token)?)
            .await?
            .into_inner();
        ids.push(me.id);
        tokens.push(token);
    }
    let request = CreateGroupRequest {
        name: format!("bench {run_id:08x}"),
        member_ids: ids[1..].to_vec(),
        ..Default::default()
    };
    let group = ConversationsClient::new(channel.clone())
        .create_group(authorized(request, &tokens[0])?)
        .await?
        .into_inner();

    // Every member's connection reports the message ids it receives.
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let mut sender = None;
    for (i, token) in tokens.iter().enumerate() {
        let live = Live::open(args.transport, servers.nth(i), token).await?;
        if i == 0 {
            sender = Some(live);
            continue;
        }
        tokio::spawn(watch(live, arrivals.clone()));
    }
    let mut sender = sender.context("no sender")?;
    let others = args.members - 1;
    eprintln!(
        "sending {} messages to {others} connected members",
        args.messages
    );

    let mut fanout = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    for n in 0..args.messages {
        let sent_at = Instant::now();
        let frame = ClientFrame {
            r#ref: n as u64 + 1,
            kind: Some(client_frame::Kind::Send(SendMessage {
                conversation_id: group.id,
                client_msg_id: format!("g{n}"),
                text: format!("message {n}"),
            })),
        };
        sender.send(frame).await?;
        let message_id = acked(&mut sender).await?;
        let mut have = 0;
        while have < others {
            let (id, _at) = tokio::time::timeout(Duration::from_secs(30), arrived.recv())
                .await
                .context("a member did not get the message within 30 s")?
                .context("members' connections ended")?;
            if id == message_id {
                have += 1;
            }
        }
        fanout.record((sent_at.elapsed().as_micros() as u64).max(1))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let deliveries = (args.messages * others) as f64;
    println!(
        "group over {}: {} members ({others} connected receivers), {} messages, {:.0} deliveries/s",
        args.transport.name(),
        args.members,
        args.messages,
        deliveries / elapsed
    );
    let figures = Figures {
        receivers: others,
        deliveries_per_s: deliveries / elapsed,
        send_to_last_member: Percentiles::of(&fanout),
    };
    println!(
        "  send->last member  {}",
        figures.send_to_last_member.line()
    );
    RunResult::new("group", &args, &figures)
}

/// What the group scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    receivers: usize,
    deliveries_per_s: f64,
    /// From the send until the last other member has the message.
    send_to_last_member: Percentiles,
}

/// Forwards the id of every message this member receives.
async fn watch(mut live: Live, arrivals: mpsc::UnboundedSender<(i64, Instant)>) {
    while let Some(Ok(frame)) = live.next().await {
        if let Some(server_frame::Kind::Event(ev)) = frame.kind
            && let Some(event::Kind::Message(message)) = ev.kind
            && arrivals.send((message.id, Instant::now())).is_err()
        {
            return;
        }
    }
}

/// Waits for the sender's acknowledgement and returns the message id.
async fn acked(live: &mut Live) -> anyhow::Result<i64> {
    loop {
        let frame = live.next().await.context("sender stream ended")??;
        match frame.kind {
            Some(server_frame::Kind::Sent(ack)) => return Ok(ack.message_id),
            Some(server_frame::Kind::Error(error)) => {
                anyhow::bail!("send failed: {} {}", error.reason, error.message)
            }
            _ => {}
        }
    }
}
