//! Requests a guest sends its node in-band, over its own interface: the successor of
//! UM-Eth-Net's `um_eth_net_set eth0 101`.
//!
//! `umnet guest set-net IFACE N`, run inside a guest, sends a [`Request`] out of `IFACE`; the
//! node that serves the guest's port takes it out of the frame stream (it is never switched),
//! moves the port to network `N` if its config lets guests choose that network, and answers
//! with a [`Reply`] to the guest's address. Both are Ethernet frames of the beacon EtherType
//! (IEEE local experimental 1), told apart from beacons by their magic:
//!
//! | offset | size | request | reply |
//! |---|---|---|---|
//! | 0 | 6 | destination [`NODE_GROUP`] | destination: the guest's address |
//! | 6 | 6 | source: the guest's interface | source [`NODE_ADDRESS`] |
//! | 12 | 2 | EtherType `0x88b5` | EtherType `0x88b5` |
//! | 14 | 4 | magic `UMNG` | magic `UMNG` |
//! | 18 | 1 | version, 1 | version, 1 |
//! | 19 | 1 | kind: 1, set network | kind: 2, reply |
//! | 20 | 4 | request id, big-endian | the request's id |
//! | 24 | 4 | network asked for, big-endian | the port's network now |
//! | 28 | 1 | | [`Status`] |
//! | 29 | 1 | | length of the message |
//! | 30 | n | | message, UTF-8 |
//!
//! Frames are zero-padded to the 60-byte Ethernet minimum.

use crate::admin::NetworkId;
use crate::beacon::ETHERTYPE;
use crate::ethernet::{MacAddress, HEADER_LEN};

/// Where requests go: the group address nodes listen on (the one beacons use).
pub const NODE_GROUP: MacAddress = crate::beacon::DESTINATION;

/// The source of replies: a locally administered unicast address standing for "the node".
pub const NODE_ADDRESS: MacAddress = MacAddress([0x02, 0x75, 0x6d, 0x6e, 0x65, 0x74]);

const MAGIC: &[u8; 4] = b"UMNG";
const VERSION: u8 = 1;
const KIND_SET_NET: u8 = 1;
const KIND_REPLY: u8 = 2;
const REQUEST_LEN: usize = HEADER_LEN + 14;
const MIN_FRAME: usize = 60;

/// What a node made of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The port is on the network asked for now.
    Moved,
    /// The node's config does not let guests choose that network (or any).
    Refused,
    /// The node serves no such network.
    NoSuchNetwork,
    /// A status this version does not know.
    Other(u8),
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::Moved => 0,
            Status::Refused => 1,
            Status::NoSuchNetwork => 2,
            Status::Other(code) => code,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            0 => Status::Moved,
            1 => Status::Refused,
            2 => Status::NoSuchNetwork,
            other => Status::Other(other),
        }
    }
}

/// A guest asks to move its port to network `net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the guest; the reply carries it back.
    pub id: u32,
    /// The network asked for.
    pub net: NetworkId,
}

/// The node's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's id.
    pub id: u32,
    /// The port's network after the request.
    pub net: NetworkId,
    /// What happened.
    pub status: Status,
    /// Why, for people.
    pub message: String,
}

/// Why a frame of the guest-request kind cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// Shorter than its fixed part or its message.
    #[error("truncated guest request")]
    Truncated,
    /// A version this node does not speak.
    #[error("guest request version {0} is not 1")]
    BadVersion(u8),
    /// Neither a request nor a reply.
    #[error("unknown guest request kind {0}")]
    BadKind(u8),
    /// A message that is not UTF-8.
    #[error("reply message is not UTF-8")]
    BadMessage,
}

/// Whether `frame` is a guest request or reply (EtherType and magic), rather than a beacon.
pub fn is_guest_frame(frame: &[u8]) -> bool {
    crate::beacon::has_magic(frame, MAGIC)
}

fn header(destination: MacAddress, source: MacAddress, kind: u8, id: u32, net: u32) -> Vec<u8> {
    let mut frame = Vec::with_capacity(MIN_FRAME + 64);
    frame.extend_from_slice(&destination.0);
    frame.extend_from_slice(&source.0);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(MAGIC);
    frame.push(VERSION);
    frame.push(kind);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(&net.to_be_bytes());
    frame
}

fn pad(mut frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < MIN_FRAME {
        frame.resize(MIN_FRAME, 0);
    }
    frame
}

/// Reads kind, id and network from a frame of the guest-request kind.
fn fixed(frame: &[u8]) -> Result<(u8, u32, u32), GuestError> {
    if frame.len() < REQUEST_LEN || !is_guest_frame(frame) {
        return Err(GuestError::Truncated);
    }
    let body = &frame[HEADER_LEN + 4..];
    if body[0] != VERSION {
        return Err(GuestError::BadVersion(body[0]));
    }
    let id = u32::from_be_bytes([body[2], body[3], body[4], body[5]]);
    let net = u32::from_be_bytes([body[6], body[7], body[8], body[9]]);
    Ok((body[1], id, net))
}

impl Request {
    /// The request as a frame from the guest's interface address `source`.
    pub fn emit(&self, source: MacAddress) -> Vec<u8> {
        pad(header(NODE_GROUP, source, KIND_SET_NET, self.id, self.net))
    }

    /// Reads a request frame.
    pub fn parse(frame: &[u8]) -> Result<Self, GuestError> {
        match fixed(frame)? {
            (KIND_SET_NET, id, net) => Ok(Request { id, net }),
            (kind, ..) => Err(GuestError::BadKind(kind)),
        }
    }
}

impl Reply {
    /// The reply as a frame to the guest at `destination`. A message longer than 255 bytes is
    /// cut at a character boundary.
    pub fn emit(&self, destination: MacAddress) -> Vec<u8> {
        let mut frame = header(destination, NODE_ADDRESS, KIND_REPLY, self.id, self.net);
        frame.push(self.status.code());
        let mut end = self.message.len().min(255);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        frame.push(end as u8);
        frame.extend_from_slice(&self.message.as_bytes()[..end]);
        pad(frame)
    }

    /// Reads a reply frame.
    pub fn parse(frame: &[u8]) -> Result<Self, GuestError> {
        let (id, net) = match fixed(frame)? {
            (KIND_REPLY, id, net) => (id, net),
            (kind, ..) => return Err(GuestError::BadKind(kind)),
        };
        let rest = &frame[REQUEST_LEN..];
        let (&code, rest) = rest.split_first().ok_or(GuestError::Truncated)?;
        let (&len, rest) = rest.split_first().ok_or(GuestError::Truncated)?;
        let text = rest.get(..usize::from(len)).ok_or(GuestError::Truncated)?;
        let message = std::str::from_utf8(text).map_err(|_| GuestError::BadMessage)?.to_string();
        Ok(Reply { id, net, status: Status::from_code(code), message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 1]);

    /// Guest 52:54:00:00:00:01 asks, as request 7, for network 101.
    const REQUEST: [u8; 60] = [
        0x03, 0x75, 0x6d, 0x6e, 0x65, 0x74, 0x52, 0x54, 0, 0, 0, 1, 0x88, 0xb5, b'U', b'M', b'N',
        b'G', 1, 1, 0, 0, 0, 7, 0, 0, 0, 101, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn a_request_matches_its_fixture() {
        let request = Request { id: 7, net: 101 };
        assert_eq!(request.emit(GUEST), REQUEST);
        assert_eq!(Request::parse(&REQUEST), Ok(request));
        assert!(is_guest_frame(&REQUEST));
        assert!(crate::beacon::Beacon::parse(&REQUEST).is_err(), "not a beacon");
    }

    #[test]
    fn replies_round_trip_and_long_messages_are_cut() {
        let reply =
            Reply { id: 7, net: 100, status: Status::Refused, message: "not allowed".into() };
        let frame = reply.emit(GUEST);
        assert_eq!(&frame[..6], &GUEST.0);
        assert_eq!(&frame[6..12], &NODE_ADDRESS.0);
        assert_eq!(frame[28], 1);
        assert_eq!(Reply::parse(&frame), Ok(reply));

        let long = Reply { message: "é".repeat(200), ..Reply::parse(&frame).unwrap() };
        let parsed = Reply::parse(&long.emit(GUEST)).unwrap();
        assert_eq!(parsed.message.chars().count(), 127);
    }

    #[test]
    fn bad_frames_are_refused() {
        let mut version = REQUEST;
        version[18] = 9;
        let mut kind = REQUEST;
        kind[19] = 5;
        assert_eq!(Request::parse(&REQUEST[..27]), Err(GuestError::Truncated));
        assert_eq!(Request::parse(&version), Err(GuestError::BadVersion(9)));
        assert_eq!(Request::parse(&kind), Err(GuestError::BadKind(5)));
        assert_eq!(Reply::parse(&REQUEST), Err(GuestError::BadKind(1)));
        let mut reply =
            Reply { id: 1, net: 1, status: Status::Moved, message: "ok".into() }.emit(GUEST);
        reply[29] = 40;
        reply.truncate(40);
        assert_eq!(Reply::parse(&reply), Err(GuestError::Truncated));
        let mut beacon = REQUEST;
        beacon[14..18].copy_from_slice(b"UMNB");
        assert!(!is_guest_frame(&beacon));
    }
}
