//! Runs every `confab-bench` scenario at a tiny size against the real `confab`
//! binary, so that the load generator never rots: each run must exit 0 and
//! leave a JSON result with its figures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use confab_tests::Server;
use serde_json::Value;

/// The external identity provider's secret the server trusts.
const SECRET: &str = "bench-test-secret";

/// How long one tiny run may take before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Returns `target/debug/confab-bench`, built beside `confab`.
fn bench_bin() -> Result<PathBuf> {
    let confab = confab_tests::server::confab_bin()?;
    let bin = confab.with_file_name("confab-bench");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: build all bins first",
        bin.display()
    );
    Ok(bin)
}

/// Starts a server that trusts [`SECRET`], with the per-user send limit raised
/// so that the runs measure the server rather than its abuse limits.
async fn server() -> Result<Server> {
    Server::start_with(&[
        "--external-jwt-secret",
        SECRET,
        "--send-per-second",
        "100000",
        "--send-burst",
        "100000",
    ])
    .await
}

/// Runs one scenario with `args` against `server` and returns its JSON result.
async fn run_bench(server: &Server, scenario: &str, args: &[&str]) -> Result<Value> {
    let out = tempfile::tempdir()?;
    let output = tokio::time::timeout(
        RUN_LIMIT,
        tokio::process::Command::new(bench_bin()?)
            .arg("--server")
            .arg(server.url())
            .arg("--out")
            .arg(out.path())
            .arg(scenario)
            .args(args)
            .env("CONFAB_EXTERNAL_JWT_SECRET", SECRET)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("confab-bench did not finish in time")??;
    anyhow::ensure!(
        output.status.success(),
        "confab-bench {scenario} failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    let result = read_result(out.path(), scenario)?;
    let report = std::fs::read_to_string(out.path().join("report.md"))?;
    anyhow::ensure!(
        report.contains(&format!("## {scenario}")),
        "report: {report}"
    );
    Ok(result)
}

/// Reads the one `<scenario>-*.json` in `dir` and checks the common fields.
fn read_result(dir: &Path, scenario: &str) -> Result<Value> {
    let mut results = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"));
    let path = results.next().context("no JSON result written")?;
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(result["scenario"], scenario);
    assert!(
        result["machine"]["cores"].as_u64().unwrap_or(0) >= 1,
        "{result}"
    );
    assert!(result["confab_version"].is_string(), "{result}");
    assert!(result["parameters"].is_object(), "{result}");
    assert!(result["figures"].is_object(), "{result}");
    Ok(result)
}

/// Returns the id of the `confab serve` process that uses `data_dir`.
fn server_pid(data_dir: &Path) -> Option<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&needle)
            .then_some(pid)
    })
}

/// Runs `one-to-one` over `transport` (2 pairs, 20 msg/s, 1 s) against a fresh
/// server and checks that it delivered every scheduled message and reports both
/// latencies.
async fn one_to_one(transport: &str, extra: &[&str]) -> Result<(Server, Value)> {
    one_to_one_on(server().await?, transport, extra).await
}

/// As [`one_to_one`], against `server`.
async fn one_to_one_on(server: Server, transport: &str, extra: &[&str]) -> Result<(Server, Value)> {
    let mut args = vec![
        "--pairs",
        "2",
        "--rate",
        "20",
        "--seconds",
        "1",
        "--transport",
        transport,
    ];
    args.extend_from_slice(extra);
    let result = run_bench(&server, "one-to-one", &args).await?;
    assert_eq!(result["parameters"]["transport"], transport, "{result}");
    let figures = &result["figures"];
    assert_eq!(figures["delivered"], 20, "{result}");
    assert!(
        figures["delivered_latency"]["p99_ms"].as_f64().is_some(),
        "{result}"
    );
    assert!(figures["sent"]["max_ms"].as_f64().is_some(), "{result}");
    Ok((server, result))
}

/// Returns the value of the unlabelled metric `name` in a /metrics text.
fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Pins that `one-to-one` delivers every scheduled message and reports both
/// latencies, and with `--server-pid` the server's CPU per group of threads.
#[tokio::test]
async fn one_to_one_reports_latency_percentiles() -> Result<()> {
    let server = server().await?;
    let pid = server_pid(&server.data_dir())
        .context("the server's process")?
        .to_string();
    let (_server, result) = one_to_one_on(server, "grpc", &["--server-pid", &pid]).await?;
    let groups = result["figures"]["server_cpu"]
        .as_array()
        .with_context(|| format!("no server_cpu in {result}"))?;
    for group in groups {
        assert!(group["threads"].is_string(), "{result}");
        assert!(
            group["micros_per_message"]
                .as_f64()
                .is_some_and(|micros| micros > 0.0),
            "{result}"
        );
    }
    Ok(())
}

/// Pins that `one-to-one --transport ws --receipts` delivers every scheduled
/// message over WebSockets, reports both latencies, and that the receivers'
/// delivered receipts reach the server's writer: each moves a watermark and
/// writes a receipt event for the sender, beside the 2 events of each message.
#[tokio::test]
async fn one_to_one_over_websockets_with_receipts_delivers_everything() -> Result<()> {
    let (server, result) = one_to_one("ws", &["--receipts"]).await?;
    assert_eq!(result["parameters"]["receipts"], true, "{result}");
    let addr = server.addr();
    confab_tests::eventually("receipt events beside the messages' 40", || async move {
        let metrics = confab_tests::http::get(addr, "/metrics").await?.body;
        Ok(metric(&metrics, "confab_message_events_total").is_some_and(|events| events > 40.0))
    })
    .await
}

/// Pins that `group` reports the time to the last member of each message.
#[tokio::test]
async fn group_reports_fan_out_time() -> Result<()> {
    group("grpc").await
}

/// Pins that `group --transport ws` reaches every member over WebSockets.
#[tokio::test]
async fn group_over_websockets_reports_fan_out_time() -> Result<()> {
    group("ws").await
}

/// Runs `group` over `transport` (4 members, 3 messages) against a fresh
/// server and checks that every message reached every other member.
async fn group(transport: &str) -> Result<()> {
    let server = server().await?;
    let args = [
        "--members",
        "4",
        "--messages",
        "3",
        "--transport",
        transport,
    ];
    let result = run_bench(&server, "group", &args).await?;
    assert_eq!(result["parameters"]["transport"], transport, "{result}");
    let figures = &result["figures"];
    assert_eq!(figures["receivers"], 3, "{result}");
    assert_eq!(figures["send_to_last_member"]["count"], 3, "{result}");
    Ok(())
}

/// Pins that `history` fills its conversation and reads pages of it.
#[tokio::test]
async fn history_reports_pages_per_second() -> Result<()> {
    let server = server().await?;
    let result = run_bench(
        &server,
        "history",
        &["--messages", "60", "--clients", "2", "--seconds", "1"],
    )
    .await?;
    let figures = &result["figures"];
    assert!(figures["pages"].as_u64().unwrap_or(0) > 0, "{result}");
    assert!(
        figures["pages_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{result}"
    );
    assert!(
        figures["page_latency"]["p50_ms"].as_f64().is_some(),
        "{result}"
    );
    Ok(())
}

/// Pins that after a reconnect storm every acknowledged message arrives.
#[tokio::test]
async fn reconnect_misses_nothing() -> Result<()> {
    let server = server().await?;
    let result = run_bench(
        &server,
        "reconnect",
        &[
            "--pairs", "3", "--rate", "30", "--warmup", "1", "--after", "1",
        ],
    )
    .await?;
    let figures = &result["figures"];
    assert!(
        figures["acknowledged"].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
    assert_eq!(figures["missed"], 0, "{result}");
    assert_eq!(figures["caught_up"]["count"], 3, "{result}");
    assert!(figures["all_caught_up_ms"].as_f64().is_some(), "{result}");
    Ok(())
}

/// Runs `connections` over `transport` from `workers` processes against a
/// fresh server and returns its figures, checked for what every run reports.
async fn connections(transport: &str, workers: usize, n: usize) -> Result<serde_json::Value> {
    let server = server().await?;
    let pid = server_pid(&server.data_dir()).context("server process not found")?;
    let (workers_arg, n_arg, pid_arg) = (workers.to_string(), n.to_string(), pid.to_string());
    let args = [
        "--transport",
        transport,
        "--workers",
        &workers_arg,
        "--connections",
        &n_arg,
        "--hold",
        "1",
        "--server-pid",
        &pid_arg,
    ];
    let result = run_bench(&server, "connections", &args).await?;
    let figures = result["figures"].clone();
    assert_eq!(figures["connections"], n, "{result}");
    assert_eq!(figures["transport"], transport, "{result}");
    assert_eq!(figures["workers"], workers, "{result}");
    for rate in ["connect_per_s", "reconnect_per_s"] {
        assert!(figures[rate].as_f64().unwrap_or(0.0) > 0.0, "{result}");
    }
    assert!(
        figures["server_rss_kib_after"].as_u64().is_some(),
        "{result}"
    );
    assert!(
        figures["server_bytes_per_connection"].as_f64().is_some(),
        "{result}"
    );
    Ok(figures)
}

/// Pins that `connections` holds its connections and reads the server's memory.
#[tokio::test]
async fn connections_report_memory_per_connection() -> Result<()> {
    connections("grpc", 1, 5).await?;
    Ok(())
}

/// Pins that `connections --transport ws --workers 2` holds its connections in
/// two worker processes, each connection from its own source address.
#[tokio::test]
async fn connections_over_websockets_from_two_workers() -> Result<()> {
    let figures = connections("ws", 2, 6).await?;
    // The server listens on 127.0.0.1: every connection has its own source.
    assert_eq!(figures["source_addresses"], 6, "{figures}");
    Ok(())
}
