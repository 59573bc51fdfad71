//! The live bus of the distributed mode against a real `nats-server`: routing
//! by node, broadcast, bad frames, failed lookups, and the engine's gap fill
//! when live events are lost or late on the way.
//!
//! session-svc and message-svc are stood in for by small, honest in-memory
//! implementations of their generated traits (this crate cannot depend on them).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use confab_common::auth::{TokenService, TokenType};
use confab_common::bus::{Audience, LiveBus, LiveEvent};
use confab_common::channel::{GrpcChannel, in_process};
use confab_common::nats_bus::{NatsBus, node_subject, subscribe_node};
use confab_common::testkit::NatsServer;
use confab_gateway::{Gateway, GatewayConfig, Hub};
use confab_proto::bus::v1::{LiveBatch, LiveEnvelope};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::message::v1::messages_client::MessagesClient;
use confab_proto::message::v1::messages_server::{Messages, MessagesServer};
use confab_proto::message::v1::{
    AppendNoticeRequest, AppendNoticeResponse, HistoryRequest, HistoryResponse,
    LastMessagesRequest, LastMessagesResponse, ReceiptsRequest, SendRequest, SendResponse,
    SyncRequest, SyncResponse, UnreadCountsRequest, UnreadCountsResponse, UpdateReceiptsRequest,
    UpdateReceiptsResponse,
};
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::session::v1::sessions_client::SessionsClient;
use confab_proto::session::v1::sessions_server::{Sessions, SessionsServer};
use confab_proto::session::v1::{
    AcquireNodeIdRequest, AcquireNodeIdResponse, LiveDevice, LookupUsersRequest,
    LookupUsersResponse, RegisterDeviceRequest, RegisterDeviceResponse, UnregisterDeviceRequest,
    UnregisterDeviceResponse,
};
use confab_proto::v1::edge_client::EdgeClient;
use confab_proto::v1::{
    ClientFrame, Event, Hello, ReceiptsResponse, ServerFrame, client_frame, server_frame,
};
use futures::StreamExt as _;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until `done` holds, or fails the test with `what`.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Returns once the server has processed every command `client` sent before
/// (its subscriptions in particular): the server handles one connection's
/// commands in order, so a message to itself comes back after them.
async fn round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.expect("subscribe");
    client.publish(inbox, "".into()).await.expect("publish");
    tokio::time::timeout(PATIENCE, echo.next())
        .await
        .expect("round trip")
        .expect("subscription open");
}

/// session-svc's device registry, in memory: (user, device) -> (node, connection).
#[derive(Debug, Default)]
struct MemSessions {
    devices: Mutex<HashMap<(i64, String), (String, u64)>>,
    /// While set, every call fails as if session-svc were unreachable.
    down: AtomicBool,
    /// Lookups answered or refused.
    lookups: AtomicU32,
    next_node_id: AtomicU32,
}

impl MemSessions {
    fn add(&self, user_id: i64, device_id: &str, node: &str) {
        let key = (user_id, device_id.to_owned());
        self.devices.lock().insert(key, (node.to_owned(), 0));
    }
}

#[tonic::async_trait]
impl Sessions for MemSessions {
    async fn register_device(
        &self,
        request: Request<RegisterDeviceRequest>,
    ) -> Result<Response<RegisterDeviceResponse>, Status> {
        let request = request.into_inner();
        let key = (request.user_id, request.device_id);
        let value = (request.node, request.connection_id);
        self.devices.lock().insert(key, value);
        Ok(Response::new(RegisterDeviceResponse {}))
    }

    async fn unregister_device(
        &self,
        request: Request<UnregisterDeviceRequest>,
    ) -> Result<Response<UnregisterDeviceResponse>, Status> {
        let request = request.into_inner();
        let key = (request.user_id, request.device_id);
        let mut devices = self.devices.lock();
        if devices.get(&key) == Some(&(request.node, request.connection_id)) {
            devices.remove(&key);
        }
        Ok(Response::new(UnregisterDeviceResponse {}))
    }

    async fn lookup_users(
        &self,
        request: Request<LookupUsersRequest>,
    ) -> Result<Response<LookupUsersResponse>, Status> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err(Status::unavailable("session-svc is down"));
        }
        let wanted = request.into_inner().user_ids;
        let devices = self
            .devices
            .lock()
            .iter()
            .filter(|((user_id, _), _)| wanted.contains(user_id))
            .map(|((user_id, device_id), (node, _))| LiveDevice {
                user_id: *user_id,
                device_id: device_id.clone(),
                node: node.clone(),
            })
            .collect();
        Ok(Response::new(LookupUsersResponse { devices }))
    }

    async fn acquire_node_id(
        &self,
        _request: Request<AcquireNodeIdRequest>,
    ) -> Result<Response<AcquireNodeIdResponse>, Status> {
        let node_id = self.next_node_id.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(AcquireNodeIdResponse { node_id }))
    }
}

/// message-svc's per-user event sequences, in memory; only `Sync` is served.
#[derive(Debug, Default)]
struct MemMessages {
    events: Mutex<HashMap<i64, Vec<Event>>>,
}

impl MemMessages {
    /// Stores the user's next event and returns it.
    fn append(&self, user_id: i64) -> Event {
        let mut events = self.events.lock();
        let sequence = events.entry(user_id).or_default();
        let event = Event {
            seq: sequence.len() as u64 + 1,
            kind: None,
        };
        sequence.push(event.clone());
        event
    }
}

fn not_here() -> Status {
    Status::unimplemented("not served by this test")
}

#[tonic::async_trait]
impl Messages for MemMessages {
    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let SyncRequest {
            user_id,
            after,
            limit,
        } = request.into_inner();
        let events = self.events.lock();
        let sequence = events.get(&user_id).map_or(&[][..], Vec::as_slice);
        let later: Vec<Event> = sequence.iter().filter(|e| e.seq > after).cloned().collect();
        let limit = (limit as usize).max(1);
        Ok(Response::new(SyncResponse {
            has_more: later.len() > limit,
            events: later.into_iter().take(limit).collect(),
            head: sequence.len() as u64,
        }))
    }

    async fn send(&self, _: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        Err(not_here())
    }

    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Err(not_here())
    }

    async fn last_messages(
        &self,
        _: Request<LastMessagesRequest>,
    ) -> Result<Response<LastMessagesResponse>, Status> {
        Err(not_here())
    }

    async fn append_notice(
        &self,
        _: Request<AppendNoticeRequest>,
    ) -> Result<Response<AppendNoticeResponse>, Status> {
        Err(not_here())
    }

    async fn update_receipts(
        &self,
        _: Request<UpdateReceiptsRequest>,
    ) -> Result<Response<UpdateReceiptsResponse>, Status> {
        Err(not_here())
    }

    async fn receipts(
        &self,
        _: Request<ReceiptsRequest>,
    ) -> Result<Response<ReceiptsResponse>, Status> {
        Err(not_here())
    }

    async fn unread_counts(
        &self,
        _: Request<UnreadCountsRequest>,
    ) -> Result<Response<UnreadCountsResponse>, Status> {
        Err(not_here())
    }
}

/// A channel whose every call fails with UNIMPLEMENTED (the services a test does
/// not need; the engine only logs their failures).
fn unimplemented_channel() -> GrpcChannel {
    in_process(tower::service_fn(
        |_: http::Request<tonic::body::Body>| async {
            Ok::<_, Infallible>(not_here().into_http::<tonic::body::Body>())
        },
    ))
}

/// A live bus that records what reaches it: one gateway node's view.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<(Audience, u64)>>,
}

impl LiveBus for Recorder {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        let mut seen = self.seen.lock();
        seen.extend(events.iter().map(|e| (e.audience, e.event.seq)));
    }
}

impl Recorder {
    fn len(&self) -> usize {
        self.seen.lock().len()
    }

    /// Returns the sequence numbers received for `user_id`, in arrival order.
    fn seqs_of(&self, user_id: i64) -> Vec<u64> {
        let seen = self.seen.lock();
        seen.iter()
            .filter(|(audience, _)| *audience == Audience::User(user_id))
            .map(|(_, seq)| *seq)
            .collect()
    }
}

/// Subscribes a recording node on its own connection, like a gateway process.
async fn recording_node(server: &NatsServer, node: &str) -> (Arc<Recorder>, NodeHandle) {
    let client = async_nats::connect(server.url()).await.expect("connect");
    let recorder = Arc::new(Recorder::default());
    let task = subscribe_node(client.clone(), node, recorder.clone())
        .await
        .expect("subscribe");
    round_trip(&client).await;
    (
        recorder,
        NodeHandle {
            _client: client,
            task,
        },
    )
}

/// A subscribed node: its connection and its receiving task.
#[derive(Debug)]
struct NodeHandle {
    /// Kept open for the node's lifetime.
    _client: async_nats::Client,
    task: tokio::task::JoinHandle<()>,
}

fn live(audience: Audience, seq: u64) -> Arc<LiveEvent> {
    Arc::new(LiveEvent {
        audience,
        event: Event { seq, kind: None },
        origin_device: None,
        accepted_at: Instant::now(),
    })
}

async fn publisher(server: &NatsServer, sessions: &Arc<MemSessions>) -> Arc<NatsBus> {
    let client = async_nats::connect(server.url()).await.expect("connect");
    let channel = in_process(SessionsServer::from_arc(sessions.clone()));
    NatsBus::new(client, SessionsClient::new(channel))
}

/// A user's events reach only the nodes holding the user's devices, once per
/// node however many devices it holds, in publish order.
#[tokio::test]
async fn user_events_reach_only_their_nodes_in_order() {
    let server = NatsServer::start().await;
    let sessions = Arc::new(MemSessions::default());
    sessions.add(1, "d1", "gw-a");
    sessions.add(2, "d2", "gw-b");
    sessions.add(3, "d3a", "gw-a");
    sessions.add(3, "d3b", "gw-b");
    sessions.add(3, "d3c", "gw-a");
    let (a, _a) = recording_node(&server, "gw-a").await;
    let (b, _b) = recording_node(&server, "gw-b").await;
    let bus = publisher(&server, &sessions).await;

    for seq in 1..=300 {
        // User 4 has no live device: nobody gets its events.
        let events: Vec<_> = [1, 2, 3, 4]
            .into_iter()
            .map(|user| live(Audience::User(user), seq))
            .collect();
        bus.publish(&events);
    }

    eventually("600 events on each node", || {
        a.len() >= 600 && b.len() >= 600
    })
    .await;
    let all: Vec<u64> = (1..=300).collect();
    assert_eq!(a.seqs_of(1), all);
    assert_eq!(a.seqs_of(3), all, "once per node, not once per device");
    assert!(a.seqs_of(2).is_empty() && a.seqs_of(4).is_empty());
    assert_eq!(b.seqs_of(2), all);
    assert_eq!(b.seqs_of(3), all);
    assert!(b.seqs_of(1).is_empty() && b.seqs_of(4).is_empty());
    assert_eq!(a.len(), 600);
    assert_eq!(b.len(), 600);
    assert!(
        sessions.lookups.load(Ordering::Relaxed) < 300,
        "one lookup per batch, not per event"
    );
}

/// Channel posts and presence changes reach every node, holding devices or not.
#[tokio::test]
async fn channel_and_watcher_events_reach_every_node() {
    let server = NatsServer::start().await;
    let sessions = Arc::new(MemSessions::default());
    sessions.add(1, "d1", "gw-a");
    let nodes = [
        recording_node(&server, "gw-a").await,
        recording_node(&server, "gw-b").await,
        recording_node(&server, "gw-c").await,
    ];
    let bus = publisher(&server, &sessions).await;

    let mut expected = Vec::new();
    for i in 0..20 {
        let event = if i % 2 == 0 {
            live(Audience::Channel(77), 0)
        } else {
            live(Audience::Watchers(5), 0)
        };
        expected.push((event.audience, 0));
        bus.publish(&[event]);
    }

    for (recorder, _) in &nodes {
        eventually("20 broadcast events", || recorder.len() >= 20).await;
        assert_eq!(*recorder.seen.lock(), expected);
    }
}

/// A payload that is not a `LiveBatch`, or an envelope without audience, is
/// dropped; the node goes on receiving.
#[tokio::test]
async fn garbage_on_a_node_subject_is_survived() {
    let server = NatsServer::start().await;
    let sessions = Arc::new(MemSessions::default());
    sessions.add(1, "d1", "gw-a");
    let (a, node) = recording_node(&server, "gw-a").await;
    let bus = publisher(&server, &sessions).await;

    let raw = async_nats::connect(server.url()).await.expect("connect");
    let subject = node_subject("gw-a");
    for garbage in [&b"\xff\xff\xff\xff"[..], b"\x0a\x05abc", b""] {
        raw.publish(subject.clone(), garbage.to_vec().into())
            .await
            .expect("publish");
    }
    let nameless = LiveBatch {
        events: vec![LiveEnvelope {
            audience_kind: 0,
            audience_id: 1,
            event: Some(Event { seq: 9, kind: None }),
            origin_device: String::new(),
            accepted_at_us: 0,
        }],
    };
    raw.publish(subject, nameless.encode_to_vec().into())
        .await
        .expect("publish");
    raw.flush().await.expect("flush");

    bus.publish(&[live(Audience::User(1), 1)]);
    eventually("the valid event", || a.len() >= 1).await;
    assert_eq!(*a.seen.lock(), vec![(Audience::User(1), 1)]);
    assert!(!node.task.is_finished(), "the receiving task lives on");
}

/// When session-svc cannot be reached, the batch's user events are dropped
/// (after a few tries) while broadcast events still go; later batches flow again.
#[tokio::test]
async fn failed_lookup_drops_user_events_only() {
    let server = NatsServer::start().await;
    let sessions = Arc::new(MemSessions::default());
    sessions.add(1, "d1", "gw-a");
    let (a, _a) = recording_node(&server, "gw-a").await;
    let bus = publisher(&server, &sessions).await;

    sessions.down.store(true, Ordering::Relaxed);
    bus.publish(&[live(Audience::User(1), 1), live(Audience::Channel(7), 0)]);
    eventually("the channel post", || a.len() >= 1).await;
    assert!(sessions.lookups.load(Ordering::Relaxed) > 1, "retried");

    sessions.down.store(false, Ordering::Relaxed);
    bus.publish(&[live(Audience::User(1), 2)]);
    eventually("the next user event", || a.len() >= 2).await;
    assert_eq!(
        *a.seen.lock(),
        vec![(Audience::Channel(7), 0), (Audience::User(1), 2)]
    );
}

/// A gateway node serving one device over gRPC, fed by NATS.
struct Node {
    messages: Arc<MemMessages>,
    /// group-svc on a temporary SQLite file, and the directory.
    groups: GroupsClient<GrpcChannel>,
    _store: tempfile::TempDir,
    hub: Arc<Hub>,
    bus: Arc<NatsBus>,
    tokens: TokenService,
    address: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
    _nats: NodeHandle,
}

/// Starts a gateway node `gw-a` whose hub receives from NATS, with an in-memory
/// message store and device registry, and a publisher on the same NATS.
async fn gateway_node(server: &NatsServer) -> Node {
    // The real group-svc: the gateway asks it about every token.
    let store = tempfile::tempdir().expect("group store directory");
    let group_service = confab_group_svc::GroupService::open_sqlite(
        &store.path().join("meta.db"),
        1,
        confab_group_svc::GroupLimits::default(),
    )
    .await
    .expect("group store");
    let groups = GroupsClient::new(in_process(GroupsServer::new(group_service)));
    let sessions = Arc::new(MemSessions::default());
    let messages = Arc::new(MemMessages::default());
    let hub = Arc::new(Hub::new());
    let tokens = TokenService::new(
        b"test secret",
        Duration::from_secs(600),
        Duration::from_secs(600),
    )
    .expect("token service");
    let gateway = Gateway {
        config: GatewayConfig {
            node: "gw-a".to_owned(),
            ..GatewayConfig::default()
        },
        tokens: tokens.clone(),
        groups: groups.clone(),
        external_users: Arc::default(),
        messages: MessagesClient::new(in_process(MessagesServer::from_arc(messages.clone()))),
        sessions: SessionsClient::new(in_process(SessionsServer::from_arc(sessions.clone()))),
        presence: PresencesClient::new(unimplemented_channel()),
        hub: hub.clone(),
        metrics: None,
    };
    let client = async_nats::connect(server.url()).await.expect("connect");
    let task = subscribe_node(client.clone(), "gw-a", hub.clone())
        .await
        .expect("subscribe");
    round_trip(&client).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(confab_gateway::serve(listener, gateway, async {
        let _ = stopped.await;
    }));
    Node {
        messages,
        groups,
        _store: store,
        hub,
        bus: publisher(server, &sessions).await,
        tokens,
        address,
        _stop: stop,
        _nats: NodeHandle {
            _client: client,
            task,
        },
    }
}

impl Node {
    /// Creates a user in group-svc and returns their id.
    async fn user(&self, username: &str) -> i64 {
        let request = confab_proto::group::v1::EnsureUserRequest {
            username: username.to_owned(),
        };
        let user = self
            .groups
            .clone()
            .ensure_user(request)
            .await
            .expect("user");
        user.into_inner().id
    }
}

/// One device's `Edge.Stream`.
struct Device {
    _outbound: mpsc::Sender<ClientFrame>,
    inbound: tonic::codec::Streaming<ServerFrame>,
}

impl Device {
    async fn connect(node: &Node, user_id: i64, cursor: u64) -> Self {
        let token = node.tokens.mint(user_id, TokenType::Access).token;
        let (outbound, frames) = mpsc::channel(16);
        let hello = client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "phone".to_owned(),
            cursor,
        });
        outbound
            .send(ClientFrame {
                r#ref: 1,
                kind: Some(hello),
            })
            .await
            .expect("queue hello");
        let mut client = EdgeClient::connect(format!("http://{}", node.address))
            .await
            .expect("connect");
        let mut request = Request::new(ReceiverStream::new(frames));
        let bearer = format!("Bearer {token}").parse().expect("metadata value");
        request.metadata_mut().insert("authorization", bearer);
        let inbound = client.stream(request).await.expect("stream").into_inner();
        Self {
            _outbound: outbound,
            inbound,
        }
    }

    async fn next(&mut self) -> server_frame::Kind {
        let frame = tokio::time::timeout(PATIENCE, self.inbound.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("no error");
        frame.kind.expect("frame kind")
    }

    /// Expects the next frames to be the events `seqs`, in this order.
    async fn expect_events(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            match self.next().await {
                server_frame::Kind::Event(event) => assert_eq!(event.seq, seq),
                other => panic!("expected event {seq}, got {other:?}"),
            }
        }
    }
}

/// Live events lost on the way, late, or duplicated reach the device from the
/// store, in sequence, each once; a resync request fetches what was lost at the
/// tail.
#[tokio::test]
async fn gap_fill_recovers_lost_and_late_events() {
    let server = NatsServer::start().await;
    let node = gateway_node(&server).await;
    let user = node.user("alice").await;
    for _ in 0..3 {
        node.messages.append(user);
    }
    let mut device = Device::connect(&node, user, 0).await;
    assert!(matches!(
        device.next().await,
        server_frame::Kind::Welcome(_)
    ));
    device.expect_events(1..=3).await;
    assert!(matches!(
        device.next().await,
        server_frame::Kind::Synced(synced) if synced.seq == 3
    ));
    let publish = |event: Event| node.bus.publish(&[live(Audience::User(user), event.seq)]);

    // 4 and 5 are lost on the way: 6 brings them from the store first.
    node.messages.append(user);
    let fifth = node.messages.append(user);
    publish(node.messages.append(user));
    device.expect_events(4..=6).await;

    // 5 arrives late (another process), then 7: 5 is skipped.
    publish(fifth);
    publish(node.messages.append(user));
    device.expect_events([7]).await;

    // 8 is lost and nothing follows it: the resync after a reconnect finds it.
    node.messages.append(user);
    node.hub.resync_all();
    device.expect_events([8]).await;

    // 10 overtakes 9: both come once, in order.
    let ninth = node.messages.append(user);
    publish(node.messages.append(user));
    publish(ninth);
    publish(node.messages.append(user));
    device.expect_events(9..=11).await;
}
