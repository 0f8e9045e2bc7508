//! Outbound address policy for HTTP and webhook steps: loopback, private, link-local (cloud metadata
//! lives there), shared, unspecified, multicast and reserved addresses are refused unless an operator
//! allowlists them (`--allow-http-to 127.0.0.0/8,10.1.0.0/16`). The check runs on every address a
//! host resolves to, and on IP literals, right before connecting, so DNS cannot smuggle one in.
//! [`http_client`] is the client every outbound call uses: HTTP steps, webhook calls and deliveries.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
    /// 169.254/16 (cloud metadata), fe80::/10.
    LinkLocal,
    /// 100.64/10 (carrier-grade NAT; also some metadata endpoints).
    Shared,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// Multicast and broadcast.
    Multicast,
    /// Documentation, benchmarking and other reserved ranges.
    Reserved,
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local (cloud metadata)",
            Self::Shared => "shared (carrier-grade NAT)",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast or broadcast",
            Self::Reserved => "reserved",
        })
    }
}

/// The category of a non-public address, or `None` for a public one.
pub fn classify(ip: IpAddr) -> Option<Category> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Category> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some(Category::Loopback)
    } else if ip.is_private() {
        Some(Category::Private)
    } else if ip.is_link_local() {
        Some(Category::LinkLocal)
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some(Category::Shared)
    } else if o[0] == 0 {
        Some(Category::Unspecified)
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some(Category::Multicast)
    } else if ip.is_documentation()
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        Some(Category::Reserved)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Category> {
    let seg = ip.segments();
    if ip.is_loopback() {
        Some(Category::Loopback)
    } else if ip.is_unspecified() {
        Some(Category::Unspecified)
    } else if (seg[0] & 0xfe00) == 0xfc00 {
        Some(Category::Private)
    } else if (seg[0] & 0xffc0) == 0xfe80 {
        Some(Category::LinkLocal)
    } else if ip.is_multicast() {
        Some(Category::Multicast)
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        Some(Category::Reserved)
    } else if seg[0] == 0x64 && seg[1] == 0xff9b {
        // NAT64: judge the embedded IPv4 address.
        let v4 = Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        classify_v4(v4)
    } else {
        None
    }
}

/// An address block, e.g. `127.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address block like 10.0.0.0/8"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
        };
        Ok(Self { network, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                (u32::from(n) & mask) == (u32::from(a) & mask)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                (u128::from(n) & mask) == (u128::from(a) & mask)
            }
            _ => false,
        }
    }
}

/// The outbound policy: refuse non-public addresses outside the allowlist.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow: Vec<Cidr>,
}

/// A refused address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is a {category} address; allow it with --allow-http-to")]
pub struct Refused {
    /// The address.
    pub ip: IpAddr,
    /// Why.
    pub category: Category,
}

impl Policy {
    /// A policy allowing these blocks besides public addresses.
    pub fn new(allow: Vec<Cidr>) -> Self {
        Self { allow }
    }

    /// Checks one address.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        match classify(ip) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|c| c.contains(ip)) => Ok(()),
            Some(category) => Err(Refused { ip, category }),
        }
    }

    /// Checks a URL whose host is an IP literal ([`http_client`]'s resolver sees only names).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }
}

/// The refusal behind an error of [`http_client`], if the policy refused every address a name
/// resolved to.
pub fn refused_in(err: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

/// A DNS resolver that drops addresses the outbound policy refuses.
struct GuardedResolver {
    policy: Arc<Policy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refused = Some(r);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(r)) => Err(Box::new(r) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The HTTP client of every outbound call (HTTP steps, webhook calls and deliveries): no proxies
/// from the environment, no redirects (a 3xx is a response), and every resolved address checked
/// against the policy.
pub fn http_client(policy: Arc<Policy>) -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .connect_timeout(Duration::from_secs(10))
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn classification() {
        for (addr, category) in [
            ("127.0.0.1", Some(Category::Loopback)),
            ("127.8.9.10", Some(Category::Loopback)),
            ("::1", Some(Category::Loopback)),
            ("::ffff:127.0.0.1", Some(Category::Loopback)),
            ("10.0.0.5", Some(Category::Private)),
            ("172.16.0.1", Some(Category::Private)),
            ("172.31.255.255", Some(Category::Private)),
            ("192.168.1.1", Some(Category::Private)),
            ("fd00:ec2::254", Some(Category::Private)),
            ("169.254.169.254", Some(Category::LinkLocal)),
            ("fe80::1", Some(Category::LinkLocal)),
            ("100.100.100.200", Some(Category::Shared)),
            ("0.0.0.0", Some(Category::Unspecified)),
            ("::", Some(Category::Unspecified)),
            ("224.0.0.1", Some(Category::Multicast)),
            ("255.255.255.255", Some(Category::Multicast)),
            ("192.0.2.10", Some(Category::Reserved)),
            ("198.18.0.1", Some(Category::Reserved)),
            ("64:ff9b::a9fe:a9fe", Some(Category::LinkLocal)),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("8.8.8.8", None),
            ("2606:4700::1111", None),
        ] {
            assert_eq!(classify(ip(addr)), category, "{addr}");
        }
    }

    #[test]
    fn allowlist_opens_only_its_blocks() {
        let policy = Policy::new(vec![
            "127.0.0.0/8".parse().expect("cidr"),
            "10.1.0.0/16".parse().expect("cidr"),
        ]);
        assert!(policy.check(ip("127.0.0.1")).is_ok());
        assert!(policy.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(policy.check(ip("10.1.200.3")).is_ok());
        assert_eq!(
            policy.check(ip("10.2.0.1")).map_err(|r| r.category),
            Err(Category::Private)
        );
        assert_eq!(
            policy.check(ip("169.254.169.254")).map_err(|r| r.category),
            Err(Category::LinkLocal)
        );
        assert!(
            policy.check(ip("::1")).is_err(),
            "IPv6 loopback is its own block"
        );
        assert!(
            Policy::default().check(ip("127.0.0.1")).is_err(),
            "loopback must be allowed explicitly"
        );
        assert!(Policy::default().check(ip("93.184.216.34")).is_ok());
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/8".parse::<Cidr>().is_ok());
        assert!("::1".parse::<Cidr>().is_ok());
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .expect("cidr")
                .contains(ip("8.8.8.8"))
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("ten/8".parse::<Cidr>().is_err());
    }
}
