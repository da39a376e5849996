//! Every `curl` of README.md and docs/api.md, run: each command line of a
//! ```sh block (continuation lines and multi-line quoted bodies joined),
//! in the order of the documents, against a real five-node cluster on
//! loopback, with the HTTPS credentials the docs tell users to export
//! (`TANDEM_TOKEN`, `TANDEM_CACERT`; the harness sets both).
//!
//! Each must exit 0 and get an answer that is JSON (or empty, for a 204)
//! and neither 401, 403 nor 5xx: the credentials, the routes and the bodies
//! the docs show are accepted. Other 4xx are fine — the examples run in
//! order on one cluster, so a `DELETE` before a `POST .../start`, or a
//! resolve without a split brain, is refused on its merits, and says so in
//! JSON. A command the docs end with `# (not run: <why>)` is skipped
//! (sparingly: a join of an agent that does not exist, say).
//!
//! What the test changes in a command, and only that: the docs' addresses
//! (`127.0.0.1:7401/7403/7405`, `10.0.0.1-3:7401`) become the test nodes'
//! URLs; `/var/lib/tandem/admin.sock` becomes node1's admin socket; a
//! volume's `20GiB` becomes `64MiB` (the test's disk), `40GiB` (its
//! online grow) `128MiB`; a `vip` on `eth0`
//! gets an interface that does not exist, so that no address is ever added
//! to this machine's network. `-d @file.json` reads the ```json block that
//! precedes the command in the document ("the files shown").

mod common;

use std::process::Command;

use common::*;

/// The reference first: it defines the groups and the volume the README's
/// examples then look at.
const DOCS: [&str; 2] = ["docs/api.md", "README.md"];

/// A curl command of a document.
#[derive(Debug)]
struct Example {
    doc: &'static str,
    line: usize,
    text: String,
    /// The ```json block before it, for `-d @file.json`.
    json_before: Option<String>,
    /// Why it is not run, if the doc says so.
    not_run: Option<String>,
}

/// Whether a shell command is complete: no open quote, no trailing `\`.
fn complete(cmd: &str) -> bool {
    let (mut single, mut double, mut escaped) = (false, false, false);
    for c in cmd.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if !single => escaped = true,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
    }
    // A trailing backslash escapes the newline: the command goes on.
    !single && !double && !escaped
}

fn examples(doc: &'static str, text: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let (mut fence, mut json_block, mut last_json) = (None::<String>, Vec::new(), None::<String>);
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            match &fence {
                None => fence = Some(lang.to_string()),
                Some(f) => {
                    assert!(cur.is_none(), "{doc}:{}: a code block ends inside a curl command", i + 1);
                    if f == "json" {
                        last_json = Some(json_block.join("\n"));
                    }
                    json_block.clear();
                    fence = None;
                }
            }
            continue;
        }
        match fence.as_deref() {
            Some("json") => json_block.push(line),
            Some("sh") => {
                if let Some((start, mut cmd)) = cur.take() {
                    cmd.push('\n');
                    cmd.push_str(line);
                    cur = Some((start, cmd));
                } else if trimmed.starts_with("curl ") {
                    cur = Some((i + 1, trimmed.to_string()));
                }
                if let Some((start, cmd)) = cur.take() {
                    if complete(&cmd) {
                        let not_run =
                            cmd.split_once("# (not run:").map(|(_, why)| why.trim_end_matches(')').trim().into());
                        out.push(Example { doc, line: start, text: cmd, json_before: last_json.clone(), not_run });
                    } else {
                        cur = Some((start, cmd));
                    }
                }
            }
            _ => {}
        }
    }
    assert!(cur.is_none(), "{doc}: the document ends inside a curl command");
    out
}

/// The test cluster in place of the docs' addresses.
struct Rewrite {
    hosts: Vec<(String, String)>,
    socket: String,
}

impl Rewrite {
    fn apply(&self, cmd: &str) -> String {
        let mut out = cmd.replace("/var/lib/tandem/admin.sock", &self.socket);
        // In two steps, so that a test port equal to a doc port is not
        // rewritten twice.
        for (i, (doc, _)) in self.hosts.iter().enumerate() {
            out = out.replace(&format!("https://{doc}"), &format!("\u{0}{i}\u{0}"));
        }
        for (i, (_, ours)) in self.hosts.iter().enumerate() {
            out = out.replace(&format!("\u{0}{i}\u{0}"), ours);
        }
        out.replace("\"size\": \"20GiB\"", "\"size\": \"64MiB\"")
            .replace("\"size\": \"40GiB\"", "\"size\": \"128MiB\"")
            .replace("\"interface\": \"eth0\"", "\"interface\": \"tnd-doc-none\"")
    }

    /// Every URL of a rewritten command reaches the test cluster (or the
    /// admin socket, as `http://localhost`).
    fn check_urls(&self, cmd: &str) -> Result<(), String> {
        let ours: Vec<&str> = self.hosts.iter().map(|(_, o)| o.as_str()).collect();
        for (at, _) in cmd.match_indices("://") {
            let start = cmd[..at].rfind(|c: char| !c.is_ascii_alphabetic()).map_or(0, |p| p + 1);
            let url = &cmd[start..];
            let ok = ours.iter().any(|o| url.starts_with(o))
                || (url.starts_with("http://localhost/") && cmd.contains("--unix-socket"));
            if !ok {
                return Err(format!("a URL this test does not map: {}", url.split_whitespace().next().unwrap_or(url)));
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_curl_in_the_readme_and_the_api_reference_works() {
    let mut all = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(format!("{}/{doc}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        all.extend(examples(doc, &text));
    }
    let runnable = all.iter().filter(|e| e.not_run.is_none()).count();
    assert!(runnable >= 60, "only {runnable} runnable curls in {DOCS:?}: the parser lost some");

    // The N+1, M+N and anti-affinity examples place groups on node4 and
    // node5.
    let c = Cluster::start(&["node1", "node2", "node3", "node4", "node5"], Opts::default()).await;
    // The docs' node1..3 on their ports.
    let url = |i: usize| c.nodes[i].url();
    let rw = Rewrite {
        hosts: vec![
            ("127.0.0.1:7401".into(), url(0)),
            ("127.0.0.1:7403".into(), url(1)),
            ("127.0.0.1:7405".into(), url(2)),
            ("10.0.0.1:7401".into(), url(0)),
            ("10.0.0.2:7401".into(), url(1)),
            ("10.0.0.3:7401".into(), url(2)),
        ],
        socket: c.nodes[0].socket().display().to_string(),
    };
    let work = c.tmp.path().join("doc-curls");
    std::fs::create_dir_all(&work).unwrap();
    let (token, cacert) = (std::env::var("TANDEM_TOKEN").unwrap(), std::env::var("TANDEM_CACERT").unwrap());

    let mut failures = Vec::new();
    let (mut ran, mut ok2xx) = (0, 0);
    for ex in &all {
        let at = format!("{}:{}", ex.doc, ex.line);
        if let Some(why) = &ex.not_run {
            eprintln!("{at}: not run: {why}");
            continue;
        }
        let cmd = rw.apply(&ex.text);
        if let Err(e) = rw.check_urls(&cmd) {
            failures.push(format!("{at}: {e}\n{}", ex.text));
            continue;
        }
        // "The files shown": the JSON block the document shows before it.
        if let Some(file) = cmd.split_whitespace().find_map(|w| w.strip_prefix("@")) {
            let Some(json) = &ex.json_before else {
                failures.push(format!("{at}: -d @{file} but no ```json block before it"));
                continue;
            };
            std::fs::write(work.join(file), json).unwrap();
        }
        // The status on a line of its own after the body.
        let cmd = cmd.replacen("curl ", "curl -w '\\n%{http_code}\\n' ", 1);
        let out = Command::new("timeout")
            .args(["90", "sh", "-c", &cmd])
            .current_dir(&work)
            .env("TANDEM_TOKEN", &token)
            .env("TANDEM_CACERT", &cacert)
            .output()
            .unwrap();
        ran += 1;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let trimmed = stdout.trim_end_matches('\n');
        let (body, status) = trimmed.rsplit_once('\n').unwrap_or(("", trimmed));
        let status: u16 = status.trim().parse().unwrap_or(0);
        eprintln!("{at}: {status} {}", body.chars().take(160).collect::<String>().replace('\n', " "));
        // `GET /metrics` answers in Prometheus's text format, not JSON.
        let metrics_ok = ex.text.contains("/metrics") && body.starts_with("# HELP ");
        // The event stream never ends: its example stops it with
        // `--max-time` (curl's exit 28); what it got must be Server-Sent
        // Events whose data are JSON.
        let streaming = cmd.contains("/v1/events/stream");
        let json_ok = if streaming {
            let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            !data.is_empty() && data.iter().all(|d| serde_json::from_str::<serde_json::Value>(d).is_ok())
        } else {
            body.trim().is_empty() && status == 204
                || serde_json::from_str::<serde_json::Value>(body).is_ok()
                || metrics_ok
        };
        let stopped_in_time = streaming && out.status.code() == Some(28);
        let problem = if !out.status.success() && !stopped_in_time {
            Some(format!("curl exited {} ({stderr})", out.status))
        } else if status == 0 || status == 401 || status == 403 || status >= 500 {
            Some(format!("answered {status}"))
        } else if !json_ok {
            Some(format!("answered {status} with something that is not JSON"))
        } else {
            None
        };
        match problem {
            Some(p) => failures.push(format!("{at}: {p}: {body}\n{}", ex.text)),
            None if (200..300).contains(&status) => ok2xx += 1,
            None => {}
        }
    }
    eprintln!("{ran} curls run ({ok2xx} answered 2xx), {} not run", all.len() - runnable);
    assert!(failures.is_empty(), "{} doc curls failed:\n\n{}", failures.len(), failures.join("\n\n"));
    // The examples are meant to work, not merely to be refused politely.
    assert!(ok2xx * 4 >= ran * 3, "only {ok2xx} of {ran} doc curls answered 2xx");
}

#[test]
fn the_parser_joins_continuations_and_quoted_bodies_and_honours_not_run_marks() {
    let doc = "text\n```json\n{\"a\": 1}\n```\n```sh\n# c\ncurl -s -X PUT -d '{\n  \"x\": 1\n}' https://h/a\n\
               curl -s -X POST \\\n  https://h/b   # (not run: why)\ntandem status\n  curl -s -d @f.json https://h/c\n```\n\
               ```text\ncurl -s https://h/d\n```\n";
    let ex = examples("doc", doc);
    assert_eq!(ex.len(), 3, "{ex:#?}");
    assert_eq!(ex[0].text, "curl -s -X PUT -d '{\n  \"x\": 1\n}' https://h/a");
    assert_eq!(ex[0].line, 7);
    assert_eq!(ex[1].not_run.as_deref(), Some("why"));
    assert_eq!(ex[2].json_before.as_deref(), Some("{\"a\": 1}"));
    assert!(!complete("curl -d 'a"));
    assert!(!complete("curl \\"));
    assert!(complete("curl -d 'it\"s' x"));
}
