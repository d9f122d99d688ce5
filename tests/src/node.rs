//! A `umnet` node under test, run as a child process, and its CLI.
//!
//! Each node gets fresh run and state directories (or given ones, to test restarts against old
//! state), logs to a file the test can read, and is stopped with SIGTERM on drop. The CLI is
//! called as a separate process, exactly as an operator would.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::{command_in, Netns};
use crate::process::{
    self, check_output, describe, require_program, tail, Background, COMMAND_TIMEOUT, POLL,
};
use crate::temp::TempDir;
use crate::wait::wait_until;

/// How long a node may take to open its admin socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of the node log quoted in error messages.
const TAIL_LINES: usize = 40;

/// Finds the `umnet` binary: `$UMNET_BIN`, else `umnet` next to the test executable's
/// directory (tests run from `target/<profile>/deps/`, the binary is `target/<profile>/umnet`).
pub fn umnet_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("UMNET_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().context("locating the test executable")?;
            let deps = exe.parent().context("test executable has no directory")?;
            deps.parent().context("test executable's directory has no parent")?.join("umnet")
        }
    };
    if !path.is_file() {
        bail!(
            "umnet binary not found at {}; build it first with `cargo build -p umnet` \
             (or point UMNET_BIN at it)",
            path.display()
        );
    }
    Ok(path)
}

/// How to start a node. All settings are optional.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    config: Option<String>,
    netns: Option<String>,
    run_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    args: Vec<String>,
    dropped_capabilities: Vec<String>,
    user: Option<(u32, u32)>,
    ambient_capabilities: Vec<String>,
    open_tun: bool,
}

impl NodeOptions {
    /// Default options: no config file, host network namespace, fresh directories.
    pub fn new() -> NodeOptions {
        NodeOptions::default()
    }

    /// Writes `toml` to a config file and passes it with `--config`.
    pub fn config(mut self, toml: &str) -> NodeOptions {
        self.config = Some(toml.to_owned());
        self
    }

    /// Runs the node inside `netns`.
    pub fn netns(mut self, netns: &Netns) -> NodeOptions {
        self.netns = Some(netns.name().to_owned());
        self
    }

    /// Uses `dir` as the run directory instead of a fresh one. The caller owns it.
    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> NodeOptions {
        self.run_dir = Some(dir.into());
        self
    }

    /// Uses `dir` as the state directory instead of a fresh one. The caller owns it.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> NodeOptions {
        self.state_dir = Some(dir.into());
        self
    }

    /// Runs the node without `capability` (as `net_raw`), as an operator who did not grant it
    /// would, through util-linux's `setpriv`.
    pub fn without_capability(mut self, capability: &str) -> NodeOptions {
        self.dropped_capabilities.push(capability.to_owned());
        self
    }

    /// Runs the node as user `uid` and group `gid`, with no capabilities at all, as a node
    /// serving only UML and VDE clients may run; its directories are made theirs.
    pub fn as_user(mut self, uid: u32, gid: u32) -> NodeOptions {
        self.user = Some((uid, gid));
        self
    }

    /// With [`as_user`](Self::as_user): keeps `capabilities` (as `net_admin`) across the change
    /// of user, as systemd's `AmbientCapabilities=` does.
    pub fn with_capabilities(mut self, capabilities: &[&str]) -> NodeOptions {
        self.ambient_capabilities = capabilities.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Gives the node a `/dev/net/tun` anyone may open, in a mount namespace of its own, as
    /// udev sets it up on a Debian host (some test machines leave it root's alone).
    pub fn open_tun(mut self) -> NodeOptions {
        self.open_tun = true;
        self
    }

    /// Appends an argument to `umnet node ...`.
    pub fn arg(mut self, arg: &str) -> NodeOptions {
        self.args.push(arg.to_owned());
        self
    }
}

/// A running `umnet node`; stopped with SIGTERM (then SIGKILL) on drop.
#[derive(Debug)]
pub struct Node {
    bin: PathBuf,
    options: NodeOptions,
    run_dir: PathBuf,
    state_dir: PathBuf,
    config_path: Option<PathBuf>,
    log_path: PathBuf,
    process: Option<Background>,
    // Declared last: removed after `process` has been stopped.
    dir: TempDir,
}

impl Node {
    /// Starts a node and waits until its admin socket accepts connections.
    pub fn start(options: NodeOptions) -> Result<Node> {
        let bin = umnet_bin()?;
        let dir = TempDir::new("node")?;
        let run_dir = options.run_dir.clone().unwrap_or_else(|| dir.join("run"));
        let state_dir = options.state_dir.clone().unwrap_or_else(|| dir.join("state"));
        for path in [&run_dir, &state_dir] {
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating {}", path.display()))?;
            if let Some((uid, gid)) = options.user {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .with_context(|| format!("giving {} to uid {uid}", path.display()))?;
            }
        }
        if options.user.is_some() {
            use std::os::unix::fs::PermissionsExt;
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(dir.path(), open).context("opening the node directory")?;
        }
        let config_path = match &options.config {
            Some(text) => {
                let path = dir.join("umnet.toml");
                std::fs::write(&path, text).context("writing the node config file")?;
                Some(path)
            }
            None => None,
        };

        let mut node = Node {
            bin,
            options,
            run_dir,
            state_dir,
            config_path,
            log_path: dir.join("node.log"),
            process: None,
            dir,
        };
        node.launch()?;
        Ok(node)
    }

    fn launch(&mut self) -> Result<()> {
        let netns = self.options.netns.as_deref();
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        let dropped = &self.options.dropped_capabilities;
        if self.options.user.is_some() || !dropped.is_empty() {
            argv.push(require_program("setpriv", "util-linux")?.into());
            if let Some((uid, gid)) = self.options.user {
                argv.push(format!("--reuid={uid}").into());
                argv.push(format!("--regid={gid}").into());
                argv.push("--clear-groups".into());
                let kept = &self.options.ambient_capabilities;
                if kept.is_empty() {
                    argv.push("--inh-caps=-all".into());
                } else {
                    let list: Vec<String> = kept.iter().map(|c| format!("+{c}")).collect();
                    argv.push(format!("--inh-caps={}", list.join(",")).into());
                    argv.push(format!("--ambient-caps={}", list.join(",")).into());
                }
            }
            if !dropped.is_empty() {
                let list: Vec<String> = dropped.iter().map(|c| format!("-{c}")).collect();
                argv.push(format!("--bounding-set={}", list.join(",")).into());
            }
            argv.push("--".into());
        }
        argv.push(self.bin.clone().into());
        if self.options.open_tun {
            // A private mount namespace where /dev/net/tun is a node of mode 0666, as udev
            // makes it on a Debian host, for a node that does not run as root.
            let tun = self.dir.join("tun");
            if !tun.exists() {
                let mut mknod = Command::new("mknod");
                mknod.args(["-m", "0666"]).arg(&tun).args(["c", "10", "200"]);
                process::run_ok(&mut mknod, COMMAND_TIMEOUT)?;
            }
            let mut wrapped: Vec<std::ffi::OsString> = vec![
                require_program("unshare", "util-linux")?.into(),
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                "mount --bind \"$0\" /dev/net/tun && exec \"$@\"".into(),
                tun.into(),
            ];
            wrapped.append(&mut argv);
            argv = wrapped;
        }
        let mut command = command_in(netns, &argv[0])?;
        command.args(&argv[1..]);
        command.arg("node").arg("--run-dir").arg(&self.run_dir);
        command.arg("--state-dir").arg(&self.state_dir);
        if let Some(config) = &self.config_path {
            command.arg("--config").arg(config);
        }
        command.arg("-v").args(&self.options.args);
        // The CLI honours UMNET_RUN_DIR; an inherited one must not redirect the node.
        command.env_remove("UMNET_RUN_DIR");
        let what = describe(&command);
        let mut process = Background::spawn_logged("umnet node", command, &self.log_path)?;

        let admin = self.admin_socket();
        let ready = wait_until(START_TIMEOUT, POLL, || {
            // Stop polling once the node has died; the check below reports why.
            let exited = !matches!(process.try_exit(), Ok(None));
            exited || UnixStream::connect(&admin).is_ok()
        });
        if let Ok(Some(status)) = process.try_exit() {
            return Err(self.error(&format!("`{what}` exited with {status} during startup")));
        }
        // Kept even if not ready, so that dropping the node stops it.
        self.process = Some(process);
        ready.map_err(|_| {
            self.error(&format!(
                "`{what}` did not accept connections on {} within {START_TIMEOUT:?}",
                admin.display()
            ))
        })
    }

    /// Stops the node with SIGTERM, waits for it, then starts it again with the same options
    /// and directories (so with the state it saved).
    pub fn restart(&mut self) -> Result<()> {
        if self.process.is_some() {
            self.stop()?;
        }
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .context("opening the node log")?;
        writeln!(log, "--- umnet-tests: node restarted ---").context("writing the node log")?;
        self.launch()
    }

    /// Sends SIGTERM and waits (bounded) for the node to exit; returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut process) = self.process.take() else {
            bail!("umnet node is not running");
        };
        process.stop(STOP_TIMEOUT).map_err(|err| self.error(&format!("{err:#}")))
    }

    /// Kills the node with SIGKILL, as a crash would, and waits for it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let Some(mut process) = self.process.take() else {
            bail!("umnet node is not running");
        };
        process.kill()
    }

    /// Replaces the node's config file with `toml` and sends SIGHUP, which makes a running node
    /// read it again.
    pub fn reconfigure(&mut self, toml: &str) -> Result<()> {
        let path = self.config_path.get_or_insert_with(|| self.dir.join("umnet.toml")).clone();
        std::fs::write(&path, toml).context("writing the node config file")?;
        self.options.config = Some(toml.to_string());
        let Some(pid) = self.pid() else { bail!("umnet node is not running") };
        process::signal(pid, libc::SIGHUP, false);
        Ok(())
    }

    /// The node's PID, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Background::pid)
    }

    /// Runs `umnet --run-dir RUN args...` and returns its output, whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut command = self.cli_command(&[], args);
        process::run(&mut command, COMMAND_TIMEOUT)
    }

    /// Runs the CLI like [`Node::cli`] and returns stdout; a non-zero exit is an error quoting
    /// stderr and the node log.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let mut command = self.cli_command(&[], args);
        let output = process::run(&mut command, COMMAND_TIMEOUT)?;
        check_output(&describe(&command), &output)
            .map_err(|err| self.error(&format!("{err:#}")))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `umnet --run-dir RUN --json args...` and parses stdout as JSON.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut command = self.cli_command(&["--json"], args);
        let output = process::run(&mut command, COMMAND_TIMEOUT)?;
        let what = describe(&command);
        check_output(&what, &output).map_err(|err| self.error(&format!("{err:#}")))?;
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!("`{what}` printed invalid JSON:\n{}", String::from_utf8_lossy(&output.stdout))
        })
    }

    fn cli_command(&self, global: &[&str], args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command.arg("--run-dir").arg(&self.run_dir).args(global).args(args);
        command.env_remove("UMNET_RUN_DIR");
        command
    }

    /// Everything the node has written to stdout and stderr; restarts are marked by a line
    /// `--- umnet-tests: node restarted ---`.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|err| format!("<could not read {}: {err}>", self.log_path.display()))
    }

    /// The run directory (sockets).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The state directory (what survives a restart).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The admin socket the CLI talks to: `RUN/admin.sock`.
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    /// The directory of network `net`: `RUN/net{N}`. It is also the VDE switch directory that
    /// a `vde_plug` or a UML `ethN=vde,DIR` argument names.
    pub fn vde_dir(&self, net: u32) -> PathBuf {
        self.run_dir.join(format!("net{net}"))
    }

    /// The uml_switch control socket of network `net`: `RUN/net{N}/ctl`.
    pub fn ctl(&self, net: u32) -> PathBuf {
        self.vde_dir(net).join("ctl")
    }

    /// The BESS socket of network `net`: `RUN/net{N}/bess`.
    pub fn bess(&self, net: u32) -> PathBuf {
        self.vde_dir(net).join("bess")
    }

    /// The scratch directory holding the log and config file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An error carrying the tail of the node log.
    fn error(&self, message: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "umnet node: {message}\n--- last node log lines ({}) ---\n{}",
            self.log_path.display(),
            tail(&self.log(), TAIL_LINES)
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // Graceful first, so the node removes its sockets as in production; `Background`
            // escalates to SIGKILL if it must.
            if let Err(err) = process.stop(STOP_TIMEOUT) {
                eprintln!("umnet-tests: {err:#}");
            }
        }
    }
}
