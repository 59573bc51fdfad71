//! Scenario `history`: one direct conversation filled with N messages through the
//! unary `Conversations.Send` (a bounded number in flight), then C clients, each
//! on its own connection, fetch the newest page of 50 (`Conversations.History`)
//! back to back for D seconds. Reports pages per second and page latency.

use std::time::{Duration, Instant};

use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{HistoryRequest, SendMessage};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{Servers, authorized, direct, external_user, send_unary};
use crate::report::{Percentiles, RunResult, histogram, merge};

/// The page size apps ask for when a conversation opens.
const PAGE: u32 = 50;

/// Arguments of the history scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Messages in the conversation.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Sends in flight while filling the conversation.
    #[arg(long, default_value_t = 64)]
    fill_concurrency: usize,
    /// Clients fetching pages, each on its own connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of fetching.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The server's `--external-jwt-secret`.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_SECRET")]
    #[serde(skip)]
    external_secret: String,
}

/// What the history scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    fill_messages_per_s: f64,
    pages: u64,
    pages_per_s: f64,
    page_latency: Percentiles,
}

/// Runs the scenario against `servers`: the fill goes through the first, reader
/// `k` reads through server `k % n`.
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        args.messages > 0 && args.clients > 0,
        "need messages and clients"
    );
    let channel = Channel::from_shared(servers.first().to_owned())?
        .connect()
        .await?;
    let run_id: u32 = rand::random();
    let secret = &args.external_secret;
    let (token, _) = external_user(&channel, secret, &format!("h{run_id:08x}a")).await?;
    let (_, peer_id) = external_user(&channel, secret, &format!("h{run_id:08x}b")).await?;
    let conversation_id = direct(&channel, &token, peer_id).await?;

    eprintln!("filling one conversation with {} messages", args.messages);
    let progress = crate::progress(args.messages as u64);
    let filling = Instant::now();
    let mut sends = futures::stream::iter(0..args.messages)
        .map(|n| {
            let mut client = ConversationsClient::new(channel.clone());
            let message = SendMessage {
                conversation_id,
                client_msg_id: format!("h{n}"),
                text: format!("history message {n}"),
            };
            let token = &token;
            async move { send_unary(&mut client, message, token).await }
        })
        .buffer_unordered(args.fill_concurrency.max(1));
    while let Some(sent) = sends.next().await {
        sent?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let fill_messages_per_s = args.messages as f64 / filling.elapsed().as_secs_f64();

    eprintln!(
        "{} clients fetching pages of {PAGE} for {} s",
        args.clients, args.seconds
    );
    let duration = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut readers = Vec::with_capacity(args.clients);
    for k in 0..args.clients {
        let channel = Channel::from_shared(servers.nth(k).to_owned())?
            .connect()
            .await?;
        readers.push(tokio::spawn(read_pages(
            channel,
            token.clone(),
            conversation_id,
            started + duration,
        )));
    }
    let mut parts = Vec::with_capacity(readers.len());
    for reader in readers {
        parts.push(reader.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let latency = merge(parts)?;
    let figures = Figures {
        fill_messages_per_s,
        pages: latency.len(),
        pages_per_s: latency.len() as f64 / elapsed,
        page_latency: Percentiles::of(&latency),
    };
    println!(
        "history: {} messages filled at {:.0} msg/s; {} clients read {} pages = {:.0} pages/s",
        args.messages,
        figures.fill_messages_per_s,
        args.clients,
        figures.pages,
        figures.pages_per_s
    );
    println!("  page latency  {}", figures.page_latency.line());
    RunResult::new("history", &args, &figures)
}

/// Fetches the newest page back to back until `until`; returns the latencies.
async fn read_pages(
    channel: Channel,
    token: String,
    conversation_id: i64,
    until: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut client = ConversationsClient::new(channel);
    let mut latency = histogram();
    while Instant::now() < until {
        let request = HistoryRequest {
            conversation_id,
            limit: PAGE,
            ..Default::default()
        };
        let asked = Instant::now();
        let page = client
            .history(authorized(request, &token)?)
            .await?
            .into_inner();
        latency.record((asked.elapsed().as_micros() as u64).max(1))?;
        anyhow::ensure!(!page.messages.is_empty(), "history returned an empty page");
    }
    Ok(latency)
}
