//! The NBD server of the data plane: exports one volume to applications
//! (qemu, nbdcopy, fio, the kernel client elsewhere) over a unix socket and
//! optionally TCP. See docs/nbd.md for what is supported and how to connect.
//!
//! Owns: the protocol (fixed newstyle handshake, simple replies; READ, WRITE,
//! FLUSH, FUA, TRIM, WRITE_ZEROES, DISC) and the connections. What the bytes
//! mean belongs to the [`Export`] behind it — the volume engine, or a file in
//! tests.
//!
//! Must never: acknowledge a FLUSH or FUA write before the export says it is
//! durable (the export decides what durable means: on a replicated volume, on
//! every sync replica); apply a write whose payload was cut short; or let one
//! client's bytes (malformed, oversized, abandoned half-way) disturb another
//! connection or the data.
//!
//! Layout: [`proto`] is the pure wire format (parsers, encoders, errno
//! choices) and is what the fuzzer drives; `handshake` and `transmission`
//! do one connection's I/O; `server` owns sockets and shutdown.

mod handshake;
pub mod proto;
mod server;
mod transmission;

pub use proto::{
    answer_option, check_request, parse_client_flags, parse_option, parse_option_header, parse_request, Action,
    ClientFlags, ClientOption, Command, ExportInfo, ExportQuery, OptionError, OptionHeader, OptionOutcome,
    ProtocolError, Request,
};
pub use server::{unix_uri, Server, SHUTDOWN_GRACE};

/// What the server exports: one volume (or a file in tests). Implementations
/// are called concurrently from many requests and connections.
#[async_trait::async_trait]
pub trait Export: Send + Sync + 'static {
    /// Its size now, read at each connection's handshake (a volume may grow).
    fn size(&self) -> u64;
    /// Advertised NBD_INFO_BLOCK_SIZE: (minimum, preferred, maximum payload).
    fn block_sizes(&self) -> (u32, u32, u32);
    fn read_only(&self) -> bool;
    /// True only if a FLUSH on one connection covers writes acknowledged on all connections.
    fn multi_conn(&self) -> bool;
    async fn read(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>>;
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> std::io::Result<()>;
    async fn flush(&self) -> std::io::Result<()>;
    async fn trim(&self, offset: u64, len: u32) -> std::io::Result<()>;
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> std::io::Result<()>;
}
