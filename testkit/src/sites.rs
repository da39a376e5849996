//! The data centre: one network namespace per host, two independent
//! networks (heartbeat paths, one bridge each), and optionally two sites
//! with a witness. Owns every bridge, veth, namespace, qdisc and tmpfs it
//! makes and removes them on drop; it never touches anything it did not
//! create (names carry a per-run tag).
//!
//! With sites, each path has one bridge per site joined by an inter-site
//! veth (the "bridge between sites" a fault cuts). The witness has a leg on
//! both sites' bridges with the same address, and host routes to site B's
//! hosts over its B leg, so it hears both sides when the link between them
//! is cut. `arp_filter` keeps each leg answering only its own side. The
//! client (this process, in the root namespace) reaches both sites the same
//! way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    A,
    B,
    /// Reaches both sites; votes, never runs resources.
    Witness,
}

impl Site {
    pub fn name(self) -> &'static str {
        match self {
            Site::A => "a",
            Site::B => "b",
            Site::Witness => "w",
        }
    }
}

/// The heartbeat paths every host has.
pub const PATHS: usize = 2;

pub struct Topology {
    tag: String,
    prefixes: [String; PATHS],
    sites: bool,
    /// (namespace, site) per host, in order.
    hosts: Vec<(String, Site)>,
    mounts: Vec<PathBuf>,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

impl Topology {
    /// The networks (and, with `sites`, both sites' bridges and the link
    /// between them). Names and address ranges are unique per process.
    pub fn new(sites: bool) -> anyhow::Result<Topology> {
        // Unique per process and per topology in it.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 4;
        let pid = std::process::id();
        let tag = format!("s{}{n}", pid % 100_000);
        let prefixes = [
            format!("10.{}.{}", 200 + (pid / 256 + n * 13) % 50, pid % 256),
            format!("172.{}.{}", 16 + (pid / 256 + n * 5) % 16, pid % 256),
        ];
        let t = Topology { tag, prefixes, sites, hosts: Vec::new(), mounts: Vec::new() };
        for p in 0..PATHS {
            for site in t.site_list() {
                let br = t.bridge(site, p);
                let _ = Command::new("ip").args(["link", "del", &br]).output();
                ip(&["link", "add", &br, "type", "bridge"])?;
                ip(&["link", "set", &br, "up"])?;
            }
            if sites {
                let (x, y) = (format!("{}x{p}", t.tag), format!("{}y{p}", t.tag));
                let _ = Command::new("ip").args(["link", "del", &x]).output();
                ip(&["link", "add", &x, "type", "veth", "peer", "name", &y])?;
                ip(&["link", "set", &x, "master", &t.bridge(Site::A, p)])?;
                ip(&["link", "set", &y, "master", &t.bridge(Site::B, p)])?;
                ip(&["link", "set", &x, "up"])?;
                ip(&["link", "set", &y, "up"])?;
            }
        }
        // The client's leg on path 0 (site A's bridge; site B's by host routes).
        let a0 = t.bridge(Site::A, 0);
        ip(&["addr", "add", &format!("{}.254/24", t.prefixes[0]), "dev", &a0])?;
        if sites {
            let b0 = t.bridge(Site::B, 0);
            ip(&["addr", "add", &format!("{}.253/32", t.prefixes[0]), "dev", &b0])?;
            for dev in [&a0, &b0] {
                run("sysctl", &["-qw", &format!("net.ipv4.conf.{dev}.arp_filter=1")])?;
            }
        }
        Ok(t)
    }

    fn site_list(&self) -> Vec<Site> {
        if self.sites {
            vec![Site::A, Site::B]
        } else {
            vec![Site::A]
        }
    }

    fn bridge(&self, site: Site, path: usize) -> String {
        format!("{}{}{path}", self.tag, site.name())
    }

    /// Host `i`'s address on `path`.
    pub fn addr(&self, i: u8, path: usize) -> String {
        format!("{}.{i}", self.prefixes[path])
    }

    /// The host-side end of host `i`'s link on `path` (outside its namespace).
    fn outer(&self, i: u8, path: usize) -> String {
        format!("{}v{path}h{i}", self.tag)
    }

    /// Host `i` (1..250) at `site`: its namespace, with eth0 and eth1 (one
    /// per path); a witness gets a second leg per path on site B (ethNb).
    pub fn host(&mut self, i: u8, site: Site) -> anyhow::Result<String> {
        let ns = format!("{}h{i}", self.tag);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns])?;
        self.hosts.push((ns.clone(), site));
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        for p in 0..PATHS {
            let home = if site == Site::B { Site::B } else { Site::A };
            self.leg(
                &ns,
                &self.outer(i, p),
                &format!("eth{p}"),
                &self.bridge(home, p),
                &format!("{}/24", self.addr(i, p)),
            )?;
            if site == Site::Witness {
                let dev = format!("eth{p}b");
                let outer = format!("{}w{p}h{i}", self.tag);
                self.leg(&ns, &outer, &dev, &self.bridge(Site::B, p), &format!("{}/32", self.addr(i, p)))?;
                in_ns(&ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_filter=1"])?;
            }
        }
        Ok(ns)
    }

    fn leg(&self, ns: &str, outer: &str, inner: &str, bridge: &str, cidr: &str) -> anyhow::Result<()> {
        let tmp = format!("{outer}i");
        ip(&["link", "add", outer, "type", "veth", "peer", "name", &tmp])?;
        ip(&["link", "set", &tmp, "netns", ns])?;
        ip(&["link", "set", outer, "master", bridge])?;
        ip(&["link", "set", outer, "up"])?;
        in_ns(ns, &["ip", "link", "set", &tmp, "name", inner])?;
        in_ns(ns, &["ip", "addr", "add", cidr, "dev", inner])?;
        in_ns(ns, &["ip", "link", "set", inner, "up"])
    }

    /// Once every host exists: the witness's and the client's routes to
    /// site B's hosts, over their B legs.
    pub fn route_sites(&self) -> anyhow::Result<()> {
        if !self.sites {
            return Ok(());
        }
        let b_hosts: Vec<u8> =
            self.hosts.iter().enumerate().filter(|(_, (_, s))| *s == Site::B).map(|(k, _)| k as u8 + 1).collect();
        for (ns, site) in &self.hosts {
            if *site != Site::Witness {
                continue;
            }
            for p in 0..PATHS {
                for b in &b_hosts {
                    in_ns(
                        ns,
                        &["ip", "route", "add", &format!("{}/32", self.addr(*b, p)), "dev", &format!("eth{p}b")],
                    )?;
                }
            }
        }
        for b in &b_hosts {
            ip(&["route", "add", &format!("{}/32", self.addr(*b, 0)), "dev", &self.bridge(Site::B, 0)])?;
        }
        Ok(())
    }

    /// Host `i`'s link on one path (or every path) down or up.
    pub fn set_link(&self, i: u8, path: Option<usize>, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        for p in 0..PATHS {
            if path.is_none_or(|q| q == p) {
                ip(&["link", "set", &self.outer(i, p), state])?;
                if self.hosts.get(i as usize - 1).is_some_and(|(_, s)| *s == Site::Witness) {
                    ip(&["link", "set", &format!("{}w{p}h{i}", self.tag), state])?;
                }
            }
        }
        Ok(())
    }

    /// The link between the sites cut (on every path), or restored.
    pub fn set_site_link(&self, up: bool) -> anyhow::Result<()> {
        for p in 0..PATHS {
            ip(&["link", "set", &format!("{}x{p}", self.tag), if up { "up" } else { "down" }])?;
        }
        Ok(())
    }

    /// Host `i`'s links slowed to `mbit` both ways (a token bucket on each
    /// end: netem is not available here), or back to full speed.
    pub fn set_slow(&self, i: u8, mbit: Option<u32>) -> anyhow::Result<()> {
        let ns = &self.hosts[i as usize - 1].0;
        for p in 0..PATHS {
            let (outer, inner) = (self.outer(i, p), format!("eth{p}"));
            match mbit {
                Some(r) => {
                    let tbf = ["root", "tbf", "rate", &format!("{r}mbit"), "burst", "32kbit", "latency", "200ms"];
                    let mut a = vec!["qdisc", "replace", "dev", &outer];
                    a.extend_from_slice(&tbf);
                    run("tc", &a)?;
                    let mut b = vec!["tc", "qdisc", "replace", "dev", &inner];
                    b.extend_from_slice(&tbf);
                    in_ns(ns, &b)?;
                }
                None => {
                    let _ = run("tc", &["qdisc", "del", "dev", &outer, "root"]);
                    let _ = in_ns(ns, &["tc", "qdisc", "del", "dev", &inner, "root"]);
                }
            }
        }
        Ok(())
    }

    /// A small tmpfs at `dir` (a data directory that can fill up).
    pub fn small_fs(&mut self, dir: &Path, mib: u32) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let d = dir.display().to_string();
        run("mount", &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tandem-chaos", &d])?;
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    /// Every address host `i` has, on every path.
    pub fn addrs(&self, i: u8) -> Vec<String> {
        (0..PATHS).map(|p| self.addr(i, p)).collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for (ns, _) in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for p in 0..PATHS {
            for site in self.site_list() {
                let _ = Command::new("ip").args(["link", "del", &self.bridge(site, p)]).output();
            }
            if self.sites {
                let _ = Command::new("ip").args(["link", "del", &format!("{}x{p}", self.tag)]).output();
            }
        }
        for m in &self.mounts {
            // Lazily: an agent killed a moment ago may still hold a file.
            let _ = Command::new("umount").args(["-l"]).arg(m).output();
        }
    }
}
