//! The data-plane workload: a client writes sequence-numbered, checksummed
//! 4 KiB blocks through the NBD export of the group's synchronously
//! replicated volume (following the primary after every failover) and reads
//! them back; the checker proves every acknowledged write stays readable and
//! no block ever goes back to an older value. The client speaks NBD itself
//! (fixed newstyle, one request at a time) so that each acknowledgement is
//! known exactly; the checker is pure.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const BLOCK: usize = 4096;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const FLAG_FUA: u16 = 1;
/// Every request gets this long before the connection is given up.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a block holds: its index, the write's sequence number, a checksum.
pub fn encode_block(index: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(&index.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
    }
    let sum = checksum(&b[24..]) ^ index ^ seq.rotate_left(17);
    b[16..24].copy_from_slice(&sum.to_le_bytes());
    b
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3))
}

/// The sequence number a block read back holds: `Ok(None)` for a block
/// never written (all zeros), `Err` for a torn or foreign block.
pub fn decode_block(index: u64, b: &[u8]) -> Result<Option<u64>, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or([0; 8]));
    let (i, seq, sum) = (word(0..8), word(8..16), word(16..24));
    if i != index {
        return Err(format!("block {index} holds block {i}'s data"));
    }
    if sum != checksum(&b[24..]) ^ index ^ seq.rotate_left(17) {
        return Err(format!("block {index} (seq {seq}) fails its checksum: torn or corrupted"));
    }
    Ok(Some(seq))
}

/// A minimal NBD client over a unix socket.
pub struct Client {
    s: UnixStream,
    handle: u64,
}

impl Client {
    pub async fn connect(socket: &Path, export: &str) -> io::Result<Client> {
        let fut = async {
            let mut s = UnixStream::connect(socket).await?;
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).await?;
            if &hello[0..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
                return Err(io::Error::other("not a newstyle NBD server"));
            }
            // Fixed newstyle, no zeroes.
            s.write_all(&3u32.to_be_bytes()).await?;
            let mut opt = Vec::new();
            opt.extend_from_slice(b"IHAVEOPT");
            opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
            opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
            opt.extend_from_slice(export.as_bytes());
            s.write_all(&opt).await?;
            let mut info = [0u8; 10];
            s.read_exact(&mut info).await?;
            Ok(Client { s, handle: 0 })
        };
        tokio::time::timeout(IO_TIMEOUT, fut).await.map_err(|_| io::Error::other("NBD handshake timed out"))?
    }

    async fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<Vec<u8>> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        let handle = self.handle;
        let fut = async {
            self.s.write_all(&req).await?;
            let mut reply = [0u8; 16];
            self.s.read_exact(&mut reply).await?;
            let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap_or([0; 4]));
            let error = u32::from_be_bytes(reply[4..8].try_into().unwrap_or([0; 4]));
            let h = u64::from_be_bytes(reply[8..16].try_into().unwrap_or([0; 8]));
            if magic != REPLY_MAGIC || h != handle {
                return Err(io::Error::other("bad NBD reply"));
            }
            if error != 0 {
                return Err(io::Error::other(format!("NBD error {error}")));
            }
            let mut out = vec![0u8; if cmd == CMD_READ { len as usize } else { 0 }];
            self.s.read_exact(&mut out).await?;
            Ok(out)
        };
        tokio::time::timeout(IO_TIMEOUT, fut).await.map_err(|_| io::Error::other("NBD request timed out"))?
    }

    /// Writes a block with FUA: acknowledged means durable on every sync replica.
    pub async fn write_block(&mut self, index: u64, seq: u64) -> io::Result<()> {
        let b = encode_block(index, seq);
        self.request(CMD_WRITE, FLAG_FUA, index * BLOCK as u64, BLOCK as u32, &b).await.map(|_| ())
    }

    pub async fn read_block(&mut self, index: u64) -> io::Result<Vec<u8>> {
        self.request(CMD_READ, 0, index * BLOCK as u64, BLOCK as u32, &[]).await
    }

    pub async fn close(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]).await;
    }
}

/// One operation of the history.
#[derive(Debug, Clone)]
pub enum Op {
    /// A write of `seq` to `block`, acknowledged at `answer_ms` (None: no
    /// answer, it may or may not have happened).
    Write { block: u64, seq: u64, invoke_ms: u64, answer_ms: Option<u64> },
    /// A read of `block` that returned `seq` (None: never written), or a
    /// block that failed to decode.
    Read { block: u64, got: Result<Option<u64>, String>, invoke_ms: u64, answer_ms: u64 },
}

/// What the history shows wrong with one read.
#[derive(Debug, Clone, PartialEq)]
enum Finding {
    /// The read returned `got` (None: never written) although write `floor`
    /// to `block` was acknowledged before the read began at `at_ms`.
    Lost { block: u64, got: Option<u64>, floor: u64, at_ms: u64 },
    /// A torn, foreign or never-written block.
    Broken(String),
}

impl Finding {
    fn describe(&self) -> String {
        match self {
            Finding::Lost { block, got: None, floor, at_ms } => {
                format!("block {block} read empty at {at_ms} ms after write {floor} was acknowledged: lost")
            }
            Finding::Lost { block, got: Some(seq), floor, at_ms } => {
                format!("block {block} read seq {seq} at {at_ms} ms after seq {floor} was acknowledged: went back")
            }
            Finding::Broken(why) => why.clone(),
        }
    }
}

/// Checks a history of a synchronously replicated volume: every read
/// returns a well-formed block whose sequence number is at least that of
/// the last write to it acknowledged before the read began (no acknowledged
/// write lost, no going back), and one that was actually written (invoked
/// before the read answered). Sequence numbers grow per block. Returns the
/// violations.
pub fn check(ops: &[Op]) -> Vec<String> {
    findings(ops).iter().map(Finding::describe).collect()
}

/// What an asynchronously replicated volume lost: acknowledged writes no
/// longer there after a failover are measured (RPO), not violations.
#[derive(Debug, Default, PartialEq)]
pub struct Rpo {
    /// Torn, foreign or never-written blocks: violations still.
    pub violations: Vec<String>,
    /// Acknowledged writes later found gone.
    pub lost_writes: usize,
    /// For each lost write: how long before its primary stopped serving the
    /// client it was acknowledged (ms) — the RPO, in time.
    pub rpo_ms: Vec<u64>,
    /// Lost writes with no later break of the client's connection.
    pub unattributed: usize,
    /// The lost writes: (block, seq, acknowledged at, seen gone at), ms.
    pub lost: Vec<(u64, u64, u64, u64)>,
}

/// Measures an asynchronous volume's history; `breaks` are the times (ms,
/// sorted) the client's requests to a primary began failing (it stopped
/// serving: fenced, dead, cut off). A lost write was lost by the first
/// break after its acknowledgement.
pub fn rpo(ops: &[Op], breaks: &[u64]) -> Rpo {
    let mut out = Rpo::default();
    let mut lost = BTreeMap::new();
    for f in findings(ops) {
        match f {
            Finding::Broken(why) => out.violations.push(why),
            Finding::Lost { block, got, at_ms, .. } => {
                for op in ops {
                    if let Op::Write { block: b, seq, answer_ms: Some(a), .. } = op {
                        if *b == block && *a < at_ms && Some(*seq) > got {
                            lost.entry((block, *seq)).or_insert((*a, at_ms));
                        }
                    }
                }
            }
        }
    }
    for (&(block, seq), &(acked, seen)) in &lost {
        match breaks.iter().find(|b| **b >= acked) {
            Some(b) => out.rpo_ms.push(b - acked),
            None => out.unattributed += 1,
        }
        out.lost.push((block, seq, acked, seen));
    }
    out.lost_writes = lost.len();
    out.rpo_ms.sort_unstable();
    out
}

fn findings(ops: &[Op]) -> Vec<Finding> {
    let mut acked: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new(); // block → (answer_ms, seq)
    let mut invoked: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new(); // block → (invoke_ms, seq)
    for op in ops {
        if let Op::Write { block, seq, invoke_ms, answer_ms } = op {
            invoked.entry(*block).or_default().push((*invoke_ms, *seq));
            if let Some(a) = answer_ms {
                acked.entry(*block).or_default().push((*a, *seq));
            }
        }
    }
    let mut violations = Vec::new();
    for op in ops {
        let Op::Read { block, got, invoke_ms, answer_ms } = op else { continue };
        let floor =
            acked.get(block).into_iter().flatten().filter(|(a, _)| a < invoke_ms).map(|(_, s)| *s).max().unwrap_or(0);
        let lost = |got| Finding::Lost { block: *block, got, floor, at_ms: *invoke_ms };
        match got {
            Err(e) => violations.push(Finding::Broken(format!("read at {invoke_ms} ms: {e}"))),
            Ok(None) if floor > 0 => violations.push(lost(None)),
            Ok(None) => {}
            Ok(Some(seq)) if *seq < floor => violations.push(lost(Some(*seq))),
            Ok(Some(seq)) => {
                let known = invoked.get(block).into_iter().flatten().any(|(i, s)| s == seq && i <= answer_ms);
                if !known {
                    violations.push(Finding::Broken(format!(
                        "block {block} read seq {seq} at {invoke_ms} ms: never written"
                    )));
                }
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(block: u64, seq: u64, invoke_ms: u64, answer_ms: Option<u64>) -> Op {
        Op::Write { block, seq, invoke_ms, answer_ms }
    }

    fn r(block: u64, got: Option<u64>, invoke_ms: u64, answer_ms: u64) -> Op {
        Op::Read { block, got: Ok(got), invoke_ms, answer_ms }
    }

    #[test]
    fn blocks_round_trip_and_corruption_is_caught() {
        let b = encode_block(7, 42);
        assert_eq!(decode_block(7, &b), Ok(Some(42)));
        assert!(decode_block(8, &b).is_err());
        let mut torn = b.clone();
        torn[3000] ^= 1;
        assert!(decode_block(7, &torn).is_err());
        assert_eq!(decode_block(7, &[0u8; BLOCK]), Ok(None));
    }

    #[test]
    fn a_lost_or_reverted_write_is_a_violation() {
        // Acknowledged at 20, read from 30: must see seq >= 2.
        let ok = [w(1, 1, 0, Some(10)), w(1, 2, 15, Some(20)), r(1, Some(2), 30, 31)];
        assert!(check(&ok).is_empty());
        let lost = [w(1, 1, 0, Some(10)), r(1, None, 30, 31)];
        assert_eq!(check(&lost).len(), 1);
        let back = [w(1, 1, 0, Some(10)), w(1, 2, 15, Some(20)), r(1, Some(1), 30, 31)];
        assert_eq!(check(&back).len(), 1);
        // A read overlapping the write may see either value.
        let overlap = [w(1, 1, 0, Some(10)), w(1, 2, 15, Some(40)), r(1, Some(1), 30, 31), r(1, Some(2), 30, 31)];
        assert!(check(&overlap).is_empty());
        // An unanswered write may appear, or not.
        let unknown = [w(1, 1, 0, Some(10)), w(1, 2, 15, None), r(1, Some(2), 30, 31), r(1, Some(1), 32, 33)];
        assert!(check(&unknown).is_empty());
        // A value nobody wrote (before the read ended) is a violation.
        let phantom = [w(1, 1, 0, Some(10)), r(1, Some(9), 30, 31)];
        assert_eq!(check(&phantom).len(), 1);
    }

    #[test]
    fn async_losses_are_measured_against_the_fault_that_caused_them() {
        // Writes 2 and 3 acknowledged at 20 and 40, a fault at 50, the read
        // at 60 sees 1: two writes lost, 30 and 10 ms before the fault.
        let ops = [
            w(1, 1, 0, Some(10)),
            w(1, 2, 15, Some(20)),
            w(1, 3, 35, Some(40)),
            r(1, Some(1), 60, 61),
            r(1, Some(1), 70, 71),
        ];
        // The primary stopped serving at 5 (before any of them) and at 50.
        let m = rpo(&ops, &[5, 50]);
        assert_eq!((m.lost_writes, m.rpo_ms.clone(), m.unattributed), (2, vec![10, 30], 0));
        assert_eq!(m.lost, vec![(1, 2, 20, 60), (1, 3, 40, 60)]);
        assert!(m.violations.is_empty());
        // No break after it: counted apart.
        let m = rpo(&ops, &[5]);
        assert_eq!((m.lost_writes, m.unattributed), (2, 2));
        // Nothing lost, nothing measured; a torn block is still a violation.
        let fine = [w(1, 1, 0, Some(10)), r(1, Some(1), 60, 61)];
        assert_eq!(rpo(&fine, &[50]), Rpo::default());
        let torn = [Op::Read { block: 1, got: Err("torn".into()), invoke_ms: 5, answer_ms: 6 }];
        assert_eq!(rpo(&torn, &[]).violations.len(), 1);
    }
}
