//! The class of an address, as far as a bot's request goes: public, internal, metadata or
//! never a server. Pure: no policy, no IO.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of place an address is, as far as a bot's request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Public,
    /// Loopback and private networks: site admins' bots, or listed by the operator.
    Internal(&'static str),
    /// Link-local and cloud metadata endpoints: only when listed by the operator.
    Metadata,
    /// Never a server: refused always.
    Never(&'static str),
}

const PRIVATE: &str = "a private-network address";
const LOOPBACK: &str = "a loopback address";
const DOCUMENTATION: &str = "a documentation address";

/// Cloud metadata and platform endpoints outside 169.254.0.0/16 and fe80::/10: Alibaba's
/// metadata service, Azure's WireServer, AWS's IPv6 metadata service.
const METADATA_V4: &[Ipv4Addr] = &[Ipv4Addr::new(100, 100, 100, 200), Ipv4Addr::new(168, 63, 129, 16)];
const METADATA_V6: &[Ipv6Addr] = &[Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];
/// Names of metadata services (they resolve to link-local addresses, refused anyway when
/// resolved; naming them at save time gives a clear error sooner).
pub(super) const METADATA_NAMES: &[&str] =
    &["metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"];

/// The class of an address. IPv4 inside IPv6 (mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`,
/// 6to4 `2002::/16`) is classified as the IPv4 address it carries.
pub fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    if METADATA_V4.contains(&ip) {
        return Class::Metadata;
    }
    match ip.octets() {
        [169, 254, ..] => Class::Metadata,
        [255, 255, 255, 255] => Class::Never("the broadcast address"),
        [0, ..] => Class::Never("an unspecified (\"this network\") address"),
        [127, ..] => Class::Internal(LOOPBACK),
        [10, ..] | [192, 168, ..] => Class::Internal(PRIVATE),
        [172, b, ..] if (16..32).contains(&b) => Class::Internal(PRIVATE),
        [100, b, ..] if (64..128).contains(&b) => Class::Internal("a shared (carrier-grade NAT) address"),
        [198, 18 | 19, ..] => Class::Internal("a benchmarking-network address"),
        [192, 0, 0, _] => Class::Never("an IETF protocol-assignment address"),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Class::Never(DOCUMENTATION),
        [192, 88, 99, _] => Class::Never("a reserved (6to4 relay) address"),
        [224..=239, ..] => Class::Never("a multicast address"),
        [240..=255, ..] => Class::Never("a reserved address"),
        _ => Class::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if METADATA_V6.contains(&ip) {
        return Class::Metadata;
    }
    if ip.is_unspecified() {
        return Class::Never("the unspecified address");
    }
    if ip.is_loopback() {
        return Class::Internal(LOOPBACK);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: the translator connects to the IPv4 address inside.
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address inside is the tunnel's end.
        return match classify_v4(embedded(s[1], s[2])) {
            Class::Public => Class::Public,
            _ => Class::Never("a 6to4 address of a non-public IPv4 address"),
        };
    }
    match s[0] {
        x if x & 0xffc0 == 0xfe80 => Class::Metadata,
        x if x & 0xffc0 == 0xfec0 => Class::Internal("a site-local address"),
        x if x & 0xfe00 == 0xfc00 => Class::Internal("a unique-local address"),
        x if x & 0xff00 == 0xff00 => Class::Never("a multicast address"),
        0x64 if s[1] == 0xff9b && s[2] == 1 => Class::Internal("a local-use NAT64 address"),
        0x2001 if s[1] == 0xdb8 => Class::Never(DOCUMENTATION),
        0x3fff if s[1] < 0x1000 => Class::Never(DOCUMENTATION),
        x if x & 0xe000 == 0x2000 => Class::Public,
        _ => Class::Never("a reserved address"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Class {
        classify(s.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(ip), Class::Public, "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "198.18.0.1",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fec0::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
        ] {
            assert!(matches!(class(ip), Class::Internal(_)), "{ip}: {:?}", class(ip));
        }
        for ip in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.1",
            "100.100.100.200",
            "168.63.129.16",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert_eq!(class(ip), Class::Metadata, "{ip}");
        }
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.9",
            "192.0.0.8",
            "::",
            "ff02::1",
            "2001:db8::1",
            "::a9fe:a9fe",
            "100::1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
            "4000::1",
        ] {
            assert!(matches!(class(ip), Class::Never(_)), "{ip}: {:?}", class(ip));
        }
    }
}
