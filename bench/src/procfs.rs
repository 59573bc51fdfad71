//! What the bench reads of a server process on this machine from /proc: its
//! CPU time, whole and per thread.

use std::collections::BTreeMap;

use serde::Serialize;

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux).
pub(crate) const TICKS_PER_S: f64 = 100.0;

/// Returns a process's user plus system CPU time in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_ticks(&stat)
}

/// Returns `utime + stime` from the text of /proc/PID/stat (fields 14 and 15;
/// the command name in parentheses may hold spaces, so count after its `)`).
pub(crate) fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks of a process's threads so far, summed by thread name (the
/// kernel's `comm`, at most 15 bytes: the tokio workers are one entry).
pub(crate) type ThreadTicks = BTreeMap<String, u64>;

/// Reads [`ThreadTicks`] of process `pid`; `None` when it cannot be read (no
/// such process, or not on this machine). A thread that ends meanwhile is
/// left out.
pub(crate) fn thread_ticks(pid: u32) -> Option<ThreadTicks> {
    let mut ticks = ThreadTicks::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if let Some(used) = stat_cpu_ticks(&stat) {
            *ticks.entry(comm.trim_end().to_owned()).or_default() += used;
        }
    }
    Some(ticks)
}

/// The CPU a group of a server's threads of one name used during a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ThreadCpu {
    /// The threads' name.
    pub(crate) threads: String,
    /// CPU time per message, in microseconds.
    pub(crate) micros_per_message: f64,
    /// Cores kept busy on average (1.0: one core all the time).
    pub(crate) cores: f64,
}

/// Returns the CPU each group of threads used between `before` and `after`
/// (threads new since `before` count from 0), per message of `messages` and
/// in cores over `seconds`, the busiest first; groups that used none are left
/// out.
pub(crate) fn thread_cpu(
    before: &ThreadTicks,
    after: &ThreadTicks,
    messages: u64,
    seconds: f64,
) -> Vec<ThreadCpu> {
    let mut used: Vec<(&String, u64)> = after
        .iter()
        .map(|(name, &ticks)| {
            let earlier = before.get(name).copied().unwrap_or(0);
            (name, ticks.saturating_sub(earlier))
        })
        .filter(|&(_, ticks)| ticks > 0)
        .collect();
    used.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    used.into_iter()
        .map(|(name, ticks)| {
            let cpu_seconds = ticks as f64 / TICKS_PER_S;
            ThreadCpu {
                threads: name.clone(),
                micros_per_message: cpu_seconds * 1e6 / messages.max(1) as f64,
                cores: cpu_seconds / seconds,
            }
        })
        .collect()
}

/// Returns the line of the report for `cpu`: the total per message, then
/// each group's share.
pub(crate) fn cpu_line(cpu: &[ThreadCpu]) -> String {
    let total: f64 = cpu.iter().map(|group| group.micros_per_message).sum();
    let groups: Vec<String> = cpu
        .iter()
        .map(|group| {
            format!(
                "{} {:.1} µs ({:.2} cores)",
                group.threads, group.micros_per_message, group.cores
            )
        })
        .collect();
    format!("{total:.1} µs a message: {}", groups.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn thread_cpu_is_per_group_and_message_busiest_first() {
        let before = ThreadTicks::from([
            ("tokio-rt-worker".to_owned(), 100),
            ("confab-writer".to_owned(), 50),
            ("idle".to_owned(), 7),
        ]);
        let after = ThreadTicks::from([
            ("tokio-rt-worker".to_owned(), 300),
            ("confab-writer".to_owned(), 450),
            ("idle".to_owned(), 7),
            ("confab-publish".to_owned(), 20),
        ]);
        let cpu = thread_cpu(&before, &after, 10_000, 2.0);
        let names: Vec<&str> = cpu.iter().map(|group| group.threads.as_str()).collect();
        assert_eq!(
            names,
            ["confab-writer", "tokio-rt-worker", "confab-publish"]
        );
        // 400 ticks = 4 s of CPU over 10,000 messages and 2 s.
        assert_eq!(cpu[0].micros_per_message, 400.0);
        assert_eq!(cpu[0].cores, 2.0);
        assert_eq!(cpu[2].micros_per_message, 20.0);
        assert_eq!(
            cpu_line(&cpu[2..]),
            "20.0 µs a message: confab-publish 20.0 µs (0.10 cores)"
        );
    }

    /// This process's own threads are read, named as the kernel names them.
    #[test]
    fn the_threads_of_a_live_process_are_read() {
        // The thread names itself as it starts: wait until it runs.
        let (started, running) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("bench-probe".to_owned())
            .spawn(move || {
                started.send(()).unwrap();
                let _ = stopped.recv();
            })
            .unwrap();
        running.recv().unwrap();
        let ticks = thread_ticks(std::process::id()).unwrap();
        assert!(ticks.contains_key("bench-probe"), "{ticks:?}");
        drop(stop);
        worker.join().unwrap();
    }
}
