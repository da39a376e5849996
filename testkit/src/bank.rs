//! The bank workload (Jepsen's bank, plus durability) against PostgreSQL:
//! the schema, the clients that move money and read balances through one
//! address (a group's virtual IP), and the final read; `check` judges what
//! they recorded. The clients only record what they saw; they never decide
//! whether the database was right.
//!
//! Transfers take row locks (`SELECT ... FOR UPDATE` on both accounts, in
//! id order) under READ COMMITTED rather than SERIALIZABLE: the conflict
//! is exactly those two rows, so there are no serialization failures to
//! retry (each would be one more outcome to classify) and no deadlocks
//! (both rows are locked in one statement, in one order). The overdraft
//! test reads the locked balance; `CHECK (balance >= 0)` is the backstop.
//! A read is one `SELECT` of every balance: one statement, one snapshot.

pub mod check;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
pub use check::{Op, Outcome, State, Transfer};
use tokio_postgres::{Client, NoTls};

/// The workload's shape and its limits.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where PostgreSQL listens (the group's virtual IP and port).
    pub target: SocketAddr,
    pub accounts: i32,
    /// Each account's balance at the start.
    pub initial_balance: i64,
    /// A transfer moves 1..=max_amount.
    pub max_amount: i64,
    /// Concurrent clients (one connection each).
    pub clients: u32,
    /// A connection attempt's limit.
    pub connect_timeout: Duration,
    /// One transaction's limit (every statement of it, COMMIT included).
    pub op_timeout: Duration,
    /// One transfer in this many operations is a read of every balance.
    pub read_every: u64,
}

impl Config {
    pub fn new(target: SocketAddr) -> Config {
        Config {
            target,
            accounts: 8,
            initial_balance: 100,
            max_amount: 30,
            clients: 4,
            connect_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_secs(5),
            read_every: 4,
        }
    }

    pub fn initial(&self) -> Vec<i64> {
        vec![self.initial_balance; self.accounts as usize]
    }
}

/// A client's wait after a failed connection or transaction: doubles from
/// the first to the last, back to the first after a success.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(20), Duration::from_millis(500));

/// Runs `f` on a thread of its own, inside network namespace `netns`
/// (a name under /var/run/netns; None: this process's), with a tokio
/// runtime of its own: sockets it opens belong to that namespace. Returns
/// at once; join the handle for `f`'s result.
pub fn spawn_in<F, Fut, T>(netns: Option<String>, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            // setns changes only this thread (and threads it starts later).
            let path = format!("/var/run/netns/{ns}");
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {ns}"))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("a tokio runtime")?;
        rt.block_on(f())
    })
}

/// `spawn_in`, waited for.
pub fn block_on_in<F, Fut, T>(netns: Option<String>, f: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    spawn_in(netns, f).join().map_err(|_| anyhow!("the namespace's thread panicked"))?
}

/// A connection and the task that drives it (aborted on drop).
struct Conn {
    client: Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(cfg: &Config) -> anyhow::Result<Conn> {
    let mut pg = tokio_postgres::Config::new();
    pg.hostaddr(cfg.target.ip())
        .host(cfg.target.ip().to_string())
        .port(cfg.target.port())
        .user("postgres")
        .dbname("postgres")
        .application_name("tandem-bank")
        .connect_timeout(cfg.connect_timeout);
    let (client, connection) = tokio::time::timeout(cfg.connect_timeout, pg.connect(NoTls))
        .await
        .map_err(|_| anyhow!("connecting to {}: no answer in {:?}", cfg.target, cfg.connect_timeout))?
        .with_context(|| format!("connecting to {}", cfg.target))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Conn { client, driver })
}

/// Creates the tables afresh (in one transaction, so a retry after an
/// unknown outcome is safe) with every account at its initial balance.
/// Retried until `deadline` (the database may still be starting).
pub async fn setup(cfg: &Config, deadline: Instant) -> anyhow::Result<Vec<i64>> {
    let sql = format!(
        "BEGIN;
         DROP TABLE IF EXISTS transfers, accounts;
         CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
         CREATE TABLE transfers (id bigint PRIMARY KEY,
                                 src integer NOT NULL REFERENCES accounts,
                                 dst integer NOT NULL REFERENCES accounts,
                                 amount bigint NOT NULL CHECK (amount > 0));
         INSERT INTO accounts SELECT g, {} FROM generate_series(0, {}) g;
         COMMIT;",
        cfg.initial_balance,
        cfg.accounts - 1
    );
    let mut last = anyhow!("no attempt");
    while Instant::now() < deadline {
        let attempt = async {
            let c = connect(cfg).await?;
            tokio::time::timeout(cfg.op_timeout * 2, c.client.batch_execute(&sql))
                .await
                .map_err(|_| anyhow!("creating the tables: no answer"))?
                .context("creating the tables")
        };
        match attempt.await {
            Ok(()) => return Ok(cfg.initial()),
            Err(e) => last = e,
        }
        tokio::time::sleep(BACKOFF.1).await;
    }
    Err(last.context(format!("setting up the bank at {}", cfg.target)))
}

/// Reads every balance and every row of `transfers` in one snapshot,
/// retried until `deadline`.
pub async fn read_state(cfg: &Config, deadline: Instant) -> anyhow::Result<State> {
    let mut last = anyhow!("no attempt");
    while Instant::now() < deadline {
        let attempt = async {
            let mut c = connect(cfg).await?;
            let read = async {
                let tx = c
                    .client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await?;
                let balances = tx.query("SELECT id, balance FROM accounts ORDER BY id", &[]).await?;
                let rows = tx.query("SELECT id, src, dst, amount FROM transfers ORDER BY id", &[]).await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>((balances, rows))
            };
            let (balances, rows) = tokio::time::timeout(cfg.op_timeout * 4, read)
                .await
                .map_err(|_| anyhow!("reading the bank: no answer"))?
                .context("reading the bank")?;
            let balances = balances_of(&balances)?;
            let transfers = rows
                .iter()
                .map(|r| {
                    Ok(Transfer { id: r.try_get(0)?, from: r.try_get(1)?, to: r.try_get(2)?, amount: r.try_get(3)? })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
            Ok::<_, anyhow::Error>(State { balances, transfers })
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        tokio::time::sleep(BACKOFF.1).await;
    }
    Err(last.context(format!("reading the bank at {}", cfg.target)))
}

/// Balances by account id from `SELECT id, balance ... ORDER BY id`; an
/// account missing leaves a hole the checker sees (the vector ends early
/// or an id out of place fails here).
fn balances_of(rows: &[tokio_postgres::Row]) -> anyhow::Result<Vec<i64>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let (id, balance): (i32, i64) = (r.try_get(0)?, r.try_get(1)?);
        if id as usize != out.len() {
            bail!("account ids are not 0..n in order: {id} at position {}", out.len());
        }
        out.push(balance);
    }
    Ok(out)
}

/// What a running set of clients shares.
#[derive(Clone)]
pub struct Shared {
    /// The workload's time zero: every time in the history is ms since it.
    pub t0: Instant,
    /// The next transfer id (ids are unique over the whole workload).
    next_id: Arc<AtomicI64>,
    pub history: Arc<Mutex<Vec<Op>>>,
}

impl Shared {
    pub fn new(t0: Instant) -> Shared {
        Shared { t0, next_id: Arc::new(AtomicI64::new(1)), history: Default::default() }
    }

    fn now(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn record(&self, op: Op) {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// A copy of the history so far.
    pub fn history(&self) -> Vec<Op> {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Clients running on their own thread until `stop`.
pub struct Clients {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Clients {
    /// Starts `cfg.clients` clients in `netns` (None: this process's
    /// namespace), recording into `shared`. `seed` makes their choices.
    pub fn start(cfg: Config, netns: Option<String>, shared: Shared, seed: u64) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = spawn_in(netns, move || async move {
            let mut tasks = Vec::new();
            for c in 0..cfg.clients {
                let (cfg, shared, flag) = (cfg.clone(), shared.clone(), flag.clone());
                let rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(c as u64 + 1) | 1);
                tasks.push(tokio::spawn(async move { client(cfg, shared, rng, flag).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
            Ok(())
        });
        Clients { stop, thread }
    }

    /// Stops the clients (each finishes or times out its transaction: at
    /// most the op timeout) and waits for them.
    pub fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| anyhow!("the bank clients' thread panicked"))?
    }
}

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// One client: connects (again after any error, with a bounded backoff)
/// and alternates transfers and reads until `stop`.
async fn client(cfg: Config, shared: Shared, mut rng: Rng, stop: Arc<AtomicBool>) {
    let mut backoff = BACKOFF.0;
    while !stop.load(Ordering::SeqCst) {
        let conn = match connect(&cfg).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        while !stop.load(Ordering::SeqCst) {
            let healthy = if rng.below(cfg.read_every) == 0 {
                read(&cfg, &conn.client, &shared).await
            } else {
                let from = rng.below(cfg.accounts as u64) as i32;
                let to = (from + 1 + rng.below(cfg.accounts as u64 - 1) as i32) % cfg.accounts;
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                let amount = 1 + rng.below(cfg.max_amount as u64) as i64;
                transfer(&cfg, &conn.client, &shared, Transfer { id, from, to, amount }).await
            };
            if !healthy {
                break;
            }
            backoff = BACKOFF.0;
        }
        // A new connection after any error: the old one may sit in an
        // aborted transaction, or lead to a node that is no longer primary.
        drop(conn);
        if !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }
}

/// One read of every balance; false when the connection should be dropped.
async fn read(cfg: &Config, c: &Client, shared: &Shared) -> bool {
    let invoke_ms = shared.now();
    let q = tokio::time::timeout(cfg.op_timeout, c.query("SELECT id, balance FROM accounts ORDER BY id", &[])).await;
    let Ok(Ok(rows)) = q else { return false };
    // A read whose rows do not parse is a result too: record what it had,
    // the checker sees the account missing.
    let balances = match balances_of(&rows) {
        Ok(b) => b,
        Err(_) => rows.iter().filter_map(|r| r.try_get::<_, i64>(1).ok()).collect(),
    };
    shared.record(Op::Read { balances, invoke_ms, answer_ms: shared.now() });
    true
}

/// One transfer, recorded with what the client can know of it; false when
/// the connection should be dropped.
async fn transfer(cfg: &Config, c: &Client, shared: &Shared, t: Transfer) -> bool {
    let invoke_ms = shared.now();
    // Set just before COMMIT is sent: an error or timeout after it leaves
    // the outcome unknown; before it, the server cannot commit (the
    // transaction dies with the connection).
    let committing = AtomicBool::new(false);
    let work = async {
        c.batch_execute("BEGIN").await?;
        let rows = c
            .query(
                "SELECT id, balance FROM accounts WHERE id = $1 OR id = $2 ORDER BY id FOR UPDATE",
                &[&t.from, &t.to],
            )
            .await?;
        let from_balance = rows.iter().find(|r| r.get::<_, i32>(0) == t.from).map(|r| r.get::<_, i64>(1));
        if from_balance.is_none_or(|b| b < t.amount) {
            c.batch_execute("ROLLBACK").await?;
            return Ok(Outcome::Declined);
        }
        c.execute("UPDATE accounts SET balance = balance - $2 WHERE id = $1", &[&t.from, &t.amount]).await?;
        c.execute("UPDATE accounts SET balance = balance + $2 WHERE id = $1", &[&t.to, &t.amount]).await?;
        c.execute(
            "INSERT INTO transfers (id, src, dst, amount) VALUES ($1, $2, $3, $4)",
            &[&t.id, &t.from, &t.to, &t.amount],
        )
        .await?;
        committing.store(true, Ordering::SeqCst);
        c.batch_execute("COMMIT").await?;
        Ok::<_, tokio_postgres::Error>(Outcome::Ok)
    };
    let result = tokio::time::timeout(cfg.op_timeout, work).await;
    let outcome = match result {
        Ok(Ok(o)) => o,
        _ if committing.load(Ordering::SeqCst) => Outcome::Unknown,
        _ => Outcome::Failed,
    };
    shared.record(Op::Transfer { transfer: t, outcome, invoke_ms, answer_ms: shared.now() });
    matches!(outcome, Outcome::Ok | Outcome::Declined)
}

/// The address of `ip:port`, for `Config::new`.
pub fn target(ip: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: IpAddr = ip.parse().with_context(|| format!("{ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}
