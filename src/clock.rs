//! Clocks read by the agent: the boot clock every process of the node
//! shares (leases are counted on it) and the local time of day (failback
//! windows). Pure modules never call these; the shell passes the values in.

/// Milliseconds on CLOCK_BOOTTIME: one clock for every process of the node.
pub fn now_boot_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000,
        // CLOCK_BOOTTIME exists on every kernel this runs on; if it did not,
        // 0 makes every lease look expired: the safe side.
        Err(_) => 0,
    }
}

/// Minutes since local midnight, for failback windows.
pub fn local_minute_of_day() -> u16 {
    // SAFETY: localtime_r only writes the struct we pass.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        (tm.tm_hour * 60 + tm.tm_min) as u16
    }
}
