//! A scriptable client of the daemon transport, for the tests that need to send what no UML
//! guest would: runts, oversize datagrams, floods of random source addresses, broken control
//! requests.
//!
//! [`DaemonClient`] plugs in as UML does: a control stream held open, a datagram socket bound
//! to an abstract address with the full `sockaddr_un` length, and `sendto` the address the
//! switch replied with.

use std::io::{Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umnet_proto::daemon::{Request, RequestKind, UnixAddress, SOCKADDR_UN_LEN};

static NEXT_CLIENT: AtomicU32 = AtomicU32::new(1);

/// One port of a node, driven by the test.
#[derive(Debug)]
pub struct DaemonClient {
    _control: UnixStream,
    data: OwnedFd,
    switch: UnixAddress,
}

fn sockaddr(address: &UnixAddress) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut raw: libc::sockaddr_un = unsafe { mem::zeroed() };
    raw.sun_family = address.family as libc::sa_family_t;
    for (dst, src) in raw.sun_path.iter_mut().zip(address.path.iter()) {
        *dst = *src as libc::c_char;
    }
    raw
}

impl DaemonClient {
    /// Plugs into the control socket `ctl`.
    pub fn connect(ctl: &Path) -> Result<DaemonClient> {
        let mut control =
            UnixStream::connect(ctl).with_context(|| format!("connecting to {}", ctl.display()))?;
        let name = format!(
            "umnet-test-client/{}/{}",
            std::process::id(),
            NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)
        );
        let Some(address) = UnixAddress::abstract_name(name.as_bytes()) else {
            bail!("client name too long");
        };

        // SAFETY: socket(2) has no memory arguments; the result is a fresh descriptor.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("creating the data socket");
        }
        // SAFETY: fd is fresh and owned by nobody else.
        let data = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = sockaddr(&address);
        // SAFETY: raw is a valid sockaddr_un and the length is its full size, as UML binds.
        let ret = unsafe {
            libc::bind(
                data.as_raw_fd(),
                &raw as *const libc::sockaddr_un as *const libc::sockaddr,
                SOCKADDR_UN_LEN as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error()).context("binding the data socket");
        }

        let request = Request {
            kind: RequestKind::NewControl,
            requested_port: 0,
            address,
            description: String::new(),
        };
        control.write_all(&request.to_uml_bytes())?;
        control.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = [0u8; SOCKADDR_UN_LEN];
        control.read_exact(&mut reply).context("reading the node's reply")?;
        let client =
            DaemonClient { _control: control, data, switch: UnixAddress::from_bytes(&reply) };
        client.set_timeout(Duration::from_millis(500))?;
        Ok(client)
    }

    /// How long [`recv`](Self::recv) waits, and a blocked send may wait.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        let value = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: value outlives the call and the length matches its type.
            let ret = unsafe {
                libc::setsockopt(
                    self.data.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    &value as *const libc::timeval as *const libc::c_void,
                    mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if ret < 0 {
                return Err(std::io::Error::last_os_error()).context("setting a socket timeout");
            }
        }
        Ok(())
    }

    /// Sends one datagram to the node, whatever it holds.
    pub fn send(&self, datagram: &[u8]) -> Result<()> {
        let raw = sockaddr(&self.switch);
        // SAFETY: datagram is valid for its length; raw is a valid sockaddr_un passed with its
        // full size, as UML sends.
        let ret = unsafe {
            libc::sendto(
                self.data.as_raw_fd(),
                datagram.as_ptr() as *const libc::c_void,
                datagram.len(),
                0,
                &raw as *const libc::sockaddr_un as *const libc::sockaddr,
                SOCKADDR_UN_LEN as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error()).context("sending to the node");
        }
        Ok(())
    }

    /// Receives one datagram, or `None` when nothing came within the timeout.
    pub fn recv(&self) -> Result<Option<Vec<u8>>> {
        let mut buffer = vec![0u8; 65_536];
        // SAFETY: buffer is valid for writes of its length.
        let ret = unsafe {
            libc::recv(
                self.data.as_raw_fd(),
                buffer.as_mut_ptr() as *mut libc::c_void,
                buffer.len(),
                0,
            )
        };
        if ret < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(error).context("receiving from the node");
        }
        buffer.truncate(ret as usize);
        Ok(Some(buffer))
    }

    /// Receives until a datagram satisfies `wanted` or `attempts` receives came back empty.
    pub fn recv_matching(
        &self,
        attempts: usize,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let mut empty = 0;
        while empty < attempts {
            match self.recv()? {
                Some(frame) if wanted(&frame) => return Ok(Some(frame)),
                Some(_) => {}
                None => empty += 1,
            }
        }
        Ok(None)
    }
}

/// An Ethernet frame: destination, source, EtherType and payload.
pub fn frame(destination: [u8; 6], source: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A broadcast ARP request from `source` (`sender_ip`) asking who has `target_ip`.
pub fn arp_request(source: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut payload = vec![0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01];
    payload.extend_from_slice(&source);
    payload.extend_from_slice(&sender_ip);
    payload.extend_from_slice(&[0; 6]);
    payload.extend_from_slice(&target_ip);
    payload.resize(46, 0);
    frame([0xff; 6], source, 0x0806, &payload)
}

/// Whether `frame` is an ARP reply from `sender_ip`.
pub fn is_arp_reply_from(frame: &[u8], sender_ip: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0x00, 0x02]
        && frame[28..32] == sender_ip
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn mac_bytes(text: &str) -> Result<[u8; 6]> {
    let mac: umnet_proto::ethernet::MacAddress =
        text.trim().parse().with_context(|| format!("not a MAC address: {text:?}"))?;
    Ok(mac.0)
}
