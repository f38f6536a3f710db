//! The vSphere client against vcsim (govmomi's simulator, built by
//! scripts/testbed/build-vcsim.sh from Debian's golang-github-vmware-govmomi-dev), served
//! with a certificate from a Ferry CA: login, discovery of the default inventory compared
//! with what the simulator itself reports, and the errors of a wrong password, an
//! unknown CA and a closed session.

use ferry_vsphere::vcsim::Vcsim;
use ferry_vsphere::{Client, ClientOptions, VsphereError};
use std::path::Path;

fn start(pki: &Path) -> Option<Vcsim> {
    let bin = match Vcsim::build() {
        Ok(b) => b,
        Err(e) if std::env::var("FERRY_TEST_VCSIM").is_ok() => panic!("building vcsim failed: {e}"),
        Err(e) => {
            eprintln!("SKIP: vcsim cannot be built here: {e}");
            return None;
        }
    };
    let ca = ferry_pki::CaDir::new(pki);
    ca.init("ferry-test-ca").unwrap();
    ca.issue("vcsim", &["127.0.0.1".to_string()]).unwrap();
    // vcsim reads its key without Ferry's passphrase.
    let key = pki.join("vcsim-plain.key");
    ca.export_key("vcsim", &key).unwrap();
    Some(Vcsim::start(&bin, &ca.cert_path("vcsim"), &key, pki).unwrap())
}

#[tokio::test]
async fn discovery_matches_the_simulator_and_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sim) = start(dir.path()) else { return };
    let url = sim.info["url"].as_str().unwrap();
    let (user, pass) = (
        sim.info["username"].as_str().unwrap(),
        sim.info["password"].as_str().unwrap(),
    );
    let mut opts = ClientOptions::new(url);
    opts.ca_bundle = Some(ferry_pki::CaDir::new(dir.path()).ca_cert_path());

    // Unknown CA.
    let e = Client::connect(&ClientOptions::new(url)).await.unwrap_err();
    assert!(matches!(e, VsphereError::Tls { .. }), "{e}");

    let c = Client::connect(&opts).await.unwrap();
    assert!(c.about().contains("vCenter"), "{}", c.about());
    let e = c.login(user, "wrong").await.unwrap_err();
    assert!(matches!(e, VsphereError::InvalidLogin { .. }), "{e}");
    assert!(e.to_string().contains("check the user name"), "{e}");
    // (vcsim 0.24 answers property retrievals without a session, so "not authenticated"
    // is covered by the fault parsing's unit test.)
    c.login(user, pass).await.unwrap();
    let inv = c.inventory().await.unwrap();
    let n = |k: &str| sim.info[k].as_u64().unwrap() as usize;
    assert_eq!(inv.datacenters.len(), n("datacenters"));
    assert_eq!(inv.clusters.len(), n("clusters"));
    assert_eq!(inv.hosts.len(), n("hosts"));
    assert_eq!(inv.datastores.len(), n("datastores"));
    assert_eq!(inv.networks.len(), n("networks"), "{:?}", inv.networks);
    assert_eq!(inv.vms.len(), n("vms"));
    for vm in &inv.vms {
        assert!(vm.cpus >= 1 && vm.memory_mib >= 1, "{vm:?}");
        // Each VM's disks and NICs, as the simulator holds them.
        let held = &sim.info["vm_devices"][&vm.name];
        assert_eq!(
            vm.disks.len() as u64,
            held["disks"].as_u64().unwrap(),
            "{vm:?}"
        );
        assert_eq!(
            vm.nics.len() as u64,
            held["nics"].as_u64().unwrap(),
            "{vm:?}"
        );
        assert!(!vm.disks.is_empty(), "{} has no disk", vm.name);
        assert!(
            vm.disks
                .iter()
                .all(|d| d.capacity_bytes > 0 && d.file.is_some()),
            "{vm:?}"
        );
        assert!(!vm.nics.is_empty(), "{} has no NIC", vm.name);
        for nic in &vm.nics {
            let net = nic.network.as_deref().unwrap_or("");
            assert!(
                inv.networks.iter().any(|n| n == net),
                "{}: NIC on unknown network {net:?}",
                vm.name
            );
            assert!(nic.mac.is_some());
        }
    }
    eprintln!(
        "vcsim: {} VMs, {} hosts, {} datastores, {} networks; {} disks, {} NICs",
        inv.vms.len(),
        inv.hosts.len(),
        inv.datastores.len(),
        inv.networks.len(),
        inv.vms.iter().map(|v| v.disks.len()).sum::<usize>(),
        inv.vms.iter().map(|v| v.nics.len()).sum::<usize>()
    );
    c.logout().await.unwrap();
}
