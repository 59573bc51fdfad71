//! A bounded chat load that keeps going through faults, and records what the
//! [`crate::invariants`] checker needs.
//!
//! Users pair up in direct conversations and all meet in one group; each user
//! has several devices, each with its own live connection (gRPC or WebSocket,
//! half on each gateway). Every device sends its share of messages, one at a
//! time at a steady pace, alternating between its direct conversation and the
//! group, each with a unique `client_msg_id`; on an error, a timeout or a
//! dropped connection it retries the *same* `client_msg_id` until it is
//! acknowledged. A device whose connection drops reconnects, to the other
//! gateway first, with its cursor. Every ack and every event is recorded, per
//! connection, with the time it arrived.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use confab_proto::v1::{Event, event, server_frame};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::Transport;
use crate::invariants::{
    Ack, ConversationRecord, Delivery, DeviceRecord, History, HistoryMessage, Recording, Report,
    Session,
};
use crate::{Account, Conn, Encoding, Server, WAIT};

/// How long a device waits before it retries a refused send or reconnects.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// The size of the history pages read back.
const HISTORY_PAGE: u32 = 200;

/// The shape and pace of a load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// How many users (paired up in direct conversations; an odd last one talks
    /// only in the group).
    pub users: usize,
    /// How many devices each user has, each with its own connection.
    pub devices_per_user: usize,
    /// How many messages each device sends.
    pub messages_per_device: usize,
    /// The pause between an ack and a device's next send: spreads the load
    /// over time so that a fault lands in the middle of it.
    pub pace: Duration,
    /// How long a device waits for an ack before it gives the connection up
    /// and retries on a new one.
    pub send_timeout: Duration,
    /// How long all sends may take, faults included.
    pub send_phase: Duration,
    /// How long every device may take to receive everything after the last ack.
    pub delivery_phase: Duration,
    /// Prefixes the usernames (3 to 32 characters in all), so that two loads
    /// on one server do not collide.
    pub name: String,
}

impl Default for LoadConfig {
    /// 10 users with 2 devices each, 100 messages per device (2,000 in all),
    /// one send per device every 20 ms: a few seconds of load.
    fn default() -> Self {
        Self {
            users: 10,
            devices_per_user: 2,
            messages_per_device: 100,
            pace: Duration::from_millis(20),
            send_timeout: Duration::from_secs(5),
            send_phase: Duration::from_secs(40),
            delivery_phase: Duration::from_secs(20),
            name: "load".to_owned(),
        }
    }
}

/// When a fault happened, in the load's clock and the servers' (wall) clock.
#[derive(Debug, Clone, Copy)]
pub struct FaultMark {
    /// Since the load started.
    pub at: Duration,
    /// Milliseconds since the Unix epoch (what `sent_at_ms` counts).
    pub wall_ms: i64,
}

/// How delivery went on after a fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stall {
    /// From the fault to the next event any device received.
    pub next_delivery: Option<Duration>,
    /// From the fault to the first delivery of a message the log accepted after it.
    pub next_new_message: Option<Duration>,
    /// The longest time after the fault during which no device received anything.
    pub longest_silence: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()))
        };
        write!(
            f,
            "delivery stalled {}: next event {} after the fault, first message accepted \
             after the fault delivered after {}",
            format_args!("at most {} ms", self.longest_silence.as_millis()),
            ms(self.next_delivery),
            ms(self.next_new_message),
        )
    }
}

/// What one device does.
#[derive(Debug, Clone)]
struct DevicePlan {
    /// Its index among all devices (its cursor slot in [`Progress`]).
    slot: usize,
    /// Whose device.
    account: Account,
    device_id: String,
    /// gRPC, or WebSocket with binary frames.
    transport: Option<Encoding>,
    /// The gateway it connects to first.
    home: usize,
    /// The conversations its messages go to, in turn.
    targets: Vec<i64>,
}

/// What the devices report while they run, for the waits of the test.
#[derive(Debug)]
struct Progress {
    /// Sends acknowledged for the first time, over all devices.
    acked: AtomicUsize,
    /// Devices that have every send acknowledged.
    done_sending: AtomicUsize,
    /// Each device's cursor (last seq processed).
    cursors: Vec<AtomicU64>,
    /// Each device's latest trouble, for failure messages.
    troubles: Mutex<Vec<String>>,
    /// Bumped on every change: what the waits wait on.
    changed: watch::Sender<u64>,
}

impl Progress {
    fn bump(&self) {
        self.changed.send_modify(|version| *version += 1);
    }

    fn trouble(&self, slot: usize, text: String) {
        let mut troubles = self.troubles.lock().unwrap_or_else(PoisonError::into_inner);
        troubles[slot] = text;
    }
}

/// What every device task shares.
#[derive(Debug)]
struct Shared {
    config: LoadConfig,
    /// Client handles on the gateways.
    gateways: Vec<Server>,
    progress: Arc<Progress>,
    /// The load's clock.
    started: Instant,
    /// True once the load is to stop.
    stop: watch::Receiver<bool>,
}

/// A load under way.
#[derive(Debug)]
pub struct Load {
    config: LoadConfig,
    accounts: Vec<Account>,
    conversations: Vec<ConversationRecord>,
    /// Device ids, by slot.
    device_ids: Vec<String>,
    /// Which user each device belongs to, by slot.
    device_users: Vec<i64>,
    progress: Arc<Progress>,
    started: Instant,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<DeviceRecord>>,
}

/// A finished load: what it recorded and the history read back after it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Every ack and event, per device and connection.
    pub recording: Recording,
    /// Every conversation's history, as `History` returned it.
    pub history: History,
}

impl Outcome {
    /// Runs the [`crate::invariants`] checker.
    ///
    /// # Errors
    ///
    /// Fails with the violations.
    pub fn check(&self) -> Result<Report> {
        crate::invariants::check(&self.recording, &self.history)
    }

    /// Measures how delivery went on after `mark`.
    pub fn stall(&self, mark: FaultMark) -> Stall {
        let mut times: Vec<Duration> = Vec::new();
        let mut next_new_message: Option<Duration> = None;
        let deliveries = self
            .recording
            .devices
            .iter()
            .flat_map(|device| &device.sessions)
            .flat_map(|session| &session.deliveries);
        for delivery in deliveries {
            let Some(after) = delivery.at.checked_sub(mark.at) else {
                continue;
            };
            times.push(after);
            if delivery.message_id != 0 && delivery.sent_at_ms > mark.wall_ms {
                next_new_message = Some(next_new_message.map_or(after, |best| best.min(after)));
            }
        }
        times.sort();
        let mut longest_silence = Duration::ZERO;
        let mut previous = Duration::ZERO;
        for &time in &times {
            longest_silence = longest_silence.max(time - previous);
            previous = time;
        }
        Stall {
            next_delivery: times.first().copied(),
            next_new_message,
            longest_silence,
        }
    }
}

impl Load {
    /// Registers the users and opens the conversations through the first
    /// gateway, then starts every device.
    ///
    /// # Errors
    ///
    /// Fails when the set-up calls fail.
    pub async fn start(gateways: &[Server], config: LoadConfig) -> Result<Self> {
        let first = gateways.first().context("no gateway")?;
        anyhow::ensure!(config.users >= 2, "a load needs two users");
        let names: Vec<String> = (0..config.users)
            .map(|user| format!("{}-u{user}", config.name))
            .collect();
        let registrations = names.iter().map(|name| first.register(name));
        let accounts = futures::future::try_join_all(registrations)
            .await
            .context("registering the load's users")?;

        let mut conversations = Vec::new();
        let mut direct_of = vec![None; accounts.len()];
        for pair in (0..accounts.len()).collect::<Vec<_>>().chunks(2) {
            let &[a, b] = pair else { continue };
            let id = first.open_direct(&accounts[a], &accounts[b]).await?;
            direct_of[a] = Some(id);
            direct_of[b] = Some(id);
            conversations.push(ConversationRecord {
                id,
                members: vec![accounts[a].id(), accounts[b].id()],
            });
        }
        let others: Vec<i64> = accounts[1..].iter().map(Account::id).collect();
        let group = first
            .create_group(&accounts[0], &format!("{} group", config.name), &others)
            .await?
            .id;
        conversations.push(ConversationRecord {
            id: group,
            members: accounts.iter().map(Account::id).collect(),
        });

        let mut plans = Vec::new();
        for (user, account) in accounts.iter().enumerate() {
            for device in 0..config.devices_per_user {
                let slot = plans.len();
                let targets = direct_of[user].into_iter().chain([group]).collect();
                plans.push(DevicePlan {
                    slot,
                    account: account.clone(),
                    device_id: format!("{}-u{user}-d{device}", config.name),
                    transport: ((user + device) % 2 == 1).then_some(Encoding::Binary),
                    home: (user + device) % gateways.len(),
                    targets,
                });
            }
        }
        let (changed, _) = watch::channel(0);
        let progress = Arc::new(Progress {
            acked: AtomicUsize::new(0),
            done_sending: AtomicUsize::new(0),
            cursors: plans.iter().map(|_| AtomicU64::new(0)).collect(),
            troubles: Mutex::new(vec![String::new(); plans.len()]),
            changed,
        });
        let (stop, stop_rx) = watch::channel(false);
        let context = Arc::new(Shared {
            config: config.clone(),
            gateways: gateways
                .iter()
                .map(|gateway| Server::attach(gateway.addr()))
                .collect::<Result<_>>()?,
            progress: Arc::clone(&progress),
            started: Instant::now(),
            stop: stop_rx,
        });
        let device_ids = plans.iter().map(|plan| plan.device_id.clone()).collect();
        let device_users = plans.iter().map(|plan| plan.account.id()).collect();
        let tasks = plans
            .into_iter()
            .map(|plan| tokio::spawn(run_device(plan, Arc::clone(&context))))
            .collect();
        Ok(Self {
            config,
            accounts,
            conversations,
            device_ids,
            device_users,
            progress,
            started: context.started,
            stop,
            tasks,
        })
    }

    /// How many messages the load sends in all.
    pub fn total_messages(&self) -> usize {
        self.device_ids.len() * self.config.messages_per_device
    }

    /// How many sends have been acknowledged so far.
    pub fn acked(&self) -> usize {
        self.progress.acked.load(Ordering::SeqCst)
    }

    /// The load's users.
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    /// Notes the moment of a fault, for [`Outcome::stall`].
    pub fn mark(&self) -> FaultMark {
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| {
                i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
            });
        FaultMark {
            at: self.started.elapsed(),
            wall_ms,
        }
    }

    /// Waits until at least `count` sends are acknowledged.
    ///
    /// # Errors
    ///
    /// Fails when that takes longer than the send phase.
    pub async fn wait_acked(&self, count: usize) -> Result<()> {
        let phase = self.config.send_phase;
        self.wait_for(phase, |progress| {
            progress.acked.load(Ordering::SeqCst) >= count
        })
        .await
        .with_context(|| format!("{} of {count} sends acknowledged", self.acked()))
    }

    /// Waits for every send to be acknowledged, reads every conversation's
    /// history through `reader`, waits until every device has received as many
    /// events as its user's conversations hold messages, stops the devices and
    /// returns what they recorded.
    ///
    /// A device that never catches up does not fail this: the checker then
    /// says what it missed.
    ///
    /// # Errors
    ///
    /// Fails when the sends do not complete in the send phase (with each
    /// unfinished device's latest trouble), or history cannot be read.
    pub async fn finish(mut self, reader: &Server) -> Result<Outcome> {
        let devices = self.device_ids.len();
        let sent = self
            .wait_for(self.config.send_phase, |progress| {
                progress.done_sending.load(Ordering::SeqCst) == devices
            })
            .await;
        if let Err(error) = sent {
            let status = self.status();
            let _ = self.stop.send(true);
            bail!(
                "{error:#}: {} of {} sends acknowledged; {status}",
                self.acked(),
                self.total_messages()
            );
        }
        let history = read_history(reader, &self.accounts, &self.conversations).await?;
        let expected: Vec<u64> = self
            .device_users
            .iter()
            .map(|&user| {
                self.conversations
                    .iter()
                    .filter(|conversation| conversation.members.contains(&user))
                    .map(|conversation| history.get(&conversation.id).map_or(0, Vec::len) as u64)
                    .sum()
            })
            .collect();
        let caught_up = self
            .wait_for(self.config.delivery_phase, |progress| {
                progress
                    .cursors
                    .iter()
                    .zip(&expected)
                    .all(|(cursor, &want)| cursor.load(Ordering::SeqCst) >= want)
            })
            .await;
        if caught_up.is_err() {
            eprintln!("load: not every device caught up: {}", self.status());
        }
        let _ = self.stop.send(true);
        let mut recording = Recording {
            conversations: self.conversations.clone(),
            devices: Vec::with_capacity(devices),
        };
        for task in std::mem::take(&mut self.tasks) {
            recording
                .devices
                .push(task.await.context("a device task failed")?);
        }
        Ok(Outcome { recording, history })
    }

    /// One line per device that is behind: its cursor and latest trouble.
    fn status(&self) -> String {
        let troubles = self
            .progress
            .troubles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let lines: Vec<String> = self
            .device_ids
            .iter()
            .zip(&troubles)
            .enumerate()
            .filter(|(_, (_, trouble))| !trouble.is_empty())
            .map(|(slot, (device, trouble))| {
                let cursor = self.progress.cursors[slot].load(Ordering::SeqCst);
                format!("{device} (cursor {cursor}): {trouble}")
            })
            .collect();
        if lines.is_empty() {
            "no device reported trouble".to_owned()
        } else {
            format!("latest troubles: {}", lines.join("; "))
        }
    }

    async fn wait_for(&self, limit: Duration, done: impl Fn(&Progress) -> bool) -> Result<()> {
        let mut changed = self.progress.changed.subscribe();
        let progress = &self.progress;
        let waited = tokio::time::timeout(limit, changed.wait_for(|_| done(progress))).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!("the load's progress channel closed"),
            Err(_) => bail!("not done within {limit:?}"),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Reads every page of every conversation's history, as a member.
async fn read_history(
    reader: &Server,
    accounts: &[Account],
    conversations: &[ConversationRecord],
) -> Result<History> {
    let mut history = History::new();
    for conversation in conversations {
        let member = accounts
            .iter()
            .find(|account| conversation.members.contains(&account.id()))
            .context("a conversation without members")?;
        let mut messages = Vec::new();
        let mut before = 0;
        loop {
            let page = read_page(reader, member, conversation.id, before).await?;
            messages.extend(page.messages.iter().map(|message| HistoryMessage {
                id: message.id,
                sender_id: message.sender_id,
                client_msg_id: message.client_msg_id.clone(),
            }));
            match page.messages.last() {
                Some(last) if page.has_more => before = last.id,
                _ => break,
            }
        }
        history.insert(conversation.id, messages);
    }
    Ok(history)
}

/// Reads one page, retrying for a while: right after a fault a call may fail.
async fn read_page(
    reader: &Server,
    member: &Account,
    conversation_id: i64,
    before: i64,
) -> Result<confab_proto::v1::HistoryResponse> {
    let deadline = Instant::now() + WAIT;
    loop {
        match reader
            .history(member, conversation_id, before, 0, HISTORY_PAGE)
            .await
        {
            Ok(page) => return Ok(page),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!("reading the history of {conversation_id}")));
            }
            Err(_) => tokio::time::sleep(RETRY_BACKOFF).await,
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The load stops.
    Stopped,
    /// Reconnect (the reason goes to the device's troubles).
    Broken(String),
}

/// A device's state across its connections.
#[derive(Debug)]
struct Device {
    plan: DevicePlan,
    context: Arc<Shared>,
    record: DeviceRecord,
    /// The last seq processed.
    cursor: u64,
    /// The index of the next message to get acknowledged.
    next: usize,
    /// The `ref` and send time of the send awaiting its answer on this connection.
    in_flight: Option<(u64, Instant)>,
    /// When the next send may go.
    next_send_at: Instant,
}

/// Runs one device until the load stops; returns what it recorded.
async fn run_device(plan: DevicePlan, context: Arc<Shared>) -> DeviceRecord {
    let record = DeviceRecord {
        user_id: plan.account.id(),
        device_id: plan.device_id.clone(),
        ..DeviceRecord::default()
    };
    let mut device = Device {
        plan,
        context,
        record,
        cursor: 0,
        next: 0,
        in_flight: None,
        next_send_at: Instant::now(),
    };
    let mut stop = device.context.stop.clone();
    for attempt in 0.. {
        if *stop.borrow() {
            break;
        }
        // Owned handles: the device itself is borrowed mutably by the connection.
        let context = Arc::clone(&device.context);
        let account = device.plan.account.clone();
        let gateway = (device.plan.home + attempt) % context.gateways.len();
        let server = &context.gateways[gateway];
        let end = match device.plan.transport {
            None => match server.grpc(&account).await {
                Ok(conn) => device.connection(conn, gateway, &mut stop).await,
                Err(error) => End::Broken(format!("connecting to gateway {gateway}: {error:#}")),
            },
            Some(encoding) => match server.ws(&account, encoding).await {
                Ok(conn) => device.connection(conn, gateway, &mut stop).await,
                Err(error) => End::Broken(format!("connecting to gateway {gateway}: {error:#}")),
            },
        };
        match end {
            End::Stopped => break,
            End::Broken(reason) => {
                device.context.progress.trouble(device.plan.slot, reason);
                let backoff = tokio::time::sleep(RETRY_BACKOFF);
                tokio::select! {
                    () = backoff => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    device.record
}

impl Device {
    /// Syncs from the cursor, then sends and receives until the connection
    /// breaks or the load stops.
    async fn connection<T: Transport>(
        &mut self,
        mut conn: Conn<T>,
        gateway: usize,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let synced = tokio::select! {
            synced = conn.sync(&self.plan.device_id, self.cursor) => synced,
            _ = stop.changed() => return End::Stopped,
        };
        let synced = match synced {
            Ok(synced) => synced,
            Err(error) => {
                self.record.failed_connects += 1;
                return End::Broken(format!("syncing on gateway {gateway}: {error:#}"));
            }
        };
        self.record.sessions.push(Session {
            gateway,
            cursor: self.cursor,
            deliveries: Vec::new(),
        });
        for event in synced.events {
            if let Err(gap) = self.deliver(event) {
                return End::Broken(gap);
            }
        }
        // A send in flight on the previous connection is retried here, with
        // the same client_msg_id.
        self.in_flight = None;
        let timeout = self.context.config.send_timeout;
        let total = self.context.config.messages_per_device;
        loop {
            if self.in_flight.is_none() && self.next < total && Instant::now() >= self.next_send_at
            {
                let (conversation, client_msg_id) = self.message(self.next);
                let text = format!("{client_msg_id} says hello");
                match conn.send_message(conversation, &client_msg_id, &text).await {
                    Ok(r#ref) => self.in_flight = Some((r#ref, Instant::now())),
                    Err(error) => return End::Broken(format!("sending: {error:#}")),
                }
            }
            let wake = match self.in_flight {
                Some((_, sent)) => sent + timeout,
                None if self.next < total => self.next_send_at,
                None => Instant::now() + WAIT,
            };
            tokio::select! {
                _ = stop.changed() => return End::Stopped,
                () = tokio::time::sleep_until(wake) => {
                    if self.in_flight.is_some() {
                        self.record.send_failures += 1;
                        return End::Broken(format!("no ack within {timeout:?}"));
                    }
                }
                frame = conn.next_frame() => {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(error) => return End::Broken(format!("reading: {error:#}")),
                    };
                    if let Err(reason) = self.handle(frame) {
                        return End::Broken(reason);
                    }
                }
            }
        }
    }

    /// The conversation and `client_msg_id` of message `index` of this device.
    fn message(&self, index: usize) -> (i64, String) {
        let targets = &self.plan.targets;
        let conversation = targets[index % targets.len()];
        (conversation, format!("{}-m{index}", self.plan.device_id))
    }

    /// Handles one frame; an error means the connection must be dropped.
    fn handle(&mut self, frame: confab_proto::v1::ServerFrame) -> Result<(), String> {
        let answers_in_flight = self
            .in_flight
            .is_some_and(|(r#ref, _)| r#ref == frame.r#ref && frame.r#ref != 0);
        match frame.kind {
            Some(server_frame::Kind::Event(event)) if event.seq > 0 => self.deliver(event),
            Some(server_frame::Kind::Sent(ack)) if answers_in_flight => {
                let (conversation_id, client_msg_id) = self.message(self.next);
                if ack.client_msg_id != client_msg_id || ack.conversation_id != conversation_id {
                    return Err(format!("ack {ack:?} does not answer {client_msg_id}"));
                }
                self.record.acks.push(Ack {
                    client_msg_id,
                    conversation_id,
                    message_id: ack.message_id,
                    duplicate: ack.duplicate,
                });
                self.in_flight = None;
                self.next += 1;
                self.next_send_at = Instant::now() + self.context.config.pace;
                let progress = &self.context.progress;
                progress.acked.fetch_add(1, Ordering::SeqCst);
                if self.next == self.context.config.messages_per_device {
                    progress.done_sending.fetch_add(1, Ordering::SeqCst);
                }
                progress.bump();
                Ok(())
            }
            Some(server_frame::Kind::Error(error)) => {
                let text = format!(
                    "error frame {} {}: {}",
                    error.code, error.reason, error.message
                );
                if answers_in_flight {
                    self.record.send_failures += 1;
                    self.in_flight = None;
                    self.next_send_at = Instant::now() + RETRY_BACKOFF;
                }
                if error.fatal {
                    return Err(text);
                }
                self.context.progress.trouble(self.plan.slot, text);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records an event of the sequence; a gap ends the connection (the
    /// device then resumes from its cursor, as a client would).
    fn deliver(&mut self, event: Event) -> Result<(), String> {
        let (conversation_id, message_id, sent_at_ms) = match &event.kind {
            Some(event::Kind::Message(message)) => {
                (message.conversation_id, message.id, message.sent_at_ms)
            }
            _ => (0, 0, 0),
        };
        let at = self.context.started.elapsed();
        if let Some(session) = self.record.sessions.last_mut() {
            session.deliveries.push(Delivery {
                seq: event.seq,
                conversation_id,
                message_id,
                sent_at_ms,
                at,
            });
        }
        if event.seq <= self.cursor {
            return Ok(());
        }
        if event.seq != self.cursor + 1 {
            return Err(format!("gap: seq {} after {}", event.seq, self.cursor));
        }
        self.cursor = event.seq;
        let progress = &self.context.progress;
        progress.cursors[self.plan.slot].store(self.cursor, Ordering::SeqCst);
        progress.bump();
        Ok(())
    }
}
