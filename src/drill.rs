//! `tandem site drill <site>`: a disaster-recovery drill driven through the
//! public API — switch every group off the site (`POST
//! /v1/sites/{site}/switchover`), bring the site back online, move each
//! group back to the node it ran on, and report per group both outages and
//! the RPO. The report is JSON (`--json`) or a summary an auditor can keep.
//! It only calls the API: what it asks is audited like any other request.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tandem_http_api::{EventList, GroupView, SiteGroupReport, SiteView, SwitchoverReport, VolumeView};

use crate::cli::{enc, parse, CliError, Client};

/// How often the way back looks at a group.
const POLL: Duration = Duration::from_millis(100);

/// One group's way back to the node it ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackReport {
    pub group: String,
    pub from: Option<String>,
    pub to: String,
    /// `back` (running on its node again) or `not_back` (at the timeout).
    pub result: String,
    pub outage_ms: Option<u64>,
    pub rpo_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    pub site: String,
    /// When it began (RFC 3339, UTC) and how long it took.
    pub started: String,
    pub took_ms: u64,
    /// Every group left the site and came back.
    pub passed: bool,
    pub out: SwitchoverReport,
    pub back: Vec<BackReport>,
}

/// The newest `group.running` event of `group` (its id and event), and the
/// id the log is at.
async fn last_running(c: &Client, group: &str) -> Result<(u64, Option<tandem_raft::events::Event>), CliError> {
    let page: EventList =
        parse(c.call(Method::GET, &format!("/v1/events?kind=group.running&group={}", enc(group)), None).await?)?;
    Ok((page.next, page.events.into_iter().last()))
}

pub async fn run(c: &Client, site: &str, timeout_s: u64) -> Result<DrillReport, CliError> {
    let began = Instant::now();
    let started = tandem_raft::events::rfc3339(crate::security::now_ms());
    let sites: Vec<SiteView> = parse(c.call(Method::GET, "/v1/sites", None).await?)?;
    if !sites.iter().any(|s| s.name == site) {
        let known: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        return Err(CliError::Input(format!("no site {site}; the sites are: {}", known.join(", "))));
    }
    let out: SwitchoverReport = parse(
        c.call(Method::POST, &format!("/v1/sites/{}/switchover", enc(site)), Some(json!({"timeout_s": timeout_s})))
            .await?,
    )?;
    c.call(Method::POST, &format!("/v1/sites/{}/online", enc(site)), None).await?;

    // Back in dependency order: a group that others colocate with first.
    let groups: Vec<GroupView> = parse(c.call(Method::GET, "/v1/groups", None).await?)?;
    let colocated =
        |g: &SiteGroupReport| groups.iter().find(|v| v.name == g.group).is_some_and(|v| v.spec.colocate_with.is_some());
    let mut moved: Vec<&SiteGroupReport> = out.groups.iter().filter(|g| g.result == "moved").collect();
    moved.sort_by_key(|g| colocated(g));
    let mut back = Vec::new();
    for g in moved {
        back.push(move_back(c, g, timeout_s).await?);
    }
    let passed = out.complete
        && out.groups.iter().all(|g| g.result == "moved" || g.result == "stopped")
        && back.iter().all(|b| b.result == "back");
    Ok(DrillReport { site: site.into(), started, took_ms: began.elapsed().as_millis() as u64, passed, out, back })
}

async fn move_back(c: &Client, g: &SiteGroupReport, timeout_s: u64) -> Result<BackReport, CliError> {
    let path = format!("/v1/groups/{}", enc(&g.group));
    let rpo = match &g.volume {
        Some(v) => {
            let view: VolumeView = parse(c.call(Method::GET, &format!("/v1/volumes/{}", enc(v)), None).await?)?;
            crate::sites::rpo_by_replica(&view).into_iter().find(|(n, _)| *n == g.from).map(|(_, b)| b)
        }
        None => None,
    };
    let (cursor, _) = last_running(c, &g.group).await?;
    let now: GroupView = parse(c.call(Method::GET, &path, None).await?)?;
    // Its failback policy may already be taking it home.
    if now.node.as_deref() != Some(g.from.as_str()) && now.move_to.as_deref() != Some(g.from.as_str()) {
        c.call(Method::POST, &format!("{path}/move"), Some(json!({"to": g.from}))).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let v: GroupView = parse(c.call(Method::GET, &path, None).await?)?;
        let (_, last) = last_running(c, &g.group).await?;
        let started_home = last.filter(|e| e.id > cursor && e.node.as_deref() == Some(g.from.as_str()));
        if v.node.as_deref() == Some(g.from.as_str()) && v.state == "running" {
            if let Some(e) = started_home {
                return Ok(BackReport {
                    group: g.group.clone(),
                    from: g.to.clone(),
                    to: g.from.clone(),
                    result: "back".into(),
                    outage_ms: e.details["outage_ms"].as_u64(),
                    rpo_bytes: rpo,
                });
            }
        }
        if Instant::now() >= deadline {
            return Ok(BackReport {
                group: g.group.clone(),
                from: g.to.clone(),
                to: g.from.clone(),
                result: "not_back".into(),
                outage_ms: None,
                rpo_bytes: rpo,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The summary printed without `--json`.
pub fn summary(r: &DrillReport) -> String {
    let mut s = format!(
        "DR drill of site {}: {} (began {}, took {:.1}s)\n",
        r.site,
        if r.passed { "PASSED" } else { "FAILED" },
        r.started,
        r.took_ms as f64 / 1000.0
    );
    s += &format!("\nswitchover off {} ({} groups):\n", r.site, r.out.groups.len());
    s += &crate::cli::switchover_table(&r.out.groups);
    s += &format!("\nback to {}:\n", r.site);
    let rows: Vec<Vec<String>> = r
        .back
        .iter()
        .map(|b| {
            vec![
                b.group.clone(),
                b.from.clone().unwrap_or_else(|| "-".into()),
                b.to.clone(),
                b.result.clone(),
                crate::cli::secs(b.outage_ms),
                b.rpo_bytes.map_or_else(|| "-".into(), |b| format!("{b}B")),
            ]
        })
        .collect();
    s += &crate::cli::table(&["GROUP", "FROM", "TO", "RESULT", "OUTAGE", "RPO"], &rows);
    s
}
