//! The `tandem` binary: agent, demo and CLI in one. `anyhow` lives here only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use tandem::cli::{self, parse, CliError, Client};
use tandem::config::{Config, LogFormat};
use tandem_http_api::{ClusterView, GroupView, LocalView, NodeView};

/// Shown by `tandem --help` and in tandem(1).
const EXIT_CODES: &str = "Exit codes: 0 success; 1 the request was refused (4xx); 2 bad command line; \
3 the endpoint could not be reached; 4 the cluster is unavailable (no leader or no quorum: retry); \
5 the agent failed (5xx); 6 the agent's configuration is invalid or it could not start.

Configuration: /etc/tandem/node.toml (see /usr/share/doc/tandem/config.md); \
`tandem check-config --config FILE` checks one.";

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "High-availability cluster manager",
    propagate_version = true,
    after_long_help = EXIT_CODES
)]
struct Cli {
    /// API of the agent to talk to.
    #[arg(long, global = true, env = "TANDEM_ENDPOINT", default_value = "http://127.0.0.1:7401")]
    endpoint: String,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node agent.
    Agent {
        /// The node's configuration (TOML; see docs/config.md).
        #[arg(long)]
        config: PathBuf,
        /// Log as JSON lines (overrides log.format).
        #[arg(long)]
        log_json: bool,
    },
    /// Start a local 3-node cluster on 127.0.0.1; Ctrl-C stops it.
    Demo {
        /// API port of node1; node2 and node3 take the next ones.
        #[arg(long, default_value_t = 7401)]
        base_port: u16,
        /// Where to keep data and logs (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep data and logs after stopping.
        #[arg(long)]
        keep: bool,
        /// What the demo cluster runs: `web`, a small HTTP service; or
        /// `postgres`, PostgreSQL on a replicated volume (root, Debian's
        /// postgresql, libnbd-bin and e2fsprogs).
        #[arg(long, value_enum, default_value = "web")]
        app: tandem::demo::App,
    },
    /// Show the cluster: leader, term and every member.
    Status {
        /// Answer from the endpoint's local copy, without the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Inspect and administer nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Bootstrap or join a cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Define, inspect and move resource groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Inspect replicated volumes, verify them, resolve a split brain.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// Check a node's configuration file as the agent does at start, and
    /// exit (0: valid; 6: invalid, naming the offending key).
    CheckConfig {
        /// The node's configuration (TOML; see docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// The node's watchdog (started by the agent): stops this node's
    /// resources when no agent renews the lease.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        data_dir: PathBuf,
        /// A Linux watchdog device to feed while the node is safe.
        #[arg(long)]
        device: Option<PathBuf>,
    },
    /// Write the man pages (`<out-dir>/man/`) and the bash, zsh and fish
    /// completions (`<out-dir>/completions/`) of this CLI; the Debian
    /// package is built with them (`cargo xtask deb`).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// List the groups: where each runs and its state.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Show a group: its resources, node and state.
    Show {
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// Create or replace a group from a JSON file (`-` for stdin).
    Create {
        name: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Switchover: stop it where it runs, then start it on `to`.
    Move { name: String, to: String },
    /// Enable it again after `stop`.
    Start { name: String },
    /// Stop it and keep it stopped.
    Stop { name: String },
    /// Forget its failures, so failed nodes are eligible again.
    Clear { name: String },
    /// Stop it and delete it.
    Delete { name: String },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List the nodes: role, state, addresses.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Show a node: its paths, attributes and state.
    Show {
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// The node runs nothing.
    Standby { name: String },
    /// The node may run resources.
    Online { name: String },
    /// The node's resources are left alone and not monitored.
    Maintenance { name: String },
    /// Remove a node (it leaves gracefully; --force for a dead one).
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Set a node attribute (used by placement rules).
    SetAttr { name: String, key: String, value: String },
    /// Delete a node attribute.
    UnsetAttr { name: String, key: String },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make the endpoint's agent the first node of a new cluster.
    Init {
        #[arg(long)]
        cluster_id: Option<String>,
    },
    /// Make the endpoint's agent join the cluster that `url` belongs to.
    Join { url: String },
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::CheckConfig { config } => return check_config(config),
        Cmd::Generate { out_dir } => {
            return match tandem::clidocs::write_all(Cli::command(), out_dir) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: writing to {}: {e}", out_dir.display());
                    ExitCode::from(cli::EXIT_SERVER)
                }
            };
        }
        _ => {}
    }
    if let Cmd::Watchdog { data_dir, device } = &cli.cmd {
        // One thread: it only sleeps, reads two small files and, once, kills.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        return match rt.map(|rt| rt.block_on(tandem::watchdog::run(data_dir, device.clone()))) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) | Err(e) => {
                eprintln!("watchdog: error: {e}");
                ExitCode::from(cli::EXIT_SERVER)
            }
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_SERVER);
        }
    };
    match cli.cmd {
        Cmd::Agent { config, log_json } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(cli::EXIT_CONFIG);
                }
            };
            init_logging(&cfg.log.level, log_json || cfg.log.format == LogFormat::Json);
            match rt.block_on(tandem::agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::from(cli::EXIT_CONFIG)
                }
            }
        }
        Cmd::Demo { base_port, dir, keep, app } => {
            init_logging("warn", false);
            match rt.block_on(tandem::demo::run(base_port, dir, keep, app)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(cli::EXIT_SERVER)
                }
            }
        }
        cmd => match rt.block_on(client_command(&cli.endpoint, cli.json, cmd)) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}

/// The agent's own validation (`Config::load`), without starting anything.
fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            let witness = if cfg.witness { " (a witness)" } else { "" };
            println!(
                "{}: valid: node {}{witness}, data_dir {}, addresses {}, port {}",
                path.display(),
                cfg.name,
                cfg.data_dir.display(),
                cfg.addresses.join(" "),
                cfg.port
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(cli::EXIT_CONFIG)
        }
    }
}

fn q(stale: bool) -> &'static str {
    if stale {
        "?stale=true"
    } else {
        ""
    }
}

/// Turns an API answer into the text the CLI prints.
type Render = fn(Value) -> Result<String, CliError>;

async fn client_command(endpoint: &str, json_out: bool, cmd: Cmd) -> Result<String, CliError> {
    let c = Client::new(endpoint)?;
    let enc = |s: &str| s.replace('/', "%2F");
    let (v, render): (Value, Render) = match cmd {
        Cmd::Status { stale } => (c.call(Method::GET, &format!("/v1/cluster{}", q(stale)), None).await?, |v| {
            Ok(cli::cluster_text(&parse::<ClusterView>(v)?))
        }),
        Cmd::Node(NodeCmd::List { stale }) => {
            (c.call(Method::GET, &format!("/v1/nodes{}", q(stale)), None).await?, |v| {
                Ok(cli::nodes_table(&parse::<Vec<NodeView>>(v)?))
            })
        }
        Cmd::Node(NodeCmd::Show { name, stale }) => {
            (c.call(Method::GET, &format!("/v1/nodes/{}{}", enc(&name), q(stale)), None).await?, node)
        }
        Cmd::Node(NodeCmd::Standby { name }) => {
            (c.call(Method::POST, &format!("/v1/nodes/{}/standby", enc(&name)), None).await?, node)
        }
        Cmd::Node(NodeCmd::Online { name }) => {
            (c.call(Method::POST, &format!("/v1/nodes/{}/online", enc(&name)), None).await?, node)
        }
        Cmd::Node(NodeCmd::Maintenance { name }) => {
            (c.call(Method::POST, &format!("/v1/nodes/{}/maintenance", enc(&name)), None).await?, node)
        }
        Cmd::Node(NodeCmd::Remove { name, force }) => {
            c.call(Method::DELETE, &format!("/v1/nodes/{}?force={force}", enc(&name)), None).await?;
            return Ok(if json_out { "null\n".into() } else { format!("{name} removed\n") });
        }
        Cmd::Node(NodeCmd::SetAttr { name, key, value }) => (
            c.call(
                Method::PUT,
                &format!("/v1/nodes/{}/attributes/{}", enc(&name), enc(&key)),
                Some(json!({ "value": value })),
            )
            .await?,
            node,
        ),
        Cmd::Node(NodeCmd::UnsetAttr { name, key }) => {
            (c.call(Method::DELETE, &format!("/v1/nodes/{}/attributes/{}", enc(&name), enc(&key)), None).await?, node)
        }
        Cmd::Cluster(ClusterCmd::Init { cluster_id }) => {
            (c.call(Method::POST, "/v1/cluster/init", Some(json!({ "cluster_id": cluster_id }))).await?, local)
        }
        Cmd::Cluster(ClusterCmd::Join { url }) => {
            (c.call(Method::POST, "/v1/cluster/join", Some(json!({ "via": url }))).await?, local)
        }
        Cmd::Group(GroupCmd::List { stale }) => {
            (c.call(Method::GET, &format!("/v1/groups{}", q(stale)), None).await?, |v| {
                Ok(cli::groups_table(&parse::<Vec<GroupView>>(v)?))
            })
        }
        Cmd::Group(GroupCmd::Show { name, stale }) => {
            (c.call(Method::GET, &format!("/v1/groups/{}{}", enc(&name), q(stale)), None).await?, group)
        }
        Cmd::Group(GroupCmd::Create { name, file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
            let body: Value =
                serde_json::from_str(&text).map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
            (c.call(Method::PUT, &format!("/v1/groups/{}", enc(&name)), Some(body)).await?, group)
        }
        Cmd::Group(GroupCmd::Move { name, to }) => {
            (c.call(Method::POST, &format!("/v1/groups/{}/move", enc(&name)), Some(json!({ "to": to }))).await?, group)
        }
        Cmd::Group(GroupCmd::Start { name }) => {
            (c.call(Method::POST, &format!("/v1/groups/{}/start", enc(&name)), None).await?, group)
        }
        Cmd::Group(GroupCmd::Stop { name }) => {
            (c.call(Method::POST, &format!("/v1/groups/{}/stop", enc(&name)), None).await?, group)
        }
        Cmd::Group(GroupCmd::Clear { name }) => {
            (c.call(Method::POST, &format!("/v1/groups/{}/clear", enc(&name)), None).await?, group)
        }
        Cmd::Group(GroupCmd::Delete { name }) => {
            c.call(Method::DELETE, &format!("/v1/groups/{}", enc(&name)), None).await?;
            return Ok(if json_out { "null\n".into() } else { format!("{name} deleted\n") });
        }
        Cmd::Volume(v) => return cli::volume_command(&c, json_out, v).await,
        Cmd::Agent { .. }
        | Cmd::Demo { .. }
        | Cmd::Watchdog { .. }
        | Cmd::CheckConfig { .. }
        | Cmd::Generate { .. } => {
            unreachable!("handled in main")
        }
    };
    if json_out {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
    }
    render(v)
}

fn node(v: Value) -> Result<String, CliError> {
    Ok(cli::node_text(&parse::<NodeView>(v)?))
}

fn group(v: Value) -> Result<String, CliError> {
    Ok(cli::group_text(&parse::<GroupView>(v)?))
}

fn local(v: Value) -> Result<String, CliError> {
    Ok(cli::local_text(&parse::<LocalView>(v)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem::clidocs;

    /// Every visible command has its page, and every completion script
    /// knows every subcommand; hidden ones (`watchdog`, `generate`) get none.
    #[test]
    fn a_man_page_for_every_command_and_completions_know_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = clidocs::write_all(Cli::command(), dir.path()).unwrap();
        let paths = clidocs::visible_commands(&Cli::command());
        for must in [&["tandem"][..], &["tandem", "group", "move"], &["tandem", "check-config"], &["tandem", "volume"]]
        {
            assert!(paths.iter().any(|p| p == must), "{must:?} not among {paths:?}");
        }
        let man = dir.path().join("man");
        for p in &paths {
            let page = man.join(clidocs::page_name(p));
            let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
            // roff escapes the dashes of the page's own name.
            assert!(
                text.contains(".TH ") && text.contains(&p.join("-").replace('-', "\\-")),
                "{}:\n{text}",
                page.display()
            );
        }
        let pages: Vec<_> = files.iter().filter(|f| f.starts_with(&man)).collect();
        assert_eq!(pages.len(), paths.len(), "one page per visible command, no more: {pages:?}");
        for hidden in ["tandem-watchdog.1", "tandem-generate.1"] {
            assert!(!man.join(hidden).exists(), "{hidden}");
        }
        let subcommands: Vec<&String> = paths.iter().filter_map(|p| p.last()).filter(|n| *n != "tandem").collect();
        for (_, file) in clidocs::COMPLETIONS {
            let script = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            for name in &subcommands {
                assert!(names_word(&script, name), "{file} never names `{name}`");
            }
        }
    }

    /// Whether `word` stands in `text` on its own (not inside `set-attr-x`).
    fn names_word(text: &str, word: &str) -> bool {
        let part = |c: char| c.is_alphanumeric() || c == '-' || c == '_';
        text.match_indices(word).any(|(i, _)| {
            !text[..i].chars().next_back().is_some_and(part) && !text[i + word.len()..].chars().next().is_some_and(part)
        })
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
