//! Smoke tests of the harness itself, against Debian's switches instead of umnet: if these
//! fail, scenario test failures say nothing about umnet.
//!
//! Run as root: `cargo test -p umnet-tests --test harness`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umnet_tests::netns::ip;
use umnet_tests::{
    mac, require_program, wait_for, wait_until, Background, Guest, GuestConfig, Netns, TempDir,
    Veth,
};

const POLL: Duration = Duration::from_millis(20);

/// Starts `command` and waits for it to create `path`, its listening socket.
fn start_switch(name: &str, command: Command, path: &Path) -> Result<Background> {
    let switch = Background::spawn(name, command)?;
    wait_until(Duration::from_secs(10), POLL, || path.exists()).with_context(|| {
        format!("{name} did not create {}; log:\n{}", path.display(), switch.log())
    })?;
    Ok(switch)
}

#[test]
fn two_uml_guests_ping_through_uml_switch() -> Result<()> {
    let dir = TempDir::new("sw")?;
    let ctl = dir.join("uml.ctl");
    let mut command = Command::new(require_program("uml_switch", "uml-utilities")?);
    command.arg("-unix").arg(&ctl);
    let _switch = start_switch("uml_switch", command, &ctl)?;

    let [g1, g2] = Guest::boot_all([
        GuestConfig::new("g1").daemon(0, &mac(1), &ctl),
        GuestConfig::new("g2").daemon(0, &mac(2), &ctl),
    ])?;
    g1.ip("eth0", "10.10.0.1/24")?;
    g2.ip("eth0", "10.10.0.2/24")?;

    assert_eq!(g1.mac("eth0")?, mac(1));
    assert!(
        g1.ping_ok("10.10.0.2")?,
        "g1 got no reply from g2\n=== g1 ===\n{}\n=== g2 ===\n{}",
        g1.console_log(),
        g2.console_log()
    );
    Ok(())
}

#[test]
fn guest_console_reports_status_output_and_interface_names() -> Result<()> {
    let dir = TempDir::new("con")?;
    let vde_dir = dir.join("vde");
    let mut command = Command::new(require_program("vde_switch", "vde2")?);
    command.arg("-s").arg(&vde_dir);
    let _vde_switch = start_switch("vde_switch", command, &vde_dir.join("ctl"))?;
    let bess_path = dir.join("bess");
    let bess = listen_seqpacket(&bess_path)?;

    let guest = Guest::boot(GuestConfig::new("con").vde(1, &mac(0x11), &vde_dir).bess(
        0,
        &mac(0x12),
        &bess_path,
    ))?;

    // Exact output and status, without the typed command echoed back.
    assert_eq!(
        guest.run("echo out; echo err >&2; exit 3", Duration::from_secs(5))?,
        (3, "out\nerr\n".to_owned())
    );
    assert_eq!(guest.run_ok("printf no-newline")?, "no-newline");

    // A hung command is killed inside the guest, and the console keeps working.
    let (status, _) = guest.run("sleep 60", Duration::from_secs(1))?;
    assert_ne!(status, 0);
    assert_eq!(guest.run_ok("echo still here")?, "still here\n");

    // The daemon and vde transports name the interface ethN, the vector transport vecN.
    let links = guest.run_ok("ip -o link")?;
    assert!(links.contains(": eth1:") && links.contains(": vec0:"), "{links}");
    assert_eq!(guest.mac("eth1")?, mac(0x11));
    assert_eq!(guest.mac("vec0")?, mac(0x12));

    // BESS carries bare Ethernet frames, one per message: the guest's ARP request arrives with
    // its MAC as source and EtherType 0x0806 at offset 12.
    // The vector driver connects when the interface goes up, not at boot.
    guest.ip("vec0", "10.30.0.1/24")?;
    let connection = wait_for(Duration::from_secs(10), POLL, || accept(&bess))
        .with_context(|| format!("UML did not connect to {}", bess_path.display()))?;
    guest.run("ping -c 1 -W 1 10.30.0.2", Duration::from_secs(5))?;
    let frame = wait_for(Duration::from_secs(10), POLL, || receive(&connection))
        .with_context(|| format!("no frame from the guest:\n{}", guest.console_log()))?;
    assert!(frame.len() >= 42, "not an ARP frame: {frame:02x?}");
    assert_eq!(frame[6..12], [0x52, 0x54, 0, 0, 0, 0x12], "{frame:02x?}");
    assert_eq!(frame[12..14], [0x08, 0x06], "{frame:02x?}");
    Ok(())
}

#[test]
fn veth_connects_two_namespaces_and_everything_is_removed() -> Result<()> {
    let names;
    let host_iface;
    {
        let a = Netns::new("a")?;
        let b = Netns::new("b")?;
        let _cable = Veth::between(&a, "eth0", &b, "eth0")?;
        a.addr("eth0", "10.20.0.1/24")?;
        b.addr("eth0", "10.20.0.2/24")?;
        assert!(a.ping_ok("10.20.0.2")?, "no reply across the veth pair");

        let uplink = Veth::to_host(&a, "up0")?;
        host_iface = uplink.host_iface().context("to_host made no host end")?.to_owned();
        assert!(Path::new("/sys/class/net").join(&host_iface).exists());
        assert!(a.exec(&["cat", "/sys/class/net/up0/operstate"]).is_ok());
        names = [a.name().to_owned(), b.name().to_owned()];
    }

    let list = ip(&["netns", "list"])?;
    for name in &names {
        assert!(!list.contains(name.as_str()), "{name} survived its drop:\n{list}");
    }
    assert!(!Path::new("/sys/class/net").join(&host_iface).exists(), "{host_iface} survived");
    Ok(())
}

/// Binds a non-blocking `SOCK_SEQPACKET` listener at `path`, as a BESS switch port would.
fn listen_seqpacket(path: &Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;

    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied within its bounds (checked
    // below, leaving the terminating NUL).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        bail!("socket path too long: {}", path.display());
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }

    // SAFETY: plain system calls; the descriptor is owned by `OwnedFd` as soon as it exists.
    unsafe {
        let raw = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0);
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(SOCK_SEQPACKET)");
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error()).context("binding BESS socket");
        }
        if libc::listen(fd.as_raw_fd(), 4) != 0 {
            return Err(std::io::Error::last_os_error()).context("listening on BESS socket");
        }
        Ok(fd)
    }
}

/// Accepts one connection, if one is pending.
fn accept(listener: &OwnedFd) -> Result<Option<OwnedFd>> {
    // SAFETY: accept4 with null address pointers is valid; a returned descriptor is owned.
    let raw = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK,
        )
    };
    if raw < 0 {
        return would_block(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// Receives one message, if one is pending.
fn receive(connection: &OwnedFd) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 2048];
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::recv(connection.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return would_block(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn would_block<T>(err: std::io::Error) -> Result<Option<T>> {
    if err.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err.into())
    }
}
