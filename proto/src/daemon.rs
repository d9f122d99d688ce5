//! The control request of UML's daemon transport, which libvdeplug clients speak too.
//!
//! A client connects a `SOCK_STREAM` unix socket to the switch's control path, writes one
//! request naming its own datagram socket, and reads back the switch's datagram address as a
//! raw `struct sockaddr_un`. Frames then travel one per datagram. Two writers exist:
//!
//! | offset | size | field | UML (`daemon_user.c`) | libvdeplug (`libvdeplug.c`) |
//! |---|---|---|---|---|
//! | 0 | 4 | magic | `0xfeedface` | same |
//! | 4 | 4 | version | 3 | 3 |
//! | 8 | 4 | type | 0, `REQ_NEW_CONTROL` | low byte 0 or 1, requested port number in bits 8.. |
//! | 12 | 110 | `sockaddr_un` | abstract address, all 108 path bytes significant | usually a path |
//! | 122 | .. | tail | 2 uninitialised padding bytes (124 in all) | description, up to 128 bytes |
//!
//! Integers are in the client's native byte order, which on the host the switch shares with
//! its clients is the switch's own.

use std::fmt;

/// `SWITCH_MAGIC` of the uml_switch protocol.
pub const MAGIC: u32 = 0xfeed_face;

/// The only protocol version UML has spoken since 2002 and libvdeplug still speaks.
pub const VERSION: u32 = 3;

/// Size of `struct sockaddr_un` on Linux: a 2-byte family and a 108-byte path.
pub const SOCKADDR_UN_LEN: usize = 110;

/// Size of the path inside `struct sockaddr_un`.
pub const SUN_PATH_LEN: usize = 108;

/// Offset of the address in a request, and the length of a request without a description.
pub const ADDRESS_OFFSET: usize = 12;

/// Length of a request up to and including the address.
pub const MIN_REQUEST_LEN: usize = ADDRESS_OFFSET + SOCKADDR_UN_LEN;

/// Length of the request as UML writes it: the unpacked C struct, padded to 4-byte alignment.
pub const UML_REQUEST_LEN: usize = 124;

/// libvdeplug's `MAXDESCR`: the longest description a client sends.
pub const MAX_DESCRIPTION_LEN: usize = 128;

/// The longest request a well-behaved client writes.
pub const MAX_REQUEST_LEN: usize = MIN_REQUEST_LEN + MAX_DESCRIPTION_LEN;

/// `AF_UNIX`.
pub const AF_UNIX: u16 = 1;

/// What a client asks for in the low byte of the type field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `REQ_NEW_CONTROL`: an ordinary port.
    NewControl,
    /// `REQ_NEW_PORT0`: vde_switch's management port. umnet has no port 0 and serves it as an
    /// ordinary port.
    NewPort0,
}

/// A parsed version-3 control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What the client asked for.
    pub kind: RequestKind,
    /// Port number the client asked for (libvdeplug's `port=`); 0 means any. Informational: the
    /// node numbers its ports itself.
    pub requested_port: u32,
    /// The client's datagram socket, where frames for it are sent.
    pub address: UnixAddress,
    /// Description a libvdeplug client sent after the address; empty for UML.
    pub description: String,
}

/// Why a control request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The client sent fewer bytes than a version-3 request holds.
    #[error("truncated request: {len} bytes, a version-3 request needs {MIN_REQUEST_LEN}")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The first word is not `0xfeedface`: not a uml_switch client, or a version-0 client.
    #[error("bad magic {0:#010x}, expected {MAGIC:#010x}")]
    BadMagic(u32),
    /// A uml_switch protocol version other than 3.
    #[error("unsupported protocol version {0}, only version {VERSION} is served")]
    UnsupportedVersion(u32),
    /// A request type other than `REQ_NEW_CONTROL` or `REQ_NEW_PORT0`.
    #[error("unknown request type {0}")]
    UnknownKind(u8),
    /// The client's address is not a unix-domain address.
    #[error("client address family {0} is not AF_UNIX")]
    BadFamily(u16),
    /// The client's address is empty, so frames for it could not be delivered.
    #[error("client address is empty")]
    EmptyAddress,
}

impl Request {
    /// Parses a request from the bytes a client wrote before waiting for the reply.
    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        let word = |at: usize| -> Option<u32> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };

        // Check what is there before complaining about what is missing, so a client speaking
        // another protocol is told so rather than that its request was short.
        match word(0) {
            Some(MAGIC) => {}
            Some(magic) => return Err(RequestError::BadMagic(magic)),
            None => return Err(RequestError::Truncated { len: bytes.len() }),
        }
        match word(4) {
            Some(VERSION) => {}
            Some(version) => return Err(RequestError::UnsupportedVersion(version)),
            None => return Err(RequestError::Truncated { len: bytes.len() }),
        }
        if bytes.len() < MIN_REQUEST_LEN {
            return Err(RequestError::Truncated { len: bytes.len() });
        }

        let kind_word = word(8).unwrap_or_default();
        let kind = match kind_word & 0xff {
            0 => RequestKind::NewControl,
            1 => RequestKind::NewPort0,
            other => return Err(RequestError::UnknownKind(other as u8)),
        };
        let mut raw = [0u8; SOCKADDR_UN_LEN];
        raw.copy_from_slice(&bytes[ADDRESS_OFFSET..MIN_REQUEST_LEN]);
        let address = UnixAddress::from_bytes(&raw);
        if address.family != AF_UNIX {
            return Err(RequestError::BadFamily(address.family));
        }
        if address.is_empty() {
            return Err(RequestError::EmptyAddress);
        }

        Ok(Request {
            kind,
            requested_port: kind_word >> 8,
            address,
            description: description(&bytes[MIN_REQUEST_LEN..]),
        })
    }

    /// Builds the 124 bytes UML writes, with zeroed padding.
    pub fn to_uml_bytes(&self) -> [u8; UML_REQUEST_LEN] {
        let mut out = [0u8; UML_REQUEST_LEN];
        self.write_head(&mut out[..MIN_REQUEST_LEN]);
        out
    }

    /// Builds the packed request libvdeplug writes: the head and the description.
    pub fn to_vde_bytes(&self) -> Vec<u8> {
        let description = self.description.as_bytes();
        let description = &description[..description.len().min(MAX_DESCRIPTION_LEN)];
        let mut out = vec![0u8; MIN_REQUEST_LEN + description.len()];
        self.write_head(&mut out[..MIN_REQUEST_LEN]);
        out[MIN_REQUEST_LEN..].copy_from_slice(description);
        out
    }

    fn write_head(&self, out: &mut [u8]) {
        let kind = match self.kind {
            RequestKind::NewControl => 0,
            RequestKind::NewPort0 => 1,
        };
        out[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        out[4..8].copy_from_slice(&VERSION.to_ne_bytes());
        out[8..12].copy_from_slice(&(kind | (self.requested_port << 8)).to_ne_bytes());
        out[ADDRESS_OFFSET..MIN_REQUEST_LEN].copy_from_slice(&self.address.to_bytes());
    }
}

/// The bytes after the address. UML leaves two uninitialised padding bytes there; libvdeplug
/// puts a text description. Keep printable text only, so neither padding garbage nor control
/// characters reach logs or the CLI.
fn description(tail: &[u8]) -> String {
    let tail = &tail[..tail.len().min(MAX_DESCRIPTION_LEN)];
    let text = String::from_utf8_lossy(tail);
    let kept: String = text.chars().filter(|c| !c.is_control() && *c != '\u{fffd}').collect();

    // Two bytes of stack garbage can happen to be printable; a real description is longer.
    if tail.len() == UML_REQUEST_LEN - MIN_REQUEST_LEN && kept.chars().count() < 2 {
        return String::new();
    }
    kept.trim().to_string()
}

/// A `struct sockaddr_un`, kept byte for byte.
///
/// UML binds its data socket to an abstract address whose 108 path bytes are all significant:
/// it fills only the first 12 (`{char zero; int pid; int usecs}`) and leaves the rest of a heap
/// allocation uninitialised, then binds with the full structure length. Trimming at the first
/// NUL, as one would for a path, would name a different socket.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnixAddress {
    /// Address family; `AF_UNIX` for every valid client.
    pub family: u16,
    /// The path, or for an abstract address a NUL followed by the name.
    pub path: [u8; SUN_PATH_LEN],
}

impl UnixAddress {
    /// Reads the raw structure.
    pub fn from_bytes(raw: &[u8; SOCKADDR_UN_LEN]) -> Self {
        let mut path = [0u8; SUN_PATH_LEN];
        path.copy_from_slice(&raw[2..]);
        UnixAddress { family: u16::from_ne_bytes([raw[0], raw[1]]), path }
    }

    /// Writes the raw structure, as the switch replies it and clients send it.
    pub fn to_bytes(&self) -> [u8; SOCKADDR_UN_LEN] {
        let mut raw = [0u8; SOCKADDR_UN_LEN];
        raw[..2].copy_from_slice(&self.family.to_ne_bytes());
        raw[2..].copy_from_slice(&self.path);
        raw
    }

    /// An abstract address whose name is `name`, zero-padded to the full length.
    ///
    /// Returns `None` when the name does not fit beside the leading NUL.
    pub fn abstract_name(name: &[u8]) -> Option<Self> {
        if name.len() >= SUN_PATH_LEN {
            return None;
        }
        let mut path = [0u8; SUN_PATH_LEN];
        path[1..=name.len()].copy_from_slice(name);
        Some(UnixAddress { family: AF_UNIX, path })
    }

    /// A filesystem path address. Returns `None` when the path does not fit with its NUL.
    pub fn pathname(name: &[u8]) -> Option<Self> {
        if name.is_empty() || name.len() >= SUN_PATH_LEN || name.contains(&0) {
            return None;
        }
        let mut path = [0u8; SUN_PATH_LEN];
        path[..name.len()].copy_from_slice(name);
        Some(UnixAddress { family: AF_UNIX, path })
    }

    /// Whether this is an abstract address (a leading NUL), as UML uses.
    pub fn is_abstract(&self) -> bool {
        self.path[0] == 0
    }

    /// Whether no byte of the path is set: no socket can be reached there.
    pub fn is_empty(&self) -> bool {
        self.path.iter().all(|&b| b == 0)
    }

    /// The filesystem path, for a pathname address.
    pub fn as_path_bytes(&self) -> Option<&[u8]> {
        if self.is_abstract() {
            return None;
        }
        let end = self.path.iter().position(|&b| b == 0).unwrap_or(SUN_PATH_LEN);
        Some(&self.path[..end])
    }

    /// The process id UML puts in its abstract address (`name.pid`), if this looks like one.
    pub fn uml_pid(&self) -> Option<u32> {
        if !self.is_abstract() {
            return None;
        }
        let pid = u32::from_ne_bytes([self.path[4], self.path[5], self.path[6], self.path[7]]);
        (pid != 0 && pid < (1 << 22)).then_some(pid)
    }
}

impl fmt::Debug for UnixAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for UnixAddress {
    /// Pathname addresses print as the path; abstract ones as `@` and the hex of the name up
    /// to its last non-zero byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = self.as_path_bytes() {
            return write!(f, "{}", String::from_utf8_lossy(path));
        }
        let end = self.path.iter().rposition(|&b| b != 0).map_or(1, |i| i + 1);
        f.write_str("@")?;
        for byte in &self.path[1..end] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as UML 6.1 writes it: pid 4242 and usecs 777 in the abstract name, heap
    /// garbage after them, and two bytes of stack garbage as padding.
    fn uml_fixture() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0xfeed_faceu32.to_ne_bytes());
        bytes.extend_from_slice(&3u32.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&1u16.to_ne_bytes());
        let mut path = [0xa5u8; 108];
        path[0] = 0;
        path[1..4].copy_from_slice(&[0x11, 0x22, 0x33]);
        path[4..8].copy_from_slice(&4242u32.to_ne_bytes());
        path[8..12].copy_from_slice(&777u32.to_ne_bytes());
        bytes.extend_from_slice(&path);
        bytes.extend_from_slice(&[0x00, 0x7f]);
        assert_eq!(bytes.len(), UML_REQUEST_LEN);
        bytes
    }

    /// A request as vde-2's libvdeplug writes it for `vde_plug -p 5 /run/umnet/net100`.
    fn vde_fixture() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0xfeed_faceu32.to_ne_bytes());
        bytes.extend_from_slice(&3u32.to_ne_bytes());
        bytes.extend_from_slice(&(5u32 << 8).to_ne_bytes());
        bytes.extend_from_slice(&1u16.to_ne_bytes());
        let mut path = [0u8; 108];
        let name = b"/run/umnet/net100/.01234-00000";
        path[..name.len()].copy_from_slice(name);
        bytes.extend_from_slice(&path);
        bytes.extend_from_slice(b"vde_plug: user=root PID=1234");
        bytes
    }

    #[test]
    fn parses_uml_request_keeping_every_address_byte() {
        let request = Request::parse(&uml_fixture()).unwrap();
        assert_eq!(request.kind, RequestKind::NewControl);
        assert_eq!(request.requested_port, 0);
        assert!(request.address.is_abstract());
        assert_eq!(request.address.uml_pid(), Some(4242));
        assert_eq!(request.address.path[107], 0xa5, "garbage after the name is part of it");
        assert_eq!(request.description, "");
    }

    #[test]
    fn addresses_differing_only_past_the_name_are_distinct() {
        let a = Request::parse(&uml_fixture()).unwrap().address;
        let mut other = uml_fixture();
        other[ADDRESS_OFFSET + 2 + 100] = 0x5a;
        let b = Request::parse(&other).unwrap().address;
        assert_ne!(a, b);
    }

    #[test]
    fn parses_vde_request_with_port_and_description() {
        let request = Request::parse(&vde_fixture()).unwrap();
        assert_eq!(request.kind, RequestKind::NewControl);
        assert_eq!(request.requested_port, 5);
        assert_eq!(request.address.as_path_bytes(), Some(&b"/run/umnet/net100/.01234-00000"[..]));
        assert_eq!(request.description, "vde_plug: user=root PID=1234");
    }

    #[test]
    fn round_trips_both_encodings() {
        let uml = Request::parse(&uml_fixture()).unwrap();
        let mut expected = uml_fixture();
        expected[122..].fill(0);
        assert_eq!(uml.to_uml_bytes().to_vec(), expected);

        let vde = Request::parse(&vde_fixture()).unwrap();
        assert_eq!(vde.to_vde_bytes(), vde_fixture());
    }

    #[test]
    fn refuses_wrong_magic_before_length() {
        assert_eq!(Request::parse(b"GET / HTTP/1.0\r\n"), Err(RequestError::BadMagic(0x20544547)));
    }

    #[test]
    fn refuses_other_versions() {
        for version in [0u32, 1, 2, 4, 0xffff_ffff] {
            let mut bytes = uml_fixture();
            bytes[4..8].copy_from_slice(&version.to_ne_bytes());
            assert_eq!(Request::parse(&bytes), Err(RequestError::UnsupportedVersion(version)));
        }
    }

    #[test]
    fn refuses_truncated_requests() {
        let bytes = uml_fixture();
        for len in [0, 3, 4, 7, 8, 12, 121] {
            assert_eq!(Request::parse(&bytes[..len]), Err(RequestError::Truncated { len }));
        }
        assert!(Request::parse(&bytes[..122]).is_ok());
    }

    #[test]
    fn refuses_bad_kind_family_and_empty_address() {
        let mut bytes = uml_fixture();
        bytes[8] = 7;
        assert_eq!(Request::parse(&bytes), Err(RequestError::UnknownKind(7)));

        let mut bytes = uml_fixture();
        bytes[12..14].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(Request::parse(&bytes), Err(RequestError::BadFamily(2)));

        let mut bytes = uml_fixture();
        bytes[14..122].fill(0);
        assert_eq!(Request::parse(&bytes), Err(RequestError::EmptyAddress));
    }

    #[test]
    fn description_drops_control_characters_and_caps_length() {
        let mut bytes = vde_fixture();
        bytes.truncate(MIN_REQUEST_LEN);
        bytes.extend_from_slice(b"qemu\x1b[31m\n");
        bytes.extend_from_slice(&[b'x'; 300]);
        let request = Request::parse(&bytes).unwrap();
        assert!(request.description.starts_with("qemu[31mxxx"));
        assert!(request.description.len() <= MAX_DESCRIPTION_LEN);
    }

    #[test]
    fn abstract_and_path_addresses() {
        let a = UnixAddress::abstract_name(b"umnet-7-100-3").unwrap();
        assert!(a.is_abstract());
        assert_eq!(a.to_string(), "@756d6e65742d372d3130302d33");
        assert_eq!(UnixAddress::from_bytes(&a.to_bytes()), a);
        assert!(UnixAddress::abstract_name(&[b'a'; 108]).is_none());

        let p = UnixAddress::pathname(b"/tmp/x").unwrap();
        assert_eq!(p.to_string(), "/tmp/x");
        assert!(UnixAddress::pathname(b"").is_none());
        assert!(UnixAddress::pathname(&[b'a'; 108]).is_none());
    }
}
