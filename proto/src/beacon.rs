//! The beacon a NIC port sends on its wire, so that nodes bridging the same LAN onto the same
//! network find each other and let only one of them forward.
//!
//! Every NIC port sends a beacon once a second. A port that hears, on its own wire, the
//! beacon of another port for the same network (another node's, or another port of its own
//! node) shares a segment with it: between them the LAN and the overlay would form a loop.
//! The node's election (in the switch) then lets exactly one of them forward.
//!
//! A beacon is an Ethernet frame to a locally administered group address that Linux bridges
//! and ordinary switches flood like any multicast, with the IEEE local experimental EtherType:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | destination [`DESTINATION`] |
//! | 6 | 6 | source: the NIC's own address |
//! | 12 | 2 | EtherType [`ETHERTYPE`] |
//! | 14 | 4 | magic `UMNB` |
//! | 18 | 1 | version, 1 |
//! | 19 | 1 | flags: [`FLAG_FORWARDING`], [`FLAG_LEAVING`] |
//! | 20 | 4 | network, big-endian |
//! | 24 | 1 | length of the node name, at most [`MAX_NAME_LEN`] |
//! | 25 | n | node name |
//! | 25+n | 1 | length of the port name, at most [`MAX_NAME_LEN`] |
//! | 26+n | m | port name (the interface) |
//!
//! The frame is zero-padded to the 60-byte Ethernet minimum.

use crate::admin::NetworkId;
use crate::ethernet::{MacAddress, HEADER_LEN};

/// Where beacons go: a locally administered group address, `03:75:6d:6e:65:74` ("\x03umnet").
pub const DESTINATION: MacAddress = MacAddress([0x03, 0x75, 0x6d, 0x6e, 0x65, 0x74]);

/// IEEE Std 802 local experimental EtherType 1.
pub const ETHERTYPE: u16 = 0x88b5;

/// The sender forwards between this segment and the network.
pub const FLAG_FORWARDING: u8 = 0x01;

/// The sender is going away: forget it now rather than when its beacons stop.
pub const FLAG_LEAVING: u8 = 0x02;

/// Longest node or port name a beacon carries.
pub const MAX_NAME_LEN: usize = 63;

const MAGIC: &[u8; 4] = b"UMNB";
const VERSION: u8 = 1;
const FIXED_LEN: usize = HEADER_LEN + 11;
const MIN_FRAME: usize = 60;

/// One port's beacon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beacon {
    /// The network the port serves.
    pub net: NetworkId,
    /// The sending node's name.
    pub node: String,
    /// The sending port: its interface name.
    pub port: String,
    /// `FLAG_*` bits.
    pub flags: u8,
}

/// Why a frame of the beacon EtherType is not a beacon this node understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BeaconError {
    /// Shorter than its fixed part or than the names it announces.
    #[error("truncated beacon")]
    Truncated,
    /// Another protocol that uses the experimental EtherType.
    #[error("not a umnet beacon (wrong magic)")]
    BadMagic,
    /// A beacon version this node does not speak.
    #[error("beacon version {0} is not 1")]
    BadVersion(u8),
    /// A name that is too long or not UTF-8.
    #[error("beacon name is too long or not UTF-8")]
    BadName,
}

/// Whether `frame` has the beacon EtherType and the magic of a beacon: the node's own, never
/// traffic. Other uses of the experimental EtherType are traffic like any other.
pub fn is_beacon(frame: &[u8]) -> bool {
    has_magic(frame, MAGIC)
}

/// Whether `frame` has the EtherType umnet's own frames use and, after the Ethernet header,
/// `magic`: a beacon's, or a guest request's ([`crate::guest`]).
pub fn has_magic(frame: &[u8], magic: &[u8; 4]) -> bool {
    frame.len() >= HEADER_LEN + magic.len()
        && frame[12..14] == ETHERTYPE.to_be_bytes()
        && frame[HEADER_LEN..HEADER_LEN + magic.len()] == magic[..]
}

impl Beacon {
    /// Whether the sender says it forwards.
    pub fn forwarding(&self) -> bool {
        self.flags & FLAG_FORWARDING != 0
    }

    /// Whether the sender says it is going away.
    pub fn leaving(&self) -> bool {
        self.flags & FLAG_LEAVING != 0
    }

    /// Reads a beacon frame (Ethernet header included).
    pub fn parse(frame: &[u8]) -> Result<Self, BeaconError> {
        if frame.len() < FIXED_LEN {
            return Err(BeaconError::Truncated);
        }
        let body = &frame[HEADER_LEN..];
        if &body[..4] != MAGIC {
            return Err(BeaconError::BadMagic);
        }
        if body[4] != VERSION {
            return Err(BeaconError::BadVersion(body[4]));
        }
        let flags = body[5];
        let net = NetworkId::from_be_bytes([body[6], body[7], body[8], body[9]]);
        let (node, rest) = name(&body[10..])?;
        let (port, _) = name(rest)?;
        Ok(Beacon { net, node, port, flags })
    }

    /// The beacon as a frame from `source`; `None` if a name is longer than
    /// [`MAX_NAME_LEN`].
    pub fn emit(&self, source: MacAddress) -> Option<Vec<u8>> {
        if self.node.len() > MAX_NAME_LEN || self.port.len() > MAX_NAME_LEN {
            return None;
        }
        let mut frame =
            Vec::with_capacity(MIN_FRAME.max(FIXED_LEN + 1 + self.node.len() + self.port.len()));
        frame.extend_from_slice(&DESTINATION.0);
        frame.extend_from_slice(&source.0);
        frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
        frame.extend_from_slice(MAGIC);
        frame.push(VERSION);
        frame.push(self.flags);
        frame.extend_from_slice(&self.net.to_be_bytes());
        for name in [&self.node, &self.port] {
            frame.push(name.len() as u8);
            frame.extend_from_slice(name.as_bytes());
        }
        if frame.len() < MIN_FRAME {
            frame.resize(MIN_FRAME, 0);
        }
        Some(frame)
    }
}

/// A length-prefixed name, and what follows it.
fn name(bytes: &[u8]) -> Result<(String, &[u8]), BeaconError> {
    let (&len, rest) = bytes.split_first().ok_or(BeaconError::Truncated)?;
    let len = usize::from(len);
    if len > MAX_NAME_LEN {
        return Err(BeaconError::BadName);
    }
    let text = rest.get(..len).ok_or(BeaconError::Truncated)?;
    let text = std::str::from_utf8(text).map_err(|_| BeaconError::BadName)?;
    Ok((text.to_string(), &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0x0a]);

    /// Node "a", port "eth1", network 100, forwarding.
    const FIXTURE: [u8; 60] = [
        0x03, 0x75, 0x6d, 0x6e, 0x65, 0x74, 0x52, 0x54, 0, 0, 0, 0x0a, 0x88, 0xb5, b'U', b'M',
        b'N', b'B', 1, 1, 0, 0, 0, 100, 1, b'a', 4, b'e', b't', b'h', b'1', 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn beacon() -> Beacon {
        Beacon { net: 100, node: "a".into(), port: "eth1".into(), flags: FLAG_FORWARDING }
    }

    #[test]
    fn emits_the_fixture_and_parses_it_back() {
        assert_eq!(beacon().emit(SOURCE).unwrap(), FIXTURE);
        let parsed = Beacon::parse(&FIXTURE).unwrap();
        assert_eq!(parsed, beacon());
        assert!(parsed.forwarding() && !parsed.leaving());
        assert!(is_beacon(&FIXTURE));
        assert!(!is_beacon(&FIXTURE[..17]));
        let mut other = FIXTURE;
        other[14..18].copy_from_slice(b"XPRM");
        assert!(!is_beacon(&other), "another use of the EtherType is no beacon");
    }

    #[test]
    fn long_names_make_longer_frames() {
        let long = Beacon { node: "n".repeat(63), port: "enp0s31f6".into(), ..beacon() };
        let frame = long.emit(SOURCE).unwrap();
        assert_eq!(frame.len(), FIXED_LEN + 1 + 63 + 9);
        assert_eq!(Beacon::parse(&frame).unwrap(), long);
        assert_eq!(Beacon { node: "n".repeat(64), ..beacon() }.emit(SOURCE), None);
    }

    #[test]
    fn bad_beacons_are_refused() {
        let mut magic = FIXTURE;
        magic[14] = b'X';
        let mut version = FIXTURE;
        version[18] = 2;
        let mut long_name = FIXTURE;
        long_name[24] = 64;
        let mut past_end = FIXTURE.to_vec();
        past_end.truncate(27);
        let mut not_utf8 = FIXTURE;
        not_utf8[25] = 0xff;
        for (frame, expected) in [
            (&FIXTURE[..20], BeaconError::Truncated),
            (&magic[..], BeaconError::BadMagic),
            (&version[..], BeaconError::BadVersion(2)),
            (&long_name[..], BeaconError::BadName),
            (&past_end[..], BeaconError::Truncated),
            (&not_utf8[..], BeaconError::BadName),
        ] {
            assert_eq!(Beacon::parse(frame), Err(expected));
        }
    }
}
