//! Small helpers shared by the subcommands.

use anyhow::Result;

/// The async runtime for commands that need one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Parses sizes such as `4096`, `64K`, `64KiB`, `4G`, `1.5GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 4GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use K, M, G or T)"
            ))
        }
    };
    Ok((n * mult as f64) as u64)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// An error and its causes on one line, each cause once: library errors often already
/// quote their source in their own message.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Writes `(offset, bytes)` pairs into an image through a writable qemu-nbd, so the
/// image's enabled dirty bitmaps record them as they would a running guest's writes.
pub async fn write_via_qemu_nbd(
    image: &std::path::Path,
    format: &str,
    writes: &[(u64, Vec<u8>)],
) -> Result<()> {
    let server = ferry_nbd::QemuNbd::start(
        image,
        ferry_nbd::QemuNbdOptions {
            read_only: false,
            ..ferry_nbd::QemuNbdOptions::new(format)
        },
    )
    .await?;
    let client = ferry_nbd::NbdClient::connect(&server.target(), Default::default()).await?;
    for (off, data) in writes {
        client.write(*off, data).await?;
    }
    client.flush().await?;
    client.disconnect().await?;
    server.stop().await?;
    Ok(())
}

/// `s` single-quoted for a POSIX shell.
pub fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3X").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
