//! The system calls std and nix do not wrap the way umnet needs them.
//!
//! - Unix addresses as raw 110-byte `sockaddr_un`s: UML names its data socket with all 108
//!   path bytes significant, and replies must be bound the same way (see
//!   [`umnet_proto::daemon::UnixAddress`]).
//! - `recvmmsg`, to take a batch of frames per system call, with the packet socket's per-frame
//!   information (direction, stripped VLAN tag) when asked.
//! - Tap devices (`TUNSETIFF`) and interface flags.
//! - Packet sockets on NICs: bound to one interface, promiscuous through a membership the
//!   kernel drops when the socket closes (so a killed node leaves no interface promiscuous),
//!   with auxiliary data and virtio headers.
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
    /// A packet socket saw the host send this frame (`PACKET_OUTGOING`), rather than receive
    /// it from the wire.
    pub(crate) outgoing: bool,
    /// The 802.1Q tag the NIC stripped (TPID, TCI), from the packet socket's auxiliary data.
    pub(crate) vlan: Option<(u16, u16)>,
}

/// Room for one `tpacket_auxdata` control message (CMSG_SPACE of 20 bytes is 40).
const CONTROL_LEN: usize = 64;

/// Buffers for receiving up to `slots` datagrams in one `recvmmsg` call.
pub(crate) struct RecvBatch {
    buffers: Vec<u8>,
    slot_len: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    /// Per slot, for packet sockets: the sender's link-layer address and the control messages.
    names: Vec<libc::sockaddr_ll>,
    controls: Vec<u8>,
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
        RecvBatch {
            buffers,
            slot_len,
            iovecs,
            headers,
            names: Vec::new(),
            controls: Vec::new(),
            received: Vec::with_capacity(slots),
        }
    }

    /// A batch for a packet socket: besides the frames, each slot takes the link-layer
    /// address (for the direction) and the auxiliary data (for a stripped VLAN tag).
    pub(crate) fn for_packets(slots: usize, slot_len: usize) -> Self {
        let mut batch = Self::new(slots, slot_len);
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        batch.names = vec![unsafe { mem::zeroed() }; slots];
        batch.controls = vec![0u8; slots * CONTROL_LEN];
        for (i, header) in batch.headers.iter_mut().enumerate() {
            // SAFETY: i < slots, within both allocations, which are never reallocated.
            header.msg_hdr.msg_name = unsafe { batch.names.as_mut_ptr().add(i) } as *mut _;
            header.msg_hdr.msg_control =
                unsafe { batch.controls.as_mut_ptr().add(i * CONTROL_LEN) } as *mut _;
        }
        batch
    }

    /// Receives what is queued on `fd`, up to one batch, without blocking. Returns the number
    /// of datagrams; 0 means none were waiting (`EAGAIN`).
    pub(crate) fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received.clear();
        let packets = !self.names.is_empty();
        for header in &mut self.headers {
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
            if packets {
                header.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as u32;
                header.msg_hdr.msg_controllen = CONTROL_LEN as _;
            }
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
        for (index, header) in self.headers[..ret as usize].iter().enumerate() {
            let (outgoing, vlan) = match self.names.get(index) {
                Some(name) => (name.sll_pkttype == PACKET_OUTGOING, stripped_tag(&header.msg_hdr)),
                None => (false, None),
            };
            self.received.push(Received {
                len: header.msg_len as usize,
                truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                outgoing,
                vlan,
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

    /// The `index`th datagram, to be changed in place (a checksum completed).
    pub(crate) fn get_mut(&mut self, index: usize) -> (&mut [u8], Received) {
        let received = self.received[index];
        let start = index * self.slot_len;
        (&mut self.buffers[start..start + received.len], received)
    }
}

/// `sll_pkttype` of a frame the host sent.
const PACKET_OUTGOING: u8 = 4;
/// Auxiliary data of a packet socket: `tp_vlan_tci` is valid.
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
/// Auxiliary data of a packet socket: `tp_vlan_tpid` is valid.
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_ushort = 1;
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_VNET_HDR: libc::c_int = 15;

/// The VLAN tag a packet socket's auxiliary data reports as stripped from a frame, if any.
fn stripped_tag(message: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed control
    // messages; the CMSG macros walk them within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(message);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_PACKET && (*cmsg).cmsg_type == PACKET_AUXDATA {
                let aux = (libc::CMSG_DATA(cmsg) as *const libc::tpacket_auxdata).read_unaligned();
                if aux.tp_status & TP_STATUS_VLAN_VALID == 0 {
                    return None;
                }
                let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                    aux.tp_vlan_tpid
                } else {
                    umnet_proto::ethernet::ETHERTYPE_VLAN
                };
                return Some((tpid, aux.tp_vlan_tci));
            }
            cmsg = libc::CMSG_NXTHDR(message, cmsg);
        }
    }
    None
}

/// Index of network interface `name`.
pub(crate) fn interface_index(name: &str) -> io::Result<u32> {
    ifreq(name)?;
    let c_name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: c_name is a valid C string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// The hardware address of interface `name`.
pub(crate) fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    #[repr(C)]
    struct HwAddrReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        address: libc::sockaddr,
        _pad: [u8; 8],
    }
    let control = unix_socket(libc::SOCK_DGRAM)?;
    let named = ifreq(name)?;
    // SAFETY: sockaddr is plain old data; all-zero is valid.
    let mut request =
        HwAddrReq { name: named.name, address: unsafe { mem::zeroed() }, _pad: [0; 8] };
    // SAFETY: SIOCGIFHWADDR reads and writes one struct ifreq, which HwAddrReq is laid out as.
    check(unsafe {
        libc::ioctl(control.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request as *mut HwAddrReq)
    })?;
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(request.address.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok(mac)
}

fn set_option<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: value points at a live T and the length passed is its size.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sets a receive buffer of `bytes` on socket `fd` and returns the size the kernel granted,
/// which counts its own overhead. With `CAP_NET_ADMIN` the size is set as asked; without it
/// the kernel caps it at `net.core.rmem_max`.
pub(crate) fn set_receive_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<usize> {
    let wanted = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if let Err(error) = set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &wanted) {
        if error.raw_os_error() != Some(libc::EPERM) {
            return Err(error);
        }
        set_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &wanted)?;
    }
    let mut granted: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `granted` and `len` are live and `len` holds the size of `granted`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &mut granted as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(usize::try_from(granted).unwrap_or(0))
}

/// A packet socket on interface `name` for a NIC port: every frame on the wire, in either
/// direction, each prefixed with a virtio header and accompanied by auxiliary data; the
/// interface is promiscuous for as long as the socket is open. Frames the socket sends itself
/// are never read back by it.
///
/// Needs `CAP_NET_RAW`; without it the error is `EPERM`.
pub(crate) fn open_packet_socket(name: &str) -> io::Result<OwnedFd> {
    let index = interface_index(name)?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    let fd = packet_socket(protocol, libc::SOCK_NONBLOCK)?;
    // Options first: frames that arrive between bind and the options would lack them.
    let on: libc::c_int = 1;
    set_option(&fd, libc::SOL_PACKET, PACKET_AUXDATA, &on)?;
    set_option(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &on)?;
    bind_to_interface(&fd, index, protocol)?;

    // SAFETY: packet_mreq is plain old data; all-zero is valid.
    let mut membership: libc::packet_mreq = unsafe { mem::zeroed() };
    membership.mr_ifindex = index as libc::c_int;
    membership.mr_type = PACKET_MR_PROMISC;
    set_option(&fd, libc::SOL_PACKET, PACKET_ADD_MEMBERSHIP, &membership)?;
    Ok(fd)
}

/// A blocking packet socket on interface `name` that sends and receives frames of
/// `ethertype` only, each read waiting at most `timeout`: what `umnet guest` talks to its node
/// with.
pub(crate) fn open_ethertype_socket(
    name: &str,
    ethertype: u16,
    timeout: std::time::Duration,
) -> io::Result<OwnedFd> {
    let index = interface_index(name)?;
    let protocol = ethertype.to_be();
    let fd = packet_socket(protocol, 0)?;
    bind_to_interface(&fd, index, protocol)?;
    let timeout = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
    Ok(fd)
}

/// A close-on-exec `AF_PACKET` raw socket for `protocol` (network byte order), with `flags`
/// (`SOCK_NONBLOCK` or 0) added to its type.
fn packet_socket(protocol: u16, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory arguments; a non-negative result is a fresh descriptor
    // that we own.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::c_int::from(protocol),
        )
    })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds packet socket `fd` to the interface with `index`, for `protocol`.
fn bind_to_interface(fd: &OwnedFd, index: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = index as libc::c_int;
    // SAFETY: address is a valid sockaddr_ll and the length passed is its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &address as *const libc::sockaddr_ll as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// The iovecs of `header` followed by `frame`, for the kernel to read as one frame.
fn header_and_frame(header: &[u8], frame: &[u8]) -> [libc::iovec; 2] {
    let iovec = |part: &[u8]| libc::iovec {
        iov_base: part.as_ptr() as *mut libc::c_void,
        iov_len: part.len(),
    };
    [iovec(header), iovec(frame)]
}

/// Sends `header` and `frame` as one frame on a connected or bound socket, without blocking.
pub(crate) fn send_with_header(fd: RawFd, header: &[u8], frame: &[u8]) -> io::Result<usize> {
    let mut iovecs = header_and_frame(header, frame);
    // SAFETY: msghdr is plain old data; all-zero is valid (no name, no control).
    let mut message: libc::msghdr = unsafe { mem::zeroed() };
    message.msg_iov = iovecs.as_mut_ptr();
    message.msg_iovlen = iovecs.len() as _;
    // SAFETY: both iovecs point into slices alive for the call; the kernel only reads them.
    let ret = unsafe { libc::sendmsg(fd, &message, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Writes one frame to a device behind the virtio header `header` (a tap with
/// `IFF_VNET_HDR`), in one `writev`.
pub(crate) fn write_with_header(fd: RawFd, header: &[u8], frame: &[u8]) -> io::Result<usize> {
    let iovecs = header_and_frame(header, frame);
    // SAFETY: both iovecs point into slices alive for the call; the kernel only reads them.
    let ret = unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// The offloads a tap may hand the node (`linux/if_tun.h`): partial checksums, and TCP
/// super-frames over IPv4 and IPv6, with or without ECN.
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;
const TUN_F_TSO_ECN: libc::c_ulong = 0x08;

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
/// information headers: one read or write is one Ethernet frame behind a virtio header
/// ([`umnet_proto::offload::VnetHeader`]).
///
/// The tap may hand the node TCP super-frames of up to 64 KiB with partial checksums, which
/// the switch cuts into wire frames as it does for NIC ports: the host's TCP stack then
/// builds one packet where it built forty, and the node reads it in one system call. A kernel
/// that refuses the offloads still speaks the header, with plain frames in it.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let mut request = ifreq(name)?;
    request.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;

    // SAFETY: path is a valid C string.
    let fd = check(unsafe {
        libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd is fresh from open(2) and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `request` is laid out as.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReq) })?;
    let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let _ = check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, offloads) });
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
    fn a_receive_buffer_is_granted_as_asked_with_cap_net_admin() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The tests run as root. 16 MiB is above net.core.rmem_max on the usual hosts, and the
        // kernel grants twice what was asked, for its overhead.
        let granted = set_receive_buffer(&socket, 16 << 20).unwrap();
        assert!(granted >= 16 << 20, "granted {granted}");
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
