//! TCP socket options shared by the server and the client side.

use std::net::TcpStream;
use std::time::Duration;

/// Unacknowledged data on a migration socket fails it after this long
/// (`TCP_USER_TIMEOUT`), so a dead peer is noticed even while sending.
pub const MIGRATION_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// An accepted client socket: TCP_NODELAY and keepalive (idle 30 s,
/// interval 10 s, 3 probes), as the C flexnbd.
pub fn tune_client_tcp(s: &TcpStream) {
    let _ = s.set_nodelay(true);
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
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let sock = socket2::SockRef::from(s);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(MIGRATION_USER_TIMEOUT));
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
