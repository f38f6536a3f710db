//! Bulk inventory import in RiverMeadow's CSV columns:
//! host, username, password, private_key, agent, domain, move_group_name,
//! target_migration_date, assigned_resource_email, cloud_sizing, tags.
//!
//! Every row is checked first; rows with errors are reported by line number with the
//! reason and the valid rows are imported together in one transaction.

use ferry_model::{validate_date, validate_name, CredentialKind, NewWorkload};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use utoipa::ToSchema;

pub const COLUMNS: &[&str] = &[
    "host",
    "username",
    "password",
    "private_key",
    "agent",
    "domain",
    "move_group_name",
    "target_migration_date",
    "assigned_resource_email",
    "cloud_sizing",
    "tags",
];

/// A row's problem.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq)]
pub struct LineError {
    /// 1-based line in the file (the header is line 1).
    pub line: u64,
    pub message: String,
}

/// A valid row, secrets still in clear (the caller encrypts them).
#[derive(Debug, Clone)]
pub struct ParsedRow {
    pub line: u64,
    pub workload: NewWorkload,
    pub move_group_name: Option<String>,
    pub credential: Option<(CredentialKind, Option<String>, String)>,
}

/// Parses the file. `Err` only when the file as a whole is unusable (header).
pub fn parse(text: &str) -> Result<(Vec<ParsedRow>, Vec<LineError>), LineError> {
    // The reader counts a CRLF line end (Windows tools, browser forms) as two lines: with
    // LF only, the line numbers reported are the editor's.
    let text = text.replace("\r\n", "\n");
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| LineError {
            line: 1,
            message: format!("cannot read the header: {e}"),
        })?
        .clone();
    let mut idx: HashMap<&str, usize> = HashMap::new();
    for (i, h) in headers.iter().enumerate() {
        let h = h.trim_start_matches('\u{feff}');
        match COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(h)) {
            Some(c) => {
                if idx.insert(c, i).is_some() {
                    return Err(LineError {
                        line: 1,
                        message: format!("column '{c}' appears twice"),
                    });
                }
            }
            None => {
                return Err(LineError {
                    line: 1,
                    message: format!(
                        "unknown column '{h}'; the columns are: {}",
                        COLUMNS.join(", ")
                    ),
                })
            }
        }
    }
    if !idx.contains_key("host") {
        return Err(LineError {
            line: 1,
            message: "the header has no 'host' column".into(),
        });
    }
    let mut rows = vec![];
    let mut errors = vec![];
    let mut seen: HashMap<String, u64> = HashMap::new();
    for rec in rdr.records() {
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                errors.push(LineError {
                    line,
                    message: format!("unreadable row: {e}"),
                });
                continue;
            }
        };
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        if rec.iter().all(|f| f.is_empty()) {
            continue;
        }
        let get = |c: &str| -> Option<String> {
            idx.get(c)
                .and_then(|i| rec.get(*i))
                .map(str::to_string)
                .filter(|s| !s.is_empty())
        };
        let mut problems = vec![];
        if rec.len() > headers.len() {
            problems.push(format!(
                "{} fields, but the header has {}",
                rec.len(),
                headers.len()
            ));
        }
        let host = get("host").unwrap_or_default();
        if let Err(m) = validate_name(&host) {
            problems.push(format!("host {m}"));
        } else if let Some(first) = seen.get(&host) {
            problems.push(format!("host '{host}' is already on line {first}"));
        }
        let agent = match get("agent").map(|s| s.to_ascii_lowercase()) {
            None => false,
            Some(s) if ["true", "yes", "y", "1"].contains(&s.as_str()) => true,
            Some(s) if ["false", "no", "n", "0"].contains(&s.as_str()) => false,
            Some(s) => {
                problems.push(format!("agent '{s}' is not true/false"));
                false
            }
        };
        let date = get("target_migration_date").and_then(|d| match normalize_date(&d) {
            Ok(d) => Some(d),
            Err(m) => {
                problems.push(format!("target_migration_date {m}"));
                None
            }
        });
        let email = get("assigned_resource_email");
        if let Some(e) = &email {
            let ok = e
                .split_once('@')
                .is_some_and(|(a, b)| !a.is_empty() && b.contains('.'));
            if !ok {
                problems.push(format!(
                    "assigned_resource_email '{e}' is not an email address"
                ));
            }
        }
        let username = get("username");
        let credential = match (get("password"), get("private_key")) {
            (Some(_), Some(_)) => {
                problems.push("give either password or private_key, not both".into());
                None
            }
            (Some(p), None) => Some((CredentialKind::Password, username.clone(), p)),
            (None, Some(k)) => Some((CredentialKind::PrivateKey, username.clone(), k)),
            (None, None) => None,
        };
        if credential.is_some() && username.is_none() {
            problems.push("a password or private_key needs a username".into());
        }
        let group = get("move_group_name");
        if let Some(g) = &group {
            if let Err(m) = validate_name(g) {
                problems.push(format!("move_group_name {m}"));
            }
        }
        if !problems.is_empty() {
            errors.push(LineError {
                line,
                message: problems.join("; "),
            });
            continue;
        }
        seen.insert(host.clone(), line);
        let tags: Vec<String> = get("tags")
            .map(|t| {
                let mut uniq = HashSet::new();
                t.split([';', ','])
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty() && uniq.insert(s.clone()))
                    .collect()
            })
            .unwrap_or_default();
        rows.push(ParsedRow {
            line,
            workload: NewWorkload {
                name: host,
                agent,
                domain: get("domain"),
                assigned_email: email,
                cloud_sizing: get("cloud_sizing"),
                target_migration_date: date,
                tags,
                ..Default::default()
            },
            move_group_name: group,
            credential,
        });
    }
    Ok((rows, errors))
}

/// Accepts `YYYY-MM-DD` and `MM/DD/YYYY`; returns `YYYY-MM-DD`.
fn normalize_date(s: &str) -> Result<String, String> {
    let iso = if let [m, d, y] = s.split('/').collect::<Vec<_>>()[..] {
        format!("{y:0>4}-{m:0>2}-{d:0>2}")
    } else {
        s.to_string()
    };
    validate_date(&iso).map_err(|_| format!("'{s}' is not a date (YYYY-MM-DD or MM/DD/YYYY)"))?;
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_bad_rows_by_line() {
        let text = "host,username,password,agent,target_migration_date,tags\n\
                    web-1,root,pw,true,2026-12-01,a;b\n\
                    ,root,pw,true,,\n\
                    web-2,,pw,maybe,2026-02-30,\n\
                    web-1,root,pw,false,12/24/2026,\n\
                    db-1,,,,12/24/2026,x\n";
        let (rows, errors) = parse(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].workload.tags, vec!["a", "b"]);
        assert_eq!(
            rows[1].workload.target_migration_date.as_deref(),
            Some("2026-12-24")
        );
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        // The same file with CRLF line ends: the same lines.
        let (_, crlf) = parse(&text.replace('\n', "\r\n")).unwrap();
        let lines: Vec<u64> = crlf.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        assert!(
            errors[1].message.contains("agent 'maybe'"),
            "{:?}",
            errors[1]
        );
        assert!(
            errors[1].message.contains("needs a username"),
            "{:?}",
            errors[1]
        );
        assert!(
            errors[2].message.contains("already on line 2"),
            "{:?}",
            errors[2]
        );
    }

    #[test]
    fn unknown_column_is_a_file_error() {
        let e = parse("host,colour\nx,red\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("unknown column 'colour'"));
    }
}
