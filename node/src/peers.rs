//! Federation: other nodes of the cluster, over mutually authenticated QUIC.
//!
//! Each node listens on one UDP port and dials the peers it is told of; both ends present a
//! certificate of the cluster CA and a peer is known by the name in its certificate. Over a
//! connection each side announces the networks it serves on a unidirectional stream, and frames
//! of the networks both serve (and the peer may carry) travel as datagrams
//! ([`umnet_proto::peer`]).
//!
//! In the switch a peer is one port per shared network ([`PeerLink`]): addresses behind
//! it are learned as on any port, and they go when the port does. A frame that came from a peer
//! is never sent to another peer (split horizon), so a network spans the nodes that are
//! directly peered with each other.
//!
//! Two nodes that dial each other at once keep exactly one connection: the one dialed by the
//! node whose name sorts first.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::RecvStream;
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Notify};
use umnet_proto::admin::{self, NetworkId, PeerCounters, PeerState};
use umnet_proto::mss;
use umnet_proto::peer::{
    encode, Datagram, Message, Reassembled, Reassembly, FRAME_HEADER_LEN, PROTOCOL_VERSION,
};

use crate::federation::Policy;
use crate::switch::{self, Command};
use crate::underlay::UnderlayCounters;

/// Identifies one connection to a peer, unique for the life of the node.
pub(crate) type PeerId = u64;

/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest wait between dials of an unreachable peer.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Incomplete frames older than this are given up.
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stopping node waits for its close notices to reach its peers.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that lasted less than this counts as a failed dial for the backoff, so a peer
/// that accepts and then refuses is not dialed in a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(2);

/// How often a running node looks at its certificate's expiry date.
const EXPIRY_CHECK: Duration = Duration::from_secs(6 * 60 * 60);

/// How often a malformed-datagram warning may repeat per peer.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Traffic counters of one peer, shared by its connection tasks and the switch.
#[derive(Debug, Default)]
pub(crate) struct PeerStats {
    pub(crate) rx_frames: AtomicU64,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) tx_frames: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) not_allowed: AtomicU64,
    pub(crate) reassembly: AtomicU64,
    pub(crate) send_failed: AtomicU64,
    pub(crate) mss_clamped: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl PeerStats {
    fn snapshot(&self) -> PeerCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PeerCounters {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            malformed: get(&self.malformed),
            not_allowed: get(&self.not_allowed),
            reassembly: get(&self.reassembly),
            send_failed: get(&self.send_failed),
            mss_clamped: get(&self.mss_clamped),
        }
    }
}

/// The switch's end of a peer port: sends frames of one network as datagrams.
///
/// quinn queues datagrams until its congestion controller lets them out, and drops the oldest
/// when the queue is full. A node reading a tap faster than the connection sends would lose
/// frames that way, and the TCP connections inside would take it as congestion loss. So a
/// frame that does not fit in the queue goes to a task that waits for room, and until it is
/// through, every port of the peer answers "would block": the switch queues their frames and
/// pauses the ports sending to them, as it does for a slow local client. The task then asks
/// the switch to flush the peer's ports.
#[derive(Debug)]
pub(crate) struct PeerLink {
    /// What the peer's ports share: its connection, counters and settings.
    shared: PeerLinkFactory,
    next_id: u32,
    /// A SYN with its MSS lowered, sent in place of the switch's frame.
    clamped: Vec<u8>,
}

impl PeerLink {
    /// Sends `frame` of network `net`, in fragments if the path's datagrams are too small.
    pub(crate) fn send(&mut self, net: NetworkId, frame: &[u8]) -> io::Result<usize> {
        let result = self.try_send(net, frame);
        match &result {
            Ok(_) => {
                add(&self.shared.stats.tx_frames, 1);
                add(&self.shared.stats.tx_bytes, frame.len() as u64);
            }
            // The frame waits in the port's queue.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => add(&self.shared.stats.send_failed, 1),
        }
        result
    }

    fn try_send(&mut self, net: NetworkId, frame: &[u8]) -> io::Result<usize> {
        let shared = &self.shared;
        if shared.blocked.load(Ordering::Acquire) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let Some(max) = shared.connection.max_datagram_size() else {
            return Err(io::Error::other("the peer does not accept datagrams"));
        };
        self.next_id = self.next_id.wrapping_add(1);
        let room = max.saturating_sub(FRAME_HEADER_LEN);
        let frame = if shared.clamp_mss.load(Ordering::Relaxed) {
            clamp(frame, room, &mut self.clamped, &shared.stats)
        } else {
            frame
        };
        let mut datagrams = Vec::with_capacity(1);
        encode(net, self.next_id, frame, max, |datagram| datagrams.push(Bytes::from(datagram)))
            .map_err(io::Error::other)?;
        let len: usize = datagrams.iter().map(Bytes::len).sum();
        if len > shared.connection.datagram_send_buffer_space() {
            shared.wait_for_room(datagrams);
            return Ok(frame.len());
        }
        for datagram in datagrams {
            shared.connection.send_datagram(datagram).map_err(io::Error::other)?;
        }
        Ok(frame.len())
    }
}

/// `frame`, or its copy in `clamped` with a lower MSS if it is a TCP SYN announcing segments
/// whose frames would not fit in `max_frame` bytes.
fn clamp<'a>(
    frame: &'a [u8],
    max_frame: usize,
    clamped: &'a mut Vec<u8>,
    stats: &PeerStats,
) -> &'a [u8] {
    let Some(option) = mss::find(frame) else { return frame };
    let limit = option.limit(max_frame);
    if option.value <= limit {
        return frame;
    }
    clamped.clear();
    clamped.extend_from_slice(frame);
    option.set(clamped, limit);
    add(&stats.mss_clamped, 1);
    tracing::debug!(from = option.value, to = limit, "lowered the MSS of a SYN to a peer");
    clamped
}

/// Settings of federation, from the config file and the command line.
#[derive(Debug)]
pub(crate) struct Settings {
    /// This node's name, from its certificate.
    pub(crate) name: String,
    /// When this node's certificate expires; a reloaded certificate moves it.
    pub(crate) not_after: Mutex<std::time::SystemTime>,
    /// Where the identity bundle is, read again on SIGHUP.
    pub(crate) identity: std::path::PathBuf,
    /// Fingerprint of the certificate new connections present.
    pub(crate) fingerprint: Mutex<String>,
    /// Who may connect and carry which networks.
    pub(crate) policy: Mutex<Policy>,
    /// The policy's `clamp_mss`, read by the switch's peer ports at every SYN.
    pub(crate) clamp_mss: Arc<AtomicBool>,
    /// What arrives on the peer port.
    pub(crate) counters: Arc<UnderlayCounters>,
    /// Revoked names and certificates, checked at every handshake.
    pub(crate) revocations: Arc<umnet_certs::Revocations>,
}

#[derive(Debug)]
struct Live {
    id: PeerId,
    connection: quinn::Connection,
    /// Name of the node that dialed this connection.
    dialer: String,
    /// The peer's instance number, from its hello.
    instance: u64,
    since: Instant,
    /// Set while one of the peer's frames waits for room in quinn's queue (see [`PeerLink`]).
    blocked: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Entry {
    address: Option<String>,
    live: Option<Live>,
    remote: BTreeSet<NetworkId>,
    last_error: Option<String>,
    stats: Arc<PeerStats>,
    dialer: Option<tokio::task::AbortHandle>,
    /// Woken when the live connection closes, so the dialer dials again.
    closed: Arc<Notify>,
    /// Woken when a connection goes live, so a dial still under way is given up.
    opened: Arc<Notify>,
}

/// The federation state a node shares between its tasks.
#[derive(Debug)]
pub(crate) struct Federation {
    settings: Settings,
    endpoint: quinn::Endpoint,
    /// How this node dials; replaced when a SIGHUP brings a new certificate.
    client: Mutex<quinn::ClientConfig>,
    switch: switch::Handle,
    peers: Mutex<BTreeMap<String, Entry>>,
    local: watch::Sender<BTreeSet<NetworkId>>,
    next_id: AtomicU64,
    /// This node's instance number, new at every start.
    instance: u64,
}

impl Federation {
    /// Federation on `endpoint`, which already carries the server configuration.
    pub(crate) fn new(
        settings: Settings,
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        switch: switch::Handle,
        local: BTreeSet<NetworkId>,
    ) -> Arc<Self> {
        Arc::new(Federation {
            settings,
            endpoint,
            client: Mutex::new(client),
            switch,
            peers: Mutex::new(BTreeMap::new()),
            local: watch::channel(local).0,
            next_id: AtomicU64::new(1),
            instance: random(),
        })
    }

    fn peers(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        lock(&self.peers)
    }

    /// Accepts inbound connections until the task is aborted.
    pub(crate) async fn accept(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let federation = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(connection) => federation.connected(connection, false).await,
                    Err(error) => {
                        add(&federation.settings.counters.handshakes_failed, 1);
                        tracing::warn!(%remote, reason = %error, "peer handshake failed")
                    }
                }
            });
        }
    }

    /// Warns every [`EXPIRY_CHECK`] while the node certificate is close to expiry or past it,
    /// so a node that runs for months says so ahead of time, not only at start.
    pub(crate) async fn watch_expiry(self: Arc<Self>) {
        let mut checks = tokio::time::interval(EXPIRY_CHECK);
        // The first tick is now; the node warned at start already.
        checks.tick().await;
        loop {
            checks.tick().await;
            let now = std::time::SystemTime::now();
            let not_after = *lock(&self.settings.not_after);
            crate::federation::warn_of_expiry(&self.settings.name, not_after, now);
        }
    }

    /// Adds or updates a configured peer and starts dialing it.
    pub(crate) fn add_peer(self: &Arc<Self>, name: &str, address: &str) {
        let mut peers = self.peers();
        let entry = peers.entry(name.to_string()).or_default();
        entry.address = Some(address.to_string());
        if let Some(dialer) = entry.dialer.take() {
            dialer.abort();
        }
        let (closed, opened) = (entry.closed.clone(), entry.opened.clone());
        let task = tokio::spawn(self.clone().dial(name.to_string(), closed, opened));
        entry.dialer = Some(task.abort_handle());
    }

    /// Forgets a peer and closes its connection.
    pub(crate) fn remove_peer(&self, name: &str) -> bool {
        let Some(entry) = self.peers().remove(name) else { return false };
        if let Some(dialer) = entry.dialer {
            dialer.abort();
        }
        if let Some(live) = entry.live {
            live.connection.close(0u32.into(), b"peer removed");
            self.switch.send(Command::DropPeer { peer: live.id });
        }
        true
    }

    /// Tells every peer which networks this node now serves.
    pub(crate) fn set_local(&self, nets: BTreeSet<NetworkId>) {
        self.local.send_replace(nets);
        let names: Vec<String> = self.peers().keys().cloned().collect();
        for name in names {
            self.reconcile(&name);
        }
    }

    async fn dial(self: Arc<Self>, name: String, closed: Arc<Notify>, opened: Arc<Notify>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let address = self.peers().get(&name).and_then(|e| e.address.clone());
            let Some(address) = address else { return };
            let notified = closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let connected = opened.notified();
            tokio::pin!(connected);
            connected.as_mut().enable();
            if self.peers().get(&name).is_some_and(|e| e.live.is_some()) {
                // Connected by the peer's dial; dial again when that connection goes.
                notified.await;
                continue;
            }

            // The peer's dial may connect while ours is still under way (its first packets
            // lost while the peer was not yet listening, say). Ours is then given up before
            // its handshake ends: finished, it would replace a connection already carrying
            // frames whenever this node's name sorts first.
            let attempt = tokio::select! {
                attempt = self.dial_once(&name, &address) => attempt,
                () = connected.as_mut() => {
                    tracing::debug!(peer = %name, "the peer connected first; dial given up");
                    continue;
                }
            };
            match attempt {
                Ok(connection) => {
                    let started = Instant::now();
                    // Returns when the connection closes, or at once if it is refused.
                    self.clone().connected(connection, true).await;
                    if started.elapsed() < STABLE_AFTER {
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    } else {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(error) => {
                    tracing::debug!(peer = %name, %address, %error, "dial failed");
                    if let Some(entry) = self.peers().get_mut(&name) {
                        entry.last_error = Some(error);
                    }
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn dial_once(&self, name: &str, address: &str) -> Result<quinn::Connection, String> {
        let resolved = tokio::net::lookup_host(address)
            .await
            .map_err(|e| format!("cannot resolve {address}: {e}"))?
            .next()
            .ok_or_else(|| format!("{address} resolves to nothing"))?;
        let connecting = self
            .endpoint
            .connect_with(lock(&self.client).clone(), resolved, name)
            .map_err(|e| format!("cannot dial {address}: {e}"))?;
        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => {
                add(&self.settings.counters.handshakes_failed, 1);
                tracing::warn!(peer = name, %address, reason = %error, "peer handshake failed");
                Err(error.to_string())
            }
            Err(_) => Err(format!("no answer from {address} within {DIAL_TIMEOUT:?}")),
        }
    }

    /// Takes a connection whose handshake succeeded, in either direction.
    async fn connected(self: Arc<Self>, connection: quinn::Connection, dialed: bool) {
        let name = match certificates(&connection).and_then(|certs| umnet_certs::peer_name(&certs))
        {
            Some(name) => name,
            None => {
                tracing::warn!(remote = %connection.remote_address(), "peer without a node name");
                connection.close(1u32.into(), b"no node name");
                return;
            }
        };
        if name == self.settings.name {
            connection.close(1u32.into(), b"connected to itself");
            return;
        }
        let configured = self.peers().get(&name).is_some_and(|e| e.address.is_some());
        if !dialed && lock(&self.settings.policy).listed_only && !configured {
            tracing::warn!(peer = %name, remote = %connection.remote_address(),
                "inbound connection refused: not a listed peer (federation.inbound = \"listed\")");
            connection.close(2u32.into(), b"not a listed peer");
            return;
        }

        // Both sides send their hello and networks at once; the peer's hello says which
        // connection to keep when there are two.
        let announce = tokio::spawn(self.clone().announce(name.clone(), connection.clone()));
        let (stream, instance) =
            match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&connection)).await {
                Ok(Ok(hello)) => hello,
                Ok(Err(error)) => {
                    tracing::warn!(peer = %name, %error, "peer sent no valid hello; closing");
                    connection.close(4u32.into(), b"bad hello");
                    announce.abort();
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %name, "peer sent no hello within {HELLO_TIMEOUT:?}");
                    connection.close(4u32.into(), b"no hello");
                    announce.abort();
                    return;
                }
            };

        let dialer = if dialed { self.settings.name.clone() } else { name.clone() };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stats = {
            let mut peers = self.peers();
            let entry = peers.entry(name.clone()).or_default();
            if let Some(old) = &entry.live {
                // The same instance dialed while we dialed it: keep the connection dialed by the
                // name that sorts first. A new instance restarted, so its old connection is dead.
                let first = self.settings.name.clone().min(name.clone());
                if old.instance == instance && old.dialer == first && dialer != first {
                    drop(peers);
                    connection.close(3u32.into(), b"duplicate connection");
                    announce.abort();
                    return;
                }
                old.connection.close(3u32.into(), b"duplicate connection");
                self.switch.send(Command::DropPeer { peer: old.id });
            }
            let since = Instant::now();
            let blocked = Arc::new(AtomicBool::new(false));
            let live =
                Live { id, connection: connection.clone(), dialer, instance, since, blocked };
            entry.live = Some(live);
            entry.opened.notify_waiters();
            entry.remote.clear();
            entry.last_error = None;
            entry.stats.clone()
        };
        let remote = connection.remote_address();
        tracing::info!(peer = %name, %remote, dialed, "peer connected");

        let listen = tokio::spawn(self.clone().listen(name.clone(), connection.clone(), stream));
        let receive =
            tokio::spawn(self.clone().receive(id, name.clone(), connection.clone(), stats));
        let reason = connection.closed().await;
        announce.abort();
        listen.abort();
        receive.abort();

        let mut peers = self.peers();
        if let Some(entry) = peers.get_mut(&name) {
            if entry.live.as_ref().is_some_and(|live| live.id == id) {
                entry.live = None;
                entry.remote.clear();
                entry.last_error = Some(reason.to_string());
                entry.closed.notify_waiters();
                self.switch.send(Command::DropPeer { peer: id });
                tracing::info!(peer = %name, %reason, "peer disconnected");
            }
        }
    }

    /// Sends this node's networks that `name` may carry, and again whenever they change. A
    /// network restricted to other peers is not even named to it.
    async fn announce(self: Arc<Self>, name: String, connection: quinn::Connection) {
        let Ok(mut stream) = connection.open_uni().await else { return };
        let mut local = self.local.subscribe();
        let hello = Message::Hello { version: PROTOCOL_VERSION, instance: self.instance };
        if stream.write_all(&hello.encode()).await.is_err() {
            return;
        }
        loop {
            let nets = local
                .borrow_and_update()
                .iter()
                .copied()
                .filter(|net| self.allowed(*net, &name))
                .collect();
            if stream.write_all(&Message::Networks { nets }.encode()).await.is_err() {
                return;
            }
            if local.changed().await.is_err() {
                return;
            }
        }
    }

    /// Reads the peer's announcements after its hello.
    async fn listen(
        self: Arc<Self>,
        name: String,
        connection: quinn::Connection,
        mut stream: RecvStream,
    ) {
        loop {
            match read_message(&mut stream).await {
                Ok(Message::Networks { nets }) => {
                    if let Some(entry) = self.peers().get_mut(&name) {
                        entry.remote = nets.into_iter().collect();
                    }
                    self.reconcile(&name);
                }
                Ok(Message::Hello { .. }) => {
                    tracing::warn!(peer = %name, "peer said hello twice; closing");
                    self.malformed(&name);
                    connection.close(5u32.into(), b"second hello");
                    return;
                }
                Err(ReadError::Closed) => return,
                Err(ReadError::Malformed(error)) => {
                    tracing::warn!(peer = %name, %error, "malformed announcement; closing");
                    self.malformed(&name);
                    connection.close(5u32.into(), b"malformed announcement");
                    return;
                }
            }
        }
    }

    fn malformed(&self, name: &str) {
        if let Some(entry) = self.peers().get(name) {
            add(&entry.stats.malformed, 1);
        }
    }

    /// Gives the switch the networks `name` carries: served by both, and allowed.
    fn reconcile(&self, name: &str) {
        let local = self.local.borrow().clone();
        let peers = self.peers();
        let Some(entry) = peers.get(name) else { return };
        let Some(live) = &entry.live else { return };
        let nets = local
            .intersection(&entry.remote)
            .copied()
            .filter(|net| self.allowed(*net, name))
            .collect();
        self.switch.send(Command::SetPeer {
            peer: live.id,
            name: name.to_string(),
            link: PeerLinkFactory {
                connection: live.connection.clone(),
                stats: entry.stats.clone(),
                clamp_mss: self.settings.clamp_mss.clone(),
                blocked: live.blocked.clone(),
                peer: live.id,
                switch: self.switch.clone(),
            },
            nets,
        });
    }

    fn allowed(&self, net: NetworkId, name: &str) -> bool {
        lock(&self.settings.policy).allowed.get(&net).is_none_or(|names| names.contains(name))
    }

    /// Reads frames from the peer and hands them to the switch.
    async fn receive(
        self: Arc<Self>,
        id: PeerId,
        name: String,
        connection: quinn::Connection,
        stats: Arc<PeerStats>,
    ) {
        let mut reassembly = Reassembly::default();
        let mut last_warning: Option<Instant> = None;
        while let Ok(datagram) = connection.read_datagram().await {
            let frame = match Datagram::parse(&datagram) {
                Ok(Datagram::Frame { net, frame }) => Some((net, datagram.slice_ref(frame))),
                Ok(Datagram::Fragment { net, id: frame_id, index, count, data }) => {
                    // Whole frames, the common case, need no clock.
                    let now = Instant::now();
                    let result = reassembly.add(net, frame_id, index, count, data, now);
                    if let Some(deadline) = now.checked_sub(REASSEMBLY_TIMEOUT) {
                        reassembly.expire(deadline);
                    }
                    stats.reassembly.store(reassembly.abandoned, Ordering::Relaxed);
                    match result {
                        Reassembled::Frame { net, frame } => Some((net, frame.into())),
                        Reassembled::Incomplete => None,
                        Reassembled::Inconsistent => {
                            add(&stats.malformed, 1);
                            None
                        }
                    }
                }
                Err(error) => {
                    add(&stats.malformed, 1);
                    let now = Instant::now();
                    if last_warning.is_none_or(|t| now.duration_since(t) > WARN_INTERVAL) {
                        last_warning = Some(now);
                        tracing::warn!(peer = %name, %error, "dropped a malformed datagram");
                    }
                    None
                }
            };
            if let Some((net, frame)) = frame {
                self.switch.send(Command::PeerFrame { peer: id, net, frame });
            }
        }
    }

    /// Every known peer, for `umnet peer list`.
    pub(crate) fn list(&self) -> Vec<admin::Peer> {
        let local = self.local.borrow().clone();
        self.peers()
            .iter()
            .map(|(name, entry)| {
                let live = entry.live.as_ref();
                let state = match (live, &entry.address) {
                    (Some(_), _) => PeerState::Connected,
                    (None, Some(_)) => PeerState::Connecting,
                    (None, None) => PeerState::Disconnected,
                };
                let networks = match live {
                    Some(_) => local
                        .intersection(&entry.remote)
                        .copied()
                        .filter(|net| self.allowed(*net, name))
                        .collect(),
                    None => Vec::new(),
                };
                admin::Peer {
                    name: name.clone(),
                    configured: entry.address.is_some(),
                    state,
                    address: entry
                        .address
                        .clone()
                        .or_else(|| live.map(|live| live.connection.remote_address().to_string())),
                    networks,
                    rtt_us: live.map(|live| live.connection.rtt().as_micros() as u64),
                    uptime_secs: live.map(|live| live.since.elapsed().as_secs()),
                    max_datagram: live.and_then(|live| live.connection.max_datagram_size()),
                    counters: entry.stats.snapshot(),
                    last_error: entry.last_error.clone(),
                }
            })
            .collect()
    }

    /// Replaces the revocation list and closes the connections of peers it now revokes.
    /// Returns how many were closed.
    pub(crate) fn revoke(
        &self,
        names: &[String],
        fingerprints: &[String],
    ) -> Result<usize, umnet_certs::Error> {
        let revocations = &self.settings.revocations;
        revocations.replace(names, fingerprints)?;
        let mut closed = 0;
        for (name, entry) in self.peers().iter_mut() {
            let Some(live) = &entry.live else { continue };
            let revoked = certificates(&live.connection).is_none_or(|certs| {
                certs.first().is_none_or(|c| revocations.is_revoked_certificate(c))
            });
            if revoked {
                tracing::warn!(peer = %name, "peer revoked; closing its connection");
                live.connection.close(6u32.into(), b"revoked");
                entry.last_error = Some("revoked".into());
                closed += 1;
            }
        }
        Ok(closed)
    }

    /// Applies a new policy: peers are told again which networks they may carry, and each
    /// peer's ports are made to match.
    pub(crate) fn set_policy(&self, policy: Policy) {
        self.settings.clamp_mss.store(policy.clamp_mss, Ordering::Relaxed);
        *lock(&self.settings.policy) = policy;
        self.local.send_modify(|_| {});
        let names: Vec<String> = self.peers().keys().cloned().collect();
        for name in names {
            self.reconcile(&name);
        }
    }

    /// The peers this node dials, by name, with the address it dials.
    pub(crate) fn configured(&self) -> BTreeMap<String, String> {
        self.peers()
            .iter()
            .filter_map(|(name, entry)| Some((name.clone(), entry.address.clone()?)))
            .collect()
    }

    /// Reads the identity bundle again; if it holds a new certificate for the same name, new
    /// connections use it from now on, and live ones keep theirs. Returns whether it changed.
    pub(crate) fn reload_identity(&self) -> anyhow::Result<bool> {
        use anyhow::Context;
        let path = &self.settings.identity;
        let identity = umnet_certs::Identity::load(path)
            .with_context(|| format!("cannot read identity {}", path.display()))?;
        let info = identity.info();
        if info.name != self.settings.name {
            anyhow::bail!(
                "{} names node {:?}, and this node runs as {:?}; restart it to change its name",
                path.display(),
                info.name,
                self.settings.name
            );
        }
        if *lock(&self.settings.fingerprint) == info.fingerprint {
            return Ok(false);
        }
        let (server, client) =
            crate::federation::quic_configs(&identity, &self.settings.revocations)?;
        self.endpoint.set_server_config(Some(server));
        *lock(&self.client) = client;
        *lock(&self.settings.not_after) = info.not_after;
        *lock(&self.settings.fingerprint) = info.fingerprint.clone();
        crate::federation::warn_of_expiry(&info.name, info.not_after, std::time::SystemTime::now());
        Ok(true)
    }

    /// This node's name, from its certificate.
    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    /// The node's name, where it listens, and what arrived there, for `umnet status`.
    pub(crate) fn status(&self) -> admin::FederationStatus {
        let counters = &self.settings.counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        admin::FederationStatus {
            name: self.settings.name.clone(),
            listen: self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            datagrams: get(&counters.datagrams),
            not_quic: get(&counters.garbage),
            handshakes_failed: get(&counters.handshakes_failed),
        }
    }

    /// Closes every connection, at shutdown, and waits briefly for peers to hear of it, so
    /// they drop their end at once instead of at the idle timeout.
    pub(crate) async fn close(&self) {
        self.endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// What the switch needs to make the links of a peer's ports, and what those links share.
#[derive(Debug, Clone)]
pub(crate) struct PeerLinkFactory {
    connection: quinn::Connection,
    stats: Arc<PeerStats>,
    /// The policy's `clamp_mss` (see [`Settings::clamp_mss`]).
    clamp_mss: Arc<AtomicBool>,
    /// Set while a frame waits for room in quinn's queue (see [`PeerLink`]).
    blocked: Arc<AtomicBool>,
    peer: PeerId,
    switch: switch::Handle,
}

impl PeerLinkFactory {
    pub(crate) fn link(&self) -> PeerLink {
        PeerLink { shared: self.clone(), next_id: 0, clamped: Vec::new() }
    }

    /// Sends `datagrams` once quinn's queue has room for them, holding the peer's other frames
    /// back meanwhile; then has the switch send what it held.
    fn wait_for_room(&self, datagrams: Vec<Bytes>) {
        self.blocked.store(true, Ordering::Release);
        let shared = self.clone();
        tokio::spawn(async move {
            for datagram in datagrams {
                if shared.connection.send_datagram_wait(datagram).await.is_err() {
                    // The connection is closing: the peer's ports go with it.
                    add(&shared.stats.send_failed, 1);
                    break;
                }
            }
            shared.blocked.store(false, Ordering::Release);
            shared.switch.send(Command::PeerDrained { peer: shared.peer });
        });
    }

    pub(crate) fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }
}

/// The certificate chain the peer presented.
fn certificates(connection: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    connection.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok().map(|certs| *certs)
}

/// Why no announcement could be read.
#[derive(Debug)]
enum ReadError {
    /// The stream or connection ended.
    Closed,
    /// The peer sent something that is not an announcement.
    Malformed(String),
}

async fn read_message(stream: &mut RecvStream) -> Result<Message, ReadError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.map_err(|_| ReadError::Closed)?;
    let len = Message::check_len(prefix).map_err(|e| ReadError::Malformed(e.to_string()))?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(|_| ReadError::Closed)?;
    Message::decode(&body).map_err(|e| ReadError::Malformed(e.to_string()))
}

/// Accepts the peer's announcement stream and reads its hello: the stream and the peer's
/// instance number.
async fn read_hello(connection: &quinn::Connection) -> Result<(RecvStream, u64), String> {
    let mut stream = connection.accept_uni().await.map_err(|e| e.to_string())?;
    match read_message(&mut stream).await {
        Ok(Message::Hello { version, instance }) if version == PROTOCOL_VERSION => {
            Ok((stream, instance))
        }
        Ok(Message::Hello { version, .. }) => {
            Err(format!("peer speaks protocol version {version}, not {PROTOCOL_VERSION}"))
        }
        Ok(other) => Err(format!("expected a hello, got {other:?}")),
        Err(ReadError::Closed) => Err("the connection closed before the hello".into()),
        Err(ReadError::Malformed(error)) => Err(error),
    }
}

/// Locks `mutex`, taking the data even if a panicking thread held it: every value behind these
/// locks is replaced whole, so it is never half-written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A random number, different in every process: std seeds each `RandomState` from the OS.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// `base` give or take a fifth, so peers that lost each other do not redial in step.
fn jitter(base: Duration) -> Duration {
    let spread = base / 5;
    let offset = spread.mul_f64((random() % 2001) as f64 / 1000.0);
    base - spread + offset
}
