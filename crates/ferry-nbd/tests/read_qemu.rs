//! Reads through real qemu-nbd exports of raw, qcow2 and vmdk images.

mod common;

use common::*;
use ferry_nbd::NbdError;

#[tokio::test]
async fn handshake_reports_size_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "d.raw", "raw", 8 * MIB);

    let rw = export(&img, "raw", false).await;
    let client = connect(&rw, &[]).await;
    assert_eq!(client.size(), 8 * MIB);
    assert!(!client.read_only());
    assert!(client.structured_replies());
    assert_eq!(client.max_block_size(), 32 * MIB as u32);
    assert_eq!(client.preferred_block_size(), 4096);
    assert!(client.min_block_size() >= 1);
    client.disconnect().await.unwrap();
    rw.stop().await.unwrap();

    let ro = export(&img, "raw", true).await;
    let client = connect(&ro, &[]).await;
    assert!(client.read_only());
    assert!(matches!(
        client.write(0, &[1]).await,
        Err(NbdError::ReadOnly)
    ));
    // qemu-nbd allows several readers of a read-only export to share it safely.
    assert!(client.can_multi_conn());
}

#[tokio::test]
async fn reads_match_for_raw_qcow2_and_vmdk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    for format in ["raw", "qcow2", "vmdk"] {
        let img = create_image(dir.path(), &format!("d.{format}"), format, size);
        let mut expected = vec![0u8; size as usize];
        let cmds = vec![
            pattern_write(&mut expected, MIB, 64 * KIB, 0xab),
            pattern_write(&mut expected, 3 * MIB, 4 * KIB, 0x5c),
            pattern_write(&mut expected, 3 * MIB + 4 * KIB, 4 * KIB, 0x5d),
            pattern_write(&mut expected, size - 4 * KIB, 4 * KIB, 0x01),
        ];
        qemu_io(&img, format, &cmds);
        let nbd = ferry_nbd::QemuNbd::start(
            &img,
            ferry_nbd::QemuNbdOptions {
                read_only: true,
                ..ferry_nbd::QemuNbdOptions::new(format)
            },
        )
        .await
        .unwrap();
        let client = connect(&nbd, &[]).await;
        assert_eq!(client.size(), size, "{format}");

        let mut all = vec![0xeeu8; size as usize];
        client.read(0, &mut all).await.unwrap();
        assert!(all == expected, "{format}: whole image differs");

        // Unaligned reads straddling data and holes.
        for (off, len) in [(MIB - 100, 300), (3 * MIB + 4095, 2), (size - 1, 1), (7, 0)] {
            let mut buf = vec![0xeeu8; len];
            client.read(off, &mut buf).await.unwrap();
            assert_eq!(
                buf,
                expected[off as usize..off as usize + len],
                "{format} at {off}+{len}"
            );
        }

        let mut past_end = [0u8; 2];
        assert!(matches!(
            client.read(size - 1, &mut past_end).await,
            Err(NbdError::OutOfRange { .. })
        ));
        client.disconnect().await.unwrap();
        nbd.stop().await.unwrap();
    }
}

#[tokio::test]
async fn reads_larger_than_the_max_block_size_are_split() {
    let dir = tempfile::tempdir().unwrap();
    let size = 80 * MIB;
    let img = create_image(dir.path(), "big.qcow2", "qcow2", size);
    let mut expected = vec![0u8; size as usize];
    let cmds = vec![
        pattern_write(&mut expected, 31 * MIB, 2 * MIB, 0x11),
        pattern_write(&mut expected, 32 * MIB - 512, 1024, 0x22),
        pattern_write(&mut expected, 64 * MIB - 64 * KIB, 128 * KIB, 0x33),
        pattern_write(&mut expected, 70 * MIB, 64 * KIB, 0x44),
    ];
    qemu_io(&img, "qcow2", &cmds);
    let nbd = export(&img, "qcow2", true).await;
    let client = connect(&nbd, &[]).await;
    assert!(u64::from(client.max_block_size()) < 70 * MIB);

    let offset = MIB - 7;
    let mut buf = vec![0xeeu8; (70 * MIB) as usize];
    client.read(offset, &mut buf).await.unwrap();
    assert!(buf[..] == expected[offset as usize..offset as usize + buf.len()]);
}

#[tokio::test]
async fn many_concurrent_reads_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let stride = 128 * KIB;
    let size = 64 * stride;
    let img = create_image(dir.path(), "c.qcow2", "qcow2", size);
    let mut expected = vec![0u8; size as usize];
    let cmds: Vec<String> = (0..64u64)
        .map(|i| pattern_write(&mut expected, i * stride, 64 * KIB, i as u8 + 1))
        .collect();
    qemu_io(&img, "qcow2", &cmds);
    let nbd = export(&img, "qcow2", true).await;
    let client = connect(&nbd, &[]).await;

    let reads = (0..64u64).map(|i| {
        let client = client.clone();
        async move {
            // Each read spans this region's data and the hole after it and a bit of the next.
            let off = i * stride + 32 * KIB;
            let len = (stride as usize).min((size - off) as usize);
            let mut buf = vec![0xeeu8; len];
            client.read(off, &mut buf).await.map(|_| (off, buf))
        }
    });
    let results = futures::future::join_all(reads).await;
    for r in results {
        let (off, buf) = r.unwrap();
        assert!(
            buf[..] == expected[off as usize..off as usize + buf.len()],
            "read at {off}"
        );
    }

    // The same from spawned tasks: the client is Send + Sync and clones share the connection.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * KIB as usize];
            client.read(i * stride, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "region {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}
