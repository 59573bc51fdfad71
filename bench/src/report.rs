//! What every run leaves behind: a JSON result per run and a line in a Markdown
//! report, both under `--out`, so that numbers can be compared across machines
//! and versions.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

/// The percentiles every latency figure reports, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

impl Percentiles {
    /// Summarises a histogram of microseconds.
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    /// Returns the one-line form the scenarios print.
    pub(crate) fn line(&self) -> String {
        format!(
            "p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  max {:>8.2} ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Returns an empty latency histogram: 1 µs to 60 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts: this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Merges per-task histograms into one.
///
/// # Errors
///
/// Fails when a histogram holds values outside the bounds of the first.
pub(crate) fn merge(
    parts: impl IntoIterator<Item = Histogram<u64>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut total = histogram();
    for part in parts {
        total.add(&part)?;
    }
    Ok(total)
}

/// Returns microseconds as milliseconds.
pub(crate) fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The machine a run came from.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) memory_kib: Option<u64>,
    pub(crate) kernel: Option<String>,
    /// The 1, 5 and 15 minute load averages when the run ended.
    pub(crate) load_average: Option<String>,
}

impl Machine {
    /// Reads the machine's cores, memory and kernel release.
    pub(crate) fn current() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_kib: kib_field(&meminfo, "MemTotal:"),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|release| release.trim().to_owned()),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|text| load_average(&text)),
        }
    }
}

/// Returns the three load averages of /proc/loadavg's text.
pub(crate) fn load_average(text: &str) -> String {
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the value of a `Name:   1234 kB` line of a /proc file.
pub(crate) fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// One run of one scenario, as written to `<scenario>-<unix ms>.json`.
#[derive(Debug, Serialize)]
pub(crate) struct RunResult {
    pub(crate) scenario: &'static str,
    pub(crate) confab_version: &'static str,
    /// Milliseconds since the Unix epoch at the end of the run.
    pub(crate) finished_at_ms: u128,
    pub(crate) machine: Machine,
    /// The `--server` URLs: one server, or the gateways of one cluster.
    pub(crate) servers: Vec<String>,
    pub(crate) parameters: serde_json::Value,
    pub(crate) figures: serde_json::Value,
}

impl RunResult {
    /// Builds a result stamped with this machine and version.
    ///
    /// # Errors
    ///
    /// Fails when the parameters or figures cannot be serialised.
    pub(crate) fn new(
        scenario: &'static str,
        parameters: &impl Serialize,
        figures: &impl Serialize,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            scenario,
            confab_version: env!("CARGO_PKG_VERSION"),
            finished_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
            machine: Machine::current(),
            servers: Vec::new(),
            parameters: serde_json::to_value(parameters)?,
            figures: serde_json::to_value(figures)?,
        })
    }

    /// Records the servers the run drove.
    pub(crate) fn with_servers(mut self, servers: &crate::client::Servers) -> Self {
        self.servers = servers.urls().to_vec();
        self
    }

    /// Writes the JSON result into `dir`, redraws the charts of every run in
    /// `dir` ([`crate::suite`]), and appends a section to `dir/report.md` that
    /// links this scenario's chart; returns the JSON file's path.
    ///
    /// # Errors
    ///
    /// Fails when `dir` cannot be created or written.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}-{}.json", self.scenario, self.finished_at_ms));
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")?;
        // A chart that cannot be drawn does not cost the run its result.
        let drawn = crate::suite::load(dir)
            .and_then(|runs| crate::suite::draw(dir, &runs))
            .unwrap_or_else(|error| {
                eprintln!("charts not drawn: {error:#}");
                Vec::new()
            });
        let mut section = self.markdown(&path);
        for chart in drawn {
            if chart.starts_with(self.scenario) {
                section.push_str(&format!("\n![{chart}]({chart})\n"));
            }
        }
        let mut report = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("report.md"))?;
        report.write_all(section.as_bytes())?;
        Ok(path)
    }

    /// Returns this run's section of the Markdown report.
    fn markdown(&self, json: &Path) -> String {
        let machine = &self.machine;
        let mut text = format!(
            "\n## {} ({} ms since epoch)\n\nconfab {}; {} cores, {} MiB, kernel {}; result: `{}`\n\n",
            self.scenario,
            self.finished_at_ms,
            self.confab_version,
            machine.cores,
            machine.memory_kib.map_or(0, |kib| kib / 1024),
            machine.kernel.as_deref().unwrap_or("unknown"),
            json.file_name().unwrap_or_default().to_string_lossy(),
        );
        if !self.servers.is_empty() {
            text.push_str(&format!("servers: {}\n\n", self.servers.join(", ")));
        }
        text.push_str("| parameter | value |\n|---|---|\n");
        push_rows(&mut text, "", &self.parameters);
        text.push_str("\n| figure | value |\n|---|---|\n");
        push_rows(&mut text, "", &self.figures);
        text
    }
}

/// Appends one table row per leaf of `value`, nested keys (and the indexes of
/// array items) joined with dots.
fn push_rows(text: &mut String, prefix: &str, value: &serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                push_rows(text, &name, field);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                push_rows(text, &format!("{prefix}.{i}"), item);
            }
        }
        serde_json::Value::Number(number) => match number.as_f64() {
            Some(float) if !number.is_i64() && !number.is_u64() => {
                text.push_str(&format!("| {prefix} | {float:.2} |\n"));
            }
            _ => text.push_str(&format!("| {prefix} | {number} |\n")),
        },
        other => text.push_str(&format!("| {prefix} | {other} |\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_sample_and_the_extremes() {
        let mut fast = histogram();
        let mut slow = histogram();
        for micros in 1..=900 {
            fast.record(micros).unwrap();
        }
        for micros in 0..100 {
            slow.record(50_000 + micros).unwrap();
        }
        let merged = merge([fast, slow]).unwrap();
        let summary = Percentiles::of(&merged);
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 0.5).abs() < 0.01, "{summary:?}");
        assert!(summary.p99_ms > 49.0, "{summary:?}");
        assert!((summary.max_ms - 50.1).abs() < 0.1, "{summary:?}");
    }

    #[test]
    fn percentiles_print_in_milliseconds_with_two_decimals() {
        let mut one = histogram();
        one.record(1_500).unwrap();
        let line = Percentiles::of(&one).line();
        assert!(line.starts_with("p50     1.50 ms"), "{line}");
        assert!(line.ends_with("max     1.50 ms"), "{line}");
    }

    #[test]
    fn the_load_average_is_the_first_three_fields() {
        assert_eq!(
            load_average("1.42 2.72 4.08 5/192 2042\n"),
            "1.42 2.72 4.08"
        );
    }

    #[test]
    fn kib_fields_are_read_from_proc_style_text() {
        let text = "Name:\tconfab\nVmRSS:\t   12345 kB\n";
        assert_eq!(kib_field(text, "VmRSS:"), Some(12_345));
        assert_eq!(kib_field(text, "VmHWM:"), None);
    }

    #[test]
    fn a_result_has_the_agreed_shape_and_a_report_section() {
        let dir = tempfile::tempdir().unwrap();
        let result = RunResult::new(
            "history",
            &serde_json::json!({ "clients": 2 }),
            &serde_json::json!({ "pages_per_s": 12.5, "latency": { "count": 3 } }),
        )
        .unwrap()
        .with_servers(
            &crate::client::Servers::new(vec!["http://a:1".into(), "http://b:2".into()]).unwrap(),
        );
        let path = result.write(dir.path()).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for key in [
            "scenario",
            "confab_version",
            "machine",
            "parameters",
            "figures",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["scenario"], "history");
        assert_eq!(
            json["servers"],
            serde_json::json!(["http://a:1", "http://b:2"])
        );
        assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
        let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(report.contains("## history"), "{report}");
        assert!(
            report.contains("servers: http://a:1, http://b:2"),
            "{report}"
        );
        assert!(report.contains("| clients | 2 |"), "{report}");
        assert!(report.contains("| pages_per_s | 12.50 |"), "{report}");
        assert!(report.contains("| latency.count | 3 |"), "{report}");
        assert!(!report.contains(".png"), "no chart for history: {report}");
    }

    #[test]
    fn a_one_to_one_run_links_the_latency_chart() {
        let dir = tempfile::tempdir().unwrap();
        let figures = serde_json::json!({
            "delivered_latency": { "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0 },
            "server_cpu": [{ "threads": "confab-writer", "micros_per_message": 30.5 }],
        });
        RunResult::new("one-to-one", &serde_json::json!({ "rate": 100 }), &figures)
            .unwrap()
            .write(dir.path())
            .unwrap();
        let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        // An array's items are rows of their own, by index.
        assert!(
            report.contains("| server_cpu.0.threads | \"confab-writer\" |"),
            "{report}"
        );
        assert!(
            report.contains("| server_cpu.0.micros_per_message | 30.50 |"),
            "{report}"
        );
        let link = format!("![{0}]({0})", crate::suite::LATENCY_PNG);
        assert!(report.contains(&link), "{report}");
        assert!(dir.path().join(crate::suite::LATENCY_PNG).exists());
    }
}
