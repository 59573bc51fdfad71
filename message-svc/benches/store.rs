//! message-svc's store on SQLite, through the generated `Messages` trait of
//! `MessageService` in process (as the gateway calls it, minus the in-process
//! gRPC encoding), with a fake group-svc:
//!
//! - `send_one`: one send, acknowledged after its commit (a batch of one: one
//!   transaction, one WAL fsync).
//! - `send_batch`: N sends in flight at once; the writer commits them in as few
//!   transactions as it can (group commit, up to 512 per batch). Throughput is
//!   per message.
//! - `history_newest` and `history_middle`: pages of 50 messages of a
//!   conversation of 10,000, newest first, at the end and in the middle.
//!
//! Every message is a 100-byte text in one direct conversation, so each commits
//! the message and one event in each member's sequence. Run with `cargo bench
//! --bench store`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use confab_common::bus::{LiveBus, LiveEvent};
use confab_common::channel::in_process;
use confab_group_svc::{GroupLimits, GroupService};
use confab_message_svc::{MessageConfig, MessageService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::group::v1::{EnsureUserRequest, OpenDirectRequest};
use confab_proto::message::v1::messages_server::Messages;
use confab_proto::message::v1::{HistoryRequest, SendRequest};
use divan::counter::ItemsCount;
use divan::{Bencher, black_box};
use tonic::Request;

/// The `confab` binary's allocator, so that the figures are the server's
/// (SQLite allocates through it too, by `confab_common::db`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

/// Messages in the conversation the history benches read.
const HISTORY_MESSAGES: usize = 10_000;

/// A live bus that drops every event (no device is connected).
#[derive(Debug)]
struct NoBus;

impl LiveBus for NoBus {
    fn publish(&self, _: &[Arc<LiveEvent>]) {}
}

/// The ids group-svc gave the bench's users and conversation.
#[derive(Debug, Clone, Copy)]
struct Ids {
    conversation: i64,
    sender: i64,
    receiver: i64,
}

/// A message service on a fresh SQLite file, and the runtime it runs on.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    service: MessageService,
    /// The conversation and its two members, made by group-svc.
    ids: Ids,
    next: AtomicU64,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = MessageConfig {
            db_path: dir.path().join("messages.db"),
            node_id: 1,
            ..MessageConfig::default()
        };
        // The real group-svc, in memory: two users and their direct
        // conversation, the one the benches write and read.
        let (groups, ids) = runtime.block_on(async {
            let pool = confab_common::db::open_sqlite_memory().await.unwrap();
            let service = GroupService::from_pool(pool, 2, GroupLimits::default())
                .await
                .unwrap();
            let mut groups = GroupsClient::new(in_process(GroupsServer::new(service)));
            let mut user = async |name: &str| {
                let request = EnsureUserRequest {
                    username: name.to_owned(),
                };
                groups.ensure_user(request).await.unwrap().into_inner().id
            };
            let (sender, receiver) = (user("sender").await, user("receiver").await);
            let direct = OpenDirectRequest {
                user_a: sender,
                user_b: receiver,
            };
            let conversation = groups.open_direct(direct).await.unwrap().into_inner().id;
            (
                groups,
                Ids {
                    conversation,
                    sender,
                    receiver,
                },
            )
        });
        let service = runtime
            .block_on(MessageService::open(config, groups, Arc::new(NoBus)))
            .unwrap();
        Self {
            runtime,
            service,
            ids,
            next: AtomicU64::new(0),
            _dir: dir,
        }
    }

    /// Sends `n` messages at once; returns the id of the last one acknowledged.
    async fn send(&self, n: usize) -> i64 {
        let sends = (0..n).map(|_| {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let request = Request::new(SendRequest {
                sender_id: self.ids.sender,
                sender_device: "phone".into(),
                conversation_id: self.ids.conversation,
                client_msg_id: format!("m{i}"),
                text: "x".repeat(100),
            });
            Messages::send(&self.service, request)
        });
        let mut last = 0;
        for response in futures::future::join_all(sends).await {
            let message = response.unwrap().into_inner().message.unwrap_or_default();
            last = last.max(message.id);
        }
        last
    }

    async fn history(&self, before: i64) -> usize {
        let request = Request::new(HistoryRequest {
            user_id: self.ids.receiver,
            conversation_id: self.ids.conversation,
            before,
            after: 0,
            limit: 50,
        });
        let page = Messages::history(&self.service, request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.messages.len(), 50);
        page.messages.len()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.runtime.block_on(self.service.shutdown());
    }
}

/// One send: validation, membership (cached), one commit.
#[divan::bench]
fn send_one(bencher: Bencher<'_, '_>) {
    let fixture = Fixture::new();
    bencher.bench_local(|| fixture.runtime.block_on(fixture.send(1)));
}

/// N sends in flight at once, committed by the writer in batches.
#[divan::bench(args = [16, 128, 512], sample_count = 40)]
fn send_batch(bencher: Bencher<'_, '_>, n: usize) {
    let fixture = Fixture::new();
    bencher
        .counter(ItemsCount::new(n))
        .bench_local(|| fixture.runtime.block_on(fixture.send(n)));
}

/// Returns a fixture whose conversation holds [`HISTORY_MESSAGES`], and the id
/// of the message in the middle.
fn filled() -> (Fixture, i64) {
    let fixture = Fixture::new();
    let middle = fixture.runtime.block_on(async {
        let middle = fixture.send(HISTORY_MESSAGES / 2).await;
        fixture.send(HISTORY_MESSAGES / 2).await;
        middle
    });
    (fixture, middle)
}

/// The newest 50 messages (opening a conversation).
#[divan::bench]
fn history_newest(bencher: Bencher<'_, '_>) {
    let (fixture, _) = filled();
    bencher.bench_local(|| black_box(fixture.runtime.block_on(fixture.history(0))));
}

/// 50 messages before one in the middle (scrolling back).
#[divan::bench]
fn history_middle(bencher: Bencher<'_, '_>) {
    let (fixture, middle) = filled();
    bencher.bench_local(|| black_box(fixture.runtime.block_on(fixture.history(middle))));
}
