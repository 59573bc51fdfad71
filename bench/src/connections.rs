//! Scenario `connections`: N external users, each on its own idle `Edge.Stream`
//! (its own TCP connection), held open with a `Heartbeat` every 5 s as a
//! foreground app does. Reports the connect rate and, when `--server-pid` names
//! the server process on this machine, its resident memory before and after
//! (`VmRSS` in /proc/PID/status) and its CPU while the connections idle; and the
//! kernel's TCP socket memory (/proc/net/sockstat, whole machine).
//!
//! One process here may hold at most 20,000 open files, and that cap cannot be
//! raised. With the server on the same machine every connection is one socket
//! in this process and one in the server, so one bench run is capped at
//! [`MAX_CONNECTIONS`]; more needs several bench processes and servers.

use std::time::{Duration, Instant};

use confab_proto::v1::{ClientFrame, Heartbeat, client_frame};
use futures::StreamExt as _;
use serde::Serialize;

use crate::client::{Servers, mint, open};
use crate::report::{RunResult, kib_field};

/// Connections one bench process opens at most (the 20,000 open files cap,
/// with room for the server's own files when it runs on this machine).
const MAX_CONNECTIONS: usize = 9_000;

/// The kernel's page size, in which /proc/net/sockstat counts memory.
const PAGE_BYTES: u64 = 4096;

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// Arguments of the connections scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Idle connections to open (at most 9,000 per bench process).
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to hold the connections once all are open.
    #[arg(long, default_value_t = 10)]
    hold: u64,
    /// Seconds between heartbeats on each connection.
    #[arg(long, default_value_t = 5)]
    heartbeat: u64,
    /// The server's process id, to read its memory and CPU from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's `--external-jwt-secret`.
    #[arg(long, env = "CONFAB_EXTERNAL_JWT_SECRET")]
    #[serde(skip)]
    external_secret: String,
}

/// What the connections scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    connections: usize,
    connect_per_s: f64,
    server_rss_kib_before: Option<u64>,
    server_rss_kib_after: Option<u64>,
    /// Server user-space memory per connection, after the hold.
    server_bytes_per_connection: Option<f64>,
    /// The server's CPU while the connections idled, in percent of one core.
    server_idle_cpu_percent: Option<f64>,
    tcp_mem_pages_before: Option<u64>,
    tcp_mem_pages_after: Option<u64>,
    /// Kernel TCP memory per connection (both ends, whole machine).
    kernel_bytes_per_connection: Option<f64>,
}

/// Runs the scenario against `servers`: connection `i` through server `i % n`
/// (`--server-pid` then names one of them).
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        (1..=MAX_CONNECTIONS).contains(&args.connections),
        "--connections must be 1..={MAX_CONNECTIONS}: one process may hold at most 20,000 open files here"
    );
    let run_id: u32 = rand::random();
    let rss_before = args.server_pid.and_then(rss_kib);
    let tcp_before = tcp_mem_pages();

    eprintln!("opening {} connections", args.connections);
    let progress = crate::progress(args.connections as u64);
    let started = Instant::now();
    let heartbeat = Duration::from_secs(args.heartbeat.max(1));
    let mut opening = futures::stream::iter(0..args.connections)
        .map(|i| {
            let token = mint(&args.external_secret, &format!("c{run_id:08x}u{i}"));
            let server = servers.nth(i);
            async move { open(server, &token?).await }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut held = Vec::with_capacity(args.connections);
    while let Some(opened) = opening.next().await {
        let (out, inbound) = opened?;
        held.push(tokio::spawn(hold(out, inbound, heartbeat)));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let connect_per_s = args.connections as f64 / started.elapsed().as_secs_f64();

    eprintln!(
        "holding {} connections for {} s",
        args.connections, args.hold
    );
    let cpu_before = args.server_pid.and_then(cpu_ticks);
    let holding = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    let server_idle_cpu_percent = match (cpu_before, args.server_pid.and_then(cpu_ticks)) {
        (Some(before), Some(after)) => {
            Some((after - before) as f64 / TICKS_PER_S / holding.elapsed().as_secs_f64() * 100.0)
        }
        _ => None,
    };
    let rss_after = args.server_pid.and_then(rss_kib);
    let tcp_after = tcp_mem_pages();
    for connection in &held {
        anyhow::ensure!(!connection.is_finished(), "a connection ended while held");
    }
    let n = args.connections as f64;
    let figures = Figures {
        connections: args.connections,
        connect_per_s,
        server_rss_kib_before: rss_before,
        server_rss_kib_after: rss_after,
        server_bytes_per_connection: rss_before
            .zip(rss_after)
            .map(|(before, after)| per_connection(before * 1024, after * 1024, n)),
        server_idle_cpu_percent,
        tcp_mem_pages_before: tcp_before,
        tcp_mem_pages_after: tcp_after,
        kernel_bytes_per_connection: tcp_before
            .zip(tcp_after)
            .map(|(before, after)| per_connection(before * PAGE_BYTES, after * PAGE_BYTES, n)),
    };
    for connection in held {
        connection.abort();
    }
    println!(
        "connections: {} opened at {:.0}/s; server {} B/conn (RSS {:?} -> {:?} KiB), idle CPU {:?} %; kernel TCP {} B/conn",
        figures.connections,
        figures.connect_per_s,
        show(figures.server_bytes_per_connection),
        figures.server_rss_kib_before,
        figures.server_rss_kib_after,
        figures
            .server_idle_cpu_percent
            .map(|cpu| (cpu * 10.0).round() / 10.0),
        show(figures.kernel_bytes_per_connection),
    );
    RunResult::new("connections", &args, &figures)
}

/// Keeps one connection open: a heartbeat on every tick, every frame read.
async fn hold(
    out: tokio::sync::mpsc::Sender<ClientFrame>,
    mut inbound: crate::client::Inbound,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let frame = ClientFrame {
                    r#ref: 0,
                    kind: Some(client_frame::Kind::Heartbeat(Heartbeat {})),
                };
                if out.send(frame).await.is_err() {
                    return;
                }
            }
            frame = inbound.next() => {
                if !matches!(frame, Some(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// Returns the growth from `before` to `after`, in bytes, spread over `n`.
fn per_connection(before: u64, after: u64, n: f64) -> f64 {
    (after as f64 - before as f64) / n
}

/// Returns a byte figure for the summary line.
fn show(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "?".into(), |bytes| format!("{bytes:.0}"))
}

/// Returns a process's resident memory in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, "VmRSS:")
}

/// Returns a process's user plus system CPU time in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_ticks(&stat)
}

/// Returns `utime + stime` from the text of /proc/PID/stat (fields 14 and 15;
/// the command name in parentheses may hold spaces, so count after its `)`).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Returns the kernel's TCP socket memory in pages (`TCP: ... mem N`).
fn tcp_mem_pages() -> Option<u64> {
    sockstat_tcp_mem(&std::fs::read_to_string("/proc/net/sockstat").ok()?)
}

/// Reads `mem N` from the `TCP:` line of /proc/net/sockstat.
fn sockstat_tcp_mem(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|line| line.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|word| *word == "mem")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_tcp_memory_is_read_from_the_tcp_line() {
        let sockstat =
            "sockets: used 290\nTCP: inuse 12 orphan 0 tw 3 alloc 15 mem 7\nUDP: inuse 1 mem 2\n";
        assert_eq!(sockstat_tcp_mem(sockstat), Some(7));
        assert_eq!(sockstat_tcp_mem("UDP: inuse 1 mem 2\n"), None);
    }

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn growth_is_spread_over_the_connections() {
        assert_eq!(per_connection(1_000, 9_000, 1_000.0), 8.0);
        assert_eq!(per_connection(9_000, 1_000, 1_000.0), -8.0);
    }
}
