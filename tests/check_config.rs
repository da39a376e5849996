//! `tandem check-config`: the agent's own validation of a node.toml, without
//! starting anything. The examples in docs/config.md must pass it (the
//! Debian package ships the first one as /etc/tandem/node.toml).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// The ```toml blocks of docs/config.md that are whole node files (they
/// set `name`), in order.
fn doc_examples() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md")).unwrap();
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in doc.lines() {
        match &mut block {
            None if line.trim_start() == "```toml" => block = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                if b.lines().any(|l| l.starts_with("name = ")) {
                    out.push(std::mem::take(b));
                }
                block = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

/// Runs `tandem check-config` on `text`: (exit code, stdout, stderr).
fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_examples_in_config_md_are_valid() {
    let examples = doc_examples();
    assert!(examples.len() >= 2, "docs/config.md should hold the full example and a production one");
    for ex in &examples {
        let (code, out, err) = check(ex);
        assert_eq!(code, 0, "{ex}\n{out}{err}");
        assert!(out.contains("valid"), "{out}");
    }
}

#[test]
fn an_invalid_value_is_refused_with_exit_6_naming_the_key() {
    let full = &doc_examples()[0];
    let bad = full.replace("voters = 3", "voters = 4");
    assert_ne!(&bad, full, "the full example sets autopilot.voters");
    let (code, out, err) = check(&bad);
    assert_eq!(code, 6, "{out}{err}");
    assert!(err.contains("`autopilot.voters`"), "{err}");
}

#[test]
fn an_unknown_key_or_a_missing_file_is_refused_with_exit_6() {
    let (code, _, err) = check("name = \"n1\"\ndata_dir = \"/tmp/x\"\nprot = 7401\n");
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("prot"), "{err}");
    let out = Command::new(BIN).args(["check-config", "--config", "/nonexistent/node.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/node.toml"));
}
