//! Network policies: subject–verb–object rules with a mode, a tier and data-plane flags.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::namespace::NamespacePath;
use crate::ports::Ports;
use crate::selector::Selector;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// Checked by the object's enforcer when it accepts.
    Incoming,
    /// Checked by the subject's enforcer when it connects.
    Outgoing,
    /// Both ends are PUs; checked at both.
    Bidirectional,
}

/// Tiers, walked in declaration order: the first tier with an enforced match decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Emergency,
    Infrastructure,
    Environment,
    Application,
}

impl Tier {
    pub const ALL: [Tier; 4] = [
        Tier::Emergency,
        Tier::Infrastructure,
        Tier::Environment,
        Tier::Application,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<Tier> {
        match s {
            "emergency" => Some(Tier::Emergency),
            "infrastructure" => Some(Tier::Infrastructure),
            "environment" => Some(Tier::Environment),
            "application" => Some(Tier::Application),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Emergency => "emergency",
            Tier::Infrastructure => "infrastructure",
            Tier::Environment => "environment",
            Tier::Application => "application",
        }
    }
}

/// Where a document came from, for error messages and `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based.
    pub column: usize,
}

/// A policy's index in its [`PolicySet`](crate::PolicySet). Sets keep policies sorted by
/// (namespace, name), so ids do not depend on load order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyId(pub u32);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub name: String,
    pub namespace: NamespacePath,
    pub action: Action,
    pub mode: Mode,
    pub subject: Selector,
    pub object: Selector,
    pub ports: Ports,
    pub tier: Tier,
    /// Also applies in child namespaces. Default true.
    pub propagate: bool,
    /// false: staged; matches are recorded but never change a verdict. Default true.
    pub enforce: bool,
    /// Data plane encrypted (default) or authenticated-only.
    pub encrypt: bool,
    /// Emit a flow record for matching flows. Default false.
    pub log: bool,
    pub origin: Option<Location>,
}

impl NetworkPolicy {
    /// `<namespace>:<name>`, unique within a set.
    pub fn qualified_name(&self) -> String {
        format!("{}:{}", self.namespace, self.name)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "Allow",
            Action::Reject => "Reject",
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Incoming => "Incoming",
            Mode::Outgoing => "Outgoing",
            Mode::Bidirectional => "Bidirectional",
        })
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}
