//! The stamp every measured frame carries, and a receiver's count of distinct frames.
//!
//! A stamped frame is an Ethernet frame of the local experimental EtherType whose payload starts
//! with the measurement's token, the sender's stream number, a sequence number and the send time
//! in nanoseconds on this process's monotonic clock, all in native byte order (sender and
//! receiver are the same process). The rest of the frame is zeros.

use std::sync::OnceLock;
use std::time::Instant;

use umnet_proto::ethernet::{Header, MacAddress, HEADER_LEN};

/// IEEE 802 "local experimental" EtherType: no host stack will take these frames for its own.
pub(crate) const ETHERTYPE: u16 = 0x88b5;

/// Bytes of the stamp after the Ethernet header: token, stream, sequence, send time.
pub(crate) const STAMP_LEN: usize = 4 + 4 + 8 + 8;

/// A frame of `size` bytes from `from` to `to` with a zeroed stamp.
pub(crate) fn frame(to: MacAddress, from: MacAddress, size: usize) -> Vec<u8> {
    let mut frame = vec![0u8; size.max(HEADER_LEN + STAMP_LEN)];
    Header { destination: to, source: from, ethertype: ETHERTYPE }.emit(&mut frame);
    frame
}

/// What a stamped frame says about itself.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) token: u32,
    pub(crate) stream: u32,
    pub(crate) sequence: u64,
    /// Send time, from [`now_nanos`].
    pub(crate) nanos: u64,
}

/// Writes the stamp, with the current time, into a frame made by [`frame`].
pub(crate) fn stamp(frame: &mut [u8], token: u32, stream: u32, sequence: u64) {
    let stamp = &mut frame[HEADER_LEN..HEADER_LEN + STAMP_LEN];
    stamp[0..4].copy_from_slice(&token.to_ne_bytes());
    stamp[4..8].copy_from_slice(&stream.to_ne_bytes());
    stamp[8..16].copy_from_slice(&sequence.to_ne_bytes());
    stamp[16..24].copy_from_slice(&now_nanos().to_ne_bytes());
}

/// Changes the stream number of a stamped frame and leaves the rest of the stamp alone.
pub(crate) fn set_stream(frame: &mut [u8], stream: u32) {
    frame[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&stream.to_ne_bytes());
}

/// Reads the stamp of `frame`, if it is long enough and of our EtherType.
pub(crate) fn read_stamp(frame: &[u8]) -> Option<Stamp> {
    let stamp = frame.get(HEADER_LEN..HEADER_LEN + STAMP_LEN)?;
    if frame[12..14] != ETHERTYPE.to_be_bytes() {
        return None;
    }
    let u32_at =
        |at: usize| u32::from_ne_bytes([stamp[at], stamp[at + 1], stamp[at + 2], stamp[at + 3]]);
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&stamp[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    Some(Stamp { token: u32_at(0), stream: u32_at(4), sequence: u64_at(8), nanos: u64_at(16) })
}

/// Nanoseconds on the monotonic clock since the first call in this process.
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What a receiver saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Distinct frames of the expected stream.
    pub(crate) distinct: u64,
    /// Frames of the expected stream seen before.
    pub(crate) duplicates: u64,
    /// Frames too short to carry a stamp.
    pub(crate) truncated: u64,
    seen: Vec<u64>,
}

impl Tally {
    /// Counts `frame` if it belongs to stream `stream` of measurement `token`.
    pub(crate) fn record(&mut self, frame: &[u8], token: u32, stream: u32) {
        if frame.len() < HEADER_LEN + STAMP_LEN {
            self.truncated += 1;
            return;
        }
        let Some(stamped) = read_stamp(frame) else { return };
        if stamped.token != token || stamped.stream != stream {
            return;
        }
        let Ok(sequence) = usize::try_from(stamped.sequence) else { return };
        let (word, bit) = (sequence / 64, 1u64 << (sequence % 64));
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
        } else {
            self.seen[word] |= bit;
            self.distinct += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        let mut frame = frame(MacAddress::BROADCAST, MacAddress([2, 0, 0, 0, 0, 1]), 64);
        stamp(&mut frame, 7, 3, 42);
        let read = read_stamp(&frame).expect("stamped frame");
        assert_eq!((read.token, read.stream, read.sequence), (7, 3, 42));
    }

    #[test]
    fn tally_counts_distinct_frames_once() {
        let mut frame = frame(MacAddress::BROADCAST, MacAddress([2, 0, 0, 0, 0, 1]), 64);
        let mut tally = Tally::default();
        for sequence in [0, 1, 1, 200, 5, 0] {
            stamp(&mut frame, 9, 0, sequence);
            tally.record(&frame, 9, 0);
        }
        stamp(&mut frame, 8, 0, 3);
        tally.record(&frame, 9, 0);
        assert_eq!((tally.distinct, tally.duplicates), (4, 2));
    }
}
