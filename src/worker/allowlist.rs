//! Which callback destinations are allowed (`callback_allowed_networks`): the pure rule
//! against server-side request forgery. A callback URL comes from whoever queued the job, so
//! without a rule the worker will POST to anything it can reach: a cloud metadata endpoint
//! (`169.254.169.254`), the gateway's own API, a database on the pod network.
//!
//! The rule is checked per address, at connect time (`callback.rs` resolves names through
//! [`AllowList::check`], so a name that resolves to something else the second time, DNS
//! rebinding, is checked again): an address is allowed if it is inside a listed network, or if
//! the host was listed by name (or `*`) and the address is not internal ([`internal`]).
//! A callback goes out only when every address of its host is allowed.
//!
//! Pure: no I/O, no resolver, no HTTP; table-tested below.

use std::fmt;
use std::net::IpAddr;

/// The parsed `callback_allowed_networks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    /// `*`: any host by name, as long as its addresses are not internal.
    any_host: bool,
    /// Exact host names, lower case, without a trailing dot.
    hosts: Vec<String>,
    /// `*.example.com` as `.example.com`: any name below it (not `example.com` itself).
    suffixes: Vec<String>,
    networks: Vec<Network>,
}

/// Why a destination is refused; the text is what the warning says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Blocked {
    /// The host is not in the list by name, and (one of) its addresses is in no listed network.
    #[error("{host} ({addr}) is not in callback_allowed_networks")]
    NotListed { host: String, addr: IpAddr },
    /// The host is listed by name, but resolves to an internal address no listed network covers.
    #[error("{host} resolves to {addr}, a {range} address not in callback_allowed_networks")]
    Internal {
        host: String,
        addr: IpAddr,
        range: &'static str,
    },
    /// The name resolved to nothing at all.
    #[error("{host} has no address")]
    NoAddress { host: String },
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Network {
        Network {
            addr: IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Network {
        let [a, b, c, d, e, f, g, h] = segments;
        Network {
            addr: IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a single-address network). Bits set
    /// past the prefix are refused (`10.1.2.3/8` is probably a typo for something).
    fn parse(s: &str) -> Option<Network> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        let net = Network { addr, prefix };
        (bits(addr) & !mask(prefix, max) == 0).then_some(net)
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let m = mask(self.prefix, max);
                bits(self.addr) & m == bits(addr) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The network mask of `prefix` bits in an address of `max` bits.
fn mask(prefix: u8, max: u8) -> u128 {
    let all: u128 = if max == 32 {
        u32::MAX.into()
    } else {
        u128::MAX
    };
    all & !all.checked_shr(prefix.into()).unwrap_or(0)
}

/// Addresses a callback must not reach unless a listed network covers them: everything that
/// is not the public internet. Link-local holds the cloud metadata endpoints (169.254.169.254,
/// and AWS's fd00:ec2::254 is unique-local).
const INTERNAL: &[(Network, &str)] = &[
    (Network::v4(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8)"),
    (Network::v4(10, 0, 0, 0, 8), "private (10.0.0.0/8)"),
    (Network::v4(100, 64, 0, 0, 10), "shared (100.64.0.0/10)"),
    (Network::v4(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (
        Network::v4(169, 254, 0, 0, 16),
        "link-local (169.254.0.0/16, cloud metadata)",
    ),
    (Network::v4(172, 16, 0, 0, 12), "private (172.16.0.0/12)"),
    (
        Network::v4(192, 0, 0, 0, 24),
        "IETF protocol (192.0.0.0/24)",
    ),
    (Network::v4(192, 168, 0, 0, 16), "private (192.168.0.0/16)"),
    (
        Network::v4(198, 18, 0, 0, 15),
        "benchmarking (198.18.0.0/15)",
    ),
    (Network::v4(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (Network::v4(240, 0, 0, 0, 4), "reserved (240.0.0.0/4)"),
    (Network::v6([0; 8], 128), "unspecified (::)"),
    (Network::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback (::1)"),
    (
        Network::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local (fc00::/7, incl. fd00:ec2::254)",
    ),
    (
        Network::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        "link-local (fe80::/10)",
    ),
    // IPv6 forms that carry an IPv4 address a gateway translates to: behind DNS64/NAT64
    // (a cloud NAT gateway, for one) they reach private IPv4 networks.
    (
        Network::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
        "NAT64 (64:ff9b::/96)",
    ),
    (
        Network::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    (
        Network::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
        "6to4 (2002::/16)",
    ),
    (
        Network::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
        "multicast (ff00::/8)",
    ),
];

/// The internal range `addr` is in, if any (an IPv4-mapped IPv6 address counts as its IPv4
/// address).
pub fn internal(addr: IpAddr) -> Option<&'static str> {
    let addr = canonical(addr);
    INTERNAL
        .iter()
        .find(|(net, _)| net.contains(addr))
        .map(|(_, name)| *name)
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so mapped addresses meet the IPv4 rules.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl AllowList {
    /// Parses the setting: comma-separated entries, each a host name (`cb.example.com`), a
    /// wildcard (`*.example.com`, or `*` for any host), an IP address or an IP network in
    /// CIDR form. `None` for an empty setting (no restriction). The error is the first entry
    /// that is none of these.
    pub fn parse(value: &str) -> Result<Option<AllowList>, String> {
        let mut list = AllowList {
            any_host: false,
            hosts: Vec::new(),
            suffixes: Vec::new(),
            networks: Vec::new(),
        };
        let mut any = false;
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            any = true;
            let lower = entry.to_ascii_lowercase();
            let lower = lower.strip_suffix('.').unwrap_or(&lower);
            let as_ip = lower
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .unwrap_or(lower);
            if entry == "*" {
                list.any_host = true;
            } else if let Some(net) = Network::parse(as_ip) {
                list.networks.push(net);
            } else if let Some(domain) = lower.strip_prefix("*.") {
                if !is_host_name(domain) {
                    return Err(entry.to_string());
                }
                list.suffixes.push(format!(".{domain}"));
            } else if is_host_name(lower) && !lower.contains('/') {
                list.hosts.push(lower.to_string());
            } else {
                return Err(entry.to_string());
            }
        }
        Ok(any.then_some(list))
    }

    /// Whether `host` (a name, or an IP literal as the URL wrote it) is listed by name.
    fn names(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host);
        self.any_host
            || self.hosts.iter().any(|h| h == host)
            || self.suffixes.iter().any(|s| host.ends_with(s.as_str()))
    }

    /// Whether `host`, connecting to `addr`, may be reached.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Blocked> {
        let addr = canonical(addr);
        if self.networks.iter().any(|n| n.contains(addr)) {
            return Ok(());
        }
        if !self.names(host) {
            return Err(Blocked::NotListed {
                host: host.to_string(),
                addr,
            });
        }
        match internal(addr) {
            Some(range) => Err(Blocked::Internal {
                host: host.to_string(),
                addr,
                range,
            }),
            None => Ok(()),
        }
    }

    /// [`AllowList::check`] for every address of `host`: all must pass, and there must be
    /// at least one.
    pub fn check_all(
        &self,
        host: &str,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), Blocked> {
        let mut none = true;
        for addr in addrs {
            none = false;
            self.check(host, addr)?;
        }
        if none {
            return Err(Blocked::NoAddress {
                host: host.to_string(),
            });
        }
        Ok(())
    }
}

/// A DNS name: labels of letters, digits, `-` and `_`, none empty.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> AllowList {
        AllowList::parse(s).unwrap().unwrap()
    }

    #[test]
    fn parsing() {
        assert_eq!(AllowList::parse(""), Ok(None));
        assert_eq!(AllowList::parse(" , "), Ok(None));
        let l = list(
            "CB.example.com., *.hooks.example.com, 10.1.0.0/16, 127.0.0.1, [::1], fd00::/8, *",
        );
        assert!(l.any_host);
        assert_eq!(l.hosts, ["cb.example.com"]);
        assert_eq!(l.suffixes, [".hooks.example.com"]);
        let nets: Vec<String> = l.networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.1.0.0/16", "127.0.0.1/32", "::1/128", "fd00::/8"]);
        for bad in [
            "10.0.0.0/33",
            "10.1.2.3/8",
            "::1/129",
            "http://cb.example.com",
            "cb.example.com:8080",
            "*.",
            "a..b",
            "*example.com",
            "10.0.0.0/x",
            "a b",
        ] {
            assert_eq!(
                AllowList::parse(&format!("cb.example.com, {bad}")),
                Err(bad.to_string()),
                "{bad}"
            );
        }
    }

    #[test]
    fn internal_ranges() {
        let table: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("10.3.4.5", Some("private")),
            ("172.31.255.255", Some("private")),
            ("172.32.0.1", None),
            ("192.168.1.1", Some("private")),
            ("100.100.100.200", Some("shared")),
            ("0.0.0.0", Some("this network")),
            ("255.255.255.255", Some("reserved")),
            ("8.8.8.8", None),
            ("::1", Some("loopback")),
            ("::", Some("unspecified")),
            ("fd00:ec2::254", Some("unique local")),
            ("fe80::1", Some("link-local")),
            ("::ffff:169.254.169.254", Some("link-local")),
            ("::ffff:8.8.8.8", None),
            ("2001:4860:4860::8888", None),
            ("64:ff9b::a00:5", Some("NAT64")),
            ("64:ff9b:1::1", Some("NAT64")),
            ("2002:a00:5::1", Some("6to4")),
        ];
        for (addr, want) in table {
            let got = internal(addr.parse().unwrap());
            match want {
                Some(w) => assert!(got.is_some_and(|g| g.contains(w)), "{addr}: {got:?}"),
                None => assert_eq!(got, None, "{addr}"),
            }
        }
    }

    /// (list, host, address, allowed)
    #[test]
    fn decisions() {
        let table: &[(&str, &str, &str, bool)] = &[
            // A listed name reaching the internet.
            ("cb.example.com", "cb.example.com", "93.184.216.34", true),
            ("cb.example.com", "CB.Example.COM.", "93.184.216.34", true),
            // ... but not when it resolves inside (rebinding, or a name for the metadata).
            ("cb.example.com", "cb.example.com", "169.254.169.254", false),
            ("cb.example.com", "cb.example.com", "127.0.0.1", false),
            ("cb.example.com", "cb.example.com", "::ffff:10.0.0.1", false),
            // Other names are not listed, wherever they point.
            ("cb.example.com", "evil.example.com", "93.184.216.34", false),
            ("cb.example.com", "xcb.example.com", "93.184.216.34", false),
            // Wildcards: below the domain, not the domain itself.
            ("*.example.com", "a.b.example.com", "93.184.216.34", true),
            ("*.example.com", "example.com", "93.184.216.34", false),
            ("*.example.com", "badexample.com", "93.184.216.34", false),
            // `*`: any public destination, internal ones still refused.
            ("*", "anything.test", "93.184.216.34", true),
            ("*", "93.184.216.34", "93.184.216.34", true),
            ("*", "169.254.169.254", "169.254.169.254", false),
            ("*", "[fd00:ec2::254]", "fd00:ec2::254", false),
            // A listed network allows what is in it, by any name or as a literal.
            ("127.0.0.1/32", "127.0.0.1", "127.0.0.1", true),
            ("127.0.0.1/32", "localhost", "127.0.0.1", true),
            ("127.0.0.1/32", "localhost", "::1", false),
            ("127.0.0.1/32", "127.0.0.2", "127.0.0.2", false),
            ("10.1.0.0/16", "svc.cluster.local", "10.1.200.3", true),
            ("10.1.0.0/16", "svc.cluster.local", "10.2.0.3", false),
            ("10.1.0.0/16, *", "svc.cluster.local", "10.2.0.3", false),
            ("10.1.0.0/16", "93.184.216.34", "93.184.216.34", false),
            ("::1", "localhost", "::1", true),
            ("::1", "localhost", "127.0.0.1", false),
            // A mapped address meets the IPv4 network.
            ("127.0.0.1", "localhost", "::ffff:127.0.0.1", true),
        ];
        for &(setting, host, addr, allowed) in table {
            let got = list(setting).check(host, addr.parse().unwrap());
            assert_eq!(got.is_ok(), allowed, "{setting} / {host} / {addr}: {got:?}");
        }
    }

    #[test]
    fn every_address_must_pass() {
        let l = list("cb.example.com");
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        assert_eq!(l.check_all("cb.example.com", [public]), Ok(()));
        let err = l
            .check_all("cb.example.com", [public, metadata])
            .unwrap_err();
        assert!(
            err.to_string().contains("169.254.169.254") && err.to_string().contains("link-local"),
            "{err}"
        );
        assert!(matches!(
            l.check_all("cb.example.com", []),
            Err(Blocked::NoAddress { .. })
        ));
    }
}
