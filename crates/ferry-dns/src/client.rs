//! Reading and replacing A records on a zone's primary server.
//!
//! Transport: queries go over UDP and are retried over TCP when the answer is truncated.
//! Updates always go over TCP: a signed update is one request whose outcome matters, and TCP
//! gives a definite answer or a definite failure (no lost datagram that leaves us guessing
//! whether to retransmit, no truncated answer, no size limit for a long address list).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::tsig::TsigError;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::error::DnsError;
use crate::key::TsigKey;

/// How long to wait for a UDP answer before sending the query again.
const UDP_RETRANSMIT: Duration = Duration::from_millis(800);
/// EDNS payload size we advertise for UDP answers (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
/// Default time allowed for one query or one update, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The A records of one name, as read from the zone's primary server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSet {
    /// The name, absolute.
    pub name: Name,
    /// The TTL of the records (0 when there are none).
    pub ttl: u32,
    /// The addresses, sorted; empty when the name has no A record (or does not exist).
    pub addrs: Vec<Ipv4Addr>,
}

impl RecordSet {
    /// True when the name had no A record.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Parses a name as absolute: `app.example.com` and `app.example.com.` are the same name.
pub fn parse_name(name: &str) -> Result<Name, DnsError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(DnsError::InvalidName {
            name: name.to_string(),
            reason: "empty".into(),
        });
    }
    let mut parsed = Name::from_utf8(trimmed).map_err(|e| DnsError::InvalidName {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// The primary (or an update-forwarding) server of one zone, and the key to sign updates with.
#[derive(Debug, Clone)]
pub struct DnsServer {
    /// Where the server listens (UDP and TCP).
    pub addr: SocketAddr,
    /// The zone Ferry updates; every name must be inside it.
    pub zone: Name,
    /// The TSIG key updates are signed with; `None` sends unsigned updates.
    pub key: Option<TsigKey>,
    /// Time allowed for one query or one update, connection included.
    pub timeout: Duration,
}

impl DnsServer {
    /// A server for `zone` at `addr`, without a key, with [`DEFAULT_TIMEOUT`].
    pub fn new(addr: SocketAddr, mut zone: Name) -> Self {
        zone.set_fqdn(true);
        Self {
            addr,
            zone,
            key: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Signs updates with `key`.
    pub fn with_key(mut self, key: TsigKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Sets the time allowed for one query or update.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Reads the A records of `name` from the server. Empty when there are none.
    pub async fn query_a(&self, name: &Name) -> Result<RecordSet, DnsError> {
        let name = self.check_name(name)?;
        let mut msg = Message::query();
        msg.metadata.recursion_desired = false;
        msg.add_query(Query::query(name.clone(), RecordType::A));
        msg.edns = Some({
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
            edns
        });
        let request = self.encode(&msg)?;
        let id = msg.metadata.id;

        let response = self
            .with_timeout_err(async {
                let bytes = self.exchange_udp(&request, id).await?;
                let response = self.decode(&bytes, id)?;
                if response.metadata.truncation {
                    tracing::debug!(server = %self.addr, %name, "truncated UDP answer, retrying over TCP");
                    let bytes = self.exchange_tcp(&request).await?;
                    self.decode(&bytes, id)
                } else {
                    Ok(response)
                }
            })
            .await?;

        match response.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            ResponseCode::Refused | ResponseCode::NotAuth => {
                return Err(DnsError::NotAuthoritative {
                    addr: self.addr,
                    zone: self.zone_str(),
                    code: rcode_name(response.metadata.response_code),
                })
            }
            code => {
                return Err(DnsError::Server {
                    addr: self.addr,
                    what: "query",
                    name: name_str(&name),
                    code: rcode_name(code),
                })
            }
        }
        if !response.metadata.authoritative {
            return Err(DnsError::NotAuthoritative {
                addr: self.addr,
                zone: self.zone_str(),
                code: "answer without the AA flag".into(),
            });
        }
        let mut ttl = None;
        let mut addrs = Vec::new();
        for record in &response.answers {
            if let RData::A(A(addr)) = record.data {
                if record.name == name {
                    ttl = Some(ttl.map_or(record.ttl, |t: u32| t.min(record.ttl)));
                    addrs.push(addr);
                }
            }
        }
        addrs.sort();
        addrs.dedup();
        Ok(RecordSet {
            name,
            ttl: ttl.unwrap_or(0),
            addrs,
        })
    }

    /// Replaces the A records of `name` by `addrs` with `ttl`, in one UPDATE (the server applies
    /// the deletion and the additions atomically). No prerequisites. An empty `addrs` deletes.
    pub async fn replace_a(
        &self,
        name: &Name,
        addrs: &[Ipv4Addr],
        ttl: u32,
    ) -> Result<(), DnsError> {
        let name = self.check_name(name)?;
        let mut msg = Message::query();
        msg.metadata.op_code = OpCode::Update;
        msg.metadata.recursion_desired = false;
        let mut zone = Query::query(self.zone.clone(), RecordType::SOA);
        zone.set_query_class(DNSClass::IN);
        msg.add_zone(zone);

        // RFC 2136 2.5.2: delete an RRset: class ANY, TTL 0, empty RDATA.
        let mut delete = Record::update0(name.clone(), 0, RecordType::A).into_record_of_rdata();
        delete.dns_class = DNSClass::ANY;
        msg.add_update(delete);
        // RFC 2136 2.5.1: add to an RRset.
        let mut sorted = addrs.to_vec();
        sorted.sort();
        sorted.dedup();
        for addr in &sorted {
            msg.add_update(Record::from_rdata(name.clone(), ttl, RData::A(A(*addr))));
        }

        tracing::info!(
            server = %self.addr,
            zone = %self.zone,
            name = %name,
            addrs = ?sorted,
            ttl,
            key = self.key.as_ref().map(|k| k.name_str()).unwrap_or_else(|| "(none)".into()),
            "DNS update: replacing A records"
        );
        self.send_update(msg, &name).await
    }

    /// Deletes the A records of `name`.
    pub async fn delete_a(&self, name: &Name) -> Result<(), DnsError> {
        self.replace_a(name, &[], 0).await
    }

    /// Puts back what [`query_a`](Self::query_a) returned before a change: the same addresses
    /// and TTL, or no A record at all when it had none.
    pub async fn restore(&self, previous: &RecordSet) -> Result<(), DnsError> {
        self.replace_a(&previous.name, &previous.addrs, previous.ttl)
            .await
    }

    async fn send_update(&self, mut msg: Message, name: &Name) -> Result<(), DnsError> {
        let id = msg.metadata.id;
        let mut verifier = match &self.key {
            Some(key) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                msg.finalize(&key.signer()?, now)
                    .map_err(|e| DnsError::InvalidKey(format!("signing failed: {e}")))?
            }
            None => None,
        };
        let request = self.encode(&msg)?;
        let bytes = self
            .with_timeout_err(async { self.exchange_tcp(&request).await })
            .await?;
        let response = self.decode(&bytes, id)?;
        if response.metadata.op_code != OpCode::Update {
            return Err(DnsError::Protocol {
                addr: self.addr,
                reason: format!(
                    "answer has opcode {:?}, not UPDATE",
                    response.metadata.op_code
                ),
            });
        }
        let key_name = self
            .key
            .as_ref()
            .map(|k| k.name_str())
            .unwrap_or_else(|| "(none)".into());
        let tsig_error = response.signature().and_then(|s| s.data.error);

        match response.metadata.response_code {
            ResponseCode::NoError => {
                if let Some(verifier) = verifier.as_mut() {
                    verifier
                        .verify(&bytes)
                        .map_err(|e| DnsError::ResponseNotAuthentic {
                            addr: self.addr,
                            name: name_str(name),
                            key: key_name,
                            reason: e.to_string(),
                        })?;
                }
                Ok(())
            }
            ResponseCode::NotAuth if self.key.is_none() => Err(DnsError::KeyRejected {
                addr: self.addr,
                name: name_str(name),
                key: key_name,
                code: "NOTAUTH".into(),
                hint: "the update was not signed: configure the TSIG key the server expects \
                       for this zone",
            }),
            ResponseCode::NotAuth if tsig_error.is_some() => {
                let (code, hint) = match tsig_error {
                    Some(TsigError::BadTime) => (
                        "NOTAUTH/BADTIME",
                        "the clocks of this machine and of the server differ by more than 5 minutes: fix the time (NTP)",
                    ),
                    Some(TsigError::BadKey) => (
                        "NOTAUTH/BADKEY",
                        "check the key name, algorithm and secret",
                    ),
                    Some(TsigError::BadSig) => (
                        "NOTAUTH/BADSIG",
                        "check the key name, algorithm and secret",
                    ),
                    _ => ("NOTAUTH", "check the key name, algorithm and secret"),
                };
                Err(DnsError::KeyRejected {
                    addr: self.addr,
                    name: name_str(name),
                    key: key_name,
                    code: code.into(),
                    hint,
                })
            }
            // NOTAUTH without any TSIG to a signed update: the server did not even look at the
            // key (Knot answers so for a zone it does not serve). A key problem always comes
            // with a TSIG record carrying BADSIG/BADKEY/BADTIME (RFC 8945 5.2).
            ResponseCode::NotAuth if response.signature().is_none() => {
                Err(DnsError::NotAuthoritative {
                    addr: self.addr,
                    zone: self.zone_str(),
                    code: "NOTAUTH, answer not signed".into(),
                })
            }
            // NOTAUTH in a correctly signed answer: the key was accepted, the update was not.
            ResponseCode::NotAuth
                if verifier
                    .as_mut()
                    .is_some_and(|verifier| verifier.verify(&bytes).is_ok()) =>
            {
                Err(DnsError::UpdateNotAllowed {
                    addr: self.addr,
                    name: name_str(name),
                    zone: self.zone_str(),
                    key: key_name,
                })
            }
            ResponseCode::NotAuth => Err(DnsError::KeyRejected {
                addr: self.addr,
                name: name_str(name),
                key: key_name,
                code: "NOTAUTH".into(),
                hint: "check the key name, algorithm and secret, that the zone's ACL allows \
                       updates with this key, and that the server is the zone's primary",
            }),
            ResponseCode::Refused => Err(DnsError::Refused {
                addr: self.addr,
                name: name_str(name),
                zone: self.zone_str(),
                key: key_name,
            }),
            ResponseCode::NotZone => Err(DnsError::NotAuthoritative {
                addr: self.addr,
                zone: self.zone_str(),
                code: "NOTZONE".into(),
            }),
            code => Err(DnsError::Server {
                addr: self.addr,
                what: "update",
                name: name_str(name),
                code: rcode_name(code),
            }),
        }
    }

    /// Makes `name` absolute and checks that it is inside the zone.
    fn check_name(&self, name: &Name) -> Result<Name, DnsError> {
        let mut name = name.clone();
        name.set_fqdn(true);
        if !self.zone.zone_of(&name) {
            return Err(DnsError::OutsideZone {
                addr: self.addr,
                zone: self.zone_str(),
                name: name_str(&name),
            });
        }
        Ok(name)
    }

    fn zone_str(&self) -> String {
        name_str(&self.zone)
    }

    fn encode(&self, msg: &Message) -> Result<Vec<u8>, DnsError> {
        msg.to_vec().map_err(|e| DnsError::Protocol {
            addr: self.addr,
            reason: format!("could not encode the request: {e}"),
        })
    }

    fn decode(&self, bytes: &[u8], id: u16) -> Result<Message, DnsError> {
        let msg = Message::from_vec(bytes).map_err(|e| DnsError::Protocol {
            addr: self.addr,
            reason: format!("undecodable answer: {e}"),
        })?;
        if msg.metadata.id != id || msg.metadata.message_type != MessageType::Response {
            return Err(DnsError::Protocol {
                addr: self.addr,
                reason: "the answer does not match the request".into(),
            });
        }
        Ok(msg)
    }

    async fn with_timeout_err<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, DnsError>>,
    ) -> Result<T, DnsError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(DnsError::Timeout {
                addr: self.addr,
                secs: format!("{}", self.timeout.as_secs_f64()),
            }),
        }
    }

    fn io_err(&self, source: std::io::Error) -> DnsError {
        DnsError::Io {
            addr: self.addr,
            source,
        }
    }

    /// Sends `request` over UDP until an answer with the same id arrives (the caller bounds the
    /// time). The socket is connected, so only datagrams from the server are accepted.
    async fn exchange_udp(&self, request: &[u8], id: u16) -> Result<Vec<u8>, DnsError> {
        let local: SocketAddr = if self.addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await.map_err(|e| self.io_err(e))?;
        socket
            .connect(self.addr)
            .await
            .map_err(|e| self.io_err(e))?;
        let mut buf = vec![0u8; 65535];
        loop {
            socket.send(request).await.map_err(|e| self.io_err(e))?;
            let deadline = tokio::time::Instant::now() + UDP_RETRANSMIT;
            loop {
                match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                    Err(_) => break, // retransmit
                    Ok(Err(e)) => return Err(self.io_err(e)),
                    Ok(Ok(n)) => {
                        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                            return Ok(buf[..n].to_vec());
                        }
                        // A late answer to an earlier query: ignore it.
                    }
                }
            }
        }
    }

    /// Sends `request` over TCP with its two-byte length prefix and reads one answer.
    async fn exchange_tcp(&self, request: &[u8]) -> Result<Vec<u8>, DnsError> {
        let len = u16::try_from(request.len()).map_err(|_| DnsError::Protocol {
            addr: self.addr,
            reason: "request larger than 64 KiB".into(),
        })?;
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| self.io_err(e))?;
        stream.set_nodelay(true).map_err(|e| self.io_err(e))?;
        let mut framed = Vec::with_capacity(request.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(request);
        stream
            .write_all(&framed)
            .await
            .map_err(|e| self.io_err(e))?;
        let len = stream.read_u16().await.map_err(|e| self.io_err(e))?;
        let mut buf = vec![0u8; usize::from(len)];
        stream
            .read_exact(&mut buf)
            .await
            .map_err(|e| self.io_err(e))?;
        Ok(buf)
    }
}

/// A name without its trailing dot, as people write it.
fn name_str(name: &Name) -> String {
    let s = name.to_utf8();
    match s.strip_suffix('.') {
        Some(stripped) if !stripped.is_empty() => stripped.to_string(),
        _ => s,
    }
}

/// The RFC mnemonic of a response code (NOERROR, NOTAUTH, ...).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("{other} ({})", u16::from(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_absolute_and_checked_against_the_zone() {
        let server = DnsServer::new(
            "127.0.0.1:53".parse().unwrap(),
            parse_name("example.test").unwrap(),
        );
        assert!(server.zone.is_fqdn());
        let inside = server
            .check_name(&parse_name("app.example.test").unwrap())
            .unwrap();
        assert!(inside.is_fqdn());
        server.check_name(&server.zone.clone()).unwrap();
        let err = server
            .check_name(&parse_name("app.example.org").unwrap())
            .unwrap_err();
        assert!(matches!(err, DnsError::OutsideZone { .. }), "{err}");
        let err = server
            .check_name(&parse_name("badexample.test").unwrap())
            .unwrap_err();
        assert!(matches!(err, DnsError::OutsideZone { .. }), "{err}");
        assert!(parse_name("").is_err());
        assert_eq!(name_str(&parse_name("a.b.").unwrap()), "a.b");
        assert_eq!(name_str(&Name::root()), ".");
    }
}
