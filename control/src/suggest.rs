//! `segmeshctl suggest`: least-privilege Allow policies from the flows discovery mode let
//! through. Each discovered flow was allowed at one enforcing end (the reporter, which
//! says whether it saw the flow outgoing or incoming); the suggestion allows exactly
//! that end's direction, between the stable tags of the PUs (never addresses; an external
//! peer by its external network), with the ports seen. An Outgoing and an Incoming
//! suggestion with the same namespace, ends and ports become one Bidirectional policy.

use std::collections::{BTreeMap, BTreeSet};

use segmesh_policy::NamespacePath;

use crate::store::{PuRecord, StoredFlow};

/// Tag keys that name one instance rather than a role (Kubernetes adds them to pods):
/// never used in a suggestion.
pub const UNSTABLE_KEYS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suggestion {
    pub policies: Vec<Suggested>,
    /// Discovered flows no policy could be written for, and why.
    pub skipped: Vec<String>,
    /// Discovered flows considered.
    pub flows: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggested {
    pub name: String,
    pub namespace: String,
    /// `Outgoing`, `Incoming` or `Bidirectional`.
    pub mode: &'static str,
    pub subject: Vec<String>,
    pub object: Vec<String>,
    /// The ports seen, with their protocol (`tcp/N`, `udp/N`).
    pub ports: BTreeSet<segmesh_policy::FlowPort>,
    /// How many discovered flows it covers.
    pub flows: usize,
}

/// The tags of a PU that describe its role.
fn stable_tags(pu: &PuRecord) -> Vec<String> {
    let mut tags: Vec<String> = pu
        .tags
        .iter()
        .filter(|t| !t.starts_with('$'))
        .filter(|t| {
            let key = t.split_once('=').map_or(t.as_str(), |(k, _)| k);
            !UNSTABLE_KEYS.contains(&key)
        })
        .cloned()
        .collect();
    tags.sort();
    tags
}

/// A selector term for one end of a flow, or why there is none.
fn end_selector(
    end: &segmesh_api::FlowEndpoint,
    pus: &BTreeMap<String, &PuRecord>,
) -> Result<Vec<String>, String> {
    if let Some(pu) = &end.pu {
        let rec = pus
            .get(pu)
            .ok_or_else(|| format!("{pu} is no longer registered"))?;
        let tags = stable_tags(rec);
        return if tags.is_empty() {
            Err(format!(
                "{pu} has no tags to select it by (only its name, which changes with each instance)"
            ))
        } else {
            Ok(tags)
        };
    }
    if let Some(ext) = end.external.first() {
        let name = ext.rsplit_once(':').map_or(ext.as_str(), |(_, n)| n);
        return Ok(vec![format!("ext:name={name}")]);
    }
    Err(format!(
        "{} is in no external network: define one to allow it by name",
        end.ip
    ))
}

fn slug(tags: &[String]) -> String {
    let t = tags
        .iter()
        .map(|t| t.rsplit_once('=').map_or(t.as_str(), |(_, v)| v))
        .collect::<Vec<_>>()
        .join("-");
    let s: String = t
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').to_owned()
}

/// Suggests policies for the discovered flows whose enforcing PU lives in `within` (or
/// below).
pub fn suggest(within: &NamespacePath, flows: &[StoredFlow], pus: &[PuRecord]) -> Suggestion {
    let by_name: BTreeMap<String, &PuRecord> = pus
        .iter()
        .map(|p| (format!("{}:{}", p.namespace, p.name), p))
        .collect();
    // (namespace, subject, object) → (mode bits, ports, flows); bit 1 outgoing, 2 incoming.
    type Key = (String, Vec<String>, Vec<String>);
    let mut found: BTreeMap<Key, (u8, BTreeSet<segmesh_policy::FlowPort>, usize)> = BTreeMap::new();
    let mut out = Suggestion::default();
    let mut skipped = BTreeSet::new();
    for f in flows {
        let r = &f.record;
        if r.verdict != "allow" || r.reason != segmesh_api::FlowReason::Discovered {
            continue;
        }
        let Some((ns, _)) = f.reporter.rsplit_once(':') else {
            continue;
        };
        let Ok(ns) = ns.parse::<NamespacePath>() else {
            continue;
        };
        if !within.is_ancestor_or_self(&ns) {
            continue;
        }
        out.flows += 1;
        let (subject, object) = match (
            end_selector(&r.source, &by_name),
            end_selector(&r.destination, &by_name),
        ) {
            (Ok(s), Ok(o)) => (s, o),
            (Err(e), _) | (_, Err(e)) => {
                skipped.insert(e);
                continue;
            }
        };
        let bit = if r.direction == "outgoing" { 1 } else { 2 };
        let e = found
            .entry((ns.to_string(), subject, object))
            .or_insert((0, BTreeSet::new(), 0));
        e.0 |= bit;
        let port = r.destination.port;
        e.1.insert(match r.protocol.as_deref() {
            Some("udp") => segmesh_policy::FlowPort::udp(port),
            _ => segmesh_policy::FlowPort::tcp(port),
        });
        e.2 += 1;
    }
    let mut names = BTreeSet::new();
    for ((namespace, subject, object), (bits, ports, n)) in found {
        let mode = match bits {
            1 => "Outgoing",
            2 => "Incoming",
            _ => "Bidirectional",
        };
        let base = format!("allow-{}-to-{}", slug(&subject), slug(&object));
        let mut name = base.clone();
        let mut k = 2;
        while !names.insert((namespace.clone(), name.clone())) {
            name = format!("{base}-{k}");
            k += 1;
        }
        out.policies.push(Suggested {
            name,
            namespace,
            mode,
            subject,
            object,
            ports,
            flows: n,
        });
    }
    out.skipped = skipped.into_iter().collect();
    out
}

fn quoted(tags: &[String]) -> String {
    tags.iter()
        .map(|t| format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The suggestion as policy YAML, ready for `segmeshctl apply -f`.
pub fn to_yaml(s: &Suggestion, header: &str) -> String {
    let mut y = format!("# {header}\n");
    for p in &s.policies {
        let ports: Vec<String> = p.ports.iter().map(|p| p.to_string()).collect();
        y.push_str(&format!(
            "---\n# {} discovered flow{}\nkind: NetworkPolicy\nname: {}\nnamespace: {}\naction: Allow\nmode: {}\nsubject: [[{}]]\nobject: [[{}]]\nports: [{}]\n",
            p.flows,
            if p.flows == 1 { "" } else { "s" },
            p.name,
            p.namespace,
            p.mode,
            quoted(&p.subject),
            quoted(&p.object),
            ports.join(", ")
        ));
    }
    y
}

#[cfg(test)]
mod tests;
