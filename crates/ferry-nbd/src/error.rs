//! The crate's error type.

/// Everything that can go wrong talking to an NBD server or starting qemu-nbd.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The connection could not be opened; `addr` names the socket or host:port.
    #[error("cannot connect to NBD server at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol (bad magic, truncated or inconsistent reply, ...).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during the handshake (e.g. an unknown export name).
    #[error("NBD server refused {option} ({reply}){}", message_suffix(.message))]
    Refused {
        option: &'static str,
        reply: String,
        message: String,
    },
    /// The server answered a command with an error.
    #[error("NBD server failed {command}: {}{}", crate::proto::errno_name(*.errno), message_suffix(.message))]
    Server {
        command: &'static str,
        errno: u32,
        message: String,
    },
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A meta context that was not negotiated with the server.
    #[error("meta context {0:?} was not negotiated with the server")]
    UnknownContext(String),
    #[error("bad NBD URI: {0}")]
    BadUri(String),
    #[error("cannot start the NBD server: {0}")]
    Launch(String),
    /// The export is read-only and a write was asked for.
    #[error("export is read-only")]
    ReadOnly,
    /// A request outside the export; caught before it reaches the server.
    #[error("request [{offset}, +{len}) is outside the export of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The connection is gone (server closed it, the client disconnected, or an
    /// earlier fatal error); the text says why.
    #[error("NBD connection closed: {0}")]
    Disconnected(String),
}

fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
