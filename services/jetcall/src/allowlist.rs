//! Which callback URLs a caller may name: http(s) only, no userinfo, and a host on the
//! allowlist of exact hosts, `*.domain` patterns, CIDRs and `*` (any host at a public address).

use std::net::IpAddr;

use ipnet::IpNet;
use url::{Host, Url};

use crate::ssrf::{ForbiddenAddress, special_range};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowlist entry `{entry}` is neither a host, a `*.domain` pattern, a CIDR nor `*`")]
pub struct AllowlistError {
    pub entry: String,
}

/// Why a callback URL was refused; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackUrlError {
    #[error("is not a valid URL: {0}")]
    Malformed(String),
    #[error("must use http or https, not `{0}`")]
    Scheme(String),
    #[error("must not carry a user name or password")]
    Userinfo,
    #[error("has no host")]
    NoHost,
    #[error("host `{0}` is not on the callback allowlist")]
    NotAllowed(String),
}

/// A callback URL as the gateway admitted it: absolute, `http` or `https`, with a host and
/// without userinfo. Parsed once, at the gateway; events and status documents carry it as
/// text, and a text that is not one is refused when they are read, never taken as no URL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CallbackUrl(Url);

impl CallbackUrl {
    pub fn parse(text: &str) -> Result<Self, CallbackUrlError> {
        let url = Url::parse(text).map_err(|err| CallbackUrlError::Malformed(err.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CallbackUrlError::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CallbackUrlError::Userinfo);
        }
        if url.host().is_none() {
            return Err(CallbackUrlError::NoHost);
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// `host:port`: what deliveries to one receiver share (slots, a circuit).
    pub fn destination(&self) -> String {
        let host = self.0.host_str().unwrap_or_default();
        match self.0.port_or_known_default() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }
}

impl std::fmt::Display for CallbackUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for CallbackUrl {
    type Error = CallbackUrlError;

    fn try_from(text: String) -> Result<Self, CallbackUrlError> {
        Self::parse(&text)
    }
}

impl From<CallbackUrl> for String {
    fn from(url: CallbackUrl) -> Self {
        url.0.into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// `*`: any name, and any address outside the special-purpose ranges. It never exempts
    /// an address: that takes an entry naming the address.
    AnyPublic,
    Host(String),
    Suffix(String),
    Net(IpNet),
    Ip(IpAddr),
}

/// Parsed where the configuration is read, and kept with its entries as written: those are
/// what logs show and what a configuration serialises back to.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allowlist {
    written: Vec<String>,
    entries: Vec<Entry>,
}

impl PartialEq for Allowlist {
    fn eq(&self, other: &Self) -> bool {
        self.written == other.written
    }
}

impl Eq for Allowlist {}

impl TryFrom<Vec<String>> for Allowlist {
    type Error = AllowlistError;

    fn try_from(written: Vec<String>) -> Result<Self, AllowlistError> {
        Self::parse(&written)
    }
}

impl From<Allowlist> for Vec<String> {
    fn from(allowlist: Allowlist) -> Self {
        allowlist.written
    }
}

impl Allowlist {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, AllowlistError> {
        let written: Vec<String> = entries.iter().map(|e| e.as_ref().to_owned()).collect();
        let entries = written
            .iter()
            .map(|entry| parse_entry(entry))
            .collect::<Result<_, _>>()?;
        Ok(Self { written, entries })
    }

    /// `*`: any host at a public address.
    pub fn any_public() -> Self {
        Self {
            written: vec!["*".into()],
            entries: vec![Entry::AnyPublic],
        }
    }

    /// The entries as they were written.
    pub fn written(&self) -> &[String] {
        &self.written
    }

    /// Checks a callback URL as a caller submitted it.
    pub fn check(&self, text: &str) -> Result<CallbackUrl, CallbackUrlError> {
        let url = CallbackUrl::parse(text)?;
        self.admits(&url)?;
        Ok(url)
    }

    /// Whether `url`'s host is on this list (an address: named by an entry, or public under
    /// `*`).
    pub fn admits(&self, url: &CallbackUrl) -> Result<(), CallbackUrlError> {
        let allowed = match url.0.host() {
            Some(Host::Domain(domain)) => self.allows_domain(domain),
            Some(Host::Ipv4(ip)) => self.admits_literal(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => self.admits_literal(IpAddr::V6(ip)),
            None => false,
        };
        if !allowed {
            let host = url.0.host_str().unwrap_or_default().to_owned();
            return Err(CallbackUrlError::NotAllowed(host));
        }
        Ok(())
    }

    fn allows_domain(&self, domain: &str) -> bool {
        self.entries.iter().any(|entry| match entry {
            Entry::Host(host) => host == domain,
            Entry::Suffix(suffix) => {
                domain.len() > suffix.len() + 1
                    && domain.ends_with(suffix.as_str())
                    && domain.as_bytes()[domain.len() - suffix.len() - 1] == b'.'
            }
            // `localhost` names loopback by definition (RFC 6761), whatever a resolver says.
            Entry::AnyPublic => domain != "localhost" && !domain.ends_with(".localhost"),
            Entry::Net(_) | Entry::Ip(_) => false,
        })
    }

    /// Whether `ip`, written in a URL, is allowed: named by an address or CIDR entry, or
    /// public under `*`.
    fn admits_literal(&self, ip: IpAddr) -> bool {
        self.allows_ip(ip)
            || (self.entries.contains(&Entry::AnyPublic) && special_range(ip).is_none())
    }

    /// Refuses `ip` if it lies in a special-purpose range, unless this list names that
    /// address or a range holding it explicitly (an IP or CIDR entry, not a host name).
    pub fn check_address(&self, ip: IpAddr) -> Result<(), ForbiddenAddress> {
        match special_range(ip) {
            Some(range) if !self.allows_ip(ip) && !self.allows_ip(canonical(ip)) => {
                Err(ForbiddenAddress { address: ip, range })
            }
            _ => Ok(()),
        }
    }

    /// [`Self::check_address`] for a URL whose host is an address; a name is resolved, and
    /// each address checked, when it is connected to.
    pub fn check_url_address(&self, url: &CallbackUrl) -> Result<(), ForbiddenAddress> {
        match url.0.host() {
            Some(Host::Ipv4(ip)) => self.check_address(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => self.check_address(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }

    /// Whether an address or CIDR entry names `ip`: what exempts a special-purpose address.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|entry| match entry {
            Entry::Ip(allowed) => *allowed == ip,
            Entry::Net(net) => net.contains(&ip),
            Entry::Host(_) | Entry::Suffix(_) | Entry::AnyPublic => false,
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for, so an allowlist entry
/// `127.0.0.1` also covers `::ffff:127.0.0.1`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_entry(entry: &str) -> Result<Entry, AllowlistError> {
    let invalid = || AllowlistError {
        entry: entry.to_owned(),
    };
    let entry_lower = entry.trim().to_ascii_lowercase();
    if entry_lower == "*" {
        return Ok(Entry::AnyPublic);
    }
    if entry_lower.contains('/') {
        return entry_lower.parse().map(Entry::Net).map_err(|_| invalid());
    }
    if let Ok(ip) = entry_lower.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(Entry::Ip(ip));
    }
    let (is_pattern, host) = match entry_lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, entry_lower.as_str()),
    };
    let valid_host = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_host {
        return Err(invalid());
    }
    Ok(if is_pattern {
        Entry::Suffix(host.to_owned())
    } else {
        Entry::Host(host.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Allowlist {
        Allowlist::parse(&[
            "localhost",
            "127.0.0.1",
            "::1",
            "*.shop.example",
            "10.1.0.0/16",
        ])
        .expect("valid allowlist")
    }

    #[test]
    fn allowed_hosts_pass() {
        for url in [
            "http://localhost:9000/cb",
            "https://127.0.0.1/cb",
            "http://[::1]:8080/",
            "https://hooks.shop.example/x",
            "https://a.b.shop.example/x",
            "http://10.1.200.3/cb",
            "HTTP://LOCALHOST/cb",
        ] {
            assert!(list().check(url).is_ok(), "{url} refused");
        }
    }

    #[test]
    fn everything_else_is_refused_with_its_rule() {
        let cases = [
            ("ftp://localhost/x", CallbackUrlError::Scheme("ftp".into())),
            (
                "file:///etc/passwd",
                CallbackUrlError::Scheme("file".into()),
            ),
            ("http://user@localhost/", CallbackUrlError::Userinfo),
            ("http://a:b@localhost/", CallbackUrlError::Userinfo),
            (
                "http://shop.example/",
                CallbackUrlError::NotAllowed("shop.example".into()),
            ),
            (
                "http://evilshop.example/",
                CallbackUrlError::NotAllowed("evilshop.example".into()),
            ),
            (
                "http://10.2.0.1/",
                CallbackUrlError::NotAllowed("10.2.0.1".into()),
            ),
            (
                "http://localhost./",
                CallbackUrlError::NotAllowed("localhost.".into()),
            ),
            // WHATWG parsing turns numeric hosts into addresses before the check.
            (
                "http://2130706434/",
                CallbackUrlError::NotAllowed("127.0.0.2".into()),
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(list().check(url).err(), Some(expected), "{url}");
        }
        assert!(matches!(
            list().check("not a url"),
            Err(CallbackUrlError::Malformed(_))
        ));
    }

    #[test]
    fn a_star_admits_any_name_and_only_public_addresses() {
        let any = Allowlist::parse(&["*"]).expect("allowlist");
        for url in ["https://hooks.example/x", "http://1.1.1.1/x"] {
            assert!(any.check(url).is_ok(), "{url} refused");
        }
        for url in [
            "http://127.0.0.1/x",
            "http://localhost/x",
            "http://a.localhost/x",
            "http://[::1]/x",
            "http://10.1.2.3/x",
            "http://169.254.169.254/x",
            "http://2130706433/x",
        ] {
            assert!(any.check(url).is_err(), "{url} admitted");
        }
        assert!(!any.allows_ip("127.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn bad_entries_are_configuration_errors() {
        for bad in ["", "*.", "a..b", "10.0.0.0/99", "http://x"] {
            assert!(Allowlist::parse(&[bad]).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_an_explicit_address_or_range_in_the_allowlist_exempts() {
        let by_name = Allowlist::parse(&["localhost"]).expect("allowlist");
        assert!(
            by_name
                .check_address("127.0.0.1".parse().expect("ip"))
                .is_err()
        );
        let by_address = Allowlist::parse(&["127.0.0.1", "10.0.0.0/8"]).expect("allowlist");
        assert!(
            by_address
                .check_address("127.0.0.1".parse().expect("ip"))
                .is_ok()
        );
        assert!(
            by_address
                .check_address("::ffff:127.0.0.1".parse().expect("ip"))
                .is_ok()
        );
        assert!(
            by_address
                .check_address("10.9.8.7".parse().expect("ip"))
                .is_ok()
        );
        assert!(
            by_address
                .check_address("127.0.0.2".parse().expect("ip"))
                .is_err()
        );
    }

    #[test]
    fn a_callback_url_read_from_an_event_must_be_one() {
        let read = |text: &str| serde_json::from_value::<CallbackUrl>(serde_json::json!(text));
        let url = read("https://hooks.shop.example/cb?token=t").expect("a callback URL");
        assert_eq!(url.destination(), "hooks.shop.example:443");
        assert_eq!(
            serde_json::to_value(&url).expect("JSON"),
            "https://hooks.shop.example/cb?token=t"
        );
        for bad in ["", "ftp://x/", "http://user@x/", "not a url", "http://"] {
            assert!(read(bad).is_err(), "{bad:?} read as a callback URL");
        }
    }
}
