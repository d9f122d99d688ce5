//! Scratch directories and child processes: what both suites create, and how it goes away.
//!
//! Everything here acts only on what this tool made itself: a [`TempDir`] removes the directory
//! it created, a [`Daemon`] signals the child it spawned by that child's pid (which cannot be
//! reused while the child is unreaped), and [`run_bounded`] kills the command it started once
//! its time is up. Nothing is ever looked up or stopped by name.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a process may take to exit after SIGTERM before it gets SIGKILL.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Directories the system keeps administration programs in, searched after `$PATH` because a
/// non-login root shell often lacks them and `ip` and `tincd` live there.
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);
static NEXT_OUTPUT: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(label: &str) -> Result<TempDir> {
        let number = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir()
            .join(format!("umnet-bench.{}.{number}.{label}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A long-running child with its output in a log file; dropping it stops the child.
#[derive(Debug)]
pub(crate) struct Daemon {
    /// What it is, for messages: "umnet on host a".
    pub(crate) label: String,
    pub(crate) log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Spawns `command` with its standard output and error in `log`.
    pub(crate) fn spawn(label: String, command: &mut Command, log: &Path) -> Result<Daemon> {
        let child = spawn(command, log)?;
        Ok(Daemon { label, log: log.to_path_buf(), child })
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).unwrap_or(0)
    }

    /// An error saying the daemon is gone, with how it exited and the end of its log, if it is.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                bail!("{} exited ({status}){}", self.label, log_tail(&self.log))
            }
            Err(error) => bail!("{}: cannot check it: {error}", self.label),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// What a bounded command left behind.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// Standard error, else standard output, trimmed and cut to a few lines for messages.
    pub(crate) fn complaint(&self) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(4)..].join(" / ")
    }
}

/// Runs `command` to completion, killing it after `timeout` or when the user interrupts the run.
/// Its output goes through files named after `name` in `dir` (no pipe can fill up and stall
/// it), which are read back and removed.
pub(crate) fn run_bounded(
    command: &mut Command,
    dir: &Path,
    name: &str,
    timeout: Duration,
) -> Result<Finished> {
    let program = command.get_program().to_string_lossy().into_owned();
    let number = NEXT_OUTPUT.fetch_add(1, Ordering::Relaxed);
    let out_path = dir.join(format!("{name}.{number}.out"));
    let err_path = dir.join(format!("{name}.{number}.err"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {program}"))?;

    // Short commands (`ip`) finish within a millisecond or two, iperf3 within seconds: poll
    // often at first, then less.
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            break status;
        }
        if Instant::now() > deadline || crate::interrupted() {
            stop_child(&mut child);
            let why = if crate::interrupted() {
                "interrupted".to_string()
            } else {
                format!("timed out after {timeout:?}")
            };
            bail!("{program} {why}{}", log_tail(&err_path));
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };

    let read = |path: &Path| {
        let text = fs::read_to_string(path).unwrap_or_default();
        let _ = fs::remove_file(path);
        text
    };
    Ok(Finished { status, stdout: read(&out_path), stderr: read(&err_path) })
}

/// Runs `command` bounded by `timeout` and fails unless it exits with status 0.
pub(crate) fn run_checked(
    command: &mut Command,
    dir: &Path,
    name: &str,
    timeout: Duration,
) -> Result<Finished> {
    let shown = shown(command);
    let finished = run_bounded(command, dir, name, timeout)?;
    if !finished.status.success() {
        bail!("`{shown}` failed ({}): {}", finished.status, finished.complaint());
    }
    Ok(finished)
}

/// A command line as a person would type it, for error messages.
pub(crate) fn shown(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Where `name` is installed: the first executable file in `$PATH` or the sbin directories.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(SBIN_DIRS.iter().map(PathBuf::from));
    dirs.map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Spawns `command` with standard input closed and standard output and error in `log`.
pub(crate) fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawning {program}"))
}

/// SIGTERM to our own child, SIGKILL if it is still there after [`STOP_TIMEOUT`]; reaps it.
pub(crate) fn stop_child(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of our own unreaped child, which cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time (user + system) consumed so far by process `pid`, all threads included.
pub(crate) fn cpu_time(pid: libc::pid_t) -> Option<Duration> {
    let times = cpu_times(&format!("/proc/{pid}/stat"))?;
    Some(times.user + times.system)
}

/// User and system CPU time of one process or thread.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuTimes {
    pub(crate) user: Duration,
    pub(crate) system: Duration,
}

fn cpu_times(stat_path: &str) -> Option<CpuTimes> {
    let stat = fs::read_to_string(stat_path).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3 of proc(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) with a valid name has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|&t| t > 0)?;
    let time = |count: u64| Duration::from_nanos(count * 1_000_000_000 / ticks);
    Some(CpuTimes { user: time(utime), system: time(stime) })
}

/// CPU time of this process's children that have been waited for.
pub(crate) fn reaped_children_cpu_time() -> Option<Duration> {
    // SAFETY: getrusage(2) fills the zero-initialised struct we pass and keeps no pointer.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) == 0).then_some(usage)
    }?;
    let time = |tv: libc::timeval| {
        Duration::from_secs(u64::try_from(tv.tv_sec).ok()?)
            .checked_add(Duration::from_micros(u64::try_from(tv.tv_usec).ok()?))
    };
    time(usage.ru_utime)?.checked_add(time(usage.ru_stime)?)
}

/// The last lines of a log, for error messages; empty if the log is.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(8)..];
    format!("; its output ends with:\n    {}", tail.join("\n    "))
}
