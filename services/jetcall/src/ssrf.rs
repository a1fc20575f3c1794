//! Which addresses a webhook may never be sent to, whatever name led to them: the checks made
//! at delivery time, on every address a callback host resolves to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{address} is a {range} address")]
pub struct ForbiddenAddress {
    pub address: IpAddr,
    pub range: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(a, b, c, d), prefix)
}

/// IPv4 ranges that are not the public internet. Ordered so the most telling name wins.
const V4_RANGES: [((Ipv4Addr, u8), &str); 16] = [
    (v4(169, 254, 169, 254, 32), "cloud metadata"),
    (v4(0, 0, 0, 0, 8), "unspecified (\"this network\")"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(100, 64, 0, 0, 10), "carrier-grade NAT"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignment"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    V4_RANGES.iter().find_map(|((base, prefix), name)| {
        let net = Ipv4Net::new(*base, *prefix).ok()?;
        net.contains(&ip).then_some(*name)
    })
}

fn v6_net(text: &str) -> Option<Ipv6Net> {
    text.parse().ok()
}

fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    // Forms that embed an IPv4 address are judged by that address.
    if let Some(embedded) = ip.to_ipv4_mapped() {
        return v4_range(embedded);
    }
    let nat64 = v6_net("64:ff9b::/96")?;
    if nat64.contains(&ip) {
        let [.., a, b, c, d] = ip.octets();
        return v4_range(Ipv4Addr::new(a, b, c, d));
    }
    let ranges = [
        ("fd00:ec2::254/128", "cloud metadata"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
        ("2001:db8::/32", "documentation"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignment"),
        ("2002::/16", "6to4"),
    ];
    ranges
        .into_iter()
        .find(|(net, _)| v6_net(net).is_some_and(|net| net.contains(&ip)))
        .map(|(_, name)| name)
}

/// The name of the special-purpose range `ip` lies in; `None` for a public address.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_range(v4),
        IpAddr::V6(v6) => v6_range(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> Option<&'static str> {
        special_range(text.parse().expect("address"))
    }

    #[test]
    fn special_ranges_are_refused_by_name() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.1.2", "loopback"),
            ("0.0.0.0", "unspecified (\"this network\")"),
            ("10.1.2.3", "private"),
            ("172.31.255.255", "private"),
            ("192.168.0.10", "private"),
            ("100.100.100.200", "carrier-grade NAT"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("192.0.2.7", "documentation"),
            ("224.0.0.251", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fd12::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
        ];
        for (address, range) in cases {
            assert_eq!(refused(address), Some(range), "{address}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for address in [
            "1.1.1.1",
            "93.184.216.34",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(refused(address), None, "{address}");
        }
    }
}
