//! The replication handshake's check (not NBD's: see `nbd::handshake`), one
//! function for both ends.
//!
//! When a primary connects to a secondary, the primary sends a [`Hello`] and
//! the secondary answers a [`HelloReply`]. Both ends hold both messages at
//! the moment they decide (the secondary before it sends its reply), and both
//! run [`check`] on them: so they refuse the same things (another volume,
//! another size or granule, a stale epoch) and reach the same [`Decision`]
//! on which way data flows.
//!
//! Sizes: a volume grows online (see `engine`), so the two may differ for a
//! moment. A secondary smaller than the primary grows to the primary's size
//! before it replies ([`grow_first`]): the primary's size comes from the
//! replicated definition, which only ever grows. A secondary larger than
//! the primary is refused ([`Refusal::PrimaryNotGrown`]) until the primary
//! has grown too: nothing past the primary's end could be resynced.
//!
//! Pure: no I/O, no clock, no locks. It must never touch a replica: the
//! engine acts on what it answers.

use tandem_raft::volume::{DiskState, SplitBrainPolicy};
use thiserror::Error;

use super::generation::{self, Decision, Side, SideView};
use super::wire::{Hello, HelloReply};

/// Which end checks, with what only that end knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The primary, checking the secondary's reply to its Hello.
    Primary,
    /// The secondary, checking a Hello against the reply it is about to send.
    Secondary {
        /// This replica is primary itself: it follows no one.
        primary_here: bool,
        /// The Hello's node is one of this volume's replicas.
        knows_primary: bool,
    },
}

/// What makes one replica's copy the same volume as another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub volume_id: String,
    pub size: u64,
    pub granule: u32,
}

/// Why a connection is refused before any data flows. The texts reach the
/// operator (a link's `last_error`, the secondary's log).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The secondary refused the Hello (seen by the primary).
    #[error("refused: {reason}")]
    ByPeer { reason: String },
    /// The secondary is primary itself.
    #[error("{node} is primary for {volume}")]
    PrimaryHere { node: String, volume: String },
    /// The two replicas hold different volumes, or the same one with a
    /// different size or granule.
    #[error("{}", mismatch_text(*seen_from, primary, secondary))]
    VolumeMismatch { seen_from: Side, primary: Identity, secondary: Identity },
    /// The primary's epoch is older than one the secondary has seen.
    #[error("stale epoch {offered} < {seen} already seen")]
    StaleEpoch { offered: u64, seen: u64 },
    /// The secondary has grown and the primary not yet.
    #[error("the secondary has grown to {secondary} bytes, the primary has {primary}: they connect once the primary has grown too")]
    PrimaryNotGrown { primary: u64, secondary: u64 },
    /// The Hello comes from a node that holds no replica of this volume.
    #[error("{node} is not a replica of {volume}")]
    NotAReplica { node: String, volume: String },
}

fn mismatch_text(seen_from: Side, primary: &Identity, secondary: &Identity) -> String {
    match seen_from {
        Side::Primary => format!(
            "peer holds volume {} ({} bytes), expected {} ({} bytes)",
            secondary.volume_id, secondary.size, primary.volume_id, primary.size
        ),
        Side::Secondary => format!(
            "volume mismatch: {} ({} bytes) here, {} ({} bytes) offered",
            secondary.volume_id, secondary.size, primary.volume_id, primary.size
        ),
    }
}

/// The handshake check: the refusal, or which way data flows (which may
/// still be "it does not": see [`stop_reason`]). `reply` is the secondary's
/// answer; at the secondary's end its `accepted` and `reason` are ignored
/// (they are what this check fills in).
pub fn check(end: End, hello: &Hello, reply: &HelloReply) -> Result<Decision, Refusal> {
    let primary = Identity { volume_id: hello.volume_id.clone(), size: hello.size, granule: hello.granule };
    let secondary = Identity { volume_id: reply.volume_id.clone(), size: reply.size, granule: reply.granule };
    match end {
        End::Primary if !reply.accepted => {
            return Err(Refusal::ByPeer { reason: reply.reason.clone().unwrap_or_default() });
        }
        End::Secondary { primary_here: true, .. } => {
            return Err(Refusal::PrimaryHere { node: reply.node.clone(), volume: hello.volume.clone() });
        }
        _ => {}
    }
    if primary.volume_id == secondary.volume_id && primary.granule == secondary.granule && primary.size < secondary.size
    {
        return Err(Refusal::PrimaryNotGrown { primary: primary.size, secondary: secondary.size });
    }
    if primary != secondary {
        let seen_from = match end {
            End::Primary => Side::Primary,
            End::Secondary { .. } => Side::Secondary,
        };
        return Err(Refusal::VolumeMismatch { seen_from, primary, secondary });
    }
    if hello.epoch < reply.epoch_seen {
        return Err(Refusal::StaleEpoch { offered: hello.epoch, seen: reply.epoch_seen });
    }
    if let End::Secondary { knows_primary: false, .. } = end {
        return Err(Refusal::NotAReplica { node: hello.node.clone(), volume: hello.volume.clone() });
    }
    Ok(decide(hello, reply))
}

/// The size a secondary grows to before it replies (at its end of the
/// handshake): the primary's, when the secondary is smaller and otherwise
/// passes the check. Growing is always safe (the new space reads as zeroes
/// on every replica), even if the decision then stops the data.
pub fn grow_first(end: End, hello: &Hello, reply: &HelloReply) -> Option<u64> {
    if hello.size <= reply.size {
        return None;
    }
    let grown = HelloReply { size: hello.size, ..reply.clone() };
    check(end, hello, &grown).is_ok().then_some(hello.size)
}

/// Whether the secondary follows the primary under `decision` (data flows,
/// or there is nothing to send).
pub fn follows(decision: Decision) -> bool {
    stop_reason(decision).is_none()
}

/// Why no data flows under `decision`, and whether that is a split brain
/// (an alert, parked until resolved); none when the secondary follows.
pub fn stop_reason(decision: Decision) -> Option<(&'static str, bool)> {
    match decision {
        Decision::InSync
        | Decision::Incremental
        | Decision::Full
        | Decision::SplitBrain { loser: Some(Side::Secondary) } => None,
        Decision::SplitBrain { loser: Some(Side::Primary) } => {
            Some(("split brain: the policy discards this primary's changes; demote it, then resolve", true))
        }
        Decision::SplitBrain { loser: None } => {
            Some(("split brain: both sides changed since their common generation; resolve by hand", true))
        }
        Decision::Unrelated => Some(("split brain: the replicas share no generation; resolve by hand", true)),
        Decision::PrimaryStale => Some(("the peer holds newer data: this primary is stale", false)),
    }
}

/// The connect decision both ends compute from the same two views.
///
/// One rule on top of the generations: a primary whose epoch is newer than
/// any the secondary has seen was promoted by the control plane as an
/// `UpToDate` replica, so it holds every acknowledged write; whatever the
/// secondary has that it lacks was never acknowledged (it came from a
/// primary of an older epoch, in flight when that one was deposed). Such a
/// secondary is overwritten: the union of both bitmaps after a split, a full
/// sync when the lineage is lost. Equal epochs (an operator's doing, or a
/// disaster-recovery copy promoted by hand) go to the split-brain policy.
fn decide(hello: &Hello, reply: &HelloReply) -> Decision {
    let d = decide_by_generations(hello, reply);
    // After a forced promotion the new primary lacks acknowledged writes
    // by the operator's choice: a replica that followed no primary since
    // (the old primary, typically) keeps its say through the policy.
    let since_forced = hello.forced_epoch == 0 || reply.epoch_seen > hello.forced_epoch;
    if hello.epoch > reply.epoch_seen && since_forced {
        match d {
            Decision::SplitBrain { .. } => return Decision::SplitBrain { loser: Some(Side::Secondary) },
            Decision::Unrelated if hello.generation.current != 0 => return Decision::Full,
            _ => {}
        }
    }
    d
}

fn decide_by_generations(hello: &Hello, reply: &HelloReply) -> Decision {
    let forced_secondary_loses = hello.discard_secondary;
    let policy = hello.split_brain;
    let primary = SideView {
        gens: hello.generation,
        primary_since_ms: hello.primary_since_ms,
        changed_blocks: hello.changed_blocks,
        disk: DiskState::UpToDate,
    };
    let secondary = SideView {
        gens: reply.generation,
        primary_since_ms: reply.primary_since_ms,
        changed_blocks: reply.changed_blocks,
        disk: reply.disk,
    };
    let policy = if forced_secondary_loses { SplitBrainPolicy::DiscardRemote } else { policy };
    let d = generation::decide(&primary, &secondary, policy);
    if forced_secondary_loses && matches!(d, Decision::Unrelated) {
        // The operator chose: the peer's data goes, all of it.
        return Decision::Full;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::generation::Generations;
    use crate::volume::wire::PROTOCOL;
    use tandem_raft::volume::ReplicationMode;

    const X: u64 = 0x10;
    const Y: u64 = 0x20;
    const Z: u64 = 0x30;

    const SECONDARY: End = End::Secondary { primary_here: false, knows_primary: true };

    fn gens(current: u64, bitmap: u64, history: [u64; 2]) -> Generations {
        Generations { current, bitmap, history }
    }

    /// n1, primary under epoch 6, offers volume `vid` (1 MiB, 4 KiB granule)
    /// at generation X, in sync with the peer.
    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL,
            volume: "data".into(),
            volume_id: "vid".into(),
            size: 1 << 20,
            granule: 4096,
            node: "n1".into(),
            epoch: 6,
            primary_since_ms: 2_000,
            generation: gens(X, 0, [0, 0]),
            changed_blocks: 0,
            crashed_extents: Vec::new(),
            mode: ReplicationMode::Sync,
            split_brain: SplitBrainPolicy::Disconnect,
            discard_secondary: false,
            forced_epoch: 0,
        }
    }

    /// n2's answer: the same volume at generation X, epoch 6 seen.
    fn reply() -> HelloReply {
        HelloReply {
            accepted: true,
            reason: None,
            node: "n2".into(),
            volume_id: "vid".into(),
            size: 1 << 20,
            granule: 4096,
            disk: DiskState::UpToDate,
            primary_since_ms: 1_000,
            generation: gens(X, 0, [0, 0]),
            changed_blocks: 0,
            crashed_extents: Vec::new(),
            epoch_seen: 6,
            replaced: 0,
        }
    }

    /// Both ends' answers, which must be the same refusal or decision
    /// (except the refusals only one end can see).
    fn both(h: &Hello, r: &HelloReply) -> (Result<Decision, String>, Result<Decision, String>) {
        let p = check(End::Primary, h, r).map_err(|e| e.to_string());
        let s = check(SECONDARY, h, r).map_err(|e| e.to_string());
        (p, s)
    }

    #[test]
    fn the_same_volume_in_sync_is_accepted_by_both_ends() {
        assert_eq!(both(&hello(), &reply()), (Ok(Decision::InSync), Ok(Decision::InSync)));
    }

    #[test]
    fn another_volume_is_refused_by_both_ends() {
        let r = HelloReply { volume_id: "other".into(), ..reply() };
        let (p, s) = both(&hello(), &r);
        assert_eq!(p.unwrap_err(), "peer holds volume other (1048576 bytes), expected vid (1048576 bytes)");
        assert_eq!(s.unwrap_err(), "volume mismatch: other (1048576 bytes) here, vid (1048576 bytes) offered");
    }

    #[test]
    fn a_smaller_secondary_that_did_not_grow_is_refused_by_both_ends() {
        // (It grows first, [`grow_first`]; this is when it could not.)
        let r = HelloReply { size: 512 << 10, ..reply() };
        let (p, s) = both(&hello(), &r);
        assert_eq!(p.unwrap_err(), "peer holds volume vid (524288 bytes), expected vid (1048576 bytes)");
        assert_eq!(s.unwrap_err(), "volume mismatch: vid (524288 bytes) here, vid (1048576 bytes) offered");
    }

    #[test]
    fn a_smaller_secondary_grows_first_and_a_larger_one_waits_for_the_primary() {
        // The primary grew to 2 MiB, the secondary has 1 MiB: it grows first.
        let h = Hello { size: 2 << 20, ..hello() };
        assert_eq!(grow_first(SECONDARY, &h, &reply()), Some(2 << 20));
        let grown = HelloReply { size: 2 << 20, ..reply() };
        assert_eq!(both(&h, &grown), (Ok(Decision::InSync), Ok(Decision::InSync)));
        // Not for a primary it would refuse anyway, nor when not smaller.
        assert_eq!(grow_first(SECONDARY, &Hello { epoch: 5, ..h.clone() }, &reply()), None);
        assert_eq!(grow_first(SECONDARY, &Hello { volume_id: "other".into(), ..h.clone() }, &reply()), None);
        let primary_here = End::Secondary { primary_here: true, knows_primary: true };
        assert_eq!(grow_first(primary_here, &h, &reply()), None);
        assert_eq!(grow_first(SECONDARY, &hello(), &reply()), None);
        assert_eq!(grow_first(SECONDARY, &hello(), &grown), None);
        // The secondary grew first (its node saw the new size): both ends
        // wait for the primary to grow.
        let (p, s) = both(&hello(), &grown);
        let why = "the secondary has grown to 2097152 bytes, the primary has 1048576: \
                   they connect once the primary has grown too";
        assert_eq!((p.unwrap_err(), s.unwrap_err()), (why.to_string(), why.to_string()));
        // Another volume that happens to be larger is still a mismatch.
        let other = HelloReply { volume_id: "other".into(), ..grown };
        assert!(matches!(check(End::Primary, &hello(), &other), Err(Refusal::VolumeMismatch { .. })));
    }

    #[test]
    fn another_granule_is_refused_by_both_ends() {
        let r = HelloReply { granule: 512, ..reply() };
        let (p, s) = both(&hello(), &r);
        assert!(matches!(
            check(End::Primary, &hello(), &r),
            Err(Refusal::VolumeMismatch { seen_from: Side::Primary, .. })
        ));
        assert!(p.unwrap_err().starts_with("peer holds volume vid"));
        assert!(s.unwrap_err().starts_with("volume mismatch: vid"));
    }

    #[test]
    fn a_stale_epoch_is_refused_by_both_ends() {
        let h = Hello { epoch: 5, ..hello() };
        let (p, s) = both(&h, &reply());
        assert_eq!(p.unwrap_err(), "stale epoch 5 < 6 already seen");
        assert_eq!(s.unwrap_err(), "stale epoch 5 < 6 already seen");
    }

    #[test]
    fn a_secondary_that_is_primary_refuses_first() {
        let end = End::Secondary { primary_here: true, knows_primary: true };
        let e = check(end, &hello(), &reply()).unwrap_err();
        assert_eq!(e.to_string(), "n2 is primary for data");
        // Ahead of every other reason.
        let stale = Hello { epoch: 1, volume_id: "other".into(), ..hello() };
        assert_eq!(check(end, &stale, &reply()), Err(e));
    }

    #[test]
    fn a_stranger_is_refused_by_the_secondary() {
        let end = End::Secondary { primary_here: false, knows_primary: false };
        let e = check(end, &hello(), &reply()).unwrap_err();
        assert_eq!(e, Refusal::NotAReplica { node: "n1".into(), volume: "data".into() });
        assert_eq!(e.to_string(), "n1 is not a replica of data");
        // A mismatch or a stale epoch is told first.
        let stale = Hello { epoch: 5, ..hello() };
        assert!(matches!(check(end, &stale, &reply()), Err(Refusal::StaleEpoch { offered: 5, seen: 6 })));
    }

    #[test]
    fn the_primary_hears_the_secondarys_reason() {
        let r = HelloReply {
            accepted: false,
            reason: Some("stale epoch 5 < 6 already seen".into()),
            volume_id: String::new(),
            ..reply()
        };
        let e = check(End::Primary, &hello(), &r).unwrap_err();
        assert_eq!(e.to_string(), "refused: stale epoch 5 < 6 already seen");
        // The secondary's own `accepted` is what it is deciding: not an input.
        assert_eq!(check(SECONDARY, &hello(), &HelloReply { accepted: false, ..reply() }), Ok(Decision::InSync));
    }

    #[test]
    fn a_newer_epoch_is_accepted_and_the_data_flows_from_the_primary() {
        // The primary moved on from Y (which the peer has) to X: incremental.
        let h = Hello { epoch: 7, generation: gens(X, Y, [Y, 0]), changed_blocks: 3, ..hello() };
        let r = HelloReply { generation: gens(Y, 0, [0, 0]), ..reply() };
        assert_eq!(both(&h, &r), (Ok(Decision::Incremental), Ok(Decision::Incremental)));
        // An empty peer gets everything.
        let r = HelloReply { generation: Generations::EMPTY, ..reply() };
        assert_eq!(both(&h, &r), (Ok(Decision::Full), Ok(Decision::Full)));
    }

    #[test]
    fn a_newer_epoch_overwrites_what_the_secondary_alone_has() {
        // Both moved on from Y: a split brain, which a newer epoch settles
        // against the secondary (its extra writes were never acknowledged).
        let h = Hello { epoch: 7, generation: gens(X, Y, [Y, 0]), ..hello() };
        let r = HelloReply { generation: gens(Z, Y, [Y, 0]), epoch_seen: 6, ..reply() };
        let secondary_loses = Decision::SplitBrain { loser: Some(Side::Secondary) };
        assert_eq!(both(&h, &r), (Ok(secondary_loses), Ok(secondary_loses)));
        // At equal epochs, the policy decides (here: stay disconnected).
        let h = Hello { epoch: 6, ..h };
        let stuck = Decision::SplitBrain { loser: None };
        assert_eq!(both(&h, &r), (Ok(stuck), Ok(stuck)));
        assert_eq!(stop_reason(stuck).map(|(_, split)| split), Some(true));
        // Lineage lost: a newer epoch syncs all of it, an equal one refuses.
        let r = HelloReply { generation: gens(Z, 0, [0x99, 0]), ..reply() };
        assert_eq!(check(End::Primary, &Hello { epoch: 7, ..h.clone() }, &r), Ok(Decision::Full));
        assert_eq!(check(End::Primary, &h, &r), Ok(Decision::Unrelated));
        assert!(!follows(Decision::Unrelated));
    }

    #[test]
    fn after_a_forced_promotion_the_old_lineage_keeps_its_say_through_the_policy() {
        // The primary was promoted by force at epoch 6 (Outdated, by the
        // operator's choice); the old primary ran at 5 and has acknowledged
        // writes the new one lacks: a newer epoch settles nothing.
        let h = Hello { epoch: 7, generation: gens(X, Y, [Y, 0]), forced_epoch: 6, ..hello() };
        let old = HelloReply { generation: gens(Z, Y, [Y, 0]), epoch_seen: 5, ..reply() };
        let stuck = Decision::SplitBrain { loser: None };
        assert_eq!(both(&h, &old), (Ok(stuck), Ok(stuck)));
        let lost = HelloReply { generation: gens(Z, 0, [0x99, 0]), ..old.clone() };
        assert_eq!(check(End::Primary, &h, &lost), Ok(Decision::Unrelated));
        // The policy still applies as the operator set it.
        let h2 = Hello { split_brain: SplitBrainPolicy::DiscardRemote, ..h.clone() };
        let secondary_loses = Decision::SplitBrain { loser: Some(Side::Secondary) };
        assert_eq!(both(&h2, &old), (Ok(secondary_loses), Ok(secondary_loses)));
        // A replica that followed a primary since the promotion (epoch 7
        // seen) is back under the epoch rule.
        let since = HelloReply { epoch_seen: 7, ..old };
        assert_eq!(both(&Hello { epoch: 8, ..h }, &since), (Ok(secondary_loses), Ok(secondary_loses)));
    }

    #[test]
    fn an_operator_discard_overwrites_the_secondary() {
        let h = Hello { generation: gens(X, Y, [Y, 0]), discard_secondary: true, ..hello() };
        let r = HelloReply { generation: gens(Z, Y, [Y, 0]), ..reply() };
        assert_eq!(check(SECONDARY, &h, &r), Ok(Decision::SplitBrain { loser: Some(Side::Secondary) }));
        let r = HelloReply { generation: gens(Z, 0, [0x99, 0]), ..reply() };
        assert_eq!(check(SECONDARY, &h, &r), Ok(Decision::Full));
    }

    #[test]
    fn a_stale_primary_is_told_so() {
        // The peer moved on from X, the primary's current.
        let r = HelloReply { generation: gens(Y, 0, [X, 0]), ..reply() };
        assert_eq!(both(&hello(), &r), (Ok(Decision::PrimaryStale), Ok(Decision::PrimaryStale)));
        assert_eq!(
            stop_reason(Decision::PrimaryStale),
            Some(("the peer holds newer data: this primary is stale", false))
        );
        assert!(follows(Decision::SplitBrain { loser: Some(Side::Secondary) }));
        assert!(!follows(Decision::SplitBrain { loser: Some(Side::Primary) }));
    }
}
