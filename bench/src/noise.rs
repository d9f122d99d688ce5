//! How much CPU other processes took while a measurement ran.
//!
//! The switches, this tool's threads and everything else on the host share the same cores; a
//! compiler running next door halves a switch's figures. Every measurement records the CPU time
//! the host spent outside this tool and the switch under test, in cores, so that a noisy figure
//! can be recognised as such instead of being mistaken for a property of the switch.

use std::fs;
use std::time::{Duration, Instant};

use crate::switch;

/// Above this many cores of foreign CPU use, a figure is marked as noisy.
pub(crate) const NOISY_CORES: f64 = 0.2;

/// CPU counters at one moment.
#[derive(Debug)]
pub(crate) struct CpuSnapshot {
    at: Instant,
    busy: Option<Duration>,
    own: Option<Duration>,
    switch: Option<Duration>,
}

impl CpuSnapshot {
    /// Reads the counters of the whole host, of this process and of the switch `switch_pid`.
    pub(crate) fn take(switch_pid: Option<libc::pid_t>) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            busy: host_busy(),
            own: switch::cpu_time(std::process::id() as libc::pid_t),
            switch: switch_pid.and_then(switch::cpu_time),
        }
    }

    /// Cores' worth of CPU used between `self` and `later` by neither this process nor the
    /// switch.
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
        let switch = delta(self.switch, later.switch).unwrap_or(0.0);
        Some(((busy - own - switch) / wall).max(0.0))
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
