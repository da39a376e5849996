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
`tandem check-config --config FILE` checks one.

Credentials: the API is HTTPS with the cluster's own CA and needs a token: --token or TANDEM_TOKEN, \
--cacert or TANDEM_CACERT (<data_dir>/tls/ca.pem), or token, cacert and endpoint in \
~/.config/tandem/cli.toml. Root on a node may use --socket <data_dir>/admin.sock instead.";

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "High-availability cluster manager",
    propagate_version = true,
    after_long_help = EXIT_CODES
)]
struct Cli {
    /// API of the agent to talk to [default: https://127.0.0.1:7401, or
    /// `endpoint` in ~/.config/tandem/cli.toml].
    #[arg(long, global = true, env = "TANDEM_ENDPOINT")]
    endpoint: Option<String>,
    /// API token (sent as `Authorization: Bearer`).
    #[arg(long, global = true, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA to trust for HTTPS (PEM; <data_dir>/tls/ca.pem on a node).
    #[arg(long, global = true, env = "TANDEM_CACERT")]
    cacert: Option<PathBuf>,
    /// A client certificate (PEM, from `tandem cert create`) to present
    /// instead of a token; needs --key.
    #[arg(long = "cert", global = true, env = "TANDEM_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "key", global = true, env = "TANDEM_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Talk to the agent's admin socket (<data_dir>/admin.sock; root on the
    /// node) instead of the endpoint: no token needed.
    #[arg(long, global = true, env = "TANDEM_SOCKET")]
    socket: Option<PathBuf>,
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
    /// Sites as a unit: standby, online, switchover, DR drill.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Bootstrap or join a cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Define, inspect and move resource groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Inspect replicated volumes, verify them, resolve a split brain.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// API tokens: create (the secret is shown once), list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Client certificates for people and tools, each mapped to a role:
    /// create (the key is made here), register, list, revoke.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Alerts: where events go (webhook, mail, Pacemaker alert agents).
    #[command(subcommand)]
    Alert(AlertCmd),
    /// The audit log: who did what, from where, with what outcome.
    Audit {
        /// Only entries after this id.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// The cluster's events (node offline, group moved, fencing, ...);
    /// `-f` follows them as they happen.
    Events(cli::EventsArgs),
    /// Check a node's configuration file as the agent does at start, and
    /// exit (0: valid; 6: invalid, naming the offending key).
    CheckConfig {
        /// The node's configuration (TOML; see docs/config.md).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the ticket's arbitrator: the third grantor between two sites'
    /// clusters (docs/dr.md).
    Arbitrator {
        /// Its configuration (TOML; see docs/dr.md).
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
enum SiteCmd {
    /// List the sites: their nodes and the groups running there.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Every node of the site runs nothing (its groups move as their
    /// policies allow).
    Standby { site: String },
    /// Every node of the site may run groups again.
    Online { site: String },
    /// Put the site in standby and wait for its groups to run elsewhere;
    /// prints each group's outage and RPO. Exit 1 when not complete.
    Switchover {
        site: String,
        /// Longest wait, seconds (1 to 25).
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// DR drill: switch every group off the site and back, reporting each
    /// group's outages and RPO (JSON with --json). Exit 1 when it failed.
    Drill {
        site: String,
        /// Longest wait of each step, seconds (1 to 25).
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make this node's agent the first node of a new cluster: its CA, its
    /// certificate and the first admin token (printed once, and written to
    /// <data_dir>/admin.token). Root on the node: talks to the admin socket.
    Init {
        #[arg(long)]
        cluster_id: Option<String>,
        /// The agent's configuration, to find its admin socket.
        #[arg(long, default_value = "/etc/tandem/node.toml")]
        config: PathBuf,
    },
    /// Make this node's agent join the cluster that `url` belongs to. The
    /// CA at `url` is checked against --ca-hash before anything is sent.
    Join {
        url: String,
        /// A join token (`tandem cluster join-token` on a member).
        #[arg(long, env = "TANDEM_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The cluster CA's pin, sha256:<hex>.
        #[arg(long)]
        ca_hash: Option<String>,
        /// The agent's configuration, to find its admin socket.
        #[arg(long, default_value = "/etc/tandem/node.toml")]
        config: PathBuf,
    },
    /// Print a short-lived join token, the CA pin, and the command to run
    /// on the new node (admin).
    JoinToken {
        /// Seconds the token stays valid (at most 86400).
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// After the majority of the voters is lost for good: make the node
    /// at --endpoint the single voter of a new incarnation of the cluster.
    /// Without --confirm, only reports what it would do (admin).
    Recover {
        /// The cluster's id: the recovery is done, not only reported.
        #[arg(long)]
        confirm: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Seconds until it expires (never, by default).
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// List the tokens (never their secrets).
    List,
    /// Revoke a token: refused from now on, on every node.
    Revoke { name: String },
}

/// A JSON document from a file, or stdin for `-`.
fn json_file(file: &std::path::Path) -> Result<Value, CliError> {
    let text =
        if file.as_os_str() == "-" { std::io::read_to_string(std::io::stdin()) } else { std::fs::read_to_string(file) }
            .map_err(|e| CliError::Input(format!("{}: {e}", file.display())))?;
    serde_json::from_str(&text).map_err(|e| CliError::Input(format!("{}: {e}", file.display())))
}

#[derive(Subcommand)]
enum AlertCmd {
    /// List the alerts: target, filter, what each has sent, how delivery goes.
    List {
        #[arg(long)]
        stale: bool,
    },
    /// Show one alert (secrets are never shown).
    Show {
        name: String,
        #[arg(long)]
        stale: bool,
    },
    /// Create or replace an alert from a JSON file (`-` for stdin); see
    /// docs/api.md, "Alerts".
    Set {
        name: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Send a test alert (`alert.test`) to its target now.
    Test { name: String },
    /// Delete an alert: nothing more is sent.
    Delete { name: String },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Make a key here and have the cluster's CA sign a client certificate
    /// for it: writes <out>.pem and <out>.key (mode 0600). The key never
    /// leaves this machine. Clusters with the operator's CA: `register`.
    Create {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Days the certificate is valid (default 365, at most 3650).
        #[arg(long)]
        days: Option<u32>,
        /// Path prefix of the files written: <out>.pem and <out>.key.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Record a client certificate the operator's CA issued (clusters with
    /// [tls] ca_file) under a name and a role.
    Register {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// The certificate, PEM.
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// List the recorded client certificates.
    List,
    /// Revoke a client certificate: refused from now on, on every node.
    Revoke { name: String },
}

/// Writes `text` to a new file of mode `mode` (refuses to overwrite).
fn write_new(path: &std::path::Path, text: &str, mode: u32) -> Result<(), cli::CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| cli::CliError::Input(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| cli::CliError::Input(format!("{}: {e}", path.display())))
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
    tandem::security::install_crypto();
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
                    match e.is::<tandem::agent::StorageFailed>() {
                        true => ExitCode::from(cli::EXIT_STORAGE),
                        false => ExitCode::from(cli::EXIT_CONFIG),
                    }
                }
            }
        }
        Cmd::Arbitrator { config } => {
            let arbitrator = match tandem::arbitrator::Arbitrator::load(&config) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(cli::EXIT_CONFIG);
                }
            };
            init_logging("info", false);
            match rt.block_on(arbitrator.run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
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
        cmd => match rt.block_on(client_command(
            cli.endpoint,
            cli::Access {
                token: cli.token,
                cacert: cli.cacert,
                socket: cli.socket,
                cert: cli.client_cert.zip(cli.client_key),
            },
            cli.json,
            cmd,
        )) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(cli::CliError::Incomplete(report)) => {
                print!("{report}");
                ExitCode::from(cli::EXIT_REFUSED)
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

/// `<data_dir>/admin.sock` of the agent configured by `config`.
fn admin_socket(config: &std::path::Path) -> Result<PathBuf, CliError> {
    let cfg = Config::load(config).map_err(|e| CliError::Input(format!("{e} (give --socket or --config)")))?;
    Ok(cfg.data_dir.join("admin.sock"))
}

async fn client_command(
    endpoint: Option<String>,
    mut access: cli::Access,
    json_out: bool,
    cmd: Cmd,
) -> Result<String, CliError> {
    let user = cli::UserConfig::load()?;
    let endpoint = endpoint.or(user.endpoint).unwrap_or_else(|| "https://127.0.0.1:7401".into());
    access.token = access.token.or(user.token);
    access.cacert = access.cacert.or(user.cacert);
    if let Cmd::Cluster(ClusterCmd::Init { config, .. } | ClusterCmd::Join { config, .. }) = &cmd {
        if access.socket.is_none() {
            access.socket = Some(admin_socket(config)?);
        }
    }
    let c = Client::with_access(&endpoint, &access)?;
    let enc = cli::enc;
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
        Cmd::Cluster(ClusterCmd::Init { cluster_id, .. }) => {
            (c.call(Method::POST, "/v1/cluster/init", Some(json!({ "cluster_id": cluster_id }))).await?, |v| {
                let init: tandem_http_api::InitView = parse(v)?;
                let node = &init.node;
                Ok(format!(
                    "cluster {} bootstrapped; this node is {} (id 1)\n\
                     admin token (shown once; also in <data_dir>/admin.token, mode 0600):\n  {}\n\
                     CA pin: {}\n\
                     Use it:  export TANDEM_TOKEN=$(cat <data_dir>/admin.token) TANDEM_CACERT=<data_dir>/tls/ca.pem\n\
                     Add a node: tandem cluster join-token   (on this node, with the token)\n",
                    node.cluster_id.clone().unwrap_or_default(),
                    node.name,
                    init.admin_token,
                    init.ca_hash
                ))
            })
        }
        Cmd::Cluster(ClusterCmd::Join { url, token, ca_hash, .. }) => (
            c.call(Method::POST, "/v1/cluster/join", Some(json!({ "via": url, "token": token, "ca_hash": ca_hash })))
                .await?,
            local,
        ),
        Cmd::Cluster(ClusterCmd::Recover { confirm }) => {
            let dry_run = confirm.is_none();
            let v = c
                .call(
                    Method::POST,
                    &format!("/v1/cluster/recover?dry_run={dry_run}"),
                    Some(json!({ "confirm": confirm })),
                )
                .await?;
            if json_out {
                return Ok(format!("{v:#}\n"));
            }
            return Ok(cli::recover_text(&parse::<tandem_http_api::RecoverReport>(v)?));
        }
        Cmd::Cluster(ClusterCmd::JoinToken { ttl }) => {
            let v = c.call(Method::POST, "/v1/cluster/join-token", Some(json!({ "ttl_s": ttl }))).await?;
            if json_out {
                return Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()));
            }
            let t: tandem_http_api::JoinTokenView = parse(v)?;
            let cluster: ClusterView = parse(c.call(Method::GET, "/v1/cluster?stale=true", None).await?)?;
            let leader = cluster
                .leader
                .as_ref()
                .and_then(|l| cluster.members.iter().find(|m| &m.name == l))
                .and_then(|m| {
                    m.paths.first().map(|p| format!("https://{}", tandem_raft::state::socket_addr(&p.address, m.port)))
                })
                .unwrap_or(endpoint.clone());
            return Ok(format!(
                "join token {} (valid until unix ms {}). On the new node, as root:\n  tandem cluster join {leader} --token {} --ca-hash {}\n",
                t.name, t.expires_ms, t.token, t.ca_hash
            ));
        }
        Cmd::Token(TokenCmd::Create { name, role, expires_in }) => {
            let v = c
                .call(
                    Method::POST,
                    "/v1/tokens",
                    Some(json!({ "name": name, "role": role, "expires_in_s": expires_in })),
                )
                .await?;
            (v, |v| {
                let t: tandem_http_api::TokenCreated = parse(v)?;
                Ok(format!(
                    "token {} ({}): {}\nIt is shown this once.\n",
                    t.view.name,
                    cli::lower(&t.view.role),
                    t.token
                ))
            })
        }
        Cmd::Token(TokenCmd::List) => (c.call(Method::GET, "/v1/tokens", None).await?, |v| {
            Ok(cli::tokens_table(&parse::<Vec<tandem_http_api::TokenView>>(v)?))
        }),
        Cmd::Token(TokenCmd::Revoke { name }) => {
            c.call(Method::DELETE, &format!("/v1/tokens/{}", enc(&name)), None).await?;
            return Ok(if json_out { "null\n".into() } else { format!("token {name} revoked\n") });
        }
        Cmd::Cert(CertCmd::Create { name, role, days, out }) => {
            let with = |ext: &str| {
                let mut p = out.clone().into_os_string();
                p.push(ext);
                std::path::PathBuf::from(p)
            };
            let (cert_path, key_path) = (with(".pem"), with(".key"));
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    return Err(cli::CliError::Input(format!("{} exists; pick another --out", p.display())));
                }
            }
            let (key_pem, csr) = tandem::security::pki::new_request(&name)
                .map_err(|e| cli::CliError::Input(format!("cannot make a key: {e}")))?;
            let body = json!({ "name": name, "role": role, "csr": csr, "days": days });
            let v = c.call(Method::POST, "/v1/certificates", Some(body)).await?;
            let created: tandem_http_api::ClientCertCreated = parse(v.clone())?;
            write_new(&key_path, &key_pem, 0o600)?;
            write_new(&cert_path, &created.certificate, 0o644)?;
            return Ok(if json_out {
                format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
            } else {
                format!(
                    "client certificate {} ({}): {} and {} (key, mode 0600)\nUse it: curl --cert {} --key {} --cacert <ca.pem> ...\n",
                    created.view.name,
                    cli::lower(&created.view.role),
                    cert_path.display(),
                    key_path.display(),
                    cert_path.display(),
                    key_path.display()
                )
            });
        }
        Cmd::Cert(CertCmd::Register { name, role, file }) => {
            let pem =
                std::fs::read_to_string(&file).map_err(|e| cli::CliError::Input(format!("{}: {e}", file.display())))?;
            let body = json!({ "name": name, "role": role, "certificate": pem });
            (c.call(Method::POST, "/v1/certificates", Some(body)).await?, |v| {
                let c: tandem_http_api::ClientCertCreated = parse(v)?;
                Ok(format!(
                    "client certificate {} ({}) recorded: key {}\n",
                    c.view.name,
                    cli::lower(&c.view.role),
                    c.view.spki
                ))
            })
        }
        Cmd::Cert(CertCmd::List) => (c.call(Method::GET, "/v1/certificates", None).await?, |v| {
            Ok(cli::certs_table(&parse::<Vec<tandem_http_api::ClientCertView>>(v)?))
        }),
        Cmd::Cert(CertCmd::Revoke { name }) => {
            c.call(Method::DELETE, &format!("/v1/certificates/{}", enc(&name)), None).await?;
            return Ok(if json_out { "null\n".into() } else { format!("client certificate {name} revoked\n") });
        }
        Cmd::Audit { since, limit } => {
            (c.call(Method::GET, &format!("/v1/audit?since={since}&limit={limit}"), None).await?, |v| {
                Ok(cli::audit_table(&parse::<Vec<tandem_raft::access::AuditEntry>>(v)?))
            })
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
            let body = json_file(&file)?;
            (c.call(Method::PUT, &format!("/v1/groups/{}", enc(&name)), Some(body)).await?, group)
        }
        Cmd::Alert(AlertCmd::List { stale }) => {
            (c.call(Method::GET, &format!("/v1/alerts{}", q(stale)), None).await?, |v| {
                Ok(cli::alerts_table(&parse::<Vec<tandem_http_api::AlertView>>(v)?))
            })
        }
        Cmd::Alert(AlertCmd::Show { name, stale }) => {
            (c.call(Method::GET, &format!("/v1/alerts/{}{}", enc(&name), q(stale)), None).await?, |v| {
                Ok(format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default()))
            })
        }
        Cmd::Alert(AlertCmd::Set { name, file }) => {
            let body = json_file(&file)?;
            (c.call(Method::PUT, &format!("/v1/alerts/{}", enc(&name)), Some(body)).await?, |v| {
                let a: tandem_http_api::AlertView = parse(v)?;
                Ok(format!("alert {} ({}) set: it sends events after id {}\n", a.name, a.spec.kind(), a.cursor))
            })
        }
        Cmd::Alert(AlertCmd::Test { name }) => {
            (c.call(Method::POST, &format!("/v1/alerts/{}/test", enc(&name)), None).await?, |v| {
                let t: tandem_http_api::AlertTested = parse(v)?;
                Ok(format!("alert {}: the target took the test alert in {} ms\n", t.name, t.ms))
            })
        }
        Cmd::Alert(AlertCmd::Delete { name }) => {
            c.call(Method::DELETE, &format!("/v1/alerts/{}", enc(&name)), None).await?;
            return Ok(if json_out { "null\n".into() } else { format!("alert {name} deleted\n") });
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
        Cmd::Site(SiteCmd::List { stale }) => {
            (c.call(Method::GET, &format!("/v1/sites{}", q(stale)), None).await?, |v| {
                Ok(cli::sites_table(&parse::<Vec<tandem_http_api::SiteView>>(v)?))
            })
        }
        Cmd::Site(SiteCmd::Standby { site }) => {
            (c.call(Method::POST, &format!("/v1/sites/{}/standby", enc(&site)), None).await?, site_view)
        }
        Cmd::Site(SiteCmd::Online { site }) => {
            (c.call(Method::POST, &format!("/v1/sites/{}/online", enc(&site)), None).await?, site_view)
        }
        Cmd::Site(SiteCmd::Switchover { site, timeout }) => {
            let body = serde_json::json!({"timeout_s": timeout});
            let v = c.call(Method::POST, &format!("/v1/sites/{}/switchover", enc(&site)), Some(body)).await?;
            let r = parse::<tandem_http_api::SwitchoverReport>(v.clone())?;
            let text = if json_out { format!("{v:#}\n") } else { cli::switchover_text(&r) };
            return if r.complete { Ok(text) } else { Err(CliError::Incomplete(text)) };
        }
        Cmd::Site(SiteCmd::Drill { site, timeout }) => {
            let r = tandem::drill::run(&c, &site, timeout).await?;
            let text = if json_out {
                format!("{:#}\n", serde_json::to_value(&r).map_err(|e| CliError::Input(e.to_string()))?)
            } else {
                tandem::drill::summary(&r)
            };
            return if r.passed { Ok(text) } else { Err(CliError::Incomplete(text)) };
        }
        Cmd::Events(a) => return cli::events_command(&c, json_out, a).await,
        Cmd::Agent { .. }
        | Cmd::Demo { .. }
        | Cmd::Watchdog { .. }
        | Cmd::Arbitrator { .. }
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

fn site_view(v: Value) -> Result<String, CliError> {
    Ok(cli::site_text(&parse::<tandem_http_api::SiteView>(v)?))
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
