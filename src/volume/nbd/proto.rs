//! The NBD wire format as pure functions: parsing what clients send, encoding
//! what the server answers, and deciding which errno a request earns.
//!
//! Owns: every protocol constant, the request and option parsers, the reply
//! encoders, the answer to each handshake option, and the request validation
//! table (alignment, bounds, read-only, payload limits).
//!
//! Must never: do I/O, hold state, panic on client bytes, or allocate in
//! proportion to a length a client claims before that length has been checked
//! against a bound. Everything here is unit-tested, property-tested and fuzzed
//! (`fuzz/fuzz_targets/nbd_request.rs`) for exactly that reason.

use thiserror::Error;

// Magic numbers (doc/proto.md, "Handshake" and "Transmission").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Error values of the transmission phase (fixed by the protocol; they happen
// to equal Linux errnos).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const OPTION_HEADER_LEN: usize = 16;
pub const GREETING_LEN: usize = 18;
/// The longest option data accepted. The largest option we understand is
/// NBD_OPT_GO: a name of at most 4096 bytes plus a handful of 2-byte info
/// requests; unknown options (meta-context queries) are far smaller in
/// practice. Anything longer is treated as abuse and closes the connection.
pub const MAX_OPTION_LEN: u32 = 16 * 1024;
/// The protocol's limit on any string (export names, messages).
pub const MAX_STRING_LEN: usize = 4096;
/// The advertised maximum payload is clamped to this: every request buffers
/// its whole payload, so it bounds the memory one request can pin. It is the
/// spec's interoperability figure (2^25).
pub const MAX_PAYLOAD_LIMIT: u32 = 32 * 1024 * 1024;
/// A WRITE longer than the advertised maximum but at most this long has its
/// payload read and thrown away so the connection stays in sync; longer ones
/// are a denial of service and close the connection.
pub const WRITE_DISCARD_CAP: u32 = 64 * 1024 * 1024;

/// A violation of the framing itself: the connection cannot continue.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes, more than the {max} accepted")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
}

/// The data of a known option is malformed: answered with
/// NBD_REP_ERR_INVALID (or, for NBD_OPT_EXPORT_NAME, which has no error
/// reply, by closing the connection).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OptionError {
    #[error("option data is truncated")]
    Truncated,
    #[error("name length {0} does not fit in the option data")]
    NameLength(u32),
    #[error("{0} unexpected bytes after the option data")]
    Trailing(usize),
    #[error("export name is not UTF-8 or contains NUL")]
    BadName,
    #[error("export name is {0} bytes, more than 4096")]
    NameTooLong(usize),
    #[error("option takes no data")]
    UnexpectedData,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn exact(bytes: &[u8], expected: usize) -> Result<(), ProtocolError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(ProtocolError::Length { expected, got: bytes.len() })
    }
}

// ---------------------------------------------------------------- handshake

/// What the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    /// The client asked us to leave out the 124 zero bytes after
    /// NBD_OPT_EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Parses the 4 bytes of client flags. Unknown bits must close the
/// connection (the spec says MUST): they mean the client expects something we
/// did not offer.
pub fn parse_client_flags(bytes: &[u8]) -> Result<ClientFlags, ProtocolError> {
    exact(bytes, 4)?;
    let flags = be_u32(bytes, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::ClientFlags(flags));
    }
    Ok(ClientFlags { fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0, no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// The fixed part of every option the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses a 16-byte option header (magic, option, data length), refusing
/// lengths above [`MAX_OPTION_LEN`] so the caller may allocate `len` bytes.
pub fn parse_option_header(bytes: &[u8]) -> Result<OptionHeader, ProtocolError> {
    exact(bytes, OPTION_HEADER_LEN)?;
    let magic = be_u64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::OptionMagic(magic));
    }
    let option = be_u32(bytes, 8);
    let len = be_u32(bytes, 12);
    if len > MAX_OPTION_LEN {
        return Err(ProtocolError::OptionTooLong { option, len, max: MAX_OPTION_LEN });
    }
    Ok(OptionHeader { option, len })
}

/// The name and information requests of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub name: String,
    pub info_requests: Vec<u16>,
}

/// An option as the server understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(ExportQuery),
    Go(ExportQuery),
    /// Anything else (structured replies, meta contexts, TLS, extended
    /// headers...): answered NBD_REP_ERR_UNSUP. Its data is ignored.
    Unsupported(u32),
}

fn parse_name(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionError::NameTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(OptionError::BadName);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| OptionError::BadName)
}

fn parse_query(data: &[u8]) -> Result<ExportQuery, OptionError> {
    // 32-bit name length, name, 16-bit count, count x 16-bit info types;
    // nothing may be left over.
    if data.len() < 6 {
        return Err(OptionError::Truncated);
    }
    let name_len = be_u32(data, 0);
    let name_end = 4usize
        .checked_add(name_len as usize)
        .filter(|end| end.saturating_add(2) <= data.len())
        .ok_or(OptionError::NameLength(name_len))?;
    let name = parse_name(&data[4..name_end])?;
    let count = be_u16(data, name_end) as usize;
    let list = &data[name_end + 2..];
    if list.len() < count * 2 {
        return Err(OptionError::Truncated);
    }
    if list.len() > count * 2 {
        return Err(OptionError::Trailing(list.len() - count * 2));
    }
    let info_requests = list.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(ExportQuery { name, info_requests })
}

/// Parses the data of option `option`. Never fails for options we do not
/// understand: those become [`ClientOption::Unsupported`].
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    match option {
        OPT_EXPORT_NAME => parse_name(data).map(ClientOption::ExportName),
        // The spec asks servers to ignore data sent with NBD_OPT_ABORT.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST if !data.is_empty() => Err(OptionError::UnexpectedData),
        OPT_LIST => Ok(ClientOption::List),
        OPT_INFO => parse_query(data).map(ClientOption::Info),
        OPT_GO => parse_query(data).map(ClientOption::Go),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

impl ClientOption {
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::Unsupported(code) => *code,
        }
    }

    /// The option as a client sends it: header then data. Used by tests and
    /// by the raw test client; the server never sends options.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            ClientOption::ExportName(name) => data.extend_from_slice(name.as_bytes()),
            ClientOption::Info(q) | ClientOption::Go(q) => {
                data.extend_from_slice(&(q.name.len() as u32).to_be_bytes());
                data.extend_from_slice(q.name.as_bytes());
                data.extend_from_slice(&(q.info_requests.len() as u16).to_be_bytes());
                for info in &q.info_requests {
                    data.extend_from_slice(&info.to_be_bytes());
                }
            }
            ClientOption::Abort | ClientOption::List | ClientOption::Unsupported(_) => {}
        }
        let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.code().to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(&data);
        out
    }
}

/// Appends one fixed-newstyle option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What the handshake does after answering one option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Wait for the next option.
    Continue,
    /// The reply has been written; the next bytes are transmission requests.
    Transmission,
    /// The client aborted (NBD_OPT_ABORT, acknowledged): close.
    Abort,
    /// NBD_OPT_EXPORT_NAME we cannot satisfy: the protocol has no error reply
    /// for it, so the connection must be closed without one.
    Refuse(String),
}

fn name_matches(served: &str, asked: &str) -> bool {
    // The empty name is the default export and always means ours.
    asked.is_empty() || asked == served
}

/// Answers one option: appends the bytes to send to `out` and says what
/// follows. `export_name` is the name we serve, `info` its parameters.
pub fn answer_option(
    export_name: &str,
    info: &ExportInfo,
    client: ClientFlags,
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> OptionOutcome {
    let parsed = match parse_option(option, data) {
        Ok(parsed) => parsed,
        Err(e) if option == OPT_EXPORT_NAME => return OptionOutcome::Refuse(e.to_string()),
        Err(e) => {
            encode_option_reply(out, option, REP_ERR_INVALID, e.to_string().as_bytes());
            return OptionOutcome::Continue;
        }
    };
    match parsed {
        ClientOption::ExportName(name) => {
            if !name_matches(export_name, &name) {
                return OptionOutcome::Refuse(format!("unknown export {name:?}"));
            }
            out.extend_from_slice(&info.size.to_be_bytes());
            out.extend_from_slice(&info.transmission_flags().to_be_bytes());
            if !client.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            OptionOutcome::Transmission
        }
        ClientOption::Abort => {
            encode_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Abort
        }
        ClientOption::List => {
            let mut data = Vec::with_capacity(4 + export_name.len());
            data.extend_from_slice(&(export_name.len() as u32).to_be_bytes());
            data.extend_from_slice(export_name.as_bytes());
            encode_option_reply(out, option, REP_SERVER, &data);
            encode_option_reply(out, option, REP_ACK, &[]);
            OptionOutcome::Continue
        }
        ClientOption::Info(q) | ClientOption::Go(q) => {
            if !name_matches(export_name, &q.name) {
                let msg = format!("unknown export {:?}", q.name);
                encode_option_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                return OptionOutcome::Continue;
            }
            let mut export = [0u8; 12];
            export[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
            export[2..10].copy_from_slice(&info.size.to_be_bytes());
            export[10..12].copy_from_slice(&info.transmission_flags().to_be_bytes());
            encode_option_reply(out, option, REP_INFO, &export);
            // Sent whether or not it was asked for (the spec allows
            // unrequested information): without it qemu assumes a minimum
            // block size of 1 and sends unaligned I/O.
            let mut sizes = [0u8; 14];
            sizes[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            sizes[2..6].copy_from_slice(&info.min_block.to_be_bytes());
            sizes[6..10].copy_from_slice(&info.preferred_block.to_be_bytes());
            sizes[10..14].copy_from_slice(&info.max_payload.to_be_bytes());
            encode_option_reply(out, option, REP_INFO, &sizes);
            encode_option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                OptionOutcome::Transmission
            } else {
                OptionOutcome::Continue
            }
        }
        ClientOption::Unsupported(code) => {
            let msg = format!("option {code} is not supported");
            encode_option_reply(out, code, REP_ERR_UNSUP, msg.as_bytes());
            OptionOutcome::Continue
        }
    }
}

// ------------------------------------------------------------- transmission

/// The command of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(code: u16) -> Command {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(code) => code,
        }
    }
}

/// One request header (a WRITE's payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a 28-byte request header. Only the framing is checked here; what
/// the request may do is [`check_request`]'s business.
pub fn parse_request(header: &[u8]) -> Result<Request, ProtocolError> {
    exact(header, REQUEST_HEADER_LEN)?;
    let magic = be_u32(header, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::RequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(header, 4),
        command: Command::from_wire(be_u16(header, 6)),
        cookie: be_u64(header, 8),
        offset: be_u64(header, 16),
        len: be_u32(header, 24),
    })
}

impl Request {
    /// The header as a client sends it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire, whether or not
    /// the request is valid: they must be consumed to stay in sync.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }
}

/// The simple reply header (a successful READ's data follows it).
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// What the server advertises about an export, fixed for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub min_block: u32,
    pub preferred_block: u32,
    /// Already clamped to [`MAX_PAYLOAD_LIMIT`].
    pub max_payload: u32,
    pub read_only: bool,
    pub multi_conn: bool,
}

impl ExportInfo {
    /// Checks the block sizes against the spec's rules ("Size constraints")
    /// and clamps the maximum payload to [`MAX_PAYLOAD_LIMIT`].
    pub fn new(
        size: u64,
        (min_block, preferred_block, max_payload): (u32, u32, u32),
        read_only: bool,
        multi_conn: bool,
    ) -> Result<ExportInfo, String> {
        if !min_block.is_power_of_two() || min_block > 65536 {
            return Err(format!("minimum block size {min_block} must be a power of 2 up to 65536"));
        }
        if !preferred_block.is_power_of_two() || preferred_block < min_block.max(512) {
            return Err(format!(
                "preferred block size {preferred_block} must be a power of 2 at least max(minimum, 512)"
            ));
        }
        let max_payload = max_payload.min(MAX_PAYLOAD_LIMIT);
        if max_payload < preferred_block {
            return Err(format!(
                "maximum payload {max_payload} (clamped to {MAX_PAYLOAD_LIMIT}) is below the preferred block size {preferred_block}"
            ));
        }
        Ok(ExportInfo { size, min_block, preferred_block, max_payload, read_only, multi_conn })
    }

    pub fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        }
        if self.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    fn aligned(&self, req: &Request) -> bool {
        let min = u64::from(self.min_block);
        req.offset.is_multiple_of(min) && u64::from(req.len).is_multiple_of(min)
    }

    fn in_bounds(&self, req: &Request) -> bool {
        req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= self.size)
    }
}

/// What a valid request asks of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// NBD_CMD_DISC: finish what is in flight, then close. No reply.
    Disconnect,
    /// Valid but nothing to do (zero length, NBD_CMD_CACHE): reply success
    /// without calling the export.
    Nothing,
}

/// Decides what a request does, or which NBD error it gets. The errno choices
/// follow doc/proto.md "Error values": EINVAL for unknown commands and flags,
/// misalignment, and reads/trims past the end; ENOSPC for writes and write
/// zeroes past the end; EPERM for any write on a read-only export; EOVERFLOW
/// for a READ longer than the maximum payload (as asked of this server; the
/// read can never be answered with a simple reply); EINVAL for such a WRITE
/// (the spec reserves EOVERFLOW for other cases).
///
/// Zero-length requests (the spec leaves them unspecified but says not to
/// disconnect) succeed without touching the export when they are otherwise
/// valid.
pub fn check_request(req: &Request, info: &ExportInfo) -> Result<Action, u32> {
    // FUA is valid on every command once SEND_FUA is advertised (some
    // clients set it on reads); NO_HOLE only on WRITE_ZEROES. DF, REQ_ONE and
    // FAST_ZERO belong to features we do not advertise.
    let allowed = match req.command {
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    let writes = matches!(req.command, Command::Write | Command::Trim | Command::WriteZeroes);
    match req.command {
        // A disconnect is honoured whatever its fields say.
        Command::Disc => return Ok(Action::Disconnect),
        Command::Unknown(_) | Command::BlockStatus => return Err(EINVAL),
        _ => {}
    }
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    if writes && info.read_only {
        return Err(EPERM);
    }
    match req.command {
        Command::Read if len > info.max_payload => return Err(EOVERFLOW),
        Command::Write if len > info.max_payload => return Err(EINVAL),
        Command::Flush if offset != 0 || len != 0 => return Err(EINVAL),
        Command::Flush => return Ok(Action::Flush),
        _ => {}
    }
    if !info.aligned(req) {
        return Err(EINVAL);
    }
    if !info.in_bounds(req) {
        return Err(match req.command {
            Command::Write | Command::WriteZeroes => ENOSPC,
            _ => EINVAL,
        });
    }
    if len == 0 {
        return Ok(Action::Nothing);
    }
    Ok(match req.command {
        Command::Read => Action::Read { offset, len },
        Command::Write => Action::Write { offset, len, fua },
        Command::Trim => Action::Trim { offset, len, fua },
        Command::WriteZeroes => Action::WriteZeroes { offset, len, fua },
        // Advisory only; nothing in our exports benefits from prefetching.
        _ => Action::Nothing,
    })
}

/// Maps an export's I/O error to an NBD error value: the raw errno when the
/// protocol defines it, EDQUOT/EFBIG as ENOSPC (as the spec asks), EIO
/// otherwise.
pub fn errno_for(err: &std::io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) => EPERM,
        Some(libc::EIO) => EIO,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ENOTSUP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info() -> ExportInfo {
        ExportInfo::new(1 << 20, (512, 4096, 1 << 20), false, true).expect("valid sizes")
    }

    fn req(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, command, cookie: 7, offset, len }
    }

    #[test]
    fn request_header_parses_big_endian_fields() {
        let mut h = Vec::new();
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&CMD_WRITE.to_be_bytes());
        h.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        h.extend_from_slice(&4096u64.to_be_bytes());
        h.extend_from_slice(&512u32.to_be_bytes());
        let r = parse_request(&h).expect("valid header");
        assert_eq!(r, req(Command::Write, 1, 4096, 512).with_cookie(0x0102_0304_0506_0708));
        assert_eq!(r.payload_len(), 512);
    }

    impl Request {
        fn with_cookie(mut self, cookie: u64) -> Request {
            self.cookie = cookie;
            self
        }
    }

    #[test]
    fn request_framing_errors() {
        assert_eq!(parse_request(&[0; 27]), Err(ProtocolError::Length { expected: 28, got: 27 }));
        assert_eq!(parse_request(&[0; 28]), Err(ProtocolError::RequestMagic(0)));
        let mut h = req(Command::Read, 0, 0, 512).encode().to_vec();
        h.push(0);
        assert!(matches!(parse_request(&h), Err(ProtocolError::Length { .. })));
    }

    #[test]
    fn option_header_bounds_length() {
        let mut h = Vec::new();
        h.extend_from_slice(&IHAVEOPT.to_be_bytes());
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(parse_option_header(&h), Err(ProtocolError::OptionTooLong { .. })));
        h[12..16].copy_from_slice(&MAX_OPTION_LEN.to_be_bytes());
        assert_eq!(parse_option_header(&h), Ok(OptionHeader { option: OPT_GO, len: MAX_OPTION_LEN }));
        h[0] = b'X';
        assert!(matches!(parse_option_header(&h), Err(ProtocolError::OptionMagic(_))));
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&3u32.to_be_bytes()), Ok(ClientFlags { fixed_newstyle: true, no_zeroes: true }));
        assert_eq!(parse_client_flags(&4u32.to_be_bytes()), Err(ProtocolError::ClientFlags(4)));
    }

    #[test]
    fn go_query_parsing() {
        let q = ExportQuery { name: "vol".into(), info_requests: vec![INFO_BLOCK_SIZE, INFO_NAME] };
        let wire = ClientOption::Go(q.clone()).encode();
        assert_eq!(parse_option(OPT_GO, &wire[16..]), Ok(ClientOption::Go(q)));
        // Name length pointing past the data.
        let mut bad = wire[16..].to_vec();
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(parse_option(OPT_GO, &bad), Err(OptionError::NameLength(100)));
        // Count claims more info requests than present.
        let mut short = wire[16..].to_vec();
        short.truncate(short.len() - 1);
        assert_eq!(parse_option(OPT_GO, &short), Err(OptionError::Truncated));
        let mut long = wire[16..].to_vec();
        long.push(0);
        assert_eq!(parse_option(OPT_GO, &long), Err(OptionError::Trailing(1)));
        assert_eq!(parse_option(OPT_INFO, &[0, 0, 0]), Err(OptionError::Truncated));
        assert_eq!(parse_option(OPT_EXPORT_NAME, b"a\0b"), Err(OptionError::BadName));
        assert_eq!(parse_option(OPT_LIST, b"x"), Err(OptionError::UnexpectedData));
        assert_eq!(parse_option(OPT_ABORT, b"ignored"), Ok(ClientOption::Abort));
        assert_eq!(parse_option(OPT_STRUCTURED_REPLY, b""), Ok(ClientOption::Unsupported(8)));
    }

    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(b, 0), OPTION_REPLY_MAGIC);
            let len = be_u32(b, 16) as usize;
            out.push((be_u32(b, 8), be_u32(b, 12), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    const CLIENT: ClientFlags = ClientFlags { fixed_newstyle: true, no_zeroes: false };

    #[test]
    fn go_answers_export_and_block_size_then_ack() {
        let mut out = Vec::new();
        let data = &ClientOption::Go(ExportQuery { name: "vol".into(), info_requests: vec![] }).encode()[16..];
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_GO, data, &mut out), OptionOutcome::Transmission);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].0, r[0].1), (OPT_GO, REP_INFO));
        assert_eq!(be_u16(&r[0].2, 0), INFO_EXPORT);
        assert_eq!(be_u64(&r[0].2, 2), 1 << 20);
        assert_eq!(be_u16(&r[0].2, 10), info().transmission_flags());
        assert_eq!(be_u16(&r[1].2, 0), INFO_BLOCK_SIZE);
        assert_eq!((be_u32(&r[1].2, 2), be_u32(&r[1].2, 6), be_u32(&r[1].2, 10)), (512, 4096, 1 << 20));
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn info_does_not_enter_transmission_and_unknown_names_are_refused() {
        let mut out = Vec::new();
        let q = |name: &str| ClientOption::Info(ExportQuery { name: name.into(), info_requests: vec![] }).encode();
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_INFO, &q("")[16..], &mut out), OptionOutcome::Continue);
        assert_eq!(replies(&out).last().map(|r| r.1), Some(REP_ACK));
        out.clear();
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_GO, &q("other")[16..], &mut out), OptionOutcome::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert!(matches!(
            answer_option("vol", &info(), CLIENT, OPT_EXPORT_NAME, b"other", &mut out),
            OptionOutcome::Refuse(_)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn export_name_honours_no_zeroes() {
        let mut out = Vec::new();
        assert_eq!(
            answer_option("vol", &info(), CLIENT, OPT_EXPORT_NAME, b"vol", &mut out),
            OptionOutcome::Transmission
        );
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        let nz = ClientFlags { fixed_newstyle: true, no_zeroes: true };
        assert_eq!(answer_option("vol", &info(), nz, OPT_EXPORT_NAME, b"", &mut out), OptionOutcome::Transmission);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn list_abort_and_unsupported() {
        let mut out = Vec::new();
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_LIST, b"", &mut out), OptionOutcome::Continue);
        let r = replies(&out);
        assert_eq!((r[0].1, &r[0].2[4..]), (REP_SERVER, &b"vol"[..]));
        assert_eq!(r[1].1, REP_ACK);
        for opt in [OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS, OPT_SET_META_CONTEXT, OPT_STARTTLS, 9999] {
            out.clear();
            assert_eq!(answer_option("vol", &info(), CLIENT, opt, b"junk", &mut out), OptionOutcome::Continue);
            assert_eq!(replies(&out)[0].0, opt);
            assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        }
        out.clear();
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_LIST, b"x", &mut out), OptionOutcome::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(answer_option("vol", &info(), CLIENT, OPT_ABORT, b"", &mut out), OptionOutcome::Abort);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn errno_table() {
        let i = info();
        let ro = ExportInfo { read_only: true, ..i };
        use Command::*;
        let cases = [
            (req(Read, 0, 0, 4096), &i, Ok(Action::Read { offset: 0, len: 4096 })),
            (req(Read, 1, 0, 512), &i, Ok(Action::Read { offset: 0, len: 512 })),
            (req(Read, 0, 1 << 20, 512), &i, Err(EINVAL)),
            (req(Read, 0, u64::MAX - 511, 512), &i, Err(EINVAL)),
            (req(Read, 0, 1, 512), &i, Err(EINVAL)),
            (req(Read, 0, 0, (1 << 20) + 512), &i, Err(EOVERFLOW)),
            (req(Read, CMD_FLAG_DF, 0, 512), &i, Err(EINVAL)),
            (req(Read, 0, 1 << 20, 0), &i, Ok(Action::Nothing)),
            (req(Write, 1, 512, 512), &i, Ok(Action::Write { offset: 512, len: 512, fua: true })),
            (req(Write, 0, 512, 100), &i, Err(EINVAL)),
            (req(Write, 0, 1 << 20, 512), &i, Err(ENOSPC)),
            (req(Write, 0, 0, (1 << 20) + 512), &i, Err(EINVAL)),
            (req(Write, 0, 0, 512), &ro, Err(EPERM)),
            (req(Write, 0, 0, 0), &i, Ok(Action::Nothing)),
            (req(Flush, 0, 0, 0), &ro, Ok(Action::Flush)),
            (req(Flush, 0, 1, 0), &i, Err(EINVAL)),
            (req(Trim, 0, 0, 512), &i, Ok(Action::Trim { offset: 0, len: 512, fua: false })),
            (req(Trim, 0, 1 << 20, 512), &i, Err(EINVAL)),
            (req(Trim, 0, 0, 512), &ro, Err(EPERM)),
            (
                req(WriteZeroes, CMD_FLAG_NO_HOLE | 1, 0, 512),
                &i,
                Ok(Action::WriteZeroes { offset: 0, len: 512, fua: true }),
            ),
            (req(WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512), &i, Err(EINVAL)),
            (req(WriteZeroes, 0, 1 << 20, 512), &i, Err(ENOSPC)),
            (req(WriteZeroes, 0, 0, u32::MAX - 511), &i, Err(ENOSPC)),
            (req(WriteZeroes, 0, 0, 512), &ro, Err(EPERM)),
            (req(Trim, CMD_FLAG_NO_HOLE, 0, 512), &i, Err(EINVAL)),
            (req(Cache, 0, 0, 512), &i, Ok(Action::Nothing)),
            (req(BlockStatus, 0, 0, 512), &i, Err(EINVAL)),
            (req(Unknown(42), 0, 0, 512), &i, Err(EINVAL)),
            (req(Disc, 0xffff, 9, 9), &i, Ok(Action::Disconnect)),
        ];
        for (r, inf, want) in cases {
            assert_eq!(check_request(&r, inf), want, "{r:?} read_only={}", inf.read_only);
        }
    }

    #[test]
    fn block_size_rules() {
        assert!(ExportInfo::new(0, (1, 512, 1 << 20), false, false).is_ok());
        assert!(ExportInfo::new(0, (3, 512, 1 << 20), false, false).is_err());
        assert!(ExportInfo::new(0, (1 << 17, 1 << 17, 1 << 20), false, false).is_err());
        assert!(ExportInfo::new(0, (512, 256, 1 << 20), false, false).is_err());
        assert!(ExportInfo::new(0, (512, 4096, 2048), false, false).is_err());
        let clamped = ExportInfo::new(0, (512, 4096, u32::MAX), false, false).expect("valid");
        assert_eq!(clamped.max_payload, MAX_PAYLOAD_LIMIT);
    }

    #[test]
    fn io_errors_map_to_protocol_errnos() {
        let e = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(errno_for(&e(libc::ENOSPC)), ENOSPC);
        assert_eq!(errno_for(&e(libc::EDQUOT)), ENOSPC);
        assert_eq!(errno_for(&e(libc::EPERM)), EPERM);
        assert_eq!(errno_for(&e(libc::EBADF)), EIO);
        assert_eq!(errno_for(&std::io::Error::other("x")), EIO);
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_wire)
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (any::<u16>(), arb_command(), any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(flags, command, cookie, offset, len)| Request { flags, command, cookie, offset, len })
    }

    fn arb_option() -> impl Strategy<Value = ClientOption> {
        let name = "[^\u{0}]{0,40}";
        let query = (name, prop::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, info_requests)| ExportQuery { name, info_requests });
        prop_oneof![
            name.prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            query.clone().prop_map(ClientOption::Info),
            query.prop_map(ClientOption::Go),
            any::<u32>()
                .prop_filter("not a parsed option", |c| ![1, 2, 3, 6, 7].contains(c))
                .prop_map(ClientOption::Unsupported),
        ]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), option in any::<u32>()) {
            let _ = parse_request(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_client_flags(&bytes);
            let _ = parse_option(option, &bytes);
            let mut out = Vec::new();
            let _ = answer_option("vol", &info(), CLIENT, option, &bytes, &mut out);
        }

        #[test]
        fn request_round_trips(r in arb_request()) {
            prop_assert_eq!(parse_request(&r.encode()), Ok(r));
        }

        #[test]
        fn option_round_trips(o in arb_option()) {
            let wire = o.encode();
            let header = parse_option_header(&wire[..OPTION_HEADER_LEN]).expect("header");
            prop_assert_eq!(header.len as usize, wire.len() - OPTION_HEADER_LEN);
            prop_assert_eq!(parse_option(header.option, &wire[OPTION_HEADER_LEN..]), Ok(o));
        }

        #[test]
        fn accepted_requests_stay_inside_the_export(r in arb_request(), size_blocks in 0u64..1 << 20, ro in any::<bool>()) {
            let inf = ExportInfo { size: size_blocks * 512, read_only: ro, ..info() };
            match check_request(&r, &inf) {
                Ok(Action::Read { offset, len }) | Ok(Action::Write { offset, len, .. })
                | Ok(Action::Trim { offset, len, .. }) | Ok(Action::WriteZeroes { offset, len, .. }) => {
                    prop_assert!(offset + u64::from(len) <= inf.size);
                    prop_assert_eq!(offset % 512, 0);
                    prop_assert_eq!(len % 512, 0);
                    prop_assert!(len > 0);
                    if matches!(r.command, Command::Read | Command::Write) {
                        prop_assert!(len <= inf.max_payload);
                    }
                    if r.command != Command::Read {
                        prop_assert!(!ro);
                    }
                }
                Ok(_) => {}
                Err(e) => prop_assert!([EPERM, EINVAL, ENOSPC, EOVERFLOW].contains(&e)),
            }
        }
    }
}
