//! Presence under load: 50,000 users with one connection each, heartbeating
//! every 5 s (spread evenly: ~10,000 heartbeats/s) through the generated gRPC
//! client over `in_process` (as the gateway calls it), plus a few thousand
//! watchers querying. Not a timed test: run it with `cargo bench --bench
//! presence` and read the report.
//!
//! CPU is the whole process (client encoding included), so the "presence
//! work" share is an upper bound; the idle baseline is measured first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use confab_common::bus::{LiveBus, LiveEvent};
use confab_common::channel::{GrpcChannel, in_process};
use confab_presence_svc::{PresenceConfig, PresenceService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::{Groups, GroupsServer};
use confab_proto::group::v1::*;
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::presence::v1::presences_server::PresencesServer;
use confab_proto::presence::v1::{HeartbeatRequest, QueryRequest};
use confab_proto::v1::{Conversation, Member, User};
use tonic::{Request, Response, Status};

const USERS: i64 = 50_000;
const WATCHERS: i64 = 3_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const DRIVERS: i64 = 100;
const WARM_UP: Duration = Duration::from_secs(6);
const MEASURE: Duration = Duration::from_secs(20);

/// A group-svc where user u shares a conversation with u ± 1..=10.
#[derive(Debug)]
struct FakeGroups;

#[tonic::async_trait]
impl Groups for FakeGroups {
    async fn create_user(&self, _: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn verify_password(
        &self,
        _: Request<VerifyPasswordRequest>,
    ) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn ensure_user(&self, _: Request<EnsureUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_user(&self, _: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_users(
        &self,
        _: Request<GetUsersRequest>,
    ) -> Result<Response<GetUsersResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn open_direct(
        &self,
        _: Request<OpenDirectRequest>,
    ) -> Result<Response<Conversation>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_conversation(
        &self,
        _: Request<GetConversationRequest>,
    ) -> Result<Response<Conversation>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn list_conversations(
        &self,
        _: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn create_conversation(
        &self,
        _: Request<CreateConversationRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn add_members(
        &self,
        _: Request<AddMembersRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn remove_member(
        &self,
        _: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn set_role(
        &self,
        _: Request<SetRoleRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn update_conversation(
        &self,
        _: Request<UpdateConversationRequest>,
    ) -> Result<Response<MembershipChange>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_member(&self, _: Request<GetMemberRequest>) -> Result<Response<Member>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn shared_with(
        &self,
        request: Request<SharedWithRequest>,
    ) -> Result<Response<SharedWithResponse>, Status> {
        let SharedWithRequest { user_id, other_ids } = request.into_inner();
        let user_ids = other_ids
            .into_iter()
            .filter(|&other| other != user_id && (other - user_id).abs() <= 10)
            .collect();
        Ok(Response::new(SharedWithResponse { user_ids }))
    }
    async fn check_token(
        &self,
        _: Request<confab_proto::group::v1::CheckTokenRequest>,
    ) -> Result<Response<confab_proto::v1::User>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn revoke_tokens(
        &self,
        _: Request<confab_proto::group::v1::RevokeTokensRequest>,
    ) -> Result<Response<confab_proto::group::v1::RevokeTokensResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

/// Counts published events, as the gateway's hub would receive them.
#[derive(Debug, Default)]
struct CountingBus {
    events: AtomicU64,
}

impl LiveBus for CountingBus {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        self.events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
    }
}

/// Returns the process's CPU time (user + system) from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// Returns the resident set size in bytes, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Returns the CPU share of one core over `wall` for `cpu`, in percent.
fn share(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let groups: GroupsClient<GrpcChannel> =
        GroupsClient::new(in_process(GroupsServer::new(FakeGroups)));
    let bus = Arc::new(CountingBus::default());
    let config = PresenceConfig {
        db_path: dir.path().join("presence.db"),
        ..PresenceConfig::default()
    };
    let service = PresenceService::open(config, groups, Arc::clone(&bus) as Arc<dyn LiveBus>)
        .await
        .expect("open presence service");
    let client = PresencesClient::new(in_process(PresencesServer::new(service.clone())));

    // Idle baseline: the service and its sweeper with nobody online.
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = share(cpu_time() - cpu0, wall0.elapsed());
    let rss_before = rss_bytes();

    let heartbeats = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // Each driver owns USERS / DRIVERS users and heartbeats one of them per
    // tick, so that every user heartbeats every 5 s, spread evenly.
    let per_driver = USERS / DRIVERS;
    let tick = HEARTBEAT_EVERY / per_driver as u32;
    for driver in 0..DRIVERS {
        let client = client.clone();
        let heartbeats = Arc::clone(&heartbeats);
        tokio::spawn(async move {
            let offset = tick * driver as u32 / DRIVERS as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for round in 0_i64.. {
                ticks.tick().await;
                let user_id = 1 + driver * per_driver + round % per_driver;
                let request = HeartbeatRequest {
                    user_id,
                    device_id: "phone".into(),
                    connection_id: user_id as u64,
                    node: "bench".into(),
                };
                if client.clone().heartbeat(request).await.is_ok() {
                    heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Watchers open a chat screen every 10 s on average: 20 users each.
    for watcher in 0..WATCHERS {
        let client = client.clone();
        let queries = Arc::clone(&queries);
        tokio::spawn(async move {
            let period = Duration::from_secs(10);
            let offset = period * watcher as u32 / WATCHERS as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            let watcher_id = 1 + watcher * (USERS / WATCHERS);
            loop {
                ticks.tick().await;
                let request = QueryRequest {
                    watcher_id,
                    user_ids: (watcher_id - 10..watcher_id + 10)
                        .filter(|&id| id > 0)
                        .collect(),
                };
                if client.clone().query(request).await.is_ok() {
                    queries.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    tokio::time::sleep(WARM_UP).await;
    let online = service.online_users();
    let rss_loaded = rss_bytes();
    let (cpu1, wall1) = (cpu_time(), Instant::now());
    let (beats1, queries1, writes1, events1) = (
        heartbeats.load(Ordering::Relaxed),
        queries.load(Ordering::Relaxed),
        service.store_writes(),
        bus.events.load(Ordering::Relaxed),
    );
    tokio::time::sleep(MEASURE).await;
    let wall = wall1.elapsed();
    let cpu = cpu_time() - cpu1;
    let seconds = wall.as_secs_f64();
    let beats = heartbeats.load(Ordering::Relaxed) - beats1;
    let queried = queries.load(Ordering::Relaxed) - queries1;
    let writes = service.store_writes() - writes1;
    let events = bus.events.load(Ordering::Relaxed) - events1;
    let rss_after = rss_bytes();
    let busy = share(cpu, wall);

    println!("presence benchmark: {USERS} users, {WATCHERS} watchers, heartbeat every 5 s");
    println!(
        "  warm-up {:?} (online after it: {online}), measured {:.1} s",
        WARM_UP, seconds
    );
    println!("  heartbeats/s handled  {:>10.0}", beats as f64 / seconds);
    println!("  queries/s             {:>10.0}", queried as f64 / seconds);
    println!("  presence events/s     {:>10.0}", events as f64 / seconds);
    println!(
        "  store writes/s        {:>10.0}  (rows; one transaction per sweep)",
        writes as f64 / seconds
    );
    println!(
        "  CPU                   {:>9.1} % of one core (idle baseline {idle:.1} %, net {:.1} %)",
        busy,
        busy - idle
    );
    println!(
        "  RSS                   {:>10.1} MiB before users, {:.1} MiB loaded, {:.1} MiB at the end",
        rss_before as f64 / 1048576.0,
        rss_loaded as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    println!(
        "  memory per user       {:>10.0} bytes (RSS growth / users)",
        rss_after.saturating_sub(rss_before) as f64 / USERS as f64
    );
    println!(
        "  total run             {:>10.1} s",
        started.elapsed().as_secs_f64()
    );
    service.shutdown().await;
}
