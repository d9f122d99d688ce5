//! Network namespaces as hosts, and veth pairs as the cables between them.
//!
//! A [`Netns`] is one simulated host: its own interfaces, addresses and routes, with `lo` up.
//! Processes enter it through `ip netns exec`, which also mounts a `/sys` that shows the
//! namespace's interfaces (a bare `setns(2)` would leave the host's). It execs the program
//! without forking, so the child's PID is the program's PID and can be signalled. Both types
//! delete what they created on drop; they kill nothing.

use std::ffi::OsStr;
use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Once;

use anyhow::{Context, Result};

use crate::process::{self, require_program, COMMAND_TIMEOUT};
use crate::temp::{maker_is_gone, unique_ifname, unique_suffix};

/// Prefix of every namespace this harness creates; also what stale-namespace cleanup matches.
const NAME_PREFIX: &str = "umt-";

/// Runs `ip` on the host with `args` and returns its stdout; fails with stderr on error.
pub fn ip(args: &[&str]) -> Result<String> {
    let ip = require_program("ip", "iproute2")?;
    process::run_ok(Command::new(ip).args(args), COMMAND_TIMEOUT)
}

/// A command that runs `program` in network namespace `netns`, or on the host if `None`.
pub(crate) fn command_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Result<Command> {
    let Some(netns) = netns else { return Ok(Command::new(program)) };
    let mut command = Command::new(require_program("ip", "iproute2")?);
    command.args(["netns", "exec", netns]).arg(program);
    Ok(command)
}

/// A uniquely named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `umt-{prefix}-{pid}-{n}` and brings its `lo` up.
    pub fn new(prefix: &str) -> Result<Netns> {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_namespaces);

        let name = format!("{NAME_PREFIX}{prefix}-{}", unique_suffix());
        ip(&["netns", "add", &name])?;
        // From here on the namespace exists, so `drop` must see a `Netns` to delete it.
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace; add its arguments with `.arg(..)`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        command_in(Some(&self.name), program)
    }

    /// Runs `args[0]` with the remaining arguments inside the namespace, returning stdout; a
    /// non-zero exit is an error quoting stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("Netns::exec needs a program")?;
        let mut command = self.command(program)?;
        command.args(rest);
        process::run_ok(&mut command, COMMAND_TIMEOUT)
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Runs `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Brings `iface` up and gives it `cidr` (e.g. `"10.1.0.1/24"`).
    pub fn addr(&self, iface: &str, cidr: &str) -> Result<()> {
        self.ip(&["link", "set", iface, "up"])?;
        self.ip(&["addr", "add", cidr, "dev", iface])?;
        Ok(())
    }

    /// A UDP socket bound to `address` inside this namespace, for a test to send from.
    ///
    /// A socket belongs to the namespace it was created in for its whole life, so a short-lived
    /// thread enters the namespace (`setns(2)` changes only the calling thread's), creates the
    /// socket and hands it back.
    pub fn udp_socket(&self, address: &str) -> Result<UdpSocket> {
        let address = address.to_string();
        self.within(move || {
            UdpSocket::bind(&address).with_context(|| format!("binding UDP {address}"))
        })
    }

    /// Runs `make` on a short-lived thread inside this namespace (`setns(2)` changes only the
    /// calling thread's) and hands back what it made: sockets belong to the namespace they
    /// were created in for their whole life, abstract unix addresses included.
    pub fn within<T: Send + 'static>(
        &self,
        make: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = Path::new("/run/netns").join(&self.name);
        let entered = std::thread::spawn(move || -> Result<T> {
            let namespace =
                File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: setns(2) on a namespace file we hold open; it affects only this thread,
            // which ends right after `make`.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering {}", path.display()));
            }
            make()
        });
        entered.join().map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }

    /// Whether `addr` answers a ping from this namespace, with a few tries to let ARP settle.
    ///
    /// Uses busybox's ping, since Debian's `ping` (iputils-ping) is not always installed.
    pub fn ping_ok(&self, addr: &str) -> Result<bool> {
        process::require_file(Path::new("/bin/busybox"), "busybox-static")?;
        for _ in 0..3 {
            let mut command = self.command("/bin/busybox")?;
            command.args(["ping", "-c", "1", "-W", "2", addr]);
            if process::run(&mut command, COMMAND_TIMEOUT)?.status.success() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("umnet-tests: could not delete network namespace {}: {err:#}", self.name);
        }
    }
}

/// Deletes namespaces left by earlier test processes that died without running their drop
/// guards (a SIGKILLed test binary). A name's PID says who made it; only namespaces whose
/// maker is gone are deleted. Deleting a namespace kills nothing: processes still inside keep
/// it alive.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(NAME_PREFIX) && maker_is_gone(&name) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// One end of a veth pair: in a namespace, or on the host.
#[derive(Debug, Clone)]
struct End {
    netns: Option<String>,
    iface: String,
}

/// A veth pair, deleted on drop. Both ends are up; neither has an address.
#[derive(Debug)]
pub struct Veth {
    a: End,
    b: End,
}

impl Veth {
    /// Connects `a` and `b` with a cable: interface `a_iface` in `a`, `b_iface` in `b`.
    ///
    /// The names only have to be unique within their namespace, so `eth0` on both sides is
    /// fine.
    pub fn between(a: &Netns, a_iface: &str, b: &Netns, b_iface: &str) -> Result<Veth> {
        let a = End { netns: Some(a.name.clone()), iface: a_iface.to_owned() };
        let b = End { netns: Some(b.name.clone()), iface: b_iface.to_owned() };
        Veth::create(a, b)
    }

    /// Connects `netns` (interface `iface`) to the host, whose end gets a unique name; see
    /// [`Veth::host_iface`].
    pub fn to_host(netns: &Netns, iface: &str) -> Result<Veth> {
        let a = End { netns: Some(netns.name.clone()), iface: iface.to_owned() };
        let b = End { netns: None, iface: unique_ifname("vh") };
        Veth::create(a, b)
    }

    fn create(a: End, b: End) -> Result<Veth> {
        // Creating each end directly in its namespace avoids a moment where a fixed name like
        // `eth0` would have to be unique on the host.
        let mut args = vec!["link", "add", "name", &a.iface];
        if let Some(netns) = &a.netns {
            args.extend(["netns", netns]);
        }
        args.extend(["type", "veth", "peer", "name", &b.iface]);
        if let Some(netns) = &b.netns {
            args.extend(["netns", netns]);
        }
        ip(&args)?;

        let veth = Veth { a, b };
        for end in [&veth.a, &veth.b] {
            ip(&end.ip_args(&["link", "set", &end.iface, "up"]))?;
        }
        Ok(veth)
    }

    /// The name of the host end, if one end is on the host.
    pub fn host_iface(&self) -> Option<&str> {
        [&self.a, &self.b].into_iter().find(|end| end.netns.is_none()).map(|end| &*end.iface)
    }
}

impl End {
    fn ip_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = Vec::new();
        if let Some(netns) = &self.netns {
            full.extend(["-n", netns.as_str()]);
        }
        full.extend_from_slice(args);
        full
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting either end deletes the pair, and an end whose namespace is already gone took
        // the pair with it. Only a host end can outlive the test, so only its survival is worth
        // a warning.
        for end in [&self.a, &self.b] {
            if ip(&end.ip_args(&["link", "del", &end.iface])).is_ok() {
                return;
            }
        }
        if let Some(host) = self.host_iface() {
            if Path::new("/sys/class/net").join(host).exists() {
                eprintln!("umnet-tests: could not delete veth {host} on the host");
            }
        }
    }
}
