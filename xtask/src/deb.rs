//! `cargo xtask deb`: the Debian package, built with Debian's own dpkg-deb
//! from a staging tree under `<target>/debian/`. It holds the release
//! binary (stripped), the systemd unit from dist/ with the package's paths,
//! the commented node.toml from docs/config.md (a conffile, checked with the
//! agent's own validation before it is packed), man pages and completions
//! generated from the CLI (`tandem generate`), the docs, and the maintainer
//! scripts in dist/debian/. Writes only under the target directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::packages::{self, Job};
use crate::{cargo, output, root, run, target_dir, Fail};

/// The package's dependencies besides the shared libraries (which
/// dpkg-shlibdeps reads off the binary: RocksDB's librocksdb7.8, libc, ...).
/// (deb-systemd-helper, which the maintainer scripts use, is Essential.)
pub const DEPENDS: &[(&str, &str)] = &[("iproute2", "`ip`: `vip` resources add and move addresses")];

pub const RECOMMENDS: &[(&str, &str)] = &[
    ("resource-agents", "the OCF agents that `ocf` resources run"),
    ("iputils-arping", "gratuitous ARP after a `vip` moves"),
    ("qemu-utils", "qemu-io, qemu-nbd, qemu-img: NBD clients for replicated volumes"),
    ("curl", "the REST API from a shell, as the docs show it"),
];

pub const SUGGESTS: &[(&str, &str)] = &[
    ("fence-agents", "fence_ipmilan and others, for fencing.fence_command"),
    ("libnbd-bin", "nbdcopy, nbdinfo, nbdfuse: more NBD clients"),
];

const MAINTAINER: &str = "tandem developers <maintainers@tandem.invalid>";

/// node.toml is 0640 on purpose: `fencing.fence_command` may carry a BMC's
/// credentials.
const LINTIAN_OVERRIDES: &str = "tandem: non-standard-file-perm 0640 != 0644 [etc/tandem/node.toml]\n";

const UNIT_EXEC_BY_HAND: &str = "ExecStart=/usr/local/bin/tandem ";
const UNIT_EXEC: &str = "ExecStart=/usr/bin/tandem ";

const NODE_TOML_HEADER: &str = "\
# tandem agent configuration: every key, at its default.
# Set `name` and `addresses`, check it:
#   tandem check-config --config /etc/tandem/node.toml
# then start the agent (systemctl start tandem) and, as root on this node,
# either `tandem cluster init` (the first node) or the
# `tandem cluster join https://... --token ... --ca-hash ...` line that
# `tandem cluster join-token` prints on a member.
# Every key: /usr/share/doc/tandem/config.md. A cluster step by step:
# /usr/share/doc/tandem/install.md.

";

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: tandem

Files: *
Copyright: 2026 the tandem developers
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
";

/// Builds the package; returns the path of the .deb.
pub fn build() -> Result<PathBuf, Fail> {
    packages::ensure(Job::Deb)?;
    let mut c = cargo();
    c.args(["build", "--release", "--locked", "--bin", "tandem"]);
    run(c)?;
    let target = target_dir()?;
    let bin = target.join("release/tandem");
    let work = target.join("debian");
    // dpkg-shlibdeps wants debhelper's layout: debian/control beside the
    // package's tree debian/tandem/.
    let tree = work.join("debian/tandem");
    let generated = work.join("generated");
    for d in [&tree, &generated] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| io(d, e))?;
        }
    }

    let version = output(cmd(&bin, &["--version"]))?;
    let version = version.trim().strip_prefix("tandem ").ok_or_else(|| Fail(format!("odd version: {version}")))?;
    let arch = output(cmd("dpkg", &["--print-architecture"]))?.trim().to_string();

    // The binary, without its symbol table.
    let exe = put(&tree, "usr/bin/tandem", &read(&bin)?, 0o755)?;
    run(cmd("strip", &["--strip-unneeded", &exe.display().to_string()]))?;

    // The unit, pointing at the package's binary.
    let unit = String::from_utf8_lossy(&read(&root().join("dist/tandem.service"))?).into_owned();
    if unit.matches(UNIT_EXEC_BY_HAND).count() != 1 {
        return Err(Fail(format!("dist/tandem.service: expected one line starting {UNIT_EXEC_BY_HAND:?}")));
    }
    put(&tree, "lib/systemd/system/tandem.service", unit.replace(UNIT_EXEC_BY_HAND, UNIT_EXEC).as_bytes(), 0o644)?;

    // The config: fence_command may carry a BMC's credentials, so not
    // world-readable. It must pass the agent's own check.
    let doc = String::from_utf8_lossy(&read(&root().join("docs/config.md"))?).into_owned();
    let example = full_example(&doc).ok_or_else(|| {
        Fail("docs/config.md: no ```toml block under \"## Full example with every key at its default\"".into())
    })?;
    let conf = put(&tree, "etc/tandem/node.toml", format!("{NODE_TOML_HEADER}{example}").as_bytes(), 0o640)?;
    output(cmd(&bin, &["check-config", "--config", &conf.display().to_string()]))?;

    // Man pages and completions from the CLI definition.
    output(cmd(&bin, &["generate", "--out-dir", &generated.display().to_string()]))?;
    let mut pages = 0;
    for e in std::fs::read_dir(generated.join("man")).map_err(|e| io(&generated, e))? {
        let page = e.map_err(|e| io(&generated, e))?.path();
        let name = page.file_name().unwrap_or_default().to_string_lossy().into_owned();
        put(&tree, &format!("usr/share/man/man1/{name}.gz"), &gzip(&read(&page)?)?, 0o644)?;
        pages += 1;
    }
    for (file, dest) in [
        ("tandem", "usr/share/bash-completion/completions/tandem"),
        ("_tandem", "usr/share/zsh/vendor-completions/_tandem"),
        ("tandem.fish", "usr/share/fish/vendor_completions.d/tandem.fish"),
    ] {
        put(&tree, dest, &read(&generated.join("completions").join(file))?, 0o644)?;
    }

    // The docs the unit, the config's header and the postinst point to.
    for (src, name) in [
        ("README.md", "README.md"),
        ("docs/config.md", "config.md"),
        ("docs/install.md", "install.md"),
        // Prometheus's alerting rules for GET /metrics (docs/api.md#metrics).
        ("dist/prometheus/tandem-rules.yml", "prometheus/tandem-rules.yml"),
        ("dist/prometheus/tandem-rules.test.yml", "prometheus/tandem-rules.test.yml"),
    ] {
        put(&tree, &format!("usr/share/doc/tandem/{name}"), &read(&root().join(src))?, 0o644)?;
    }
    put(&tree, "usr/share/doc/tandem/copyright", COPYRIGHT.as_bytes(), 0o644)?;
    put(&tree, "usr/share/doc/tandem/changelog.gz", &gzip(changelog(version)?.as_bytes())?, 0o644)?;
    // A deliberate choice, explained above.
    put(&tree, "usr/share/lintian/overrides/tandem", LINTIAN_OVERRIDES.as_bytes(), 0o644)?;

    // Control files.
    let files = walk(&tree)?;
    let installed_kib: u64 = files.iter().map(|f| f.metadata().map(|m| m.len().div_ceil(1024)).unwrap_or(0)).sum();
    let md5 = {
        let mut c = Command::new("md5sum");
        c.current_dir(&tree);
        for f in &files {
            c.arg(f.strip_prefix(&tree).unwrap_or(f));
        }
        output(c)?
    };
    put(&tree, "DEBIAN/md5sums", md5.as_bytes(), 0o644)?;
    put(&tree, "DEBIAN/conffiles", b"/etc/tandem/node.toml\n", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&tree, &format!("DEBIAN/{script}"), &read(&root().join("dist/debian").join(script))?, 0o755)?;
    }
    put(&work, "debian/control", b"Source: tandem\n\nPackage: tandem\nArchitecture: any\n", 0o644)?;
    let mut c = cmd("dpkg-shlibdeps", &["-O", "-edebian/tandem/usr/bin/tandem"]);
    c.current_dir(&work);
    let shlibs = output(c)?;
    let shlibs = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .ok_or_else(|| Fail(format!("dpkg-shlibdeps gave no shlibs:Depends: {shlibs}")))?;
    let names = |list: &[(&str, &str)]| list.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let control = format!(
        "Package: tandem
Version: {version}
Architecture: {arch}
Maintainer: {MAINTAINER}
Installed-Size: {installed_kib}
Depends: {shlibs}, {depends}
Recommends: {recommends}
Suggests: {suggests}
Section: admin
Priority: optional
Description: high-availability cluster manager: Raft control plane, replicated volumes
 One agent per server keeps cluster membership, resource groups, their
 placement and failover policy in a Raft-replicated store, fences nodes that
 lose their lease, and replicates volume blocks between servers (NBD).
 .
 The unit is enabled but not started: write /etc/tandem/node.toml, check it
 with `tandem check-config --config /etc/tandem/node.toml`, then run
 `systemctl start tandem`. See /usr/share/doc/tandem/install.md.
",
        depends = names(DEPENDS),
        recommends = names(RECOMMENDS),
        suggests = names(SUGGESTS),
    );
    put(&tree, "DEBIAN/control", control.as_bytes(), 0o644)?;

    let deb = work.join(format!("tandem_{version}_{arch}.deb"));
    let mut c = cmd("dpkg-deb", &["--root-owner-group", "-Zxz", "--build"]);
    c.arg(&tree).arg(&deb);
    output(c)?;
    eprintln!("xtask: built {} ({pages} man pages, {installed_kib} KiB installed)", deb.display());
    Ok(deb)
}

/// A native package's changelog: one entry for this version, dated by the
/// last commit (so that the same commit gives the same package).
fn changelog(version: &str) -> Result<String, Fail> {
    let mut git = cmd("git", &["log", "-1", "--format=%ct"]);
    git.current_dir(root());
    let epoch = output(git).map(|s| s.trim().to_string()).unwrap_or_default();
    let when = if epoch.is_empty() { "now".to_string() } else { format!("@{epoch}") };
    let date = output(cmd("date", &["-u", "-R", "-d", &when]))?;
    Ok(format!(
        "tandem ({version}) unstable; urgency=medium\n\n  * Built from the tandem repository with `cargo xtask deb`.\n\n -- {MAINTAINER}  {}\n",
        date.trim()
    ))
}

/// gzip -9n: no name or time stamp inside, as Debian's tools compress.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>, Fail> {
    use std::io::Write;
    let mut child = cmd("gzip", &["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Fail(format!("gzip: {e}")))?;
    let mut stdin = child.stdin.take().ok_or_else(|| Fail("gzip: no stdin".into()))?;
    // Written from a thread: gzip's output pipe must be read meanwhile.
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().map_err(|e| Fail(format!("gzip: {e}")))?;
    let wrote = writer.join().map_err(|_| Fail("gzip: writer panicked".into()))?;
    wrote.map_err(|e| Fail(format!("gzip: {e}")))?;
    if !out.status.success() {
        return Err(Fail(format!("gzip: {}", out.status)));
    }
    Ok(out.stdout)
}

/// The ```toml block under "## Full example with every key at its default".
fn full_example(doc: &str) -> Option<String> {
    let rest = &doc[doc.find("## Full example with every key at its default")?..];
    let body = &rest[rest.find("```toml\n")? + "```toml\n".len()..];
    Some(body[..body.find("\n```")? + 1].to_string())
}

fn cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn io(path: &Path, e: std::io::Error) -> Fail {
    Fail(format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>, Fail> {
    std::fs::read(path).map_err(|e| io(path, e))
}

/// Writes `rel` under `tree` with `mode`, its directories 0755 whatever the umask.
fn put(tree: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<PathBuf, Fail> {
    let path = tree.join(rel);
    let mut dirs = Vec::new();
    let mut d = path.parent();
    while let Some(dir) = d.filter(|d| !d.exists()) {
        dirs.push(dir.to_path_buf());
        d = dir.parent();
    }
    for dir in dirs.iter().rev() {
        std::fs::create_dir(dir).map_err(|e| io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(|e| io(dir, e))?;
    }
    std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|e| io(&path, e))?;
    Ok(path)
}

/// Every file under `tree` but DEBIAN/, sorted.
fn walk(tree: &Path) -> Result<Vec<PathBuf>, Fail> {
    let mut out = Vec::new();
    let mut todo = vec![tree.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let p = e.map_err(|e| io(&dir, e))?.path();
            if p.is_dir() {
                if p != tree.join("DEBIAN") {
                    todo.push(p);
                }
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_full_example_is_found_in_config_md() {
        let doc = std::fs::read_to_string(crate::root().join("docs/config.md")).unwrap();
        let ex = super::full_example(&doc).unwrap();
        assert!(ex.starts_with("# Required") || ex.contains("\nname = "), "{ex}");
        assert!(ex.contains("[fencing]") && ex.ends_with('\n') && !ex.contains("```"), "{ex}");
    }
}
