//! Mutual-TLS connections between sender and receiver: over TCP between machines, or
//! over an in-memory pipe when both ends run in one process (`ferry disk sync`), where a
//! loopback socket would only add kernel copies. Either way the bytes go through TLS and
//! the same protocol code.

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

/// An established mutual-TLS connection.
pub type Conn = Box<dyn Io>;

/// Buffer of each direction of an in-process pipe.
const PIPE_BUFFER: usize = 4 << 20;

#[derive(Clone)]
enum Route {
    Tcp(String),
    InProcess {
        receiver: Arc<Receiver>,
        acceptor: TlsAcceptor,
    },
}

/// Where and how a sender reaches a receiver.
#[derive(Clone)]
pub struct Endpoint {
    route: Route,
    server_name: ServerName<'static>,
    connector: TlsConnector,
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
        Self::with_route(Route::Tcp(addr.to_string()), &host, identity)
    }

    /// A receiver in this process, reached through TLS over an in-memory pipe.
    pub fn in_process(receiver: Arc<Receiver>, identity: &Identity) -> Result<Self, SyncError> {
        let acceptor = acceptor(identity)?;
        Self::with_route(
            Route::InProcess { receiver, acceptor },
            "localhost",
            identity,
        )
    }

    fn with_route(route: Route, host: &str, identity: &Identity) -> Result<Self, SyncError> {
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| SyncError::Config(format!("{host:?} is not a valid server name: {e}")))?;
        let config =
            ferry_pki::client_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Self {
            route,
            server_name,
            connector: TlsConnector::from(config),
        })
    }

    pub fn addr(&self) -> &str {
        match &self.route {
            Route::Tcp(addr) => addr,
            Route::InProcess { .. } => "in-process",
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
            Route::Tcp(addr) => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| SyncError::Connect {
                        addr: addr.clone(),
                        reason: format!("{e} (is `ferry disk receive` listening there?)"),
                    })?;
                tcp.set_nodelay(true).ok();
                let tls = self
                    .connector
                    .connect(self.server_name.clone(), tcp)
                    .await
                    .map_err(handshake)?;
                Ok(Box::new(tls))
            }
            Route::InProcess { receiver, acceptor } => {
                let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
                let (receiver, acceptor) = (Arc::clone(receiver), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor.accept(theirs).await {
                        Ok(tls) => {
                            if let Err(e) = receiver.handle(tls).await {
                                tracing::debug!("in-process connection ended: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("in-process TLS handshake failed: {e}"),
                    }
                });
                let tls = self
                    .connector
                    .connect(self.server_name.clone(), ours)
                    .await
                    .map_err(handshake)?;
                Ok(Box::new(tls))
            }
        }
    }
}

pub fn acceptor(identity: &Identity) -> Result<TlsAcceptor, SyncError> {
    let config =
        ferry_pki::server_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::clone(&config)))
}
