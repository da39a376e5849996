//! The built-in virtual IP: `ip addr add` on the first interface whose link
//! is up (the primary, else a backup: local recovery before failover),
//! gratuitous ARP so that clients and switches re-learn the MAC at once,
//! `ip addr del` on stop. Monitor: the address is on an interface that is up.

use super::ActionResult;
use tokio::process::Command;

async fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().await.map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Carrier, not just the administrative flag: a pulled cable leaves
/// the interface UP but without LOWER_UP.
async fn link_up(iface: &str) -> bool {
    run("ip", &["-o", "link", "show", "dev", iface]).await.is_ok_and(|o| o.contains("LOWER_UP"))
}

/// Interfaces (of `candidates`) that carry `address` now.
pub async fn holders(address: &str, candidates: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for i in candidates {
        if run("ip", &["-o", "addr", "show", "dev", i]).await.is_ok_and(|o| o.split_whitespace().any(|w| w == address))
        {
            out.push(i.to_string());
        }
    }
    out
}

pub async fn action(verb: &str, address: &str, interface: &str, backups: &[String]) -> ActionResult {
    let all: Vec<&str> = std::iter::once(interface).chain(backups.iter().map(String::as_str)).collect();
    let ip = address.split('/').next().unwrap_or(address);
    match verb {
        "start" => {
            let mut target = None;
            for i in &all {
                if link_up(i).await {
                    target = Some(*i);
                    break;
                }
            }
            let Some(target) = target else { return Err(format!("no interface of {all:?} is up")) };
            // Each `ip` costs a few milliseconds on a failover's path:
            // look at the backups only when there are some.
            if all.len() > 1 {
                for held in holders(address, &all).await.into_iter().filter(|h| h != target) {
                    let _ = run("ip", &["addr", "del", address, "dev", &held]).await;
                }
            }
            // `replace` adds the address, or keeps it if already there.
            run("ip", &["addr", "replace", address, "dev", target]).await?;
            // Gratuitous ARP, in the background: the address serves at once,
            // the announcements (two, a second apart) follow. A missing
            // arping is reported, not fatal: clients then re-learn the MAC
            // when their ARP cache expires.
            let (iface, ip) = (target.to_string(), ip.to_string());
            let address = address.to_string();
            tokio::spawn(async move {
                if let Err(e) = run("arping", &["-U", "-c", "2", "-w", "2", "-I", &iface, &ip]).await {
                    tracing::warn!(address, interface = iface, "gratuitous ARP not sent: {e}");
                }
            });
            Ok(0)
        }
        "stop" => {
            for held in holders(address, &all).await {
                run("ip", &["addr", "del", address, "dev", &held]).await?;
            }
            Ok(0)
        }
        _ => {
            let held = holders(address, &all).await;
            match held.first() {
                None => Ok(super::OCF_NOT_RUNNING),
                Some(i) if link_up(i).await => Ok(0),
                // Its link is down: fail, so that the restart moves it to
                // a backup interface (or the group to another node).
                Some(_) => Ok(1),
            }
        }
    }
}
