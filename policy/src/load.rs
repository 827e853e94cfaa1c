//! Loading YAML documents (`NetworkPolicy`, `ExternalNetwork`, `NetworkRuleSet`,
//! `Namespace`, `PolicyTest`, `Service`) into a validated [`PolicySet`], test cases and
//! Services.
//!
//! Every problem is reported with file, line, column, the field and what was expected;
//! a set with any error is rejected whole. This module does no I/O: callers pass the
//! text of each file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::decision::Verdict;
use crate::namespace::{Namespace, NamespacePath};
use crate::network::{Address, Entry, ExternalNetwork};
use crate::policy::{Action, Location, Mode, NetworkPolicy, Tier};
use crate::ports::{PortRange, PortSpec, Ports, Protocol};
use crate::selector::{Selector, clause_is_external};
use crate::service::{self, Endpoints, Service, ServicePort};
use crate::set::PolicySet;
use crate::tag::{Tag, TagPattern, TagSet};
use crate::testcase::{CaseEnd, TestCase};
use crate::yaml::{self, Kind, Node, Pos};

/// One input file: its name (for messages) and its text.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// One problem in the input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub location: Location,
    /// The field's path in its document (`incomingRules[0].ports[1]`), if any.
    pub field: Option<String>,
    pub message: String,
}

/// Every problem found in a set of documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    pub diagnostics: Vec<Diagnostic>,
}

/// What a set of documents holds.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub set: PolicySet,
    pub tests: Vec<TestCase>,
    /// Services, sorted by namespace and name.
    pub services: Vec<Service>,
}

/// Parses and validates all sources together (duplicate names are found across files).
pub fn load(sources: &[Source<'_>]) -> Result<Loaded, LoadError> {
    let mut l = Loader::default();
    for src in sources {
        l.file = src.name.to_owned();
        let first = l.diagnostics.len();
        match yaml::parse(src.text) {
            Err(e) => l.err(e.pos, None, format!("YAML syntax error: {}", e.message)),
            Ok(docs) if docs.len() > crate::limits::MAX_DOCUMENTS => l.err(
                Pos { line: 1, column: 1 },
                None,
                format!(
                    "{} documents; a load has at most {}",
                    docs.len(),
                    crate::limits::MAX_DOCUMENTS
                ),
            ),
            Ok(docs) => {
                for (doc, _) in docs {
                    if !doc.is_null() {
                        l.document(&doc);
                    }
                }
            }
        }
        // Report a file's problems in reading order.
        l.diagnostics[first..].sort_by_key(|d| (d.location.line, d.location.column));
    }
    l.finish()
}

#[derive(Default)]
struct Loader {
    file: String,
    diagnostics: Vec<Diagnostic>,
    policies: Vec<(NetworkPolicy, Option<Tier>)>,
    externals: Vec<(ExternalNetwork, Location)>,
    namespaces: Vec<(Namespace, Location)>,
    tests: Vec<TestCase>,
    services: Vec<(Service, Location)>,
}

/// A mapping's fields, checked against the allowed names.
struct Fields<'n> {
    pairs: Vec<(&'n str, &'n Node)>,
    pos: Pos,
    path: String,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }

    fn path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Loader {
    fn loc(&self, pos: Pos) -> Location {
        Location {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
        }
    }

    fn err(&mut self, pos: Pos, field: Option<&str>, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            location: self.loc(pos),
            field: field.map(str::to_owned),
            message: message.into(),
        });
    }

    fn fields<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Kind::Map(pairs) = &node.kind else {
            let f = (!path.is_empty()).then_some(path);
            self.err(
                node.pos,
                f,
                format!("expected a mapping, found {}", node.kind_name()),
            );
            return None;
        };
        let mut out = Fields {
            pairs: Vec::with_capacity(pairs.len()),
            pos: node.pos,
            path: path.to_owned(),
        };
        for (k, v) in pairs {
            let Kind::Scalar { value: key, .. } = &k.kind else {
                self.err(k.pos, Some(path), "expected a field name");
                continue;
            };
            let fpath = out.path(key);
            if !allowed.contains(&key.as_str()) {
                self.err(
                    k.pos,
                    Some(&fpath),
                    format!(
                        "unknown field `{key}`, expected one of: {}",
                        allowed.join(", ")
                    ),
                );
            } else if out.pairs.iter().any(|(n, _)| n == key) {
                self.err(k.pos, Some(&fpath), format!("duplicate field `{key}`"));
            } else {
                out.pairs.push((key.as_str(), v));
            }
        }
        Some(out)
    }

    fn required<'n>(&mut self, f: &Fields<'n>, name: &str) -> Option<&'n Node> {
        let v = f.get(name);
        if v.is_none() {
            self.err(
                f.pos,
                Some(&f.path(name)),
                format!("missing required field `{name}`"),
            );
        }
        v
    }

    fn scalar<'n>(&mut self, node: &'n Node, field: &str) -> Option<&'n str> {
        match &node.kind {
            Kind::Scalar { value, .. } if !node.is_null() => Some(value),
            _ => {
                self.err(
                    node.pos,
                    Some(field),
                    format!("expected a string, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn bool(&mut self, f: &Fields<'_>, name: &str, default: bool) -> bool {
        let Some(node) = f.get(name) else {
            return default;
        };
        match &node.kind {
            Kind::Scalar { value, plain: true } if value == "true" => true,
            Kind::Scalar { value, plain: true } if value == "false" => false,
            _ => {
                self.err(
                    node.pos,
                    Some(&f.path(name)),
                    format!("expected `true` or `false`, found {}", describe(node)),
                );
                default
            }
        }
    }

    fn choice<T: Copy>(&mut self, node: &Node, field: &str, options: &[(&str, T)]) -> Option<T> {
        let s = self.scalar(node, field)?;
        let found = options.iter().find(|(n, _)| *n == s).map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            self.err(
                node.pos,
                Some(field),
                format!("expected one of {}, found `{s}`", names.join(", ")),
            );
        }
        found
    }

    fn seq<'n>(&mut self, node: &'n Node, field: &str, what: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.err(
                    node.pos,
                    Some(field),
                    format!("expected a list of {what}, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn name(&mut self, f: &Fields<'_>) -> Option<String> {
        let node = self.required(f, "name")?;
        let s = self.scalar(node, "name")?;
        if !valid_name(s) {
            self.err(
                node.pos,
                Some("name"),
                format!("`{s}`: names use letters, digits, `-`, `_` and `.` (1 to 253)"),
            );
            return None;
        }
        Some(s.to_owned())
    }

    fn namespace_at(&mut self, node: &Node, field: &str) -> Option<NamespacePath> {
        let s = self.scalar(node, field)?;
        match s.parse() {
            Ok(ns) => Some(ns),
            Err(e) => {
                self.err(node.pos, Some(field), e.to_string());
                None
            }
        }
    }

    /// The optional `namespace` field, `/` when absent. `None` on error.
    fn namespace(&mut self, f: &Fields<'_>, name: &str) -> Option<NamespacePath> {
        match f.get(name) {
            None => Some(NamespacePath::root()),
            Some(n) => self.namespace_at(n, &f.path(name)),
        }
    }

    fn tier(&mut self, f: &Fields<'_>) -> Result<Option<Tier>, ()> {
        let Some(node) = f.get("tier") else {
            return Ok(None);
        };
        let options = Tier::ALL.map(|t| (t.as_str(), t));
        self.choice(node, &f.path("tier"), &options)
            .map(Some)
            .ok_or(())
    }

    /// A list of at most `max` `noun` (`whose` names what holds them in the error).
    fn seq_at_most<'n>(
        &mut self,
        node: &'n Node,
        field: &str,
        what: &str,
        (max, noun, whose): (usize, &str, &str),
    ) -> Option<&'n [Node]> {
        let items = self.seq(node, field, what)?;
        if items.len() > max {
            self.err(
                node.pos,
                Some(field),
                format!("{} {noun}; {whose} has at most {max}", items.len()),
            );
            return None;
        }
        Some(items)
    }

    fn tags(&mut self, node: &Node, field: &str) -> Option<TagSet> {
        let bound = (crate::limits::MAX_TAGS, "tags", "a list");
        let items = self.seq_at_most(node, field, "tags (`key=value`)", bound)?;
        let mut out = TagSet::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{field}[{i}]");
            let Some(s) = self.scalar(item, &path) else {
                ok = false;
                continue;
            };
            match s.parse::<Tag>() {
                Ok(t) => {
                    out.insert(t);
                }
                Err(e) => {
                    self.err(item.pos, Some(&path), format!("bad tag: {e}"));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn selector(&mut self, node: &Node, field: &str) -> Option<Selector> {
        let bound = (crate::limits::MAX_CLAUSES, "clauses", "a selector");
        let clauses = self.seq_at_most(node, field, "lists of tags (OR of ANDs)", bound)?;
        let mut out = Vec::with_capacity(clauses.len());
        let mut ok = true;
        if clauses.is_empty() {
            self.err(node.pos, Some(field), "an empty selector matches nothing");
            return None;
        }
        for (i, clause) in clauses.iter().enumerate() {
            let path = format!("{field}[{i}]");
            let Kind::Seq(patterns) = &clause.kind else {
                self.err(
                    clause.pos,
                    Some(&path),
                    format!(
                        "expected a list of tags, found {} (a selector is a list of lists: `[[app=web, env=prod], [app=api]]`)",
                        clause.kind_name()
                    ),
                );
                ok = false;
                continue;
            };
            if patterns.is_empty() {
                self.err(
                    clause.pos,
                    Some(&path),
                    "an empty clause would match everything; list at least one tag (`key=*` matches any value)",
                );
                ok = false;
                continue;
            }
            if patterns.len() > crate::limits::MAX_CLAUSE_TAGS {
                self.err(
                    clause.pos,
                    Some(&path),
                    format!(
                        "{} tags; a clause has at most {}",
                        patterns.len(),
                        crate::limits::MAX_CLAUSE_TAGS
                    ),
                );
                ok = false;
                continue;
            }
            let mut c = Vec::with_capacity(patterns.len());
            for (j, p) in patterns.iter().enumerate() {
                let ppath = format!("{path}[{j}]");
                let Some(s) = self.scalar(p, &ppath) else {
                    ok = false;
                    continue;
                };
                match s.parse::<TagPattern>() {
                    Ok(t) => c.push(t),
                    Err(e) => {
                        self.err(p.pos, Some(&ppath), format!("bad tag: {e}"));
                        ok = false;
                    }
                }
            }
            c.sort();
            c.dedup();
            out.push(c);
        }
        ok.then_some(Selector(out))
    }

    fn port_specs(&mut self, node: &Node, field: &str) -> Option<Vec<PortSpec>> {
        let bound = (crate::limits::MAX_PORTS, "ports", "a list");
        let items = self.seq_at_most(node, field, "ports (`tcp/N`, `tcp/N-M`, `any`)", bound)?;
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{field}[{i}]");
            let Some(s) = self.scalar(item, &path) else {
                ok = false;
                continue;
            };
            match s.parse::<PortSpec>() {
                Ok(p) => out.push(p),
                Err(e) => {
                    self.err(item.pos, Some(&path), e.to_string());
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn ports(&mut self, f: &Fields<'_>) -> Option<Ports> {
        match f.get("ports") {
            None => Some(Ports::Any),
            Some(n) => self.port_specs(n, &f.path("ports")).map(Ports::from_specs),
        }
    }

    /// Checks that no clause of a selector that must name PUs selects only external
    /// networks (it could never match).
    fn pu_side(&mut self, node: &Node, sel: &Selector, field: &str, why: &str) -> bool {
        let Kind::Seq(items) = &node.kind else {
            return true;
        };
        let mut ok = true;
        for (i, (clause, n)) in sel.clauses().iter().zip(items).enumerate() {
            if clause_is_external(clause) {
                self.err(
                    n.pos,
                    Some(&format!("{field}[{i}]")),
                    format!("this clause selects only external networks, but {why}"),
                );
                ok = false;
            }
        }
        ok
    }

    fn document(&mut self, doc: &Node) {
        let Kind::Map(pairs) = &doc.kind else {
            self.err(
                doc.pos,
                None,
                format!(
                    "expected a document (a mapping with `kind`), found {}",
                    doc.kind_name()
                ),
            );
            return;
        };
        let kind = pairs.iter().find_map(|(k, v)| match &k.kind {
            Kind::Scalar { value, .. } if value == "kind" => Some(v),
            _ => None,
        });
        let Some(kind) = kind else {
            self.err(doc.pos, Some("kind"), "missing required field `kind`");
            return;
        };
        match self.scalar(kind, "kind") {
            Some("NetworkPolicy") => self.network_policy(doc),
            Some("ExternalNetwork") => self.external_network(doc),
            Some("NetworkRuleSet") => self.ruleset(doc),
            Some("Namespace") => self.namespace_doc(doc),
            Some("PolicyTest") => self.policy_test(doc),
            Some("Service") => self.service(doc),
            Some(other) => {
                let other = other.to_owned();
                self.err(
                    kind.pos,
                    Some("kind"),
                    format!("unknown kind `{other}`, expected one of: NetworkPolicy, ExternalNetwork, NetworkRuleSet, Namespace, PolicyTest, Service"),
                )
            }
            None => {}
        }
    }

    fn network_policy(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &[
            "kind",
            "name",
            "description",
            "namespace",
            "action",
            "mode",
            "subject",
            "object",
            "ports",
            "tier",
            "propagate",
            "enforce",
            "encrypt",
            "log",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let before = self.diagnostics.len();
        let name = self.name(&f);
        let namespace = self.namespace(&f, "namespace");
        let action = self.required(&f, "action").and_then(|n| {
            self.choice(
                n,
                "action",
                &[("Allow", Action::Allow), ("Reject", Action::Reject)],
            )
        });
        let mode = self.required(&f, "mode").and_then(|n| {
            self.choice(
                n,
                "mode",
                &[
                    ("Incoming", Mode::Incoming),
                    ("Outgoing", Mode::Outgoing),
                    ("Bidirectional", Mode::Bidirectional),
                ],
            )
        });
        let subject_node = self.required(&f, "subject");
        let subject = subject_node.and_then(|n| self.selector(n, "subject"));
        let object_node = self.required(&f, "object");
        let object = object_node.and_then(|n| self.selector(n, "object"));
        let ports = self.ports(&f);
        let tier = self.tier(&f);
        let propagate = self.bool(&f, "propagate", true);
        let enforce = self.bool(&f, "enforce", true);
        let encrypt = self.bool(&f, "encrypt", true);
        let log = self.bool(&f, "log", false);
        if let (Some(mode), Some(s), Some(o), Some(sn), Some(on)) =
            (mode, &subject, &object, subject_node, object_node)
        {
            self.check_mode(mode, sn, s, on, o, "subject", "object");
        }
        if self.diagnostics.len() != before {
            return;
        }
        let (
            Some(name),
            Some(namespace),
            Some(action),
            Some(mode),
            Some(subject),
            Some(object),
            Some(ports),
            Ok(tier),
        ) = (name, namespace, action, mode, subject, object, ports, tier)
        else {
            return;
        };
        let origin = Some(self.loc(f.pos));
        self.policies.push((
            NetworkPolicy {
                name,
                namespace,
                action,
                mode,
                subject,
                object,
                ports,
                tier: Tier::Application,
                propagate,
                enforce,
                encrypt,
                log,
                origin,
            },
            tier,
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn check_mode(
        &mut self,
        mode: Mode,
        sn: &Node,
        s: &Selector,
        on: &Node,
        o: &Selector,
        sfield: &str,
        ofield: &str,
    ) {
        match mode {
            Mode::Incoming => {
                self.pu_side(on, o, ofield, "an Incoming policy is checked by the object's enforcer, so its object must be a processing unit");
            }
            Mode::Outgoing => {
                self.pu_side(sn, s, sfield, "an Outgoing policy is checked by the subject's enforcer, so its subject must be a processing unit");
            }
            Mode::Bidirectional => {
                let why = "a Bidirectional policy has processing units at both ends (use Incoming or Outgoing for external networks)";
                self.pu_side(sn, s, sfield, why);
                self.pu_side(on, o, ofield, why);
            }
        }
    }

    fn external_network(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &[
            "kind",
            "name",
            "description",
            "namespace",
            "tags",
            "entries",
            "ports",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let before = self.diagnostics.len();
        let name = self.name(&f);
        let namespace = self.namespace(&f, "namespace");
        let tags = match f.get("tags") {
            None => Some(TagSet::new()),
            Some(n) => self.tags(n, "tags"),
        };
        if let Some(t) = &tags {
            if t.iter()
                .any(|t| t.key() == "$identity" || t.key() == crate::tag::EXT_NAME_KEY)
            {
                let pos = f.get("tags").map_or(f.pos, |n| n.pos);
                self.err(
                    pos,
                    Some("tags"),
                    "`$identity` and `ext:name` are set automatically",
                );
            }
        }
        let mut port_specs = match f.get("ports") {
            None => Some(Vec::new()),
            Some(n) => self.port_specs(n, "ports"),
        };
        let mut entries = Vec::new();
        if let Some(node) = self.required(&f, "entries") {
            let bound = (crate::limits::MAX_ENTRIES, "entries", "an external network");
            if let Some(items) =
                self.seq_at_most(node, "entries", "CIDRs, IPs, domain names or ports", bound)
            {
                if items.is_empty() {
                    self.err(
                        node.pos,
                        Some("entries"),
                        "an external network needs at least one entry",
                    );
                }
                for (i, item) in items.iter().enumerate() {
                    let path = format!("entries[{i}]");
                    let Some(s) = self.scalar(item, &path) else {
                        continue;
                    };
                    // proto/port pairs among the entries narrow the network's ports.
                    if s.contains('/')
                        && s.split('/')
                            .next()
                            .is_some_and(|p| p.chars().all(|c| c.is_ascii_alphabetic()))
                    {
                        match s.parse::<PortSpec>() {
                            Ok(p) => {
                                if let Some(v) = port_specs.as_mut() {
                                    v.push(p)
                                }
                            }
                            Err(e) => self.err(item.pos, Some(&path), e.to_string()),
                        }
                        continue;
                    }
                    match s.parse::<Entry>() {
                        Ok(e) => entries.push(e),
                        Err(e) => self.err(item.pos, Some(&path), e.to_string()),
                    }
                }
                if !items.is_empty() && entries.is_empty() && self.diagnostics.len() == before {
                    self.err(
                        node.pos,
                        Some("entries"),
                        "an external network needs at least one address or domain entry",
                    );
                }
            }
        }
        if self.diagnostics.len() != before {
            return;
        }
        let (Some(name), Some(namespace), Some(tags), Some(specs)) =
            (name, namespace, tags, port_specs)
        else {
            return;
        };
        let loc = self.loc(f.pos);
        self.externals.push((
            ExternalNetwork {
                name,
                namespace,
                tags,
                entries,
                ports: Ports::from_specs(specs),
            },
            loc,
        ));
    }

    /// A number in 1..=65535 (a port).
    fn port_number(&mut self, node: &Node, field: &str) -> Option<u16> {
        let s = self.scalar(node, field)?;
        match s.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.err(
                    node.pos,
                    Some(field),
                    format!("expected a port (1 to 65535), found `{s}`"),
                );
                None
            }
        }
    }

    /// A list of at most `max` IP addresses, none repeated.
    fn ip_list(&mut self, node: &Node, field: &str, max: usize) -> Option<Vec<std::net::IpAddr>> {
        let items = self.seq(node, field, "IP addresses")?;
        if items.is_empty() || items.len() > max {
            self.err(
                node.pos,
                Some(field),
                format!("expected 1 to {max} addresses, found {}", items.len()),
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{field}[{i}]");
            let Some(s) = self.scalar(item, &path) else {
                ok = false;
                continue;
            };
            match s.parse::<std::net::IpAddr>() {
                Ok(ip) if out.contains(&ip.to_canonical()) => {
                    self.err(item.pos, Some(&path), format!("`{s}` is listed twice"));
                    ok = false;
                }
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                    self.err(
                        item.pos,
                        Some(&path),
                        format!("`{s}` cannot be a Service's address or endpoint"),
                    );
                    ok = false;
                }
                Ok(ip) => out.push(ip.to_canonical()),
                Err(_) => {
                    self.err(item.pos, Some(&path), format!("`{s}` is not an IP address"));
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn service(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &[
            "kind",
            "name",
            "description",
            "namespace",
            "addresses",
            "ports",
            "selector",
            "endpoints",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let before = self.diagnostics.len();
        let name = self.name(&f);
        let namespace = self.namespace(&f, "namespace");
        let addresses = self
            .required(&f, "addresses")
            .and_then(|n| self.ip_list(n, "addresses", service::MAX_ADDRESSES));
        let mut ports = Vec::new();
        if let Some(node) = self.required(&f, "ports") {
            if let Some(items) = self.seq(node, "ports", "ports (`{port, targetPort, protocol}`)") {
                if items.is_empty() || items.len() > service::MAX_PORTS {
                    self.err(
                        node.pos,
                        Some("ports"),
                        format!(
                            "expected 1 to {} ports, found {}",
                            service::MAX_PORTS,
                            items.len()
                        ),
                    );
                }
                for (i, item) in items.iter().enumerate() {
                    let path = format!("ports[{i}]");
                    let Some(pf) =
                        self.fields(item, &path, &["name", "port", "targetPort", "protocol"])
                    else {
                        continue;
                    };
                    let port = self
                        .required(&pf, "port")
                        .and_then(|n| self.port_number(n, &pf.path("port")));
                    let target = match pf.get("targetPort") {
                        None => port,
                        Some(n) => self.port_number(n, &pf.path("targetPort")),
                    };
                    let protocol = match pf.get("protocol") {
                        None => Some(Protocol::Tcp),
                        Some(n) => self.choice(
                            n,
                            &pf.path("protocol"),
                            &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)],
                        ),
                    };
                    if let (Some(port), Some(target), Some(protocol)) = (port, target, protocol) {
                        let p = ServicePort {
                            protocol,
                            port,
                            target,
                        };
                        if ports
                            .iter()
                            .any(|o: &ServicePort| (o.protocol, o.port) == (protocol, port))
                        {
                            self.err(
                                item.pos,
                                Some(&path),
                                format!("{}/{port} is listed twice", protocol.as_str()),
                            );
                        }
                        ports.push(p);
                    }
                }
            }
        }
        let endpoints = match (f.get("selector"), f.get("endpoints")) {
            (Some(n), None) => self.tags(n, "selector").and_then(|t| {
                if t.is_empty() || t.len() > service::MAX_SELECTOR_TAGS {
                    self.err(
                        n.pos,
                        Some("selector"),
                        format!(
                            "a selector has 1 to {} tags, found {}",
                            service::MAX_SELECTOR_TAGS,
                            t.len()
                        ),
                    );
                    return None;
                }
                Some(Endpoints::Selector(t))
            }),
            (None, Some(n)) => self
                .ip_list(n, "endpoints", service::MAX_ENDPOINTS)
                .map(Endpoints::Addresses),
            _ => {
                self.err(
                    f.pos,
                    Some("selector"),
                    "a Service has either `selector` (tags of registered PUs) or `endpoints` (addresses), exactly one",
                );
                None
            }
        };
        if self.diagnostics.len() != before {
            return;
        }
        let (Some(name), Some(namespace), Some(addresses), Some(endpoints)) =
            (name, namespace, addresses, endpoints)
        else {
            return;
        };
        let loc = self.loc(f.pos);
        self.services.push((
            Service {
                name,
                namespace,
                addresses,
                ports,
                endpoints,
            },
            loc,
        ));
    }

    fn ruleset(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &[
            "kind",
            "name",
            "description",
            "namespace",
            "subject",
            "outgoingRules",
            "incomingRules",
            "propagate",
            "tier",
            "enforce",
        ];
        const RULE: &[&str] = &[
            "action",
            "object",
            "ports",
            "tier",
            "enforce",
            "encrypt",
            "log",
            "description",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let before = self.diagnostics.len();
        let name = self.name(&f);
        let namespace = self.namespace(&f, "namespace");
        let subject_node = self.required(&f, "subject");
        let subject = subject_node.and_then(|n| self.selector(n, "subject"));
        let propagate = self.bool(&f, "propagate", true);
        let enforce = self.bool(&f, "enforce", true);
        let tier = self.tier(&f);
        let mut out = Vec::new();
        for (key, dir, mode) in [
            ("outgoingRules", "out", Mode::Outgoing),
            ("incomingRules", "in", Mode::Incoming),
        ] {
            let Some(node) = f.get(key) else { continue };
            let Some(rules) = self.seq(node, key, "rules") else {
                continue;
            };
            for (i, rule) in rules.iter().enumerate() {
                let path = format!("{key}[{i}]");
                let Some(rf) = self.fields(rule, &path, RULE) else {
                    continue;
                };
                let action = self.required(&rf, "action").and_then(|n| {
                    self.choice(
                        n,
                        &rf.path("action"),
                        &[("Allow", Action::Allow), ("Reject", Action::Reject)],
                    )
                });
                let onode = self.required(&rf, "object");
                let object = onode.and_then(|n| self.selector(n, &rf.path("object")));
                let ports = self.ports(&rf);
                let rtier = self.tier(&rf);
                let renforce = self.bool(&rf, "enforce", enforce);
                let encrypt = self.bool(&rf, "encrypt", true);
                let log = self.bool(&rf, "log", false);
                if let (Some(o), Some(on), Some(s), Some(sn)) =
                    (&object, onode, &subject, subject_node)
                {
                    // Outgoing: the ruleset's PUs are the subject. Incoming: the rule's
                    // object is the initiator (subject) and the ruleset's PUs the object.
                    match mode {
                        Mode::Outgoing => {
                            self.check_mode(mode, sn, s, on, o, "subject", &rf.path("object"))
                        }
                        _ => self.check_mode(mode, on, o, sn, s, &rf.path("object"), "subject"),
                    }
                }
                if let (Some(action), Some(object), Some(ports), Ok(rtier)) =
                    (action, object, ports, rtier)
                {
                    out.push((
                        format!("{dir}/{i}"),
                        mode,
                        action,
                        object,
                        ports,
                        rtier,
                        renforce,
                        encrypt,
                        log,
                        rule.pos,
                    ));
                }
            }
        }
        if self.diagnostics.len() != before {
            return;
        }
        let (Some(name), Some(namespace), Some(subject), Ok(tier)) =
            (name, namespace, subject, tier)
        else {
            return;
        };
        for (suffix, mode, action, object, ports, rtier, enforce, encrypt, log, pos) in out {
            let (subject, object) = match mode {
                Mode::Outgoing => (subject.clone(), object),
                _ => (object, subject.clone()),
            };
            let origin = Some(self.loc(pos));
            self.policies.push((
                NetworkPolicy {
                    name: format!("{name}/{suffix}"),
                    namespace: namespace.clone(),
                    action,
                    mode,
                    subject,
                    object,
                    ports,
                    tier: Tier::Application,
                    propagate,
                    enforce,
                    encrypt,
                    log,
                    origin,
                },
                rtier.or(tier),
            ));
        }
    }

    fn namespace_doc(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &[
            "kind",
            "name",
            "description",
            "discovery",
            "defaultTier",
            "tagPrefixes",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let before = self.diagnostics.len();
        let path = self
            .required(&f, "name")
            .and_then(|n| self.namespace_at(n, "name"));
        let discovery = f
            .get("discovery")
            .map(|_| self.bool(&f, "discovery", false));
        let default_tier = match f.get("defaultTier") {
            None => Ok(None),
            Some(n) => {
                let options = Tier::ALL.map(|t| (t.as_str(), t));
                self.choice(n, "defaultTier", &options).map(Some).ok_or(())
            }
        };
        let tag_prefixes = match f.get("tagPrefixes") {
            None => Some(None),
            Some(n) => self.seq(n, "tagPrefixes", "tag key prefixes").and_then(|items| {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let path = format!("tagPrefixes[{i}]");
                    let s = self.scalar(item, &path)?;
                    if s.is_empty() || s.contains('=') || s.starts_with('$') || s.len() > 253 {
                        self.err(
                            item.pos,
                            Some(&path),
                            format!("`{s}`: a prefix of tag keys (not empty, no `=`, not an automatic `$` key)"),
                        );
                        return None;
                    }
                    out.push(s.to_owned());
                }
                Some(Some(out))
            }),
        };
        if self.diagnostics.len() != before {
            return;
        }
        if let (Some(path), Ok(default_tier), Some(tag_prefixes)) =
            (path, default_tier, tag_prefixes)
        {
            let loc = self.loc(f.pos);
            self.namespaces.push((
                Namespace {
                    path,
                    discovery,
                    default_tier,
                    tag_prefixes,
                },
                loc,
            ));
        }
    }

    fn case_end(&mut self, node: &Node, field: &str) -> Option<CaseEnd> {
        match &node.kind {
            Kind::Seq(_) => {
                let tags = self.tags(node, field)?;
                Some(if tags.is_external() {
                    CaseEnd::External(tags)
                } else {
                    CaseEnd::Pu(tags)
                })
            }
            Kind::Map(_) => {
                let f = self.fields(node, field, &["ip", "domain"])?;
                let mut addr = Address::default();
                if let Some(n) = f.get("ip") {
                    let s = self.scalar(n, &f.path("ip"))?;
                    match s.parse() {
                        Ok(ip) => addr.ip = Some(ip),
                        Err(_) => {
                            self.err(
                                n.pos,
                                Some(&f.path("ip")),
                                format!("`{s}` is not an IP address"),
                            );
                            return None;
                        }
                    }
                }
                if let Some(n) = f.get("domain") {
                    addr.domain = Some(self.scalar(n, &f.path("domain"))?.to_ascii_lowercase());
                }
                if addr.ip.is_none() && addr.domain.is_none() {
                    self.err(node.pos, Some(field), "an address needs `ip` or `domain`");
                    return None;
                }
                Some(CaseEnd::Address(addr))
            }
            _ => {
                self.err(
                    node.pos,
                    Some(field),
                    format!(
                        "expected a list of tags or {{ip: …}}, found {}",
                        node.kind_name()
                    ),
                );
                None
            }
        }
    }

    fn policy_test(&mut self, doc: &Node) {
        const FIELDS: &[&str] = &["kind", "name", "description", "cases"];
        const CASE: &[&str] = &[
            "name",
            "description",
            "from",
            "to",
            "port",
            "expect",
            "namespace",
            "from_namespace",
            "to_namespace",
        ];
        let Some(f) = self.fields(doc, "", FIELDS) else {
            return;
        };
        let Some(node) = self.required(&f, "cases") else {
            return;
        };
        let Some(cases) = self.seq(node, "cases", "test cases") else {
            return;
        };
        for (i, c) in cases.iter().enumerate() {
            let path = format!("cases[{i}]");
            let Some(cf) = self.fields(c, &path, CASE) else {
                continue;
            };
            let before = self.diagnostics.len();
            let name = self
                .required(&cf, "name")
                .and_then(|n| self.scalar(n, &cf.path("name")))
                .map(str::to_owned);
            let from = self
                .required(&cf, "from")
                .and_then(|n| self.case_end(n, &cf.path("from")));
            let to = self
                .required(&cf, "to")
                .and_then(|n| self.case_end(n, &cf.path("to")));
            let port = self.required(&cf, "port").and_then(|n| {
                let s = self.scalar(n, &cf.path("port"))?;
                match PortRange::single(s) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        self.err(
                            n.pos,
                            Some(&cf.path("port")),
                            format!("expected a single port `tcp/N`, found `{s}`"),
                        );
                        None
                    }
                }
            });
            let expect = self.required(&cf, "expect").and_then(|n| {
                self.choice(
                    n,
                    &cf.path("expect"),
                    &[("allow", Verdict::Allow), ("reject", Verdict::Reject)],
                )
            });
            let ns = self.namespace(&cf, "namespace");
            let from_ns = match cf.get("from_namespace") {
                Some(_) => self.namespace(&cf, "from_namespace"),
                None => ns.clone(),
            };
            let to_ns = match cf.get("to_namespace") {
                Some(_) => self.namespace(&cf, "to_namespace"),
                None => ns.clone(),
            };
            if let (Some(a), Some(b)) = (&from, &to) {
                if !a.is_pu() && !b.is_pu() {
                    self.err(cf.pos, Some(&path), "at least one end must be a processing unit (no enforcer would see this flow)");
                }
            }
            if self.diagnostics.len() != before {
                continue;
            }
            if let (
                Some(name),
                Some(from),
                Some(to),
                Some(port),
                Some(expect),
                Some(from_namespace),
                Some(to_namespace),
            ) = (name, from, to, port, expect, from_ns, to_ns)
            {
                let location = self.loc(cf.pos);
                self.tests.push(TestCase {
                    name,
                    from,
                    to,
                    port,
                    expect,
                    from_namespace,
                    to_namespace,
                    location,
                });
            }
        }
    }

    fn finish(mut self) -> Result<Loaded, LoadError> {
        // Duplicate names, reported at the second definition.
        let mut seen: HashMap<(String, String), Location> = HashMap::new();
        for (p, _) in &self.policies {
            let key = (p.namespace.to_string(), p.name.clone());
            let loc = p.origin.clone().expect("loaded policies have an origin");
            if let Some(first) = seen.get(&key) {
                self.diagnostics.push(Diagnostic {
                    location: loc,
                    field: Some("name".into()),
                    message: format!(
                        "duplicate policy `{}` in namespace {} (first defined at {first})",
                        p.name, p.namespace
                    ),
                });
            } else {
                seen.insert(key, loc);
            }
        }
        let mut seen: HashMap<(String, String), Location> = HashMap::new();
        for (e, loc) in &self.externals {
            let key = (e.namespace.to_string(), e.name.clone());
            if let Some(first) = seen.get(&key) {
                self.diagnostics.push(Diagnostic {
                    location: loc.clone(),
                    field: Some("name".into()),
                    message: format!("duplicate external network `{}` in namespace {} (first defined at {first})", e.name, e.namespace),
                });
            } else {
                seen.insert(key, loc.clone());
            }
        }
        let mut seen: HashMap<NamespacePath, Location> = HashMap::new();
        for (n, loc) in &self.namespaces {
            if let Some(first) = seen.get(&n.path) {
                self.diagnostics.push(Diagnostic {
                    location: loc.clone(),
                    field: Some("name".into()),
                    message: format!("duplicate namespace {} (first defined at {first})", n.path),
                });
            } else {
                seen.insert(n.path.clone(), loc.clone());
            }
        }
        let mut seen: HashMap<(String, String), Location> = HashMap::new();
        let mut taken: HashMap<(std::net::IpAddr, Protocol, u16), String> = HashMap::new();
        for (s, loc) in &self.services {
            let key = (s.namespace.to_string(), s.name.clone());
            if let Some(first) = seen.get(&key) {
                self.diagnostics.push(Diagnostic {
                    location: loc.clone(),
                    field: Some("name".into()),
                    message: format!(
                        "duplicate Service `{}` in namespace {} (first defined at {first})",
                        s.name, s.namespace
                    ),
                });
                continue;
            }
            seen.insert(key, loc.clone());
            // An address and port lead to one Service.
            for ip in &s.addresses {
                for p in &s.ports {
                    let k = (*ip, p.protocol, p.port);
                    if let Some(other) = taken.get(&k) {
                        self.diagnostics.push(Diagnostic {
                            location: loc.clone(),
                            field: Some("addresses".into()),
                            message: format!(
                                "{ip} {}/{} already belongs to Service {other}",
                                p.protocol.as_str(),
                                p.port
                            ),
                        });
                    } else {
                        taken.insert(k, s.qualified_name());
                    }
                }
            }
        }
        let mut seen: HashMap<&str, &Location> = HashMap::new();
        for t in &self.tests {
            if let Some(first) = seen.get(t.name.as_str()) {
                self.diagnostics.push(Diagnostic {
                    location: t.location.clone(),
                    field: Some("name".into()),
                    message: format!(
                        "duplicate test case `{}` (first defined at {first})",
                        t.name
                    ),
                });
            } else {
                seen.insert(&t.name, &t.location);
            }
        }
        if !self.diagnostics.is_empty() {
            return Err(LoadError {
                diagnostics: self.diagnostics,
            });
        }
        let namespaces: BTreeMap<NamespacePath, Namespace> = self
            .namespaces
            .into_iter()
            .map(|(n, _)| (n.path.clone(), n))
            .collect();
        let policies = self
            .policies
            .into_iter()
            .map(|(mut p, tier)| {
                p.tier =
                    tier.unwrap_or_else(|| crate::set::default_tier(&namespaces, &p.namespace));
                p
            })
            .collect();
        let externals = self.externals.into_iter().map(|(e, _)| e).collect();
        let set = match PolicySet::new(policies, externals, namespaces.into_values().collect()) {
            Ok(s) => s,
            // Duplicates and per-document sizes were checked above with positions; what
            // remains is the whole set's size.
            Err(e) => {
                return Err(LoadError {
                    diagnostics: vec![Diagnostic {
                        location: Location {
                            file: self.file.clone(),
                            line: 1,
                            column: 1,
                        },
                        field: None,
                        message: e.to_string(),
                    }],
                });
            }
        };
        let mut services: Vec<Service> = self.services.into_iter().map(|(s, _)| s).collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(Loaded {
            set,
            tests: self.tests,
            services,
        })
    }
}

fn describe(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar { value, .. } => format!("`{value}`"),
        _ => node.kind_name().to_owned(),
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
