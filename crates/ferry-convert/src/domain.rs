//! The libvirt domain description virt-v2v reads as its input (`-i libvirtxml`): every
//! disk with its format stated, the NICs with their MACs, VMware's device models (what
//! the guest was installed on).

use crate::{GuestDisk, GuestNic};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// `sda`, `sdb`, … `sdz`, `sdaa`, …
fn scsi_name(i: usize) -> String {
    let mut n = i;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    format!("sd{}", String::from_utf8_lossy(&s))
}

pub(crate) fn libvirt_xml(name: &str, disks: &[GuestDisk], nics: &[GuestNic]) -> String {
    let mut x = format!(
        "<domain type='kvm'>\n  <name>{}</name>\n  <memory unit='MiB'>2048</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64'>hvm</type></os>\n  <devices>\n",
        esc(name)
    );
    for (i, d) in disks.iter().enumerate() {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n      <target dev='{}' bus='scsi'/>\n    </disk>\n",
            d.format,
            esc(&d.path.to_string_lossy()),
            scsi_name(i)
        ));
    }
    for n in nics {
        x.push_str(&format!(
            "    <interface type='bridge'>\n      <mac address='{}'/>\n      <source bridge='ferry'/>\n      <model type='vmxnet3'/>\n    </interface>\n",
            esc(n.source_mac.as_deref().unwrap_or(&n.target_mac))
        ));
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageFormat;

    #[test]
    fn the_domain_states_every_format_and_escapes_paths() {
        let x = libvirt_xml(
            "web<1>",
            &[GuestDisk {
                path: "/t/a'b.qcow2".into(),
                format: ImageFormat::Qcow2,
            }],
            &[GuestNic {
                source_mac: Some("00:50:56:00:00:01".into()),
                source_name: None,
                target_mac: "52:54:00:00:00:01".into(),
            }],
        );
        assert!(x.contains("<driver name='qemu' type='qcow2'/>"), "{x}");
        assert!(x.contains("/t/a&apos;b.qcow2"), "{x}");
        assert!(x.contains("web&lt;1&gt;"));
        assert!(x.contains("00:50:56:00:00:01"));
        roxmltree::Document::parse(&x).unwrap();
        assert_eq!(scsi_name(0), "sda");
        assert_eq!(scsi_name(26), "sdaa");
    }
}
