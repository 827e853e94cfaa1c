//! Whether an address is one of this network namespace's own.
//!
//! A captured inbound connection's local address is its original destination, which may
//! be any address the capture rules diverted; only connections for the namespace's own
//! addresses are the enforcer's to decide (anything else would make it a relay). Listing
//! the interfaces' addresses (`getifaddrs`: two netlink dumps) took 70 µs of CPU per
//! call on the 2-core VM, once per inbound external connection. [`LocalAddrs`] keeps
//! the list and lists again only after the kernel said something changed.
//!
//! Exact, not eventually right: the enforcer subscribes to the kernel's address and link
//! notifications (`RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`, `RTMGRP_LINK`) before its
//! first listing. The kernel queues a notification on the subscribed socket before the
//! request that added or removed an address returns, so every check made after a change
//! finds a message waiting (one non-blocking `recv`) and lists again. Notifications the
//! kernel could not queue (`ENOBUFS`) count as a change. Without a subscription (netlink
//! refused), every check lists, as before.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

/// This namespace's addresses, listed again only after a change (module docs).
#[derive(Debug)]
pub struct LocalAddrs {
    /// Subscribed to address and link changes: a message waiting means the list may be
    /// stale. `None`: netlink refused; every check lists.
    changes: Option<OwnedFd>,
    /// The last listing; `None` until the first check and after a change.
    list: Mutex<Option<Vec<IpAddr>>>,
    /// Listings made.
    listings: AtomicU64,
}

impl LocalAddrs {
    /// Subscribes to changes in the calling thread's network namespace (the one whose
    /// addresses the checks are about).
    pub fn new() -> LocalAddrs {
        let changes = subscribe()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no netlink subscription to address changes: every inbound connection lists the interfaces' addresses")
            })
            .ok();
        LocalAddrs {
            changes,
            list: Mutex::new(None),
            listings: AtomicU64::new(0),
        }
    }

    /// Whether `ip` is an address of one of this namespace's interfaces now. A listing
    /// that fails answers no (never a relay).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if self.changed() {
            *list = None;
        }
        if list.is_none() {
            self.listings.fetch_add(1, Ordering::Relaxed);
            *list = addresses().ok();
        }
        list.as_ref().is_some_and(|l| l.contains(&ip))
    }

    /// Listings made so far (the first check makes one; then one per change).
    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::Relaxed)
    }

    /// Whether the kernel said anything since the last call (reads every message
    /// waiting; their content does not matter).
    fn changed(&self) -> bool {
        let Some(fd) = &self.changes else {
            return true;
        };
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => any = true,
                Err(Errno::EAGAIN) => return any,
                Err(Errno::EINTR) => {}
                // Notifications were lost: a change. Said once; the rest waiting is
                // read on.
                Err(Errno::ENOBUFS) => any = true,
                // Anything else: assume the worst, without looping on it.
                Err(_) => return true,
            }
        }
    }
}

impl Default for LocalAddrs {
    fn default() -> Self {
        Self::new()
    }
}

/// A netlink socket subscribed to address and link changes.
fn subscribe() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups as u32))?;
    Ok(fd)
}

/// Every address of this namespace's interfaces (`getifaddrs`), canonical.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs()?;
    Ok(addrs
        .filter_map(|a| {
            let a = a.address?;
            a.as_sockaddr_in()
                .map(|s| IpAddr::from(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::from(s.ip())))
        })
        .map(|ip| ip.to_canonical())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In the test process's namespace (others may change it meanwhile: the netns test
    /// `netns_local_addrs` counts listings and follows changes).
    #[test]
    fn local_addresses_are_known() {
        let local = LocalAddrs::new();
        assert!(local.changes.is_some(), "no netlink subscription");
        for _ in 0..3 {
            assert!(local.contains("127.0.0.1".parse().unwrap()));
            assert!(local.contains("::ffff:127.0.0.1".parse().unwrap()));
            // RFC 5737 / 3849 documentation addresses are nobody's.
            assert!(!local.contains("192.0.2.80".parse().unwrap()));
            assert!(!local.contains("2001:db8::80".parse().unwrap()));
        }
    }
}
