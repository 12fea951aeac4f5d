//! Access control lists: `IP[/prefix]` entries, IPv4 and IPv6.

use crate::addr::{canonical_ip, parse_ip};
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad spec: {0}")]
pub struct BadSpec(pub String);

/// One entry: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl AclEntry {
    /// Parses `IP` or `IP/prefix`; `/0` and prefixes longer than the address
    /// are rejected. An IPv4-mapped IPv6 address (`::ffff:10.0.0.0/104`) is
    /// its IPv4 address, its prefix counted in IPv6 bits (so at least 97: a
    /// shorter one would reach beyond the mapped addresses).
    pub fn parse(s: &str) -> Result<AclEntry, BadSpec> {
        let bad = || BadSpec(s.to_owned());
        let (ip_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let written = parse_ip(ip_s).map_err(|_| bad())?;
        let ip = canonical_ip(written);
        let mapped = written != ip;
        let max = match written {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix_s {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let n: u8 = p.parse().map_err(|_| bad())?;
                if n == 0 || n > max {
                    return Err(bad());
                }
                n
            }
        };
        let prefix = match mapped {
            true if prefix <= 96 => return Err(bad()),
            true => prefix - 96,
            false => prefix,
        };
        Ok(AclEntry { ip, prefix })
    }

    pub fn matches(&self, peer: IpAddr) -> bool {
        match (self.ip, canonical_ip(peer)) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX << (32 - self.prefix as u32);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX << (128 - self.prefix as u32);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for AclEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// The list plus the rule for an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub entries: Vec<AclEntry>,
    pub default_deny: bool,
}

impl Acl {
    /// Parses every entry; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S], default_deny: bool) -> Result<Acl, BadSpec> {
        let entries = entries
            .iter()
            .map(|e| AclEntry::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Acl {
            entries,
            default_deny,
        })
    }

    /// Whether a peer with this address may connect.
    pub fn allows(&self, peer: IpAddr) -> bool {
        if self.entries.is_empty() {
            return !self.default_deny;
        }
        self.entries.iter().any(|e| e.matches(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_entries() {
        assert_eq!(AclEntry::parse("127.0.0.1").unwrap().prefix, 32);
        assert_eq!(AclEntry::parse("10.0.0.0/8").unwrap().prefix, 8);
        assert_eq!(AclEntry::parse("::1").unwrap().prefix, 128);
        assert_eq!(AclEntry::parse("[fe80::]/10").unwrap().prefix, 10);
        for bad in [
            "",
            "/8",
            "1.2.3.4/0",
            "1.2.3.4/33",
            "::1/129",
            "1.2.3.4/",
            "1.2.3.4/x",
            "host",
            "1.2.3.4/-1",
        ] {
            assert!(AclEntry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let acl = Acl::parse(&["127.0.0.2", "10.1.0.0/16", "::1"], false).unwrap();
        assert!(acl.allows(ip("127.0.0.2")));
        assert!(!acl.allows(ip("127.0.0.1")));
        assert!(acl.allows(ip("10.1.200.3")));
        assert!(!acl.allows(ip("10.2.0.1")));
        assert!(acl.allows(ip("::1")));
        assert!(acl.allows(ip("::ffff:127.0.0.2")));
        assert!(!acl.allows(ip("::2")));
    }

    #[test]
    fn ipv4_mapped_entries_are_their_ipv4_addresses() {
        let e = AclEntry::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!((e.ip, e.prefix), (ip("10.0.0.0"), 8));
        let e = AclEntry::parse("[::ffff:127.0.0.1]").unwrap();
        assert_eq!((e.ip, e.prefix), (ip("127.0.0.1"), 32));
        let acl = Acl::parse(&["::ffff:10.0.0.0/104"], false).unwrap();
        assert!(acl.allows(ip("10.9.8.7")));
        assert!(acl.allows(ip("::ffff:10.9.8.7")));
        assert!(!acl.allows(ip("11.0.0.1")));
        // A prefix reaching beyond the mapped range is ambiguous: refused.
        for bad in [
            "::ffff:127.0.0.1/8",
            "::ffff:10.0.0.0/96",
            "::ffff:1.2.3.4/129",
        ] {
            assert!(AclEntry::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v4_never_matches_v6_entry() {
        let acl = Acl::parse(&["::/1"], false).unwrap();
        assert!(!acl.allows(ip("0.0.0.1")));
    }

    #[test]
    fn empty_list() {
        assert!(Acl::parse::<&str>(&[], false)
            .unwrap()
            .allows(ip("1.2.3.4")));
        assert!(!Acl::parse::<&str>(&[], true).unwrap().allows(ip("1.2.3.4")));
    }

    #[test]
    fn first_bad_entry_reported() {
        assert_eq!(
            Acl::parse(&["127.0.0.1", "nope", "x"], false).unwrap_err(),
            BadSpec("nope".into())
        );
    }
}
