//! What a replica keeps on its disk: the backing file (the volume's bytes),
//! the metadata (generations, role, disk state, epoch seen), one bitmap per
//! peer (the blocks that peer lacks) and the activity log (the extents a
//! primary may be writing right now).
//!
//! Crash rule, as in DRBD: an extent enters the activity log, durably,
//! before it is written; a bitmap page is made durable before its extent
//! leaves the log. So after a crash, the bitmaps on disk plus every extent
//! of the log cover every write a peer may have missed. This module never
//! talks to the network and never decides who is primary.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_raft::volume::DiskState;

use super::generation::{GenId, Generations};

/// Size of one activity-log extent.
pub const AL_EXTENT: u64 = 4 << 20;
/// Most extents hot at once (4 GiB of a volume written without metadata I/O).
pub const AL_SLOTS: usize = 1024;
/// Bitmap words persisted per write (one 4 KiB page).
const PAGE_WORDS: usize = 512;

/// The replica's metadata, replaced atomically on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub volume_id: String,
    pub size: u64,
    pub granule: u32,
    pub current: GenId,
    pub history: [GenId; 2],
    /// Per peer: the generation its bitmap counts from (0: none).
    pub bitmap_gens: std::collections::BTreeMap<String, GenId>,
    pub disk: DiskState,
    /// Primary when last saved; with `clean == false` at open, a crash.
    pub primary: bool,
    pub clean: bool,
    /// When this replica last became primary (ms since the epoch), 0 never.
    pub primary_since_ms: u64,
    /// The highest group epoch a primary presented (or this node held).
    pub epoch_seen: u64,
    /// Extents of the activity log found after a crash as primary: whoever
    /// becomes source resyncs them.
    pub crashed_extents: Vec<u64>,
    /// The primary (node, epoch) this replica last followed: its writes in
    /// the activity log are reconciled by that primary's bitmap; any other
    /// primary must resync them.
    #[serde(default)]
    pub upstream: Option<(String, u64)>,
    /// The replacement number these files were created for (see
    /// [`Create::replaced`]).
    #[serde(default)]
    pub replaced: u64,
}

impl Meta {
    pub fn generations_for(&self, peer: &str) -> Generations {
        Generations {
            current: self.current,
            bitmap: self.bitmap_gens.get(peer).copied().unwrap_or(0),
            history: self.history,
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new
/// content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let f = File::create(&tmp)?;
    f.write_all_at(bytes, 0)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Blocks a peer lacks, one bit per `granule` bytes.
#[derive(Debug)]
pub struct Bitmap {
    granule: u64,
    bits: u64,
    words: Vec<u64>,
    count: u64,
    /// Pages changed since the last persist.
    dirty_pages: BTreeSet<usize>,
}

impl Bitmap {
    pub fn new(size: u64, granule: u32) -> Bitmap {
        let granule = u64::from(granule);
        let bits = size.div_ceil(granule);
        Bitmap { granule, bits, words: vec![0; bits.div_ceil(64) as usize], count: 0, dirty_pages: BTreeSet::new() }
    }

    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Covers a volume grown to `size` bytes: the new blocks are clear (the
    /// new space reads as zeroes on every replica, so no peer lacks it).
    /// Bits past the old end were never set, so the old last word needs no
    /// cleaning; nothing is dirty (a shorter file loads its missing words as
    /// zeroes).
    pub fn grow(&mut self, size: u64) {
        let bits = size.div_ceil(self.granule);
        if bits <= self.bits {
            return;
        }
        self.bits = bits;
        self.words.resize(bits.div_ceil(64) as usize, 0);
    }

    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes those bits cover (the last block may be short).
    pub fn bytes(&self) -> u64 {
        self.count * self.granule
    }

    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub fn set(&mut self, bit: u64) {
        if bit >= self.bits {
            return;
        }
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.words[w] & m == 0 {
            self.words[w] |= m;
            self.count += 1;
            self.dirty_pages.insert(w / PAGE_WORDS);
        }
    }

    pub fn clear(&mut self, bit: u64) {
        if bit >= self.bits {
            return;
        }
        let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
        if self.words[w] & m != 0 {
            self.words[w] &= !m;
            self.count -= 1;
            self.dirty_pages.insert(w / PAGE_WORDS);
        }
    }

    /// Marks every block `[offset, offset + len)` touches.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granule;
        let last = (offset + len - 1) / self.granule;
        for bit in first..=last.min(self.bits.saturating_sub(1)) {
            self.set(bit);
        }
    }

    pub fn set_all(&mut self) {
        for bit in 0..self.bits {
            self.set(bit);
        }
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut bit = from;
        while bit < self.bits {
            let w = self.words[(bit / 64) as usize] >> (bit % 64);
            if w != 0 {
                let found = bit + u64::from(w.trailing_zeros());
                return (found < self.bits).then_some(found);
            }
            bit = (bit / 64 + 1) * 64;
        }
        None
    }

    /// Sets every bit set in `words` (a peer's bitmap, starting at `first_bit`).
    pub fn merge_words(&mut self, first_bit: u64, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.set(first_bit + i as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    fn load(path: &Path, size: u64, granule: u32) -> io::Result<Bitmap> {
        let mut bm = Bitmap::new(size, granule);
        let raw = match std::fs::read(path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(bm),
            Err(e) => return Err(e),
        };
        for (i, chunk) in raw.chunks_exact(8).take(bm.words.len()).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            bm.words[i] = u64::from_le_bytes(b);
        }
        // Bits past the end never count.
        if !bm.bits.is_multiple_of(64) {
            if let Some(last) = bm.words.last_mut() {
                *last &= (1u64 << (bm.bits % 64)) - 1;
            }
        }
        bm.count = bm.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(bm)
    }

    /// Writes the changed pages and makes them durable.
    fn persist(&mut self, file: &File) -> io::Result<()> {
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        for page in std::mem::take(&mut self.dirty_pages) {
            let start = page * PAGE_WORDS;
            let end = (start + PAGE_WORDS).min(self.words.len());
            let mut buf = Vec::with_capacity((end - start) * 8);
            for w in &self.words[start..end] {
                buf.extend_from_slice(&w.to_le_bytes());
            }
            file.write_all_at(&buf, (start * 8) as u64)?;
        }
        file.sync_data()
    }
}

/// The extents a primary may be writing: each enters durably before its
/// first write, and leaves (least recently used first) only after the
/// bitmaps are durable.
#[derive(Debug)]
pub struct ActivityLog {
    hot: VecDeque<u64>,
    set: BTreeSet<u64>,
    file: File,
    /// Alternating 2 slots, so a torn write leaves the other one intact.
    seq: u64,
}

/// Allocates the first `len` bytes of `file` now (thick provisioning, as a
/// volume on a block device would be): its writes, bitmaps and activity log
/// then never meet a full file system. Allocated but unwritten space still
/// reads as a hole (SEEK_DATA), so sparse-aware resync is unchanged. A file
/// system without fallocate keeps the file sparse.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let len = i64::try_from(len).map_err(io::Error::other)?;
    match fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, len) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

impl ActivityLog {
    const SLOT_BYTES: u64 = 16 + AL_SLOTS as u64 * 8;

    fn open(path: &Path) -> io::Result<(ActivityLog, Vec<u64>)> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        reserve(&file, 2 * Self::SLOT_BYTES)?;
        let mut best: Option<(u64, Vec<u64>)> = None;
        for slot in 0..2u64 {
            let mut buf = vec![0u8; Self::SLOT_BYTES as usize];
            let n = read_up_to(&file, &mut buf, slot * Self::SLOT_BYTES)?;
            if n < 16 {
                continue;
            }
            let seq = u64::from_le_bytes(buf[0..8].try_into().unwrap_or([0; 8]));
            let count = u32::from_le_bytes(buf[8..12].try_into().unwrap_or([0; 4])) as usize;
            let crc = u32::from_le_bytes(buf[12..16].try_into().unwrap_or([0; 4]));
            if count > AL_SLOTS || n < 16 + count * 8 {
                continue;
            }
            let body = &buf[16..16 + count * 8];
            if crc32c::crc32c_append(crc32c::crc32c(&buf[0..12]), body) != crc {
                continue;
            }
            let extents = body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, extents));
            }
        }
        let (seq, extents) = best.unwrap_or((0, Vec::new()));
        Ok((ActivityLog { hot: VecDeque::new(), set: BTreeSet::new(), file, seq }, extents))
    }

    /// The extents of `[offset, offset + len)` not yet hot.
    pub fn missing(&self, offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        (offset / AL_EXTENT..=(offset + len - 1) / AL_EXTENT).filter(|e| !self.set.contains(e)).collect()
    }

    /// Marks `extents` most recently used.
    fn touch(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for e in offset / AL_EXTENT..=(offset + len - 1) / AL_EXTENT {
            if let Some(pos) = self.hot.iter().rposition(|x| *x == e) {
                // Cheap enough: only moved when it is not already near the back.
                if pos + 8 < self.hot.len() {
                    self.hot.remove(pos);
                    self.hot.push_back(e);
                }
            }
        }
    }

    /// Adds `extents`, returning those evicted to make room.
    fn add(&mut self, extents: &[u64]) -> Vec<u64> {
        let mut evicted = Vec::new();
        for e in extents {
            if self.set.insert(*e) {
                self.hot.push_back(*e);
            }
        }
        while self.hot.len() > AL_SLOTS {
            if let Some(old) = self.hot.pop_front() {
                self.set.remove(&old);
                evicted.push(old);
            }
        }
        evicted
    }

    fn persist(&mut self) -> io::Result<()> {
        self.seq += 1;
        let mut buf = Vec::with_capacity(Self::SLOT_BYTES as usize);
        buf.extend_from_slice(&self.seq.to_le_bytes());
        buf.extend_from_slice(&(self.hot.len() as u32).to_le_bytes());
        let mut body = Vec::with_capacity(self.hot.len() * 8);
        for e in &self.hot {
            body.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf), &body);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.extend_from_slice(&body);
        self.file.write_all_at(&buf, (self.seq % 2) * Self::SLOT_BYTES)?;
        self.file.sync_data()
    }

    /// Empties the log (a clean demotion: the bitmaps are durable).
    fn reset(&mut self) -> io::Result<()> {
        self.hot.clear();
        self.set.clear();
        self.persist()
    }

    /// The hot extents.
    pub fn extents(&self) -> Vec<u64> {
        self.hot.iter().copied().collect()
    }
}

fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Everything of one replica on disk. Not thread-safe by itself: the engine
/// holds it under a lock, except the data file, which it reads and writes
/// concurrently through [`Replica::data`].
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    name: String,
    pub meta: Meta,
    pub bitmaps: std::collections::BTreeMap<String, Bitmap>,
    bitmap_files: std::collections::BTreeMap<String, File>,
    pub al: ActivityLog,
    data: std::sync::Arc<File>,
}

/// How a replica is created when it does not exist yet.
#[derive(Debug, Clone)]
pub struct Create {
    pub volume_id: String,
    pub size: u64,
    pub granule: u32,
    /// The generation all replicas of a new volume share (clean start), or
    /// 0 for a replica that must be fully synced.
    pub initial: GenId,
    /// How many times the control plane says this replica was replaced.
    /// Files created for a smaller number are of the old disk: they are
    /// removed and the replica is created again, empty (a full sync), even
    /// when `initial` names a generation.
    pub replaced: u64,
}

impl Replica {
    fn path(dir: &Path, name: &str, what: &str) -> PathBuf {
        dir.join(format!("{name}.{what}"))
    }

    /// When the backing file was last written (its mtime, ms since the
    /// Unix epoch): on a secondary, the newest write it received.
    pub fn data_modified_ms(&self) -> Option<u64> {
        let t = self.data.metadata().ok()?.modified().ok()?;
        t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64)
    }

    /// The backing file's path.
    pub fn data_path(dir: &Path, name: &str) -> PathBuf {
        Self::path(dir, name, "img")
    }

    /// Opens the replica `name` in `dir`, creating it if absent. A replica
    /// that crashed as primary comes back with its activity log merged into
    /// every peer's bitmap and remembered in `crashed_extents`.
    pub fn open(dir: &Path, name: &str, create: &Create, peers: &[String]) -> io::Result<Replica> {
        std::fs::create_dir_all(dir)?;
        let meta_path = Self::path(dir, name, "meta");
        Self::remove_if_replaced(dir, name, create.replaced, peers)?;
        let meta = match std::fs::read(&meta_path) {
            Ok(raw) => serde_json::from_slice::<Meta>(&raw)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", meta_path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A replaced disk never starts from the shared initial
                // generation: it holds nothing of the volume's data.
                let initial = if create.replaced > 0 { 0 } else { create.initial };
                let meta = Meta {
                    volume_id: create.volume_id.clone(),
                    size: create.size,
                    granule: create.granule,
                    current: initial,
                    history: [0, 0],
                    bitmap_gens: Default::default(),
                    disk: if initial != 0 { DiskState::UpToDate } else { DiskState::Inconsistent },
                    primary: false,
                    clean: true,
                    primary_since_ms: 0,
                    epoch_seen: 0,
                    crashed_extents: Vec::new(),
                    upstream: None,
                    replaced: create.replaced,
                };
                let data = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(Self::data_path(dir, name))?;
                data.set_len(create.size)?;
                data.sync_all()?;
                write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?)?;
                meta
            }
            Err(e) => return Err(e),
        };
        // A smaller replica is grown below (a grow it missed while closed);
        // a larger one is another volume's (sizes never shrink).
        if meta.volume_id != create.volume_id || meta.size > create.size || meta.granule != create.granule {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: holds volume {} ({} bytes, granule {}), expected {} ({} bytes, granule {})",
                    meta_path.display(),
                    meta.volume_id,
                    meta.size,
                    meta.granule,
                    create.volume_id,
                    create.size,
                    create.granule
                ),
            ));
        }
        let data = OpenOptions::new().read(true).write(true).open(Self::data_path(dir, name))?;
        if data.metadata()?.len() < meta.size {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "backing file shorter than the volume"));
        }
        reserve(&data, meta.size)?;
        let (al, logged) = ActivityLog::open(&Self::path(dir, name, "al"))?;
        let mut r = Replica {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            meta,
            bitmaps: Default::default(),
            bitmap_files: Default::default(),
            al,
            data: std::sync::Arc::new(data),
        };
        for p in peers {
            r.add_peer(p)?;
        }
        if r.meta.clean && !r.meta.primary {
            // A secondary stopped cleanly: its recent extents still await
            // reconciliation with whoever leads next.
            r.al.add(&logged);
        }
        if !r.meta.clean {
            // A crash: any logged extent may differ on any other replica (a
            // primary's writes in flight, or a secondary's from a primary
            // that died mid-stream, or writes lost from its cache).
            if r.meta.primary {
                for e in &logged {
                    for bm in r.bitmaps.values_mut() {
                        bm.set_range(e * AL_EXTENT, AL_EXTENT);
                    }
                }
                r.persist_bitmaps()?;
            }
            r.remember_extents(&logged);
        }
        r.meta.clean = false;
        r.save_meta()?;
        r.grow(create.size)?;
        Ok(r)
    }

    /// Grows the replica to `size` bytes in place, if it is smaller: the
    /// backing file is extended (the new space reads as zeroes, allocated as
    /// at open), every bitmap covers it with its new bits clear, and only
    /// then the metadata says the new size (the commit point: a crash before
    /// it leaves a longer file under the old size, grown again at the next
    /// open). The activity log is untouched: extents are numbered from 0.
    /// Returns whether it grew.
    pub fn grow(&mut self, size: u64) -> io::Result<bool> {
        if size <= self.meta.size {
            return Ok(false);
        }
        self.data.set_len(size)?;
        reserve(&self.data, size)?;
        self.data.sync_all()?;
        for (peer, bm) in self.bitmaps.iter_mut() {
            bm.grow(size);
            if let Some(f) = self.bitmap_files.get(peer) {
                reserve(f, bm.words.len() as u64 * 8)?;
            }
        }
        let old = self.meta.size;
        self.meta.size = size;
        if let Err(e) = self.save_meta() {
            self.meta.size = old;
            return Err(e);
        }
        Ok(true)
    }

    /// The replica's size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.size
    }

    /// Removes the files of `name` when they were created before its
    /// replacement number `replaced`. The metadata goes first, durably: a
    /// crash halfway leaves no metadata, and the replica is created again.
    fn remove_if_replaced(dir: &Path, name: &str, replaced: u64, peers: &[String]) -> io::Result<()> {
        let meta_path = Self::path(dir, name, "meta");
        let had = match std::fs::read(&meta_path) {
            Ok(raw) => serde_json::from_slice::<Meta>(&raw).map(|m| m.replaced).unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if had >= replaced {
            return Ok(());
        }
        std::fs::remove_file(&meta_path)?;
        File::open(dir)?.sync_all()?;
        // Named one by one: another volume's name may start with this one's.
        let bitmaps = peers.iter().map(|p| format!("bitmap.{p}"));
        for what in ["img", "al", "tmp"].into_iter().map(String::from).chain(bitmaps) {
            match std::fs::remove_file(Self::path(dir, name, &what)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        File::open(dir)?.sync_all()?;
        tracing::warn!(volume = %name, replaced, "replica replaced: its old files are removed, it is created empty");
        Ok(())
    }

    /// Starts tracking a peer (a bitmap file is created on first persist).
    pub fn add_peer(&mut self, peer: &str) -> io::Result<()> {
        if self.bitmaps.contains_key(peer) {
            return Ok(());
        }
        let path = Self::path(&self.dir, &self.name, &format!("bitmap.{peer}"));
        let bm = Bitmap::load(&path, self.meta.size, self.meta.granule)?;
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        reserve(&file, bm.words.len() as u64 * 8)?;
        self.bitmaps.insert(peer.to_string(), bm);
        self.bitmap_files.insert(peer.to_string(), file);
        Ok(())
    }

    pub fn data(&self) -> std::sync::Arc<File> {
        self.data.clone()
    }

    pub fn save_meta(&self) -> io::Result<()> {
        let raw = serde_json::to_vec_pretty(&self.meta).map_err(io::Error::other)?;
        write_atomic(&Self::path(&self.dir, &self.name, "meta"), &raw)
    }

    pub fn persist_bitmaps(&mut self) -> io::Result<()> {
        for (peer, bm) in self.bitmaps.iter_mut() {
            if let Some(f) = self.bitmap_files.get(peer) {
                bm.persist(f)?;
            }
        }
        Ok(())
    }

    /// Before writing `[offset, offset + len)`: makes its extents hot,
    /// durably, persisting the bitmaps first if an extent must leave.
    /// Returns whether metadata I/O was needed.
    pub fn activate(&mut self, offset: u64, len: u64) -> io::Result<bool> {
        let missing = self.al.missing(offset, len);
        if missing.is_empty() {
            self.al.touch(offset, len);
            return Ok(false);
        }
        let evicted = self.al.add(&missing);
        if !evicted.is_empty() {
            self.persist_bitmaps()?;
        }
        self.al.persist()?;
        Ok(true)
    }

    /// Marks the range out of sync for `peer`.
    pub fn mark(&mut self, peer: &str, offset: u64, len: u64) {
        if let Some(bm) = self.bitmaps.get_mut(peer) {
            bm.set_range(offset, len);
        }
    }

    fn remember_extents(&mut self, extents: &[u64]) {
        let mut all: BTreeSet<u64> = self.meta.crashed_extents.iter().copied().collect();
        all.extend(extents.iter().copied());
        self.meta.crashed_extents = all.into_iter().collect();
    }

    /// A clean stop: bitmaps durable, meta says clean; a primary's activity
    /// log is emptied, a secondary's kept (it awaits reconciliation).
    pub fn close_clean(&mut self) -> io::Result<()> {
        self.data.sync_data()?;
        self.persist_bitmaps()?;
        if self.meta.primary {
            self.al.reset()?;
        }
        self.meta.clean = true;
        self.save_meta()
    }

    /// Extents that may differ from any other replica without being in a
    /// bitmap: those this replica wrote recently (its activity log) and
    /// those it found after a crash. Whoever becomes primary resyncs them to
    /// its peers; a secondary reports them to its next primary.
    pub fn unreconciled_extents(&self) -> Vec<u64> {
        let mut all: BTreeSet<u64> = self.meta.crashed_extents.iter().copied().collect();
        all.extend(self.al.extents());
        all.into_iter().collect()
    }

    /// What a secondary reports to the primary `(node, epoch)` connecting to
    /// it: its crash leftovers always; its recent writes only when they came
    /// from another primary (the same one already has them, or has the
    /// missing ones in its bitmap).
    pub fn extents_to_report(&self, node: &str, epoch: u64) -> Vec<u64> {
        let same = self.meta.upstream.as_ref().is_some_and(|(n, e)| n == node && *e == epoch);
        if same {
            self.meta.crashed_extents.clone()
        } else {
            self.unreconciled_extents()
        }
    }

    /// Everything written so far is known to match the primary (a resync
    /// finished): the activity log starts empty again.
    pub fn reconciled(&mut self) -> io::Result<()> {
        self.meta.crashed_extents.clear();
        self.al.reset()
    }

    /// Leaves the primary role cleanly (the replica stays open).
    pub fn demoted(&mut self) -> io::Result<()> {
        self.data.sync_data()?;
        self.persist_bitmaps()?;
        self.al.reset()?;
        self.meta.primary = false;
        self.save_meta()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(size: u64) -> Create {
        Create { volume_id: "v1".into(), size, granule: 4096, initial: 7, replaced: 0 }
    }

    #[test]
    fn bitmap_ranges_count_and_iterate() {
        let mut bm = Bitmap::new(1 << 20, 4096);
        assert_eq!(bm.bits(), 256);
        bm.set_range(4095, 2);
        assert_eq!(bm.count(), 2);
        bm.set_range(0, 4096);
        assert_eq!(bm.count(), 2);
        assert_eq!(bm.next_set(0), Some(0));
        assert_eq!(bm.next_set(1), Some(1));
        assert_eq!(bm.next_set(2), None);
        bm.set_range((1 << 20) - 1, 100); // past the end is clipped
        assert_eq!(bm.next_set(2), Some(255));
        bm.clear(0);
        assert_eq!(bm.count(), 2);
        bm.set_all();
        assert_eq!(bm.count(), 256);
        assert_eq!(bm.bytes(), 1 << 20);
    }

    #[test]
    fn a_replica_is_allocated_in_full_yet_reads_as_holes() {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let r = Replica::open(dir.path(), "v", &create(16 << 20), &["b".to_string()]).unwrap();
        let md = std::fs::metadata(Replica::data_path(dir.path(), "v")).unwrap();
        // Space is taken now: a full file system cannot fail a later write.
        assert!(md.blocks() * 512 >= 16 << 20, "{} blocks", md.blocks());
        // But nothing was written: SEEK_DATA finds no data (sparse resync).
        let data = r.data();
        // SAFETY: a valid fd, and lseek has no memory effects.
        let found = unsafe { libc::lseek(data.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(found, -1, "no data yet");
    }

    #[test]
    fn a_crash_as_primary_resyncs_exactly_the_logged_extents() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string()];
        {
            let mut r = Replica::open(dir.path(), "v", &create(64 << 20), &peers).unwrap();
            r.meta.primary = true;
            r.save_meta().unwrap();
            assert!(r.activate(5 * AL_EXTENT + 10, 10).unwrap());
            assert!(!r.activate(5 * AL_EXTENT + 4096, 10).unwrap());
            assert!(r.activate(9 * AL_EXTENT, 4096).unwrap());
            r.mark("b", 0, 4096);
            r.persist_bitmaps().unwrap();
            // dropped without close_clean: a crash
        }
        let r = Replica::open(dir.path(), "v", &create(64 << 20), &peers).unwrap();
        assert_eq!(r.meta.crashed_extents, vec![5, 9]);
        let bm = &r.bitmaps["b"];
        assert_eq!(bm.bytes(), 2 * AL_EXTENT + 4096);
        assert!(bm.is_set(0));
        assert!(bm.is_set(5 * AL_EXTENT / 4096));
    }

    #[test]
    fn a_clean_close_resyncs_nothing_and_bitmaps_survive() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string(), "c".to_string()];
        {
            let mut r = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap();
            r.meta.primary = true;
            r.activate(0, 4096).unwrap();
            r.mark("c", 8192, 1);
            r.close_clean().unwrap();
        }
        let r = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap();
        assert!(r.meta.crashed_extents.is_empty());
        assert_eq!(r.bitmaps["b"].count(), 0);
        assert_eq!(r.bitmaps["c"].count(), 1);
        assert!(r.bitmaps["c"].is_set(2));
    }

    #[test]
    fn an_activity_log_eviction_persists_the_bitmap_first() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string()];
        let size = (AL_SLOTS as u64 + 2) * AL_EXTENT;
        {
            let mut r = Replica::open(dir.path(), "v", &create(size), &peers).unwrap();
            r.meta.primary = true;
            r.save_meta().unwrap();
            r.activate(0, 1).unwrap();
            r.mark("b", 0, 1);
            for e in 1..=AL_SLOTS as u64 {
                r.activate(e * AL_EXTENT, 1).unwrap();
            }
            assert!(!r.al.set.contains(&0));
        }
        let r = Replica::open(dir.path(), "v", &create(size), &peers).unwrap();
        // Extent 0 left the log, but its bit was made durable on the way out.
        assert!(r.bitmaps["b"].is_set(0));
        assert!(!r.meta.crashed_extents.contains(&0));
    }

    #[test]
    fn a_replaced_replica_is_created_again_empty_and_inconsistent() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string()];
        {
            let r = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap();
            assert_eq!((r.meta.disk, r.meta.current), (DiskState::UpToDate, 7));
            r.data().write_all_at(b"old data", 4096).unwrap();
        }
        // Another volume whose name starts with this one's keeps its files.
        Replica::open(dir.path(), "v.bitmap.b", &create(8 << 20), &[]).unwrap();
        let replaced = Create { replaced: 1, ..create(8 << 20) };
        let r = Replica::open(dir.path(), "v", &replaced, &peers).unwrap();
        // The shared initial generation is not claimed: a full sync is due.
        assert_eq!((r.meta.disk, r.meta.current, r.meta.replaced), (DiskState::Inconsistent, 0, 1));
        let mut buf = [0u8; 8];
        r.data().read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [0u8; 8], "the old disk's data is gone");
        assert!(Replica::data_path(dir.path(), "v.bitmap.b").exists());
        drop(r);
        // Reopened at the same number, it is the same replica (not wiped again).
        let r = Replica::open(dir.path(), "v", &replaced, &peers).unwrap();
        assert_eq!((r.meta.disk, r.meta.replaced), (DiskState::Inconsistent, 1));
    }

    #[test]
    fn a_replica_grows_in_place_with_its_data_bitmaps_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string(), "c".to_string()];
        let mut r = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap();
        r.data().write_all_at(b"old data", (8 << 20) - 8).unwrap();
        r.mark("b", (8 << 20) - 4096, 1);
        r.mark("c", 0, 1);
        r.activate(4096, 1).unwrap();
        let logged = r.al.extents();
        // Not smaller: nothing happens.
        assert!(!r.grow(8 << 20).unwrap());
        assert!(!r.grow(4 << 20).unwrap());
        assert!(r.grow(24 << 20).unwrap());
        assert_eq!(r.size(), 24 << 20);
        assert_eq!(std::fs::metadata(Replica::data_path(dir.path(), "v")).unwrap().len(), 24 << 20);
        // The old bytes stay, the new space reads as zeroes.
        let mut buf = [0u8; 8];
        r.data().read_exact_at(&mut buf, (8 << 20) - 8).unwrap();
        assert_eq!(&buf, b"old data");
        let mut tail = vec![1u8; 16 << 20];
        r.data().read_exact_at(&mut tail, 8 << 20).unwrap();
        assert!(tail.iter().all(|b| *b == 0));
        // Bitmaps cover the new size, their old bits kept, the new ones clear.
        for (peer, set) in [("b", (8 << 20) / 4096 - 1), ("c", 0)] {
            let bm = &r.bitmaps[peer];
            assert_eq!((bm.bits(), bm.count(), bm.next_set(0)), ((24 << 20) / 4096, 1, Some(set)), "{peer}");
            assert!(!bm.is_set((8 << 20) / 4096));
        }
        r.mark("b", (24 << 20) - 4096, 4096);
        assert!(r.bitmaps["b"].is_set((24 << 20) / 4096 - 1));
        assert_eq!(r.al.extents(), logged, "the activity log is untouched");
        r.close_clean().unwrap();
        drop(r);
        // The metadata says the new size: reopened at it, all is there.
        let r = Replica::open(dir.path(), "v", &create(24 << 20), &peers).unwrap();
        assert_eq!(r.meta.size, 24 << 20);
        assert_eq!((r.bitmaps["b"].count(), r.bitmaps["c"].count()), (2, 1));
        assert!(r.bitmaps["b"].is_set((24 << 20) / 4096 - 1));
        // The old size is no longer this volume's (a volume never shrinks).
        drop(r);
        let e = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap_err();
        assert!(e.to_string().contains("25165824 bytes"), "{e}");
    }

    #[test]
    fn a_replica_closed_during_a_grow_grows_when_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec!["b".to_string()];
        {
            let mut r = Replica::open(dir.path(), "v", &create(8 << 20), &peers).unwrap();
            r.mark("b", 4096, 1);
            r.close_clean().unwrap();
        }
        // A crash after the file grew but before the metadata did: the same.
        std::fs::OpenOptions::new()
            .write(true)
            .open(Replica::data_path(dir.path(), "v"))
            .unwrap()
            .set_len(12 << 20)
            .unwrap();
        let r = Replica::open(dir.path(), "v", &create(16 << 20), &peers).unwrap();
        assert_eq!(r.size(), 16 << 20);
        assert_eq!(std::fs::metadata(Replica::data_path(dir.path(), "v")).unwrap().len(), 16 << 20);
        let bm = &r.bitmaps["b"];
        assert_eq!((bm.bits(), bm.count()), ((16 << 20) / 4096, 1));
        assert!(r.meta.crashed_extents.is_empty(), "a grow is no crash: nothing to resync");
    }

    #[test]
    fn a_bitmap_grows_with_its_last_partial_word() {
        let mut bm = Bitmap::new(100 * 4096, 4096);
        bm.set(99);
        bm.grow(50 * 4096); // never shrinks
        assert_eq!(bm.bits(), 100);
        bm.grow(200 * 4096);
        assert_eq!((bm.bits(), bm.count(), bm.words().len()), (200, 1, 4));
        assert_eq!(bm.next_set(100), None);
        bm.set(199);
        assert_eq!(bm.next_set(100), Some(199));
    }

    #[test]
    fn a_replica_of_another_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Replica::open(dir.path(), "v", &create(8 << 20), &[]).unwrap();
        let other = Create { volume_id: "v2".into(), ..create(8 << 20) };
        let e = Replica::open(dir.path(), "v", &other, &[]).unwrap_err();
        assert!(e.to_string().contains("expected v2"), "{e}");
    }
}
