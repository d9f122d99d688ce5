//! Clamping the maximum segment size a TCP connection announces, so its segments fit in one
//! peer datagram.
//!
//! A peer datagram is smaller than the path's MTU by QUIC's header, the AEAD tag and umnet's
//! own header: over an underlay with a 1500-byte MTU it holds a frame of about 1400 bytes. A
//! TCP connection between hosts whose interfaces have a 1500-byte MTU sends 1514-byte frames,
//! and the node would cut every one of them in two. Each end of a TCP connection announces in
//! its SYN the largest segment it will accept (the MSS option, RFC 9293 section 3.7.1); a node
//! lowers that value in SYNs it sends to a peer, and both ends then send segments whose frames
//! fit one datagram, as tinc's `ClampMSS` and iptables' `TCPMSS` target do.
//!
//! [`find`] locates the option in a frame without changing it; [`MssOption::set`] rewrites the
//! value and updates the TCP checksum incrementally (RFC 1624, equation 3), so a segment that
//! arrived with a bad checksum still has one.

use crate::offload::{
    fold, link_header, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPV6_HEADER_LEN, PROTOCOL_TCP,
};

/// The smallest MSS a node announces in place of a larger one: the value every IPv4 host must
/// accept (RFC 9293 section 3.7.1). Below it the node lets frames be cut instead.
pub const MIN_MSS: u16 = 536;

const IPV4_HEADER_LEN: usize = 20;
const TCP_HEADER_LEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_MSS: u8 = 2;
const OPTION_MSS_LEN: u8 = 4;

/// The MSS option of a TCP SYN, found in a frame by [`find`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MssOption {
    /// The maximum segment size the SYN announces.
    pub value: u16,
    /// Bytes in front of the TCP header: the link header with its tags, and the IP header.
    pub headers: usize,
    /// Where the value is in the frame.
    at: usize,
    /// Where the TCP header starts.
    transport: usize,
}

/// Finds the MSS option of `frame` if it carries a TCP segment with SYN set: over IPv4 (and
/// not a later fragment) or over IPv6 with TCP as the first next header, behind any number of
/// 802.1Q or 802.1ad tags. `None` for any other frame, and for one whose headers are cut short
/// or do not agree with each other.
pub fn find(frame: &[u8]) -> Option<MssOption> {
    // Step 1: the IP header, and where the TCP segment starts and ends.
    let (ip, ethertype) = link_header(frame)?;
    let (transport, end) = match ethertype {
        ETHERTYPE_IPV4 => {
            let header = frame.get(ip..ip + IPV4_HEADER_LEN)?;
            let ihl = usize::from(header[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
            let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
            if header[0] >> 4 != 4 || ihl < IPV4_HEADER_LEN || header[9] != PROTOCOL_TCP {
                return None;
            }
            if fragment_offset != 0 || total < ihl {
                return None;
            }
            (ip + ihl, ip + total)
        }
        ETHERTYPE_IPV6 => {
            let header = frame.get(ip..ip + IPV6_HEADER_LEN)?;
            let payload = usize::from(u16::from_be_bytes([header[4], header[5]]));
            if header[0] >> 4 != 6 || header[6] != PROTOCOL_TCP {
                return None;
            }
            (ip + IPV6_HEADER_LEN, ip + IPV6_HEADER_LEN + payload)
        }
        _ => return None,
    };

    // Step 2: a SYN, with its options inside both the segment and the frame.
    let tcp = frame.get(transport..end)?;
    if tcp.len() < TCP_HEADER_LEN || tcp[13] & TCP_SYN == 0 {
        return None;
    }
    let header_len = usize::from(tcp[12] >> 4) * 4;
    let options = tcp.get(TCP_HEADER_LEN..header_len)?;

    // Step 3: the options, each a kind byte and, but for END and NOP, a length that counts both.
    let mut at = 0;
    while at < options.len() {
        match options[at] {
            OPTION_END => return None,
            OPTION_NOP => at += 1,
            kind => {
                let len = *options.get(at + 1)?;
                if len < 2 {
                    return None;
                }
                if kind == OPTION_MSS && len == OPTION_MSS_LEN {
                    let bytes = options.get(at + 2..at + 4)?;
                    return Some(MssOption {
                        value: u16::from_be_bytes([bytes[0], bytes[1]]),
                        headers: transport,
                        at: transport + TCP_HEADER_LEN + at + 2,
                        transport,
                    });
                }
                at += usize::from(len);
            }
        }
    }
    None
}

impl MssOption {
    /// The largest MSS whose segments fit in frames of `max_frame` bytes, given this frame's
    /// headers, and never below [`MIN_MSS`]. A sender subtracts its TCP options from the MSS
    /// itself, so only the fixed TCP header is counted here.
    pub fn limit(&self, max_frame: usize) -> u16 {
        let room = max_frame.saturating_sub(self.headers + TCP_HEADER_LEN);
        u16::try_from(room).unwrap_or(u16::MAX).max(MIN_MSS)
    }

    /// Writes `value` into the option of `frame`, the frame [`find`] read this from, and
    /// updates the TCP checksum for the change.
    pub fn set(&self, frame: &mut [u8], value: u16) {
        let checksum_at = self.transport + 16;
        let checksum = u16::from_be_bytes([frame[checksum_at], frame[checksum_at + 1]]);
        // The checksum sums 16-bit words from the start of the TCP header; a value at an odd
        // offset adds to it byte-swapped (RFC 1071 section 2(B)).
        let (old, new) = if (self.at - self.transport) % 2 == 1 {
            (self.value.swap_bytes(), value.swap_bytes())
        } else {
            (self.value, value)
        };
        let sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
        frame[checksum_at..checksum_at + 2].copy_from_slice(&fold(sum).to_be_bytes());
        frame[self.at..self.at + 2].copy_from_slice(&value.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::sum_words;

    /// Whether the TCP checksum of the IPv4 segment at `transport` in `frame` verifies.
    fn tcp4_checksum_verifies(frame: &[u8], ip: usize, transport: usize) -> bool {
        let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
        let segment = &frame[transport..ip + total];
        let pseudo =
            sum_words(&frame[ip + 12..ip + 20], u32::from(PROTOCOL_TCP)) + segment.len() as u32;
        fold(sum_words(segment, pseudo)) == 0
    }

    /// An Ethernet + IPv4 + TCP frame from 10.0.0.1:40000 to 10.0.0.2:5201 with TCP `flags`,
    /// `options` (padded to 4 bytes with END) and `payload` bytes, checksums correct.
    fn tcp4(flags: u8, options: &[u8], payload: usize) -> Vec<u8> {
        let mut options = options.to_vec();
        while options.len() % 4 != 0 {
            options.push(OPTION_END);
        }
        let tcp_len = TCP_HEADER_LEN + options.len() + payload;
        let total = (IPV4_HEADER_LEN + tcp_len) as u16;
        let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        frame.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let ip_checksum = fold(sum_words(&frame[14..34], 0));
        frame[24..26].copy_from_slice(&ip_checksum.to_be_bytes());
        let offset = ((TCP_HEADER_LEN + options.len()) / 4) as u8;
        frame.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 0]);
        frame.extend_from_slice(&[offset << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(&options);
        frame.extend((0..payload).map(|i| (i * 3) as u8));
        let pseudo = sum_words(&frame[26..34], u32::from(PROTOCOL_TCP)) + tcp_len as u32;
        let tcp_checksum = fold(sum_words(&frame[34..], pseudo));
        frame[50..52].copy_from_slice(&tcp_checksum.to_be_bytes());
        frame
    }

    /// The same SYN over IPv6, fe80::1 to fe80::2, with the MSS option only.
    fn syn6(mss: u16) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        frame.extend_from_slice(&[0x60, 0, 0, 0, 0, 24, PROTOCOL_TCP, 64]);
        frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        frame.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 0]);
        frame.extend_from_slice(&[0x60, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(&[OPTION_MSS, OPTION_MSS_LEN]);
        frame.extend_from_slice(&mss.to_be_bytes());
        let pseudo = sum_words(&frame[22..54], u32::from(PROTOCOL_TCP)) + 24;
        let checksum = fold(sum_words(&frame[54..], pseudo));
        frame[70..72].copy_from_slice(&checksum.to_be_bytes());
        frame
    }

    fn mss_option(value: u16) -> [u8; 4] {
        let [high, low] = value.to_be_bytes();
        [OPTION_MSS, OPTION_MSS_LEN, high, low]
    }

    #[test]
    fn a_syn_is_clamped_and_its_checksum_still_verifies() {
        let mut options = mss_option(1460).to_vec();
        options.extend_from_slice(&[OPTION_NOP, OPTION_NOP, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0]);
        let mut frame = tcp4(TCP_SYN, &options, 0);
        let found = find(&frame).unwrap();
        assert_eq!((found.value, found.headers), (1460, 34));
        assert_eq!(found.limit(1409), 1355);

        found.set(&mut frame, 1355);
        assert_eq!(find(&frame).unwrap().value, 1355);
        assert_eq!(frame[56..58], 1355u16.to_be_bytes());
        assert!(tcp4_checksum_verifies(&frame, 14, 34));
    }

    #[test]
    fn an_option_at_an_odd_offset_keeps_the_checksum_right() {
        // NOP first puts the value at TCP offset 23.
        let mut options = vec![OPTION_NOP];
        options.extend_from_slice(&mss_option(0x05b4));
        let mut frame = tcp4(TCP_SYN | 0x10, &options, 7);
        let found = find(&frame).unwrap();
        assert_eq!(found.value, 1460);
        for value in [1300, 0x00ff, 0xff00, MIN_MSS] {
            found.set(&mut frame, value);
            let found_again = find(&frame).unwrap();
            assert_eq!(found_again.value, value);
            assert!(tcp4_checksum_verifies(&frame, 14, 34), "after setting {value}");
            found_again.set(&mut frame, 1460);
            assert!(tcp4_checksum_verifies(&frame, 14, 34));
        }
    }

    #[test]
    fn tagged_and_ipv6_syns_are_found() {
        let plain = tcp4(TCP_SYN, &mss_option(1460), 0);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        tagged.extend_from_slice(&plain[12..]);
        let found = find(&tagged).unwrap();
        assert_eq!((found.value, found.headers), (1460, 38));
        let mut clamped = tagged.clone();
        found.set(&mut clamped, 1300);
        assert!(tcp4_checksum_verifies(&clamped, 18, 38));

        let mut frame = syn6(1440);
        let found = find(&frame).unwrap();
        assert_eq!((found.value, found.headers), (1440, 54));
        assert_eq!(found.limit(1409), 1335);
        found.set(&mut frame, 1335);
        let pseudo = sum_words(&frame[22..54], u32::from(PROTOCOL_TCP)) + 24;
        assert_eq!(fold(sum_words(&frame[54..], pseudo)), 0);
    }

    #[test]
    fn the_limit_never_goes_below_the_minimum() {
        let found = find(&tcp4(TCP_SYN, &mss_option(1460), 0)).unwrap();
        assert_eq!(found.limit(400), MIN_MSS);
        assert_eq!(found.limit(0), MIN_MSS);
        assert_eq!(found.limit(usize::MAX), u16::MAX);
    }

    #[test]
    fn frames_that_are_not_syns_with_an_mss_are_left_alone() {
        // An ACK, a SYN without the option, one whose options end before it, a later
        // fragment, UDP, ARP.
        assert_eq!(find(&tcp4(0x10, &mss_option(1460), 100)), None);
        assert_eq!(find(&tcp4(TCP_SYN, &[OPTION_NOP, OPTION_NOP], 0)), None);
        let mut options = vec![OPTION_END, 0, 0, 0];
        options.extend_from_slice(&mss_option(1460));
        assert_eq!(find(&tcp4(TCP_SYN, &options, 0)), None);
        let mut fragment = tcp4(TCP_SYN, &mss_option(1460), 0);
        fragment[21] = 0x10;
        assert_eq!(find(&fragment), None);
        let mut udp = tcp4(TCP_SYN, &mss_option(1460), 0);
        udp[23] = 17;
        assert_eq!(find(&udp), None);
        let mut arp = tcp4(TCP_SYN, &mss_option(1460), 0);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(find(&arp), None);
    }

    #[test]
    fn malformed_headers_never_panic_and_find_nothing() {
        let frame = tcp4(TCP_SYN, &mss_option(1460), 0);
        for len in 0..frame.len() {
            assert_eq!(find(&frame[..len]), None, "cut to {len} bytes");
        }
        // An option length of zero or one, a data offset past the segment, an IPv4 total length
        // past the frame, and an IHL below five.
        let mut zero = tcp4(TCP_SYN, &[30, 0, 0, 0, 2, 4, 5, 0xb4], 0);
        assert_eq!(find(&zero), None);
        zero[55] = 1;
        assert_eq!(find(&zero), None);
        let mut offset = frame.clone();
        offset[46] = 0xf0;
        assert_eq!(find(&offset), None);
        let mut total = frame.clone();
        total[16..18].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(find(&total), None);
        let mut ihl = frame.clone();
        ihl[14] = 0x44;
        assert_eq!(find(&ihl), None);
    }

    #[test]
    fn padding_after_the_ip_packet_is_not_read_as_tcp() {
        // A minimum-size Ethernet frame pads a short packet; the IP length says where it ends.
        let mut frame = tcp4(TCP_SYN, &mss_option(1460), 0);
        frame.resize(80, 0xee);
        assert_eq!(find(&frame).unwrap().value, 1460);
    }
}
