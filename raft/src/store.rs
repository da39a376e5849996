//! RocksDB storage for one node: the Raft log, the vote, the state machine,
//! the current snapshot and the node's own identity.
//!
//! Column families: `log` (index, big-endian u64 → JSON entry), `meta` (vote,
//! committed, last purged, identity) and `sm` (applied state and snapshot).
//! Log and vote writes are fsynced before openraft is told they are durable;
//! the state machine is written without fsync because it can always be
//! rebuilt by re-applying the durable log from its last applied id.
//! This module must never interpret commands: `state` does that.

// openraft's StorageError is large and its traits dictate it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership, Vote,
};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, CommandResult, Reply};
use crate::{LogId, NodeId, Peer, StorageError, TypeConfig};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_IDENTITY: &[u8] = b"identity";
const KEY_SUPERSEDED: &[u8] = b"superseded";
const KEY_STATE: &[u8] = b"state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

/// Errors opening or touching the store outside openraft's traits.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB at {path}: {source}")]
    Open { path: String, source: rocksdb::Error },
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt {what} record: {source}")]
    Corrupt { what: &'static str, source: serde_json::Error },
}

/// What a node holds of the Raft log: its last entry, the newest index it
/// knows committed, and the term of its vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeld {
    pub last_index: u64,
    pub last_term: u64,
    pub committed_index: u64,
    pub vote_term: u64,
}

/// Who this node is in which cluster; written once when the node is
/// bootstrapped or adopted, and kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub cluster_id: String,
}

/// The open database, shared by the log store and the state machine.
#[derive(Clone)]
pub struct Db {
    db: Arc<DB>,
    stats: LogStats,
}

/// What the log store measures, for `GET /metrics` (clones share it).
#[derive(Debug, Clone)]
pub struct LogStats {
    /// Seconds each fsynced write of log entries took.
    pub append_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The last committed index openraft saved, plus one (0: none).
    committed: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for LogStats {
    fn default() -> LogStats {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        LogStats {
            // 0.5 ms to about 8 s.
            append_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            committed: Default::default(),
        }
    }
}

impl LogStats {
    /// The last index openraft saved as committed.
    pub fn committed_index(&self) -> Option<u64> {
        self.committed.load(std::sync::atomic::Ordering::Relaxed).checked_sub(1)
    }
}

impl Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.db.path()).finish()
    }
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // A control-plane log is small: keep RocksDB's footprint small too.
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        // Every applied command rewrites the whole state (`sm`): with
        // RocksDB's default 64 MiB memtables per family, the write-ahead log
        // grew past 100 MiB before a flush and filled a small data disk.
        // Small memtables, and a bound on the log that forces their flush.
        opts.set_max_total_wal_size(16 << 20);
        let family = || {
            let mut o = Options::default();
            o.set_write_buffer_size(4 << 20);
            o.set_max_write_buffer_number(2);
            o
        };
        let cfs = [CF_LOG, CF_META, CF_SM].map(|n| ColumnFamilyDescriptor::new(n, family()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Ok(Db { db: Arc::new(db), stats: LogStats::default() })
    }

    /// What the log store measured.
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The three families are created at open: their absence is a bug.
        self.db.cf_handle(name).expect("column family created at open")
    }

    fn get_json<T: for<'a> Deserialize<'a>>(
        &self,
        cf: &str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.db.get_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| StoreError::Corrupt { what, source })
            }
        }
    }

    pub fn identity(&self) -> Result<Option<Identity>, StoreError> {
        self.get_json(CF_META, KEY_IDENTITY, "identity")
    }

    pub fn set_identity(&self, id: &Identity) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(id).map_err(|source| StoreError::Corrupt { what: "identity", source })?;
        self.db.put_cf_opt(self.cf(CF_META), KEY_IDENTITY, bytes, &sync_opts())?;
        Ok(())
    }

    /// Why this node no longer takes part in its cluster (a recovery of the
    /// cluster superseded it), if it was told so. Forgotten by `wipe`.
    pub fn superseded(&self) -> Result<Option<String>, StoreError> {
        self.get_json(CF_META, KEY_SUPERSEDED, "superseded")
    }

    pub fn set_superseded(&self, why: &str) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(why).map_err(|source| StoreError::Corrupt { what: "superseded", source })?;
        self.db.put_cf_opt(self.cf(CF_META), KEY_SUPERSEDED, bytes, &sync_opts())?;
        Ok(())
    }

    /// What this node holds of the Raft log (a recovery reports it).
    pub fn log_held(&self) -> Result<LogHeld, StoreError> {
        let last = match self.db.iterator_cf(self.cf(CF_LOG), IteratorMode::End).next() {
            None => self.get_json::<LogId>(CF_META, KEY_LAST_PURGED, "last purged")?,
            Some(item) => {
                let (_, v) = item?;
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt { what: "log entry", source })?;
                Some(entry.log_id)
            }
        };
        let committed: Option<LogId> = self.get_json(CF_META, KEY_COMMITTED, "committed")?;
        let vote: Option<Vote<NodeId>> = self.get_json(CF_META, KEY_VOTE, "vote")?;
        Ok(LogHeld {
            last_index: last.map_or(0, |l| l.index),
            last_term: last.map_or(0, |l| l.leader_id.term),
            committed_index: committed.map_or(0, |l| l.index),
            vote_term: vote.map_or(0, |v| v.leader_id().term),
        })
    }

    /// Quorum-loss recovery, with Raft stopped on this node: appends a
    /// membership of `node` alone after the last entry, under a term past
    /// every one this node has seen, and votes for `node` in that term. Raft
    /// then starts as the single voter, elects itself, and its first
    /// commit commits every entry it holds. Returns what it held before.
    pub fn force_single_voter(&self, node: NodeId, peer: Peer) -> Result<LogHeld, StoreError> {
        let held = self.log_held()?;
        let term = held.last_term.max(held.vote_term) + 1;
        let membership = openraft::Membership::new(
            vec![std::collections::BTreeSet::from([node])],
            std::collections::BTreeMap::from([(node, peer)]),
        );
        let entry: Entry<TypeConfig> = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, node), held.last_index + 1),
            payload: EntryPayload::Membership(membership),
        };
        let corrupt = |source| StoreError::Corrupt { what: "recovery", source };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_LOG), log_key(entry.log_id.index), serde_json::to_vec(&entry).map_err(corrupt)?);
        let vote = serde_json::to_vec(&Vote::new(term, node)).map_err(corrupt)?;
        batch.put_cf(self.cf(CF_META), KEY_VOTE, vote);
        self.db.write_opt(batch, &sync_opts())?;
        Ok(held)
    }

    /// Forgets everything: the node leaves its cluster and may join another
    /// (under a new id). Only call with no Raft instance running on it.
    pub fn wipe(&self) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for name in [CF_LOG, CF_META, CF_SM] {
            let cf = self.cf(name);
            for item in self.db.iterator_cf(cf, IteratorMode::Start) {
                let (k, _) = item?;
                batch.delete_cf(cf, k);
            }
        }
        self.db.write_opt(batch, &sync_opts())?;
        Ok(())
    }

    /// The log store and state machine openraft drives, plus a read handle
    /// on the applied state for the API.
    pub fn raft_storage(&self) -> Result<(LogStore, StateMachineStore, StateHandle), StoreError> {
        let data: StateMachineData = self.get_json(CF_SM, KEY_STATE, "state machine")?.unwrap_or_default();
        let handle = StateHandle { data: Arc::new(RwLock::new(data)), version: Default::default() };
        let sm = StateMachineStore { db: self.clone(), data: handle.clone() };
        Ok((LogStore { db: self.clone() }, sm, handle))
    }
}

/// The state machine as persisted and as snapshotted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership<NodeId, Peer>,
    pub state: ClusterState,
}

/// Shared read access to the applied state (for stale reads and for the
/// daemon's loops). Writers are only the state machine store.
#[derive(Debug, Clone, Default)]
pub struct StateHandle {
    data: Arc<RwLock<StateMachineData>>,
    /// Counts publications, so that loops can wake on a change.
    version: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateHandle {
    /// A receiver that sees every new publication of the state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// A copy of the applied cluster state.
    pub fn state(&self) -> ClusterState {
        self.read(|d| d.state.clone())
    }

    pub fn read<T>(&self, f: impl FnOnce(&StateMachineData) -> T) -> T {
        // A poisoned lock means a panic while applying: the data is still the
        // last consistent one because apply mutates a copy first.
        let guard = self.data.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    fn replace(&self, data: StateMachineData) {
        {
            let mut guard = self.data.write().unwrap_or_else(|e| e.into_inner());
            *guard = data;
        }
        self.version.send_modify(|v| *v += 1);
    }
}

fn io_err(e: impl std::error::Error + 'static) -> AnyError {
    AnyError::new(&e)
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// The Raft log and vote.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Db,
}

impl LogStore {
    fn meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        self.db.get_json(CF_META, key, "raft meta").map_err(|e| StorageIOError::read(io_err(e)).into())
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StorageIOError::write(io_err(e)))?;
        self.db
            .db
            .put_cf_opt(self.db.cf(CF_META), key, bytes, &sync_opts())
            .map_err(|e| StorageIOError::write(io_err(e)).into())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let cf = self.db.cf(CF_LOG);
        let mut out = Vec::new();
        for item in self.db.db.iterator_cf(cf, IteratorMode::From(&log_key(start), Direction::Forward)) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let Some(idx) = key_index(&k) else { continue };
            if !range.contains(&idx) {
                break;
            }
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_log_at_index(idx, io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.meta(KEY_LAST_PURGED)?;
        let cf = self.db.cf(CF_LOG);
        let last = match self.db.db.iterator_cf(cf, IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(KEY_COMMITTED, &committed)?;
        let next = committed.map_or(0, |c| c.index + 1);
        self.db.stats.committed.store(next, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = self.meta::<Option<LogId>>(KEY_COMMITTED)?.flatten();
        // At start: the metrics show it before the next commit.
        self.db.stats.committed.store(committed.map_or(0, |c| c.index + 1), std::sync::atomic::Ordering::Relaxed);
        Ok(committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.put_cf(cf, log_key(entry.log_id.index), bytes);
        }
        let started = std::time::Instant::now();
        let res = self.db.db.write_opt(batch, &sync_opts());
        self.db.stats.append_seconds.observe(started.elapsed().as_secs_f64());
        callback.log_io_completed(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        res.map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let cf = self.db.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_key(log_id.index), log_key(u64::MAX));
        batch.delete_cf(cf, log_key(u64::MAX));
        self.db.db.write_opt(batch, &sync_opts()).map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two writes leaves
        // extra entries, never a hole.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        let cf = self.db.cf(CF_LOG);
        self.db
            .db
            .delete_range_cf_opt(cf, log_key(0), log_key(log_id.index + 1), &sync_opts())
            .map_err(|e| StorageIOError::write_logs(io_err(e)).into())
    }
}

/// A snapshot as stored: its metadata and the serialized state machine.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Peer>,
    data: Vec<u8>,
}

/// The state machine openraft applies entries to.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    db: Db,
    data: StateHandle,
}

impl StateMachineStore {
    fn persist(&self, data: &StateMachineData) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(data).map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
        self.db
            .db
            .put_cf(self.db.cf(CF_SM), KEY_STATE, bytes)
            .map_err(|e| StorageIOError::write_state_machine(io_err(e)).into())
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        let bytes = serde_json::to_vec(snap).map_err(|e| StorageIOError::write_snapshot(sig.clone(), io_err(e)))?;
        self.db
            .db
            .put_cf_opt(self.db.cf(CF_SM), KEY_SNAPSHOT, bytes, &sync_opts())
            .map_err(|e| StorageIOError::write_snapshot(sig, io_err(e)).into())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = self.data.read(|d| d.clone());
        let bytes = serde_json::to_vec(&data).map_err(|e| StorageIOError::read_state_machine(io_err(e)))?;
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: data.last_applied, last_membership: data.last_membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data: bytes.clone() };
        self.save_snapshot(&stored)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, Peer>), StorageError> {
        Ok(self.data.read(|d| (d.last_applied, d.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Apply to a copy, persist, then publish: readers never see a state
        // that is not on disk, and a failed write publishes nothing.
        let mut next = self.data.read(|d| d.clone());
        let mut replies = Vec::new();
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Ok(Reply::None),
                EntryPayload::Normal(cmd) => {
                    let (cmd, stamp) = cmd.into_parts();
                    next.state.apply_stamped(&cmd, stamp.as_ref())
                }
                EntryPayload::Membership(m) => {
                    next.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(Reply::None)
                }
            };
            replies.push(CommandResult(reply));
        }
        self.persist(&next)?;
        self.data.replace(next);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Peer>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut data: StateMachineData = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        self.save_snapshot(&StoredSnapshot { meta: meta.clone(), data: bytes })?;
        self.persist(&data)?;
        self.data.replace(data);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored: Option<StoredSnapshot> = self
            .db
            .get_json(CF_SM, KEY_SNAPSHOT, "snapshot")
            .map_err(|e| StorageIOError::read_snapshot(None, io_err(e)))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(io_err(e)))?;
            let db = Db::open(dir.path()).map_err(|e| StorageIOError::write(io_err(e)))?;
            let (log, sm, _) = db.raft_storage().map_err(|e| StorageIOError::write(io_err(e)))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's storage conformance suite, against real RocksDB.
    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder)
    }

    #[tokio::test]
    async fn a_recovery_appends_a_single_voter_membership_under_a_new_term() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let (mut log, _, _) = db.raft_storage().unwrap();
        let vote = Vote::new(4, 2);
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 6))).await.unwrap();
        let blank = |index| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), index),
            payload: EntryPayload::Blank,
        };
        for i in 1..=9 {
            db.db.put_cf(db.cf(CF_LOG), log_key(i), serde_json::to_vec(&blank(i)).unwrap()).unwrap();
        }

        let peer = Peer { urls: vec!["https://10.0.0.2:7401".into()] };
        let held = db.force_single_voter(2, peer.clone()).unwrap();
        assert_eq!(held, LogHeld { last_index: 9, last_term: 3, committed_index: 6, vote_term: 4 });
        let after = db.log_held().unwrap();
        assert_eq!((after.last_index, after.last_term, after.vote_term), (10, 5, 5));
        let entries = log.try_get_log_entries(10..11).await.unwrap();
        match &entries[0].payload {
            EntryPayload::Membership(m) => {
                assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![2]);
                assert_eq!(m.get_node(&2), Some(&peer));
            }
            other => panic!("not a membership: {other:?}"),
        }
        // The entries before are untouched.
        assert_eq!(log.try_get_log_entries(1..10).await.unwrap().len(), 9);
    }

    #[test]
    fn identity_survives_reopen_and_wipe_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path()).unwrap();
            assert_eq!(db.identity().unwrap(), None);
            db.set_identity(&Identity { node_id: 7, cluster_id: "c".into() }).unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.identity().unwrap(), Some(Identity { node_id: 7, cluster_id: "c".into() }));
        db.wipe().unwrap();
        assert_eq!(db.identity().unwrap(), None);
    }
}
