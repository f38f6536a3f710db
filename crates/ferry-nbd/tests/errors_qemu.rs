//! Error reporting: missing sockets, unknown exports, failing launches.

mod common;

use common::*;
use ferry_nbd::{ConnectOptions, NbdAddr, NbdClient, NbdError, NbdTarget, QemuNbd, QemuNbdOptions};

#[tokio::test]
async fn missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens.sock");
    let target = NbdTarget {
        addr: NbdAddr::Unix(sock.clone()),
        export: String::new(),
    };
    let err = NbdClient::connect(&target, ConnectOptions::default())
        .await
        .expect_err("must fail");
    assert!(matches!(err, NbdError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(sock.to_str().unwrap()), "{err}");
}

#[tokio::test]
async fn unknown_export_carries_the_server_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "e.raw", "raw", MIB);
    let nbd = export(&img, "raw", true).await;
    let mut target = nbd.target();
    target.export = "no-such-export".into();
    let err = NbdClient::connect(&target, ConnectOptions::default())
        .await
        .expect_err("must fail");
    match &err {
        NbdError::Refused {
            option,
            reply,
            message,
        } => {
            assert_eq!(*option, "NBD_OPT_GO");
            assert_eq!(reply, "NBD_REP_ERR_UNKNOWN");
            assert!(message.contains("no-such-export"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-export"), "{err}");

    // The same server still serves the right export.
    let client = NbdClient::connect(&nbd.target(), ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(client.size(), MIB);
}

#[tokio::test]
async fn target_uri_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "t.raw", "raw", MIB);
    let nbd = export(&img, "raw", true).await;
    let uri = nbd.target().to_string();
    assert!(uri.starts_with("nbd+unix:///?socket="), "{uri}");
    let target = NbdTarget::parse_uri(&uri).unwrap();
    assert_eq!(target, nbd.target());
    NbdClient::connect(&target, ConnectOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn launch_failures_include_qemu_output() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    // No format stated: refused before anything runs, naming the image.
    let err = QemuNbd::start(&missing, QemuNbdOptions::new(""))
        .await
        .expect_err("must fail");
    assert!(matches!(err, NbdError::Launch(_)), "{err:?}");
    assert!(err.to_string().contains("missing.qcow2"), "{err}");
    assert!(err.to_string().contains("no image format stated"), "{err}");

    // qemu-nbd itself fails and its stderr is in the error.
    let err = QemuNbd::start(&missing, QemuNbdOptions::new("qcow2"))
        .await
        .expect_err("must fail");
    let text = err.to_string();
    assert!(
        text.contains("exited") && text.contains("missing.qcow2"),
        "{text}"
    );

    // A bitmap that does not exist.
    let img = create_image(dir.path(), "nobm.qcow2", "qcow2", MIB);
    let err = QemuNbd::start(
        &img,
        QemuNbdOptions {
            read_only: true,
            bitmap: Some("nope".into()),
            ..QemuNbdOptions::new("qcow2")
        },
    )
    .await
    .expect_err("must fail");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn connects_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = create_image(dir.path(), "tcp.raw", "raw", MIB);
    qemu_io(&img, "raw", &["write -P 0x7e 4k 4k".into()]);
    // A port the kernel just handed out is very likely still free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--read-only",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "disk 1",
        ])
        .arg(&img)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target = NbdTarget::parse_uri(&format!("nbd://127.0.0.1:{port}/disk%201")).unwrap();
    let mut client = None;
    for _ in 0..250 {
        match NbdClient::connect(&target, ConnectOptions::default()).await {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(NbdError::Connect { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let client = client.expect("qemu-nbd listening on TCP");
    let mut buf = [0u8; 8192];
    client.read(0, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x7e));
    client.disconnect().await.unwrap();
    child.kill().await.unwrap();
}
