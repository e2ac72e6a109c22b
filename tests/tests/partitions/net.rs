//! A private network for one test: the test's thread moves into a network namespace of its own
//! (the "world": broker, clearing, gates, PLC simulators and the test itself), and each controller
//! runs in a namespace of its own, joined to the world by a veth pair on a bridge. Addresses exist
//! only inside these namespaces (10.200.0.0/24); the machine's own networks are never touched.
//!
//! A partition is a pair of nftables drop rules (input from, output to the cut-off addresses) in
//! one controller's namespace: packets vanish silently, as on a cut cable, and healing deletes the
//! table.

use std::process::{Command, Stdio};

use anyhow::Context as _;

/// The world's address on the bridge: the clearing server and the test's own HTTP clients.
pub const HUB: &str = "10.200.0.254";
/// The broker's own address in the world, so it can be cut off without cutting clearing.
pub const BROKER: &str = "10.200.0.253";

/// Controller `id`'s address (inside its namespace).
pub fn node_ip(id: u16) -> String {
    format!("10.200.0.{id}")
}

/// Runs `program args…`; an error names the command and its stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        use std::io::Write as _;
        input.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {} {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Whether this machine can build the private network: root, `ip` (iproute2), `nft` (nftables)
/// and network namespaces. The reason when not.
pub fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)".into());
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg(if tool == "ip" { "-V" } else { "--version" })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("`{tool}` is missing (Debian package {pkg})"));
        }
    }
    let probe = format!("afcpart-{}-probe", std::process::id());
    run("ip", &["netns", "add", &probe], None).map_err(|e| format!("{e:#}"))?;
    let nft = run("ip", &["netns", "exec", &probe, "nft", "list", "tables"], None);
    let _ = run("ip", &["netns", "delete", &probe], None);
    nft.map_err(|e| format!("nftables in a network namespace: {e:#}"))
}

/// The namespaces of one test, deleted on drop.
pub struct Net {
    world: String,
    nodes: Vec<String>,
}

impl Net {
    /// Creates the world and moves the calling thread into it (so every thread and process it
    /// starts from now on lives there), then one namespace per controller `1..=nodes`.
    pub fn enter(tag: &str, nodes: u16) -> anyhow::Result<Net> {
        let world = format!("afcpart-{}-{tag}", std::process::id());
        run("ip", &["netns", "add", &world], None)?;
        let mut net = Net { world: world.clone(), nodes: Vec::new() };
        let fd = std::fs::File::open(format!("/run/netns/{world}")).context("opening the world namespace")?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .context("entering the world namespace")?;
        // From here on `ip` and `nft` act on the world.
        run("ip", &["link", "set", "lo", "up"], None)?;
        run("ip", &["link", "add", "br0", "type", "bridge"], None)?;
        run("ip", &["addr", "add", &format!("{HUB}/24"), "dev", "br0"], None)?;
        run("ip", &["addr", "add", &format!("{BROKER}/24"), "dev", "br0"], None)?;
        run("ip", &["link", "set", "br0", "up"], None)?;
        for id in 1..=nodes {
            let ns = format!("{world}-c{id}");
            run("ip", &["netns", "add", &ns], None)?;
            net.nodes.push(ns.clone());
            let veth = format!("vc{id}");
            run("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns], None)?;
            run("ip", &["link", "set", &veth, "master", "br0", "up"], None)?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"], None)?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", node_ip(id)), "dev", "eth0"], None)?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"], None)?;
        }
        Ok(net)
    }

    /// The test's tag (part of every namespace's name).
    pub fn tag(&self) -> &str {
        self.world.rsplit('-').next().unwrap_or_default()
    }

    /// The namespace controller `id` runs in.
    pub fn node_ns(&self, id: u16) -> &str {
        &self.nodes[usize::from(id) - 1]
    }

    /// Cuts controller `id` off from `peers` (addresses), both ways, until [`Net::heal`].
    pub fn cut(&self, id: u16, peers: &[String]) -> anyhow::Result<()> {
        let set = peers.join(", ");
        let rules = format!(
            "table inet partition {{\n\
             chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        run("ip", &["netns", "exec", self.node_ns(id), "nft", "-f", "-"], Some(&rules))
    }

    /// Removes controller `id`'s partition rules.
    pub fn heal(&self, id: u16) -> anyhow::Result<()> {
        run("ip", &["netns", "exec", self.node_ns(id), "nft", "delete", "table", "inet", "partition"], None)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.world)) {
            let _ = run("ip", &["netns", "delete", ns], None);
        }
    }
}
