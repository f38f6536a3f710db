//! The wire protocol between sender and receiver.
//!
//! Every frame: type u8, flags u8, 2 reserved bytes, payload length u32 (little endian),
//! payload. Control frames carry one JSON message (rare, small, easy to read in a capture);
//! data frames are binary: chunk number u64, BLAKE3 digest, uncompressed length u32, bytes
//! (zstd when the COMPRESSED flag is set). The receiver checks every data frame against its
//! digest before a byte of it is written.
//!
//! One control connection per sync (hello, index, commit) and any number of data
//! connections that join its session.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chunk::Digest;

pub const PROTOCOL_VERSION: u32 = 1;

pub const KIND_CONTROL: u8 = 1;
pub const KIND_DATA: u8 = 2;
pub const KIND_ZERO: u8 = 3;
pub const KIND_INDEX: u8 = 4;

pub const FLAG_COMPRESSED: u8 = 1;

const HEADER: usize = 8;
/// Larger than any legal frame (4 MiB chunks + header): a bigger length is corruption.
pub const MAX_FRAME: u32 = 8 << 20;
const DATA_HEADER: usize = 8 + 32 + 4;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("peer reported: {message}")]
    Peer {
        message: String,
        /// The peer says a new attempt can succeed (and resume).
        retryable: bool,
    },
}

/// How the sender finds changed chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Read allocated data, hash, compare with the target's index.
    HashCompare,
    /// Read only what a dirty bitmap / CBT marks changed.
    DirtyBitmap,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    Hello {
        protocol: u32,
        disk_size: u64,
        chunk_size: u32,
        source: String,
        mode: Mode,
        /// Whether the sender wants zstd where it pays, the index included (not on an
        /// in-process pipe, where it only costs time). Absent from older senders: yes.
        #[serde(default = "yes")]
        compress: bool,
    },
    HelloOk {
        session: String,
        /// The target's last complete generation (0: nothing synced yet).
        generation: u64,
        /// An interrupted sync of the same base is being continued.
        resumed: bool,
    },
    Join {
        session: String,
    },
    JoinOk,
    GetIndex {
        /// The index the sender kept from the last sync it committed here: when it is
        /// the target's base, the receiver does not send it again.
        #[serde(default)]
        known: Option<KnownIndex>,
    },
    IndexEnd {
        entries: u64,
        /// No entries were sent: the sender's known index is the target's base.
        #[serde(default)]
        unchanged: bool,
    },
    End,
    EndOk {
        chunks: u64,
    },
    Commit {
        entries_digest: String,
    },
    Committed {
        generation: u64,
        bytes_written: u64,
        chunks_applied: u64,
    },
    Error {
        message: String,
        /// Whether the sender should try again (an interruption, not a refusal).
        #[serde(default)]
        retryable: bool,
    },
}

/// An index a sender holds: the generation it describes and its entries digest (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnownIndex {
    pub generation: u64,
    pub digest: String,
}

fn yes() -> bool {
    true
}

/// One frame as read from the wire.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub payload: Vec<u8>,
}

/// A chunk as carried by a data frame.
#[derive(Debug)]
pub struct DataChunk<'a> {
    pub chunk: u64,
    pub digest: Digest,
    pub raw_len: u32,
    pub bytes: &'a [u8],
}

pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    read_frame_into(r, Vec::new()).await
}

/// Like [`read_frame`], reading the payload into `buf` (whatever it held is replaced):
/// a caller that passes buffers back in reuses their memory.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    mut payload: Vec<u8>,
) -> Result<Frame, ProtoError> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).await?;
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap());
    if len > MAX_FRAME {
        return Err(ProtoError::Violation(format!(
            "frame of {len} bytes announced (at most {MAX_FRAME}): corrupt stream"
        )));
    }
    // Read into spare capacity: zeroing a buffer that is overwritten at once costs as
    // much as a copy.
    payload.clear();
    payload.reserve_exact(len as usize);
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() != len as usize {
        return Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(Frame {
        kind: h[0],
        flags: h[1],
        payload,
    })
}

fn header(kind: u8, flags: u8, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1] = flags;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Control,
) -> Result<(), ProtoError> {
    let body = serde_json::to_vec(msg).map_err(|e| ProtoError::Violation(e.to_string()))?;
    w.write_all(&header(KIND_CONTROL, 0, body.len())).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Encodes a data frame into `out` (appended), ready to be written.
pub fn encode_data(
    out: &mut Vec<u8>,
    chunk: u64,
    digest: &Digest,
    raw_len: u32,
    bytes: &[u8],
    compressed: bool,
) {
    let flags = if compressed { FLAG_COMPRESSED } else { 0 };
    out.extend_from_slice(&header(KIND_DATA, flags, DATA_HEADER + bytes.len()));
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(digest);
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(bytes);
}

pub fn encode_zero(out: &mut Vec<u8>, chunk: u64) {
    out.extend_from_slice(&header(KIND_ZERO, 0, 8));
    out.extend_from_slice(&chunk.to_le_bytes());
}

/// Sends a window of raw index entries, zstd-compressed when `compress` and that pays
/// (the index of a mostly empty disk is mostly zeros: 1 GiB at 2 TiB shrinks to almost
/// nothing).
pub async fn write_index<W: AsyncWrite + Unpin>(
    w: &mut W,
    raw: &[u8],
    compress: bool,
) -> Result<(), ProtoError> {
    let mut packed = Vec::new();
    // Digests of data chunks are random: only the zero entries compress, so unless at
    // least an eighth are zero, trying costs time for nothing.
    let zero_entries = raw
        .chunks_exact(32)
        .filter(|e| crate::chunk::is_zero(e))
        .count();
    let worth_trying = compress && zero_entries * 8 >= raw.len() / 32;
    if worth_trying && crate::compress::compress_if_worth_it(raw, &mut packed) {
        let mut body = Vec::with_capacity(4 + packed.len());
        body.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        body.extend_from_slice(&packed);
        w.write_all(&header(KIND_INDEX, FLAG_COMPRESSED, body.len()))
            .await?;
        w.write_all(&body).await?;
    } else {
        w.write_all(&header(KIND_INDEX, 0, raw.len())).await?;
        w.write_all(raw).await?;
    }
    Ok(())
}

impl Frame {
    pub fn control(&self) -> Result<Control, ProtoError> {
        if self.kind != KIND_CONTROL {
            return Err(ProtoError::Violation(format!(
                "expected a control frame, got kind {}",
                self.kind
            )));
        }
        let msg: Control = serde_json::from_slice(&self.payload)
            .map_err(|e| ProtoError::Violation(format!("bad control message: {e}")))?;
        if let Control::Error { message, retryable } = msg {
            return Err(ProtoError::Peer { message, retryable });
        }
        Ok(msg)
    }

    pub fn data(&self) -> Result<DataChunk<'_>, ProtoError> {
        if self.payload.len() < DATA_HEADER {
            return Err(ProtoError::Violation("data frame too short".into()));
        }
        let p = &self.payload;
        Ok(DataChunk {
            chunk: u64::from_le_bytes(p[0..8].try_into().unwrap()),
            digest: p[8..40].try_into().unwrap(),
            raw_len: u32::from_le_bytes(p[40..44].try_into().unwrap()),
            bytes: &p[DATA_HEADER..],
        })
    }

    /// The raw entries of an index frame.
    pub fn index_entries(self) -> Result<Vec<u8>, ProtoError> {
        if self.flags & FLAG_COMPRESSED == 0 {
            return Ok(self.payload);
        }
        if self.payload.len() < 4 {
            return Err(ProtoError::Violation("index frame too short".into()));
        }
        let len = u32::from_le_bytes(self.payload[..4].try_into().unwrap()) as usize;
        if len > MAX_FRAME as usize {
            return Err(ProtoError::Violation(format!(
                "index frame of {len} bytes announced"
            )));
        }
        crate::compress::decompress(&self.payload[4..], len)
            .map_err(|e| ProtoError::Violation(format!("index frame does not decompress: {e}")))
    }

    pub fn zero_chunk(&self) -> Result<u64, ProtoError> {
        let b: [u8; 8] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| ProtoError::Violation("zero frame of the wrong size".into()))?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Reads the next control message, failing on anything else.
pub async fn expect_control<R: AsyncRead + Unpin>(r: &mut R) -> Result<Control, ProtoError> {
    read_frame(r).await?.control()
}

pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_request_without_a_known_index_is_the_older_form() {
        let parse = |text: &str| serde_json::from_str::<Control>(text).unwrap();
        assert_eq!(
            parse(r#"{"type":"get_index"}"#),
            Control::GetIndex { known: None }
        );
        assert_eq!(
            parse(r#"{"type":"index_end","entries":5}"#),
            Control::IndexEnd {
                entries: 5,
                unchanged: false
            }
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        encode_data(&mut buf, 7, &[9; 32], 5, b"hello", false);
        encode_zero(&mut buf, 8);
        write_control(&mut buf, &Control::End).await.unwrap();
        let mut r = buf.as_slice();
        let f = read_frame(&mut r).await.unwrap();
        let d = f.data().unwrap();
        assert_eq!((d.chunk, d.raw_len, d.bytes), (7, 5, &b"hello"[..]));
        assert_eq!(read_frame(&mut r).await.unwrap().zero_chunk().unwrap(), 8);
        assert_eq!(expect_control(&mut r).await.unwrap(), Control::End);

        let garbage = [1u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        let err = read_frame(&mut garbage.as_slice()).await.unwrap_err();
        assert!(err.to_string().contains("corrupt stream"), "{err}");
        let mut t = &buf[..20];
        assert!(matches!(read_frame(&mut t).await, Err(ProtoError::Io(_))));
    }
}
