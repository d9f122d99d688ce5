//! A port as the switch sees it: a descriptor frames come in on and go out on, what is
//! known of the client, counters, and a short queue for a client that is slow to read.
//!
//! Sending never blocks the switch. A frame for a client whose socket is full waits in the
//! port's queue until the kernel says the socket is writable again, and is dropped (and
//! counted) only when that queue is full too. uml_switch and vde_switch drop the moment a
//! client's 10-datagram socket queue (`net.unix.max_dgram_qlen`) is full; a short wait turns
//! most of those drops into deliveries.
//!
//! A port whose queue grows past [`PAUSE_AT`] also pauses the ports feeding it, as an Ethernet
//! PAUSE frame would: the switch stops reading them until the queue is back under
//! [`RESUME_AT`]. A sender then waits in its own socket instead of burning CPU on frames the
//! switch would drop, which on a busy host leaves the CPU to the slow reader. A port that reads
//! nothing for [`STUCK_AFTER`] is stuck: it pauses nobody, and frames for it are dropped, so one
//! frozen guest cannot stall its network.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use umnet_proto::admin::{self, NetworkId, PortCounters, PortKind};
use umnet_proto::ethernet::MacAddress;
use umnet_proto::offload::VnetHeader;

use super::segment::Segment;
use super::PortId;
use crate::peers::PeerLink;
use crate::sys;

/// Frames queued for a port before it pauses the ports sending to it: one receive batch. The
/// sender is paused between batches, so the queue must hold twice this for no frame to be
/// lost (the config requires `port_queue` of at least [`MIN_QUEUE`]).
pub(crate) const PAUSE_AT: usize = 32;

/// The shortest port queue that absorbs the batch a sender may still deliver once paused.
pub(crate) const MIN_QUEUE: usize = 2 * PAUSE_AT;

/// Frames queued for a port below which the ports it paused are read again.
pub(crate) const RESUME_AT: usize = 8;

/// How long a port may hold others paused without taking a single frame before it is treated
/// as stuck.
pub(crate) const STUCK_AFTER: Duration = Duration::from_millis(20);

/// How frames reach a port's client.
#[derive(Debug)]
pub(crate) enum Link {
    /// A datagram or sequenced-packet socket: batched `recvmmsg`, `send`.
    Socket(OwnedFd),
    /// A character device (tap): `read` and `write`, one frame each.
    Device(OwnedFd),
    /// Another node: frames go out as QUIC datagrams and come in through the peer inbox.
    Peer(PeerLink),
    /// A NIC, through a packet socket.
    Nic(NicLink),
}

impl Link {
    /// The descriptor the switch waits on, if any.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Link::Socket(fd) | Link::Device(fd) => Some(fd.as_raw_fd()),
            Link::Nic(nic) => nic.socket.as_ref().map(|fd| fd.as_raw_fd()),
            Link::Peer(_) => None,
        }
    }
}

/// A NIC port's interface: a packet socket while the interface exists, and the port's place
/// in the election of the LAN segment it bridges ([`Segment`]).
#[derive(Debug)]
pub(crate) struct NicLink {
    /// The interface's name.
    pub(crate) name: String,
    /// The packet socket; `None` while the interface is gone, until it comes back.
    pub(crate) socket: Option<OwnedFd>,
    /// The index of the interface the socket is bound to: an interface of the same name with
    /// another index is a new one, which the socket does not see.
    pub(crate) index: u32,
    /// The interface's address, the source of its beacons.
    pub(crate) mac: MacAddress,
    pub(crate) segment: Segment,
    /// The interface was down when last used.
    pub(crate) down: bool,
}

impl NicLink {
    /// The link of a NIC port of node `node` on interface `name`, through `socket` (a packet
    /// socket from [`sys::open_packet_socket`]; `None` while the interface is missing),
    /// serving `net` from `now`.
    pub(crate) fn new(
        node: &str,
        name: &str,
        socket: Option<OwnedFd>,
        net: NetworkId,
        now: Instant,
    ) -> Self {
        // Read again when the socket is reopened; a missing interface has no address yet.
        let mac = MacAddress(sys::interface_mac(name).unwrap_or_default());
        let index = sys::interface_index(name).unwrap_or(0);
        let segment = Segment::new(node, name, net, now);
        NicLink { name: name.to_string(), socket, index, mac, segment, down: false }
    }

    /// Sends one frame as it is, with the virtio header the socket expects: no offload.
    pub(crate) fn send(&self, frame: &[u8]) -> io::Result<usize> {
        let Some(fd) = &self.socket else {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        };
        sys::send_with_header(fd.as_raw_fd(), &VnetHeader::NONE, frame)
    }

    /// What the port is doing, for `umnet port list`.
    fn state(&self) -> String {
        let mut state = match (&self.socket, self.down) {
            (None, _) => format!("interface {} is gone; waiting for it", self.name),
            (Some(_), true) => format!("interface {} is down; {}", self.name, self.segment.role()),
            (Some(_), false) => self.segment.role().to_string(),
        };
        let neighbours: Vec<String> =
            self.segment.neighbours().map(|(node, port)| format!("{node}/{port}")).collect();
        if !neighbours.is_empty() {
            state.push_str(&format!(" (LAN shared with {})", neighbours.join(", ")));
        }
        state
    }
}

/// What happened to a frame handed to [`Port::transmit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// The kernel took it.
    Delivered,
    /// It waits in the port's queue.
    Queued,
    /// It was dropped and counted.
    Dropped,
}

/// A connected client or device.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) id: PortId,
    pub(crate) kind: PortKind,
    pub(crate) net: NetworkId,
    /// The client's description or the device name.
    pub(crate) client: String,
    pub(crate) pid: Option<u32>,
    pub(crate) counters: PortCounters,
    /// Whether the port waits in the switch's list of ports with frames to read.
    pub(crate) ready: bool,
    /// Whether the switch stopped reading this port because a port it sends to is congested.
    pub(crate) paused: bool,
    /// Ports paused because of this port's queue, read again when it drains.
    pub(crate) waiters: Vec<PortId>,
    /// When this port, holding others paused, last took a frame.
    pub(crate) congested_since: Option<Instant>,
    /// The port stopped draining: it pauses nobody until its queue empties.
    pub(crate) stuck: bool,
    link: Link,
    queue: VecDeque<Box<[u8]>>,
    queue_limit: usize,
}

impl Port {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: PortId,
        kind: PortKind,
        net: NetworkId,
        client: String,
        pid: Option<u32>,
        link: Link,
        queue_limit: usize,
    ) -> Self {
        Port {
            id,
            kind,
            net,
            client,
            pid,
            counters: PortCounters::default(),
            ready: false,
            paused: false,
            waiters: Vec::new(),
            congested_since: None,
            stuck: false,
            link,
            queue: VecDeque::new(),
            queue_limit,
        }
    }

    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    pub(crate) fn link_mut(&mut self) -> &mut Link {
        &mut self.link
    }

    /// Sends `frame` to the client, or queues it if the client's socket is full.
    pub(crate) fn transmit(&mut self, frame: &[u8]) -> Sent {
        if let Link::Nic(nic) = &self.link {
            if !nic.segment.forwarding() {
                self.counters.drops.standby += 1;
                return Sent::Dropped;
            }
        }
        // Frames already waiting go first: a frame must not overtake an earlier one.
        if !self.queue.is_empty() {
            return self.enqueue(frame);
        }
        match self.write(frame) {
            Ok(()) => Sent::Delivered,
            Err(error) if would_block(&error) => self.enqueue(frame),
            Err(error) => {
                self.counters.drops.send_error += 1;
                tracing::trace!(port = self.id, %error, "send failed");
                Sent::Dropped
            }
        }
    }

    /// Sends queued frames until the queue is empty or the socket is full again. Called when
    /// the descriptor becomes writable. Returns how many frames left the queue.
    pub(crate) fn flush(&mut self) -> usize {
        let before = self.queue.len();
        while let Some(frame) = self.queue.pop_front() {
            match self.write(&frame) {
                Ok(()) => {}
                Err(error) if would_block(&error) => {
                    self.queue.push_front(frame);
                    break;
                }
                Err(error) => {
                    self.counters.drops.send_error += 1;
                    tracing::trace!(port = self.id, %error, "send of a queued frame failed");
                }
            }
        }
        before - self.queue.len()
    }

    /// Frames waiting for the client to read.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether ports sending to this one should pause.
    pub(crate) fn congested(&self) -> bool {
        !self.stuck && self.queue.len() >= PAUSE_AT
    }

    fn enqueue(&mut self, frame: &[u8]) -> Sent {
        if self.queue.len() >= self.queue_limit {
            self.counters.drops.queue_full += 1;
            return Sent::Dropped;
        }
        self.queue.push_back(frame.into());
        Sent::Queued
    }

    fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        match &mut self.link {
            Link::Socket(fd) => sys::send(fd.as_raw_fd(), frame)?,
            Link::Device(fd) => sys::write_with_header(fd.as_raw_fd(), &VnetHeader::NONE, frame)?,
            Link::Peer(link) => link.send(self.net, frame)?,
            Link::Nic(nic) => nic.send(frame)?,
        };
        self.counters.tx_frames += 1;
        self.counters.tx_bytes += frame.len() as u64;
        Ok(())
    }

    /// The port as the admin interface shows it.
    pub(crate) fn info(&self) -> admin::Port {
        admin::Port {
            id: self.id,
            kind: self.kind,
            net: self.net,
            client: self.client.clone(),
            pid: self.pid,
            counters: self.counters.clone(),
            state: match &self.link {
                Link::Nic(nic) => Some(nic.state()),
                _ => None,
            },
        }
    }
}

fn would_block(error: &io::Error) -> bool {
    // ENOBUFS: a tap or socket out of buffer space right now, which passes like EAGAIN.
    error.kind() == io::ErrorKind::WouldBlock || error.raw_os_error() == Some(libc::ENOBUFS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn port_pair(queue_limit: usize) -> (Port, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let link = Link::Socket(ours.into());
        let port = Port::new(1, PortKind::Uml, 100, "test".into(), None, link, queue_limit);
        (port, theirs)
    }

    #[test]
    fn a_full_client_socket_queues_then_drops_and_flush_delivers_in_order() {
        let (mut port, client) = port_pair(4);
        let mut sent = 0u32;
        while port.transmit(&sent.to_be_bytes()) == Sent::Delivered {
            sent += 1;
            assert!(sent < 10_000, "the socket never filled");
        }
        for i in 1..4u32 {
            assert_eq!(port.transmit(&(sent + i).to_be_bytes()), Sent::Queued);
        }
        assert_eq!(port.transmit(b"late"), Sent::Dropped);
        assert_eq!(port.counters.drops.queue_full, 1);
        assert_eq!(port.queued(), 4);

        let mut buffer = [0u8; 16];
        for expected in 0..sent + 4 {
            if port.queued() > 0 {
                port.flush();
            }
            let n = client.recv(&mut buffer).unwrap();
            assert_eq!(&buffer[..n], &expected.to_be_bytes());
        }
        assert_eq!(port.queued(), 0);
        assert_eq!(port.counters.tx_frames, u64::from(sent) + 4);
    }

    #[test]
    fn a_vanished_client_counts_send_errors() {
        let (mut port, client) = port_pair(4);
        drop(client);
        assert_eq!(port.transmit(b"frame"), Sent::Dropped);
        assert_eq!(port.counters.drops.send_error, 1);
    }
}
