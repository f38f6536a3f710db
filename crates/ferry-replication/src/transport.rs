//! Connections between sender and receiver. Between machines: mutual TLS over TCP. When
//! both ends run in one process (`ferry disk sync`, the appliance syncing into a local
//! target): an in-memory pipe, where a loopback socket would only add kernel copies and
//! TLS would only protect the process's bytes from itself. Either way the same protocol
//! code runs: framing, digests verified by the receiver, acknowledgements, resume.

use std::sync::Arc;

use ferry_pki::Identity;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::receiver::Receiver;
use crate::SyncError;

/// Any byte stream a connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An established connection.
pub type Conn = Box<dyn Io>;

/// Buffer of each direction of an in-process pipe. Small: each process starts with no
/// memory mapped, and every MiB a pipe holds in flight is 256 page faults to pay first,
/// per connection; a quarter of a MiB keeps a stream's writer a unit ahead all the same.
const PIPE_BUFFER: usize = 256 << 10;

/// Opens the TCP connection to a receiver when plain `connect` cannot (e.g. from inside
/// a network namespace).
pub type Dialer = Arc<
    dyn Fn(
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>,
        > + Send
        + Sync,
>;

#[derive(Clone)]
enum Route {
    Tcp(String, Option<Dialer>),
    InProcess(Arc<Receiver>),
}

/// Where and how a sender reaches a receiver.
#[derive(Clone)]
pub struct Endpoint {
    route: Route,
    /// For TCP: the receiver's expected name and our client certificate.
    tls: Option<(ServerName<'static>, TlsConnector)>,
}

impl Endpoint {
    /// `addr` is `host:port`; `server_name` must be one of the names in the receiver's
    /// certificate (by default the host part of `addr`).
    pub fn new(
        addr: &str,
        server_name: Option<&str>,
        identity: &Identity,
    ) -> Result<Self, SyncError> {
        let host = server_name.map(str::to_string).unwrap_or_else(|| {
            addr.rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_else(|| addr.to_string())
        });
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| SyncError::Config(format!("{host:?} is not a valid server name: {e}")))?;
        let config =
            ferry_pki::client_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Self {
            route: Route::Tcp(addr.to_string(), None),
            tls: Some((server_name, TlsConnector::from(config))),
        })
    }

    /// A receiver in this process, reached over an in-memory pipe.
    pub fn in_process(receiver: Arc<Receiver>) -> Self {
        Self {
            route: Route::InProcess(receiver),
            tls: None,
        }
    }

    /// Connects through `dialer` instead of a plain TCP connect.
    pub fn with_dialer(mut self, dialer: Dialer) -> Self {
        if let Route::Tcp(_, d) = &mut self.route {
            *d = Some(dialer);
        }
        self
    }

    pub fn addr(&self) -> &str {
        match &self.route {
            Route::Tcp(addr, _) => addr,
            Route::InProcess(_) => "in-process",
        }
    }

    pub async fn connect(&self) -> Result<Conn, SyncError> {
        let handshake = |e: std::io::Error| SyncError::Connect {
            addr: self.addr().to_string(),
            reason: format!(
                "TLS handshake failed: {e} (do both ends use certificates from the same Ferry CA?)"
            ),
        };
        match &self.route {
            Route::Tcp(addr, dialer) => {
                let tcp = match dialer {
                    Some(d) => d(addr.clone()).await,
                    None => TcpStream::connect(addr).await,
                };
                let tcp = tcp.map_err(|e| SyncError::Connect {
                    addr: addr.clone(),
                    reason: format!("{e} (is `ferry disk receive` listening there?)"),
                })?;
                tcp.set_nodelay(true).ok();
                detect_dead_peer(&tcp);
                let (server_name, connector) = self
                    .tls
                    .as_ref()
                    .expect("a TCP endpoint has its TLS set-up");
                let tls = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(handshake)?;
                Ok(Box::new(tls))
            }
            Route::InProcess(receiver) => {
                let (ours, theirs) = crate::pipe::pipe(PIPE_BUFFER);
                let receiver = Arc::clone(receiver);
                tokio::spawn(async move {
                    if let Err(e) = receiver.handle(theirs).await {
                        tracing::debug!("in-process connection ended: {e}");
                    }
                });
                Ok(Box::new(ours))
            }
        }
    }
}

/// A peer that vanishes without closing (its machine powered off, its network cut)
/// would leave a connection waiting forever: keepalive probes after 10 s of silence, and
/// a 30 s limit on unacknowledged data, turn that into an error the sync retries on.
pub fn detect_dead_peer(tcp: &TcpStream) {
    let s = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = s
        .set_tcp_keepalive(&ka)
        .and_then(|()| s.set_tcp_user_timeout(Some(std::time::Duration::from_secs(30))))
    {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}

pub fn acceptor(identity: &Identity) -> Result<TlsAcceptor, SyncError> {
    let config =
        ferry_pki::server_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::clone(&config)))
}
