//! `segmeshctl test` and `segmeshctl explain` on policy files, without a console.

use std::fmt::Write;

use segmesh_policy::{
    CaseEnd, CaseOutcome, EndResult, Engine, Loaded, NamespacePath, PolicySet, Source, TestCase,
    Verdict, evaluate, explain, load,
};
use serde::Serialize;

use crate::files::SourceFile;
use crate::style::Style;

/// Loads and validates all files together.
pub fn load_files(files: &[SourceFile]) -> Result<Loaded, segmesh_policy::LoadError> {
    let sources: Vec<Source<'_>> = files
        .iter()
        .map(|f| Source {
            name: &f.name,
            text: &f.text,
        })
        .collect();
    load(&sources)
}

#[derive(Debug, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub expect: Verdict,
    pub actual: Verdict,
    pub pass: bool,
    /// The deciding policies (`<namespace>:<name>`), or `default` / `discovered`.
    pub policies: Vec<String>,
    /// Which ends decided: `client`, `server`.
    pub decided_by: Vec<&'static str>,
    pub location: String,
}

#[derive(Debug, Serialize)]
pub struct TestReport {
    pub cases: Vec<CaseReport>,
    pub passed: usize,
    pub failed: usize,
}

fn role(e: &EndResult) -> &'static str {
    match e.direction {
        segmesh_policy::Direction::Outgoing => "client",
        segmesh_policy::Direction::Incoming => "server",
    }
}

fn deciding(set: &PolicySet, o: &CaseOutcome) -> (Vec<String>, Vec<&'static str>) {
    let mut policies = Vec::new();
    let mut ends = Vec::new();
    for e in o.deciding_ends() {
        ends.push(role(e));
        if e.decision.policies.is_empty() {
            policies.push(e.decision.reason.to_string());
        } else {
            policies.extend(e.decision.policy_names(set));
        }
    }
    policies.dedup();
    (policies, ends)
}

/// Runs every case; the report lists them in file order.
pub fn run_tests(engine: &Engine, cases: &[TestCase]) -> TestReport {
    let cases: Vec<CaseReport> = cases
        .iter()
        .map(|c| {
            let o = evaluate(engine, c);
            let (policies, decided_by) = deciding(engine.set(), &o);
            CaseReport {
                name: c.name.clone(),
                expect: c.expect,
                actual: o.actual,
                pass: o.actual == c.expect,
                policies,
                decided_by,
                location: c.location.to_string(),
            }
        })
        .collect();
    let passed = cases.iter().filter(|c| c.pass).count();
    TestReport {
        failed: cases.len() - passed,
        passed,
        cases,
    }
}

/// The table `segmeshctl test` prints.
pub fn render_table(r: &TestReport, style: Style) -> String {
    let w = r
        .cases
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "{:<6} {:<w$}  {:<7} {:<7} DECIDED BY",
            "RESULT", "CASE", "EXPECT", "ACTUAL"
        ))
    );
    for c in &r.cases {
        let result = if c.pass {
            style.green("PASS  ")
        } else {
            style.red("FAIL  ")
        };
        let by = c
            .decided_by
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("+");
        let _ = writeln!(
            out,
            "{result} {:<w$}  {:<7} {:<7} {by}: {}",
            c.name,
            c.expect.to_string(),
            c.actual.to_string(),
            c.policies.join(", ")
        );
        if !c.pass {
            let _ = writeln!(out, "       {}", style.dim(&format!("at {}", c.location)));
        }
    }
    let summary = format!("{} passed, {} failed", r.passed, r.failed);
    let _ = writeln!(
        out,
        "\n{}",
        if r.failed == 0 {
            style.green(&summary)
        } else {
            style.red(&summary)
        }
    );
    out
}

/// One flow for `explain`.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub from: CaseEnd,
    pub to: CaseEnd,
    pub port: segmesh_policy::FlowPort,
    pub from_namespace: NamespacePath,
    pub to_namespace: NamespacePath,
}

/// The decision path of one flow at each enforcing end.
pub fn explain_flow(engine: &Engine, flow: &FlowSpec, style: Style) -> (String, CaseOutcome) {
    let case = TestCase {
        name: "explain".into(),
        from: flow.from.clone(),
        to: flow.to.clone(),
        port: flow.port,
        expect: Verdict::Allow,
        from_namespace: flow.from_namespace.clone(),
        to_namespace: flow.to_namespace.clone(),
        location: segmesh_policy::Location {
            file: "<command line>".into(),
            line: 0,
            column: 0,
        },
    };
    let o = evaluate(engine, &case);
    let mut out = String::new();
    for e in [&o.client, &o.server].into_iter().flatten() {
        out.push_str(&explain::render_end(engine.set(), e));
        out.push('\n');
    }
    let ends: Vec<&str> = [&o.client, &o.server]
        .into_iter()
        .flatten()
        .map(role)
        .collect();
    let (policies, by) = deciding(engine.set(), &o);
    let verdict = match o.actual {
        Verdict::Allow => style.green("ALLOW"),
        Verdict::Reject => style.red("REJECT"),
    };
    let _ = writeln!(
        out,
        "flow: {verdict} (enforcing ends: {}; decided by {}: {})",
        ends.join(", "),
        by.join("+"),
        policies.join(", ")
    );
    (out, o)
}

/// A policy set from the console's `GET /v1/documents` answer.
pub fn set_from_documents(v: &serde_json::Value) -> Result<PolicySet, String> {
    let field = |k: &str| {
        v.get(k)
            .cloned()
            .unwrap_or(serde_json::Value::Array(Vec::new()))
    };
    let policies =
        serde_json::from_value(field("policies")).map_err(|e| format!("policies: {e}"))?;
    let externals = serde_json::from_value(field("externals"))
        .map_err(|e| format!("external networks: {e}"))?;
    let namespaces =
        serde_json::from_value(field("namespaces")).map_err(|e| format!("namespaces: {e}"))?;
    PolicySet::new(policies, externals, namespaces).map_err(|e| e.to_string())
}
