//! The agent's process: binding the sockets, starting Raft, the API
//! servers and the periodic loops (heartbeats, lease, executor, scheduler,
//! volumes, autopilot), and stopping on SIGTERM/SIGINT.

use super::*;

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let block = crate::executor::filesystem::BlockPath::choose(&cfg.filesystem.device)
        .map_err(|e| anyhow::anyhow!("invalid `filesystem.device`: {e}"))?;
    crate::executor::filesystem::set_block_path(block);
    tracing::info!(
        device = block.name(),
        "filesystem resources attach their volume through {}",
        match block {
            crate::executor::filesystem::BlockPath::Nbd => "an NBD device (nbd-client)",
            crate::executor::filesystem::BlockPath::Loop => "FUSE (nbdfuse) and a loop device",
        }
    );
    let db = Db::open(&cfg.data_dir.join("raft"))?;
    let mut listeners = Vec::new();
    for a in &cfg.addresses {
        let addr = tandem_raft::state::socket_addr(a, cfg.port);
        let l = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding the API on {addr}"))?;
        listeners.push(l);
    }
    let sockets = Arc::new(HeartbeatSockets::bind(&cfg.addresses, cfg.port).await?);
    let liveness = Liveness::new(cfg.node_timeout());
    let agent = Arc::new(Agent::new(cfg.clone(), db.clone(), liveness.clone())?);
    crate::volume::set_replication_tls(crate::security::tls::ReplicationTls::new(agent.tls.clone()));
    // The data plane listens before anything can be promoted here.
    agent.guard.set_volumes(agent.volumes.clone());
    let guard = agent.guard.clone();
    agent.volumes.set_lease(Arc::new(move || guard.lease_valid()));
    agent.volumes.set_counters(agent.counters.clone());
    let replication: Vec<std::net::SocketAddr> = cfg
        .addresses
        .iter()
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, crate::volume::desired::replication_port(cfg.port)))
        .collect();
    agent
        .volumes
        .start(&cfg.data_dir.join("volumes"), &replication, Arc::new(VolumeControl(Arc::downgrade(&agent))))
        .await
        .context("starting the volume replication listener (port + 1)")?;
    if let Some(identity) = db.identity()? {
        if cfg.tls.enabled && agent.tls.ca_pem().is_none() {
            anyhow::bail!(
                "{} holds a cluster membership but no certificate (tls/node.pem, tls/ca.pem): it was made by a \
                 tandem without TLS, the files were removed, or it joined with an operator's CA and [tls] ca_file, \
                 cert_file and key_file are no longer set. Remove the node from the cluster, wipe data_dir and join \
                 again",
                cfg.data_dir.display()
            );
        }
        match agent.db.superseded()? {
            // Never again with the old state: it would disturb the recovered
            // cluster or, with other superseded members, make a second one.
            Some(why) => tracing::error!(
                "this node was superseded by a recovery of its cluster and takes no part: {why}. To rejoin: on the \
                 recovered cluster `tandem node remove {} --force`, then here `tandem cluster join <url> --token … \
                 --ca-hash …`",
                cfg.name
            ),
            None => {
                agent.start_member(&identity).await?;
            }
        }
    }
    let weak = Arc::downgrade(&agent);
    agent
        .tls
        .set_membership_check(Arc::new(move |id, name| weak.upgrade().is_some_and(|a| a.do_is_member_node(id, name))));
    let weak = Arc::downgrade(&agent);
    agent.tls.set_key_lookup(Arc::new(move |spki, cn| weak.upgrade().and_then(|a| a.do_member_by_key(spki, cn))));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = tandem_http_api::router(agent.clone());
    let mut servers = Vec::new();
    for l in listeners {
        let mut rx = stop_rx.clone();
        let app = router.clone().into_make_service_with_connect_info::<tandem_http_api::listen::PeerInfo>();
        let local = l.local_addr()?;
        let (tx, conns) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio::spawn(crate::security::tls::accept_api(l, agent.tls.clone(), tx));
        servers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let r = axum::serve(tandem_http_api::listen::ApiListener::new(conns, local), app)
                .with_graceful_shutdown(stop)
                .await;
            acceptor.abort();
            r
        }));
    }
    // The admin socket: root on this node, without a token (init, join,
    // and a way in when every token is lost).
    let sock_path = cfg.data_dir.join("admin.sock");
    let _ = std::fs::remove_file(&sock_path);
    let admin = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("binding the admin socket {}", sock_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    }
    {
        let mut rx = stop_rx.clone();
        let app = router.clone().into_make_service_with_connect_info::<tandem_http_api::listen::PeerInfo>();
        servers.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            axum::serve(admin, app).with_graceful_shutdown(stop).await
        }));
    }
    let a = agent.clone();
    every(super::security::AUDIT_FLUSH, move || {
        let agent = a.clone();
        async move { agent.flush_audit().await }
    });
    tokio::spawn(agent.clone().event_loop());
    let a = agent.clone();
    every(super::alerts::ALERT_TICK, move || {
        let agent = a.clone();
        async move { agent.alert_round().await }
    });
    let a = agent.clone();
    every(super::recovery::SUPERSEDED_CHECK, move || {
        let agent = a.clone();
        async move { agent.superseded_round().await }
    });
    let a = agent.clone();
    every(super::recovery::SUPERSEDED_TELL, move || {
        let agent = a.clone();
        async move { agent.tell_superseded_round().await }
    });
    if agent.ticket.is_some() {
        let a = agent.clone();
        every(super::ticket::TICKET_TICK, move || {
            let agent = a.clone();
            async move { agent.ticket_round().await }
        });
    }
    let a = agent.clone();
    every(super::security::CERT_CHECK, move || {
        let agent = a.clone();
        async move { agent.security_round().await }
    });
    let ident_agent = agent.clone();
    sockets.spawn_receivers(liveness, move || ident_agent.heartbeat_identity());
    let (a, socks) = (agent.clone(), sockets.clone());
    every(cfg.heartbeat_interval(), move || {
        let (agent, sockets) = (a.clone(), socks.clone());
        async move { agent.heartbeat_round(&sockets).await }
    });
    let a = agent.clone();
    every(Duration::from_millis(cfg.autopilot.interval_ms), move || {
        let agent = a.clone();
        async move {
            if let Err(e) = agent.autopilot_round().await {
                tracing::warn!(code = e.code(), "autopilot: {e}");
            }
        }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), GROUP_TICK, move || {
        let agent = a.clone();
        async move { agent.executor_round().await }
    });
    let a = agent.clone();
    // Under systemd with WatchdogSec=, the lease timer's own loop proves the
    // agent alive: a stalled lease timer gets the agent restarted.
    let sd_watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let last_ping = Arc::new(std::sync::Mutex::new(Instant::now()));
    every(LEASE_TICK, move || {
        let (agent, last_ping) = (a.clone(), last_ping.clone());
        async move {
            agent.lease_round().await;
            if let Some(period) = sd_watchdog {
                let mut last = last_ping.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= period {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    *last = Instant::now();
                }
            }
        }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), VOLUME_TICK, move || {
        let agent = a.clone();
        async move { agent.volume_round().await }
    });
    let a = agent.clone();
    every_or_on_change(agent.clone(), SCHEDULER_TICK, move || {
        let agent = a.clone();
        async move { agent.scheduler_round().await }
    });
    if !cfg.join.is_empty() && agent.member().is_none() {
        let agent = agent.clone();
        let urls = cfg.join.clone();
        tokio::spawn(async move { auto_join(agent, urls).await });
    }
    tracing::info!(name = %cfg.name, urls = %agent.my_urls().join(","), pid = std::process::id(), version = VERSION, "agent up");

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let failed = tokio::select! {
        _ = wait_for_signal() => None,
        e = raft_failure(agent.clone()) => Some(e),
    };
    if let Some(e) = failed {
        // Fail-stop, as etcd does on a storage error: openraft has stopped
        // for good and the database may refuse writes until reopened. The
        // supervisor (systemd's Restart=always) starts a new agent, which
        // reopens the store and adopts the running resources; until it is
        // back, the watchdog and the lease protect the groups as for a crash.
        tracing::error!(
            "the control plane's storage failed ({e}): exiting so that the agent is restarted (a full data \
             disk: free space on {})",
            cfg.data_dir.display()
        );
        // Like a crash, not a stop: the lease is kept and the resources run
        // on, for the restarted agent to adopt.
        return Err(StorageFailed(e).into());
    }
    tracing::info!("stopping");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    agent.shutdown().await;
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    Ok(())
}

/// The agent stopped because its Raft log's storage failed (`main` exits
/// with `EXIT_STORAGE` for it).
#[derive(Debug, thiserror::Error)]
#[error("the control plane's storage failed: {0}")]
pub struct StorageFailed(pub String);

/// How often the agent looks whether Raft stopped on its own.
const RAFT_CHECK: Duration = Duration::from_millis(200);

/// Resolves when this node's Raft stopped on a storage error or a panic
/// (not when a leave or a recovery stopped it): the agent cannot go on
/// without its log.
async fn raft_failure(agent: Arc<Agent>) -> String {
    loop {
        tokio::time::sleep(RAFT_CHECK).await;
        let Some(m) = agent.member() else { continue };
        let state = m.raft.metrics().borrow().running_state.clone();
        match state {
            Err(openraft::error::Fatal::StorageError(e)) => return e.to_string(),
            Err(openraft::error::Fatal::Panicked) => return "Raft panicked".into(),
            Ok(()) | Err(openraft::error::Fatal::Stopped) => {}
        }
    }
}

/// Runs `round` every `period`, forever, on its own task; a round that runs
/// long delays the next one rather than overlapping it.
pub(super) fn every<F, Fut>(period: Duration, mut round: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            round().await;
        }
    });
}

/// Like `every`, but also runs `round` as soon as the replicated state
/// changes (a placement committed, a group defined): reactions to the log
/// do not wait for the next tick.
pub(super) fn every_or_on_change<F, Fut>(agent: Arc<Agent>, period: Duration, mut round: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        // The receiver of the current membership's state (it changes when
        // the agent joins, leaves or rejoins).
        let mut rx: Option<(usize, tokio::sync::watch::Receiver<u64>)> = None;
        loop {
            let m = agent.member();
            let key = m.as_ref().map(|m| Arc::as_ptr(m) as usize);
            if rx.as_ref().map(|r| r.0) != key {
                rx = m.map(|m| (Arc::as_ptr(&m) as usize, m.state.subscribe()));
            }
            match rx.as_mut() {
                Some((_, r)) => {
                    if let Ok(Err(_)) = tokio::time::timeout(period, r.changed()).await {
                        // The state is gone (membership ended): just tick.
                        tokio::time::sleep(period).await;
                    }
                }
                None => tokio::time::sleep(period).await,
            }
            round().await;
            // A busy log (thousands of writes a second) must not turn the
            // loop into a spin: at most one round per CHANGE_GAP.
            tokio::time::sleep(CHANGE_GAP).await;
        }
    });
}

pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
