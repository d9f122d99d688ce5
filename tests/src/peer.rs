//! A peer made for tests: a real identity of the test's cluster, a real QUIC handshake with a
//! node, then only as much of the peer protocol as a test asks for.
//!
//! [`TestPeer`] says hello and names its networks like a node does, and after that sends the
//! datagrams the test gives it, byte for byte: whole frames for a network it was not given,
//! runts, fragments that do not add up, or bytes that are no datagram of the protocol at all.
//! It runs its QUIC endpoint on a runtime of its own and closes the connection on drop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use umnet_proto::peer::{Message, PROTOCOL_VERSION};

use crate::netns::Netns;

/// How long the handshake and the hello may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A peer under the test's control, connected to one node.
#[derive(Debug)]
pub struct TestPeer {
    connection: quinn::Connection,
    /// Kept open for the life of the peer, as a node keeps its announcement stream.
    _announcements: quinn::SendStream,
    endpoint: quinn::Endpoint,
    // Declared last: the runtime drives the endpoint until the fields above are gone.
    runtime: tokio::runtime::Runtime,
}

impl TestPeer {
    /// Connects from inside `netns` to the node `name` at `address` with the identity bundle
    /// at `identity`, says hello, and announces `nets`.
    pub fn connect(
        netns: &Netns,
        identity: &Path,
        name: &str,
        address: SocketAddr,
        nets: &[u32],
    ) -> Result<TestPeer> {
        let identity = umnet_certs::Identity::load(identity)
            .with_context(|| format!("loading {}", identity.display()))?;
        let tls = umnet_certs::client_config(&identity, Arc::new(umnet_certs::Revocations::new()))?;
        Self::connect_with(netns, tls, name, address, nets)
    }

    /// Connects as [`connect`](Self::connect) does, with a TLS configuration of the test's
    /// making: one that presents an expired certificate, or none at all.
    pub fn connect_with(
        netns: &Netns,
        tls: rustls::ClientConfig,
        name: &str,
        address: SocketAddr,
        nets: &[u32],
    ) -> Result<TestPeer> {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .context("the TLS configuration cannot carry QUIC")?;
        let client = quinn::ClientConfig::new(Arc::new(quic));
        let socket = netns.udp_socket("0.0.0.0:0")?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the test peer's runtime")?;
        let (endpoint, connection, stream) = runtime.block_on(async {
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .context("opening the test peer's endpoint")?;
            let connecting = endpoint.connect_with(client, address, name)?;
            let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .context("no handshake within the timeout")?
                .with_context(|| format!("handshake with {name} at {address}"))?;

            let mut stream = connection.open_uni().await?;
            let hello = Message::Hello { version: PROTOCOL_VERSION, instance: 1 };
            stream.write_all(&hello.encode()).await?;
            stream.write_all(&Message::Networks { nets: nets.to_vec() }.encode()).await?;
            anyhow::Ok((endpoint, connection, stream))
        })?;
        Ok(TestPeer { connection, _announcements: stream, endpoint, runtime })
    }

    /// Sends `bytes` as one QUIC datagram.
    pub fn send_datagram(&self, bytes: &[u8]) -> Result<()> {
        let _entered = self.runtime.enter();
        self.connection
            .send_datagram(bytes.to_vec().into())
            .context("sending a datagram from the test peer")
    }

    /// Why the node closed the connection, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.connection.close_reason().map(|reason| reason.to_string())
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.connection.close(0u32.into(), b"test over");
        self.endpoint.close(0u32.into(), b"test over");
        let endpoint = self.endpoint.clone();
        let _ = self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await
        });
    }
}
