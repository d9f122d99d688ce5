//! How much CPU other processes took while a measurement ran.
//!
//! The switches, this tool's threads and everything else on the host share the same cores; a
//! compiler running next door halves a switch's figures. Every measurement records the CPU time
//! the host spent outside this tool, the programs it ran and waited for (iperf3, ping), and the
//! processes under test, in cores, so that a noisy figure can be recognised as such instead of
//! being mistaken for a property of the system under test.

use std::fs;
use std::time::{Duration, Instant};

use crate::process;

/// Above this many cores of foreign CPU use, a figure is marked as noisy.
pub(crate) const NOISY_CORES: f64 = 0.2;

/// CPU counters at one moment.
#[derive(Debug)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    busy: Option<Duration>,
    own: Option<Duration>,
    watched: Option<Duration>,
}

impl CpuSnapshot {
    /// Reads the counters of the whole host, of this process with the children it has waited
    /// for, and of the processes under test, `watched`.
    pub(crate) fn take(watched: &[libc::pid_t]) -> CpuSnapshot {
        let own = process::cpu_time(std::process::id() as libc::pid_t)
            .zip(process::reaped_children_cpu_time())
            .map(|(own, children)| own + children);
        let watched = watched.iter().map(|&pid| process::cpu_time(pid)).sum();
        CpuSnapshot { at: Instant::now(), busy: host_busy(), own, watched }
    }

    /// Cores' worth of CPU used between `self` and `later` by neither this process, nor its
    /// waited-for children, nor the processes under test.
    pub(crate) fn foreign_cores(&self, later: &CpuSnapshot) -> Option<f64> {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return None;
        }
        let delta = |before: Option<Duration>, after: Option<Duration>| {
            Some(after?.saturating_sub(before?).as_secs_f64())
        };
        let busy = delta(self.busy, later.busy)?;
        let own = delta(self.own, later.own)?;
        let watched = delta(self.watched, later.watched).unwrap_or(0.0);
        Some(((busy - own - watched) / wall).max(0.0))
    }
}

/// CPU time the host spent running anything (user, nice and system time, all CPUs).
fn host_busy() -> Option<Duration> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user, nice, system; idle and iowait are not busy; guest time is already in user.
    let busy = ticks.first()? + ticks.get(1)? + ticks.get(2)?;
    // SAFETY: sysconf(3) with a valid name has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|&t| t > 0)?;
    Some(Duration::from_nanos(busy * 1_000_000_000 / per_second))
}
