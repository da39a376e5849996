//! The `SlowLink` fault: a host's links slowed to a few Mbit/s both ways,
//! by a token bucket on each end of each of its veths (netem is not
//! available here).
//!
//! The bucket's queue is the kernel's default one, `pfifo_fast`: three
//! bands served in strict order by the packet's priority, each as long (in
//! full-size packets) as the bucket's own FIFO would be (200 ms of the
//! rate). A sender's socket priority does not survive the hop into another
//! namespace, so the bridge (the switch) sets it again from the DSCP of
//! packets to the slowed host, as a network that honours DSCP does:
//! network control (CS6) goes first. Traffic that marks nothing shares the
//! middle band, a plain FIFO. It owns only the qdiscs, queue lengths and
//! nftables table it adds, and removes them when the link is healed.

use std::process::Command;

use anyhow::{bail, Context};

/// How long a full band takes to drain at the link's rate (tbf's `latency`).
const QUEUE_MS: u64 = 200;
/// The token bucket's burst, bytes (32 kbit).
const BURST_BYTES: u64 = 4000;
/// A full-size packet on these links.
const MTU: u64 = 1500;
/// A veth's queue length when nothing set it.
const DEFAULT_TXQUEUELEN: u32 = 1000;

/// The queue length, in packets, of each band at `mbit` Mbit/s: the bytes
/// tbf's own FIFO would hold, in full-size packets.
pub fn band_packets(mbit: u32) -> u32 {
    let bytes = u64::from(mbit) * 1_000_000 / 8 * QUEUE_MS / 1000 + BURST_BYTES;
    (bytes / MTU).max(2) as u32
}

/// The commands (`ip` or `tc` argument lists, with the program first) that
/// slow `dev` to `mbit` Mbit/s, in order.
pub fn commands(dev: &str, mbit: u32) -> Vec<Vec<String>> {
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    vec![
        words(&format!("ip link set dev {dev} txqueuelen {}", band_packets(mbit))),
        words(&format!(
            "tc qdisc replace dev {dev} root handle 1: tbf rate {mbit}mbit burst 32kbit latency {QUEUE_MS}ms"
        )),
        words(&format!("tc qdisc add dev {dev} parent 1:1 handle 10: pfifo_fast")),
    ]
}

/// The commands that undo `commands`.
pub fn heal(dev: &str) -> Vec<Vec<String>> {
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    vec![
        words(&format!("tc qdisc del dev {dev} root")),
        words(&format!("ip link set dev {dev} txqueuelen {DEFAULT_TXQUEUELEN}")),
    ]
}

/// The nftables script (for `nft -f -`, in the root namespace) by which the
/// bridge gives packets to `devs` marked DSCP CS6 the priority of network
/// control (TC_PRIO_INTERACTIVE, `pfifo_fast`'s first band).
pub fn dscp_rules(table: &str, devs: &[String]) -> String {
    let set: Vec<String> = devs.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "table bridge {table} {{\n chain forward {{\n  type filter hook forward priority 0; policy accept;\n  \
         oifname {{ {} }} ip dscp cs6 meta priority set 0:6\n }}\n}}\n",
        set.join(", ")
    )
}

/// Runs `args` (program first), in namespace `ns` or the root namespace.
fn run(ns: Option<&str>, args: &[String], input: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(args);
            c
        }
        None => {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        }
    };
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args[0]))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} (namespace {ns:?}): {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The root-namespace end of the veth `dev` of namespace `ns`.
pub fn outer_end(ns: &str, dev: &str) -> anyhow::Result<String> {
    let show = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("ip").args(args).output().context("running ip")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // "5: eth0@if123: <...": its peer is interface 123 of the root namespace.
    let inner = show(&["-n", ns, "-o", "link", "show", "dev", dev])?;
    let peer = inner
        .split_once("@if")
        .and_then(|(_, rest)| rest.split(':').next())
        .with_context(|| format!("{dev} in {ns} is not a veth: {inner}"))?;
    let all = show(&["-o", "link", "show"])?;
    all.lines()
        .find_map(|l| {
            let (index, rest) = l.split_once(": ")?;
            (index == peer).then(|| rest.split(['@', ':']).next().unwrap_or_default().to_string())
        })
        .with_context(|| format!("no interface {peer} (the peer of {dev} in {ns})"))
}

/// Slows (`Some(mbit)`) or heals (`None`) both ends of each device in
/// `devs` (inside namespace `ns`).
pub fn set(ns: &str, devs: &[String], mbit: Option<u32>) -> anyhow::Result<()> {
    let outers = devs.iter().map(|d| outer_end(ns, d)).collect::<anyhow::Result<Vec<String>>>()?;
    let table = format!("chaos_slow_{ns}");
    let ends = devs.iter().map(|d| (Some(ns), d)).chain(outers.iter().map(|d| (None, d)));
    match mbit {
        Some(r) => {
            for (space, dev) in ends {
                for args in commands(dev, r) {
                    run(space, &args, None)?;
                }
            }
            run(None, &["nft".into(), "-f".into(), "-".into()], Some(&dscp_rules(&table, &outers)))?;
        }
        // Already gone is healed too.
        None => {
            for (space, dev) in ends {
                for args in heal(dev) {
                    let _ = run(space, &args, None);
                }
            }
            let _ = run(None, &["nft", "delete", "table", "bridge", &table].map(str::to_string), None);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_over_the_default_three_band_queue() {
        let c: Vec<String> = commands("eth0", 1).iter().map(|a| a.join(" ")).collect();
        // 1 Mbit/s for 200 ms (25 000 bytes) plus the burst: 19 full-size
        // packets, what tbf's own FIFO held.
        assert_eq!(c[0], "ip link set dev eth0 txqueuelen 19");
        assert_eq!(c[1], "tc qdisc replace dev eth0 root handle 1: tbf rate 1mbit burst 32kbit latency 200ms");
        assert_eq!(c[2], "tc qdisc add dev eth0 parent 1:1 handle 10: pfifo_fast");
        assert_eq!((band_packets(5), band_packets(20)), (86, 336));
        let h: Vec<String> = heal("eth0").iter().map(|a| a.join(" ")).collect();
        assert_eq!(h, ["tc qdisc del dev eth0 root", "ip link set dev eth0 txqueuelen 1000"]);
    }

    #[test]
    fn the_bridge_gives_network_control_its_priority_on_the_slowed_ports_only() {
        let r = dscp_rules("chaos_slow_h2", &["v0h2".into(), "v1h2".into()]);
        assert!(r.starts_with("table bridge chaos_slow_h2 {"), "{r}");
        assert!(r.contains("oifname { \"v0h2\", \"v1h2\" } ip dscp cs6 meta priority set 0:6"), "{r}");
    }
}
