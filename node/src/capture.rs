//! `umnet capture`: the node's side streams a network's frames over the admin connection that
//! asked for them, and the CLI's side writes them as pcap.
//!
//! The switch copies frames into a bounded channel with `try_send` and counts what does not
//! fit, so a reader that falls behind (a slow disk, a paused `tcpdump`) costs the switch a copy
//! per frame and never a wait. The stream carries those counts every second, and the CLI
//! reports them when it stops.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use umnet_proto::admin::{self, NetworkId, Response};
use umnet_proto::capture::{pcap_header, pcap_record, since_epoch, Record, MAX_FRAME};

use crate::node::Node;
use crate::switch::{Capture, CaptureCounters, Command};

/// Frames a capture may hold for its reader before the switch drops them.
const BACKLOG: usize = 4096;

/// How often the node tells the reader how the capture is going.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Serves a capture request on an admin connection: answers it, then streams records until the
/// client goes away.
pub(crate) async fn serve(
    node: &Node,
    net: NetworkId,
    port: Option<String>,
    mut writer: OwnedWriteHalf,
) {
    let started = node.start_capture(net, port.as_deref(), BACKLOG).await;
    let response = match &started {
        Ok(_) => Response::Ok(admin::Reply::Done),
        Err(error) => Response::Error(error.clone()),
    };
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    if writer.write_all(&line).await.is_err() {
        return;
    }
    let Ok((mut frames, counters)) = started else { return };

    let mut stats = tokio::time::interval(STATS_INTERVAL);
    let mut record = Vec::new();
    loop {
        record.clear();
        tokio::select! {
            frame = frames.recv() => {
                let Some((time, frame)) = frame else { break };
                Record::Frame { time: since_epoch(time), frame }.encode(&mut record);
            }
            _ = stats.tick() => stats_record(&counters).encode(&mut record),
        }
        if writer.write_all(&record).await.is_err() {
            break;
        }
    }
    tracing::info!(
        net,
        captured = counters.captured.load(Ordering::Relaxed),
        dropped = counters.dropped.load(Ordering::Relaxed),
        "capture ended"
    );
}

fn stats_record(counters: &CaptureCounters) -> Record {
    Record::Stats {
        captured: counters.captured.load(Ordering::Relaxed),
        dropped: counters.dropped.load(Ordering::Relaxed),
    }
}

impl Node {
    /// Asks the switch for a capture of `net`, or of `port` on it.
    async fn start_capture(
        &self,
        net: NetworkId,
        port: Option<&str>,
        backlog: usize,
    ) -> Result<(tokio::sync::mpsc::Receiver<CapturedFrame>, Arc<CaptureCounters>), admin::Error>
    {
        let networks = self.switch.ask(|reply| Command::Networks { reply }).await?;
        if !networks.iter().any(|n| n.id == net) {
            return Err(admin::Error::new(admin::ErrorKind::NotFound, format!("no network {net}")));
        }
        let port = port.map(|port| self.resolve_port(port)).transpose()?;
        let (frames, receiver) = tokio::sync::mpsc::channel(backlog);
        let counters = Arc::new(CaptureCounters::default());
        let capture = Capture { net, port, frames, counters: counters.clone() };
        self.switch.send(Command::Capture(capture));
        Ok((receiver, counters))
    }
}

type CapturedFrame = (std::time::SystemTime, Vec<u8>);

/// When a CLI capture stops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) count: Option<u64>,
    pub(crate) duration: Option<Duration>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// The CLI's side: asks the node at `run_dir` for a capture and writes pcap to `out` until
/// `limits` are reached, the node goes away, or the user interrupts. Returns the frames written.
pub(crate) fn record(
    run_dir: &Path,
    net: NetworkId,
    port: Option<String>,
    out: &mut dyn Write,
    limits: Limits,
) -> anyhow::Result<u64> {
    let path = run_dir.join(admin::SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no node is running with run directory {} (start one with `umnet node`)",
            run_dir.display()
        )
    })?;
    let mut request = serde_json::to_vec(&admin::Request::Capture { net, port })?;
    request.push(b'\n');
    stream.write_all(&request)?;

    // Step 1: the response line.
    let mut pending = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let line_end = loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            break end;
        }
        let n = stream.read(&mut buffer).context("reading the node's answer")?;
        if n == 0 {
            bail!("the node closed the connection without answering");
        }
        pending.extend_from_slice(&buffer[..n]);
    };
    match serde_json::from_slice::<Response>(&pending[..line_end])? {
        Response::Ok(_) => {}
        Response::Error(error) => return Err(anyhow::Error::new(error)),
    }
    pending.drain(..=line_end);

    // Step 2: records, until a limit, the end of the stream, or Ctrl-C.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, interrupted as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, interrupted as *const () as libc::sighandler_t);
    }
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    out.write_all(&pcap_header(MAX_FRAME as u32))?;
    let started = Instant::now();
    let (mut written, mut last) = (0u64, (0u64, 0u64));
    let mut pcap = Vec::new();
    'stream: loop {
        while let Some((record, used)) = Record::decode(&pending)? {
            pending.drain(..used);
            match record {
                Record::Frame { time, frame } => {
                    pcap.clear();
                    pcap_record(time, &frame, &mut pcap);
                    out.write_all(&pcap)?;
                    written += 1;
                    if limits.count.is_some_and(|count| written >= count) {
                        break 'stream;
                    }
                }
                Record::Stats { captured, dropped } => last = (captured, dropped),
            }
        }
        out.flush()?;
        if INTERRUPTED.load(Ordering::Relaxed)
            || limits.duration.is_some_and(|limit| started.elapsed() >= limit)
        {
            break;
        }
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buffer[..n]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error).context("reading the capture"),
        }
    }
    out.flush()?;
    eprintln!(
        "umnet: {written} frames written; the node captured {} and dropped {} the reader \
         was too slow for",
        last.0, last.1
    );
    Ok(written)
}
