//! Real User-Mode Linux guests, driven through their console.
//!
//! A guest boots Debian's `linux.uml` (kernel 6.1) with the host's `/` as its read-only root
//! (hostfs), and a generated busybox init script as PID 1. The console is a pair of pipes: the
//! harness writes one command per line to UML's stdin and reads the results from its stdout.
//!
//! # Console protocol
//!
//! Inside the guest the console is a tty, which echoes input and turns `\n` into `\r\n`; the
//! init script turns both off with `stty`, and the reader drops `\r` anyway. Each command is
//! sent as `ID SECONDS COMMAND` and the guest answers
//!
//! ```text
//! UMNET-BEGIN ID
//! ...output of COMMAND (stdout and stderr)...
//! UMNET-END ID STATUS
//! ```
//!
//! so output is exactly what lies between the markers, never boot messages or the output of an
//! earlier command. The guest runs each command under busybox `timeout -s KILL SECONDS`, so a
//! hung command cannot block the console for later ones. Once booted, kernel messages less
//! severe than `KERN_ERR` are kept off the console (`dmesg` still has them), so they don't
//! interleave with command output.
//!
//! # Interfaces
//!
//! Kernel arguments name the guest's interfaces; these have been checked against the 6.1
//! kernel:
//!
//! * `ethN=daemon,MAC,unix,CTL`: uml_switch protocol (version 3) on control socket `CTL`. The
//!   guest interface is `ethN`.
//! * `ethN=vde,DIR[,MAC[,PORT[,GROUP[,MODE[,DESCRIPTION]]]]]`: libvdeplug to the switch
//!   directory `DIR`. The guest interface is `ethN`; without `MAC` a random one is chosen.
//! * `vecN:transport=bess,dst=SOCK[,mac=MAC][,src=PATH]`: one Ethernet frame per message on a
//!   `SOCK_SEQPACKET` Unix socket connected to `SOCK`, no header. The guest interface is
//!   `vecN` (not `ethN`); without `mac=` the kernel picks a random address.
//!
//! The daemon and vde transports connect to their switch while the kernel boots: a daemon guest
//! whose control socket is missing boots without that interface, and one whose switch accepts
//! but never answers does not finish booting. The vector (BESS) transport connects only when
//! the interface is brought up. Inside the guest, busybox applets
//! come first in `PATH`, so `ip` and `ping` are busybox's.
//!
//! # Process lifetime
//!
//! UML forks helper processes (one per guest address space, plus I/O helpers) that do not die
//! with the main process on their own. So UML runs as PID 1 of a fresh PID namespace under
//! `unshare --pid --fork --kill-child`: when `unshare` dies, the kernel kills UML, and with it
//! the namespace and every helper. The harness kills `unshare`'s process group on drop, and
//! `unshare` also dies with the test thread (see [`crate::process::isolate`]), so a test binary
//! killed by a CI timeout leaves no guest behind either.
//!
//! # Memory
//!
//! UML sizes its physical memory as `mem=` plus the gap between the end of its own binary and
//! the start of its heap, and the host places a 64-bit program's heap anywhere in a gigabyte
//! past its binary. The page descriptors for a large gap come out of the guest's memory: a
//! 64 MiB guest had anywhere from 34 to 53 MiB free after boot. The harness starts UML with
//! address-space randomization off, so the gap is small and the same on every boot.
//!
//! # Boot failures
//!
//! Now and then (about one boot in a hundred on a loaded two-core machine) Debian's UML 6.1
//! cannot create tasks from early in its boot: a crypto self-test thread fails to start
//! (a warning from `crypto_wait_for_test`), then init's first fork fails with "can't fork:
//! Resource temporarily unavailable" and the kernel panics. Nothing the guest is given
//! changes this; booting the same guest again works. So the harness stops waiting as soon as
//! a guest's kernel panics before its init is ready, says so on stderr, and boots it again, up
//! to [`BOOT_ATTEMPTS`] times. A kernel panic after boot is never retried.
//!
//! # Hosts with large FPU state
//!
//! The 6.1 kernel saves a guest process's FPU registers with `PTRACE_GETREGSET` and
//! `NT_X86_XSTATE` in a buffer of its own fixed size, while a host whose CPU has AMX wants the
//! whole, larger XSAVE area and refuses the write back with `EFAULT`: the guest's init dies at
//! its first system call ("ptrace set fp regs failed, errno = 14"). UML falls back to
//! `PTRACE_GETFPREGS` (the FXSAVE area, which every x86-64 host takes) when the `NT_X86_XSTATE`
//! request fails at boot, so the harness starts UML under a seccomp filter that fails exactly
//! those requests with `EIO`; everything else passes untouched. The FXSAVE area holds the SSE
//! registers but not the upper halves of the AVX ones, and those halves do not survive a page
//! fault: UML learns of a guest's fault from a signal handler in the guest's host process, the
//! host kernel starts that handler with the vector state reset, and UML puts back only the
//! FXSAVE part. A 32-byte copy that faults between its load and its store writes 16 zero
//! bytes. So the guest's programs are kept off AVX: `GLIBC_TUNABLES` on the kernel command line
//! reaches init's environment and turns off every feature glibc would pick an AVX or EVEX
//! string function for, `AVX_Fast_Unaligned_Load` included (without it `memcpy` stays on AVX
//! where the CPU has RTM). The same holds on every host, so guests behave alike on all of
//! them.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::{command_in, Netns};
use crate::process::{isolate, require_file, require_program, signal, tail};
use crate::temp::{unique_suffix, TempDir};

/// Printed by the init script once the command loop is about to start.
const READY_MARKER: &str = "UMNET-GUEST-READY\n";

/// What the kernel prints when it gives up.
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// Boots of one guest tried before a kernel panic at boot fails the test.
pub const BOOT_ATTEMPTS: u32 = 3;

/// Why a guest did not come up.
enum Boot {
    /// Its kernel panicked, with this line; another boot may well succeed.
    Panicked(String),
    /// Anything else, with the console quoted.
    Failed(anyhow::Error),
}

/// The default limit for [`Guest::run_ok`] and the helpers built on it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of console output quoted in error messages.
const TAIL_LINES: usize = 60;

/// The n_tty line discipline holds at most 4095 bytes of a line in canonical mode and drops
/// the rest, which would silently cut a command short.
const MAX_COMMAND_LEN: usize = 4000;

const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# Generated by umnet-tests (guest.rs). PID 1 of a UML guest whose root is the host's / (hostfs,
# read-only): set up a writable /run and a busybox PATH, then serve commands from the console.
# The host's /tmp stays visible (read-only), so a binary the tests built under /tmp runs here.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t tmpfs tmpfs /run
$bb mkdir -p /run/bin
$bb --install -s /run/bin
export PATH=/run/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/run
hostname "$UMNET_GUEST_NAME"
ip link set lo up
stty -echo -onlcr
echo 4 > /proc/sys/kernel/printk
echo UMNET-GUEST-READY
while read -r id secs cmd; do
    echo "UMNET-BEGIN $id"
    timeout -s KILL "$secs" sh -c "$cmd" </dev/null 2>&1
    echo "UMNET-END $id $?"
done
poweroff -f
"#;

/// Returns `52:54:00:00:00:NN`, a locally administered MAC for guest number `n`.
pub fn mac(n: u8) -> String {
    format!("52:54:00:00:00:{n:02x}")
}

/// What to boot: a name, interfaces, memory and optionally a network namespace.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    name: String,
    interfaces: Vec<String>,
    netns: Option<String>,
    mem: String,
    boot_timeout: Duration,
}

impl GuestConfig {
    /// A guest called `name` (letters, digits, `-` and `_`) with 64 MiB of memory and no
    /// interfaces.
    pub fn new(name: &str) -> GuestConfig {
        GuestConfig {
            name: name.to_owned(),
            interfaces: Vec::new(),
            netns: None,
            mem: "64M".to_owned(),
            // Booting takes 2-4 s on an idle machine; parallel tests on two cores take longer.
            boot_timeout: Duration::from_secs(60),
        }
    }

    /// Adds a raw kernel interface argument, e.g. `"eth1=vde,/run/x/net100"`.
    pub fn iface(mut self, spec: impl Into<String>) -> GuestConfig {
        self.interfaces.push(spec.into());
        self
    }

    /// Adds `ethN` on the uml_switch (daemon) protocol, control socket `ctl`.
    pub fn daemon(self, n: u32, mac: &str, ctl: &Path) -> GuestConfig {
        self.iface(format!("eth{n}=daemon,{mac},unix,{}", ctl.display()))
    }

    /// Adds `ethN` on the VDE protocol, switch directory `dir`.
    pub fn vde(self, n: u32, mac: &str, dir: &Path) -> GuestConfig {
        self.iface(format!("eth{n}=vde,{},{mac}", dir.display()))
    }

    /// Adds `vecN` on the vector driver's BESS transport, socket `sock`.
    pub fn bess(self, n: u32, mac: &str, sock: &Path) -> GuestConfig {
        self.iface(format!("vec{n}:transport=bess,dst={},mac={mac}", sock.display()))
    }

    /// Runs the guest (the UML process, and so its host-side sockets) inside `netns`.
    pub fn netns(mut self, netns: &Netns) -> GuestConfig {
        self.netns = Some(netns.name().to_owned());
        self
    }

    /// Sets the memory size, in UML's `mem=` syntax (e.g. `"128M"`).
    pub fn mem(mut self, mem: &str) -> GuestConfig {
        self.mem = mem.to_owned();
        self
    }

    /// Sets how long booting may take.
    pub fn boot_timeout(mut self, timeout: Duration) -> GuestConfig {
        self.boot_timeout = timeout;
        self
    }
}

/// Packet counts from one `ping` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
}

/// What the console reader threads have collected.
#[derive(Debug, Default)]
struct ConsoleText {
    stdout: String,
    stderr: String,
    stdout_closed: bool,
}

/// The guest's console output, shared with the threads that read it.
#[derive(Debug, Default)]
struct Console {
    text: Mutex<ConsoleText>,
    changed: Condvar,
}

impl Console {
    fn lock(&self) -> MutexGuard<'_, ConsoleText> {
        // A reader thread cannot panic while holding the lock, but if one did, the text is
        // still the best evidence there is.
        self.text.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_from(self: &Arc<Self>, mut source: impl Read + Send + 'static, is_stdout: bool) {
        let console = Arc::clone(self);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let bytes: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
                let chunk = String::from_utf8_lossy(&bytes);
                let mut text = console.lock();
                if is_stdout {
                    text.stdout.push_str(&chunk);
                } else {
                    text.stderr.push_str(&chunk);
                }
                console.changed.notify_all();
            }
            if is_stdout {
                console.lock().stdout_closed = true;
                console.changed.notify_all();
            }
        });
    }

    /// Waits until `find` returns a value for the stdout text, or the deadline passes, or the
    /// guest closes its stdout (it died).
    fn wait_for<T>(&self, deadline: Instant, mut find: impl FnMut(&str) -> Option<T>) -> Result<T> {
        let mut text = self.lock();
        loop {
            if let Some(value) = find(&text.stdout) {
                return Ok(value);
            }
            if text.stdout_closed {
                bail!("the guest's console closed (UML exited)");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("timed out");
            }
            text = self
                .changed
                .wait_timeout(text, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the guest has closed its stdout; false if the deadline passed first.
    fn wait_closed(&self, deadline: Instant) -> bool {
        let mut text = self.lock();
        while !text.stdout_closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            text = self
                .changed
                .wait_timeout(text, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A running UML guest; killed (with all its helper processes) on drop.
///
/// The child process the harness holds is `unshare` (or `ip netns exec`, which becomes it).
#[derive(Debug)]
pub struct Guest {
    name: String,
    child: Child,
    reaped: bool,
    stdin: Mutex<ChildStdin>,
    console: Arc<Console>,
    next_id: AtomicU64,
    boot_timeout: Duration,
    // Declared last: removed only after `drop` has killed UML, which writes into it.
    dir: TempDir,
}

impl Guest {
    /// Boots a guest and waits until its command loop is ready.
    pub fn boot(config: GuestConfig) -> Result<Guest> {
        let [guest] = Guest::boot_all([config])?;
        Ok(guest)
    }

    /// Boots several guests in parallel, which is faster than one after another:
    /// `let [g1, g2] = Guest::boot_all([config1, config2])?;`
    ///
    /// A guest whose kernel panics before its init is ready is booted again, up to
    /// [`BOOT_ATTEMPTS`] times in all; see "Boot failures" in the module docs.
    pub fn boot_all<const N: usize>(configs: [GuestConfig; N]) -> Result<[Guest; N]> {
        let mut guests = configs
            .iter()
            .map(|config| Guest::spawn(config.clone()))
            .collect::<Result<Vec<_>>>()?;
        for (guest, config) in guests.iter_mut().zip(&configs) {
            let mut attempt = 1;
            loop {
                match guest.wait_ready() {
                    Ok(()) => break,
                    Err(Boot::Panicked(line)) if attempt < BOOT_ATTEMPTS => {
                        eprintln!(
                            "umnet-tests: guest {}: the kernel panicked at boot ({line}); \
                             booting it again",
                            guest.name
                        );
                        attempt += 1;
                        // The new guest replaces the old one, which is killed as it drops.
                        *guest = Guest::spawn(config.clone())?;
                    }
                    Err(Boot::Panicked(_)) => {
                        return Err(guest
                            .error(&format!("the kernel panicked at boot, {BOOT_ATTEMPTS} times")))
                    }
                    Err(Boot::Failed(error)) => return Err(error),
                }
            }
        }
        guests.try_into().map_err(|_| anyhow!("booted a different number of guests than asked"))
    }

    fn spawn(config: GuestConfig) -> Result<Guest> {
        let uml = require_program("linux.uml", "user-mode-linux")?;
        require_file(Path::new("/bin/busybox"), "busybox-static")?;
        let name = config.name;
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name.is_empty() || !name.chars().all(valid) {
            bail!("guest name {name:?} must be letters, digits, '-' and '_'");
        }

        let dir = TempDir::new(&format!("g-{name}"))?;
        let init = dir.join("init.sh");
        std::fs::write(&init, INIT_SCRIPT).context("writing the guest init script")?;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
            .context("making the guest init script executable")?;

        // See "Process lifetime" in the module docs for why UML runs under unshare.
        let unshare = require_program("unshare", "util-linux")?;
        let mut command = command_in(config.netns.as_deref(), unshare)?;
        command
            .args(["--pid", "--fork", "--kill-child"])
            .arg(uml)
            .arg(format!("mem={}", config.mem))
            .args(["root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro"])
            .arg(format!("init={}", init.display()))
            .args(["con=null", "con0=fd:0,fd:1"])
            .arg(format!("umid=umnet-{name}-{}", unique_suffix()))
            .arg(format!("uml_dir={}", dir.path().display()))
            .args(&config.interfaces)
            // Unknown `NAME=value` arguments reach init as environment variables.
            .arg(format!("UMNET_GUEST_NAME={name}"))
            .arg(GUEST_GLIBC_TUNABLES)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        isolate(&mut command);
        without_xstate_ptrace(&mut command);
        without_address_randomization(&mut command);
        let mut child = command.spawn().with_context(|| format!("starting UML guest {name}"))?;

        let console = Arc::new(Console::default());
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("UML guest {name} was spawned without its console pipes");
        };
        console.read_from(stdout, true);
        console.read_from(stderr, false);
        Ok(Guest {
            name,
            child,
            reaped: false,
            stdin: Mutex::new(stdin),
            console,
            next_id: AtomicU64::new(1),
            boot_timeout: config.boot_timeout,
            dir,
        })
    }

    /// Waits for init's ready marker, and stops waiting early when the kernel panics (UML
    /// then spins rather than exit).
    fn wait_ready(&mut self) -> Result<(), Boot> {
        let deadline = Instant::now() + self.boot_timeout;
        let found = self.console.wait_for(deadline, |text| {
            if text.contains(READY_MARKER) {
                return Some(None);
            }
            let panic = text.lines().find(|line| line.contains(PANIC_MARKER))?;
            Some(Some(panic.trim().to_owned()))
        });
        match found {
            Ok(None) => Ok(()),
            Ok(Some(panic)) => Err(Boot::Panicked(panic)),
            Err(err) => Err(Boot::Failed(self.error(&format!("boot did not finish: {err}")))),
        }
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a one-line shell command in the guest and returns its exit status and combined
    /// stdout and stderr.
    ///
    /// `timeout` is enforced inside the guest (the command is killed, status 137) and, with a
    /// margin, by the harness. Commands run in a fresh `sh -c`, so `cd` or variables don't
    /// carry over, and with stdin from `/dev/null`.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        if command.contains('\n') || command.len() > MAX_COMMAND_LEN {
            bail!("guest commands must be one line of at most {MAX_COMMAND_LEN} bytes");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let secs = timeout.as_secs_f64().ceil().max(1.0);
        let begin = format!("UMNET-BEGIN {id}\n");
        let end = format!("UMNET-END {id} ");

        // The markers can only appear after the command is sent, so searching from the current
        // length is both correct and cheaper.
        let start = self.console.lock().stdout.len();
        {
            let mut stdin = self.stdin.lock().unwrap_or_else(PoisonError::into_inner);
            writeln!(stdin, "{id} {secs} {command}")
                .and_then(|()| stdin.flush())
                .map_err(|err| self.error(&format!("sending `{command}`: {err}")))?;
        }

        let deadline = Instant::now() + Duration::from_secs_f64(secs) + Duration::from_secs(5);
        let (status, output) = self
            .console
            .wait_for(deadline, |text| {
                let text = &text[start..];
                let output_start = text.find(&begin)? + begin.len();
                let output_len = text[output_start..].find(&end)?;
                let status_start = output_start + output_len + end.len();
                let status_len = text[status_start..].find('\n')?;
                let status = &text[status_start..status_start + status_len];
                let output = &text[output_start..output_start + output_len];
                Some((status.to_owned(), output.to_owned()))
            })
            .map_err(|err| self.error(&format!("running `{command}`: {err}")))?;
        let status = status
            .parse()
            .map_err(|_| self.error(&format!("`{command}` ended with bad status {status:?}")))?;
        Ok((status, output))
    }

    /// Runs `command` with [`RUN_TIMEOUT`] and returns its output; a non-zero status is an
    /// error quoting the output.
    pub fn run_ok(&self, command: &str) -> Result<String> {
        let (status, output) = self.run(command, RUN_TIMEOUT)?;
        if status != 0 {
            return Err(self.error(&format!("`{command}` exited with {status}:\n{output}")));
        }
        Ok(output)
    }

    /// Brings `iface` up and adds the address `cidr` (e.g. `"10.0.0.1/24"`).
    pub fn ip(&self, iface: &str, cidr: &str) -> Result<()> {
        self.run_ok(&format!("ip link set {iface} up && ip addr add {cidr} dev {iface}"))?;
        Ok(())
    }

    /// The MAC address of `iface`, as `aa:bb:cc:dd:ee:ff`.
    pub fn mac(&self, iface: &str) -> Result<String> {
        Ok(self.run_ok(&format!("cat /sys/class/net/{iface}/address"))?.trim().to_owned())
    }

    /// Sends `count` pings to `addr`, one per second, and reports how many were answered.
    pub fn ping(&self, addr: &str, count: u32) -> Result<PingStats> {
        // -W: how long to wait for replies after the last request.
        let command = format!("ping -c {count} -W 2 {addr}");
        let timeout = Duration::from_secs(u64::from(count) + 10);
        let (_, output) = self.run(&command, timeout)?;
        parse_ping(&output).ok_or_else(|| self.error(&format!("unexpected ping output:\n{output}")))
    }

    /// Whether `addr` answers a ping; tries up to five times, so a first request lost while
    /// ARP resolves (or a switch learns) does not count as failure.
    pub fn ping_ok(&self, addr: &str) -> Result<bool> {
        for _ in 0..5 {
            if self.ping(addr, 1)?.received > 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Everything the guest printed: kernel boot messages and command I/O on stdout, then what
    /// UML printed to stderr.
    pub fn console_log(&self) -> String {
        let text = self.console.lock();
        format!("{}\n--- UML stderr ---\n{}", text.stdout, text.stderr)
    }

    /// Kills the guest at once (as a crash would) and waits until all its processes are gone.
    pub fn kill(&mut self) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        signal(self.child.id(), libc::SIGKILL, true);
        self.child.wait().with_context(|| format!("reaping UML guest {}", self.name))?;
        self.reaped = true;

        // Every UML process holds the console pipe, so its closing means the last one is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        if !self.console.wait_closed(deadline) {
            bail!("UML guest {}: processes still alive 10 s after SIGKILL", self.name);
        }
        Ok(())
    }

    /// The directory holding the guest's init script and UML's `uml_dir`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An error about this guest, carrying the tail of its console.
    fn error(&self, message: &str) -> anyhow::Error {
        let text = self.console.lock();
        let mut report = format!(
            "guest {}: {message}\n--- last console lines ---\n{}",
            self.name,
            tail(&text.stdout, TAIL_LINES)
        );
        if !text.stderr.trim().is_empty() {
            report.push_str("\n--- UML stderr ---\n");
            report.push_str(&tail(&text.stderr, TAIL_LINES));
        }
        anyhow!(report)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Err(err) = self.kill() {
            eprintln!("umnet-tests: {err:#}");
        }
    }
}

/// Reads busybox's summary line, `N packets transmitted, M packets received, ...`.
fn parse_ping(output: &str) -> Option<PingStats> {
    let line = output.lines().find(|line| line.contains("packets transmitted"))?;
    let mut numbers = line.split(',').map(|part| part.split_whitespace().next()?.parse().ok());
    Some(PingStats { transmitted: numbers.next()??, received: numbers.next()?? })
}

/// Keeps glibc in the guest off AVX, whose registers UML no longer saves in full; with these,
/// every string function glibc 2.36 has picks its SSE2 or SSE4.2 version.
pub const GUEST_GLIBC_TUNABLES: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,\
    -AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-EVEX,-FMA,-AVX_VNNI,-AVX_Fast_Unaligned_Load";

/// Starts `command` (and what it runs) with address-space randomization off; see "Memory" in
/// the module docs of [`crate::guest`].
pub fn without_address_randomization(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;

    // SAFETY: the closure runs between fork and exec and makes only personality(2) calls.
    unsafe {
        command.pre_exec(|| {
            // 0xffff_ffff reads the persona without changing it.
            let current = libc::personality(0xffff_ffff);
            let wanted = current as libc::c_ulong | libc::ADDR_NO_RANDOMIZE as libc::c_ulong;
            if current == -1 || libc::personality(wanted) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `command` and its children see `ptrace(PTRACE_GETREGSET or PTRACE_SETREGSET, pid,
/// NT_X86_XSTATE, ..)` fail with `EIO`, so UML uses the FXSAVE area instead; see "Hosts with
/// large FPU state" in the module docs.
pub fn without_xstate_ptrace(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;

    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const PTRACE_GETREGSET: u32 = 0x4204;
    const PTRACE_SETREGSET: u32 = 0x4205;
    const NT_X86_XSTATE: u32 = 0x202;
    // Offsets in struct seccomp_data: nr, arch, then args[6] from byte 16 (low halves first on
    // little-endian x86-64).
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0: u32 = 16;
    const ARG2: u32 = 32;
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    // Jumps count instructions skipped: each test falls through on a match where noted.
    let filter = [
        op(LOAD, 0, 0, ARCH),
        op(JEQ, 0, 7, AUDIT_ARCH_X86_64), // another ABI: allow
        op(LOAD, 0, 0, NR),
        op(JEQ, 0, 5, libc::SYS_ptrace as u32), // not ptrace: allow
        op(LOAD, 0, 0, ARG0),
        op(JEQ, 1, 0, PTRACE_GETREGSET),
        op(JEQ, 0, 2, PTRACE_SETREGSET), // another request: allow
        op(LOAD, 0, 0, ARG2),
        op(JEQ, 1, 0, NT_X86_XSTATE),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EIO as u32),
    ];
    // SAFETY: the closure runs between fork and exec and makes only prctl(2) calls, reading
    // `filter`, which the closure owns and which outlives both calls.
    unsafe {
        command.pre_exec(move || {
            let program =
                libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_busybox_ping_summary() {
        let output = "PING 10.9.0.2 (10.9.0.2): 56 data bytes\n\n--- 10.9.0.2 ping statistics \
                      ---\n2 packets transmitted, 1 packets received, 50% packet loss\n";
        assert_eq!(parse_ping(output), Some(PingStats { transmitted: 2, received: 1 }));
        assert_eq!(parse_ping("ping: bad address 'x'"), None);
    }

    #[test]
    fn interface_specs_use_kernel_syntax() {
        let config = GuestConfig::new("g")
            .daemon(0, &mac(1), Path::new("/r/net1/ctl"))
            .vde(1, &mac(2), Path::new("/r/net1"))
            .bess(0, &mac(3), Path::new("/r/net1/bess"));
        assert_eq!(
            config.interfaces,
            [
                "eth0=daemon,52:54:00:00:00:01,unix,/r/net1/ctl",
                "eth1=vde,/r/net1,52:54:00:00:00:02",
                "vec0:transport=bess,dst=/r/net1/bess,mac=52:54:00:00:00:03",
            ]
        );
    }
}
