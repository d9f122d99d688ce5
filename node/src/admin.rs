//! The admin socket: the CLI's way into a running node.
//!
//! Each connection carries request lines and response lines of the
//! [`umnet_proto::admin`] protocol. A line that does not decode is answered with an error,
//! counted, logged, and ends the connection; nothing else about the node changes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use umnet_proto::admin::{self, ErrorKind, Request, Response, MAX_LINE_LEN};

use crate::node::Node;
use crate::rejects::RejectCounters;

/// How long a connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Most admin connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

/// Serves admin connections until the task is aborted.
pub(crate) async fn serve(node: Arc<Node>, listener: UnixListener) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    connection(node, stream).await;
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot accept an admin connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(node: Arc<Node>, stream: UnixStream) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut line = Vec::new();
        let limited = (&mut reader).take(MAX_LINE_LEN as u64 + 1);
        let read = tokio::time::timeout(IDLE_TIMEOUT, read_line(limited, &mut line)).await;
        match read {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "admin connection failed");
                return;
            }
        }

        if let Ok(admin::Request::Capture { net, port }) = decode(&line) {
            // The connection carries the capture from now on.
            tracing::debug!(net, ?port, "admin request: capture");
            crate::capture::serve(&node, net, port, writer).await;
            return;
        }
        let (response, keep_open) = match decode(&line) {
            Ok(request) => {
                tracing::debug!(?request, "admin request");
                match node.handle(request).await {
                    Ok(reply) => (Response::Ok(reply), true),
                    Err(error) => (Response::Error(error), true),
                }
            }
            Err(error) => {
                RejectCounters::count(&node.rejects.admin_bad_request);
                tracing::warn!(reason = %error.message, "admin request refused");
                (Response::Error(error), false)
            }
        };

        let mut text = match serde_json::to_vec(&response) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "cannot encode an admin response");
                return;
            }
        };
        text.push(b'\n');
        if writer.write_all(&text).await.is_err() || !keep_open {
            return;
        }
    }
}

async fn read_line(
    mut reader: tokio::io::Take<&mut BufReader<tokio::net::unix::OwnedReadHalf>>,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    reader.read_until(b'\n', line).await
}

fn decode(line: &[u8]) -> Result<Request, admin::Error> {
    if line.len() > MAX_LINE_LEN {
        return Err(admin::Error::new(
            ErrorKind::BadRequest,
            format!("request longer than {MAX_LINE_LEN} bytes"),
        ));
    }
    if !line.ends_with(b"\n") {
        return Err(admin::Error::new(ErrorKind::BadRequest, "request line not terminated"));
    }
    serde_json::from_slice(line).map_err(|error| {
        admin::Error::new(ErrorKind::BadRequest, format!("not an admin request: {error}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_complete_known_requests() {
        assert_eq!(decode(b"{\"command\":\"status\"}\n").unwrap(), Request::Status);
        for bad in [&b"{\"command\":\"status\"}"[..], b"\x00\x01garbage\n", b"{}\n"] {
            assert_eq!(decode(bad).unwrap_err().kind, ErrorKind::BadRequest);
        }
        let long = vec![b' '; MAX_LINE_LEN + 1];
        assert!(decode(&long).unwrap_err().message.contains("longer"));
    }
}
