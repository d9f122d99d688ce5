//! The control socket of a network: where UML's daemon transport and libvdeplug clients ask
//! for a port.
//!
//! Each accepted connection must send one version-3 request within [`HANDSHAKE_TIMEOUT`].
//! The node then makes a datagram socket for the port, bound to an abstract address and
//! connected to the client's, and replies with its address. Frames for the client leave
//! through that socket, and frames from it arrive there and nowhere else, so the port of a
//! frame is the socket it came in on. The control connection stays open for the life of the
//! port: when the client closes it, the port goes.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use umnet_proto::admin::{NetworkId, PortKind};
use umnet_proto::daemon::{Request, RequestError, UnixAddress, MAX_REQUEST_LEN, MIN_REQUEST_LEN};

use crate::node::Node;
use crate::rejects::RejectCounters;
use crate::switch::{Command, Link, NewPort, PortId};
use crate::sys;

/// How long a client has to send its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before accepting again after `accept` failed (descriptors exhausted).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts control connections of network `net` until the task is aborted.
pub(crate) async fn serve(node: Arc<Node>, net: NetworkId, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(node.clone(), net, stream));
            }
            Err(error) => {
                tracing::warn!(net, %error, "cannot accept a control connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Why a control connection was refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("sent {0} bytes and then nothing for {HANDSHAKE_TIMEOUT:?}")]
    Stalled(usize),
    #[error("sent no request within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("client data socket {address} is owned by uid {owner}, not by the client (uid {uid})")]
    NotOwner { address: UnixAddress, owner: u32, uid: u32 },
    #[error("cannot reach the client's data socket {address}: {error}")]
    Unreachable { address: UnixAddress, error: std::io::Error },
    #[error("the switch did not take the port (see the warning before)")]
    NotAttached,
    #[error("control connection failed: {0}")]
    Io(#[from] std::io::Error),
}

impl Refusal {
    fn count(&self, rejects: &RejectCounters) {
        let counter = match self {
            Refusal::Request(RequestError::BadMagic(_)) => &rejects.bad_magic,
            Refusal::Request(RequestError::UnsupportedVersion(_)) => &rejects.bad_version,
            Refusal::Request(RequestError::Truncated { .. }) | Refusal::Stalled(_) => {
                &rejects.truncated
            }
            Refusal::Timeout => &rejects.timeout,
            Refusal::NotOwner { .. } | Refusal::Unreachable { .. } => &rejects.unreachable,
            Refusal::Request(_) | Refusal::Io(_) => &rejects.malformed,
            // Counted by the switch, which knows why.
            Refusal::NotAttached => return,
        };
        RejectCounters::count(counter);
    }
}

async fn connection(node: Arc<Node>, net: NetworkId, mut stream: UnixStream) {
    let credentials = sys::peer_credentials(stream.as_raw_fd());
    let pid = credentials.map(|(pid, _)| pid);
    let id = node.switch.next_port_id();
    let closed = node.control_connection(id);
    let attached = match handshake(&node, net, id, credentials, &mut stream).await {
        Ok(()) => true,
        Err(refusal) => {
            refusal.count(&node.rejects);
            tracing::warn!(net, pid, reason = %refusal, "control connection refused");
            false
        }
    };
    let removed_by_node = attached && watch(&mut stream, closed).await;
    node.control_closed(id);
    if attached && !removed_by_node {
        node.switch.send(Command::RemovePort { port: id, reply: None });
    }
}

/// Reads the request, makes the port's data socket, attaches the port and replies. The reply
/// goes out only once the switch forwards to the port, so no frame for the client is lost in
/// between.
async fn handshake(
    node: &Node,
    net: NetworkId,
    id: PortId,
    credentials: Option<(u32, u32)>,
    stream: &mut UnixStream,
) -> Result<(), Refusal> {
    let request = read_request(stream).await?;
    if let (Some(path), Some((_, uid))) = (request.address.as_path_bytes(), credentials) {
        check_owner(path, uid, &request.address)?;
    }
    let (fd, ours) = data_socket(net, id, &request.address)?;

    let (kind, client) = if request.address.is_abstract() {
        (PortKind::Uml, "UML daemon transport".to_string())
    } else {
        (PortKind::Vde, request.description.clone())
    };
    let pid = credentials.map(|(pid, _)| pid);
    let port = NewPort { id, kind, net, client, pid, link: Link::Socket(fd) };
    let attached = node.switch.ask(|reply| Command::AddPort { port, attached: Some(reply) });
    if !attached.await.unwrap_or(false) {
        return Err(Refusal::NotAttached);
    }

    if let Err(error) = stream.write_all(&ours.to_bytes()).await {
        node.switch.send(Command::RemovePort { port: id, reply: None });
        return Err(error.into());
    }
    Ok(())
}

/// Reads one request, refusing early what cannot become one.
async fn read_request(stream: &mut UnixStream) -> Result<Request, Refusal> {
    let mut buffer = [0u8; MAX_REQUEST_LEN];
    let mut len = 0;
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    while len < MIN_REQUEST_LEN {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer[len..])).await;
        match read {
            Err(_) if len == 0 => return Err(Refusal::Timeout),
            Err(_) => return Err(Refusal::Stalled(len)),
            Ok(Err(error)) => return Err(Refusal::Io(error)),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => len += n,
        }
        // A wrong magic or version shows in the first bytes; don't wait for the rest.
        match Request::parse(&buffer[..len]) {
            Err(RequestError::Truncated { .. }) => {}
            Err(error) => return Err(error.into()),
            Ok(_) => break,
        }
    }

    // A libvdeplug client writes its description in the same write as the request; take
    // whatever of it has arrived.
    while len < buffer.len() {
        match stream.try_read(&mut buffer[len..]) {
            Ok(n) if n > 0 => len += n,
            _ => break,
        }
    }
    Ok(Request::parse(&buffer[..len])?)
}

/// A client could name any socket as its own and have the node, which may run as root, send
/// frames there. vde_switch checks the client may access the path; umnet requires that the
/// client owns it, or is root.
fn check_owner(path: &[u8], uid: u32, address: &UnixAddress) -> Result<(), Refusal> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
    let owner = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata.uid(),
        Err(error) => return Err(Refusal::Unreachable { address: *address, error }),
    };
    if uid != 0 && owner != uid {
        return Err(Refusal::NotOwner { address: *address, owner, uid });
    }
    Ok(())
}

/// The port's datagram socket: bound to an abstract name unique to this node and port, and
/// connected to the client's socket, so the kernel delivers only the client's frames to it.
fn data_socket(
    net: NetworkId,
    id: PortId,
    client: &UnixAddress,
) -> Result<(OwnedFd, UnixAddress), Refusal> {
    let name = format!("umnet/{}/{net}/{id}", std::process::id());
    let ours = UnixAddress::abstract_name(name.as_bytes())
        .ok_or_else(|| Refusal::Io(std::io::Error::other("data socket name too long")))?;
    let fd = sys::unix_socket(libc::SOCK_DGRAM)?;
    sys::bind_full(&fd, &ours)?;
    sys::connect_full(&fd, client)
        .map_err(|error| Refusal::Unreachable { address: *client, error })?;
    Ok((fd, ours))
}

/// Waits until the client closes its control connection (returns false) or the node removes
/// the port (returns true). Bytes a client sends after its request mean nothing and are
/// discarded.
async fn watch(stream: &mut UnixStream, closed: tokio::sync::oneshot::Receiver<()>) -> bool {
    let mut sink = [0u8; 256];
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = &mut closed => return true,
            read = stream.read(&mut sink) => match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => tracing::debug!(bytes = n, "ignoring bytes after the control request"),
            },
        }
    }
}
