//! Path templates (`/api/instances/{id}`) and matching request paths against them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Param(String),
}

#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) template: String,
    segments: Vec<Vec<Part>>,
}

impl Route {
    pub(crate) fn parse(template: &str) -> Route {
        let segments = split(template)
            .map(|seg| {
                let mut parts = Vec::new();
                let mut rest = seg;
                while let Some(open) = rest.find('{') {
                    let Some(close) = rest[open..].find('}').map(|c| c + open) else {
                        break;
                    };
                    if open > 0 {
                        parts.push(Part::Lit(rest[..open].to_string()));
                    }
                    parts.push(Part::Param(rest[open + 1..close].to_string()));
                    rest = &rest[close + 1..];
                }
                if !rest.is_empty() || parts.is_empty() {
                    parts.push(Part::Lit(rest.to_string()));
                }
                parts
            })
            .collect();
        Route {
            template: template.to_string(),
            segments,
        }
    }

    /// Raw (still percent-encoded) parameter values when `path` fits the template.
    pub(crate) fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let segs: Vec<&str> = split(path).collect();
        if segs.len() != self.segments.len() {
            return None;
        }
        let mut out = BTreeMap::new();
        for (parts, seg) in self.segments.iter().zip(segs) {
            if !match_segment(parts, seg, &mut out) {
                return None;
            }
        }
        Some(out)
    }

    /// Per segment: 2 fully literal, 1 mixed, 0 a lone parameter. Comparing these
    /// left to right makes `/api/instances/stats` beat `/api/instances/{id}`.
    fn specificity(&self) -> Vec<u8> {
        self.segments
            .iter()
            .map(|parts| match parts.as_slice() {
                [Part::Param(_)] => 0,
                p if p.iter().all(|x| matches!(x, Part::Lit(_))) => 2,
                _ => 1,
            })
            .collect()
    }

    pub(crate) fn more_specific(&self, other: &Route) -> Ordering {
        self.specificity().cmp(&other.specificity())
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

/// Parameters match at least one character and never a `/`; when two parameters
/// touch (`{id}{format}`) the first takes the shortest prefix that lets the rest match.
fn match_segment(parts: &[Part], seg: &str, out: &mut BTreeMap<String, String>) -> bool {
    match parts.split_first() {
        None => seg.is_empty(),
        Some((Part::Lit(l), rest)) => seg
            .strip_prefix(l.as_str())
            .is_some_and(|tail| match_segment(rest, tail, out)),
        Some((Part::Param(name), rest)) => {
            for end in seg.char_indices().map(|(i, c)| i + c.len_utf8()) {
                let mut trial = BTreeMap::new();
                if match_segment(rest, &seg[end..], &mut trial) {
                    out.insert(name.clone(), seg[..end].to_string());
                    out.extend(trial);
                    return true;
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_params() {
        let r = Route::parse("/api/instances/{id}");
        assert_eq!(r.matches("/api/instances/12").unwrap()["id"], "12");
        assert!(r.matches("/api/instances").is_none());
        assert!(r.matches("/api/instances/12/x").is_none());
        assert!(r.matches("/api/instances/").is_none());
        let lit = Route::parse("/api/instances/stats");
        assert_eq!(lit.more_specific(&r), Ordering::Greater);
    }

    #[test]
    fn mixed_segments() {
        let r = Route::parse("/api/reports/download/{id}{format}");
        let m = r.matches("/api/reports/download/12.csv").unwrap();
        assert_eq!(m["id"], "1");
        assert_eq!(m["format"], "2.csv");
        let r = Route::parse("/a/files{filepath}");
        assert_eq!(r.matches("/a/files.txt").unwrap()["filepath"], ".txt");
        assert!(r.matches("/a/files").is_none());
    }
}
