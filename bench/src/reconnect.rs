//! Scenario `reconnect`: K pairs of external users, each in a direct
//! conversation. Senders send through the unary `Conversations.Send` on a fixed
//! schedule the whole time; after a warm-up every receiver drops its connection
//! at the same instant and reconnects with the cursor of the last event it
//! processed, while the senders go on.
//!
//! A receiver is *caught up* once its catch-up is complete (`Synced`) and it
//! holds every message acknowledged before the drop; the figure is the time from
//! the drop until then, the slowest receiver being the storm's time. When the
//! senders stop, every receiver must end up with every acknowledged message:
//! `missed` counts those it never got (must be 0), `duplicates` those it got
//! twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{SendMessage, ServerFrame, event, server_frame};
use serde::Serialize;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::client::{Servers, connect, direct, external_user, send_unary};
use crate::report::{Percentiles, RunResult, histogram};

/// How long a receiver waits for the rest of the messages once the senders stop.
const DRAIN: Duration = Duration::from_secs(30);

/// Arguments of the reconnect scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Sender/receiver pairs; every receiver drops at once.
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Messages per second, over all pairs.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of traffic before the drop.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Seconds of traffic after the drop.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// The server's `--external-jwt-secret`.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_SECRET")]
    #[serde(skip)]
    external_secret: String,
}

/// What the reconnect scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    acknowledged: u64,
    acknowledged_before_drop: u64,
    /// From the drop until the slowest receiver was caught up.
    all_caught_up_ms: f64,
    /// Per receiver, from the drop until it was caught up.
    caught_up: Percentiles,
    missed: u64,
    duplicates: u64,
}

/// The messages acknowledged to one pair's sender, with when.
type Acked = Arc<Mutex<Vec<(i64, Instant)>>>;

/// What one receiver saw.
#[derive(Debug)]
struct Seen {
    caught_up_after: Option<Duration>,
    missed: u64,
    duplicates: u64,
}

/// Runs the scenario against `servers`: set-up through the first; pair `i`
/// sends through server `i % n` and receives (and resumes) through server
/// `(i + 1) % n`.
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    anyhow::ensure!(args.pairs > 0, "need at least one pair");
    // The schedule of one second gives the interval; senders run until stopped.
    let (interval, _) = crate::one_to_one::schedule(args.rate, args.pairs, 1)?;
    let channel = Channel::from_shared(servers.first().to_owned())?
        .connect()
        .await?;
    let run_id: u32 = rand::random();
    let secret = &args.external_secret;

    eprintln!("setting up {} pairs", args.pairs);
    let progress = crate::progress(args.pairs as u64);
    let mut pairs = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        let (sender, _) = external_user(&channel, secret, &format!("r{run_id:08x}s{i}")).await?;
        let (receiver, receiver_id) =
            external_user(&channel, secret, &format!("r{run_id:08x}r{i}")).await?;
        let conversation_id = direct(&channel, &sender, receiver_id).await?;
        pairs.push((sender, receiver, conversation_id));
        progress.inc(1);
    }
    progress.finish_and_clear();

    let (drop_tx, drop_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (stop_sending_tx, stop_sending_rx) = watch::channel(false);
    let mut receivers = Vec::with_capacity(pairs.len());
    let mut senders = Vec::with_capacity(pairs.len());
    for (i, (sender, receiver, conversation_id)) in pairs.into_iter().enumerate() {
        let acked = Acked::default();
        let receiver_server = servers.nth(i + 1);
        let (out, mut inbound) = connect(receiver_server, &receiver, "bench-r", 0).await?;
        let mut cursor = 0;
        // The receiver starts from a complete catch-up, so that the drop finds
        // it live.
        while !next(&mut inbound, &mut cursor, &mut HashMap::new()).await? {}
        receivers.push(tokio::spawn(receive(
            receiver_server.to_owned(),
            receiver,
            (out, inbound, cursor),
            acked.clone(),
            drop_rx.clone(),
            stop_rx.clone(),
        )));
        let channel = Channel::from_shared(servers.nth(i).to_owned())?
            .connect()
            .await?;
        senders.push(tokio::spawn(send(
            channel,
            sender,
            conversation_id,
            interval,
            acked,
            stop_sending_rx.clone(),
        )));
    }

    eprintln!(
        "{} msg/s for {} s, then every receiver drops; {} s more",
        args.rate, args.warmup, args.after
    );
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    drop_tx.send(Some(Instant::now()))?;
    tokio::time::sleep(Duration::from_secs(args.after)).await;
    stop_sending_tx.send(true)?;
    let mut acknowledged = 0;
    let mut acknowledged_before_drop = 0;
    let dropped_at = drop_tx.borrow().context("no drop time")?;
    for sender in senders {
        let acked = sender.await??;
        let acked = lock(&acked)?;
        acknowledged += acked.len() as u64;
        acknowledged_before_drop += acked.iter().filter(|(_, at)| *at <= dropped_at).count() as u64;
    }
    // Every acknowledgement is recorded: receivers may now check for the rest.
    stop_tx.send(true)?;

    let mut caught_up = histogram();
    let mut all_caught_up = Duration::ZERO;
    let (mut missed, mut duplicates) = (0, 0);
    for receiver in receivers {
        let seen = receiver.await??;
        missed += seen.missed;
        duplicates += seen.duplicates;
        if let Some(after) = seen.caught_up_after {
            caught_up.record((after.as_micros() as u64).max(1))?;
            all_caught_up = all_caught_up.max(after);
        }
    }
    let figures = Figures {
        acknowledged,
        acknowledged_before_drop,
        all_caught_up_ms: all_caught_up.as_secs_f64() * 1000.0,
        caught_up: Percentiles::of(&caught_up),
        missed,
        duplicates,
    };
    println!(
        "reconnect: {} receivers dropped at once; all caught up after {:.1} ms; {} acknowledged, {} missed, {} duplicates",
        args.pairs, figures.all_caught_up_ms, acknowledged, missed, duplicates
    );
    println!("  drop->caught up  {}", figures.caught_up.line());
    if caught_up.len() < args.pairs as u64 {
        eprintln!(
            "warning: {} receivers never caught up",
            args.pairs as u64 - caught_up.len()
        );
    }
    RunResult::new("reconnect", &args, &figures)
}

/// Sends on a fixed schedule until told to stop; returns what was acknowledged.
async fn send(
    channel: Channel,
    token: String,
    conversation_id: i64,
    interval: Duration,
    acked: Acked,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Acked> {
    let mut client = ConversationsClient::new(channel);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        let request = SendMessage {
            conversation_id,
            client_msg_id: format!("r{n}"),
            text: format!("reconnect {n}"),
        };
        let ack = send_unary(&mut client, request, &token).await?;
        lock(&acked)?.push((ack.message_id, Instant::now()));
    }
    Ok(acked)
}

/// One receiver: live until the drop, then reconnects from its cursor and
/// reads until it holds every acknowledged message (or [`DRAIN`] passes).
async fn receive(
    server: String,
    token: String,
    live: (
        tokio::sync::mpsc::Sender<confab_proto::v1::ClientFrame>,
        crate::client::Inbound,
        u64,
    ),
    acked: Acked,
    mut dropped: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Seen> {
    let (out, mut inbound, mut cursor) = live;
    let mut seen: HashMap<i64, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = dropped.changed() => break,
            frame = next(&mut inbound, &mut cursor, &mut seen) => { frame?; }
        }
    }
    drop((out, inbound));
    let dropped_at = dropped.borrow().context("no drop time")?;

    let (_out, mut inbound) = connect(&server, &token, "bench-r", cursor).await?;
    let target: HashSet<i64> = lock(&acked)?
        .iter()
        .filter(|(_, at)| *at <= dropped_at)
        .map(|(id, _)| *id)
        .collect();
    let mut synced = false;
    let mut caught_up_after = None;
    loop {
        if caught_up_after.is_none() && synced && target.iter().all(|id| seen.contains_key(id)) {
            caught_up_after = Some(dropped_at.elapsed());
        }
        if *stop.borrow_and_update()
            && caught_up_after.is_some()
            && lock(&acked)?.iter().all(|(id, _)| seen.contains_key(id))
        {
            break;
        }
        tokio::select! {
            _ = stop.changed() => {}
            frame = tokio::time::timeout(DRAIN, next(&mut inbound, &mut cursor, &mut seen)) => {
                match frame {
                    Err(_) => break,
                    Ok(frame) => synced |= frame?,
                }
            }
        }
    }
    let missed = lock(&acked)?
        .iter()
        .filter(|(id, _)| !seen.contains_key(id))
        .count() as u64;
    let duplicates = seen.values().map(|times| times - 1).sum();
    Ok(Seen {
        caught_up_after,
        missed,
        duplicates,
    })
}

/// Reads one frame: records a message's id and the event's sequence number;
/// returns whether it was `Synced`.
async fn next(
    inbound: &mut crate::client::Inbound,
    cursor: &mut u64,
    seen: &mut HashMap<i64, u64>,
) -> anyhow::Result<bool> {
    let frame: ServerFrame = inbound.next().await.context("receiver stream ended")??;
    match frame.kind {
        Some(server_frame::Kind::Synced(_)) => Ok(true),
        Some(server_frame::Kind::Event(ev)) => {
            if ev.seq > 0 {
                *cursor = (*cursor).max(ev.seq);
            }
            if let Some(event::Kind::Message(message)) = ev.kind {
                *seen.entry(message.id).or_default() += 1;
            }
            Ok(false)
        }
        Some(server_frame::Kind::Error(error)) => {
            anyhow::bail!("receiver got an error: {} {}", error.reason, error.message)
        }
        _ => Ok(false),
    }
}

/// Locks a pair's acknowledgements.
fn lock(acked: &Acked) -> anyhow::Result<std::sync::MutexGuard<'_, Vec<(i64, Instant)>>> {
    acked
        .lock()
        .map_err(|_| anyhow::anyhow!("acknowledgements lock poisoned"))
}
