//! What the benchmark programs in `examples/` share: where the agent binary
//! they start is, and waiting for a condition with a deadline. No I/O of
//! its own beyond the condition the caller polls.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `tandem` binary built beside this example (`target/<profile>/examples/x`
/// → `target/<profile>/tandem`).
pub fn sibling_tandem_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).map(|d| d.join("tandem")).expect("target dir")
}

/// Polls `f` every `every` until it holds; panics naming `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, every: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}
