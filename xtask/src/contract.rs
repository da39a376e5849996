//! `cargo xtask contract`: the API's OpenAPI document checked against the
//! running API by schemathesis, a property-based contract tester, with
//! every check and every phase (examples, coverage, fuzzing, stateful).
//!
//! By default it starts a throwaway 3-node cluster (`tandem demo` in a
//! fresh directory, ports 7651-7653): the tester removes nodes, defines and
//! deletes groups, so it must never point at a cluster anyone uses. With
//! `--url` it tests that API instead. The run is reproducible: a fixed seed
//! (`--seed`), a fixed number of cases per operation, one worker.
//! schemathesis lives in a venv under the target directory, pinned.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::packages::{self, Job};
use crate::{cargo, run, target_dir, Fail};

/// The schemathesis release the contract is checked with.
pub const SCHEMATHESIS: &str = "4.32.5";

pub const USAGE: &str = "  contract [--url URL] [--token T] [--cacert FILE] [--seed N] [--max-examples N]
                check the API against its OpenAPI document with schemathesis (a throwaway 3-node cluster unless --url)";

struct Options {
    url: Option<String>,
    token: Option<String>,
    cacert: Option<String>,
    seed: String,
    max_examples: String,
}

fn parse(args: &[String]) -> Result<Options, Fail> {
    let mut o = Options { url: None, token: None, cacert: None, seed: "1".into(), max_examples: "50".into() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| Fail(format!("{a} needs a value")));
        match a.as_str() {
            "--url" => o.url = Some(value()?.trim_end_matches('/').to_string()),
            "--token" => o.token = Some(value()?),
            "--cacert" => o.cacert = Some(value()?),
            "--seed" => o.seed = value()?,
            "--max-examples" => o.max_examples = value()?,
            other => return Err(Fail(format!("contract: unknown argument {other}\n{USAGE}"))),
        }
    }
    Ok(o)
}

pub fn contract(args: &[String]) -> Result<(), Fail> {
    let mut o = parse(args)?;
    packages::ensure(Job::Contract)?;
    let target = target_dir()?;
    let st = schemathesis(&target)?;
    let mut cluster = None;
    if o.url.is_none() {
        let mut c = cargo();
        c.args(["build", "--locked", "--bin", "tandem"]);
        run(c)?;
        let demo = Demo::start(&target)?;
        // The demo serves HTTPS and writes its CA and admin token there.
        let (token, ca) = demo.credentials()?;
        o.token = o.token.or(Some(token));
        o.cacert = o.cacert.or(Some(ca));
        let scheme = if o.cacert.is_some() { "https" } else { "http" };
        o.url = Some(format!("{scheme}://127.0.0.1:{}", Demo::PORT));
        cluster = Some(demo);
    }
    let url = o.url.clone().unwrap_or_default();
    wait_ready(&url, &o)?;
    let result = run_schemathesis(&st, &target, &url, &o);
    if let Some(mut demo) = cluster {
        demo.stop();
    }
    result
}

/// The venv's `st`, installed (pinned) when missing or of another version.
fn schemathesis(target: &Path) -> Result<std::path::PathBuf, Fail> {
    let venv = target.join("contract-venv");
    let st = venv.join("bin/st");
    let have = Command::new(&st).arg("--version").output().ok().filter(|o| o.status.success());
    if have.is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains(SCHEMATHESIS)) {
        return Ok(st);
    }
    eprintln!("xtask: installing schemathesis {SCHEMATHESIS} into {} (the contract tester)", venv.display());
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-m", "venv", "--clear"]).arg(&venv);
    run(c)?;
    let mut c = Command::new(venv.join("bin/pip"));
    c.args(["install", "--quiet", &format!("schemathesis=={SCHEMATHESIS}")]);
    run(c)?;
    Ok(st)
}

/// A throwaway `tandem demo` cluster in its own directory.
struct Demo {
    child: Child,
    dir: std::path::PathBuf,
}

impl Demo {
    const PORT: u16 = 7651;

    fn start(target: &Path) -> Result<Demo, Fail> {
        let dir = target.join("contract-cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Fail(format!("{}: {e}", dir.display())))?;
        let log = std::fs::File::create(dir.join("demo.log")).map_err(|e| Fail(format!("demo.log: {e}")))?;
        let err = log.try_clone().map_err(|e| Fail(format!("demo.log: {e}")))?;
        let child = Command::new(target.join("debug/tandem"))
            .args(["demo", "--base-port", &Demo::PORT.to_string(), "--dir"])
            .arg(dir.join("demo"))
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| Fail(format!("cannot start tandem demo: {e}")))?;
        eprintln!("xtask: a throwaway 3-node cluster on ports {}-{} ({})", Demo::PORT, Demo::PORT + 2, dir.display());
        Ok(Demo { child, dir })
    }

    /// The demo's admin token and CA file, once it has formed the cluster.
    fn credentials(&self) -> Result<(String, String), Fail> {
        let (token, ca) = (self.dir.join("demo/admin.token"), self.dir.join("demo/ca.pem"));
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let (Ok(t), true) = (std::fs::read_to_string(&token), ca.exists()) {
                if !t.trim().is_empty() {
                    return Ok((t.trim().to_string(), ca.display().to_string()));
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(Fail(format!(
            "the demo wrote no {} within 90 s (see {})",
            token.display(),
            self.dir.join("demo.log").display()
        )))
    }

    /// Ctrl-C, as a user would: the demo stops its agents cleanly.
    fn stop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn curl(url: &str, o: &Options) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sf", "-o", "/dev/null", "--max-time", "2"]);
    if let Some(t) = &o.token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(ca) = &o.cacert {
        c.args(["--cacert", ca]);
    }
    c.arg(url);
    c
}

/// Waits until the API answers `/readyz` (a member of a cluster with a leader).
fn wait_ready(url: &str, o: &Options) -> Result<(), Fail> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if curl(&format!("{url}/readyz"), o).status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(Fail(format!("{url}/readyz did not answer 200 within 60 s")))
}

fn run_schemathesis(st: &Path, target: &Path, url: &str, o: &Options) -> Result<(), Fail> {
    let here = crate::root().join("xtask/contract");
    let reports = target.join("contract-report");
    let mut c = Command::new(st);
    // schemathesis keeps a cache in its working directory: not the repository.
    c.current_dir(target);
    c.arg("--config-file").arg(here.join("schemathesis.toml"));
    c.args(["run", &format!("{url}/openapi.json")]);
    c.args(["--checks", "all", "--phases", "examples,coverage,fuzzing,stateful"]);
    c.args(["--seed", &o.seed, "--max-examples", &o.max_examples, "--workers", "1"]);
    // A group's DELETE waits up to 60 s for it to stop.
    c.args(["--request-timeout", "70", "--report", "junit,ndjson"]).arg("--report-dir").arg(&reports);
    if let Some(t) = &o.token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(ca) = &o.cacert {
        c.args(["--tls-verify", ca]);
    }
    c.env("SCHEMATHESIS_HOOKS", "tandem_hooks").env("PYTHONPATH", &here).env("TANDEM_CONTRACT_URL", url);
    if let Some(t) = &o.token {
        c.env("TANDEM_CONTRACT_TOKEN", t);
    }
    if let Some(ca) = &o.cacert {
        c.env("TANDEM_CONTRACT_CACERT", ca);
    }
    let start = Instant::now();
    let r = run(c);
    eprintln!("xtask: contract run took {:.0} s; reports in {}", start.elapsed().as_secs_f64(), reports.display());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let args: Vec<String> =
            ["--token", "t", "--cacert", "/ca.pem", "--seed", "7", "--url", "https://h:1/"].map(String::from).to_vec();
        let o = parse(&args).unwrap();
        assert_eq!(
            (o.token.as_deref(), o.cacert.as_deref(), o.seed.as_str(), o.url.as_deref()),
            (Some("t"), Some("/ca.pem"), "7", Some("https://h:1"))
        );
        assert!(parse(&["--bogus".to_string()]).is_err());
        assert!(parse(&["--token".to_string()]).is_err());
    }
}
