//! The switch: every frame a node switches passes through here.
//!
//! One task owns every port descriptor and every network's bridge, and waits on them with an
//! epoll instance of its own (through mio), which the node's runtime waits on in turn. Frames
//! are read in batches, learned, and sent to their port or flooded to their network, all
//! without locks or allocation on the common path. The rest of the node
//! (async tasks: control handshakes, admin requests, peers) talks to it with [`Command`]s
//! through a [`Handle`] and gets answers on oneshot channels.
//!
//! The switch accepts BESS connections itself, since each is a port from its first packet.
//! Daemon and libvdeplug clients are handshaken by the control tasks, which pass the finished
//! data socket in.

mod bridge;
mod port;
mod segment;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::task;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest as Readiness;
use tokio::sync::oneshot;
use umnet_proto::admin::{self, ErrorKind, FdbEntry, NetworkId, PortKind};
use umnet_proto::beacon::{self, Beacon};
use umnet_proto::ethernet::{Header, HEADER_LEN};
use umnet_proto::guest;
use umnet_proto::offload::{self, VnetHeader, NEEDS_CSUM, VNET_HEADER_LEN};

use self::bridge::{Bridge, Decision, Learned};
pub(crate) use self::port::{Link, NicLink, MIN_QUEUE};
use self::port::{Port, Sent, RESUME_AT, STUCK_AFTER};
use self::segment::Role;
use crate::peers::{PeerId, PeerLinkFactory, PeerStats};
use crate::rejects::RejectCounters;
use crate::sys::{self, RecvBatch};

/// A port's id, unique for the life of the node.
pub(crate) type PortId = u32;

/// Listener tokens sit above every port id.
const LISTENER_BASE: usize = 1 << 40;

/// Datagrams taken per `recvmmsg`.
const BATCH: usize = 32;

/// Batches read from one port before others get their turn.
const BATCHES_PER_TURN: usize = 4;

/// How often stale addresses are swept out of the bridges, and NIC ports send their beacons.
const AGE_INTERVAL: Duration = segment::BEACON_INTERVAL;

/// A device read buffer large enough that no frame a tap hands up is cut, a 64 KiB
/// super-frame and its virtio header included, so an oversize frame is seen and counted.
const DEVICE_BUFFER: usize = VNET_HEADER_LEN + 65_536;

/// Frames taken per `recvmmsg` from a NIC port.
const NIC_BATCH: usize = 16;

/// A NIC port's receive slot: a virtio header and the largest super-frame GRO builds.
const NIC_SLOT: usize = VNET_HEADER_LEN + 65_536;

/// At most one warning per this interval for each repeated condition.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Limits and timers of the switch.
#[derive(Clone, Debug)]
pub(crate) struct SwitchConfig {
    /// How long an address is remembered without traffic.
    pub(crate) aging: Duration,
    /// Most addresses learned per network.
    pub(crate) mac_limit: usize,
    /// Longest frame switched, Ethernet header and tags included.
    pub(crate) max_frame: usize,
    /// Frames queued per port for a client that is slow to read.
    pub(crate) queue_len: usize,
    /// Most ports served at once.
    pub(crate) max_ports: usize,
    /// How long the switch keeps polling without sleeping after its last event. Frames come in
    /// bursts and a reply often follows within microseconds, while waking a sleeping thread
    /// costs 25-100 µs on a virtual machine: more than a round trip through the switch.
    pub(crate) busy_poll: Duration,
    /// The networks guests may move their ports to in-band: none when `None`, any when empty.
    pub(crate) guest_networks: Option<BTreeSet<NetworkId>>,
}

/// A port handed to the switch.
#[derive(Debug)]
pub(crate) struct NewPort {
    pub(crate) id: PortId,
    pub(crate) kind: PortKind,
    pub(crate) net: NetworkId,
    pub(crate) client: String,
    pub(crate) pid: Option<u32>,
    pub(crate) link: Link,
}

/// One network's switching state, as the admin interface reports it.
#[derive(Clone, Debug)]
pub(crate) struct NetworkSummary {
    pub(crate) id: NetworkId,
    pub(crate) ports: usize,
    pub(crate) macs: usize,
    pub(crate) mac_limit: usize,
    pub(crate) mac_limit_hits: u64,
    pub(crate) mac_flaps: u64,
}

type Reply<T> = oneshot::Sender<T>;
type AdminResult<T> = Result<T, admin::Error>;

/// What the rest of the node asks of the switch.
#[derive(Debug)]
pub(crate) enum Command {
    AddNetwork {
        net: NetworkId,
        bess: OwnedFd,
    },
    RemoveNetwork {
        net: NetworkId,
        force: bool,
        reply: Reply<AdminResult<Vec<PortId>>>,
    },
    /// Attaches a port; `attached` says whether it was, once the switch can forward to it.
    AddPort {
        port: NewPort,
        attached: Option<Reply<bool>>,
    },
    RemovePort {
        port: PortId,
        reply: Option<Reply<AdminResult<admin::Port>>>,
    },
    SetNetwork {
        port: PortId,
        net: NetworkId,
        reply: Reply<AdminResult<admin::Port>>,
    },
    Ports {
        reply: Reply<Vec<admin::Port>>,
    },
    Networks {
        reply: Reply<Vec<NetworkSummary>>,
    },
    Fdb {
        net: Option<NetworkId>,
        reply: Reply<AdminResult<Vec<FdbEntry>>>,
    },
    /// Gives a connected peer one port for each network in `nets`, and takes away the rest.
    SetPeer {
        peer: PeerId,
        name: String,
        link: PeerLinkFactory,
        nets: BTreeSet<NetworkId>,
    },
    /// Removes every port of a peer whose connection closed.
    DropPeer {
        peer: PeerId,
    },
    /// A peer's connection has room for datagrams again: send what its ports hold.
    PeerDrained {
        peer: PeerId,
    },
    /// A frame a peer sent for network `net`: a slice of the datagram it came in, uncopied.
    PeerFrame {
        peer: PeerId,
        net: NetworkId,
        frame: bytes::Bytes,
    },
    /// Starts a capture.
    Capture(Capture),
    /// Which networks guests may move their ports to in-band, as [`SwitchConfig`] says.
    SetGuestPolicy {
        networks: Option<BTreeSet<NetworkId>>,
    },
    Shutdown,
}

/// The rest of the node's way to the switch.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    commands: mpsc::Sender<Command>,
    /// Wakes the switch task directly: on the node's one thread a command (a frame from a
    /// peer) reaches the switch within the same turn of the runtime, with no system call.
    notify: Arc<tokio::sync::Notify>,
    /// Set while a wake-up is pending, so a burst of commands (frames from a peer) costs one.
    woken: Arc<AtomicBool>,
    ids: Arc<AtomicU32>,
}

impl Handle {
    /// Sends a command and wakes the switch.
    pub(crate) fn send(&self, command: Command) {
        // Both fail only once the switch has stopped, when there is nobody left to tell.
        if self.commands.send(command).is_ok() && !self.woken.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Sends the command `make` builds around a reply channel, and waits for the answer.
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> AdminResult<T> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply));
        answer.await.map_err(|_| admin::Error::new(ErrorKind::Internal, "the switch has stopped"))
    }

    /// A fresh port id.
    pub(crate) fn next_port_id(&self) -> PortId {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Network {
    bridge: Bridge,
    ports: Vec<PortId>,
    bess: OwnedFd,
    table_full_warning: RateLimit,
    flap_warning: RateLimit,
}

/// Lets one log line through per [`WARN_INTERVAL`] and counts the rest.
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// Whether to log now, and how many were held back since the last one.
    fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < WARN_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Makes the switch and the handle the rest of the node reaches it by. [`Switch::run`] then
/// switches frames until it is told to stop.
pub(crate) fn new(
    config: SwitchConfig,
    rejects: Arc<RejectCounters>,
) -> io::Result<(Handle, Switch)> {
    let poll = Poll::new()?;
    let notify = Arc::new(tokio::sync::Notify::new());
    let (commands, receiver) = mpsc::channel();
    let woken = Arc::new(AtomicBool::new(false));
    let ids = Arc::new(AtomicU32::new(1));
    let handle =
        Handle { commands, notify: notify.clone(), woken: woken.clone(), ids: ids.clone() };
    let batch = RecvBatch::new(BATCH, config.max_frame + 1);
    let switch = Switch {
        poll,
        commands: receiver,
        woken,
        notify,
        ids,
        peer_ports: FastMap::default(),
        peer_stats: FastMap::default(),
        networks: BTreeMap::new(),
        ports: FastMap::default(),
        ready: VecDeque::new(),
        congested: Vec::new(),
        batch,
        device_buffer: vec![0u8; DEVICE_BUFFER].into_boxed_slice(),
        nic_batch: None,
        restored: Vec::new(),
        segmented: Vec::new(),
        malformed_warnings: FastMap::default(),
        control_frames: Vec::new(),
        captures: Vec::new(),
        guest_warning: RateLimit::default(),
        last_local_delivery: Instant::now(),
        rejects,
        config,
    };
    Ok((handle, switch))
}

/// The switch's epoll instance, borrowed as a file the runtime waits on; the [`Poll`] owns it.
#[derive(Debug)]
struct EpollFd(RawFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The switch's maps, keyed by port, peer and MAC address: foldhash, seeded at random in each
/// process, where std's SipHash took a quarter of the switch's instructions per frame. The seed
/// keeps a guest from choosing colliding addresses ahead of time, and the MAC limit bounds the
/// table anyway.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The switch: every port and bridge of the node.
pub(crate) struct Switch {
    poll: Poll,
    commands: mpsc::Receiver<Command>,
    woken: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
    ids: Arc<AtomicU32>,
    /// The port of each peer and network.
    peer_ports: FastMap<(PeerId, NetworkId), PortId>,
    /// Counters of each connected peer, for frames that reach no port.
    peer_stats: FastMap<PeerId, Arc<PeerStats>>,
    networks: BTreeMap<NetworkId, Network>,
    ports: FastMap<PortId, Port>,
    /// Ports with frames left to read after their last turn.
    ready: VecDeque<PortId>,
    /// Ports holding others paused; checked for being stuck.
    congested: Vec<PortId>,
    batch: RecvBatch,
    device_buffer: Box<[u8]>,
    /// Receive buffers of NIC ports, made when the first NIC port comes.
    nic_batch: Option<RecvBatch>,
    /// A NIC frame with its VLAN tag put back.
    restored: Vec<u8>,
    /// One segment of a NIC super-frame.
    segmented: Vec<u8>,
    malformed_warnings: FastMap<PortId, RateLimit>,
    /// Frames for the node itself (guest requests), taken out of the stream while switching
    /// and answered once the batch is done.
    control_frames: Vec<(PortId, Vec<u8>)>,
    /// Captures in progress.
    captures: Vec<Capture>,
    guest_warning: RateLimit,
    /// When a frame last went out to a local port; busy polling follows it.
    last_local_delivery: Instant,
    rejects: Arc<RejectCounters>,
    config: SwitchConfig,
}

impl Switch {
    /// Switches frames until a [`Command::Shutdown`], on the task that awaits it.
    ///
    /// The ports are registered with the switch's own epoll instance (through mio), and that
    /// instance is one more file the runtime waits on: the switch and the peer connections
    /// share one thread, so a frame between a local port and a peer changes hands without
    /// waking another thread. After an event the switch keeps looking for more for
    /// `busy_poll` after it delivered a frame to a local port, whose client may answer within
    /// microseconds, yielding to the runtime's other tasks in between. A frame sent to a peer
    /// starts no busy polling: an answer takes a round trip to another host, and a node
    /// spinning meanwhile only takes a core from the processes that must answer.
    pub(crate) async fn run(mut self) {
        let epoll = EpollFd(self.poll.as_raw_fd());
        // SAFETY: the descriptor is the epoll instance of `self.poll`, which stays open and
        // unchanged for as long as this function runs, and `readiness` is dropped when it ends.
        let registered = unsafe { AsyncFd::register_with_interest(epoll, Readiness::READABLE) };
        let readiness = match registered {
            Ok(readiness) => readiness,
            Err(error) => {
                tracing::error!(%error, "the switch cannot wait for events; stopping");
                return;
            }
        };
        let mut events = Events::with_capacity(256);
        let mut next_aging = Instant::now() + AGE_INTERVAL;
        // One timer for the whole run, moved rather than made anew at every wake-up.
        let timer = tokio::time::sleep_until(next_aging.into());
        tokio::pin!(timer);
        loop {
            // Step 1: wait for an event, a command, a timer, or the end of a busy-poll yield.
            let busy = self.last_local_delivery.elapsed() < self.config.busy_poll;
            if !self.ready.is_empty() || busy {
                tokio::task::yield_now().await;
            } else {
                let deadline = if self.congested.is_empty() {
                    next_aging
                } else {
                    Instant::now() + STUCK_AFTER
                };
                if timer.deadline() != deadline.into() {
                    timer.as_mut().reset(deadline.into());
                }
                let notified = self.notify.notified();
                tokio::pin!(notified);
                let woke = std::future::poll_fn(|cx| {
                    match readiness.poll_read_ready(cx) {
                        // Cleared before the epoll instance is drained below: an event that
                        // arrives meanwhile makes it readable again.
                        task::Poll::Ready(Ok(mut guard)) => {
                            guard.clear_ready();
                            return task::Poll::Ready(Ok(()));
                        }
                        task::Poll::Ready(Err(error)) => return task::Poll::Ready(Err(error)),
                        task::Poll::Pending => {}
                    }
                    if notified.as_mut().poll(cx).is_ready() || timer.as_mut().poll(cx).is_ready() {
                        return task::Poll::Ready(Ok(()));
                    }
                    task::Poll::Pending
                })
                .await;
                if let Err(error) = woke {
                    tracing::error!(%error, "the switch cannot wait for events; stopping");
                    return;
                }
            }
            if self.woken.load(Ordering::Acquire) && !self.run_commands() {
                return;
            }

            // Step 2: take what is ready, without blocking.
            if let Err(error) = self.poll.poll(&mut events, Some(Duration::ZERO)) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(%error, "the switch cannot read its events; stopping");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    Token(token) if token >= LISTENER_BASE => {
                        self.accept_bess((token - LISTENER_BASE) as NetworkId)
                    }
                    Token(token) => {
                        let id = token as PortId;
                        if event.is_writable() {
                            self.flush(id);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.mark_ready(id);
                        }
                    }
                }
            }

            // Step 3: each port with frames waiting gets a bounded turn, so a client sending
            // flat out cannot starve the others.
            for _ in 0..self.ready.len() {
                let Some(id) = self.ready.pop_front() else { break };
                if self.receive(id) {
                    self.ready.push_back(id);
                } else if let Some(port) = self.ports.get_mut(&id) {
                    port.ready = false;
                }
            }

            // Step 4: requests from guests, then timers.
            if !self.control_frames.is_empty() {
                self.answer_guests();
            }
            let now = Instant::now();
            if !self.congested.is_empty() {
                self.check_congested(now);
            }
            if now >= next_aging {
                for network in self.networks.values_mut() {
                    network.bridge.age(now);
                }
                self.tick_nics(now);
                next_aging = now + AGE_INTERVAL;
            }
        }
    }

    /// Sends what port `id` has queued, and reads the ports it paused again once it drained.
    fn flush(&mut self, id: PortId) {
        let Some(port) = self.ports.get_mut(&id) else { return };
        if port.flush() > 0 && port.congested_since.is_some() {
            port.congested_since = Some(Instant::now());
        }
        if port.queued() <= RESUME_AT {
            port.stuck = false;
            port.congested_since = None;
            let waiters = std::mem::take(&mut port.waiters);
            self.resume(waiters);
        }
    }

    fn resume(&mut self, waiters: Vec<PortId>) {
        for id in waiters {
            if let Some(port) = self.ports.get_mut(&id) {
                port.paused = false;
            }
            self.mark_ready(id);
        }
    }

    /// Releases the ports held paused by a port that has taken no frame for [`STUCK_AFTER`].
    fn check_congested(&mut self, now: Instant) {
        let mut released = Vec::new();
        self.congested.retain(|id| {
            let Some(port) = self.ports.get_mut(id) else { return false };
            let Some(since) = port.congested_since else { return false };
            if now.saturating_duration_since(since) < STUCK_AFTER {
                return true;
            }
            tracing::debug!(
                port = port.id,
                queued = port.queued(),
                "port stopped reading; frames for it are dropped instead of pausing its senders"
            );
            port.stuck = true;
            port.congested_since = None;
            released.append(&mut port.waiters);
            false
        });
        self.resume(released);
    }

    fn mark_ready(&mut self, id: PortId) {
        if let Some(port) = self.ports.get_mut(&id) {
            if !port.ready {
                port.ready = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Reads and switches frames of port `id` for one turn. Returns whether frames may remain.
    fn receive(&mut self, id: PortId) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let Some(port) = self.ports.get(&id) else { return false };
            if port.paused {
                return false;
            }
            let outcome = match port.link() {
                Link::Socket(fd) => self.receive_batch(id, fd.as_raw_fd()),
                Link::Device(fd) => self.receive_device(id, fd.as_raw_fd()),
                Link::Nic(nic) => match &nic.socket {
                    Some(fd) => self.receive_nic(id, fd.as_raw_fd()),
                    None => Ok(false),
                },
                // Frames from peers come through the inbox.
                Link::Peer(_) => Ok(false),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => return false,
                Err(error) if self.ports.get(&id).is_some_and(|p| p.kind == PortKind::Nic) => {
                    self.nic_failed(id, &error);
                    return false;
                }
                Err(error) => {
                    self.port_failed(id, &error);
                    return false;
                }
            }
        }
        true
    }

    /// One `recvmmsg` batch from a socket port. `Ok(false)` when the socket is drained.
    fn receive_batch(&mut self, id: PortId, fd: RawFd) -> io::Result<bool> {
        // The batch is lent out while its frames are switched, which needs the whole switch.
        let mut batch = std::mem::replace(&mut self.batch, RecvBatch::new(0, 0));
        let outcome = self.switch_batch(id, fd, &mut batch);
        self.batch = batch;
        outcome
    }

    fn switch_batch(&mut self, id: PortId, fd: RawFd, batch: &mut RecvBatch) -> io::Result<bool> {
        let count = batch.receive(fd)?;
        let now = Instant::now();
        for index in 0..count {
            let (frame, received) = batch.get(index);
            if frame.is_empty() && self.ports.get(&id).map(|p| p.kind) == Some(PortKind::Bess) {
                // A BESS client never sends an empty packet: this is end of stream.
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            self.switch_one(Ingress { id, frame, oversize: received.truncated, now });
        }
        Ok(count == BATCH)
    }

    /// Up to one batch of frames from a device port, one read each. A read may bring a TCP
    /// super-frame of dozens of segments, so the port stops reading as soon as one of them
    /// congests a port and pauses this one: a batch of them would overrun any queue.
    fn receive_device(&mut self, id: PortId, fd: RawFd) -> io::Result<bool> {
        let now = Instant::now();
        let mut buffer = std::mem::take(&mut self.device_buffer);
        let mut outcome = Ok(true);
        for _ in 0..BATCH {
            if self.ports.get(&id).is_none_or(|port| port.paused) {
                break;
            }
            match sys::read(fd, &mut buffer) {
                Ok(len) => {
                    let (header, frame) = buffer[..len].split_at_mut(VNET_HEADER_LEN.min(len));
                    match VnetHeader::parse(header) {
                        Some(header) => {
                            self.switch_offloaded(id, &header, frame, None, now);
                        }
                        None => self.count_runt(id),
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    outcome = Ok(false);
                    break;
                }
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        self.device_buffer = buffer;
        outcome
    }

    /// Up to one batch of frames from a NIC port. `Ok(false)` when the socket is drained.
    fn receive_nic(&mut self, id: PortId, fd: RawFd) -> io::Result<bool> {
        let mut batch =
            self.nic_batch.take().unwrap_or_else(|| RecvBatch::for_packets(NIC_BATCH, NIC_SLOT));
        let count = batch.receive(fd);
        let now = Instant::now();
        for index in 0..*count.as_ref().unwrap_or(&0) {
            let (data, received) = batch.get_mut(index);
            self.nic_frame(id, data, received, now);
        }
        self.nic_batch = Some(batch);
        if let Some(Link::Nic(nic)) = self.ports.get_mut(&id).map(Port::link_mut) {
            if nic.down && count.as_ref().is_ok_and(|&n| n > 0) {
                nic.down = false;
                tracing::info!(port = id, interface = %nic.name, "interface is up again");
            }
        }
        Ok(count? == NIC_BATCH)
    }

    /// Takes one frame from a NIC's wire: a beacon goes to the election; a frame the host
    /// sent passes only if it is meant for the network; everything else passes only while
    /// the port forwards, restored to what the wire carried. Returns whether a frame went to a
    /// local port.
    fn nic_frame(
        &mut self,
        id: PortId,
        data: &mut [u8],
        received: sys::Received,
        now: Instant,
    ) -> bool {
        let Some(port) = self.ports.get_mut(&id) else { return false };
        let Some(header) = VnetHeader::parse(data) else {
            port.counters.drops.runt += 1;
            return false;
        };
        let frame = &mut data[VNET_HEADER_LEN..];

        // Step 1: beacons are the election's, never traffic. (A guest request from the LAN is
        // no beacon: the switch refuses it as forged.)
        if beacon::is_beacon(frame) {
            self.hear_beacon(id, frame, now);
            return false;
        }

        // Step 2: the host's own frames, and everything on a port that does not forward.
        let Link::Nic(nic) = port.link() else { return false };
        if !nic.segment.forwarding() {
            if !received.outgoing {
                port.counters.drops.standby += 1;
            }
            return false;
        }
        if received.outgoing && !self.meant_for_network(id, frame, now) {
            return false;
        }

        // Step 3: undo the offloads, then switch what the wire carried.
        let Some(port) = self.ports.get_mut(&id) else { return false };
        if received.truncated {
            port.counters.drops.oversize += 1;
            warn_malformed(&mut self.malformed_warnings, port, "oversize", frame.len(), now);
            return false;
        }
        self.switch_offloaded(id, &header, frame, received.vlan, now)
    }

    /// Counts a read too short to hold a virtio header on port `id`.
    fn count_runt(&mut self, id: PortId) {
        if let Some(port) = self.ports.get_mut(&id) {
            port.counters.drops.runt += 1;
        }
    }

    /// Switches `frame`, read from port `id` behind virtio header `header`, as the wire would
    /// carry it: its partial checksum completed, the VLAN tag the kernel took out (`vlan`,
    /// TPID and TCI) put back, and a super-frame cut into frames. Returns whether a frame went
    /// to a local port.
    fn switch_offloaded(
        &mut self,
        id: PortId,
        header: &VnetHeader,
        frame: &mut [u8],
        vlan: Option<(u16, u16)>,
        now: Instant,
    ) -> bool {
        let Some(port) = self.ports.get_mut(&id) else { return false };
        if header.flags & NEEDS_CSUM != 0 && !header.is_gso() {
            let (start, offset) = (usize::from(header.csum_start), usize::from(header.csum_offset));
            if offload::complete_checksum(frame, start, offset).is_err() {
                port.counters.drops.runt += 1;
                warn_malformed(&mut self.malformed_warnings, port, "checksum", frame.len(), now);
                return false;
            }
        }
        let mut restored = std::mem::take(&mut self.restored);
        let frame: &[u8] = match vlan {
            Some((tpid, tci)) => {
                offload::insert_vlan_tag(frame, tpid, tci, &mut restored);
                &restored
            }
            None => frame,
        };
        let mut local = false;
        if header.is_gso() {
            let mut segmented = std::mem::take(&mut self.segmented);
            let result = offload::segment(frame, header, &mut segmented, |segment| {
                let ingress = Ingress { id, frame: segment, oversize: false, now };
                local |= self.switch_one(ingress);
            });
            self.segmented = segmented;
            if let Err(error) = result {
                if let Some(port) = self.ports.get_mut(&id) {
                    port.counters.drops.oversize += 1;
                    tracing::debug!(port = id, %error, len = frame.len(), "super-frame dropped");
                }
            }
        } else {
            local = self.switch_one(Ingress { id, frame, oversize: false, now });
        }
        self.restored = restored;
        local
    }

    /// Answers the in-band requests guests sent: a guest may move its own port to a network
    /// the config lets guests choose. A request from where no guest is (a peer, a NIC's LAN, a
    /// tap) is forged: the node answers nothing and counts it.
    fn answer_guests(&mut self) {
        for (id, frame) in std::mem::take(&mut self.control_frames) {
            let Some(port) = self.ports.get(&id) else { continue };
            let from = port.net;
            if !matches!(port.kind, PortKind::Uml | PortKind::Vde | PortKind::Bess) {
                self.refuse_guest(id, &GuestRefusal::Forged, "not from a guest's port");
                continue;
            }
            let request = match guest::Request::parse(&frame) {
                Ok(request) => request,
                Err(error) => {
                    self.refuse_guest(id, &GuestRefusal::Malformed, &error.to_string());
                    continue;
                }
            };
            let (status, message) = match &self.config.guest_networks {
                None => (
                    guest::Status::Refused,
                    "this node does not let guests choose their network ([guests] set_net)"
                        .to_string(),
                ),
                Some(allowed) if !allowed.is_empty() && !allowed.contains(&request.net) => (
                    guest::Status::Refused,
                    format!("guests may not choose network {} on this node", request.net),
                ),
                Some(_) => match self.set_network(id, request.net) {
                    Ok(_) => (guest::Status::Moved, format!("moved to network {}", request.net)),
                    Err(error) => (guest::Status::NoSuchNetwork, error.message),
                },
            };
            if status == guest::Status::Moved {
                tracing::info!(port = id, from, to = request.net, "guest moved its port");
            } else {
                self.refuse_guest(id, &GuestRefusal::Refused, &message);
            }
            let Some(port) = self.ports.get_mut(&id) else { continue };
            let reply = guest::Reply { id: request.id, net: port.net, status, message };
            let mut source = [0u8; 6];
            source.copy_from_slice(&frame[6..12]);
            port.transmit(&reply.emit(umnet_proto::ethernet::MacAddress(source)));
        }
    }

    /// Counts a refused guest request and warns (rate-limited).
    fn refuse_guest(&mut self, id: PortId, refusal: &GuestRefusal, reason: &str) {
        let counter = match refusal {
            GuestRefusal::Forged => &self.rejects.guest_forged,
            GuestRefusal::Malformed => &self.rejects.guest_malformed,
            GuestRefusal::Refused => &self.rejects.guest_refused,
        };
        RejectCounters::count(counter);
        if let Some(suppressed) = self.guest_warning.check(Instant::now()) {
            tracing::warn!(port = id, reason, suppressed, "guest request refused");
        }
    }

    /// Switches one frame, and notes when it went to a local port (which busy polling
    /// follows). Returns whether it did.
    fn switch_one(&mut self, ingress: Ingress<'_>) -> bool {
        let now = ingress.now;
        let local = switch_frame(
            &mut self.ports,
            &mut self.networks,
            &mut self.malformed_warnings,
            &mut self.congested,
            &mut self.control_frames,
            &mut self.captures,
            &self.config,
            ingress,
        );
        if local {
            self.last_local_delivery = now;
        }
        local
    }

    /// Whether a frame the host sent out of NIC port `id` is for a station of the network
    /// (learned on another of its ports) rather than for the LAN.
    fn meant_for_network(&self, id: PortId, frame: &[u8], now: Instant) -> bool {
        let Some(port) = self.ports.get(&id) else { return false };
        let (Ok(header), Some(network)) = (Header::parse(frame), self.networks.get(&port.net))
        else {
            return false;
        };
        matches!(network.bridge.decide(header.destination, id, now), Decision::Forward(_))
            && !header.destination.is_group()
    }

    /// Hands a beacon heard on NIC port `id` to its election.
    fn hear_beacon(&mut self, id: PortId, frame: &[u8], now: Instant) {
        let Some(port) = self.ports.get_mut(&id) else { return };
        let beacon = match Beacon::parse(frame) {
            Ok(beacon) => beacon,
            Err(error) => {
                port.counters.drops.bad_beacon += 1;
                warn_malformed(&mut self.malformed_warnings, port, "bad beacon", frame.len(), now);
                tracing::debug!(port = id, %error, "malformed beacon dropped");
                return;
            }
        };
        let Link::Nic(nic) = port.link_mut() else { return };
        if nic.segment.hear(&beacon, now) {
            tracing::debug!(port = id, node = %beacon.node, interface = %beacon.port,
                leaving = beacon.leaving(), "NIC port heard a new neighbour on its LAN");
            self.elect(id, now);
        }
    }

    /// Lets NIC port `id` decide its role, counting the beacons of this node's ports and of
    /// the peers connected on its network, and logs a change.
    fn elect(&mut self, id: PortId, now: Instant) {
        let Some(net) = self.ports.get(&id).map(|port| port.net) else { return };
        let peers: BTreeSet<String> = self
            .ports
            .values()
            .filter(|port| port.kind == PortKind::Peer && port.net == net)
            .map(|port| port.client.clone())
            .collect();
        let Some(port) = self.ports.get_mut(&id) else { return };
        let Link::Nic(nic) = port.link_mut() else { return };
        let Some(role) = nic.segment.decide(now, |node| peers.contains(node)) else { return };
        match &role {
            Role::Standby { forwarder: (node, interface) } => tracing::warn!(
                port = id,
                net,
                interface = %nic.name,
                forwarder = %format!("{node}/{interface}"),
                "NIC port shares its LAN with another bridge of this network; standing by \
                 while the other forwards, so the LAN and the overlay form no loop"
            ),
            Role::Forwarding => {
                tracing::info!(port = id, net, interface = %nic.name, "NIC port forwards")
            }
            Role::Listening => {}
        }
        // Frames learned through the port in its old role would be sent to a port that now
        // drops them.
        if let Some(network) = self.networks.get_mut(&net) {
            network.bridge.forget_port(id);
        }
    }

    /// Once a second: NIC ports whose interface is gone try to open it again, every NIC port
    /// decides its role, and sends its beacon.
    fn tick_nics(&mut self, now: Instant) {
        let nics: Vec<PortId> =
            self.ports.values().filter(|p| p.kind == PortKind::Nic).map(|p| p.id).collect();
        for id in nics {
            self.check_interface(id);
            self.reopen_nic(id);
            self.elect(id, now);
            self.send_beacon(id, false);
        }
    }

    /// Sends NIC port `id`'s beacon; `leaving` when the port goes.
    fn send_beacon(&self, id: PortId, leaving: bool) {
        let Some(port) = self.ports.get(&id) else { return };
        let Link::Nic(nic) = port.link() else { return };
        let Some(frame) = nic.segment.beacon(leaving).emit(nic.mac) else { return };
        if let Err(error) = nic.send(&frame) {
            tracing::trace!(port = id, %error, "beacon not sent");
        }
    }

    /// Notices that the interface of NIC port `id` went away, or was replaced by another of
    /// the same name: the kernel reports both only as "down" on the socket, which then stays
    /// bound to an interface that no longer exists.
    fn check_interface(&mut self, id: PortId) {
        let Some(port) = self.ports.get_mut(&id) else { return };
        let net = port.net;
        let Link::Nic(nic) = port.link_mut() else { return };
        if nic.socket.is_none() || sys::interface_index(&nic.name).is_ok_and(|i| i == nic.index) {
            return;
        }
        if let Some(socket) = nic.socket.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&socket.as_raw_fd()));
        }
        tracing::warn!(port = id, interface = %nic.name,
            "interface is gone; the NIC port waits for it to come back");
        if let Some(network) = self.networks.get_mut(&net) {
            network.bridge.forget_port(id);
        }
    }

    /// Opens the packet socket of NIC port `id` again if its interface came back.
    fn reopen_nic(&mut self, id: PortId) {
        let Some(port) = self.ports.get_mut(&id) else { return };
        let Link::Nic(nic) = port.link_mut() else { return };
        if nic.socket.is_some() || !sys::interface_exists(&nic.name) {
            return;
        }
        let socket = match sys::open_packet_socket(&nic.name) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(port = id, interface = %nic.name, %error, "cannot reopen yet");
                return;
            }
        };
        if let Ok(mac) = sys::interface_mac(&nic.name) {
            nic.mac = umnet_proto::ethernet::MacAddress(mac);
        }
        nic.index = sys::interface_index(&nic.name).unwrap_or(0);
        let interest = Interest::READABLE | Interest::WRITABLE;
        let token = Token(id as usize);
        let fd = socket.as_raw_fd();
        if let Err(error) = self.poll.registry().register(&mut SourceFd(&fd), token, interest) {
            tracing::error!(port = id, %error, "cannot watch the reopened interface");
            return;
        }
        nic.socket = Some(socket);
        nic.down = false;
        tracing::info!(port = id, interface = %nic.name, "interface is back; NIC port reattached");
        self.mark_ready(id);
    }

    /// A NIC port's socket failed: the interface went down (the socket stays, and frames flow
    /// again when it comes up) or away ([`Switch::check_interface`] notices within a second).
    fn nic_failed(&mut self, id: PortId, error: &io::Error) {
        let Some(port) = self.ports.get_mut(&id) else { return };
        let Link::Nic(nic) = port.link_mut() else { return };
        match error.raw_os_error() {
            Some(libc::ENETDOWN) => {
                if !nic.down {
                    nic.down = true;
                    tracing::warn!(port = id, interface = %nic.name,
                        "interface is down; the NIC port resumes when it comes up");
                }
            }
            _ => tracing::warn!(port = id, interface = %nic.name, %error, "NIC port read failed"),
        }
    }

    fn port_failed(&mut self, id: PortId, error: &io::Error) {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            tracing::info!(port = id, "client closed its connection; port removed");
        } else {
            tracing::warn!(port = id, %error, "port failed; removed");
        }
        self.remove_port(id);
    }

    fn accept_bess(&mut self, net: NetworkId) {
        loop {
            let Some(network) = self.networks.get(&net) else { return };
            // SAFETY: accept4 takes no address buffer here; a non-negative result is a fresh
            // descriptor that we own.
            let fd = unsafe {
                libc::accept4(
                    network.bess.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!(net, %error, "cannot accept a BESS connection");
                }
                return;
            }
            // SAFETY: fd was just returned by accept4 and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let id = self.ids.fetch_add(1, Ordering::Relaxed);
            let pid = sys::peer_credentials(fd.as_raw_fd()).map(|(pid, _)| pid);
            let client = String::from("UML vector (bess)");
            let link = Link::Socket(fd);
            self.add_port(NewPort { id, kind: PortKind::Bess, net, client, pid, link });
        }
    }

    /// Runs queued commands. Returns false when the switch must stop.
    fn run_commands(&mut self) -> bool {
        self.woken.store(false, Ordering::Release);
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::AddNetwork { net, bess } => self.add_network(net, bess),
                Command::RemoveNetwork { net, force, reply } => {
                    let _ = reply.send(self.remove_network(net, force));
                }
                Command::AddPort { port, attached } => {
                    let added = self.add_port(port);
                    if let Some(attached) = attached {
                        let _ = attached.send(added);
                    }
                }
                Command::RemovePort { port, reply } => {
                    let result = self.remove_port(port).ok_or_else(|| no_port(port));
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                Command::SetNetwork { port, net, reply } => {
                    let _ = reply.send(self.set_network(port, net));
                }
                Command::Ports { reply } => {
                    let mut ports: Vec<_> = self.ports.values().map(Port::info).collect();
                    ports.sort_by_key(|port| port.id);
                    let _ = reply.send(ports);
                }
                Command::Networks { reply } => {
                    let _ = reply.send(self.summaries());
                }
                Command::Fdb { net, reply } => {
                    let _ = reply.send(self.fdb(net));
                }
                Command::SetPeer { peer, name, link, nets } => {
                    self.set_peer(peer, &name, &link, &nets)
                }
                Command::DropPeer { peer } => {
                    self.set_peer_ports(peer, "", None, &BTreeSet::new());
                    self.peer_stats.remove(&peer);
                }
                Command::PeerFrame { peer, net, frame } => self.peer_frame(peer, net, &frame),
                Command::PeerDrained { peer } => {
                    let ports: Vec<PortId> = self
                        .peer_ports
                        .iter()
                        .filter(|((of, _), _)| *of == peer)
                        .map(|(_, &id)| id)
                        .collect();
                    for id in ports {
                        self.flush(id);
                    }
                }
                Command::SetGuestPolicy { networks } => self.config.guest_networks = networks,
                Command::Capture(capture) => {
                    tracing::info!(net = capture.net, port = capture.port, "capture started");
                    self.captures.push(capture);
                }
                Command::Shutdown => {
                    // Other bridges of the same LAN take over at once, not after HOLD.
                    let nics: Vec<PortId> = self
                        .ports
                        .values()
                        .filter(|port| port.kind == PortKind::Nic)
                        .map(|port| port.id)
                        .collect();
                    for id in nics {
                        self.send_beacon(id, true);
                    }
                    return false;
                }
            }
        }
        true
    }

    fn set_peer(
        &mut self,
        peer: PeerId,
        name: &str,
        link: &PeerLinkFactory,
        nets: &BTreeSet<NetworkId>,
    ) {
        self.peer_stats.insert(peer, link.stats().clone());
        self.set_peer_ports(peer, name, Some(link), nets);
    }

    /// Makes the ports of `peer` those of `nets`.
    fn set_peer_ports(
        &mut self,
        peer: PeerId,
        name: &str,
        link: Option<&PeerLinkFactory>,
        nets: &BTreeSet<NetworkId>,
    ) {
        let stale: Vec<((PeerId, NetworkId), PortId)> = self
            .peer_ports
            .iter()
            .filter(|((p, net), _)| *p == peer && !nets.contains(net))
            .map(|(key, id)| (*key, *id))
            .collect();
        for (key, id) in stale {
            self.peer_ports.remove(&key);
            self.remove_port(id);
        }
        let Some(link) = link else { return };
        for &net in nets {
            if self.peer_ports.contains_key(&(peer, net)) || !self.networks.contains_key(&net) {
                continue;
            }
            let id = self.ids.fetch_add(1, Ordering::Relaxed);
            let new = NewPort {
                id,
                kind: PortKind::Peer,
                net,
                client: name.to_string(),
                pid: None,
                link: Link::Peer(link.link()),
            };
            if self.add_port(new) {
                self.peer_ports.insert((peer, net), id);
            }
        }
    }

    fn peer_frame(&mut self, peer: PeerId, net: NetworkId, frame: &[u8]) {
        let Some(&id) = self.peer_ports.get(&(peer, net)) else {
            if let Some(stats) = self.peer_stats.get(&peer) {
                stats.not_allowed.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(peer, net, "frame from a peer for a network it does not carry");
            return;
        };
        if let Some(stats) = self.peer_stats.get(&peer) {
            stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            stats.rx_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        self.switch_one(Ingress { id, frame, oversize: false, now: Instant::now() });
    }

    fn add_network(&mut self, net: NetworkId, bess: OwnedFd) {
        let token = Token(LISTENER_BASE + net as usize);
        if let Err(error) = self.poll.registry().register(
            &mut SourceFd(&bess.as_raw_fd()),
            token,
            Interest::READABLE,
        ) {
            tracing::error!(net, %error, "cannot watch the network's BESS socket");
        }
        let bridge = Bridge::new(self.config.aging, self.config.mac_limit);
        let network = Network {
            bridge,
            ports: Vec::new(),
            bess,
            table_full_warning: RateLimit::default(),
            flap_warning: RateLimit::default(),
        };
        self.networks.insert(net, network);
        // Connections queued before the listener was registered are taken now.
        self.accept_bess(net);
    }

    fn remove_network(&mut self, net: NetworkId, force: bool) -> AdminResult<Vec<PortId>> {
        let Some(network) = self.networks.get(&net) else {
            return Err(admin::Error::new(ErrorKind::NotFound, format!("no network {net}")));
        };
        let local = network
            .ports
            .iter()
            .filter(|id| self.ports.get(id).is_some_and(|p| p.kind != PortKind::Peer))
            .count();
        if local > 0 && !force {
            return Err(admin::Error::new(
                ErrorKind::Busy,
                format!(
                    "network {net} has {} port(s) attached; move or remove them, or use --force",
                    local
                ),
            ));
        }
        let ports = network.ports.clone();
        for &port in &ports {
            self.remove_port(port);
        }
        self.peer_ports.retain(|(_, n), _| *n != net);
        if let Some(network) = self.networks.remove(&net) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&network.bess.as_raw_fd()));
        }
        Ok(ports)
    }

    fn add_port(&mut self, new: NewPort) -> bool {
        if self.ports.len() >= self.config.max_ports {
            RejectCounters::count(&self.rejects.too_many_ports);
            tracing::warn!(
                max_ports = self.config.max_ports,
                kind = %new.kind,
                net = new.net,
                "port refused: the node serves its maximum number of ports (switch.max_ports)"
            );
            return false;
        }
        let Some(network) = self.networks.get_mut(&new.net) else {
            tracing::warn!(port = new.id, net = new.net, "network vanished; port closed");
            return false;
        };
        if let Some(fd) = new.link.fd() {
            let token = Token(new.id as usize);
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(error) = self.poll.registry().register(&mut SourceFd(&fd), token, interest) {
                tracing::error!(port = new.id, %error, "cannot watch the port; closed");
                return false;
            }
        }
        network.ports.push(new.id);
        tracing::info!(
            port = new.id,
            kind = %new.kind,
            net = new.net,
            client = %new.client,
            pid = new.pid,
            "port attached"
        );
        let port = Port::new(
            new.id,
            new.kind,
            new.net,
            new.client,
            new.pid,
            new.link,
            self.config.queue_len,
        );
        self.ports.insert(new.id, port);
        // Frames that arrived before registration are read now.
        self.mark_ready(new.id);
        true
    }

    fn remove_port(&mut self, id: PortId) -> Option<admin::Port> {
        self.send_beacon(id, true);
        let port = self.ports.remove(&id)?;
        if let Some(fd) = port.link().fd() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        self.resume(port.waiters.clone());
        self.malformed_warnings.remove(&id);
        if let Some(network) = self.networks.get_mut(&port.net) {
            network.ports.retain(|&p| p != id);
            let forgotten = network.bridge.forget_port(id);
            tracing::debug!(
                port = id,
                net = port.net,
                forgotten,
                "addresses of the port forgotten"
            );
        }
        tracing::info!(port = id, kind = %port.kind, net = port.net, "port detached");
        Some(port.info())
    }

    fn set_network(&mut self, id: PortId, net: NetworkId) -> AdminResult<admin::Port> {
        if !self.networks.contains_key(&net) {
            return Err(admin::Error::new(ErrorKind::NotFound, format!("no network {net}")));
        }
        if self.ports.get(&id).is_some_and(|port| port.net != net) {
            // A NIC port leaves the election of its old network.
            self.send_beacon(id, true);
        }
        let Some(port) = self.ports.get_mut(&id) else { return Err(no_port(id)) };
        let from = port.net;
        if from != net {
            port.net = net;
            if let Link::Nic(nic) = port.link_mut() {
                nic.segment.set_network(net, Instant::now());
            }
            if let Some(old) = self.networks.get_mut(&from) {
                old.ports.retain(|&p| p != id);
                old.bridge.forget_port(id);
            }
            if let Some(new) = self.networks.get_mut(&net) {
                new.ports.push(id);
            }
            tracing::info!(port = id, from, to = net, "port moved to another network");
        }
        Ok(port.info())
    }

    fn summaries(&self) -> Vec<NetworkSummary> {
        self.networks
            .iter()
            .map(|(&id, network)| NetworkSummary {
                id,
                ports: network.ports.len(),
                macs: network.bridge.len(),
                mac_limit: network.bridge.limit(),
                mac_limit_hits: network.bridge.limit_hits(),
                mac_flaps: network.bridge.flaps(),
            })
            .collect()
    }

    fn fdb(&self, only: Option<NetworkId>) -> AdminResult<Vec<FdbEntry>> {
        if let Some(net) = only {
            if !self.networks.contains_key(&net) {
                return Err(admin::Error::new(ErrorKind::NotFound, format!("no network {net}")));
            }
        }
        let now = Instant::now();
        let rows = self
            .networks
            .iter()
            .filter(|(&id, _)| only.is_none_or(|net| net == id))
            .flat_map(|(&net, network)| {
                network.bridge.rows(now).into_iter().map(move |row| FdbEntry {
                    net,
                    mac: row.mac.to_string(),
                    port: row.port,
                    age_secs: row.age.as_secs(),
                })
            })
            .collect();
        Ok(rows)
    }
}

fn no_port(id: PortId) -> admin::Error {
    admin::Error::new(ErrorKind::NotFound, format!("no port {id}"))
}

/// A frame as it came in.
struct Ingress<'a> {
    id: PortId,
    frame: &'a [u8],
    /// The frame did not fit the receive buffer.
    oversize: bool,
    now: Instant,
}

/// Checks, learns and forwards one frame.
///
/// A free function over the switch's parts, so the frame can borrow the receive buffer while
/// ports and bridges are changed.
#[allow(clippy::too_many_arguments)]
fn switch_frame(
    ports: &mut FastMap<PortId, Port>,
    networks: &mut BTreeMap<NetworkId, Network>,
    warnings: &mut FastMap<PortId, RateLimit>,
    congested: &mut Vec<PortId>,
    control: &mut Vec<(PortId, Vec<u8>)>,
    captures: &mut Vec<Capture>,
    config: &SwitchConfig,
    ingress: Ingress<'_>,
) -> bool {
    let Ingress { id, frame, oversize, now } = ingress;
    let Some(port) = ports.get_mut(&id) else { return false };

    // Step 1: refuse what cannot be switched, counting it on the port it came from.
    let problem = if frame.len() < HEADER_LEN {
        port.counters.drops.runt += 1;
        Some("runt")
    } else if oversize || frame.len() > config.max_frame {
        port.counters.drops.oversize += 1;
        Some("oversize")
    } else {
        None
    };
    let header = match (problem, Header::parse(frame)) {
        (None, Ok(header)) if header.source.is_group() => {
            port.counters.drops.bad_source += 1;
            warn_malformed(warnings, port, "group source address", frame.len(), now);
            return false;
        }
        (None, Ok(header)) => header,
        (problem, _) => {
            warn_malformed(warnings, port, problem.unwrap_or("runt"), frame.len(), now);
            return false;
        }
    };
    port.counters.rx_frames += 1;
    port.counters.rx_bytes += frame.len() as u64;
    if header.ethertype == beacon::ETHERTYPE
        && (guest::is_guest_frame(frame) || beacon::is_beacon(frame))
    {
        // Guest requests are for the node, and beacons for NIC ports' wires only: neither is
        // switched. Other uses of the experimental EtherType pass like any frame.
        control.push((id, frame.to_vec()));
        return false;
    }
    let net = port.net;
    let Some(network) = networks.get_mut(&net) else { return false };
    if !captures.is_empty() {
        offer(captures, net, id, frame);
    }

    // Step 2: learn the source.
    match network.bridge.learn(header.source, id, now) {
        Learned::Moved { from, flapping: false } => {
            tracing::debug!(net, mac = %header.source, from, to = id, "address moved");
        }
        Learned::Moved { from, flapping: true } => {
            if let Some(suppressed) = network.flap_warning.check(now) {
                tracing::warn!(
                    net,
                    mac = %header.source,
                    from,
                    to = id,
                    suppressed,
                    "address flapping between ports: a loop, or two hosts with one MAC address"
                );
            }
        }
        Learned::TableFull => {
            if let Some(suppressed) = network.table_full_warning.check(now) {
                tracing::warn!(
                    net,
                    limit = network.bridge.limit(),
                    mac = %header.source,
                    port = id,
                    suppressed,
                    "MAC table full: new sources are flooded, not learned"
                );
            }
        }
        Learned::New | Learned::Refreshed | Learned::Ignored => {}
    }

    // Step 3: forward, or flood to every other port of the same network.
    // A frame from a peer never goes to another peer (split horizon).
    let from_peer = ports.get(&id).is_some_and(|port| port.kind == PortKind::Peer);
    let mut sent = Transmitted::default();
    match network.bridge.decide(header.destination, id, now) {
        Decision::Forward(out) => {
            sent = transmit(ports, congested, captures, id, out, from_peer, frame, now);
        }
        Decision::Flood => {
            for &out in &network.ports {
                if out != id {
                    let one = transmit(ports, congested, captures, id, out, from_peer, frame, now);
                    sent.pause |= one.pause;
                    sent.local |= one.local;
                }
            }
        }
        Decision::Filter => {}
    }
    if sent.pause {
        if let Some(port) = ports.get_mut(&id) {
            port.paused = true;
        }
    }
    tracing::trace!(net, port = id, len = frame.len(), dst = %header.destination, "frame");
    sent.local
}

/// A capture of one network's frames, or of one port's, feeding `umnet capture`.
#[derive(Debug)]
pub(crate) struct Capture {
    /// The network captured.
    pub(crate) net: NetworkId,
    /// Only the frames this port sends and receives.
    pub(crate) port: Option<PortId>,
    /// Where copies go; when the reader falls behind they are dropped and counted, so a
    /// capture never slows the switch down.
    pub(crate) frames: tokio::sync::mpsc::Sender<(SystemTime, Vec<u8>)>,
    pub(crate) counters: Arc<CaptureCounters>,
}

/// What a capture took and what it had to drop.
#[derive(Debug, Default)]
pub(crate) struct CaptureCounters {
    pub(crate) captured: std::sync::atomic::AtomicU64,
    pub(crate) dropped: std::sync::atomic::AtomicU64,
}

impl Capture {
    /// Hands a copy of `frame` to the reader. Returns false once the reader is gone.
    fn take(&self, frame: &[u8]) -> bool {
        use tokio::sync::mpsc::error::TrySendError;
        self.counters.captured.fetch_add(1, Ordering::Relaxed);
        match self.frames.try_send((SystemTime::now(), frame.to_vec())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// Offers a frame that entered network `net` on port `ingress` to the captures that want it.
fn offer(captures: &mut Vec<Capture>, net: NetworkId, ingress: PortId, frame: &[u8]) {
    captures.retain(|c| c.net != net || c.port.is_some_and(|p| p != ingress) || c.take(frame));
}

/// Offers a frame leaving through port `egress` to the captures of that port.
fn offer_egress(captures: &mut Vec<Capture>, egress: PortId, frame: &[u8]) {
    captures.retain(|c| c.port != Some(egress) || c.take(frame));
}

/// Why a guest request was refused.
enum GuestRefusal {
    /// It came from where no guest is.
    Forged,
    /// It did not decode.
    Malformed,
    /// The config does not allow it, or the network does not exist.
    Refused,
}

/// What sending one frame out of one port did.
#[derive(Clone, Copy, Debug, Default)]
struct Transmitted {
    /// The ingress port must pause: the egress port is congested.
    pause: bool,
    /// The frame went to a local port (not a peer), whose client may answer at once.
    local: bool,
}

/// Sends `frame` from port `ingress` out of port `out`.
#[allow(clippy::too_many_arguments)]
fn transmit(
    ports: &mut FastMap<PortId, Port>,
    congested: &mut Vec<PortId>,
    captures: &mut Vec<Capture>,
    ingress: PortId,
    out: PortId,
    from_peer: bool,
    frame: &[u8],
    now: Instant,
) -> Transmitted {
    let Some(port) = ports.get_mut(&out) else { return Transmitted::default() };
    if from_peer && port.kind == PortKind::Peer {
        return Transmitted::default();
    }
    let local = port.kind != PortKind::Peer;
    if !captures.is_empty() {
        offer_egress(captures, out, frame);
    }
    if port.transmit(frame) == Sent::Delivered || !port.congested() {
        return Transmitted { pause: false, local };
    }
    if !port.waiters.contains(&ingress) {
        port.waiters.push(ingress);
    }
    if port.congested_since.is_none() {
        port.congested_since = Some(now);
        congested.push(out);
    }
    Transmitted { pause: true, local }
}

fn warn_malformed(
    warnings: &mut FastMap<PortId, RateLimit>,
    port: &Port,
    reason: &str,
    len: usize,
    now: Instant,
) {
    if let Some(suppressed) = warnings.entry(port.id).or_default().check(now) {
        tracing::warn!(
            port = port.id,
            client = %port.client,
            reason,
            len,
            suppressed,
            "dropped a malformed frame"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A switch on a thread of its own with networks 100 and 101, and a client socket per port.
    struct Harness {
        handle: Handle,
        thread: Option<std::thread::JoinHandle<()>>,
        dir: std::path::PathBuf,
    }

    impl Harness {
        fn new(mac_limit: usize) -> Self {
            let config = SwitchConfig {
                aging: Duration::from_secs(300),
                mac_limit,
                max_frame: 1518,
                queue_len: 64,
                max_ports: 8,
                busy_poll: Duration::ZERO,
                guest_networks: Some(BTreeSet::from([101])),
            };
            let (handle, switch) = new(config, Arc::default()).unwrap();
            let thread = std::thread::spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(switch.run());
            });
            static SWITCHES: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "umnet-switch-test-{}-{}",
                std::process::id(),
                SWITCHES.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let harness = Harness { handle, thread: Some(thread), dir };
            for net in [100, 101] {
                let bess = sys::seqpacket_listener(&harness.dir.join(net.to_string())).unwrap();
                harness.handle.send(Command::AddNetwork { net, bess });
            }
            harness
        }

        fn port(&self, net: NetworkId) -> (PortId, UnixDatagram) {
            let (ours, theirs) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            theirs.set_read_timeout(Some(RECEIVE_WAIT)).unwrap();
            let id = self.handle.next_port_id();
            let port = NewPort {
                id,
                kind: PortKind::Uml,
                net,
                client: "test".into(),
                pid: None,
                link: Link::Socket(ours.into()),
            };
            // Wait until the port is in place, so no frame sent after this races its arrival.
            let (attached, answer) = oneshot::channel();
            self.handle.send(Command::AddPort { port, attached: Some(attached) });
            assert!(answer.blocking_recv().unwrap(), "port {id} was refused");
            (id, theirs)
        }

        fn ports(&self) -> Vec<admin::Port> {
            let (reply, answer) = oneshot::channel();
            self.handle.send(Command::Ports { reply });
            answer.blocking_recv().unwrap()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.handle.send(Command::Shutdown);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn frame(destination: u8, source: u8, len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; len];
        frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, destination]);
        if destination == 0xff {
            frame[..6].fill(0xff);
        }
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, source]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame
    }

    /// How long a test waits for a frame it expects; generous, for loaded CI machines.
    const RECEIVE_WAIT: Duration = Duration::from_secs(2);

    fn received(socket: &UnixDatagram) -> Option<Vec<u8>> {
        let mut buffer = [0u8; 2048];
        socket.recv(&mut buffer).ok().map(|n| buffer[..n].to_vec())
    }

    /// Whether nothing arrives for a short while: the check for frames that must not come.
    fn silent(socket: &UnixDatagram) -> bool {
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let nothing = received(socket).is_none();
        socket.set_read_timeout(Some(RECEIVE_WAIT)).unwrap();
        nothing
    }

    #[test]
    fn floods_within_a_network_then_forwards_to_the_learned_port() {
        let switch = Harness::new(64);
        let (_, a) = switch.port(100);
        let (_, b) = switch.port(100);
        let (_, c) = switch.port(100);
        let (_, other) = switch.port(101);

        let broadcast = frame(0xff, 1, 60);
        a.send(&broadcast).unwrap();
        assert_eq!(received(&b), Some(broadcast.clone()));
        assert_eq!(received(&c), Some(broadcast.clone()));
        assert!(silent(&a), "never back out of the ingress port");
        assert!(silent(&other), "never into another network");

        let reply = frame(1, 2, 60);
        b.send(&reply).unwrap();
        assert_eq!(received(&a), Some(reply));
        assert!(silent(&c), "a learned destination is not flooded");
    }

    #[test]
    fn tagged_frames_pass_intact_and_bad_frames_are_counted() {
        let switch = Harness::new(64);
        let (a_id, a) = switch.port(100);
        let (_, b) = switch.port(100);

        let mut tagged = frame(0xff, 1, 1518);
        tagged[12..18].copy_from_slice(&[0x81, 0x00, 0x00, 0x2a, 0x08, 0x00]);
        a.send(&tagged).unwrap();
        assert_eq!(received(&b), Some(tagged));

        a.send(&[0x55]).unwrap();
        a.send(&frame(0xff, 1, 1519)).unwrap();
        a.send(&frame(0xff, 1, 9000)).unwrap();
        let mut group_source = frame(0xff, 1, 60);
        group_source[6] = 0x01;
        a.send(&group_source).unwrap();
        let ok = frame(0xff, 1, 64);
        a.send(&ok).unwrap();
        assert_eq!(received(&b), Some(ok), "good frames after bad ones still pass");

        let ports = switch.ports();
        let a = ports.iter().find(|p| p.id == a_id).unwrap();
        assert_eq!(a.counters.drops.runt, 1);
        assert_eq!(a.counters.drops.oversize, 2);
        assert_eq!(a.counters.drops.bad_source, 1);
        assert_eq!(a.counters.rx_frames, 2);
    }

    #[test]
    fn a_moved_port_switches_in_its_new_network_only() {
        let switch = Harness::new(64);
        let (a_id, a) = switch.port(100);
        let (_, b) = switch.port(100);
        let (_, c) = switch.port(101);

        let (reply, answer) = oneshot::channel();
        switch.handle.send(Command::SetNetwork { port: a_id, net: 101, reply });
        assert_eq!(answer.blocking_recv().unwrap().unwrap().net, 101);

        let broadcast = frame(0xff, 1, 60);
        a.send(&broadcast).unwrap();
        assert_eq!(received(&c), Some(broadcast));
        assert!(silent(&b));
    }

    #[test]
    fn past_the_mac_limit_frames_still_flow() {
        let switch = Harness::new(2);
        let (_, a) = switch.port(100);
        let (_, b) = switch.port(100);
        for source in 10..20 {
            a.send(&frame(0xff, source, 60)).unwrap();
            assert!(received(&b).is_some());
        }
        let (reply, answer) = oneshot::channel();
        switch.handle.send(Command::Networks { reply });
        let networks = answer.blocking_recv().unwrap();
        assert_eq!(networks[0].macs, 2);
        assert_eq!(networks[0].mac_limit_hits, 8);

        // Unlearned sources are flooded to: b still reaches them.
        b.send(&frame(15, 3, 60)).unwrap();
        assert!(received(&a).is_some());
    }

    #[test]
    fn a_slow_reader_pauses_its_sender_and_loses_nothing() {
        let switch = Harness::new(64);
        let (_, a) = switch.port(100);
        let (b_id, b) = switch.port(100);
        b.send(&frame(0xff, 2, 60)).unwrap();
        assert!(received(&a).is_some());

        // The sender outruns the reader by far; the reader drains slowly.
        const FRAMES: u32 = 3000;
        let sender = std::thread::spawn(move || {
            for i in 0..FRAMES {
                let mut f = frame(2, 1, 64);
                f[14..18].copy_from_slice(&i.to_be_bytes());
                a.send(&f).unwrap();
            }
        });
        for i in 0..FRAMES {
            let f = received(&b).unwrap_or_else(|| panic!("frame {i} never came"));
            assert_eq!(f[14..18], i.to_be_bytes(), "frame {i}: {:?}", switch.ports());
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        sender.join().unwrap();
        let ports = switch.ports();
        let b = ports.iter().find(|p| p.id == b_id).unwrap();
        assert_eq!(b.counters.drops.queue_full, 0);
    }

    #[test]
    fn a_reader_that_stops_pauses_nobody_for_long() {
        let switch = Harness::new(64);
        let (_, a) = switch.port(100);
        let (b_id, b) = switch.port(100);
        let (_, c) = switch.port(100);
        b.send(&frame(0xff, 2, 60)).unwrap();
        assert!(received(&a).is_some());
        assert!(received(&c).is_some());

        // b never reads again. a's frames to b are dropped once b is found stuck, and a's
        // broadcasts still reach c.
        a.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..5000 {
            a.send(&frame(2, 1, 64)).unwrap();
        }
        let broadcast = frame(0xff, 1, 60);
        a.send(&broadcast).unwrap();
        let mut got = None;
        for _ in 0..20 {
            got = received(&c);
            if got.is_some() {
                break;
            }
        }
        assert_eq!(got, Some(broadcast));
        let ports = switch.ports();
        let b = ports.iter().find(|p| p.id == b_id).unwrap();
        assert!(b.counters.drops.queue_full > 0, "{:?}", b.counters);
    }
}
