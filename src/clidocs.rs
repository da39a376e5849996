//! Man pages and shell completions generated from the CLI's clap
//! definition: one page per visible command (`tandem.1`, `tandem-group.1`,
//! `tandem-group-move.1`, ...) and the bash, zsh and fish completion
//! scripts. The Debian package is built with them (`cargo xtask deb`, through
//! the hidden `tandem generate`); nothing generated is committed.
//! Writes only under the directory it is given; hidden commands get nothing.

use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Each shell's completion script, under `completions/`, with the file name
/// that shell's vendor directory expects.
pub const COMPLETIONS: [(Shell, &str); 3] =
    [(Shell::Bash, "tandem"), (Shell::Zsh, "_tandem"), (Shell::Fish, "tandem.fish")];

/// The path of every visible command from the root, the root first:
/// `["tandem"]`, `["tandem", "group"]`, `["tandem", "group", "move"]`, ...
/// (clap's own `help` subcommand is not one of them).
pub fn visible_commands(root: &Command) -> Vec<Vec<String>> {
    fn walk(cmd: &Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            walk(sub, p, out);
        }
        out.push(path);
    }
    let mut out = Vec::new();
    walk(root, vec![root.get_name().to_string()], &mut out);
    out.sort();
    out
}

/// The man page of a command path: `tandem-group-move.1`.
pub fn page_name(path: &[String]) -> String {
    format!("{}.1", path.join("-"))
}

/// Writes `out/man/*.1` and `out/completions/*`; returns the files written.
pub fn write_all(root: Command, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let name = root.get_name().to_string();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    // No date in the pages: the same CLI gives the same bytes.
    clap_mangen::generate_to(root.clone(), &man)?;
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in COMPLETIONS {
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut root.clone(), &name, &mut f);
    }
    let mut files = Vec::new();
    for dir in [&man, &completions] {
        for e in std::fs::read_dir(dir)? {
            files.push(e?.path());
        }
    }
    files.sort();
    Ok(files)
}
