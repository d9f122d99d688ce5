//! A client of UML's daemon transport that behaves on the wire as UML's `daemon_user.c` does.
//!
//! One [`Port`] is one guest interface plugged into a switch: a `SOCK_STREAM` control connection
//! that stays open (closing it removes the port) and a `SOCK_DGRAM` data socket bound to an
//! abstract address of the full `sockaddr_un` length. Frames leave by unconnected `sendto` to the
//! address the switch replied with, again with the full 110-byte length, one frame per datagram.
//!
//! Where this client departs from UML, it does so on purpose and only in what a benchmark needs:
//! floods use blocking sends (with a timeout) instead of dropping on `EAGAIN`, so that "sent"
//! counts frames the switch's socket accepted ([`Port::send`]; [`Port::send_or_drop`] is UML's
//! way), and receives drain with `recvmmsg`.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umnet_proto::daemon::{Request, RequestKind, UnixAddress, AF_UNIX, SOCKADDR_UN_LEN};
use umnet_proto::ethernet::MacAddress;

/// Frames larger than this never cross the daemon transport; the extra room shows truncation.
pub(crate) const RECEIVE_BUFFER: usize = 2048;

/// How many datagrams one `recvmmsg` call takes at most.
pub(crate) const BATCH: usize = 64;

/// How long the switch may take to answer the control request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Numbers the ports of this process, so that every data socket gets its own address.
static NEXT_PORT: AtomicU32 = AtomicU32::new(1);

/// One interface plugged into a switch.
#[derive(Debug)]
pub(crate) struct Port {
    /// Held open for the life of the port: the switch removes the port on EOF.
    _control: UnixStream,
    data: OwnedFd,
    switch: libc::sockaddr_un,
    /// The source MAC address this port sends with.
    pub(crate) mac: MacAddress,
}

impl Port {
    /// Plugs a new interface with address `mac` into the switch whose control socket is `ctl`.
    pub(crate) fn connect(ctl: &Path, mac: MacAddress) -> Result<Port> {
        // UML connects the control stream first, then binds its data socket (daemon_user.c).
        let mut control = connect_control(ctl, REPLY_TIMEOUT)
            .with_context(|| format!("connecting to control socket {}", ctl.display()))?;
        let address = uml_like_address(NEXT_PORT.fetch_add(1, Ordering::Relaxed));
        let data = bind_data_socket(&address).context("binding the data socket")?;

        let request = Request {
            kind: RequestKind::NewControl,
            requested_port: 0,
            address,
            description: String::new(),
        };
        control.write_all(&request.to_uml_bytes()).context("writing the control request")?;

        // UML reads exactly one sockaddr_un; anything shorter fails the device.
        control.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut reply = [0u8; SOCKADDR_UN_LEN];
        control.read_exact(&mut reply).context("reading the switch's data address")?;
        let switch_address = UnixAddress::from_bytes(&reply);
        if switch_address.family != AF_UNIX || switch_address.is_empty() {
            bail!("the switch replied with an unusable data address {switch_address}");
        }

        Ok(Port { _control: control, data, switch: to_sockaddr(&switch_address), mac })
    }

    /// Sends one frame to the switch. Blocks while the switch's socket queue is full, up to the
    /// send timeout, after which the error is `WouldBlock`.
    pub(crate) fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.send_with_flags(frame, 0)
    }

    /// Sends one frame to the switch as UML does: if the switch's queue is full the error is
    /// `WouldBlock` at once, and UML would have dropped the frame.
    pub(crate) fn send_or_drop(&self, frame: &[u8]) -> io::Result<()> {
        self.send_with_flags(frame, libc::MSG_DONTWAIT)
    }

    fn send_with_flags(&self, frame: &[u8], flags: libc::c_int) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length; `self.switch` is a live, initialised
        // sockaddr_un and the length passed is its size, as UML passes it.
        let sent = unsafe {
            libc::sendto(
                self.data.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                flags,
                (&self.switch as *const libc::sockaddr_un).cast(),
                SOCKADDR_UN_LEN as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame into `buffer`, waiting up to the receive timeout.
    pub(crate) fn recv(&self, buffer: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buffer` is valid for writes of its length.
        let received = unsafe {
            libc::recv(self.data.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0)
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }

    /// Receives up to [`BATCH`] frames: waits (up to the receive timeout) for the first, then
    /// takes whatever else is queued.
    pub(crate) fn recv_batch(&self, batch: &mut ReceiveBatch) -> io::Result<usize> {
        batch.reset();
        // SAFETY: every header points into `batch`'s own heap buffers, which outlive the call;
        // MSG_WAITFORONE makes the call return once one datagram has arrived.
        let received = unsafe {
            libc::recvmmsg(
                self.data.as_raw_fd(),
                batch.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }

    /// Discards every frame already queued on the data socket; returns how many there were.
    pub(crate) fn drain(&self) -> usize {
        let mut buffer = [0u8; RECEIVE_BUFFER];
        let mut drained = 0;
        loop {
            // SAFETY: `buffer` is valid for writes of its length.
            let received = unsafe {
                libc::recv(
                    self.data.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if received < 0 {
                return drained;
            }
            drained += 1;
        }
    }

    /// Bounds how long a receive waits.
    pub(crate) fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_timeout(&self.data, libc::SO_RCVTIMEO, timeout)
    }

    /// Bounds how long a send waits for room in the switch's queue.
    pub(crate) fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_timeout(&self.data, libc::SO_SNDTIMEO, timeout)
    }
}

/// Buffers and headers for one `recvmmsg` call.
#[derive(Debug)]
pub(crate) struct ReceiveBatch {
    buffers: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl ReceiveBatch {
    pub(crate) fn new() -> ReceiveBatch {
        let mut buffers = vec![0u8; BATCH * RECEIVE_BUFFER];
        let mut iovecs: Vec<libc::iovec> = buffers
            .chunks_exact_mut(RECEIVE_BUFFER)
            .map(|chunk| libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() })
            .collect();
        let headers = iovecs
            .iter_mut()
            .map(|iovec| {
                // SAFETY: msghdr and mmsghdr are plain C structs for which all-zero is valid
                // (null name and control, no flags).
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        // The vectors' heap storage never moves after this point, so the pointers stay valid.
        ReceiveBatch { buffers, iovecs, headers }
    }

    /// The `index`th frame of the last receive.
    pub(crate) fn frame(&self, index: usize) -> &[u8] {
        let len = (self.headers[index].msg_len as usize).min(RECEIVE_BUFFER);
        &self.buffers[index * RECEIVE_BUFFER..index * RECEIVE_BUFFER + len]
    }

    fn reset(&mut self) {
        for (header, iovec) in self.headers.iter_mut().zip(&mut self.iovecs) {
            header.msg_len = 0;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_flags = 0;
        }
    }
}

/// An abstract address laid out as UML lays out its own: a NUL, three padding bytes, the pid,
/// a per-process number where UML puts microseconds, and 96 more bytes that UML leaves
/// uninitialised. Those are filled with pseudo-random bytes here, so a switch that compares
/// fewer than all 108 path bytes, or stops at the first NUL, confuses two ports.
fn uml_like_address(number: u32) -> UnixAddress {
    let mut path = [0u8; SOCKADDR_UN_LEN - 2];
    let mut state =
        0x9e37_79b9_7f4a_7c15u64 ^ u64::from(number) ^ (u64::from(std::process::id()) << 32);
    for byte in path.iter_mut() {
        // xorshift64: cheap, deterministic garbage.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    path[0] = 0;
    path[4..8].copy_from_slice(&std::process::id().to_ne_bytes());
    path[8..12].copy_from_slice(&number.to_ne_bytes());
    UnixAddress { family: AF_UNIX, path }
}

/// Connects a stream socket to the control socket at `path`, waiting at most `timeout` for a
/// switch whose listen backlog is full (std's `UnixStream::connect` would wait forever).
pub(crate) fn connect_control(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let path_bytes = path.as_os_str().as_encoded_bytes();
    let address = UnixAddress::pathname(path_bytes).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "control socket path too long for sockaddr_un")
    })?;

    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // connect(2) on a unix stream socket waits for backlog room for up to the send timeout.
    set_timeout(&socket, libc::SO_SNDTIMEO, timeout)?;

    let raw = to_sockaddr(&address);
    let length = mem::size_of::<libc::sa_family_t>() + path_bytes.len() + 1;
    // SAFETY: `raw` is an initialised sockaddr_un holding the NUL-terminated path, and `length`
    // does not exceed its size.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&raw as *const libc::sockaddr_un).cast(),
            length as libc::socklen_t,
        )
    };
    if connected < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

fn to_sockaddr(address: &UnixAddress) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is a plain C struct for which all-zero is a valid value.
    let mut raw: libc::sockaddr_un = unsafe { mem::zeroed() };
    raw.sun_family = address.family;
    for (to, from) in raw.sun_path.iter_mut().zip(address.path) {
        *to = from as libc::c_char;
    }
    raw
}

fn bind_data_socket(address: &UnixAddress) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    let raw = to_sockaddr(address);
    // SAFETY: `raw` is an initialised sockaddr_un and the length is its full size, which makes
    // all 108 path bytes part of the abstract name, exactly as UML binds.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw as *const libc::sockaddr_un).cast(),
            SOCKADDR_UN_LEN as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn set_timeout(socket: &OwnedFd, option: libc::c_int, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `value` is a live timeval and the length passed is its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
