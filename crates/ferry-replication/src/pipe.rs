//! The in-memory connection between a sender and a receiver in one process.
//!
//! Each direction is a bounded queue of byte segments. Segments the reader has emptied go
//! back to the writer for its next write: a sync moves gigabytes through a handful of
//! buffers, instead of through fresh memory (a page fault per 4 KiB) or a ring that
//! compacts itself (a second copy of everything).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Emptied segments kept for reuse, per direction.
const SPARE_SEGMENTS: usize = 8;

#[derive(Default)]
struct Direction {
    queue: VecDeque<Vec<u8>>,
    /// Bytes in `queue` not read yet.
    queued: usize,
    /// Read position in the front segment.
    read_pos: usize,
    spare: Vec<Vec<u8>>,
    /// The writer shut down or went away: the reader sees the end once the queue is empty.
    closed: bool,
    /// The reader went away: writes fail.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Direction {
    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// One end of an in-process pipe: reads what the other end writes, and the reverse.
pub struct PipeEnd {
    incoming: Arc<Mutex<Direction>>,
    outgoing: Arc<Mutex<Direction>>,
    capacity: usize,
}

/// A connected pair of ends; each direction holds at most about `capacity` bytes.
pub fn pipe(capacity: usize) -> (PipeEnd, PipeEnd) {
    let a = Arc::new(Mutex::new(Direction::default()));
    let b = Arc::new(Mutex::new(Direction::default()));
    (
        PipeEnd {
            incoming: Arc::clone(&a),
            outgoing: Arc::clone(&b),
            capacity,
        },
        PipeEnd {
            incoming: b,
            outgoing: a,
            capacity,
        },
    )
}

impl AsyncRead for PipeEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.incoming.lock().unwrap();
        let d = &mut *guard;
        let before = buf.filled().len();
        while buf.remaining() > 0 {
            let Some(front) = d.queue.front() else { break };
            let at = d.read_pos;
            let n = (front.len() - at).min(buf.remaining());
            buf.put_slice(&front[at..at + n]);
            d.read_pos += n;
            d.queued -= n;
            if d.read_pos == front.len() {
                let seg = d.queue.pop_front().unwrap_or_default();
                d.read_pos = 0;
                if d.spare.len() < SPARE_SEGMENTS {
                    d.spare.push(seg);
                }
            }
        }
        if buf.filled().len() == before && buf.remaining() > 0 && !d.closed {
            d.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        d.wake_writer();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut d = self.outgoing.lock().unwrap();
        if d.reader_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if d.closed {
            return Poll::Ready(Err(io::Error::other("write after shutdown")));
        }
        if d.queued >= self.capacity {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(self.capacity);
        // A spare that is large enough, or else a new segment of the exact size: growing
        // a small spare (a control message's) would copy it into fresh memory first.
        let mut seg = match d.spare.iter().position(|s| s.capacity() >= n) {
            Some(i) => d.spare.swap_remove(i),
            None => Vec::with_capacity(n),
        };
        seg.clear();
        seg.extend_from_slice(&buf[..n]);
        d.queue.push_back(seg);
        d.queued += n;
        d.wake_reader();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut d = self.outgoing.lock().unwrap();
        d.closed = true;
        d.wake_reader();
        Poll::Ready(Ok(()))
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        let mut out = self.outgoing.lock().unwrap();
        out.closed = true;
        out.wake_reader();
        drop(out);
        let mut inc = self.incoming.lock().unwrap();
        inc.reader_gone = true;
        inc.queue.clear();
        inc.queued = 0;
        inc.wake_writer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_arrive_in_order_with_back_pressure_and_end() {
        let (mut a, mut b) = pipe(1000);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for part in sent.chunks(777) {
                a.write_all(part).await.unwrap();
            }
            a.shutdown().await.unwrap();
            a
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes changed on the way");
        let a = writer.await.unwrap();
        drop(b);
        let mut a = a;
        assert!(a.write_all(b"x").await.is_err(), "the reader is gone");
    }

    #[tokio::test]
    async fn a_vanished_writer_is_the_end_of_the_stream() {
        let (a, mut b) = pipe(1000);
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }
}
