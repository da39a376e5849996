//! Data generations and the connect decision (DRBD's UUIDs, simplified).
//!
//! This module owns the bookkeeping that tells, when a primary and a
//! secondary connect, which way data must flow, or that it must not flow at
//! all. It is pure: no I/O, no clock, no locks; the engine persists the
//! [`Generations`] and calls the helpers below at the points named here. It
//! must never move data, choose a primary, or overwrite anything itself: it
//! only answers [`decide`].
//!
//! # Generations
//!
//! A *generation* ([`GenId`]) names the data of a replica while it is being
//! written; `0` means "none". Each replica keeps, for each peer, a
//! [`Generations`]: its own `current` generation and the two before it
//! (`history`, newest first), plus `bitmap`, the generation from which its
//! per-peer bitmap of changed blocks counts (`0` = the bitmap is not in use:
//! the peer has everything).
//!
//! The engine follows these rules:
//!
//! * A brand-new volume created on all its replicas at once gets the same
//!   `current` on each ([`initial_generation`], a deterministic non-zero hash
//!   of the volume id) and they start `UpToDate` without a sync. A replica
//!   added later starts empty (`current = 0`) and needs a full sync.
//! * When a replica is promoted, or loses the connection to a peer while
//!   primary, it starts a new generation. For each peer that does *not*
//!   receive the change in order (disconnected), [`Generations::new_generation`]:
//!   `bitmap = old current` if `bitmap` was 0 (otherwise the bitmap keeps
//!   counting from its older root), `history = [old current, history[0]]`,
//!   `current = fresh`. A connected, in-sync peer instead gets
//!   `NewGeneration` in the replication stream and both ends apply
//!   [`Generations::follow_generation`] (same shift, bitmap untouched).
//! * When a resync to a peer completes, the source sets that peer's
//!   `bitmap = 0` ([`Generations::sync_finished_as_source`]; history keeps
//!   what it had) and the target adopts the source's generations with its own
//!   `bitmap` for the source = 0 ([`Generations::sync_finished_as_target`]).
//! * When a resync starts, the target forgets what it is about to lose
//!   ([`Generations::sync_started_as_target`]): for an incremental resync its
//!   `current` becomes the base the source's bitmap counts from (a split-brain
//!   loser thereby drops its own diverged generation), for a full one
//!   `current = 0`. An interrupted resync then resumes the same way on the
//!   next connect instead of looking like a split brain.
//! * The source clears bits of its bitmap for the target only as the target
//!   acknowledges the blocks, and after a split brain it first takes the union
//!   with the loser's bitmap (sent as `BitmapChunk`s): so "Incremental" always
//!   means "the bits of the primary's bitmap for this peer are all it lacks".
//!
//! # The decision
//!
//! [`decide`] is computed by both ends from the same two [`SideView`]s (the
//! primary's view of the secondary and the secondary's view of the
//! primary), so both reach the same answer. Write `p` and `s` for the
//! primary's and the secondary's generations. The table, first match wins:
//!
//! | # | condition | decision |
//! |---|-----------|----------|
//! | 1 | `p.current == 0`, or the primary's disk is `Inconsistent`/`Diskless` | `Unrelated` (a primary with no usable data is never a source) |
//! | 2 | `s.current == 0`, or the secondary is `Diskless` | `Full` |
//! | 3 | `p.current == s.current` | `InSync`; `Full` if the secondary is `Inconsistent` |
//! | 4 | P ahead and S ahead (below) both hold: a contradictory lineage | `Unrelated` |
//! | 5 | `p.bitmap != 0 && p.bitmap == s.current && s.bitmap == 0` (P ahead, incrementally) | `Incremental` |
//! | 6 | `s.current ∈ p.history` (P ahead, by history) | `Full` |
//! | 7 | `s.bitmap != 0 && s.bitmap == p.current && p.bitmap == 0`, or `p.current ∈ s.history` (S ahead) | `PrimaryStale` |
//! | 8 | `p.bitmap == s.bitmap != 0` (currents differ: both changed since that common generation) | `SplitBrain` (loser from the policy) |
//! | 9 | anything else | `Unrelated` |
//!
//! Notes on the table:
//!
//! * Rules 4–9 are role-free: swapping the sides swaps 5/6 with 7, so
//!   `Incremental`/`Full` become `PrimaryStale` and a split-brain loser
//!   becomes the other side (for the policies that name a side by its
//!   history, not its role).
//! * Ancestry (6, 7) is checked before equal bitmap roots (8): when one
//!   side's current is in the other's history, the other side already
//!   contains that data (a replica that writes without a peer always moves
//!   to a new generation first), so nothing of it would be lost.
//! * An `Inconsistent` secondary (an interrupted resync) is never a source:
//!   equal currents give `Full` (its disk is known damaged, and nothing says
//!   where); rule 5 gives `Incremental` (the base it still names is where the
//!   primary's bitmap counts from, and the bits left are what it lacks);
//!   rule 6 gives `Full`; in a split brain a policy that would discard the
//!   primary's changes gives `loser: None` instead.
//! * `Unrelated` never resyncs automatically; the operator decides.
//!
//! Split-brain policies ([`SplitBrainPolicy`]) name the loser, the side whose
//! changes are thrown away: `Disconnect` → none; `DiscardYoungerPrimary` →
//! the larger `primary_since_ms` (tie → none); `DiscardOlderPrimary` → the
//! smaller (tie → none); `DiscardZeroChanges` → the side with
//! `changed_blocks == 0` if exactly one, the secondary if both (nothing is
//! lost), else none; `DiscardLeastChanges` → fewer `changed_blocks`, a tie
//! → the younger primary, still tied → none; `DiscardLocal` → the primary
//! (the engine refuses to overwrite a serving primary and reports it);
//! `DiscardRemote` → the secondary.

use serde::{Deserialize, Serialize};
use tandem_raft::volume::{DiskState, SplitBrainPolicy};
use thiserror::Error;

/// A data generation id; 0 means none.
pub type GenId = u64;

/// One replica's generations as seen for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Generations {
    /// The generation of the data now (0: empty, needs a full sync).
    pub current: GenId,
    /// Where the bitmap for the peer counts from (0: not in use).
    pub bitmap: GenId,
    /// The two previous currents, newest first (0: none).
    pub history: [GenId; 2],
}

/// A generation id the transitions refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GenerationError {
    #[error("generation 0 is not a generation")]
    Zero,
    #[error("generation {0:#018x} is already in this replica's history")]
    InHistory(GenId),
}

/// The first generation of a volume created on all its replicas at once:
/// a deterministic, non-zero hash of the volume id, so every replica derives
/// the same one and they start `UpToDate` without a sync.
pub fn initial_generation(volume_id: &str) -> GenId {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"tandem initial generation\0");
    h.update(volume_id.as_bytes());
    match h.digest() {
        0 => 1,
        g => g,
    }
}

impl Generations {
    /// An empty replica: needs a full sync.
    pub const EMPTY: Generations = Generations { current: 0, bitmap: 0, history: [0, 0] };

    /// A replica of a volume created on all its replicas at once.
    pub fn new_volume(volume_id: &str) -> Generations {
        Generations { current: initial_generation(volume_id), ..Generations::EMPTY }
    }

    /// Whether this replica holds no data yet.
    pub fn is_empty(&self) -> bool {
        self.current == 0
    }

    /// Whether `id` (non-zero) is one of the previous generations.
    pub fn in_history(&self, id: GenId) -> bool {
        id != 0 && self.history.contains(&id)
    }

    fn unused(&self, id: GenId) -> bool {
        id != 0 && id != self.current && id != self.bitmap && !self.history.contains(&id)
    }

    fn push_history(&mut self, id: GenId) {
        if id != 0 {
            self.history = [id, self.history[0]];
        }
    }

    /// Starts a new generation for a peer that does not receive it in order
    /// (disconnected): the bitmap keeps counting from its root (or starts at
    /// the old current), the old current goes to the history.
    ///
    /// `fresh` should come from the engine's `fresh_generation` (random); a
    /// value that is 0 or already known here (current, bitmap, history) is
    /// bumped to the next unused one, so `current` is never 0 nor in its own
    /// history afterwards.
    /// Returns the generation now current.
    pub fn new_generation(&mut self, fresh: GenId) -> GenId {
        let mut fresh = fresh;
        // At most five values are excluded, so this ends within six steps.
        while !self.unused(fresh) {
            fresh = fresh.wrapping_add(1);
        }
        let old = self.current;
        if self.bitmap == 0 {
            self.bitmap = old;
        }
        self.push_history(old);
        self.current = fresh;
        fresh
    }

    /// Applies an in-stream `NewGeneration`: on a secondary receiving it, and
    /// on the primary's view of a peer that is connected and in sync. The
    /// bitmap is untouched. Receiving the current generation again is a
    /// no-op; 0 or a generation of the history is refused (a peer that sends
    /// one is confused; drop the connection).
    pub fn follow_generation(&mut self, new: GenId) -> Result<(), GenerationError> {
        if new == 0 {
            return Err(GenerationError::Zero);
        }
        if new == self.current {
            return Ok(());
        }
        if self.in_history(new) {
            return Err(GenerationError::InHistory(new));
        }
        let old = self.current;
        self.push_history(old);
        self.current = new;
        Ok(())
    }

    /// On the source, when a resync to this peer completed: the bitmap is no
    /// longer in use. The history keeps what it had.
    pub fn sync_finished_as_source(&mut self) {
        self.bitmap = 0;
    }

    /// On the target, when a resync starts (before the first block is
    /// written): `base` is the generation the source's bitmap counts from for
    /// an incremental resync (the target's current for a plain catch-up, the
    /// common ancestor after a split brain), `None` for a full resync. The
    /// target's own diverged generation is dropped, not kept in the history:
    /// its data is being thrown away.
    pub fn sync_started_as_target(&mut self, base: Option<GenId>) {
        match base {
            Some(base) if base != 0 => {
                self.current = base;
                self.history = self.history.map(|h| if h == base { 0 } else { h });
                if self.history[0] == 0 {
                    self.history = [self.history[1], 0];
                }
            }
            _ => self.current = 0,
        }
        self.bitmap = 0;
    }

    /// On the target, when a resync completed (`ResyncDone`): it adopts the
    /// source's current and history, with its own bitmap for the source 0.
    /// A source current of 0 is refused; a history entry equal to the new
    /// current is dropped.
    pub fn sync_finished_as_target(&mut self, source: &Generations) -> Result<(), GenerationError> {
        if source.current == 0 {
            return Err(GenerationError::Zero);
        }
        let cur = source.current;
        let kept: Vec<GenId> = source.history.iter().copied().filter(|&h| h != 0 && h != cur).collect();
        self.current = cur;
        self.bitmap = 0;
        self.history = [kept.first().copied().unwrap_or(0), kept.get(1).copied().unwrap_or(0)];
        Ok(())
    }
}

/// What one side tells about itself when a primary and a secondary connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideView {
    /// Its generations; `bitmap` is the one for the other side.
    pub gens: Generations,
    /// When it last became primary (0: never).
    pub primary_since_ms: u64,
    /// Bits set in its bitmap for the other side.
    pub changed_blocks: u64,
    /// Its disk.
    pub disk: DiskState,
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Primary,
    Secondary,
}

impl Side {
    /// The other end.
    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Secondary,
            Side::Secondary => Side::Primary,
        }
    }
}

/// Which way data flows when a primary and a secondary connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Same data; nothing to send beyond the primary's bitmap (possibly empty).
    InSync,
    /// The primary is the source: send the bits of the primary's bitmap for this peer.
    Incremental,
    /// The primary is the source of a full sync (the peer is empty, or its
    /// generation is only in the primary's history, or its disk is damaged).
    Full,
    /// The secondary has data the primary lacks: the primary is stale; refuse it.
    PrimaryStale,
    /// Both changed since their common generation; `loser` is the side whose changes
    /// are thrown away (after the policy), None = stay disconnected.
    SplitBrain { loser: Option<Side> },
    /// No usable common ancestor (or the primary has no usable data): never
    /// resync automatically.
    Unrelated,
}

/// How two replicas' generations relate, regardless of roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relation {
    Same,
    /// The first has everything of the second, and more.
    Ahead {
        incremental: bool,
    },
    /// The second has everything of the first, and more.
    Behind,
    Split,
    Unrelated,
}

/// Rules 3-9 of the table, on two non-empty replicas.
fn relation(a: &Generations, b: &Generations) -> Relation {
    if a.current == b.current {
        return Relation::Same;
    }
    let a_incremental = a.bitmap != 0 && a.bitmap == b.current && b.bitmap == 0;
    let b_incremental = b.bitmap != 0 && b.bitmap == a.current && a.bitmap == 0;
    let a_ahead = a_incremental || a.in_history(b.current);
    let b_ahead = b_incremental || b.in_history(a.current);
    match (a_ahead, b_ahead) {
        (true, true) => Relation::Unrelated,
        (true, false) => Relation::Ahead { incremental: a_incremental },
        (false, true) => Relation::Behind,
        (false, false) if a.bitmap != 0 && a.bitmap == b.bitmap => Relation::Split,
        (false, false) => Relation::Unrelated,
    }
}

/// The side a split-brain policy discards, if any.
pub fn split_brain_loser(primary: &SideView, secondary: &SideView, policy: SplitBrainPolicy) -> Option<Side> {
    use std::cmp::Ordering::*;
    // The side with the larger `primary_since_ms`.
    let younger = match primary.primary_since_ms.cmp(&secondary.primary_since_ms) {
        Greater => Some(Side::Primary),
        Less => Some(Side::Secondary),
        Equal => None,
    };
    match policy {
        SplitBrainPolicy::Disconnect => None,
        SplitBrainPolicy::DiscardYoungerPrimary => younger,
        SplitBrainPolicy::DiscardOlderPrimary => younger.map(Side::other),
        SplitBrainPolicy::DiscardZeroChanges => match (primary.changed_blocks == 0, secondary.changed_blocks == 0) {
            (true, false) => Some(Side::Primary),
            (false, true) | (true, true) => Some(Side::Secondary),
            (false, false) => None,
        },
        SplitBrainPolicy::DiscardLeastChanges => match primary.changed_blocks.cmp(&secondary.changed_blocks) {
            Less => Some(Side::Primary),
            Greater => Some(Side::Secondary),
            Equal => younger,
        },
        SplitBrainPolicy::DiscardLocal => Some(Side::Primary),
        SplitBrainPolicy::DiscardRemote => Some(Side::Secondary),
    }
}

fn usable_source(disk: DiskState) -> bool {
    matches!(disk, DiskState::UpToDate | DiskState::Outdated)
}

/// The connect decision (see the module doc for the table). Total: any
/// input gives an answer.
pub fn decide(primary: &SideView, secondary: &SideView, policy: SplitBrainPolicy) -> Decision {
    let (p, s) = (&primary.gens, &secondary.gens);
    if p.current == 0 || !usable_source(primary.disk) {
        return Decision::Unrelated;
    }
    if s.current == 0 || secondary.disk == DiskState::Diskless {
        return Decision::Full;
    }
    let damaged = secondary.disk == DiskState::Inconsistent;
    match relation(p, s) {
        Relation::Same if damaged => Decision::Full,
        Relation::Same => Decision::InSync,
        Relation::Ahead { incremental: true } => Decision::Incremental,
        Relation::Ahead { incremental: false } => Decision::Full,
        Relation::Behind => Decision::PrimaryStale,
        Relation::Split => {
            let loser = match split_brain_loser(primary, secondary, policy) {
                Some(Side::Primary) if damaged => None,
                loser => loser,
            };
            Decision::SplitBrain { loser }
        }
        Relation::Unrelated => Decision::Unrelated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const X: GenId = 0x10;
    const Y: GenId = 0x20;
    const Z: GenId = 0x30;
    const W: GenId = 0x40;
    const V: GenId = 0x50;

    fn g(current: GenId, bitmap: GenId, history: [GenId; 2]) -> Generations {
        Generations { current, bitmap, history }
    }

    fn view(gens: Generations) -> SideView {
        SideView { gens, primary_since_ms: 0, changed_blocks: 0, disk: DiskState::UpToDate }
    }

    fn view_d(gens: Generations, disk: DiskState) -> SideView {
        SideView { disk, ..view(gens) }
    }

    fn d(p: Generations, s: Generations) -> Decision {
        decide(&view(p), &view(s), SplitBrainPolicy::Disconnect)
    }

    #[test]
    fn initial_generation_is_deterministic_and_non_zero() {
        assert_eq!(initial_generation("vol-1"), initial_generation("vol-1"));
        assert_ne!(initial_generation("vol-1"), initial_generation("vol-2"));
        assert_ne!(initial_generation(""), 0);
        let v = Generations::new_volume("abc");
        assert_eq!(v, g(initial_generation("abc"), 0, [0, 0]));
        // Two replicas created together are in sync without a resync.
        assert_eq!(d(Generations::new_volume("abc"), Generations::new_volume("abc")), Decision::InSync);
        // A replica added later needs a full sync.
        assert_eq!(d(Generations::new_volume("abc"), Generations::EMPTY), Decision::Full);
    }

    /// Every row of the module doc's table.
    #[test]
    fn decision_table() {
        use Decision::*;
        use DiskState::*;
        let cases: Vec<(&str, SideView, SideView, Decision)> = vec![
            // 1: a primary without usable data.
            ("primary empty", view(g(0, 0, [0, 0])), view(g(X, 0, [0, 0])), Unrelated),
            ("both empty", view(g(0, 0, [0, 0])), view(g(0, 0, [0, 0])), Unrelated),
            ("primary inconsistent", view_d(g(X, 0, [0, 0]), Inconsistent), view(g(X, 0, [0, 0])), Unrelated),
            ("primary diskless", view_d(g(X, 0, [0, 0]), Diskless), view(g(0, 0, [0, 0])), Unrelated),
            // 2: an empty or diskless secondary.
            ("secondary empty", view(g(Y, X, [X, 0])), view(g(0, 0, [0, 0])), Full),
            ("secondary empty, inconsistent", view(g(Y, 0, [0, 0])), view_d(g(0, 0, [X, 0]), Inconsistent), Full),
            ("secondary diskless", view(g(Y, 0, [0, 0])), view_d(g(Y, 0, [0, 0]), Diskless), Full),
            // 3: equal currents.
            ("equal", view(g(X, 0, [W, 0])), view(g(X, 0, [W, 0])), InSync),
            ("equal, bitmaps differ", view(g(X, W, [W, 0])), view(g(X, 0, [0, 0])), InSync),
            ("equal, outdated", view(g(X, 0, [0, 0])), view_d(g(X, 0, [0, 0]), Outdated), InSync),
            ("equal, inconsistent", view(g(X, 0, [0, 0])), view_d(g(X, 0, [0, 0]), Inconsistent), Full),
            // 4: contradictory lineage.
            ("cycle by history", view(g(Y, 0, [X, 0])), view(g(X, 0, [Y, 0])), Unrelated),
            ("cycle by bitmap", view(g(Y, X, [0, 0])), view(g(X, 0, [Y, 0])), Unrelated),
            // 5: incremental.
            ("incremental", view(g(Y, X, [X, 0])), view(g(X, 0, [W, 0])), Incremental),
            ("incremental, bitmap root older", view(g(Z, X, [Y, V])), view(g(X, 0, [0, 0])), Incremental),
            ("incremental, outdated", view(g(Y, X, [X, 0])), view_d(g(X, 0, [0, 0]), Outdated), Incremental),
            ("incremental, inconsistent", view(g(Y, X, [X, 0])), view_d(g(X, 0, [0, 0]), Inconsistent), Incremental),
            // 6: the secondary's generation is only in the primary's history.
            ("history 0", view(g(Y, 0, [X, 0])), view(g(X, 0, [0, 0])), Full),
            ("history 1", view(g(Z, 0, [Y, X])), view(g(X, 0, [0, 0])), Full),
            ("history, other bitmap", view(g(Z, Y, [Y, X])), view(g(X, 0, [0, 0])), Full),
            ("history beats equal bitmaps", view(g(Z, W, [Y, W])), view(g(Y, W, [W, 0])), Full),
            ("history, secondary has its own bitmap", view(g(Y, X, [X, 0])), view(g(X, W, [W, 0])), Full),
            ("history, inconsistent", view(g(Y, 0, [X, 0])), view_d(g(X, 0, [0, 0]), Inconsistent), Full),
            // 7: the secondary is ahead.
            ("stale primary", view(g(X, 0, [0, 0])), view(g(Y, X, [X, 0])), PrimaryStale),
            ("stale primary by history", view(g(X, 0, [0, 0])), view(g(Z, 0, [Y, X])), PrimaryStale),
            (
                "stale, inconsistent secondary",
                view(g(X, 0, [0, 0])),
                view_d(g(Y, X, [X, 0]), Inconsistent),
                PrimaryStale,
            ),
            // 8: split brain.
            ("split", view(g(Y, X, [X, 0])), view(g(Z, X, [X, 0])), SplitBrain { loser: None }),
            ("split, older root", view(g(Y, W, [V, W])), view(g(Z, W, [X, 0])), SplitBrain { loser: None }),
            // 9: nothing in common.
            ("unrelated", view(g(Y, 0, [0, 0])), view(g(Z, 0, [0, 0])), Unrelated),
            ("bitmaps differ", view(g(Y, X, [X, 0])), view(g(Z, W, [W, 0])), Unrelated),
            ("bitmap roots differ", view(g(Y, V, [V, 0])), view(g(X, W, [W, 0])), Unrelated),
        ];
        for (name, p, s, want) in cases {
            assert_eq!(decide(&p, &s, SplitBrainPolicy::Disconnect), want, "{name}");
        }
    }

    fn split_views(p_since: u64, p_changed: u64, s_since: u64, s_changed: u64) -> (SideView, SideView) {
        let p = SideView { primary_since_ms: p_since, changed_blocks: p_changed, ..view(g(Y, X, [X, 0])) };
        let s = SideView { primary_since_ms: s_since, changed_blocks: s_changed, ..view(g(Z, X, [X, 0])) };
        (p, s)
    }

    /// Every split-brain policy, with its ties.
    #[test]
    fn split_brain_policies() {
        use Side::*;
        use SplitBrainPolicy::*;
        // (policy, (primary since, primary changes, secondary since, secondary changes), loser)
        type Case = (SplitBrainPolicy, (u64, u64, u64, u64), Option<Side>);
        let cases: Vec<Case> = vec![
            (Disconnect, (1, 5, 2, 0), None),
            (DiscardYoungerPrimary, (200, 1, 100, 1), Some(Primary)),
            (DiscardYoungerPrimary, (100, 1, 200, 1), Some(Secondary)),
            (DiscardYoungerPrimary, (100, 1, 100, 1), None),
            (DiscardOlderPrimary, (200, 1, 100, 1), Some(Secondary)),
            (DiscardOlderPrimary, (100, 1, 200, 1), Some(Primary)),
            (DiscardOlderPrimary, (100, 1, 100, 1), None),
            (DiscardZeroChanges, (1, 0, 2, 7), Some(Primary)),
            (DiscardZeroChanges, (1, 7, 2, 0), Some(Secondary)),
            (DiscardZeroChanges, (1, 0, 2, 0), Some(Secondary)),
            (DiscardZeroChanges, (1, 3, 2, 7), None),
            (DiscardLeastChanges, (1, 3, 2, 7), Some(Primary)),
            (DiscardLeastChanges, (1, 7, 2, 3), Some(Secondary)),
            (DiscardLeastChanges, (1, 5, 2, 5), Some(Secondary)),
            (DiscardLeastChanges, (3, 5, 2, 5), Some(Primary)),
            (DiscardLeastChanges, (2, 5, 2, 5), None),
            (DiscardLocal, (1, 0, 2, 9), Some(Primary)),
            (DiscardRemote, (1, 9, 2, 0), Some(Secondary)),
        ];
        for (policy, (ps, pc, ss, sc), want) in cases {
            let (p, s) = split_views(ps, pc, ss, sc);
            assert_eq!(decide(&p, &s, policy), Decision::SplitBrain { loser: want }, "{policy:?} {ps} {pc} {ss} {sc}");
        }
    }

    #[test]
    fn an_inconsistent_secondary_is_never_the_split_brain_source() {
        let (p, mut s) = split_views(1, 1, 2, 1);
        s.disk = DiskState::Inconsistent;
        assert_eq!(decide(&p, &s, SplitBrainPolicy::DiscardLocal), Decision::SplitBrain { loser: None });
        assert_eq!(
            decide(&p, &s, SplitBrainPolicy::DiscardRemote),
            Decision::SplitBrain { loser: Some(Side::Secondary) }
        );
    }

    #[test]
    fn transitions() {
        let mut a = Generations::new_volume("v");
        let x = a.current;
        // Promotion while the peer is away.
        assert_eq!(a.new_generation(Y), Y);
        assert_eq!(a, g(Y, x, [x, 0]));
        // Again: the bitmap keeps its root.
        assert_eq!(a.new_generation(Z), Z);
        assert_eq!(a, g(Z, x, [Y, x]));
        // A fresh id already known is bumped.
        assert_eq!(a.new_generation(Y), Y + 1);
        assert_eq!(a, g(Y + 1, x, [Z, Y]));
        assert_ne!(a.new_generation(0), 0);
        // Resync done, on both ends.
        let mut src = g(Y, x, [x, 0]);
        src.sync_finished_as_source();
        assert_eq!(src, g(Y, 0, [x, 0]));
        let mut dst = g(x, 0, [0, 0]);
        dst.sync_finished_as_target(&src).unwrap();
        assert_eq!(dst, g(Y, 0, [x, 0]));
        assert_eq!(dst.sync_finished_as_target(&Generations::EMPTY), Err(GenerationError::Zero));
        let mut dst = g(W, W, [0, 0]);
        dst.sync_finished_as_target(&g(Y, 7, [Y, X])).unwrap();
        assert_eq!(dst, g(Y, 0, [X, 0]));
        // In-stream new generation.
        let mut s = g(Y, 0, [x, 0]);
        s.follow_generation(Z).unwrap();
        assert_eq!(s, g(Z, 0, [Y, x]));
        s.follow_generation(Z).unwrap();
        assert_eq!(s, g(Z, 0, [Y, x]));
        assert_eq!(s.follow_generation(0), Err(GenerationError::Zero));
        assert_eq!(s.follow_generation(Y), Err(GenerationError::InHistory(Y)));
        // Resync start on the target.
        let mut t = g(Z, X, [X, W]);
        t.sync_started_as_target(Some(X));
        assert_eq!(t, g(X, 0, [W, 0]));
        let mut t = g(Z, X, [X, W]);
        t.sync_started_as_target(None);
        assert_eq!(t, g(0, 0, [X, W]));
        let mut t = g(Z, 0, [Y, 0]);
        t.sync_started_as_target(Some(Z));
        assert_eq!(t, g(Z, 0, [Y, 0]));
    }

    /// The two-node story of the module doc, step by step.
    #[test]
    fn failover_and_catch_up() {
        let mut a = Generations::new_volume("v"); // a's view of b
        let mut b = Generations::new_volume("v"); // b's view of a
        let x = a.current;
        // a is promoted while b is connected: both follow in-stream.
        a.follow_generation(Y).unwrap();
        b.follow_generation(Y).unwrap();
        assert_eq!(d(a, b), Decision::InSync);
        // The link fails: a, primary, starts a new generation.
        a.new_generation(Z);
        assert_eq!(d(a, b), Decision::Incremental);
        // a fails over to b, which comes back as primary: a is a stale secondary.
        assert_eq!(d(b, a), Decision::PrimaryStale);
        // b promoted while a is away: a split brain.
        b.new_generation(W);
        assert_eq!(d(a, b), Decision::SplitBrain { loser: None });
        assert_eq!(d(b, a), Decision::SplitBrain { loser: None });
        // Resolved, b loses: b resyncs from a.
        b.sync_started_as_target(Some(a.bitmap));
        assert_eq!(b, g(Y, 0, [x, 0]));
        let damaged = view_d(b, DiskState::Inconsistent);
        assert_eq!(decide(&view(a), &damaged, SplitBrainPolicy::Disconnect), Decision::Incremental);
        // Interrupted: a, still primary, lost the peer again; the resync resumes.
        a.new_generation(V);
        assert_eq!(a, g(V, Y, [Z, Y]));
        assert_eq!(decide(&view(a), &damaged, SplitBrainPolicy::Disconnect), Decision::Incremental);
        a.sync_finished_as_source();
        b.sync_finished_as_target(&a).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, g(V, 0, [Z, Y]));
        assert_eq!(d(a, b), Decision::InSync);
    }

    // ---- properties ----

    /// Generation ids from a small pool, so that the interesting equalities
    /// happen often.
    fn gen_id() -> impl Strategy<Value = GenId> {
        prop_oneof![4 => 0u64..6, 1 => any::<u64>()]
    }

    fn gens() -> impl Strategy<Value = Generations> {
        (gen_id(), gen_id(), gen_id(), gen_id()).prop_map(|(c, b, h0, h1)| g(c, b, [h0, h1]))
    }

    fn disk() -> impl Strategy<Value = DiskState> {
        prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Inconsistent),
            Just(DiskState::Outdated),
            Just(DiskState::Diskless)
        ]
    }

    fn side_view(disk: BoxedStrategy<DiskState>) -> impl Strategy<Value = SideView> {
        (gens(), prop_oneof![Just(0u64), 0u64..4, any::<u64>()], prop_oneof![Just(0u64), 0u64..4, any::<u64>()], disk)
            .prop_map(|(gens, primary_since_ms, changed_blocks, disk)| SideView {
                gens,
                primary_since_ms,
                changed_blocks,
                disk,
            })
    }

    fn policy() -> impl Strategy<Value = SplitBrainPolicy> {
        proptest::sample::select(SplitBrainPolicy::ALL.to_vec())
    }

    /// A state that satisfies the invariant: current not in its own history.
    fn valid_gens() -> impl Strategy<Value = Generations> {
        gens().prop_filter("current in history", |g| !g.in_history(g.current))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decide_is_total(p in side_view(disk().boxed()), s in side_view(disk().boxed()), policy in policy()) {
            let got = decide(&p, &s, policy);
            if p.gens.current == 0 {
                prop_assert_eq!(got, Decision::Unrelated);
            }
            if policy == SplitBrainPolicy::Disconnect {
                prop_assert!(!matches!(got, Decision::SplitBrain { loser: Some(_) }), "{:?}", got);
            }
            if s.disk == DiskState::Inconsistent {
                prop_assert!(got != Decision::InSync);
                prop_assert!(got != Decision::SplitBrain { loser: Some(Side::Primary) }, "{:?}", got);
            }
            if got == Decision::InSync {
                prop_assert_eq!(p.gens.current, s.gens.current);
            }
            if got == Decision::Incremental {
                prop_assert!(p.gens.bitmap != 0 && p.gens.bitmap == s.gens.current && s.gens.bitmap == 0);
            }
        }

        #[test]
        fn decide_is_symmetric(
            p in side_view(prop_oneof![Just(DiskState::UpToDate), Just(DiskState::Outdated)].boxed()),
            s in side_view(prop_oneof![Just(DiskState::UpToDate), Just(DiskState::Outdated)].boxed()),
            policy in policy(),
        ) {
            prop_assume!(p.gens.current != 0 && s.gens.current != 0);
            let there = decide(&p, &s, policy);
            let back = decide(&s, &p, policy);
            match there {
                Decision::InSync | Decision::Unrelated => prop_assert_eq!(back, there),
                Decision::Incremental | Decision::Full => prop_assert_eq!(back, Decision::PrimaryStale),
                Decision::PrimaryStale => {
                    prop_assert!(matches!(back, Decision::Incremental | Decision::Full), "{:?}", back)
                }
                Decision::SplitBrain { loser } => {
                    let Decision::SplitBrain { loser: back_loser } = back else {
                        return Err(TestCaseError::fail(format!("{there:?} but back {back:?}")));
                    };
                    let role_based = matches!(policy, SplitBrainPolicy::DiscardLocal | SplitBrainPolicy::DiscardRemote)
                        || (policy == SplitBrainPolicy::DiscardZeroChanges
                            && p.changed_blocks == 0
                            && s.changed_blocks == 0);
                    if role_based {
                        prop_assert_eq!(back_loser, loser);
                    } else {
                        prop_assert_eq!(back_loser, loser.map(Side::other));
                    }
                }
            }
        }

        #[test]
        fn disconnect_never_picks_a_loser(p in side_view(disk().boxed()), s in side_view(disk().boxed())) {
            prop_assert_eq!(split_brain_loser(&p, &s, SplitBrainPolicy::Disconnect), None);
            let got = decide(&p, &s, SplitBrainPolicy::Disconnect);
            prop_assert!(!matches!(got, Decision::SplitBrain { loser: Some(_) }), "{:?}", got);
        }

        #[test]
        fn new_generation_keeps_the_invariants(start in gens(), fresh in gen_id()) {
            let mut after = start;
            let cur = after.new_generation(fresh);
            prop_assert_eq!(cur, after.current);
            prop_assert!(after.current != 0);
            prop_assert!(!after.history.contains(&after.current));
            prop_assert!(after.current != after.bitmap);
            prop_assert!(after.current != start.current);
            if start.current != 0 {
                prop_assert_eq!(after.history, [start.current, start.history[0]]);
            }
            if start.bitmap == 0 {
                prop_assert_eq!(after.bitmap, start.current);
            } else {
                prop_assert_eq!(after.bitmap, start.bitmap);
            }
        }

        #[test]
        fn transitions_keep_current_out_of_history(
            start in valid_gens(),
            ops in proptest::collection::vec((0u8..5, gen_id(), gens()), 0..20),
        ) {
            let mut s = start;
            for (op, id, other) in ops {
                match op {
                    0 => { s.new_generation(id); prop_assert!(s.current != 0); }
                    1 => {
                        if s.follow_generation(id).is_ok() {
                            prop_assert!(s.current == id);
                        }
                    }
                    2 => s.sync_finished_as_source(),
                    3 => s.sync_started_as_target(if id == 0 { None } else { Some(id) }),
                    _ => {
                        if s.sync_finished_as_target(&other).is_ok() {
                            prop_assert_eq!(s.current, other.current);
                            prop_assert_eq!(s.bitmap, 0);
                        }
                    }
                }
                prop_assert!(!s.in_history(s.current), "{:?}", s);
            }
        }
    }

    // ---- a model of two replicas: the rules never lose data silently ----

    const BLOCKS: u8 = 8;

    #[derive(Debug, Clone)]
    enum Event {
        Write {
            node: usize,
            block: u8,
        },
        Promote {
            node: usize,
        },
        Demote {
            node: usize,
        },
        Disconnect,
        Connect {
            policy: SplitBrainPolicy,
            interrupt: Option<u8>,
        },
        /// The node's disk is replaced by an empty one (a replica added anew).
        Replace {
            node: usize,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0usize..2, 0..BLOCKS).prop_map(|(node, block)| Event::Write { node, block }),
            2 => (0usize..2).prop_map(|node| Event::Promote { node }),
            2 => (0usize..2).prop_map(|node| Event::Demote { node }),
            2 => Just(Event::Disconnect),
            3 => (policy(), proptest::option::of(0u8..BLOCKS)).prop_map(|(policy, interrupt)| Event::Connect { policy, interrupt }),
            1 => (0usize..2).prop_map(|node| Event::Replace { node }),
        ]
    }

    #[derive(Debug, Clone)]
    struct Node {
        /// The view of the other node.
        gens: Generations,
        primary: bool,
        primary_since: u64,
        disk: DiskState,
        /// block → id of the write it holds (0: never written).
        data: BTreeMap<u8, u64>,
        /// Every write it has applied (or adopted through a resync).
        applied: BTreeSet<u64>,
        /// The bitmap for the other node.
        bits: BTreeSet<u8>,
    }

    impl Node {
        fn view(&self) -> SideView {
            SideView {
                gens: self.gens,
                primary_since_ms: self.primary_since,
                changed_blocks: self.bits.len() as u64,
                disk: self.disk,
            }
        }
    }

    struct Model {
        nodes: [Node; 2],
        connected: bool,
        next_id: u64,
        time: u64,
    }

    impl Model {
        fn new() -> Model {
            let node = Node {
                gens: Generations::new_volume("model"),
                primary: false,
                primary_since: 0,
                disk: DiskState::UpToDate,
                data: (0..BLOCKS).map(|b| (b, 0)).collect(),
                applied: BTreeSet::new(),
                bits: BTreeSet::new(),
            };
            Model { nodes: [node.clone(), node], connected: false, next_id: 1000, time: 0 }
        }

        fn fresh(&mut self) -> GenId {
            self.next_id += 1;
            self.next_id
        }

        fn lose_connection(&mut self) {
            self.connected = false;
            for i in 0..2 {
                if self.nodes[i].primary {
                    let fresh = self.fresh();
                    self.nodes[i].gens.new_generation(fresh);
                }
            }
        }

        /// Copies `blocks` from `src` to `dst` (the source clears its bits as
        /// they are acknowledged), stopping after `limit` blocks.
        fn copy(&mut self, src: usize, blocks: &BTreeSet<u8>, limit: Option<u8>) -> bool {
            for (n, &b) in blocks.iter().enumerate() {
                if limit.is_some_and(|l| n >= usize::from(l)) {
                    return false;
                }
                let v = self.nodes[src].data[&b];
                self.nodes[1 - src].data.insert(b, v);
                self.nodes[src].bits.remove(&b);
            }
            true
        }

        fn step(&mut self, ev: &Event) -> Result<(), TestCaseError> {
            self.time += 1;
            match *ev {
                Event::Write { node, block } => {
                    if !self.nodes[node].primary {
                        return Ok(());
                    }
                    self.next_id += 1;
                    let w = self.next_id;
                    self.nodes[node].data.insert(block, w);
                    self.nodes[node].applied.insert(w);
                    if self.connected {
                        self.nodes[1 - node].data.insert(block, w);
                        self.nodes[1 - node].applied.insert(w);
                    } else {
                        self.nodes[node].bits.insert(block);
                    }
                }
                Event::Promote { node } => {
                    let n = &self.nodes[node];
                    if n.primary || n.disk != DiskState::UpToDate || (self.connected && self.nodes[1 - node].primary) {
                        return Ok(());
                    }
                    let fresh = self.fresh();
                    if self.connected {
                        self.nodes[node].gens.follow_generation(fresh).unwrap();
                        self.nodes[1 - node].gens.follow_generation(fresh).unwrap();
                    } else {
                        self.nodes[node].gens.new_generation(fresh);
                    }
                    self.nodes[node].primary = true;
                    self.nodes[node].primary_since = self.time;
                }
                Event::Demote { node } => self.nodes[node].primary = false,
                Event::Replace { node } => {
                    if self.nodes[node].primary {
                        return Ok(());
                    }
                    if self.connected {
                        self.lose_connection();
                    }
                    let n = &mut self.nodes[node];
                    n.gens = Generations::EMPTY;
                    n.disk = DiskState::Inconsistent;
                    n.data = (0..BLOCKS).map(|b| (b, 0)).collect();
                    n.applied.clear();
                    n.bits.clear();
                }
                Event::Disconnect => {
                    if self.connected {
                        self.lose_connection();
                    }
                }
                Event::Connect { policy, interrupt } => {
                    let primaries: Vec<usize> = (0..2).filter(|&i| self.nodes[i].primary).collect();
                    if self.connected || primaries.len() != 1 {
                        return Ok(());
                    }
                    let (p, s) = (primaries[0], 1 - primaries[0]);
                    let decision = decide(&self.nodes[p].view(), &self.nodes[s].view(), policy);
                    // Nothing the secondary holds is discarded unless a split-brain policy says so.
                    if matches!(decision, Decision::InSync | Decision::Incremental | Decision::Full) {
                        prop_assert!(
                            self.nodes[s].applied.is_subset(&self.nodes[p].applied),
                            "{:?} would lose writes of the secondary",
                            decision
                        );
                    }
                    prop_assert!(decision != Decision::Unrelated, "two replicas of one volume are never unrelated");
                    let (src, bits, base) = match decision {
                        Decision::InSync => (p, self.nodes[p].bits.clone(), Some(self.nodes[s].gens.current)),
                        Decision::Incremental => (p, self.nodes[p].bits.clone(), Some(self.nodes[s].gens.current)),
                        Decision::Full => (p, (0..BLOCKS).collect(), None),
                        Decision::SplitBrain { loser: Some(loser) } => {
                            let src = if loser == Side::Secondary { s } else { p };
                            if loser == Side::Primary {
                                // Demoted first: a serving primary is never overwritten.
                                self.nodes[p].primary = false;
                            }
                            let union: BTreeSet<u8> = self.nodes[p].bits.union(&self.nodes[s].bits).copied().collect();
                            let base = self.nodes[p].gens.bitmap;
                            (src, union, Some(base))
                        }
                        Decision::PrimaryStale | Decision::SplitBrain { loser: None } | Decision::Unrelated => {
                            return Ok(());
                        }
                    };
                    let dst = 1 - src;
                    self.nodes[src].bits = bits.clone();
                    self.nodes[dst].bits.clear();
                    self.nodes[dst].applied = self.nodes[src].applied.clone();
                    self.nodes[dst].gens.sync_started_as_target(base);
                    self.nodes[dst].disk = DiskState::Inconsistent;
                    // A target that was primary (split-brain loser) is not interrupted here.
                    let limit = if self.nodes[src].primary { interrupt } else { None };
                    if self.copy(src, &bits, limit) {
                        prop_assert_eq!(&self.nodes[src].data, &self.nodes[dst].data, "after {:?}", decision);
                        self.nodes[src].gens.sync_finished_as_source();
                        let src_gens = self.nodes[src].gens;
                        self.nodes[dst].gens.sync_finished_as_target(&src_gens).unwrap();
                        self.nodes[dst].disk = DiskState::UpToDate;
                        self.connected = true;
                    } else {
                        self.lose_connection();
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Random promotions, writes, partitions and reconnects of two
        /// replicas: every resync the decision starts leaves both with the
        /// same blocks, copying only the bitmap's blocks when incremental, and
        /// nothing the secondary holds is overwritten unless a split-brain
        /// policy chose it.
        #[test]
        fn two_replicas_never_lose_writes_silently(events in proptest::collection::vec(event(), 0..60)) {
            let mut m = Model::new();
            for ev in &events {
                m.step(ev)?;
                for n in &m.nodes {
                    prop_assert!(!n.gens.in_history(n.gens.current));
                }
            }
        }
    }
}
