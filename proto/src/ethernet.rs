//! MAC addresses and the Ethernet header.
//!
//! Frames cross umnet as they cross a wire without its preamble and FCS: destination, source,
//! EtherType, payload. The switch reads the two addresses and nothing else; 802.1Q tags and
//! payloads pass through untouched.

use std::fmt;
use std::str::FromStr;

/// Destination, source and EtherType.
pub const HEADER_LEN: usize = 14;

/// An untagged frame with a 1500-byte payload.
pub const MAX_UNTAGGED_FRAME: usize = 1514;

/// A frame with one 802.1Q tag and a 1500-byte payload: the default largest frame a node
/// switches.
pub const MAX_TAGGED_FRAME: usize = 1518;

/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// A 48-bit IEEE MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddress = MacAddress([0xff; 6]);

    /// Whether the individual/group bit is set: broadcast and multicast destinations, which a
    /// switch floods. A group address is never a valid source.
    pub fn is_group(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Whether this is the broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Whether every byte is zero, which no station uses as its source.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not six colon-separated hex bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a MAC address (expected six hex bytes separated by colons): {0:?}")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddress {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseMacError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(error)?;
            if part.is_empty() || part.len() > 2 {
                return Err(error());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(MacAddress(bytes))
    }
}

/// Why a frame cannot be switched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Shorter than an Ethernet header: there is no destination or source to read.
    #[error("runt frame of {0} bytes, shorter than a {HEADER_LEN}-byte Ethernet header")]
    Runt(usize),
}

/// The addresses and EtherType at the head of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Where the frame goes.
    pub destination: MacAddress,
    /// Where it came from.
    pub source: MacAddress,
    /// The EtherType field; [`ETHERTYPE_VLAN`] for a tagged frame.
    pub ethertype: u16,
}

impl Header {
    /// Reads the header of `frame`.
    pub fn parse(frame: &[u8]) -> Result<Self, FrameError> {
        if frame.len() < HEADER_LEN {
            return Err(FrameError::Runt(frame.len()));
        }
        let mac = |at: usize| {
            let mut bytes = [0u8; 6];
            bytes.copy_from_slice(&frame[at..at + 6]);
            MacAddress(bytes)
        };
        Ok(Header {
            destination: mac(0),
            source: mac(6),
            ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    ///
    /// If `out` is shorter than [`HEADER_LEN`].
    pub fn emit(&self, out: &mut [u8]) {
        out[0..6].copy_from_slice(&self.destination.0);
        out[6..12].copy_from_slice(&self.source.0);
        out[12..14].copy_from_slice(&self.ethertype.to_be_bytes());
    }

    /// The VLAN id of a tagged frame, read from the tag that follows the header.
    pub fn vlan_id(&self, frame: &[u8]) -> Option<u16> {
        if self.ethertype != ETHERTYPE_VLAN || frame.len() < HEADER_LEN + 4 {
            return None;
        }
        Some(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ARP request from 52:54:00:12:34:56, broadcast.
    const ARP: [u8; 16] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06, 0x00,
        0x01,
    ];

    /// A tagged frame on VLAN 42 carrying IPv4.
    const TAGGED: [u8; 18] =
        [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x81, 0x00, 0x20, 0x2a, 0x08, 0x00];

    #[test]
    fn parses_broadcast_arp() {
        let header = Header::parse(&ARP).unwrap();
        assert!(header.destination.is_broadcast());
        assert!(header.destination.is_group());
        assert_eq!(header.source.to_string(), "52:54:00:12:34:56");
        assert!(!header.source.is_group());
        assert_eq!(header.ethertype, 0x0806);
        assert_eq!(header.vlan_id(&ARP), None);
    }

    #[test]
    fn parses_tagged_frame() {
        let header = Header::parse(&TAGGED).unwrap();
        assert_eq!(header.ethertype, ETHERTYPE_VLAN);
        assert_eq!(header.vlan_id(&TAGGED), Some(42));
        assert_eq!(header.vlan_id(&TAGGED[..16]), None);
    }

    #[test]
    fn emit_round_trips() {
        let header = Header::parse(&TAGGED).unwrap();
        let mut out = [0u8; HEADER_LEN];
        header.emit(&mut out);
        assert_eq!(out, TAGGED[..HEADER_LEN]);
    }

    #[test]
    fn runts_are_refused() {
        for len in 0..HEADER_LEN {
            assert_eq!(Header::parse(&ARP[..len]), Err(FrameError::Runt(len)));
        }
    }

    #[test]
    fn multicast_bit() {
        assert!("01:00:5e:00:00:01".parse::<MacAddress>().unwrap().is_group());
        assert!("33:33:00:00:00:01".parse::<MacAddress>().unwrap().is_group());
        assert!(!"02:00:00:00:00:01".parse::<MacAddress>().unwrap().is_group());
    }

    #[test]
    fn mac_strings() {
        let mac: MacAddress = "52:54:0:12:34:AB".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:12:34:ab");
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:zz", "525:4::"] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
