//! What nodes send each other over a QUIC connection.
//!
//! Frames travel as QUIC datagrams, one frame per datagram when it fits and in fragments when
//! it does not (a 1514-byte frame never fits the 1162 bytes of a datagram on a fresh path, nor
//! the 1434 of a 1500-byte IPv4 underlay after MTU discovery):
//!
//! | offset | size | whole frame ([`FRAME`]) | fragment ([`FRAGMENT`]) |
//! |---|---|---|---|
//! | 0 | 1 | kind | kind |
//! | 1 | 4 | network, big-endian | network, big-endian |
//! | 5 | 4 | the frame... | frame id, big-endian |
//! | 9 | 1 | | fragment index |
//! | 10 | 1 | | fragment count |
//! | 11 | .. | | a piece of the frame |
//!
//! Announcements (which networks a node serves) travel on a unidirectional QUIC stream as
//! [`Message`]s, each a 4-byte big-endian length and a JSON body.
//!
//! [`Reassembly`] puts fragments back together with bounded memory: at most
//! [`MAX_PENDING`] incomplete frames per peer, each dropped when the caller's clock says it is
//! older than the timeout the caller passes.

use serde::{Deserialize, Serialize};

use crate::admin::NetworkId;

/// Kind byte of a datagram carrying a whole frame.
pub const FRAME: u8 = 0x01;

/// Kind byte of a datagram carrying a fragment of a frame.
pub const FRAGMENT: u8 = 0x02;

/// Header length of a whole-frame datagram.
pub const FRAME_HEADER_LEN: usize = 5;

/// Header length of a fragment datagram.
pub const FRAGMENT_HEADER_LEN: usize = 11;

/// Most fragments a frame is cut into: a 65535-byte frame in 1162-byte datagrams needs 58.
pub const MAX_FRAGMENTS: usize = 64;

/// Most incomplete frames held per peer.
pub const MAX_PENDING: usize = 64;

/// Largest announcement accepted on the control stream.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The protocol version a node speaks in its [`Message::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// A datagram from a peer, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A whole frame of a network.
    Frame {
        /// The network it belongs to.
        net: NetworkId,
        /// The Ethernet frame.
        frame: &'a [u8],
    },
    /// One piece of a frame.
    Fragment {
        /// The network it belongs to.
        net: NetworkId,
        /// Which frame, unique among the sender's recent frames.
        id: u32,
        /// This piece's place, from 0.
        index: u8,
        /// How many pieces the frame has.
        count: u8,
        /// The piece.
        data: &'a [u8],
    },
}

/// Why a datagram from a peer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// Shorter than its header.
    #[error("datagram of {0} bytes is shorter than its header")]
    Truncated(usize),
    /// The first byte is no known kind.
    #[error("unknown datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// A fragment whose index or count is impossible.
    #[error("fragment {index} of {count} is impossible")]
    BadFragment {
        /// Its index.
        index: u8,
        /// Its count.
        count: u8,
    },
}

impl<'a> Datagram<'a> {
    /// Parses a datagram.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DatagramError> {
        let Some(&kind) = bytes.first() else { return Err(DatagramError::Truncated(0)) };
        let net = |bytes: &[u8]| u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        match kind {
            FRAME if bytes.len() >= FRAME_HEADER_LEN => {
                Ok(Datagram::Frame { net: net(bytes), frame: &bytes[FRAME_HEADER_LEN..] })
            }
            FRAGMENT if bytes.len() >= FRAGMENT_HEADER_LEN => {
                let (index, count) = (bytes[9], bytes[10]);
                if count < 2 || usize::from(count) > MAX_FRAGMENTS || index >= count {
                    return Err(DatagramError::BadFragment { index, count });
                }
                Ok(Datagram::Fragment {
                    net: net(bytes),
                    id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]),
                    index,
                    count,
                    data: &bytes[FRAGMENT_HEADER_LEN..],
                })
            }
            FRAME | FRAGMENT => Err(DatagramError::Truncated(bytes.len())),
            other => Err(DatagramError::UnknownKind(other)),
        }
    }
}

/// Why a frame cannot be sent to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// Datagrams are too small to carry even a fragment header and a byte.
    #[error("datagrams of {0} bytes cannot carry frames")]
    DatagramTooSmall(usize),
    /// The frame needs more than [`MAX_FRAGMENTS`] fragments.
    #[error("a frame of {0} bytes needs more than {MAX_FRAGMENTS} fragments")]
    FrameTooLarge(usize),
}

/// Cuts `frame` of network `net` into datagrams of at most `max_datagram` bytes and hands
/// each to `emit`. `id` numbers the frame when it must be fragmented.
pub fn encode(
    net: NetworkId,
    id: u32,
    frame: &[u8],
    max_datagram: usize,
    mut emit: impl FnMut(Vec<u8>),
) -> Result<(), EncodeError> {
    if frame.len() + FRAME_HEADER_LEN <= max_datagram {
        let mut datagram = Vec::with_capacity(FRAME_HEADER_LEN + frame.len());
        datagram.push(FRAME);
        datagram.extend_from_slice(&net.to_be_bytes());
        datagram.extend_from_slice(frame);
        emit(datagram);
        return Ok(());
    }
    let Some(room) = max_datagram.checked_sub(FRAGMENT_HEADER_LEN).filter(|&room| room > 0) else {
        return Err(EncodeError::DatagramTooSmall(max_datagram));
    };
    let count = frame.len().div_ceil(room);
    if count > MAX_FRAGMENTS {
        return Err(EncodeError::FrameTooLarge(frame.len()));
    }
    // Pieces of equal size, so no fragment is a few bytes long.
    let piece = frame.len().div_ceil(count);
    for (index, chunk) in frame.chunks(piece).enumerate() {
        let mut datagram = Vec::with_capacity(FRAGMENT_HEADER_LEN + chunk.len());
        datagram.push(FRAGMENT);
        datagram.extend_from_slice(&net.to_be_bytes());
        datagram.extend_from_slice(&id.to_be_bytes());
        datagram.push(index as u8);
        datagram.push(count as u8);
        datagram.extend_from_slice(chunk);
        emit(datagram);
    }
    Ok(())
}

/// What [`Reassembly::add`] made of a fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reassembled {
    /// The frame is complete.
    Frame {
        /// Its network.
        net: NetworkId,
        /// The frame.
        frame: Vec<u8>,
    },
    /// More fragments are needed.
    Incomplete,
    /// The fragment contradicts earlier ones of the same frame (another count or network),
    /// or repeats one; the frame is abandoned.
    Inconsistent,
}

#[derive(Debug)]
struct Pending<T> {
    id: u32,
    net: NetworkId,
    count: u8,
    pieces: Vec<Option<Vec<u8>>>,
    received: u8,
    started: T,
}

/// Incomplete frames of one peer.
///
/// Generic over the caller's clock type `T` (an `Instant` in the node, a number in tests):
/// this module never reads a clock.
#[derive(Debug)]
pub struct Reassembly<T> {
    pending: Vec<Pending<T>>,
    /// Incomplete frames given up: evicted for room or timed out.
    pub abandoned: u64,
}

impl<T> Default for Reassembly<T> {
    fn default() -> Self {
        Reassembly { pending: Vec::new(), abandoned: 0 }
    }
}

impl<T: Copy + PartialOrd> Reassembly<T> {
    /// Adds a fragment received at `now`.
    pub fn add(
        &mut self,
        net: NetworkId,
        id: u32,
        index: u8,
        count: u8,
        data: &[u8],
        now: T,
    ) -> Reassembled {
        let position = match self.pending.iter().position(|p| p.id == id) {
            Some(position) => position,
            None => {
                if self.pending.len() >= MAX_PENDING {
                    // The oldest incomplete frame is the least likely to complete.
                    self.pending.remove(0);
                    self.abandoned += 1;
                }
                self.pending.push(Pending {
                    id,
                    net,
                    count,
                    pieces: vec![None; usize::from(count)],
                    received: 0,
                    started: now,
                });
                self.pending.len() - 1
            }
        };

        let pending = &mut self.pending[position];
        let slot = pending.pieces.get_mut(usize::from(index));
        let consistent = pending.count == count && pending.net == net;
        let Some(slot @ None) = slot.filter(|_| consistent) else {
            self.pending.remove(position);
            self.abandoned += 1;
            return Reassembled::Inconsistent;
        };
        *slot = Some(data.to_vec());
        pending.received += 1;
        if pending.received < pending.count {
            return Reassembled::Incomplete;
        }

        let done = self.pending.remove(position);
        // Whole pieces at a time: a byte-by-byte flatten here cost a sixth of a node's CPU
        // while a TCP stream of full-size frames crossed a 1500-byte underlay.
        let pieces: Vec<Vec<u8>> = done.pieces.into_iter().flatten().collect();
        Reassembled::Frame { net: done.net, frame: pieces.concat() }
    }

    /// Abandons incomplete frames started before `deadline`. Returns how many.
    pub fn expire(&mut self, deadline: T) -> usize {
        let before = self.pending.len();
        self.pending.retain(|p| p.started >= deadline);
        let expired = before - self.pending.len();
        self.abandoned += expired as u64;
        expired
    }

    /// Incomplete frames held.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no incomplete frame is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A message on the announcement stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case")]
pub enum Message {
    /// First message of each side.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// A number the sending node picks at random each time it starts. Two connections from
        /// the same instance were dialed at once; a connection from a new instance means the
        /// peer restarted and any older connection to it is dead.
        instance: u64,
    },
    /// The networks the sender serves; replaces any earlier list.
    Networks {
        /// Network numbers.
        nets: Vec<NetworkId>,
    },
}

/// Why an announcement could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The length prefix exceeds [`MAX_MESSAGE_LEN`].
    #[error("announcement of {0} bytes is longer than {MAX_MESSAGE_LEN}")]
    TooLong(usize),
    /// The body is not a known message.
    #[error("malformed announcement: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl Message {
    /// The message with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a plain enum of numbers cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Checks a length prefix before its body is read.
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, MessageError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_MESSAGE_LEN {
            return Err(MessageError::TooLong(len));
        }
        Ok(len)
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        Ok(serde_json::from_slice(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn encoded(net: NetworkId, id: u32, frame: &[u8], max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        encode(net, id, frame, max, |d| out.push(d)).unwrap();
        out
    }

    #[test]
    fn a_small_frame_is_one_datagram() {
        let datagrams = encoded(100, 0, &frame(60), 1162);
        assert_eq!(datagrams.len(), 1);
        assert_eq!(datagrams[0][..5], [0x01, 0, 0, 0, 100]);
        assert_eq!(
            Datagram::parse(&datagrams[0]).unwrap(),
            Datagram::Frame { net: 100, frame: &frame(60) }
        );
    }

    #[test]
    fn a_full_frame_is_fragmented_and_reassembled() {
        let original = frame(1518);
        let datagrams = encoded(101, 7, &original, 1162);
        assert_eq!(datagrams.len(), 2);
        assert!(datagrams.iter().all(|d| d.len() <= 1162));
        assert_eq!(datagrams[1][..11], [0x02, 0, 0, 0, 101, 0, 0, 0, 7, 1, 2]);

        let mut reassembly = Reassembly::default();
        // Out of order on purpose.
        let mut result = Reassembled::Incomplete;
        for datagram in datagrams.iter().rev() {
            let Datagram::Fragment { net, id, index, count, data } =
                Datagram::parse(datagram).unwrap()
            else {
                panic!("not a fragment");
            };
            result = reassembly.add(net, id, index, count, data, 0u32);
        }
        assert_eq!(result, Reassembled::Frame { net: 101, frame: original });
        assert!(reassembly.is_empty());
    }

    #[test]
    fn jumbo_frames_and_limits() {
        assert_eq!(encoded(1, 1, &frame(9000), 1162).len(), 8);
        let mut sink = |_| {};
        assert_eq!(
            encode(1, 1, &frame(100), 11, &mut sink),
            Err(EncodeError::DatagramTooSmall(11))
        );
        assert_eq!(
            encode(1, 1, &frame(70_000), 1000, &mut sink),
            Err(EncodeError::FrameTooLarge(70_000))
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(Datagram::parse(&[]), Err(DatagramError::Truncated(0)));
        assert_eq!(Datagram::parse(&[0x01, 0, 0]), Err(DatagramError::Truncated(3)));
        assert_eq!(Datagram::parse(&[0x02; 10]), Err(DatagramError::Truncated(10)));
        assert_eq!(Datagram::parse(&[0x7f, 1, 2, 3, 4, 5]), Err(DatagramError::UnknownKind(0x7f)));
        let bad = [0x02, 0, 0, 0, 1, 0, 0, 0, 1, 3, 3, 0xaa];
        assert_eq!(Datagram::parse(&bad), Err(DatagramError::BadFragment { index: 3, count: 3 }));
        let single = [0x02, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0xaa];
        assert!(Datagram::parse(&single).is_err(), "a one-piece fragment is never sent");
    }

    #[test]
    fn reassembly_is_bounded_and_expires() {
        let mut reassembly = Reassembly::default();
        for id in 0..(MAX_PENDING as u32 + 10) {
            assert_eq!(reassembly.add(1, id, 0, 2, b"x", id), Reassembled::Incomplete);
        }
        assert_eq!(reassembly.len(), MAX_PENDING);
        assert_eq!(reassembly.abandoned, 10);
        assert_eq!(reassembly.expire(60), 60 - 10);
        assert_eq!(reassembly.len(), MAX_PENDING + 10 - 60);
    }

    #[test]
    fn contradictions_abandon_the_frame() {
        let mut reassembly = Reassembly::default();
        assert_eq!(reassembly.add(1, 9, 0, 3, b"a", 0u8), Reassembled::Incomplete);
        assert_eq!(reassembly.add(1, 9, 0, 3, b"a", 0), Reassembled::Inconsistent, "repeat");
        assert_eq!(reassembly.add(1, 9, 0, 3, b"a", 0), Reassembled::Incomplete, "starts anew");
        assert_eq!(reassembly.add(2, 9, 1, 3, b"b", 0), Reassembled::Inconsistent, "network");
        assert_eq!(reassembly.add(1, 9, 1, 4, b"b", 0), Reassembled::Incomplete);
        assert_eq!(reassembly.add(1, 9, 2, 3, b"c", 0), Reassembled::Inconsistent, "count");
        assert!(reassembly.abandoned >= 3);
    }

    #[test]
    fn messages_round_trip() {
        let message = Message::Networks { nets: vec![100, 101] };
        let bytes = message.encode();
        let len = Message::check_len([bytes[0], bytes[1], bytes[2], bytes[3]]).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(Message::decode(&bytes[4..]).unwrap(), message);
        assert!(Message::check_len(u32::MAX.to_be_bytes()).is_err());
        assert!(Message::decode(b"{\"message\":\"reboot\"}").is_err());
    }

    #[test]
    fn a_hello_round_trips_with_its_length_prefix() {
        let hello = Message::Hello { version: PROTOCOL_VERSION, instance: 0x0123_4567_89ab_cdef };
        let bytes = hello.encode();
        let len = Message::check_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(Message::decode(&bytes[4..]).unwrap(), hello);
        let text = std::str::from_utf8(&bytes[4..]).unwrap();
        assert_eq!(text, r#"{"message":"hello","version":1,"instance":81985529216486895}"#);
    }
}
