//! The NBD server against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy,
//! fio) and a hand-written raw client for what real clients never send:
//! out-of-range, misaligned and oversized requests, garbage handshakes, a
//! client dying half-way through a WRITE, and shutdown with requests in
//! flight. The export is a sparse file behind a small file-backed `Export`.
//!
//! The client binaries come from Debian packages (qemu-utils, libnbd-bin,
//! fio, nbdkit); a missing one fails its test naming the package.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem::volume::nbd::{Export, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const MIN_BLOCK: u32 = 512;
const MAX_PAYLOAD: u32 = 4 << 20;
const MIB: u64 = 1 << 20;

// ------------------------------------------------------------ the export

/// A sparse file exported as is. pread/pwrite/fdatasync on one shared
/// descriptor, so a flush on any connection covers every connection's writes
/// (hence multi_conn).
struct FileExport {
    file: Arc<File>,
    /// Grows like a volume's export (read at each connection's handshake).
    size: AtomicU64,
    read_only: bool,
    /// Delay before each read, to keep requests in flight.
    read_delay: Duration,
    /// pread/pwrite on the runtime thread instead of the blocking pool: for
    /// the throughput figure, where the page cache makes them cheap.
    inline: bool,
    calls: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u32) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own, no pointers involved.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[async_trait::async_trait]
impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    fn block_sizes(&self) -> (u32, u32, u32) {
        (MIN_BLOCK, 4096, MAX_PAYLOAD)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn multi_conn(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.read_delay.is_zero() {
            tokio::time::sleep(self.read_delay).await;
        }
        let f = self.file.clone();
        if self.inline {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            return Ok(buf);
        }
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let f = self.file.clone();
        if self.inline && !fua {
            return f.write_all_at(&data, offset);
        }
        blocking(move || {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let f = self.file.clone();
        blocking(move || f.sync_data()).await
    }
    async fn trim(&self, offset: u64, len: u32) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.trims.fetch_add(1, Ordering::SeqCst);
        let f = self.file.clone();
        blocking(move || fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        let f = self.file.clone();
        blocking(move || {
            if fallocate(&f, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_err() {
                f.write_all_at(&vec![0u8; len as usize], offset)?;
            }
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

// ------------------------------------------------------------ fixtures

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    export: Arc<FileExport>,
    server: Server,
}

struct Opts {
    size: u64,
    read_only: bool,
    tcp: bool,
    read_delay: Duration,
    inline: bool,
    fill: Option<u64>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { size: 16 * MIB, read_only: false, tcp: false, read_delay: Duration::ZERO, inline: false, fill: None }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so no extra dependency.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn start(name: &str, o: Opts) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&image).expect("image");
    file.set_len(o.size).expect("sparse image");
    if let Some(seed) = o.fill {
        file.write_all_at(&noise(o.size as usize, seed), 0).expect("fill image");
    }
    let export = Arc::new(FileExport {
        file: Arc::new(file),
        size: AtomicU64::new(o.size),
        read_only: o.read_only,
        read_delay: o.read_delay,
        inline: o.inline,
        calls: AtomicU64::new(0),
        trims: AtomicU64::new(0),
        zeroes: AtomicU64::new(0),
    });
    let socket = dir.path().join("nbd.sock");
    let tcp = o.tcp.then(|| "127.0.0.1:0".parse().expect("addr"));
    let server = Server::start(name, export.clone(), &socket, tcp).await.expect("server starts");
    Fixture { _dir: dir, image, socket, export, server }
}

impl Fixture {
    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }
}

/// The path of a client binary, or a failure naming the package to install.
fn tool(bin: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(bin)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("`{bin}` is not installed: install the Debian package `{package}` (apt-get install -y {package})")
    })
}

/// Runs a client to completion (bounded), returning its output.
async fn run(bin: &str, package: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(tool(bin, package));
    cmd.args(args).kill_on_drop(true).stdin(std::process::Stdio::null());
    match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{bin} {args:?}: {e}"),
        Err(_) => panic!("{bin} {args:?} did not finish in 120 s"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", text(out));
    // Shown with --nocapture, to see what the client did.
    eprintln!("{what}: {}", text(out));
}

// ------------------------------------------------------------ real clients

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_reads_back_a_pattern() {
    let f = start("vol0", Opts::default()).await;
    let uri = f.server.uri();
    assert!(uri.starts_with("nbd+unix:///vol0?socket="), "{uri}");
    let out = run(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", &uri, "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c", "flush"],
    )
    .await;
    assert_ok("qemu-io write/read", &out);
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    let disk = f.disk();
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0xab), "the pattern is on disk");
    assert!(disk[MIB as usize..].iter().all(|&b| b == 0), "nothing else changed");

    // A wrong expectation must be reported, or the passing read proves nothing.
    let out = run("qemu-io", "qemu-utils", &["-f", "raw", &uri, "-c", "read -P 0xee 0 4k"]).await;
    assert!(text(&out).contains("Pattern verification failed"), "{}", text(&out));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_compare_sees_identical_images() {
    let f = start("", Opts { fill: Some(0x9e37_79b9_7f4a_7c15), ..Opts::default() }).await;
    let uri = f.server.uri();
    assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
    let image = f.image.to_string_lossy().into_owned();
    let out = run("qemu-img", "qemu-utils", &["compare", "-f", "raw", "-F", "raw", &image, &uri]).await;
    assert_ok("qemu-img compare", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"), "{}", text(&out));

    // And a differing image is told apart (so "identical" means something).
    let other = f.image.with_extension("other");
    let mut bytes = f.disk();
    bytes[5 * MIB as usize] ^= 0xff;
    std::fs::write(&other, &bytes).expect("write other image");
    let other = other.to_string_lossy().into_owned();
    let out = run("qemu-img", "qemu-utils", &["compare", "-f", "raw", "-F", "raw", &other, &uri]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_sizes() {
    let f = start("vol0", Opts::default()).await;
    let out = run("nbdinfo", "libnbd-bin", &["--json", &f.server.uri()]).await;
    assert_ok("nbdinfo", &out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo prints JSON");
    let e = &v["exports"][0];
    assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
    assert_eq!(e["export-name"], "vol0", "{v}");
    assert_eq!(e["export-size"], 16 * MIB, "{v}");
    assert_eq!(e["block_size_minimum"], MIN_BLOCK, "{v}");
    assert_eq!(e["block_size_preferred"], 4096, "{v}");
    assert_eq!(e["block_size_maximum"], MAX_PAYLOAD, "{v}");
    for (key, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[key], want, "{key} in {v}");
    }
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_a_file_in_and_out() {
    let f = start("vol0", Opts::default()).await;
    let uri = f.server.uri();
    let src = f.image.with_extension("src");
    let want = noise(16 * MIB as usize, 42);
    std::fs::write(&src, &want).expect("source image");
    // CAN_MULTI_CONN is advertised, so nbdcopy uses several connections.
    let out = run("nbdcopy", "libnbd-bin", &[&src.to_string_lossy(), &uri]).await;
    assert_ok("nbdcopy in", &out);
    assert!(f.disk() == want, "the export holds the source");

    let dst = f.image.with_extension("dst");
    let out = run("nbdcopy", "libnbd-bin", &[&uri, &dst.to_string_lossy()]).await;
    assert_ok("nbdcopy out", &out);
    assert!(std::fs::read(&dst).expect("copy") == want, "the copy out equals the source");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randrw_verifies_over_tcp() {
    let f = start("vol0", Opts { size: 32 * MIB, tcp: true, ..Opts::default() }).await;
    let addr = f.server.tcp_addr().expect("tcp address");
    // The empty name selects the default export.
    let uri = format!("nbd://{addr}/");
    let out = run(
        "fio",
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would write its verify state into the working directory:
            // tests write only into their temp dirs.
            "--verify_state_save=0",
            "--runtime=3",
            "--time_based",
        ],
    )
    .await;
    assert_ok("fio", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "{}", text(&out));
    assert!(!stdout.contains("verify: bad"), "{}", text(&out));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_discard_and_write_zeroes_zero_the_range() {
    let f = start("vol0", Opts::default()).await;
    let uri = f.server.uri();
    let out = run(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "--discard=unmap",
            &uri,
            "-c",
            "write -P 0xcd 0 2M",
            "-c",
            "discard 0 512k",
            "-c",
            "write -z 512k 512k",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0xcd 1M 1M",
        ],
    )
    .await;
    assert_ok("qemu-io discard/write -z", &out);
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    assert!(f.export.trims.load(Ordering::SeqCst) > 0, "qemu sent NBD_CMD_TRIM");
    assert!(f.export.zeroes.load(Ordering::SeqCst) > 0, "qemu sent NBD_CMD_WRITE_ZEROES");
    let disk = f.disk();
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0));
    assert!(disk[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0xcd));
    f.server.shutdown().await;
}

// ------------------------------------------------------------ raw client

const NBD_EPERM: u32 = 1;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_EOVERFLOW: u32 = 75;
const NBD_ESHUTDOWN: u32 = 108;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// A minimal NBD client written from the spec, independent of the server's
/// own encoders.
struct Raw {
    s: UnixStream,
    tflags: u16,
}

async fn greet(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], IHAVEOPT);
    assert_eq!(u16::from_be_bytes([g[16], g[17]]) & 3, 3, "fixed newstyle and no zeroes");
    s.write_all(&3u32.to_be_bytes()).await.expect("client flags");
    s
}

async fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).await.expect("send option");
}

async fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("option reply");
    assert_eq!(u64::from_be_bytes(h[..8].try_into().expect("8 bytes")), 0x0003_e889_0455_65a9);
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let mut data = vec![0u8; u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize];
    s.read_exact(&mut data).await.expect("option reply data");
    (option, kind, data)
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    d
}

/// Sends NBD_OPT_GO; returns the transmission flags, or the error reply type.
async fn go(s: &mut UnixStream, name: &str) -> Result<u16, u32> {
    send_option(s, OPT_GO, &go_data(name)).await;
    let mut tflags = None;
    loop {
        let (option, kind, data) = option_reply(s).await;
        assert_eq!(option, OPT_GO);
        match kind {
            REP_INFO if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                tflags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
            REP_INFO => {}
            REP_ACK => return Ok(tflags.expect("NBD_INFO_EXPORT before ACK")),
            err => return Err(err),
        }
    }
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        let mut s = greet(path).await;
        let tflags = go(&mut s, "vol0").await.expect("GO accepted");
        Raw { s, tflags }
    }

    async fn send(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).await.expect("send request");
    }

    /// Reads one simple reply; `data_len` bytes follow it if it succeeded.
    async fn reply(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.expect("reply header");
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let mut data = Vec::new();
        if error == 0 {
            data = vec![0u8; data_len];
            self.s.read_exact(&mut data).await.expect("reply data");
        }
        (cookie, error, data)
    }

    async fn call(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Result<Vec<u8>, u32> {
        self.send(cmd, flags, 77, offset, len, payload).await;
        let data_len = if cmd == CMD_READ { len as usize } else { 0 };
        let (cookie, error, data) = self.reply(data_len).await;
        assert_eq!(cookie, 77);
        if error == 0 {
            Ok(data)
        } else {
            Err(error)
        }
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.call(CMD_READ, 0, offset, len, &[]).await
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.call(CMD_WRITE, FLAG_FUA, offset, data.len() as u32, data).await.map(drop)
    }

    /// True once the server has closed the connection.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

async fn eof(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_errno_and_the_connection_survives() {
    let f = start("vol0", Opts::default()).await;
    let mut c = Raw::connect(&f.socket).await;
    assert_eq!(c.tflags & 1, 1, "HAS_FLAGS");
    assert_eq!(c.tflags & 2, 0, "not read-only");
    let size = 16 * MIB;

    c.write(0, &[0x5a; 4096]).await.expect("aligned write");
    assert_eq!(c.read(size, 512).await, Err(NBD_EINVAL), "read past the end");
    assert_eq!(c.read(size - 512, 1024).await, Err(NBD_EINVAL), "read across the end");
    assert_eq!(c.read(u64::MAX - 511, 512).await, Err(NBD_EINVAL), "offset + length overflows");
    assert_eq!(c.read(0, 4096).await, Ok(vec![0x5a; 4096]), "the same connection reads fine");

    assert_eq!(c.write(100, &[1; 512]).await, Err(NBD_EINVAL), "misaligned offset");
    assert_eq!(c.write(512, &[1; 100]).await, Err(NBD_EINVAL), "misaligned length");
    assert_eq!(c.write(size, &[1; 512]).await, Err(NBD_ENOSPC), "write past the end");
    assert_eq!(c.call(CMD_TRIM, 0, size, 512, &[]).await, Err(NBD_EINVAL), "trim past the end");
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, size, 512, &[]).await, Err(NBD_ENOSPC), "zeroes past the end");
    assert_eq!(c.read(0, MAX_PAYLOAD + 512).await, Err(NBD_EOVERFLOW), "read above the maximum payload");
    // An oversized WRITE's payload is consumed and refused, and the stream
    // stays in sync.
    let big = vec![0xee; (MAX_PAYLOAD + 512) as usize];
    assert_eq!(c.write(0, &big).await, Err(NBD_EINVAL), "write above the maximum payload");
    assert_eq!(c.call(42, 0, 0, 512, &[]).await, Err(NBD_EINVAL), "unknown command");
    assert_eq!(c.call(CMD_READ, 1 << 2, 0, 512, &[]).await, Err(NBD_EINVAL), "DF was not negotiated");
    assert_eq!(c.read(0, 0).await, Ok(vec![]), "zero-length read");
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await, Ok(vec![]), "flush");
    assert_eq!(c.read(0, 4096).await, Ok(vec![0x5a; 4096]), "nothing above touched the data");
    assert!(f.disk()[..4096].iter().all(|&b| b == 0x5a));
    assert!(f.disk()[4096..].iter().all(|&b| b == 0));

    // Pipelined: 32 reads in flight, answered (in any order) by cookie.
    for i in 0..32u64 {
        c.send(CMD_READ, 0, 1000 + i, i * 4096, 4096, &[]).await;
    }
    let mut seen = Vec::new();
    for _ in 0..32 {
        let (cookie, error, data) = c.reply(4096).await;
        assert_eq!(error, 0);
        let want = if cookie == 1000 { 0x5a } else { 0 };
        assert!(data.iter().all(|&b| b == want), "cookie {cookie}");
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (1000..1032).collect::<Vec<_>>());

    // A soft disconnect: no reply, the server closes.
    c.send(CMD_DISC, 0, 9, 0, 0, &[]).await;
    assert!(c.closed().await);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_export_is_seen_whole_by_new_connections_only() {
    let f = start("vol0", Opts::default()).await;
    let size = 16 * MIB;
    let mut before = Raw::connect(&f.socket).await;
    before.write(size - 4096, &[0x42; 4096]).await.expect("the old last block");
    // The volume grows (as the engine does: the file first, then the size).
    f.export.file.set_len(2 * size).expect("grow the image");
    f.export.size.store(2 * size, Ordering::SeqCst);
    let mut after = Raw::connect(&f.socket).await;
    assert_eq!(after.read(size - 4096, 4096).await, Ok(vec![0x42; 4096]), "the old data");
    assert_eq!(after.read(size, 4096).await, Ok(vec![0; 4096]), "the new space reads as zeroes");
    after.write(2 * size - 4096, &[0x43; 4096]).await.expect("a write past the old end");
    // A connection made before keeps the size it negotiated (NBD cannot
    // tell it otherwise) until it reconnects.
    assert_eq!(before.read(size, 4096).await, Err(NBD_EINVAL), "an old connection past its size");
    assert_eq!(before.write(size, &[1; 4096]).await, Err(NBD_ENOSPC));
    assert_eq!(before.read(size - 4096, 4096).await, Ok(vec![0x42; 4096]), "it still works below");
    let out = run("nbdinfo", "libnbd-bin", &["--size", &f.server.uri()]).await;
    assert_ok("nbdinfo --size", &out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (2 * size).to_string());
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_are_dropped_while_other_clients_work() {
    let f = start("vol0", Opts::default()).await;
    let mut good = Raw::connect(&f.socket).await;
    good.write(0, &[7; 4096]).await.expect("write");

    // Options: unknown ones are refused, LIST names the export, an unknown
    // export is refused on GO and the right one then accepted.
    let mut s = greet(&f.socket).await;
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, REP_ERR_UNSUP);
    send_option(&mut s, OPT_LIST, &[]).await;
    let (_, kind, data) = option_reply(&mut s).await;
    assert_eq!((kind, &data[4..]), (REP_SERVER, &b"vol0"[..]));
    assert_eq!(option_reply(&mut s).await.1, REP_ACK);
    assert_eq!(go(&mut s, "nope").await, Err(REP_ERR_UNKNOWN));
    assert!(go(&mut s, "").await.is_ok(), "the empty name is the default export");
    let mut via_default = Raw { s, tflags: 0 };
    assert_eq!(via_default.read(0, 4096).await, Ok(vec![7; 4096]));

    // Garbage instead of an option.
    let mut s = greet(&f.socket).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("garbage");
    assert!(eof(&mut s).await, "garbage closes the connection");
    // An option claiming 4 GiB of data.
    let mut s = greet(&f.socket).await;
    let mut m = IHAVEOPT.to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&m).await.expect("huge option");
    assert!(eof(&mut s).await, "an oversized option closes the connection");
    // Unknown client flags.
    let mut s = UnixStream::connect(&f.socket).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    s.write_all(&0xffu32.to_be_bytes()).await.expect("flags");
    assert!(eof(&mut s).await, "unknown client flags close the connection");
    // A client hanging up mid-handshake.
    let mut s = greet(&f.socket).await;
    s.write_all(&IHAVEOPT[..5]).await.expect("partial");
    drop(s);
    // Abort is acknowledged.
    let mut s = greet(&f.socket).await;
    send_option(&mut s, OPT_ABORT, &[]).await;
    assert_eq!(option_reply(&mut s).await.1, REP_ACK);
    assert!(eof(&mut s).await);

    // Meanwhile the good client and a new one carry on.
    assert_eq!(good.read(0, 4096).await, Ok(vec![7; 4096]));
    good.write(4096, &[8; 4096]).await.expect("write after the bad handshakes");
    let mut fresh = Raw::connect(&f.socket).await;
    assert_eq!(fresh.read(4096, 4096).await, Ok(vec![8; 4096]));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dying_mid_write_leaves_acknowledged_data_intact() {
    let f = start("vol0", Opts::default()).await;
    let mut c = Raw::connect(&f.socket).await;
    c.write(0, &[0x11; 65536]).await.expect("acknowledged write");
    c.write(65536, &[0x33; 4096]).await.expect("acknowledged write");
    // A WRITE over the same range, cut off half-way through its payload.
    c.send(CMD_WRITE, 0, 5, 0, 65536, &[0x22; 32768]).await;
    c.s.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut d = Raw::connect(&f.socket).await;
    assert_eq!(d.read(0, 65536).await, Ok(vec![0x11; 65536]), "the torn write was not applied");
    assert_eq!(d.read(65536, 4096).await, Ok(vec![0x33; 4096]));
    assert!(f.disk()[..65536].iter().all(|&b| b == 0x11));
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_export_refuses_writes_with_eperm() {
    let f = start("vol0", Opts { read_only: true, fill: Some(7), ..Opts::default() }).await;
    let before = f.disk();
    let mut c = Raw::connect(&f.socket).await;
    assert_eq!(c.tflags & 2, 2, "READ_ONLY advertised");
    assert_eq!(c.write(0, &[1; 4096]).await, Err(NBD_EPERM));
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).await, Err(NBD_EPERM));
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await, Err(NBD_EPERM));
    assert_eq!(c.read(0, 4096).await, Ok(before[..4096].to_vec()), "reads still work");
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await, Ok(vec![]));

    // A real client sees the export as read-only too.
    let out = run("nbdinfo", "libnbd-bin", &["--json", &f.server.uri()]).await;
    assert_ok("nbdinfo", &out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo prints JSON");
    assert_eq!(v["exports"][0]["is_read_only"], true, "{v}");
    assert_eq!(v["exports"][0]["can_trim"], false, "{v}");
    assert!(f.disk() == before, "the image is unchanged");
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_requests_then_closes() {
    let f = start("vol0", Opts { read_delay: Duration::from_millis(300), ..Opts::default() }).await;
    let mut c = Raw::connect(&f.socket).await;
    c.send(CMD_READ, 0, 1, 0, 4096, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let Fixture { server, socket, export, .. } = f;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A request arriving while the first is still in flight is refused with
    // ESHUTDOWN (without reaching the export); the first is answered with its
    // data. Replies may come in either order.
    c.send(CMD_READ, 0, 2, 0, 4096, &[]).await;
    let mut answered = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; 16];
        c.s.read_exact(&mut h).await.expect("reply header");
        let error = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        match cookie {
            1 => {
                assert_eq!(error, 0);
                let mut data = vec![0u8; 4096];
                c.s.read_exact(&mut data).await.expect("data of the in-flight read");
            }
            2 => assert_eq!(error, NBD_ESHUTDOWN),
            other => panic!("unexpected cookie {other}"),
        }
        answered.push(cookie);
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2]);
    tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("shutdown is bounded").expect("shutdown");
    assert!(!socket.exists(), "the socket file is removed");
    assert!(c.closed().await);
    let calls = export.calls.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "only the first read reached the export");
    assert!(UnixStream::connect(&socket).await.is_err(), "nothing listens any more");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(export.calls.load(Ordering::SeqCst), calls, "no request reaches the export after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbd.sock");
    // A socket left behind by a crashed server: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let f = start("vol0", Opts::default()).await;
    let server = Server::start("vol0", f.export.clone(), &socket, None).await.expect("replaces the stale socket");
    let mut c = Raw::connect(&socket).await;
    assert_eq!(c.read(0, 512).await, Ok(vec![0; 512]));
    server.shutdown().await;
    assert!(!socket.exists());
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_run_concurrently() {
    let f = start("vol0", Opts { read_delay: Duration::from_millis(250), ..Opts::default() }).await;
    let mut c = Raw::connect(&f.socket).await;
    let began = std::time::Instant::now();
    for i in 0..16u64 {
        c.send(CMD_READ, 0, i, i * 4096, 4096, &[]).await;
    }
    for _ in 0..16 {
        let (_, error, _) = c.reply(4096).await;
        assert_eq!(error, 0);
    }
    // Served one after the other they would take 16 x 250 ms = 4 s.
    let took = began.elapsed();
    assert!(took < Duration::from_millis(2000), "16 delayed reads took {took:?}: requests were serialized");
    f.server.shutdown().await;
}

/// Not a check: a quick figure for the server's own overhead. Run with
/// `cargo test --release --test nbd -- --ignored --nocapture qd32`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn qd32_random_write_figure() {
    let inline = std::env::var_os("NBD_FIGURE_INLINE").is_some();
    let f = start("vol0", Opts { size: 1 << 30, inline, ..Opts::default() }).await;
    let out = run(
        "fio",
        "fio",
        &[
            "--name=qd32",
            "--ioengine=nbd",
            &format!("--uri={}", f.server.uri()),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--runtime=5",
            "--time_based",
        ],
    )
    .await;
    assert_ok("fio qd32", &out);
    f.server.shutdown().await;
}
