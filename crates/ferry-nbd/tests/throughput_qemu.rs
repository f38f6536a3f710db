//! Rough read/write throughput through qemu-nbd, to spot gross regressions by hand:
//! `cargo test --release -p ferry-nbd --test throughput_qemu -- --ignored --nocapture`.

mod common;

use std::time::Instant;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn read_and_write_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * MIB;
    let img = create_image(dir.path(), "t.raw", "raw", size);
    let nbd = export(&img, "raw", false).await;
    let client = connect(&nbd, &[]).await;
    let piece = 2 * MIB as usize;

    let data = noise(piece, 3);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let client = client.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut off = w * piece as u64;
            while off < size {
                client.write(off, &data).await.unwrap();
                off += 8 * piece as u64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    client.flush().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("write: {:.0} MiB/s", size as f64 / MIB as f64 / secs);

    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let client = client.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; piece];
            let mut off = w * piece as u64;
            while off < size {
                client.read(off, &mut buf).await.unwrap();
                assert!(buf == data);
                off += 8 * piece as u64;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "read (with compare): {:.0} MiB/s",
        size as f64 / MIB as f64 / secs
    );
}
