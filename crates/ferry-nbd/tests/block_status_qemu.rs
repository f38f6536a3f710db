//! Block status (base:allocation and qemu dirty bitmaps) against real qemu-nbd.

mod common;

use common::*;
use ferry_nbd::{
    dirty_bitmap_context, NbdError, QemuNbd, QemuNbdOptions, CONTEXT_BASE_ALLOCATION, STATE_DIRTY,
};

const HOLE_ZERO: u32 = ferry_nbd::STATE_HOLE | ferry_nbd::STATE_ZERO;

#[tokio::test]
async fn base_allocation_shows_holes_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let img = create_image(dir.path(), "s.qcow2", "qcow2", size);
    let mut expected = vec![0u8; size as usize];
    qemu_io(
        &img,
        "qcow2",
        &[
            pattern_write(&mut expected, MIB, 64 * KIB, 0xab),
            pattern_write(&mut expected, 5 * MIB, 128 * KIB, 0xcd),
        ],
    );
    let nbd = export(&img, "qcow2", true).await;
    let client = connect(&nbd, &[CONTEXT_BASE_ALLOCATION]).await;
    assert!(client.supports(CONTEXT_BASE_ALLOCATION));

    let map = full_map(&client, CONTEXT_BASE_ALLOCATION, 0, size).await;
    assert_eq!(
        map,
        vec![
            (0, MIB, HOLE_ZERO),
            (MIB, 64 * KIB, 0),
            (MIB + 64 * KIB, 4 * MIB - 64 * KIB, HOLE_ZERO),
            (5 * MIB, 128 * KIB, 0),
            (5 * MIB + 128 * KIB, 3 * MIB - 128 * KIB, HOLE_ZERO),
        ]
    );

    let merged = client
        .block_status_all(CONTEXT_BASE_ALLOCATION, 0, size)
        .await
        .unwrap();
    let merged: Vec<(u64, u64, u32)> = merged
        .iter()
        .map(|e| (e.offset, e.length, e.flags))
        .collect();
    assert_eq!(merged, map);

    // A sub-range is clipped to what was asked.
    let extents = client
        .block_status(CONTEXT_BASE_ALLOCATION, MIB + 4096, 8192)
        .await
        .unwrap();
    assert_eq!(
        extents,
        vec![ferry_nbd::Extent {
            offset: MIB + 4096,
            length: 8192,
            flags: 0
        }]
    );
    let extents = client
        .block_status(CONTEXT_BASE_ALLOCATION, MIB - 512, 1024)
        .await
        .unwrap();
    assert_eq!(extents[0].offset, MIB - 512);
    assert_eq!(extents[0].flags, HOLE_ZERO);
    assert!(extents.iter().map(|e| e.length).sum::<u64>() <= 1024);
    assert!(client
        .block_status(CONTEXT_BASE_ALLOCATION, 0, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        client.block_status(CONTEXT_BASE_ALLOCATION, size, 1).await,
        Err(NbdError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn dirty_bitmap_reports_written_extents() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let img = create_image(dir.path(), "b.qcow2", "qcow2", size);
    let path = img.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", path, "bm0"]);
    // qemu-io opens the image with its persistent bitmaps enabled, so these writes
    // are recorded in bm0 (at its 64 KiB granularity).
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x1 1M 4k".into(),
            "write -P 0x2 3M 128k".into(),
            "write -P 0x3 2097252 10".into(), // 2M + 100, inside one granule
            "write -P 0x4 5238784 8192".into(), // 5M - 4k, straddles two granules
        ],
    );
    // Disabled, as Ferry does before exporting a bitmap, so it is a fixed point in
    // time (qemu's block-export-add refuses enabled bitmaps; qemu-nbd allows them).
    run("qemu-img", &["bitmap", "--disable", path, "bm0"]);

    let nbd = QemuNbd::start(
        &img,
        QemuNbdOptions {
            read_only: true,
            bitmap: Some("bm0".into()),
            ..QemuNbdOptions::new("qcow2")
        },
    )
    .await
    .unwrap();
    let ctx = dirty_bitmap_context("bm0");
    let client = connect(&nbd, &[CONTEXT_BASE_ALLOCATION, &ctx]).await;
    assert!(client.supports(&ctx));
    assert!(client.supports(CONTEXT_BASE_ALLOCATION));

    let map = full_map(&client, &ctx, 0, size).await;
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.2 & STATE_DIRTY != 0)
        .map(|e| (e.0, e.1))
        .collect();
    assert_eq!(
        dirty,
        vec![
            (MIB, 64 * KIB),
            (2 * MIB, 64 * KIB),
            (3 * MIB, 128 * KIB),
            (5 * MIB - 64 * KIB, 128 * KIB),
        ],
        "{map:?}"
    );
    // Clean extents are reported with flags 0 and the map covers the whole disk.
    assert!(map.iter().all(|e| e.2 == 0 || e.2 == STATE_DIRTY));
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size);
}

#[tokio::test]
async fn unknown_meta_context_is_not_supported() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "u.qcow2", "qcow2", 4 * MIB);
    let nbd = export(&img, "qcow2", true).await;
    let client = connect(
        &nbd,
        &[
            CONTEXT_BASE_ALLOCATION,
            "qemu:dirty-bitmap:nosuch",
            "nosuch:context",
        ],
    )
    .await;
    assert!(client.supports(CONTEXT_BASE_ALLOCATION));
    assert!(!client.supports("qemu:dirty-bitmap:nosuch"));
    assert!(!client.supports("nosuch:context"));
    // Never requested at all.
    assert!(!client.supports("qemu:allocation-depth"));
    match client.block_status("nosuch:context", 0, 4096).await {
        Err(NbdError::UnknownContext(name)) => assert_eq!(name, "nosuch:context"),
        other => panic!("expected UnknownContext, got {other:?}"),
    }
    // The connection is still fine.
    let mut buf = [0u8; 512];
    client.read(0, &mut buf).await.unwrap();
}

#[tokio::test]
async fn writes_through_our_client_land_in_the_persistent_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let img = create_image(dir.path(), "w.qcow2", "qcow2", size);
    let path = img.to_str().unwrap();
    run("qemu-img", &["bitmap", "--add", path, "bm1"]);

    // qemu-nbd tracks writes in the enabled persistent bitmap, and stores it when
    // it is stopped with SIGTERM (as QemuNbd::stop does).
    let nbd = export(&img, "qcow2", false).await;
    let client = connect(&nbd, &[]).await;
    client.write(256 * KIB + 1, &[5u8; 100]).await.unwrap();
    client.write_zeroes(3 * MIB, 64 * KIB, false).await.unwrap();
    client.flush().await.unwrap();
    client.disconnect().await.unwrap();
    nbd.stop().await.unwrap();
    run("qemu-img", &["bitmap", "--disable", path, "bm1"]);

    let nbd = QemuNbd::start(
        &img,
        QemuNbdOptions {
            read_only: true,
            bitmap: Some("bm1".into()),
            ..QemuNbdOptions::new("qcow2")
        },
    )
    .await
    .unwrap();
    let ctx = dirty_bitmap_context("bm1");
    let client = connect(&nbd, &[&ctx]).await;
    let dirty: Vec<(u64, u64)> = client
        .block_status_all(&ctx, 0, size)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, vec![(256 * KIB, 64 * KIB), (3 * MIB, 64 * KIB)]);
}
