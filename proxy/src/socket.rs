//! Socket options and syscalls the enforcer needs. socket2 and nix cover most of them;
//! the `unsafe` blocks for those neither wraps (an integer option: IPV6_TRANSPARENT,
//! SO_RCVLOWAT; TCP_INFO's byte counters) are here, commented and tested.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// The destination a REDIRECTed connection from `peer` (as `accept` gave it: its family
/// is the connection's) was going to (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`,
/// netfilter's conntrack lookup).
pub fn original_dst(stream: &tokio::net::TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match peer {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Sets `IPV6_TRANSPARENT` (ipv6(7)): the socket may accept connections TPROXY diverts to
/// it for addresses that are not its own.
pub fn set_ipv6_transparent(sock: &Socket) -> io::Result<()> {
    set_int(sock, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
}

/// setsockopt(2) with an integer value.
fn set_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // Safety: `fd` is a live descriptor for the duration of the call; the option value
    // points to a live c_int and its exact size is passed, as setsockopt(2) needs.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket. `transparent`: IP_TRANSPARENT / IPV6_TRANSPARENT, for TPROXY.
pub fn listener(
    addr: SocketAddr,
    transparent: bool,
    backlog: i32,
) -> io::Result<tokio::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if transparent {
        match addr {
            SocketAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => set_ipv6_transparent(&sock)?,
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Connects to `to` with `SO_MARK` `mark` (the capture rules let the enforcer's uid out
/// only with its mark), from the address `from` when given (an enforcer bound to one
/// address: its peers must see the connection come from there).
pub async fn connect(
    to: SocketAddr,
    from: Option<std::net::IpAddr>,
    mark: u32,
) -> io::Result<TcpStream> {
    let sock = match to {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    set_mark(&sock, mark);
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    sock.connect(to).await
}

/// Sets `SO_MARK` (socket(7)); without CAP_NET_ADMIN the socket stays unmarked, which
/// is said once (an enforcer without the capability cannot TPROXY either; the
/// in-process tests run so).
fn set_mark(sock: &impl std::os::fd::AsFd, mark: u32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = SockRef::from(sock).set_mark(mark) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, mark, "cannot mark the enforcer's connections (no CAP_NET_ADMIN?): capture rules that require the mark will capture them");
        }
    }
}

/// Bytes written into this TCP socket's send queue since it was created: those sent
/// once (`tcpi_bytes_sent` less `tcpi_bytes_retrans`) and those not yet sent
/// (`tcpi_notsent_bytes`), from `TCP_INFO` (tcp(7); the byte counters since Linux 4.19).
pub fn tcp_written(fd: &impl AsRawFd) -> io::Result<u64> {
    // Safety: tcp_info is plain integers, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // Safety: `fd` is a live descriptor for the duration of the call; the kernel writes
    // at most `len` bytes into `info` (it copies the smaller of its struct and `len`)
    // and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_retrans) + 8;
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's TCP_INFO has no byte counters (Linux 4.19 or later needed)",
        ));
    }
    Ok(info.tcpi_bytes_sent - info.tcpi_bytes_retrans + u64::from(info.tcpi_notsent_bytes))
}

/// Sets `SO_RCVLOWAT` to 1 (its default). For TCP this also runs the socket's
/// data-ready callback when bytes are queued (`tcp_set_rcvlowat` calls
/// `tcp_data_ready`): a socket just put under a BPF stream verdict has the verdict see
/// the bytes that arrived before, instead of waiting for more.
pub fn poke_data_ready(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Closes with an RST instead of a FIN (SO_LINGER with a zero timeout, socket(7)).
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Sends a FIN: no more data in this direction (shutdown(2) with SHUT_WR).
pub fn shutdown_write(stream: &tokio::net::TcpStream) -> io::Result<()> {
    SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPV6_TRANSPARENT needs CAP_NET_ADMIN. Its effect is visible: a transparent
    /// socket may bind an address that is not local (RFC 3849 documentation prefix),
    /// an ordinary one may not. Without the capability the kernel's EPERM is reported.
    #[test]
    fn ipv6_transparent_allows_binding_foreign_addresses() {
        let foreign: SocketAddr = "[2001:db8::1]:0".parse().unwrap();
        let plain = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        if plain.bind(&foreign.into()).is_ok() {
            // This kernel allows non-local binds anyway (ip_nonlocal_bind): nothing to tell.
            return;
        }
        let sock = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        match set_ipv6_transparent(&sock) {
            Ok(()) => sock
                .bind(&foreign.into())
                .expect("a transparent socket binds a foreign address"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
    }

    /// The enforcer's connections carry its mark where the kernel lets it set one
    /// (CAP_NET_ADMIN), and connect anyway where not.
    #[tokio::test]
    async fn connections_carry_the_mark() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = connect(l.local_addr().unwrap(), None, 0x1337)
            .await
            .unwrap();
        let mark = SockRef::from(&s).mark().unwrap();
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        match probe.set_mark(1) {
            Ok(()) => assert_eq!(mark, 0x1337),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert_eq!(mark, 0);
            }
        }
        let from = connect(
            l.local_addr().unwrap(),
            Some("127.0.0.9".parse().unwrap()),
            0,
        )
        .await
        .unwrap();
        assert_eq!(from.local_addr().unwrap().ip().to_string(), "127.0.0.9");
    }

    #[tokio::test]
    async fn reset_sends_rst() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        reset(s);
        let mut b = [0u8; 1];
        let err = tokio::io::AsyncReadExt::read(&mut c, &mut b)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
