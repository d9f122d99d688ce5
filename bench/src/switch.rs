//! Starting and stopping the switches under test, each in a fresh directory of its own.
//!
//! A [`Switch`] owns its process and its directory: dropping it, on success or while a panic
//! unwinds, sends SIGTERM to the process it started (and to nothing else), waits up to 2 s,
//! sends SIGKILL if it is still there, and removes the directory.

use std::fmt;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::port;
use crate::process::{self, log_tail, spawn, TempDir};

/// How long a switch may take to start listening on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The switches this tool knows how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum SwitchKind {
    /// `umnet node`.
    #[value(name = "umnet")]
    Umnet,
    /// Debian's `uml_switch` (package uml-utilities).
    #[value(name = "uml_switch")]
    UmlSwitch,
    /// `vde_switch` (package vde2).
    #[value(name = "vde_switch")]
    VdeSwitch,
}

impl SwitchKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SwitchKind::Umnet => "umnet",
            SwitchKind::UmlSwitch => "uml_switch",
            SwitchKind::VdeSwitch => "vde_switch",
        }
    }
}

impl fmt::Display for SwitchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the process was started, which decides how it is stopped.
#[derive(Debug)]
enum Process {
    /// Our own child (uml_switch, umnet).
    Child(Child),
    /// vde_switch after `-d`: the child we spawned forked the daemon and exited; the daemon's
    /// pid comes from its pid file.
    Daemon(libc::pid_t),
}

/// A running switch.
#[derive(Debug)]
pub(crate) struct Switch {
    pub(crate) kind: SwitchKind,
    /// The control socket UML-style clients connect to.
    pub(crate) ctl: PathBuf,
    process: Option<Process>,
    /// Declared last so it is removed after the process has been stopped.
    dir: TempDir,
}

impl Switch {
    /// Starts a switch of `kind` in a fresh directory and waits until its control socket
    /// accepts connections. `umnet` is the path of the umnet binary.
    pub(crate) fn start(kind: SwitchKind, umnet: &Path) -> Result<Switch> {
        let dir = TempDir::new(kind.name())?;
        let log = dir.path.join("switch.log");
        let mut switch = Switch { kind, ctl: PathBuf::new(), process: None, dir };
        let root = switch.dir.path.clone();

        match kind {
            SwitchKind::UmlSwitch => {
                // uml_switch watches stdin only when it is a terminal: with /dev/null it keeps
                // running (checked with uml-utilities 20070815.4-1).
                switch.ctl = root.join("uml.ctl");
                let child = spawn(Command::new("uml_switch").arg("-unix").arg(&switch.ctl), &log)?;
                switch.process = Some(Process::Child(child));
            }
            SwitchKind::VdeSwitch => {
                // vde_switch exits when its stdin closes unless it runs as a daemon.
                let sock = root.join("vde");
                let pid_file = root.join("vde.pid");
                switch.ctl = sock.join("ctl");
                let mut command = Command::new("vde_switch");
                command.arg("-d").arg("-s").arg(&sock).arg("-p").arg(&pid_file);
                let mut parent = spawn(&mut command, &log)?;
                let status = parent.wait().context("waiting for vde_switch to daemonise")?;
                if !status.success() {
                    bail!("vde_switch -d exited with {status}{}", log_tail(&log));
                }
                let pid = wait_for_pid_file(&pid_file, &root)?;
                switch.process = Some(Process::Daemon(pid));
            }
            SwitchKind::Umnet => {
                let run = root.join("run");
                let state = root.join("state");
                fs::create_dir(&run)?;
                fs::create_dir(&state)?;
                switch.ctl = run.join("net100").join("ctl");
                let mut command = Command::new(umnet);
                command.arg("node").arg("--run-dir").arg(&run).arg("--state-dir").arg(&state);
                let child = spawn(&mut command, &log)?;
                switch.process = Some(Process::Child(child));
            }
        }

        switch.wait_until_listening(&log)?;
        Ok(switch)
    }

    /// The pid of the switch process, for CPU accounting.
    pub(crate) fn pid(&self) -> Option<libc::pid_t> {
        match &self.process {
            Some(Process::Child(child)) => libc::pid_t::try_from(child.id()).ok(),
            Some(Process::Daemon(pid)) => Some(*pid),
            None => None,
        }
    }

    /// Whether the switch process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        match &mut self.process {
            Some(Process::Child(child)) => matches!(child.try_wait(), Ok(None)),
            Some(Process::Daemon(pid)) => daemon_alive(*pid),
            None => false,
        }
    }

    /// How our child exited, if it has.
    fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.process {
            Some(Process::Child(child)) => child.try_wait().ok().flatten(),
            _ => None,
        }
    }

    /// The last lines of the switch's own output, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.dir.path.join("switch.log"))
    }

    fn wait_until_listening(&mut self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let is_socket = fs::metadata(&self.ctl).map(|m| m.file_type().is_socket());
            if is_socket.unwrap_or(false)
                && port::connect_control(&self.ctl, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if !self.is_running() {
                let status = self.exit_status().map(|status| format!(" ({status})"));
                bail!(
                    "{} exited{} before listening on {}{}",
                    self.kind,
                    status.unwrap_or_default(),
                    self.ctl.display(),
                    log_tail(log)
                );
            }
            if Instant::now() > deadline || crate::interrupted() {
                bail!(
                    "{} did not listen on {} within {:?}{}",
                    self.kind,
                    self.ctl.display(),
                    START_TIMEOUT,
                    log_tail(log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        match self.process.take() {
            Some(Process::Child(mut child)) => process::stop_child(&mut child),
            Some(Process::Daemon(pid)) => {
                // Re-check that the pid is still our vde_switch before every signal.
                if !is_our_daemon(pid, &self.dir.path) {
                    return;
                }
                // SAFETY: kill(2) on a pid just checked to be the vde_switch we started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let deadline = Instant::now() + process::STOP_TIMEOUT;
                while Instant::now() < deadline {
                    if !daemon_alive(pid) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                if is_our_daemon(pid, &self.dir.path) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            None => {}
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_pid_file(pid_file: &Path, dir: &Path) -> Result<libc::pid_t> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = fs::read_to_string(pid_file) {
            if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
                if pid > 1 && is_our_daemon(pid, dir) {
                    return Ok(pid);
                }
            }
        }
        if Instant::now() > deadline {
            // Without its pid the daemon could not be stopped: look for it by its command line.
            if let Some(pid) = find_our_daemon(dir) {
                return Ok(pid);
            }
            bail!("vde_switch wrote no usable pid file at {}", pid_file.display());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The vde_switch whose command line names our directory, found among all processes.
fn find_our_daemon(dir: &Path) -> Option<libc::pid_t> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .find(|&pid| is_our_daemon(pid, dir))
}

/// Whether `pid` is a live vde_switch whose command line names our directory.
fn is_our_daemon(pid: libc::pid_t, dir: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    let names_dir = cmdline.windows(dir.len()).any(|window| window == dir);
    let is_vde =
        cmdline.split(|&b| b == 0).next().is_some_and(|argv0| argv0.ends_with(b"vde_switch"));
    names_dir && is_vde && daemon_alive(pid)
}

/// Whether `pid` exists and is not a zombie waiting for its (other) parent to reap it.
fn daemon_alive(pid: libc::pid_t) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}
