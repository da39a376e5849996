//! The replication protocol's frames, between a primary and each of its
//! secondaries (one TCP connection per primary, secondary and volume; the
//! primary connects).
//!
//! This module owns the byte layout: encoding a [`Message`] into a frame,
//! decoding and checking a frame from untrusted bytes, and the two small
//! async helpers that read and write one frame on a socket. It is otherwise
//! pure. It must never panic, allocate more than [`MAX_PAYLOAD`] or loop on
//! bytes from the network, and never interpret a message: what a frame means
//! for the volume is the engine's business.
//!
//! # Frame
//!
//! A frame is a 32-byte header followed by `payload_len` bytes of payload.
//! Every integer is big endian.
//!
//! | bytes  | field | |
//! |--------|-------|-|
//! | 0..4   | magic | `0x544E4452`, "TNDR" |
//! | 4      | version | [`VERSION`] (1) |
//! | 5      | kind | [`Kind`] |
//! | 6..8   | flags | [`FLAG_FUA`] on `Write`/`Zeroes`, [`FLAG_LAST`] on `BitmapChunk`, nothing else |
//! | 8..12  | payload_len | at most [`MAX_PAYLOAD`] |
//! | 12..20 | seq | the sender's request id; a reply echoes the seq it answers |
//! | 20..28 | reserved | zero |
//! | 28..32 | crc | CRC-32C of bytes 0..28 followed by the payload |
//!
//! # Payloads
//!
//! `Hello` and `HelloReply` are rare and carry JSON (unknown fields are
//! ignored, so a newer peer may add some; new fields must be
//! `#[serde(default)]`). The data path uses fixed binary layouts:
//!
//! | kind | code | payload |
//! |------|------|---------|
//! | Hello | 1 | JSON [`Hello`] |
//! | HelloReply | 2 | JSON [`HelloReply`] |
//! | Write | 3 | offset u64, data (the rest); FUA flag |
//! | Trim | 4 | offset u64, len u32 |
//! | Zeroes | 5 | offset u64, len u32; FUA flag |
//! | Flush | 6 | empty |
//! | Ack | 7 | empty |
//! | Nack | 8 | errno i32, message (UTF-8, the rest) |
//! | ResyncData | 9 | offset u64, data (the rest) |
//! | ResyncDone | 10 | current u64, bitmap u64, history\[0\] u64, history\[1\] u64 |
//! | NewGeneration | 11 | current u64 |
//! | BitmapChunk | 12 | first_bit u64, words u64…; LAST flag |
//! | DigestRequest | 13 | offset u64, len u32, granule u32 |
//! | ReadRequest | 16 | offset u64, len u32 (answered with a ResyncData) |
//! | Digests | 14 | offset u64, granule u32, digests u64… |
//! | Goodbye | 15 | reason (UTF-8, the whole payload) |
//! | Grow | 17 | size u64 (the volume grew: the secondary grows to it before any later frame) |
//!
//! Decoding is strict and syntactic: every malformation is a distinct
//! [`WireError`], but values (a zero generation, an offset past the end) are
//! left for the engine to judge.

use std::fmt;
use std::io::ErrorKind;
use std::ops::Range;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tandem_raft::volume::{DiskState, ReplicationMode, SplitBrainPolicy};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::generation::Generations;

/// "TNDR".
pub const MAGIC: u32 = 0x544E_4452;
/// The frame layout's version.
pub const VERSION: u8 = 1;
/// The protocol spoken in `Hello`.
pub const PROTOCOL: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 32;
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 8 * 1024 * 1024 + 64;
/// The largest `data` of a `Write` or `ResyncData` (the payload less its offset).
pub const MAX_DATA: usize = MAX_PAYLOAD - 8;
/// Flag of `Write` and `Zeroes`: durable before the ack.
pub const FLAG_FUA: u16 = 1 << 0;
/// Flag of `BitmapChunk`: the last chunk.
pub const FLAG_LAST: u16 = 1 << 1;
/// The header bytes the crc covers (all but the crc).
const CRC_COVERED: usize = 28;

/// A 64-bit digest of a block for online verify (XXH3-64, seed 0).
pub fn digest(block: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(block)
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloReply = 2,
    Write = 3,
    Trim = 4,
    Zeroes = 5,
    Flush = 6,
    Ack = 7,
    Nack = 8,
    ResyncData = 9,
    ResyncDone = 10,
    NewGeneration = 11,
    BitmapChunk = 12,
    DigestRequest = 13,
    Digests = 14,
    Goodbye = 15,
    ReadRequest = 16,
    Grow = 17,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Hello,
        Kind::HelloReply,
        Kind::Write,
        Kind::Trim,
        Kind::Zeroes,
        Kind::Flush,
        Kind::Ack,
        Kind::Nack,
        Kind::ResyncData,
        Kind::ResyncDone,
        Kind::NewGeneration,
        Kind::BitmapChunk,
        Kind::DigestRequest,
        Kind::Digests,
        Kind::Goodbye,
        Kind::ReadRequest,
        Kind::Grow,
    ];

    /// The kind with this code, if any.
    pub fn from_u8(code: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    /// Its name, as in the module doc.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::HelloReply => "HelloReply",
            Kind::Write => "Write",
            Kind::Trim => "Trim",
            Kind::Zeroes => "Zeroes",
            Kind::Flush => "Flush",
            Kind::Ack => "Ack",
            Kind::Nack => "Nack",
            Kind::ResyncData => "ResyncData",
            Kind::ResyncDone => "ResyncDone",
            Kind::NewGeneration => "NewGeneration",
            Kind::BitmapChunk => "BitmapChunk",
            Kind::DigestRequest => "DigestRequest",
            Kind::Digests => "Digests",
            Kind::Goodbye => "Goodbye",
            Kind::ReadRequest => "ReadRequest",
            Kind::Grow => "Grow",
        }
    }

    /// The flags a frame of this kind may set.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Kind::Write | Kind::Zeroes => FLAG_FUA,
            Kind::BitmapChunk => FLAG_LAST,
            _ => 0,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a frame could not be read, decoded or encoded.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("truncated frame: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("bad magic {0:#010x} (expected 0x544e4452, \"TNDR\")")]
    BadMagic(u32),
    #[error("unsupported frame version {0} (this node speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("flags {flags:#06x} are not allowed on a {kind} frame")]
    BadFlags { kind: Kind, flags: u16 },
    #[error("reserved header bytes are not zero ({0:#018x})")]
    Reserved(u64),
    #[error("payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    Oversize { len: u64 },
    #[error("payload is {actual} bytes but the header says {expected}")]
    LengthMismatch { expected: u32, actual: usize },
    #[error("the decoded header does not match the header bytes")]
    HeaderMismatch,
    #[error("bad checksum: the frame says {expected:#010x}, its bytes give {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("malformed {kind} payload: {reason}")]
    Malformed { kind: Kind, reason: String },
    #[error("{extra} trailing bytes after a {kind} payload")]
    TrailingBytes { kind: Kind, extra: usize },
    #[error("cannot encode a {kind} frame: {reason}")]
    Encode { kind: Kind, reason: String },
}

/// The first frame, from the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL`].
    pub protocol: u16,
    pub volume: String,
    pub volume_id: String,
    /// Bytes.
    pub size: u64,
    /// Bytes per bitmap bit.
    pub granule: u32,
    /// The primary's node name.
    pub node: String,
    /// The replication group's epoch: a secondary refuses a smaller one.
    pub epoch: u64,
    pub primary_since_ms: u64,
    /// The primary's view of this peer: current, its bitmap uuid for this peer, history.
    pub generation: Generations,
    /// Bits set in the primary's bitmap for this peer.
    pub changed_blocks: u64,
    /// Activity-log extents the primary had when it last crashed as primary.
    pub crashed_extents: Vec<u64>,
    /// How this secondary is written to (for its status).
    #[serde(default)]
    pub mode: ReplicationMode,
    /// The volume's split-brain policy as the primary knows it; both ends
    /// decide with this one, so they reach the same answer.
    #[serde(default)]
    pub split_brain: SplitBrainPolicy,
    /// The operator resolved a split brain by discarding this secondary's
    /// changes: both ends decide as if the policy were `discard-remote`, and
    /// unrelated data is overwritten by a full sync.
    #[serde(default)]
    pub discard_secondary: bool,
    /// The group's epoch at the last forced promotion of this volume (0:
    /// none): a secondary that has seen no newer epoch may hold
    /// acknowledged writes this primary lacks.
    #[serde(default)]
    pub forced_epoch: u64,
}

/// The secondary's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub accepted: bool,
    /// Why not, when not accepted.
    pub reason: Option<String>,
    /// The secondary's node name.
    pub node: String,
    pub volume_id: String,
    pub size: u64,
    pub granule: u32,
    pub disk: DiskState,
    /// When it was last primary, 0 if never.
    pub primary_since_ms: u64,
    /// The secondary's generations, with its bitmap uuid for this primary.
    pub generation: Generations,
    /// Bits in its bitmap for the primary.
    pub changed_blocks: u64,
    /// Activity-log extents it had when it crashed as a primary, if it did.
    pub crashed_extents: Vec<u64>,
    /// The largest epoch it has seen.
    pub epoch_seen: u64,
    /// Its replacement number (its files were created for it): the primary
    /// names it when it records this replica `UpToDate`.
    #[serde(default)]
    pub replaced: u64,
}

/// One frame's meaning. `data` is [`Bytes`]: decoding from a socket slices
/// it out of the payload buffer without a copy, and the engine can hand the
/// same block to several peers.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloReply(HelloReply),
    /// Replicated write; `fua`: durable before the ack.
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Zeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    /// Answers Write, Trim, Zeroes, Flush and ResyncData (by seq).
    Ack,
    Nack {
        errno: i32,
        message: String,
    },
    /// A resync block from source to target.
    ResyncData {
        offset: u64,
        data: Bytes,
    },
    /// The target adopts this generation and becomes UpToDate.
    ResyncDone {
        generation: Generations,
    },
    /// The primary started a new data generation (in order with the writes).
    NewGeneration {
        current: u64,
    },
    /// A part of a secondary's bitmap for the primary, after a split brain.
    BitmapChunk {
        first_bit: u64,
        words: Vec<u64>,
        last: bool,
    },
    /// Online verify: the digests of `len` bytes at `offset`, one per `granule`.
    DigestRequest {
        offset: u64,
        len: u32,
        granule: u32,
    },
    Digests {
        offset: u64,
        granule: u32,
        digests: Vec<u64>,
    },
    /// The primary's disk failed: the secondary sends `len` bytes at
    /// `offset` back, as a `ResyncData`.
    ReadRequest {
        offset: u64,
        len: u32,
    },
    /// A clean close, with why.
    Goodbye {
        reason: String,
    },
    /// The volume grew to `size` bytes: the secondary grows its replica
    /// (answering Ack, or Nack if it cannot) before it applies any later
    /// frame, so nothing past its old end reaches it first.
    Grow {
        size: u64,
    },
}

impl Message {
    /// The frame kind that carries it.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloReply(_) => Kind::HelloReply,
            Message::Write { .. } => Kind::Write,
            Message::Trim { .. } => Kind::Trim,
            Message::Zeroes { .. } => Kind::Zeroes,
            Message::Flush => Kind::Flush,
            Message::Ack => Kind::Ack,
            Message::Nack { .. } => Kind::Nack,
            Message::ResyncData { .. } => Kind::ResyncData,
            Message::ResyncDone { .. } => Kind::ResyncDone,
            Message::NewGeneration { .. } => Kind::NewGeneration,
            Message::BitmapChunk { .. } => Kind::BitmapChunk,
            Message::DigestRequest { .. } => Kind::DigestRequest,
            Message::ReadRequest { .. } => Kind::ReadRequest,
            Message::Digests { .. } => Kind::Digests,
            Message::Goodbye { .. } => Kind::Goodbye,
            Message::Grow { .. } => Kind::Grow,
        }
    }

    fn flags(&self) -> u16 {
        match self {
            Message::Write { fua: true, .. } | Message::Zeroes { fua: true, .. } => FLAG_FUA,
            Message::BitmapChunk { last: true, .. } => FLAG_LAST,
            _ => 0,
        }
    }

    /// The payload length of a binary message (None for the JSON ones).
    fn binary_len(&self) -> Option<usize> {
        Some(match self {
            Message::Hello(_) | Message::HelloReply(_) => return None,
            Message::Write { data, .. } | Message::ResyncData { data, .. } => 8 + data.len(),
            Message::Trim { .. } | Message::Zeroes { .. } | Message::ReadRequest { .. } => 12,
            Message::Flush | Message::Ack => 0,
            Message::Nack { message, .. } => 4 + message.len(),
            Message::ResyncDone { .. } => 32,
            Message::NewGeneration { .. } | Message::Grow { .. } => 8,
            Message::BitmapChunk { words, .. } => 8 + 8 * words.len(),
            Message::DigestRequest { .. } => 16,
            Message::Digests { digests, .. } => 12 + 8 * digests.len(),
            Message::Goodbye { reason } => reason.len(),
        })
    }
}

/// Data and long lists are shown by their length, not their bytes.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Len(usize, &'static str);
        impl fmt::Debug for Len {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "<{} {}>", self.0, self.1)
            }
        }
        match self {
            Message::Hello(h) => f.debug_tuple("Hello").field(h).finish(),
            Message::HelloReply(r) => f.debug_tuple("HelloReply").field(r).finish(),
            Message::Write { offset, data, fua } => f
                .debug_struct("Write")
                .field("offset", offset)
                .field("data", &Len(data.len(), "bytes"))
                .field("fua", fua)
                .finish(),
            Message::Trim { offset, len } => f.debug_struct("Trim").field("offset", offset).field("len", len).finish(),
            Message::Zeroes { offset, len, fua } => {
                f.debug_struct("Zeroes").field("offset", offset).field("len", len).field("fua", fua).finish()
            }
            Message::Flush => f.write_str("Flush"),
            Message::Ack => f.write_str("Ack"),
            Message::Nack { errno, message } => {
                f.debug_struct("Nack").field("errno", errno).field("message", message).finish()
            }
            Message::ResyncData { offset, data } => {
                f.debug_struct("ResyncData").field("offset", offset).field("data", &Len(data.len(), "bytes")).finish()
            }
            Message::ResyncDone { generation } => f.debug_struct("ResyncDone").field("generation", generation).finish(),
            Message::NewGeneration { current } => {
                f.debug_struct("NewGeneration").field("current", &format_args!("{current:#x}")).finish()
            }
            Message::BitmapChunk { first_bit, words, last } => f
                .debug_struct("BitmapChunk")
                .field("first_bit", first_bit)
                .field("words", &Len(words.len(), "words"))
                .field("last", last)
                .finish(),
            Message::ReadRequest { offset, len } => {
                f.debug_struct("ReadRequest").field("offset", offset).field("len", len).finish()
            }
            Message::DigestRequest { offset, len, granule } => f
                .debug_struct("DigestRequest")
                .field("offset", offset)
                .field("len", len)
                .field("granule", granule)
                .finish(),
            Message::Digests { offset, granule, digests } => f
                .debug_struct("Digests")
                .field("offset", offset)
                .field("granule", granule)
                .field("digests", &Len(digests.len(), "digests"))
                .finish(),
            Message::Goodbye { reason } => f.debug_struct("Goodbye").field("reason", reason).finish(),
            Message::Grow { size } => f.debug_struct("Grow").field("size", size).finish(),
        }
    }
}

/// A checked header (its crc is checked by [`decode`], with the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub payload_len: u32,
    pub seq: u64,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Checks a header's magic, version, kind, flags, reserved bytes and length.
pub fn decode_header(buf: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let magic = be_u32(buf, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if buf[4] != VERSION {
        return Err(WireError::UnsupportedVersion(buf[4]));
    }
    let kind = Kind::from_u8(buf[5]).ok_or(WireError::UnknownKind(buf[5]))?;
    let flags = be_u16(buf, 6);
    if flags & !kind.allowed_flags() != 0 {
        return Err(WireError::BadFlags { kind, flags });
    }
    let payload_len = be_u32(buf, 8);
    if payload_len as usize > MAX_PAYLOAD {
        return Err(WireError::Oversize { len: u64::from(payload_len) });
    }
    let reserved = be_u64(buf, 20);
    if reserved != 0 {
        return Err(WireError::Reserved(reserved));
    }
    Ok(Header { kind, flags, payload_len, seq: be_u64(buf, 12) })
}

fn check_frame(header: &Header, header_bytes: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), WireError> {
    if decode_header(header_bytes)? != *header {
        return Err(WireError::HeaderMismatch);
    }
    if payload.len() != header.payload_len as usize {
        return Err(WireError::LengthMismatch { expected: header.payload_len, actual: payload.len() });
    }
    let expected = be_u32(header_bytes, CRC_COVERED);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header_bytes[..CRC_COVERED]), payload);
    if expected != actual {
        return Err(WireError::BadCrc { expected, actual });
    }
    Ok(())
}

/// Decodes one frame whose header [`decode_header`] accepted: checks that
/// `header` is that of `header_bytes`, the payload's length, the crc, and
/// that the payload parses for its kind with nothing left over. Copies
/// `data` out of `payload` (read_frame does not).
pub fn decode(header: &Header, header_bytes: &[u8; HEADER_LEN], payload: &[u8]) -> Result<Message, WireError> {
    check_frame(header, header_bytes, payload)?;
    parse(header, payload, |r| Bytes::copy_from_slice(&payload[r]))
}

/// Decodes the whole frame at the start of `buf`; returns its seq, its
/// message and the bytes it took. A `buf` shorter than the frame gives
/// [`WireError::Truncated`].
pub fn decode_frame(buf: &[u8]) -> Result<(u64, Message, usize), WireError> {
    let Some(hb) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated { got: buf.len(), want: HEADER_LEN });
    };
    let header = decode_header(hb)?;
    let want = HEADER_LEN + header.payload_len as usize;
    let Some(payload) = buf.get(HEADER_LEN..want) else {
        return Err(WireError::Truncated { got: buf.len(), want });
    };
    Ok((header.seq, decode(&header, hb, payload)?, want))
}

/// Reads a payload field by field.
struct Fields<'a> {
    kind: Kind,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        match self.buf.get(self.pos..self.pos + n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("too short for {what}: {} bytes, needs {}", self.buf.len(), self.pos + n),
            }),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        self.take(4, what).map(|b| be_u32(b, 0))
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        self.take(8, what).map(|b| be_u64(b, 0))
    }

    /// The rest, as a range of the payload.
    fn rest(&mut self) -> Range<usize> {
        let r = self.pos..self.buf.len();
        self.pos = self.buf.len();
        r
    }

    fn rest_str(&mut self, what: &str) -> Result<String, WireError> {
        let r = self.rest();
        match std::str::from_utf8(&self.buf[r]) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(WireError::Malformed { kind: self.kind, reason: format!("{what} is not UTF-8: {e}") }),
        }
    }

    fn rest_u64s(&mut self, what: &str) -> Result<Vec<u64>, WireError> {
        let r = self.rest();
        let bytes = &self.buf[r];
        if !bytes.len().is_multiple_of(8) {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("{what}: {} bytes is not a whole number of u64", bytes.len()),
            });
        }
        Ok(bytes.chunks_exact(8).map(|c| be_u64(c, 0)).collect())
    }

    fn finish(self) -> Result<(), WireError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { kind: self.kind, extra }),
        }
    }
}

fn json<T: DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, WireError> {
    let mut values = serde_json::Deserializer::from_slice(payload).into_iter::<T>();
    match values.next() {
        None => Err(WireError::Malformed { kind, reason: "empty JSON payload".into() }),
        Some(Err(e)) => Err(WireError::Malformed { kind, reason: format!("bad JSON: {e}") }),
        Some(Ok(v)) => match payload.len() - values.byte_offset() {
            0 => Ok(v),
            extra => Err(WireError::TrailingBytes { kind, extra }),
        },
    }
}

/// Parses a checked payload; `data` turns a range of it into a block.
fn parse(header: &Header, payload: &[u8], data: impl FnOnce(Range<usize>) -> Bytes) -> Result<Message, WireError> {
    let kind = header.kind;
    let flag = |f: u16| header.flags & f != 0;
    let mut p = Fields { kind, buf: payload, pos: 0 };
    let msg = match kind {
        Kind::Hello => return json(kind, payload).map(Message::Hello),
        Kind::HelloReply => return json(kind, payload).map(Message::HelloReply),
        Kind::Write => Message::Write { offset: p.u64("offset")?, data: data(p.rest()), fua: flag(FLAG_FUA) },
        Kind::Trim => Message::Trim { offset: p.u64("offset")?, len: p.u32("len")? },
        Kind::Zeroes => Message::Zeroes { offset: p.u64("offset")?, len: p.u32("len")?, fua: flag(FLAG_FUA) },
        Kind::Flush => Message::Flush,
        Kind::Ack => Message::Ack,
        Kind::Nack => Message::Nack { errno: p.u32("errno")? as i32, message: p.rest_str("message")? },
        Kind::ResyncData => Message::ResyncData { offset: p.u64("offset")?, data: data(p.rest()) },
        Kind::ResyncDone => Message::ResyncDone {
            generation: Generations {
                current: p.u64("current")?,
                bitmap: p.u64("bitmap")?,
                history: [p.u64("history")?, p.u64("history")?],
            },
        },
        Kind::NewGeneration => Message::NewGeneration { current: p.u64("current")? },
        Kind::BitmapChunk => {
            Message::BitmapChunk { first_bit: p.u64("first_bit")?, words: p.rest_u64s("words")?, last: flag(FLAG_LAST) }
        }
        Kind::DigestRequest => {
            Message::DigestRequest { offset: p.u64("offset")?, len: p.u32("len")?, granule: p.u32("granule")? }
        }
        Kind::Digests => {
            Message::Digests { offset: p.u64("offset")?, granule: p.u32("granule")?, digests: p.rest_u64s("digests")? }
        }
        Kind::Goodbye => Message::Goodbye { reason: p.rest_str("reason")? },
        Kind::ReadRequest => Message::ReadRequest { offset: p.u64("offset")?, len: p.u32("len")? },
        Kind::Grow => Message::Grow { size: p.u64("size")? },
    };
    p.finish()?;
    Ok(msg)
}

/// Appends one whole frame for `msg` to `out`. A message whose payload would
/// exceed [`MAX_PAYLOAD`] is refused with [`WireError::Oversize`] and `out`
/// is left as it was. The payload is copied once, into `out`, which is
/// grown once for binary messages.
pub fn encode(seq: u64, msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let kind = msg.kind();
    if let Some(len) = msg.binary_len() {
        if len > MAX_PAYLOAD {
            return Err(WireError::Oversize { len: len as u64 });
        }
        out.reserve(HEADER_LEN + len);
    }
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let json_result = match msg {
        Message::Hello(h) => serde_json::to_writer(&mut *out, h),
        Message::HelloReply(r) => serde_json::to_writer(&mut *out, r),
        Message::Write { offset, data, .. } | Message::ResyncData { offset, data } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(data);
            Ok(())
        }
        Message::Trim { offset, len } | Message::Zeroes { offset, len, .. } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Message::Flush | Message::Ack => Ok(()),
        Message::Nack { errno, message } => {
            out.extend_from_slice(&errno.to_be_bytes());
            out.extend_from_slice(message.as_bytes());
            Ok(())
        }
        Message::ResyncDone { generation: g } => {
            for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            Ok(())
        }
        Message::NewGeneration { current: v } | Message::Grow { size: v } => {
            out.extend_from_slice(&v.to_be_bytes());
            Ok(())
        }
        Message::BitmapChunk { first_bit, words, .. } => {
            out.extend_from_slice(&first_bit.to_be_bytes());
            words.iter().for_each(|w| out.extend_from_slice(&w.to_be_bytes()));
            Ok(())
        }
        Message::ReadRequest { offset, len } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Message::DigestRequest { offset, len, granule } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&granule.to_be_bytes());
            Ok(())
        }
        Message::Digests { offset, granule, digests } => {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&granule.to_be_bytes());
            digests.iter().for_each(|d| out.extend_from_slice(&d.to_be_bytes()));
            Ok(())
        }
        Message::Goodbye { reason } => {
            out.extend_from_slice(reason.as_bytes());
            Ok(())
        }
    };
    if let Err(e) = json_result {
        out.truncate(start);
        return Err(WireError::Encode { kind, reason: e.to_string() });
    }
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(WireError::Oversize { len: len as u64 });
    }
    let (head, payload) = out[start..].split_at_mut(HEADER_LEN);
    fill_header(head, msg, len, seq, &[payload]);
    Ok(())
}

/// Writes the header of a frame for `msg` into `h` (its first
/// [`HEADER_LEN`] bytes), its crc over `payload` (the payload's parts, in
/// order).
fn fill_header(h: &mut [u8], msg: &Message, len: usize, seq: u64, payload: &[&[u8]]) {
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4] = VERSION;
    h[5] = msg.kind() as u8;
    h[6..8].copy_from_slice(&msg.flags().to_be_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_be_bytes());
    h[12..20].copy_from_slice(&seq.to_be_bytes());
    // 20..28 stay zero (reserved).
    let crc = payload.iter().fold(crc32c::crc32c(&h[..CRC_COVERED]), |crc, part| crc32c::crc32c_append(crc, part));
    h[CRC_COVERED..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
}

/// One encoded frame whose bulk data is shared, not copied: `head` (the
/// header and the fields before the data), then `data` (a `Write`'s or a
/// `ResyncData`'s bytes, the very buffer the message holds; empty for the
/// other kinds, whose whole frame is in `head`). Sent as the two parts in
/// order, it is byte for byte the frame [`encode`] makes: the data path so
/// copies a client's write once less on its way to a peer.
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: Vec<u8>,
    pub data: Bytes,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encodes `msg` as a [`Frame`], refusing what [`encode`] refuses.
pub fn encode_frame(seq: u64, msg: &Message) -> Result<Frame, WireError> {
    match msg {
        Message::Write { offset, data, .. } | Message::ResyncData { offset, data } => {
            let len = 8 + data.len();
            if len > MAX_PAYLOAD {
                return Err(WireError::Oversize { len: len as u64 });
            }
            let mut head = vec![0u8; HEADER_LEN + 8];
            head[HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
            let (h, fields) = head.split_at_mut(HEADER_LEN);
            fill_header(h, msg, len, seq, &[fields, data]);
            Ok(Frame { head, data: data.clone() })
        }
        _ => {
            let mut head = Vec::new();
            encode(seq, msg, &mut head)?;
            Ok(Frame { head, data: Bytes::new() })
        }
    }
}

/// Reads exactly `len` bytes from `r` into a new buffer, without first
/// zeroing it (a payload is written over at once) and without reading past
/// them: returns the buffer, shorter than `len` if a clean EOF came first.
/// A buffered reader whose buffer is empty hands a large read straight to
/// the socket, so a large payload is copied once, from the kernel.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        // `take` bounds the read by what is left, whatever the capacity.
        match (&mut *r).take(want).read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// Fills `buf` from `r`; returns how many bytes it got before a clean EOF.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(got)
}

/// Reads one frame: its seq and message. [`WireError::Closed`] for an EOF
/// before the first byte of a frame, [`WireError::Truncated`] for one inside
/// it. The header is checked before the payload is read (so a bad length
/// never allocates), and `data` is sliced out of the payload buffer.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u64, Message), WireError> {
    let mut hb = [0u8; HEADER_LEN];
    match read_full(r, &mut hb).await? {
        0 => return Err(WireError::Closed),
        HEADER_LEN => {}
        got => return Err(WireError::Truncated { got, want: HEADER_LEN }),
    }
    let header = decode_header(&hb)?;
    let len = header.payload_len as usize;
    let payload = read_payload(r, len).await?;
    if payload.len() < len {
        return Err(WireError::Truncated { got: HEADER_LEN + payload.len(), want: HEADER_LEN + len });
    }
    check_frame(&header, &hb, &payload)?;
    let payload = Bytes::from(payload);
    let msg = parse(&header, &payload, |range| payload.slice(range))?;
    Ok((header.seq, msg))
}

/// Encodes and writes one frame. Does not flush: a bare `TcpStream` needs
/// none; a caller that buffers flushes when it wants the frames to leave.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, seq: u64, msg: &Message) -> Result<(), WireError> {
    send_frame(w, &encode_frame(seq, msg)?).await?;
    Ok(())
}

/// Writes an encoded frame, its two parts in order. Behind a `BufWriter`,
/// data at least as large as its buffer goes to the socket without being
/// copied into it.
pub async fn send_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&frame.head).await?;
    if !frame.data.is_empty() {
        w.write_all(&frame.data).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gens(c: u64) -> Generations {
        Generations { current: c, bitmap: c / 2, history: [c / 3, c / 5] }
    }

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL,
            volume: "db".into(),
            volume_id: "0f3c-uuid".into(),
            size: 1 << 30,
            granule: 4096,
            node: "node-a".into(),
            epoch: 7,
            primary_since_ms: 1_700_000_000_000,
            generation: gens(0xDEAD_BEEF),
            changed_blocks: 12,
            crashed_extents: vec![1, 5, 9],
            mode: ReplicationMode::Async,
            split_brain: SplitBrainPolicy::DiscardZeroChanges,
            discard_secondary: true,
            forced_epoch: 5,
        }
    }

    fn hello_reply() -> HelloReply {
        HelloReply {
            accepted: false,
            reason: Some("stale epoch 3 < 5".into()),
            node: "node-b".into(),
            volume_id: "0f3c-uuid".into(),
            size: 1 << 30,
            granule: 4096,
            disk: DiskState::Outdated,
            primary_since_ms: 0,
            generation: gens(42),
            changed_blocks: 0,
            crashed_extents: vec![],
            epoch_seen: 5,
            replaced: 0,
        }
    }

    /// One of each, with some corner values.
    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::HelloReply(hello_reply()),
            Message::Write { offset: 4096, data: Bytes::from(vec![0xAB; 4096]), fua: false },
            Message::Write { offset: u64::MAX, data: Bytes::new(), fua: true },
            Message::Trim { offset: 1 << 40, len: u32::MAX },
            Message::Zeroes { offset: 512, len: 8192, fua: true },
            Message::Zeroes { offset: 0, len: 0, fua: false },
            Message::Flush,
            Message::Ack,
            Message::Nack { errno: -5, message: "EIO: disk on fire ✗".into() },
            Message::Nack { errno: i32::MIN, message: String::new() },
            Message::ResyncData { offset: 8192, data: Bytes::from((0..=255u8).collect::<Vec<_>>()) },
            Message::ResyncDone { generation: gens(u64::MAX) },
            Message::NewGeneration { current: 0x1234_5678_9ABC_DEF0 },
            Message::BitmapChunk { first_bit: 0, words: vec![u64::MAX, 0, 1], last: false },
            Message::BitmapChunk { first_bit: 1 << 20, words: vec![], last: true },
            Message::DigestRequest { offset: 0, len: 1 << 20, granule: 4096 },
            Message::ReadRequest { offset: 1 << 20, len: 4096 },
            Message::Digests { offset: 0, granule: 4096, digests: vec![digest(b"a"), digest(b"b")] },
            Message::Goodbye { reason: "superseded by a newer primary".into() },
            Message::Grow { size: 2 << 30 },
        ]
    }

    fn frame(seq: u64, msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(seq, msg, &mut out).unwrap();
        out
    }

    /// Rewrites a frame's crc so that it is right for its (tampered) bytes.
    fn fix_crc(f: &mut [u8]) {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..CRC_COVERED]), &f[HEADER_LEN..]);
        f[CRC_COVERED..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    }

    /// A frame with this header and payload, and a right crc.
    fn raw_frame(kind: u8, flags: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HEADER_LEN];
        f[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        f[4] = VERSION;
        f[5] = kind;
        f[6..8].copy_from_slice(&flags.to_be_bytes());
        f[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        f[12..20].copy_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(payload);
        fix_crc(&mut f);
        f
    }

    fn header_of(f: &[u8]) -> [u8; HEADER_LEN] {
        f[..HEADER_LEN].try_into().unwrap()
    }

    #[test]
    fn kinds_round_trip_their_codes() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(*k as u8 as usize, i + 1);
            assert_eq!(Kind::from_u8(*k as u8), Some(*k));
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(18), None);
        assert_eq!(Kind::from_u8(255), None);
    }

    #[test]
    fn every_sample_round_trips() {
        for (seq, msg) in samples().into_iter().enumerate() {
            let seq = seq as u64 * 0x0101_0101_0101;
            let f = frame(seq, &msg);
            let (got_seq, got, used) = decode_frame(&f).unwrap();
            assert_eq!((got_seq, &got, used), (seq, &msg, f.len()), "{msg:?}");
            // A shared-data frame is the same bytes, its data not copied.
            let split = encode_frame(seq, &msg).unwrap();
            assert_eq!([&split.head[..], &split.data[..]].concat(), f, "{msg:?}");
            assert_eq!(split.len(), f.len());
            if let Message::Write { data, .. } | Message::ResyncData { data, .. } = &msg {
                assert_eq!(split.data.as_ptr(), data.as_ptr(), "{msg:?}: data copied");
            }
            // Appending keeps what was there.
            let mut out = b"prefix".to_vec();
            encode(seq, &msg, &mut out).unwrap();
            assert_eq!(&out[..6], b"prefix");
            assert_eq!(&out[6..], &f[..]);
        }
    }

    #[test]
    fn golden_bytes() {
        let f = frame(7, &Message::Write { offset: 0x0102, data: Bytes::from_static(b"hi"), fua: true });
        let want_header = [
            0x54, 0x4E, 0x44, 0x52, // magic
            1, 3, 0, 1, // version, kind, flags
            0, 0, 0, 10, // payload_len
            0, 0, 0, 0, 0, 0, 0, 7, // seq
            0, 0, 0, 0, 0, 0, 0, 0, // reserved
        ];
        assert_eq!(&f[..28], &want_header);
        assert_eq!(&f[32..], &[0, 0, 0, 0, 0, 0, 1, 2, b'h', b'i']);
        let crc = crc32c::crc32c(&[&f[..28], &f[32..]].concat());
        assert_eq!(&f[28..32], &crc.to_be_bytes());
        // CRC-32C itself (the Castagnoli check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(frame(1, &Message::Ack).len(), HEADER_LEN);
        let f = frame(2, &Message::BitmapChunk { first_bit: 64, words: vec![3], last: true });
        assert_eq!(&f[6..8], &[0, 2]);
        assert_eq!(&f[32..], &[0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn hello_is_json_and_tolerates_unknown_and_missing_optional_fields() {
        let f = frame(1, &Message::Hello(hello()));
        let v: serde_json::Value = serde_json::from_slice(&f[HEADER_LEN..]).unwrap();
        assert_eq!(v["volume"], "db");
        assert_eq!(v["split_brain"], "discard-zero-changes");
        let mut v = v;
        v["from_the_future"] = serde_json::json!({"x": 1});
        v.as_object_mut().unwrap().remove("mode");
        v.as_object_mut().unwrap().remove("split_brain");
        let f = raw_frame(Kind::Hello as u8, 0, 1, &serde_json::to_vec(&v).unwrap());
        let Message::Hello(h) = decode_frame(&f).unwrap().1 else { panic!() };
        assert_eq!(h.mode, ReplicationMode::Sync);
        assert_eq!(h.split_brain, SplitBrainPolicy::Disconnect);
        assert_eq!(h.crashed_extents, vec![1, 5, 9]);
        let r: serde_json::Value =
            serde_json::from_slice(&frame(1, &Message::HelloReply(hello_reply()))[32..]).unwrap();
        assert_eq!(r["disk"], "Outdated");
    }

    #[test]
    fn digest_is_xxh3() {
        assert_eq!(digest(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(digest(&[0u8; 4096]), digest(&[0u8; 4096]));
        assert_ne!(digest(&[0u8; 4096]), digest(&[0u8; 4095]));
        let mut b = vec![0u8; 4096];
        b[4000] = 1;
        assert_ne!(digest(&b), digest(&[0u8; 4096]));
    }

    fn err(f: &[u8]) -> WireError {
        match decode_frame(f) {
            Err(e) => e,
            Ok(m) => panic!("decoded {m:?}"),
        }
    }

    #[test]
    fn header_errors_are_distinct() {
        let good = frame(9, &Message::Flush);
        let mut f = good.clone();
        f[0] = b'X';
        assert!(matches!(err(&f), WireError::BadMagic(0x584E_4452)));
        let mut f = good.clone();
        f[4] = 2;
        assert!(matches!(err(&f), WireError::UnsupportedVersion(2)));
        let mut f = good.clone();
        f[5] = 0;
        assert!(matches!(err(&f), WireError::UnknownKind(0)));
        f[5] = 200;
        assert!(matches!(err(&f), WireError::UnknownKind(200)));
        let mut f = good.clone();
        f[7] = 1;
        assert!(matches!(err(&f), WireError::BadFlags { kind: Kind::Flush, flags: 1 }));
        let f = raw_frame(Kind::Write as u8, FLAG_LAST, 1, &[0; 8]);
        assert!(matches!(err(&f), WireError::BadFlags { kind: Kind::Write, flags: FLAG_LAST }));
        let f = raw_frame(Kind::BitmapChunk as u8, FLAG_FUA | FLAG_LAST, 1, &[0; 8]);
        assert!(matches!(err(&f), WireError::BadFlags { kind: Kind::BitmapChunk, .. }));
        let mut f = good.clone();
        f[27] = 1;
        assert!(matches!(err(&f), WireError::Reserved(1)));
        let mut f = good.clone();
        f[20] = 0x80;
        assert!(matches!(err(&f), WireError::Reserved(0x8000_0000_0000_0000)));
        let mut f = good.clone();
        f[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_be_bytes());
        assert!(matches!(err(&f), WireError::Oversize { len } if len == MAX_PAYLOAD as u64 + 1));
        f[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(err(&f), WireError::Oversize { .. }));
        let mut f = good.clone();
        f[31] ^= 1;
        assert!(matches!(err(&f), WireError::BadCrc { .. }));
        // Every error has a message.
        assert!(err(&f).to_string().contains("checksum"));
    }

    #[test]
    fn decode_checks_its_arguments() {
        let f = frame(3, &Message::Write { offset: 1, data: Bytes::from_static(b"abc"), fua: false });
        let hb = header_of(&f);
        let h = decode_header(&hb).unwrap();
        assert_eq!(h, Header { kind: Kind::Write, flags: 0, payload_len: 11, seq: 3 });
        assert!(decode(&h, &hb, &f[HEADER_LEN..]).is_ok());
        assert!(matches!(
            decode(&h, &hb, &f[HEADER_LEN..f.len() - 1]),
            Err(WireError::LengthMismatch { expected: 11, actual: 10 })
        ));
        assert!(matches!(decode(&h, &hb, &[&f[HEADER_LEN..], b"x"].concat()), Err(WireError::LengthMismatch { .. })));
        let other = Header { seq: 4, ..h };
        assert!(matches!(decode(&other, &hb, &f[HEADER_LEN..]), Err(WireError::HeaderMismatch)));
        let mut bad = hb;
        bad[0] = 0;
        assert!(matches!(decode(&h, &bad, &f[HEADER_LEN..]), Err(WireError::BadMagic(_))));
        let mut payload = f[HEADER_LEN..].to_vec();
        payload[9] ^= 0x40;
        assert!(matches!(decode(&h, &hb, &payload), Err(WireError::BadCrc { .. })));
    }

    fn malformed(kind: Kind, flags: u16, payload: &[u8]) -> WireError {
        err(&raw_frame(kind as u8, flags, 1, payload))
    }

    #[test]
    fn payload_errors_are_distinct() {
        use Kind::*;
        let m = |e: WireError, k: Kind| matches!(e, WireError::Malformed { kind, .. } if kind == k);
        let t = |e: WireError, k: Kind, n: usize| matches!(e, WireError::TrailingBytes { kind, extra } if kind == k && extra == n);
        // Too short for a fixed field.
        for (kind, need) in [
            (Write, 8),
            (Trim, 12),
            (Zeroes, 12),
            (Nack, 4),
            (ResyncData, 8),
            (ResyncDone, 32),
            (NewGeneration, 8),
            (BitmapChunk, 8),
            (DigestRequest, 16),
            (Digests, 12),
            (ReadRequest, 12),
            (Grow, 8),
        ] {
            for len in 0..need {
                let e = malformed(kind, 0, &vec![0; len]);
                assert!(m(e, kind), "{kind} with {len} bytes");
            }
        }
        // Bytes after a fixed layout.
        for (kind, len) in [
            (Trim, 12),
            (Zeroes, 12),
            (Flush, 0),
            (Ack, 0),
            (ResyncDone, 32),
            (NewGeneration, 8),
            (DigestRequest, 16),
            (Grow, 8),
        ] {
            assert!(t(malformed(kind, 0, &vec![0; len + 3]), kind, 3), "{kind}");
        }
        // Lists that are not whole u64s.
        assert!(m(malformed(BitmapChunk, 0, &[0; 8 + 7]), BitmapChunk));
        assert!(m(malformed(Digests, 0, &[0; 12 + 9]), Digests));
        // Text that is not UTF-8.
        assert!(m(malformed(Nack, 0, &[0, 0, 0, 1, 0xFF, 0xFE]), Nack));
        assert!(m(malformed(Goodbye, 0, &[b'o', b'k', 0xC0]), Goodbye));
        // JSON: empty, garbage, wrong shape, trailing.
        assert!(m(malformed(Hello, 0, b""), Hello));
        assert!(m(malformed(Hello, 0, b"{\"protocol\":"), Hello));
        assert!(m(malformed(HelloReply, 0, b"[1,2]"), HelloReply));
        assert!(m(malformed(Hello, 0, b"{}"), Hello));
        let mut json = serde_json::to_vec(&hello()).unwrap();
        json.extend_from_slice(b" {}");
        assert!(t(malformed(Hello, 0, &json), Hello, 3));
        let mut json = serde_json::to_vec(&hello_reply()).unwrap();
        json.push(b'\n');
        assert!(t(malformed(HelloReply, 0, &json), HelloReply, 1));
        let e = malformed(Trim, 0, &[0; 5]);
        assert!(e.to_string().contains("malformed Trim payload"), "{e}");
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        for msg in samples() {
            let good = frame(0x55, &msg);
            for bit in 0..good.len() * 8 {
                let mut f = good.clone();
                f[bit / 8] ^= 1 << (bit % 8);
                assert!(decode_frame(&f).is_err(), "{msg:?}: bit {bit} flipped still decodes");
            }
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        for msg in samples() {
            let good = frame(1, &msg);
            for len in 0..good.len() {
                assert!(matches!(decode_frame(&good[..len]), Err(WireError::Truncated { got, .. }) if got == len));
            }
        }
    }

    #[test]
    fn oversize_is_refused_on_both_ends() {
        let max = Message::Write { offset: 0, data: Bytes::from(vec![7; MAX_DATA]), fua: false };
        let f = frame(1, &max);
        assert_eq!(f.len(), HEADER_LEN + MAX_PAYLOAD);
        assert_eq!(decode_frame(&f).unwrap().1, max);
        let too_big = Message::ResyncData { offset: 0, data: Bytes::from(vec![7; MAX_DATA + 1]) };
        let mut out = b"kept".to_vec();
        assert!(
            matches!(encode(1, &too_big, &mut out), Err(WireError::Oversize { len }) if len == MAX_PAYLOAD as u64 + 1)
        );
        assert_eq!(out, b"kept");
        let words = Message::BitmapChunk { first_bit: 0, words: vec![0; MAX_PAYLOAD / 8], last: false };
        assert!(matches!(encode(1, &words, &mut out), Err(WireError::Oversize { .. })));
        let hello = Message::Hello(Hello { volume: "x".repeat(MAX_PAYLOAD), ..hello() });
        assert!(matches!(encode(1, &hello, &mut out), Err(WireError::Oversize { .. })));
        assert_eq!(out, b"kept");
        assert!(matches!(encode_frame(1, &too_big), Err(WireError::Oversize { len }) if len == MAX_PAYLOAD as u64 + 1));
        assert_eq!(encode_frame(1, &max).unwrap().len(), HEADER_LEN + MAX_PAYLOAD);
    }

    #[test]
    fn debug_shows_lengths_not_data() {
        let s = format!("{:?}", Message::Write { offset: 3, data: Bytes::from(vec![0x41; 100]), fua: true });
        assert_eq!(s, "Write { offset: 3, data: <100 bytes>, fua: true }");
        let s = format!("{:?}", Message::NewGeneration { current: 255 });
        assert_eq!(s, "NewGeneration { current: 0xff }");
    }

    // ---- async helpers ----

    #[tokio::test]
    async fn a_payload_is_read_whole_and_never_past_its_end() {
        // Small buffer, large payloads: parts come from the buffer, parts
        // straight from the source; the bytes after each payload stay.
        let mut stream = Vec::new();
        for (i, len) in [5usize, 3000, 100_000, 1].into_iter().enumerate() {
            stream.extend((0..len).map(|j| (i * 31 + j) as u8));
            stream.push(0xEE); // a marker after each payload
        }
        let mut r = tokio::io::BufReader::with_capacity(1024, &stream[..]);
        for (i, len) in [5usize, 3000, 100_000, 1].into_iter().enumerate() {
            let got = read_payload(&mut r, len).await.unwrap();
            assert_eq!(got.len(), len);
            assert!(got.iter().enumerate().all(|(j, b)| *b == (i * 31 + j) as u8), "payload {i}");
            assert_eq!(r.read_u8().await.unwrap(), 0xEE, "after payload {i}");
        }
        // A clean EOF first: a short buffer, not an error.
        let mut r = tokio::io::BufReader::new(&b"abc"[..]);
        assert_eq!(read_payload(&mut r, 10).await.unwrap(), b"abc");
        assert!(read_payload(&mut r, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn frames_stream_over_a_socket() {
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let msgs = samples();
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for (i, m) in sent.iter().enumerate() {
                write_frame(&mut a, i as u64, m).await.unwrap();
            }
            // `a` is dropped here: a clean EOF at a frame boundary.
        });
        for (i, m) in msgs.iter().enumerate() {
            let (seq, got) = read_frame(&mut b).await.unwrap();
            assert_eq!((seq, &got), (i as u64, m));
        }
        assert!(matches!(read_frame(&mut b).await, Err(WireError::Closed)));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn read_frame_reports_truncation_and_bad_frames() {
        let f = frame(5, &Message::Write { offset: 0, data: Bytes::from_static(b"data"), fua: false });
        for len in 1..f.len() {
            let mut r = &f[..len];
            match read_frame(&mut r).await {
                Err(WireError::Truncated { got, want }) => {
                    assert_eq!(got, len);
                    assert!(want == HEADER_LEN || want == f.len());
                }
                other => panic!("{len}: {other:?}"),
            }
        }
        let mut r: &[u8] = &[];
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Closed)));
        // A bad header is refused before its payload is read.
        let mut huge = frame(1, &Message::Ack);
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut r = &huge[..];
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Oversize { .. })));
        let mut bad = f.clone();
        bad[HEADER_LEN + 9] ^= 1;
        let mut r = &bad[..];
        assert!(matches!(read_frame(&mut r).await, Err(WireError::BadCrc { .. })));
        let mut r = &raw_frame(Kind::Trim as u8, 0, 1, &[0; 13])[..];
        assert!(matches!(read_frame(&mut r).await, Err(WireError::TrailingBytes { kind: Kind::Trim, extra: 1 })));
    }

    /// A reader that fails after some bytes.
    struct Failing(Vec<u8>);

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0.is_empty() {
                return std::task::Poll::Ready(Err(std::io::Error::new(ErrorKind::ConnectionReset, "reset")));
            }
            let n = buf.remaining().min(self.0.len()).min(3);
            buf.put_slice(&self.0[..n]);
            self.0.drain(..n);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn read_frame_reports_io_errors() {
        let f = frame(1, &Message::Goodbye { reason: "bye".into() });
        let mut r = Failing(f.clone());
        assert_eq!(read_frame(&mut r).await.unwrap(), (1, Message::Goodbye { reason: "bye".into() }));
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Io(e)) if e.kind() == ErrorKind::ConnectionReset));
        let mut r = Failing(f[..f.len() - 1].to_vec());
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Io(_))));
    }

    #[tokio::test]
    async fn read_frame_does_not_copy_data() {
        let f = frame(1, &Message::ResyncData { offset: 0, data: Bytes::from(vec![9; 1000]) });
        let mut r = &f[..];
        let (_, Message::ResyncData { data, .. }) = read_frame(&mut r).await.unwrap() else { panic!() };
        assert_eq!(&data[..], &[9; 1000][..]);
    }

    // ---- properties ----

    fn arb_gens() -> impl Strategy<Value = Generations> {
        any::<(u64, u64, u64, u64)>().prop_map(|(current, bitmap, h0, h1)| Generations {
            current,
            bitmap,
            history: [h0, h1],
        })
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
    }

    fn arb_disk() -> impl Strategy<Value = DiskState> {
        prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Inconsistent),
            Just(DiskState::Outdated),
            Just(DiskState::Diskless)
        ]
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        (
            (any::<u16>(), any::<String>(), any::<String>(), any::<u64>(), any::<u32>(), any::<String>()),
            (any::<u64>(), any::<u64>(), arb_gens(), any::<u64>(), proptest::collection::vec(any::<u64>(), 0..20)),
            (any::<bool>(), proptest::sample::select(SplitBrainPolicy::ALL.to_vec())),
        )
            .prop_map(
                |(
                    (protocol, volume, volume_id, size, granule, node),
                    (epoch, primary_since_ms, generation, changed_blocks, crashed_extents),
                    (is_async, split_brain),
                )| Hello {
                    protocol,
                    volume,
                    volume_id,
                    size,
                    granule,
                    node,
                    epoch,
                    primary_since_ms,
                    generation,
                    changed_blocks,
                    crashed_extents,
                    mode: if is_async { ReplicationMode::Async } else { ReplicationMode::Sync },
                    discard_secondary: is_async && split_brain == SplitBrainPolicy::Disconnect,
                    forced_epoch: epoch / 2,
                    split_brain,
                },
            )
    }

    fn arb_hello_reply() -> impl Strategy<Value = HelloReply> {
        (
            (any::<bool>(), any::<Option<String>>(), any::<String>(), any::<String>(), any::<u64>(), any::<u32>()),
            (
                arb_disk(),
                any::<u64>(),
                arb_gens(),
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..20),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (accepted, reason, node, volume_id, size, granule),
                    (disk, primary_since_ms, generation, changed_blocks, crashed_extents, epoch_seen),
                )| HelloReply {
                    accepted,
                    reason,
                    node,
                    volume_id,
                    size,
                    granule,
                    disk,
                    primary_since_ms,
                    generation,
                    changed_blocks,
                    crashed_extents,
                    epoch_seen,
                    replaced: 0,
                },
            )
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let words = || proptest::collection::vec(any::<u64>(), 0..300);
        prop_oneof![
            arb_hello().prop_map(Message::Hello),
            arb_hello_reply().prop_map(Message::HelloReply),
            (any::<u64>(), arb_bytes(), any::<bool>()).prop_map(|(offset, data, fua)| Message::Write {
                offset,
                data,
                fua
            }),
            any::<(u64, u32)>().prop_map(|(offset, len)| Message::Trim { offset, len }),
            any::<(u64, u32, bool)>().prop_map(|(offset, len, fua)| Message::Zeroes { offset, len, fua }),
            Just(Message::Flush),
            Just(Message::Ack),
            (any::<i32>(), any::<String>()).prop_map(|(errno, message)| Message::Nack { errno, message }),
            (any::<u64>(), arb_bytes()).prop_map(|(offset, data)| Message::ResyncData { offset, data }),
            arb_gens().prop_map(|generation| Message::ResyncDone { generation }),
            any::<u64>().prop_map(|current| Message::NewGeneration { current }),
            (any::<u64>(), words(), any::<bool>()).prop_map(|(first_bit, words, last)| Message::BitmapChunk {
                first_bit,
                words,
                last
            }),
            any::<(u64, u32, u32)>().prop_map(|(offset, len, granule)| Message::DigestRequest { offset, len, granule }),
            (any::<u64>(), any::<u32>(), words()).prop_map(|(offset, granule, digests)| Message::Digests {
                offset,
                granule,
                digests
            }),
            any::<String>().prop_map(|reason| Message::Goodbye { reason }),
            any::<(u64, u32)>().prop_map(|(offset, len)| Message::ReadRequest { offset, len }),
            any::<u64>().prop_map(|size| Message::Grow { size }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_message_round_trips(seq in any::<u64>(), msg in arb_message()) {
            let f = frame(seq, &msg);
            let (got_seq, got, used) = decode_frame(&f).unwrap();
            prop_assert_eq!(got_seq, seq);
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(&got, &msg);
            let hb = header_of(&f);
            let h = decode_header(&hb).unwrap();
            prop_assert_eq!(h.kind, msg.kind());
            prop_assert_eq!(h.payload_len as usize, f.len() - HEADER_LEN);
        }

        #[test]
        fn a_single_bit_flip_never_decodes(seq in any::<u64>(), msg in arb_message(), bit in any::<proptest::sample::Index>()) {
            let mut f = frame(seq, &msg);
            let bit = bit.index(f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_frame(&f).is_err());
        }

        #[test]
        fn frames_concatenate(msgs in proptest::collection::vec((any::<u64>(), arb_message()), 0..8)) {
            let mut stream = Vec::new();
            for (seq, m) in &msgs {
                encode(*seq, m, &mut stream).unwrap();
            }
            let mut rest = &stream[..];
            for (seq, m) in &msgs {
                let (s, got, used) = decode_frame(rest).unwrap();
                prop_assert_eq!((s, &got), (*seq, m));
                rest = &rest[used..];
            }
            prop_assert!(rest.is_empty());
        }

        /// Arbitrary bytes never panic, raw or made to pass the crc and the
        /// header checks (so the payload parsers see them); whatever decodes
        /// re-encodes to the same message.
        #[test]
        fn arbitrary_bytes_never_panic(
            kind in 0u8..18,
            flags in 0u16..4,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            raw in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let _ = decode_frame(&raw);
            if let Some(hb) = raw.first_chunk::<HEADER_LEN>() {
                if let Ok(h) = decode_header(hb) {
                    let _ = decode(&h, hb, &raw[HEADER_LEN..]);
                }
            }
            let f = raw_frame(kind, flags, 3, &payload);
            if let Ok((seq, msg, used)) = decode_frame(&f) {
                prop_assert_eq!(used, f.len());
                let (seq2, again, _) = decode_frame(&frame(seq, &msg)).unwrap();
                prop_assert_eq!((seq2, again), (seq, msg));
            }
        }

        #[test]
        fn binary_payloads_re_encode_to_the_same_bytes(kind in 3u8..16, flags in 0u16..4, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let f = raw_frame(kind, flags, 3, &payload);
            if let Ok((seq, msg, _)) = decode_frame(&f) {
                prop_assert_eq!(frame(seq, &msg), f);
            }
        }
    }
}
