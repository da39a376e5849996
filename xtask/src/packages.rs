//! The one list of the Debian packages the project needs, each with why,
//! and the step that makes sure they are there: it installs only the
//! missing ones (with sudo when not root), saying what and why. Nothing
//! else in the repository lists them; README.md explains them once.

use std::process::Command;

use crate::{run, Fail};

/// What a package is needed for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Job {
    /// Compiling tandem at all.
    Build,
    /// `cargo xtask demo`: the local cluster and what it tells you to try.
    Demo,
    /// `cargo xtask demo --app postgres`: PostgreSQL on a replicated volume.
    DemoPostgres,
    /// `cargo xtask test`: the test suite, chaos runs and the package test.
    Test,
    /// `cargo xtask deb`: building the Debian package.
    Deb,
    /// `cargo xtask contract`: the API against its OpenAPI document.
    Contract,
}

pub struct Package {
    pub name: &'static str,
    pub why: &'static str,
    pub jobs: &'static [Job],
}

use Job::*;

/// Everything `cargo xtask` installs, in the order it is explained.
pub const PACKAGES: &[Package] = &[
    Package {
        name: "librocksdb-dev",
        why:
            "RocksDB 7.8, the Raft log's store, linked from Debian's build (compiling it from source takes 15+ minutes)",
        jobs: &[Build, Demo, Test, Deb, Contract],
    },
    Package {
        name: "libclang-dev",
        why: "bindgen generates the RocksDB bindings from its headers with libclang at build time",
        jobs: &[Build, Demo, Test, Deb, Contract],
    },
    Package {
        name: "python3",
        why: "the demo's example service (python3 -m http.server); tests run it as a resource too",
        jobs: &[Demo, Test, Contract],
    },
    Package {
        name: "curl",
        why: "the demo prints curl commands against the REST API; tests and the install guide use it",
        jobs: &[Demo, Test, Contract],
    },
    Package {
        name: "python3-venv",
        why: "a venv for schemathesis, the contract tester that `cargo xtask contract` installs from PyPI",
        jobs: &[Test, Contract],
    },
    Package {
        name: "qemu-utils",
        why: "qemu-io and qemu-img: NBD clients for the demo's replicated volume and the volume tests",
        jobs: &[Demo, Test],
    },
    Package {
        name: "resource-agents",
        why: "the OCF agents that `ocf` resources run (a test runs heartbeat:Dummy unmodified)",
        jobs: &[Test],
    },
    Package {
        name: "python3-aiosmtpd",
        why: "a real SMTP server that receives the alert mails of tests/alerts.rs",
        jobs: &[Test],
    },
    Package {
        name: "pacemaker-common",
        why: "Pacemaker's sample alert agents (alert_file.sh.sample), run unmodified by an exec alert in tests/alerts.rs",
        jobs: &[Test],
    },
    Package {
        name: "iproute2",
        why: "`ip`: `vip` resources, and the network namespaces of the multi-host, chaos and install tests",
        jobs: &[Test],
    },
    Package { name: "iputils-arping", why: "gratuitous ARP after a `vip` moves", jobs: &[Test] },
    Package { name: "procps", why: "pkill, in the fencing test's fence command", jobs: &[Test] },
    Package {
        name: "libnbd-bin",
        why: "nbdfuse: a `filesystem` resource's block device where the kernel has no NBD driver; nbdcopy and nbdinfo: NBD clients the NBD server tests drive",
        jobs: &[DemoPostgres, Test],
    },
    Package {
        name: "e2fsprogs",
        why: "mkfs.ext4 and blkid: a `filesystem` resource makes and recognises the file system on its volume",
        jobs: &[DemoPostgres, Test],
    },
    Package {
        name: "postgresql",
        why: "PostgreSQL 15 and psql: the database of `tandem demo --app postgres`, of the PostgreSQL guide's test and of the bank tests",
        jobs: &[DemoPostgres, Test],
    },
    Package {
        name: "openssl",
        why: "the openssl command line: the tests make an operator's CA and certificates with it, as a company PKI would; the contract run makes the signing requests it sends",
        jobs: &[Test, Contract],
    },
    Package { name: "fio", why: "verifies the data written through the NBD export", jobs: &[Test] },
    Package { name: "nbdkit", why: "a reference NBD server the NBD tests compare tandem's export with", jobs: &[Test] },
    Package { name: "nftables", why: "nft: the chaos runs' one-way packet loss, the tests' partitions", jobs: &[Test] },
    Package {
        name: "haproxy",
        why: "a real load balancer in front of a group, checking the health endpoints in the tests",
        jobs: &[Test],
    },
    Package {
        name: "prometheus",
        why: "a real Prometheus scraping a test cluster's /metrics, and promtool checking the metrics and the shipped alert rules (dist/prometheus)",
        jobs: &[Test],
    },
    Package {
        name: "chromium",
        why: "a real browser: tests/ui.rs drives the web dashboard in headless Chromium",
        jobs: &[Test],
    },
    Package {
        name: "chromium-driver",
        why: "chromedriver: the WebDriver server through which tests/ui.rs drives Chromium (no browser is downloaded)",
        jobs: &[Test],
    },
    Package {
        name: "fonts-wqy-microhei",
        why: "a Chinese font, so that the dashboard's Chinese screenshots from tests/ui.rs are readable",
        jobs: &[Test],
    },
    Package {
        name: "dpkg-dev",
        why: "dpkg-shlibdeps works out the .deb's library dependencies from the binary",
        jobs: &[Deb, Test],
    },
    Package { name: "binutils", why: "strip: the packaged binary carries no symbol table", jobs: &[Deb, Test] },
];

/// The packages `job` needs, with why.
pub fn needed(job: Job) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> =
        PACKAGES.iter().filter(|p| p.jobs.contains(&job)).map(|p| (p.name, p.why.to_string())).collect();
    if job == Test {
        // The package test installs the .deb with apt-get inside a network
        // namespace (no network): what it depends on or recommends must
        // already be here.
        for (name, why) in crate::deb::DEPENDS.iter().chain(crate::deb::RECOMMENDS) {
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name, format!("the tandem .deb the package test installs wants it: {why}")));
            }
        }
    }
    out
}

pub fn installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", name])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

pub fn is_root() -> bool {
    // std has no geteuid; `id -u` is in coreutils (Essential).
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A command run as root: as it is when we are root, else through sudo.
pub fn as_root(args: &[&str]) -> Result<Command, Fail> {
    if is_root() {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        return Ok(c);
    }
    if Command::new("sudo").arg("--version").output().is_err() {
        return Err(Fail(format!(
            "`{}` needs root, and sudo is not installed: run this as root, or install sudo",
            args.join(" ")
        )));
    }
    let mut c = Command::new("sudo");
    c.args(args);
    Ok(c)
}

/// Installs what `job` needs and is missing; says nothing more when all is there.
pub fn ensure(job: Job) -> Result<(), Fail> {
    let missing: Vec<(&str, String)> = needed(job).into_iter().filter(|(n, _)| !installed(n)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let via = if is_root() { "" } else { " (with sudo)" };
    eprintln!("xtask: installing {} Debian package(s){via}:", missing.len());
    for (name, why) in &missing {
        eprintln!("  {name:<16} {why}");
    }
    let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
    run(as_root(&["apt-get", "update", "-qq"])?)?;
    let mut args = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq"];
    args.extend(&names);
    run(as_root(&args)?)?;
    let still: Vec<&str> = names.iter().copied().filter(|n| !installed(n)).collect();
    if !still.is_empty() {
        return Err(Fail(format!("still missing after apt-get install: {}", still.join(" "))));
    }
    Ok(())
}
