//! A service has no home directory: with a fallback passphrase file named, keys are still
//! written encrypted and read back, and the file is created private. Runs itself as a
//! child process, whose environment has no home and no passphrase variables.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

const CHILD: &str = "FERRY_PKI_TEST_CHILD_DIR";

#[test]
fn keys_are_sealed_with_the_fallback_file_when_there_is_no_home() {
    if let Some(dir) = std::env::var_os(CHILD) {
        let dir = PathBuf::from(dir);
        ferry_pki::keyfile::set_fallback_passphrase_file(dir.join("pki-passphrase"));
        let ca = ferry_pki::CaDir::new(dir.join("pki"));
        ca.init("test").unwrap();
        ca.issue("worker", &["worker".to_string()]).unwrap();
        ca.identity("worker").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "keys_are_sealed_with_the_fallback_file_when_there_is_no_home",
            "--nocapture",
        ])
        .env_remove("HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove(ferry_pki::keyfile::PASSPHRASE_ENV)
        .env_remove(ferry_pki::keyfile::PASSPHRASE_FILE_ENV)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pass = dir.path().join("pki-passphrase");
    let mode = std::fs::metadata(&pass).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let key =
        std::fs::read_to_string(ferry_pki::CaDir::new(dir.path().join("pki")).key_path("worker"))
            .unwrap();
    assert!(key.contains("ENCRYPTED PRIVATE KEY"), "{key}");
}
