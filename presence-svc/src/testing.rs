//! Test doubles shared by the unit tests: the real group-svc with a fixture of
//! users and conversations, a recording live bus, and services opened on the
//! in-memory, the SQLite or the NATS KV store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use confab_common::bus::{Audience, LiveBus, LiveEvent};
use confab_common::channel::{GrpcChannel, in_process};
use confab_group_svc::{GroupLimits, GroupService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::group::v1::{CreateConversationRequest, JoinRequest, OpenDirectRequest};
use confab_proto::v1::event::Kind;
use confab_proto::v1::{ConversationKind, Presence, TypingState};
use parking_lot::Mutex;
use tonic::body::Body;
use tonic::codegen::{Service, http};

use crate::store::memory::MemoryStore;
use crate::{PresenceConfig, PresenceService};

/// The index in [`GroupSvc::u`] of the user who shares nothing with anyone.
pub(crate) const STRANGER: usize = 9;

/// Runs group-svc for every test, on a clock that is never paused.
static GROUP_RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("group-svc runtime")
});

/// Runs `work` on [`GROUP_RUNTIME`], waiting for it in a blocking task: tokio
/// does not auto-advance a paused clock while a blocking task runs, so a test's
/// clock stands still while SQLite works on a thread of its own.
async fn on_group_runtime<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::task::spawn_blocking(move || GROUP_RUNTIME.block_on(work))
        .await
        .expect("group-svc task")
}

/// group-svc as the service under test reaches it: every call crosses to
/// [`GROUP_RUNTIME`], and is counted.
#[derive(Debug, Clone)]
struct Bridge {
    server: GroupsServer<GroupService>,
    /// Calls by method name ("GetConversation"), to check the caches.
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl Service<http::Request<Body>> for Bridge {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        *self.calls.lock().entry(method.to_owned()).or_default() += 1;
        let mut server = self.server.clone();
        Box::pin(on_group_runtime(async move {
            std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut server, cx))
                .await?;
            server.call(request).await
        }))
    }
}

/// The real group-svc on an in-memory SQLite database, with the default
/// fixture: users 0 to 9, of whom [`STRANGER`] shares nothing with anyone, and
/// three conversations. Clones share the database and the call counts.
#[derive(Debug, Clone)]
pub(crate) struct GroupSvc {
    /// `u[n]` is the user the tests call n; ids increase with n.
    pub(crate) u: [i64; 10],
    /// The direct conversation of users 1 and 2.
    pub(crate) direct: i64,
    /// A group of users 1, 3 and 4.
    pub(crate) group: i64,
    /// A channel of users 1, 2 and 5: sharing a channel is not sharing a
    /// conversation.
    pub(crate) channel: i64,
    /// Through the [`Bridge`], as the service under test calls it.
    client: GroupsClient<GrpcChannel>,
    /// The bridge's counts, cleared once the fixture was made.
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl GroupSvc {
    /// Opens group-svc on a fresh database and creates the fixture.
    pub(crate) async fn open() -> Self {
        let server = on_group_runtime(async {
            let pool = confab_common::db::open_sqlite_memory()
                .await
                .expect("group-svc database");
            let service = GroupService::from_pool(pool, 1, GroupLimits::default())
                .await
                .expect("open group-svc");
            GroupsServer::new(service)
        })
        .await;
        let calls = Arc::default();
        let bridge = Bridge {
            server,
            calls: Arc::clone(&calls),
        };
        let mut client = GroupsClient::new(in_process(bridge));
        let u = confab_common::testkit::ensure_users(&mut client).await;
        let direct = OpenDirectRequest {
            user_a: u[1],
            user_b: u[2],
        };
        let direct = client.open_direct(direct).await.expect("open direct");
        let create = |kind: ConversationKind, member_ids: Vec<i64>| {
            let request = CreateConversationRequest {
                kind: kind.into(),
                creator_id: u[1],
                name: "fixture".into(),
                member_ids,
                ..CreateConversationRequest::default()
            };
            let mut client = client.clone();
            async move {
                let change = client.create_conversation(request).await;
                let change = change.expect("create conversation").into_inner();
                change.conversation.expect("created conversation").id
            }
        };
        let group = create(ConversationKind::Group, vec![u[3], u[4]]).await;
        let channel = create(ConversationKind::Channel, Vec::new()).await;
        for user_id in [u[2], u[5]] {
            let join = JoinRequest {
                conversation_id: channel,
                user_id,
            };
            client.join(join).await.expect("join channel");
        }
        calls.lock().clear();
        Self {
            u,
            direct: direct.into_inner().id,
            group,
            channel,
            client,
            calls,
        }
    }

    /// Returns a client, for a service under test.
    pub(crate) fn client(&self) -> GroupsClient<GrpcChannel> {
        self.client.clone()
    }

    /// Returns how many `method` calls ("SharedWith") group-svc answered since
    /// the fixture was made.
    pub(crate) fn calls(&self, method: &str) -> usize {
        self.calls.lock().get(method).copied().unwrap_or(0)
    }
}

/// A live bus that records every published event.
#[derive(Debug, Default)]
pub(crate) struct RecordingBus {
    events: Mutex<Vec<Arc<LiveEvent>>>,
}

impl RecordingBus {
    /// Returns and forgets the presence events so far, as (watched user,
    /// online, last seen).
    pub(crate) fn take_presence(&self) -> Vec<(i64, bool, i64)> {
        self.take()
            .into_iter()
            .filter_map(|event| match (&event.audience, &event.event.kind) {
                (Audience::Watchers(user), Some(Kind::Presence(p))) => {
                    assert_eq!((event.event.seq, p.user_id), (0, *user));
                    let Presence {
                        online,
                        last_seen_ms,
                        ..
                    } = *p;
                    Some((*user, online, last_seen_ms))
                }
                _ => None,
            })
            .collect()
    }

    /// Returns and forgets the typing events so far, as (recipient,
    /// conversation, typist, typing), sorted.
    pub(crate) fn take_typing(&self) -> Vec<(i64, i64, i64, bool)> {
        let mut typing: Vec<_> = self
            .take()
            .into_iter()
            .filter_map(|event| match (&event.audience, &event.event.kind) {
                (Audience::User(member), Some(Kind::Typing(t))) => {
                    assert_eq!(event.event.seq, 0);
                    let TypingState {
                        conversation_id,
                        user_id,
                        typing,
                    } = *t;
                    Some((*member, conversation_id, user_id, typing))
                }
                _ => None,
            })
            .collect();
        typing.sort_unstable();
        typing
    }

    fn take(&self) -> Vec<Arc<LiveEvent>> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl LiveBus for RecordingBus {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        self.events.lock().extend(events.iter().cloned());
    }
}

/// The test configuration: the defaults (15 s window, 6 s typing, 60 per
/// minute) on a file in `dir` (unused by the in-memory store).
pub(crate) fn config(dir: &std::path::Path) -> PresenceConfig {
    PresenceConfig {
        db_path: dir.join("presence.db"),
        ..PresenceConfig::default()
    }
}

/// The window of [`config`].
pub(crate) const WINDOW: Duration = Duration::from_secs(15);

/// What a test works with.
#[derive(Debug)]
pub(crate) struct Fixture {
    pub(crate) service: PresenceService,
    pub(crate) bus: Arc<RecordingBus>,
    pub(crate) groups: GroupSvc,
}

/// Opens group-svc, and a service on the in-memory store calling it (for
/// tests with a paused clock).
pub(crate) async fn in_memory() -> Fixture {
    let groups = GroupSvc::open().await;
    let bus = Arc::new(RecordingBus::default());
    let service = PresenceService::with_store(
        config(std::path::Path::new(".")),
        groups.client(),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
        Arc::new(MemoryStore::default()),
    );
    Fixture {
        service,
        bus,
        groups,
    }
}

/// Opens a service on the SQLite file in `dir`, calling `groups`.
pub(crate) async fn on_sqlite(dir: &std::path::Path, groups: &GroupSvc) -> Fixture {
    let bus = Arc::new(RecordingBus::default());
    let service = PresenceService::open(
        config(dir),
        groups.client(),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
    )
    .await
    .expect("open presence service");
    Fixture {
        service,
        bus,
        groups: groups.clone(),
    }
}

/// Opens a service on the NATS KV buckets of the server at `nats_url`, with
/// a window of `window`, calling `groups`.
pub(crate) async fn on_nats(nats_url: &str, window: Duration, groups: &GroupSvc) -> Fixture {
    let bus = Arc::new(RecordingBus::default());
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    let config = PresenceConfig {
        window,
        ..config(std::path::Path::new("unused"))
    };
    let service = PresenceService::open_nats(
        config,
        async_nats::jetstream::new(client),
        groups.client(),
        Arc::clone(&bus) as Arc<dyn LiveBus>,
    )
    .await
    .expect("open presence service on nats");
    Fixture {
        service,
        bus,
        groups: groups.clone(),
    }
}

/// Polls `check` until it returns `Some`, and returns that; fails the test
/// after 10 s. For waits on real servers, whose clocks cannot be paused.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lets spawned tasks (the sweeper) run what became ready, without sleeping.
pub(crate) async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Advances the paused clock by `by`, then lets the sweeper run.
pub(crate) async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    settle().await;
}
