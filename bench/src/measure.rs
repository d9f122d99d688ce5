//! The measurements: floods, broadcast, paced load and round trips through one switch.
//!
//! Every measurement plugs fresh ports into the switch, teaches the switch their MAC addresses
//! with one broadcast frame each, runs one sender and its receivers on their own threads, and
//! unplugs the ports when it returns. Every loop stops at a count and at a deadline, whichever
//! comes first. Frames carry a stamp (measurement token, stream, sequence number, send time) so
//! a receiver counts distinct frames of the measurement and ignores everything else.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use umnet_proto::ethernet::{Header, MacAddress};

use crate::stamp::{frame, now_nanos, read_stamp, set_stream, stamp, Tally, ETHERTYPE};

use crate::port::{Port, ReceiveBatch, RECEIVE_BUFFER};
use crate::process;
use crate::report::{Metric, Unit};
use crate::switch::Switch;

/// The stream number of the broadcast frame each port sends to make the switch learn its MAC.
const HELLO_STREAM: u32 = u32::MAX;

/// The stream numbers of round-trip requests and of the echo's answers, which keep the request's
/// sequence number and send time.
const REQUEST_STREAM: u32 = 1;
const ANSWER_STREAM: u32 = 2;

/// A receiver that hears nothing for this long after the sender stopped has seen everything.
const QUIET: Duration = Duration::from_millis(20);

/// A receiver gives up this long after the sender stopped, even if frames still trickle in.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);

/// A send that waits longer than this for room in the switch's queue counts as a stall.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// Round trips slower than this count as lost.
const ECHO_TIMEOUT: Duration = Duration::from_millis(100);

/// A paced sender sleeps until this close to the next send time, then polls the clock. A sleep
/// overshoots by 25-40 µs (median; 50-80 µs at p99) on a 2-vCPU KVM guest even with 1 ns of
/// timer slack, so shorter intervals are never slept at all.
const SPIN_WINDOW: Duration = Duration::from_micros(80);

/// The most slots a late paced sender sends back to back to catch up, well below the default
/// `net.unix.max_dgram_qlen` of 10.
const MAX_CATCH_UP: u64 = 4;

/// The most frames any sender sends per second of measurement; far above what any of the
/// switches reaches with one `sendto` per frame, and bounds the receivers' bitmaps.
const MAX_FRAMES_PER_SECOND: u64 = 4_000_000;

static NEXT_MAC: AtomicU32 = AtomicU32::new(1);
static NEXT_TOKEN: AtomicU32 = AtomicU32::new(1);

/// The measurements, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Test {
    /// 64-byte unicast flood.
    A,
    /// 1514-byte unicast flood.
    B,
    /// 64-byte broadcast flood to three receivers.
    C,
    /// 64-byte unicast paced at fixed rates.
    D,
    /// Request/echo round trip.
    E,
}

impl Test {
    pub(crate) fn letter(self) -> &'static str {
        match self {
            Test::A => "a",
            Test::B => "b",
            Test::C => "c",
            Test::D => "d",
            Test::E => "e",
        }
    }
}

/// What every measurement needs to know.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) duration: Duration,
    pub(crate) rates: Vec<u64>,
    pub(crate) rtt_samples: usize,
}

/// The figures of one measurement on one switch: metrics for the tables, raw counts for JSON.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) metrics: Vec<Metric>,
    pub(crate) raw: serde_json::Value,
}

/// Runs measurement `test` on `switch`.
pub(crate) fn run(test: Test, switch: &Switch, settings: &Settings) -> Result<Outcome> {
    match test {
        Test::A => unicast_flood(switch, settings, 64, "a", "64 B unicast flood"),
        Test::B => unicast_flood(switch, settings, 1514, "b", "1514 B unicast flood"),
        Test::C => broadcast_flood(switch, settings, 64, 3),
        Test::D => paced_load(switch, settings),
        Test::E => round_trip(switch, settings),
    }
}

/// a and b: one sender floods one receiver.
fn unicast_flood(
    switch: &Switch,
    settings: &Settings,
    size: usize,
    key: &str,
    title: &str,
) -> Result<Outcome> {
    let ports = plug(switch, 2)?;
    let (sender, receiver) = (&ports[0], &ports[1]);
    let token = next_token();
    let max_count = max_count(settings.duration);
    let cpu_before = switch.pid().and_then(process::cpu_time);

    let stop = AtomicBool::new(false);
    let (sent, tally) = thread::scope(|scope| {
        let receiving = scope.spawn(|| receive(receiver, token, 0, &stop));
        let sent = {
            let _stop = StopOnDrop(&stop);
            flood(sender, receiver.mac, size, token, 0, settings.duration, max_count)
        };
        (sent, join(receiving))
    });
    let sent = sent?;
    let tally = tally?;
    let cpu_after = switch.pid().and_then(process::cpu_time);

    let seconds = sent.elapsed.as_secs_f64();
    let delivered = tally.distinct as f64 / seconds;
    let drop = loss_percent(sent.sent, tally.distinct);
    let mut metrics = vec![
        Metric::new(
            format!("{key}.fps"),
            format!("{key}. {title}: delivered frames/s"),
            Unit::Rate,
            delivered,
        ),
        Metric::new(
            format!("{key}.mbps"),
            format!("{key}. {title}: delivered Mbit/s"),
            Unit::Mbps,
            delivered * size as f64 * 8.0 / 1e6,
        ),
        Metric::new(
            format!("{key}.drop"),
            format!("{key}. {title}: dropped (sent - received) / sent"),
            Unit::Percent,
            drop,
        ),
    ];
    let cpu_per_frame = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if sent.sent > 0 => {
            let micros = after.saturating_sub(before).as_secs_f64() * 1e6 / sent.sent as f64;
            metrics.push(Metric::new(
                format!("{key}.cpu"),
                format!("{key}. {title}: switch CPU µs per frame sent (all threads)"),
                Unit::MicrosPerFrame,
                micros,
            ));
            Some(micros)
        }
        _ => None,
    };

    let raw = json!({
        "frame_bytes": size,
        "sent": sent.sent,
        "send_stalls": sent.stalls,
        "send_seconds": seconds,
        "received": tally.distinct,
        "duplicates": tally.duplicates,
        "truncated": tally.truncated,
        "delivered_fps": delivered,
        "drop_percent": drop,
        "switch_cpu_us_per_frame": cpu_per_frame,
    });
    Ok(Outcome { metrics, raw })
}

/// c: one sender broadcasts to `receivers` receivers.
fn broadcast_flood(
    switch: &Switch,
    settings: &Settings,
    size: usize,
    receivers: usize,
) -> Result<Outcome> {
    let ports = plug(switch, receivers + 1)?;
    let (sender, listeners) = ports.split_first().context("no ports")?;
    let token = next_token();
    let max_count = max_count(settings.duration);

    let stop = AtomicBool::new(false);
    let (sent, tallies) = thread::scope(|scope| {
        let receiving: Vec<_> = listeners
            .iter()
            .map(|listener| scope.spawn(|| receive(listener, token, 0, &stop)))
            .collect();
        let sent = {
            let _stop = StopOnDrop(&stop);
            flood(sender, MacAddress::BROADCAST, size, token, 0, settings.duration, max_count)
        };
        (sent, receiving.into_iter().map(join).collect::<Vec<_>>())
    });
    let sent = sent?;
    let tallies = tallies.into_iter().collect::<Result<Vec<_>>>()?;

    let seconds = sent.elapsed.as_secs_f64();
    let count = tallies.len() as f64;
    let delivered = tallies.iter().map(|t| t.distinct as f64 / seconds).sum::<f64>() / count;
    let drop = tallies.iter().map(|t| loss_percent(sent.sent, t.distinct)).sum::<f64>() / count;
    let title = format!("c. 64 B broadcast to {receivers} receivers");
    let metrics = vec![
        Metric::new(
            "c.fps".into(),
            format!("{title}: delivered frames/s per receiver"),
            Unit::Rate,
            delivered,
        ),
        Metric::new("c.drop".into(), format!("{title}: dropped per receiver"), Unit::Percent, drop),
    ];
    let raw = json!({
        "frame_bytes": size,
        "sent": sent.sent,
        "send_stalls": sent.stalls,
        "send_seconds": seconds,
        "received": tallies.iter().map(|t| t.distinct).collect::<Vec<_>>(),
        "duplicates": tallies.iter().map(|t| t.duplicates).collect::<Vec<_>>(),
        "delivered_fps_per_receiver": delivered,
        "drop_percent_per_receiver": drop,
    });
    Ok(Outcome { metrics, raw })
}

/// d: 64-byte unicast paced at each configured rate in turn.
fn paced_load(switch: &Switch, settings: &Settings) -> Result<Outcome> {
    let mut metrics = Vec::new();
    let mut raw = Vec::new();
    for &rate in &settings.rates {
        let ports = plug(switch, 2)?;
        let (sender, receiver) = (&ports[0], &ports[1]);
        let token = next_token();

        let stop = AtomicBool::new(false);
        let (sent, tally) = thread::scope(|scope| {
            let receiving = scope.spawn(|| receive(receiver, token, 0, &stop));
            let sent = {
                let _stop = StopOnDrop(&stop);
                paced(sender, receiver.mac, 64, token, rate, settings.duration)
            };
            (sent, join(receiving))
        });
        let sent = sent?;
        let tally = tally?;

        // Offered: every frame the sender tried to send, refused at the switch's door or not.
        let offered = sent.sent + sent.refused;
        let lost = offered.saturating_sub(tally.distinct);
        let percent = loss_percent(offered, tally.distinct);
        let achieved = offered as f64 / sent.elapsed.as_secs_f64();
        metrics.push(
            Metric::new(
                format!("d.{rate}.loss"),
                format!(
                    "d. 64 B unicast paced at {rate} frames/s: lost (refused + dropped) / offered"
                ),
                Unit::Percent,
                percent,
            )
            .with_count(lost),
        );
        let slots = offered + sent.skipped;
        metrics.push(
            Metric::new(
                format!("d.{rate}.skipped"),
                format!(
                    "d. paced at {rate} frames/s: slots the sender missed (preempted; not offered)"
                ),
                Unit::Percent,
                loss_percent(slots, offered),
            )
            .with_count(sent.skipped),
        );
        raw.push(json!({
            "rate": rate,
            "offered": offered,
            "refused_by_switch_queue": sent.refused,
            "accepted": sent.sent,
            "offered_rate": achieved,
            "late_by_an_interval_or_more": sent.late,
            "skipped_slots": sent.skipped,
            "max_late_us": sent.max_late.as_secs_f64() * 1e6,
            "received": tally.distinct,
            "duplicates": tally.duplicates,
            "lost": lost,
            "loss_percent": percent,
        }));
        drop(ports);
        if crate::interrupted() {
            break;
        }
    }
    Ok(Outcome { metrics, raw: serde_json::Value::Array(raw) })
}

/// e: one request at a time to a port that echoes it back.
fn round_trip(switch: &Switch, settings: &Settings) -> Result<Outcome> {
    let ports = plug(switch, 2)?;
    let (pinger, echo) = (&ports[0], &ports[1]);
    pinger.set_recv_timeout(Duration::from_millis(10))?;
    let token = next_token();

    let stop = AtomicBool::new(false);
    let (samples, lost, echo_result) = thread::scope(|scope| {
        let echoing = scope.spawn(|| echo_back(echo, token, &stop));
        let result = {
            let _stop = StopOnDrop(&stop);
            ping(pinger, echo.mac, token, settings)
        };
        let echo_result = echoing.join().unwrap_or_else(|_| Err(anyhow::anyhow!("echo panicked")));
        result.map(|(samples, lost)| (samples, lost, echo_result))
    })?;
    let echoed = echo_result?;

    let mut sorted = samples;
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        bail!("no round trip completed ({lost} requests lost)");
    }
    let median = percentile(&sorted, 50.0);
    let p99 = percentile(&sorted, 99.0);
    let metrics = vec![
        Metric::new(
            "e.median".into(),
            "e. round trip through the switch: median µs".into(),
            Unit::Micros,
            median,
        ),
        Metric::new(
            "e.p99".into(),
            "e. round trip through the switch: p99 µs".into(),
            Unit::Micros,
            p99,
        ),
    ];
    let raw = json!({
        "samples": sorted.len(),
        "lost": lost,
        "echoed": echoed,
        "median_us": median,
        "p99_us": p99,
        "min_us": sorted[0],
        "max_us": sorted[sorted.len() - 1],
    });
    Ok(Outcome { metrics, raw })
}

/// Plugs `count` ports into `switch` and makes the switch learn each one's MAC address.
fn plug(switch: &Switch, count: usize) -> Result<Vec<Port>> {
    let mut ports = Vec::with_capacity(count);
    for _ in 0..count {
        ports.push(Port::connect(&switch.ctl, next_mac())?);
    }

    for port in &ports {
        port.set_send_timeout(SEND_TIMEOUT)?;
        port.set_recv_timeout(QUIET)?;
        let mut hello = frame(MacAddress::BROADCAST, port.mac, 64);
        stamp(&mut hello, 0, HELLO_STREAM, 0);
        port.send(&hello).context("sending the hello frame")?;
    }

    // Give the switch time to forward the hellos, then throw them away.
    thread::sleep(Duration::from_millis(20));
    for port in &ports {
        port.drain();
    }
    Ok(ports)
}

/// What a sender did.
#[derive(Debug, Default)]
struct Sent {
    sent: u64,
    /// Sends that found the switch's queue full for [`SEND_TIMEOUT`].
    stalls: u64,
    /// From the first send to the end of the last.
    elapsed: Duration,
    /// Paced sends that left one to [`MAX_CATCH_UP`] intervals after their time.
    late: u64,
    /// The latest a paced send left, among those sent.
    max_late: Duration,
    /// Paced slots skipped because the sender woke more than [`MAX_CATCH_UP`] intervals late.
    skipped: u64,
    /// Paced frames the switch's socket refused because its queue was full; UML drops these.
    refused: u64,
}

/// Sends `size`-byte frames to `to` as fast as the switch takes them.
fn flood(
    port: &Port,
    to: MacAddress,
    size: usize,
    token: u32,
    stream: u32,
    duration: Duration,
    max_count: u64,
) -> Result<Sent> {
    let mut frame = frame(to, port.mac, size);
    let mut sent = Sent::default();
    let start = Instant::now();
    let mut sequence = 0u64;
    while sequence < max_count {
        // Reading the clock costs as much as a fifth of a send; every 16 frames is enough.
        if sequence % 16 == 0 && (start.elapsed() >= duration || crate::interrupted()) {
            break;
        }
        stamp(&mut frame, token, stream, sequence);
        send(port, &frame, &mut sent)?;
        sequence += 1;
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

/// Sends `size`-byte frames to `to` at `rate` frames per second for `duration`, without
/// waiting for room in the switch's queue, as a UML guest sends.
///
/// A sender that wakes a few slots late (preempted on a busy machine) catches up by sending
/// them back to back; one that wakes more than [`MAX_CATCH_UP`] slots late skips the slots it
/// missed instead, since a burst longer than `max_dgram_qlen` would be lost for reasons that have
/// nothing to do with the switch. Skipped slots are counted, not sent.
fn paced(
    port: &Port,
    to: MacAddress,
    size: usize,
    token: u32,
    rate: u64,
    duration: Duration,
) -> Result<Sent> {
    set_fine_timer_slack();
    let mut frame = frame(to, port.mac, size);
    let mut sent = Sent::default();
    let slots = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let slot_time = |slot: u64| Duration::from_nanos(slot * 1_000_000_000 / rate);
    let start = Instant::now();
    let hard_deadline = start + duration * 2;
    let mut slot = 0u64;
    while slot < slots {
        let due = start + slot_time(slot);
        let now = wait_until(due);
        if now >= hard_deadline || crate::interrupted() {
            break;
        }
        let late = now - due;
        let missed = (late.as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
        if missed > MAX_CATCH_UP {
            let missed = missed.min(slots - slot);
            sent.skipped += missed;
            slot += missed;
            continue;
        }
        if missed > 0 {
            sent.late += 1;
        }
        sent.max_late = sent.max_late.max(late);

        stamp(&mut frame, token, 0, slot);
        match port.send_or_drop(&frame) {
            Ok(()) => sent.sent += 1,
            Err(error) if is_timeout(&error) => sent.refused += 1,
            Err(error) => return Err(error).context("sending to the switch"),
        }
        slot += 1;
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

fn send(port: &Port, frame: &[u8], sent: &mut Sent) -> Result<()> {
    match port.send(frame) {
        Ok(()) => sent.sent += 1,
        Err(error) if is_timeout(&error) => sent.stalls += 1,
        Err(error) => return Err(error).context("sending to the switch"),
    }
    Ok(())
}

/// Sleeps until shortly before `due`, then spins until it; returns the time it woke.
fn wait_until(due: Instant) -> Instant {
    loop {
        let now = Instant::now();
        if now >= due {
            return now;
        }
        let left = due - now;
        if left > SPIN_WINDOW {
            thread::sleep(left - SPIN_WINDOW);
        } else {
            // Yield rather than spin: on two cores the switch and the receiver need this one
            // too, and sched_yield returns at once when nobody else wants it.
            thread::yield_now();
        }
    }
}

/// Sends request after request to `echo` and times each answer.
fn ping(port: &Port, echo: MacAddress, token: u32, settings: &Settings) -> Result<(Vec<f64>, u64)> {
    let mut request = frame(echo, port.mac, 64);
    let mut buffer = [0u8; RECEIVE_BUFFER];
    let mut samples = Vec::with_capacity(settings.rtt_samples);
    let mut lost = 0u64;
    let start = Instant::now();
    for sequence in 0..settings.rtt_samples as u64 * 2 {
        if samples.len() >= settings.rtt_samples
            || start.elapsed() >= settings.duration
            || crate::interrupted()
        {
            break;
        }
        stamp(&mut request, token, REQUEST_STREAM, sequence);
        let sent_at = Instant::now();
        let mut unused = Sent::default();
        send(port, &request, &mut unused)?;
        if unused.sent == 0 {
            lost += 1;
            continue;
        }

        // Wait for this request's answer; late answers to earlier ones are skipped.
        loop {
            let received = match port.recv(&mut buffer) {
                Ok(received) => Some(received),
                Err(error) if is_timeout(&error) => None,
                Err(error) => return Err(error).context("receiving an echo"),
            };
            let answer = received.and_then(|len| read_stamp(&buffer[..len]));
            if let Some(answer) = answer
                .filter(|s| s.token == token && s.stream == ANSWER_STREAM && s.sequence == sequence)
            {
                // The echo keeps the send time the request carried.
                let nanos = now_nanos().saturating_sub(answer.nanos);
                samples.push(nanos as f64 / 1e3);
                break;
            }
            if sent_at.elapsed() > ECHO_TIMEOUT {
                lost += 1;
                break;
            }
        }
    }
    Ok((samples, lost))
}

/// Sends every request of this measurement back to where it came from; returns how many.
fn echo_back(port: &Port, token: u32, stop: &AtomicBool) -> Result<u64> {
    let mut batch = ReceiveBatch::new();
    let mut answer = [0u8; RECEIVE_BUFFER];
    let mut echoed = 0u64;
    while !stop.load(Ordering::Acquire) {
        let received = match port.recv_batch(&mut batch) {
            Ok(received) => received,
            Err(error) if is_timeout(&error) => continue,
            Err(error) => return Err(error).context("receiving requests"),
        };
        for index in 0..received {
            let request = batch.frame(index);
            let Some(stamped) = read_stamp(request) else { continue };
            if stamped.token != token || stamped.stream != REQUEST_STREAM {
                continue;
            }
            let Ok(header) = Header::parse(request) else { continue };
            let answer = &mut answer[..request.len()];
            answer.copy_from_slice(request);
            Header { destination: header.source, source: port.mac, ethertype: ETHERTYPE }
                .emit(answer);
            set_stream(answer, ANSWER_STREAM);
            let mut unused = Sent::default();
            send(port, answer, &mut unused)?;
            echoed += unused.sent;
        }
    }
    Ok(echoed)
}

/// Counts the frames of stream `stream` until the sender has stopped and the queue is quiet.
fn receive(port: &Port, token: u32, stream: u32, stop: &AtomicBool) -> Result<Tally> {
    let mut batch = ReceiveBatch::new();
    let mut tally = Tally::default();
    let mut give_up: Option<Instant> = None;
    loop {
        let stopped = stop.load(Ordering::Acquire);
        match port.recv_batch(&mut batch) {
            Ok(received) => {
                for index in 0..received {
                    tally.record(batch.frame(index), token, stream);
                }
            }
            // Quiet for QUIET after the sender stopped (as seen before the wait began).
            Err(error) if is_timeout(&error) && stopped => break,
            Err(error) if is_timeout(&error) => {}
            Err(error) => return Err(error).context("receiving frames"),
        }
        if stopped {
            let give_up = *give_up.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
            if Instant::now() >= give_up {
                break;
            }
        }
    }
    Ok(tally)
}

/// Sets the flag when dropped, so receivers stop even if the sender fails or panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a receiver thread panicked")))
}

/// A locally administered unicast address no other measurement of this run uses, so no switch
/// can confuse a new port with an old one it still remembers.
fn next_mac() -> MacAddress {
    let number = NEXT_MAC.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let pid = std::process::id().to_be_bytes();
    MacAddress([0x02, pid[3], number[0], number[1], number[2], number[3]])
}

fn next_token() -> u32 {
    let number = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    number ^ std::process::id().rotate_left(16)
}

fn max_count(duration: Duration) -> u64 {
    (duration.as_secs_f64() * MAX_FRAMES_PER_SECOND as f64).ceil() as u64
}

fn loss_percent(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    sent.saturating_sub(received) as f64 * 100.0 / sent as f64
}

/// The `p`th percentile of `sorted` (nearest rank).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Lets this thread's sleeps end within a microsecond or so of their time instead of the
/// default 50 µs of timer slack. Affects only the calling thread.
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
