//! Extents: contiguous byte ranges with what is known about them.

/// What a range of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; must be read.
    Data,
    /// Known to read as zeros (a hole or an explicit zero range): never read, never sent.
    Zero,
    /// Changed since the checkpoint (from a dirty bitmap).
    Dirty,
    /// Unchanged since the checkpoint.
    Clean,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Merges neighbours of the same kind, so callers see as few extents as possible.
pub(crate) fn coalesce(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents.into_iter().filter(|e| e.length > 0) {
        match out.last_mut() {
            Some(last) if last.kind == e.kind && last.end() == e.offset => last.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_same_kind_neighbours_only() {
        let e = |offset, length, kind| Extent {
            offset,
            length,
            kind,
        };
        let v = coalesce(vec![
            e(0, 10, ExtentKind::Data),
            e(10, 5, ExtentKind::Data),
            e(15, 0, ExtentKind::Zero),
            e(15, 5, ExtentKind::Zero),
            e(20, 5, ExtentKind::Data),
        ]);
        assert_eq!(
            v,
            vec![
                e(0, 15, ExtentKind::Data),
                e(15, 5, ExtentKind::Zero),
                e(20, 5, ExtentKind::Data)
            ]
        );
    }
}
