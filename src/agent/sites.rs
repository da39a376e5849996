//! Sites as a unit: standby / online of every node of a site in one
//! command, and the switchover that waits (bounded) for the site's groups
//! to run elsewhere and reports each one (`crate::sites` reads the state).

use super::*;
use tandem_http_api::{SiteView, SwitchoverReport, SwitchoverRequest};
use tandem_raft::events::{Event, EventFilter, Severity};

/// Default and longest wait of a switchover: under the 30 s a forwarded
/// request may take at the leader.
const SWITCHOVER_WAIT_S: u64 = 20;
const SWITCHOVER_MAX_WAIT_S: u64 = 25;
/// How often a switchover looks at the state.
const SWITCHOVER_POLL: Duration = Duration::from_millis(100);
/// Events read per look (a switchover of many groups in a busy cluster
/// reads on from where it stopped).
const EVENTS_PER_LOOK: usize = 1000;

impl Agent {
    pub(super) fn site_views(&self, m: &Member) -> Vec<SiteView> {
        let (state, _, views) = self.views(m);
        let sites: BTreeSet<String> = state.nodes.values().filter_map(|n| n.site.clone()).collect();
        sites
            .into_iter()
            .map(|site| {
                let nodes = crate::sites::site_nodes(&state, &site);
                let groups = crate::sites::leaving(&state, &nodes).into_iter().map(|l| l.group).collect();
                SiteView {
                    nodes: views.iter().filter(|v| v.site.as_deref() == Some(site.as_str())).cloned().collect(),
                    name: site,
                    groups,
                }
            })
            .collect()
    }

    pub(super) fn site_view(&self, m: &Member, site: &str) -> Result<SiteView, ApiError> {
        self.site_views(m).into_iter().find(|s| s.name == site).ok_or_else(|| ApiError::SiteNotFound(site.into()))
    }

    pub(super) async fn do_switchover_site(
        &self,
        site: &str,
        req: SwitchoverRequest,
    ) -> Result<SwitchoverReport, ApiError> {
        let wait_s = req.timeout_s.unwrap_or(SWITCHOVER_WAIT_S);
        if !(1..=SWITCHOVER_MAX_WAIT_S).contains(&wait_s) {
            return Err(ApiError::Invalid {
                field: "timeout_s".into(),
                reason: format!("1 to {SWITCHOVER_MAX_WAIT_S} seconds"),
            });
        }
        let m = self.require_member()?;
        let started = Instant::now();
        let started_ms = crate::security::now_ms();
        let state = m.state.state();
        let nodes = crate::sites::site_nodes(&state, site);
        if nodes.is_empty() {
            return Err(ApiError::SiteNotFound(site.into()));
        }
        let mut leaving = crate::sites::leaving(&state, &nodes);
        // What each possible new primary lacks, before anything moves.
        for l in leaving.iter_mut() {
            if let Some(v) = &l.volume {
                if let Ok(view) = self.volume(v, true).await {
                    l.rpo = crate::sites::rpo_by_replica(&view);
                }
            }
        }
        let cursor = state.events.last_id;
        self.propose(&m, Command::SetSiteAdminState { site: site.into(), state: AdminState::Standby }).await?;

        let filter = EventFilter { kinds: vec!["group.running".into()], ..Default::default() };
        let (mut seen, mut next): (Vec<Event>, u64) = (Vec::new(), cursor);
        let deadline = started + Duration::from_secs(wait_s);
        let (groups, complete) = loop {
            let state = m.state.state();
            let page = state.events.since(next, &filter, EVENTS_PER_LOOK);
            next = page.next;
            seen.extend(page.events);
            let (groups, settled) = crate::sites::progress(&state, &nodes, &leaving, &seen);
            if settled || Instant::now() >= deadline {
                break (groups, settled);
            }
            tokio::time::sleep(SWITCHOVER_POLL).await;
        };
        let report = SwitchoverReport {
            site: site.into(),
            started_ms,
            took_ms: started.elapsed().as_millis() as u64,
            complete,
            groups,
        };
        let moved = report.groups.iter().filter(|g| g.result == "moved").count();
        let worst = report.groups.iter().filter_map(|g| g.outage_ms).max();
        let (sev, how) = if complete { (Severity::Info, "done") } else { (Severity::Warning, "incomplete") };
        self.emit(
            Event::new(
                crate::security::now_ms(),
                "site.switchover",
                sev,
                format!(
                    "switchover of site {site} {how}: {moved} of {} groups moved in {:.1}s",
                    report.groups.len(),
                    report.took_ms as f64 / 1000.0
                ),
            )
            .details(serde_json::json!({
                "site": site, "complete": complete, "moved": moved, "groups": report.groups.len(),
                "took_ms": report.took_ms, "max_outage_ms": worst,
                "by": tandem_http_api::auth::asked_by(),
            })),
        );
        Ok(report)
    }
}
