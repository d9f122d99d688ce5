//! The one-command lab (`deploy/lab.sh`): three hosts, two UML guests each on networks 100 and
//! 101; every guest reaches every other guest of its network and none of the other, through
//! the consoles the script prints.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use umnet_tests::process::run;
use umnet_tests::{umnet_bin, TempDir};

/// `deploy/lab.sh` of this checkout.
fn lab_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab.sh")
}

/// A lab brought up in `dir`; torn down on drop, also when the test fails.
struct Lab {
    dir: PathBuf,
    _scratch: TempDir,
}

impl Lab {
    fn up(hosts: u32, guests: u32, nets: &str) -> Result<Lab> {
        let scratch = TempDir::new("lab")?;
        let dir = scratch.join("lab");
        let lab = Lab { dir: dir.clone(), _scratch: scratch };
        let mut command = Command::new(lab_script());
        command.arg("up").args(["--hosts", &hosts.to_string(), "--guests", &guests.to_string()]);
        command.args(["--nets", nets]).arg("--dir").arg(&dir).arg("--umnet").arg(umnet_bin()?);
        // The guests lab.sh boots inherit the filter; see "Hosts with large FPU state" in
        // `umnet_tests::guest`.
        umnet_tests::guest::without_xstate_ptrace(&mut command);
        let output = run(&mut command, Duration::from_secs(300))?;
        if !output.status.success() {
            bail!(
                "lab.sh up failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(printed.contains("screen /dev/pts/"), "no console instructions:\n{printed}");
        Ok(lab)
    }

    /// (name, network, address, console) of every guest, from `guests.tsv`.
    fn guests(&self) -> Result<Vec<(String, String, String, String)>> {
        let table = std::fs::read_to_string(self.dir.join("guests.tsv"))?;
        Ok(table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [name, _host, net, address, console] = fields[..] else { return None };
                Some((name.into(), net.into(), address.into(), console.into()))
            })
            .collect())
    }

    fn down(&self) -> Result<String> {
        let mut command = Command::new(lab_script());
        command.arg("down").arg("--dir").arg(&self.dir);
        let output = run(&mut command, Duration::from_secs(60))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.dir.join("lab.env").exists() {
            if let Err(error) = self.down() {
                eprintln!("umnet-tests: lab.sh down failed: {error:#}");
            }
        }
    }
}

/// A guest's serial console on a host pty, as a person would use it with screen.
struct Console {
    pty: File,
    next: u32,
}

impl Console {
    fn open(path: &str) -> Result<Console> {
        let pty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("opening console {path}"))?;
        // SAFETY: termios is plain old data, filled by tcgetattr on a descriptor we hold.
        unsafe {
            let mut settings: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(pty.as_raw_fd(), &mut settings) == 0 {
                settings.c_lflag &= !(libc::ECHO | libc::ICANON);
                libc::tcsetattr(pty.as_raw_fd(), libc::TCSANOW, &settings);
            }
        }
        Ok(Console { pty, next: 1 })
    }

    /// Runs `command` in the guest's shell and returns its exit status.
    fn status(&mut self, command: &str) -> Result<i32> {
        let id = self.next;
        self.next += 1;
        // The shell echoes the line it reads, so the marker is computed, not typed.
        let line = format!("{command} >/dev/null 2>&1; echo DONE-$(({id}+0))-$?\n");
        self.pty.write_all(line.as_bytes())?;
        let marker = format!("DONE-{id}-");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = String::new();
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline {
            match self.pty.read(&mut buffer) {
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buffer[..n])),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(error).context("reading a console"),
            }
            if let Some(at) = seen.find(&marker) {
                let rest = &seen[at + marker.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if rest.len() > digits.len() && !digits.is_empty() {
                    return Ok(digits.parse()?);
                }
            }
        }
        bail!("no answer to {command:?}; the console said:\n{seen}")
    }
}

#[test]
fn a_three_host_lab_connects_each_network_and_nothing_across() -> Result<()> {
    let lab = Lab::up(3, 2, "100,101")?;
    let guests = lab.guests()?;
    assert_eq!(guests.len(), 6, "{guests:?}");
    let mut consoles: Vec<Console> =
        guests.iter().map(|(_, _, _, pty)| Console::open(pty)).collect::<Result<_>>()?;

    let mut wrong = Vec::new();
    for (i, (from, from_net, _, _)) in guests.iter().enumerate() {
        for (to, to_net, address, _) in guests.iter().filter(|g| g.0 != *from) {
            let same = from_net == to_net;
            // Within a network a first echo may wait for ARP and learning: allow retries.
            let tries = if same { "-c 3 -w 4" } else { "-c 1 -W 1" };
            let reached = consoles[i].status(&format!("ping {tries} {address}"))? == 0;
            if reached != same {
                wrong.push(format!("{from} (net {from_net}) -> {to} (net {to_net}): {reached}"));
            }
        }
    }
    assert!(wrong.is_empty(), "reachability is wrong:\n{}", wrong.join("\n"));

    let said = lab.down()?;
    assert!(said.contains("torn down"), "{said}");
    let namespaces = umnet_tests::netns::ip(&["netns", "list"])?;
    assert!(!namespaces.contains("umlab"), "namespaces left behind: {namespaces}");
    assert!(!lab.dir.exists(), "the lab directory was left behind");
    Ok(())
}
