//! Datastore file access over HTTPS (`/folder/PATH?dcPath=DC&dsName=DS`, with the session
//! cookie): how Ferry reads a snapshot's disk when VDDK is not installed. A VMFS disk is a
//! small text descriptor beside its flat extent (`disk-flat.vmdk`) holding the raw bytes;
//! the extent is what is read, with Range requests.

use crate::soap::Client;
use crate::VsphereError;

/// `[datastore] dir/file.vmdk`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatastorePath {
    pub datastore: String,
    pub path: String,
}

impl DatastorePath {
    pub fn parse(s: &str) -> Result<DatastorePath, VsphereError> {
        let bad = || VsphereError::Invalid {
            what: format!("{s:?} is not a datastore path like \"[datastore1] vm/vm.vmdk\""),
        };
        let rest = s.trim().strip_prefix('[').ok_or_else(bad)?;
        let (ds, path) = rest.split_once(']').ok_or_else(bad)?;
        if ds.is_empty() {
            return Err(bad());
        }
        Ok(DatastorePath {
            datastore: ds.to_string(),
            path: path.trim().to_string(),
        })
    }

    /// A file in the same directory.
    pub fn sibling(&self, name: &str) -> DatastorePath {
        let dir = self.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        DatastorePath {
            datastore: self.datastore.clone(),
            path: if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            },
        }
    }
}

impl std::fmt::Display for DatastorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.datastore, self.path)
    }
}

/// The flat extent a VMFS descriptor points at, or why Ferry cannot read it as a file.
pub fn flat_extent(descriptor: &str) -> Result<String, String> {
    if !descriptor.starts_with("# Disk DescriptorFile") {
        return Err("the disk is not a text descriptor with a flat extent (a sparse or stream-optimised VMDK): read it through VDDK".into());
    }
    let mut extents = vec![];
    for line in descriptor.lines().map(str::trim) {
        let mut it = line.splitn(4, ' ');
        let (Some(access), Some(_sectors), Some(kind), Some(file)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
            continue;
        }
        let file = file.trim().trim_matches('"').to_string();
        match kind {
            "VMFS" | "FLAT" => extents.push(file),
            other => {
                return Err(format!(
                    "its extent {file:?} is of type {other} (a delta or sparse disk): read it through VDDK, or consolidate the VM's snapshots"
                ))
            }
        }
    }
    match extents.len() {
        1 => Ok(extents.remove(0)),
        0 => Err("the descriptor names no extent".into()),
        n => Err(format!("the disk has {n} extents: read it through VDDK")),
    }
}

impl Client {
    /// The HTTPS URL of a datastore file.
    pub fn datastore_url(
        &self,
        datacenter: &str,
        file: &DatastorePath,
    ) -> Result<String, VsphereError> {
        let mut u = reqwest::Url::parse(self.base_url()).map_err(|e| VsphereError::Invalid {
            what: format!("vCenter URL {}: {e}", self.base_url()),
        })?;
        {
            let mut seg = u.path_segments_mut().map_err(|_| VsphereError::Invalid {
                what: format!("vCenter URL {} cannot take a path", self.base_url()),
            })?;
            seg.pop_if_empty().push("folder");
            for s in file.path.split('/').filter(|s| !s.is_empty()) {
                seg.push(s);
            }
        }
        u.query_pairs_mut()
            .append_pair("dcPath", datacenter)
            .append_pair("dsName", &file.datastore);
        Ok(u.to_string())
    }

    /// Reads a small datastore file (a descriptor) whole, at most `max` bytes.
    pub async fn datastore_read(
        &self,
        datacenter: &str,
        file: &DatastorePath,
        max: usize,
    ) -> Result<Vec<u8>, VsphereError> {
        const CALL: &str = "datastore GET";
        let url = self.datastore_url(datacenter, file)?;
        let mut req = self.http.get(&url);
        if let Some(c) = self.session_cookie() {
            req = req.header("Cookie", c);
        }
        let err = |why: String| VsphereError::Datastore {
            call: CALL.into(),
            path: file.to_string(),
            why,
        };
        let r = req.send().await.map_err(|e| VsphereError::Unreachable {
            call: CALL.into(),
            url: url.clone(),
            why: e.to_string(),
        })?;
        match r.status().as_u16() {
            200 => {}
            401 | 403 => {
                return Err(err(format!(
                    "HTTP {}: the account may not browse the datastore (privilege Datastore.Browse / Datastore.FileManagement)",
                    r.status()
                )))
            }
            404 => return Err(err("no such file on the datastore".into())),
            s => return Err(err(format!("HTTP {s}"))),
        }
        let body = r.bytes().await.map_err(|e| err(e.to_string()))?;
        if body.len() > max {
            return Err(err(format!(
                "{} bytes: too big for a descriptor (a monolithic sparse disk?): read it through VDDK",
                body.len()
            )));
        }
        Ok(body.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths() {
        let p = DatastorePath::parse("[LocalDS_0] DC0_H0_VM0/disk1.vmdk").unwrap();
        assert_eq!(p.datastore, "LocalDS_0");
        assert_eq!(p.path, "DC0_H0_VM0/disk1.vmdk");
        assert_eq!(
            p.sibling("disk1-flat.vmdk").to_string(),
            "[LocalDS_0] DC0_H0_VM0/disk1-flat.vmdk"
        );
        assert!(DatastorePath::parse("disk.vmdk").is_err());
        assert!(DatastorePath::parse("[] x").is_err());
    }

    #[test]
    fn descriptors() {
        let vmfs = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 131072 VMFS \"db01-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\nddb.adapterType = \"lsilogic\"\n";
        assert_eq!(flat_extent(vmfs).unwrap(), "db01-flat.vmdk");
        let delta = vmfs.replace("VMFS \"db01-flat", "VMFSSPARSE \"db01-000001-delta");
        assert!(flat_extent(&delta).unwrap_err().contains("VDDK"));
        assert!(flat_extent("KDMV\u{1}binary").unwrap_err().contains("VDDK"));
    }
}
