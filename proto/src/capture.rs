//! Packet capture: the stream a node sends `umnet capture` over the admin socket, and the pcap
//! file format the CLI writes for tcpdump and Wireshark.
//!
//! After answering a capture request, the node writes records until the CLI closes the
//! connection. Each record is a kind byte and a body, integers big-endian:
//!
//! | kind | body |
//! |---|---|
//! | [`RECORD_FRAME`] | seconds (8), nanoseconds (4) since the epoch; length (4); the frame |
//! | [`RECORD_STATS`] | frames captured in all (8); of those, dropped for a slow reader (8) |
//!
//! A frame record longer than [`MAX_FRAME`] is malformed.
//!
//! The pcap file is the classic format (not pcapng): a 24-byte header with the
//! microsecond magic `0xa1b2c3d4`, version 2.4, link type 1 (Ethernet), then per frame a
//! 16-byte header (seconds, microseconds, captured length, original length) and the frame,
//! all in little-endian order, which every reader accepts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Kind byte of a frame record.
pub const RECORD_FRAME: u8 = 1;

/// Kind byte of a statistics record.
pub const RECORD_STATS: u8 = 2;

/// The longest frame a record carries: what a node switches at most.
pub const MAX_FRAME: usize = 65_535;

/// Length of a frame record's header (kind, time, length).
pub const FRAME_HEADER_LEN: usize = 17;

/// Length of a statistics record.
pub const STATS_LEN: usize = 17;

/// One record of the capture stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A frame, and when the node saw it.
    Frame {
        /// Since the Unix epoch.
        time: Duration,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// How the capture is going.
    Stats {
        /// Frames the node captured so far.
        captured: u64,
        /// Of those, frames dropped because the reader fell behind.
        dropped: u64,
    },
}

/// Why bytes of a capture stream cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A kind byte this version does not know.
    #[error("unknown capture record kind {0}")]
    BadKind(u8),
    /// A frame record longer than [`MAX_FRAME`].
    #[error("capture record of {0} bytes is longer than any frame")]
    TooLong(usize),
}

impl Record {
    /// Appends the record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Frame { time, frame } => {
                out.push(RECORD_FRAME);
                out.extend_from_slice(&time.as_secs().to_be_bytes());
                out.extend_from_slice(&time.subsec_nanos().to_be_bytes());
                out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                out.extend_from_slice(frame);
            }
            Record::Stats { captured, dropped } => {
                out.push(RECORD_STATS);
                out.extend_from_slice(&captured.to_be_bytes());
                out.extend_from_slice(&dropped.to_be_bytes());
            }
        }
    }

    /// Reads one record from the start of `bytes`: the record and the bytes it took, or
    /// `Ok(None)` when `bytes` holds only part of one so far.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Record, usize)>, CaptureError> {
        let Some(&kind) = bytes.first() else { return Ok(None) };
        let word = |at: usize| -> u64 {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(eight)
        };
        match kind {
            RECORD_FRAME => {
                if bytes.len() < FRAME_HEADER_LEN {
                    return Ok(None);
                }
                let nanos = u32::from_be_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
                let len = u32::from_be_bytes([bytes[13], bytes[14], bytes[15], bytes[16]]);
                let len = len as usize;
                if len > MAX_FRAME {
                    return Err(CaptureError::TooLong(len));
                }
                let Some(frame) = bytes.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                    return Ok(None);
                };
                let time = Duration::new(word(1), nanos.min(999_999_999));
                Ok(Some((Record::Frame { time, frame: frame.to_vec() }, FRAME_HEADER_LEN + len)))
            }
            RECORD_STATS => {
                if bytes.len() < STATS_LEN {
                    return Ok(None);
                }
                Ok(Some((Record::Stats { captured: word(1), dropped: word(9) }, STATS_LEN)))
            }
            other => Err(CaptureError::BadKind(other)),
        }
    }
}

/// The time since the Unix epoch of `time` (zero for a clock before 1970).
pub fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The header of a pcap file of Ethernet frames, each kept whole up to `snaplen` bytes.
pub fn pcap_header(snaplen: u32) -> [u8; 24] {
    let mut header = [0u8; 24];
    header[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    header[4..6].copy_from_slice(&2u16.to_le_bytes());
    header[6..8].copy_from_slice(&4u16.to_le_bytes());
    // 8..16: time zone offset and accuracy, both zero.
    header[16..20].copy_from_slice(&snaplen.to_le_bytes());
    header[20..24].copy_from_slice(&1u32.to_le_bytes());
    header
}

/// Appends a pcap record of `frame`, seen at `time` since the epoch, to `out`.
pub fn pcap_record(time: Duration, frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(time.as_secs() as u32).to_le_bytes());
    out.extend_from_slice(&time.subsec_micros().to_le_bytes());
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_wait_for_their_end() {
        let frame =
            Record::Frame { time: Duration::new(1_700_000_000, 123_456_789), frame: vec![7; 60] };
        let stats = Record::Stats { captured: 10, dropped: 3 };
        let mut stream = Vec::new();
        frame.encode(&mut stream);
        stats.encode(&mut stream);
        assert_eq!(stream.len(), FRAME_HEADER_LEN + 60 + STATS_LEN);
        assert_eq!(&stream[..9], &[1, 0, 0, 0, 0, 0x65, 0x53, 0xf1, 0x00]);

        let (first, used) = Record::decode(&stream).unwrap().unwrap();
        assert_eq!((first, used), (frame, FRAME_HEADER_LEN + 60));
        assert_eq!(Record::decode(&stream[used..]).unwrap(), Some((stats, STATS_LEN)));
        for cut in [0, 1, 16, 40] {
            assert_eq!(Record::decode(&stream[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn bad_records_are_refused() {
        assert_eq!(Record::decode(&[9, 0]), Err(CaptureError::BadKind(9)));
        let mut long = vec![RECORD_FRAME; FRAME_HEADER_LEN];
        long[13..17].copy_from_slice(&70_000u32.to_be_bytes());
        assert_eq!(Record::decode(&long), Err(CaptureError::TooLong(70_000)));
    }

    #[test]
    fn pcap_bytes_match_the_classic_format() {
        assert_eq!(
            pcap_header(65_535),
            [
                0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0,
                0, 0
            ]
        );
        let mut out = Vec::new();
        pcap_record(Duration::new(1, 2_500), &[0xaa; 3], &mut out);
        assert_eq!(out, [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0, 0xaa, 0xaa, 0xaa]);
    }
}
