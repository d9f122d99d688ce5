//! Undoing what NIC offloads do to frames before a switch may forward them.
//!
//! A packet socket on a NIC sees frames as the kernel holds them, not as they crossed the
//! wire: receive offloads (GRO, LRO) hand up one coalesced TCP or UDP "super-frame" of up to
//! 64 KiB where the wire carried many, frames the host sends may still lack their checksum
//! (checksum offload), and VLAN offload strips the 802.1Q tag into metadata. With
//! `PACKET_VNET_HDR` the kernel prefixes each frame with a [`VnetHeader`] saying which of
//! these applies, and this module turns such a frame back into wire frames:
//!
//! - [`complete_checksum`] writes the checksum the kernel left for the hardware to fill in;
//! - [`segment`] cuts a super-frame into frames of the size the wire carried, with the IP
//!   lengths, IPv4 identification, TCP sequence numbers, flags and checksums each would have;
//! - [`insert_vlan_tag`] puts a stripped tag back.
//!
//! The layout of `struct virtio_net_hdr` (10 bytes, fields in the host's byte order, which is
//! what the kernel uses for packet sockets):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | flags: [`NEEDS_CSUM`] |
//! | 1 | 1 | gso_type: [`GSO_NONE`], [`GSO_TCPV4`], [`GSO_UDP`], [`GSO_TCPV6`], [`GSO_UDP_L4`] |
//! | 2 | 2 | hdr_len: bytes of headers |
//! | 4 | 2 | gso_size: payload bytes per segment |
//! | 6 | 2 | csum_start: where checksumming starts |
//! | 8 | 2 | csum_offset: where the checksum goes, from `csum_start` |

use crate::ethernet::{ETHERTYPE_VLAN, HEADER_LEN};

/// Length of `struct virtio_net_hdr`.
pub const VNET_HEADER_LEN: usize = 10;

/// The frame's checksum is partial: it must be completed from `csum_start`.
pub const NEEDS_CSUM: u8 = 1;

/// Not a super-frame.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (IPv4 fragments); not undone here.
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation: each segment is a datagram of its own.
pub const GSO_UDP_L4: u8 = 5;
/// Set with a TCP type when the segments carry ECN's CWR flag only on the first.
pub const GSO_ECN: u8 = 0x80;

pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1ad (QinQ) service tag.
const ETHERTYPE_QINQ: u16 = 0x88a8;
pub(crate) const PROTOCOL_TCP: u8 = 6;
const PROTOCOL_UDP: u8 = 17;
pub(crate) const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// `struct virtio_net_hdr`, parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// [`NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// One of the `GSO_*` types, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers, as the kernel saw them.
    pub hdr_len: u16,
    /// Payload bytes per segment of a super-frame.
    pub gso_size: u16,
    /// Offset of the first byte the partial checksum covers.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Reads the header at the start of `bytes`; `None` if there are fewer than
    /// [`VNET_HEADER_LEN`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; VNET_HEADER_LEN] = bytes.get(..VNET_HEADER_LEN)?.try_into().ok()?;
        let field = |at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        Some(VnetHeader {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: field(2),
            gso_size: field(4),
            csum_start: field(6),
            csum_offset: field(8),
        })
    }

    /// The header as the kernel expects it before a frame written to a packet socket: no
    /// offload asked for.
    pub const NONE: [u8; VNET_HEADER_LEN] = [0; VNET_HEADER_LEN];

    /// Whether the frame is a super-frame to be cut into segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Why a frame cannot be restored to what the wire carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffloadError {
    /// The checksum position lies outside the frame.
    #[error("checksum at {start}+{offset} lies outside a {len}-byte frame")]
    ChecksumOutOfRange {
        /// `csum_start`.
        start: usize,
        /// `csum_offset`.
        offset: usize,
        /// The frame's length.
        len: usize,
    },
    /// A super-frame of a kind this module does not cut (UDP fragmentation offload).
    #[error("super-frame of GSO type {0} cannot be segmented")]
    UnsupportedGso(u8),
    /// The super-frame's headers are not what its GSO type says.
    #[error("super-frame headers do not match its GSO type: {0}")]
    Malformed(&'static str),
}

/// The ones' complement sum of `bytes` as 16-bit big-endian words, added to `sum`, not folded.
pub(crate) fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds a 32-bit sum into 16 bits and complements it: the Internet checksum (RFC 1071).
pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Completes a partial checksum: the kernel left the pseudo-header's sum in the checksum field
/// at `start + offset` and wants the sum over everything from `start` on written there.
pub fn complete_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), OffloadError> {
    let at = start + offset;
    if start > frame.len() || at + 2 > frame.len() {
        return Err(OffloadError::ChecksumOutOfRange { start, offset, len: frame.len() });
    }
    let checksum = fold(sum_words(&frame[start..], 0));
    frame[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Where a frame's Ethernet header, tags included, ends, and the EtherType found there.
pub(crate) fn link_header(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = HEADER_LEN - 2;
    loop {
        let ethertype = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
            at += 4;
        } else {
            return Some((at + 2, ethertype));
        }
    }
}

/// The network and transport layout of a super-frame.
struct Layout {
    /// Where the IP header starts.
    ip: usize,
    ipv4: bool,
    /// Where the TCP or UDP header starts.
    transport: usize,
    /// Where the payload starts.
    payload: usize,
    tcp: bool,
}

fn layout(frame: &[u8], gso_type: u8) -> Result<Layout, OffloadError> {
    let malformed = OffloadError::Malformed;
    let (ip, ethertype) = link_header(frame).ok_or(malformed("truncated link header"))?;
    let (ipv4, protocol, transport) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(*frame.get(ip).ok_or(malformed("no IPv4 header"))? & 0x0f) * 4;
            let protocol = *frame.get(ip + 9).ok_or(malformed("truncated IPv4 header"))?;
            if ihl < 20 {
                return Err(malformed("IPv4 header length below 20"));
            }
            (true, protocol, ip + ihl)
        }
        ETHERTYPE_IPV6 => {
            // Extension headers are not walked: the kernel segments only frames whose next
            // header is TCP or UDP right away, as GRO builds them.
            let protocol = *frame.get(ip + 6).ok_or(malformed("truncated IPv6 header"))?;
            (false, protocol, ip + IPV6_HEADER_LEN)
        }
        _ => return Err(malformed("neither IPv4 nor IPv6")),
    };
    let tcp = match (gso_type & !GSO_ECN, ipv4, protocol) {
        (GSO_TCPV4, true, PROTOCOL_TCP) | (GSO_TCPV6, false, PROTOCOL_TCP) => true,
        (GSO_UDP_L4, _, PROTOCOL_UDP) => false,
        (GSO_UDP, ..) => return Err(OffloadError::UnsupportedGso(GSO_UDP)),
        (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, ..) => {
            return Err(malformed("IP version or protocol does not match the GSO type"))
        }
        (other, ..) => return Err(OffloadError::UnsupportedGso(other)),
    };
    let payload = if tcp {
        let offset = *frame.get(transport + 12).ok_or(malformed("truncated TCP header"))?;
        let len = usize::from(offset >> 4) * 4;
        if len < 20 {
            return Err(malformed("TCP header length below 20"));
        }
        transport + len
    } else {
        transport + UDP_HEADER_LEN
    };
    if payload > frame.len() {
        return Err(malformed("headers longer than the frame"));
    }
    Ok(Layout { ip, ipv4, transport, payload, tcp })
}

/// The sum of the TCP/UDP pseudo-header (RFC 793, RFC 8200 section 8.1) for a segment whose
/// transport header and payload are `length` bytes.
fn pseudo_header_sum(segment: &[u8], layout: &Layout, length: usize) -> u32 {
    let protocol = if layout.tcp { PROTOCOL_TCP } else { PROTOCOL_UDP };
    let addresses = if layout.ipv4 {
        &segment[layout.ip + 12..layout.ip + 20]
    } else {
        &segment[layout.ip + 8..layout.ip + 40]
    };
    let sum = sum_words(addresses, 0) + u32::from(protocol);
    sum + (length as u32 & 0xffff) + (length as u32 >> 16)
}

/// Cuts super-frame `frame` (described by `header`) into the frames the wire carried, passing
/// each to `emit`. `scratch` holds each segment while `emit` reads it, so cutting costs no
/// allocation once it has grown.
///
/// Every segment gets the headers of the super-frame with its own IP length, IPv4
/// identification (counted up from the super-frame's) and header checksum, TCP sequence
/// number, UDP length, and a complete TCP or UDP checksum. TCP's FIN and PSH stay on the last
/// segment only and CWR on the first only, as a sender's segmentation would leave them.
pub fn segment(
    frame: &[u8],
    header: &VnetHeader,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let layout = layout(frame, header.gso_type)?;
    let size = usize::from(header.gso_size);
    if size == 0 {
        return Err(OffloadError::Malformed("zero segment size"));
    }
    let payload = &frame[layout.payload..];
    let count = payload.len().div_ceil(size).max(1);
    for (index, chunk) in
        payload.chunks(size).chain(payload.is_empty().then_some(&[][..])).enumerate()
    {
        scratch.clear();
        scratch.extend_from_slice(&frame[..layout.payload]);
        scratch.extend_from_slice(chunk);
        fix_segment(scratch, &layout, index, count, index * size);
        emit(scratch);
    }
    Ok(count)
}

/// Rewrites the headers of segment `index` of `count`, whose payload starts `offset` bytes
/// into the super-frame's payload.
fn fix_segment(segment: &mut [u8], layout: &Layout, index: usize, count: usize, offset: usize) {
    let ip = layout.ip;
    let transport_len = segment.len() - layout.transport;
    if layout.ipv4 {
        let total = (segment.len() - ip) as u16;
        segment[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
        let id = u16::from_be_bytes([segment[ip + 4], segment[ip + 5]]).wrapping_add(index as u16);
        segment[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
        segment[ip + 10..ip + 12].fill(0);
        let checksum = fold(sum_words(&segment[ip..layout.transport], 0));
        segment[ip + 10..ip + 12].copy_from_slice(&checksum.to_be_bytes());
    } else {
        let payload_len = (segment.len() - ip - IPV6_HEADER_LEN) as u16;
        segment[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    }

    let t = layout.transport;
    let checksum_at = if layout.tcp {
        let sequence =
            u32::from_be_bytes([segment[t + 4], segment[t + 5], segment[t + 6], segment[t + 7]]);
        let sequence = sequence.wrapping_add(offset as u32);
        segment[t + 4..t + 8].copy_from_slice(&sequence.to_be_bytes());
        if index + 1 < count {
            segment[t + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            segment[t + 13] &= !TCP_CWR;
        }
        t + 16
    } else {
        segment[t + 4..t + 6].copy_from_slice(&(transport_len as u16).to_be_bytes());
        t + 6
    };
    segment[checksum_at..checksum_at + 2].fill(0);
    let sum = sum_words(&segment[t..], pseudo_header_sum(segment, layout, transport_len));
    let mut checksum = fold(sum);
    if !layout.tcp && checksum == 0 {
        // RFC 768: a computed UDP checksum of zero is sent as all ones.
        checksum = 0xffff;
    }
    segment[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
}

/// Writes `frame` into `out` with an 802.1Q tag (`tpid`, `tci`) put back after the source
/// address, where VLAN offload took it from.
pub fn insert_vlan_tag(frame: &[u8], tpid: u16, tci: u16, out: &mut Vec<u8>) {
    out.clear();
    let split = frame.len().min(12);
    out.extend_from_slice(&frame[..split]);
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&tci.to_be_bytes());
    out.extend_from_slice(&frame[split..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP super-frame: 10.0.0.1:40000 -> 10.0.0.2:5201, seq 1000, ACK
    /// and PSH and FIN, id 0x1234, with `payload` bytes counting up.
    fn tcp4(payload: usize) -> Vec<u8> {
        let mut frame = vec![
            0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00, // Ethernet
            0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, // IPv4
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 1, 0x50, 0x19, 0xff, 0xff, 0, 0, 0,
            0, // TCP: ports, seq, ack, offset 5, flags ACK|PSH|FIN, window, checksum, urgent
        ];
        frame.extend((0..payload).map(|i| i as u8));
        frame
    }

    /// An Ethernet + IPv6 + UDP super-frame, fe80::1 -> fe80::2, with `payload` bytes.
    fn udp6(payload: usize) -> Vec<u8> {
        let mut frame = vec![0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        frame.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 17, 64]);
        frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        frame.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 0, 0, 0]);
        frame.extend((0..payload).map(|i| (i * 7) as u8));
        frame
    }

    /// Whether the Internet checksum over `bytes` plus `pseudo` verifies (sums to all ones).
    fn verifies(bytes: &[u8], pseudo: u32) -> bool {
        fold(sum_words(bytes, pseudo)) == 0
    }

    fn cut(frame: &[u8], gso_type: u8, gso_size: u16) -> Vec<Vec<u8>> {
        let header = VnetHeader { gso_type, gso_size, ..VnetHeader::default() };
        let mut segments = Vec::new();
        let mut scratch = Vec::new();
        let count = segment(frame, &header, &mut scratch, |s| segments.push(s.to_vec())).unwrap();
        assert_eq!(count, segments.len());
        segments
    }

    #[test]
    fn parses_the_virtio_header_in_host_order() {
        let mut bytes = [0u8; 10];
        bytes[0] = NEEDS_CSUM;
        bytes[1] = GSO_TCPV4 | GSO_ECN;
        bytes[2..4].copy_from_slice(&54u16.to_ne_bytes());
        bytes[4..6].copy_from_slice(&1448u16.to_ne_bytes());
        bytes[6..8].copy_from_slice(&34u16.to_ne_bytes());
        bytes[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let header = VnetHeader::parse(&bytes).unwrap();
        assert_eq!(header.gso_size, 1448);
        assert_eq!((header.csum_start, header.csum_offset, header.hdr_len), (34, 16, 54));
        assert!(header.is_gso());
        assert!(!VnetHeader::parse(&VnetHeader::NONE).unwrap().is_gso());
        assert_eq!(VnetHeader::parse(&bytes[..9]), None);
    }

    #[test]
    fn a_tcp_super_frame_becomes_wire_segments() {
        let frame = tcp4(3000);
        let segments = cut(&frame, GSO_TCPV4, 1448);
        assert_eq!(segments.len(), 3);
        let mut payload = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            let ip = &s[14..34];
            assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), s.len() - 14);
            assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 0x1234 + i as u16);
            assert!(verifies(ip, 0), "IPv4 header checksum of segment {i}");
            let tcp = &s[34..];
            let pseudo = sum_words(&ip[12..20], 6 + tcp.len() as u32);
            assert!(verifies(tcp, pseudo), "TCP checksum of segment {i}");
            let sequence = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            assert_eq!(sequence, 1000 + 1448 * i as u32);
            let last = i == 2;
            assert_eq!(tcp[13] & (TCP_FIN | TCP_PSH) != 0, last, "FIN/PSH on segment {i}");
            payload.extend_from_slice(&tcp[20..]);
        }
        assert_eq!(segments[2].len(), 54 + 3000 - 2 * 1448);
        assert_eq!(payload, frame[54..]);
    }

    #[test]
    fn a_tagged_udp6_super_frame_keeps_its_tag_in_every_segment() {
        let plain = udp6(1000);
        let mut tagged = Vec::new();
        insert_vlan_tag(&plain, ETHERTYPE_VLAN, 42, &mut tagged);
        let segments = cut(&tagged, GSO_UDP_L4, 400);
        assert_eq!(segments.len(), 3);
        for s in &segments {
            assert_eq!(&s[12..16], &[0x81, 0x00, 0x00, 42]);
            let ip = &s[18..58];
            let udp = &s[58..];
            assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), udp.len());
            assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
            let pseudo = sum_words(&ip[8..40], 17 + udp.len() as u32);
            assert!(verifies(udp, pseudo));
        }
        assert_eq!(segments[2].len(), 18 + 40 + 8 + 200);
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut frame = tcp4(101);
        // What the kernel leaves: the pseudo-header sum, folded but not complemented.
        let pseudo = sum_words(&frame[26..34], 6 + (frame.len() - 34) as u32);
        let folded = !fold(pseudo);
        frame[50..52].copy_from_slice(&folded.to_be_bytes());
        complete_checksum(&mut frame, 34, 16).unwrap();
        let pseudo = sum_words(&frame[26..34], 6 + (frame.len() - 34) as u32);
        assert!(verifies(&frame[34..], pseudo));
        assert_eq!(
            complete_checksum(&mut frame, 200, 16),
            Err(OffloadError::ChecksumOutOfRange { start: 200, offset: 16, len: 155 })
        );
    }

    #[test]
    fn super_frames_that_cannot_be_cut_are_refused() {
        let mut scratch = Vec::new();
        let header =
            |gso_type, gso_size| VnetHeader { gso_type, gso_size, ..VnetHeader::default() };
        let frame = tcp4(3000);
        for (frame, header, expected) in [
            (&frame[..], header(GSO_UDP, 1000), OffloadError::UnsupportedGso(GSO_UDP)),
            (
                &frame[..],
                header(GSO_TCPV6, 1000),
                OffloadError::Malformed("IP version or protocol does not match the GSO type"),
            ),
            (&frame[..], header(GSO_TCPV4, 0), OffloadError::Malformed("zero segment size")),
            (
                &frame[..40],
                header(GSO_TCPV4, 1000),
                OffloadError::Malformed("truncated TCP header"),
            ),
            (
                &frame[..10],
                header(GSO_TCPV4, 1000),
                OffloadError::Malformed("truncated link header"),
            ),
        ] {
            assert_eq!(segment(frame, &header, &mut scratch, |_| {}), Err(expected));
        }
    }

    #[test]
    fn a_stripped_tag_goes_back_after_the_source_address() {
        let frame = tcp4(0);
        let mut out = Vec::new();
        insert_vlan_tag(&frame, ETHERTYPE_VLAN, 0x2005, &mut out);
        assert_eq!(out.len(), frame.len() + 4);
        assert_eq!(&out[..12], &frame[..12]);
        assert_eq!(&out[12..16], &[0x81, 0x00, 0x20, 0x05]);
        assert_eq!(&out[16..], &frame[12..]);
    }
}
