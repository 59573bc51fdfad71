//! Scenario `connections`: N external users, each on its own idle live
//! connection (its own TCP connection), held open with a `Heartbeat` every 5 s
//! as a foreground app does. Reports the connect rate and, when `--server-pid`
//! names the server process on this machine, its resident memory before and
//! after (`VmRSS` in /proc/PID/status) and its CPU while the connections idle;
//! and the kernel's TCP socket memory (/proc/net/sockstat, whole machine).
//!
//! `--transport` picks gRPC `Edge.Stream` or the WebSocket `GET /v1/ws`
//! (binary protobuf frames, the token in the upgrade's `Authorization` header).
//!
//! One process here may hold at most 20,000 open files, and that cap cannot be
//! raised. With the server on the same machine every connection is one socket
//! in a bench process and one in the server, so the connections are held by
//! `--workers` child processes of this binary ([`worker`]), at most
//! [`MAX_PER_WORKER`] each. The parent starts them, tells them all to open at
//! once, waits until each reports its share open (a line on its stdout, see
//! [`Report`]), measures the server while they hold, then asks each whether it
//! still holds every connection and stops them.
//!
//! Against a server on a 127.x address every connection binds its own loopback
//! source address first ([`worker::source_address`]), so that neither the
//! ephemeral ports of one address nor the server's per-address connection limit
//! caps the run.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::client::{Servers, Transport};
use crate::procfs::{TICKS_PER_S, cpu_ticks};
use crate::report::{RunResult, kib_field};

pub(crate) mod worker;

/// Connections one bench process opens at most (the 20,000 open files cap,
/// with room for the server's own files when it runs on this machine).
const MAX_PER_WORKER: usize = 9_000;

/// Worker processes at most: worker `w` binds source addresses `127.(1+w).*.*`.
const MAX_WORKERS: usize = 254;

/// The environment variable that hands the external secret to the workers
/// (rather than their command line, which every local user can read).
const SECRET_ENV: &str = "CONFAB_EXTERNAL_JWT_SECRET";

/// How long a worker may take to answer `stop` with its count.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// The kernel's page size, in which /proc/net/sockstat counts memory.
const PAGE_BYTES: u64 = 4096;

/// Arguments of the connections scenario.
#[derive(Debug, clap::Args, Serialize)]
pub(crate) struct Args {
    /// Idle connections to open (at most 9,000 per worker process).
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// The live connection: gRPC `Edge.Stream` or WebSocket `/v1/ws`.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// Child processes that open and hold the connections, an even share each
    /// (one process may hold at most 20,000 open files here).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Connections being opened at the same time (over all workers).
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
    #[arg(long, env = SECRET_ENV)]
    #[serde(skip)]
    external_secret: String,
}

/// What the connections scenario measured.
#[derive(Debug, Serialize)]
struct Figures {
    transport: Transport,
    workers: usize,
    connections: usize,
    /// Connections over the time from "open" to the last worker's report:
    /// each one the first of its user (an external token's user is created by
    /// it).
    connect_per_s: f64,
    /// Connections opened per second when every one of them closed and opened
    /// again, as the same users (a reconnect storm of known users).
    reconnect_per_s: f64,
    /// Distinct loopback source addresses the connections bound (0: none bound,
    /// the server is not on a 127.x address).
    source_addresses: usize,
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
    /// The workers' resident memory together, with every connection open.
    bench_rss_kib: Option<u64>,
}

/// What a worker tells the parent, one line on its stdout each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// Started and resolved the servers: waiting for `go`.
    Ready,
    /// Progress: this many connections are open so far.
    Opened(usize),
    /// Every connection of the share is open (synced), having bound this many
    /// distinct source addresses.
    Open {
        connections: usize,
        source_addresses: usize,
    },
    /// Answer to `stop`: this many of the share were still open.
    Held { alive: usize, of: usize },
}

impl Report {
    /// Parses one line of a worker's stdout.
    ///
    /// # Errors
    ///
    /// Fails on anything but the lines [`Report::line`] writes.
    pub(crate) fn parse(line: &str) -> anyhow::Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |word: &str| -> anyhow::Result<usize> {
            word.parse()
                .with_context(|| format!("not a count: {word:?} in {line:?}"))
        };
        Ok(match words.as_slice() {
            ["ready"] => Self::Ready,
            ["opened", n] => Self::Opened(number(n)?),
            ["open", n, addresses] => Self::Open {
                connections: number(n)?,
                source_addresses: number(addresses)?,
            },
            ["held", alive, of] => Self::Held {
                alive: number(alive)?,
                of: number(of)?,
            },
            _ => anyhow::bail!("unexpected worker report {line:?}"),
        })
    }

    /// Returns the line a worker prints.
    pub(crate) fn line(self) -> String {
        match self {
            Self::Ready => "ready".into(),
            Self::Opened(n) => format!("opened {n}"),
            Self::Open {
                connections,
                source_addresses,
            } => format!("open {connections} {source_addresses}"),
            Self::Held { alive, of } => format!("held {alive} {of}"),
        }
    }
}

/// Returns the shares of `n` connections over `workers`: as even as possible,
/// the first ones one larger.
fn shares(n: usize, workers: usize) -> Vec<usize> {
    let workers = workers.max(1);
    (0..workers)
        .map(|w| n / workers + usize::from(w < n % workers))
        .collect()
}

/// Checks `--connections` against `--workers`.
fn check_sizes(connections: usize, workers: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_WORKERS).contains(&workers),
        "--workers must be 1..={MAX_WORKERS}"
    );
    anyhow::ensure!(
        connections >= workers,
        "--connections ({connections}) must be at least --workers ({workers})"
    );
    let most = MAX_PER_WORKER * workers;
    anyhow::ensure!(
        connections <= most,
        "--connections {connections} is more than {most}: one process may hold at most \
         20,000 open files here, so each worker holds at most {MAX_PER_WORKER}; \
         use --workers {} or more",
        connections.div_ceil(MAX_PER_WORKER)
    );
    Ok(())
}

/// One worker process, as the parent sees it.
struct Worker {
    index: usize,
    share: usize,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts worker `index` on connections `first..first + share`.
    fn spawn(
        servers: &Servers,
        args: &Args,
        index: usize,
        first: usize,
        share: usize,
        run_id: u32,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding confab-bench's own binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--server")
            .arg(servers.urls().join(","))
            .arg(worker::SUBCOMMAND)
            .args(["--worker", &index.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--connections", &share.to_string()])
            .args(["--run-id", &run_id.to_string()])
            .args(["--transport", args.transport.name()])
            .args(["--heartbeat", &args.heartbeat.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .env(SECRET_ENV, &args.external_secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {index}"))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        Ok(Self {
            index,
            share,
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Reads the worker's next report; fails when it exited instead.
    async fn next(&mut self) -> anyhow::Result<Report> {
        match self.lines.next_line().await? {
            Some(line) => Report::parse(&line).with_context(|| format!("worker {}", self.index)),
            None => {
                let status = self.child.wait().await?;
                anyhow::bail!(
                    "worker {} ended ({status}) before it reported (its error is above)",
                    self.index
                )
            }
        }
    }

    /// Sends one order (`go`, `stop`).
    async fn order(&mut self, order: &str) -> anyhow::Result<()> {
        self.stdin
            .write_all(format!("{order}\n").as_bytes())
            .await
            .with_context(|| format!("telling worker {} to {order}", self.index))?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Waits until the worker is ready to open.
    async fn ready(&mut self) -> anyhow::Result<()> {
        match self.next().await? {
            Report::Ready => Ok(()),
            other => anyhow::bail!("worker {}: {other:?} before ready", self.index),
        }
    }

    /// Follows the worker's progress until its share is open; returns the
    /// source addresses it bound.
    async fn opened(&mut self, progress: &indicatif::ProgressBar) -> anyhow::Result<usize> {
        let mut shown = 0;
        loop {
            match self.next().await? {
                Report::Opened(n) => {
                    progress.inc(n.saturating_sub(shown) as u64);
                    shown = shown.max(n);
                }
                Report::Open {
                    connections,
                    source_addresses,
                } => {
                    anyhow::ensure!(
                        connections == self.share,
                        "worker {} opened {connections} of {}",
                        self.index,
                        self.share
                    );
                    progress.inc(connections.saturating_sub(shown) as u64);
                    return Ok(source_addresses);
                }
                other => anyhow::bail!("worker {}: {other:?} while opening", self.index),
            }
        }
    }

    /// Tells the worker to stop; returns how many of its share it still held,
    /// once it exited successfully.
    async fn stop(&mut self) -> anyhow::Result<usize> {
        self.order("stop").await?;
        let report = tokio::time::timeout(STOP_LIMIT, self.next())
            .await
            .with_context(|| format!("worker {} did not answer stop", self.index))??;
        let Report::Held { alive, of } = report else {
            anyhow::bail!("worker {}: {report:?} after stop", self.index);
        };
        anyhow::ensure!(
            of == self.share,
            "worker {} held {of} connections, not {}",
            self.index,
            self.share
        );
        let status = tokio::time::timeout(STOP_LIMIT, self.child.wait())
            .await
            .with_context(|| format!("worker {} did not exit", self.index))??;
        anyhow::ensure!(status.success(), "worker {} ended: {status}", self.index);
        Ok(alive)
    }
}

/// Runs the scenario against `servers`: connection `i` through server `i % n`
/// (`--server-pid` then names one of them).
pub(crate) async fn run(servers: &Servers, args: Args) -> anyhow::Result<RunResult> {
    check_sizes(args.connections, args.workers)?;
    let run_id: u32 = rand::random();
    let concurrency = args.concurrency.max(1).div_ceil(args.workers).max(1);
    let mut workers = Vec::with_capacity(args.workers);
    let mut first = 0;
    for (index, share) in shares(args.connections, args.workers)
        .into_iter()
        .enumerate()
    {
        workers.push(Worker::spawn(
            servers,
            &args,
            index,
            first,
            share,
            run_id,
            concurrency,
        )?);
        first += share;
    }
    for worker in &mut workers {
        worker.ready().await?;
    }

    let rss_before = args.server_pid.and_then(rss_kib);
    let tcp_before = tcp_mem_pages();
    eprintln!(
        "opening {} {} connections from {} worker(s)",
        args.connections,
        args.transport.name(),
        args.workers
    );
    let progress = crate::progress(args.connections as u64);
    let started = Instant::now();
    for worker in &mut workers {
        worker.order("go").await?;
    }
    let addresses =
        futures::future::try_join_all(workers.iter_mut().map(|worker| worker.opened(&progress)))
            .await?;
    let connect_per_s = args.connections as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let source_addresses = addresses.iter().sum();
    let bench_rss_kib = workers
        .iter()
        .map(|worker| worker.child.id().and_then(rss_kib))
        .sum::<Option<u64>>();

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

    eprintln!("closing and reopening {} connections", args.connections);
    let progress = crate::progress(args.connections as u64);
    let started = Instant::now();
    for worker in &mut workers {
        worker.order("reopen").await?;
    }
    futures::future::try_join_all(workers.iter_mut().map(|worker| worker.opened(&progress)))
        .await?;
    let reconnect_per_s = args.connections as f64 / started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    let alive = futures::future::try_join_all(workers.iter_mut().map(Worker::stop)).await?;
    for (worker, alive) in workers.iter().zip(&alive) {
        anyhow::ensure!(
            *alive == worker.share,
            "{} of worker {}'s {} connections ended while held",
            worker.share - alive,
            worker.index,
            worker.share
        );
    }

    let n = args.connections as f64;
    let figures = Figures {
        transport: args.transport,
        workers: args.workers,
        connections: args.connections,
        connect_per_s,
        reconnect_per_s,
        source_addresses,
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
        bench_rss_kib,
    };
    println!(
        "connections ({}, {} worker(s), {} source addresses): {} opened at {:.0}/s (new users), reopened at {:.0}/s; server {} B/conn (RSS {:?} -> {:?} KiB), idle CPU {:?} %; kernel TCP {} B/conn",
        figures.transport.name(),
        figures.workers,
        figures.source_addresses,
        figures.connections,
        figures.connect_per_s,
        figures.reconnect_per_s,
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
    fn growth_is_spread_over_the_connections() {
        assert_eq!(per_connection(1_000, 9_000, 1_000.0), 8.0);
        assert_eq!(per_connection(9_000, 1_000, 1_000.0), -8.0);
    }

    #[test]
    fn connections_split_evenly_over_the_workers_the_first_ones_larger() {
        assert_eq!(shares(6, 2), [3, 3]);
        assert_eq!(shares(7, 3), [3, 2, 2]);
        assert_eq!(shares(12_000, 2), [6_000, 6_000]);
        assert_eq!(shares(18_001, 3), [6_001, 6_000, 6_000]);
        assert_eq!(shares(5, 1), [5]);
        for (n, w) in [(1, 1), (10, 4), (17_999, 2), (100_000, 12)] {
            let split = shares(n, w);
            assert_eq!(split.len(), w);
            assert_eq!(split.iter().sum::<usize>(), n);
            let (least, most) = (split.iter().min().unwrap(), split.iter().max().unwrap());
            assert!(most - least <= 1, "{split:?}");
        }
    }

    #[test]
    fn each_worker_holds_at_most_9000() {
        assert!(check_sizes(9_000, 1).is_ok());
        assert!(check_sizes(18_000, 2).is_ok());
        assert!(check_sizes(6, 2).is_ok());
        let error = check_sizes(9_001, 1).unwrap_err().to_string();
        assert!(error.contains("use --workers 2"), "{error}");
        let error = check_sizes(20_000, 2).unwrap_err().to_string();
        assert!(error.contains("use --workers 3"), "{error}");
        assert!(check_sizes(0, 1).is_err());
        assert!(check_sizes(1, 2).is_err());
        assert!(check_sizes(10, 0).is_err());
        assert!(check_sizes(300_000, 255).is_err());
    }

    #[test]
    fn worker_reports_read_back_what_they_print() {
        for report in [
            Report::Ready,
            Report::Opened(250),
            Report::Open {
                connections: 6_000,
                source_addresses: 6_000,
            },
            Report::Held { alive: 5, of: 6 },
        ] {
            assert_eq!(Report::parse(&report.line()).unwrap(), report);
        }
        assert_eq!(
            Report::parse("open 3 0\n").unwrap(),
            Report::Open {
                connections: 3,
                source_addresses: 0
            }
        );
        assert!(Report::parse("").is_err());
        assert!(Report::parse("held 3").is_err());
        assert!(Report::parse("open three 0").is_err());
        assert!(Report::parse("opened -1").is_err());
        assert!(Report::parse("Error: connection refused").is_err());
    }
}
