//! `[listen] max_connections_per_ip`: how many connections one client address may hold open
//! at once (off by default: behind NAT or a carrier-grade NAT many devices share an address).
//!
//! The state is one count per address with an open connection, removed when its last
//! connection closes, so it never holds more entries than there are open connections (itself
//! bounded by `max_open_connections`). Taken once per accepted connection, only when the cap
//! is on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per client address, against a cap.
#[derive(Debug)]
pub struct PerIpConnections {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIpConnections {
    /// A counter allowing `max` connections per address; None when `max` is 0 (no cap).
    pub fn new(max: usize) -> Option<Arc<PerIpConnections>> {
        (max > 0).then(|| {
            Arc::new(PerIpConnections {
                max,
                open: Mutex::new(HashMap::new()),
            })
        })
    }

    /// A slot for one more connection from `ip`, or None when it already holds `max`.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PerIpSlot> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let mut open = self.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PerIpSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Addresses with at least one open connection (for tests and diagnostics).
    pub fn addresses(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Plain counter updates: a panic elsewhere cannot leave the map inconsistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's place in its address's count; given back on drop.
#[derive(Debug)]
pub struct PerIpSlot {
    owner: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_per_address_and_state_goes_with_the_last_connection() {
        assert!(PerIpConnections::new(0).is_none());
        let caps = PerIpConnections::new(2).unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = caps.try_acquire(a).unwrap();
        let second = caps.try_acquire(mapped).unwrap();
        assert!(
            caps.try_acquire(a).is_none(),
            "a third from the same address"
        );
        let other = caps.try_acquire(b).unwrap();
        assert_eq!(caps.addresses(), 2);
        drop(first);
        let again = caps.try_acquire(a).unwrap();
        drop((second, again, other));
        assert_eq!(caps.addresses(), 0, "no state kept for closed connections");
    }
}
