//! The opt-in Prometheus endpoint (`metrics_listen` in the config): `GET /metrics` answers
//! with every network's, port's and peer's counters in the OpenMetrics text format, which
//! Prometheus scrapes as it does its own.
//!
//! Nothing is kept between scrapes: each one asks the switch and the peers for their counters
//! and encodes them with `prometheus-client`, so the frame path pays nothing for metrics. The
//! HTTP side is the least a scraper needs: one request per connection, a bounded request
//! head, a timeout, and at most [`MAX_CONNECTIONS`] scrapes at once.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use umnet_proto::admin::{self, Reply, Request};

use crate::node::Node;

/// Scrapes served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 8;

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes until the task is aborted.
pub(crate) async fn serve(node: Arc<Node>, listener: TcpListener) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(error) = scrape(&node, stream).await {
                        tracing::debug!(%error, "metrics request failed");
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn scrape(node: &Arc<Node>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        std::io::Result::Ok(())
    });
    if read.await.is_err() {
        return respond(&mut stream, "408 Request Timeout", "text/plain", "too slow\n").await;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    if method != b"GET" {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", "GET only\n").await;
    }
    if path != b"/metrics" {
        return respond(&mut stream, "404 Not Found", "text/plain", "see /metrics\n").await;
    }
    match gather(node).await {
        Ok(text) => {
            let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            respond(&mut stream, "200 OK", kind, &text).await
        }
        Err(error) => {
            let body = format!("{}\n", error.message);
            respond(&mut stream, "500 Internal Server Error", "text/plain", &body).await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let length = body.len();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    port: String,
    kind: String,
    net: String,
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortDropLabels {
    port: String,
    kind: String,
    net: String,
    client: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NetworkLabels {
    net: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDropLabels {
    peer: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Registers a family of counters or gauges called `name` and returns it for filling.
fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let family = Family::<L, M>::default();
    registry.register(name, help, family.clone());
    family
}

/// Every counter of the node, as OpenMetrics text.
async fn gather(node: &Arc<Node>) -> Result<String, admin::Error> {
    let mut registry = Registry::with_prefix("umnet");

    // Ports.
    let Reply::Ports(ports) = node.handle(Request::PortList).await? else {
        return Err(admin::Error::new(admin::ErrorKind::Internal, "unexpected port reply"));
    };
    let port_frames: Family<PortLabels, Counter> =
        family(&mut registry, "port_received_frames", "Frames received from the port's client");
    let port_bytes: Family<PortLabels, Counter> =
        family(&mut registry, "port_received_bytes", "Bytes received from the port's client");
    let port_sent: Family<PortLabels, Counter> =
        family(&mut registry, "port_sent_frames", "Frames delivered to the port's client");
    let port_sent_bytes: Family<PortLabels, Counter> =
        family(&mut registry, "port_sent_bytes", "Bytes delivered to the port's client");
    let port_drops: Family<PortDropLabels, Counter> =
        family(&mut registry, "port_dropped_frames", "Frames dropped at the port, by reason");
    for port in &ports {
        let labels = PortLabels {
            port: port.id.to_string(),
            kind: port.kind.to_string(),
            net: port.net.to_string(),
            client: port.client.clone(),
        };
        let c = &port.counters;
        port_frames.get_or_create(&labels).inc_by(c.rx_frames);
        port_bytes.get_or_create(&labels).inc_by(c.rx_bytes);
        port_sent.get_or_create(&labels).inc_by(c.tx_frames);
        port_sent_bytes.get_or_create(&labels).inc_by(c.tx_bytes);
        let d = &c.drops;
        for (reason, count) in [
            ("runt", d.runt),
            ("oversize", d.oversize),
            ("bad-source", d.bad_source),
            ("queue-full", d.queue_full),
            ("send-error", d.send_error),
            ("standby", d.standby),
            ("bad-beacon", d.bad_beacon),
        ] {
            let labels = PortDropLabels {
                port: labels.port.clone(),
                kind: labels.kind.clone(),
                net: labels.net.clone(),
                client: labels.client.clone(),
                reason: reason.to_string(),
            };
            port_drops.get_or_create(&labels).inc_by(count);
        }
    }

    // Networks.
    let Reply::Networks(networks) = node.handle(Request::NetList).await? else {
        return Err(admin::Error::new(admin::ErrorKind::Internal, "unexpected network reply"));
    };
    let net_ports: Family<NetworkLabels, Gauge> =
        family(&mut registry, "network_ports", "Ports attached to the network");
    let net_macs: Family<NetworkLabels, Gauge> =
        family(&mut registry, "network_macs", "MAC addresses in the network's table");
    let net_limit: Family<NetworkLabels, Counter> = family(
        &mut registry,
        "network_mac_limit_hits",
        "Sources not learned because the MAC table was full",
    );
    let net_flaps: Family<NetworkLabels, Counter> = family(
        &mut registry,
        "network_mac_flaps",
        "Moves of an address seen alternately on two ports",
    );
    for network in &networks {
        let labels = NetworkLabels { net: network.id.to_string() };
        net_ports.get_or_create(&labels).set(network.ports as i64);
        net_macs.get_or_create(&labels).set(network.macs as i64);
        net_limit.get_or_create(&labels).inc_by(network.mac_limit_hits);
        net_flaps.get_or_create(&labels).inc_by(network.mac_flaps);
    }

    // Peers, when the node has any.
    if let Ok(Reply::Peers(peers)) = node.handle(Request::PeerList).await {
        let up: Family<PeerLabels, Gauge> =
            family(&mut registry, "peer_connected", "1 while the peer is connected");
        let rtt: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>> =
            family(&mut registry, "peer_rtt_seconds", "Round-trip time to the peer");
        let received: Family<PeerLabels, Counter> =
            family(&mut registry, "peer_received_frames", "Frames received from the peer");
        let received_bytes: Family<PeerLabels, Counter> =
            family(&mut registry, "peer_received_bytes", "Bytes received from the peer");
        let sent: Family<PeerLabels, Counter> =
            family(&mut registry, "peer_sent_frames", "Frames sent to the peer");
        let sent_bytes: Family<PeerLabels, Counter> =
            family(&mut registry, "peer_sent_bytes", "Bytes sent to the peer");
        let drops: Family<PeerDropLabels, Counter> =
            family(&mut registry, "peer_dropped_frames", "Peer traffic dropped, by reason");
        for peer in &peers {
            let labels = PeerLabels { peer: peer.name.clone() };
            let connected = peer.state == admin::PeerState::Connected;
            up.get_or_create(&labels).set(i64::from(connected));
            if let Some(us) = peer.rtt_us {
                rtt.get_or_create(&labels).set(us as f64 / 1e6);
            }
            let c = &peer.counters;
            received.get_or_create(&labels).inc_by(c.rx_frames);
            received_bytes.get_or_create(&labels).inc_by(c.rx_bytes);
            sent.get_or_create(&labels).inc_by(c.tx_frames);
            sent_bytes.get_or_create(&labels).inc_by(c.tx_bytes);
            for (reason, count) in [
                ("malformed", c.malformed),
                ("not-allowed", c.not_allowed),
                ("reassembly", c.reassembly),
                ("send-failed", c.send_failed),
            ] {
                let labels = PeerDropLabels { peer: peer.name.clone(), reason: reason.into() };
                drops.get_or_create(&labels).inc_by(count);
            }
        }
    }

    // Refusals.
    let refused: Family<ReasonLabels, Counter> =
        family(&mut registry, "refused", "Clients and requests the node refused, by reason");
    let r = node.rejects.snapshot();
    for (reason, count) in [
        ("bad-magic", r.bad_magic),
        ("bad-version", r.bad_version),
        ("truncated", r.truncated),
        ("timeout", r.timeout),
        ("malformed", r.malformed),
        ("unreachable", r.unreachable),
        ("too-many-ports", r.too_many_ports),
        ("admin-bad-request", r.admin_bad_request),
        ("guest-malformed", r.guest_malformed),
        ("guest-refused", r.guest_refused),
        ("guest-forged", r.guest_forged),
    ] {
        refused.get_or_create(&ReasonLabels { reason: reason.into() }).inc_by(count);
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|_| admin::Error::new(admin::ErrorKind::Internal, "cannot encode metrics"))?;
    Ok(text)
}
