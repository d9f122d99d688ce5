//! A running node: its directories, networks and tap ports, and the tasks that serve them.
//!
//! [`run`] starts the switch, opens each network's client sockets, restores tap ports,
//! serves the admin socket and waits for SIGINT or SIGTERM. [`Node`] holds what the control
//! tasks share; every change to networks and tap ports goes through it, and is persisted.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::sync::oneshot;
use umnet_proto::admin::{self, Attach, ErrorKind, NetworkId, PortKind, Reply, Request};

use crate::config::{self, Config, DeviceSection, PeerSection, SavedTap, State, DEFAULT_NETWORK};
use crate::peers::Federation;
use crate::rejects::RejectCounters;
use crate::switch::{self, Command, Link, NewPort, NicLink, PortId};
use crate::{control, sys};

/// Where a node's directories and config come from.
#[derive(Debug, Default)]
pub(crate) struct Options {
    pub(crate) config: Option<PathBuf>,
    pub(crate) run_dir: Option<PathBuf>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) identity: Option<PathBuf>,
    pub(crate) listen: Option<String>,
}

/// Name of the lock file that marks a run directory as in use by a live node.
const LOCK_NAME: &str = "node.lock";

/// What the control tasks share.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) run_dir: PathBuf,
    pub(crate) state_dir: PathBuf,
    pub(crate) switch: switch::Handle,
    pub(crate) rejects: Arc<RejectCounters>,
    pub(crate) socket_mode: u32,
    pub(crate) started: Instant,
    /// The node's name: its certificate's, or the host's without one. NIC ports put it in
    /// their beacons.
    node_name: String,
    /// Peers, when the node has an identity.
    federation: Option<Arc<Federation>>,
    /// The config file as last read, to tell what a SIGHUP changes.
    config: Mutex<Config>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Served networks and the task accepting their control connections.
    networks: BTreeMap<NetworkId, tokio::task::AbortHandle>,
    /// What is persisted.
    state: State,
    /// Tap and NIC ports by device name.
    devices: BTreeMap<String, DevicePort>,
    /// Control connections of daemon and libvdeplug ports: dropping the sender closes it.
    control_connections: HashMap<PortId, oneshot::Sender<()>>,
}

#[derive(Debug, Clone, Copy)]
struct DevicePort {
    id: PortId,
    kind: PortKind,
    /// The node created the device (a tap): it deletes it when the port is removed.
    created: bool,
}

/// Runs a node until SIGINT or SIGTERM.
pub(crate) fn run(options: Options) -> anyhow::Result<()> {
    let config = match &options.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let run_dir =
        options.run_dir.or_else(|| config.run_dir.clone()).unwrap_or_else(config::default_run_dir);
    let state_dir = options
        .state_dir
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(config::default_state_dir);
    let socket_mode = config.socket_mode()?;

    create_dir(&run_dir, 0o755)?;
    create_dir(&state_dir, 0o700)?;
    let lock = lock_run_dir(&run_dir)?;
    let state = initial_state(&config, &state_dir)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let federation = FederationOptions {
        identity: options.identity,
        listen: options.listen,
        config: options.config.clone(),
    };
    let result =
        runtime.block_on(serve(config, state, run_dir.clone(), state_dir, socket_mode, federation));
    let _ = fs::remove_file(run_dir.join(LOCK_NAME));
    drop(lock);
    result
}

/// Where the node's identity is and where it listens for peers.
#[derive(Debug)]
struct FederationOptions {
    identity: Option<PathBuf>,
    listen: Option<String>,
    /// The config file, read again on SIGHUP for its revocation list.
    config: Option<PathBuf>,
}

async fn serve(
    config: Config,
    state: State,
    run_dir: PathBuf,
    state_dir: PathBuf,
    socket_mode: u32,
    federation: FederationOptions,
) -> anyhow::Result<()> {
    let rejects = Arc::new(RejectCounters::default());
    let (switch, switcher) =
        switch::new(config.switch_config(), rejects.clone()).context("cannot start the switch")?;
    let switch_task = tokio::spawn(switcher.run());

    // Networks from the config file and the state directory.
    let mut networks: Vec<NetworkId> = config.networks.iter().map(|n| n.id).collect();
    networks.extend(state.networks.iter().copied());
    networks.sort_unstable();
    networks.dedup();

    let config_path = federation.config.clone();
    let federation =
        crate::federation::start(&config, &federation.identity, &federation.listen, &state_dir)
            .map(|start| {
                start.map(|(settings, endpoint, client)| {
                    Federation::new(
                        settings,
                        endpoint,
                        client,
                        switch.clone(),
                        networks.iter().copied().collect(),
                    )
                })
            })?;
    let node_name = match &federation {
        Some(federation) => federation.name().to_string(),
        None => fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_else(|_| "umnet".into()),
    };
    let node = Arc::new(Node {
        run_dir: run_dir.clone(),
        state_dir,
        switch,
        rejects,
        socket_mode,
        started: Instant::now(),
        node_name,
        federation,
        config: Mutex::new(config.clone()),
        inner: Mutex::new(Inner { state: state.clone(), ..Inner::default() }),
    });
    for &net in &networks {
        node.open_network(net).with_context(|| format!("cannot serve network {net}"))?;
    }
    if let Some(federation) = &node.federation {
        tokio::spawn(federation.clone().accept());
        tokio::spawn(federation.clone().watch_expiry());
        let mut peers = config.peers.clone();
        for peer in &state.peers {
            if !peers.iter().any(|p| p.name == peer.name) {
                peers.push(peer.clone());
            }
        }
        for peer in peers {
            federation.add_peer(&peer.name, &peer.address);
        }
    }

    // Tap ports: a tap that cannot be restored is reported, and the rest of the node runs.
    let mut taps = state.taps.clone();
    for tap in &config.taps {
        if !taps.iter().any(|t| t.name == tap.name) {
            taps.push(SavedTap { name: tap.name.clone(), net: tap.net, created: false });
        }
    }
    for tap in taps {
        if let Err(error) = node.open_tap(&tap.name, tap.net, tap.created) {
            tracing::error!(tap = %tap.name, net = tap.net, %error, "cannot restore tap port");
        }
    }
    let mut nics = state.nics.clone();
    for nic in &config.nics {
        if !nics.iter().any(|n| n.name == nic.name) {
            nics.push(nic.clone());
        }
    }
    for nic in nics {
        // An interface that is not there yet is waited for: it may come up after the node.
        if let Err(error) = node.open_nic(&nic.name, nic.net, true) {
            tracing::error!(nic = %nic.name, net = nic.net, %error, "cannot restore NIC port");
        }
    }

    let admin_path = run_dir.join(admin::SOCKET_NAME);
    remove_stale(&admin_path)?;
    let admin = tokio::net::UnixListener::bind(&admin_path)
        .with_context(|| format!("cannot listen on {}", admin_path.display()))?;
    fs::set_permissions(&admin_path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", admin_path.display()))?;

    print_attach_help(&run_dir, &networks);
    tracing::info!(
        run_dir = %run_dir.display(),
        state_dir = %node.state_dir.display(),
        networks = networks.len(),
        "node started"
    );
    let admin_task = tokio::spawn(crate::admin::serve(node.clone(), admin));
    let metrics_task = match &config.metrics_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen for metrics scrapes on {listen}"))?;
            tracing::info!(listen = %listener.local_addr()?, "serving metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(node.clone(), listener)))
        }
        None => None,
    };

    wait_for_signal(&node, config_path.as_deref()).await?;
    tracing::info!("stopping");
    admin_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(federation) = &node.federation {
        federation.close().await;
    }
    node.switch.send(Command::Shutdown);
    if switch_task.await.is_err() {
        tracing::error!("the switch panicked");
    }
    node.close_all();
    let _ = fs::remove_file(&admin_path);
    tracing::info!("node stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM, reloading the config file on each SIGHUP.
async fn wait_for_signal(node: &Arc<Node>, config: Option<&Path>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => node.reload(config).await,
        }
    }
}

/// Networks and taps from the state directory, or the embedded default network when this
/// node never saved state and its config declares no network.
fn initial_state(config: &Config, state_dir: &Path) -> anyhow::Result<State> {
    if let Some(state) = State::load(state_dir)? {
        return Ok(state);
    }
    let mut state = State::default();
    if config.networks.is_empty() {
        state.networks.insert(DEFAULT_NETWORK);
    }
    Ok(state)
}

fn create_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set permissions of {}", dir.display()))?;
    }
    Ok(())
}

/// Takes the run directory's lock, held until the node exits (the kernel drops it even if
/// the node is killed), so a second node cannot take over a live node's sockets while stale
/// sockets of a dead one are replaced.
fn lock_run_dir(run_dir: &Path) -> anyhow::Result<fs::File> {
    use std::io::Write;
    let path = run_dir.join(LOCK_NAME);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let locked = sys::try_lock(&file).with_context(|| format!("cannot lock {}", path.display()))?;
    if !locked {
        let pid = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another umnet node (pid {}) is running with run directory {}; stop it, or give \
             this node its own --run-dir",
            pid.trim(),
            run_dir.display()
        );
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

fn remove_stale(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Attach paths of network `net`.
pub(crate) fn attach(run_dir: &Path, net: NetworkId) -> Attach {
    let dir = config::network_dir(run_dir, net);
    Attach {
        vde_dir: dir.display().to_string(),
        ctl: dir.join("ctl").display().to_string(),
        bess: dir.join("bess").display().to_string(),
    }
}

/// The exact strings each kind of client uses to attach to `net`.
pub(crate) fn attach_help(run_dir: &Path, net: NetworkId) -> String {
    let a = attach(run_dir, net);
    format!(
        "network {net}\n  \
         UML daemon transport   eth0=daemon,,unix,{ctl}\n  \
         UML vde transport      eth0=vde,{dir}\n  \
         UML vector (BESS)      vec0:transport=bess,dst={bess}\n  \
         vde_plug               vde_plug {dir}\n  \
         QEMU                   -netdev vde,id=n{net},sock={dir} \
         -device virtio-net,netdev=n{net}\n",
        ctl = a.ctl,
        dir = a.vde_dir,
        bess = a.bess,
    )
}

fn print_attach_help(run_dir: &Path, networks: &[NetworkId]) {
    let mut text = String::new();
    for &net in networks {
        text.push_str(&attach_help(run_dir, net));
    }
    print!("{text}");
}

fn refused(kind: ErrorKind, message: impl Into<String>) -> admin::Error {
    admin::Error::new(kind, message)
}

impl Node {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Carries out one admin request.
    pub(crate) async fn handle(self: &Arc<Self>, request: Request) -> Result<Reply, admin::Error> {
        match request {
            Request::Status => self.status().await,
            Request::NetList => Ok(Reply::Networks(self.networks(None).await?)),
            Request::NetAdd { net } => {
                self.add_network(net)?;
                Ok(Reply::Networks(self.networks(Some(net)).await?))
            }
            Request::NetRm { net, force } => {
                self.remove_network(net, force).await?;
                Ok(Reply::Done)
            }
            Request::PortList => {
                Ok(Reply::Ports(self.switch.ask(|reply| Command::Ports { reply }).await?))
            }
            Request::PortAddTap { name, net } => {
                let port = self.add_tap(&name, net)?;
                Ok(Reply::Ports(vec![port]))
            }
            Request::PortAddNic { name, net } => {
                let port = self.open_nic(&name, net, false)?;
                self.update_state(|state| {
                    state.nics.retain(|nic| nic.name != name);
                    state.nics.push(DeviceSection { name: name.clone(), net });
                })?;
                Ok(Reply::Ports(vec![port]))
            }
            Request::PortSet { port, net } => {
                let id = self.resolve_port(&port)?;
                let port = self.switch.ask(|reply| Command::SetNetwork { port: id, net, reply });
                let port = port.await??;
                self.moved_port(&port)?;
                Ok(Reply::Ports(vec![port]))
            }
            Request::PortRm { port } => {
                self.remove_device(&port).await?;
                Ok(Reply::Done)
            }
            Request::Fdb { net } => {
                Ok(Reply::Fdb(self.switch.ask(|reply| Command::Fdb { net, reply }).await??))
            }
            Request::PeerList => Ok(Reply::Peers(self.federation()?.list())),
            Request::Capture { .. } => Err(refused(
                ErrorKind::Invalid,
                "a capture takes over its connection; the admin server starts it",
            )),
            Request::PeerAdd { name, address } => {
                self.add_peer(&name, &address)?;
                let peers = self.federation()?.list();
                Ok(Reply::Peers(peers.into_iter().filter(|p| p.name == name).collect()))
            }
            Request::PeerRm { name } => {
                if !self.federation()?.remove_peer(&name) {
                    return Err(refused(ErrorKind::NotFound, format!("no peer {name}")));
                }
                self.update_state(|state| state.peers.retain(|peer| peer.name != name))?;
                Ok(Reply::Done)
            }
        }
    }

    fn federation(&self) -> Result<&Arc<Federation>, admin::Error> {
        self.federation.as_ref().ok_or_else(|| {
            refused(
                ErrorKind::Invalid,
                "this node has no identity, so it has no peers; issue one with `umnet ca issue \
                 NAME` on the CA host and start the node with --identity FILE",
            )
        })
    }

    fn add_peer(&self, name: &str, address: &str) -> Result<(), admin::Error> {
        let federation = self.federation()?;
        umnet_certs::validate_node_name(name)
            .map_err(|error| refused(ErrorKind::Invalid, error.to_string()))?;
        let port = address.rsplit_once(':').and_then(|(host, port)| {
            (!host.is_empty()).then(|| port.parse::<u16>().ok()).flatten()
        });
        if port.is_none() {
            return Err(refused(
                ErrorKind::Invalid,
                format!("peer address must be HOST:PORT, not {address:?}"),
            ));
        }
        federation.add_peer(name, address);
        self.update_state(|state| {
            state.peers.retain(|peer| peer.name != name);
            state.peers.push(PeerSection { name: name.to_string(), address: address.to_string() });
        })
    }

    /// Reads the config file again and applies what changed, leaving alone every network,
    /// port and peer that did not: new networks, taps, NICs and peers are added, those gone
    /// from the file (and not made with the CLI) are removed, allow lists, the inbound rule and
    /// revocations take effect, and a renewed certificate is used for new connections. A file
    /// that does not load changes nothing.
    async fn reload(self: &Arc<Self>, path: Option<&Path>) {
        let Some(path) = path else {
            tracing::warn!("SIGHUP: the node was started without --config; nothing to reload");
            return;
        };
        let config = match Config::load(path) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(config = %path.display(), "SIGHUP: config not reloaded: {error:#}");
                return;
            }
        };
        let old = std::mem::replace(&mut *lock(&self.config), config.clone());
        let saved = self.inner().state.clone();
        if old.switch != config.switch {
            tracing::warn!("SIGHUP: [switch] settings take effect when the node restarts");
        }
        if old.guests != config.guests {
            self.switch.send(Command::SetGuestPolicy { networks: config.guests.policy() });
            tracing::info!(set_net = config.guests.set_net, "SIGHUP: guest policy changed");
        }

        // Step 1: networks, then the devices on them.
        for net in config.networks.iter().map(|n| n.id) {
            if !self.inner().networks.contains_key(&net) {
                match self.open_network(net) {
                    Ok(()) => self.networks_changed(),
                    Err(error) => tracing::error!(net, "SIGHUP: cannot serve network: {error:#}"),
                }
            }
        }
        for device in old.taps.iter().chain(&old.nics) {
            let kept = config.taps.iter().chain(&config.nics).any(|d| d.name == device.name);
            let made_with_cli = saved.taps.iter().any(|t| t.name == device.name)
                || saved.nics.iter().any(|n| n.name == device.name);
            if !kept && !made_with_cli {
                if let Err(error) = self.remove_device(&device.name).await {
                    tracing::error!(port = %device.name, "SIGHUP: cannot remove: {error}");
                }
            }
        }
        let gone = old.networks.iter().map(|n| n.id).filter(|net| {
            !config.networks.iter().any(|n| n.id == *net) && !saved.networks.contains(net)
        });
        for net in gone.collect::<Vec<_>>() {
            if let Err(error) = self.remove_network(net, false).await {
                tracing::warn!(net, "SIGHUP: network left in place: {error}");
            }
        }
        for tap in &config.taps {
            if !self.inner().devices.contains_key(&tap.name) {
                if let Err(error) = self.open_tap(&tap.name, tap.net, false) {
                    tracing::error!(tap = %tap.name, "SIGHUP: cannot open tap port: {error}");
                }
            }
        }
        for nic in &config.nics {
            if !self.inner().devices.contains_key(&nic.name) {
                if let Err(error) = self.open_nic(&nic.name, nic.net, true) {
                    tracing::error!(nic = %nic.name, "SIGHUP: cannot open NIC port: {error}");
                }
            }
        }

        // Step 2: federation.
        let Some(federation) = &self.federation else {
            if !config.peers.is_empty() {
                tracing::warn!(
                    "SIGHUP: the config names peers, and this node has no identity; start it \
                     with one to join a cluster"
                );
            }
            return;
        };
        federation.set_policy(crate::federation::Policy::of(&config));
        let dialed = federation.configured();
        for peer in &config.peers {
            if dialed.get(&peer.name) != Some(&peer.address) {
                tracing::info!(peer = %peer.name, address = %peer.address, "SIGHUP: peer added");
                federation.add_peer(&peer.name, &peer.address);
            }
        }
        for peer in &old.peers {
            let kept = config.peers.iter().any(|p| p.name == peer.name)
                || saved.peers.iter().any(|p| p.name == peer.name);
            if !kept && federation.remove_peer(&peer.name) {
                tracing::info!(peer = %peer.name, "SIGHUP: peer removed");
            }
        }
        match federation.reload_identity() {
            Ok(true) => tracing::info!("SIGHUP: new certificate in use for new connections"),
            Ok(false) => {}
            Err(error) => tracing::error!("SIGHUP: certificate not reloaded: {error:#}"),
        }
        let names = &config.federation.revoked_names;
        let fingerprints = &config.federation.revoked_fingerprints;
        match federation.revoke(names, fingerprints) {
            Ok(closed) => tracing::info!(
                names = names.len(),
                fingerprints = fingerprints.len(),
                closed,
                "SIGHUP: revocation list applied"
            ),
            Err(error) => tracing::error!("SIGHUP: revocation list not applied: {error}"),
        }
        tracing::info!(config = %path.display(), "SIGHUP: config reloaded");
    }

    /// Removes the tap or NIC port on device `name`.
    async fn remove_device(&self, name: &str) -> Result<(), admin::Error> {
        let id = self.resolve_port(name)?;
        let reply = self.switch.ask(|reply| Command::RemovePort { port: id, reply: Some(reply) });
        let port = reply.await??;
        self.forget_ports(&[port.id])
    }

    /// Tells peers which networks the node serves now.
    fn networks_changed(&self) {
        if let Some(federation) = &self.federation {
            federation.set_local(self.inner().networks.keys().copied().collect());
        }
    }

    async fn status(&self) -> Result<Reply, admin::Error> {
        let networks = self.switch.ask(|reply| Command::Networks { reply }).await?;
        Ok(Reply::Status(Box::new(admin::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            run_dir: self.run_dir.display().to_string(),
            state_dir: self.state_dir.display().to_string(),
            networks: networks.len(),
            ports: networks.iter().map(|n| n.ports).sum(),
            rejects: self.rejects.snapshot(),
            federation: self.federation.as_ref().map(|f| f.status()),
        })))
    }

    async fn networks(&self, only: Option<NetworkId>) -> Result<Vec<admin::Network>, admin::Error> {
        let summaries = self.switch.ask(|reply| Command::Networks { reply }).await?;
        Ok(summaries
            .into_iter()
            .filter(|s| only.is_none_or(|net| net == s.id))
            .map(|s| admin::Network {
                id: s.id,
                ports: s.ports,
                macs: s.macs,
                mac_limit: s.mac_limit,
                mac_limit_hits: s.mac_limit_hits,
                mac_flaps: s.mac_flaps,
                attach: attach(&self.run_dir, s.id),
            })
            .collect())
    }

    /// Opens network `net`'s directory and sockets and hands it to the switch.
    fn open_network(self: &Arc<Self>, net: NetworkId) -> anyhow::Result<()> {
        let dir = config::network_dir(&self.run_dir, net);
        create_dir(&dir, 0o755)?;
        let ctl_path = dir.join("ctl");
        let bess_path = dir.join("bess");
        remove_stale(&ctl_path)?;
        remove_stale(&bess_path)?;

        let ctl = std::os::unix::net::UnixListener::bind(&ctl_path)
            .with_context(|| format!("cannot listen on {}", ctl_path.display()))?;
        ctl.set_nonblocking(true)?;
        let ctl = tokio::net::UnixListener::from_std(ctl)?;
        let bess = sys::seqpacket_listener(&bess_path)
            .with_context(|| format!("cannot listen on {}", bess_path.display()))?;
        for path in [&ctl_path, &bess_path] {
            fs::set_permissions(path, fs::Permissions::from_mode(self.socket_mode))
                .with_context(|| format!("cannot set permissions of {}", path.display()))?;
        }

        self.switch.send(Command::AddNetwork { net, bess });
        let task = tokio::spawn(control::serve(self.clone(), net, ctl));
        self.inner().networks.insert(net, task.abort_handle());
        tracing::info!(net, dir = %dir.display(), "network served");
        Ok(())
    }

    fn add_network(self: &Arc<Self>, net: NetworkId) -> Result<(), admin::Error> {
        if self.inner().networks.contains_key(&net) {
            return Err(refused(ErrorKind::Exists, format!("network {net} exists already")));
        }
        self.open_network(net).map_err(|e| refused(ErrorKind::Internal, format!("{e:#}")))?;
        self.networks_changed();
        self.update_state(|state| {
            state.networks.insert(net);
        })
    }

    async fn remove_network(&self, net: NetworkId, force: bool) -> Result<(), admin::Error> {
        if !self.inner().networks.contains_key(&net) {
            return Err(refused(ErrorKind::NotFound, format!("no network {net}")));
        }
        let ports = self.switch.ask(|reply| Command::RemoveNetwork { net, force, reply }).await??;
        self.forget_ports(&ports)?;
        if let Some(task) = self.inner().networks.remove(&net) {
            task.abort();
        }
        close_network_dir(&self.run_dir, net);
        self.networks_changed();
        tracing::info!(net, ports = ports.len(), "network removed");
        self.update_state(|state| {
            state.networks.remove(&net);
            state.taps.retain(|tap| tap.net != net);
            state.nics.retain(|nic| nic.net != net);
        })
    }

    /// Opens tap `name` and attaches it to `net`. A tap the node creates is made persistent,
    /// so the addresses and routes the host gives it survive a node restart; it is deleted
    /// when the port is removed. `created` says the node created it in an earlier run.
    fn open_tap(
        &self,
        name: &str,
        net: NetworkId,
        created: bool,
    ) -> Result<(admin::Port, bool), admin::Error> {
        if !self.inner().networks.contains_key(&net) {
            return Err(refused(ErrorKind::NotFound, format!("no network {net}")));
        }
        if self.inner().devices.contains_key(name) {
            return Err(refused(ErrorKind::Exists, format!("{name} is a port already")));
        }
        let created = created || !sys::interface_exists(name);
        let fd = sys::open_tap(name).map_err(|error| tap_error(name, &error))?;
        if created {
            sys::set_tap_persist(&fd, true).map_err(|error| tap_error(name, &error))?;
        }
        sys::set_link_up(name).map_err(|error| tap_error(name, &error))?;

        let id = self.switch.next_port_id();
        let port = admin::Port {
            id,
            kind: PortKind::Tap,
            net,
            client: name.to_string(),
            pid: None,
            counters: Default::default(),
            state: None,
        };
        let client = name.to_string();
        let link = Link::Device(fd);
        let new = NewPort { id, kind: PortKind::Tap, net, client, pid: None, link };
        self.switch.send(Command::AddPort { port: new, attached: None });
        let device = DevicePort { id, kind: PortKind::Tap, created };
        self.inner().devices.insert(name.to_string(), device);
        tracing::info!(tap = name, net, created, "tap port opened");
        Ok((port, created))
    }

    /// Bridges interface `name` onto `net` through a packet socket. When `restoring`, an
    /// interface that does not exist (yet) is waited for; asked for by an operator, it is an
    /// error, so a mistyped name is reported rather than waited for.
    fn open_nic(
        &self,
        name: &str,
        net: NetworkId,
        restoring: bool,
    ) -> Result<admin::Port, admin::Error> {
        if !self.inner().networks.contains_key(&net) {
            return Err(refused(ErrorKind::NotFound, format!("no network {net}")));
        }
        if self.inner().devices.contains_key(name) {
            return Err(refused(ErrorKind::Exists, format!("{name} is a port already")));
        }
        if name == "lo" {
            return Err(refused(ErrorKind::Invalid, "the loopback interface carries no Ethernet"));
        }
        let socket = match sys::open_packet_socket(name) {
            Ok(socket) => Some(socket),
            Err(error) => match nic_error(name, &error) {
                missing if restoring && missing.kind == ErrorKind::NotFound => {
                    tracing::warn!(
                        nic = name,
                        net,
                        "interface not found; the NIC port waits for it"
                    );
                    None
                }
                refusal => return Err(refusal),
            },
        };
        let link = NicLink::new(&self.node_name, name, socket, net, Instant::now());

        let id = self.switch.next_port_id();
        let client = name.to_string();
        let new =
            NewPort { id, kind: PortKind::Nic, net, client, pid: None, link: Link::Nic(link) };
        self.switch.send(Command::AddPort { port: new, attached: None });
        let device = DevicePort { id, kind: PortKind::Nic, created: false };
        self.inner().devices.insert(name.to_string(), device);
        tracing::info!(nic = name, net, "NIC port opened");
        Ok(admin::Port {
            id,
            kind: PortKind::Nic,
            net,
            client: name.to_string(),
            pid: None,
            counters: Default::default(),
            state: Some("listening".into()),
        })
    }

    fn add_tap(&self, name: &str, net: NetworkId) -> Result<admin::Port, admin::Error> {
        let (port, created) = self.open_tap(name, net, false)?;
        self.update_state(|state| {
            state.taps.retain(|tap| tap.name != name);
            state.taps.push(SavedTap { name: name.to_string(), net, created });
        })?;
        Ok(port)
    }

    /// A port id, or the device name of a tap or NIC port.
    pub(crate) fn resolve_port(&self, port: &str) -> Result<PortId, admin::Error> {
        if let Some(device) = self.inner().devices.get(port) {
            return Ok(device.id);
        }
        port.parse().map_err(|_| {
            refused(
                ErrorKind::NotFound,
                format!("no port {port:?} (give a port id, or a tap or NIC name)"),
            )
        })
    }

    /// Records a tap or NIC port's new network; one the config file declared is saved from
    /// now on, so the move survives a restart.
    fn moved_port(&self, port: &admin::Port) -> Result<(), admin::Error> {
        let inner = self.inner();
        let found = inner.devices.iter().find(|(_, d)| d.id == port.id);
        let Some((name, device)) = found.map(|(name, device)| (name.clone(), *device)) else {
            return Ok(());
        };
        drop(inner);
        let net = port.net;
        self.update_state(|state| match device.kind {
            PortKind::Nic => {
                state.nics.retain(|nic| nic.name != name);
                state.nics.push(DeviceSection { name, net });
            }
            _ => {
                state.taps.retain(|tap| tap.name != name);
                state.taps.push(SavedTap { name, net, created: device.created });
            }
        })
    }

    /// Closes what the control side holds for ports the switch removed: their control
    /// connections, and their taps and NICs (deleting the taps the node created).
    fn forget_ports(&self, ports: &[PortId]) -> Result<(), admin::Error> {
        let mut names = Vec::new();
        {
            let mut inner = self.inner();
            for id in ports {
                inner.control_connections.remove(id);
                let found = inner.devices.iter().find(|(_, device)| device.id == *id);
                let Some((name, device)) = found.map(|(name, d)| (name.clone(), *d)) else {
                    continue;
                };
                inner.devices.remove(&name);
                if device.kind == PortKind::Tap && device.created {
                    delete_tap(&name);
                }
                names.push(name);
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        self.update_state(|state| {
            state.taps.retain(|tap| !names.contains(&tap.name));
            state.nics.retain(|nic| !names.contains(&nic.name));
        })
    }

    /// Registers the control connection of a daemon or libvdeplug port; the returned receiver
    /// fires when the port is removed from the node's side.
    pub(crate) fn control_connection(&self, id: PortId) -> oneshot::Receiver<()> {
        let (close, closed) = oneshot::channel();
        self.inner().control_connections.insert(id, close);
        closed
    }

    /// Forgets a control connection the client closed.
    pub(crate) fn control_closed(&self, id: PortId) {
        self.inner().control_connections.remove(&id);
    }

    fn update_state(&self, change: impl FnOnce(&mut State)) -> Result<(), admin::Error> {
        let state = {
            let mut inner = self.inner();
            change(&mut inner.state);
            inner.state.clone()
        };
        state.save(&self.state_dir).map_err(|error| {
            tracing::error!(error = %format!("{error:#}"), "cannot persist state");
            refused(ErrorKind::Internal, format!("done, but not persisted: {error:#}"))
        })
    }

    /// Removes every network's sockets, at shutdown.
    fn close_all(&self) {
        let mut inner = self.inner();
        inner.control_connections.clear();
        for (net, task) in std::mem::take(&mut inner.networks) {
            task.abort();
            close_network_dir(&self.run_dir, net);
        }
    }
}

/// Locks `mutex`; a panic while holding one of the node's locks leaves data that is still
/// consistent enough to report and shut down with.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn close_network_dir(run_dir: &Path, net: NetworkId) {
    let dir = config::network_dir(run_dir, net);
    for name in ["ctl", "bess"] {
        let _ = fs::remove_file(dir.join(name));
    }
    // Left in place if clients keep files of their own there.
    let _ = fs::remove_dir(&dir);
}

/// Deletes a persistent tap the node created: attach to it once more and clear the flag, so
/// it goes when this last descriptor closes.
fn delete_tap(name: &str) {
    let result = sys::open_tap(name).and_then(|fd| sys::set_tap_persist(&fd, false));
    match result {
        Ok(()) => tracing::info!(tap = name, "tap deleted"),
        Err(error) => tracing::warn!(tap = name, %error, "cannot delete tap"),
    }
}

fn nic_error(name: &str, error: &io::Error) -> admin::Error {
    if error.kind() == io::ErrorKind::InvalidInput {
        return refused(ErrorKind::Invalid, error.to_string());
    }
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => refused(
            ErrorKind::Permission,
            format!(
                "cannot open a packet socket on {name}: {error}; a NIC port needs CAP_NET_RAW \
                 (run the node as root, or give it the capability, as deploy/umnet.service does)"
            ),
        ),
        Some(libc::ENODEV) | Some(libc::ENXIO) => {
            refused(ErrorKind::NotFound, format!("no network interface {name}"))
        }
        _ => refused(ErrorKind::Internal, format!("cannot attach to {name}: {error}")),
    }
}

fn tap_error(name: &str, error: &io::Error) -> admin::Error {
    if error.kind() == io::ErrorKind::InvalidInput {
        return refused(ErrorKind::Invalid, error.to_string());
    }
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => refused(
            ErrorKind::Permission,
            format!(
                "cannot open tap {name}: {error}; creating a tap needs CAP_NET_ADMIN (run the \
                 node as root or give it the capability), or pre-create a persistent tap owned \
                 by the node's user: ip tuntap add dev {name} mode tap user USER"
            ),
        ),
        Some(libc::EBUSY) | Some(libc::EINVAL) => refused(
            ErrorKind::Invalid,
            format!("cannot attach to {name}: {error}; is it a tap device, and not in use?"),
        ),
        Some(libc::ENOENT) | Some(libc::ENODEV) => refused(
            ErrorKind::Invalid,
            format!("cannot open tap {name}: {error}; is /dev/net/tun present (modprobe tun)?"),
        ),
        _ => refused(ErrorKind::Internal, format!("cannot open tap {name}: {error}")),
    }
}
