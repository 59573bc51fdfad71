//! What the bench reads from /proc on this machine: a server process's CPU
//! time, whole and per thread, and how the machine's CPUs spent a run (busy,
//! idle, or taken by the host).

use std::collections::BTreeMap;

use serde::Serialize;

/// Clock ticks per second of /proc/PID/stat (`USER_HZ`, 100 on Linux).
pub(crate) const TICKS_PER_S: f64 = 100.0;

/// Returns `ticks` of CPU time spread over `messages`, in microseconds each.
pub(crate) fn micros_per_message(ticks: u64, messages: u64) -> f64 {
    ticks as f64 / TICKS_PER_S * 1e6 / messages.max(1) as f64
}

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

/// CPU ticks of a process's threads so far, by thread id: each thread's name
/// (the kernel's `comm`, at most 15 bytes) and ticks.
pub(crate) type ThreadTicks = BTreeMap<u32, (String, u64)>;

/// Reads [`ThreadTicks`] of process `pid`; `None` when it cannot be read (no
/// such process, or not on this machine). A thread that ends meanwhile is
/// left out.
pub(crate) fn thread_ticks(pid: u32) -> Option<ThreadTicks> {
    let mut ticks = ThreadTicks::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else {
            continue;
        };
        let path = task.path();
        let Some(tid) = path
            .file_name()
            .and_then(|name| name.to_str()?.parse().ok())
        else {
            continue;
        };
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        if let Some(used) = stat_cpu_ticks(&stat) {
            ticks.insert(tid, (comm.trim_end().to_owned(), used));
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

/// Returns the CPU each group of threads of one name used between `before`
/// and `after`, per message of `messages` and in cores over `seconds`, the
/// busiest first; groups that used none are left out. Each thread counts
/// what it used since `before` (from 0 when it is new); a thread that ended
/// meanwhile is not counted (tokio's blocking threads come and go under the
/// workers' name).
pub(crate) fn thread_cpu(
    before: &ThreadTicks,
    after: &ThreadTicks,
    messages: u64,
    seconds: f64,
) -> Vec<ThreadCpu> {
    let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
    for (tid, (name, ticks)) in after {
        let earlier = before
            .get(tid)
            .filter(|(was, _)| was == name)
            .map_or(0, |&(_, ticks)| ticks);
        *by_name.entry(name).or_default() += ticks.saturating_sub(earlier);
    }
    let mut used: Vec<(&str, u64)> = by_name.into_iter().filter(|&(_, t)| t > 0).collect();
    used.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    used.into_iter()
        .map(|(name, ticks)| ThreadCpu {
            threads: name.to_owned(),
            micros_per_message: micros_per_message(ticks, messages),
            cores: ticks as f64 / TICKS_PER_S / seconds,
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

/// The machine's CPU time so far, over all its CPUs, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MachineTicks {
    /// Running anything: user, nice, system, interrupts.
    busy: u64,
    /// Idle, waiting for I/O included.
    idle: u64,
    /// Taken by the hypervisor for other guests while this one had work
    /// (`steal`).
    stolen: u64,
}

/// Reads [`MachineTicks`] from /proc/stat; `None` where there is none.
pub(crate) fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Returns [`MachineTicks`] from the text of /proc/stat: its first line,
/// `cpu  user nice system idle iowait irq softirq steal ...` (guest time is
/// counted in user already).
fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let mut fields = stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let mut next = || fields.next()?.parse::<u64>().ok();
    let (user, nice, system, idle, iowait, irq, softirq) = (
        next()?,
        next()?,
        next()?,
        next()?,
        next()?,
        next()?,
        next()?,
    );
    Some(MachineTicks {
        busy: user + nice + system + irq + softirq,
        idle: idle + iowait,
        // Kernels before 2.6.11 have no steal column.
        stolen: next().unwrap_or(0),
    })
}

/// How the machine's CPUs spent a run, in percent of their time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct MachineCpu {
    /// Running anything: the server, the bench, the kernel, other processes.
    pub(crate) busy_percent: f64,
    /// Idle.
    pub(crate) idle_percent: f64,
    /// Taken by the host for other guests: on a shared virtual machine, the
    /// CPU this run wanted and did not get.
    pub(crate) stolen_percent: f64,
}

/// Returns how the CPUs spent the time between `before` and `after`; `None`
/// when no tick passed.
pub(crate) fn machine_cpu(before: MachineTicks, after: MachineTicks) -> Option<MachineCpu> {
    let busy = after.busy.saturating_sub(before.busy) as f64;
    let idle = after.idle.saturating_sub(before.idle) as f64;
    let stolen = after.stolen.saturating_sub(before.stolen) as f64;
    let total = busy + idle + stolen;
    (total > 0.0).then(|| MachineCpu {
        busy_percent: 100.0 * busy / total,
        idle_percent: 100.0 * idle / total,
        stolen_percent: 100.0 * stolen / total,
    })
}

/// Returns the line of the report for `machine`, with the bench's own CPU
/// per message when known.
pub(crate) fn machine_line(machine: &MachineCpu, bench_micros: Option<f64>) -> String {
    let mut line = format!(
        "{:.0} % busy, {:.0} % idle, {:.0} % taken by the host (steal)",
        machine.busy_percent, machine.idle_percent, machine.stolen_percent
    );
    if let Some(micros) = bench_micros {
        line.push_str(&format!("; the bench itself {micros:.1} µs a message"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(stat_cpu_ticks(stat), Some(300));
    }

    fn ticks(threads: &[(u32, &str, u64)]) -> ThreadTicks {
        threads
            .iter()
            .map(|&(tid, name, used)| (tid, (name.to_owned(), used)))
            .collect()
    }

    #[test]
    fn thread_cpu_is_per_group_and_message_busiest_first() {
        let before = ticks(&[
            (1, "tokio-rt-worker", 60),
            (2, "tokio-rt-worker", 40),
            (3, "confab-writer", 50),
            (4, "idle", 7),
            // A blocking thread under the workers' name, gone by the end.
            (5, "tokio-rt-worker", 900),
        ]);
        let after = ticks(&[
            (1, "tokio-rt-worker", 160),
            (2, "tokio-rt-worker", 140),
            (3, "confab-writer", 450),
            (4, "idle", 7),
            (6, "confab-publish", 20),
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
        assert_eq!(cpu[1].micros_per_message, 200.0);
        assert_eq!(cpu[2].micros_per_message, 20.0);
        assert_eq!(
            cpu_line(&cpu[2..]),
            "20.0 µs a message: confab-publish 20.0 µs (0.10 cores)"
        );
    }

    /// A thread id reused by a new thread of another name counts from 0.
    #[test]
    fn a_reused_thread_id_counts_from_zero() {
        let before = ticks(&[(7, "tokio-rt-worker", 500)]);
        let after = ticks(&[(7, "confab-publish", 30)]);
        let cpu = thread_cpu(&before, &after, 100, 1.0);
        assert_eq!(cpu.len(), 1);
        assert_eq!(cpu[0].threads, "confab-publish");
        assert_eq!(cpu[0].micros_per_message, 3_000.0);
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
        assert!(
            ticks.values().any(|(name, _)| name == "bench-probe"),
            "{ticks:?}"
        );
        drop(stop);
        worker.join().unwrap();
    }

    #[test]
    fn machine_ticks_are_read_from_the_first_line_of_proc_stat() {
        let stat = "cpu  100 5 20 300 10 1 4 60 0 0\ncpu0 50 2 10 150 5 0 2 30 0 0\nintr 1\n";
        assert_eq!(
            parse_machine_ticks(stat),
            Some(MachineTicks {
                busy: 130,
                idle: 310,
                stolen: 60
            })
        );
        assert_eq!(parse_machine_ticks("intr 1\n"), None);
        assert_eq!(parse_machine_ticks("cpu  1 2 x\n"), None);
    }

    #[test]
    fn machine_cpu_is_in_percent_of_the_time_between_two_readings() {
        let before = MachineTicks {
            busy: 1_000,
            idle: 500,
            stolen: 10,
        };
        let after = MachineTicks {
            busy: 1_170,
            idle: 520,
            stolen: 20,
        };
        let cpu = machine_cpu(before, after).unwrap();
        assert_eq!(
            (cpu.busy_percent, cpu.idle_percent, cpu.stolen_percent),
            (85.0, 10.0, 5.0)
        );
        assert_eq!(
            machine_line(&cpu, Some(27.24)),
            "85 % busy, 10 % idle, 5 % taken by the host (steal); the bench itself 27.2 µs a message"
        );
        assert_eq!(machine_cpu(after, after), None);
    }

    /// This machine's /proc/stat is read (every Linux has one).
    #[test]
    fn this_machine_is_read() {
        let ticks = machine_ticks().unwrap();
        assert!(ticks.busy + ticks.idle > 0, "{ticks:?}");
    }
}
