//! The runs of one suite, read back from the JSON results in one `--out`
//! directory: a Markdown table with one row per run, and the charts drawn
//! across runs (latency percentiles against offered load, server memory per
//! connection against connection count).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::Value;

use plotters::chart::SeriesLabelPosition;

use crate::plot::{Chart, Series};

/// File name of the one-to-one latency chart.
pub(crate) const LATENCY_PNG: &str = "one-to-one-latency.png";
/// File name of the connections memory chart.
pub(crate) const MEMORY_PNG: &str = "connections-memory.png";
/// File name of the suite's summary.
pub(crate) const SUMMARY_MD: &str = "summary.md";

/// Reads every run result in `dir`, oldest first (other JSON files are skipped).
///
/// # Errors
///
/// Fails when `dir` cannot be read.
pub(crate) fn load(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Ok(run) = serde_json::from_str::<Value>(&text)
            && run["scenario"].is_string()
            && run["figures"].is_object()
        {
            runs.push(run);
        }
    }
    runs.sort_by_key(|run| run["finished_at_ms"].as_u64().unwrap_or(0));
    Ok(runs)
}

fn of<'a>(runs: &'a [Value], scenario: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    runs.iter().filter(move |run| run["scenario"] == scenario)
}

fn number(value: &Value) -> Option<f64> {
    value.as_f64()
}

/// Returns the one-to-one chart: send→delivered latency against the offered
/// rate, one point per run: p50, p90 and p99 when the runs are all of one kind
/// (transport, with or without receipts), p50 and p99 of each kind when they
/// are not (two lines per kind); `None` without one-to-one runs.
pub(crate) fn latency_chart(runs: &[Value]) -> Option<Chart> {
    let mut kinds: Vec<String> = of(runs, "one-to-one").map(one_to_one_kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let several = kinds.len() > 1;
    let percentiles: &[(&str, &str)] = if several {
        &[("p50", "p50_ms"), ("p99", "p99_ms")]
    } else {
        &[("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")]
    };
    let mut series = Vec::new();
    for kind in &kinds {
        for (name, field) in percentiles {
            let name = format!("{name} send to delivered");
            series.push(Series {
                name: if several {
                    format!("{kind}: {name}")
                } else {
                    name
                },
                points: of(runs, "one-to-one")
                    .filter(|run| one_to_one_kind(run) == *kind)
                    .filter_map(|run| {
                        let rate = number(&run["parameters"]["rate"])?;
                        let ms = number(&run["figures"]["delivered_latency"][*field])?;
                        Some((rate, ms))
                    })
                    .collect(),
            });
        }
    }
    series.iter().any(|s| !s.points.is_empty()).then(|| Chart {
        title: "one-to-one: latency against offered load".into(),
        x_label: "offered load (messages/s)".into(),
        y_label: "latency (ms, log scale)".into(),
        series,
        log_y: true,
        legend: SeriesLabelPosition::UpperLeft,
    })
}

/// Returns the kind of a one-to-one run: its transport, and whether its
/// receivers sent a receipt per message.
fn one_to_one_kind(run: &Value) -> String {
    let transport = transport(run);
    if run["parameters"]["receipts"] == true {
        format!("{transport} + receipts")
    } else {
        transport.to_owned()
    }
}

/// Returns the transport of a run (`grpc` for runs from before `--transport`).
fn transport(run: &Value) -> &str {
    run["parameters"]["transport"]
        .as_str()
        .or_else(|| run["figures"]["transport"].as_str())
        .unwrap_or("grpc")
}

/// Returns the transports of the runs of `scenario`, sorted, each once.
fn transports<'a>(runs: &'a [Value], scenario: &'a str) -> Vec<&'a str> {
    let mut transports: Vec<&str> = of(runs, scenario).map(transport).collect();
    transports.sort_unstable();
    transports.dedup();
    transports
}

/// Returns the connections chart: server and kernel memory per idle connection
/// (KiB) against the number of connections, one pair of series per transport;
/// `None` without connections runs that read the server's memory.
pub(crate) fn memory_chart(runs: &[Value]) -> Option<Chart> {
    let transports = transports(runs, "connections");
    let per_connection = |transport_name: &str, field: &'static str| {
        of(runs, "connections")
            .filter(|run| transport(run) == transport_name)
            .filter_map(|run| {
                let connections = number(&run["figures"]["connections"])?;
                let bytes = number(&run["figures"][field])?;
                Some((connections, bytes / 1024.0))
            })
            .collect::<Vec<_>>()
    };
    let mut series = Vec::new();
    for name in &transports {
        series.push(Series {
            name: format!("{name}: server RSS"),
            points: per_connection(name, "server_bytes_per_connection"),
        });
    }
    let any_server = series.iter().any(|s| !s.points.is_empty());
    for name in &transports {
        series.push(Series {
            name: format!("{name}: kernel TCP (both ends)"),
            points: per_connection(name, "kernel_bytes_per_connection"),
        });
    }
    any_server.then(|| Chart {
        title: "connections: memory per idle connection".into(),
        x_label: "idle connections".into(),
        y_label: "KiB per connection".into(),
        series,
        log_y: false,
        legend: SeriesLabelPosition::UpperRight,
    })
}

/// Draws the charts the runs in `dir` allow; returns the file names drawn.
///
/// # Errors
///
/// Fails when a chart cannot be drawn or written.
pub(crate) fn draw(dir: &Path, runs: &[Value]) -> anyhow::Result<Vec<&'static str>> {
    let mut drawn = Vec::new();
    for (name, chart) in [
        (LATENCY_PNG, latency_chart(runs)),
        (MEMORY_PNG, memory_chart(runs)),
    ] {
        if let Some(chart) = chart {
            chart.draw(&dir.join(name))?;
            drawn.push(name);
        }
    }
    Ok(drawn)
}

/// Formats a number of milliseconds, or `-`.
fn ms(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".into(), |ms| format!("{ms:.2}"))
}

/// Formats a figure with no decimals (counts, rates, bytes), or `-`.
fn whole(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// Returns `; server CPU N µs/msg (busiest: name M)` for the `server_cpu` of
/// a one-to-one run, or nothing when it has none.
fn server_cpu(groups: &Value) -> String {
    let Some(groups) = groups.as_array().filter(|groups| !groups.is_empty()) else {
        return String::new();
    };
    let micros = |group: &Value| group["micros_per_message"].as_f64().unwrap_or(0.0);
    let total: f64 = groups.iter().map(micros).sum();
    // The groups are stored busiest first.
    let busiest = &groups[0];
    format!(
        "; server CPU {total:.0} µs/msg (busiest: {} {:.0})",
        busiest["threads"].as_str().unwrap_or("?"),
        micros(busiest)
    )
}

/// Returns `; machine N % busy, M % stolen` for the `machine` of a one-to-one
/// run, or nothing when it has none.
fn machine(machine: &Value) -> String {
    match (
        machine["busy_percent"].as_f64(),
        machine["stolen_percent"].as_f64(),
    ) {
        (Some(busy), Some(stolen)) => format!("; machine {busy:.0} % busy, {stolen:.0} % stolen"),
        _ => String::new(),
    }
}

/// Returns one row of the suite table: scenario, what was asked, what came out.
pub(crate) fn row(run: &Value) -> [String; 3] {
    let p = &run["parameters"];
    let f = &run["figures"];
    let scenario = run["scenario"].as_str().unwrap_or("?").to_owned();
    let (asked, measured) = match scenario.as_str() {
        "one-to-one" => (
            format!(
                "{} pairs over {}, {} msg/s offered, {} s{}",
                p["pairs"],
                transport(run),
                p["rate"],
                p["seconds"],
                if p["receipts"] == true {
                    ", a delivered receipt per message"
                } else {
                    ""
                }
            ),
            format!(
                "{} msg/s delivered; send→delivered p50 {} / p90 {} / p99 {} / max {} ms; send→sent p99 {} ms{}{}",
                whole(&f["delivered_per_s"]),
                ms(&f["delivered_latency"]["p50_ms"]),
                ms(&f["delivered_latency"]["p90_ms"]),
                ms(&f["delivered_latency"]["p99_ms"]),
                ms(&f["delivered_latency"]["max_ms"]),
                ms(&f["sent"]["p99_ms"]),
                server_cpu(&f["server_cpu"]),
                machine(&f["machine"]),
            ),
        ),
        "group" => (
            format!(
                "{} members over {}, {} messages",
                p["members"],
                transport(run),
                p["messages"]
            ),
            format!(
                "send→last member p50 {} / p99 {} / max {} ms; {} deliveries/s",
                ms(&f["send_to_last_member"]["p50_ms"]),
                ms(&f["send_to_last_member"]["p99_ms"]),
                ms(&f["send_to_last_member"]["max_ms"]),
                whole(&f["deliveries_per_s"]),
            ),
        ),
        "history" => (
            format!(
                "{} messages, {} readers, {} s",
                p["messages"], p["clients"], p["seconds"]
            ),
            format!(
                "{} pages/s of 50; page p50 {} / p99 {} ms; fill {} msg/s",
                whole(&f["pages_per_s"]),
                ms(&f["page_latency"]["p50_ms"]),
                ms(&f["page_latency"]["p99_ms"]),
                whole(&f["fill_messages_per_s"]),
            ),
        ),
        "reconnect" => (
            format!(
                "{} pairs, {} msg/s, all receivers drop",
                p["pairs"], p["rate"]
            ),
            format!(
                "all caught up in {} ms (per receiver p50 {} ms); {} acknowledged, {} missed, {} duplicates",
                ms(&f["all_caught_up_ms"]),
                ms(&f["caught_up"]["p50_ms"]),
                f["acknowledged"],
                f["missed"],
                f["duplicates"],
            ),
        ),
        "connections" => (
            format!(
                "{} idle {} connections{}, heartbeat {} s",
                p["connections"],
                transport(run),
                match f["workers"].as_u64() {
                    Some(workers) if workers > 1 => format!(" from {workers} processes"),
                    _ => String::new(),
                },
                p["heartbeat"]
            ),
            format!(
                "{} connects/s of new users, {} of known; server {} B/conn, kernel TCP {} B/conn; idle CPU {} %",
                whole(&f["connect_per_s"]),
                whole(&f["reconnect_per_s"]),
                whole(&f["server_bytes_per_connection"]),
                whole(&f["kernel_bytes_per_connection"]),
                f["server_idle_cpu_percent"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |cpu| format!("{cpu:.1}")),
            ),
        ),
        _ => (p.to_string(), f.to_string()),
    };
    [scenario, asked, measured]
}

/// Returns the suite table in Markdown.
pub(crate) fn table(runs: &[Value]) -> String {
    let mut text = String::from("| scenario | load | result |\n|---|---|---|\n");
    for run in runs {
        let [scenario, asked, measured] = row(run);
        text.push_str(&format!("| {scenario} | {asked} | {measured} |\n"));
    }
    text
}

/// Returns the machine line of the newest run: cores, memory, kernel, load.
pub(crate) fn machine_line(runs: &[Value]) -> String {
    let Some(run) = runs.last() else {
        return "no runs".into();
    };
    let machine = &run["machine"];
    let mut line = format!(
        "{} cores, {} GiB, Linux {}",
        machine["cores"],
        machine["memory_kib"].as_u64().map_or_else(
            || "?".into(),
            |kib| format!("{:.1}", kib as f64 / 1_048_576.0)
        ),
        machine["kernel"].as_str().unwrap_or("?"),
    );
    if let Some(load) = machine["load_average"].as_str() {
        line.push_str(&format!(", load average {load} at the end"));
    }
    line.push_str(&format!(
        "; confab {}",
        run["confab_version"].as_str().unwrap_or("?")
    ));
    line
}

/// Writes `dir/summary.md` (machine, table, charts) from the runs in `dir`;
/// returns its path.
///
/// # Errors
///
/// Fails when there is no run in `dir`, or a file cannot be written.
pub(crate) fn write(dir: &Path) -> anyhow::Result<PathBuf> {
    let runs = load(dir)?;
    anyhow::ensure!(!runs.is_empty(), "no results in {}", dir.display());
    let drawn = draw(dir, &runs)?;
    let mut text = format!(
        "# confab-bench suite\n\nMachine: {}.\n\n{}",
        machine_line(&runs),
        table(&runs)
    );
    for name in drawn {
        text.push_str(&format!("\n![{name}]({name})\n"));
    }
    let path = dir.join(SUMMARY_MD);
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The names of a chart's series, in order.
    fn series_names(chart: &Chart) -> Vec<&str> {
        chart.series.iter().map(|s| s.name.as_str()).collect()
    }

    fn one_to_one(at: u64, rate: u64, p50: f64, p99: f64) -> Value {
        json!({
            "scenario": "one-to-one",
            "finished_at_ms": at,
            "confab_version": "0.1.0",
            "machine": { "cores": 2, "memory_kib": 24_000_000u64, "kernel": "6.1.0", "load_average": "0.50 0.40 0.30" },
            "parameters": { "pairs": 50, "rate": rate, "seconds": 10 },
            "figures": {
                "delivered_per_s": rate as f64,
                "sent": { "p99_ms": 2.0 },
                "delivered_latency": { "p50_ms": p50, "p90_ms": (p50 + p99) / 2.0, "p99_ms": p99, "max_ms": p99 * 2.0 },
            },
        })
    }

    fn connections(at: u64, n: u64, bytes: f64) -> Value {
        json!({
            "scenario": "connections",
            "finished_at_ms": at,
            "parameters": { "connections": n, "heartbeat": 5 },
            "figures": { "connections": n, "connect_per_s": 900.0, "reconnect_per_s": 2000.0, "server_bytes_per_connection": bytes, "kernel_bytes_per_connection": null, "server_idle_cpu_percent": 1.5 },
        })
    }

    #[test]
    fn the_latency_chart_has_a_point_per_one_to_one_run() {
        let runs = [
            one_to_one(1, 500, 1.0, 3.0),
            connections(2, 1_000, 9_000.0),
            one_to_one(3, 2_000, 2.0, 8.0),
        ];
        let chart = latency_chart(&runs).unwrap();
        assert_eq!(chart.series.len(), 3);
        assert_eq!(chart.series[0].points, vec![(500.0, 1.0), (2_000.0, 2.0)]);
        assert_eq!(chart.series[2].points, vec![(500.0, 3.0), (2_000.0, 8.0)]);
        assert!(latency_chart(&runs[1..2]).is_none());
    }

    #[test]
    fn the_latency_chart_has_p50_and_p99_per_transport_when_runs_differ() {
        let mut over_ws = one_to_one(2, 500, 1.5, 4.0);
        over_ws["parameters"]["transport"] = json!("ws");
        let runs = [
            one_to_one(1, 500, 1.0, 3.0),
            over_ws.clone(),
            one_to_one(3, 2_000, 2.0, 8.0),
        ];
        let chart = latency_chart(&runs).unwrap();
        let names = series_names(&chart);
        assert_eq!(
            names,
            [
                "grpc: p50 send to delivered",
                "grpc: p99 send to delivered",
                "ws: p50 send to delivered",
                "ws: p99 send to delivered",
            ]
        );
        assert_eq!(chart.series[1].points, vec![(500.0, 3.0), (2_000.0, 8.0)]);
        assert_eq!(chart.series[2].points, vec![(500.0, 1.5)]);

        // Runs with receipts are a kind of their own.
        let mut with_receipts = over_ws.clone();
        with_receipts["parameters"]["receipts"] = json!(true);
        let runs = [runs[1].clone(), with_receipts];
        let chart = latency_chart(&runs).unwrap();
        let names = series_names(&chart);
        assert_eq!(
            names,
            [
                "ws: p50 send to delivered",
                "ws: p99 send to delivered",
                "ws + receipts: p50 send to delivered",
                "ws + receipts: p99 send to delivered",
            ]
        );
        let [_, asked, _] = row(&over_ws);
        assert_eq!(asked, "50 pairs over ws, 500 msg/s offered, 10 s");
        let [_, asked, _] = row(&runs[1]);
        assert_eq!(
            asked,
            "50 pairs over ws, 500 msg/s offered, 10 s, a delivered receipt per message"
        );
    }

    #[test]
    fn the_memory_chart_is_in_kib_per_connection_and_skips_missing_figures() {
        let runs = [
            connections(1, 1_000, 10_240.0),
            connections(2, 4_000, 8_192.0),
        ];
        let chart = memory_chart(&runs).unwrap();
        assert_eq!(
            chart.series[0].points,
            vec![(1_000.0, 10.0), (4_000.0, 8.0)]
        );
        assert!(chart.series[1].points.is_empty());
        assert!(memory_chart(&[one_to_one(1, 500, 1.0, 2.0)]).is_none());
    }

    /// A connections run of `--transport` and `--workers`.
    fn connections_over(at: u64, n: u64, bytes: f64, transport: &str, workers: u64) -> Value {
        let mut run = connections(at, n, bytes);
        run["parameters"]["transport"] = json!(transport);
        run["figures"]["transport"] = json!(transport);
        run["figures"]["workers"] = json!(workers);
        run["figures"]["kernel_bytes_per_connection"] = json!(1024.0);
        run
    }

    #[test]
    fn the_memory_chart_has_series_per_transport() {
        let runs = [
            connections(1, 1_000, 10_240.0),
            connections_over(2, 1_000, 5_120.0, "ws", 1),
            connections_over(3, 4_000, 8_192.0, "grpc", 1),
            connections_over(4, 12_000, 4_096.0, "ws", 2),
        ];
        let chart = memory_chart(&runs).unwrap();
        let names = series_names(&chart);
        assert_eq!(
            names,
            [
                "grpc: server RSS",
                "ws: server RSS",
                "grpc: kernel TCP (both ends)",
                "ws: kernel TCP (both ends)",
            ]
        );
        assert_eq!(
            chart.series[0].points,
            vec![(1_000.0, 10.0), (4_000.0, 8.0)]
        );
        assert_eq!(
            chart.series[1].points,
            vec![(1_000.0, 5.0), (12_000.0, 4.0)]
        );
        assert_eq!(chart.series[2].points, vec![(4_000.0, 1.0)]);
    }

    #[test]
    fn a_connections_row_names_its_transport_and_workers() {
        let [_, asked, _] = row(&connections(1, 1_000, 9_000.0));
        assert_eq!(asked, "1000 idle grpc connections, heartbeat 5 s");
        let [_, asked, _] = row(&connections_over(2, 1_000, 9_000.0, "ws", 1));
        assert_eq!(asked, "1000 idle ws connections, heartbeat 5 s");
        let [_, asked, _] = row(&connections_over(3, 12_000, 9_000.0, "ws", 2));
        assert_eq!(
            asked,
            "12000 idle ws connections from 2 processes, heartbeat 5 s"
        );
    }

    #[test]
    fn the_table_has_one_row_per_run_with_its_headline_figures() {
        let runs = [one_to_one(1, 500, 1.0, 3.0), connections(2, 1_000, 9_000.0)];
        let table = table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[2].starts_with("| one-to-one | 50 pairs over grpc, 500 msg/s offered"),
            "{table}"
        );
        assert!(
            lines[2].contains("p50 1.00 / p90 2.00 / p99 3.00 / max 6.00 ms"),
            "{table}"
        );
        assert!(
            lines[3].contains("server 9000 B/conn, kernel TCP - B/conn; idle CPU 1.5"),
            "{table}"
        );
    }

    #[test]
    fn a_one_to_one_row_names_the_server_cpu_when_measured() {
        let mut run = one_to_one(1, 500, 1.0, 3.0);
        assert!(!row(&run)[2].contains("server CPU"));
        run["figures"]["server_cpu"] = json!([
            { "threads": "confab-writer", "micros_per_message": 30.4, "cores": 0.3 },
            { "threads": "tokio-rt-worker", "micros_per_message": 20.0, "cores": 0.2 },
        ]);
        assert!(
            row(&run)[2].ends_with("; server CPU 50 µs/msg (busiest: confab-writer 30)"),
            "{}",
            row(&run)[2]
        );
    }

    #[test]
    fn a_one_to_one_row_names_the_machine_when_measured() {
        let mut run = one_to_one(1, 500, 1.0, 3.0);
        assert!(!row(&run)[2].contains("machine"));
        run["figures"]["machine"] =
            json!({ "busy_percent": 91.6, "idle_percent": 4.0, "stolen_percent": 4.4 });
        assert!(
            row(&run)[2].ends_with("; machine 92 % busy, 4 % stolen"),
            "{}",
            row(&run)[2]
        );
    }

    #[test]
    fn the_summary_reads_every_result_and_links_the_charts() {
        let dir = tempfile::tempdir().unwrap();
        for (i, run) in [
            one_to_one(3, 2_000, 2.0, 8.0),
            one_to_one(1, 500, 1.0, 3.0),
            connections(2, 1_000, 9_000.0),
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(dir.path().join(format!("run-{i}.json")), run.to_string()).unwrap();
        }
        std::fs::write(dir.path().join("other.json"), "{\"not\": \"a run\"}").unwrap();
        let path = write(dir.path()).unwrap();
        let summary = std::fs::read_to_string(path).unwrap();
        assert!(
            summary.contains("2 cores, 22.9 GiB, Linux 6.1.0, load average 0.50 0.40 0.30"),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("![{LATENCY_PNG}]({LATENCY_PNG})")),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("![{MEMORY_PNG}]({MEMORY_PNG})")),
            "{summary}"
        );
        // Oldest first.
        let first = summary.find("500 msg/s offered").unwrap();
        let last = summary.find("2000 msg/s offered").unwrap();
        assert!(first < last, "{summary}");
        assert!(dir.path().join(LATENCY_PNG).exists());
        assert!(dir.path().join(MEMORY_PNG).exists());
    }

    #[test]
    fn an_empty_directory_has_no_summary() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(dir.path()).is_err());
    }
}
