//! Lifecycle of the qemu-nbd launcher.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_nbd::NbdError;

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn stop_with_a_connected_client_is_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "l.qcow2", "qcow2", MIB);
    let nbd = export(&img, "qcow2", false).await;
    let pid = nbd.pid().unwrap();
    let client = connect(&nbd, &[]).await;
    client.write(0, &[9u8; 4096]).await.unwrap();

    let started = Instant::now();
    nbd.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(!alive(pid), "qemu-nbd {pid} still running");

    // The client notices the server is gone, with an error rather than a hang.
    let r = tokio::time::timeout(Duration::from_secs(5), client.read(0, &mut [0u8; 16]))
        .await
        .expect("no hang");
    assert!(
        matches!(r, Err(NbdError::Disconnected(_)) | Err(NbdError::Io(_))),
        "{r:?}"
    );

    // SIGTERM let it close the image cleanly.
    run("qemu-img", &["check", "-q", img.to_str().unwrap()]);
}

#[tokio::test]
async fn drop_kills_and_reaps_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "d.raw", "raw", MIB);
    let nbd = export(&img, "raw", true).await;
    let pid = nbd.pid().unwrap();
    let socket = nbd.socket().to_path_buf();
    assert!(alive(pid));
    drop(nbd);
    // Reaped, not a zombie: the /proc entry is gone.
    assert!(!alive(pid), "qemu-nbd {pid} still there after drop");
    assert!(!socket.exists(), "socket directory left behind");
}

#[tokio::test]
async fn several_clients_share_one_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "m.raw", "raw", MIB);
    qemu_io(&img, "raw", &["write -P 0x42 0 64k".into()]);
    let nbd = export(&img, "raw", true).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&nbd, &[]).await);
    }
    for c in &clients {
        let mut buf = [0u8; 512];
        c.read(1024, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0x42));
    }
}
