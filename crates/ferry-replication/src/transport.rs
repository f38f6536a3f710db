//! Mutual-TLS connections between sender and receiver.

use std::sync::Arc;

use ferry_pki::Identity;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::SyncError;

pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Where and how a sender reaches a receiver.
#[derive(Clone)]
pub struct Endpoint {
    addr: String,
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
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| SyncError::Config(format!("{host:?} is not a valid server name: {e}")))?;
        let config =
            ferry_pki::client_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
        Ok(Self {
            addr: addr.to_string(),
            server_name,
            connector: TlsConnector::from(config),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn connect(&self) -> Result<ClientStream, SyncError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| SyncError::Connect {
                addr: self.addr.clone(),
                reason: format!("{e} (is `ferry disk receive` listening there?)"),
            })?;
        tcp.set_nodelay(true).ok();
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| SyncError::Connect {
                addr: self.addr.clone(),
                reason: format!("TLS handshake failed: {e} (do both ends use certificates from the same Ferry CA?)"),
            })
    }
}

pub fn acceptor(identity: &Identity) -> Result<TlsAcceptor, SyncError> {
    let config =
        ferry_pki::server_config(identity).map_err(|e| SyncError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::clone(&config)))
}
