//! Addresses as the command line and the control socket spell them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("bad IP address: {0}")]
    BadIp(String),
    #[error("bad IP port number: {0}")]
    BadPort(String),
}

/// Parses an IPv4 or IPv6 literal; `[::1]` is accepted and `0` means all IPv4 addresses.
pub fn parse_ip(s: &str) -> Result<IpAddr, AddrError> {
    if s == "0" {
        return Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    inner
        .parse::<IpAddr>()
        .map_err(|_| AddrError::BadIp(s.to_owned()))
}

/// Parses a port number 0..=65535.
pub fn parse_port(s: &str) -> Result<u16, AddrError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::BadPort(s.to_owned()));
    }
    s.parse::<u16>()
        .map_err(|_| AddrError::BadPort(s.to_owned()))
}

/// Where a server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// The name a TLS server here must have a certificate for, unless
    /// another is given: the IP address, or `localhost` for a unix socket.
    pub fn tls_host(&self) -> String {
        match self {
            Endpoint::Tcp(a) => a.ip().to_string(),
            Endpoint::Unix(_) => "localhost".into(),
        }
    }

    /// `--addr` and `--port` together: an address containing `/` is a unix socket path.
    pub fn from_addr_port(addr: &str, port: Option<&str>) -> Result<Endpoint, AddrError> {
        if addr.contains('/') {
            return Ok(Endpoint::Unix(PathBuf::from(addr)));
        }
        let ip = parse_ip(addr)?;
        let port = match port {
            Some(p) => parse_port(p)?,
            None => return Err(AddrError::BadPort(String::new())),
        };
        Ok(Endpoint::Tcp(SocketAddr::new(ip, port)))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Maps IPv4-mapped IPv6 addresses back to IPv4, so peers compare as they connected.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips() {
        assert_eq!(parse_ip("0").unwrap(), "0.0.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(parse_ip("[::1]").unwrap(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(parse_ip("::1").unwrap(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(
            parse_ip("127.0.0.2").unwrap(),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        for bad in [
            "",
            "localhost",
            "1.2.3",
            "1.2.3.4.5",
            "[::1",
            "::g",
            "256.0.0.1",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("0").unwrap(), 0);
        assert_eq!(parse_port("65535").unwrap(), 65535);
        for bad in ["", "-1", "65536", "+1", "1e3", " 1"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::from_addr_port("/tmp/s", None).unwrap(),
            Endpoint::Unix("/tmp/s".into())
        );
        assert_eq!(
            Endpoint::from_addr_port("::1", Some("10809")).unwrap(),
            Endpoint::Tcp("[::1]:10809".parse().unwrap())
        );
        assert!(Endpoint::from_addr_port("127.0.0.1", None).is_err());
    }

    #[test]
    fn mapped() {
        let m: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(canonical_ip(m), "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
