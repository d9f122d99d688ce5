//! The UDP socket peers reach the node on: quinn's own socket, wrapped to count what arrives
//! that cannot be QUIC meant for this node.
//!
//! quinn drops such datagrams silently. To tell them apart cheaply, the node's connection IDs
//! carry a keyed tag: 4 bytes of nonce followed by 4 bytes of a hash of the nonce under a key
//! drawn at start. A short-header packet whose connection ID lacks a valid tag, a long-header
//! packet of another QUIC version, and a datagram with the QUIC fixed bit clear (the node tells
//! its peers not to grease it) are counted as garbage; everything else goes to quinn, which has
//! the last word.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, EndpointConfig, Runtime, UdpPoller,
};

/// Bytes of nonce and of tag in a connection ID.
const NONCE_LEN: usize = 4;
const TAG_LEN: usize = 4;
const CID_LEN: usize = NONCE_LEN + TAG_LEN;

/// The only QUIC version the node speaks; 0 marks version negotiation.
const QUIC_V1: u32 = 1;

/// How often the garbage warning may repeat.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What arrived on the peer port.
#[derive(Debug, Default)]
pub(crate) struct UnderlayCounters {
    /// UDP datagrams received.
    pub(crate) datagrams: AtomicU64,
    /// Of those, datagrams that cannot be QUIC for this node.
    pub(crate) garbage: AtomicU64,
    /// Handshakes that failed: foreign CA, expired, revoked, wrong name, no certificate.
    pub(crate) handshakes_failed: AtomicU64,
}

/// Makes and checks the node's tagged connection IDs.
struct Cids {
    tag_key: RandomState,
    nonce_key: RandomState,
    next: AtomicU64,
}

impl Cids {
    fn new() -> Cids {
        Cids { tag_key: RandomState::new(), nonce_key: RandomState::new(), next: AtomicU64::new(0) }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; TAG_LEN] {
        let hash = self.tag_key.hash_one(nonce).to_le_bytes();
        [hash[0], hash[1], hash[2], hash[3]]
    }

    fn generate(&self) -> [u8; CID_LEN] {
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        let nonce = self.nonce_key.hash_one(count).to_le_bytes();
        let mut cid = [0u8; CID_LEN];
        cid[..NONCE_LEN].copy_from_slice(&nonce[..NONCE_LEN]);
        let tag = self.tag(&cid[..NONCE_LEN]);
        cid[NONCE_LEN..].copy_from_slice(&tag);
        cid
    }

    fn is_ours(&self, cid: &[u8]) -> bool {
        cid.len() == CID_LEN && cid[NONCE_LEN..] == self.tag(&cid[..NONCE_LEN])
    }

    /// Whether `datagram` may be a QUIC v1 packet for this node.
    fn plausible(&self, datagram: &[u8]) -> bool {
        let Some(&first) = datagram.first() else { return false };
        if first & 0x40 == 0 {
            return false;
        }
        if first & 0x80 == 0 {
            // Short header: the destination connection ID is one of ours.
            return datagram.get(1..1 + CID_LEN).is_some_and(|cid| self.is_ours(cid));
        }
        let Some(version) = datagram.get(1..5) else { return false };
        match u32::from_be_bytes([version[0], version[1], version[2], version[3]]) {
            0 => true,
            QUIC_V1 => {
                let dcid_len = usize::from(datagram.get(5).copied().unwrap_or(u8::MAX));
                let Some(dcid) = datagram.get(6..6 + dcid_len) else { return false };
                if dcid_len > 20 {
                    return false;
                }
                // Initial and 0-RTT packets of a dialing peer carry a connection ID it chose;
                // Handshake and Retry packets carry one of ours.
                let packet_type = (first >> 4) & 0x03;
                matches!(packet_type, 0 | 1) || self.is_ours(dcid)
            }
            _ => false,
        }
    }
}

/// quinn's view of [`Cids`].
struct Generator(Arc<Cids>);

impl ConnectionIdGenerator for Generator {
    fn generate_cid(&mut self) -> ConnectionId {
        ConnectionId::new(&self.0.generate())
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if self.0.is_ours(cid) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The socket quinn uses, counting what it receives.
struct CountingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    cids: Arc<Cids>,
    counters: Arc<UnderlayCounters>,
    /// When garbage was last reported, and how much came since.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl fmt::Debug for CountingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingSocket").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl CountingSocket {
    fn garbage(&self, from: SocketAddr, len: usize) {
        self.counters.garbage.fetch_add(1, Ordering::Relaxed);
        let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        warned.1 += 1;
        let now = Instant::now();
        if warned.0.is_none_or(|last| now.duration_since(last) >= WARN_INTERVAL) {
            tracing::warn!(
                %from,
                len,
                count = warned.1,
                "dropped datagrams on the peer port that are not QUIC for this node"
            );
            *warned = (Some(now), 0);
        }
    }
}

impl AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let count = ready!(self.inner.poll_recv(cx, bufs, meta))?;
        for (buf, meta) in bufs.iter().zip(meta.iter()).take(count) {
            let data = &buf[..meta.len.min(buf.len())];
            // With receive offload one buffer holds several datagrams of `stride` bytes.
            for datagram in data.chunks(meta.stride.max(1)) {
                self.counters.datagrams.fetch_add(1, Ordering::Relaxed);
                if !self.cids.plausible(datagram) {
                    self.garbage(meta.addr, datagram.len());
                }
            }
        }
        Poll::Ready(Ok(count))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The receive buffer of the peer socket. The usual default (208 KiB) overflows while the
/// node is busy under a few TCP streams from one peer, and each datagram lost there is a
/// segment some TCP connection inside sends again; with 4 MiB a four-stream iperf3 run
/// between two nodes on a 2-core machine lost none.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Opens the node's QUIC endpoint on `address`, counting into `counters`.
pub(crate) fn endpoint(
    address: SocketAddr,
    server: quinn::ServerConfig,
    counters: Arc<UnderlayCounters>,
) -> io::Result<quinn::Endpoint> {
    let socket = UdpSocket::bind(address)?;
    match crate::sys::set_receive_buffer(&socket, RECEIVE_BUFFER) {
        // The kernel reports twice what it was asked for, overhead included.
        Ok(granted) if granted < RECEIVE_BUFFER => tracing::info!(
            granted,
            wanted = RECEIVE_BUFFER,
            "the peer socket's receive buffer is capped by net.core.rmem_max; raise that, or \
             run the node with CAP_NET_ADMIN, if peers lose datagrams under load"
        ),
        Ok(granted) => tracing::debug!(granted, "peer socket receive buffer"),
        Err(error) => tracing::warn!(%error, "cannot enlarge the peer socket's receive buffer"),
    }
    let runtime: Arc<dyn Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(socket)?;
    let cids = Arc::new(Cids::new());
    let mut config = EndpointConfig::default();
    let generator = cids.clone();
    config.cid_generator(move || Box::new(Generator(generator.clone())));
    // A cleared fixed bit then marks garbage.
    config.grease_quic_bit(false);
    let socket = Arc::new(CountingSocket { inner, cids, counters, warned: Mutex::new((None, 0)) });
    quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short_packet(cid: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x40];
        packet.extend_from_slice(cid);
        packet.extend_from_slice(&[0xaa; 40]);
        packet
    }

    fn long_packet(first: u8, version: u32, dcid: &[u8]) -> Vec<u8> {
        let mut packet = vec![first];
        packet.extend_from_slice(&version.to_be_bytes());
        packet.push(dcid.len() as u8);
        packet.extend_from_slice(dcid);
        packet.push(8);
        packet.extend_from_slice(&[0x55; 8]);
        packet.extend_from_slice(&[0; 40]);
        packet
    }

    #[test]
    fn connection_ids_carry_a_tag_only_this_node_makes() {
        let cids = Cids::new();
        let other = Cids::new();
        let cid = cids.generate();
        assert!(cids.is_ours(&cid));
        assert!(!other.is_ours(&cid));
        assert_ne!(cids.generate(), cid);
        assert!(!cids.is_ours(&cid[..7]));
    }

    #[test]
    fn garbage_is_told_from_quic() {
        let cids = Cids::new();
        let ours = cids.generate();
        let theirs = Cids::new().generate();
        assert!(cids.plausible(&short_packet(&ours)));
        assert!(!cids.plausible(&short_packet(&theirs)));
        assert!(!cids.plausible(&short_packet(&ours[..4])));
        // An Initial from a dialing peer names a connection ID of its choosing.
        assert!(cids.plausible(&long_packet(0xc0, QUIC_V1, &theirs)));
        // A Handshake packet must name one of ours.
        assert!(cids.plausible(&long_packet(0xe0, QUIC_V1, &ours)));
        assert!(!cids.plausible(&long_packet(0xe0, QUIC_V1, &theirs)));
        assert!(cids.plausible(&long_packet(0xc0, 0, &theirs)));
        assert!(!cids.plausible(&long_packet(0xc0, 0x5a5a_5a5a, &theirs)));
        assert!(!cids.plausible(&long_packet(0xc0, QUIC_V1, &[0; 21])));
        assert!(!cids.plausible(&[]));
        assert!(!cids.plausible(&[0xc0, 0, 0]));
        assert!(!cids.plausible(b"\x00hello"));
        assert!(!cids.plausible(b"GET / HTTP/1.1\r\n"));
    }
}
