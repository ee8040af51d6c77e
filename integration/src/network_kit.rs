//! Test kit for berth-network: a slot of the test address pool (unique bridge names, subnets
//! and iptables chains per test, also across test processes), network namespaces, the real
//! `berth-network` binary on temp dirs, and cleanup of every kernel object they create, on
//! drop, so also when a test fails.
//!
//! Slots: `10.213.0.0/16` is cut into 64 slots of a /22. Slot `i` owns `10.213.4i.0/22`:
//! the default bridge `btn<i>` with `10.213.4i.1/24`, explicit test subnets in
//! `10.213.(4i+1).0/24` ([`NetSlot::subnet`]) and the default address pool
//! `10.213.(4i+2).0/23` cut into /26s. A slot is claimed by creating a directory under
//! `/run/berth-test-netslots` (atomic) holding the claimer's PID; a slot whose claimer died is
//! cleaned and reused.
//!
//! A stack test can use a slot for its `[network]` section too: `Stack::builder()
//! .toml(&slot.config_toml(None))` keeps parallel stacks off each other's bridges and rules,
//! and dropping the slot removes what that stack's berth-network left in the kernel.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use berth_proto::berth::network::v1::networks_client::NetworksClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const SLOT_DIR: &str = "/run/berth-test-netslots";
const SLOTS: u16 = 64;

/// True (after printing why) when the test cannot run here: it needs root and the host
/// programs `ip`, `iptables`, `busybox` and `curl`.
pub fn skip_unless_root_with_net_tools() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: network tests need root (they create namespaces, bridges and rules)");
        return true;
    }
    for program in ["ip", "iptables-save", "iptables-restore", "busybox", "curl"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("skipping: {program} is not installed");
            return true;
        }
    }
    false
}

/// Runs a command and returns its output, failing when it cannot start.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A claimed slot of the test pool.
#[derive(Debug)]
pub struct NetSlot {
    index: u16,
    claim: PathBuf,
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

impl NetSlot {
    /// Claims a free slot, cleaning up after slots whose owner died.
    pub fn claim() -> Result<Self> {
        std::fs::create_dir_all(SLOT_DIR)?;
        Self::sweep();
        let start = (std::process::id() as u16).wrapping_mul(7) % SLOTS;
        for attempt in 0..SLOTS * 2 {
            let index = (start + attempt) % SLOTS;
            let claim = Path::new(SLOT_DIR).join(index.to_string());
            match std::fs::create_dir(&claim) {
                Ok(()) => {
                    std::fs::write(claim.join("pid"), std::process::id().to_string())?;
                    let slot = Self { index, claim };
                    // Whatever a crashed earlier user of the slot left behind.
                    slot.cleanup();
                    return Ok(slot);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(claim.join("pid"))
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok());
                    // A claim without a PID file may be half made: leave it to its maker
                    // unless it is old.
                    let stale = match owner {
                        Some(pid) => !pid_alive(pid),
                        None => std::fs::metadata(&claim)
                            .and_then(|m| m.modified())
                            .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
                            .unwrap_or(false),
                    };
                    if stale {
                        let _ = std::fs::remove_dir_all(&claim);
                    }
                }
                Err(e) => return Err(e).context("claim a test network slot"),
            }
        }
        bail!("no free test network slot in {SLOT_DIR}")
    }

    /// Cleans up and frees every slot whose owner is dead (a test process that was killed
    /// before its guards ran).
    fn sweep() {
        let Ok(entries) = std::fs::read_dir(SLOT_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(index) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u16>().ok())
            else {
                continue;
            };
            let owner = std::fs::read_to_string(entry.path().join("pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if owner.is_some_and(|pid| !pid_alive(pid)) {
                // Dropping it cleans the kernel objects and removes the claim.
                drop(Self {
                    index,
                    claim: entry.path(),
                });
            }
        }
    }

    /// The slot number.
    pub fn index(&self) -> u16 {
        self.index
    }

    fn octet(&self, n: u16) -> u16 {
        self.index * 4 + n
    }

    /// A name unique to this slot: `btn<i><suffix>` (short: interface names have 15 bytes).
    pub fn name(&self, suffix: &str) -> String {
        format!("btn{}{suffix}", self.index)
    }

    /// The default bridge of a stack in this slot.
    pub fn default_bridge(&self) -> String {
        self.name("")
    }

    /// The prefix of the stack's iptables chains (derived from the default bridge).
    pub fn chain_prefix(&self) -> String {
        format!("BERTH-{}", self.default_bridge().to_ascii_uppercase())
    }

    /// The whole /22 of the slot.
    pub fn range(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 213, self.octet(0) as u8, 0), 22)
    }

    /// The `n`th explicit test subnet (a /28, `n` < 16).
    pub fn subnet(&self, n: u8) -> String {
        assert!(n < 16);
        format!("10.213.{}.{}/28", self.octet(1), n * 16)
    }

    /// A loopback address unique to the slot, e.g. for a fake upstream DNS server on port 53.
    pub fn loopback(&self) -> Ipv4Addr {
        Ipv4Addr::new(127, 213, self.index as u8, 1)
    }

    /// The `[network]` section of a berth.toml for this slot. `dns`: upstream resolvers.
    /// Add more `[network]` keys by appending lines right after it.
    pub fn config_toml(&self, dns: Option<&[Ipv4Addr]>) -> String {
        let dns = dns
            .map(|d| {
                d.iter()
                    .map(|ip| format!("\"{ip}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        format!(
            "[network]\nbridge = \"{}\"\nbip = \"10.213.{}.1/24\"\n\
             default_address_pools = [{{ base = \"10.213.{}.0/23\", size = 26 }}]\n\
             dns = [{dns}]\n",
            self.default_bridge(),
            self.octet(0),
            self.octet(2),
        )
    }

    /// Removes every bridge, veth and iptables rule of the slot (and namespaces named after
    /// it). Safe to call any time; errors are ignored.
    pub fn cleanup(&self) {
        cleanup_iptables(&self.chain_prefix());
        let (net, prefix) = self.range();
        for bridge in bridges_in(net, prefix)
            .into_iter()
            .chain([self.default_bridge()])
        {
            for port in links(&["master", &bridge]) {
                let _ = run(Command::new("ip").args(["link", "del", &port]));
            }
            let _ = run(Command::new("ip").args(["link", "del", &bridge]));
        }
        let mine = self.name("-");
        if let Ok(out) = run(Command::new("ip").args(["netns", "list"])) {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&mine) {
                    let _ = run(Command::new("ip").args(["netns", "del", name]));
                    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
                }
            }
        }
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        self.cleanup();
        let _ = std::fs::remove_dir_all(&self.claim);
    }
}

/// Names of links (`ip -j link show <filter>`).
pub fn links(filter: &[&str]) -> Vec<String> {
    let Ok(out) = run(Command::new("ip").args(["-j", "link", "show"]).args(filter)) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// Bridges with an IPv4 address inside `net/prefix`.
fn bridges_in(net: Ipv4Addr, prefix: u8) -> Vec<String> {
    let Ok(out) = run(Command::new("ip").args(["-j", "-4", "addr", "show", "type", "bridge"]))
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["addr_info"].as_array().into_iter().flatten().any(|a| {
                a["local"]
                    .as_str()
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
                    .is_some_and(|ip| u32::from(ip) & mask == u32::from(net))
            })
        })
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// Deletes every iptables rule whose comment starts with the lowercase `prefix` and every
/// chain named `<prefix>-*`.
pub fn cleanup_iptables(prefix: &str) {
    let tag = format!("{}:", prefix.to_ascii_lowercase());
    let chain_prefix = format!("{prefix}-");
    for table in ["nat", "filter"] {
        let Ok(out) = run(Command::new("iptables-save").args(["-t", table])) else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut script = format!("*{table}\n");
        let mut chains = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(':') {
                let name = rest.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&chain_prefix) {
                    chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or_default();
                if !chain.starts_with(&chain_prefix) && line.contains(&format!("\"{tag}")) {
                    script.push_str(&format!("-D {rest}\n"));
                }
            }
        }
        for c in &chains {
            script.push_str(&format!("-F {c}\n"));
        }
        for c in &chains {
            script.push_str(&format!("-X {c}\n"));
        }
        script.push_str("COMMIT\n");
        if script.lines().count() > 2 {
            let mut child = match Command::new("iptables-restore")
                .args(["-w", "5", "--noflush"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(_) => continue,
            };
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(script.as_bytes());
            }
            let _ = child.wait();
        }
    }
}

/// The current ruleset (`iptables-save` of nat and filter).
pub fn iptables_save() -> String {
    ["nat", "filter"]
        .iter()
        .filter_map(|t| run(Command::new("iptables-save").args(["-t", t])).ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A network namespace made with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name.
    pub name: String,
    /// `/run/netns/<name>`.
    pub path: PathBuf,
}

impl Netns {
    /// Creates `name` (use [`NetSlot::name`] so leftovers can be found).
    pub fn new(name: &str) -> Result<Self> {
        let _ = run(Command::new("ip").args(["netns", "del", name]));
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Self {
            name: name.into(),
            path: Path::new("/run/netns").join(name),
        })
    }

    /// `ip netns exec <name> <args>`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs `args` inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run(&mut self.cmd(args))
    }

    /// The resolv.conf `ip netns exec` mounts over /etc/resolv.conf inside.
    pub fn set_resolv_conf(&self, nameservers: &[String]) -> Result<()> {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        let text: String = nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

/// A child process killed (by its PID) on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `busybox httpd` on port 80 inside `ns`, serving `body` as /index.html.
pub fn start_httpd(ns: &Netns, dir: &Path, body: &str) -> Result<ChildGuard> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("index.html"), body)?;
    let child = ns
        .cmd(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
            &dir.display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let guard = ChildGuard(child);
    // Ready when it accepts a connection inside the namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if curl(Some(ns), "127.0.0.1:80").is_ok() {
            return Ok(guard);
        }
        ensure!(
            Instant::now() < deadline,
            "httpd in {} did not start",
            ns.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` of `http://<addr>/` from the host (or from `ns`), with a short timeout.
pub fn curl(ns: Option<&Netns>, addr: &str) -> Result<String> {
    let args = ["curl", "-sS", "--max-time", "3", &format!("http://{addr}/")].map(str::to_string);
    let mut cmd = match ns {
        Some(ns) => ns.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
        None => {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        }
    };
    run_ok(&mut cmd)
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Where the berth binaries are: `$BERTH_BIN_DIR`, else the workspace's `target/debug`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BERTH_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo build -p {name}) or set BERTH_BIN_DIR",
        path.display()
    );
    path
}

/// The real `berth-network` on temp dirs, with the slot's `[network]` config.
#[derive(Debug)]
pub struct NetworkDaemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NetworkDaemon {
    /// Writes a config (the slot's `[network]` section plus the `[network]` keys in
    /// `extra_network`) and starts the daemon; returns when it answers health checks.
    pub async fn start(
        slot: &NetSlot,
        dns: Option<&[Ipv4Addr]>,
        extra_network: &str,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-net-").tempdir()?;
        std::fs::write(
            dir.path().join("berth.toml"),
            format!("{}{extra_network}\n", slot.config_toml(dns)),
        )?;
        let mut d = Self { dir, child: None };
        d.spawn().await?;
        Ok(d)
    }

    /// The data root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("state/network.sock")
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client of the Networks API.
    pub fn client(&self) -> NetworksClient<berth_core::uds::Channel> {
        NetworksClient::new(berth_core::uds::channel(self.socket()))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("network.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        // The daemon writes its PID file before it binds (and so creates) the state dir.
        std::fs::create_dir_all(self.dir.path().join("state"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("network.log"))?;
        let mut cmd = Command::new(bin("berth-network"));
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
        // async-signal-safe; it allocates nothing and takes no locks.
        unsafe {
            // A test process killed outright takes its daemon with it (its guards never run).
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.path().join("berth.toml"))
            .arg("--root")
            .arg(self.root())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .env("RUST_LOG", "berth_network=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start berth-network")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(berth_core::grpc::ServingStatus::Serving) =
                berth_core::grpc::check_health(&self.socket()).await
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("berth-network exited with {status}; log:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "berth-network did not come up; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `kill -9` of the daemon (and reaping it).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same dirs.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn().await
    }
}

impl Drop for NetworkDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fake upstream DNS server on `addr:53` (UDP) that answers every A question with
/// `answer`, for testing forwarding without any external network. Runs until dropped.
#[derive(Debug)]
pub struct FakeUpstream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Starts the server.
    pub fn start(addr: Ipv4Addr, answer: Ipv4Addr) -> Result<Self> {
        let sock = UdpSocket::bind((addr, 53)).with_context(|| format!("bind {addr}:53"))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if n < 12 {
                    continue;
                }
                // Echo the question and append one A record pointing at `answer`.
                let mut reply = buf[..n].to_vec();
                reply[2] = 0x81;
                reply[3] = 0x80;
                reply[6..8].copy_from_slice(&1u16.to_be_bytes());
                reply[8..12].fill(0);
                // Drop any additional records (EDNS) the question carried.
                let mut pos = 12;
                while pos < n && buf[pos] != 0 {
                    pos += buf[pos] as usize + 1;
                }
                reply.truncate(pos + 5);
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer.octets());
                let _ = sock.send_to(&reply, peer);
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Asks the resolver at `server:53` for the A records of `name` (from the host).
pub fn dns_query(server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, (server, 53))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).context("no answer")?;
    let msg = &buf[..n];
    ensure!(
        n >= 12 && msg[3] & 0xf == 0,
        "dns error answer for {name}: rcode {}",
        msg.get(3).map_or(0, |b| b & 0xf)
    );
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // Names in answers are pointers here (2 bytes).
        pos += 2;
        let rtype = u16::from_be_bytes([msg[pos], msg[pos + 1]]);
        let len = u16::from_be_bytes([msg[pos + 8], msg[pos + 9]]) as usize;
        pos += 10;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(
                msg[pos],
                msg[pos + 1],
                msg[pos + 2],
                msg[pos + 3],
            ));
        }
        pos += len;
    }
    Ok(out)
}

/// A container id (64 hex) for test container `n`.
pub fn container_id(n: u32) -> String {
    format!("c0ffee{n:058x}")
}

/// A bridge network: `subnet` given, or one from the slot's default address pool.
pub async fn create_network(
    client: &mut NetworksClient<berth_core::uds::Channel>,
    name: &str,
    subnet: Option<&str>,
) -> Result<berth_proto::berth::network::v1::Network> {
    use berth_proto::berth::network::v1::{CreateNetworkRequest, Ipam, IpamPool};
    let ipam = subnet.map(|s| Ipam {
        driver: String::new(),
        pools: vec![IpamPool {
            subnet: s.to_string(),
            ..Default::default()
        }],
        options: Default::default(),
    });
    let resp = client
        .create(CreateNetworkRequest {
            name: name.into(),
            ipam,
            ..Default::default()
        })
        .await
        .with_context(|| format!("create network {name}"))?
        .into_inner();
    resp.network.context("no network in the response")
}

/// Attaches `ns` as container `n` named `name` to `network`, publishing `ports`
/// (`(host_ip, host_port, container_port)`, TCP).
pub async fn attach(
    client: &mut NetworksClient<berth_core::uds::Channel>,
    n: u32,
    name: &str,
    ns: &Netns,
    network: &str,
    ports: &[(&str, u16, u16)],
) -> std::result::Result<berth_proto::berth::network::v1::Attachment, tonic::Status> {
    use berth_proto::berth::network::v1::AttachRequest;
    use berth_proto::berth::types::v1::{PortMapping, Protocol};
    let port_mappings = ports
        .iter()
        .map(|(ip, host, ctr)| PortMapping {
            host_ip: ip.to_string(),
            host_port: *host as u32,
            container_port: *ctr as u32,
            protocol: Protocol::Tcp as i32,
            host_port_end: 0,
        })
        .collect();
    let resp = client
        .attach(AttachRequest {
            container_id: container_id(n),
            container_name: name.into(),
            hostname: name.into(),
            netns_path: ns.path.display().to_string(),
            network: network.into(),
            port_mappings,
            ..Default::default()
        })
        .await?
        .into_inner();
    resp.attachment
        .ok_or_else(|| tonic::Status::internal("no attachment in the response"))
}

/// Removes the portmap plugin's shared chains (which it never deletes) once no pod on this
/// host uses them any more.
#[derive(Debug)]
pub struct PortmapChains;

impl Drop for PortmapChains {
    fn drop(&mut self) {
        let ipt = |args: &[&str]| {
            Command::new("iptables")
                .args(["-w", "-t", "nat"])
                .args(args)
                .output()
        };
        let in_use = ipt(&["-S", "CNI-HOSTPORT-DNAT"])
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count() > 1)
            .unwrap_or(false);
        if in_use {
            return;
        }
        for (chain, rule) in [
            ("PREROUTING", "CNI-HOSTPORT-DNAT"),
            ("OUTPUT", "CNI-HOSTPORT-DNAT"),
        ] {
            let _ = ipt(&[
                "-D",
                chain,
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-j",
                rule,
            ]);
        }
        let _ = ipt(&[
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "CNI portfwd requiring masquerade",
            "-j",
            "CNI-HOSTPORT-MASQ",
        ]);
        for chain in [
            "CNI-HOSTPORT-DNAT",
            "CNI-HOSTPORT-MASQ",
            "CNI-HOSTPORT-SETMARK",
        ] {
            let _ = ipt(&["-F", chain]);
            let _ = ipt(&["-X", chain]);
        }
    }
}
