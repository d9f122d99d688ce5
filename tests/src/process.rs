//! Child processes with bounded lifetimes.
//!
//! Two shapes: [`run`] executes a command to completion within a timeout, and [`Background`]
//! keeps a daemon (a switch, a node) running until it is stopped or dropped. Every child is
//! started with [`isolate`], so it dies with the test even when the test binary is killed, and
//! only processes started here are ever signalled.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::temp::TempDir;

/// How long a one-shot helper command (`ip`, a CLI call) may take before it counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// How often exit and readiness are polled.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// Finds `program` in `PATH` (plus the sbin directories, which a CI user's `PATH` may lack).
///
/// Fails naming the Debian package to install: a test that needs a missing tool must fail
/// loudly, never skip.
pub fn require_program(program: &str, debian_package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    let found = std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate));
    match found {
        Some(path) => Ok(path),
        None => bail!(
            "required program `{program}` not found in PATH; install the Debian package \
             `{debian_package}` (apt-get install {debian_package})"
        ),
    }
}

/// Fails naming the Debian package if `path` does not exist.
pub fn require_file(path: &Path, debian_package: &str) -> Result<()> {
    if !path.exists() {
        bail!(
            "required file {} not found; install the Debian package `{debian_package}` \
             (apt-get install {debian_package})",
            path.display()
        );
    }
    Ok(())
}

fn is_executable(path: &Path) -> bool {
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Makes the child of `command` the leader of a new process group, and has the kernel kill it
/// when the spawning thread dies.
///
/// The process group lets a drop guard kill a child together with the helpers it forks into
/// that group. The parent-death signal covers what no drop guard can: a test binary killed by a
/// timeout or Ctrl-C. It fires when the *thread* that spawned the child exits, which for a test
/// is the end of the test function, after its guards have run. So start children on the test's
/// own thread: one started on a helper thread dies when that thread ends.
pub fn isolate(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls; it touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process `pid`, or to its whole process group if `group` is set.
///
/// Callers must only pass a child they have not reaped yet: until it is reaped its PID (and so
/// its process group ID) cannot be reused by an unrelated process.
pub(crate) fn signal(pid: u32, signal: libc::c_int, group: bool) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    let target = if group { -pid } else { pid };
    // SAFETY: kill(2) has no memory-safety preconditions. Errors (ESRCH: already gone) are
    // fine to ignore, since the caller waits for the exit next.
    unsafe {
        libc::kill(target, signal);
    }
}

/// Renders a command for error messages: program and arguments, shell-like.
pub(crate) fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs `command` to completion and returns its output whatever its exit status.
///
/// Fails if it cannot be started or does not exit within `timeout`, in which case it is killed.
pub fn run(command: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(command);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    isolate(command);
    let mut child = command.spawn().with_context(|| format!("starting `{what}`"))?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());

    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            signal(child.id(), libc::SIGKILL, true);
            let _ = child.wait();
            bail!("`{what}` did not finish within {timeout:?}; killed it");
        }
    };

    // A grandchild that kept the pipes open could hold the readers forever; give up on its
    // output after a grace period instead of hanging the test.
    let grace = Duration::from_secs(2);
    let stdout = stdout.recv_timeout(grace).unwrap_or_default();
    let stderr = stderr.recv_timeout(grace).unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// Runs `command` like [`run`] and returns its stdout; a non-zero exit is an error that quotes
/// stderr.
pub fn run_ok(command: &mut Command, timeout: Duration) -> Result<String> {
    let output = run(command, timeout)?;
    check_output(&describe(command), &output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Fails with the command's stderr and stdout if `output` reports a non-zero exit.
pub(crate) fn check_output(what: &str, output: &Output) -> Result<()> {
    if !output.status.success() {
        bail!(
            "`{what}` failed ({}):\nstderr: {}\nstdout: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end(),
            String::from_utf8_lossy(&output.stdout).trim_end()
        );
    }
    Ok(())
}

fn read_in_background(source: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    if let Some(mut source) = source {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = source.read_to_end(&mut bytes);
            let _ = sender.send(bytes);
        });
    }
    receiver
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// A long-running child process with its stdout and stderr in a log file; killed, with its
/// process group, on drop.
#[derive(Debug)]
pub struct Background {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
    log: PathBuf,
    // Held, never written: some daemons (vde_switch) read commands from stdin and exit at EOF.
    _stdin: Option<ChildStdin>,
    // Declared last so the log outlives the kill in `drop`.
    _log_dir: Option<TempDir>,
}

impl Background {
    /// Starts `command`, logging to a file in a fresh temp dir. `name` labels error messages.
    pub fn spawn(name: &str, command: Command) -> Result<Background> {
        let dir = TempDir::new(name)?;
        let log = dir.join(format!("{name}.log"));
        let mut background = Background::spawn_logged(name, command, &log)?;
        background._log_dir = Some(dir);
        Ok(background)
    }

    /// Starts `command`, appending its stdout and stderr to `log`.
    pub fn spawn_logged(name: &str, mut command: Command, log: &Path) -> Result<Background> {
        let what = describe(&command);
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let file_for_stderr = file.try_clone().context("duplicating log file handle")?;
        command.stdin(Stdio::piped()).stdout(file).stderr(file_for_stderr);
        isolate(&mut command);
        let mut child = command.spawn().with_context(|| format!("starting {name}: `{what}`"))?;
        Ok(Background {
            name: name.to_owned(),
            _stdin: child.stdin.take(),
            child,
            exit: None,
            log: log.to_path_buf(),
            _log_dir: None,
        })
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|err| format!("<could not read {}: {err}>", self.log.display()))
    }

    /// The path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited, reaping it.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .with_context(|| format!("checking whether {} exited", self.name))?;
        }
        Ok(self.exit)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; then kills the process group and
    /// fails, since a daemon that ignores SIGTERM is a bug worth seeing.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        signal(self.child.id(), libc::SIGTERM, false);
        if let Some(status) = wait_timeout(&mut self.child, timeout)? {
            self.exit = Some(status);
            return Ok(status);
        }
        self.kill()?;
        bail!("{} did not exit within {timeout:?} of SIGTERM; killed it", self.name)
    }

    /// Kills the process and its process group with SIGKILL, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit()? {
            return Ok(status);
        }
        signal(self.child.id(), libc::SIGKILL, true);
        let status = self.child.wait().with_context(|| format!("reaping {}", self.name))?;
        self.exit = Some(status);
        Ok(status)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Err(err) = self.kill() {
            eprintln!("umnet-tests: could not kill {}: {err:#}", self.name);
        }
    }
}

/// The last `lines` lines of `text`, for error messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut tail = all[start..].join("\n");
    if start > 0 {
        tail.insert_str(0, &format!("[.. {start} earlier lines ..]\n"));
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_status_and_output() -> Result<()> {
        let output = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            COMMAND_TIMEOUT,
        )?;
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        Ok(())
    }

    #[test]
    fn run_kills_hung_command() {
        let started = Instant::now();
        let result = run(Command::new("sleep").arg("30"), Duration::from_millis(100));
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program_names_package() {
        let err = require_program("no-such-program-umnet", "some-package").err();
        let message = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(message.contains("some-package"), "{message}");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "[.. 1 earlier lines ..]\nb\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
