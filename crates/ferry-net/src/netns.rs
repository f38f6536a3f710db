//! Running code inside a network namespace, and probes built on that.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::error::{NetError, Result};
use crate::ip::{netns_exists, netns_path};

/// Runs `f` on a fresh thread that has entered network namespace `ns` and returns its result.
///
/// The thread calls `setns(fd, CLONE_NEWNET)` on `/var/run/netns/NS` first, so every socket
/// `f` creates belongs to that namespace (and keeps belonging to it after `f` returns: a
/// `TcpListener` bound here can be moved out and accepted on from any thread). Threads that
/// `f` spawns inherit the namespace. The calling thread is never moved. Blocks until `f`
/// returns; a panic in `f` is resumed on the caller. Needs root (CAP_SYS_ADMIN).
///
/// From async code use [`in_netns_async`] (or `tokio::task::spawn_blocking`).
pub fn in_netns<F, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = netns_path(ns);
    let file = File::open(&path).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            NetError::NoSuchNamespace {
                namespace: ns.to_string(),
            }
        } else {
            NetError::Io {
                action: format!("opening {} to enter network namespace {ns}", path.display()),
                source: e,
            }
        }
    })?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(s, move || -> Result<T> {
                // SAFETY: `file` is an open descriptor of a namespace file for the whole call;
                // setns only affects the calling thread, which is ours and ends after `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NetError::Setns {
                        namespace: ns.to_string(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                drop(file);
                Ok(f())
            })
            .map_err(|e| NetError::Io {
                action: format!("spawning a thread for network namespace {ns}"),
                source: e,
            })?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// [`in_netns`] for async code: runs it on tokio's blocking pool.
pub async fn in_netns_async<F, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns = ns.to_string();
    match tokio::task::spawn_blocking(move || in_netns(&ns, f)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(NetError::Io {
            action: "running a blocking network-namespace task".into(),
            source: std::io::Error::other(e),
        }),
    }
}

fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => Ok(s),
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
            Err(NetError::Timeout {
                namespace: ns.to_string(),
                addr: addr.to_string(),
                timeout,
            })
        }
        Err(e) => Err(NetError::Unreachable {
            namespace: ns.to_string(),
            addr,
            source: e,
        }),
    }
}

/// Connects to `addr` over TCP from inside namespace `ns`; returns how long the connect took.
///
/// This is the reachability check ("ping") of this crate: no ICMP socket needed. Fails with
/// [`NetError::Timeout`] when nothing answers within `timeout` (no route through a bridge,
/// cut link) and [`NetError::Unreachable`] when the kernel says no at once (connection
/// refused, no route to the network).
pub fn tcp_check(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let ns_owned = ns.to_string();
    in_netns(ns, move || {
        let start = Instant::now();
        connect(&ns_owned, addr, timeout).map(|_| start.elapsed())
    })?
}

/// [`tcp_check`] for async code.
pub async fn tcp_check_async(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    let ns_owned = ns.to_string();
    in_netns_async(ns, move || {
        let start = Instant::now();
        connect(&ns_owned, addr, timeout).map(|_| start.elapsed())
    })
    .await?
}

/// Opens a TCP connection to `addr` from inside namespace `ns`, for use anywhere: a
/// socket stays in the namespace it was made in, whichever thread uses it later.
pub async fn tcp_connect_async(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let ns_owned = ns.to_string();
    in_netns_async(ns, move || connect(&ns_owned, addr, timeout)).await?
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields in the order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body (up to `Content-Length` when the server sent one, else up to EOF).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Target {
    host: String,
    port: u16,
    path: String,
    host_header: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let bad = |reason: &str| NetError::Http {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported (no TLS)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if after.is_empty() => 80,
            None => return Err(bad("junk after ']'")),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), 80),
        }
    };
    Ok(Target {
        host,
        port,
        path: path.to_string(),
        host_header: authority.to_string(),
    })
}

fn parse_response(url: &str, raw: &[u8]) -> Result<HttpResponse> {
    let bad = |reason: &str| NetError::Http {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("the answer has no end of headers (not HTTP, or cut short)"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut words = status_line.split_whitespace();
    if !words.next().is_some_and(|v| v.starts_with("HTTP/")) {
        return Err(bad(&format!("bad status line {status_line:?}")));
    }
    let status: u16 = words
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn get(ns: &str, url: &str, timeout: Duration) -> Result<HttpResponse> {
    let target = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| NetError::Http {
            url: url.to_string(),
            reason: format!("cannot resolve {}: {e}", target.host),
        })?
        .next()
        .ok_or_else(|| NetError::Http {
            url: url.to_string(),
            reason: format!("{} resolves to no address", target.host),
        })?;
    let timed_out = || NetError::Timeout {
        namespace: ns.to_string(),
        addr: url.to_string(),
        timeout,
    };
    let mut stream = connect(ns, addr, timeout)?;
    let io_err = |e: std::io::Error| {
        if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) {
            timed_out()
        } else {
            NetError::Http {
                url: url.to_string(),
                reason: e.to_string(),
            }
        }
    };
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    };
    stream
        .set_write_timeout(Some(left().ok_or_else(timed_out)?))
        .map_err(io_err)?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: ferry-net\r\nConnection: close\r\n\r\n",
        target.path, target.host_header
    );
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream
            .set_read_timeout(Some(left().ok_or_else(timed_out)?))
            .map_err(io_err)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    parse_response(url, &raw)
}

/// `GET url` with HTTP/1.0 from inside namespace `ns`; `timeout` bounds the whole exchange.
///
/// Only `http://` (no TLS). The host may be an IP literal or a name resolvable from this
/// process. Any status is returned as `Ok`; only transport failures are errors.
pub fn http_get(ns: &str, url: &str, timeout: Duration) -> Result<HttpResponse> {
    let ns_owned = ns.to_string();
    let url = url.to_string();
    in_netns(ns, move || get(&ns_owned, &url, timeout))?
}

/// [`http_get`] for async code.
pub async fn http_get_async(ns: &str, url: &str, timeout: Duration) -> Result<HttpResponse> {
    let ns_owned = ns.to_string();
    let url = url.to_string();
    in_netns_async(ns, move || get(&ns_owned, &url, timeout)).await?
}

/// Creates a bare namespace `ns` (no bridge) with loopback up; does nothing if it exists.
///
/// Useful for a "machine" attached to a network with [`crate::Network::attach_veth`].
/// `ns` must already be a valid name (see [`crate::sanitize_netns_name`]).
pub fn ensure_namespace(ns: &str) -> Result<()> {
    let checked = crate::names::sanitize_netns_name(ns)?;
    if checked != ns {
        return Err(NetError::InvalidNetworkName {
            name: ns.to_string(),
            reason: format!("not a clean namespace name (did you mean {checked:?}?)"),
        });
    }
    if !netns_exists(ns) {
        match crate::ip::ip(
            &format!("creating network namespace {ns}"),
            &["netns", "add", ns],
        ) {
            Ok(_) => {}
            Err(NetError::Ip { stderr, .. }) if stderr.contains("File exists") => {}
            Err(e) => return Err(e),
        }
    }
    crate::ip::ip_in(
        Some(ns),
        &format!("bringing loopback up in network namespace {ns}"),
        &["link", "set", "lo", "up"],
    )?;
    Ok(())
}

/// Deletes namespace `ns` and everything in it (bridge, taps, veth ends, and the peers of
/// those veths elsewhere); does nothing if it does not exist.
///
/// Processes still running inside it (QEMU started with `ip netns exec`) keep the namespace
/// alive, unnamed, until they exit: stop them first.
pub fn delete_namespace(ns: &str) -> Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    match crate::ip::ip(
        &format!("deleting network namespace {ns}"),
        &["netns", "del", ns],
    ) {
        Ok(_) => Ok(()),
        Err(NetError::Ip { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://10.0.0.1:8080/a/b?c").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("10.0.0.1", 8080, "/a/b?c")
        );
        let t = parse_url("http://[fd00::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 80));
        let t = parse_url("http://host").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        assert!(parse_url("https://x/").is_err());
    }

    #[test]
    fn responses() {
        let r = parse_response(
            "u",
            b"HTTP/1.0 404 Not Found\r\nContent-Length: 2\r\nX: y\r\n\r\nnoEXTRA",
        )
        .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"no");
        assert_eq!(r.header("x"), Some("y"));
        assert!(parse_response("u", b"garbage").is_err());
    }
}
