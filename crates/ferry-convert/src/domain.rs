//! The libvirt domain description virt-v2v reads as its input (`-i libvirtxml`): every
//! disk with its format stated, the NICs with their MACs, VMware's device models (what
//! the guest was installed on), and the inspector's answer.

use crate::{GuestDisk, GuestNic, Inspection};

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

/// The inspector's `-O` document: `<v2v-inspection><operatingsystem>…`.
pub(crate) fn parse_inspection(xml: &str) -> Result<Inspection, String> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| format!("its inspection document is not XML: {e}"))?;
    let mut i = Inspection::default();
    let text = |n: roxmltree::Node| {
        n.text()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    let os = doc
        .descendants()
        .find(|n| n.has_tag_name("operatingsystem"))
        .ok_or("its inspection document names no operating system")?;
    for c in os.children().filter(|c| c.is_element()) {
        let v = text(c);
        match c.tag_name().name() {
            "name" => i.os_type = v,
            "distro" => i.distro = v,
            "product_name" => i.product_name = v,
            "osinfo" => i.osinfo = v,
            "major_version" => i.major_version = v,
            "minor_version" => i.minor_version = v,
            "arch" => i.arch = v,
            "package_format" => i.package_format = v,
            _ => {}
        }
    }
    if let Some(f) = doc.descendants().find(|n| n.has_tag_name("firmware")) {
        i.firmware = f.attribute("type").map(str::to_string).or_else(|| text(f));
    }
    if let Some(b) = doc.descendants().find(|n| n.has_tag_name("bootloader")) {
        i.bootloader = b.attribute("type").map(str::to_string).or_else(|| text(b));
    }
    Ok(i)
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

    #[test]
    fn inspection_fields() {
        let x = "<v2v-inspection><operatingsystem><name>linux</name><distro>debian</distro><osinfo>debian12</osinfo><arch>x86_64</arch><major_version>12</major_version><product_name>Debian GNU/Linux 12 (bookworm)</product_name></operatingsystem><firmware type='bios'/></v2v-inspection>";
        let i = parse_inspection(x).unwrap();
        assert_eq!(i.distro.as_deref(), Some("debian"));
        assert_eq!(i.firmware.as_deref(), Some("bios"));
        assert_eq!(i.summary(), "Debian GNU/Linux 12 (bookworm), x86_64, bios");
        assert!(parse_inspection("<x/>").is_err());
        assert!(parse_inspection("not xml").is_err());
    }
}
