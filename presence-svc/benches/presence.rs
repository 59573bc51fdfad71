//! Presence under load: 50,000 users with one connection each, heartbeating
//! every 5 s (spread evenly: ~10,000 heartbeats/s) through the generated gRPC
//! client over `in_process` (as the gateway calls it), plus a few thousand
//! watchers querying, whose contacts the real group-svc (SQLite, in process)
//! answers. Not a timed test: run it with `cargo bench --bench presence` and
//! read the report; `cargo bench --bench presence -- 5000 3` runs 5,000 users
//! measured for 3 s.
//!
//! CPU is the whole process (client encoding and group-svc's lookups
//! included), so the "presence work" share is an upper bound; the idle
//! baseline is measured first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use confab_common::bus::{LiveBus, LiveEvent};
use confab_common::channel::{GrpcChannel, in_process};
use confab_group_svc::{GroupLimits, GroupService};
use confab_presence_svc::{PresenceConfig, PresenceService};
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::group::v1::groups_server::GroupsServer;
use confab_proto::group::v1::{CreateConversationRequest, EnsureUserRequest};
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::presence::v1::presences_server::PresencesServer;
use confab_proto::presence::v1::{HeartbeatRequest, QueryRequest};
use confab_proto::v1::ConversationKind;

/// Users by default; the first argument sets another number (rounded down
/// to a multiple of [`DRIVERS`]).
const USERS: usize = 50_000;
/// Watchers per user: 3,000 of 50,000.
const WATCHER_SHARE: f64 = 0.06;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const DRIVERS: usize = 100;
const WARM_UP: Duration = Duration::from_secs(6);
/// Measured seconds by default; the second argument sets another duration.
const MEASURE: Duration = Duration::from_secs(20);
/// Users of one group: each group overlaps the next by half, so that every
/// user shares a group with at least the 10 users on either side.
const GROUP_SIZE: usize = 20;

/// Returns (users, measured duration) from the command line: `cargo bench
/// --bench presence -- [USERS] [SECONDS]`. Cargo adds `--bench`, ignored.
fn arguments() -> (usize, Duration) {
    let mut numbers = std::env::args()
        .skip(1)
        .filter(|argument| !argument.starts_with("--"))
        .map(|argument| {
            argument
                .parse::<u64>()
                .expect("arguments: [USERS] [SECONDS]")
        });
    let users = numbers.next().map_or(USERS, |users| users as usize);
    let measure = numbers.next().map_or(MEASURE, Duration::from_secs);
    let users = users / DRIVERS * DRIVERS;
    assert!(users > 0, "at least {DRIVERS} users");
    (users, measure)
}

/// Opens the real group-svc on an in-memory SQLite database (a file would
/// spend the set-up on 50,000 commits) and creates `count` users in groups of
/// [`GROUP_SIZE`] consecutive users, overlapping by half; returns a client and
/// the user ids, in order.
async fn group_svc(count: usize) -> (GroupsClient<GrpcChannel>, Vec<i64>) {
    let pool = confab_common::db::open_sqlite_memory()
        .await
        .expect("group-svc database");
    let service = GroupService::from_pool(pool, 1, GroupLimits::default())
        .await
        .expect("open group-svc");
    let mut groups = GroupsClient::new(in_process(GroupsServer::new(service)));
    let mut users = Vec::with_capacity(count);
    for n in 0..count {
        let request = EnsureUserRequest {
            username: format!("user{n}"),
        };
        let user = groups.ensure_user(request).await.expect("ensure user");
        users.push(user.into_inner().id);
    }
    let half = GROUP_SIZE / 2;
    for first in (0..count.saturating_sub(half)).step_by(half) {
        let members = &users[first..(first + GROUP_SIZE).min(count)];
        let request = CreateConversationRequest {
            kind: ConversationKind::Group.into(),
            creator_id: members[0],
            name: format!("group {first}"),
            member_ids: members.to_vec(),
            ..CreateConversationRequest::default()
        };
        groups
            .create_conversation(request)
            .await
            .expect("create group");
    }
    (groups, users)
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
    let (user_count, measure) = arguments();
    let watcher_count = (user_count as f64 * WATCHER_SHARE) as usize;
    let dir = tempfile::tempdir().expect("temporary directory");
    let set_up = Instant::now();
    let (groups, users) = group_svc(user_count).await;
    let users: Arc<[i64]> = users.into();
    println!(
        "group-svc: {user_count} users in groups of {GROUP_SIZE} set up in {:.1} s",
        set_up.elapsed().as_secs_f64()
    );
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
    // Each driver owns users / DRIVERS users and heartbeats one of them per
    // tick, so that every user heartbeats every 5 s, spread evenly.
    let per_driver = user_count / DRIVERS;
    let tick = HEARTBEAT_EVERY / per_driver as u32;
    for driver in 0..DRIVERS {
        let client = client.clone();
        let heartbeats = Arc::clone(&heartbeats);
        let users = Arc::clone(&users);
        tokio::spawn(async move {
            let offset = tick * driver as u32 / DRIVERS as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for round in 0_usize.. {
                ticks.tick().await;
                let index = driver * per_driver + round % per_driver;
                let request = HeartbeatRequest {
                    user_id: users[index],
                    device_id: "phone".into(),
                    connection_id: index as u64,
                    node: "bench".into(),
                };
                if client.clone().heartbeat(request).await.is_ok() {
                    heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Watchers open a chat screen every 10 s on average: 20 users each.
    for watcher in 0..watcher_count {
        let client = client.clone();
        let queries = Arc::clone(&queries);
        let users = Arc::clone(&users);
        tokio::spawn(async move {
            let period = Duration::from_secs(10);
            let offset = period * watcher as u32 / watcher_count as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            let index = watcher * (user_count / watcher_count);
            let nearby = index.saturating_sub(10)..(index + 10).min(user_count);
            loop {
                ticks.tick().await;
                let request = QueryRequest {
                    watcher_id: users[index],
                    user_ids: users[nearby.clone()].to_vec(),
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
    tokio::time::sleep(measure).await;
    let wall = wall1.elapsed();
    let cpu = cpu_time() - cpu1;
    let seconds = wall.as_secs_f64();
    let beats = heartbeats.load(Ordering::Relaxed) - beats1;
    let queried = queries.load(Ordering::Relaxed) - queries1;
    let writes = service.store_writes() - writes1;
    let events = bus.events.load(Ordering::Relaxed) - events1;
    let rss_after = rss_bytes();
    let busy = share(cpu, wall);

    println!(
        "presence benchmark: {user_count} users, {watcher_count} watchers, heartbeat every 5 s"
    );
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
        rss_after.saturating_sub(rss_before) as f64 / user_count as f64
    );
    println!(
        "  total run             {:>10.1} s",
        started.elapsed().as_secs_f64()
    );
    service.shutdown().await;
}
