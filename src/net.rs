//! The box's own network identity: host name and interface addresses (via libc), used for the
//! generated certificate's names and for the default `http.public_url`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host name, if the system has one.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

/// Every address of every interface that is up, loopback included, IPv4 first.
pub fn local_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free exactly once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_UP as u32) == 0 {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    // link-local addresses need a zone id, which URLs and certificates cannot carry
                    if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                        out.push(IpAddr::V6(ip));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(ifap);
    }
    out.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    out.dedup();
    out
}

/// The first non-loopback address (IPv4 preferred), else 127.0.0.1.
pub fn first_non_loopback() -> IpAddr {
    local_ips()
        .into_iter()
        .find(|ip| !ip.is_loopback())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// `host:port` for a URL (IPv6 in brackets).
pub fn url_host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// A TCP listener on `sa` (port 0 = any free port) with SO_REUSEADDR and a backlog of 4096,
/// so that connection storms (a fleet reconnecting) are not dropped at SYN.
pub fn bind_listener(sa: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if sa.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(sa)?;
    socket.listen(4096)
}

/// Parses `mqtt://host:port` / `mqtts://host:port` (default ports 1883 / 8883); returns
/// (tls, host, port): for devices, the CLI, and the appliance as a client of other brokers.
pub fn parse_mqtt_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "{url:?} is not mqtt://host:port or mqtts://host:port"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or("unclosed [ in the host")?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port in {url:?}"))?,
        None if tls => 8883,
        None => 1883,
    };
    if host.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    Ok((tls, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_urls_bracket_v6() {
        assert!(local_ips().iter().any(|ip| ip.is_loopback()));
        assert_eq!(url_host_port(IpAddr::V6(Ipv6Addr::LOCALHOST), 1), "[::1]:1");
    }
}
