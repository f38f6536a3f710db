//! Changed block tracking: which areas of a disk changed between the snapshot a change id
//! was taken at and a later snapshot.

use crate::soap::{child, esc, parse, returnval, this, Client};
use crate::VsphereError;

impl Client {
    /// The areas `(offset, length)` of disk `device_key` that changed between the point
    /// `change_id` names and `snapshot`; `"*"` asks for every allocated area. An id vCenter
    /// no longer knows (CBT was reset: the VM moved, the disk was resized, tracking was
    /// turned off and on) is [`VsphereError::ChangeIdInvalid`]: read the whole disk.
    pub async fn changed_disk_areas(
        &self,
        vm: &str,
        snapshot: &str,
        device_key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<Vec<(u64, u64)>, VsphereError> {
        const CALL: &str = "QueryChangedDiskAreas";
        let mut areas = vec![];
        let mut start = 0u64;
        // vCenter answers a window at a time; ask again from where it stopped.
        while start < capacity {
            let body = format!(
                "{}<snapshot type=\"VirtualMachineSnapshot\">{}</snapshot><deviceKey>{device_key}</deviceKey><startOffset>{start}</startOffset><changeId>{}</changeId>",
                this("VirtualMachine", vm),
                esc(snapshot),
                esc(change_id)
            );
            let out = match self.call(CALL, &body).await {
                Err(VsphereError::Fault { call, fault, msg })
                    if change_id != "*"
                        && (fault == "FileFault"
                            || fault == "InvalidArgument"
                            || msg.to_lowercase().contains("changeid")) =>
                {
                    return Err(VsphereError::ChangeIdInvalid {
                        call,
                        msg: format!("{fault}: {msg}"),
                    })
                }
                r => r?,
            };
            let doc = parse(CALL, &out)?;
            let rv = returnval(&doc, CALL)?;
            let num = |n: Option<roxmltree::Node>| -> Result<u64, VsphereError> {
                n.and_then(|n| n.text())
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| VsphereError::BadAnswer {
                        call: CALL.into(),
                        why: "a DiskChangeInfo without startOffset/length".into(),
                    })
            };
            let window_start = num(child(rv, "startOffset"))?;
            let window_len = num(child(rv, "length"))?;
            for a in rv
                .children()
                .filter(|c| c.is_element() && c.tag_name().name() == "changedArea")
            {
                let (s, l) = (num(child(a, "start"))?, num(child(a, "length"))?);
                if s.checked_add(l).is_none_or(|end| end > capacity) {
                    return Err(VsphereError::BadAnswer {
                        call: CALL.into(),
                        why: format!(
                            "changed area {s}+{l} lies beyond the disk's {capacity} bytes"
                        ),
                    });
                }
                areas.push((s, l));
            }
            let next = window_start.saturating_add(window_len);
            if next <= start {
                break;
            }
            start = next;
        }
        Ok(areas)
    }
}
