//! The system calls std and nix do not wrap the way umnet needs them.
//!
//! - Unix addresses as raw 110-byte `sockaddr_un`s: UML names its data socket with all 108
//!   path bytes significant, and replies must be bound the same way (see
//!   [`umnet_proto::daemon::UnixAddress`]).
//! - `recvmmsg`, to take a batch of frames per system call.
//! - Tap devices (`TUNSETIFF`) and interface flags.
//!
//! Everything unsafe in the node lives here, each block with the invariant it relies on.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use umnet_proto::daemon::{UnixAddress, SOCKADDR_UN_LEN};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn to_sockaddr(address: &UnixAddress) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut raw: libc::sockaddr_un = unsafe { mem::zeroed() };
    raw.sun_family = address.family as libc::sa_family_t;
    for (dst, src) in raw.sun_path.iter_mut().zip(address.path.iter()) {
        *dst = *src as libc::c_char;
    }
    raw
}

/// A non-blocking, close-on-exec unix socket of `kind` (`SOCK_DGRAM`, `SOCK_SEQPACKET`, ...).
pub(crate) fn unix_socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory arguments; a non-negative result is a fresh descriptor
    // that we own.
    let fd = check(unsafe {
        libc::socket(libc::AF_UNIX, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds `fd` to `address` with the full structure length, as UML and uml_switch do.
pub(crate) fn bind_full(fd: &OwnedFd, address: &UnixAddress) -> io::Result<()> {
    let raw = to_sockaddr(address);
    // SAFETY: raw is a valid sockaddr_un and the length passed is its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &raw as *const libc::sockaddr_un as *const libc::sockaddr,
            SOCKADDR_UN_LEN as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Connects `fd` to `address` with the full structure length, so an abstract address is
/// compared over all its bytes.
pub(crate) fn connect_full(fd: &OwnedFd, address: &UnixAddress) -> io::Result<()> {
    let raw = to_sockaddr(address);
    // SAFETY: as in bind_full.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &raw as *const libc::sockaddr_un as *const libc::sockaddr,
            SOCKADDR_UN_LEN as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Takes an exclusive `flock` on `file` without waiting. `Ok(false)` when another process
/// holds it.
pub(crate) fn try_lock(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock(2) has no memory arguments.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock => Ok(false),
        _ => Err(error),
    }
}

/// The process and user ids of the peer of a connected unix socket (`SO_PEERCRED`).
pub(crate) fn peer_credentials(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: ucred is plain old data; getsockopt writes at most len bytes into it.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (ret == 0 && cred.pid > 0).then_some((cred.pid as u32, cred.uid))
}

/// A listening `SOCK_SEQPACKET` socket at `path`, for UML's BESS transport.
pub(crate) fn seqpacket_listener(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let address = UnixAddress::pathname(path.as_os_str().as_bytes()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is longer than 107 bytes", path.display()),
        )
    })?;
    let fd = unix_socket(libc::SOCK_SEQPACKET)?;
    bind_full(&fd, &address)?;
    // SAFETY: listen(2) has no memory arguments.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(fd)
}

/// Sends one frame on a connected socket without blocking.
pub(crate) fn send(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: frame is a valid slice for the duration of the call.
    let ret = unsafe {
        libc::send(
            fd,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Writes one frame to a device (a tap).
pub(crate) fn write(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: frame is a valid slice for the duration of the call.
    let ret = unsafe { libc::write(fd, frame.as_ptr() as *const libc::c_void, frame.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Reads one frame from a device (a tap).
pub(crate) fn read(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buffer is valid for writes of its length.
    let ret = unsafe { libc::read(fd, buffer.as_mut_ptr() as *mut libc::c_void, buffer.len()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// One received datagram of a [`RecvBatch`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Received {
    /// Bytes stored in the slot.
    pub(crate) len: usize,
    /// The datagram was longer than the slot and was cut (`MSG_TRUNC`).
    pub(crate) truncated: bool,
}

/// Buffers for receiving up to `slots` datagrams in one `recvmmsg` call.
pub(crate) struct RecvBatch {
    buffers: Vec<u8>,
    slot_len: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: Vec<Received>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("slots", &self.headers.len()).finish()
    }
}

// SAFETY: the raw pointers in iovecs and headers point into `buffers` and `iovecs`, which the
// batch owns and never reallocates after construction; moving the batch to another thread
// moves those heap allocations with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// A batch of `slots` buffers of `slot_len` bytes.
    pub(crate) fn new(slots: usize, slot_len: usize) -> Self {
        let mut buffers = vec![0u8; slots * slot_len];
        let mut iovecs: Vec<libc::iovec> = (0..slots)
            .map(|i| libc::iovec {
                // SAFETY: i * slot_len is within the allocation of slots * slot_len bytes.
                iov_base: unsafe { buffers.as_mut_ptr().add(i * slot_len) } as *mut libc::c_void,
                iov_len: slot_len,
            })
            .collect();
        let headers = (0..slots)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is valid (no name, no control).
                let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
                // SAFETY: i < slots, within iovecs.
                header.msg_hdr.msg_iov = unsafe { iovecs.as_mut_ptr().add(i) };
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        RecvBatch { buffers, slot_len, iovecs, headers, received: Vec::with_capacity(slots) }
    }

    /// Receives what is queued on `fd`, up to one batch, without blocking. Returns the number
    /// of datagrams; 0 means none were waiting (`EAGAIN`).
    pub(crate) fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received.clear();
        for header in &mut self.headers {
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
        }
        debug_assert_eq!(self.iovecs.len(), self.headers.len());

        // SAFETY: every header points at its own iovec, which points at its own slot of
        // `buffers`; all stay alive and unaliased for the call.
        let ret = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if ret < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(error),
            };
        }
        for header in &self.headers[..ret as usize] {
            self.received.push(Received {
                len: header.msg_len as usize,
                truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(ret as usize)
    }

    /// The `index`th datagram of the last [`receive`](Self::receive).
    pub(crate) fn get(&self, index: usize) -> (&[u8], Received) {
        let received = self.received[index];
        let start = index * self.slot_len;
        (&self.buffers[start..start + received.len], received)
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1 to 15 bytes, no '/' or spaces)"),
        ));
    }
    let mut request = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    for (dst, src) in request.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(request)
}

/// Opens tap device `name`, creating it if it does not exist, non-blocking, without packet
/// information headers: one read or write is one Ethernet frame.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let mut request = ifreq(name)?;
    request.flags = IFF_TAP | IFF_NO_PI;
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;

    // SAFETY: path is a valid C string.
    let fd = check(unsafe {
        libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd is fresh from open(2) and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `request` is laid out as.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReq) })?;
    Ok(fd)
}

/// Makes the tap behind `fd` outlive its last descriptor (`persist`), or go with it.
pub(crate) fn set_tap_persist(fd: &OwnedFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(persist)) })?;
    Ok(())
}

/// Sets `IFF_UP` on interface `name`.
pub(crate) fn set_link_up(name: &str) -> io::Result<()> {
    let control = unix_socket(libc::SOCK_DGRAM)?;
    let mut request = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one struct ifreq.
    check(unsafe {
        libc::ioctl(control.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request as *mut IfReq)
    })?;
    request.flags |= libc::IFF_UP as libc::c_short;
    check(unsafe {
        libc::ioctl(control.as_raw_fd(), libc::SIOCSIFFLAGS, &mut request as *mut IfReq)
    })?;
    Ok(())
}

/// Whether a network interface called `name` exists.
pub(crate) fn interface_exists(name: &str) -> bool {
    !name.contains('/') && std::path::Path::new("/sys/class/net").join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_receives_and_flags_truncation() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        a.send(&[1u8; 10]).unwrap();
        a.send(&[2u8; 40]).unwrap();
        let mut batch = RecvBatch::new(4, 16);
        assert_eq!(batch.receive(b.as_raw_fd()).unwrap(), 2);
        let (first, info) = batch.get(0);
        assert_eq!((first, info.truncated), (&[1u8; 10][..], false));
        let (second, info) = batch.get(1);
        assert_eq!((second.len(), info.truncated), (16, true));
        assert_eq!(batch.receive(b.as_raw_fd()).unwrap(), 0);
    }

    #[test]
    fn full_length_abstract_addresses() {
        let name = format!("umnet-test-{}", std::process::id());
        let address = UnixAddress::abstract_name(name.as_bytes()).unwrap();
        let server = unix_socket(libc::SOCK_DGRAM).unwrap();
        bind_full(&server, &address).unwrap();
        let client = unix_socket(libc::SOCK_DGRAM).unwrap();
        connect_full(&client, &address).unwrap();
        send(client.as_raw_fd(), b"frame").unwrap();
        let mut batch = RecvBatch::new(1, 64);
        assert_eq!(batch.receive(server.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.get(0).0, b"frame");

        // The same name bound with the short length std uses is a different socket.
        let mut short = address;
        short.path[50] = 1;
        let other = unix_socket(libc::SOCK_DGRAM).unwrap();
        assert!(connect_full(&other, &short).is_err());
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("tap0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-too-long-x").is_err());
        assert!(ifreq("../x").is_err());
    }
}
