//! The web dashboard in a real browser: Debian's Chromium, headless, driven
//! through Debian's chromedriver by fantoccini (no browser is downloaded),
//! against a real 3-node cluster. An admin signs in with a token and sees
//! the three nodes and the demo group; moves the group from the page and
//! sees it run on the new node; powers that node off and sees it offline
//! and the group moved, without a reload. A viewer is offered no action and
//! a forged action from its page is refused. The Chinese screens show no
//! English. Screenshots of each view go to a temp dir (the path is printed).
//!
//! In CI (`CI=true`) a missing browser is a failure; elsewhere the test
//! says why it skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// ASCII words the Chinese screens may show besides the cluster's names:
/// the product's name, the language switch's name for English (each
/// language is named in itself), and byte units.
const ALLOWED_ASCII: &[&str] = &["tandem", "English", "B", "KiB", "MiB", "GiB", "TiB"];

fn browser_present() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "{CHROMIUM} or {CHROMEDRIVER} is missing: `cargo xtask test` installs chromium and chromium-driver");
    eprintln!(
        "skipping the browser test: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
    );
    false
}

/// chromedriver in its own session: dropping it kills it and every browser
/// it started.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        tandem_testkit::kill_session(self.child.id() as i32);
        let _ = self.child.wait();
    }
}

async fn driver() -> Driver {
    let port = free_port();
    let mut cmd = Command::new(CHROMEDRIVER);
    tandem_testkit::new_session(&mut cmd);
    let child = cmd
        .arg(format!("--port={port}"))
        // The browser's time zone, which the page's times must follow (the
        // machine's is UTC: this one differs from it).
        .env("TZ", "Asia/Shanghai")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let d = Driver { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d
}

async fn browser(d: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    // The cluster's own CA signs the agents' certificates; this throwaway
    // browser profile does not know it.
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": CHROMIUM, "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--ignore-certificate-errors", "--window-size=1600,1200", "--lang=en-US",
            format!("--user-data-dir={}", profile.display()),
        ]}),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Runs `script` (a function body) in the page.
async fn js(b: &Client, script: &str) -> Value {
    b.execute(script, Vec::new()).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// Waits until `script` returns something truthy; returns it.
async fn wait_js(b: &Client, what: &str, script: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = b.execute(script, Vec::new()).await.unwrap_or(Value::Null);
        let truthy = match &last {
            Value::Null => false,
            Value::Bool(x) => *x,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = js(b, "return document.body.innerText").await;
    panic!(
        "timed out after {limit:?} waiting for {what} (last: {last}); the page shows:\n{}",
        text.as_str().unwrap_or("")
    );
}

/// Clicks the element `css` as a user would (found again if a refresh
/// replaced it between finding and clicking).
async fn click(b: &Client, css: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        match b.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(err) => last = err.to_string(),
            },
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not click {css}: {last}");
}

/// Chooses `value` in the select `css` (found again if a refresh replaced it).
async fn choose(b: &Client, css: &str, value: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        match b.find(Locator::Css(css)).await {
            Ok(e) => match e.select_by_value(value).await {
                Ok(()) => return,
                Err(err) => last = err.to_string(),
            },
            Err(err) => last = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not choose {value} in {css}: {last}");
}

async fn shot(b: &Client, dir: &Path, name: &str) {
    let png = b.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("the screenshot is written");
}

async fn goto_view(b: &Client, view: &str) {
    click(b, &format!("#nav a[data-view={view}]")).await;
    wait_js(b, view, &format!("return !document.getElementById('view-{view}').hidden"), Duration::from_secs(10)).await;
}

/// The ASCII words in the page's visible text, outside what the cluster
/// wrote itself (`data-raw`).
const VISIBLE_WORDS: &str = r#"
const out = [];
const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
while (w.nextNode()) {
  const p = w.currentNode.parentElement;
  if (!p || p.closest('[data-raw], script, style, option')) continue;
  if (!p.getClientRects().length) continue;
  const s = getComputedStyle(p);
  if (s.display === 'none' || s.visibility === 'hidden') continue;
  for (const m of (w.currentNode.textContent.match(/[A-Za-z][A-Za-z0-9_-]*/g) || [])) out.push(m);
}
return out;"#;

async fn sign_in(b: &Client, token: &str) {
    wait_js(b, "the sign-in form", "return !document.getElementById('signin-view').hidden", Duration::from_secs(10))
        .await;
    let input = b.find(Locator::Id("token")).await.expect("the token field");
    input.send_keys(token).await.expect("typing the token");
    click(b, "#signin").await;
    wait_js(b, "signed in", "return !document.getElementById('view-overview').hidden", Duration::from_secs(10)).await;
}

/// Defines a group through `url`, once that node knows the leader.
async fn define(url: &str, name: &str, spec: Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = put(&format!("{url}/v1/groups/{name}"), spec.clone()).await;
        if st == 201 {
            return;
        }
        assert!(st == 503 && Instant::now() < deadline, "defining {name}: {st} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_a_real_browser() {
    if !browser_present() {
        return;
    }
    let shots: PathBuf = tempfile::Builder::new().prefix("tandem-ui-").tempdir().unwrap().keep();
    println!("screenshots: {}", shots.display());

    let mut c = Cluster::start(&["n1", "n2", "n3"], Opts::default()).await;
    // The page is served by n3, which stays up.
    let url = c.node("n3").url();
    let demo = json!({"nodes": ["n1", "n2", "n3"],
        "resources": [{"name": "srv", "type": "process", "command": ["sleep", "100000"]}]});
    define(&url, "demo", demo).await;
    let store = json!({"nodes": ["n1", "n2"],
        "resources": [{"name": "data", "type": "volume", "size": "16MiB", "mode": "sync", "replicas": 2}]});
    define(&url, "store", store).await;
    let urls = c.live_urls();
    wait_until(Duration::from_secs(30), "demo running", || async {
        group_at(&urls, "demo").await["state"] == "running"
    })
    .await;
    let first = group_at(&urls, "demo").await["node"].as_str().unwrap().to_string();

    // The files: open, typed, and under a strict policy.
    let http = tandem_testkit::api::client();
    let page = http.get(format!("{url}/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let script = http.get(format!("{url}/ui/app.js")).send().await.unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(http.get(format!("{url}/ui/nothing.js")).send().await.unwrap().status(), 404);

    // The profile outlives the driver (dropped after it): the browser is
    // gone before its directory is removed.
    let profile = tempfile::tempdir().unwrap();
    let d = driver().await;
    let b = browser(&d, profile.path()).await;
    b.goto(&format!("{url}/ui/")).await.expect("the page loads");

    // ---- an admin signs in and sees three nodes and the demo group ----
    let admin = c.creds().token.clone();
    sign_in(&b, &admin).await;
    assert!(!b.current_url().await.unwrap().as_str().contains(&admin), "the token is never in the URL");
    assert_eq!(js(&b, "return document.cookie").await, "", "no cookie");
    assert_eq!(js(&b, "return sessionStorage.getItem('tandem.token')").await, admin.as_str());
    wait_js(
        &b,
        "three online nodes",
        "return document.querySelectorAll('#sites [data-node][data-state=online]').length === 3",
        Duration::from_secs(15),
    )
    .await;
    wait_js(
        &b,
        "demo shown on its node",
        &format!("return !!document.querySelector('#sites [data-node={first}] [data-runs=demo]')"),
        Duration::from_secs(10),
    )
    .await;
    let leader = c.leader().await;
    wait_js(
        &b,
        "the leader",
        &format!("return document.getElementById('leader').textContent === '{leader}'"),
        Duration::from_secs(10),
    )
    .await;
    // Each status is a word as well as a colour.
    let status = js(&b, "return document.querySelector('#sites [data-node=n1] .badge.big').textContent").await;
    assert_eq!(status, "online");
    // Every node's lease, held: time left.
    wait_js(
        &b,
        "every node's lease shown as held",
        "return [...document.querySelectorAll('#sites dd[data-lease]')].filter(d => / left$/.test(d.textContent)).length === 3",
        Duration::from_secs(10),
    )
    .await;
    // A marker that a reload would wipe.
    js(&b, "window.__noReload = 'still here'; return true").await;
    shot(&b, &shots, "overview").await;

    // ---- move the group from the page ----
    goto_view(&b, "groups").await;
    wait_js(
        &b,
        "demo running",
        &format!("return !!document.querySelector('[data-group=demo][data-state=running][data-node={first}]')"),
        Duration::from_secs(10),
    )
    .await;
    let target = ["n1", "n2", "n3"].into_iter().find(|n| *n != first && *n != "n3").unwrap().to_string();
    choose(&b, "#move-to-demo", &target).await;
    click(&b, "#move-demo").await;
    // The dialog says beforehand whether the policy allows it.
    let policy = wait_js(
        &b,
        "the confirmation",
        "const d = document.getElementById('confirm'); return d.open && document.getElementById('confirm-policy').textContent",
        Duration::from_secs(10),
    )
    .await;
    assert!(policy.as_str().unwrap().starts_with("Allowed"), "{policy}");
    click(&b, "#confirm-ok").await;
    let moved_at = Instant::now();
    wait_js(
        &b,
        "demo running on the target",
        &format!("return !!document.querySelector('[data-group=demo][data-state=running][data-node={target}]')"),
        Duration::from_secs(30),
    )
    .await;
    println!("move seen on the page after {:?}", moved_at.elapsed());
    assert_eq!(group_at(&c.live_urls(), "demo").await["node"], target.as_str(), "the API agrees");
    wait_js(
        &b,
        "the resource's pid",
        "return !!document.querySelector('[data-group=demo] [data-resource=srv]')",
        Duration::from_secs(10),
    )
    .await;
    shot(&b, &shots, "groups").await;

    // A verify from the page, while both replicas are connected.
    goto_view(&b, "volumes").await;
    wait_js(
        &b,
        "both replicas connected",
        "return document.querySelectorAll('[data-volume=data] [data-replica] .badge.ok').length >= 4",
        Duration::from_secs(20),
    )
    .await;
    click(&b, "#verify-data").await;
    wait_js(
        &b,
        "the verify's report",
        "return !!document.querySelector('[data-volume=data] .verify')",
        Duration::from_secs(15),
    )
    .await;
    // It finishes: a 16 MiB volume is checked in well under that.
    wait_js(
        &b,
        "the verify done",
        "const v = document.querySelector('[data-volume=data] .verify'); return !!v && v.textContent.includes('done')",
        Duration::from_secs(30),
    )
    .await;

    // ---- events: live, and resumed after the page's node restarts ----
    goto_view(&b, "events").await;
    wait_js(
        &b,
        "the stream live",
        "return document.getElementById('stream-state').dataset.state === 'live'",
        Duration::from_secs(10),
    )
    .await;
    wait_js(
        &b,
        "the switchover's outage as a bar",
        "return document.querySelectorAll('#failover-svg rect.bar').length >= 1",
        Duration::from_secs(15),
    )
    .await;
    let drops =
        js(&b, "return Number(document.getElementById('stream-state').dataset.reconnects)").await.as_u64().unwrap();
    c.node_mut("n3").stop();
    // Made while the page's node is down: the resumed stream brings it.
    let (st, v) =
        post(&format!("{}/v1/tokens", c.node("n1").url()), json!({"name": "during-drop", "role": "viewer"})).await;
    assert_eq!(st, 201, "{v}");
    c.node_mut("n3").start().await;
    wait_js(&b, "the event made during the drop", "return [...document.querySelectorAll('#timeline [data-kind=\"token.created\"]')].some(e => e.title.includes('during-drop'))", Duration::from_secs(30))
        .await;
    let after =
        js(&b, "return Number(document.getElementById('stream-state').dataset.reconnects)").await.as_u64().unwrap();
    assert!(after > drops, "the stream reconnected ({drops} -> {after})");
    let ids =
        js(&b, "return [...document.querySelectorAll('#timeline [data-event]')].map(e => Number(e.dataset.event))")
            .await;
    let ids: Vec<u64> = ids.as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "each event once, newest first: {ids:?}");
    // A filter narrows the timeline to warnings and worse.
    choose(&b, "#f-severity", "warning").await;
    wait_js(
        &b,
        "only warnings and worse",
        "const k = [...document.querySelectorAll('#timeline [data-kind]')]; \
         return k.length > 0 && k.every(e => !e.querySelector('.badge.ok'))",
        Duration::from_secs(10),
    )
    .await;
    choose(&b, "#f-severity", "").await;

    // ---- power loss of that node: seen without a reload ----
    goto_view(&b, "overview").await;
    c.node_mut(&target).kill();
    let killed = Instant::now();
    wait_js(
        &b,
        "the killed node offline",
        &format!("return !!document.querySelector('#sites [data-node={target}][data-state=offline]')"),
        Duration::from_secs(20),
    )
    .await;
    let offline_after = killed.elapsed();
    wait_js(
        &b,
        "the killed node's lease shown as lapsed",
        &format!("return document.querySelector('#sites dd[data-lease={target}]').textContent === 'lapsed'"),
        Duration::from_secs(10),
    )
    .await;
    wait_js(
        &b,
        "demo on another node",
        &format!(
            "const g = document.querySelector('#sites [data-runs=demo]'); \
             return !!g && !g.closest('[data-node={target}]')"
        ),
        Duration::from_secs(20),
    )
    .await;
    println!(
        "after the power loss: offline on the page in {offline_after:?}, group elsewhere in {:?}",
        killed.elapsed()
    );
    assert_eq!(js(&b, "return window.__noReload").await, "still here", "the page was not reloaded");
    shot(&b, &shots, "overview-after-power-loss").await;
    goto_view(&b, "events").await;
    wait_js(
        &b,
        "node.offline in the timeline",
        "return !!document.querySelector('#timeline [data-kind=\"node.offline\"]')",
        Duration::from_secs(15),
    )
    .await;
    wait_js(
        &b,
        "the failover's outage as a bar",
        "return document.querySelectorAll('#failover-svg rect.bar').length >= 2",
        Duration::from_secs(15),
    )
    .await;
    shot(&b, &shots, "events").await;

    // A move to the dead node: the dialog says beforehand it will not
    // start, and cancelling sends nothing.
    goto_view(&b, "groups").await;
    let now_on = group_at(&c.live_urls(), "demo").await["node"].as_str().unwrap().to_string();
    wait_js(
        &b,
        "demo moved",
        &format!("return !!document.querySelector('[data-group=demo][data-node={now_on}]')"),
        Duration::from_secs(10),
    )
    .await;
    choose(&b, "#move-to-demo", &target).await;
    click(&b, "#move-demo").await;
    let policy = wait_js(
        &b,
        "the refusal foretold",
        "const d = document.getElementById('confirm'); return d.open && document.getElementById('confirm-policy').textContent",
        Duration::from_secs(10),
    )
    .await;
    assert!(policy.as_str().unwrap().starts_with("Will not start"), "{policy}");
    click(&b, "#confirm-cancel").await;
    wait_js(&b, "the dialog closed", "return !document.getElementById('confirm').open", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(group_at(&c.live_urls(), "demo").await["node"], now_on.as_str(), "a cancelled move sends nothing");

    // ---- volumes ----
    goto_view(&b, "volumes").await;
    wait_js(
        &b,
        "the volume's replicas",
        "return document.querySelectorAll('[data-volume=data] [data-replica]').length === 2",
        Duration::from_secs(20),
    )
    .await;
    shot(&b, &shots, "volumes").await;

    // ---- audit (admin): the move the page sent ----
    goto_view(&b, "audit").await;
    wait_js(
        &b,
        "the move in the audit log",
        "return [...document.querySelectorAll('#audit tr')].some(r => r.textContent.includes('POST /v1/groups/demo/move'))",
        Duration::from_secs(15),
    )
    .await;
    shot(&b, &shots, "audit").await;

    // Every control has a name a screen reader says, and is a real control.
    for view in ["overview", "groups", "volumes", "events", "audit"] {
        goto_view(&b, view).await;
        let unnamed = js(
            &b,
            "return [...document.querySelectorAll('button, select, input, a')].filter(e => e.getClientRects().length) \
               .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim())) \
               .map(e => e.outerHTML)",
        )
        .await;
        assert_eq!(unnamed, json!([]), "unlabelled controls on {view}");
        let fake = js(
            &b,
            "return document.querySelectorAll('main [onclick], main div[data-action], main span[data-action]').length",
        )
        .await;
        assert_eq!(fake, 0, "actions are buttons");
    }
    // Readable on a wall screen: the same page, larger.
    goto_view(&b, "overview").await;
    b.set_window_size(2560, 1440).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    shot(&b, &shots, "overview-wall").await;
    b.set_window_size(1600, 1200).await.unwrap();

    // ---- 简体中文: no English left on any screen ----
    choose(&b, "#lang", "zh").await;
    wait_js(&b, "Chinese", "return document.documentElement.lang === 'zh-CN'", Duration::from_secs(10)).await;
    // Times in the browser's zone (UTC+8 here), not the cluster's UTC.
    goto_view(&b, "events").await;
    let local = js(
        &b,
        "const t = document.querySelector('#timeline time'); const d = new Date(t.getAttribute('datetime')); \
         const h = (d.getUTCHours() + 8) % 24; const m = String(d.getUTCMinutes()).padStart(2, '0'); \
         return [t.textContent, [' ' + h + ':' + m, ' ' + String(h).padStart(2, '0') + ':' + m].some(x => t.textContent.includes(x))]",
    )
    .await;
    assert_eq!(local[1], true, "the time is shown in the browser's zone: {local}");
    let mut names: Vec<String> =
        ["n1", "n2", "n3", "demo", "store", "srv", "data", "test"].iter().map(|s| s.to_string()).collect();
    names.extend(ALLOWED_ASCII.iter().map(|s| s.to_string()));
    let screens = [
        ("overview", "[data-node=n1]", "投票节点"),
        ("groups", "[data-group=demo] [data-resource=srv]", "迁移到"),
        ("volumes", "[data-volume=data] [data-replica]", "副本"),
        ("events", "#timeline [data-kind]", "时间线"),
        ("audit", "#audit [data-audit]", "操作者"),
    ];
    for (view, shown, word) in screens {
        goto_view(&b, view).await;
        wait_js(&b, view, &format!("return !!document.querySelector('#view-{view} {shown}')"), Duration::from_secs(10))
            .await;
        tokio::time::sleep(Duration::from_millis(1200)).await; // a poll's refresh, in Chinese too
        let text = js(&b, "return document.body.innerText").await;
        assert!(text.as_str().unwrap().contains(word), "{view}: no {word} in {text}");
        let words = js(&b, VISIBLE_WORDS).await;
        let english: Vec<&str> = words
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .filter(|w| !names.iter().any(|n| n == w))
            .collect();
        assert!(english.is_empty(), "English on the Chinese {view} screen: {english:?}\n{}", text.as_str().unwrap());
        shot(&b, &shots, &format!("zh-{view}")).await;
    }
    choose(&b, "#lang", "en").await;

    // ---- a viewer: no action offered, and a forged one is refused ----
    let (st, v) = post(&format!("{url}/v1/tokens"), json!({"name": "wall", "role": "viewer"})).await;
    assert_eq!(st, 201, "{v}");
    let viewer = v["token"].as_str().unwrap().to_string();
    click(&b, "#signout").await;
    assert_eq!(
        js(&b, "return sessionStorage.getItem('tandem.token')").await,
        Value::Null,
        "signing out forgets the token"
    );
    sign_in(&b, &viewer).await;
    wait_js(
        &b,
        "the nodes",
        "return document.querySelectorAll('#sites [data-node]').length === 3",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(js(&b, "return document.getElementById('nav-audit').hidden").await, true, "no audit for a viewer");
    for (view, shown) in
        [("overview", "[data-node=n1]"), ("groups", "[data-group=demo]"), ("volumes", "[data-volume=data]")]
    {
        goto_view(&b, view).await;
        wait_js(&b, view, &format!("return !!document.querySelector('#view-{view} {shown}')"), Duration::from_secs(10))
            .await;
        let buttons = js(&b, "return document.querySelectorAll('main [data-action]').length").await;
        assert_eq!(buttons, 0, "a viewer is offered actions on {view}");
        shot(&b, &shots, &format!("viewer-{view}")).await;
    }
    wait_js(&b, "demo shown", "return !!document.querySelector('[data-group=demo]')", Duration::from_secs(10)).await;
    let forged = b
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/v1/groups/demo/move', {method: 'POST', headers: {Authorization: 'Bearer ' + sessionStorage.getItem('tandem.token')}, \
               body: JSON.stringify({to: 'n3'})}).then(r => r.json().then(b => done([r.status, b.code])))",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(forged, json!([403, "TND-1502"]), "a viewer's forged move");
    assert_ne!(group_at(&c.live_urls(), "demo").await["node"], "n3", "the forged move changed nothing");

    b.close().await.ok();
    println!("screenshots of each view: {}", shots.display());
}
