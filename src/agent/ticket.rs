//! The ticket on this cluster's leader (`[ticket]`, docs/dr.md): its site's
//! grantor (a `Desk`, new — and so quiet for a lease — on every
//! leadership, because the previous leader's loans are not known here) and
//! holder, the rounds it sends to the other site's leader and to the
//! arbitrator, and what `GET /v1/ticket` shows. Followers take no part.
//!
//! The peers' certificates are not checked: the other site's cluster has
//! its own CA and the arbitrator none; the shared key's seal on every
//! answer is what makes a grant count.

use std::sync::atomic::{AtomicBool, Ordering};

use tandem_http_api::types::{TicketGrantorView, TicketView};

use super::*;
use crate::arbitrator::now_unix_ms;
use crate::clock::now_boot_ms;
use crate::config::{TicketConfig, TicketPeer};
use crate::ticket::{Answer, Holder, LastAnswer, Standing};
use crate::ticket_link::{Desk, SealKey, TicketAnswer, TicketError, TicketRequest, PATH, SEAL_HEADER};

/// How often the leader's holder looks whether a round is due.
pub(super) const TICKET_TICK: Duration = Duration::from_millis(100);

/// This cluster's part in the ticket.
pub(crate) struct TicketSite {
    cfg: TicketConfig,
    key: SealKey,
    /// Calls to the other site and the arbitrator (no certificate check).
    http: reqwest::Client,
    /// Whether this site asks for the ticket: `[ticket] acquire` at start,
    /// then what `POST /v1/ticket/acquire|release` said (on this node).
    wanted: AtomicBool,
    leading: std::sync::Mutex<Option<Leading>>,
    /// The gate's deadline last written to `<data_dir>/run` (this node).
    gate_written_ms: std::sync::atomic::AtomicU64,
}

/// The gate is written again once it reaches this much past what was
/// written: a restarted agent may then know it a little shorter than it
/// was (it closes earlier, never later), at one small write a second.
const GATE_WRITE_STEP_MS: u64 = 1_000;

/// The ticket's state while this node leads (term `term`).
struct Leading {
    term: u64,
    /// When this term's ticket state was made (its clock): a new leader
    /// acquires for a lease before its ticket groups count as not held.
    since_ms: u64,
    /// Told to release: the grantors are told once no ticket group runs.
    releasing: bool,
    desk: Desk,
    holder: Holder,
    /// The last answer (or failure) from each grantor.
    heard: BTreeMap<String, Heard>,
}

#[derive(Clone)]
struct Heard {
    at_ms: u64,
    answer: Result<Answer, String>,
}

impl TicketSite {
    pub(crate) fn new(cfg: TicketConfig, http: reqwest::Client) -> Result<TicketSite, TicketError> {
        let key = SealKey::load(&cfg.key_file)?;
        let wanted = AtomicBool::new(cfg.acquire);
        Ok(TicketSite {
            cfg,
            key,
            http,
            wanted,
            leading: std::sync::Mutex::new(None),
            gate_written_ms: Default::default(),
        })
    }

    fn sites(&self) -> Vec<String> {
        vec![self.cfg.site.clone(), self.cfg.other_site.name.clone()]
    }

    /// The state for leadership term `term`, made afresh on a new one.
    fn leading_for<'a>(&self, slot: &'a mut Option<Leading>, term: u64, now_ms: u64) -> &'a mut Leading {
        if slot.as_ref().is_none_or(|l| l.term != term) {
            let timing = self.cfg.timing();
            let mut holder = Holder::new(&self.cfg.site, timing, 3, now_ms);
            holder.set_wanted(self.wanted.load(Ordering::SeqCst));
            *slot = Some(Leading {
                term,
                since_ms: now_ms,
                releasing: false,
                desk: Desk::new(&self.cfg.site, &self.sites(), timing, now_ms),
                holder,
                heard: BTreeMap::new(),
            });
        }
        slot.as_mut().expect("just set")
    }

    fn request(&self, round: u64, release: bool) -> TicketRequest {
        let t = self.cfg.timing();
        TicketRequest {
            site: self.cfg.site.clone(),
            round,
            sent_unix_ms: now_unix_ms(),
            lease_ms: t.lease_ms,
            margin_ms: t.margin_ms,
            release,
        }
    }
}

impl Agent {
    /// The leader's leadership term, if this node leads.
    fn leading_term(&self) -> Option<u64> {
        let m = self.member()?;
        let metrics = m.metrics();
        (metrics.current_leader == Some(m.node_id)).then_some(metrics.current_term)
    }

    /// Whether this leader heard a quorum of voters within the election
    /// timeout. A leader cut off from its voters may not know yet that
    /// another leads (with a desk and a holder of its own): it stops lending
    /// and asking before that one can be elected, so the site never lends
    /// twice, and no loan the new leader may give back a lease into its
    /// term is one this one renewed.
    fn quorum_fresh(&self) -> bool {
        let acked = self.member().and_then(|m| m.metrics().millis_since_quorum_ack);
        acked.is_some_and(|ms| ms < self.cfg.raft.election_timeout_min_ms)
    }

    /// One tick: on every node, the gate kept on disk; on the leader, what
    /// its heartbeats say about the ticket, a release carried out once no
    /// ticket group runs, and a round to the three grantors when due.
    pub(super) async fn ticket_round(self: &Arc<Self>) {
        let Some(site) = self.ticket.clone() else { return };
        self.keep_ticket_gate(&site);
        self.kill_ticket_groups_if_closed();
        let Some(term) = self.leading_term() else {
            self.liveness.set_ticket_held_until(0, now_boot_ms());
            *site.leading.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        };
        let now = now_boot_ms();
        let none_running = self.member().is_some_and(|m| {
            m.state.read(|d| d.state.groups.values().all(|g| !g.spec.ticket || g.placement.node.is_none()))
        });
        let round = {
            let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
            let l = site.leading_for(&mut slot, term, now);
            let held_until = if l.holder.holds(now) { now + l.holder.left_ms(now) } else { 0 };
            self.liveness.set_ticket_held_until(held_until, now);
            if !self.quorum_fresh() {
                return; // neither asks nor gives back (see `quorum_fresh`)
            }
            if l.releasing && none_running && l.holder.may_give_back(now) {
                l.releasing = false;
                tracing::info!("ticket: no ticket group runs here any more; giving the ticket back");
                let all = site.sites().into_iter().chain([site.cfg.arbitrator.name.clone()]).collect();
                site.hand_back(l, all);
            }
            l.holder.set_wanted(site.wanted.load(Ordering::SeqCst));
            let heard: Vec<LastAnswer<'_>> = l
                .heard
                .iter()
                .filter_map(|(grantor, h)| {
                    let (granted, lent_to) = match &h.answer {
                        Ok(Answer::Granted) => (true, None),
                        Ok(Answer::Refused { holder, .. }) => (false, holder.as_deref()),
                        Err(_) => return None,
                    };
                    Some(LastAnswer { grantor, at_ms: h.at_ms, granted, lent_to })
                })
                .collect();
            let lent: Vec<String> = l.holder.to_hand_back(&heard, now).into_iter().map(str::to_string).collect();
            if !lent.is_empty() {
                l.holder.forget_round(now);
                tracing::info!(grantors = ?lent, "ticket: another site holds it; handing back what was lent here");
                site.hand_back(l, lent);
            }
            let Some(req) = l.holder.tick(now) else { return };
            // This site's own grantor, at once.
            let answer = l.desk.request_local(&site.cfg.site, now);
            l.holder.answer(&site.cfg.site, req.round, &answer);
            l.heard.insert(site.cfg.site.clone(), Heard { at_ms: now, answer: Ok(answer) });
            req.round
        };
        for peer in [site.cfg.other_site.clone(), site.cfg.arbitrator.clone()] {
            let site = site.clone();
            tokio::spawn(async move {
                let answer = site.ask(&peer, site.request(round, false)).await;
                let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
                // Leadership changed meanwhile: the answer is for nobody.
                let Some(l) = slot.as_mut().filter(|l| l.term == term) else { return };
                if let Ok(a) = &answer {
                    l.holder.answer(&peer.name, round, a);
                }
                l.heard.insert(peer.name.clone(), Heard { at_ms: now_boot_ms(), answer });
            });
        }
    }

    /// Writes this node's ticket gate to `<data_dir>/run` when it opened
    /// further (see `GATE_WRITE_STEP_MS`).
    fn keep_ticket_gate(&self, site: &TicketSite) {
        let until = self.liveness.ticket_gate().open_until_ms();
        let written = site.gate_written_ms.load(Ordering::SeqCst);
        if until >= written + GATE_WRITE_STEP_MS {
            match self.run.write_ticket_gate(until) {
                Ok(()) => site.gate_written_ms.store(until, Ordering::SeqCst),
                Err(e) => tracing::warn!("cannot write the ticket gate: {e}"),
            }
        }
    }

    /// When this node's gate is closed, kills the processes of the groups
    /// bound to the ticket and halts their volumes at once: the executor
    /// does it too (`KillGroup`, with script agents' stop actions), but at
    /// its next round, which may be waiting on a slow stop of another group.
    fn kill_ticket_groups_if_closed(&self) {
        if self.liveness.ticket_gate().open(now_boot_ms()) {
            return;
        }
        let Some(m) = self.member() else { return };
        let (groups, volumes) = m.state.read(|d| {
            let bound: Vec<&GroupRecord> = d.state.groups.values().filter(|g| g.spec.ticket).collect();
            let volumes = bound.iter().filter_map(|g| g.spec.volume().map(|(r, _)| r.name.clone())).collect::<Vec<_>>();
            (bound.into_iter().map(|g| g.name.clone()).collect::<BTreeSet<String>>(), volumes)
        });
        if groups.is_empty() {
            return;
        }
        let killed = self.guard.kill_groups(&groups, &volumes);
        if killed > 0 {
            tracing::warn!(
                killed,
                "the site's ticket is not seen held here any more: killed the processes of its groups"
            );
        }
    }

    /// The site's standing with the ticket, for the scheduler (on the
    /// leader; `NotHeld` without `[ticket]`).
    pub(super) fn ticket_standing(&self) -> Standing {
        let Some(site) = self.ticket.as_ref() else { return Standing::NotHeld };
        let Some(term) = self.leading_term() else { return Standing::NotHeld };
        let now = now_boot_ms();
        let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
        let l = site.leading_for(&mut slot, term, now);
        let wants = site.wanted.load(Ordering::SeqCst) && !l.releasing;
        crate::ticket::standing(l.holder.holds(now), wants, l.since_ms, now, site.cfg.timing())
    }

    /// `POST /internal/ticket`: a sealed request from another participant,
    /// answered by this site's grantor (the leader's).
    pub(super) fn do_ticket_request(&self, body: &[u8], seal: &str) -> Result<(Vec<u8>, String), ApiError> {
        let site = self.ticket.as_ref().ok_or(ApiError::TicketNotConfigured)?;
        let term = self.leading_term().ok_or(ApiError::NoLeader)?;
        if !self.quorum_fresh() {
            return Err(ApiError::NoLeader);
        }
        let now = now_boot_ms();
        let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
        let l = site.leading_for(&mut slot, term, now);
        l.desk.handle(&site.key, body, seal, now, now_unix_ms()).map_err(ApiError::from)
    }

    /// `GET /v1/ticket` (on the leader).
    pub(super) fn do_ticket_view(&self) -> Result<TicketView, ApiError> {
        let site = self.ticket.as_ref().ok_or(ApiError::TicketNotConfigured)?;
        let term = self.leading_term().ok_or(ApiError::NoLeader)?;
        let now = now_boot_ms();
        let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
        let l = site.leading_for(&mut slot, term, now);
        let names = [&site.cfg.site, &site.cfg.other_site.name, &site.cfg.arbitrator.name];
        let grantors = names
            .iter()
            .map(|name| {
                let heard = l.heard.get(*name);
                let (granted, holder, error) = match heard.map(|h| &h.answer) {
                    Some(Ok(Answer::Granted)) => (true, None, None),
                    Some(Ok(Answer::Refused { holder, .. })) => (false, holder.clone(), None),
                    Some(Err(e)) => (false, None, Some(e.clone())),
                    None => (false, None, None),
                };
                TicketGrantorView {
                    name: name.to_string(),
                    granted,
                    holder,
                    error,
                    answered_ms_ago: heard.map(|h| now.saturating_sub(h.at_ms)),
                }
            })
            .collect();
        Ok(TicketView {
            site: site.cfg.site.clone(),
            holds: l.holder.holds(now),
            left_ms: l.holder.left_ms(now),
            wanted: site.wanted.load(Ordering::SeqCst),
            lent_to: l.desk.lent_to(now),
            grantors,
        })
    }

    /// `POST /v1/ticket/acquire` (`true`) or `/release` (`false`).
    pub(super) async fn do_ticket_want(&self, wanted: bool) -> Result<TicketView, ApiError> {
        let site = self.ticket.clone().ok_or(ApiError::TicketNotConfigured)?;
        let term = self.leading_term().ok_or(ApiError::NoLeader)?;
        site.wanted.store(wanted, Ordering::SeqCst);
        let now = now_boot_ms();
        let mut slot = site.leading.lock().unwrap_or_else(|e| e.into_inner());
        let l = site.leading_for(&mut slot, term, now);
        if wanted {
            l.releasing = false;
        } else {
            // Held no more from now on: the scheduler stops the ticket
            // groups. The grantors are told (so that the other site need
            // not wait out the lease) only once none runs here: the gates
            // of the nodes running them stay open until the belief's end.
            // A grantor not told lends again once its lease has run out.
            l.holder.release();
            l.releasing = true;
            self.liveness.set_ticket_held_until(0, now);
        }
        drop(slot);
        self.do_ticket_view()
    }
}

impl TicketSite {
    /// Gives the loans of `grantors` back: this site's own at once, the
    /// others' by a release message each.
    fn hand_back(self: &Arc<Self>, l: &mut Leading, grantors: Vec<String>) {
        for name in grantors {
            l.heard.remove(&name);
            if name == self.cfg.site {
                l.desk.release_local(&name);
                continue;
            }
            let peer = [&self.cfg.other_site, &self.cfg.arbitrator].into_iter().find(|p| p.name == name).cloned();
            let Some(peer) = peer else { continue };
            let site = self.clone();
            // Stamped now, before the next round's request: a grantor takes
            // nothing older than the newest it took from this site, so this
            // can never undo a loan that a later request got.
            let release = site.request(0, true);
            tokio::spawn(async move {
                if let Err(e) = site.ask(&peer, release).await {
                    tracing::debug!(peer = %peer.name, "the ticket's hand-back was not heard: {e}");
                }
            });
        }
    }

    /// Sends `req` to `peer` (its URLs in order, until one answers) and
    /// returns its checked answer.
    async fn ask(&self, peer: &TicketPeer, req: TicketRequest) -> Result<Answer, String> {
        let (body, seal) = self.key.sealed(&req);
        let timeout = Duration::from_millis((self.cfg.renew_ms / 2).max(100));
        let mut last = String::from("no URL");
        for url in &peer.urls {
            let target = format!("{}{PATH}", url.trim_end_matches('/'));
            let sent = self
                .http
                .post(&target)
                .header(SEAL_HEADER, &seal)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .timeout(timeout)
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{target}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let their_seal = resp.headers().get(SEAL_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = resp.bytes().await.map_err(|e| format!("{target}: {e}"))?;
            let Some(their_seal) = their_seal.filter(|_| status.is_success()) else {
                // A follower (503) or a refusal: try the next URL.
                last = format!(
                    "{target}: {status} {}",
                    String::from_utf8_lossy(&bytes).chars().take(200).collect::<String>()
                );
                continue;
            };
            let a: TicketAnswer = self.key.open(&bytes, &their_seal).map_err(|e| format!("{target}: {e}"))?;
            if a.from != peer.name || a.site != req.site || a.round != req.round {
                return Err(format!("{target}: an answer for {} round {} from {}", a.site, a.round, a.from));
            }
            return Ok(a.answer());
        }
        Err(last)
    }
}
