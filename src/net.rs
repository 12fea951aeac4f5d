//! TCP socket options shared by the server and the client side.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

/// Unacknowledged data on a migration socket fails it after this long
/// (`TCP_USER_TIMEOUT`), so a dead peer is noticed even while sending.
pub const MIGRATION_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// An accepted client socket: TCP_NODELAY and keepalive (idle 30 s,
/// interval 10 s, 3 probes), as the C flexnbd.
pub fn tune_client_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    loopback_congestion(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}

/// A migration socket (either end) notices a dead peer within seconds:
/// keepalive after 5 s idle (probes every 2 s, 3 of them) and a
/// `TCP_USER_TIMEOUT` for data the peer never acknowledges.
pub fn tune_migration_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    loopback_congestion(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(MIGRATION_USER_TIMEOUT));
}

/// An outgoing connection (to a server, or a proxy's upstream): TCP_NODELAY
/// and [`loopback_congestion`].
pub fn tune_outgoing_tcp(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    loopback_congestion(s);
    Ok(())
}

/// On a connection within this host (the peer is a loopback address, or
/// this socket's own address), a pacing congestion control (BBR, which
/// many hosts make the default) is swapped for CUBIC, or Reno where CUBIC
/// is not built: there is no path to probe on loopback, and BBR's pacing
/// timers cost about as much CPU again per byte and cap a 256 KiB stream
/// well below what the cores can do (measured in `docs/architecture.md`).
/// Other algorithms, and connections that leave the host, are left alone.
pub fn loopback_congestion(s: &TcpStream) {
    let (Ok(peer), Ok(local)) = (s.peer_addr(), s.local_addr()) else {
        return;
    };
    let peer_ip = crate::addr::canonical_ip(peer.ip());
    if !(peer_ip.is_loopback() || peer_ip == crate::addr::canonical_ip(local.ip())) {
        return;
    }
    let sock = socket2::SockRef::from(s);
    match sock.tcp_congestion() {
        Ok(name) if name.starts_with(b"bbr") => {}
        _ => return,
    }
    for alg in [&b"cubic"[..], b"reno"] {
        if sock.set_tcp_congestion(alg).is_ok() {
            return;
        }
    }
}

/// Whether `ip` is an address of this host (loopback, unspecified, or one
/// a socket can be bound to here).
pub fn is_local_ip(ip: IpAddr) -> bool {
    let ip = crate::addr::canonical_ip(ip);
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Whether connecting to `dest` would reach one of the listening addresses
/// `own` of this process.
pub fn is_own_address(dest: SocketAddr, own: &[SocketAddr]) -> bool {
    let ip = crate::addr::canonical_ip(dest.ip());
    own.iter().any(|a| {
        let listen = crate::addr::canonical_ip(a.ip());
        a.port() == dest.port()
            && (listen == ip || (listen.is_unspecified() && is_local_ip(ip)) || ip.is_unspecified())
    })
}

/// Socket buffers for a proxied connection, where data passes through:
/// large enough that a 256 KiB reply or write goes through without the
/// sender and the receiver waking each other several times on the way
/// (unix sockets default to about 200 KiB). The kernel caps them at its
/// `wmem_max`/`rmem_max`.
pub const PROXY_SOCKET_BUFFER: usize = 4 << 20;

/// Applies [`PROXY_SOCKET_BUFFER`] to a connected socket; errors are ignored
/// (the defaults work, only slower).
pub fn proxy_buffers(s: std::os::fd::BorrowedFd<'_>) {
    let r = socket2::SockRef::from(&s);
    let _ = r.set_send_buffer_size(PROXY_SOCKET_BUFFER);
    let _ = r.set_recv_buffer_size(PROXY_SOCKET_BUFFER);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_connections_leave_bbr_for_cubic() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&c);
        if sock.set_tcp_congestion(b"bbr").is_err() {
            eprintln!("this kernel has no BBR; nothing to swap");
            return;
        }
        loopback_congestion(&c);
        let now = sock.tcp_congestion().unwrap();
        assert!(
            now.starts_with(b"cubic") || now.starts_with(b"reno"),
            "{}",
            String::from_utf8_lossy(&now)
        );
        // Other algorithms are left as they are.
        sock.set_tcp_congestion(b"reno").unwrap();
        loopback_congestion(&c);
        assert!(sock.tcp_congestion().unwrap().starts_with(b"reno"));
    }

    #[test]
    fn migration_sockets_get_keepalive_and_a_user_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        tune_migration_tcp(&c);
        let s = socket2::SockRef::from(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(5));
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(MIGRATION_USER_TIMEOUT));
    }

    #[test]
    fn own_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [a("127.0.0.1:4000"), a("0.0.0.0:5000"), a("[::]:6000")];
        for yes in [
            "127.0.0.1:4000",
            "127.0.0.2:5000",
            "0.0.0.0:4000",
            "[::1]:6000",
            "[::ffff:127.0.0.1]:4000",
        ] {
            assert!(is_own_address(a(yes), &own), "{yes}");
        }
        for no in ["127.0.0.2:4000", "127.0.0.1:4001", "192.0.2.1:5000"] {
            assert!(!is_own_address(a(no), &own), "{no}");
        }
    }
}
