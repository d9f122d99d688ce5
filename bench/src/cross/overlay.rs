//! The overlays measured between the two hosts: umnet, tinc 1.0 and kernel VXLAN from tap to
//! tap, and umnet and kernel VXLAN from host a's LAN to a tap on host b.
//!
//! Each overlay puts one device on each end, in a /24 of its own under 10.202.0.0/16, so all
//! of them can stay up side by side for the whole run: umnet a tap port on network 100 of one
//! node per host, tinc a tap of one `tincd` per host in switch mode, VXLAN a kernel device.
//! The LAN overlays start on the LAN machine behind host a, whose one interface carries an
//! address of each: umnet bridges its own cable from host a to the LAN with a NIC port, and the
//! ceiling bridges another with a plain Linux bridge and a VXLAN device. An [`Overlay`] owns
//! the daemons it started; dropping it stops them, by pid.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::hosts::{Hosts, HOST_NAMES, MACHINE, MACHINE_DEVICE, UNDERLAY, UNDERLAY_DEVICE};
use crate::process::{find_program, run_bounded, run_checked, Daemon};

/// The umnet network both nodes serve.
const NETWORK: u32 = 100;

/// The UDP port umnet nodes listen on for peers.
const UMNET_PORT: u16 = 7780;

/// How long one umnet CLI call, `tincd -K` or a reachability ping may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon may take to come up, and two nodes to connect.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long tinc may take to settle the path MTU to its peer. Until it has, it carries every
/// frame larger than the MTU it has confirmed over its TCP meta connection, which would make
/// the first measurement slower than the others. Its probes run about once a second and it
/// fixes the MTU after ten or more.
const TINC_PMTU_TIMEOUT: Duration = Duration::from_secs(40);

/// The systems measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum System {
    /// One umnet node per host, peered over QUIC.
    #[value(name = "umnet")]
    Umnet,
    /// tinc 1.0 in switch mode (package tinc).
    #[value(name = "tinc")]
    Tinc,
    /// Kernel VXLAN, unencrypted: the ceiling.
    #[value(name = "vxlan")]
    Vxlan,
    /// From the LAN machine through a NIC port of the node on host a to a tap on host b.
    #[value(name = "umnet-nic")]
    UmnetNic,
    /// From the LAN machine through a Linux bridge and kernel VXLAN on host a to host b: the
    /// ceiling of the LAN path.
    #[value(name = "vxlan-bridge")]
    VxlanBridge,
}

impl System {
    pub(crate) fn name(self) -> &'static str {
        match self {
            System::Umnet => "umnet",
            System::Tinc => "tinc",
            System::Vxlan => "vxlan",
            System::UmnetNic => "umnet-nic",
            System::VxlanBridge => "vxlan-bridge",
        }
    }

    /// The overlay device on host b (and on host a, for the tap-to-tap overlays).
    pub(crate) fn device(self) -> &'static str {
        match self {
            System::Umnet => "umtap0",
            System::Tinc => "tnctap0",
            System::Vxlan => "vx0",
            System::UmnetNic => "umtap1",
            System::VxlanBridge => "vx1",
        }
    }

    /// Where measurements start: host a, or the machine on its LAN.
    pub(crate) fn client(self) -> usize {
        match self {
            System::Umnet | System::Tinc | System::Vxlan => 0,
            System::UmnetNic | System::VxlanBridge => MACHINE,
        }
    }

    /// The device measurements start from.
    fn client_device(self) -> &'static str {
        match self.client() {
            0 => self.device(),
            _ => MACHINE_DEVICE,
        }
    }

    /// The systems the tables compare this one with: umnet with the other overlays of its
    /// path, anything else with nothing.
    pub(crate) fn compared_with(self) -> &'static [System] {
        match self {
            System::Umnet => &[System::Tinc, System::Vxlan],
            System::UmnetNic => &[System::VxlanBridge],
            System::Tinc | System::Vxlan | System::VxlanBridge => &[],
        }
    }

    /// The overlay address of the client end (0) and of host b (1): 10.202.N.1 and
    /// 10.202.N.2, N 1 for umnet, 2 for tinc, 3 for VXLAN, 4 for umnet's NIC port, 5 for the
    /// bridge and VXLAN.
    pub(crate) fn address(self, host: usize) -> Ipv4Addr {
        let subnet = match self {
            System::Umnet => 1,
            System::Tinc => 2,
            System::Vxlan => 3,
            System::UmnetNic => 4,
            System::VxlanBridge => 5,
        };
        Ipv4Addr::new(10, 202, subnet, host as u8 + 1)
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The programs the suite runs, found once at the start.
#[derive(Debug)]
pub(crate) struct Programs {
    pub(crate) ip: PathBuf,
    pub(crate) iperf3: PathBuf,
    pub(crate) ping: PathBuf,
    /// Absent when tinc is not installed: only the tinc overlay is skipped.
    pub(crate) tincd: Option<PathBuf>,
    pub(crate) umnet: PathBuf,
}

impl Programs {
    /// Finds the programs; fails, naming the Debian packages to install, when one that every
    /// overlay needs is missing.
    pub(crate) fn find(umnet: &Path) -> Result<Programs> {
        let mut missing = Vec::new();
        let mut need = |name: &str, package: &str| {
            find_program(name).unwrap_or_else(|| {
                missing.push(format!("{name} (Debian package {package})"));
                PathBuf::new()
            })
        };
        let programs = Programs {
            ip: need("ip", "iproute2"),
            iperf3: need("iperf3", "iperf3"),
            ping: need("ping", "iputils-ping"),
            tincd: find_program("tincd"),
            umnet: umnet.to_path_buf(),
        };
        if !missing.is_empty() {
            bail!(
                "the cross-host suite needs {}: not found in $PATH, /usr/sbin or /sbin; \
                 install with `apt-get install iproute2 iperf3 iputils-ping`",
                missing.join(", ")
            );
        }
        Ok(programs)
    }
}

/// One overlay, up between the two hosts.
#[derive(Debug)]
pub(crate) struct Overlay {
    pub(crate) system: System,
    /// The overlay device's MTU on host a, once it is up.
    pub(crate) mtu: Option<u32>,
    daemons: Vec<Daemon>,
    /// umnet's run directories, one per host, for its CLI.
    run_dirs: Vec<PathBuf>,
}

impl Overlay {
    /// Sets `system` up between `hosts` and waits until host a reaches host b through it.
    /// `dir` holds its configuration, keys and logs.
    pub(crate) fn start(
        system: System,
        hosts: &Hosts,
        programs: &Programs,
        dir: &Path,
    ) -> Result<Overlay> {
        let mut overlay = Overlay { system, mtu: None, daemons: Vec::new(), run_dirs: Vec::new() };
        let started = match system {
            System::Umnet | System::UmnetNic => overlay.start_umnet(hosts, programs, dir),
            System::Tinc => overlay.start_tinc(hosts, programs, dir),
            System::Vxlan | System::VxlanBridge => overlay.start_vxlan(hosts),
        };
        let reached = started.and_then(|()| overlay.wait_reachable(hosts, programs, dir));
        let settled = reached.and_then(|()| match system {
            System::Tinc => overlay.wait_for_tinc_pmtu(),
            _ => Ok(()),
        });
        if let Err(error) = settled {
            // Dropping the overlay stops whatever it started.
            bail!("{error:#}{}", overlay.log_tails());
        }
        overlay.mtu = hosts.mtu(system.client(), system.client_device());
        Ok(overlay)
    }

    /// The pids of the daemons, for CPU accounting.
    pub(crate) fn pids(&self) -> Vec<libc::pid_t> {
        self.daemons.iter().map(Daemon::pid).collect()
    }

    /// Fails if one of its daemons has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        self.daemons.iter_mut().try_for_each(Daemon::check_running)
    }

    /// The lines of the daemons' logs marked `WARN` or `ERROR` (umnet's levels), by daemon.
    pub(crate) fn warnings(&self) -> Vec<(String, Vec<String>)> {
        self.daemons
            .iter()
            .map(|daemon| {
                let text = fs::read_to_string(&daemon.log).unwrap_or_default();
                let lines = text
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .map(str::to_string)
                    .collect();
                (daemon.label.clone(), lines)
            })
            .collect()
    }

    /// umnet's own view of the run: each node's `peer list` and `port list`, as JSON.
    pub(crate) fn umnet_counters(&self, programs: &Programs, dir: &Path) -> Option<Value> {
        if !matches!(self.system, System::Umnet | System::UmnetNic) {
            return None;
        }
        let nodes: Vec<Value> = self
            .run_dirs
            .iter()
            .zip(HOST_NAMES)
            .map(|(run_dir, host)| {
                let list = |what: &str| {
                    umnet_cli(programs, run_dir, &[what, "list"], dir)
                        .ok()
                        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                        .unwrap_or(Value::Null)
                };
                json!({ "node": node_name(host), "peers": list("peer"), "ports": list("port") })
            })
            .collect();
        Some(Value::Array(nodes))
    }

    /// The end of every daemon's log, for error messages.
    fn log_tails(&self) -> String {
        self.daemons
            .iter()
            .map(|daemon| {
                let tail = crate::process::log_tail(&daemon.log);
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("\n  {}{tail}", daemon.label)
                }
            })
            .collect()
    }

    fn start_umnet(&mut self, hosts: &Hosts, programs: &Programs, dir: &Path) -> Result<()> {
        let umnet = &programs.umnet;
        if !umnet.is_file() {
            bail!(
                "no umnet binary at {}: build it with `cargo build --release -p umnet`, or \
                 name it with --umnet PATH or $UMNET_BIN",
                umnet.display()
            );
        }
        let root = dir.join(self.system.name());
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        // Each umnet overlay is a cluster of its own, on a port of its own.
        let port = match self.system {
            System::UmnetNic => UMNET_PORT + 1,
            _ => UMNET_PORT,
        };

        // Step 1: a fresh cluster CA, and an identity from it for each node.
        let ca = root.join("ca");
        let mut init = Command::new(umnet);
        init.args(["ca", "init", "--dir"]).arg(&ca).args(["--name", "bench"]);
        run_checked(&mut init, &root, "umnet-ca", COMMAND_TIMEOUT)?;

        // Step 2: one node per host, each configured to dial the other.
        for (host, other) in [(0, 1), (1, 0)] {
            let name = node_name(HOST_NAMES[host]);
            let identity = root.join(format!("{name}.pem"));
            let mut issue = Command::new(umnet);
            issue.args(["ca", "issue", &name, "--dir"]).arg(&ca).arg("--out").arg(&identity);
            issue.args(["--days", "30"]);
            run_checked(&mut issue, &root, "umnet-ca", COMMAND_TIMEOUT)?;

            let config = root.join(format!("{name}.toml"));
            let text = format!(
                "[[network]]\nid = {NETWORK}\n\n[[peer]]\nname = \"{}\"\naddress = \"{}:{}\"\n",
                node_name(HOST_NAMES[other]),
                UNDERLAY[other],
                port
            );
            fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;

            let run_dir = root.join(format!("{name}.run"));
            let state_dir = root.join(format!("{name}.state"));
            fs::create_dir(&run_dir)?;
            fs::create_dir(&state_dir)?;
            let mut node = hosts.exec(host, umnet);
            node.arg("node").arg("--run-dir").arg(&run_dir).arg("--state-dir").arg(&state_dir);
            node.arg("--config").arg(&config).arg("--identity").arg(&identity);
            node.arg("--listen").arg(format!("{}:{port}", UNDERLAY[host]));
            let label = format!("umnet node on host {}", HOST_NAMES[host]);
            let log = root.join(format!("{name}.log"));
            self.daemons.push(Daemon::spawn(label, &mut node, &log)?);
            self.run_dirs.push(run_dir);
        }

        // Step 3: a tap port on network 100 on each node, once its admin socket answers; for
        // the LAN path, a NIC port on host a's own cable to the LAN instead.
        for host in 0..2 {
            let run_dir = self.run_dirs[host].clone();
            wait_until("the umnet node to answer on its admin socket", START_TIMEOUT, || {
                self.check_running()?;
                Ok(umnet_cli(programs, &run_dir, &["status"], dir).is_ok())
            })?;
            let net = NETWORK.to_string();
            let device = self.system.device();
            if host == 0 && self.system == System::UmnetNic {
                hosts.cable(0, NIC_CABLE, "pnic")?;
                umnet_cli(
                    programs,
                    &run_dir,
                    &["port", "add", "nic", NIC_CABLE, "--net", &net],
                    dir,
                )?;
                lan_side(hosts, self.system)?;
            } else {
                umnet_cli(programs, &run_dir, &["port", "add", "tap", device, "--net", &net], dir)?;
                hosts.address(host, device, self.system.address(host))?;
            }
        }

        // Step 4: both nodes see each other connected.
        for (host, other) in [(0, 1), (1, 0)] {
            let run_dir = self.run_dirs[host].clone();
            let peer = node_name(HOST_NAMES[other]);
            let mut state = String::from("not listed");
            let waited = wait_until("the umnet peers to connect", START_TIMEOUT, || {
                self.check_running()?;
                let listed = umnet_cli(programs, &run_dir, &["peer", "list"], dir)?;
                state = peer_state(&listed, &peer).unwrap_or_else(|| "not listed".into());
                Ok(state == "connected")
            });
            waited
                .with_context(|| format!("peer {peer} seen from host {}", HOST_NAMES[host]))
                .with_context(|| format!("last state {state}"))?;
        }
        Ok(())
    }

    fn start_tinc(&mut self, hosts: &Hosts, programs: &Programs, dir: &Path) -> Result<()> {
        let Some(tincd) = &programs.tincd else {
            bail!("tincd not found in $PATH, /usr/sbin or /sbin: install the Debian package tinc");
        };
        let root = dir.join("tinc");

        // Step 1: a configuration and an RSA key pair per host. `tincd -K` asks where to save
        // the keys only when its standard input and output are terminals; here it takes the
        // defaults: rsa_key.priv, and the public key appended to hosts/NAME.
        let conf_dir = |host: usize| root.join(HOST_NAMES[host]);
        for (host, other) in [(0, 1), (1, 0)] {
            let hosts_dir = conf_dir(host).join("hosts");
            fs::create_dir_all(&hosts_dir)
                .with_context(|| format!("creating {}", hosts_dir.display()))?;
            let conf = format!(
                "Name = {}\nMode = switch\nDeviceType = tap\nInterface = {}\n\
                 AddressFamily = ipv4\nConnectTo = {}\n",
                tinc_name(host),
                System::Tinc.device(),
                tinc_name(other)
            );
            fs::write(conf_dir(host).join("tinc.conf"), conf)?;
            fs::write(hosts_dir.join(tinc_name(host)), format!("Address = {}\n", UNDERLAY[host]))?;
            let mut keys = Command::new(tincd);
            keys.arg("-c").arg(conf_dir(host)).arg("-K");
            run_checked(&mut keys, &root, "tincd-keys", COMMAND_TIMEOUT)?;
        }
        for (host, other) in [(0, 1), (1, 0)] {
            let name = tinc_name(host);
            let from = conf_dir(host).join("hosts").join(&name);
            fs::copy(&from, conf_dir(other).join("hosts").join(&name))
                .with_context(|| format!("copying {}", from.display()))?;
        }

        // Step 2: one tincd per host in the foreground; -d1 logs its connections.
        for (host, host_name) in HOST_NAMES.iter().enumerate() {
            let mut daemon = hosts.exec(host, tincd);
            daemon.arg("-c").arg(conf_dir(host)).args(["-D", "-d1"]);
            daemon.arg(format!("--pidfile={}", conf_dir(host).join("tincd.pid").display()));
            let label = format!("tincd on host {host_name}");
            let log = root.join(format!("tincd-{host_name}.log"));
            self.daemons.push(Daemon::spawn(label, &mut daemon, &log)?);
        }

        // Step 3: address the taps tincd created.
        for host in 0..2 {
            wait_until("tincd to create its tap", START_TIMEOUT, || {
                self.check_running()?;
                Ok(hosts.has_device(host, System::Tinc.device()))
            })?;
            hosts.address(host, System::Tinc.device(), System::Tinc.address(host))?;
        }
        Ok(())
    }

    /// Waits until both tincds report a settled path MTU towards the other. They log their
    /// node table on SIGUSR2, one line per node ending in `pmtu N (min MIN max MAX)`; the
    /// discovery is done once MIN equals MAX.
    fn wait_for_tinc_pmtu(&mut self) -> Result<()> {
        let mut settled = [false, false];
        wait_until("tinc to settle the path MTU", TINC_PMTU_TIMEOUT, || {
            self.check_running()?;
            for (host, daemon) in self.daemons.iter().enumerate() {
                if settled[host] {
                    continue;
                }
                daemon.signal(libc::SIGUSR2);
                let log = fs::read_to_string(&daemon.log).unwrap_or_default();
                let peer = tinc_name(1 - host);
                settled[host] = log
                    .lines()
                    .rfind(|line| line.trim_start().starts_with(&format!("{peer} at ")))
                    .and_then(pmtu_range)
                    .is_some_and(|(min, max)| min > 0 && min == max);
            }
            Ok(settled == [true, true])
        })
    }

    fn start_vxlan(&mut self, hosts: &Hosts) -> Result<()> {
        let (id, port) = match self.system {
            System::VxlanBridge => ("43", "4790"),
            _ => ("42", "4789"),
        };
        let device = self.system.device();
        for (host, other) in [(0, 1), (1, 0)] {
            let (local, remote) = (UNDERLAY[host].to_string(), UNDERLAY[other].to_string());
            hosts.ip(
                host,
                &[
                    "link",
                    "add",
                    device,
                    "type",
                    "vxlan",
                    "id",
                    id,
                    "remote",
                    &remote,
                    "local",
                    &local,
                    "dstport",
                    port,
                    "dev",
                    UNDERLAY_DEVICE,
                ],
            )?;
            if host == 0 && self.system == System::VxlanBridge {
                // Host a bridges its own cable to the LAN with the VXLAN device.
                hosts.ip(0, &["link", "add", BRIDGE, "type", "bridge"])?;
                hosts.ip(0, &["link", "set", BRIDGE, "up"])?;
                hosts.cable(0, BRIDGE_CABLE, "pbr")?;
                for port in [BRIDGE_CABLE, device] {
                    hosts.ip(0, &["link", "set", port, "master", BRIDGE, "up"])?;
                }
                lan_side(hosts, self.system)?;
            } else {
                hosts.address(host, device, self.system.address(host))?;
            }
        }
        Ok(())
    }

    /// Waits until host a's pings reach host b over the overlay (which also resolves the
    /// neighbours on both sides).
    fn wait_reachable(&mut self, hosts: &Hosts, programs: &Programs, dir: &Path) -> Result<()> {
        let target = self.system.address(1).to_string();
        wait_until("host b to answer pings over the overlay", START_TIMEOUT, || {
            self.check_running()?;
            let mut ping = hosts.exec(self.system.client(), &programs.ping);
            ping.args(["-n", "-c", "1", "-W", "1", &target]);
            let finished = run_bounded(&mut ping, dir, "ping", COMMAND_TIMEOUT)?;
            Ok(finished.status.success())
        })
    }
}

impl Daemon {
    /// Sends `signal` to the daemon, which is our own child.
    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid();
        if pid > 0 {
            // SAFETY: kill(2) on the pid of our own child, which the Daemon has not reaped, so
            // the pid cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

/// Host a's cable to the LAN that its umnet NIC port bridges.
const NIC_CABLE: &str = "lan1";

/// Host a's cable to the LAN that its Linux bridge carries, and the bridge.
const BRIDGE_CABLE: &str = "lan2";
const BRIDGE: &str = "brvx";

/// Gives the LAN machine its address of a LAN overlay. Host b answers ARP only on the device
/// that holds the address asked for, since a broadcast from the LAN reaches it over both LAN
/// overlays.
fn lan_side(hosts: &Hosts, system: System) -> Result<()> {
    hosts.sysctl(1, "net.ipv4.conf.all.arp_ignore", "1")?;
    let address = format!("{}/24", system.address(0));
    hosts.ip(MACHINE, &["addr", "add", &address, "dev", MACHINE_DEVICE])?;
    Ok(())
}

/// The umnet node name of a host.
fn node_name(host: &str) -> String {
    format!("bench-{host}")
}

/// The tinc node name of a host (tinc allows letters, digits and underscores).
fn tinc_name(host: usize) -> String {
    format!("bench_{}", HOST_NAMES[host])
}

/// Runs the umnet CLI against the node at `run_dir`, asking for JSON; returns its output.
fn umnet_cli(programs: &Programs, run_dir: &Path, args: &[&str], dir: &Path) -> Result<String> {
    let mut command = Command::new(&programs.umnet);
    command.args(args).arg("--json").arg("--run-dir").arg(run_dir);
    Ok(run_checked(&mut command, dir, "umnet-cli", COMMAND_TIMEOUT)?.stdout)
}

/// The state of peer `name` in the JSON `umnet peer list --json` prints.
fn peer_state(listed: &str, name: &str) -> Option<String> {
    let peers: Value = serde_json::from_str(listed).ok()?;
    let peer = peers.as_array()?.iter().find(|peer| peer["name"] == name)?;
    Some(peer["state"].as_str()?.to_string())
}

/// MIN and MAX from a tinc node line ending in `pmtu N (min MIN max MAX)`.
fn pmtu_range(line: &str) -> Option<(u32, u32)> {
    let (_, range) = line.rsplit_once("(min ")?;
    let (min, rest) = range.split_once(" max ")?;
    let max = rest.trim_end().strip_suffix(')')?;
    Some((min.trim().parse().ok()?, max.trim().parse().ok()?))
}

/// Polls `check` every 50 ms until it says yes; fails after `timeout`, on interruption, or as
/// soon as `check` fails.
pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check().with_context(|| format!("waiting for {what}"))? {
            return Ok(());
        }
        if crate::interrupted() {
            bail!("interrupted while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tinc_pmtu_range() {
        let line = " bench_b at 10.201.0.2 port 655 cipher 427 digest 672 maclength 4 \
                    compression 0 options 700000c status 001a nexthop bench_b via bench_b \
                    pmtu 1459 (min 1459 max 1459)";
        assert_eq!(pmtu_range(line), Some((1459, 1459)));
        assert_eq!(pmtu_range("pmtu 1518 (min 0 max 1518)"), Some((0, 1518)));
        assert_eq!(pmtu_range("no range here"), None);
    }

    #[test]
    fn finds_peer_state_in_peer_list() {
        let listed = r#"[{"name":"bench-b","state":"connecting"},{"name":"x","state":"y"}]"#;
        assert_eq!(peer_state(listed, "bench-b").as_deref(), Some("connecting"));
        assert_eq!(peer_state(listed, "bench-c"), None);
    }

    #[test]
    fn overlays_use_separate_subnets() {
        let systems =
            [System::Umnet, System::Tinc, System::Vxlan, System::UmnetNic, System::VxlanBridge];
        for (i, a) in systems.iter().enumerate() {
            for b in &systems[i + 1..] {
                assert_ne!(a.address(0).octets()[2], b.address(0).octets()[2]);
            }
        }
    }
}
