//! The data plane's vocabulary as the replicated state records it: how a
//! replica is written to (`ReplicationMode`), what its disk holds
//! (`DiskState`), and what to do when two replicas diverged
//! (`SplitBrainPolicy`). Pure: no I/O.
//!
//! The control plane keeps, per volume and replica node, whether that
//! replica's disk is `UpToDate`: a primary records a sync replica as
//! `Outdated` *before* it acknowledges a write the replica did not get, so
//! the scheduler never fails a group over to a node missing acknowledged data.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a secondary receives writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// A write is acknowledged once this replica applied it (DRBD protocol C);
    /// a FLUSH or FUA once it is durable there.
    #[default]
    Sync,
    /// Acknowledged after the local write and shipped in order from a bounded
    /// buffer; when the buffer fills, the peer is tracked in the bitmap
    /// (`Ahead`) and caught up later.
    Async,
}

/// What a replica's disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskState {
    /// Holds every acknowledged write of the current generation.
    UpToDate,
    /// Being written by a resync: not usable as a source.
    Inconsistent,
    /// Consistent but missing writes made since it was disconnected.
    Outdated,
    /// No local disk (detached after I/O errors, or not yet created).
    Diskless,
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Diskless => "Diskless",
        };
        f.write_str(s)
    }
}

/// What happens when both sides changed the data since their common
/// ancestor generation. `discard-*` names the side whose changes are thrown
/// away; that side then resyncs from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Stay disconnected, raise an alert, wait for the operator.
    #[default]
    Disconnect,
    /// The side that became primary last loses.
    DiscardYoungerPrimary,
    /// The side that became primary first loses.
    DiscardOlderPrimary,
    /// If one side wrote nothing since the split, it loses; otherwise
    /// disconnect.
    DiscardZeroChanges,
    /// The side with fewer changed blocks loses (a tie: the younger primary).
    DiscardLeastChanges,
    /// The current primary's changes are discarded (it must be demoted
    /// first: a serving primary is never overwritten).
    DiscardLocal,
    /// The reconnecting secondary's changes are discarded.
    DiscardRemote,
}

impl SplitBrainPolicy {
    pub const ALL: [SplitBrainPolicy; 7] = [
        SplitBrainPolicy::Disconnect,
        SplitBrainPolicy::DiscardYoungerPrimary,
        SplitBrainPolicy::DiscardOlderPrimary,
        SplitBrainPolicy::DiscardZeroChanges,
        SplitBrainPolicy::DiscardLeastChanges,
        SplitBrainPolicy::DiscardLocal,
        SplitBrainPolicy::DiscardRemote,
    ];
}

/// Which replica serves a client read on the primary (DRBD's
/// `read-balancing`). Only the primary's own disk and peers that are sync,
/// in sync and streaming (so `UpToDate`) are candidates; with none of those,
/// reads are local. A read sent to a peer goes on its link after every write
/// enqueued before it, so it never returns data older than an acknowledged
/// write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReadBalancing {
    /// The local disk, always (peers only once it is detached).
    #[default]
    PreferLocal,
    /// The local disk and each eligible peer in turn.
    RoundRobin,
    /// Whichever has the fewest requests in flight: the local disk's reads
    /// against a peer's frames on its link (a tie stays local).
    LeastPending,
    /// The local disk until it has `READ_CONGESTED` reads in flight, then
    /// the least busy peer.
    WhenCongestedRemote,
    /// By extent: `offset / READ_STRIPE_BYTES` picks the local disk or a
    /// peer, round the candidates (each serves its own stripes).
    Striping,
}

impl ReadBalancing {
    pub const ALL: [ReadBalancing; 5] = [
        ReadBalancing::PreferLocal,
        ReadBalancing::RoundRobin,
        ReadBalancing::LeastPending,
        ReadBalancing::WhenCongestedRemote,
        ReadBalancing::Striping,
    ];
}

/// How a resync shares the replication link with the application's writes
/// (a volume's `resync.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResyncMode {
    /// DRBD's dynamic resync controller: the resync takes what the
    /// application leaves, between `resync.min_rate` and `rate`.
    #[default]
    Adaptive,
    /// A fixed window (smaller while the application writes), at up to
    /// `rate`: what every volume did before the adaptive mode.
    Fixed,
}

impl ResyncMode {
    pub const ALL: [ResyncMode; 2] = [ResyncMode::Adaptive, ResyncMode::Fixed];
}

/// A volume's resync settings: `{"mode": "adaptive", "min_rate": "4MiB"}`.
/// The ceiling is the volume's `rate` in both modes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncSpec {
    #[serde(default)]
    pub mode: ResyncMode,
    /// Adaptive: bytes per second the resync keeps however busy the
    /// application is (DRBD's `c-min-rate`); none: 4MiB/s, or `rate` if
    /// lower. Kept as written.
    #[serde(default, deserialize_with = "de::opt_size")]
    pub min_rate: Option<String>,
}

/// The adaptive resync's minimum rate unless set: 4 MiB/s (a 1 GiB resync
/// under a saturating application still ends within about four minutes).
pub const DEFAULT_RESYNC_MIN_RATE: u64 = 4 << 20;

/// The stripe of `striping` read balancing: 1 MiB (a multiple of every
/// bitmap granularity, large enough that sequential reads stay on one
/// replica for a while).
pub const READ_STRIPE_BYTES: u64 = 1 << 20;
/// Local reads in flight from which `when-congested-remote` reads from a
/// peer.
pub const READ_CONGESTED: u64 = 8;

/// What a volume's primary last recorded of a replica's out-of-sync bytes
/// (its bitmap for that replica), and when: what a forced promotion of that
/// replica gives up is thereby known even once the primary is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutOfSync {
    pub bytes: u64,
    /// The primary's clock, ms since the Unix epoch.
    pub at_ms: u64,
}

/// What a forced promotion gave up, as the operator was shown it in the
/// dry run: carried by the command so its event says it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PromotionRpo {
    /// Bytes the old primary last recorded out of sync for this replica.
    pub out_of_sync_bytes: u64,
    /// When it recorded them (writes after that are not counted).
    #[serde(default)]
    pub recorded_ms: Option<u64>,
    /// When the replica last received a write (its data file's mtime).
    #[serde(default)]
    pub newest_write_ms: Option<u64>,
    /// The replica's data generation (hex).
    #[serde(default)]
    pub generation: Option<String>,
}

/// Smallest unit of a volume: its size is a multiple of it.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest volume accepted (16 TiB).
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Replicas of a volume, the primary included.
pub const MAX_REPLICAS: u8 = 3;
/// Bitmap granularity bounds (one bit covers this many bytes) and default.
pub const MIN_GRANULARITY: u64 = 4096;
pub const MAX_GRANULARITY: u64 = 1 << 20;
pub const DEFAULT_GRANULARITY: u64 = 4096;
/// The slowest replication bandwidth limit accepted, bytes per second.
pub const MIN_RATE: u64 = 64 << 10;

const UNITS: &str = "B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)";

/// Parses a byte count: a number with an optional unit, `"1GiB"`,
/// `"512 MiB"`, `"1.5TiB"`, `"10GB"`, `"4096"`. Binary units (`KiB`…`TiB`)
/// are powers of 1024, decimal ones (`KB`…`TB`) powers of 1000; units are
/// case-insensitive. A fraction must come out a whole number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size: a number with an optional unit ({UNITS}), e.g. \"1GiB\"");
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let mult: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if frac.len() > 12 {
        return Err(format!("{s:?} has too many decimals"));
    }
    let too_large = || format!("{s:?} is too large");
    let scale = 10u128.pow(frac.len() as u32);
    let int: u128 = int.parse().map_err(|_| too_large())?;
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| bad())? };
    let scaled = int
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac))
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

/// A byte count for people: `1GiB`, `1536MiB`, `4096B` (the largest binary
/// unit that divides it exactly).
pub fn format_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}

/// A replicated block volume, as a group's resource defines it:
/// `{"name": "data", "type": "volume", "size": "1GiB", "mode": "sync"}`.
/// The volume is named by its resource; its replicas live on the first
/// `replicas` nodes of the group's `nodes` list (see
/// [`crate::group::replica_nodes`]). Sizes are kept as written (a string, or
/// a JSON number of bytes); the accessors parse them, and validation refuses
/// any that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// `"1GiB"`, `"500MB"`, or bytes: > 0, a multiple of 4096, at most 16 TiB.
    #[serde(deserialize_with = "de::size")]
    pub size: String,
    /// How secondaries receive writes, unless `modes` says otherwise.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Per replica node: its mode whenever it is a secondary.
    #[serde(default)]
    pub modes: std::collections::BTreeMap<String, ReplicationMode>,
    /// Copies of the data, the primary's included: 1 to 3.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// What to do when two replicas changed since their common generation.
    #[serde(default)]
    pub split_brain: SplitBrainPolicy,
    /// Bandwidth limit of resync and async catch-up, bytes per second
    /// (`"100MiB"`, `"100MiB/s"`); none is unlimited.
    #[serde(default, deserialize_with = "de::opt_size")]
    pub rate: Option<String>,
    /// Bytes covered by one bit of the out-of-sync bitmap: a power of two
    /// from 4KiB to 1MiB (default 4KiB).
    #[serde(default, deserialize_with = "de::opt_size")]
    pub granularity: Option<String>,
    /// Also export the volume over NBD on TCP 127.0.0.1 (besides its Unix
    /// socket).
    #[serde(default)]
    pub nbd_tcp: bool,
    /// Whether an asynchronous secondary may be promoted when the primary
    /// fails: it is recorded `UpToDate` while it streams in order, so a
    /// failover can pick it — losing the writes it had not received yet.
    /// Off: async secondaries are never failover targets (no data loss, but
    /// the group waits for the primary's node).
    #[serde(default)]
    pub async_failover: bool,
    /// Which replica serves reads on the primary (see [`ReadBalancing`]);
    /// may change while the volume runs.
    #[serde(default)]
    pub read_balancing: ReadBalancing,
    /// How a resync shares the link with the application (see
    /// [`ResyncSpec`]); may change while the volume runs.
    #[serde(default)]
    pub resync: ResyncSpec,
}

fn default_replicas() -> u8 {
    2
}

impl VolumeSpec {
    /// The size in bytes (0 if it does not parse: validation refuses those).
    pub fn size_bytes(&self) -> u64 {
        parse_bytes(&self.size).unwrap_or(0)
    }

    /// The bandwidth limit in bytes per second; `None` is unlimited.
    pub fn rate_bytes(&self) -> Option<u64> {
        self.rate.as_deref().and_then(|r| parse_rate(r).ok())
    }

    /// The adaptive resync's minimum rate in bytes per second: as set, else
    /// [`DEFAULT_RESYNC_MIN_RATE`]; never above `rate`.
    pub fn resync_min_rate(&self) -> u64 {
        let set = self.resync.min_rate.as_deref().and_then(|r| parse_rate(r).ok());
        let min = set.unwrap_or(DEFAULT_RESYNC_MIN_RATE);
        self.rate_bytes().map_or(min, |r| min.min(r))
    }

    /// Bytes per bitmap bit (4096 unless set).
    pub fn granularity_bytes(&self) -> u64 {
        self.granularity.as_deref().and_then(|g| parse_bytes(g).ok()).unwrap_or(DEFAULT_GRANULARITY)
    }

    /// How `node` receives writes while it is a secondary.
    pub fn mode_for(&self, node: &str) -> ReplicationMode {
        self.modes.get(node).copied().unwrap_or(self.mode)
    }

    /// Checks the volume's own fields against the group's `nodes`. On error:
    /// the offending field (relative to the resource: `size`,
    /// `modes.node9`, …) and why.
    pub fn check(&self, group_nodes: &[String]) -> Result<(), (String, String)> {
        let size = parse_bytes(&self.size).map_err(|e| ("size".to_string(), e))?;
        if size == 0 {
            return Err(("size".into(), "must be larger than 0".into()));
        }
        if !size.is_multiple_of(BLOCK_BYTES) {
            return Err(("size".into(), format!("{size} bytes is not a multiple of {BLOCK_BYTES} (4KiB)")));
        }
        if size > MAX_VOLUME_BYTES {
            return Err(("size".into(), format!("{} is larger than the limit of 16TiB", self.size)));
        }
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(("replicas".into(), format!("1 to {MAX_REPLICAS} (the primary included)")));
        }
        if group_nodes.len() < self.replicas as usize {
            return Err((
                "replicas".into(),
                format!(
                    "{} replicas need {} nodes in the group's `nodes`, which lists {}",
                    self.replicas,
                    self.replicas,
                    group_nodes.len()
                ),
            ));
        }
        let replicas = &group_nodes[..self.replicas as usize];
        if let Some(n) = self.modes.keys().find(|n| !replicas.contains(n)) {
            return Err((
                format!("modes.{n}"),
                format!(
                    "{n} holds no replica: the replicas are the first {} nodes: {}",
                    self.replicas,
                    replicas.join(", ")
                ),
            ));
        }
        if let Some(r) = &self.rate {
            let rate = parse_rate(r).map_err(|e| ("rate".to_string(), e))?;
            if rate < MIN_RATE {
                return Err(("rate".into(), format!("at least {} per second", format_bytes(MIN_RATE))));
            }
        }
        if let Some(m) = &self.resync.min_rate {
            let min = parse_rate(m).map_err(|e| ("resync.min_rate".to_string(), e))?;
            if min < MIN_RATE {
                return Err(("resync.min_rate".into(), format!("at least {} per second", format_bytes(MIN_RATE))));
            }
            if let Some(rate) = self.rate_bytes().filter(|r| min > *r) {
                return Err((
                    "resync.min_rate".into(),
                    format!(
                        "{m:?} is above the volume's rate of {} per second: lower it, or raise `rate`",
                        format_bytes(rate)
                    ),
                ));
            }
            if self.resync.mode == ResyncMode::Fixed {
                return Err((
                    "resync.min_rate".into(),
                    "only an adaptive resync has a minimum rate: remove it, or set `resync.mode` to \"adaptive\""
                        .into(),
                ));
            }
        }
        if let Some(g) = &self.granularity {
            let gran = parse_bytes(g).map_err(|e| ("granularity".to_string(), e))?;
            if !gran.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&gran) {
                return Err(("granularity".into(), format!("{g:?} is not a power of two from 4KiB to 1MiB")));
            }
        }
        Ok(())
    }
}

/// A bandwidth: a size, optionally followed by `/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    parse_bytes(t.strip_suffix("/s").unwrap_or(t))
}

/// Sizes arrive as strings (`"1GiB"`) or as JSON numbers of bytes; both are
/// kept as strings, so that a definition reads back as it was written.
mod de {
    use serde::de::{self, Deserializer, Visitor};

    struct SizeVisitor;

    impl<'de> Visitor<'de> for SizeVisitor {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size such as \"1GiB\", or a number of bytes")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    struct OptSizeVisitor;

    impl<'de> Visitor<'de> for OptSizeVisitor {
        type Value = Option<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size such as \"1GiB\", a number of bytes, or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            size(d).map(Some)
        }
    }

    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(OptSizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        for (s, n) in [
            ("4096", 4096),
            ("4096B", 4096),
            ("4KiB", 4096),
            ("1GiB", 1 << 30),
            ("1 gib", 1 << 30),
            ("512MiB", 512 << 20),
            ("1.5GiB", 3 << 29),
            ("2TiB", 2 << 40),
            ("16TiB", MAX_VOLUME_BYTES),
            ("10GB", 10_000_000_000),
            ("1.5KB", 1500),
            ("  7MB ", 7_000_000),
        ] {
            assert_eq!(parse_bytes(s), Ok(n), "{s}");
        }
        for s in ["", "abc", "GiB", "1.5", "1.5B", "0.1KiB", "1 GiG", "1K", "-1", "1e9", "1..5MiB", ".5MiB"] {
            assert!(parse_bytes(s).is_err(), "{s:?} should not parse");
        }
        assert!(parse_bytes("99999999999999999999TiB").unwrap_err().contains("too large"));
        assert_eq!(parse_rate("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_rate("100MiB"), Ok(100 << 20));
    }

    #[test]
    fn sizes_format_back_in_the_largest_exact_unit() {
        assert_eq!(format_bytes(1 << 30), "1GiB");
        assert_eq!(format_bytes(1536 << 20), "1536MiB");
        assert_eq!(format_bytes(4097), "4097B");
        assert_eq!(format_bytes(0), "0B");
    }
}
