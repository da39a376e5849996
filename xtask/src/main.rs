//! `cargo xtask`: the project's commands for a fresh Debian machine with
//! Rust. Each first installs the Debian packages it needs and lacks (one
//! list, with why: `packages.rs`), then builds and runs:
//!
//! - `cargo xtask demo [ARGS]`: the local 3-node demo (`tandem demo ARGS`, release build);
//! - `cargo xtask test`: what CI runs (`.ci/run`): fmt, clippy, the test suite, the simulator,
//!   four chaos runs and the contract run;
//! - `cargo xtask deb`: the Debian package (`deb.rs`), printing its path;
//! - `cargo xtask contract`: the API checked against its OpenAPI document by a
//!   property-based contract tester (`contract.rs`).
//!
//! std only, so that it builds before any system package is there. It never
//! changes the system beyond `apt-get install` of the listed packages (and
//! `cargo install cargo-nextest` when `test` lacks it).

mod contract;
mod deb;
mod packages;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use packages::Job;

/// Why a command could not be done; printed as `xtask: error: ...`.
#[derive(Debug)]
pub struct Fail(pub String);

const USAGE: &str = "usage: cargo xtask <command>
  demo [ARGS]   install what the demo needs, then run the local 3-node cluster (tandem demo ARGS)
  test          install what the tests need, then run fmt, clippy, the test suite, the simulator, four chaos runs and the contract run (as CI does)
  deb           build the Debian package (target/debian/tandem_<version>_<arch>.deb)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("test") if args.len() == 1 => test(),
        Some("deb") if args.len() == 1 => deb::build().map(|p| println!("{}", p.display())),
        Some("contract") => contract::contract(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}{}", contract::USAGE);
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}{}", contract::USAGE);
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(why)) => {
            eprintln!("xtask: error: {why}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace's root directory (this crate is `<root>/xtask`).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace")
}

/// `cargo`, the one running us when there is one.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command with our stdio, saying what it runs; fails on a non-zero exit.
pub fn run(mut cmd: Command) -> Result<(), Fail> {
    let shown = show(&cmd);
    eprintln!("$ {shown}");
    let status = cmd.status().map_err(|e| Fail(format!("cannot run {shown}: {e}")))?;
    if !status.success() {
        return Err(Fail(format!("{shown}: {status}")));
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
pub fn output(mut cmd: Command) -> Result<String, Fail> {
    let shown = show(&cmd);
    let out = cmd.output().map_err(|e| Fail(format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        return Err(Fail(format!("{shown}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr))));
    }
    String::from_utf8(out.stdout).map_err(|_| Fail(format!("{shown}: output is not UTF-8")))
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Cargo's target directory (CARGO_TARGET_DIR, a config's target-dir, or `target/`).
pub fn target_dir() -> Result<PathBuf, Fail> {
    let mut c = cargo();
    c.args(["metadata", "--format-version", "1", "--no-deps", "--offline"]);
    let json = output(c)?;
    json_string(&json, "target_directory")
        .map(PathBuf::from)
        .ok_or_else(|| Fail("cargo metadata gave no target_directory".into()))
}

/// The string value of the first `"key":` in a JSON text (escapes decoded,
/// except \u, which paths do not need).
fn json_string(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => return None,
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

fn demo(args: &[String]) -> Result<(), Fail> {
    packages::ensure(Job::Demo)?;
    if wants_postgres(args) {
        packages::ensure(Job::DemoPostgres)?;
    }
    let mut c = cargo();
    c.args(["run", "--release", "--locked", "--bin", "tandem", "--", "demo"]).args(args);
    eprintln!("$ {}", show(&c));
    // Replace this process: Ctrl-C then reaches the demo alone (cargo too
    // execs the program), which stops its agents cleanly.
    use std::os::unix::process::CommandExt;
    let e = c.exec();
    Err(Fail(format!("cannot run cargo: {e}")))
}

/// Whether the demo's arguments ask for `--app postgres`.
fn wants_postgres(args: &[String]) -> bool {
    args.iter().any(|a| a == "--app=postgres") || args.windows(2).any(|w| w[0] == "--app" && w[1] == "postgres")
}

/// Whether the package test may install into this machine: only as root and
/// when asked (CI=true, as CI sets, or TANDEM_DEB_TEST=1). The same rule is in
/// tests/package.rs.
pub fn package_test_allowed() -> Result<(), String> {
    if !packages::is_root() {
        return Err("not root".into());
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let asked = std::env::var("TANDEM_DEB_TEST").is_ok_and(|v| v == "1");
    if !(ci || asked) {
        return Err("neither CI=true nor TANDEM_DEB_TEST=1 is set".into());
    }
    Ok(())
}

fn test() -> Result<(), Fail> {
    packages::ensure(Job::Test)?;
    rust_tools()?;
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    run(c)?;
    let mut c = cargo();
    c.args(["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]);
    run(c)?;

    // The package test (tests/package.rs) installs the .deb built here.
    let deb = match package_test_allowed() {
        Ok(()) => Some(deb::build()?),
        Err(why) => {
            eprintln!("xtask: the package test will skip ({why}: it installs into this machine), so no .deb is built");
            None
        }
    };
    let mut c = cargo();
    c.args(["nextest", "run", "--workspace", "--locked"]);
    if let Some(deb) = &deb {
        c.env("TANDEM_DEB", deb);
    }
    run(c)?;

    // The deterministic simulator's fixed batch (the real decision cores of
    // every node over a simulated network and clocks; exits non-zero on a
    // violation).
    let mut c = cargo();
    c.args(["run", "--locked", "-p", "tandem-sim", "--", "--seeds", "500"]);
    run(c)?;

    // Short fixed-seed chaos runs (every fault kind at least once; one
    // site, then two sites and a witness, then two clusters), with the
    // debug agents just built.
    let mut c = cargo();
    c.args(["build", "--locked", "-p", "tandem-chaos", "--bin", "tandem-chaos"]);
    run(c)?;
    let mut c = cargo();
    c.args(["build", "--locked", "--bin", "tandem"]);
    run(c)?;
    let target = target_dir()?;
    let chaos = target.join("debug/tandem-chaos").display().to_string();
    let report = |name: &str| target.join(name).display().to_string();
    let one_site = report("chaos-report.json");
    run(packages::as_root(&[&chaos, "--seed", "1", "--rounds", "13", "--report", &one_site])?)?;
    let sites = report("chaos-sites-report.json");
    run(packages::as_root(&[&chaos, "--seed", "1", "--rounds", "3", "--sites", "--report", &sites])?)?;
    // Two clusters and the ticket between them: every kind of its faults
    // once (about a minute and a half).
    let clusters = report("chaos-clusters-report.json");
    run(packages::as_root(&[&chaos, "--clusters", "--seed", "1", "--rounds", "7", "--report", &clusters])?)?;
    // PostgreSQL on a replicated volume with the bank workload (about 6 s
    // a round).
    let bank = report("chaos-postgres-report.json");
    run(packages::as_root(&[&chaos, "--workload", "postgres", "--seed", "1", "--rounds", "6", "--report", &bank])?)?;
    // The API against its OpenAPI document: schemathesis over HTTPS with
    // the admin token, every phase, seed 1 (about 3-5 minutes).
    contract::contract(&[])
}

/// rustfmt, clippy and cargo-nextest: installed with rustup and cargo when missing.
fn rust_tools() -> Result<(), Fail> {
    let has = |sub: &str| {
        let mut c = cargo();
        c.args([sub, "--version"]);
        c.output().is_ok_and(|o| o.status.success())
    };
    for (component, sub) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        if !has(sub) {
            eprintln!("xtask: installing the {component} component: `cargo xtask test` checks formatting and lints");
            let mut c = Command::new("rustup");
            c.args(["component", "add", component]);
            run(c)?;
        }
    }
    if !has("nextest") {
        eprintln!(
            "xtask: installing cargo-nextest: it runs the test suite (each test in its own process, with timeouts)"
        );
        let mut c = cargo();
        c.args(["install", "cargo-nextest", "--locked"]);
        run(c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_reads_a_key_and_its_escapes() {
        let json = r#"{"packages":[],"target_directory":"/var/tmp/a \"b\"\\c","version":1}"#;
        assert_eq!(json_string(json, "target_directory").as_deref(), Some("/var/tmp/a \"b\"\\c"));
        assert_eq!(json_string(json, "workspace_root"), None);
    }

    #[test]
    fn the_postgres_demo_gets_its_packages() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants_postgres(&args(&["--base-port", "7501", "--app", "postgres"])));
        assert!(wants_postgres(&args(&["--app=postgres"])));
        assert!(!wants_postgres(&args(&["--app", "web"])));
        let names: Vec<&str> = packages::needed(Job::DemoPostgres).into_iter().map(|(n, _)| n).collect();
        for want in ["postgresql", "libnbd-bin", "e2fsprogs"] {
            assert!(names.contains(&want), "{want}");
        }
    }

    #[test]
    fn every_package_has_a_reason_and_a_job() {
        for p in packages::PACKAGES {
            assert!(p.why.len() > 10 && !p.jobs.is_empty(), "{}", p.name);
        }
        // What the .deb wants is installed before the package test runs.
        let test: Vec<&str> = packages::needed(Job::Test).into_iter().map(|(n, _)| n).collect();
        for (name, _) in deb::DEPENDS.iter().chain(deb::RECOMMENDS) {
            assert!(test.contains(name), "{name}");
        }
        // README.md explains each, once, below the two commands.
        let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
        for p in packages::PACKAGES {
            assert!(readme.contains(&format!("`{}`", p.name)), "README.md does not explain {}", p.name);
        }
        for job in [Job::Demo, Job::Test, Job::Deb, Job::Contract] {
            let names: Vec<&str> = packages::needed(job).into_iter().map(|(n, _)| n).collect();
            for build in packages::needed(Job::Build) {
                assert!(names.contains(&build.0), "{job:?} lacks {}", build.0);
            }
        }
    }
}
