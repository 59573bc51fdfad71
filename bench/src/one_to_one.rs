//! Scenario `one-to-one`: P pairs of freshly registered users, each on its own
//! live connection and TCP connection (`--transport`: gRPC `Edge.Stream` or the
//! WebSocket `/v1/ws`, for sender and receiver alike); every sender sends on a
//! fixed schedule (open loop: the next send does not wait for the previous
//! acknowledgement, so a slow server shows up as latency instead of hiding it).
//! Latency is measured from the *scheduled* send time (when the tick was due, so
//! that a generator that falls behind shows up too) to the acknowledgement
//! (*sent*) and to the arrival at the peer (*delivered*). With several servers
//! (gateways of one cluster) the two members of a pair connect to different
//! ones: pair `i` sends through server `i % n` and receives through server
//! `(i + 1) % n`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::conversations_client::ConversationsClient;
use confab_proto::v1::{
    ClientFrame, Delivered, OpenDirectRequest, RegisterRequest, SendMessage, client_frame, event,
    server_frame,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tonic::transport::Channel;

use crate::client::{Live, Servers, Transport, authorized};
use crate::procfs::{self, MachineCpu, ThreadCpu};
use crate::report::{Percentiles, RunResult, histogram};

/// Arguments of the one-to-one scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Sender/receiver pairs, each with its own conversation.
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Messages per second, over all pairs.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The live connection of every sender and receiver: gRPC `Edge.Stream` or
    /// WebSocket `/v1/ws`.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// Every receiver acknowledges each message with a delivered receipt, as
    /// apps do: a receipt command per message for the server's writer, and a
    /// receipt event for the sender.
    #[arg(long)]
    receipts: bool,
    /// The server's process id, when it runs on this machine: the run then
    /// reports the CPU each group of its threads used per message while
    /// sending (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
}

/// Latencies in microseconds, merged from every connection.
struct Recorder {
    sent: Histogram<u64>,
    delivered: Histogram<u64>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            sent: histogram(),
            delivered: histogram(),
        }
    }
}

/// Runs the scenario against `servers`.
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    servers.check(args.transport)?;
    let channel = Channel::from_shared(servers.first().to_owned())?
        .connect()
        .await
        .context("cannot connect to the server")?;
    let run_id: u32 = rand::random();
    let (interval, total_per_pair) = schedule(args.rate, args.pairs, args.seconds)?;
    let per_pair = 1.0 / interval.as_secs_f64();
    let recorder = Arc::new(Mutex::new(Recorder::new()));
    let schedule = Schedule {
        interval,
        count: total_per_pair,
        epoch: Instant::now(),
    };

    eprintln!("setting up {} pairs", args.pairs);
    let mut pairs = Vec::new();
    for i in 0..args.pairs {
        pairs.push(Pair::setup(&channel, run_id, i).await?);
    }
    eprintln!(
        "sending {} msg/s for {} s ({per_pair:.1} msg/s per pair) over {}",
        args.rate,
        args.seconds,
        args.transport.name()
    );
    // Every connection is open before the first send, so that the throughput
    // is taken over the sending alone.
    let connected =
        futures::future::try_join_all(pairs.into_iter().enumerate().map(|(i, pair)| {
            let (sender_server, receiver_server) = pair_servers(servers, i);
            pair.connect(args.transport, sender_server, receiver_server)
        }))
        .await?;
    let ticks_before = args.server_pid.and_then(procfs::thread_ticks);
    let machine_before = procfs::machine_ticks();
    let bench_before = procfs::cpu_ticks(std::process::id());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, pair) in connected.into_iter().enumerate() {
        let first = started + phase(i, args.pairs, interval);
        let run = pair.run(first, schedule, args.receipts, recorder.clone());
        tasks.push(tokio::spawn(run));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ticks_after = args.server_pid.and_then(procfs::thread_ticks);
    let machine_after = procfs::machine_ticks();
    let bench_after = procfs::cpu_ticks(std::process::id());
    let recorder = recorder.lock().await;
    let delivered = recorder.delivered.len();
    let machine = machine_before
        .zip(machine_after)
        .and_then(|(before, after)| procfs::machine_cpu(before, after));
    let bench_micros_per_message = bench_before
        .zip(bench_after)
        .map(|(before, after)| procfs::micros_per_message(after.saturating_sub(before), delivered));
    let server_cpu = match (ticks_before, ticks_after) {
        (Some(before), Some(after)) => {
            Some(procfs::thread_cpu(&before, &after, delivered, elapsed))
        }
        _ => None,
    };
    println!(
        "one-to-one over {}: {} pairs, offered {} msg/s, {} delivered in {elapsed:.1} s = {:.0} msg/s",
        args.transport.name(),
        args.pairs,
        args.rate,
        delivered,
        delivered as f64 / elapsed
    );
    let figures = Figures {
        delivered,
        delivered_per_s: delivered as f64 / elapsed,
        sent: Percentiles::of(&recorder.sent),
        delivered_latency: Percentiles::of(&recorder.delivered),
        server_cpu,
        machine,
        bench_micros_per_message,
    };
    println!("  send->sent      {}", figures.sent.line());
    println!("  send->delivered {}", figures.delivered_latency.line());
    if let Some(cpu) = &figures.server_cpu {
        println!("  server CPU      {}", procfs::cpu_line(cpu));
    }
    if let Some(machine) = &figures.machine {
        println!(
            "  machine         {}",
            procfs::machine_line(machine, figures.bench_micros_per_message)
        );
    }
    RunResult::new("one-to-one", &args, &figures)
}

/// What the one-to-one scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    delivered: u64,
    delivered_per_s: f64,
    /// From the scheduled send to the *sent* acknowledgement.
    sent: Percentiles,
    /// From the scheduled send to the arrival at the peer.
    delivered_latency: Percentiles,
    /// The server's CPU while sending, per group of threads (with
    /// `--server-pid`; a group that used less than a clock tick is left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu: Option<Vec<ThreadCpu>>,
    /// How the machine's CPUs spent the sending: on a shared virtual machine
    /// a run that lost CPU to the host shows it here (from /proc/stat).
    #[serde(skip_serializing_if = "Option::is_none")]
    machine: Option<MachineCpu>,
    /// The bench's own CPU per message while sending (its clients share the
    /// machine with the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    bench_micros_per_message: Option<f64>,
}

/// Returns each pair's send interval and message count for `rate` messages per
/// second spread evenly over `pairs` for `seconds`.
///
/// # Errors
///
/// Fails when the rate leaves a pair nothing to send.
pub(crate) fn schedule(rate: u64, pairs: usize, seconds: u64) -> anyhow::Result<(Duration, u64)> {
    anyhow::ensure!(pairs > 0, "need at least one pair");
    let per_pair = rate as f64 / pairs as f64;
    let count = (per_pair * seconds as f64).round() as u64;
    anyhow::ensure!(
        per_pair > 0.0 && count > 0,
        "rate too low for this many pairs"
    );
    Ok((Duration::from_secs_f64(1.0 / per_pair), count))
}

/// Returns when pair `i` of `pairs` sends first, after the start: the pairs'
/// first sends are spread evenly over one interval, so that together they send
/// at a steady rate instead of all at once, once per interval.
fn phase(i: usize, pairs: usize, interval: Duration) -> Duration {
    interval.mul_f64(i as f64 / pairs as f64)
}

/// Returns a ticker of `interval` whose first tick is due at `start`. A tick it
/// could not deliver on time comes late, at once (`Burst`), and carries the
/// instant it was due: the schedule is kept, not shifted.
fn ticker(start: Instant, interval: Duration) -> Interval {
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    ticker
}

/// Returns the microseconds from `epoch` to `at` (0 before it): the time
/// stamps the messages carry.
fn micros(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_micros() as u64
}

/// Returns the servers of pair `i`'s sender and receiver: neighbours in the
/// list, so that with several servers every message crosses from one to another.
fn pair_servers(servers: &Servers, i: usize) -> (&str, &str) {
    (servers.nth(i), servers.nth(i + 1))
}

/// When each pair sends, and what its messages' time stamps count from.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    /// The time between two sends of one pair.
    interval: Duration,
    /// The messages each pair sends.
    count: u64,
    /// The instant of time stamp 0, shared by every pair.
    epoch: Instant,
}

/// One sender and one receiver in one direct conversation.
struct Pair {
    sender_token: String,
    receiver_token: String,
    conversation_id: i64,
}

impl Pair {
    async fn setup(channel: &Channel, run_id: u32, i: usize) -> anyhow::Result<Self> {
        let mut accounts = AccountsClient::new(channel.clone());
        let mut tokens = Vec::new();
        for role in ["s", "r"] {
            let response = accounts
                .register(RegisterRequest {
                    username: format!("b{run_id:08x}{role}{i}"),
                    password: "bench-password".into(),
                })
                .await?
                .into_inner();
            tokens.push((response.access_token, response.user.unwrap_or_default().id));
        }
        let (receiver_token, receiver_id) = tokens.pop().unwrap_or_default();
        let (sender_token, _) = tokens.pop().unwrap_or_default();
        let request = authorized(
            OpenDirectRequest {
                user_id: receiver_id,
                username: String::new(),
            },
            &sender_token,
        )?;
        let conversation = ConversationsClient::new(channel.clone())
            .open_direct(request)
            .await?
            .into_inner();
        Ok(Self {
            sender_token,
            receiver_token,
            conversation_id: conversation.id,
        })
    }

    /// Opens the receiver's and the sender's live connections.
    async fn connect(
        self,
        transport: Transport,
        sender_server: &str,
        receiver_server: &str,
    ) -> anyhow::Result<Connected> {
        Ok(Connected {
            receiver: Live::open(transport, receiver_server, &self.receiver_token).await?,
            sender: Live::open(transport, sender_server, &self.sender_token).await?,
            conversation_id: self.conversation_id,
            sent: histogram(),
            delivered: histogram(),
        })
    }
}

/// A pair with both live connections open.
struct Connected {
    sender: Live,
    receiver: Live,
    conversation_id: i64,
    /// The pair's latencies, made before the first send: a histogram is about
    /// 140 KB to clear, and 400 of them made as the pairs started delayed the
    /// first sends of a 200-pair run by up to 50 ms, counted as latency.
    sent: Histogram<u64>,
    delivered: Histogram<u64>,
}

impl Connected {
    /// Sends on the schedule from `first` on, and records both latencies.
    async fn run(
        self,
        first: Instant,
        schedule: Schedule,
        receipts: bool,
        recorder: Arc<Mutex<Recorder>>,
    ) -> anyhow::Result<()> {
        let Schedule {
            interval,
            count,
            epoch,
        } = schedule;
        let Self {
            mut sender,
            mut receiver,
            conversation_id,
            mut sent,
            delivered: mut histogram,
        } = self;

        // The receiver: every message's text is its scheduled send time.
        let receiving = tokio::spawn(async move {
            while histogram.len() < count {
                let frame = receiver.next().await.context("receiver stream ended")??;
                if let Some(server_frame::Kind::Event(ev)) = frame.kind
                    && let Some(event::Kind::Message(message)) = ev.kind
                {
                    let scheduled: u64 = message.text.parse()?;
                    let now = micros(epoch, Instant::now());
                    histogram.record(now.saturating_sub(scheduled).max(1))?;
                    if receipts {
                        let delivered = ClientFrame {
                            r#ref: histogram.len(),
                            kind: Some(client_frame::Kind::Delivered(Delivered {
                                conversation_id: message.conversation_id,
                                up_to: message.id,
                            })),
                        };
                        receiver.send(delivered).await?;
                    }
                }
            }
            receiver.close().await;
            anyhow::Ok(histogram)
        });

        // The sender: a fixed schedule, acknowledgements matched by ref.
        let mut scheduled_at = HashMap::new();
        let mut ticker = ticker(first, interval);
        let mut next = 1u64;
        while sent.len() < count {
            tokio::select! {
                due = ticker.tick(), if next <= count => {
                    // When the send was due, not when this task got to it: time
                    // the generator lost counts as latency (coordinated omission).
                    let scheduled = micros(epoch, due);
                    scheduled_at.insert(next, scheduled);
                    let frame = ClientFrame {
                        r#ref: next,
                        kind: Some(client_frame::Kind::Send(SendMessage {
                            conversation_id,
                            client_msg_id: format!("m{next}"),
                            text: scheduled.to_string(),
                        })),
                    };
                    sender.send(frame).await?;
                    next += 1;
                }
                frame = sender.next() => {
                    let frame = frame.context("sender stream ended")??;
                    if let Some(server_frame::Kind::Sent(_)) = frame.kind
                        && let Some(scheduled) = scheduled_at.remove(&frame.r#ref)
                    {
                        let now = micros(epoch, Instant::now());
                        sent.record(now.saturating_sub(scheduled).max(1))?;
                    }
                    if let Some(server_frame::Kind::Error(error)) = frame.kind {
                        anyhow::bail!("send failed: {} {}", error.reason, error.message);
                    }
                }
            }
        }
        let delivered = receiving.await??;
        sender.close().await;
        let mut recorder = recorder.lock().await;
        recorder.sent.add(&sent)?;
        recorder.delivered.add(&delivered)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_spread_evenly_over_the_pairs() {
        let (interval, count) = schedule(2_000, 50, 10).unwrap();
        assert_eq!(interval, Duration::from_millis(25));
        assert_eq!(count, 400);
    }

    #[test]
    fn the_first_sends_of_the_pairs_are_spread_over_one_interval() {
        let interval = Duration::from_millis(200);
        let phases: Vec<Duration> = (0..4).map(|i| phase(i, 4, interval)).collect();
        assert_eq!(
            phases,
            [0, 50, 100, 150].map(Duration::from_millis),
            "evenly, and all within the first interval"
        );
    }

    #[test]
    fn the_members_of_a_pair_use_different_servers_when_there_are_several() {
        let two = Servers::new(vec!["http://a:1".into(), "http://b:2".into()]).unwrap();
        assert_eq!(pair_servers(&two, 0), ("http://a:1", "http://b:2"));
        assert_eq!(pair_servers(&two, 1), ("http://b:2", "http://a:1"));
        let three = Servers::new(vec![
            "http://a:1".into(),
            "http://b:2".into(),
            "http://c:3".into(),
        ])
        .unwrap();
        assert_eq!(pair_servers(&three, 2), ("http://c:3", "http://a:1"));
        let one = Servers::new(vec!["http://a:1".into()]).unwrap();
        assert_eq!(pair_servers(&one, 7), ("http://a:1", "http://a:1"));
    }

    #[tokio::test]
    async fn a_late_tick_carries_the_instant_it_was_due() {
        // A generator 45 ms behind a 10 ms schedule: the missed ticks come at
        // once, each stamped with its own due time rather than with now.
        let start = Instant::now() - Duration::from_millis(45);
        let mut ticker = ticker(start, Duration::from_millis(10));
        let mut stamps = Vec::new();
        for _ in 0..5 {
            stamps.push(micros(start, ticker.tick().await));
        }
        assert_eq!(stamps, [0, 10_000, 20_000, 30_000, 40_000]);
        assert_eq!(micros(start + Duration::from_secs(1), start), 0);
    }

    #[test]
    fn a_rate_that_leaves_a_pair_nothing_to_send_is_refused() {
        assert!(schedule(0, 10, 10).is_err());
        assert!(schedule(1, 100, 10).is_err());
        assert!(schedule(10, 0, 10).is_err());
    }
}
