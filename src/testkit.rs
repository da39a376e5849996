//! Helpers shared by the integration tests and the benchmark, which both
//! start real agents on loopback. Nothing in the agent uses this module.

/// A port free for both TCP (API) and UDP (heartbeats) on 127.0.0.1, taken
/// below the kernel's ephemeral range (32768+) so that no outgoing
/// connection of another agent can grab it before the agent binds it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 12000) as u16;
        // Never hand out the same port twice in one process.
        static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        if !GIVEN.lock().unwrap().insert(port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port");
}
