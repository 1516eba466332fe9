//! A compute node in a network namespace, for tests where the service
//! host (the root namespace, where controllers run) cannot open
//! connections to the node, as on many HPC clusters.
//!
//! [`NodeNamespace::create`] makes a namespace named
//! `berth-n{INDEX}-p{PID}` (PID: the test process), joined to the root
//! namespace by a veth pair on the subnet `10.214.{INDEX}.0/24`: the root
//! side `berth-h{INDEX}` has `.1`, the node side `eth0` has `.2`. An
//! nftables table in the node namespace accepts packets that arrive on
//! `eth0` only when they belong to a connection the node opened (conntrack
//! states established and related) and drops the rest. The node thus
//! reaches the controllers while the root namespace's connections to the
//! node time out.
//!
//! Creation checks the isolation itself and panics when it is not there.
//! Before the firewall, the root namespace must reach a listener in the
//! node, which shows that the link works. After it, the same connection
//! must fail while the node still reaches a listener in the root
//! namespace. The checks make their sockets in this process. A socket in
//! the node is made on a thread that enters the namespace (`setns`) for
//! that socket alone and then ends.
//!
//! Several tests, in one process or several, may make namespaces at the
//! same time. So the index is chosen under an exclusive lock on
//! [`LOCK_FILE`], and the namespace's name claims it. Under the same lock,
//! namespaces of this prefix whose process is gone (a killed test run) are
//! removed.
//! Dropping a [`NodeNamespace`] stops the processes in it (SIGTERM, then
//! SIGKILL after [`STOP_GRACE_PERIOD`]) and deletes the veth pair and the
//! namespace.
//!
//! Needs root, iproute2 and nftables.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;

/// The lock that makes choosing an index and creating its namespace one
/// step across test processes.
pub const LOCK_FILE: &str = "/run/berth-test-netns.lock";

/// Prefix of the namespaces this harness makes.
const NAMESPACE_PREFIX: &str = "berth-n";

/// Prefix of the root side's veth interfaces (at most 15 characters with
/// the index).
const HOST_LINK_PREFIX: &str = "berth-h";

/// The second octet of the subnets: `10.214.INDEX.0/24`.
const SUBNET_OCTET: u8 = 214;

/// Name of the node side of the veth pair, inside the namespace.
const NODE_LINK: &str = "eth0";

/// How long a connection from the root namespace to the node may take
/// before the check counts it as blocked. The check runs only after a
/// connection on the same link has succeeded.
const BLOCKED_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection that must succeed may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long processes left in the namespace get after SIGTERM.
pub const STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// The nftables table of the node namespace.
const FIREWALL: &str = "table inet berth_node {
    chain input {
        type filter hook input priority filter; policy accept;
        iifname \"eth0\" ct state established,related accept
        iifname \"eth0\" drop
    }
}
";

/// A compute node's network namespace, deleted when dropped.
#[derive(Debug)]
pub struct NodeNamespace {
    /// The namespace's name, for `ip netns exec`.
    pub name: String,
    /// The root namespace's address on the link: controllers listen here.
    pub host_address: Ipv4Addr,
    /// The node's address on the link.
    pub node_address: Ipv4Addr,
    host_link: String,
    /// A listener in the node that the isolation checks connect to. The
    /// kernel completes connections to it from its backlog, so nothing
    /// needs to accept them.
    listener: Option<TcpListener>,
}

impl NodeNamespace {
    /// Makes the namespace, its link and its firewall, and checks that the
    /// node reaches the root namespace while the root namespace cannot
    /// reach the node.
    pub fn create() -> NodeNamespace {
        let mut node = {
            let _lock = lock();
            remove_stale();
            let index = free_index();
            let name = format!("{NAMESPACE_PREFIX}{index}-p{}", std::process::id());
            run(&["ip", "netns", "add", &name]);
            NodeNamespace {
                name,
                host_address: Ipv4Addr::new(10, SUBNET_OCTET, index, 1),
                node_address: Ipv4Addr::new(10, SUBNET_OCTET, index, 2),
                host_link: format!("{HOST_LINK_PREFIX}{index}"),
                listener: None,
            }
        };
        node.add_link();

        let listener = node.listen_in_node();
        // Right after the link came up, this connection once took over a
        // second under load (likely a lost first SYN, which TCP sends again
        // after one second), so this check gets the longer timeout.
        connect_from_host(listener, CONNECT_TIMEOUT).unwrap_or_else(|error| {
            panic!("before the firewall, the root namespace failed to reach the node's listener at {listener}: {error}")
        });
        node.add_firewall();
        node.check_isolation(listener);
        node
    }

    /// Returns the command prefix that runs a program in the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(str::to_string)
            .to_vec()
    }

    /// Panics unless a connection from the node to `address` succeeds.
    pub fn assert_node_reaches(&self, address: SocketAddr) {
        if let Err(error) = self.connect_from_node(address) {
            panic!(
                "the node in {} failed to connect to {address}: {error}",
                self.name
            );
        }
    }

    /// Panics unless a connection from the root namespace to the node's
    /// listener fails.
    pub fn assert_host_cannot_reach_node(&self) {
        let listener = self
            .listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
            .expect("the node's listener is not open");
        if connect_from_host(listener, BLOCKED_CONNECT_TIMEOUT).is_ok() {
            panic!(
                "the root namespace connected to {listener} in {}: the firewall does not block connections to the node",
                self.name
            );
        }
    }

    /// Returns the command lines of the processes in the namespace, their
    /// arguments joined by spaces.
    pub fn process_command_lines(&self) -> Vec<String> {
        namespace_pids(&self.name)
            .into_iter()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .split('\0')
                    .filter(|argument| !argument.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    fn add_link(&self) {
        let host_cidr = format!("{}/24", self.host_address);
        let node_cidr = format!("{}/24", self.node_address);
        run(&[
            "ip",
            "link",
            "add",
            &self.host_link,
            "type",
            "veth",
            "peer",
            "name",
            NODE_LINK,
            "netns",
            &self.name,
        ]);
        run(&["ip", "addr", "add", &host_cidr, "dev", &self.host_link]);
        run(&["ip", "link", "set", &self.host_link, "up"]);
        run(&[
            "ip", "-n", &self.name, "addr", "add", &node_cidr, "dev", NODE_LINK,
        ]);
        run(&["ip", "-n", &self.name, "link", "set", NODE_LINK, "up"]);
        run(&["ip", "-n", &self.name, "link", "set", "lo", "up"]);
    }

    fn add_firewall(&self) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to run nft: install nftables");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("nft's stdin");
            stdin
                .write_all(FIREWALL.as_bytes())
                .expect("failed to write nft's rules");
        }
        let output = child.wait_with_output().expect("failed to wait for nft");
        assert!(
            output.status.success(),
            "nft failed to load the node's firewall in {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Opens a listener in the node on its link address and returns that
    /// address.
    fn listen_in_node(&mut self) -> SocketAddr {
        let address = SocketAddr::from((self.node_address, 0));
        let listener = self
            .in_namespace(move || TcpListener::bind(address))
            .unwrap_or_else(|error| {
                panic!("failed to listen on {address} in {}: {error}", self.name)
            });
        let address = listener
            .local_addr()
            .expect("failed to read the node's listener address");
        self.listener = Some(listener);
        address
    }

    /// Checks the isolation: the root namespace cannot reach `listener`,
    /// which the node itself still reaches, and the node reaches a listener
    /// in the root namespace.
    fn check_isolation(&self, listener: SocketAddr) {
        if connect_from_host(listener, BLOCKED_CONNECT_TIMEOUT).is_ok() {
            panic!(
                "with the firewall in place, the root namespace still connected to {listener} in {}",
                self.name
            );
        }
        self.connect_from_node(listener).unwrap_or_else(|error| {
            panic!("the node failed to connect to its own listener at {listener}, so the blocked connection proves nothing: {error}")
        });
        let host_listener = TcpListener::bind((self.host_address, 0))
            .expect("failed to listen on the root side of the link");
        let address = host_listener
            .local_addr()
            .expect("failed to read the root side's listener address");
        self.assert_node_reaches(address);
    }

    /// Opens one connection from the node to `address`.
    fn connect_from_node(&self, address: SocketAddr) -> std::io::Result<()> {
        self.in_namespace(move || TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map(drop))
    }

    /// Runs `work` on a thread of its own that first enters the namespace,
    /// so no other code of this process ever runs in it. Sockets keep the
    /// namespace they were made in after the thread ends.
    fn in_namespace<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let namespace = std::fs::File::open(&path)?;
        std::thread::spawn(move || {
            nix::sched::setns(&namespace, CloneFlags::CLONE_NEWNET)?;
            work()
        })
        .join()
        .expect("a thread in the node's namespace panicked")
    }
}

impl Drop for NodeNamespace {
    fn drop(&mut self) {
        self.listener = None;
        stop_processes(&self.name);
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Opens one connection from this process, in the root namespace.
fn connect_from_host(address: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    TcpStream::connect_timeout(&address, timeout).map(drop)
}

/// Takes the exclusive lock on [`LOCK_FILE`], held until the value drops.
fn lock() -> Flock<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|error| panic!("failed to open {LOCK_FILE}: {error}"));
    Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, errno)| panic!("failed to lock {LOCK_FILE}: {errno}"))
}

/// Parses `berth-n{INDEX}-p{PID}` into the index and the pid.
fn parse_namespace(name: &str) -> Option<(u8, u32)> {
    let (index, pid) = name.strip_prefix(NAMESPACE_PREFIX)?.split_once("-p")?;
    Some((index.parse().ok()?, pid.parse().ok()?))
}

/// Lists the namespaces of this harness, with their index and pid.
fn harness_namespaces() -> Vec<(String, u8, u32)> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("failed to run ip netns list: install iproute2");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let name = line.split_whitespace().next()?;
            let (index, pid) = parse_namespace(name)?;
            Some((name.to_string(), index, pid))
        })
        .collect()
}

/// Removes the namespaces, and veth links, that a process no longer
/// running left behind. Runs under the lock.
fn remove_stale() {
    for (name, index, pid) in harness_namespaces() {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing the network namespace {name} of the finished process {pid}");
            stop_processes(&name);
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{HOST_LINK_PREFIX}{index}")])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Returns the lowest index that no namespace of this harness claims and
/// whose subnet and link name the root namespace does not use.
fn free_index() -> u8 {
    let claimed: Vec<u8> = harness_namespaces()
        .into_iter()
        .map(|(_, index, _)| index)
        .collect();
    let routes = command_output(&["ip", "-4", "route", "show", "table", "all"]);
    let links = command_output(&["ip", "-o", "link", "show"]);
    (0..=u8::MAX)
        .find(|index| {
            let subnet = format!("10.{SUBNET_OCTET}.{index}.");
            let link = format!(": {HOST_LINK_PREFIX}{index}:");
            !claimed.contains(index) && !routes.contains(&subnet) && !links.contains(&link)
        })
        .expect("every subnet 10.214.0.0/24 to 10.214.255.0/24 is taken")
}

fn command_output(argv: &[&str]) -> String {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", argv.join(" ")));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command that must succeed.
fn run(argv: &[&str]) {
    let output = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|error| panic!("failed to run {}: {error}", argv.join(" ")));
    assert!(
        output.status.success(),
        "{} failed ({}): {}",
        argv.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Returns the pids of the processes in the namespace.
fn namespace_pids(name: &str) -> Vec<i32> {
    command_output(&["ip", "netns", "pids", name])
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// Stops every process in the namespace: SIGTERM, then SIGKILL for those
/// still running after [`STOP_GRACE_PERIOD`].
fn stop_processes(name: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    for pid in namespace_pids(name) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE_PERIOD;
    while !namespace_pids(name).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in namespace_pids(name) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
