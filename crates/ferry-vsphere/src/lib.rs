//! Ferry's client of the vSphere API: the vim25 SOAP protocol that vCenter and ESXi both
//! speak (the only one with changed-block tracking). Hand-written for the calls Ferry
//! uses, typed on the way out: sessions (login, logout, the session cookie, renewed once
//! when it expires), the inventory read in one PropertyCollector retrieval over a
//! container view of the whole tree (datacenters, clusters, hosts, datastores, networks,
//! VMs with their hardware, guest information and power state), tasks, snapshots,
//! changed block tracking (QueryChangedDiskAreas), power, guest operations, and datastore
//! file access over HTTPS.
//!
//! Responses are read with namespaces resolved (vcsim writes `XMLSchema-instance:type`
//! where vCenter writes `xsi:type`).

mod cbt;
pub mod datastore;
mod guest;
mod inventory;
mod props;
mod soap;
mod task;
pub mod vcsim;
mod vm;

pub use datastore::{flat_extent, DatastorePath};
pub use guest::GuestAuth;
pub use inventory::{Inventory, Vm, VmDisk, VmNic};
pub use soap::{Client, ClientOptions};

/// What can go wrong talking to vCenter, with the call and what to do.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("{call}: vCenter refused the login for {user}: {msg} (check the user name, e.g. administrator@vsphere.local, and the password)")]
    InvalidLogin {
        call: String,
        user: String,
        msg: String,
    },
    #[error("{call}: the session is not valid ({msg}): log in again")]
    NotAuthenticated { call: String, msg: String },
    #[error("{call}: permission denied: {msg}; give the account the privilege named")]
    NoPermission { call: String, msg: String },
    #[error("{call}: vSphere fault {fault}: {msg}")]
    Fault {
        call: String,
        fault: String,
        msg: String,
    },
    #[error("{call}: cannot reach {url}: {why} (check the URL, DNS and firewall)")]
    Unreachable {
        call: String,
        url: String,
        why: String,
    },
    #[error("{call}: TLS: {why} (set the source's config key ca_bundle to vCenter's CA certificate, a PEM file on the appliance, or \"insecure\": true for a lab)")]
    Tls { call: String, why: String },
    #[error("{call}: HTTP {status}: {body}")]
    Http {
        call: String,
        status: u16,
        body: String,
    },
    #[error("{call}: the answer is not what vim25 describes: {why}")]
    BadAnswer { call: String, why: String },
    #[error("{call}: task {task} did not finish within {secs} s (see the task in vCenter's recent tasks)")]
    TaskTimeout {
        call: String,
        task: String,
        secs: u64,
    },
    #[error(
        "{call}: changed block tracking lost its place ({msg}); the next sync reads the whole disk"
    )]
    ChangeIdInvalid { call: String, msg: String },
    #[error("{call}: {path}: {why}")]
    Datastore {
        call: String,
        path: String,
        why: String,
    },
    #[error("{what}")]
    Invalid { what: String },
}
