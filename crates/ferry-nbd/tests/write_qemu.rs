//! Writes, zeroes, trims and flushes through a writable qemu-nbd export of a qcow2 image.

mod common;

use common::*;
use ferry_nbd::{QemuNbd, QemuNbdOptions, CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

#[tokio::test]
async fn write_zeroes_trim_flush_round_trip_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let img = create_image(dir.path(), "w.qcow2", "qcow2", size);
    let mut expected = vec![0u8; size as usize];

    let nbd = QemuNbd::start(
        &img,
        QemuNbdOptions {
            discard_unmap: true,
            ..QemuNbdOptions::new("qcow2")
        },
    )
    .await
    .unwrap();
    let client = connect(&nbd, &[CONTEXT_BASE_ALLOCATION]).await;
    assert!(!client.read_only());

    // An unaligned write, then one larger than the max block size.
    let small = noise(100_000, 1);
    client.write(MIB + 3, &small).await.unwrap();
    expected[(MIB + 3) as usize..][..small.len()].copy_from_slice(&small);
    let big = noise((34 * MIB) as usize, 2);
    client.write(4 * MIB, &big).await.unwrap();
    expected[(4 * MIB) as usize..][..big.len()].copy_from_slice(&big);

    // Zeroes that must stay allocated, and zeroes that may become holes.
    client.write_zeroes(MIB + 4096, 8192, false).await.unwrap();
    expected[(MIB + 4096) as usize..][..8192].fill(0);
    client.write_zeroes(8 * MIB, 2 * MIB, true).await.unwrap();
    expected[(8 * MIB) as usize..][..(2 * MIB) as usize].fill(0);
    // Trim leaves the contents unspecified; qemu with discard=unmap on qcow2 reads zeroes.
    client.trim(16 * MIB, MIB).await.unwrap();
    expected[(16 * MIB) as usize..][..MIB as usize].fill(0);
    client.flush().await.unwrap();

    let mut back = vec![0xeeu8; size as usize];
    client.read(0, &mut back).await.unwrap();
    assert!(back == expected, "read back differs");

    // The zeroed-with-trim and trimmed ranges read as zeroes in block status too.
    for (off, len) in [(8 * MIB, 2 * MIB), (16 * MIB, MIB)] {
        let map = full_map(&client, CONTEXT_BASE_ALLOCATION, off, len).await;
        assert!(map.iter().all(|e| e.2 & STATE_ZERO != 0), "{off}: {map:?}");
    }
    // NO_HOLE zeroes stay allocated.
    let map = full_map(&client, CONTEXT_BASE_ALLOCATION, MIB + 4096, 8192).await;
    assert!(map.iter().all(|e| e.2 & STATE_HOLE == 0), "{map:?}");

    client.disconnect().await.unwrap();
    assert!(matches!(
        client.read(0, &mut [0u8; 1]).await,
        Err(ferry_nbd::NbdError::Disconnected(_))
    ));
    client.disconnect().await.unwrap();
    nbd.stop().await.unwrap();

    // What was written survived qemu-nbd stopping: check from a fresh export.
    run("qemu-img", &["check", "-q", img.to_str().unwrap()]);
    let nbd = export(&img, "qcow2", true).await;
    let client = connect(&nbd, &[]).await;
    let mut again = vec![0xeeu8; size as usize];
    client.read(0, &mut again).await.unwrap();
    assert!(again == expected, "contents after restart differ");
}
