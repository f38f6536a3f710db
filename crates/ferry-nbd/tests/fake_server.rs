//! The client against a scripted in-process server, to check how it copes with
//! malformed, truncated and unusual replies (errors, never panics).

use ferry_nbd::{ConnectOptions, Extent, NbdClient, NbdError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454F5054;
const OPT_REPLY_MAGIC: u64 = 0x3e889045565a9;
const SIMPLE: u32 = 0x67446698;
const STRUCTURED: u32 = 0x668e33ef;
const DONE: u16 = 1;
const SIZE: u64 = 1 << 20;
// HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES
const TFLAGS: u16 = 1 | 4 | 32 | 64;

fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Read one option from the client: (option, data).
async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let option = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (option, data)
}

/// A well-behaved handshake offering structured replies and the given contexts.
async fn handshake(s: &mut DuplexStream, contexts: &[(&str, u32)]) {
    handshake_with_flags(s, contexts, TFLAGS).await
}

async fn handshake_with_flags(s: &mut DuplexStream, contexts: &[(&str, u32)], tflags: u16) {
    s.write_u64(NBDMAGIC).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(3).await.unwrap();
    let client_flags = s.read_u32().await.unwrap();
    assert_eq!(client_flags & 1, 1, "client must ask for fixed newstyle");
    loop {
        let (option, _data) = read_option(s).await;
        match option {
            8 => s.write_all(&opt_reply(8, 1, &[])).await.unwrap(),
            10 => {
                for (name, id) in contexts {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    s.write_all(&opt_reply(10, 4, &d)).await.unwrap();
                }
                s.write_all(&opt_reply(10, 1, &[])).await.unwrap();
            }
            7 => {
                let mut export = 0u16.to_be_bytes().to_vec();
                export.extend_from_slice(&SIZE.to_be_bytes());
                export.extend_from_slice(&tflags.to_be_bytes());
                s.write_all(&opt_reply(7, 3, &export)).await.unwrap();
                let mut sizes = 3u16.to_be_bytes().to_vec();
                for v in [1u32, 4096, 65536] {
                    sizes.extend_from_slice(&v.to_be_bytes());
                }
                s.write_all(&opt_reply(7, 3, &sizes)).await.unwrap();
                s.write_all(&opt_reply(7, 1, &[])).await.unwrap();
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

#[derive(Debug)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

async fn read_request(s: &mut DuplexStream) -> Request {
    assert_eq!(s.read_u32().await.unwrap(), 0x25609513);
    let flags = s.read_u16().await.unwrap();
    let command = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let offset = s.read_u64().await.unwrap();
    let len = s.read_u32().await.unwrap();
    if command == 1 {
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
    }
    Request {
        flags,
        command,
        cookie,
        offset,
        len,
    }
}

fn simple(errno: u32, cookie: u64) -> Vec<u8> {
    let mut b = SIMPLE.to_be_bytes().to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = STRUCTURED.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(flags, 1, cookie, &p)
}

/// The whole reply to a read: one data chunk of `byte`s.
fn filled(req: &Request, byte: u8) -> Vec<u8> {
    data_chunk(DONE, req.cookie, req.offset, &vec![byte; req.len as usize])
}

fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(flags, 2, cookie, &p)
}

fn error_chunk(flags: u16, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(message.len() as u16).to_be_bytes());
    p.extend_from_slice(message.as_bytes());
    chunk(flags, 32769, cookie, &p)
}

fn status_chunk(flags: u16, cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (len, f) in extents {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(flags, 5, cookie, &p)
}

/// Connect a client to a fake server running `script` after a normal handshake.
async fn with_server<F, Fut>(contexts: &'static [(&'static str, u32)], script: F) -> NbdClient
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        handshake(&mut server_end, contexts).await;
        script(server_end).await;
    });
    let opts = ConnectOptions {
        meta_contexts: contexts.iter().map(|(n, _)| n.to_string()).collect(),
    };
    NbdClient::connect_stream(client_end, "", opts)
        .await
        .expect("handshake")
}

fn assert_protocol(result: Result<(), NbdError>, needle: &str) {
    match result {
        Err(NbdError::Protocol(msg)) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        other => panic!("expected a protocol error about {needle:?}, got {other:?}"),
    }
}

fn assert_disconnected(result: Result<(), NbdError>, needle: &str) {
    match result {
        Err(NbdError::Disconnected(msg)) => {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
        }
        other => panic!("expected Disconnected about {needle:?}, got {other:?}"),
    }
}

/// A server that holds on to its end until the test is over.
async fn park(s: DuplexStream) {
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    drop(s);
}

#[tokio::test]
async fn wrong_reply_magic_fails_the_request_and_the_connection() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        let mut b = 0xdeadbeefu32.to_be_bytes().to_vec();
        b.extend_from_slice(&[0; 12]);
        let _ = req;
        s.write_all(&b).await.unwrap();
        park(s).await;
    })
    .await;
    assert_protocol(
        client.read(0, &mut [0u8; 512]).await,
        "bad reply magic 0xdeadbeef",
    );
    assert_disconnected(client.read(0, &mut [0u8; 512]).await, "bad reply magic");
}

#[tokio::test]
async fn reply_for_an_unknown_cookie_is_an_error() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        s.write_all(&simple(0, req.cookie + 1000)).await.unwrap();
        park(s).await;
    })
    .await;
    assert_protocol(
        client.flush().await,
        "cookie 0x3e9, which no request is waiting for",
    );
    // The stream cannot be trusted after that: the connection is closed.
    assert_disconnected(client.flush().await, "cookie");
}

#[tokio::test]
async fn truncated_reply_is_an_error() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        let full = filled(&req, 7);
        s.write_all(&full[..full.len() / 2]).await.unwrap();
        drop(s);
    })
    .await;
    assert_protocol(client.read(0, &mut [0u8; 4096]).await, "middle of a reply");
}

#[tokio::test]
async fn server_closing_between_replies_fails_waiting_requests() {
    let client = with_server(&[], |mut s| async move {
        let _ = read_request(&mut s).await;
        drop(s);
    })
    .await;
    assert_disconnected(
        client.read(0, &mut [0u8; 16]).await,
        "server closed the connection",
    );
}

#[tokio::test]
async fn chunk_outside_the_request_is_an_error() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        s.write_all(&data_chunk(DONE, req.cookie, req.offset + 100, &[1u8; 512]))
            .await
            .unwrap();
        park(s).await;
    })
    .await;
    assert_protocol(
        client.read(4096, &mut [0u8; 512]).await,
        "outside the request",
    );
}

#[tokio::test]
async fn oversized_chunk_is_refused_without_allocating() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        let mut b = chunk(DONE, 32769, req.cookie, &[]);
        let n = b.len();
        b[n - 4..].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        s.write_all(&b).await.unwrap();
        park(s).await;
    })
    .await;
    assert_protocol(client.flush().await, "larger than");
}

#[tokio::test]
async fn structured_read_is_assembled_from_chunks_in_any_order() {
    let client = with_server(&[], |mut s| async move {
        let a = read_request(&mut s).await;
        let b = read_request(&mut s).await;
        // Answer the second request first, and each in scrambled pieces.
        s.write_all(&data_chunk(0, b.cookie, b.offset + 8, &[0xbb; 8]))
            .await
            .unwrap();
        s.write_all(&data_chunk(0, a.cookie, a.offset + 2048, &[0xaa; 2048]))
            .await
            .unwrap();
        s.write_all(&hole_chunk(0, b.cookie, b.offset, 8))
            .await
            .unwrap();
        s.write_all(&chunk(DONE, 0, b.cookie, &[])).await.unwrap();
        s.write_all(&hole_chunk(0, a.cookie, a.offset, 1024))
            .await
            .unwrap();
        s.write_all(&data_chunk(DONE, a.cookie, a.offset + 1024, &[0xa1; 1024]))
            .await
            .unwrap();
        park(s).await;
    })
    .await;
    let c2 = client.clone();
    let mut a = vec![0xeeu8; 4096];
    let mut b = vec![0xeeu8; 16];
    let (ra, rb) = tokio::join!(client.read(8192, &mut a), async {
        // Make sure the first read is sent first.
        tokio::task::yield_now().await;
        c2.read(65536, &mut b).await
    });
    ra.unwrap();
    rb.unwrap();
    assert!(a[..1024].iter().all(|&x| x == 0));
    assert!(a[1024..2048].iter().all(|&x| x == 0xa1));
    assert!(a[2048..].iter().all(|&x| x == 0xaa));
    assert_eq!(b, [[0u8; 8], [0xbb; 8]].concat());
}

#[tokio::test]
async fn read_reply_that_misses_bytes_is_an_error_but_the_connection_survives() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        s.write_all(&data_chunk(DONE, req.cookie, req.offset, &[1u8; 100]))
            .await
            .unwrap();
        let req = read_request(&mut s).await;
        s.write_all(&filled(&req, 2)).await.unwrap();
        park(s).await;
    })
    .await;
    assert_protocol(client.read(0, &mut [0u8; 200]).await, "covered 100 of 200");
    let mut buf = [0u8; 10];
    client.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, [2u8; 10]);
}

#[tokio::test]
async fn server_errors_carry_errno_and_message() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        s.write_all(&error_chunk(0, req.cookie, 5, "disk on fire"))
            .await
            .unwrap();
        s.write_all(&chunk(DONE, 0, req.cookie, &[])).await.unwrap();
        let req = read_request(&mut s).await;
        s.write_all(&simple(28, req.cookie)).await.unwrap();
        let req = read_request(&mut s).await;
        s.write_all(&simple(0, req.cookie)).await.unwrap();
        park(s).await;
    })
    .await;
    match client.read(0, &mut [0u8; 64]).await {
        Err(e @ NbdError::Server { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("NBD_CMD_READ")
                    && text.contains("EIO")
                    && text.contains("disk on fire"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    match client.write(0, &[1, 2, 3]).await {
        Err(NbdError::Server { command, errno, .. }) => {
            assert_eq!(command, "NBD_CMD_WRITE");
            assert_eq!(errno, 28);
        }
        other => panic!("{other:?}"),
    }
    client.flush().await.unwrap();
}

#[tokio::test]
async fn block_status_picks_its_context_and_clips_to_the_range() {
    static CONTEXTS: [(&str, u32); 2] = [("base:allocation", 1), ("qemu:dirty-bitmap:b", 2)];
    let client = with_server(&CONTEXTS, |mut s| async move {
        let req = read_request(&mut s).await;
        assert_eq!(req.command, 7);
        s.write_all(&status_chunk(0, req.cookie, 1, &[(4096, 3)]))
            .await
            .unwrap();
        s.write_all(&status_chunk(
            DONE,
            req.cookie,
            2,
            &[(1000, 1), (2000, 0), (1 << 20, 1)],
        ))
        .await
        .unwrap();
        let req = read_request(&mut s).await;
        // Only the wrong context: the caller's context is missing.
        s.write_all(&status_chunk(DONE, req.cookie, 1, &[(4096, 0)]))
            .await
            .unwrap();
        let req = read_request(&mut s).await;
        // A length that is not a context id plus whole extents.
        let mut bad = status_chunk(DONE, req.cookie, 2, &[(4096, 0)]);
        bad.push(0);
        let n = bad.len();
        bad[16..20].copy_from_slice(&((n - 20) as u32).to_be_bytes());
        s.write_all(&bad).await.unwrap();
        park(s).await;
    })
    .await;
    assert!(client.supports("qemu:dirty-bitmap:b"));
    let extents = client
        .block_status("qemu:dirty-bitmap:b", 100, 5000)
        .await
        .unwrap();
    assert_eq!(
        extents,
        vec![
            Extent {
                offset: 100,
                length: 1000,
                flags: 1
            },
            Extent {
                offset: 1100,
                length: 2000,
                flags: 0
            },
            Extent {
                offset: 3100,
                length: 2000,
                flags: 1
            },
        ]
    );
    let r = client
        .block_status("qemu:dirty-bitmap:b", 0, 4096)
        .await
        .map(|_| ());
    assert_protocol(r, "no extents for context id 2");
    let r = client
        .block_status("qemu:dirty-bitmap:b", 0, 4096)
        .await
        .map(|_| ());
    assert_protocol(r, "not a context id plus whole extents");
}

#[tokio::test]
async fn requests_are_split_at_the_servers_max_block_size() {
    let client = with_server(&[], |mut s| async move {
        let mut seen = Vec::new();
        while seen.iter().map(|r: &Request| u64::from(r.len)).sum::<u64>() < 200_000 {
            let req = read_request(&mut s).await;
            assert!(req.len <= 65536, "{req:?}");
            s.write_all(&data_chunk(
                DONE,
                req.cookie,
                req.offset,
                &vec![(req.offset / 65536) as u8; req.len as usize],
            ))
            .await
            .unwrap();
            seen.push(req);
        }
        park(s).await;
    })
    .await;
    assert_eq!(client.max_block_size(), 65536);
    let mut buf = vec![0xeeu8; 200_000];
    client.read(0, &mut buf).await.unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, (i / 65536) as u8, "byte {i}");
    }
}

/// Run a handshake script and return what connecting gives.
async fn connect_to<F, Fut>(script: F) -> NbdError
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    tokio::spawn(script(server_end));
    NbdClient::connect_stream(client_end, "exp", ConnectOptions::default())
        .await
        .expect_err("must fail")
}

#[tokio::test]
async fn handshake_errors_are_clear() {
    let e = connect_to(|mut s| async move {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        park(s).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::Protocol(m) if m.contains("greeting magic")),
        "{e:?}"
    );

    let e = connect_to(|mut s| async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        drop(s);
    })
    .await;
    assert!(
        matches!(&e, NbdError::Protocol(m) if m.contains("during the handshake")),
        "{e:?}"
    );

    let e = connect_to(|mut s| async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(1).await.unwrap();
        s.read_u32().await.unwrap();
        let _ = read_option(&mut s).await;
        s.write_all(&opt_reply(8, 1, &[])).await.unwrap();
        let (option, data) = read_option(&mut s).await;
        assert_eq!(option, 7);
        assert_eq!(&data[4..7], b"exp");
        s.write_all(&opt_reply(7, 0x8000_0002, b"you may not"))
            .await
            .unwrap();
        park(s).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::Refused { option: "NBD_OPT_GO", reply, message } if reply == "NBD_REP_ERR_POLICY" && message == "you may not"),
        "{e:?}"
    );

    let e = connect_to(|mut s| async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(1).await.unwrap();
        s.read_u32().await.unwrap();
        let _ = read_option(&mut s).await;
        let mut r = opt_reply(8, 1, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&r).await.unwrap();
        park(s).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::Protocol(m) if m.contains("larger than")),
        "{e:?}"
    );

    let e = connect_to(|mut s| async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(1).await.unwrap();
        s.read_u32().await.unwrap();
        let _ = read_option(&mut s).await;
        let mut r = opt_reply(8, 1, &[]);
        r[0] = 0x77;
        s.write_all(&r).await.unwrap();
        park(s).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::Protocol(m) if m.contains("option reply magic")),
        "{e:?}"
    );

    // GO acknowledged without telling the export size.
    let e = connect_to(|mut s| async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(1).await.unwrap();
        s.read_u32().await.unwrap();
        let _ = read_option(&mut s).await;
        s.write_all(&opt_reply(8, 0x8000_0001, &[])).await.unwrap();
        let _ = read_option(&mut s).await;
        s.write_all(&opt_reply(7, 1, &[])).await.unwrap();
        park(s).await;
    })
    .await;
    assert!(
        matches!(&e, NbdError::Protocol(m) if m.contains("without NBD_INFO_EXPORT")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_request_abandoned_by_its_caller_does_not_disturb_the_next_one() {
    let client = with_server(&[], |mut s| async move {
        let slow = read_request(&mut s).await;
        let next = read_request(&mut s).await;
        // Reply to the abandoned request late, then to the next one.
        s.write_all(&data_chunk(
            DONE,
            slow.cookie,
            slow.offset,
            &vec![1u8; slow.len as usize],
        ))
        .await
        .unwrap();
        s.write_all(&data_chunk(
            DONE,
            next.cookie,
            next.offset,
            &vec![2u8; next.len as usize],
        ))
        .await
        .unwrap();
        park(s).await;
    })
    .await;
    let mut buf = [0u8; 64];
    let abandoned = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        client.read(0, &mut buf),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the server never answers before the second request"
    );
    client.read(512, &mut buf).await.unwrap();
    assert_eq!(buf, [2u8; 64]);
}

#[tokio::test]
async fn block_status_all_asks_again_until_the_range_is_covered() {
    static CONTEXTS: [(&str, u32); 1] = [("base:allocation", 9)];
    let client = with_server(&CONTEXTS, |mut s| async move {
        // Each answer covers only 4 KiB: data, data, hole, ...
        for i in 0..4u32 {
            let req = read_request(&mut s).await;
            assert_eq!(req.offset, u64::from(i) * 4096);
            let flags = if i < 2 { 0 } else { 3 };
            s.write_all(&status_chunk(DONE, req.cookie, 9, &[(4096, flags)]))
                .await
                .unwrap();
        }
        park(s).await;
    })
    .await;
    let extents = client
        .block_status_all("base:allocation", 0, 16384)
        .await
        .unwrap();
    assert_eq!(
        extents,
        vec![
            Extent {
                offset: 0,
                length: 8192,
                flags: 0
            },
            Extent {
                offset: 8192,
                length: 8192,
                flags: 3
            }
        ]
    );
}

#[tokio::test]
async fn truncated_simple_read_reply_is_an_error() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        // A server without structured replies: reads get simple replies plus data.
        server_end.write_u64(NBDMAGIC).await.unwrap();
        server_end.write_u64(IHAVEOPT).await.unwrap();
        server_end.write_u16(3).await.unwrap();
        server_end.read_u32().await.unwrap();
        let _ = read_option(&mut server_end).await;
        server_end
            .write_all(&opt_reply(8, 0x8000_0001, &[]))
            .await
            .unwrap();
        let _ = read_option(&mut server_end).await;
        let mut export = 0u16.to_be_bytes().to_vec();
        export.extend_from_slice(&SIZE.to_be_bytes());
        export.extend_from_slice(&TFLAGS.to_be_bytes());
        server_end
            .write_all(&opt_reply(7, 3, &export))
            .await
            .unwrap();
        server_end.write_all(&opt_reply(7, 1, &[])).await.unwrap();
        let req = read_request(&mut server_end).await;
        server_end.write_all(&simple(0, req.cookie)).await.unwrap();
        server_end
            .write_all(&vec![3u8; req.len as usize])
            .await
            .unwrap();
        let req = read_request(&mut server_end).await;
        server_end.write_all(&simple(0, req.cookie)).await.unwrap();
        server_end.write_all(&[3u8; 10]).await.unwrap();
        drop(server_end);
    });
    let opts = ConnectOptions {
        meta_contexts: vec!["base:allocation".into()],
    };
    let client = NbdClient::connect_stream(client_end, "", opts)
        .await
        .unwrap();
    assert!(!client.structured_replies());
    assert!(!client.supports("base:allocation"));
    let mut buf = [0u8; 100];
    client.read(0, &mut buf).await.unwrap();
    assert_eq!(buf, [3u8; 100]);
    assert_protocol(client.read(0, &mut buf).await, "middle of a reply");
}

#[tokio::test]
async fn commands_the_server_does_not_advertise() {
    let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        // HAS_FLAGS only: no flush, trim or write zeroes.
        handshake_with_flags(&mut server_end, &[], 1).await;
        let mut zeroed = 0u64;
        while zeroed < 100_000 {
            let req = read_request(&mut server_end).await;
            assert_eq!(
                req.command, 1,
                "zeroes must arrive as plain writes: {req:?}"
            );
            zeroed += u64::from(req.len);
            server_end.write_all(&simple(0, req.cookie)).await.unwrap();
        }
        // Nothing else may be sent: the next thing is the disconnect.
        let req = read_request(&mut server_end).await;
        assert_eq!(req.command, 2, "{req:?}");
        zeroed
    });
    let client = NbdClient::connect_stream(client_end, "", ConnectOptions::default())
        .await
        .unwrap();
    client.write_zeroes(1000, 100_000, true).await.unwrap();
    assert!(matches!(
        client.trim(0, 4096).await,
        Err(NbdError::Unsupported(_))
    ));
    client.flush().await.unwrap();
    client.disconnect().await.unwrap();
    assert_eq!(server.await.unwrap(), 100_000);
}

#[tokio::test]
async fn reads_ask_for_one_unfragmented_reply_only_where_the_server_offers_it() {
    const CMD_FLAG_DF: u16 = 1 << 2;
    for (tflags, want) in [(TFLAGS, 0), (TFLAGS | 1 << 7, CMD_FLAG_DF)] {
        let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            handshake_with_flags(&mut server_end, &[], tflags).await;
            let mut seen = Vec::new();
            for _ in 0..2 {
                let req = read_request(&mut server_end).await;
                seen.push(req.flags);
                server_end.write_all(&filled(&req, 7)).await.unwrap();
            }
            seen
        });
        let client = NbdClient::connect_stream(client_end, "", ConnectOptions::default())
            .await
            .unwrap();
        client.read(0, &mut [0u8; 512]).await.unwrap();
        client.read_into(4096, 512, Vec::new()).await.unwrap();
        assert_eq!(server.await.unwrap(), vec![want, want], "flags {tflags:#x}");
    }
}

#[tokio::test]
async fn a_reused_buffer_keeps_nothing_of_its_last_contents() {
    let client = with_server(&[], |mut s| async move {
        let req = read_request(&mut s).await;
        s.write_all(&hole_chunk(0, req.cookie, req.offset, 1000))
            .await
            .unwrap();
        s.write_all(&data_chunk(DONE, req.cookie, req.offset + 1000, &[5u8; 24]))
            .await
            .unwrap();
        park(s).await;
    })
    .await;
    // Longer than the read, full of old bytes: the reply replaces exactly what it covers.
    let got = client.read_into(0, 1024, vec![0xee; 4096]).await.unwrap();
    assert_eq!(got.len(), 1024);
    assert!(got[..1000].iter().all(|&b| b == 0), "a hole reads as zeros");
    assert!(got[1000..].iter().all(|&b| b == 5));
}
