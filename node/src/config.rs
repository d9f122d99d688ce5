//! Where a node keeps its files, what its config file may say, and the state it persists.
//!
//! Three sources, in order: embedded defaults, an optional TOML config file, and the state
//! directory, which holds what was made with the CLI (networks, tap ports) so it survives a
//! restart. Command-line flags override directories.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use umnet_proto::admin::NetworkId;
use umnet_proto::ethernet::{HEADER_LEN, MAX_TAGGED_FRAME};

use crate::switch::{SwitchConfig, MIN_QUEUE};

/// The network a node serves when nothing says otherwise, as UM-Eth-Net did.
pub(crate) const DEFAULT_NETWORK: NetworkId = 100;

/// Name of the state file inside the state directory.
const STATE_FILE: &str = "state.toml";

/// The config file. Every field is optional; unknown fields are errors, so a typo is reported
/// rather than ignored.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Directory for sockets; `--run-dir` overrides.
    pub(crate) run_dir: Option<PathBuf>,
    /// Directory for persisted state; `--state-dir` overrides.
    pub(crate) state_dir: Option<PathBuf>,
    /// TCP address of the Prometheus endpoint; none when absent.
    pub(crate) metrics_listen: Option<String>,
    #[serde(default)]
    pub(crate) switch: SwitchSection,
    /// Networks to serve.
    #[serde(default, rename = "network")]
    pub(crate) networks: Vec<NetworkSection>,
    /// Tap ports to attach.
    #[serde(default, rename = "tap")]
    pub(crate) taps: Vec<DeviceSection>,
    /// NICs to bridge onto networks.
    #[serde(default, rename = "nic")]
    pub(crate) nics: Vec<DeviceSection>,
    #[serde(default)]
    pub(crate) federation: FederationSection,
    #[serde(default)]
    pub(crate) guests: GuestSection,
    /// Peers to dial.
    #[serde(default, rename = "peer")]
    pub(crate) peers: Vec<PeerSection>,
}

/// The UDP port a node listens on for peers unless told otherwise.
pub(crate) const DEFAULT_PEER_PORT: u16 = 7780;

/// `[federation]`: the QUIC endpoint and who may connect.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FederationSection {
    /// UDP address to listen on; `--listen` overrides.
    pub(crate) listen: String,
    /// Identity bundle; `--identity` overrides. Default: `STATE/identity.pem`.
    pub(crate) identity: Option<PathBuf>,
    /// `"cluster"`: any node with a certificate of the cluster CA may connect; `"listed"`:
    /// only configured peers.
    pub(crate) inbound: Inbound,
    /// Node names whose certificates are refused, and whose connections are closed.
    pub(crate) revoked_names: Vec<String>,
    /// Certificate fingerprints (SHA-256, as `umnet cert show` prints them) refused likewise.
    pub(crate) revoked_fingerprints: Vec<String>,
    /// Lower the MSS that TCP SYNs sent to peers announce, so the connection's frames fit one
    /// datagram instead of two.
    pub(crate) clamp_mss: bool,
}

impl Default for FederationSection {
    fn default() -> Self {
        FederationSection {
            listen: format!("0.0.0.0:{DEFAULT_PEER_PORT}"),
            identity: None,
            inbound: Inbound::Cluster,
            revoked_names: Vec::new(),
            revoked_fingerprints: Vec::new(),
            clamp_mss: true,
        }
    }
}

/// Who may open a connection to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Inbound {
    Cluster,
    Listed,
}

/// `[[peer]]`, in the config and state files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PeerSection {
    /// The peer's node name, as in its certificate.
    pub(crate) name: String,
    /// `HOST:PORT` it listens on.
    pub(crate) address: String,
}

/// `[guests]`: what guests may ask of the node in-band (`umnet guest set-net`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct GuestSection {
    /// Guests may move their own port to another network.
    pub(crate) set_net: bool,
    /// The networks they may choose; every network the node serves when empty.
    pub(crate) networks: Vec<NetworkId>,
}

impl GuestSection {
    /// The networks guests may choose: `None` when they may choose none, an empty set when
    /// they may choose any.
    pub(crate) fn policy(&self) -> Option<BTreeSet<NetworkId>> {
        self.set_net.then(|| self.networks.iter().copied().collect())
    }
}

/// `[switch]`: limits and timers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SwitchSection {
    /// Seconds a learned address is kept without traffic.
    pub(crate) mac_aging_secs: u64,
    /// Most addresses learned per network.
    pub(crate) mac_limit: usize,
    /// Longest frame switched, header and tags included.
    pub(crate) max_frame: usize,
    /// Frames queued per port for a slow client.
    pub(crate) port_queue: usize,
    /// Most ports a node serves at once.
    pub(crate) max_ports: usize,
    /// Permissions of the client sockets (`ctl`, `bess`), octal as a string.
    pub(crate) socket_mode: String,
    /// Microseconds the switch keeps polling after its last event before it sleeps.
    pub(crate) busy_poll_us: u64,
}

impl Default for SwitchSection {
    fn default() -> Self {
        SwitchSection {
            mac_aging_secs: 300,
            mac_limit: 4096,
            max_frame: MAX_TAGGED_FRAME,
            port_queue: 256,
            max_ports: 1024,
            socket_mode: "0660".into(),
            busy_poll_us: 50,
        }
    }
}

/// `[[network]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NetworkSection {
    pub(crate) id: NetworkId,
    /// Only these peers carry the network's frames; all peers when absent.
    pub(crate) peers: Option<Vec<String>>,
}

/// `[[tap]]` in the config file, and `[[nic]]` in the config and state files: a device and the
/// network it is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceSection {
    pub(crate) name: String,
    pub(crate) net: NetworkId,
}

/// A tap port in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SavedTap {
    pub(crate) name: String,
    pub(crate) net: NetworkId,
    /// The node created the device, and deletes it when the port is removed.
    #[serde(default)]
    pub(crate) created: bool,
}

impl Config {
    /// Reads and checks a config file.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))?;
        config.check().with_context(|| format!("config file {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        let s = &self.switch;
        if s.max_frame < HEADER_LEN + 46 || s.max_frame > 65_535 {
            bail!("switch.max_frame must be between 60 and 65535 bytes, not {}", s.max_frame);
        }
        if s.mac_limit == 0 {
            bail!("switch.mac_limit must be at least 1");
        }
        if s.mac_aging_secs == 0 {
            bail!("switch.mac_aging_secs must be at least 1");
        }
        if s.port_queue < MIN_QUEUE || s.port_queue > 65_536 {
            bail!("switch.port_queue must be between {MIN_QUEUE} and 65536, not {}", s.port_queue);
        }
        if s.busy_poll_us > 10_000 {
            bail!("switch.busy_poll_us must be at most 10000, not {}", s.busy_poll_us);
        }
        if s.max_ports == 0 {
            bail!("switch.max_ports must be at least 1");
        }
        self.socket_mode()?;
        if let Some(listen) = &self.metrics_listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                bail!(
                    "metrics_listen must be an address and port such as \"127.0.0.1:9110\", \
                     not {listen:?}"
                );
            }
        }
        if self.federation.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "federation.listen must be an address and port such as \"0.0.0.0:7780\", not {:?}",
                self.federation.listen
            );
        }
        for peer in &self.peers {
            umnet_certs::validate_node_name(&peer.name)
                .with_context(|| format!("[[peer]] {:?}", peer.name))?;
        }
        for (kind, device) in
            self.taps.iter().map(|t| ("tap", t)).chain(self.nics.iter().map(|n| ("nic", n)))
        {
            if !self.networks.iter().any(|n| n.id == device.net) {
                bail!(
                    "{kind} {} is on network {}, which no [[network]] declares",
                    device.name,
                    device.net
                );
            }
        }
        Ok(())
    }

    /// The client socket mode as a number.
    pub(crate) fn socket_mode(&self) -> anyhow::Result<u32> {
        let text = self.switch.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(text, 8) {
            Ok(mode) if mode <= 0o777 => Ok(mode),
            _ => bail!("switch.socket_mode must be an octal mode such as \"0660\", not {text:?}"),
        }
    }

    /// The switch's settings.
    pub(crate) fn switch_config(&self) -> SwitchConfig {
        SwitchConfig {
            aging: Duration::from_secs(self.switch.mac_aging_secs),
            mac_limit: self.switch.mac_limit,
            max_frame: self.switch.max_frame,
            queue_len: self.switch.port_queue,
            max_ports: self.switch.max_ports,
            busy_poll: Duration::from_micros(self.switch.busy_poll_us),
            guest_networks: self.guests.policy(),
        }
    }
}

/// What a node made at run time and must restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    #[serde(default)]
    pub(crate) networks: BTreeSet<NetworkId>,
    #[serde(default, rename = "tap")]
    pub(crate) taps: Vec<SavedTap>,
    #[serde(default, rename = "nic")]
    pub(crate) nics: Vec<DeviceSection>,
    #[serde(default, rename = "peer")]
    pub(crate) peers: Vec<PeerSection>,
}

impl State {
    /// Reads the state of `dir`; `None` when the node never saved any there.
    pub(crate) fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()))
            }
        };
        let state = toml::from_str(&text).with_context(|| {
            format!("state file {} is damaged; move it aside to start afresh", path.display())
        })?;
        Ok(Some(state))
    }

    /// Writes the state of `dir` atomically: a reader sees the old file or the new one, even
    /// if the node dies while writing.
    pub(crate) fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(STATE_FILE);
        let temporary = dir.join(format!(".{STATE_FILE}.tmp"));
        let text = toml::to_string(self).context("cannot encode state")?;
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temporary)?;
            file.write_all(b"# Written by umnet: networks and tap ports made with the CLI.\n")?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }
}

/// The default run directory: `/run/umnet` for root, `$XDG_RUNTIME_DIR/umnet` otherwise.
pub(crate) fn default_run_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/umnet");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("umnet"),
        _ => std::env::temp_dir().join(format!("umnet-{}", nix::unistd::geteuid())),
    }
}

/// The default state directory: `/var/lib/umnet` for root, `$XDG_STATE_HOME/umnet` (or
/// `~/.local/state/umnet`) otherwise.
pub(crate) fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/umnet");
    }
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir).join("umnet"),
        (_, Some(home)) => PathBuf::from(home).join(".local/state/umnet"),
        _ => std::env::temp_dir().join(format!("umnet-state-{}", nix::unistd::geteuid())),
    }
}

/// Where the clients of network `net` attach, under the run directory.
pub(crate) fn network_dir(run_dir: &Path, net: NetworkId) -> PathBuf {
    run_dir.join(format!("net{net}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_defaults() {
        let config: Config = toml::from_str("").unwrap();
        config.check().unwrap();
        assert_eq!(config.switch.mac_aging_secs, 300);
        assert_eq!(config.switch.max_frame, 1518);
        assert_eq!(config.socket_mode().unwrap(), 0o660);
        assert!(config.networks.is_empty());
    }

    #[test]
    fn full_config() {
        let text = r#"
            run_dir = "/tmp/r"
            [switch]
            mac_aging_secs = 60
            mac_limit = 10
            socket_mode = "0666"
            [[network]]
            id = 100
            [[network]]
            id = 101
            [[tap]]
            name = "tap0"
            net = 101
        "#;
        let config: Config = toml::from_str(text).unwrap();
        config.check().unwrap();
        assert_eq!(config.networks.len(), 2);
        assert_eq!(config.taps[0], DeviceSection { name: "tap0".into(), net: 101 });
        assert_eq!(config.switch_config().aging, Duration::from_secs(60));
    }

    #[test]
    fn the_example_config_is_valid_and_holds_the_defaults() {
        let text = include_str!("../../deploy/umnet.toml");
        let config: Config = toml::from_str(text).unwrap();
        config.check().unwrap();
        let defaults = Config::default();
        assert_eq!(config.switch.mac_limit, defaults.switch.mac_limit);
        assert_eq!(config.switch.busy_poll_us, defaults.switch.busy_poll_us);
        assert_eq!(config.federation.listen, defaults.federation.listen);
        assert_eq!(config.federation.inbound, defaults.federation.inbound);
    }

    #[test]
    fn bad_configs_are_refused_with_reasons() {
        assert!(toml::from_str::<Config>("[switch]\nmac_agin_secs = 1").is_err(), "typo");
        let bad = [
            ("[switch]\nmax_frame = 10", "max_frame"),
            ("[switch]\nmac_limit = 0", "mac_limit"),
            ("[switch]\nsocket_mode = \"rw\"", "socket_mode"),
            ("[[tap]]\nname = \"t\"\nnet = 5", "no [[network]]"),
            ("[[nic]]\nname = \"eth1\"\nnet = 5", "nic eth1 is on network 5"),
        ];
        for (text, expected) in bad {
            let config: Config = toml::from_str(text).unwrap();
            let error = config.check().unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = std::env::temp_dir().join(format!("umnet-state-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), None);
        let state = State {
            networks: [100, 101].into(),
            taps: vec![SavedTap { name: "tap0".into(), net: 100, created: true }],
            nics: vec![DeviceSection { name: "eth1".into(), net: 101 }],
            peers: vec![PeerSection { name: "b".into(), address: "10.9.0.2:7780".into() }],
        };
        state.save(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), Some(state));
        fs::write(dir.join(STATE_FILE), "networks = 7").unwrap();
        assert!(State::load(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
