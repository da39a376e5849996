//! The built-in `filesystem` resource: the group's volume as a block
//! device, a file system on it (made only when the volume holds none), and
//! its mount, in this agent's mount namespace.
//!
//! The block device is chosen once at agent start (`[filesystem] device`):
//! an NBD device (`nbd-client`, where the kernel has `/dev/nbd*`), or the
//! export as a file through FUSE (`nbdfuse`) under a loop device (marked to
//! detach itself with the mount). Either way every
//! write and flush goes through the volume's NBD export, which answers
//! nothing without the lease: a node that lost its lease cannot reach any
//! replica through a mount it left behind.
//!
//! Stop (and the watchdog's stop after the agent died) needs nothing but
//! the definition: it finds the mount in the mount table, kills what still
//! uses it (by device number, so never another node's processes on a shared
//! machine), unmounts, and detaches. It must never format a volume holding
//! data, nor mount over a mount that is not tandem's.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_raft::group::FilesystemSpec;
use tokio::process::Command;

use super::{ActionResult, OCF_NOT_RUNNING};

/// How the volume becomes a block device on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockPath {
    /// `nbd-client` attaches the export to `/dev/nbdN`.
    Nbd,
    /// `nbdfuse` exposes the export as a file; a loop device sits on it.
    Loop,
}

impl BlockPath {
    pub fn name(self) -> &'static str {
        match self {
            BlockPath::Nbd => "nbd",
            BlockPath::Loop => "loop",
        }
    }

    /// The configured choice (`auto`, `nbd`, `loop`) made concrete for this
    /// machine, or why it cannot be.
    pub fn choose(configured: &str) -> Result<BlockPath, String> {
        let has_nbd = Path::new("/dev/nbd0").exists() && which("nbd-client").is_some();
        let has_loop = Path::new("/dev/fuse").exists() && which("nbdfuse").is_some();
        match configured {
            "nbd" if has_nbd => Ok(BlockPath::Nbd),
            "nbd" => Err("needs /dev/nbd0 (the nbd kernel module) and nbd-client (Debian nbd-client)".into()),
            "loop" if has_loop => Ok(BlockPath::Loop),
            "loop" => Err("needs /dev/fuse and nbdfuse (Debian libnbd-bin)".into()),
            "auto" if has_nbd => Ok(BlockPath::Nbd),
            "auto" => Ok(BlockPath::Loop),
            other => Err(format!("{other:?} is not auto, nbd or loop")),
        }
    }
}

static BLOCK_PATH: OnceLock<BlockPath> = OnceLock::new();

/// Sets the block path for this process (once, at agent start).
pub fn set_block_path(p: BlockPath) {
    let _ = BLOCK_PATH.set(p);
}

fn block_path() -> BlockPath {
    *BLOCK_PATH.get().unwrap_or(&BlockPath::Loop)
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Where this resource's FUSE file lives (loop path).
fn fuse_dir(dir: &Path, group: &str, resource: &str) -> PathBuf {
    dir.join("run").join("fuse").join(format!("{group}.{resource}"))
}

/// A volume's NBD socket on this node (where the volume resource exports it).
pub fn volume_socket(dir: &Path, volume: &str) -> PathBuf {
    dir.join("run").join("nbd").join(format!("{volume}.sock"))
}

/// One line of /proc/self/mountinfo, the parts used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// `major:minor` of the mounted file system.
    pub dev: String,
    pub mountpoint: String,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
    /// Superblock options (`ro` after errors=remount-ro shows here too).
    pub super_options: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro") || self.super_options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo (proc(5)).
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                dev: f.get(2)?.to_string(),
                mountpoint: unescape(f.get(4)?),
                options: f.get(5)?.to_string(),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
                super_options: r.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The topmost mount at `path` in this mount namespace.
fn mount_at(path: &str) -> Option<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text).into_iter().rev().find(|m| m.mountpoint == path)
}

/// What a loop device is attached to (`/dev/loop3` → its backing file).
fn loop_backing(device: &str) -> Option<String> {
    let name = device.strip_prefix("/dev/")?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(s.trim_end().to_string())
}

/// Whether a mount is a tandem filesystem resource's (on a loop device over
/// a FUSE file of some agent's, or on an NBD device).
fn is_tandem_mount(m: &Mount) -> bool {
    if m.source.starts_with("/dev/nbd") {
        return true;
    }
    loop_backing(&m.source).is_some_and(|b| b.contains("/run/fuse/"))
}

/// Runs blocking file-system work (unmounts, /proc scans, anything that
/// may wait on the FUSE file) on a blocking thread: it may wait on this
/// agent's own NBD export, and must never hold one of the few async
/// workers that serve it, the heartbeats and the lease (a frozen worker let
/// a lease lapse during a switchover).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("blocking task: {e}"))
}

/// Runs a command to its end; its stderr (or stdout) as the error.
async fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let err = if err.trim().is_empty() { String::from_utf8_lossy(&out.stdout) } else { err };
    Err(format!("{program} {}: {} ({})", args.join(" "), err.trim(), out.status))
}

/// Runs one action of a filesystem resource.
pub(super) async fn action(
    verb: &str,
    deep: bool,
    f: &FilesystemSpec,
    dir: &Path,
    group: &str,
    resource: &str,
) -> ActionResult {
    match verb {
        "start" => start(f, dir, group, resource).await.map(|()| 0),
        "stop" => stop(f, dir, group, resource).await.map(|()| 0),
        _ => monitor(f, dir, group, resource, deep).await,
    }
}

/// How often a mount through a fresh loop device is tried (see
/// `format_and_mount`).
const MOUNT_TRIES: u32 = 3;

async fn start(f: &FilesystemSpec, dir: &Path, group: &str, resource: &str) -> Result<(), String> {
    if let Some(m) = mount_at(&f.mountpoint) {
        if is_our_mount(&m, dir, group, resource) {
            return Ok(()); // already up (a start after an agent restart)
        }
        if !is_tandem_mount(&m) {
            return Err(format!(
                "{} already has {} ({}) mounted on it, not by tandem: refusing to mount over it",
                f.mountpoint, m.source, m.fstype
            ));
        }
        // A leftover of a node that died on this machine (or of this one):
        // it cannot reach any replica, but must not hide the new mount.
        tracing::warn!(mountpoint = %f.mountpoint, source = %m.source, "removing a stale tandem mount left behind");
        let (dev, mp) = (m.dev.clone(), f.mountpoint.clone());
        blocking(move || {
            kill_users(&dev);
            let _ = umount2(mp.as_str(), MntFlags::MNT_DETACH);
        })
        .await?;
        if m.source.starts_with("/dev/loop") {
            let _ = run("losetup", &["-d", &m.source]).await;
        }
    }
    let socket = volume_socket(dir, &f.volume);
    if !socket.exists() {
        return Err(format!("volume {} is not exported on this node ({} missing)", f.volume, socket.display()));
    }
    let uri = crate::volume::nbd::unix_uri(&f.volume, &socket);
    let device = match block_path() {
        BlockPath::Loop => attach_fuse(dir, group, resource, &uri).await?,
        BlockPath::Nbd => {
            let dev = attach_nbd(&socket, &f.volume).await?;
            let record = nbd_device_file(dir, group, resource);
            if let Some(parent) = record.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::write(&record, &dev).map_err(|e| format!("recording {}: {e}", record.display()))?;
            dev
        }
    };
    let result = format_and_mount(f, &device).await;
    if result.is_err() {
        // Never leave a half-made start behind: the caller's stop cleans up
        // too, but detach what this start attached now.
        detach(dir, group, resource, &device).await;
    }
    result
}

/// Whether the mount at the mountpoint is this resource's own.
/// Several nodes may share one mount table (tests, the demo): only a mount
/// of this node's own device is ever this resource's.
fn is_our_mount(m: &Mount, dir: &Path, group: &str, resource: &str) -> bool {
    let file = fuse_dir(dir, group, resource).join("nbd");
    if loop_backing(&m.source).is_some_and(|b| Path::new(&b) == file) {
        return true;
    }
    m.source.starts_with("/dev/nbd") && nbd_device_record(dir, group, resource).is_some_and(|d| d == m.source)
}

/// Where the NBD path records which `/dev/nbdN` it attached.
fn nbd_device_file(dir: &Path, group: &str, resource: &str) -> PathBuf {
    fuse_dir(dir, group, resource).with_extension("nbd-device")
}

fn nbd_device_record(dir: &Path, group: &str, resource: &str) -> Option<String> {
    std::fs::read_to_string(nbd_device_file(dir, group, resource)).ok().map(|s| s.trim().to_string())
}

/// Loop path: `nbdfuse` exposes the export as `<fuse dir>/nbd`; that file is
/// the "device" (`losetup` puts a loop device on it).
async fn attach_fuse(dir: &Path, group: &str, resource: &str, uri: &str) -> Result<String, String> {
    let fdir = fuse_dir(dir, group, resource);
    // A FUSE mount left by an earlier life of this resource goes first.
    let d = fdir.clone();
    blocking(move || {
        let _ = umount2(&d, MntFlags::MNT_DETACH);
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))
    })
    .await??;
    let pidfile = fdir.with_extension("pid");
    let _ = std::fs::remove_file(&pidfile);
    let errlog = fdir.with_extension("log");
    let stderr = std::fs::File::create(&errlog).map_err(|e| format!("creating {}: {e}", errlog.display()))?;
    let file = fdir.join("nbd");
    let mut child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&file)
        .arg(uri)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        // Its own process group: stopping a resource process never hits it.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("nbdfuse: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if pidfile.exists() && file.exists() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(&errlog).unwrap_or_default();
            return Err(format!("nbdfuse exited ({status}): {}", err.trim()));
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            return Err("nbdfuse did not serve the export within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reaped when it ends (at unmount).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(file.to_string_lossy().into_owned())
}

/// NBD path: the first free `/dev/nbdN`, attached with `nbd-client`.
async fn attach_nbd(socket: &Path, volume: &str) -> Result<String, String> {
    for n in 0..64 {
        let dev = format!("/dev/nbd{n}");
        if !Path::new(&dev).exists() {
            break;
        }
        // A device in use has a pid file in sysfs.
        if Path::new(&format!("/sys/block/nbd{n}/pid")).exists() {
            continue;
        }
        let sock = socket.to_string_lossy();
        return run("nbd-client", &["-unix", &sock, &dev, "-N", volume, "-b", "4096"]).await.map(|_| dev);
    }
    Err("no free /dev/nbd device".into())
}

/// Detaches what `start` attached (a mount, if any, is gone already).
async fn detach(dir: &Path, group: &str, resource: &str, device: &str) {
    if device.starts_with("/dev/nbd") {
        if let Err(e) = run("nbd-client", &["-d", device]).await {
            tracing::warn!(device, "detaching: {e}");
        }
    } else {
        unmount_fuse(dir, group, resource).await;
    }
}

/// What the volume holds at its start, as `blkid` and its first MiB tell.
async fn probe(device: &str) -> Result<Option<String>, String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", "-s", "PTTYPE", device])
        .output()
        .await
        .map_err(|e| format!("blkid: {e}"))?;
    match out.status.code() {
        Some(0) => {
            let found = String::from_utf8_lossy(&out.stdout).trim().lines().next().unwrap_or("").to_string();
            Ok(Some(if found.is_empty() { "an unknown signature".into() } else { found }))
        }
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(format!("blkid {device}: {}", String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// Whether the first MiB of the device is all zeros (no data that blkid
/// does not know).
async fn starts_empty(device: &str) -> Result<bool, String> {
    let device = device.to_string();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&device).map_err(|e| format!("reading {device}: {e}"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(format!("reading {device}: {e}")),
            }
        }
        Ok(buf[..n].iter().all(|b| *b == 0))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn format_and_mount(f: &FilesystemSpec, device: &str) -> Result<(), String> {
    match probe(device).await? {
        Some(t) if t == f.fstype => {}
        Some(t) => {
            return Err(format!(
                "volume {} holds {t}, not {}: refusing to mount it as {} or to format it (it has data)",
                f.volume, f.fstype, f.fstype
            ))
        }
        None if !f.mkfs => {
            return Err(format!(
                "volume {} holds no file system (set \"mkfs\": true to create {} on it)",
                f.volume, f.fstype
            ))
        }
        None if !starts_empty(device).await? => {
            return Err(format!("volume {} holds data but no file system blkid knows: refusing to format it", f.volume))
        }
        None => {
            tracing::info!(volume = %f.volume, fstype = %f.fstype, "the volume holds no file system: creating one");
            let mkfs = format!("mkfs.{}", f.fstype);
            let args: &[&str] = match f.fstype.as_str() {
                "xfs" | "btrfs" => &["-q", "-K"],
                _ => &["-q", "-E", "nodiscard"],
            };
            let mut all: Vec<&str> = args.to_vec();
            all.push(device);
            run(&mkfs, &all).await?;
        }
    }
    std::fs::create_dir_all(&f.mountpoint).map_err(|e| format!("creating {}: {e}", f.mountpoint))?;
    // The bare directory under the mount is nobody's: a service that runs
    // as its own user and starts while the file system is not mounted
    // (a mistake, a race) finds it unwritable instead of creating a new,
    // empty database on the root file system.
    if mount_at(&f.mountpoint).is_none() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&f.mountpoint, std::fs::Permissions::from_mode(0o000));
    }
    // The loop path attaches the FUSE file itself rather than `mount -o
    // loop`: libmount's overlap check reads every loop device's backing
    // file, and one left on a dead FUSE connection (a node killed on a
    // shared machine) would hang it.
    let opts: Vec<&str> = f.options.split(',').filter(|o| !o.is_empty()).collect();
    let opts = opts.join(",");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let loop_dev = match device.starts_with("/dev/") {
            true => None,
            false => Some(run("losetup", &["--find", "--show", device]).await?.trim().to_string()),
        };
        let block = loop_dev.as_deref().unwrap_or(device);
        let mut args = vec!["-t", f.fstype.as_str()];
        if !opts.is_empty() {
            args.extend(["-o", opts.as_str()]);
        }
        args.extend([block, f.mountpoint.as_str()]);
        let mounted = run("mount", &args).await;
        if let Some(l) = &loop_dev {
            // Detaching a loop device the mount holds only marks it to detach
            // itself when the mount goes (autoclear), whatever ends the mount;
            // after a failed mount it detaches it now.
            if let Err(e) = run("losetup", &["-d", l]).await {
                tracing::warn!(device = %l, "losetup -d: {e}");
            }
        }
        match mounted {
            // A loop device just freed by another mount's end is detached
            // by the kernel in the background (autoclear) and may take the
            // one `losetup` just set up with it: the mount then reads no
            // superblock. Once more on a fresh device, at most twice.
            Err(e) if loop_dev.is_some() && attempt < MOUNT_TRIES && e.contains("superblock") => {
                tracing::warn!(attempt, "mount: {e}; trying again on another loop device");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => {
                other?;
                break;
            }
        }
    }
    if let Some(owner) = f.owner.clone() {
        let mp = f.mountpoint.clone();
        blocking(move || {
            chown_root(&mp, &owner).inspect_err(|_| {
                // Mounted but not usable as defined: undo, or a
                // half-started resource stays behind.
                let _ = umount2(mp.as_str(), MntFlags::MNT_DETACH);
            })
        })
        .await??;
    }
    tracing::info!(volume = %f.volume, mountpoint = %f.mountpoint, device, path = block_path().name(), "file system mounted");
    Ok(())
}

/// Gives the file system's root to `owner` (`user` or `user:group`).
fn chown_root(mountpoint: &str, owner: &str) -> Result<(), String> {
    let (u, g) = split_owner(owner);
    let (uid, gid, _) = super::run_as(u, g).map_err(|e| format!("owner: {e}"))?;
    nix::unistd::chown(mountpoint, Some(uid.into()), Some(gid.into())).map_err(|e| format!("chown {mountpoint}: {e}"))
}

/// `user` or `user:group`.
pub fn split_owner(owner: &str) -> (&str, Option<&str>) {
    match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    }
}

async fn stop(f: &FilesystemSpec, dir: &Path, group: &str, resource: &str) -> Result<(), String> {
    // Only this node's own mount: on a shared mount table the one there may
    // be the node that runs the group now (a stale one of ours is cleaned
    // by the next start anywhere).
    if let Some(m) = mount_at(&f.mountpoint).filter(|m| is_our_mount(m, dir, group, resource)) {
        let mp = f.mountpoint.clone();
        let dev = m.dev.clone();
        blocking(move || unmount(&mp, &dev)).await??;
        if m.source.starts_with("/dev/nbd") {
            let _ = run("nbd-client", &["-d", &m.source]).await;
            let _ = std::fs::remove_file(nbd_device_file(dir, group, resource));
        } else if m.source.starts_with("/dev/loop") {
            // Marked to detach itself with the mount (autoclear); make sure.
            let _ = run("losetup", &["-d", &m.source]).await;
        }
    }
    unmount_fuse(dir, group, resource).await;
    Ok(())
}

/// Kills what uses the file system `dev` mounted at `mp`, writes it out and
/// unmounts it (lazily past two seconds of trying). Blocking.
fn unmount(mp: &str, dev: &str) -> Result<(), String> {
    // The resources above stopped already; what still uses the mount (a
    // shell, a straggler) would keep it busy.
    kill_users(dev);
    // Written out now, whatever happens to the unmount: a copy of this
    // mount in another mount namespace (made by `unshare` or `ip netns
    // exec` while it was mounted) keeps the file system alive past our
    // umount, which then writes nothing back.
    match std::fs::File::open(mp) {
        Ok(d) => {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs on a descriptor we own.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                tracing::warn!(mountpoint = mp, "syncfs: {}", std::io::Error::last_os_error());
            }
        }
        Err(e) => tracing::warn!(mountpoint = mp, "syncfs: {e}"),
    }
    for attempt in 0..20 {
        kill_users(dev);
        match umount2(mp, MntFlags::empty()) {
            // EINVAL: no longer a mount point.
            Ok(()) | Err(nix::errno::Errno::EINVAL) => return Ok(()),
            Err(e) if attempt == 19 => tracing::warn!(mountpoint = mp, "umount: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    // Busy past two seconds of killing its users: detach it from the tree
    // so that nothing new can reach it.
    umount2(mp, MntFlags::MNT_DETACH).map_err(|e| format!("umount {mp}: {e}"))?;
    tracing::warn!(mountpoint = mp, "unmounted lazily (still busy)");
    Ok(())
}

/// Unmounts this resource's FUSE file (nbdfuse then exits) and makes sure
/// no nbdfuse of it is left.
async fn unmount_fuse(dir: &Path, group: &str, resource: &str) {
    let fdir = fuse_dir(dir, group, resource);
    let d = fdir.clone();
    let _ = blocking(move || umount2(&d, MntFlags::MNT_DETACH)).await;
    let pidfile = fdir.with_extension("pid");
    if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
        let is_nbdfuse = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(b"nbdfuse")));
        if is_nbdfuse {
            for _ in 0..50 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(&pidfile);
    }
}

async fn monitor(f: &FilesystemSpec, dir: &Path, group: &str, resource: &str, deep: bool) -> ActionResult {
    let Some(m) = mount_at(&f.mountpoint) else { return Ok(OCF_NOT_RUNNING) };
    if !is_our_mount(&m, dir, group, resource) {
        return Err(format!("{} is mounted from {}, not from volume {}", f.mountpoint, m.source, f.volume));
    }
    let wanted_ro = f.options.split(',').any(|o| o == "ro");
    if m.read_only() && !wanted_ro {
        return Err(format!("{} was remounted read-only (I/O errors on volume {}?)", f.mountpoint, f.volume));
    }
    if block_path() == BlockPath::Loop {
        // The FUSE file answers only while nbdfuse runs.
        let file = fuse_dir(dir, group, resource).join("nbd");
        if let Err(e) = blocking(move || std::fs::metadata(&file)).await? {
            return Err(format!("the volume's FUSE file is gone ({e}): nbdfuse died"));
        }
    }
    let mp = f.mountpoint.clone();
    if let Some(w) = blocking(move || usage_warning(&mp)).await? {
        tracing::warn!(mountpoint = %f.mountpoint, "{w}");
    }
    if deep && !wanted_ro {
        // Write and sync a small file: the whole path down to the replicas.
        let mp = f.mountpoint.clone();
        let probe = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let p = Path::new(&mp).join(".tandem-monitor");
            let mut file = std::fs::File::create(&p)?;
            file.write_all(b"tandem deep monitor\n")?;
            file.sync_all()?;
            std::fs::remove_file(&p)
        });
        match probe.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("writing to {}: {e}", f.mountpoint)),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(0)
}

/// "file system full" / "N % full" at 95 % or more of the space an
/// unprivileged writer may use; None below, or when it cannot be read.
pub fn usage_warning(mountpoint: &str) -> Option<String> {
    let st = nix::sys::statvfs::statvfs(mountpoint).ok()?;
    let frag = st.fragment_size() as u64;
    let (total, avail) = (st.blocks() as u64 * frag, st.blocks_available() as u64 * frag);
    usage_text(total, avail)
}

fn usage_text(total: u64, avail: u64) -> Option<String> {
    if total == 0 {
        return None;
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let used_pct = 100 - (avail * 100 / total).min(100);
    if avail == 0 {
        Some(format!("file system full: 0 of {:.1} GiB free", gib(total)))
    } else if used_pct >= 95 {
        Some(format!("file system {used_pct} % full: {:.2} of {:.1} GiB free", gib(avail), gib(total)))
    } else {
        None
    }
}

/// SIGKILLs every process with a file, directory, root or mapping on the
/// file system `dev` (`major:minor`).
fn kill_users(dev: &str) {
    let Some((ma, mi)) = dev.split_once(':') else { return };
    let (Ok(ma), Ok(mi)) = (ma.parse::<u64>(), mi.parse::<u64>()) else { return };
    let wanted = nix::sys::stat::makedev(ma, mi);
    let maps_dev = format!("{ma:02x}:{mi:02x}");
    // Never tandem itself: the agent and its watchdog may both run this
    // stop at a lapse, each holding the mount's root open for its syncfs,
    // and each would kill the other (an agent vanished that way).
    let tandem = std::fs::read_link("/proc/self/exe").ok();
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if tandem.is_some() && std::fs::read_link(p.path().join("exe")).ok() == tandem {
            continue;
        }
        let base = p.path();
        let on_dev = |path: PathBuf| std::fs::metadata(path).is_ok_and(|m| m.dev() == wanted);
        let mut uses = ["cwd", "root", "exe"].iter().any(|l| on_dev(base.join(l)));
        if !uses {
            uses = std::fs::read_dir(base.join("fd")).is_ok_and(|fds| fds.flatten().any(|fd| on_dev(fd.path())));
        }
        if !uses {
            uses = std::fs::read_to_string(base.join("maps"))
                .is_ok_and(|maps| maps.lines().any(|l| l.split_whitespace().nth(3) == Some(maps_dev.as_str())));
        }
        if uses {
            tracing::warn!(pid, dev, "killing a process still using the file system");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 7:3 / /srv/db rw,relatime shared:5 - ext4 /dev/loop3 ro,errors=remount-ro\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, "/mnt/with space");
        assert_eq!(m[0].dev, "98:0");
        assert!(!m[0].read_only());
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fstype, "ext4");
        assert!(m[1].read_only(), "ro in the superblock options counts");
    }

    #[test]
    fn usage_warnings() {
        assert_eq!(usage_text(0, 0), None);
        assert_eq!(usage_text(1 << 30, 1 << 29), None);
        assert_eq!(usage_text(1 << 30, 0).unwrap(), "file system full: 0 of 1.0 GiB free");
        assert!(usage_text(100 << 20, 3 << 20).unwrap().starts_with("file system 97 % full"));
    }

    #[test]
    fn block_path_choice() {
        assert!(BlockPath::choose("floppy").unwrap_err().contains("auto, nbd or loop"));
        // This machine has no /dev/nbd0: auto never picks nbd here.
        if !Path::new("/dev/nbd0").exists() {
            assert!(BlockPath::choose("nbd").is_err());
            assert_eq!(BlockPath::choose("auto"), Ok(BlockPath::Loop));
        }
    }
}
