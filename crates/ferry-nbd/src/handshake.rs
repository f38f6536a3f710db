//! Fixed newstyle negotiation: structured replies, meta contexts, then NBD_OPT_GO.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::proto::*;
use crate::NbdError;

/// Option replies we accept are small (names are at most 4 KiB by the spec);
/// anything bigger is a broken or hostile server, and we refuse to allocate for it.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the handshake learned about the export.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    pub structured: bool,
    /// Negotiated meta context name → id the server uses in block status chunks.
    pub contexts: HashMap<String, u32>,
}

struct OptionReply {
    kind: u32,
    data: Vec<u8>,
}

/// Turn an EOF in the middle of the handshake into an error that says where.
fn eof_as_protocol(what: &str) -> impl FnOnce(std::io::Error) -> NbdError + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            NbdError::Protocol(format!(
                "server closed the connection during the handshake (reading {what})"
            ))
        } else {
            NbdError::Io(e)
        }
    }
}

async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> Result<OptionReply, NbdError> {
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr)
        .await
        .map_err(eof_as_protocol("an option reply header"))?;
    let magic = u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes"));
    if magic != OPT_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "bad option reply magic {magic:#x} (expected {OPT_REPLY_MAGIC:#x})"
        )));
    }
    let got_option = u32::from_be_bytes(hdr[8..12].try_into().expect("4 bytes"));
    if got_option != option {
        return Err(NbdError::Protocol(format!(
            "reply to option {got_option} while waiting for {} ({option})",
            option_name(option)
        )));
    }
    let kind = u32::from_be_bytes(hdr[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(hdr[16..20].try_into().expect("4 bytes"));
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol(format!(
            "{} reply of {len} bytes is larger than the {MAX_OPTION_REPLY} we accept",
            option_name(option)
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)
        .await
        .map_err(eof_as_protocol("option reply data"))?;
    Ok(OptionReply { kind, data })
}

fn refused(option: u32, reply: &OptionReply) -> NbdError {
    NbdError::Refused {
        option: option_name(option),
        reply: option_reply_name(reply.kind),
        message: String::from_utf8_lossy(&reply.data).into_owned(),
    }
}

fn unexpected(option: u32, reply: &OptionReply) -> NbdError {
    NbdError::Protocol(format!(
        "unexpected {} in answer to {}",
        option_reply_name(reply.kind),
        option_name(option)
    ))
}

fn put_name(buf: &mut Vec<u8>, name: &str) -> Result<(), NbdError> {
    // The spec caps names at 4096 bytes; servers may reject longer ones anyway.
    if name.len() > 4096 {
        return Err(NbdError::Unsupported(format!(
            "name longer than 4096 bytes: {name:.40}..."
        )));
    }
    buf.extend_from_slice(&(name.len() as u32).to_be_bytes());
    buf.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Run the whole handshake on `s`; on success the stream is in the transmission phase.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    meta_contexts: &[String],
) -> Result<ExportInfo, NbdError> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello)
        .await
        .map_err(eof_as_protocol("the server greeting"))?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    if magic != NBDMAGIC {
        return Err(NbdError::Protocol(format!(
            "bad greeting magic {magic:#x} (expected NBDMAGIC {NBDMAGIC:#x}); is this an NBD server?"
        )));
    }
    let opt_magic = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    if opt_magic != IHAVEOPT {
        return Err(NbdError::Unsupported(format!(
            "server greeting {opt_magic:#x} is not newstyle (IHAVEOPT {IHAVEOPT:#x}); oldstyle servers are not supported"
        )));
    }
    let server_flags = u16::from_be_bytes(hello[16..18].try_into().expect("2 bytes"));
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Unsupported(
            "server does not offer the fixed newstyle handshake".into(),
        ));
    }
    let mut client_flags = CLIENT_FLAG_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= CLIENT_FLAG_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes()).await?;

    // Structured replies first: READ chunks with holes and BLOCK_STATUS need them.
    s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]))
        .await?;
    s.flush().await?;
    let reply = read_option_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured = match reply.kind {
        REP_ACK => true,
        k if k & REP_ERROR_BIT != 0 => {
            debug!(reply = %option_reply_name(k), "server declined structured replies");
            false
        }
        _ => return Err(unexpected(OPT_STRUCTURED_REPLY, &reply)),
    };

    let mut contexts = HashMap::new();
    if !meta_contexts.is_empty() {
        if structured {
            contexts = set_meta_contexts(s, export, meta_contexts).await?;
        } else {
            warn!("server has no structured replies, so no meta contexts (block status) either");
        }
    }

    let info = go(s, export, structured, contexts).await?;
    debug!(
        export,
        size = info.size,
        flags = format_args!("{:#x}", info.flags),
        structured,
        contexts = ?info.contexts,
        max_block = info.max_block,
        "NBD handshake done"
    );
    Ok(info)
}

async fn set_meta_contexts<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    wanted: &[String],
) -> Result<HashMap<String, u32>, NbdError> {
    let mut data = Vec::new();
    put_name(&mut data, export)?;
    data.extend_from_slice(&(wanted.len() as u32).to_be_bytes());
    for name in wanted {
        put_name(&mut data, name)?;
    }
    s.write_all(&encode_option(OPT_SET_META_CONTEXT, &data))
        .await?;
    s.flush().await?;
    let mut contexts = HashMap::new();
    loop {
        let reply = read_option_reply(s, OPT_SET_META_CONTEXT).await?;
        match reply.kind {
            REP_ACK => return Ok(contexts),
            REP_META_CONTEXT => {
                if reply.data.len() < 4 {
                    return Err(NbdError::Protocol(format!(
                        "NBD_REP_META_CONTEXT of {} bytes is too short for a context id",
                        reply.data.len()
                    )));
                }
                let id = u32::from_be_bytes(reply.data[0..4].try_into().expect("4 bytes"));
                let name = String::from_utf8(reply.data[4..].to_vec()).map_err(|_| {
                    NbdError::Protocol("NBD_REP_META_CONTEXT name is not UTF-8".into())
                })?;
                debug!(id, name, "meta context negotiated");
                contexts.insert(name, id);
            }
            k if k & REP_ERROR_BIT != 0 => {
                // Not fatal: the export may still be usable without block status;
                // NBD_OPT_GO will report a bad export name properly.
                warn!(error = %refused(OPT_SET_META_CONTEXT, &reply), "no meta contexts");
                return Ok(HashMap::new());
            }
            _ => return Err(unexpected(OPT_SET_META_CONTEXT, &reply)),
        }
    }
}

async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    structured: bool,
    contexts: HashMap<String, u32>,
) -> Result<ExportInfo, NbdError> {
    let mut data = Vec::new();
    put_name(&mut data, export)?;
    // Asking for block sizes also tells the server we will honour them.
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&encode_option(OPT_GO, &data)).await?;
    s.flush().await?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    loop {
        let reply = read_option_reply(s, OPT_GO).await?;
        match reply.kind {
            REP_ACK => break,
            REP_INFO => {
                let d = &reply.data;
                if d.len() < 2 {
                    return Err(NbdError::Protocol(
                        "NBD_REP_INFO shorter than its type field".into(),
                    ));
                }
                let info_type = u16::from_be_bytes([d[0], d[1]]);
                match info_type {
                    INFO_EXPORT => {
                        if d.len() != 12 {
                            return Err(NbdError::Protocol(format!(
                                "NBD_INFO_EXPORT of {} bytes (expected 12)",
                                d.len()
                            )));
                        }
                        let size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([d[10], d[11]]);
                        export_info = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        if d.len() != 14 {
                            return Err(NbdError::Protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes (expected 14)",
                                d.len()
                            )));
                        }
                        let min = u32::from_be_bytes(d[2..6].try_into().expect("4 bytes"));
                        let preferred = u32::from_be_bytes(d[6..10].try_into().expect("4 bytes"));
                        let max = u32::from_be_bytes(d[10..14].try_into().expect("4 bytes"));
                        if min == 0 || max == 0 || preferred == 0 {
                            return Err(NbdError::Protocol(format!(
                                "NBD_INFO_BLOCK_SIZE with a zero size (min {min}, preferred {preferred}, max {max})"
                            )));
                        }
                        sizes = Some((min, preferred, max));
                    }
                    other => debug!(
                        info_type = other,
                        "ignoring NBD_REP_INFO we did not ask for"
                    ),
                }
            }
            k if k & REP_ERROR_BIT != 0 => return Err(refused(OPT_GO, &reply)),
            _ => return Err(unexpected(OPT_GO, &reply)),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        NbdError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
    })?;
    let (min_block, preferred_block, max_block) =
        sizes.unwrap_or((1, DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_BLOCK));
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_block,
        structured,
        contexts,
    })
}
